//! The storage daemon's membership in the cluster: it registers with the manager, then
//! heartbeats for as long as it runs.
//!
//! - **Register** (`RegisterNode`: id, advertised data-path address, zone, disks) until it
//!   succeeds, with backoff (100 ms doubling to 5 s). It runs beside the data-path server and
//!   never delays it.
//! - **Heartbeat** every `heartbeat_interval_ms` the manager asked for (from the registration,
//!   updated by every answer), measured from one heartbeat's start to the next, carrying fresh
//!   disk health and free space. `NOT_FOUND` means the manager forgot the node (a restored
//!   snapshot, a removal): register again at once.
//! - **Orders in an answer**: each `drop_chunks` entry is deleted through the store's fenced
//!   delete with the entry's epoch, so a replica is deleted only when its own epoch is <= the
//!   one in the order; a replica with a newer epoch (placed here again since) is kept and the
//!   refusal logged once. `resync_chunks` are logged (the replication path does the copy).
//! - **Standing** ([`Standing`], the daemon's `/readyz`): ready once registered, with a
//!   heartbeat accepted recently, and the last two answers naming nothing this node still owes
//!   the cluster: no drop orders, no recovery copies to receive (`recovery_pending`). A node
//!   back from a restart so turns ready only once the chunks written while it was away have
//!   their replica on it again, and a rolling restart that waits for readiness never takes a
//!   chunk's last up-to-date replica down. Two answers, because between the manager clearing
//!   our drop acknowledgements and planning the copies to us there is a moment with neither.
//! - **Failures** never end the daemon: they are counted
//!   (`ironsan_storage_manager_heartbeats_total{result}`) and logged at warn at most once per
//!   [`WARN_EVERY`], with the number of failures suppressed in between.
//!
//! [`run`] returns when its cancellation token fires (daemon shutdown), abandoning any call in
//! flight.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ironsan_common::manager_client::{Code, ManagerClient};
use ironsan_common::proto::manager as pb;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::chunk::ChunkId;
use crate::error::Error;
use crate::metrics;
use crate::store::{DiskState, Store};

/// Heartbeat interval used when the manager names none (0).
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);
/// Bounds on the interval the manager may ask for.
const MIN_HEARTBEAT: Duration = Duration::from_millis(50);
const MAX_HEARTBEAT: Duration = Duration::from_secs(60);
/// Backoff between failed registrations.
const REGISTER_BACKOFF_MIN: Duration = Duration::from_millis(100);
const REGISTER_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// At most one warning per this period; the others are counted and summarised.
pub const WARN_EVERY: Duration = Duration::from_secs(10);
/// How often heartbeats carry the space each volume takes here.
const USAGE_EVERY: Duration = Duration::from_secs(5);

/// Who this daemon is, as it registers with the manager.
#[derive(Clone, Debug)]
pub struct MembershipConfig {
    /// Node id (unique in the cluster; stable across restarts).
    pub node_id: String,
    /// Data-path address gateways and peers reach this daemon at (`host:port`).
    pub addr: String,
    /// Failure domain.
    pub zone: String,
}

/// A heartbeat accepted longer ago than this many intervals (and at least
/// [`STALE_MIN`]) makes the daemon unready: the manager is about to count it down.
const STALE_INTERVALS: u32 = 4;
const STALE_MIN: Duration = Duration::from_secs(5);
/// Consecutive heartbeat answers with nothing owed before the node is ready.
const CLEAN_ANSWERS: u32 = 2;

/// How this daemon stands with the manager, for its readiness; updated by the membership
/// task, read lock-free by `/readyz`.
#[derive(Debug)]
pub struct Standing {
    base: std::time::Instant,
    registered: AtomicBool,
    /// Milliseconds from `base` to the last accepted registration or heartbeat, plus one
    /// (0: never).
    last_ok_ms: AtomicU64,
    interval_ms: AtomicU64,
    /// Heartbeat answers in a row with nothing owed, since the registration.
    clean: AtomicU32,
    /// What the last answer said is owed: drop orders, recovery copies to receive.
    drops: AtomicU64,
    recovery: AtomicU64,
}

impl Default for Standing {
    fn default() -> Self {
        Standing {
            base: std::time::Instant::now(),
            registered: AtomicBool::new(false),
            last_ok_ms: AtomicU64::new(0),
            interval_ms: AtomicU64::new(DEFAULT_HEARTBEAT.as_millis() as u64),
            clean: AtomicU32::new(0),
            drops: AtomicU64::new(0),
            recovery: AtomicU64::new(0),
        }
    }
}

impl Standing {
    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64 + 1
    }

    fn registered(&self, interval: Duration) {
        self.interval_ms
            .store(interval.as_millis() as u64, Ordering::Relaxed);
        self.clean.store(0, Ordering::Relaxed);
        self.last_ok_ms.store(self.now_ms(), Ordering::Relaxed);
        self.registered.store(true, Ordering::Relaxed);
    }

    fn forgotten(&self) {
        self.registered.store(false, Ordering::Relaxed);
        self.clean.store(0, Ordering::Relaxed);
    }

    fn answered(&self, interval: Duration, drops: u64, recovery: u64) {
        self.interval_ms
            .store(interval.as_millis() as u64, Ordering::Relaxed);
        self.drops.store(drops, Ordering::Relaxed);
        self.recovery.store(recovery, Ordering::Relaxed);
        if drops == 0 && recovery == 0 {
            let _ = self
                .clean
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                    Some(c.saturating_add(1))
                });
        } else {
            self.clean.store(0, Ordering::Relaxed);
        }
        self.last_ok_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Ready, or why not (one line).
    pub fn ready(&self) -> Result<(), String> {
        if !self.registered.load(Ordering::Relaxed) {
            return Err("not registered with the manager yet".into());
        }
        let interval = Duration::from_millis(self.interval_ms.load(Ordering::Relaxed));
        let stale = (interval * STALE_INTERVALS).max(STALE_MIN);
        let last = self.last_ok_ms.load(Ordering::Relaxed);
        let ago = Duration::from_millis(self.now_ms().saturating_sub(last));
        if ago > stale {
            return Err(format!(
                "no heartbeat accepted by the manager for {} ms",
                ago.as_millis()
            ));
        }
        let clean = self.clean.load(Ordering::Relaxed);
        if clean >= CLEAN_ANSWERS {
            return Ok(());
        }
        let (drops, recovery) = (
            self.drops.load(Ordering::Relaxed),
            self.recovery.load(Ordering::Relaxed),
        );
        if drops > 0 || recovery > 0 {
            Err(format!(
                "catching up: {recovery} recovery copies to receive, {drops} replicas to drop"
            ))
        } else {
            Err(format!(
                "registered; {clean} of {CLEAN_ANSWERS} heartbeat answers with nothing owed"
            ))
        }
    }
}

/// Rate-limited warnings about the manager.
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
    failing: bool,
}

impl Throttle {
    fn new() -> Self {
        Self {
            last: None,
            suppressed: 0,
            failing: false,
        }
    }

    fn warn(&mut self, node: &str, what: fmt::Arguments<'_>) {
        match self.admit(Instant::now()) {
            Some(0) => tracing::warn!(node = %node, "{what}"),
            Some(suppressed) => tracing::warn!(node = %node, suppressed, "{what}"),
            None => {}
        }
    }

    /// Whether a failure at `now` is logged, with how many were suppressed since the last one.
    fn admit(&mut self, now: Instant) -> Option<u64> {
        self.failing = true;
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < WARN_EVERY)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }

    /// A call succeeded: say so once if the previous ones failed.
    fn ok(&mut self, node: &str) {
        if self.failing {
            tracing::info!(node = %node, "manager reachable again");
        }
        self.failing = false;
        self.last = None;
        self.suppressed = 0;
    }
}

struct Membership {
    client: ManagerClient,
    store: Arc<Store>,
    cfg: MembershipConfig,
    standing: Arc<Standing>,
    throttle: Throttle,
    interval: Duration,
    state: i32,
    /// Drop orders refused because our replica is newer, so each is logged once.
    refused: HashSet<(ChunkId, u64)>,
    /// The last resync list logged.
    resync: Vec<(u64, u64, u64)>,
    /// Drop orders carried out (or obsolete) since the last heartbeat: acknowledged in the
    /// next one, so the manager stops sending them.
    dropped: Vec<pb::Chunk>,
    /// When space per volume was last sent (a `stat` per chunk: not every heartbeat).
    usage_sent: Option<Instant>,
}

/// Registers with the manager and heartbeats until `cancel` fires (see the module docs),
/// keeping `standing` up to date.
pub async fn run(
    client: ManagerClient,
    store: Arc<Store>,
    cfg: MembershipConfig,
    standing: Arc<Standing>,
    cancel: CancellationToken,
) {
    let mut m = Membership {
        client,
        store,
        cfg,
        standing,
        throttle: Throttle::new(),
        interval: DEFAULT_HEARTBEAT,
        state: pb::NodeState::Unspecified as i32,
        refused: HashSet::new(),
        resync: Vec::new(),
        dropped: Vec::new(),
        usage_sent: None,
    };
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = m.run() => {}
    }
    tracing::debug!(node = %m.cfg.node_id, "membership stopped");
}

fn interval_from(ms: u64) -> Option<Duration> {
    (ms != 0).then(|| Duration::from_millis(ms).clamp(MIN_HEARTBEAT, MAX_HEARTBEAT))
}

impl Membership {
    async fn run(&mut self) -> ! {
        loop {
            self.register().await;
            self.heartbeat_until_forgotten().await;
        }
    }

    /// Registers, retrying with backoff until the manager accepts.
    async fn register(&mut self) {
        let mut backoff = REGISTER_BACKOFF_MIN;
        loop {
            let req = pb::RegisterNodeRequest {
                id: self.cfg.node_id.clone(),
                addr: self.cfg.addr.clone(),
                zone: self.cfg.zone.clone(),
                disks: self.disks().await,
            };
            match self.client.register_node(req).await {
                Ok(resp) => {
                    metrics::manager_registration("ok");
                    self.throttle.ok(&self.cfg.node_id);
                    self.interval =
                        interval_from(resp.heartbeat_interval_ms).unwrap_or(DEFAULT_HEARTBEAT);
                    let state = resp.node.as_ref().map_or(0, |n| n.state);
                    self.state = state;
                    self.standing.registered(self.interval);
                    tracing::info!(
                        node = %self.cfg.node_id,
                        addr = %self.cfg.addr,
                        zone = %self.cfg.zone,
                        state = state_name(state),
                        heartbeat_ms = self.interval.as_millis() as u64,
                        "registered with the manager"
                    );
                    return;
                }
                Err(e) => {
                    metrics::manager_registration("error");
                    self.throttle.warn(
                        &self.cfg.node_id,
                        format_args!("registration with the manager failed (retrying): {e}"),
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(REGISTER_BACKOFF_MAX);
                }
            }
        }
    }

    /// Heartbeats at the manager's interval; returns when the manager no longer knows us.
    async fn heartbeat_until_forgotten(&mut self) {
        let mut next = Instant::now() + self.interval;
        loop {
            tokio::time::sleep_until(next).await;
            let started = Instant::now();
            // A heartbeat is only worth something while it is fresh: fail over quickly and
            // give up on this one well before the next would be due twice.
            let client = self
                .client
                .clone()
                .with_call_timeout(
                    self.interval
                        .clamp(Duration::from_secs(1), Duration::from_secs(5)),
                )
                .with_deadline(
                    (self.interval * 2).clamp(Duration::from_secs(2), Duration::from_secs(10)),
                );
            let usage = self.usage_if_due().await;
            let req = pb::HeartbeatRequest {
                id: self.cfg.node_id.clone(),
                disks: self.disks().await,
                dropped: std::mem::take(&mut self.dropped),
                usage_reported: usage.is_some(),
                volume_usage: usage.unwrap_or_default(),
            };
            let acks = req.dropped.clone();
            let sent = client.heartbeat(req).await;
            if sent.is_err() {
                // Not acknowledged: send them again next time.
                self.dropped.extend(acks);
            }
            match sent {
                Ok(resp) => {
                    metrics::manager_heartbeat("ok");
                    self.throttle.ok(&self.cfg.node_id);
                    self.answer(resp).await;
                }
                Err(e) if e.code() == Code::NotFound => {
                    metrics::manager_heartbeat("not_found");
                    self.standing.forgotten();
                    tracing::warn!(node = %self.cfg.node_id, "the manager does not know this node: registering again");
                    return;
                }
                Err(e) => {
                    metrics::manager_heartbeat("error");
                    self.throttle.warn(
                        &self.cfg.node_id,
                        format_args!("heartbeat to the manager failed: {e}"),
                    );
                }
            }
            // The next heartbeat is due one interval after this one started.
            next = started + self.interval;
        }
    }

    async fn answer(&mut self, resp: pb::HeartbeatResponse) {
        if let Some(i) = interval_from(resp.heartbeat_interval_ms) {
            if i != self.interval {
                tracing::info!(node = %self.cfg.node_id, heartbeat_ms = i.as_millis() as u64, "heartbeat interval changed");
                self.interval = i;
            }
        }
        if resp.state != self.state {
            tracing::info!(node = %self.cfg.node_id, state = state_name(resp.state), "node state set by the manager");
            self.state = resp.state;
        }
        self.standing.answered(
            self.interval,
            resp.drop_chunks.len() as u64,
            resp.recovery_pending,
        );
        let mut refused = HashSet::new();
        for c in &resp.drop_chunks {
            match self.drop_chunk(c).await {
                Dropped::Done => self.dropped.push(c.clone()),
                Dropped::Refused(id) => {
                    // Our replica is newer than the order: the order is obsolete.
                    refused.insert((id, c.epoch));
                    self.dropped.push(c.clone());
                }
                Dropped::Retry => {}
            }
        }
        // Forget refusals the manager no longer orders, so the set stays small.
        self.refused = refused;
        let resync: Vec<(u64, u64, u64)> = resp
            .resync_chunks
            .iter()
            .map(|c| (c.volume_id, c.index, c.epoch))
            .collect();
        if resync != self.resync {
            for c in &resp.resync_chunks {
                tracing::info!(node = %self.cfg.node_id, volume = c.volume_id, index = c.index, epoch = c.epoch, "manager reports this replica stale: resync needed");
            }
            self.resync = resync;
        }
    }

    /// Carries out one drop order.
    async fn drop_chunk(&mut self, c: &pb::Chunk) -> Dropped {
        let node = &self.cfg.node_id;
        let Ok(index) = u32::try_from(c.index) else {
            tracing::warn!(node = %node, volume = c.volume_id, index = c.index, "drop order for a chunk index out of range: ignored");
            return Dropped::Done;
        };
        let id = ChunkId::new(c.volume_id, index);
        // The store's delete is fenced in its engine thread: it refuses with StaleEpoch when our
        // replica's epoch is newer than the order's, atomically with respect to writes.
        match self.store.delete(id, c.epoch).await {
            Ok(()) => {
                metrics::manager_chunk_dropped();
                tracing::info!(node = %node, chunk = %id, epoch = c.epoch, "deleted a replica the cluster no longer places here");
                Dropped::Done
            }
            Err(Error::NotFound(_)) => {
                tracing::debug!(node = %node, chunk = %id, "drop order for a replica not held here");
                Dropped::Done
            }
            Err(Error::StaleEpoch { current, .. }) => {
                if !self.refused.contains(&(id, c.epoch)) {
                    tracing::warn!(node = %node, chunk = %id, order_epoch = c.epoch, replica_epoch = current, "kept a replica the manager ordered dropped: its epoch is newer");
                }
                Dropped::Refused(id)
            }
            Err(e) => {
                tracing::warn!(node = %node, chunk = %id, "dropping a replica failed: {e}");
                Dropped::Retry
            }
        }
    }

    /// Space per volume, every [`USAGE_EVERY`]: read off the runtime's workers.
    async fn usage_if_due(&mut self) -> Option<Vec<pb::VolumeUsage>> {
        if self.usage_sent.is_some_and(|t| t.elapsed() < USAGE_EVERY) {
            return None;
        }
        let store = self.store.clone();
        let usage = tokio::task::spawn_blocking(move || store.usage())
            .await
            .ok()?;
        self.usage_sent = Some(Instant::now());
        Some(
            usage
                .into_iter()
                .map(|(volume, bytes)| pb::VolumeUsage { volume, bytes })
                .collect(),
        )
    }

    /// Every data directory's health and space, read off the runtime's workers (statvfs).
    async fn disks(&self) -> Vec<pb::Disk> {
        let store = self.store.clone();
        let disks = tokio::task::spawn_blocking(move || store.disks())
            .await
            .unwrap_or_default();
        disks
            .into_iter()
            .map(|d| pb::Disk {
                path: d.path.display().to_string(),
                state: match d.state {
                    DiskState::Healthy => pb::DiskState::DiskHealthy,
                    DiskState::Full => pb::DiskState::DiskFull,
                    DiskState::Failed(_) => pb::DiskState::DiskFailed,
                } as i32,
                capacity: d.total_bytes,
                free: d.free_bytes,
            })
            .collect()
    }
}

fn state_name(state: i32) -> &'static str {
    match pb::NodeState::try_from(state) {
        Ok(pb::NodeState::NodeUp) => "up",
        Ok(pb::NodeState::NodeDown) => "down",
        Ok(pb::NodeState::NodeDraining) => "draining",
        _ => "unknown",
    }
}

/// The outcome of one drop order.
enum Dropped {
    /// Deleted, or not held here.
    Done,
    /// Kept: the replica's epoch is newer than the order's.
    Refused(ChunkId),
    /// Failed for another reason; the order stays until it succeeds.
    Retry,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_are_clamped() {
        assert_eq!(interval_from(0), None);
        assert_eq!(interval_from(1), Some(MIN_HEARTBEAT));
        assert_eq!(interval_from(250), Some(Duration::from_millis(250)));
        assert_eq!(interval_from(u64::MAX), Some(MAX_HEARTBEAT));
    }

    #[test]
    fn standing_waits_for_two_clean_answers() {
        let s = Standing::default();
        assert!(s.ready().unwrap_err().contains("not registered"));
        s.registered(Duration::from_millis(100));
        assert!(s.ready().unwrap_err().contains("0 of 2"));
        s.answered(Duration::from_millis(100), 3, 0);
        assert!(s.ready().unwrap_err().contains("3 replicas to drop"));
        s.answered(Duration::from_millis(100), 0, 2);
        assert!(s.ready().unwrap_err().contains("2 recovery copies"));
        s.answered(Duration::from_millis(100), 0, 0);
        assert!(s.ready().unwrap_err().contains("1 of 2"));
        s.answered(Duration::from_millis(100), 0, 0);
        assert_eq!(s.ready(), Ok(()));
        // Owed again: not ready until two clean answers in a row.
        s.answered(Duration::from_millis(100), 0, 1);
        assert!(s.ready().is_err());
        s.answered(Duration::from_millis(100), 0, 0);
        s.answered(Duration::from_millis(100), 0, 0);
        assert_eq!(s.ready(), Ok(()));
        // Heartbeats stop being accepted: unready once they are stale (the last one 6 s ago).
        let now = std::time::Instant::now();
        let s2 = Standing {
            base: now.checked_sub(Duration::from_secs(6)).unwrap_or(now),
            ..Standing::default()
        };
        s2.registered(Duration::from_millis(100));
        s2.answered(Duration::from_millis(100), 0, 0);
        s2.answered(Duration::from_millis(100), 0, 0);
        assert_eq!(s2.ready(), Ok(()));
        s2.last_ok_ms.store(1, Ordering::Relaxed);
        assert!(s2.ready().unwrap_err().contains("no heartbeat accepted"));
        s2.forgotten();
        assert!(s2.ready().unwrap_err().contains("not registered"));
    }

    #[test]
    fn warnings_are_rate_limited() {
        let mut t = Throttle::new();
        let t0 = Instant::now();
        assert_eq!(t.admit(t0), Some(0));
        // 5 s of failures every 100 ms: all suppressed after the first.
        for i in 1..=50 {
            assert_eq!(t.admit(t0 + Duration::from_millis(100 * i)), None);
        }
        assert_eq!(t.admit(t0 + WARN_EVERY), Some(50), "logged with the count");
        assert_eq!(t.admit(t0 + WARN_EVERY + Duration::from_secs(1)), None);
        t.ok("n");
        assert!(!t.failing);
        assert_eq!(
            t.admit(t0 + WARN_EVERY + Duration::from_secs(2)),
            Some(0),
            "a failure after recovery is logged at once"
        );
    }
}
