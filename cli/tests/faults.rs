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
//! Short form (CI, every fault kind twice): `cargo nextest run -p ironsan --test faults`.
//! Long form: `IRONSAN_FAULTS=long [IRONSAN_FAULT_COUNT=300] cargo nextest run -p ironsan
//! --test faults --no-capture cluster_fault_suite`. `IRONSAN_FAULT_SEED=N` replays a run (the
//! seed is printed); `IRONSAN_FAULT_KINDS=storage-kill,restart-storage` injects only those
//! kinds. Tests of this file run one at a time (a lock file), even under nextest.

mod cluster;
mod support;
mod workload;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use cluster::{Cluster, ClusterConfig, Node};
use ironsan_common::proto::manager::{GetChunksRequest, VolumeRef};
use support::{iqn, Server, ServerConfig, TestDir};
use workload::libiscsi::{IscsiError, Session, SessionConfig};
use workload::{
    decode, encode, verify_volume, Content, Outcome, Portals, Record, Rng, Violation, Workload,
    WorkloadConfig, BLOCK,
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
        replicas.replicas_read >= 3 * (replicas.chunks - replicas.chunks_unwritten)
            && replicas.joining == 0,
        "not every chunk had 3 replicas to compare: {replicas:?}"
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
    // The gateway's own attach recorded the portal it advertises: its bound address here.
    let v = h.c.volume(VOL);
    assert_eq!(
        v["attachment"]["portal"].as_str(),
        Some(h.c.portal(1).as_str()),
        "{v:#}"
    );
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

// ------------------------------------------------------------------------------------------
// The fault suite

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    /// kill -9 of a storage daemon, restarted after the hold.
    StorageKill,
    /// kill -9 of the manager leader, restarted after the hold.
    LeaderKill,
    /// kill -9 of the gateway serving the volume; the other gateway takes over; the killed
    /// one comes back as the spare.
    GatewayKill,
    /// A storage node cut off from everything else, healed after the hold.
    StoragePartition,
    /// The serving gateway cut off; the other takes over once the lease lapses; healed.
    GatewayPartition,
    /// A storage daemon's disk turns read-only under it; the disk is repaired and the daemon
    /// restarted after the hold.
    DiskReadOnly,
    /// SIGTERM + start of a storage daemon / a manager / the serving gateway.
    RestartStorage,
    RestartManager,
    RestartGateway,
}

impl Fault {
    const ALL: [Fault; 9] = [
        Fault::StorageKill,
        Fault::LeaderKill,
        Fault::GatewayKill,
        Fault::StoragePartition,
        Fault::GatewayPartition,
        Fault::DiskReadOnly,
        Fault::RestartStorage,
        Fault::RestartManager,
        Fault::RestartGateway,
    ];

    /// The name `IRONSAN_FAULT_KINDS` takes.
    fn key(self) -> &'static str {
        match self {
            Fault::StorageKill => "storage-kill",
            Fault::LeaderKill => "leader-kill",
            Fault::GatewayKill => "gateway-kill",
            Fault::StoragePartition => "storage-partition",
            Fault::GatewayPartition => "gateway-partition",
            Fault::DiskReadOnly => "disk-read-only",
            Fault::RestartStorage => "restart-storage",
            Fault::RestartManager => "restart-manager",
            Fault::RestartGateway => "restart-gateway",
        }
    }

    /// The kinds to inject: `IRONSAN_FAULT_KINDS=storage-kill,restart-storage` narrows a run
    /// down (to reproduce one problem), else all.
    fn selected() -> Vec<Fault> {
        let Ok(list) = std::env::var("IRONSAN_FAULT_KINDS") else {
            return Fault::ALL.to_vec();
        };
        list.split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|k| {
                Fault::ALL
                    .into_iter()
                    .find(|f| f.key() == k)
                    .unwrap_or_else(|| {
                        let keys: Vec<&str> = Fault::ALL.iter().map(|f| f.key()).collect();
                        panic!("IRONSAN_FAULT_KINDS: unknown kind {k:?}; kinds: {keys:?}")
                    })
            })
            .collect()
    }

    fn name(self) -> &'static str {
        match self {
            Fault::StorageKill => "storage kill -9",
            Fault::LeaderKill => "manager leader kill -9",
            Fault::GatewayKill => "gateway kill -9 + takeover",
            Fault::StoragePartition => "storage partition",
            Fault::GatewayPartition => "gateway partition + takeover",
            Fault::DiskReadOnly => "storage disk read-only",
            Fault::RestartStorage => "clean restart storage",
            Fault::RestartManager => "clean restart manager",
            Fault::RestartGateway => "clean restart gateway",
        }
    }
}

/// What one injected fault did.
struct FaultRecord {
    n: usize,
    kind: Fault,
    target: String,
    /// Seconds into the run when it started.
    at: Duration,
    /// From injection to healing.
    held: Duration,
    /// From healing until the workload made progress again.
    resumed: Duration,
    /// From then until no chunk was degraded and no recovery task left.
    redundancy: Duration,
    note: String,
}

struct Suite {
    h: Harness,
    wl: Workload,
    rng: Rng,
    started: Instant,
    long: bool,
    holder: u32,
    faults: Vec<FaultRecord>,
}

/// `IRONSAN_FAULTS=long`: hundreds of random faults (`IRONSAN_FAULT_COUNT`, default 200).
fn long_form() -> Option<usize> {
    match std::env::var("IRONSAN_FAULTS").as_deref() {
        Ok("long") => Some(match std::env::var("IRONSAN_FAULT_COUNT") {
            Ok(v) => v
                .parse()
                .unwrap_or_else(|_| panic!("IRONSAN_FAULT_COUNT={v:?} is not a number")),
            Err(_) => 200,
        }),
        Ok("short") | Err(_) => None,
        Ok(other) => panic!("IRONSAN_FAULTS={other:?}: expected `long` or `short`"),
    }
}

impl Suite {
    fn hold(&mut self, short: Duration) {
        let d = if self.long {
            Duration::from_millis(1000 + self.rng.below(6000))
        } else {
            short
        };
        std::thread::sleep(d);
    }

    fn random_storage(&mut self) -> u32 {
        1 + self.rng.below(u64::from(self.h.c.cfg.storage)) as u32
    }

    /// A storage node holding replicas of the volume (so the fault matters): the one holding
    /// the most in the short form, any of them in the long form.
    fn loaded_storage(&mut self) -> u32 {
        let counts = self.h.c.replica_counts(VOL);
        let mut loaded: Vec<(usize, u32)> = (1..=self.h.c.cfg.storage)
            .map(|i| (counts[&Node::Storage(i).id()], i))
            .filter(|&(n, _)| n > 0)
            .collect();
        loaded.sort();
        match (self.long, loaded.last()) {
            (_, None) => self.random_storage(),
            (false, Some(&(_, i))) => i,
            (true, Some(_)) => loaded[self.rng.below(loaded.len() as u64) as usize].1,
        }
    }

    fn other_gateway(&self) -> u32 {
        if self.holder == 1 {
            2
        } else {
            1
        }
    }

    /// Moves the volume to the other gateway (the holder being dead or cut off): portals
    /// first, then attach, retrying until the old lease lapses.
    fn take_over(&mut self) -> (u32, Duration) {
        let (old, new) = (self.holder, self.other_gateway());
        self.h
            .portals
            .set(vec![self.h.c.portal(new), self.h.c.portal(old)]);
        let took = self.h.c.attach(VOL, new, Duration::from_secs(60));
        self.holder = new;
        (old, took)
    }

    /// After a takeover, the old gateway (cut off, lease lapsed) must refuse I/O.
    fn check_stale_gateway_refuses(&self, old: u32) -> String {
        let portal = self.h.c.portal(old);
        let pb = self.h.probe_block() + 1;
        match self.h.probe(&portal) {
            Err(e) => format!("stale g{old} refused login: {}", e.kind()),
            Ok(mut s) => {
                let gen = 1000 + self.faults.len() as u64;
                match s.write(pb * BLOCK as u64, &encode(pb, gen, 100), false) {
                    Ok(()) => panic!(
                        "SPLIT BRAIN: gateway g{old} acknowledged a write after g{} took the volume over\n{}",
                        self.holder,
                        self.h.c.log_tails(30)
                    ),
                    Err(e) => format!("stale g{old} refused a write: {}", e.kind()),
                }
            }
        }
    }

    fn inject(&mut self, kind: Fault) {
        let n = self.faults.len() + 1;
        let at = self.started.elapsed();
        let t0 = Instant::now();
        let mut note = String::new();
        let target;
        match kind {
            Fault::StorageKill => {
                let i = self.loaded_storage();
                target = format!("storage-{i}");
                self.wl.set_phase(&format!("{} {target}", kind.name()));
                self.h.c.kill(Node::Storage(i));
                self.hold(Duration::from_secs(3));
                self.h.c.start_node(Node::Storage(i));
            }
            Fault::LeaderKill => {
                let l = self.h.c.leader(Duration::from_secs(30));
                target = format!("manager-{l}");
                self.wl.set_phase(&format!("{} {target}", kind.name()));
                self.h.c.kill(Node::Manager(l));
                let t = Instant::now();
                let new = self.h.c.leader(Duration::from_secs(30));
                note = format!("manager-{new} leads after {:.1?}", t.elapsed());
                self.hold(Duration::from_secs(2));
                self.h.c.start_node(Node::Manager(l));
            }
            Fault::GatewayKill => {
                let g = self.holder;
                target = format!("gateway-{g}");
                self.wl.set_phase(&format!("{} {target}", kind.name()));
                self.h.c.kill(Node::Gateway(g));
                let (_, took) = self.take_over();
                note = format!("g{} serves after {took:.1?}", self.holder);
                self.h.c.start_node(Node::Gateway(g));
            }
            Fault::StoragePartition => {
                let i = self.loaded_storage();
                target = format!("storage-{i}");
                self.wl.set_phase(&format!("{} {target}", kind.name()));
                self.h.c.partition(Node::Storage(i), true);
                // Past node timeout + recovery grace, so rebuilds start and then meet the node
                // coming back.
                self.hold(Duration::from_secs(6));
                self.h.c.partition(Node::Storage(i), false);
            }
            Fault::GatewayPartition => {
                let g = self.holder;
                target = format!("gateway-{g}");
                self.wl.set_phase(&format!("{} {target}", kind.name()));
                let since = self.h.c.log_len(Node::Gateway(g));
                self.h.c.partition(Node::Gateway(g), true);
                let (old, took) = self.take_over();
                let stale = self.check_stale_gateway_refuses(old);
                self.h.c.partition(Node::Gateway(g), false);
                // Healed, it must notice the volume is gone and stop serving it.
                let stopped = self
                    .h
                    .c
                    .wait_log(
                        Node::Gateway(g),
                        since,
                        &["stopping service of volume", VOL],
                        Duration::from_secs(30),
                    )
                    .unwrap_or_else(|e| panic!("healed stale gateway g{g}: {e}"));
                let _ = stopped;
                note = format!("g{} serves after {took:.1?}; {stale}", self.holder);
            }
            Fault::DiskReadOnly => {
                let i = self.loaded_storage();
                target = format!("storage-{i}");
                self.wl.set_phase(&format!("{} {target}", kind.name()));
                self.h.c.make_disk_read_only(i);
                self.hold(Duration::from_secs(3));
                let alive = self.h.c.is_running(Node::Storage(i));
                note = if alive {
                    "daemon still running on the read-only disk".into()
                } else {
                    "daemon exited on the read-only disk".into()
                };
                self.h.c.kill(Node::Storage(i));
                self.h.c.restore_disk(i);
                self.h.c.start_node(Node::Storage(i));
            }
            Fault::RestartStorage => {
                let i = self.random_storage();
                target = format!("storage-{i}");
                self.wl.set_phase(&format!("{} {target}", kind.name()));
                self.h.c.restart(Node::Storage(i));
            }
            Fault::RestartManager => {
                let m = 1 + self.rng.below(u64::from(self.h.c.cfg.managers)) as u32;
                target = format!("manager-{m}");
                self.wl.set_phase(&format!("{} {target}", kind.name()));
                self.h.c.restart(Node::Manager(m));
            }
            Fault::RestartGateway => {
                let g = self.holder;
                target = format!("gateway-{g}");
                self.wl.set_phase(&format!("{} {target}", kind.name()));
                let since = self.h.c.log_len(Node::Gateway(g));
                self.h.c.restart(Node::Gateway(g));
                self.h
                    .c
                    .wait_log(
                        Node::Gateway(g),
                        since,
                        &["target ready", VOL],
                        Duration::from_secs(60),
                    )
                    .unwrap_or_else(|e| panic!("restarted gateway g{g}: {e}"));
            }
        }
        let held = t0.elapsed();
        self.wl
            .set_phase(&format!("after {} {target}", kind.name()));
        let t1 = Instant::now();
        if !self.wl.wait_progress(100, Duration::from_secs(90)) {
            let fatal = self.wl.finish().fatal;
            panic!(
                "fault {n} ({} {target}): the workload did not resume within 90 s; workers: {fatal:?}\n{}",
                kind.name(),
                self.h.c.log_tails(30)
            );
        }
        let resumed = t1.elapsed();
        let t2 = Instant::now();
        if let Err(e) = self.h.c.wait_full_redundancy(Duration::from_secs(120)) {
            panic!(
                "fault {n} ({} {target}): {e}\n{}",
                kind.name(),
                self.h.c.log_tails(30)
            );
        }
        let redundancy = t2.elapsed();
        let nodes = self.h.c.nodes();
        self.h.c.assert_running(&nodes);
        let (w, r, e) = self.wl.counts();
        println!(
            "[fault {n} at {:>5.1}s] {:<30} {target:<10} held {held:>5.1?}, I/O resumed {resumed:>5.1?}, redundancy {redundancy:>5.1?}; {w} writes {r} reads {e} errors so far{}{}",
            at.as_secs_f64(),
            kind.name(),
            if note.is_empty() { "" } else { "; " },
            note
        );
        self.faults.push(FaultRecord {
            n,
            kind,
            target,
            at,
            held,
            resumed,
            redundancy,
            note,
        });
    }
}

/// Data (bytes) of distinct blocks ever written in the chunks `chunks` (chunk size `cs`).
fn written_bytes_in(record: &Record, chunks: &BTreeSet<u64>, cs: u64) -> u64 {
    record
        .iter()
        .filter(|(b, st)| st.last > 0 && chunks.contains(&(*b * BLOCK as u64 / cs)))
        .count() as u64
        * BLOCK as u64
}

/// The fault-injection suite: a 4-worker iSCSI workload against a 3-manager, 4-storage,
/// 2-gateway cluster (each process in its own network namespace, each storage daemon on its
/// own ext4 loop disk) while faults are injected one at a time; then redundancy, read-back
/// and replica checks, and a report. Short form: each fault kind twice (under 2 minutes).
#[test]
fn cluster_fault_suite() {
    let _serial = cluster::serial();
    let seed = seed();
    let long = long_form();
    println!(
        "seed {seed} (IRONSAN_FAULT_SEED={seed} replays the fault sequence), {} form",
        if long.is_some() { "long" } else { "short" }
    );
    let cfg = ClusterConfig::new("faults", 3, 4, 2)
        .netns(true)
        .disks(1 << 30);
    let h = Harness::start(cfg, 128, 4, seed);
    let chunk_size = 4 * MIB;
    // Every block written once first: every chunk holds data, as a rebuild should copy.
    let t = Instant::now();
    let record = workload::prefill(
        &h.portals,
        &h.wcfg.session(98),
        h.wcfg.blocks,
        h.wcfg.workers,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", h.c.log_tails(20)));
    println!("prefilled {} blocks in {:.1?}", record.len(), t.elapsed());
    let wl = Workload::start_from(&h.wcfg, &h.portals, record);
    assert!(
        wl.wait_progress(300, Duration::from_secs(60)),
        "no progress through the gateway: {:?}\n{}",
        wl.counts(),
        h.c.log_tails(20)
    );
    let mut s = Suite {
        h,
        wl,
        rng: Rng::new(seed ^ 0xfa17),
        started: Instant::now(),
        long: long.is_some(),
        holder: 1,
        faults: Vec::new(),
    };
    let kinds = Fault::selected();
    let plan: Vec<Fault> = match long {
        None => {
            // Two rounds: every kind in order, then every kind again in a shuffled order (so
            // each also meets a cluster shaped by different earlier faults).
            let mut second = kinds.clone();
            for i in (1..second.len()).rev() {
                let j = s.rng.below(i as u64 + 1) as usize;
                second.swap(i, j);
            }
            kinds.iter().copied().chain(second).collect()
        }
        Some(n) => {
            // Every kind once first, then at random.
            let mut p = kinds.clone();
            while p.len() < n {
                p.push(kinds[s.rng.below(kinds.len() as u64) as usize]);
            }
            p.truncate(n.max(1));
            p
        }
    };
    for kind in plan {
        s.inject(kind);
        if s.wl.finished() {
            break;
        }
    }
    let Suite {
        mut h, wl, faults, ..
    } = s;
    let mut out = wl.stop();
    check_outcome(&out);

    // Redundancy once the workload stops, then a rebuild timed on its own: a storage daemon
    // killed for good, until its chunks have new replicas elsewhere.
    let settled =
        h.c.wait_full_redundancy(Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("{e}\n{}", h.c.log_tails(30)));
    let counts = h.c.replica_counts(VOL);
    let (victim_id, _) = counts
        .iter()
        .max_by_key(|(_, &n)| n)
        .expect("storage nodes");
    let victim_id = victim_id.clone();
    let victim: u32 = victim_id[1..].parse().expect("storage ids are sN");
    let client = h.c.client();
    let map =
        h.c.block_on(client.get_chunks(GetChunksRequest {
            volume: Some(VolumeRef {
                id: 0,
                name: VOL.into(),
            }),
            first: 0,
            count: 0,
        }))
        .expect("chunk map");
    let on_victim: BTreeSet<u64> = map
        .chunks
        .iter()
        .filter(|c| c.replicas.contains(&victim_id))
        .map(|c| c.index)
        .collect();
    let victim_bytes = written_bytes_in(&out.record, &on_victim, chunk_size);
    h.c.kill(Node::Storage(victim));
    let detected =
        h.c.wait_degraded(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("storage-{victim} killed: {e}"));
    let mut rebuild =
        h.c.wait_redundancy(Duration::from_secs(300))
            .unwrap_or_else(|e| {
                panic!(
                    "rebuild after storage-{victim} died: {e}\n{}",
                    h.c.log_tails(30)
                )
            });
    rebuild.total += detected;
    rebuild.tasks_seen = rebuild.tasks_seen.map(|t| t + detected);
    h.c.start_node(Node::Storage(victim));
    h.c.wait_full_redundancy(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("after storage-{victim} came back: {e}"));

    let report = h.verify(&mut out);
    let replicas = h.compare();

    // The report.
    let written: u64 = out.record.values().filter(|st| st.last > 0).count() as u64 * BLOCK as u64;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let mut by_kind = BTreeMap::<&str, u32>::new();
    for f in &faults {
        *by_kind.entry(f.kind.name()).or_default() += 1;
    }
    let worst = faults.iter().max_by_key(|f| f.redundancy);
    let lost = report.lost_writes()
        + out
            .violations
            .iter()
            .filter(|(v, _)| v.is_lost_write())
            .count();
    println!(
        "\n=== fault-injection report (seed {seed}, {} faults, {:.0?}) ===",
        faults.len(),
        out.elapsed
    );
    println!(
        "operations acknowledged: {} writes ({} blocks, {:.1} MiB), {} verifying reads; failed: {} writes, {} reads; {} sessions",
        out.stats.writes_acked,
        out.stats.blocks_acked,
        (out.stats.blocks_acked * BLOCK as u64) as f64 / MIB as f64,
        out.stats.reads_ok,
        out.stats.writes_failed,
        out.stats.reads_failed,
        out.stats.sessions
    );
    println!("initiator errors by kind: {:?}", out.stats.errors);
    for (kind, samples) in &out.stats.error_samples {
        for e in samples {
            println!("  {kind}: {e}");
        }
    }
    let hard: u64 = out
        .stats
        .errors
        .iter()
        .filter(|(k, _)| k.as_str() == "check-condition/0x3" || k.as_str() == "check-condition/0x4")
        .map(|(_, n)| n)
        .sum();
    println!(
        "hard errors (MEDIUM/HARDWARE ERROR) seen by initiators: {hard} (Linux fails these without \
         retrying; NOT READY and lost connections are retried)"
    );
    println!("faults injected by kind: {by_kind:?}");
    for f in &faults {
        println!(
            "  #{:<3} {:>6.1}s {:<30} {:<10} held {:>5.1?} resumed {:>5.1?} redundancy {:>5.1?} {}",
            f.n,
            f.at.as_secs_f64(),
            f.kind.name(),
            f.target,
            f.held,
            f.resumed,
            f.redundancy,
            f.note
        );
    }
    println!(
        "longest stall of a worker: {:.1?} (starting during {:?})",
        out.stats.longest_stall.0, out.stats.longest_stall.1
    );
    println!(
        "in-doubt writes found landed: {} during the run, {} at read-back",
        out.stats.in_doubt_landed, report.in_doubt_landed
    );
    println!("acknowledged writes lost: {lost}");
    println!(
        "blocks differing between replicas: {} ({} chunks, {} replicas read, {:.0} MiB compared, {} chunks never written)",
        replicas.differing_blocks,
        replicas.chunks,
        replicas.replicas_read,
        replicas.bytes_compared as f64 / MIB as f64,
        replicas.chunks_unwritten
    );
    if let Some(w) = worst {
        println!(
            "redundancy after each fault: longest {:.1?} (#{} {})",
            w.redundancy,
            w.n,
            w.kind.name()
        );
    }
    println!(
        "full redundancy after the workload stopped: {settled:.1?}; written data {:.1} MiB",
        written as f64 / MIB as f64
    );
    let copying = rebuild.total - rebuild.tasks_seen.unwrap_or_default();
    println!(
        "rebuild: storage-{victim} killed holding {:.1} MiB of written data in {} chunks; full redundancy after {:.1?} \
         (degraded after {detected:.1?}; recovery tasks after {:.1?} (node timeout {} + recovery grace {}), then {copying:.1?} copying) \
         = {:.0} s per GiB of written data end to end, {:.0} s per GiB copying",
        victim_bytes as f64 / MIB as f64,
        on_victim.len(),
        rebuild.total,
        rebuild.tasks_seen.unwrap_or_default(),
        h.c.cfg.node_timeout,
        h.c.cfg.recovery_grace,
        rebuild.total.as_secs_f64() / gib(victim_bytes).max(f64::MIN_POSITIVE),
        copying.as_secs_f64() / gib(victim_bytes).max(f64::MIN_POSITIVE)
    );
    println!(
        "final read-back of {} blocks took {:.1?}",
        report.blocks, report.elapsed
    );

    check_final(&report, &replicas);
    assert_eq!(lost, 0, "acknowledged writes lost");
    let injected: BTreeSet<Fault> = faults.iter().map(|f| f.kind).collect();
    let wanted: BTreeSet<Fault> = kinds.into_iter().collect();
    assert_eq!(injected, wanted, "not every fault kind was injected");
    assert!(out.stats.writes_acked > 1000, "{:?}", out.stats);
}
