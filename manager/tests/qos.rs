//! Per-volume QoS limits in the state machine: set at create and by `SetVolumeQos`,
//! normalised (burst defaulted, all-zero = none), refused whole when invalid (nothing
//! half-applied), and carried through a snapshot and the log's encoding.

use ironsan_common::proto::manager::{
    self as pb, apply_result, command::Op, Command, StateSnapshot, VolumeQos, VolumeState,
};
use ironsan_manager::state::{
    validate_qos, State, DEFAULT_QOS_BURST_MS, MAX_QOS_BPS, MAX_QOS_BURST_MS, MAX_QOS_IOPS,
};
use prost::Message as _;
use tonic::Code;

const T0: u64 = 1_000_000;

fn vref(name: &str) -> Option<pb::VolumeRef> {
    Some(pb::VolumeRef {
        id: 0,
        name: name.into(),
    })
}

fn run(st: &mut State, op: Op) -> apply_result::Result {
    st.apply(&Command {
        now_ms: T0,
        op: Some(op),
    })
    .result
    .expect("a result")
}

fn create(st: &mut State, name: &str, qos: Option<VolumeQos>) -> apply_result::Result {
    run(
        st,
        Op::CreateVolume(pb::CreateVolumeCmd {
            name: name.into(),
            size: 64 << 20,
            replicas: 3,
            chunk_size: 64 << 20,
            placement: vec![pb::ReplicaSet {
                nodes: vec!["s1".into(), "s2".into(), "s3".into()],
            }],
            qos,
        }),
    )
}

fn set(st: &mut State, name: &str, qos: Option<VolumeQos>) -> apply_result::Result {
    run(
        st,
        Op::SetVolumeQos(pb::SetVolumeQosCmd {
            volume: vref(name),
            qos,
        }),
    )
}

/// Three nodes, no volume.
fn cluster() -> State {
    let mut st = State::new();
    for n in ["s1", "s2", "s3"] {
        run(
            &mut st,
            Op::RegisterNode(pb::RegisterNodeRequest {
                id: n.into(),
                addr: "127.0.0.1:1".into(),
                zone: String::new(),
                disks: Vec::new(),
            }),
        );
    }
    st
}

fn volume(r: apply_result::Result) -> pb::Volume {
    match r {
        apply_result::Result::Volume(v) => v,
        other => panic!("expected a volume, got {other:?}"),
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

fn qos_of(st: &State, name: &str) -> Option<VolumeQos> {
    st.volume(&vref(name).expect("ref"))
        .expect("volume exists")
        .qos
}

fn writes(iops: u64) -> VolumeQos {
    VolumeQos {
        write_iops: iops,
        ..Default::default()
    }
}

#[test]
fn create_sets_and_normalises_limits() {
    let mut st = cluster();
    // No burst given: the default is filled in.
    let v = volume(create(&mut st, "a", Some(writes(200))));
    assert_eq!(
        v.qos,
        Some(VolumeQos {
            write_iops: 200,
            burst_ms: Some(DEFAULT_QOS_BURST_MS),
            ..Default::default()
        })
    );
    // All rates zero is no limit at all, whatever the burst.
    let v = volume(create(
        &mut st,
        "b",
        Some(VolumeQos {
            burst_ms: Some(0),
            ..Default::default()
        }),
    ));
    assert_eq!(v.qos, None);
    let v = volume(create(&mut st, "c", None));
    assert_eq!(v.qos, None);
    let full = VolumeQos {
        read_iops: 1000,
        write_iops: 500,
        read_bps: 100 << 20,
        write_bps: 50 << 20,
        burst_ms: Some(2500),
    };
    let v = volume(create(&mut st, "d", Some(full)));
    assert_eq!(v.qos, Some(full));
}

#[test]
fn bad_limits_are_refused_and_change_nothing() {
    let mut st = cluster();
    volume(create(&mut st, "v", Some(writes(200))));
    let before = st.clone();
    let bad = [
        (
            VolumeQos {
                write_iops: 10,
                burst_ms: Some(0),
                ..Default::default()
            },
            "burst",
        ),
        (writes(MAX_QOS_IOPS + 1), "write IOPS"),
        (
            VolumeQos {
                read_iops: MAX_QOS_IOPS + 1,
                ..Default::default()
            },
            "read IOPS",
        ),
        (
            VolumeQos {
                read_bps: MAX_QOS_BPS + 1,
                ..Default::default()
            },
            "read bandwidth",
        ),
        (
            VolumeQos {
                write_bps: u64::MAX,
                ..Default::default()
            },
            "write bandwidth",
        ),
        (
            VolumeQos {
                write_iops: 1,
                burst_ms: Some(MAX_QOS_BURST_MS + 1),
                ..Default::default()
            },
            "burst",
        ),
    ];
    for (q, what) in bad {
        let msg = refused(set(&mut st, "v", Some(q)), Code::InvalidArgument);
        assert!(msg.contains(what), "{q:?}: {msg}");
        assert_eq!(st, before, "a refused change must change nothing");
        // The same limits at create: refused, no volume made.
        refused(create(&mut st, "w", Some(q)), Code::InvalidArgument);
        assert_eq!(st, before);
        assert!(validate_qos(Some(&q)).is_err());
    }
    // The bounds themselves are allowed.
    let edge = VolumeQos {
        read_iops: MAX_QOS_IOPS,
        write_iops: MAX_QOS_IOPS,
        read_bps: MAX_QOS_BPS,
        write_bps: MAX_QOS_BPS,
        burst_ms: Some(MAX_QOS_BURST_MS),
    };
    assert_eq!(volume(set(&mut st, "v", Some(edge))).qos, Some(edge));
}

#[test]
fn set_changes_and_clears_limits() {
    let mut st = cluster();
    volume(create(&mut st, "v", None));
    volume(create(&mut st, "other", Some(writes(7))));
    let v = volume(set(&mut st, "v", Some(writes(300))));
    assert_eq!(v.qos.map(|q| q.write_iops), Some(300));
    assert_eq!(qos_of(&st, "v").map(|q| q.write_iops), Some(300));
    // Replaced whole: a limit not sent is gone.
    let q = VolumeQos {
        read_bps: 1 << 20,
        burst_ms: Some(200),
        ..Default::default()
    };
    assert_eq!(volume(set(&mut st, "v", Some(q))).qos, Some(q));
    // Cleared by no limits, or by all zero.
    assert_eq!(volume(set(&mut st, "v", None)).qos, None);
    volume(set(&mut st, "v", Some(writes(1))));
    assert_eq!(
        volume(set(&mut st, "v", Some(VolumeQos::default()))).qos,
        None
    );
    // The neighbour was never touched.
    assert_eq!(qos_of(&st, "other").map(|q| q.write_iops), Some(7));
}

#[test]
fn unknown_or_deleting_volumes_are_refused() {
    let mut st = cluster();
    volume(create(&mut st, "v", Some(writes(5))));
    refused(set(&mut st, "missing", Some(writes(1))), Code::NotFound);
    refused(
        run(
            &mut st,
            Op::SetVolumeQos(pb::SetVolumeQosCmd {
                volume: None,
                qos: None,
            }),
        ),
        Code::InvalidArgument,
    );
    let mut snap = st.snapshot();
    snap.volumes[0].state = VolumeState::VolumeDeleting as i32;
    let mut st = State::restore(snap);
    let before = st.clone();
    let msg = refused(set(&mut st, "v", Some(writes(9))), Code::FailedPrecondition);
    assert!(msg.contains("being deleted"), "{msg}");
    assert_eq!(st, before);
}

#[test]
fn limits_survive_snapshot_and_log_encoding() {
    let mut st = cluster();
    volume(create(&mut st, "v", Some(writes(200))));
    volume(set(
        &mut st,
        "v",
        Some(VolumeQos {
            read_iops: 10,
            write_bps: 5 << 20,
            burst_ms: Some(1500),
            ..Default::default()
        }),
    ));
    let bytes = st.snapshot().encode_to_vec();
    let restored = State::restore(StateSnapshot::decode(bytes.as_slice()).expect("decode"));
    assert_eq!(restored, st);
    assert_eq!(
        qos_of(&restored, "v"),
        Some(VolumeQos {
            read_iops: 10,
            write_bps: 5 << 20,
            burst_ms: Some(1500),
            ..Default::default()
        })
    );
    // The command as it goes through the Raft log.
    let cmd = Command {
        now_ms: T0,
        op: Some(Op::SetVolumeQos(pb::SetVolumeQosCmd {
            volume: vref("v"),
            qos: Some(writes(42)),
        })),
    };
    let decoded = Command::decode(cmd.encode_to_vec().as_slice()).expect("decode");
    let mut replica = restored.clone();
    st.apply(&cmd);
    replica.apply(&decoded);
    assert_eq!(replica, st);
    assert_eq!(qos_of(&st, "v").map(|q| q.write_iops), Some(42));
}
