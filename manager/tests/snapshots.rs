//! Volume snapshots, clones and restores in the state machine: snapshot records and their
//! names, ids and limits, who takes a snapshot (the live holder or a work attachment), the
//! gateway's reports (fenced by its writer epoch), deletion with dependents, clones and their
//! fill flags, restores, chunk copies clearing the source and releasing internal snapshots,
//! attaches and publications meeting work attachments, and survival through a Raft snapshot.

use ironsan_common::proto::manager::{
    self as pb, apply_result, command::Op, Attachment, Command, Snapshot, SnapshotState,
    StateSnapshot, Volume, VolumeState,
};
use ironsan_manager::state::{State, DEFAULT_LEASE_MS, MAX_SNAPSHOTS_PER_VOLUME};
use prost::Message as _;
use tonic::Code;

const T0: u64 = 1_000_000;
const MIB: u64 = 1 << 20;
/// Volume "v": 100 MiB in 64 MiB chunks, so two chunks, the last one partly used.
const V_SIZE: u64 = 100 * MIB;

fn vref(name: &str) -> Option<pb::VolumeRef> {
    Some(pb::VolumeRef {
        id: 0,
        name: name.into(),
    })
}

fn run(st: &mut State, now: u64, op: Op) -> apply_result::Result {
    st.apply(&Command {
        now_ms: now,
        op: Some(op),
    })
    .result
    .expect("a result")
}

/// Applies `op`, which must be refused with `code` and leave the state as it was.
fn refused(st: &mut State, now: u64, op: Op, code: Code) -> String {
    let before = st.clone();
    match run(st, now, op) {
        apply_result::Result::Error(e) => {
            assert_eq!(Code::from_i32(e.code), code, "{}", e.message);
            assert_eq!(*st, before, "a refused command changed the state");
            e.message
        }
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

fn snapshot(r: apply_result::Result) -> Snapshot {
    match r {
        apply_result::Result::Snapshot(s) => s,
        other => panic!("expected a snapshot, got {other:?}"),
    }
}

fn volume(r: apply_result::Result) -> Volume {
    match r {
        apply_result::Result::Volume(v) => v,
        other => panic!("expected a volume, got {other:?}"),
    }
}

fn attachment(r: apply_result::Result) -> Attachment {
    match r {
        apply_result::Result::Attachment(a) => a,
        other => panic!("expected an attachment, got {other:?}"),
    }
}

fn chunk(r: apply_result::Result) -> pb::Chunk {
    match r {
        apply_result::Result::Chunk(c) => c,
        other => panic!("expected a chunk, got {other:?}"),
    }
}

fn sets(n: usize) -> Vec<pb::ReplicaSet> {
    vec![
        pb::ReplicaSet {
            nodes: vec!["s1".into(), "s2".into(), "s3".into()],
        };
        n
    ]
}

/// Three nodes, gateways g1 and g2, and volume "v" (two chunks) on the nodes.
fn cluster() -> State {
    let mut st = State::new();
    for n in ["s1", "s2", "s3"] {
        run(
            &mut st,
            T0,
            Op::RegisterNode(pb::RegisterNodeRequest {
                id: n.into(),
                addr: "127.0.0.1:1".into(),
                zone: String::new(),
                disks: Vec::new(),
            }),
        );
    }
    for g in ["g1", "g2"] {
        run(
            &mut st,
            T0,
            Op::RegisterGateway(pb::RegisterGatewayRequest {
                id: g.into(),
                portal: "127.0.0.1:3260".into(),
            }),
        );
    }
    volume(run(
        &mut st,
        T0,
        Op::CreateVolume(pb::CreateVolumeCmd {
            name: "v".into(),
            size: V_SIZE,
            replicas: 3,
            chunk_size: 64 * MIB,
            qos: None,
            placement: sets(2),
        }),
    ));
    st
}

fn view(st: &State, name: &str) -> Volume {
    st.volume(&vref(name).unwrap_or_default()).expect("volume")
}

fn epoch(st: &State, name: &str) -> u64 {
    view(st, name).attachment.expect("attached").writer_epoch
}

fn attach(st: &mut State, now: u64, gateway: &str) -> apply_result::Result {
    run(st, now, attach_op("v", gateway))
}

fn detach(st: &mut State) {
    run(
        st,
        T0,
        Op::Detach(pb::DetachCmd {
            volume: vref("v"),
            gateway: String::new(),
            force: true,
        }),
    );
}

/// A snapshot of `vol` as the leader proposes it: `gateway` empty = the live holder takes it.
fn take(vol: &str, name: &str, gateway: &str) -> Op {
    Op::CreateSnapshot(pb::CreateSnapshotCmd {
        volume: vref(vol),
        name: name.into(),
        gateway: gateway.into(),
        lease_ms: 0,
        internal: false,
    })
}

fn done(id: u64, writer_epoch: u64, deleted: bool, error: &str) -> Op {
    Op::SnapshotDone(pb::SnapshotDoneRequest {
        id,
        writer_epoch,
        deleted,
        error: error.into(),
    })
}

fn delete(id: u64, gateway: &str) -> Op {
    Op::DeleteSnapshot(pb::DeleteSnapshotCmd {
        snapshot: Some(pb::SnapshotRef {
            id,
            ..Default::default()
        }),
        gateway: gateway.into(),
        lease_ms: 0,
    })
}

fn clone_op(name: &str, snapshot_id: u64, size: u64, chunks: usize) -> Op {
    Op::CloneVolume(pb::CloneVolumeCmd {
        name: name.into(),
        source: vref("v"),
        snapshot_id,
        size,
        replicas: 0,
        placement: sets(chunks),
        qos: None,
    })
}

fn copied(volume_id: u64, index: u64, writer_epoch: u64) -> Op {
    Op::SourceCopied(pb::SourceCopiedRequest {
        volume_id,
        index,
        writer_epoch,
    })
}

/// "v" attached to g1 with a READY snapshot "s" (id 1) taken by it.
fn with_ready_snapshot() -> State {
    let mut st = cluster();
    attach(&mut st, T0, "g1");
    let s = snapshot(run(&mut st, T0, take("v", "s", "")));
    let e = epoch(&st, "v");
    snapshot(run(&mut st, T0 + 1, done(s.id, e, false, "")));
    st
}

fn fills(st: &State, name: &str) -> Vec<bool> {
    st.chunks(&vref(name).unwrap_or_default(), 0, 0)
        .expect("chunks")
        .iter()
        .map(|c| c.fill)
        .collect()
}

fn state_of(st: &State, id: u64) -> i32 {
    st.snapshots(None, id).expect("list")[0].state
}

#[test]
fn the_holder_takes_a_snapshot_and_a_detached_volume_gets_a_work_attachment() {
    let mut st = cluster();
    let held = attachment(attach(&mut st, T0, "g1"));
    let s = snapshot(run(&mut st, T0 + 5, take("v", "a", "")));
    assert_eq!((s.id, s.volume_id, s.name.as_str()), (1, 1, "a"));
    assert_eq!(s.state, SnapshotState::SnapshotCreating as i32);
    assert_eq!((s.created_ms, s.ready_ms, s.size), (T0 + 5, 0, V_SIZE));
    assert_eq!(s.volume_name, "v");
    assert!(!s.internal);
    assert_eq!(
        view(&st, "v").attachment,
        Some(held.clone()),
        "holder unchanged"
    );

    detach(&mut st);
    let s = snapshot(run(&mut st, T0 + 6, take("v", "b", "g2")));
    assert_eq!(s.id, 2);
    let a = view(&st, "v").attachment.expect("work attachment");
    assert!(a.work && a.gateway == "g2", "{a:?}");
    assert!(
        a.writer_epoch > held.writer_epoch,
        "a new writer epoch fences g1"
    );
    assert_eq!(
        (a.lease_ms, a.lease_expires_ms),
        (DEFAULT_LEASE_MS, T0 + 6 + DEFAULT_LEASE_MS)
    );
    assert!(a.portal.is_empty() && a.published.is_empty());
    let names: Vec<String> = view(&st, "v")
        .snapshots
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["a", "b"], "oldest first");
}

#[test]
fn a_leader_choice_that_no_longer_holds_is_refused() {
    let mut st = cluster();
    // Holder chosen, but nobody holds the volume.
    refused(&mut st, T0, take("v", "a", ""), Code::Aborted);
    // An unregistered gateway.
    refused(&mut st, T0, take("v", "a", "gx"), Code::FailedPrecondition);
    // A work gateway chosen, but the volume is held now.
    attach(&mut st, T0, "g1");
    refused(&mut st, T0, take("v", "a", "g2"), Code::Aborted);
    // The holder's lease lapsed: nobody holds it.
    refused(
        &mut st,
        T0 + DEFAULT_LEASE_MS,
        take("v", "a", ""),
        Code::Aborted,
    );
}

#[test]
fn the_work_gateway_is_the_one_after_the_last_holder() {
    let mut st = cluster();
    assert_eq!(
        st.pick_gateway(1).expect("gateway"),
        "g1",
        "none before: the first"
    );
    attach(&mut st, T0, "g1");
    assert_eq!(
        st.work_gateway(1, T0).expect("holder"),
        "",
        "the holder does it"
    );
    assert_eq!(
        st.work_gateway(1, T0 + DEFAULT_LEASE_MS).expect("next"),
        "g2"
    );
    attach(&mut st, T0 + DEFAULT_LEASE_MS, "g2");
    assert_eq!(st.pick_gateway(1).expect("wraps"), "g1");

    let e = State::new().pick_gateway(1).expect_err("no gateway");
    assert_eq!(e.code, Code::FailedPrecondition);
    assert_eq!(e.message, "no gateway is registered to take the snapshot");
}

#[test]
fn names_are_checked_and_unique_within_the_volume_over_all_states() {
    let mut st = cluster();
    attach(&mut st, T0, "g1");
    let e = epoch(&st, "v");
    refused(
        &mut st,
        T0,
        take("v", "Bad_Name", ""),
        Code::InvalidArgument,
    );
    refused(&mut st, T0, take("v", "", ""), Code::InvalidArgument);
    let a = snapshot(run(&mut st, T0, take("v", "a", "")));
    snapshot(run(&mut st, T0, done(a.id, e, false, "disk full")));
    let m = refused(&mut st, T0, take("v", "a", ""), Code::AlreadyExists);
    assert!(m.contains("\"a\""), "{m}");
    snapshot(run(&mut st, T0, delete(a.id, "")));
    refused(&mut st, T0, take("v", "a", ""), Code::AlreadyExists);
    refused(&mut st, T0, take("nope", "a", ""), Code::NotFound);
}

#[test]
fn a_volume_holds_at_most_256_snapshots() {
    let mut st = cluster();
    attach(&mut st, T0, "g1");
    for i in 0..MAX_SNAPSHOTS_PER_VOLUME {
        snapshot(run(&mut st, T0, take("v", &format!("s{i}"), "")));
    }
    refused(
        &mut st,
        T0,
        take("v", "one-more", ""),
        Code::ResourceExhausted,
    );
}

#[test]
fn a_volume_being_deleted_takes_no_snapshot() {
    let mut snap = cluster().snapshot();
    snap.volumes[0].state = VolumeState::VolumeDeleting as i32;
    let mut st = State::restore(snap);
    let m = refused(&mut st, T0, take("v", "a", "g1"), Code::FailedPrecondition);
    assert_eq!(m, "volume \"v\" is being deleted");
}

#[test]
fn the_gateway_reports_fenced_by_its_writer_epoch() {
    let mut st = cluster();
    attach(&mut st, T0, "g1");
    let old = epoch(&st, "v");
    let a = snapshot(run(&mut st, T0, take("v", "a", "")));
    attach(&mut st, T0 + 1, "g1");
    let e = epoch(&st, "v");
    assert!(e > old);
    refused(
        &mut st,
        T0,
        done(a.id, old, false, ""),
        Code::FailedPrecondition,
    );
    refused(&mut st, T0, done(99, e, false, ""), Code::NotFound);

    let r = snapshot(run(&mut st, T0 + 7, done(a.id, e, false, "")));
    assert_eq!(
        (r.state, r.ready_ms),
        (SnapshotState::SnapshotReady as i32, T0 + 7)
    );
    // Reported again: answered unchanged.
    let before = st.clone();
    assert_eq!(snapshot(run(&mut st, T0 + 9, done(a.id, e, false, ""))), r);
    assert_eq!(st, before);
    // A READY snapshot cannot fail, nor be reported deleted before it is being deleted.
    refused(
        &mut st,
        T0,
        done(a.id, e, false, "late"),
        Code::FailedPrecondition,
    );
    refused(
        &mut st,
        T0,
        done(a.id, e, true, ""),
        Code::FailedPrecondition,
    );

    let b = snapshot(run(&mut st, T0, take("v", "b", "")));
    let f = snapshot(run(&mut st, T0, done(b.id, e, false, "replica s2 down")));
    assert_eq!(f.state, SnapshotState::SnapshotFailed as i32);
    assert_eq!(f.error, "replica s2 down");
    refused(
        &mut st,
        T0,
        done(b.id, e, false, ""),
        Code::FailedPrecondition,
    );

    // Deleted: the record goes; ids are never reused.
    snapshot(run(&mut st, T0, delete(a.id, "")));
    refused(
        &mut st,
        T0,
        done(a.id, old, true, ""),
        Code::FailedPrecondition,
    );
    let gone = snapshot(run(&mut st, T0, done(a.id, e, true, "")));
    assert_eq!(gone.id, a.id);
    assert!(st.snapshots(None, a.id).expect("list").is_empty());
    assert_eq!(snapshot(run(&mut st, T0, take("v", "a", ""))).id, 3);
}

#[test]
fn delete_marks_deleting_once_and_is_refused_while_a_volume_fills_from_it() {
    let mut st = with_ready_snapshot();
    refused(&mut st, T0, delete(99, ""), Code::NotFound);
    let by_name = Op::DeleteSnapshot(pb::DeleteSnapshotCmd {
        snapshot: Some(pb::SnapshotRef {
            id: 0,
            volume: vref("v"),
            name: "nope".into(),
        }),
        gateway: String::new(),
        lease_ms: 0,
    });
    refused(&mut st, T0, by_name, Code::NotFound);

    volume(run(&mut st, T0, clone_op("c", 1, 0, 2)));
    let m = refused(&mut st, T0, delete(1, ""), Code::FailedPrecondition);
    assert!(m.contains("volume(s) c"), "{m}");

    // Without dependents, from a detached volume: a work attachment deletes it.
    let mut st = with_ready_snapshot();
    detach(&mut st);
    let s = snapshot(run(&mut st, T0, delete(1, "g2")));
    assert_eq!(s.state, SnapshotState::SnapshotDeleting as i32);
    let a = view(&st, "v").attachment.expect("work");
    assert!(a.work && a.gateway == "g2");
    // Asked again: unchanged, no new epoch.
    let before = st.clone();
    assert_eq!(snapshot(run(&mut st, T0 + 1, delete(1, "g1"))), s);
    assert_eq!(st, before);
}

#[test]
fn creating_and_failed_snapshots_may_be_deleted() {
    let mut st = cluster();
    attach(&mut st, T0, "g1");
    let e = epoch(&st, "v");
    let a = snapshot(run(&mut st, T0, take("v", "a", "")));
    let b = snapshot(run(&mut st, T0, take("v", "b", "")));
    snapshot(run(&mut st, T0, done(b.id, e, false, "no")));
    for id in [a.id, b.id] {
        let s = snapshot(run(&mut st, T0, delete(id, "")));
        assert_eq!(s.state, SnapshotState::SnapshotDeleting as i32);
    }
}

#[test]
fn a_clone_fills_the_chunks_the_snapshot_covers() {
    let mut st = with_ready_snapshot();
    // Twice as big: 200 MiB is 4 chunks; the snapshot (100 MiB) covers the first 2.
    let c = volume(run(&mut st, T0 + 3, clone_op("c", 1, 2 * V_SIZE, 4)));
    assert_eq!(
        (c.size, c.replicas, c.chunk_size),
        (2 * V_SIZE, 3, 64 * MIB)
    );
    assert_eq!(c.created_ms, T0 + 3);
    assert_eq!(fills(&st, "c"), [true, true, false, false]);
    assert_eq!(fills(&st, "v"), [false, false]);
    let src = c.source.expect("source");
    assert_eq!((src.volume_id, src.snapshot_id, src.chunks_left), (1, 1, 2));
    assert_eq!(
        (src.volume_name.as_str(), src.snapshot_name.as_str()),
        ("v", "s")
    );
    assert_eq!(st.snapshots(None, 1).expect("list")[0].dependents, [c.id]);

    // Size 0 = the snapshot's.
    let d = volume(run(&mut st, T0, clone_op("d", 1, 0, 2)));
    assert_eq!(d.size, V_SIZE);
    assert_eq!(fills(&st, "d"), [true, true]);
}

#[test]
fn bad_clones_are_refused() {
    let mut st = with_ready_snapshot();
    let m = refused(
        &mut st,
        T0,
        clone_op("c", 1, V_SIZE - 512, 2),
        Code::InvalidArgument,
    );
    assert_eq!(
        m,
        format!("a clone cannot be smaller than its source snapshot ({V_SIZE} bytes)")
    );
    refused(&mut st, T0, clone_op("c", 99, 0, 2), Code::NotFound);
    refused(&mut st, T0, clone_op("v", 1, 0, 2), Code::AlreadyExists);
    refused(&mut st, T0, clone_op("C!", 1, 0, 2), Code::InvalidArgument);
    refused(
        &mut st,
        T0,
        clone_op("c", 1, V_SIZE + 1, 2),
        Code::InvalidArgument,
    );
    // Placement for the wrong number of chunks.
    refused(&mut st, T0, clone_op("c", 1, 0, 3), Code::Internal);
    let b = snapshot(run(&mut st, T0, take("v", "b", "")));
    let m = refused(
        &mut st,
        T0,
        clone_op("c", b.id, 0, 2),
        Code::FailedPrecondition,
    );
    assert!(m.contains("not ready"), "{m}");
}

/// Volume "v" held by g1, its READY internal snapshot `clone.c` (as a clone of its present
/// makes one), and the clone "c" of it.
fn clone_of_internal() -> (State, Snapshot, Volume) {
    let mut st = cluster();
    attach(&mut st, T0, "g1");
    let e = epoch(&st, "v");
    let s = snapshot(run(
        &mut st,
        T0,
        Op::CreateSnapshot(pb::CreateSnapshotCmd {
            volume: vref("v"),
            name: "clone.c".into(),
            internal: true,
            ..Default::default()
        }),
    ));
    assert!(s.internal);
    let s = snapshot(run(&mut st, T0, done(s.id, e, false, "")));
    let c = volume(run(&mut st, T0, clone_op("c", s.id, 0, 2)));
    (st, s, c)
}

#[test]
fn copies_clear_the_source_and_release_an_internal_snapshot() {
    let (mut st, s, c) = clone_of_internal();
    // The clone's own gateway copies.
    let ca = attachment(run(&mut st, T0, attach_op("c", "g2")));
    refused(
        &mut st,
        T0,
        copied(c.id, 0, ca.writer_epoch + 1),
        Code::FailedPrecondition,
    );
    refused(
        &mut st,
        T0,
        copied(c.id, 7, ca.writer_epoch),
        Code::NotFound,
    );
    refused(&mut st, T0, copied(99, 0, ca.writer_epoch), Code::NotFound);

    let ch = chunk(run(&mut st, T0, copied(c.id, 1, ca.writer_epoch)));
    assert!(!ch.fill && ch.index == 1);
    assert_eq!(view(&st, "c").source.expect("source").chunks_left, 1);
    // Again: unchanged.
    let before = st.clone();
    chunk(run(&mut st, T0, copied(c.id, 1, ca.writer_epoch)));
    assert_eq!(st, before);
    assert_eq!(state_of(&st, s.id), SnapshotState::SnapshotReady as i32);

    chunk(run(&mut st, T0, copied(c.id, 0, ca.writer_epoch)));
    assert_eq!(view(&st, "c").source, None, "independent now");
    let s = &st.snapshots(None, s.id).expect("list")[0];
    assert_eq!(s.state, SnapshotState::SnapshotDeleting as i32, "released");
    assert!(s.dependents.is_empty());
}

#[test]
fn a_snapshot_of_an_operator_stays_after_its_clone_is_filled() {
    let mut st = with_ready_snapshot();
    let c = volume(run(&mut st, T0, clone_op("c", 1, 0, 2)));
    let a = attachment(run(&mut st, T0, attach_op("c", "g2")));
    for i in 0..2 {
        chunk(run(&mut st, T0, copied(c.id, i, a.writer_epoch)));
    }
    assert_eq!(state_of(&st, 1), SnapshotState::SnapshotReady as i32);
    assert!(st.snapshots(None, 1).expect("list")[0]
        .dependents
        .is_empty());
}

#[test]
fn restore_refills_every_chunk_of_a_detached_volume() {
    let mut st = with_ready_snapshot();
    let restore = |id| {
        Op::RestoreSnapshot(pb::RestoreSnapshotRequest {
            snapshot: Some(pb::SnapshotRef {
                id,
                ..Default::default()
            }),
        })
    };
    let m = refused(&mut st, T0 + 2, restore(1), Code::FailedPrecondition);
    assert_eq!(m, "volume \"v\" is attached to gateway g1; detach it first");
    refused(&mut st, T0, restore(99), Code::NotFound);
    let b = snapshot(run(&mut st, T0, take("v", "b", "")));
    detach(&mut st);
    refused(&mut st, T0, restore(b.id), Code::FailedPrecondition);

    // Grown past the snapshot: the new chunk is refilled too (the gateway zeroes it).
    run(
        &mut st,
        T0,
        Op::ResizeVolume(pb::ResizeVolumeCmd {
            volume: vref("v"),
            size: 3 * 64 * MIB,
            placement: sets(1),
        }),
    );
    assert_eq!(
        fills(&st, "v"),
        [false, false, false],
        "grown chunks are not filled"
    );
    let v = volume(run(&mut st, T0, restore(1)));
    assert_eq!(fills(&st, "v"), [true, true, true]);
    let src = v.source.expect("source");
    assert_eq!((src.volume_id, src.snapshot_id, src.chunks_left), (1, 1, 3));
    // Its own snapshot now has it as a dependent.
    refused(&mut st, T0, delete(1, "g1"), Code::FailedPrecondition);
}

#[test]
fn a_restore_replaces_an_earlier_source() {
    let mut st = with_ready_snapshot();
    let e = epoch(&st, "v");
    let b = snapshot(run(&mut st, T0, take("v", "b", "")));
    snapshot(run(&mut st, T0, done(b.id, e, false, "")));
    detach(&mut st);
    for id in [1, b.id] {
        run(
            &mut st,
            T0,
            Op::RestoreSnapshot(pb::RestoreSnapshotRequest {
                snapshot: Some(pb::SnapshotRef {
                    id,
                    ..Default::default()
                }),
            }),
        );
    }
    assert_eq!(view(&st, "v").source.expect("source").snapshot_id, b.id);
    assert!(st.snapshots(None, 1).expect("list")[0]
        .dependents
        .is_empty());
}

#[test]
fn a_source_volume_outlives_its_fills_and_takes_its_snapshots_along() {
    let mut st = with_ready_snapshot();
    let c = volume(run(&mut st, T0, clone_op("c", 1, 0, 2)));
    detach(&mut st);
    let del = |name: &str| Op::DeleteVolume(pb::DeleteVolumeCmd { volume: vref(name) });
    let m = refused(&mut st, T0, del("v"), Code::FailedPrecondition);
    assert_eq!(m, "volume \"c\" is still being filled from it");
    let a = attachment(run(&mut st, T0, attach_op("c", "g2")));
    for i in 0..2 {
        chunk(run(&mut st, T0, copied(c.id, i, a.writer_epoch)));
    }
    assert!(matches!(
        run(&mut st, T0, del("v")),
        apply_result::Result::Done(true)
    ));
    assert!(st.snapshots(None, 0).expect("list").is_empty());
}

#[test]
fn deleting_a_clone_releases_its_internal_snapshot() {
    let (mut st, s, _) = clone_of_internal();
    run(
        &mut st,
        T0,
        Op::DeleteVolume(pb::DeleteVolumeCmd { volume: vref("c") }),
    );
    assert_eq!(state_of(&st, s.id), SnapshotState::SnapshotDeleting as i32);
}

#[test]
fn attaches_and_publications_meet_a_work_attachment() {
    let mut st = cluster();
    snapshot(run(&mut st, T0, take("v", "a", "g1")));
    let w = view(&st, "v").attachment.expect("work");
    let m = refused(
        &mut st,
        T0 + 1,
        attach_op("v", "g2"),
        Code::FailedPrecondition,
    );
    assert_eq!(
        m,
        "volume \"v\" is busy with snapshot work on gateway g1; retry"
    );
    let m = refused(&mut st, T0 + 1, publish("g2"), Code::FailedPrecondition);
    assert_eq!(
        m,
        "volume \"v\" is busy with snapshot work on gateway g1; retry"
    );

    // The work gateway opening the volume keeps it a work attachment, with a new epoch.
    let a = attachment(attach(&mut st, T0 + 2, "g1"));
    assert!(a.work && a.writer_epoch > w.writer_epoch, "{a:?}");
    // A publication to that gateway's node adopts it.
    let p = attachment(run(&mut st, T0 + 3, publish("g1")));
    assert!(!p.work, "{p:?}");
    assert_eq!(
        (p.writer_epoch, p.published.as_slice()),
        (a.writer_epoch, &["g1".to_string()][..])
    );
}

#[test]
fn a_lapsed_work_attachment_is_replaced() {
    let mut st = cluster();
    snapshot(run(&mut st, T0, take("v", "a", "g1")));
    let later = T0 + DEFAULT_LEASE_MS;
    let a = attachment(attach(&mut st, later, "g2"));
    assert!(!a.work && a.gateway == "g2");

    let mut st = cluster();
    snapshot(run(&mut st, T0, take("v", "a", "g1")));
    let a = attachment(attach(&mut st, later, "g1"));
    assert!(
        !a.work,
        "the same gateway after the lapse: an ordinary attach"
    );

    let mut st = cluster();
    snapshot(run(&mut st, T0, take("v", "a", "g1")));
    let p = attachment(run(&mut st, later, publish("g2")));
    assert!(!p.work && p.gateway == "g2" && p.published == ["g2"]);
}

fn attach_op(volume: &str, gateway: &str) -> Op {
    Op::Attach(pb::AttachCmd {
        volume: vref(volume),
        gateway: gateway.into(),
        lease_ms: 0,
        portal: String::new(),
    })
}

fn publish(node: &str) -> Op {
    Op::Publish(pb::PublishCmd {
        volume: vref("v"),
        node: node.into(),
        readonly: false,
        lease_ms: 0,
    })
}

#[test]
fn assign_work_needs_pending_work_a_free_volume_and_a_registered_gateway() {
    let mut st = cluster();
    let assign = |gateway: &str| {
        Op::AssignWork(pb::AssignWorkCmd {
            volume_id: 1,
            gateway: gateway.into(),
            lease_ms: 0,
        })
    };
    refused(&mut st, T0, assign("g1"), Code::FailedPrecondition);
    attach(&mut st, T0, "g1");
    snapshot(run(&mut st, T0, take("v", "a", "")));
    refused(&mut st, T0, assign("g2"), Code::Aborted);
    let later = T0 + DEFAULT_LEASE_MS;
    assert_eq!(st.unserved_work(later), [1]);
    refused(&mut st, later, assign("gx"), Code::FailedPrecondition);
    refused(&mut st, later, assign(""), Code::InvalidArgument);
    let before = epoch(&st, "v");
    let a = attachment(run(&mut st, later, assign("g2")));
    assert!(a.work && a.gateway == "g2" && a.writer_epoch > before);
    assert!(st.unserved_work(later).is_empty());
}

#[test]
fn list_snapshots_by_volume_by_id_or_all() {
    let mut st = with_ready_snapshot();
    let c = volume(run(&mut st, T0, clone_op("c", 1, 0, 2)));
    detach(&mut st);
    snapshot(run(&mut st, T0, take("c", "cs", "g1")));
    let ids = |v: Vec<Snapshot>| v.into_iter().map(|s| s.id).collect::<Vec<_>>();
    assert_eq!(ids(st.snapshots(None, 0).expect("all")), [1, 2]);
    assert_eq!(ids(st.snapshots(vref("c").as_ref(), 0).expect("c")), [2]);
    assert_eq!(ids(st.snapshots(None, 2).expect("by id")), [2]);
    assert!(st.snapshots(None, 9).expect("unknown id").is_empty());
    let e = st
        .snapshots(vref("x").as_ref(), 0)
        .expect_err("unknown volume");
    assert_eq!(e.code, Code::NotFound);
    let v = view(&st, "c");
    assert_eq!(v.snapshots.len(), 1);
    assert_eq!(v.snapshots[0].volume_name, "c");
    assert_eq!(v.source.expect("source").volume_id, 1);
    assert_eq!(c.id, 2);
}

#[test]
fn snapshots_sources_fills_and_work_survive_a_raft_snapshot() {
    let mut st = with_ready_snapshot();
    let e = epoch(&st, "v");
    let b = snapshot(run(&mut st, T0, take("v", "b", "")));
    snapshot(run(&mut st, T0, done(b.id, e, false, "broken")));
    let c = volume(run(&mut st, T0, clone_op("c", 1, 2 * V_SIZE, 4)));
    snapshot(run(&mut st, T0, take("c", "cs", "g2")));
    let d = snapshot(run(&mut st, T0, take("v", "d", "")));
    snapshot(run(&mut st, T0, delete(d.id, "")));

    let bytes = st.snapshot().encode_to_vec();
    let snap = StateSnapshot::decode(bytes.as_slice()).expect("decode");
    assert_eq!(snap.next_snapshot_id, 5);
    let mut back = State::restore(snap);
    assert_eq!(back, st);
    assert_eq!(view(&back, "c"), view(&st, "c"));
    assert_eq!(fills(&back, "c"), [true, true, false, false]);
    assert!(view(&back, "c").attachment.expect("work").work);
    // The derived fill counts came back too: the last copy clears the source.
    let a = view(&back, "c").attachment.expect("work");
    for i in 0..2 {
        chunk(run(&mut back, T0, copied(c.id, i, a.writer_epoch)));
    }
    assert_eq!(view(&back, "c").source, None);
    // Ids go on from where they were.
    assert_eq!(snapshot(run(&mut back, T0, take("v", "e", ""))).id, 5);
}

#[test]
fn fuzzed_commands_keep_the_round_trip() {
    // Framed commands through the fuzz target (volume 1 "v" of 4 chunks on n1-n3, attached
    // to gateway "g" at writer epoch 2, snapshot 1 "s" being taken).
    let n = pb::ReplicaSet {
        nodes: vec!["n1".into(), "n2".into(), "n3".into()],
    };
    let ops = [
        done(1, 2, false, ""),
        Op::CloneVolume(pb::CloneVolumeCmd {
            name: "c".into(),
            source: vref("v"),
            snapshot_id: 1,
            size: 0,
            replicas: 0,
            placement: vec![n; 4],
            qos: None,
        }),
        attach_op("v", "g"),
        copied(2, 0, 1),
        delete(1, ""),
        take("v", "t", "g"),
    ];
    let mut data = Vec::new();
    for op in ops {
        let cmd = Command {
            now_ms: 2,
            op: Some(op),
        }
        .encode_to_vec();
        data.extend_from_slice(&(cmd.len() as u16).to_le_bytes());
        data.extend_from_slice(&cmd);
    }
    ironsan_manager::state::fuzz_apply(&data);
}
