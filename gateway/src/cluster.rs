//! The gateway as a cluster member: it registers its id and portal with the manager, then
//! serves, as iSCSI targets, exactly the volumes the manager says are attached to it.
//!
//! Its [`Standing`] (the gateway's `/readyz`): registered, and the manager answered recently.
//!
//! It lists the volumes as a long poll: the manager answers when they change, or after `poll`
//! (a manager without long polls answers at once, and the gateway then waits `poll`). One
//! attached to this gateway and not yet served is opened ([`Volume::open`] attaches again, so
//! the new writer epoch fences this gateway's own previous life) and exported; one served but
//! no longer attached here (detached, or taken over by another gateway once the lease ran out)
//! is closed and its target removed, ending its sessions. A volume whose lease was lost while
//! still attached here (the manager was unreachable for longer than the lease) is reopened.
//! Growth is picked up and announced to initiators as CAPACITY DATA HAS CHANGED.
//!
//! A volume whose attachment is `readonly` (published read-only for CSI ReadOnlyMany, several
//! nodes logged in to this one target) is exported write-protected: the target itself refuses
//! writes, whatever a reader node's kernel or a misbehaving client sends. The flag can change
//! while the volume is served: an operator's attachment adopted by a read-only publish keeps
//! its epoch, and a last unpublish followed by a publish in the other mode within one poll
//! looks the same until the lease keeper notices the new epoch. It is then switched on the
//! live LUN, not re-exported, and sessions stay:
//! - to read-only: the switch waits for writes already in flight; every later one fails with
//!   DATA PROTECT. Ending the sessions would protect nothing more (the target refuses the
//!   writes either way) and would throw out reader nodes that logged in early.
//! - to read-write: sessions left from the read-only publication could now write, but their
//!   nodes were unpublished (and unmounted first), and their kernels still hold the disk
//!   read-only. With a new epoch the volume is reopened anyway (a new target, sessions ended).
//!
//! Every session gets MODE PARAMETERS CHANGED (2A/01) on its next command. Linux reads WP only
//! when it scans the disk (login, or a rescan), so a node that logged in before the switch
//! keeps its old view until it rescans.
//!
//! QoS limits (`Volume.qos`) are followed too: set on a target before it is exported, and
//! changed live on the pass that brings new values, sessions untouched.
//!
//! Snapshot work named in the volume's record (a snapshot to take or delete, chunks to fill
//! for a clone or restore) is started on every pass (`replica/snapshot.rs`), and each READY
//! snapshot is exported write-protected as `VOLUME:SNAPSHOT`. A `work` attachment (the manager
//! lending a detached volume to this gateway for snapshot work) is opened but not exported,
//! and detached once its work is done.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ironsan_common::manager_client::ManagerClient;
use ironsan_common::proto::manager::{
    self as pb, DetachRequest, ListVolumesRequest, RegisterGatewayRequest, VolumeQos, VolumeRef,
};
use ironsan_storage::client::{ClientConfig, Pool};
use tokio_util::sync::CancellationToken;

use crate::qos::Limits;
use crate::replica::{self, ReplicaConfig, Volume};
use crate::target::{Gateway, TargetOptions};

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub replica: ReplicaConfig,
    /// How often the attachments are listed.
    pub poll: Duration,
    /// Data-path client settings (timeouts decide how fast a dead replica is given up).
    pub data_path: ClientConfig,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            replica: ReplicaConfig::default(),
            poll: Duration::from_secs(1),
            data_path: ClientConfig {
                connect_timeout: Duration::from_secs(1),
                request_timeout: Duration::from_secs(4),
                // Measured (benches/replicated_vs_tgt.sh, 4k randread QD32): 2 connections per
                // storage node 25k IOPS, 4: 29k, 8: no better.
                conns_per_addr: 4,
                // A restarted storage daemon must be reachable again within a second: a write
                // refused by a slot still backing off fails that replica (and removes it from
                // the chunk's set), which a rolling restart would pay for after the daemon is
                // ready again. Retrying a dead address each second costs nothing once the
                // manager has taken it out of the sets.
                backoff_max: Duration::from_secs(1),
                ..ClientConfig::default()
            },
        }
    }
}

/// Least time between two passes when the manager long-polls (a burst of changes is taken
/// a few at a time rather than one pass each).
const MIN_PASS: Duration = Duration::from_millis(20);

/// The manager unanswered this long (at least; or five polls) makes the gateway unready: by a
/// lease's length it could no longer serve I/O anyway.
const CONTACT_STALE: Duration = Duration::from_secs(10);

/// How the gateway stands with the manager, for its readiness; updated by
/// [`serve_attached`], read lock-free.
#[derive(Debug)]
pub struct Standing {
    base: Instant,
    registered: AtomicBool,
    /// Milliseconds from `base` to the manager's last answer, plus one (0: never).
    contact_ms: AtomicU64,
    stale: AtomicU64,
}

impl Default for Standing {
    fn default() -> Self {
        Standing {
            base: Instant::now(),
            registered: AtomicBool::new(false),
            contact_ms: AtomicU64::new(0),
            stale: AtomicU64::new(CONTACT_STALE.as_millis() as u64),
        }
    }
}

impl Standing {
    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64 + 1
    }

    fn contact(&self) {
        self.contact_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Ready, or why not (one line).
    pub fn ready(&self) -> Result<(), String> {
        if !self.registered.load(Ordering::Relaxed) {
            return Err("not registered with the manager yet".into());
        }
        let ago = self
            .now_ms()
            .saturating_sub(self.contact_ms.load(Ordering::Relaxed));
        if ago > self.stale.load(Ordering::Relaxed) {
            return Err(format!("no answer from the manager for {ago} ms"));
        }
        Ok(())
    }
}

/// Serves the volumes attached to this gateway until `shutdown`.
/// `ready` fires after the first pass, once every volume attached here at start is exported
/// (or failed to open), so a caller can announce the portal without a race. `standing` follows
/// the registration and every answer of the manager.
pub async fn serve_attached(
    gw: Arc<Gateway>,
    mgr: ManagerClient,
    cfg: ClusterConfig,
    shutdown: CancellationToken,
    mut ready: Option<tokio::sync::oneshot::Sender<()>>,
    standing: Arc<Standing>,
) {
    standing.stale.store(
        CONTACT_STALE.max(cfg.poll * 5).as_millis() as u64,
        Ordering::Relaxed,
    );
    let pool = Arc::new(Pool::new(cfg.data_path.clone()));
    let me = cfg.replica.gateway.clone();
    let mut served: HashMap<String, Arc<Volume>> = HashMap::new();
    // Per served volume: the names of its snapshots exported as read-only targets.
    let mut snapshots: HashMap<String, HashSet<String>> = HashMap::new();
    let mut registered = false;
    // What the last answer's volumes reflect (`ListVolumesResponse.changed`).
    let mut changed = 0;
    loop {
        // Announce this gateway and its portal (CSI publishes volumes to registered gateways
        // only); retried every pass until the manager takes it.
        if !registered {
            let req = RegisterGatewayRequest {
                id: me.clone(),
                portal: cfg.replica.portal.clone(),
            };
            match mgr.register_gateway(req).await {
                Ok(g) => {
                    registered = true;
                    standing.contact();
                    standing.registered.store(true, Ordering::Relaxed);
                    tracing::info!(gateway = %g.id, portal = %g.portal, "gateway registered");
                }
                Err(e) => tracing::warn!(error = %e, "cannot register the gateway yet"),
            }
        }
        // A long poll: answered at once when the volumes changed since the last answer (a
        // snapshot asked for, an attach, a resize...), else after `poll`.
        let req = ListVolumesRequest {
            changed_after: changed,
            wait_ms: u32::try_from(cfg.poll.as_millis()).unwrap_or(u32::MAX),
        };
        let listed = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = mgr.list_volumes(req) => r,
        };
        // A manager without long polls (0) answers at once: then the loop sleeps `poll`.
        let mut pause = cfg.poll;
        match listed {
            Ok(list) => {
                standing.contact();
                if list.changed != 0 {
                    changed = list.changed;
                    pause = MIN_PASS;
                }
                let mine: HashMap<&str, &pb::Volume> = list
                    .volumes
                    .iter()
                    .filter(|v| v.attachment.as_ref().is_some_and(|a| a.gateway == me))
                    .map(|v| (v.name.as_str(), v))
                    .collect();
                served.retain(|name, vol| {
                    if mine.contains_key(name.as_str()) && vol.is_serving() {
                        return true;
                    }
                    let why = if mine.contains_key(name.as_str()) {
                        "lease lost"
                    } else {
                        "no longer attached to this gateway"
                    };
                    tracing::info!(volume = %name, why, "stopping service of volume");
                    vol.close(why);
                    gw.remove_target(name);
                    export_snapshots(&gw, vol, None, &mut snapshots);
                    false
                });
                for (name, v) in mine {
                    let Some(a) = v.attachment.as_ref() else {
                        continue;
                    };
                    let vol = match served.get(name) {
                        Some(vol) => vol.clone(),
                        None => {
                            match Volume::open(mgr.clone(), pool.clone(), cfg.replica.clone(), name)
                                .await
                            {
                                Ok(vol) => {
                                    served.insert(name.to_string(), vol.clone());
                                    vol
                                }
                                Err(e) => {
                                    tracing::warn!(volume = %name, error = %e, "cannot open volume; retrying");
                                    continue;
                                }
                            }
                        }
                    };
                    vol.follow(v);
                    if a.work {
                        // Held only for snapshot work: never exported; given back once done.
                        if !replica::has_work(v) && !vol.busy() {
                            release(&mgr, &me, &vol).await;
                            served.remove(name);
                        }
                        continue;
                    }
                    export_snapshots(&gw, &vol, Some(v), &mut snapshots);
                    let qos = limits(v.qos.as_ref());
                    if gw.target_by_name(name).is_some() {
                        grow(&gw, &vol, v.size).await;
                        protect(&gw, name, a.readonly).await;
                        limit(&gw, name, qos);
                        continue;
                    }
                    let options = TargetOptions {
                        write_protected: a.readonly,
                        qos,
                        ..TargetOptions::default()
                    };
                    match gw.add_target(name, vol.clone(), options) {
                        Ok(t) => {
                            tracing::info!(volume = %name, iqn = %t.iqn, readonly = a.readonly, "target ready")
                        }
                        Err(e) => {
                            tracing::error!(volume = %name, error = %e, "cannot export volume");
                            vol.close("cannot export");
                            served.remove(name);
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list volumes; serving on with the leases held")
            }
        }
        metrics::gauge!("ironsan_gateway_volumes_served").set(served.len() as f64);
        if let Some(tx) = ready.take() {
            let _ = tx.send(());
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
        }
    }
    // The targets stay until the portal has drained its sessions (Gateway::serve flushes);
    // the keepers stop renewing and the leases run out.
    for vol in served.values() {
        vol.stop_keeper();
    }
}

/// Exports the volume's READY snapshots as write-protected targets `VOLUME:SNAPSHOT` (IQN
/// `iqn.2026-11.io.ironsan:VOLUME:SNAPSHOT`) and withdraws those no longer READY; `None`
/// withdraws them all (the volume is no longer served here).
fn export_snapshots(
    gw: &Gateway,
    vol: &Arc<Volume>,
    v: Option<&pb::Volume>,
    exported: &mut HashMap<String, HashSet<String>>,
) {
    let want: HashMap<String, &pb::Snapshot> = v
        .iter()
        .flat_map(|v| v.snapshots.iter())
        .filter(|s| s.state == pb::SnapshotState::SnapshotReady as i32)
        .map(|s| (format!("{}:{}", vol.name, s.name), s))
        .collect();
    let have = exported.entry(vol.name.clone()).or_default();
    have.retain(|t| {
        if want.contains_key(t) {
            return true;
        }
        gw.remove_target(t);
        false
    });
    for (t, s) in want {
        if have.contains(&t) {
            continue;
        }
        let options = TargetOptions {
            write_protected: true,
            ..TargetOptions::default()
        };
        let dev = Arc::new(replica::SnapshotDevice::new(vol.clone(), s));
        match gw.add_target(&t, dev, options) {
            Ok(target) => {
                tracing::info!(snapshot = %t, iqn = %target.iqn, "snapshot exported read-only");
                have.insert(t);
            }
            Err(e) => tracing::warn!(snapshot = %t, error = %e, "cannot export snapshot"),
        }
    }
    if have.is_empty() {
        exported.remove(&vol.name);
    }
}

/// Gives back a volume held for snapshot work only (a detach of a `work` attachment).
async fn release(mgr: &ManagerClient, me: &str, vol: &Volume) {
    let r = mgr
        .detach(DetachRequest {
            volume: Some(VolumeRef {
                id: vol.id,
                name: String::new(),
            }),
            gateway: me.to_string(),
            force: false,
        })
        .await;
    match r {
        Ok(_) => tracing::info!(volume = %vol.name, "snapshot work done; volume released"),
        Err(e) => tracing::warn!(volume = %vol.name, error = %e, "cannot release the volume"),
    }
    vol.close("snapshot work done");
}

/// The manager's limits as the gateway's buckets take them (absent: unlimited).
fn limits(q: Option<&VolumeQos>) -> Limits {
    let Some(q) = q else {
        return Limits::default();
    };
    Limits {
        read_iops: q.read_iops,
        write_iops: q.write_iops,
        read_bps: q.read_bps,
        write_bps: q.write_bps,
        burst: q
            .burst_ms
            .filter(|&ms| ms > 0)
            .map_or(Limits::default().burst, Duration::from_millis),
    }
}

/// Follows the volume's QoS limits on the live target: sessions stay, commands already
/// waiting are repriced at the new rates.
fn limit(gw: &Gateway, name: &str, qos: Limits) {
    let Some(t) = gw.target_by_name(name) else {
        return;
    };
    if t.qos.set(qos) {
        tracing::info!(volume = %name, ?qos, "QoS limits changed on the live target");
    }
}

/// Follows the attachment's `readonly` on the live target (see the module docs).
async fn protect(gw: &Gateway, name: &str, readonly: bool) {
    let Some(t) = gw.target_by_name(name) else {
        return;
    };
    if t.lun.set_write_protected(readonly).await {
        tracing::info!(volume = %name, readonly, "write protection switched on the live target");
    }
}

async fn grow(gw: &Gateway, vol: &Volume, size: u64) {
    match vol.resized(size).await {
        Ok(true) => {
            if let Some(t) = gw.target_by_name(&vol.name) {
                t.lun.capacity_changed();
            }
            tracing::info!(volume = %vol.name, size, "volume grew");
        }
        Ok(false) => {}
        Err(e) => tracing::warn!(volume = %vol.name, error = %e, "cannot load the grown chunk map"),
    }
}
