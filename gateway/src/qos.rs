//! Per-volume QoS: read/write IOPS and bandwidth limits, enforced on the command path before
//! the LUN (and so before any replica) sees the I/O.
//!
//! Each limit is a token bucket with a debt model. A command *reserves* its tokens at once (one
//! op, and its bytes) even if that drives the balance below zero, then waits until the refill
//! has paid its share back. So a command larger than the bucket still runs (after
//! `size / rate`), nothing ever deadlocks, and commands are released in arrival order. The
//! bucket holds at most `rate × burst` tokens, the burst an idle volume may spend at once.
//!
//! Accounting is exact integer arithmetic: tokens are counted in token-nanoseconds (`u128`), as
//! two running totals, `issued` (reserved so far) and `credited` (refilled so far, never more
//! than `issued + capacity`). A waiter holds the `issued` total its reservation reached and is
//! released when `credited` gets there. A live rate change first refills at the old rate up to
//! now, then wakes every waiter to recompute its deadline at the new rate, so raising a limit
//! (or clearing it) helps commands already waiting.
//!
//! One [`Qos`] per target; its lock is held only to do the arithmetic, never across an await,
//! and one volume's waiters never touch another volume's state.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use tokio::sync::Notify;

const NANOS: u128 = 1_000_000_000;

/// Tokio's clock, so that tests with paused time drive the buckets too.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// A volume's limits (0 = unlimited) and the burst, as the manager hands them out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub read_iops: u64,
    pub write_iops: u64,
    pub read_bps: u64,
    pub write_bps: u64,
    pub burst: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            read_iops: 0,
            write_iops: 0,
            read_bps: 0,
            write_bps: 0,
            burst: Duration::from_secs(1),
        }
    }
}

impl Limits {
    pub fn unlimited(&self) -> bool {
        self.read_iops | self.write_iops | self.read_bps | self.write_bps == 0
    }
}

/// One token bucket (see the module docs); `rate` 0 is unlimited.
#[derive(Debug)]
pub struct Bucket {
    rate: u64,
    /// Capacity in token-nanoseconds (`rate × burst`).
    capacity: u128,
    issued: u128,
    credited: u128,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: u64, burst: Duration, now: Instant) -> Self {
        let mut b = Bucket {
            rate: 0,
            capacity: 0,
            issued: 0,
            credited: 0,
            last: now,
        };
        b.set(rate, burst, now);
        b
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_nanos();
        self.last = self.last.max(now);
        if self.rate == 0 {
            return;
        }
        let cap = self.issued + self.capacity;
        self.credited = self
            .credited
            .saturating_add(dt.saturating_mul(self.rate as u128))
            .min(cap.max(self.credited));
    }

    /// Changes rate and burst, keeping any debt (now owed at the new rate). From unlimited to
    /// limited the bucket starts full.
    pub fn set(&mut self, rate: u64, burst: Duration, now: Instant) {
        self.refill(now);
        let capacity = (rate as u128).saturating_mul(burst.as_nanos());
        if self.rate == 0 {
            self.credited = self.issued + capacity;
        } else {
            self.credited = self.credited.min(self.issued + capacity);
        }
        self.rate = rate;
        self.capacity = capacity;
    }

    /// Reserves `tokens`; returns the `issued` total the caller waits for (`None`: unlimited).
    pub fn reserve(&mut self, tokens: u64, now: Instant) -> Option<u128> {
        if self.rate == 0 {
            return None;
        }
        self.refill(now);
        self.issued += tokens as u128 * NANOS;
        Some(self.issued)
    }

    /// How long from `now` until `position` is paid (zero: now).
    pub fn wait(&mut self, position: u128, now: Instant) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        self.refill(now);
        let owed = position.saturating_sub(self.credited);
        let nanos = owed.div_ceil(self.rate as u128);
        Duration::from_nanos(nanos.min(u64::MAX as u128) as u64)
    }
}

/// Which direction a command counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Read,
    Write,
}

struct Buckets {
    limits: Limits,
    read_iops: Bucket,
    write_iops: Bucket,
    read_bps: Bucket,
    write_bps: Bucket,
}

/// Per-volume handles, created once.
struct QosMetrics {
    throttled: [Counter; 2],
    wait: [Histogram; 2],
    limits: [Gauge; 4],
    burst: Gauge,
}

impl QosMetrics {
    fn new(volume: &str) -> Self {
        let v = || volume.to_string();
        let dir = |d: &'static str| {
            (
                counter!("ironsan_gateway_qos_throttled_total", "volume" => v(), "dir" => d),
                histogram!("ironsan_gateway_qos_wait_seconds", "volume" => v(), "dir" => d),
            )
        };
        let (tr, wr) = dir("read");
        let (tw, ww) = dir("write");
        let limit =
            |k: &'static str| gauge!("ironsan_gateway_qos_limit", "volume" => v(), "limit" => k);
        QosMetrics {
            throttled: [tr, tw],
            wait: [wr, ww],
            limits: [
                limit("read_iops"),
                limit("write_iops"),
                limit("read_bps"),
                limit("write_bps"),
            ],
            burst: gauge!("ironsan_gateway_qos_burst_seconds", "volume" => v()),
        }
    }
}

/// A volume's limits and buckets.
pub struct Qos {
    /// Any limit set: unlimited volumes (the common case) skip the lock entirely.
    limited: AtomicBool,
    buckets: Mutex<Buckets>,
    changed: Notify,
    metrics: QosMetrics,
}

impl Qos {
    /// Unlimited until [`Qos::set`].
    pub fn new(volume: &str) -> Self {
        let now = now();
        let l = Limits::default();
        let q = Qos {
            limited: AtomicBool::new(false),
            buckets: Mutex::new(Buckets {
                limits: l,
                read_iops: Bucket::new(0, l.burst, now),
                write_iops: Bucket::new(0, l.burst, now),
                read_bps: Bucket::new(0, l.burst, now),
                write_bps: Bucket::new(0, l.burst, now),
            }),
            changed: Notify::new(),
            metrics: QosMetrics::new(volume),
        };
        q.publish(&l);
        q
    }

    fn publish(&self, l: &Limits) {
        let m = &self.metrics;
        for (g, v) in m
            .limits
            .iter()
            .zip([l.read_iops, l.write_iops, l.read_bps, l.write_bps])
        {
            g.set(v as f64);
        }
        m.burst.set(l.burst.as_secs_f64());
    }

    pub fn limits(&self) -> Limits {
        self.lock().limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buckets> {
        // The arithmetic cannot leave the buckets inconsistent, so a poisoned lock is usable.
        self.buckets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies new limits live; returns whether they changed. Waiting commands recompute their
    /// deadlines at the new rates.
    pub fn set(&self, l: Limits) -> bool {
        {
            let mut b = self.lock();
            if b.limits == l {
                return false;
            }
            let now = now();
            b.read_iops.set(l.read_iops, l.burst, now);
            b.write_iops.set(l.write_iops, l.burst, now);
            b.read_bps.set(l.read_bps, l.burst, now);
            b.write_bps.set(l.write_bps, l.burst, now);
            b.limits = l;
            self.limited.store(!l.unlimited(), Ordering::Relaxed);
        }
        self.publish(&l);
        self.changed.notify_waiters();
        true
    }

    /// Waits until a command of `bytes` in direction `dir` may run.
    pub async fn admit(&self, dir: Dir, bytes: u64) {
        if !self.limited.load(Ordering::Relaxed) {
            return;
        }
        let start = now();
        let (ops_pos, bytes_pos) = {
            let mut b = self.lock();
            if b.limits.unlimited() {
                return;
            }
            let b = &mut *b;
            let (ops, bw) = match dir {
                Dir::Read => (&mut b.read_iops, &mut b.read_bps),
                Dir::Write => (&mut b.write_iops, &mut b.write_bps),
            };
            (ops.reserve(1, start), bw.reserve(bytes, start))
        };
        let idx = dir as usize;
        let mut throttled = false;
        loop {
            // Created before the deadline is computed, so a change in between is not missed.
            let changed = self.changed.notified();
            let wait = {
                let mut b = self.lock();
                let t = now();
                let b = &mut *b;
                let (ops, bw) = match dir {
                    Dir::Read => (&mut b.read_iops, &mut b.read_bps),
                    Dir::Write => (&mut b.write_iops, &mut b.write_bps),
                };
                let w1 = ops_pos.map_or(Duration::ZERO, |p| ops.wait(p, t));
                let w2 = bytes_pos.map_or(Duration::ZERO, |p| bw.wait(p, t));
                w1.max(w2)
            };
            if wait.is_zero() {
                break;
            }
            if !throttled {
                throttled = true;
                self.metrics.throttled[idx].increment(1);
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = changed => {}
            }
        }
        if throttled {
            self.metrics.wait[idx].record(now().duration_since(start).as_secs_f64());
        }
    }
}

/// What a CDB counts against: direction and bytes (`None`: not throttled). Reads count the
/// transfer length (at most the initiator's expected length), writes the data they carried.
pub fn classify(cdb: &[u8], data_out: usize, edtl: u32) -> Option<(Dir, u64)> {
    let be = |r: std::ops::Range<usize>| {
        cdb.get(r)
            .map(|b| b.iter().fold(0u64, |a, &x| (a << 8) | x as u64))
    };
    let read_blocks = match *cdb.first()? {
        0x08 => Some(
            cdb.get(4)
                .map_or(0, |&n| if n == 0 { 256 } else { n as u64 }),
        ),
        0x28 => be(7..9),
        0xa8 => be(6..10),
        0x88 => be(10..14),
        0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e | 0x89 | 0x8b | 0x41 | 0x93 => {
            return Some((Dir::Write, data_out as u64));
        }
        _ => return None,
    }?;
    let bytes = read_blocks
        .saturating_mul(crate::scsi::LOGICAL_BLOCK)
        .min(edtl as u64);
    Some((Dir::Read, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn full_bucket_bursts_then_paces() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100, S, t0);
        // 100 tokens of burst go at once.
        for _ in 0..100 {
            let p = b.reserve(1, t0).expect("limited");
            assert_eq!(b.wait(p, t0), Duration::ZERO);
        }
        // The 101st waits one token's time: 10 ms.
        let p = b.reserve(1, t0).expect("limited");
        assert_eq!(b.wait(p, t0), Duration::from_millis(10));
        assert_eq!(b.wait(p, t0 + Duration::from_millis(10)), Duration::ZERO);
    }

    #[test]
    fn idle_time_refills_only_up_to_the_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100, Duration::from_millis(500), t0);
        // Idle for 10 s: still only 50 tokens.
        let t1 = t0 + Duration::from_secs(10);
        let p = b.reserve(50, t1).expect("limited");
        assert_eq!(b.wait(p, t1), Duration::ZERO);
        let p = b.reserve(1, t1).expect("limited");
        assert_eq!(b.wait(p, t1), Duration::from_millis(10));
    }

    #[test]
    fn command_larger_than_the_bucket_runs_after_its_debt() {
        let t0 = Instant::now();
        // 1 MiB/s, 1 s burst; an 8 MiB command is 7 MiB beyond the bucket.
        let mut b = Bucket::new(1 << 20, S, t0);
        let p = b.reserve(8 << 20, t0).expect("limited");
        assert_eq!(b.wait(p, t0), Duration::from_secs(7));
        // The next one queues behind the debt.
        let p2 = b.reserve(1 << 20, t0).expect("limited");
        assert_eq!(b.wait(p2, t0), Duration::from_secs(8));
        assert_eq!(
            b.wait(p2, t0 + Duration::from_secs(7)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn rate_change_reprices_the_debt() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10, S, t0);
        let p = b.reserve(30, t0).expect("limited");
        assert_eq!(b.wait(p, t0), Duration::from_secs(2));
        // Raised tenfold: the 20 tokens owed take 0.2 s.
        b.set(100, S, t0);
        assert_eq!(b.wait(p, t0), Duration::from_millis(200));
        // Lowered: 1/s, the 20 owed take 20 s.
        b.set(1, S, t0);
        assert_eq!(b.wait(p, t0), Duration::from_secs(20));
        // Cleared: nothing owed.
        b.set(0, S, t0);
        assert_eq!(b.wait(p, t0), Duration::ZERO);
        assert_eq!(b.reserve(1_000_000, t0), None);
        // Limited again: starts full.
        b.set(10, S, t0);
        let p = b.reserve(10, t0).expect("limited");
        assert_eq!(b.wait(p, t0), Duration::ZERO);
    }

    #[test]
    fn lowering_the_burst_caps_saved_tokens() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100, Duration::from_secs(10), t0);
        b.set(100, Duration::from_millis(100), t0);
        let p = b.reserve(11, t0).expect("limited");
        assert_eq!(b.wait(p, t0), Duration::from_millis(10));
    }

    #[test]
    fn cdb_classification() {
        // READ(10) of 8 blocks, WRITE(16) with 4 KiB of data, TEST UNIT READY.
        let read10 = [0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0];
        assert_eq!(classify(&read10, 0, 4096), Some((Dir::Read, 4096)));
        // The expected length caps what a bogus CDB would charge.
        let huge = [
            0x88, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0,
        ];
        assert_eq!(classify(&huge, 0, 512), Some((Dir::Read, 512)));
        assert_eq!(classify(&[0x8a; 16], 4096, 4096), Some((Dir::Write, 4096)));
        assert_eq!(classify(&[0x00; 6], 0, 0), None);
        assert_eq!(classify(&[], 0, 0), None);
        assert_eq!(classify(&[0x28, 0, 0], 0, 512), None);
    }

    #[tokio::test]
    async fn admit_paces_and_a_raise_frees_waiters() {
        let q = std::sync::Arc::new(Qos::new("t"));
        q.set(Limits {
            write_iops: 1000,
            burst: Duration::from_millis(10),
            ..Limits::default()
        });
        let t0 = std::time::Instant::now();
        // 10 of burst, then 1000/s: 210 writes take 200 ms (sleeps only ever overshoot).
        for _ in 0..210 {
            q.admit(Dir::Write, 4096).await;
        }
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(195) && took <= Duration::from_secs(2),
            "{took:?}"
        );
        // Reads are not limited by the write limit.
        let t1 = std::time::Instant::now();
        for _ in 0..1000 {
            q.admit(Dir::Read, 1 << 20).await;
        }
        assert!(t1.elapsed() < Duration::from_millis(100));
        // Lowered to 1/s: 100 queued writes owe 100 s; the raise frees them all at once.
        q.set(Limits {
            write_iops: 1,
            burst: Duration::from_millis(10),
            ..Limits::default()
        });
        let waiters: Vec<_> = (0..100)
            .map(|_| {
                let q = q.clone();
                tokio::spawn(async move { q.admit(Dir::Write, 0).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(waiters.iter().any(|w| !w.is_finished()));
        let t2 = std::time::Instant::now();
        q.set(Limits::default());
        for w in waiters {
            w.await.expect("waiter");
        }
        assert!(t2.elapsed() < Duration::from_secs(1), "{:?}", t2.elapsed());
    }
}
