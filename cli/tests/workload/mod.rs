//! A self-checking block workload over real iSCSI sessions (libiscsi), with a recorder that
//! knows, for every 4 KiB block, which contents a read may legitimately return.
//!
//! - **Blocks** carry a header (magic, block number, generation, worker), pseudo-random fill
//!   derived from (block, generation) and a CRC32C, so one read tells exactly which write it
//!   holds, or that it holds garbage or another block's data ([`encode`], [`decode`]).
//! - **Ownership**: worker `w` of `K` owns the 16-block stripes `s` with `s % K == w`; stripes
//!   start 8 blocks off the 64 KiB grid, so some straddle every chunk boundary and multi-block
//!   writes cross chunks. No two workers ever write one block, so each worker's record is exact
//!   without locks.
//! - **Record** ([`BlockState`]): the last acknowledged generation and the generations written
//!   since without an answer (errors, timeouts, lost connections): those *may* have landed. A
//!   read must return the newest acknowledged generation or one of those in-doubt ones, and once
//!   an in-doubt generation has been seen it must not disappear again (DESIGN.md invariant 3).
//!   Anything else is a [`Violation`]; an acknowledged generation replaced by an older one is a
//!   lost write (invariant 1).
//! - **Workers** ([`Workload`]) each own one session, mix writes and verifying reads, and on an
//!   error reconnect with backoff to whichever portal of the shared [`Portals`] list now
//!   serves the volume. A worker that sees no successful I/O for `unavailable_limit` stops
//!   with a fatal error, so a test never waits forever on a dead volume.
//! - [`verify_volume`] reads the whole volume back and checks every block against the record.
#![allow(dead_code)]

#[path = "../support/libiscsi.rs"]
pub mod libiscsi;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ironsan_common::crc::crc32c;
use libiscsi::{IscsiError, Sense, Session, SessionConfig};

/// The unit of ownership and checking.
pub const BLOCK: usize = 4096;
const MAGIC: u64 = u64::from_le_bytes(*b"IRSNFLT1");
const HEADER: usize = 32;
const STRIPE: u64 = 16;
/// Stripes start this many blocks before each 64 KiB boundary (see the module doc).
const STRIPE_OFFSET: u64 = 8;
/// Errors of each kind kept in full per worker.
const ERROR_SAMPLES: usize = 3;
/// Blocks per READ in [`verify_volume`] (256 KiB).
const VERIFY_BATCH: u64 = 64;

// ------------------------------------------------------------------------------------------
// Block contents

/// A small deterministic generator (xorshift64*), so runs are reproducible from a seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(splitmix(seed) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// True with probability `pct`/100.
    pub fn percent(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Writes generation `gen` of `block` (by `worker`) into `out` (exactly [`BLOCK`] bytes).
pub fn encode_into(out: &mut [u8], block: u64, gen: u64, worker: u32) {
    assert_eq!(out.len(), BLOCK, "encode_into needs one block");
    out[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    out[8..16].copy_from_slice(&block.to_le_bytes());
    out[16..24].copy_from_slice(&gen.to_le_bytes());
    out[24..28].copy_from_slice(&worker.to_le_bytes());
    out[28..32].fill(0);
    let mut rng = Rng::new(block.rotate_left(32) ^ gen ^ 0x5eed_f00d);
    for piece in out[HEADER..BLOCK - 4].chunks_mut(8) {
        let v = rng.next_u64().to_le_bytes();
        piece.copy_from_slice(&v[..piece.len()]);
    }
    let crc = crc32c(&out[..BLOCK - 4]);
    out[BLOCK - 4..].copy_from_slice(&crc.to_le_bytes());
}

pub fn encode(block: u64, gen: u64, worker: u32) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK];
    encode_into(&mut v, block, gen, worker);
    v
}

/// What one block read back holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// Never written (thin volumes read zeroes): generation 0.
    Zero,
    Written {
        block: u64,
        gen: u64,
        worker: u32,
    },
    /// Not a block this workload writes, or a damaged one.
    Garbage(String),
}

pub fn decode(buf: &[u8]) -> Content {
    if buf.len() != BLOCK {
        return Content::Garbage(format!("{} bytes, not {BLOCK}", buf.len()));
    }
    if buf.iter().all(|&b| b == 0) {
        return Content::Zero;
    }
    let u64_at = |o: usize| u64::from_le_bytes(buf[o..o + 8].try_into().expect("8 bytes"));
    if u64_at(0) != MAGIC {
        return Content::Garbage(format!("bad magic {:#018x}", u64_at(0)));
    }
    let stored = u32::from_le_bytes(buf[BLOCK - 4..].try_into().expect("4 bytes"));
    let crc = crc32c(&buf[..BLOCK - 4]);
    let (block, gen) = (u64_at(8), u64_at(16));
    let worker = u32::from_le_bytes(buf[24..28].try_into().expect("4 bytes"));
    if stored != crc {
        return Content::Garbage(format!(
            "CRC32C {crc:#010x} != stored {stored:#010x} (header says block {block} gen {gen})"
        ));
    }
    // A valid CRC over wrong fill would mean a bug in this file, but costs nothing to rule out.
    let mut expect = [0u8; BLOCK];
    encode_into(&mut expect, block, gen, worker);
    if expect[..] != buf[..] {
        return Content::Garbage(format!("fill of block {block} gen {gen} is wrong"));
    }
    Content::Written { block, gen, worker }
}

// ------------------------------------------------------------------------------------------
// The record

/// What the workload knows about one block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockState {
    /// Newest generation acknowledged (0: none).
    pub acked: u64,
    /// The generation a read must return unless an in-doubt one landed: `acked`, or a newer
    /// in-doubt generation that a read has already seen.
    pub floor: u64,
    /// Newest generation ever attempted.
    pub last: u64,
    /// Generations newer than `floor` written without an answer.
    pub in_doubt: BTreeSet<u64>,
}

/// A read that contradicts the record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Older than the acknowledged generation: an acknowledged write is gone.
    Lost { block: u64, acked: u64, got: u64 },
    /// Older than an in-doubt generation a read already returned: replicas disagree.
    Flip { block: u64, seen: u64, got: u64 },
    /// A generation that was never written to this block.
    Phantom { block: u64, last: u64, got: u64 },
    /// Garbage, a failed CRC, or another block's data.
    Corrupt { block: u64, why: String },
}

impl Violation {
    pub fn block(&self) -> u64 {
        match self {
            Violation::Lost { block, .. }
            | Violation::Flip { block, .. }
            | Violation::Phantom { block, .. }
            | Violation::Corrupt { block, .. } => *block,
        }
    }
    /// Counts as an acknowledged write lost (the suite's headline figure).
    pub fn is_lost_write(&self) -> bool {
        matches!(self, Violation::Lost { .. } | Violation::Corrupt { .. })
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Lost { block, acked, got } => write!(
                f,
                "LOST WRITE: block {block} (byte {}) holds generation {got}, but generation {acked} was acknowledged",
                block * BLOCK as u64
            ),
            Violation::Flip { block, seen, got } => write!(
                f,
                "NOT CONVERGED: block {block} (byte {}) returned in-doubt generation {seen} earlier, now {got}",
                block * BLOCK as u64
            ),
            Violation::Phantom { block, last, got } => write!(
                f,
                "PHANTOM: block {block} holds generation {got}, but only up to {last} were written"
            ),
            Violation::Corrupt { block, why } => write!(
                f,
                "CORRUPT: block {block} (byte {}): {why}",
                block * BLOCK as u64
            ),
        }
    }
}

/// What a successful check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// The expected generation.
    Expected,
    /// An in-doubt write that turned out to have landed (now the floor).
    InDoubtLanded,
}

impl BlockState {
    /// A new write is about to be sent: its generation.
    pub fn begin_write(&mut self) -> u64 {
        self.last += 1;
        self.last
    }

    pub fn write_acked(&mut self, gen: u64) {
        debug_assert!(gen > self.floor);
        self.acked = gen;
        self.floor = gen;
        // Anything older that was in doubt must never show up again.
        self.in_doubt.clear();
    }

    pub fn write_failed(&mut self, gen: u64) {
        self.in_doubt.insert(gen);
    }

    /// Checks what a read returned and advances the record.
    pub fn check(&mut self, block: u64, content: &Content) -> Result<Seen, Violation> {
        let got = match content {
            Content::Zero => 0,
            Content::Written { block: b, gen, .. } if *b == block => *gen,
            Content::Written { block: b, gen, .. } => {
                return Err(Violation::Corrupt {
                    block,
                    why: format!("holds block {b}'s data (generation {gen})"),
                })
            }
            Content::Garbage(why) => {
                return Err(Violation::Corrupt {
                    block,
                    why: why.clone(),
                })
            }
        };
        if got == self.floor {
            return Ok(Seen::Expected);
        }
        if self.in_doubt.contains(&got) {
            self.floor = got;
            self.in_doubt.retain(|&g| g > got);
            return Ok(Seen::InDoubtLanded);
        }
        Err(if got > self.last {
            Violation::Phantom {
                block,
                last: self.last,
                got,
            }
        } else if got < self.acked {
            Violation::Lost {
                block,
                acked: self.acked,
                got,
            }
        } else {
            Violation::Flip {
                block,
                seen: self.floor,
                got,
            }
        })
    }
}

/// Every block's state (blocks absent were never written).
pub type Record = HashMap<u64, BlockState>;

/// Which worker owns `block` (of `workers`).
pub fn owner(block: u64, workers: u32) -> u32 {
    (((block + STRIPE_OFFSET) / STRIPE) % u64::from(workers)) as u32
}

/// The last block of `block`'s stripe, exclusive.
fn stripe_end(block: u64) -> u64 {
    ((block + STRIPE_OFFSET) / STRIPE + 1) * STRIPE - STRIPE_OFFSET
}

/// The time of day in UTC (`HH:MM:SS.mmm`), to find an error in the daemons' logs.
pub fn utc_now() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let (s, ms) = (t.as_secs() % 86_400, t.subsec_millis());
    format!("{:02}:{:02}:{:02}.{ms:03}Z", s / 3600, s / 60 % 60, s % 60)
}

// ------------------------------------------------------------------------------------------
// Portals

/// The portals a worker may find the volume at, the preferred one first; the test updates it
/// when the volume moves (takeover, restart on another port).
#[derive(Clone, Default)]
pub struct Portals(Arc<RwLock<Vec<String>>>);

impl Portals {
    pub fn new(list: Vec<String>) -> Portals {
        Portals(Arc::new(RwLock::new(list)))
    }
    pub fn set(&self, list: Vec<String>) {
        *self.0.write().expect("portals lock") = list;
    }
    pub fn get(&self) -> Vec<String> {
        self.0.read().expect("portals lock").clone()
    }
}

/// Logs in to the first portal that serves the target.
pub fn connect_any(portals: &Portals, cfg: &SessionConfig) -> Result<Session, String> {
    let list = portals.get();
    if list.is_empty() {
        return Err("no portal known".into());
    }
    let mut errors = Vec::new();
    for p in &list {
        match Session::connect(p, cfg) {
            Ok(s) => return Ok(s),
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(errors.join("; "))
}

// ------------------------------------------------------------------------------------------
// Workers

#[derive(Clone, Debug)]
pub struct WorkloadConfig {
    /// Target IQN of the volume.
    pub target: String,
    pub lun: u32,
    /// Blocks of the volume the workload uses: `0..blocks`.
    pub blocks: u64,
    pub workers: u32,
    /// Share of operations that are writes (the rest are verifying reads).
    pub write_pct: u64,
    /// Largest write in blocks (within one stripe; most writes are one block).
    pub max_write_blocks: u64,
    pub seed: u64,
    /// Bound on each login and command.
    pub op_timeout: Duration,
    /// A worker without one successful operation for this long fails the run.
    pub unavailable_limit: Duration,
    pub header_digest: bool,
    /// Distinguishes the initiator names of concurrent test processes.
    pub tag: String,
}

impl WorkloadConfig {
    pub fn new(target: &str, volume_bytes: u64) -> WorkloadConfig {
        WorkloadConfig {
            target: target.to_string(),
            lun: 0,
            blocks: volume_bytes / BLOCK as u64,
            workers: 4,
            write_pct: 80,
            max_write_blocks: 4,
            seed: 1,
            op_timeout: Duration::from_secs(15),
            unavailable_limit: Duration::from_secs(60),
            header_digest: false,
            tag: format!("p{}", std::process::id()),
        }
    }

    /// The session config of worker `w` (fixed initiator name and ISID: reinstatement).
    pub fn session(&self, w: u32) -> SessionConfig {
        SessionConfig {
            initiator: format!("iqn.2026-11.io.ironsan.test:faults-{}-w{w}", self.tag),
            isid: w + 1,
            target: self.target.clone(),
            lun: self.lun,
            header_digest: self.header_digest || w % 2 == 1,
            timeout: self.op_timeout,
        }
    }
}

/// Counters of one worker (merged for the report).
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub writes_acked: u64,
    pub writes_failed: u64,
    pub blocks_acked: u64,
    pub reads_ok: u64,
    pub reads_failed: u64,
    pub sessions: u64,
    pub connect_failures: u64,
    pub in_doubt_landed: u64,
    /// Errors by kind (`connection`, `check-condition/0x2`, ...).
    pub errors: BTreeMap<String, u64>,
    /// The first few errors of each kind in full, with the phase they happened in.
    pub error_samples: BTreeMap<String, Vec<String>>,
    /// The longest time without a successful operation, and the fault label at its start.
    pub longest_stall: (Duration, String),
}

impl Stats {
    pub fn merge(&mut self, o: &Stats) {
        self.writes_acked += o.writes_acked;
        self.writes_failed += o.writes_failed;
        self.blocks_acked += o.blocks_acked;
        self.reads_ok += o.reads_ok;
        self.reads_failed += o.reads_failed;
        self.sessions += o.sessions;
        self.connect_failures += o.connect_failures;
        self.in_doubt_landed += o.in_doubt_landed;
        for (k, v) in &o.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.error_samples {
            let mine = self.error_samples.entry(k.clone()).or_default();
            mine.extend(
                v.iter()
                    .take(ERROR_SAMPLES.saturating_sub(mine.len()))
                    .cloned(),
            );
        }
        if o.longest_stall.0 > self.longest_stall.0 {
            self.longest_stall = o.longest_stall.clone();
        }
    }
}

/// Shared, live view of the workload for progress lines and for waiting on progress.
#[derive(Default)]
struct Live {
    ops: Mutex<u64>,
    cv: Condvar,
    writes: AtomicU64,
    reads: AtomicU64,
    errors: AtomicU64,
}

/// Where a worker ended up.
pub struct WorkerResult {
    pub worker: u32,
    pub record: Record,
    pub stats: Stats,
    pub violations: Vec<(Violation, String)>,
    pub fatal: Option<String>,
}

/// What the whole workload did.
pub struct Outcome {
    pub record: Record,
    pub stats: Stats,
    /// Violations seen by reads while the workload ran, with their context.
    pub violations: Vec<(Violation, String)>,
    /// Workers that gave up (volume unavailable too long), with why.
    pub fatal: Vec<String>,
    pub elapsed: Duration,
}

/// A running workload; [`Workload::stop`] ends it and returns the record.
pub struct Workload {
    stop: Arc<AtomicBool>,
    live: Arc<Live>,
    threads: Vec<JoinHandle<WorkerResult>>,
    started: Instant,
    /// A label for what is being done to the cluster right now (for stall attribution).
    pub phase: Arc<Mutex<String>>,
}

impl Workload {
    pub fn start(cfg: &WorkloadConfig, portals: &Portals) -> Workload {
        Workload::start_from(cfg, portals, Record::new())
    }

    /// Starts from an existing record (e.g. [`prefill`]'s): each worker takes its blocks.
    pub fn start_from(cfg: &WorkloadConfig, portals: &Portals, mut record: Record) -> Workload {
        assert!(cfg.workers > 0 && cfg.blocks >= u64::from(cfg.workers) * STRIPE);
        let mut parts: Vec<Record> = (0..cfg.workers).map(|_| Record::new()).collect();
        for (b, st) in record.drain() {
            parts[owner(b, cfg.workers) as usize].insert(b, st);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let live = Arc::new(Live::default());
        let phase = Arc::new(Mutex::new("steady".to_string()));
        let threads = (0..cfg.workers)
            .zip(parts)
            .map(|(w, part)| {
                let (cfg, portals) = (cfg.clone(), portals.clone());
                let (stop, live, phase) = (stop.clone(), live.clone(), phase.clone());
                std::thread::Builder::new()
                    .name(format!("worker-{w}"))
                    .spawn(move || Worker::new(w, cfg, portals, stop, live, phase, part).run())
                    .expect("spawn worker thread")
            })
            .collect();
        Workload {
            stop,
            live,
            threads,
            started: Instant::now(),
            phase,
        }
    }

    pub fn set_phase(&self, label: &str) {
        *self.phase.lock().expect("phase lock") = label.to_string();
    }

    /// (acknowledged writes, successful reads, errors) so far.
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.live.writes.load(Ordering::Relaxed),
            self.live.reads.load(Ordering::Relaxed),
            self.live.errors.load(Ordering::Relaxed),
        )
    }

    /// Waits until `n` more operations succeeded (true), or `within` passed (false).
    pub fn wait_progress(&self, n: u64, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut ops = self.live.ops.lock().expect("ops lock");
        let target = *ops + n;
        while *ops < target {
            let now = Instant::now();
            if now >= deadline || self.finished() {
                return false;
            }
            ops = self
                .live
                .cv
                .wait_timeout(ops, deadline - now)
                .expect("ops lock")
                .0;
        }
        true
    }

    /// True once any worker has stopped (a fatal error).
    pub fn finished(&self) -> bool {
        self.threads.iter().any(|t| t.is_finished())
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn stop(mut self) -> Outcome {
        self.finish()
    }

    /// Stops the workers and collects their results (the workload is spent afterwards).
    pub fn finish(&mut self) -> Outcome {
        self.stop.store(true, Ordering::SeqCst);
        let mut out = Outcome {
            record: Record::new(),
            stats: Stats::default(),
            violations: Vec::new(),
            fatal: Vec::new(),
            elapsed: self.started.elapsed(),
        };
        for t in std::mem::take(&mut self.threads) {
            let r = t.join().expect("a worker thread panicked");
            out.record.extend(r.record);
            out.stats.merge(&r.stats);
            out.violations.extend(r.violations);
            if let Some(f) = r.fatal {
                out.fatal.push(format!("worker {}: {f}", r.worker));
            }
        }
        out
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        // A test that panics mid-run leaves the workers to stop on their own.
        self.stop.store(true, Ordering::SeqCst);
    }
}

struct Worker {
    id: u32,
    cfg: WorkloadConfig,
    portals: Portals,
    stop: Arc<AtomicBool>,
    live: Arc<Live>,
    phase: Arc<Mutex<String>>,
    rng: Rng,
    record: Record,
    /// Blocks this worker wrote at least once (for choosing reads).
    written: Vec<u64>,
    stats: Stats,
    violations: Vec<(Violation, String)>,
    buf: Vec<u8>,
}

impl Worker {
    fn new(
        id: u32,
        cfg: WorkloadConfig,
        portals: Portals,
        stop: Arc<AtomicBool>,
        live: Arc<Live>,
        phase: Arc<Mutex<String>>,
        record: Record,
    ) -> Worker {
        let rng = Rng::new(cfg.seed ^ (u64::from(id) << 48));
        let mut written: Vec<u64> = record
            .iter()
            .filter(|(_, st)| st.last > 0)
            .map(|(&b, _)| b)
            .collect();
        written.sort_unstable();
        Worker {
            id,
            cfg,
            portals,
            stop,
            live,
            phase,
            rng,
            record,
            written,
            stats: Stats::default(),
            violations: Vec::new(),
            buf: vec![0u8; BLOCK * STRIPE as usize],
        }
    }

    fn phase(&self) -> String {
        self.phase.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// A random block this worker owns.
    fn pick_block(&mut self) -> u64 {
        let stripes = self.cfg.blocks.div_ceil(STRIPE) + 1;
        loop {
            let s = self.rng.below(stripes);
            let b = (s * STRIPE + self.rng.below(STRIPE)).saturating_sub(STRIPE_OFFSET);
            if b < self.cfg.blocks && owner(b, self.cfg.workers) == self.id {
                return b;
            }
        }
    }

    fn note_ok(&mut self, last_ok: &mut Instant, stall_phase: &mut String) {
        let gap = last_ok.elapsed();
        if gap > self.stats.longest_stall.0 {
            self.stats.longest_stall = (gap, stall_phase.clone());
        }
        *last_ok = Instant::now();
        *stall_phase = self.phase();
        let mut ops = self.live.ops.lock().expect("ops lock");
        *ops += 1;
        self.live.cv.notify_all();
    }

    fn note_err(&mut self, e: &IscsiError, portal: &str) {
        *self.stats.errors.entry(e.kind()).or_default() += 1;
        let line = format!(
            "{} worker {} via {portal} during {:?}: {e}",
            utc_now(),
            self.id,
            self.phase()
        );
        let samples = self.stats.error_samples.entry(e.kind()).or_default();
        if samples.len() < ERROR_SAMPLES {
            samples.push(line);
        }
        self.live.errors.fetch_add(1, Ordering::Relaxed);
    }

    fn run(mut self) -> WorkerResult {
        let scfg = self.cfg.session(self.id);
        let mut session: Option<Session> = None;
        let mut last_ok = Instant::now();
        let mut stall_phase = self.phase();
        let mut backoff = Duration::from_millis(20);
        let mut last_error = String::new();
        let mut fatal = None;
        while !self.stop.load(Ordering::Relaxed) {
            if last_ok.elapsed() > self.cfg.unavailable_limit {
                fatal = Some(format!(
                    "no successful I/O for {:?} (phase {:?}); last error: {last_error}",
                    self.cfg.unavailable_limit,
                    self.phase()
                ));
                break;
            }
            let Some(s) = session.as_mut() else {
                match connect_any(&self.portals, &scfg) {
                    Ok(s) => {
                        self.stats.sessions += 1;
                        session = Some(s);
                        backoff = Duration::from_millis(20);
                    }
                    Err(e) => {
                        self.stats.connect_failures += 1;
                        last_error = format!("connect: {e}");
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_millis(500));
                    }
                }
                continue;
            };
            let result = if self.written.is_empty() || self.rng.percent(self.cfg.write_pct) {
                self.write_op(s)
            } else {
                self.read_op(s)
            };
            match result {
                Ok(()) => {
                    self.note_ok(&mut last_ok, &mut stall_phase);
                    backoff = Duration::from_millis(20);
                }
                Err(e) => {
                    self.note_err(&e, s.portal());
                    last_error = format!("{} via {}: {e}", self.phase(), s.portal());
                    // NOT READY: this gateway does not serve the volume (any more); other
                    // errors that do not break the session are retried on it after a pause.
                    if e.breaks_session() || e.sense_key() == Some(Sense::NOT_READY) {
                        session = None;
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
            }
        }
        if let Some(s) = session {
            s.logout();
        }
        WorkerResult {
            worker: self.id,
            record: self.record,
            stats: self.stats,
            violations: self.violations,
            fatal,
        }
    }

    fn write_op(&mut self, s: &mut Session) -> Result<(), IscsiError> {
        let first = self.pick_block();
        let room = stripe_end(first).min(self.cfg.blocks) - first;
        let n = if self.rng.percent(75) {
            1
        } else {
            1 + self.rng.below(self.cfg.max_write_blocks.min(room).max(1))
        };
        let mut gens = Vec::with_capacity(n as usize);
        for (i, b) in (first..first + n).enumerate() {
            let st = self.record.entry(b).or_default();
            if st.last == 0 {
                self.written.push(b);
            }
            let g = st.begin_write();
            gens.push(g);
            encode_into(&mut self.buf[i * BLOCK..(i + 1) * BLOCK], b, g, self.id);
        }
        let fua = self.rng.percent(10);
        let r = s.write(first * BLOCK as u64, &self.buf[..n as usize * BLOCK], fua);
        for (b, g) in (first..first + n).zip(gens) {
            let st = self.record.get_mut(&b).expect("recorded above");
            match r {
                Ok(()) => st.write_acked(g),
                Err(_) => st.write_failed(g),
            }
        }
        match r {
            Ok(()) => {
                self.stats.writes_acked += 1;
                self.stats.blocks_acked += n;
                self.live.writes.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => self.stats.writes_failed += 1,
        }
        r
    }

    fn read_op(&mut self, s: &mut Session) -> Result<(), IscsiError> {
        let b = self.written[self.rng.below(self.written.len() as u64) as usize];
        let buf = &mut self.buf[..BLOCK];
        if let Err(e) = s.read(b * BLOCK as u64, buf) {
            self.stats.reads_failed += 1;
            return Err(e);
        }
        let content = decode(buf);
        let st = self
            .record
            .get_mut(&b)
            .expect("written blocks are recorded");
        match st.check(b, &content) {
            Ok(Seen::Expected) => {}
            Ok(Seen::InDoubtLanded) => self.stats.in_doubt_landed += 1,
            Err(v) => {
                let ctx = format!(
                    "worker {} read via {} during {:?}",
                    self.id,
                    s.portal(),
                    self.phase()
                );
                self.violations.push((v, ctx));
            }
        }
        self.stats.reads_ok += 1;
        self.live.reads.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Writes generation 1 of every block `0..blocks` (each as its owner among `workers` would)
/// in 256 KiB commands, so every chunk holds data; returns the record to start workers from.
pub fn prefill(
    portals: &Portals,
    cfg: &SessionConfig,
    blocks: u64,
    workers: u32,
) -> Result<Record, String> {
    let mut s = connect_any(portals, cfg)?;
    let mut record = Record::new();
    let mut buf = vec![0u8; BLOCK * VERIFY_BATCH as usize];
    let mut next = 0;
    while next < blocks {
        let n = VERIFY_BATCH.min(blocks - next);
        for i in 0..n {
            let b = next + i;
            let at = i as usize * BLOCK;
            encode_into(&mut buf[at..at + BLOCK], b, 1, owner(b, workers));
        }
        s.write(next * BLOCK as u64, &buf[..n as usize * BLOCK], false)
            .map_err(|e| format!("prefill at block {next}: {e}"))?;
        for b in next..next + n {
            let st: &mut BlockState = record.entry(b).or_default();
            let g = st.begin_write();
            st.write_acked(g);
        }
        next += n;
    }
    s.flush().map_err(|e| format!("prefill flush: {e}"))?;
    s.logout();
    Ok(record)
}

// ------------------------------------------------------------------------------------------
// Final verification

/// The result of reading a whole volume back.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub blocks: u64,
    pub written_blocks: u64,
    pub in_doubt_landed: u64,
    pub violations: Vec<Violation>,
    pub elapsed: Duration,
}

impl VerifyReport {
    pub fn lost_writes(&self) -> usize {
        self.violations.iter().filter(|v| v.is_lost_write()).count()
    }
}

/// Reads blocks `0..blocks` through `portals` and checks each against `record` (advancing it:
/// in-doubt generations seen become the floor). Retries on errors for up to `within`.
pub fn verify_volume(
    portals: &Portals,
    cfg: &SessionConfig,
    record: &mut Record,
    blocks: u64,
    within: Duration,
) -> Result<VerifyReport, String> {
    let started = Instant::now();
    let deadline = started + within;
    let mut report = VerifyReport {
        blocks,
        ..Default::default()
    };
    let mut session: Option<Session> = None;
    let mut buf = vec![0u8; BLOCK * VERIFY_BATCH as usize];
    let mut next = 0u64;
    let mut last_error = String::new();
    while next < blocks {
        if Instant::now() > deadline {
            return Err(format!(
                "read-back stopped at block {next} of {blocks} after {within:?}: {last_error}"
            ));
        }
        let s = match session.as_mut() {
            Some(s) => s,
            None => match connect_any(portals, cfg) {
                Ok(s) => session.insert(s),
                Err(e) => {
                    last_error = e;
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            },
        };
        let n = VERIFY_BATCH.min(blocks - next);
        let part = &mut buf[..n as usize * BLOCK];
        if let Err(e) = s.read(next * BLOCK as u64, part) {
            last_error = e.to_string();
            if e.breaks_session() || e.sense_key() == Some(Sense::NOT_READY) {
                session = None;
            }
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        for (i, one) in part.chunks(BLOCK).enumerate() {
            let b = next + i as u64;
            let content = decode(one);
            let st = record.entry(b).or_default();
            if st.last > 0 {
                report.written_blocks += 1;
            }
            match st.check(b, &content) {
                Ok(Seen::Expected) => {}
                Ok(Seen::InDoubtLanded) => report.in_doubt_landed += 1,
                Err(v) => report.violations.push(v),
            }
        }
        next += n;
    }
    if let Some(s) = session {
        s.logout();
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_and_damage_is_caught() {
        let b = encode(1234, 7, 3);
        assert_eq!(
            decode(&b),
            Content::Written {
                block: 1234,
                gen: 7,
                worker: 3
            }
        );
        assert_ne!(encode(1234, 8, 3), b, "generations differ in content");
        assert_eq!(decode(&[0u8; BLOCK]), Content::Zero);
        let mut bad = b.clone();
        bad[100] ^= 1;
        assert!(matches!(decode(&bad), Content::Garbage(_)));
        let mut torn = b.clone();
        torn[2048..].copy_from_slice(&encode(1234, 8, 3)[2048..]);
        assert!(matches!(decode(&torn), Content::Garbage(_)), "torn block");
        assert!(matches!(decode(&b[..512]), Content::Garbage(_)));
    }

    #[test]
    fn record_accepts_exactly_the_legal_outcomes() {
        let w = |gen| Content::Written {
            block: 5,
            gen,
            worker: 0,
        };
        let mut st = BlockState::default();
        assert_eq!(st.check(5, &Content::Zero), Ok(Seen::Expected));
        let g1 = st.begin_write();
        st.write_acked(g1);
        assert_eq!(st.check(5, &w(1)), Ok(Seen::Expected));
        assert_eq!(
            st.check(5, &Content::Zero),
            Err(Violation::Lost {
                block: 5,
                acked: 1,
                got: 0
            })
        );
        // Two writes in doubt: either may show, or neither.
        let g2 = st.begin_write();
        st.write_failed(g2);
        let g3 = st.begin_write();
        st.write_failed(g3);
        assert_eq!(st.check(5, &w(1)), Ok(Seen::Expected));
        assert_eq!(st.check(5, &w(2)), Ok(Seen::InDoubtLanded));
        // Once 2 was seen, 1 must not come back; 3 still may.
        assert_eq!(
            st.check(5, &w(1)),
            Err(Violation::Flip {
                block: 5,
                seen: 2,
                got: 1
            })
        );
        assert_eq!(st.check(5, &w(3)), Ok(Seen::InDoubtLanded));
        assert!(matches!(st.check(5, &w(2)), Err(Violation::Flip { .. })));
        // An acknowledged write supersedes every in-doubt one.
        let g4 = st.begin_write();
        st.write_failed(g4);
        let g5 = st.begin_write();
        st.write_acked(g5);
        assert!(matches!(st.check(5, &w(4)), Err(Violation::Lost { .. })));
        assert_eq!(st.check(5, &w(5)), Ok(Seen::Expected));
        assert!(matches!(st.check(5, &w(9)), Err(Violation::Phantom { .. })));
        assert!(matches!(
            st.check(
                5,
                &Content::Written {
                    block: 6,
                    gen: 5,
                    worker: 0
                }
            ),
            Err(Violation::Corrupt { .. })
        ));
    }

    #[test]
    fn ownership_is_a_partition_in_stripes() {
        let workers = 4;
        let mut per = [0u64; 4];
        for b in 0..4096u64 {
            per[owner(b, workers) as usize] += 1;
            // A stripe's blocks share an owner, up to its end.
            let end = stripe_end(b);
            assert!(end > b && end - b <= STRIPE);
            assert_eq!(owner(end - 1, workers), owner(b, workers));
        }
        assert!(per.iter().all(|&n| n >= 900), "{per:?}");
        // Some stripe straddles each 1 MiB boundary (256 blocks).
        assert_eq!(owner(255, workers), owner(256, workers));
    }
}
