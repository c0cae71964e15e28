//! The manager as processes: a 1-member group's API and its bad-input answers, storage-node
//! health arbitration (register, heartbeat, Down, recovery tasks, return), placement through
//! the API, and restart from RocksDB.

mod managers;
mod storaged;

use std::time::Duration;

use ironsan_common::proto::manager::{
    self as pb, AttachRequest, CreateVolumeRequest, DeleteVolumeRequest, Disk, DiskState,
    GetChunksRequest, HeartbeatRequest, ListNodesRequest, ListTasksRequest, ListVolumesRequest,
    NodeState, RegisterNodeRequest, RenewRequest, ReportFailedReplicaRequest, ResizeVolumeRequest,
    VolumeRef,
};
use managers::{client, Group};
use tonic::Code;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn by_name(name: &str) -> Option<VolumeRef> {
    Some(VolumeRef {
        id: 0,
        name: name.into(),
    })
}

fn create(name: &str, size: u64, replicas: u32) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        size,
        replicas,
        chunk_size: 0,
        qos: None,
    }
}

fn disk(capacity: u64) -> Disk {
    Disk {
        path: "/data".into(),
        state: DiskState::DiskHealthy as i32,
        capacity,
        free: capacity,
    }
}

async fn register(
    c: &mut pb::manager_client::ManagerClient<tonic::transport::Channel>,
    id: &str,
    zone: &str,
) {
    c.register_node(RegisterNodeRequest {
        id: id.into(),
        addr: format!("127.0.0.1:{}", 9000 + id.len()),
        zone: zone.into(),
        disks: vec![disk(100 * GIB)],
    })
    .await
    .expect("register");
}

async fn heartbeat(
    c: &mut pb::manager_client::ManagerClient<tonic::transport::Channel>,
    id: &str,
) -> pb::HeartbeatResponse {
    c.heartbeat(HeartbeatRequest {
        id: id.into(),
        disks: vec![disk(100 * GIB)],
        dropped: Vec::new(),
        ..Default::default()
    })
    .await
    .expect("heartbeat")
    .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_bad_input_and_restart() {
    let mut g = Group::start(1, &[]);
    g.leader(Duration::from_secs(10)).await;
    let mut c = client(&g.addr(1)).await;

    // No storage nodes yet: placement is impossible, and nothing is created.
    let e = c.create_volume(create("a", GIB, 3)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("cannot place"), "{e}");

    for n in ["n1", "n2", "n3"] {
        register(&mut c, n, "").await;
    }
    let v = c
        .create_volume(create("a", GIB, 3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (v.name.as_str(), v.size, v.replicas, v.chunk_size),
        ("a", GIB, 3, 64 * MIB)
    );

    // Bad input, each with its own code, none leaving anything behind.
    let cases = [
        (create("a", GIB, 3), Code::AlreadyExists),
        (create("b", 0, 3), Code::InvalidArgument),
        (create("b", 1000, 3), Code::InvalidArgument),
        (create("b", 1 << 50, 3), Code::InvalidArgument),
        (create("b", GIB, 9), Code::InvalidArgument),
        (create("b", GIB, 4), Code::ResourceExhausted),
        (create("Bad Name", GIB, 3), Code::InvalidArgument),
        (create("", GIB, 3), Code::InvalidArgument),
    ];
    for (req, code) in cases {
        let e = c.create_volume(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), code, "{req:?}: {e}");
    }
    let all = c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .volumes;
    assert_eq!(all.len(), 1, "only the good create exists: {all:?}");

    let e = c
        .get_volume(VolumeRef {
            id: 999,
            name: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .get_volume(VolumeRef {
            id: 0,
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .resize_volume(ResizeVolumeRequest {
            volume: by_name("a"),
            size: GIB / 2,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "shrink refused: {e}");
    let e = c
        .delete_volume(DeleteVolumeRequest {
            volume: by_name("nope"),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Grow: 16 chunks become 32, each placed on 3 distinct registered nodes.
    let v = c
        .resize_volume(ResizeVolumeRequest {
            volume: by_name("a"),
            size: 2 * GIB,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.size, 2 * GIB);
    let chunks = c
        .get_chunks(GetChunksRequest {
            volume: by_name("a"),
            first: 0,
            count: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(chunks.chunks.len(), 32);
    for ch in &chunks.chunks {
        let mut r = ch.replicas.clone();
        r.sort();
        r.dedup();
        assert_eq!(r.len(), 3, "distinct nodes: {ch:?}");
    }
    assert_eq!(chunks.nodes.len(), 3);

    // Attach: a lease with a writer epoch; a second gateway is refused; the holder renews.
    let a = c
        .attach(AttachRequest {
            volume: by_name("a"),
            gateway: "gw1".into(),
            lease_ms: 5000,
            portal: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(a.writer_epoch > 0);
    let e = c
        .attach(AttachRequest {
            volume: by_name("a"),
            gateway: "gw2".into(),
            lease_ms: 5000,
            portal: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    let r = c
        .renew(RenewRequest {
            volume: by_name("a"),
            gateway: "gw1".into(),
            writer_epoch: a.writer_epoch,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.lease_expires_ms >= a.lease_expires_ms);
    let e = c
        .renew(RenewRequest {
            volume: by_name("a"),
            gateway: "gw1".into(),
            writer_epoch: a.writer_epoch - 1,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = c
        .delete_volume(DeleteVolumeRequest {
            volume: by_name("a"),
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::FailedPrecondition,
        "attached volume not deleted: {e}"
    );

    // Report a failed replica: only the current writer may; the epoch moves on.
    let ch0 = chunks.chunks[0].clone();
    let e = c
        .report_failed_replica(ReportFailedReplicaRequest {
            volume_id: v.id,
            index: 0,
            node_id: ch0.replicas[0].clone(),
            writer_epoch: a.writer_epoch + 100,
            reason: "test".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let after = c
        .report_failed_replica(ReportFailedReplicaRequest {
            volume_id: v.id,
            index: 0,
            node_id: ch0.replicas[0].clone(),
            writer_epoch: a.writer_epoch,
            reason: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.replicas.len(), 2);
    assert!(!after.replicas.contains(&ch0.replicas[0]));
    assert!(after.epoch > ch0.epoch && after.epoch > a.writer_epoch);

    // A takeover gets a higher writer epoch than everything before it.
    let b = c
        .attach(AttachRequest {
            volume: by_name("a"),
            gateway: "gw1".into(),
            lease_ms: 0,
            portal: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(b.writer_epoch > after.epoch);

    // Restart from RocksDB: everything is still there.
    let before = c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let status = g.members.get_mut(&1).unwrap().stop();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    g.spawn(1, &[]);
    g.leader(Duration::from_secs(10)).await;
    let mut c = client(&g.addr(1)).await;
    let again = c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before, again);
    let chunks2 = c
        .get_chunks(GetChunksRequest {
            volume: by_name("a"),
            first: 0,
            count: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(chunks2.chunks[0], after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_down_recovery_and_return() {
    let mut g = Group::start(
        1,
        &[
            "--node-timeout",
            "1s",
            "--recovery-grace",
            "1s",
            "--heartbeat-interval",
            "200ms",
        ],
    );
    g.leader(Duration::from_secs(10)).await;
    let mut c = client(&g.addr(1)).await;
    for (n, z) in [("n1", "z1"), ("n2", "z2"), ("n3", "z3"), ("n4", "z1")] {
        register(&mut c, n, z).await;
    }
    let v = c
        .create_volume(create("h", GIB, 3))
        .await
        .unwrap()
        .into_inner();
    let chunks = c
        .get_chunks(GetChunksRequest {
            volume: by_name("h"),
            first: 0,
            count: 0,
        })
        .await
        .unwrap()
        .into_inner();
    for ch in &chunks.chunks {
        let zones: std::collections::BTreeSet<String> = ch
            .replicas
            .iter()
            .map(|r| {
                chunks
                    .nodes
                    .iter()
                    .find(|n| &n.id == r)
                    .unwrap()
                    .zone
                    .clone()
            })
            .collect();
        assert_eq!(zones.len(), 3, "distinct zones: {ch:?}");
    }
    // Pick a victim that holds replicas: n2 (the only node of zone z2) holds every chunk.
    let victim = "n2";
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    // Everyone else keeps heartbeating; the victim goes silent.
    let mut downed = false;
    while std::time::Instant::now() < deadline {
        for n in ["n1", "n3", "n4"] {
            heartbeat(&mut c, n).await;
        }
        let nodes = c
            .list_nodes(ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes;
        let st = nodes.iter().find(|n| n.id == victim).unwrap().state;
        if st == NodeState::NodeDown as i32 {
            downed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(downed, "a silent node is committed Down");
    let v2 = c
        .get_volume(VolumeRef {
            id: v.id,
            name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        v2.degraded_chunks, 16,
        "every chunk had a replica on the victim"
    );

    // After the grace period, recovery tasks appear. n2 was z2's only node, so no
    // replacement keeps three zones: the tasks must not exist (strict zones) ...
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for n in ["n1", "n3", "n4"] {
        heartbeat(&mut c, n).await;
    }
    let tasks = c
        .list_tasks(ListTasksRequest {})
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert!(
        tasks.is_empty(),
        "no replacement may break zone distinctness: {tasks:?}"
    );
    // ... until a node in a new zone registers.
    register(&mut c, "n5", "z5").await;
    let mut tasks = Vec::new();
    for _ in 0..40 {
        for n in ["n1", "n3", "n4", "n5"] {
            heartbeat(&mut c, n).await;
        }
        tasks = c
            .list_tasks(ListTasksRequest {})
            .await
            .unwrap()
            .into_inner()
            .tasks;
        if tasks.len() == 16 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(tasks.len(), 16, "one recovery task per degraded chunk");
    assert!(
        tasks.iter().all(|t| t.lost == victim && t.target == "n5"),
        "{tasks:?}"
    );

    // Completing a task swaps the replica in and bumps the epoch.
    let before = c
        .get_chunks(GetChunksRequest {
            volume: by_name("h"),
            first: tasks[0].index,
            count: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .chunks[0]
        .clone();
    assert_eq!(before.joining, "n5");
    let done = c
        .complete_task(pb::CompleteTaskRequest {
            id: tasks[0].id,
            success: true,
        })
        .await
        .unwrap()
        .into_inner()
        .chunk
        .unwrap();
    assert!(
        done.replicas.contains(&"n5".to_string()) && !done.replicas.contains(&victim.to_string())
    );
    assert!(done.epoch > before.epoch);

    // The victim returns: it is Up again, told to drop the replica it lost and to resync
    // the ones it still holds.
    let hb = heartbeat(&mut c, victim).await;
    assert_eq!(hb.drop_chunks.len(), 1, "{hb:?}");
    assert_eq!(hb.drop_chunks[0].index, tasks[0].index);
    let mut up = false;
    for _ in 0..20 {
        let hb = heartbeat(&mut c, victim).await;
        if hb.state == NodeState::NodeUp as i32 {
            assert_eq!(hb.resync_chunks.len(), 15, "{hb:?}");
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "a returning node is committed Up");
    // Acknowledging the drop clears it.
    let hb = c
        .heartbeat(HeartbeatRequest {
            id: victim.into(),
            disks: vec![disk(100 * GIB)],
            dropped: hb.drop_chunks.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let _ = hb;
    let hb = heartbeat(&mut c, victim).await;
    assert!(
        hb.drop_chunks.is_empty(),
        "acknowledged drops are forgotten: {hb:?}"
    );

    // An unknown node's heartbeat is refused so it re-registers.
    let e = c
        .heartbeat(HeartbeatRequest {
            id: "ghost".into(),
            disks: vec![],
            dropped: vec![],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

fn cli(manager: &str, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ironsan"))
        .args(args)
        .args(["--manager", manager])
        .env("NO_COLOR", "1")
        .output()
        .expect("ironsan runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Real storage daemons register and heartbeat; the operator CLI sees them and places volumes
/// on them; a killed daemon is committed Down; the CLI fails over between members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_daemons_and_cli_against_a_real_group() {
    let mut g = Group::start(
        3,
        &["--node-timeout", "2s", "--heartbeat-interval", "200ms"],
    );
    g.leader(Duration::from_secs(15)).await;
    // Every --manager flag takes the member list: the storage daemons and the CLI get all three.
    let all = g.all_addrs();
    let dirs = tempfile::tempdir().unwrap();
    let mut daemons: Vec<_> = (1..=3)
        .map(|i| {
            let (id, zone) = (format!("node{i}"), format!("z{i}"));
            storaged::Daemon::start(
                &[dirs.path().join(format!("s{i}"))],
                &["--manager", &all, "--node-id", &id, "--zone", &zone],
            )
        })
        .collect();
    let mut up = 0;
    for _ in 0..100 {
        let (ok, out, _) = cli(&all, &["node", "list", "--json"]);
        if ok {
            up = out.matches("\"state\": \"up\"").count();
            if up == 3 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(up, 3, "three storage daemons registered and Up");

    let (ok, out, err) = cli(&all, &["volume", "create", "vol1", "--size", "1GiB"]);
    assert!(ok, "{out}{err}");
    let (ok, _, err) = cli(&all, &["volume", "create", "vol1", "--size", "1GiB"]);
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, _, err) = cli(
        &all,
        &[
            "volume",
            "create",
            "vol2",
            "--size",
            "1GiB",
            "--replicas",
            "4",
        ],
    );
    assert!(!ok && err.contains("cannot place"), "{err}");
    let (ok, out, err) = cli(&all, &["volume", "list"]);
    assert!(ok, "{err}");
    assert!(out.lines().next().unwrap().starts_with("NAME"), "{out}");
    assert!(out.contains("vol1") && !out.contains("vol2"), "{out}");

    // The CLI reaches the group through any member, including when the first listed is dead.
    let leader = g.leader(Duration::from_secs(5)).await;
    let follower = *g.members.keys().find(|&&id| id != leader).unwrap();
    g.members.get_mut(&follower).unwrap().kill();
    let dead_first = format!("{},{}", g.addr(follower), g.addr(leader));
    let (ok, out, err) = cli(&dead_first, &["status", "--json"]);
    assert!(ok, "{err}");
    assert!(out.contains(&format!("\"leader\": {leader}")), "{out}");

    // A killed storage daemon is committed Down and its chunks count as degraded.
    drop(daemons.remove(2));
    let mut down = false;
    for _ in 0..100 {
        let (ok, out, _) = cli(&dead_first, &["node", "list", "--json"]);
        if ok && out.matches("\"state\": \"down\"").count() == 1 {
            down = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(down, "node3 committed Down");
    let (ok, out, err) = cli(&dead_first, &["volume", "get", "vol1", "--json"]);
    assert!(ok, "{err}");
    assert!(out.contains("\"degraded_chunks\": 16"), "{out}");
}
