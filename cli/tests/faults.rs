//! Fault injection (issue 5, "How it is checked"): a self-checking iSCSI workload runs against a
//! real cluster while processes are killed, restarted, partitioned and their disks turned
//! read-only; afterwards every block is read back and checked against what was acknowledged,
//! and the replicas of every chunk are compared block by block.
//!
//! - `dev_*`: the workload, recorder and checker against `ironsan dev` (single process,
//!   file-backed), including a crash and a negative control that proves the checker catches a
//!   lost write.
//! - `cluster_*`: managers, storage daemons and gateways as processes (`cluster/` fixture),
//!   each in its own network namespace. Needs root, iproute2, e2fsprogs and loop devices.
//!
//! Short form (CI, every fault kind at least once): `cargo nextest run -p ironsan --test faults`.
//! Long form: `IRONSAN_FAULTS=long [IRONSAN_FAULT_COUNT=300] cargo nextest run -p ironsan
//! --test faults --no-capture cluster_fault_suite`. `IRONSAN_FAULT_SEED=N` replays a run (the
//! seed is printed). Tests of this file run one at a time (a lock file), even under nextest.

mod cluster;
mod support;
mod workload;

use std::time::Duration;

use support::{iqn, Server, ServerConfig, TestDir};
use workload::libiscsi::{IscsiError, Session, SessionConfig};
use workload::{
    decode, encode, verify_volume, Content, Portals, Violation, Workload, WorkloadConfig, BLOCK,
};

const MIB: u64 = 1 << 20;

/// Seed of this run: `IRONSAN_FAULT_SEED`, else the clock (printed, for replay).
fn seed() -> u64 {
    match std::env::var("IRONSAN_FAULT_SEED") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("IRONSAN_FAULT_SEED={v:?} is not a number")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    }
}

/// Panics with every violation (the first 20) if there are any.
fn assert_no_violations(what: &str, v: &[(Violation, String)]) {
    if v.is_empty() {
        return;
    }
    let list: Vec<String> = v
        .iter()
        .take(20)
        .map(|(v, c)| format!("  {v} [{c}]"))
        .collect();
    panic!("{what}: {} violations:\n{}", v.len(), list.join("\n"));
}

// ------------------------------------------------------------------------------------------
// Against `ironsan dev`

/// The libiscsi wrapper itself: capacity, a write read back, errors classified.
#[test]
fn dev_libiscsi_client_basics() {
    let _serial = cluster::serial();
    let dir = TestDir::new("faults-dev-basics");
    let server = Server::start(dir.path(), ServerConfig::default().volume("v", "64MiB"));
    let cfg = SessionConfig::new("iqn.2026-11.io.ironsan.test:basics", &iqn("v"));
    let mut s = Session::connect(&server.addr, &cfg).expect("log in to ironsan dev");
    assert_eq!(
        s.capacity().expect("READ CAPACITY(16)"),
        (64 * MIB / 512, 512)
    );
    let data: Vec<u8> = (0..3)
        .flat_map(|g| encode(10 + g, 1 + g, 0))
        .collect::<Vec<u8>>();
    s.write(10 * BLOCK as u64, &data, true).expect("WRITE(16)");
    s.flush().expect("SYNCHRONIZE CACHE");
    let mut back = vec![0u8; 4 * BLOCK];
    s.read(9 * BLOCK as u64, &mut back).expect("READ(16)");
    assert_eq!(decode(&back[..BLOCK]), Content::Zero);
    assert_eq!(&back[BLOCK..], &data[..]);
    // Past the end: ILLEGAL REQUEST, and the session stays usable.
    let err = s
        .read(64 * MIB, &mut back[..BLOCK])
        .expect_err("read past the end must fail");
    assert_eq!(err.sense_key(), Some(0x05), "{err}");
    assert!(!err.breaks_session(), "{err}");
    s.read(0, &mut back[..BLOCK])
        .expect("the session survives an error");
    // Unknown target: a login error.
    let bad = SessionConfig::new("iqn.2026-11.io.ironsan.test:basics", &iqn("nope"));
    match Session::connect(&server.addr, &bad) {
        Err(IscsiError::Connect { .. }) => {}
        Err(e) => panic!("unknown target: expected a connect error, got {e}"),
        Ok(_) => panic!("unknown target: login succeeded"),
    }
    // A killed target: the next command fails as a broken connection, not a hang.
    server.kill_hard();
    let err = s
        .write(0, &encode(0, 1, 0), false)
        .expect_err("write to a killed target");
    assert!(err.breaks_session(), "{err}");
}

/// The workload and checker end to end on one process: runs, survives SIGKILL + restart of
/// `ironsan dev` (acknowledged writes are in the page cache, WCE=1), and the read-back finds
/// every acknowledged write. Then a negative control: blocks rolled back to an older
/// generation and a torn block must be reported, exactly.
#[test]
fn dev_workload_survives_kill9_and_checker_catches_lost_writes() {
    let _serial = cluster::serial();
    let seed = seed();
    println!("seed {seed} (IRONSAN_FAULT_SEED={seed} replays the workload)");
    let dir = TestDir::new("faults-dev");
    let config = ServerConfig::default().volume("v", "64MiB");
    let server = Server::start(dir.path(), config.clone());
    let portals = Portals::new(vec![server.addr.clone()]);
    let mut cfg = WorkloadConfig::new(&iqn("v"), 64 * MIB);
    cfg.seed = seed;
    cfg.unavailable_limit = Duration::from_secs(60);
    let wl = Workload::start(&cfg, &portals);
    assert!(
        wl.wait_progress(500, Duration::from_secs(30)),
        "the workload made no progress against ironsan dev: {:?}",
        wl.counts()
    );
    std::thread::sleep(Duration::from_secs(2));
    let before = wl.counts();
    wl.set_phase("dev killed");
    server.kill_hard();
    let server = Server::start(dir.path(), config);
    portals.set(vec![server.addr.clone()]);
    wl.set_phase("dev restarted");
    assert!(
        wl.wait_progress(500, Duration::from_secs(60)),
        "the workload did not resume after the restart: {:?}",
        wl.counts()
    );
    std::thread::sleep(Duration::from_secs(2));
    let mut out = wl.stop();
    assert!(out.fatal.is_empty(), "workers gave up: {:?}", out.fatal);
    assert_no_violations("reads during the workload", &out.violations);
    assert!(
        out.stats.sessions > u64::from(cfg.workers),
        "the kill did not force any reconnect: {:?}",
        out.stats
    );
    println!(
        "dev workload: {:?} (before kill {before:?}), {} writes acked, {} failed, {} reads, {} sessions, errors {:?}",
        out.elapsed,
        out.stats.writes_acked,
        out.stats.writes_failed,
        out.stats.reads_ok,
        out.stats.sessions,
        out.stats.errors
    );

    let scfg = cfg.session(99);
    let report = verify_volume(
        &portals,
        &scfg,
        &mut out.record,
        cfg.blocks,
        Duration::from_secs(60),
    )
    .expect("read back the volume");
    let v: Vec<(Violation, String)> = report
        .violations
        .iter()
        .map(|v| (v.clone(), "final read-back".to_string()))
        .collect();
    assert_no_violations("final read-back", &v);
    assert!(report.written_blocks > 100, "{report:?}");
    println!(
        "read back {} blocks ({} written, {} in-doubt writes found landed) in {:?}",
        report.blocks, report.written_blocks, report.in_doubt_landed, report.elapsed
    );

    // Negative control: roll three acknowledged blocks back and tear one; the checker must
    // name exactly those four.
    let mut acked: Vec<(u64, u64)> = out
        .record
        .iter()
        .filter(|(_, st)| st.acked >= 2)
        .map(|(&b, st)| (b, st.acked))
        .collect();
    acked.sort();
    assert!(
        acked.len() >= 4,
        "too few blocks written twice for the control"
    );
    let mut s = Session::connect(&server.addr, &scfg).expect("log in for the control");
    let mut damaged = Vec::new();
    for &(b, gen) in &acked[..3] {
        s.write(b * BLOCK as u64, &encode(b, gen - 1, 0), true)
            .expect("roll back");
        damaged.push(b);
    }
    let (b, gen) = acked[3];
    let mut torn = encode(b, gen, 0);
    torn[3000..].copy_from_slice(&encode(b, gen - 1, 0)[3000..]);
    s.write(b * BLOCK as u64, &torn, true).expect("tear");
    damaged.push(b);
    s.logout();
    let report = verify_volume(
        &portals,
        &scfg,
        &mut out.record,
        cfg.blocks,
        Duration::from_secs(60),
    )
    .expect("read back the volume");
    let mut found: Vec<u64> = report.violations.iter().map(|v| v.block()).collect();
    found.sort();
    damaged.sort();
    assert_eq!(found, damaged, "violations: {:?}", report.violations);
    assert_eq!(report.lost_writes(), 4, "{:?}", report.violations);
    server.stop_clean();
}

// ------------------------------------------------------------------------------------------
// Against a cluster of processes

use std::collections::BTreeMap;

use cluster::{Cluster, ClusterConfig, Node};
use workload::Outcome;

const VOL: &str = "faults";
/// Blocks at the end of the volume kept out of the workload, for probes.
const PROBE_BLOCKS: u64 = 64;

/// A cluster with one volume attached to gateway 1, and the portals its workers use.
struct Harness {
    c: Cluster,
    portals: Portals,
    wcfg: WorkloadConfig,
    volume_bytes: u64,
}

impl Harness {
    fn start(cfg: ClusterConfig, size_mib: u64, chunk_mib: u64, seed: u64) -> Harness {
        let mut c = Cluster::start(cfg);
        let v = c.create_volume(VOL, &format!("{size_mib}MiB"), &format!("{chunk_mib}MiB"));
        assert_eq!(v["size"].as_u64(), Some(size_mib * MIB), "{v:#}");
        let took = c.attach(VOL, 1, Duration::from_secs(60));
        println!(
            "volume {VOL} ({size_mib} MiB, {chunk_mib} MiB chunks) served by g1 after {took:?}"
        );
        let portals = Portals::new(c.portals_for(VOL));
        let mut wcfg = WorkloadConfig::new(&iqn(VOL), size_mib * MIB - PROBE_BLOCKS * BLOCK as u64);
        wcfg.seed = seed;
        Harness {
            c,
            portals,
            wcfg,
            volume_bytes: size_mib * MIB,
        }
    }

    /// The first block of the probe area.
    fn probe_block(&self) -> u64 {
        self.volume_bytes / BLOCK as u64 - PROBE_BLOCKS
    }

    /// A probe session (its own initiator name).
    fn probe(&self, portal: &str) -> Result<Session, IscsiError> {
        Session::connect(portal, &self.wcfg.session(100))
    }

    /// Reads the whole volume back and asserts it matches the record.
    fn verify(&self, out: &mut Outcome) -> workload::VerifyReport {
        let report = verify_volume(
            &self.portals,
            &self.wcfg.session(99),
            &mut out.record,
            self.wcfg.blocks,
            Duration::from_secs(120),
        )
        .unwrap_or_else(|e| panic!("final read-back: {e}"));
        report
    }

    /// Compares the replicas of every chunk; returns the report.
    fn compare(&self) -> cluster::ReplicaReport {
        self.c
            .compare_replicas(VOL)
            .unwrap_or_else(|e| panic!("replica comparison: {e}"))
    }
}

/// Fails with the violations, the fatal worker errors, or a report showing divergence.
fn check_outcome(out: &Outcome) {
    assert!(out.fatal.is_empty(), "workers gave up: {:#?}", out.fatal);
    assert_no_violations("reads during the workload", &out.violations);
}

fn check_final(report: &workload::VerifyReport, replicas: &cluster::ReplicaReport) {
    let v: Vec<(Violation, String)> = report
        .violations
        .iter()
        .map(|v| (v.clone(), "final read-back".to_string()))
        .collect();
    assert_no_violations("final read-back", &v);
    assert!(
        replicas.differing_blocks == 0 && replicas.missing_replicas == 0,
        "replicas differ: {} blocks in {} chunks, {} chunks missing on some replica:\n  {}",
        replicas.differing_blocks,
        replicas.differing_chunks,
        replicas.missing_replicas,
        replicas.details.join("\n  ")
    );
    assert!(
        replicas.replicas_read >= 3 * (replicas.chunks - replicas.chunks_unwritten),
        "{replicas:?}"
    );
}

/// The whole stack in a few seconds: a workload through the gateway, read back, replicas
/// compared. Plain directories and loopback: runs without root.
#[test]
fn cluster_smoke() {
    let _serial = cluster::serial();
    let seed = seed();
    println!("seed {seed}");
    let h = Harness::start(ClusterConfig::new("smoke", 1, 3, 1), 64, 4, seed);
    let wl = Workload::start(&h.wcfg, &h.portals);
    assert!(
        wl.wait_progress(300, Duration::from_secs(60)),
        "no progress through the gateway: {:?}\n{}",
        wl.counts(),
        h.c.log_tails(20)
    );
    std::thread::sleep(Duration::from_secs(3));
    let mut out = wl.stop();
    check_outcome(&out);
    let report = h.verify(&mut out);
    let replicas = h.compare();
    println!(
        "smoke: {} writes acked, {} reads, errors {:?}; read back {} blocks ({} written); {} chunks compared ({} never written), {} replicas read",
        out.stats.writes_acked,
        out.stats.reads_ok,
        out.stats.errors,
        report.blocks,
        report.written_blocks,
        replicas.chunks,
        replicas.chunks_unwritten,
        replicas.replicas_read
    );
    check_final(&report, &replicas);
    assert!(out.stats.writes_acked > 100, "{:?}", out.stats);
}

/// Degraded service: with 2 of 3 storage daemons killed I/O goes on and stays correct; with
/// all 3 down writes and reads fail with CHECK CONDITION and never return stale data; once
/// they are back I/O recovers, redundancy is restored and replicas agree.
#[test]
fn cluster_degraded_service() {
    let _serial = cluster::serial();
    let seed = seed();
    println!("seed {seed}");
    let mut h = Harness::start(ClusterConfig::new("degraded", 1, 3, 1), 64, 4, seed);
    let wl = Workload::start(&h.wcfg, &h.portals);
    assert!(
        wl.wait_progress(300, Duration::from_secs(60)),
        "no progress: {:?}",
        wl.counts()
    );
    // Probe blocks written while all is well: what a read must return later.
    let portal = h.c.portal(1);
    let mut probe = h.probe(&portal).expect("probe session");
    let pb = h.probe_block();
    probe
        .write(pb * BLOCK as u64, &encode(pb, 1, 100), false)
        .expect("probe write while healthy");

    for i in [1, 2] {
        wl.set_phase(&format!("storage-{i} killed"));
        h.c.kill(Node::Storage(i));
        assert!(
            wl.wait_progress(300, Duration::from_secs(60)),
            "no progress with storage-{i} killed: {:?}\n{}",
            wl.counts(),
            h.c.log_tails(20)
        );
    }
    println!(
        "two of three storage daemons down: I/O goes on ({:?})",
        wl.counts()
    );

    wl.set_phase("all storage killed");
    h.c.kill(Node::Storage(3));
    // Every write now fails, with CHECK CONDITION; a read either fails likewise or returns
    // exactly what was acknowledged.
    let mut write_errors = BTreeMap::<String, u32>::new();
    let mut read_errors = BTreeMap::<String, u32>::new();
    for g in 2..8 {
        let r = probe.write(
            pb * BLOCK as u64 + BLOCK as u64,
            &encode(pb + 1, g, 100),
            false,
        );
        match r {
            Ok(()) => panic!("a write succeeded with every storage daemon down"),
            Err(e) => {
                assert!(
                    matches!(e, IscsiError::CheckCondition { .. }),
                    "write with all replicas down: expected CHECK CONDITION, got {e}"
                );
                *write_errors.entry(e.to_string()).or_default() += 1;
            }
        }
        let mut buf = vec![0u8; BLOCK];
        match probe.read(pb * BLOCK as u64, &mut buf) {
            Ok(()) => assert_eq!(
                decode(&buf),
                Content::Written {
                    block: pb,
                    gen: 1,
                    worker: 100
                },
                "a read with every replica down returned something else than the acknowledged data"
            ),
            Err(e) => {
                assert!(
                    matches!(e, IscsiError::CheckCondition { .. }),
                    "read with all replicas down: expected CHECK CONDITION, got {e}"
                );
                *read_errors.entry(e.to_string()).or_default() += 1;
            }
        }
    }
    println!("all storage down: writes failed with {write_errors:?}; reads {read_errors:?}");

    wl.set_phase("storage restarted");
    for i in 1..=3 {
        h.c.start_node(Node::Storage(i));
    }
    assert!(
        wl.wait_progress(300, Duration::from_secs(60)),
        "I/O did not recover after the storage daemons came back: {:?}\n{}",
        wl.counts(),
        h.c.log_tails(30)
    );
    let mut buf = vec![0u8; BLOCK];
    let mut probe = match probe.read(pb * BLOCK as u64, &mut buf) {
        Ok(()) => probe,
        Err(_) => h.probe(&portal).expect("probe session after recovery"),
    };
    probe
        .read(pb * BLOCK as u64, &mut buf)
        .expect("probe read after recovery");
    assert_eq!(
        decode(&buf),
        Content::Written {
            block: pb,
            gen: 1,
            worker: 100
        }
    );
    probe.logout();
    let mut out = wl.stop();
    check_outcome(&out);
    let took =
        h.c.wait_full_redundancy(Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("{e}\n{}", h.c.log_tails(30)));
    println!("full redundancy {took:?} after the workload stopped");
    let report = h.verify(&mut out);
    let replicas = h.compare();
    println!(
        "degraded: {} writes acked, {} failed, {} reads, errors {:?}, {} in-doubt writes landed; {} chunks compared",
        out.stats.writes_acked,
        out.stats.writes_failed,
        out.stats.reads_ok,
        out.stats.errors,
        out.stats.in_doubt_landed + report.in_doubt_landed,
        replicas.chunks
    );
    check_final(&report, &replicas);
}
