//! Attachments and CSI publications in the state machine: the portal an attach carries, what
//! a re-attach keeps, Publish/Unpublish rules (idempotence, read-only sharing, adoption of an
//! operator's attach, refusals), the gateway registry, and their survival through a snapshot.

use ironsan_common::proto::manager::{
    self as pb, apply_result, command::Op, Attachment, Command, StateSnapshot, VolumeState,
};
use ironsan_manager::state::{State, DEFAULT_LEASE_MS, MAX_LEASE_MS};
use prost::Message as _;
use tonic::Code;

const T0: u64 = 1_000_000;

fn vref() -> Option<pb::VolumeRef> {
    Some(pb::VolumeRef {
        id: 0,
        name: "v".into(),
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

/// Three nodes and volume "v" of one chunk on them.
fn cluster() -> State {
    let mut st = State::new();
    for n in ["s1", "s2", "s3"] {
        let r = run(
            &mut st,
            T0,
            Op::RegisterNode(pb::RegisterNodeRequest {
                id: n.into(),
                addr: "127.0.0.1:1".into(),
                zone: String::new(),
                disks: Vec::new(),
            }),
        );
        assert!(matches!(r, apply_result::Result::Node(_)), "{r:?}");
    }
    let r = run(
        &mut st,
        T0,
        Op::CreateVolume(pb::CreateVolumeCmd {
            name: "v".into(),
            size: 64 << 20,
            replicas: 3,
            chunk_size: 64 << 20,
            qos: None,
            placement: vec![pb::ReplicaSet {
                nodes: vec!["s1".into(), "s2".into(), "s3".into()],
            }],
        }),
    );
    assert!(matches!(r, apply_result::Result::Volume(_)), "{r:?}");
    st
}

fn attachment(r: apply_result::Result) -> Attachment {
    match r {
        apply_result::Result::Attachment(a) => a,
        other => panic!("expected an attachment, got {other:?}"),
    }
}

fn refused(r: apply_result::Result, code: Code) -> String {
    match r {
        apply_result::Result::Error(e) => {
            assert_eq!(Code::from_i32(e.code), code, "{}", e.message);
            e.message
        }
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

fn done(r: apply_result::Result) {
    assert!(matches!(r, apply_result::Result::Done(true)), "{r:?}");
}

fn attach(st: &mut State, now: u64, gateway: &str, portal: &str) -> apply_result::Result {
    run(
        st,
        now,
        Op::Attach(pb::AttachCmd {
            volume: vref(),
            gateway: gateway.into(),
            lease_ms: 0,
            portal: portal.into(),
        }),
    )
}

fn publish(st: &mut State, now: u64, node: &str, readonly: bool) -> apply_result::Result {
    run(
        st,
        now,
        Op::Publish(pb::PublishCmd {
            volume: vref(),
            node: node.into(),
            readonly,
            lease_ms: 0,
        }),
    )
}

fn unpublish(st: &mut State, node: &str) -> apply_result::Result {
    run(
        st,
        T0,
        Op::Unpublish(pb::UnpublishCmd {
            volume: vref(),
            node: node.into(),
        }),
    )
}

/// The volume's attachment as GetVolume/ListVolumes show it.
fn current(st: &State) -> Option<Attachment> {
    st.volume(&vref().unwrap_or_default())
        .expect("volume v")
        .attachment
}

#[test]
fn attach_records_the_portal_and_a_reattach_without_one_keeps_it() {
    let mut st = cluster();
    let a = attachment(attach(&mut st, T0, "g1", "10.0.0.1:3260"));
    assert_eq!(a.portal, "10.0.0.1:3260");
    assert!(!a.readonly && a.published.is_empty());
    assert_eq!(current(&st), Some(a.clone()));
    // An operator's re-attach (no portal) fences with a new epoch but keeps the portal.
    let b = attachment(attach(&mut st, T0 + 1, "g1", ""));
    assert_eq!(b.writer_epoch, a.writer_epoch + 1);
    assert_eq!(b.portal, "10.0.0.1:3260");
    // The gateway moved: its new portal replaces the old one.
    let c = attachment(attach(&mut st, T0 + 2, "g1", "10.0.0.9:3260"));
    assert_eq!(c.portal, "10.0.0.9:3260");
}

#[test]
fn publish_without_an_attachment_attaches_the_node_like_attach_would() {
    let mut st = cluster();
    let a = attachment(publish(&mut st, T0, "n1", false));
    assert_eq!(a.gateway, "n1");
    assert_eq!(a.published, ["n1"]);
    assert!(!a.readonly);
    assert_eq!(
        a.portal, "",
        "the node's gateway fills it in when it opens the volume"
    );
    assert_eq!(a.lease_ms, DEFAULT_LEASE_MS);
    assert_eq!(a.lease_expires_ms, T0 + DEFAULT_LEASE_MS);
    // The first epoch after the volume's creation (1), as an attach would take.
    assert_eq!(a.writer_epoch, 2);
    assert_eq!(current(&st), Some(a));

    // The lease length follows attach's default and limit.
    let mut st = cluster();
    let r = run(
        &mut st,
        T0,
        Op::Publish(pb::PublishCmd {
            volume: vref(),
            node: "n1".into(),
            readonly: true,
            lease_ms: 30_000,
        }),
    );
    let a = attachment(r);
    assert_eq!((a.lease_ms, a.lease_expires_ms), (30_000, T0 + 30_000));
    assert!(a.readonly);
    let mut st = cluster();
    let r = run(
        &mut st,
        T0,
        Op::Publish(pb::PublishCmd {
            volume: vref(),
            node: "n1".into(),
            readonly: false,
            lease_ms: MAX_LEASE_MS + 1,
        }),
    );
    refused(r, Code::InvalidArgument);
    assert_eq!(current(&st), None);
}

#[test]
fn publishing_twice_is_idempotent() {
    let mut st = cluster();
    let a = attachment(publish(&mut st, T0, "n1", false));
    // Later, retried: the same answer, no new epoch, no lease change.
    let b = attachment(publish(&mut st, T0 + 5_000, "n1", false));
    assert_eq!(a, b);
    assert_eq!(current(&st), Some(a));
    // The same for a read-only publication.
    let mut st = cluster();
    let a = attachment(publish(&mut st, T0, "n1", true));
    assert_eq!(attachment(publish(&mut st, T0 + 1, "n1", true)), a);
}

#[test]
fn publishing_to_the_same_node_in_the_other_mode_is_already_exists() {
    let mut st = cluster();
    let a = attachment(publish(&mut st, T0, "n1", false));
    let msg = refused(publish(&mut st, T0, "n1", true), Code::AlreadyExists);
    assert!(msg.contains("n1") && msg.contains("read-write"), "{msg}");
    assert_eq!(current(&st), Some(a));

    let mut st = cluster();
    attachment(publish(&mut st, T0, "n1", true));
    let msg = refused(publish(&mut st, T0, "n1", false), Code::AlreadyExists);
    assert!(msg.contains("read-only"), "{msg}");
}

#[test]
fn a_second_node_is_refused_unless_both_read_only() {
    // Read-write on n1: n2 gets nothing, in either mode.
    let mut st = cluster();
    let a = attachment(publish(&mut st, T0, "n1", false));
    for readonly in [false, true] {
        let msg = refused(
            publish(&mut st, T0, "n2", readonly),
            Code::FailedPrecondition,
        );
        assert!(
            msg.contains("n1"),
            "names the node it is published to: {msg}"
        );
    }
    assert_eq!(current(&st), Some(a));

    // Read-only on n1: n2 may not write.
    let mut st = cluster();
    let a = attachment(publish(&mut st, T0, "n1", true));
    let msg = refused(publish(&mut st, T0, "n2", false), Code::FailedPrecondition);
    assert!(msg.contains("n1") && msg.contains("read-only"), "{msg}");
    assert_eq!(current(&st), Some(a));
}

#[test]
fn read_only_publications_share_the_gateway_until_the_last_one_leaves() {
    let mut st = cluster();
    let a = attachment(publish(&mut st, T0, "n1", true));
    let b = attachment(publish(&mut st, T0 + 1, "n2", true));
    let c = attachment(publish(&mut st, T0 + 2, "n3", true));
    assert_eq!(c.published, ["n1", "n2", "n3"]);
    // Adding readers changes neither the serving gateway nor its epoch or lease.
    for x in [&b, &c] {
        assert_eq!(
            (&x.gateway, x.writer_epoch, x.lease_expires_ms),
            (&a.gateway, a.writer_epoch, a.lease_expires_ms)
        );
    }
    // n2's retry is idempotent too.
    assert_eq!(attachment(publish(&mut st, T0 + 3, "n2", true)), c);

    // The gateway's own node leaves first: the attachment stays exactly as it was otherwise.
    done(unpublish(&mut st, "n1"));
    let left = current(&st).expect("still attached");
    assert_eq!(left.published, ["n2", "n3"]);
    assert_eq!(
        (&left.gateway, left.writer_epoch, left.lease_expires_ms),
        (&a.gateway, a.writer_epoch, a.lease_expires_ms)
    );
    assert!(left.readonly);
    done(unpublish(&mut st, "n3"));
    assert_eq!(current(&st).expect("still attached").published, ["n2"]);
    // The last one drops it.
    done(unpublish(&mut st, "n2"));
    assert_eq!(current(&st), None);
    // Free for a writer now, at a new epoch.
    let w = attachment(publish(&mut st, T0 + 4, "n3", false));
    assert!(w.writer_epoch > a.writer_epoch);
    assert_eq!(w.gateway, "n3");
}

#[test]
fn the_gateway_reattaching_keeps_the_publications() {
    let mut st = cluster();
    let a = attachment(publish(&mut st, T0, "n1", true));
    attachment(publish(&mut st, T0, "n2", true));
    // n1's gateway sees the volume attached to it and opens it.
    let b = attachment(attach(&mut st, T0 + 10, "n1", "10.0.0.1:3260"));
    assert_eq!(b.writer_epoch, a.writer_epoch + 1);
    assert_eq!(b.portal, "10.0.0.1:3260");
    assert!(b.readonly);
    assert_eq!(b.published, ["n1", "n2"]);
    assert_eq!(current(&st), Some(b.clone()));
    // Publications added after it still see the portal.
    let c = attachment(publish(&mut st, T0 + 20, "n3", true));
    assert_eq!(c.portal, "10.0.0.1:3260");

    // Another gateway taking over after the lease lapsed starts afresh.
    let later = b.lease_expires_ms + 1;
    let d = attachment(attach(&mut st, later, "g9", "10.0.0.9:3260"));
    assert_eq!(d.gateway, "g9");
    assert!(!d.readonly && d.published.is_empty());
    assert_eq!(d.portal, "10.0.0.9:3260");
}

#[test]
fn a_publication_adopts_an_operator_attach_to_the_same_node() {
    let mut st = cluster();
    let a = attachment(attach(&mut st, T0, "n1", "10.0.0.1:3260"));
    let b = attachment(publish(&mut st, T0 + 1, "n1", true));
    assert_eq!(b.published, ["n1"]);
    assert!(b.readonly);
    assert_eq!(
        (b.writer_epoch, b.lease_expires_ms, b.portal.as_str()),
        (a.writer_epoch, a.lease_expires_ms, "10.0.0.1:3260"),
        "adopted without a new epoch"
    );

    // Attached by an operator to another gateway: refused, naming it.
    let mut st = cluster();
    attachment(attach(&mut st, T0, "g7", ""));
    let msg = refused(publish(&mut st, T0, "n1", true), Code::FailedPrecondition);
    assert!(msg.contains("g7"), "{msg}");
}

#[test]
fn unpublish_of_a_node_that_has_nothing_changes_nothing() {
    let mut st = cluster();
    // No attachment at all.
    done(unpublish(&mut st, "n1"));
    assert_eq!(current(&st), None);
    // Published elsewhere.
    let a = attachment(publish(&mut st, T0, "n1", false));
    done(unpublish(&mut st, "n2"));
    assert_eq!(current(&st), Some(a));
    // An operator's attachment has no publications to remove.
    let mut st = cluster();
    let a = attachment(attach(&mut st, T0, "n1", ""));
    done(unpublish(&mut st, "n1"));
    assert_eq!(current(&st), Some(a));
    // Unpublishing twice: the second is a no-op.
    let mut st = cluster();
    attachment(publish(&mut st, T0, "n1", false));
    done(unpublish(&mut st, "n1"));
    done(unpublish(&mut st, "n1"));
    assert_eq!(current(&st), None);
}

#[test]
fn bad_publish_and_unpublish_requests_are_refused() {
    let mut st = cluster();
    refused(publish(&mut st, T0, "", false), Code::InvalidArgument);
    refused(unpublish(&mut st, ""), Code::InvalidArgument);
    let missing = || {
        Some(pb::VolumeRef {
            id: 0,
            name: "nope".into(),
        })
    };
    let r = run(
        &mut st,
        T0,
        Op::Publish(pb::PublishCmd {
            volume: missing(),
            node: "n1".into(),
            readonly: false,
            lease_ms: 0,
        }),
    );
    refused(r, Code::NotFound);
    let r = run(
        &mut st,
        T0,
        Op::Unpublish(pb::UnpublishCmd {
            volume: missing(),
            node: "n1".into(),
        }),
    );
    refused(r, Code::NotFound);
    assert_eq!(current(&st), None);

    // A volume being deleted is not published.
    let mut snap = st.snapshot();
    snap.volumes[0].state = VolumeState::VolumeDeleting as i32;
    let mut st = State::restore(snap);
    refused(publish(&mut st, T0, "n1", false), Code::FailedPrecondition);
    assert_eq!(current(&st), None);
}

#[test]
fn detach_clears_the_publications() {
    let mut st = cluster();
    let a = attachment(publish(&mut st, T0, "n1", true));
    attachment(publish(&mut st, T0, "n2", true));
    done(run(
        &mut st,
        T0,
        Op::Detach(pb::DetachCmd {
            volume: vref(),
            gateway: String::new(),
            force: true,
        }),
    ));
    assert_eq!(current(&st), None);
    // n2 gets a publication of its own, afresh.
    let b = attachment(publish(&mut st, T0, "n2", false));
    assert_eq!(b.published, ["n2"]);
    assert_eq!(b.gateway, "n2");
    assert!(b.writer_epoch > a.writer_epoch);
}

#[test]
fn publications_survive_a_snapshot() {
    let mut st = cluster();
    attachment(publish(&mut st, T0, "n1", true));
    attachment(publish(&mut st, T0, "n2", true));
    attachment(attach(&mut st, T0 + 1, "n1", "[fd00::1]:3260"));
    let bytes = st.snapshot().encode_to_vec();
    let back = State::restore(StateSnapshot::decode(bytes.as_slice()).expect("decodes"));
    assert_eq!(back, st);
    let a = current(&back).expect("attached");
    assert_eq!(
        (a.portal.as_str(), a.readonly, a.published.clone()),
        (
            "[fd00::1]:3260",
            true,
            vec!["n1".to_string(), "n2".to_string()]
        )
    );
    assert_eq!(back.volumes()[0].attachment, Some(a));
}

fn register(st: &mut State, now: u64, id: &str, portal: &str) -> apply_result::Result {
    run(
        st,
        now,
        Op::RegisterGateway(pb::RegisterGatewayRequest {
            id: id.into(),
            portal: portal.into(),
        }),
    )
}

#[test]
fn gateways_register_move_and_survive_a_snapshot() {
    let mut st = cluster();
    assert_eq!(
        st.gateway("n1").map_err(|r| r.code),
        Err(Code::NotFound),
        "unknown before registering"
    );
    let g = match register(&mut st, T0, "n1", "10.0.0.1:3260") {
        apply_result::Result::Gateway(g) => g,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        (g.id.as_str(), g.portal.as_str(), g.registered_ms),
        ("n1", "10.0.0.1:3260", T0)
    );
    // Moving keeps the first registration time.
    register(&mut st, T0 + 5, "n1", "[fd00::2]:3260");
    let g = st.gateway("n1").expect("registered");
    assert_eq!((g.portal.as_str(), g.registered_ms), ("[fd00::2]:3260", T0));
    register(&mut st, T0, "n2", "gw2.example:3260");
    assert_eq!(st.gateways().count(), 2);

    for (id, portal) in [
        ("", "10.0.0.1:3260"),
        ("n3", "10.0.0.1"),
        ("n3", ":3260"),
        ("n3", "h:0"),
        ("n3", "h:99999"),
    ] {
        refused(register(&mut st, T0, id, portal), Code::InvalidArgument);
    }
    refused(
        register(&mut st, T0, &"x".repeat(254), "h:1"),
        Code::InvalidArgument,
    );
    assert_eq!(
        st.gateways().count(),
        2,
        "a refused registration added a gateway"
    );

    let bytes = st.snapshot().encode_to_vec();
    let back = State::restore(StateSnapshot::decode(bytes.as_slice()).expect("decodes"));
    assert_eq!(back, st);
    assert_eq!(
        back.gateway("n2").expect("restored").portal,
        "gw2.example:3260"
    );
}
