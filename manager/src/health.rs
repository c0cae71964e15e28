//! Health arbitration on the leader: heartbeats are soft state (never log entries); only the
//! decisions they lead to are committed.
//!
//! Given a node that heartbeats, when it falls silent for `node_timeout`, then the leader
//! commits it Down. Given a chunk with a replica on a node Down for `recovery_grace` (or on a
//! Draining node, or short of replicas), when no task exists for it, then the leader plans a
//! replacement with the placement rules and commits a recovery task (the new replica joins the
//! chunk's set as `joining` until the copy completes). Given a Down node that heartbeats again,
//! then it is committed Up and its replicas still in sets are listed for resync; replicas it
//! lost are listed for dropping until it confirms.
//!
//! Given a volume with a snapshot to take or delete and no live attachment (its holder went
//! away, or the work gateway let its lease lapse), then the leader commits a work attachment
//! to a registered gateway, the one after the last holder, at most once a second per volume.
//!
//! A new leader knows nothing of the old leader's timers: it starts every node's silence and
//! every Down node's grace from its own election, so a leader change only ever delays a
//! decision, never hastens one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ironsan_common::proto::manager::{
    command::Op, AssignWorkCmd, CreateTasksCmd, Disk, DiskState, HeartbeatRequest,
    HeartbeatResponse, NodeChunks, NodeState, RecoveryTask, SetNodeStateCmd, TaskState,
};

use crate::placement::{Candidate, Placer};
use crate::state::{State, DEFAULT_LEASE_MS};

/// A volume's snapshot work is handed out at most this often: the gateway it went to gets
/// that long to attach before the leader tries again (with the next gateway).
const WORK_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// A node silent this long is committed Down.
    pub node_timeout: Duration,
    /// A Down node's chunks get recovery tasks after this long.
    pub recovery_grace: Duration,
    /// What the leader asks storage daemons to use.
    pub heartbeat_interval: Duration,
    /// Recovery tasks planned per round, so one failure does not flood the log.
    pub max_tasks_per_round: usize,
    pub scatter_width: usize,
    /// Creates and grows that would provision (size x replicas) more than this many times the
    /// Up nodes' raw capacity are refused; 0 = never refused (past 1x only warned about).
    pub max_overcommit: f64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            node_timeout: Duration::from_secs(10),
            recovery_grace: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(1),
            max_tasks_per_round: 256,
            scatter_width: 4,
            max_overcommit: 0.0,
        }
    }
}

#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    disks: Vec<Disk>,
}

/// The leader's soft state about storage nodes.
#[derive(Default)]
pub struct Health {
    seen: Mutex<HashMap<String, Seen>>,
    down_since: Mutex<HashMap<String, Instant>>,
    /// When this member last became leader (None while follower).
    leader_since: Mutex<Option<Instant>>,
    /// Bytes copied per recovery task, as the gateways report them.
    progress: Mutex<HashMap<u64, u64>>,
    /// Space per volume on each node, as last reported: node -> volume -> bytes.
    usage: Mutex<HashMap<String, HashMap<u64, u64>>>,
    /// When snapshot work on a volume was last handed out.
    work_sent: Mutex<HashMap<u64, Instant>>,
}

impl Health {
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        match m.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Called when leadership is gained or lost: soft state never crosses terms.
    pub fn set_leader(&self, leader: bool) {
        let mut since = Self::lock(&self.leader_since);
        match (leader, since.is_some()) {
            (true, false) => {
                *since = Some(Instant::now());
                Self::lock(&self.seen).clear();
                Self::lock(&self.down_since).clear();
                Self::lock(&self.usage).clear();
                Self::lock(&self.work_sent).clear();
            }
            (false, true) => *since = None,
            _ => {}
        }
    }

    /// Records how far a recovery copy has come (soft state, like heartbeats).
    pub fn task_progress(&self, id: u64, copied: u64) {
        Self::lock(&self.progress).insert(id, copied);
    }

    /// Bytes copied per task, for the tasks still in `state` (finished ones are forgotten).
    pub fn progress(&self, state: &State) -> HashMap<u64, u64> {
        let mut p = Self::lock(&self.progress);
        p.retain(|id, _| state.tasks().any(|t| t.id == *id));
        p.clone()
    }

    /// Records a heartbeat and builds the answer; the caller commits what `follow_up` returns.
    pub fn heartbeat(
        &self,
        state: &State,
        req: &HeartbeatRequest,
        cfg: &HealthConfig,
    ) -> Result<(HeartbeatResponse, Vec<Op>), tonic::Status> {
        let Some(node) = state.node(&req.id) else {
            return Err(tonic::Status::not_found(format!(
                "node {:?} is not registered; register first",
                req.id
            )));
        };
        Self::lock(&self.seen).insert(
            req.id.clone(),
            Seen {
                at: Instant::now(),
                disks: req.disks.clone(),
            },
        );
        if req.usage_reported {
            Self::lock(&self.usage).insert(
                req.id.clone(),
                req.volume_usage
                    .iter()
                    .map(|u| (u.volume, u.bytes))
                    .collect(),
            );
        }
        let mut follow_up = Vec::new();
        if node.state == NodeState::NodeDown as i32 {
            Self::lock(&self.down_since).remove(&req.id);
            follow_up.push(Op::SetNodeState(SetNodeStateCmd {
                id: req.id.clone(),
                state: NodeState::NodeUp as i32,
                reason: "heartbeat resumed".into(),
            }));
        }
        if !req.dropped.is_empty() {
            follow_up.push(Op::ClearOrphans(NodeChunks {
                node_id: req.id.clone(),
                chunks: req.dropped.clone(),
            }));
        }
        let resp = HeartbeatResponse {
            state: node.state,
            heartbeat_interval_ms: cfg.heartbeat_interval.as_millis() as u64,
            drop_chunks: state.orphans_of(&req.id),
            resync_chunks: state.stale_of(&req.id),
            recovery_pending: state.recovery_to(&req.id),
        };
        metrics::counter!("ironsan_manager_heartbeats_total").increment(1);
        Ok((resp, follow_up))
    }

    /// Free bytes and disk health as last heard, for placement and `node list`.
    pub fn soft(&self, node: &str) -> Option<(u64, Vec<Disk>, Duration)> {
        Self::lock(&self.seen).get(node).map(|s| {
            (
                s.disks.iter().map(|d| d.free).sum(),
                s.disks.clone(),
                s.at.elapsed(),
            )
        })
    }

    /// Bytes volume `id` takes on all nodes together, as they last reported.
    pub fn used_bytes(&self, id: u64) -> u64 {
        Self::lock(&self.usage)
            .values()
            .filter_map(|m| m.get(&id))
            .sum()
    }

    /// The placement view of every node: committed identity, soft free space and disk health.
    pub fn candidates(&self, state: &State) -> Vec<Candidate> {
        state
            .nodes()
            .map(|n| {
                let disks = self
                    .soft(&n.id)
                    .map(|s| s.1)
                    .unwrap_or_else(|| n.disks.clone());
                let healthy = disks
                    .iter()
                    .any(|d| d.state == DiskState::DiskHealthy as i32);
                Candidate {
                    id: n.id.clone(),
                    zone: n.zone.clone(),
                    capacity: n.capacity,
                    allocated: n.allocated,
                    free: disks
                        .iter()
                        .filter(|d| d.state == DiskState::DiskHealthy as i32)
                        .map(|d| d.free)
                        .sum(),
                    placeable: n.state == NodeState::NodeUp as i32 && healthy,
                }
            })
            .collect()
    }

    /// One round of the leader's checks: what to commit now.
    pub fn plan(&self, state: &State, cfg: &HealthConfig) -> Vec<Op> {
        let Some(leader_since) = *Self::lock(&self.leader_since) else {
            return Vec::new();
        };
        let now = Instant::now();
        let mut ops = Vec::new();
        {
            let seen = Self::lock(&self.seen);
            let mut down_since = Self::lock(&self.down_since);
            for n in state.nodes() {
                if n.state == NodeState::NodeDown as i32 {
                    down_since.entry(n.id.clone()).or_insert(now);
                    continue;
                }
                let last = seen
                    .get(&n.id)
                    .map_or(leader_since, |s| s.at.max(leader_since));
                if now.duration_since(last) >= cfg.node_timeout {
                    ops.push(Op::SetNodeState(SetNodeStateCmd {
                        id: n.id.clone(),
                        state: NodeState::NodeDown as i32,
                        reason: format!("silent for {} ms", now.duration_since(last).as_millis()),
                    }));
                }
            }
        }
        // Node states first: recovery is planned on the committed ones.
        if ops.is_empty() {
            let tasks = self.plan_recovery(state, cfg, now);
            if !tasks.is_empty() {
                ops.push(Op::CreateTasks(CreateTasksCmd { tasks }));
            }
        }
        let wall_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        ops.extend(self.plan_work(state, wall_ms, now));
        ops
    }

    /// Work attachments for snapshot work nobody does at `now_ms` (leader's wall clock, as
    /// the commands are stamped with), each volume at most once per `WORK_RETRY`.
    fn plan_work(&self, state: &State, now_ms: u64, now: Instant) -> Vec<Op> {
        let mut sent = Self::lock(&self.work_sent);
        sent.retain(|_, at| now.duration_since(*at) < WORK_RETRY);
        let mut ops = Vec::new();
        for volume_id in state.unserved_work(now_ms) {
            if sent.contains_key(&volume_id) {
                continue;
            }
            match state.pick_gateway(volume_id) {
                Ok(gateway) => {
                    sent.insert(volume_id, now);
                    ops.push(Op::AssignWork(AssignWorkCmd {
                        volume_id,
                        gateway,
                        lease_ms: DEFAULT_LEASE_MS,
                    }));
                }
                Err(e) => {
                    tracing::debug!(volume = volume_id, error = %e.message, "snapshot work waits")
                }
            }
        }
        ops
    }

    fn plan_recovery(&self, state: &State, cfg: &HealthConfig, now: Instant) -> Vec<RecoveryTask> {
        let down_since = Self::lock(&self.down_since).clone();
        // A node is to be replaced when Draining, or Down past the grace period.
        let replace = |id: &str| -> bool {
            match state.node(id) {
                None => true,
                Some(n) if n.state == NodeState::NodeDraining as i32 => true,
                Some(n) if n.state == NodeState::NodeDown as i32 => down_since
                    .get(id)
                    .is_some_and(|t| now.duration_since(*t) >= cfg.recovery_grace),
                Some(_) => false,
            }
        };
        let mut placers: HashMap<u32, Placer> = HashMap::new();
        let candidates = self.candidates(state);
        let mut tasks = Vec::new();
        for c in state.all_chunks() {
            if tasks.len() >= cfg.max_tasks_per_round {
                break;
            }
            if !c.joining.is_empty() || state.has_task_for(c.volume_id, c.index) {
                continue;
            }
            let Some((replicas, chunk_size)) = state.volume_replicas(c.volume_id) else {
                continue;
            };
            let lost = c.replicas.iter().find(|r| replace(r)).cloned();
            let short = c.replicas.len() < replicas as usize;
            if lost.is_none() && !short {
                continue;
            }
            // A chunk short of a replica because a write failed there: the node that failed
            // is replaced, not chosen again while it may still be failing.
            let mut current = c.replicas.clone();
            let lost = match lost {
                Some(l) => l,
                None => match state
                    .orphan_holders(c.volume_id, c.index)
                    .into_iter()
                    .next()
                {
                    Some(h) => {
                        current.push(h.clone());
                        h
                    }
                    None => String::new(),
                },
            };
            let placer = match placers.entry(replicas) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    match Placer::new(candidates.clone(), replicas as usize, cfg.scatter_width) {
                        Ok(p) => v.insert(p),
                        Err(e) => {
                            tracing::warn!(error = %e, "no placement for recovery");
                            continue;
                        }
                    }
                }
            };
            match placer.replace(&current, &lost, chunk_size) {
                Ok(target) => tasks.push(RecoveryTask {
                    id: 0,
                    volume_id: c.volume_id,
                    index: c.index,
                    lost,
                    target,
                    state: TaskState::TaskPending as i32,
                    created_ms: 0,
                    copied_bytes: 0,
                }),
                Err(e) => {
                    tracing::debug!(volume = c.volume_id, index = c.index, error = %e, "no replacement yet")
                }
            }
        }
        tasks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ironsan_common::proto::manager::{
        apply_result, Command, CreateVolumeCmd, RegisterNodeRequest, RemoveReplicaCmd, ReplicaSet,
    };

    fn apply(state: &mut State, op: Op) {
        let r = state.apply(&Command {
            now_ms: 1,
            op: Some(op),
        });
        assert!(
            !matches!(r.result, Some(apply_result::Result::Error(_))),
            "{r:?}"
        );
    }

    fn disk() -> Disk {
        Disk {
            path: "d".into(),
            state: DiskState::DiskHealthy as i32,
            capacity: 1 << 40,
            free: 1 << 40,
        }
    }

    /// `nodes` registered, and volume 1 ("v") of one 64 MiB chunk on the first three.
    fn one_chunk_on(nodes: &[&str]) -> State {
        let mut state = State::new();
        for n in nodes {
            apply(
                &mut state,
                Op::RegisterNode(RegisterNodeRequest {
                    id: n.to_string(),
                    addr: "127.0.0.1:1".into(),
                    zone: String::new(),
                    disks: vec![disk()],
                }),
            );
        }
        apply(
            &mut state,
            Op::CreateVolume(CreateVolumeCmd {
                name: "v".into(),
                size: 64 << 20,
                replicas: 3,
                chunk_size: 64 << 20,
                qos: None,
                placement: vec![ReplicaSet {
                    nodes: nodes[..3].iter().map(|n| n.to_string()).collect(),
                }],
            }),
        );
        state
    }

    #[test]
    fn drop_orders_of_a_deleted_volume_cover_writer_epochs() {
        let mut state = one_chunk_on(&["n1", "n2", "n3"]);
        let vref = || {
            Some(ironsan_common::proto::manager::VolumeRef {
                id: 1,
                name: String::new(),
            })
        };
        // Two attachments: the replicas have seen writer epoch 2 (chunk epoch still 1).
        for _ in 0..2 {
            apply(
                &mut state,
                Op::Attach(ironsan_common::proto::manager::AttachCmd {
                    volume: vref(),
                    gateway: "g".into(),
                    lease_ms: 0,
                    portal: String::new(),
                }),
            );
        }
        apply(
            &mut state,
            Op::Detach(ironsan_common::proto::manager::DetachCmd {
                volume: vref(),
                gateway: "g".into(),
                force: false,
            }),
        );
        apply(
            &mut state,
            Op::DeleteVolume(ironsan_common::proto::manager::DeleteVolumeCmd { volume: vref() }),
        );
        let orders = state.orphans_of("n1");
        assert_eq!(orders.len(), 1);
        assert!(
            orders[0].epoch >= 2,
            "drop order at epoch {}",
            orders[0].epoch
        );
    }

    #[test]
    fn unserved_snapshot_work_goes_to_the_next_gateway_once_a_second() {
        use ironsan_common::proto::manager::{
            AttachCmd, CreateSnapshotCmd, RegisterGatewayRequest, VolumeRef,
        };
        let mut state = one_chunk_on(&["n1", "n2", "n3"]);
        let vref = || {
            Some(VolumeRef {
                id: 1,
                name: String::new(),
            })
        };
        for g in ["g1", "g2"] {
            apply(
                &mut state,
                Op::RegisterGateway(RegisterGatewayRequest {
                    id: g.into(),
                    portal: "127.0.0.1:3260".into(),
                }),
            );
        }
        // g1 holds the volume until 10_001 and is to take a snapshot.
        apply(
            &mut state,
            Op::Attach(AttachCmd {
                volume: vref(),
                gateway: "g1".into(),
                lease_ms: 0,
                portal: String::new(),
            }),
        );
        apply(
            &mut state,
            Op::CreateSnapshot(CreateSnapshotCmd {
                volume: vref(),
                name: "s".into(),
                ..Default::default()
            }),
        );
        let health = Health::default();
        health.set_leader(true);
        let t = Instant::now();
        assert!(
            health.plan_work(&state, 5_000, t).is_empty(),
            "g1's lease runs"
        );
        let ops = health.plan_work(&state, 20_000, t);
        let [Op::AssignWork(w)] = ops.as_slice() else {
            panic!("expected one work assignment, got {ops:?}");
        };
        assert_eq!((w.volume_id, w.gateway.as_str()), (1, "g2"), "away from g1");
        assert!(
            health
                .plan_work(&state, 20_000, t + Duration::from_millis(500))
                .is_empty(),
            "not again within a second"
        );
        assert_eq!(health.plan_work(&state, 20_000, t + WORK_RETRY).len(), 1);
        let r = state.apply(&Command {
            now_ms: 20_000,
            op: ops.first().cloned(),
        });
        let Some(apply_result::Result::Attachment(a)) = r.result else {
            panic!("{r:?}");
        };
        assert!(
            a.work && a.gateway == "g2" && a.lease_expires_ms == 30_000,
            "{a:?}"
        );
        assert!(
            health
                .plan_work(&state, 21_000, t + 3 * WORK_RETRY)
                .is_empty(),
            "g2 holds it now"
        );
    }

    #[test]
    fn a_chunk_short_after_a_failed_write_is_not_given_back_to_the_failed_node() {
        let mut state = one_chunk_on(&["n1", "n2", "n3", "n4"]);
        // A gateway's write to n3 failed: the manager committed its removal.
        apply(
            &mut state,
            Op::RemoveReplica(RemoveReplicaCmd {
                volume_id: 1,
                index: 0,
                node_id: "n3".into(),
                writer_epoch: 0,
            }),
        );
        let health = Health::default();
        health.set_leader(true);
        let cfg = HealthConfig::default();
        for n in ["n1", "n2", "n3", "n4"] {
            let hb = HeartbeatRequest {
                id: n.into(),
                disks: vec![disk()],
                dropped: Vec::new(),
                ..Default::default()
            };
            health.heartbeat(&state, &hb, &cfg).expect("heartbeat");
        }
        let ops = health.plan(&state, &cfg);
        let Some(Op::CreateTasks(c)) = ops.first() else {
            panic!("expected a recovery task, got {ops:?}");
        };
        assert_eq!(c.tasks.len(), 1);
        assert_eq!(c.tasks[0].target, "n4", "n3 just failed a write");
        assert_eq!(c.tasks[0].lost, "n3");
    }
}
