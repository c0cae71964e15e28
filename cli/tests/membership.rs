//! `ironsan storage --manager` as a process against a fake manager in the test process: it
//! registers with its id, advertised address, zone and disks; heartbeats at the interval the
//! manager asked for; registers again when a heartbeat is answered NOT_FOUND; obeys a
//! drop order only for a replica whose epoch is not newer than the order's; and stops
//! cleanly on SIGTERM. Its `/readyz` follows its standing with the manager.

mod fake_manager;
mod storaged;

use std::process::Command;
use std::time::{Duration, Instant};

use fake_manager::FakeManager;
use ironsan_common::proto::manager as pb;
use ironsan_storage::{ChunkId, Client, ClientConfig, Error};
use storaged::{metric, Daemon};

const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(30);

fn chunk(volume_id: u64, index: u64, epoch: u64) -> pb::Chunk {
    pb::Chunk {
        volume_id,
        index,
        epoch,
        replicas: vec!["elsewhere".into()],
        joining: String::new(),
        fill: false,
    }
}

#[test]
fn storage_daemon_registers_heartbeats_and_obeys_drop_orders() {
    let fake = FakeManager::start();
    fake.state().heartbeat_interval_ms = 200;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        &[dir.path().to_path_buf()],
        &[
            "--manager",
            &fake.addr,
            "--node-id",
            "node-7",
            "--zone",
            "zone-b",
        ],
    );

    // Registration: id, the real bound data-path address, zone and the data directory.
    assert!(
        fake.wait(WAIT, |s| s.count("register_node") >= 1),
        "no registration; log:\n{}",
        d.log()
    );
    let reg = fake
        .state()
        .requests::<pb::RegisterNodeRequest>("register_node")[0]
        .clone();
    assert_eq!(reg.id, "node-7");
    assert_eq!(reg.addr, d.addr);
    assert_eq!(reg.zone, "zone-b");
    assert_eq!(reg.disks.len(), 1);
    assert_eq!(reg.disks[0].path, dir.path().display().to_string());
    assert_eq!(reg.disks[0].state, pb::DiskState::DiskHealthy as i32);
    assert!(reg.disks[0].capacity > 0 && reg.disks[0].free > 0);
    assert!(reg.disks[0].free <= reg.disks[0].capacity);

    // Heartbeats at the 200 ms the fake asked for (not the 1 s default).
    assert!(
        fake.wait(WAIT, |s| s.count("heartbeat") >= 6),
        "heartbeats missing; log:\n{}",
        d.log()
    );
    let times = fake.state().times("heartbeat");
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    let mean = gaps.iter().sum::<Duration>() / gaps.len() as u32;
    assert!(
        mean >= Duration::from_millis(150) && mean <= Duration::from_millis(600),
        "mean heartbeat gap {mean:?} ({gaps:?})"
    );
    let hb = fake.state().requests::<pb::HeartbeatRequest>("heartbeat")[0].clone();
    assert_eq!(hb.id, "node-7");
    assert_eq!(hb.disks.len(), 1);
    assert_eq!(hb.disks[0].path, reg.disks[0].path);

    // The manager forgets the node: the next heartbeat is NOT_FOUND, then it registers again.
    fake.state().nodes.clear();
    assert!(
        fake.wait(WAIT, |s| s.count("register_node") >= 2),
        "no re-registration; log:\n{}",
        d.log()
    );
    let n = fake.state().count("heartbeat");
    assert!(
        fake.wait(WAIT, |s| s.count("heartbeat") >= n + 2),
        "heartbeats did not resume; log:\n{}",
        d.log()
    );

    // Drop orders: a replica newer than the order is kept, one at the order's epoch deleted.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = rt
        .block_on(Client::connect(&d.addr, &ClientConfig::default()))
        .unwrap();
    let (newer, matching, absent) = (
        ChunkId::new(77, 0),
        ChunkId::new(77, 1),
        ChunkId::new(77, 2),
    );
    rt.block_on(client.create(newer, 4 * MIB, 5)).unwrap();
    rt.block_on(client.create(matching, 4 * MIB, 3)).unwrap();
    fake.state().drop_chunks = vec![chunk(77, 0, 4), chunk(77, 1, 3), chunk(77, 2, 1)];
    let n = fake.state().count("heartbeat");
    let deadline = Instant::now() + WAIT;
    loop {
        match rt.block_on(client.info(matching)) {
            Err(Error::NotFound(_)) => break,
            Ok(_) if Instant::now() < deadline => {
                fake.wait(Duration::from_millis(500), |s| s.count("heartbeat") > n);
            }
            other => panic!(
                "replica at the order's epoch not deleted: {other:?}; log:\n{}",
                d.log()
            ),
        }
    }
    // Several more heartbeats repeat the orders; the newer replica stays.
    let n = fake.state().count("heartbeat");
    assert!(fake.wait(WAIT, |s| s.count("heartbeat") >= n + 3));
    let info = rt.block_on(client.info(newer)).unwrap();
    assert_eq!(
        info.epoch, 5,
        "the refused order must not touch the replica"
    );
    assert!(matches!(
        rt.block_on(client.info(absent)),
        Err(Error::NotFound(_))
    ));
    let log = d.log();
    assert_eq!(
        log.matches("kept a replica the manager ordered dropped")
            .count(),
        1,
        "the refusal is logged once; log:\n{log}"
    );
    assert!(
        log.contains("deleted a replica the cluster no longer places here"),
        "{log}"
    );

    let m = d.metrics();
    assert!(
        metric(
            &m,
            "ironsan_storage_manager_heartbeats_total{result=\"ok\"}"
        ) >= 6.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "ironsan_storage_manager_heartbeats_total{result=\"not_found\"}"
        ) >= 1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "ironsan_storage_manager_dropped_chunks_total"),
        1.0,
        "{m}"
    );
    drop(client);

    // SIGTERM stops the heartbeats with the data path, and the daemon exits 0.
    let mut d = d;
    // SAFETY: kill(2) on the pid of a child we started and have not reaped.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    let st = d.child.wait().unwrap();
    assert!(st.success(), "exit {st}; log:\n{}", d.log());
}

#[test]
fn storage_daemon_serves_before_the_manager_is_reachable_and_registers_once_it_is() {
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        &[dir.path().to_path_buf()],
        &["--manager", &addr, "--node-id", "late"],
    );
    // Nothing listens at the manager's address: the data path serves anyway.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = Client::connect(&d.addr, &ClientConfig::default())
            .await
            .unwrap();
        c.create(ChunkId::new(1, 0), 4 * MIB, 1).await.unwrap();
    });
    // The manager comes up: the retrying registration reaches it.
    let fake = FakeManager::start_at(&addr);
    assert!(
        fake.wait(WAIT, |s| s.count("heartbeat") >= 1),
        "no registration and heartbeat once the manager was up; log:\n{}",
        d.log()
    );
    let reg = fake
        .state()
        .requests::<pb::RegisterNodeRequest>("register_node");
    assert_eq!(reg[0].id, "late");
    assert_eq!(reg[0].zone, "");
}

#[test]
fn storage_flags_are_checked_before_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ironsan"))
        .args([
            "storage",
            "--listen",
            "0.0.0.0:0",
            "--manager",
            "127.0.0.1:7400",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--node-id", "n1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--advertise"), "{err}");

    let out = Command::new(env!("CARGO_BIN_EXE_ironsan"))
        .args([
            "storage",
            "--listen",
            "127.0.0.1:0",
            "--manager",
            "127.0.0.1:7400,",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("empty entry"), "{err}");
}

/// `/readyz`: standalone, ready once it serves; with a manager, only once registered, with
/// heartbeats accepted and nothing owed (recovery copies to receive, replicas to drop) in two
/// answers in a row; unready again when heartbeats stop being accepted.
#[test]
fn storage_readiness_follows_its_standing_with_the_manager() {
    let dir = tempfile::tempdir().unwrap();
    let alone = Daemon::start(&[dir.path().join("alone")], &[]);
    assert_eq!(alone.readyz(), (200, "ready\n".to_string()));
    drop(alone);

    let fake = FakeManager::start();
    fake.state().heartbeat_interval_ms = 100;
    fake.state().fail.insert(
        "register_node",
        (tonic::Code::Unavailable, "no leader".into()),
    );
    let d = Daemon::start(
        &[dir.path().join("d")],
        &["--manager", &fake.addr, "--node-id", "n1"],
    );
    let (code, body) = d.readyz();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("not registered"), "{body}");
    assert!(fake.wait(WAIT, |s| s.count("register_node") >= 2));
    assert_eq!(d.readyz().0, 503);

    // Registered, but the manager says copies to this node are still to come.
    fake.state().recovery_pending = 3;
    fake.state().fail.clear();
    let (_, body) = d.wait_readyz(WAIT, |_, b| b.contains("catching up"));
    assert!(body.contains("3 recovery copies to receive"), "{body}");
    assert!(fake.wait(WAIT, |s| s.count("heartbeat") >= 5));
    assert_eq!(d.readyz().0, 503);
    fake.state().recovery_pending = 0;
    fake.state().drop_chunks = vec![chunk(9, 0, 1)];
    d.wait_readyz(WAIT, |_, b| b.contains("1 replicas to drop"));
    fake.state().drop_chunks.clear();
    let t = Instant::now();
    d.wait_readyz(WAIT, |c, _| c == 200);
    println!(
        "ready {:?} after the manager stopped naming anything owed",
        t.elapsed()
    );

    // Heartbeats refused: unready once the last accepted one is stale (5 s at 100 ms).
    fake.state()
        .fail
        .insert("heartbeat", (tonic::Code::Unavailable, "no leader".into()));
    let t = Instant::now();
    let (_, body) = d.wait_readyz(WAIT, |c, _| c == 503);
    assert!(body.contains("no heartbeat accepted"), "{body}");
    assert!(t.elapsed() >= Duration::from_secs(4), "{:?}", t.elapsed());
    fake.state().fail.clear();
    d.wait_readyz(WAIT, |c, _| c == 200);
}
