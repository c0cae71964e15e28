//! The snapshot, clone and restore calls through a three-member group, every call made to a
//! follower so that the leader's decisions (work gateway, clone placement) are made on
//! forwarded commands, and a clone of a volume's present goes through its internal snapshot.
//! The test plays the gateway: it reports snapshots taken or failed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ironsan_common::proto::manager::{self as pb, manager_client::ManagerClient};
use ironsan_manager::health::HealthConfig;
use ironsan_manager::node::NodeConfig;
use ironsan_manager::{Server, ServerConfig};
use tonic::transport::Channel;
use tonic::Code;

const MIB: u64 = 1 << 20;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

async fn group(dir: &std::path::Path) -> Vec<Server> {
    let addrs: BTreeMap<u64, String> = (1..=3)
        .map(|id| (id, format!("127.0.0.1:{}", free_port())))
        .collect();
    let mut servers = Vec::new();
    for (&id, addr) in &addrs {
        let mut raft = NodeConfig::new(id);
        raft.tick = Duration::from_millis(20);
        let cfg = ServerConfig {
            id,
            listen: addr.parse().expect("address"),
            advertise: addr.clone(),
            data_dir: dir.join(id.to_string()),
            peers: addrs
                .iter()
                .filter(|(&p, _)| p != id)
                .map(|(&p, a)| (p, a.clone()))
                .collect(),
            join: false,
            raft,
            health: HealthConfig::default(),
        };
        servers.push(Server::start(cfg).await.expect("member starts"));
    }
    servers
}

async fn client(s: &Server) -> ManagerClient<Channel> {
    ManagerClient::connect(format!("http://{}", s.addr))
        .await
        .expect("connect")
}

fn vref(name: &str) -> Option<pb::VolumeRef> {
    Some(pb::VolumeRef {
        id: 0,
        name: name.into(),
    })
}

/// The internal snapshot `name` of volume "v", once it shows.
async fn internal(c: &mut ManagerClient<Channel>, name: &str) -> pb::Snapshot {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let list = c
            .list_snapshots(pb::ListSnapshotsRequest {
                volume: vref("v"),
                id: 0,
            })
            .await
            .expect("list")
            .into_inner();
        if let Some(s) = list.snapshots.into_iter().find(|s| s.name == name) {
            return s;
        }
        assert!(Instant::now() < until, "no internal snapshot {name}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn epoch(c: &mut ManagerClient<Channel>, name: &str) -> pb::Attachment {
    c.get_volume(vref(name).unwrap_or_default())
        .await
        .expect("volume")
        .into_inner()
        .attachment
        .expect("attached")
}

fn clone_req(name: &str, snapshot: &str, size: u64) -> pb::CloneVolumeRequest {
    pb::CloneVolumeRequest {
        name: name.into(),
        source: vref("v"),
        snapshot: snapshot.into(),
        size,
        replicas: 0,
        qos: None,
    }
}

/// A client of a follower (once a leader is known), with three storage nodes registered.
async fn follower_with_nodes(servers: &[Server]) -> ManagerClient<Channel> {
    let until = Instant::now() + Duration::from_secs(20);
    let leader = loop {
        let st = servers[0].node.status();
        if st.leader != 0 {
            break st.leader;
        }
        assert!(Instant::now() < until, "no leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let follower = servers
        .iter()
        .find(|s| s.node.id() != leader)
        .expect("a follower");
    let mut c = client(follower).await;
    for n in ["s1", "s2", "s3"] {
        c.register_node(pb::RegisterNodeRequest {
            id: n.into(),
            addr: "127.0.0.1:1".into(),
            zone: String::new(),
            disks: vec![pb::Disk {
                path: "/d".into(),
                state: pb::DiskState::DiskHealthy as i32,
                capacity: 1 << 40,
                free: 1 << 40,
            }],
        })
        .await
        .expect("node");
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_clones_through_a_follower() {
    let dir = tempfile::tempdir().expect("tempdir");
    let servers = group(dir.path()).await;
    let mut c = follower_with_nodes(&servers).await;
    for g in ["g1", "g2"] {
        c.register_gateway(pb::RegisterGatewayRequest {
            id: g.into(),
            portal: "127.0.0.1:3260".into(),
        })
        .await
        .expect("gateway");
    }
    c.create_volume(pb::CreateVolumeRequest {
        name: "v".into(),
        size: 128 * MIB,
        replicas: 3,
        chunk_size: 64 * MIB,
        qos: None,
    })
    .await
    .expect("volume");

    // Nobody holds "v": the leader gives g1 (the first registered) a work attachment.
    let s = c
        .create_snapshot(pb::CreateSnapshotRequest {
            volume: vref("v"),
            name: "s".into(),
        })
        .await
        .expect("snapshot")
        .into_inner();
    assert_eq!(s.state, pb::SnapshotState::SnapshotCreating as i32);
    let work = epoch(&mut c, "v").await;
    assert!(work.work && work.gateway == "g1", "{work:?}");
    let s = c
        .snapshot_done(pb::SnapshotDoneRequest {
            id: s.id,
            writer_epoch: work.writer_epoch,
            deleted: false,
            error: String::new(),
        })
        .await
        .expect("done")
        .into_inner();
    assert_eq!(s.state, pb::SnapshotState::SnapshotReady as i32);

    // A clone of "s", placed by the leader on the forwarded command.
    let cl = c
        .clone_volume(clone_req("c", "s", 0))
        .await
        .expect("clone")
        .into_inner();
    assert_eq!(
        (cl.size, cl.replicas, cl.chunk_size),
        (128 * MIB, 3, 64 * MIB)
    );
    let src = cl.source.expect("source");
    assert_eq!((src.snapshot_id, src.chunks_left), (s.id, 2));
    let chunks = c
        .get_chunks(pb::GetChunksRequest {
            volume: vref("c"),
            first: 0,
            count: 0,
        })
        .await
        .expect("chunks")
        .into_inner()
        .chunks;
    assert!(chunks.iter().all(|ch| ch.fill && ch.replicas.len() == 3));
    let e = c
        .clone_volume(clone_req("x", "s", MIB))
        .await
        .expect_err("smaller");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .clone_volume(clone_req("x", "nope", 0))
        .await
        .expect_err("unknown");
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .delete_snapshot(pb::SnapshotRef {
            id: s.id,
            ..Default::default()
        })
        .await
        .expect_err("dependents");
    assert_eq!(e.code(), Code::FailedPrecondition);

    // A clone of the present: g1 still holds "v", so it takes the internal snapshot.
    let mut c2 = c.clone();
    let cloning = tokio::spawn(async move { c2.clone_volume(clone_req("d", "", 0)).await });
    let snap = internal(&mut c, "clone.d").await;
    assert!(snap.internal);
    c.snapshot_done(pb::SnapshotDoneRequest {
        id: snap.id,
        writer_epoch: work.writer_epoch,
        deleted: false,
        error: String::new(),
    })
    .await
    .expect("done");
    let d = cloning
        .await
        .expect("task")
        .expect("clone of the present")
        .into_inner();
    assert_eq!(d.source.expect("source").snapshot_id, snap.id);

    // Its snapshot failing: refused with the error, the snapshot deleted.
    let mut c3 = c.clone();
    let cloning = tokio::spawn(async move { c3.clone_volume(clone_req("f", "", 0)).await });
    let snap = internal(&mut c, "clone.f").await;
    c.snapshot_done(pb::SnapshotDoneRequest {
        id: snap.id,
        writer_epoch: work.writer_epoch,
        deleted: false,
        error: "replica s2 down".into(),
    })
    .await
    .expect("done");
    let e = cloning.await.expect("task").expect_err("failed snapshot");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("replica s2 down"), "{}", e.message());
    assert_eq!(
        internal(&mut c, "clone.f").await.state,
        pb::SnapshotState::SnapshotDeleting as i32
    );
    let e = c
        .get_volume(vref("f").unwrap_or_default())
        .await
        .expect_err("no clone");
    assert_eq!(e.code(), Code::NotFound);

    for s in servers {
        s.stop(Duration::ZERO).await;
    }
}

/// `ListVolumes` as a long poll (what gateways do): through a follower, it waits while
/// nothing changes (lease renewals do not count) and answers within a round trip of a change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_volumes_long_polls_on_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let servers = group(dir.path()).await;
    let mut c = follower_with_nodes(&servers).await;
    c.create_volume(pb::CreateVolumeRequest {
        name: "v".into(),
        size: 64 * MIB,
        replicas: 3,
        chunk_size: 64 * MIB,
        qos: None,
    })
    .await
    .expect("volume");
    let a = c
        .attach(pb::AttachRequest {
            volume: vref("v"),
            gateway: "g1".into(),
            lease_ms: 0,
            portal: String::new(),
        })
        .await
        .expect("attach")
        .into_inner();
    let first = c
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(first.changed > 0, "the answer names its change index");

    // Nothing changes but a lease renewal: the poll waits its whole time.
    let poll = |changed_after| pb::ListVolumesRequest {
        changed_after,
        wait_ms: 700,
    };
    let mut c2 = c.clone();
    let renewing = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        c2.renew(pb::RenewRequest {
            volume: vref("v"),
            gateway: "g1".into(),
            writer_epoch: a.writer_epoch,
        })
        .await
        .expect("renew");
    });
    let t = Instant::now();
    let quiet = c
        .list_volumes(poll(first.changed))
        .await
        .expect("poll")
        .into_inner();
    let waited = t.elapsed();
    renewing.await.expect("renewal task");
    assert!(
        waited >= Duration::from_millis(650),
        "answered after {waited:?}"
    );
    assert_eq!(quiet.changed, first.changed);

    // A snapshot request wakes it at once.
    let mut c3 = c.clone();
    let asking = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        c3.create_snapshot(pb::CreateSnapshotRequest {
            volume: vref("v"),
            name: "s".into(),
        })
        .await
        .expect("snapshot");
    });
    let t = Instant::now();
    let woken = c
        .list_volumes(pb::ListVolumesRequest {
            changed_after: first.changed,
            wait_ms: 5_000,
        })
        .await
        .expect("poll")
        .into_inner();
    let waited = t.elapsed();
    asking.await.expect("snapshot task");
    assert!(
        waited < Duration::from_millis(1_500),
        "answered {waited:?} after the change"
    );
    assert!(woken.changed > first.changed);
    assert_eq!(woken.volumes[0].snapshots.len(), 1, "{woken:?}");
    // A stale index answers at once.
    let t = Instant::now();
    c.list_volumes(poll(first.changed)).await.expect("poll");
    assert!(t.elapsed() < Duration::from_millis(500));
}
