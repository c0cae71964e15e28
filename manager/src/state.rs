//! The replicated state machine: storage nodes, volumes, chunk replica sets with epochs,
//! attachments with leases, recovery tasks and Raft members.
//!
//! `apply` is a pure function of (state, command): every member applies the same log to the
//! same result. Anything clock-dependent uses the `now_ms` the leader stamped into the command;
//! anything placement-dependent was decided by the leader and is only *validated* here. A
//! command that fails validation changes nothing and returns an error result, so no request is
//! ever half-applied.
//!
//! Epochs: each volume has one counter. Attaching a gateway takes the next value as its writer
//! epoch; every change of a chunk's replica set takes the next value as the chunk's epoch. A
//! gateway sends `max(writer epoch, chunk epoch)` to storage, which refuses anything older than
//! the newest it has seen, so both a new writer and a new replica set fence the old ones.
//!
//! Attachments: a volume has at most one, naming the gateway that serves it, its writer epoch,
//! lease and advertised portal. An operator's `Attach` takes it for a gateway; CSI's `Publish`
//! takes it for the gateway of the node the volume is published to (gateway id = CSI node id),
//! and lists the node in `published`. A volume published read-only may be published to more
//! nodes, which all reach the one serving gateway through its portal. The holder attaching
//! again keeps the publications; the last `Unpublish`, or a `Detach`, drops the attachment.
//!
//! Gateways: each announces its id and portal at start (`RegisterGateway`), so CSI can tell an
//! unknown node (NOT_FOUND) from a known one and hand out the portal of the gateway serving a
//! volume. The registry only grows; a gateway that moves re-registers with its new portal.
//!
//! Snapshots live in their volume's record, oldest first, with cluster-unique ids that are
//! never reused. The manager only keeps the books: the gateway holding the volume takes and
//! deletes them on the replicas and reports back (`SnapshotDone`, fenced by its writer epoch).
//! A volume nobody holds gets a *work attachment* to a registered gateway (`work = true`: the
//! gateway opens it without exporting it). A clone or restore sets the volume's `source` and
//! `fill` on its chunks; the holder copies each chunk before its first I/O and reports it
//! (`SourceCopied`); the last one clears `source`. A snapshot with volumes still filling from
//! it (its dependents) cannot be deleted, nor can their source volume.

use std::collections::{BTreeMap, BTreeSet};

use ironsan_common::proto::manager::{
    self as pb, apply_result, command::Op, ApplyError, ApplyResult, Attachment, Chunk, Command,
    CompleteTaskResponse, Member, Node, NodeChunks, NodeState, RecoveryTask, Snapshot, SnapshotRef,
    SnapshotState, StateSnapshot, TaskState, Volume, VolumeEpoch, VolumeRef, VolumeSource,
    VolumeState,
};
use tonic::Code;

/// Limits that every member enforces identically at apply.
pub const MIN_CHUNK: u64 = 1 << 20;
pub const MAX_CHUNK: u64 = 1 << 30;
pub const DEFAULT_CHUNK: u64 = 64 << 20;
pub const DEFAULT_REPLICAS: u32 = 3;
pub const MAX_REPLICAS: u32 = 5;
/// Replica sets are stored per chunk, so the chunk count bounds the state (and a create's log
/// entry): 256 Ki chunks is 16 TiB at the default chunk size.
pub const MAX_CHUNKS_PER_VOLUME: u64 = 256 * 1024;
pub const LOGICAL_BLOCK: u64 = 512;
pub const DEFAULT_LEASE_MS: u64 = 10_000;
pub const MAX_LEASE_MS: u64 = 300_000;
pub const MAX_NAME: usize = 128;
/// Each snapshot is a copy-on-write layer on every replica of the volume: bounded per volume.
pub const MAX_SNAPSHOTS_PER_VOLUME: usize = 256;
/// QoS bounds: anything beyond is a typo, not a limit (no gateway reaches it).
pub const MAX_QOS_IOPS: u64 = 10_000_000;
pub const MAX_QOS_BPS: u64 = 100 << 30;
pub const DEFAULT_QOS_BURST_MS: u64 = 1000;
pub const MAX_QOS_BURST_MS: u64 = 60_000;

/// An apply-time rejection: a gRPC code and a message for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub code: Code,
    pub message: String,
}

impl Reject {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Reject {
            code,
            message: message.into(),
        }
    }
    fn not_found(what: impl Into<String>) -> Self {
        Reject::new(Code::NotFound, what)
    }
    fn invalid(what: impl Into<String>) -> Self {
        Reject::new(Code::InvalidArgument, what)
    }
    fn precondition(what: impl Into<String>) -> Self {
        Reject::new(Code::FailedPrecondition, what)
    }
}

/// Checks a volume name: what becomes the IQN suffix `iqn.2026-11.io.ironsan:<name>`.
pub fn validate_name(name: &str) -> Result<(), Reject> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(Reject::invalid(format!(
            "volume name must be 1 to {MAX_NAME} characters"
        )));
    }
    let ok = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !ok || name.starts_with(['-', '.']) {
        return Err(Reject::invalid(format!(
            "volume name {name:?} may hold only a-z, 0-9, '-' and '.', and starts with a letter or digit"
        )));
    }
    Ok(())
}

/// Checks a volume's QoS limits and normalises them: `None` when no rate is set (unlimited,
/// whatever the burst), else the limits with the burst defaulted.
pub fn validate_qos(q: Option<&pb::VolumeQos>) -> Result<Option<pb::VolumeQos>, Reject> {
    let Some(q) = q else {
        return Ok(None);
    };
    for (what, v) in [("read IOPS", q.read_iops), ("write IOPS", q.write_iops)] {
        if v > MAX_QOS_IOPS {
            return Err(Reject::invalid(format!(
                "{what} limit {v} is beyond the maximum of {MAX_QOS_IOPS}"
            )));
        }
    }
    for (what, v) in [
        ("read bandwidth", q.read_bps),
        ("write bandwidth", q.write_bps),
    ] {
        if v > MAX_QOS_BPS {
            return Err(Reject::invalid(format!(
                "{what} limit {v} bytes/s is beyond the maximum of {MAX_QOS_BPS} (100 GiB/s)"
            )));
        }
    }
    let rated = q.read_iops | q.write_iops | q.read_bps | q.write_bps != 0;
    let burst = q.burst_ms.unwrap_or(DEFAULT_QOS_BURST_MS);
    if burst > MAX_QOS_BURST_MS {
        return Err(Reject::invalid(format!(
            "burst {burst} ms is beyond the maximum of {MAX_QOS_BURST_MS} ms"
        )));
    }
    if !rated {
        return Ok(None);
    }
    if burst == 0 {
        return Err(Reject::invalid(
            "burst must be at least 1 ms when a limit is set",
        ));
    }
    Ok(Some(pb::VolumeQos {
        burst_ms: Some(burst),
        ..*q
    }))
}

/// Checks size, replica count and chunk size of a create; returns (replicas, chunk_size, chunks)
/// with defaults filled in.
pub fn validate_geometry(
    size: u64,
    replicas: u32,
    chunk_size: u64,
) -> Result<(u32, u64, u64), Reject> {
    let replicas = if replicas == 0 {
        DEFAULT_REPLICAS
    } else {
        replicas
    };
    let chunk_size = if chunk_size == 0 {
        DEFAULT_CHUNK
    } else {
        chunk_size
    };
    if replicas > MAX_REPLICAS {
        return Err(Reject::invalid(format!(
            "replicas must be 1 to {MAX_REPLICAS}, not {replicas}"
        )));
    }
    if !chunk_size.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) {
        return Err(Reject::invalid(format!(
            "chunk size must be a power of two from 1 MiB to 1 GiB, not {chunk_size}"
        )));
    }
    let chunks = check_size(size, chunk_size)?;
    Ok((replicas, chunk_size, chunks))
}

fn check_size(size: u64, chunk_size: u64) -> Result<u64, Reject> {
    if size == 0 || !size.is_multiple_of(LOGICAL_BLOCK) {
        return Err(Reject::invalid(format!(
            "size must be a non-zero multiple of {LOGICAL_BLOCK} bytes, not {size}"
        )));
    }
    let chunks = size.div_ceil(chunk_size);
    if chunks > MAX_CHUNKS_PER_VOLUME {
        return Err(Reject::invalid(format!(
            "size {size} is beyond the limit of {} bytes for chunk size {chunk_size}",
            MAX_CHUNKS_PER_VOLUME * chunk_size
        )));
    }
    Ok(chunks)
}

/// A clone's size: 0 = the snapshot's; never smaller than it.
pub fn clone_size(size: u64, snapshot_size: u64) -> Result<u64, Reject> {
    match size {
        0 => Ok(snapshot_size),
        s if s < snapshot_size => Err(Reject::invalid(format!(
            "a clone cannot be smaller than its source snapshot ({snapshot_size} bytes)"
        ))),
        s => Ok(s),
    }
}

fn snapshot_state(s: &Snapshot) -> &'static str {
    match SnapshotState::try_from(s.state) {
        Ok(SnapshotState::SnapshotCreating) => "being created",
        Ok(SnapshotState::SnapshotReady) => "ready",
        Ok(SnapshotState::SnapshotDeleting) => "being deleted",
        Ok(SnapshotState::SnapshotFailed) => "failed",
        _ => "in no known state",
    }
}

fn is(s: &Snapshot, state: SnapshotState) -> bool {
    s.state == state as i32
}

fn busy(volume: &str, gateway: &str) -> Reject {
    Reject::precondition(format!(
        "volume {volume:?} is busy with snapshot work on gateway {gateway}; retry"
    ))
}

/// The whole replicated state.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct State {
    next_volume_id: u64,
    next_task_id: u64,
    nodes: BTreeMap<String, Node>,
    volumes: BTreeMap<u64, Volume>,
    names: BTreeMap<String, u64>,
    chunks: BTreeMap<(u64, u64), Chunk>,
    epochs: BTreeMap<u64, u64>,
    tasks: BTreeMap<u64, RecoveryTask>,
    /// Replicas a node still holds but no longer owns: node -> (volume, index) -> epoch.
    orphans: BTreeMap<String, BTreeMap<(u64, u64), u64>>,
    /// Replicas a node holds that missed writes while it was Down: resync before use.
    stale: BTreeMap<String, BTreeMap<(u64, u64), u64>>,
    members: BTreeMap<u64, String>,
    members_seen: BTreeSet<u64>,
    gateways: BTreeMap<String, pb::Gateway>,
    next_snapshot_id: u64,
    /// Chunks still to fill from its source, per volume with any (derived from the chunk map,
    /// so that `SourceCopied` need not scan a volume's chunks).
    fills: BTreeMap<u64, u64>,
}

type ApplyOutcome = Result<apply_result::Result, Reject>;

impl State {
    pub fn new() -> Self {
        State {
            next_volume_id: 1,
            next_task_id: 1,
            next_snapshot_id: 1,
            ..Default::default()
        }
    }

    /// Applies one committed command. Never panics on its content.
    pub fn apply(&mut self, cmd: &Command) -> ApplyResult {
        let now = cmd.now_ms;
        let outcome = match &cmd.op {
            None => Err(Reject::invalid("empty command")),
            Some(Op::Noop(_)) => Ok(apply_result::Result::Done(true)),
            Some(Op::CreateVolume(c)) => self.create_volume(c, now),
            Some(Op::ResizeVolume(c)) => self.resize_volume(c),
            Some(Op::DeleteVolume(c)) => self.delete_volume(c, now),
            Some(Op::SetVolumeQos(c)) => self.set_volume_qos(c),
            Some(Op::CreateSnapshot(c)) => self.create_snapshot(c, now),
            Some(Op::SnapshotDone(c)) => self.snapshot_done(c, now),
            Some(Op::DeleteSnapshot(c)) => self.delete_snapshot(c, now),
            Some(Op::CloneVolume(c)) => self.clone_volume(c, now),
            Some(Op::RestoreSnapshot(c)) => self.restore_snapshot(c, now),
            Some(Op::SourceCopied(c)) => self.source_copied(c),
            Some(Op::AssignWork(c)) => self.assign_work(c, now),
            Some(Op::Attach(c)) => self.attach(c, now),
            Some(Op::Renew(c)) => self.renew(c, now),
            Some(Op::Detach(c)) => self.detach(c),
            Some(Op::Publish(c)) => self.publish(c, now),
            Some(Op::Unpublish(c)) => self.unpublish(c),
            Some(Op::RegisterGateway(c)) => self.register_gateway(c, now),
            Some(Op::RegisterNode(c)) => self.register_node(c),
            Some(Op::SetNodeState(c)) => self.set_node_state(c),
            Some(Op::RemoveReplica(c)) => self.remove_replica(c),
            Some(Op::CreateTasks(c)) => self.create_tasks(&c.tasks, now),
            Some(Op::CompleteTask(c)) => self.complete_task(c.id, c.success),
            Some(Op::ReconcileNode(c)) => self.reconcile_node(&c.id),
            Some(Op::NodeUsage(c)) => self.node_usage(&c.id, c.capacity),
            Some(Op::MemberSeen(id)) => {
                if *id != 0 {
                    self.members_seen.insert(*id);
                }
                Ok(apply_result::Result::Done(true))
            }
            Some(Op::ClearOrphans(c)) => {
                self.clear_orphans(c);
                Ok(apply_result::Result::Done(true))
            }
        };
        ApplyResult {
            result: Some(match outcome {
                Ok(r) => r,
                Err(e) => apply_result::Result::Error(ApplyError {
                    code: e.code as i32,
                    message: e.message,
                }),
            }),
        }
    }

    // ---------- reads ----------

    pub fn volume_id(&self, r: &VolumeRef) -> Result<u64, Reject> {
        if r.id != 0 {
            return if self.volumes.contains_key(&r.id) {
                Ok(r.id)
            } else {
                Err(Reject::not_found(format!("volume id {} not found", r.id)))
            };
        }
        if r.name.is_empty() {
            return Err(Reject::invalid("volume id or name required"));
        }
        self.names
            .get(&r.name)
            .copied()
            .ok_or_else(|| Reject::not_found(format!("volume {:?} not found", r.name)))
    }

    /// A volume as clients see it: with its attachment, degraded-chunk count, snapshots and
    /// source (with their view-only fields).
    pub fn volume(&self, r: &VolumeRef) -> Result<Volume, Reject> {
        let id = self.volume_id(r)?;
        Ok(self.volume_view(id))
    }

    fn volume_view(&self, id: u64) -> Volume {
        let mut v = self.volumes.get(&id).cloned().unwrap_or_default();
        v.degraded_chunks = self
            .volume_chunks(id)
            .filter(|c| self.chunk_degraded(c, v.replicas))
            .count() as u64;
        v.snapshots = v.snapshots.iter().map(|s| self.snapshot_view(s)).collect();
        if let Some(src) = v.source.as_mut() {
            src.chunks_left = self.chunks_left(id);
            if let Some(from) = self.volumes.get(&src.volume_id) {
                src.volume_name = from.name.clone();
                if let Some(s) = from.snapshots.iter().find(|s| s.id == src.snapshot_id) {
                    src.snapshot_name = s.name.clone();
                }
            }
        }
        v
    }

    pub fn volumes(&self) -> Vec<Volume> {
        self.volumes
            .keys()
            .map(|&id| self.volume_view(id))
            .collect()
    }

    fn volume_chunks(&self, id: u64) -> impl Iterator<Item = &Chunk> {
        self.chunks.range((id, 0)..=(id, u64::MAX)).map(|(_, c)| c)
    }

    /// Short of replicas, or holding a replica on a node that is not Up.
    pub fn chunk_degraded(&self, c: &Chunk, replicas: u32) -> bool {
        c.replicas.len() < replicas as usize
            || c.replicas.iter().any(|n| {
                self.nodes
                    .get(n)
                    .is_none_or(|n| n.state != NodeState::NodeUp as i32)
            })
    }

    pub fn chunks(&self, r: &VolumeRef, first: u64, count: u64) -> Result<Vec<Chunk>, Reject> {
        let id = self.volume_id(r)?;
        let last = if count == 0 {
            u64::MAX
        } else {
            first.saturating_add(count - 1)
        };
        Ok(self
            .chunks
            .range((id, first)..=(id, last))
            .map(|(_, c)| c.clone())
            .collect())
    }

    pub fn all_chunks(&self) -> impl Iterator<Item = &Chunk> {
        self.chunks.values()
    }

    pub fn node(&self, id: &str) -> Option<&Node> {
        self.nodes.get(id)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    pub fn gateway(&self, id: &str) -> Result<pb::Gateway, Reject> {
        self.gateways
            .get(id)
            .cloned()
            .ok_or_else(|| Reject::not_found(format!("gateway {id:?}")))
    }

    pub fn gateways(&self) -> impl Iterator<Item = &pb::Gateway> {
        self.gateways.values()
    }

    pub fn tasks(&self) -> impl Iterator<Item = &RecoveryTask> {
        self.tasks.values()
    }

    pub fn has_task_for(&self, volume: u64, index: u64) -> bool {
        self.tasks
            .values()
            .any(|t| t.volume_id == volume && t.index == index)
    }

    /// Recovery copies to `node` that a gateway can carry out now (their volume is attached;
    /// the serving gateway does the copy): what the node still has to receive before the
    /// chunks it takes back are fully replicated.
    pub fn recovery_to(&self, node: &str) -> u64 {
        self.tasks
            .values()
            .filter(|t| t.target == node)
            .filter(|t| {
                self.volumes
                    .get(&t.volume_id)
                    .is_some_and(|v| v.attachment.is_some())
            })
            .count() as u64
    }

    pub fn volume_replicas(&self, id: u64) -> Option<(u32, u64)> {
        self.volumes.get(&id).map(|v| (v.replicas, v.chunk_size))
    }

    /// Nodes a chunk was removed from that have not yet dropped their copy (for a chunk that
    /// lost a replica to a failed write, the node that failed).
    pub fn orphan_holders(&self, volume: u64, index: u64) -> Vec<String> {
        self.orphans
            .iter()
            .filter(|(_, m)| m.contains_key(&(volume, index)))
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub fn orphans_of(&self, node: &str) -> Vec<Chunk> {
        Self::listed(self.orphans.get(node))
    }

    pub fn stale_of(&self, node: &str) -> Vec<Chunk> {
        Self::listed(self.stale.get(node))
    }

    fn listed(m: Option<&BTreeMap<(u64, u64), u64>>) -> Vec<Chunk> {
        m.map(|m| {
            m.iter()
                .map(|(&(volume_id, index), &epoch)| Chunk {
                    volume_id,
                    index,
                    epoch,
                    ..Default::default()
                })
                .collect()
        })
        .unwrap_or_default()
    }

    /// The attachment of volume `id` if its lease still runs at `now`.
    pub fn live_attachment(&self, id: u64, now: u64) -> Option<&Attachment> {
        self.volumes
            .get(&id)?
            .attachment
            .as_ref()
            .filter(|a| a.lease_expires_ms > now)
    }

    fn chunks_left(&self, volume: u64) -> u64 {
        self.fills.get(&volume).copied().unwrap_or(0)
    }

    /// Volumes still filling from snapshot `id`: it must outlive their copies.
    fn dependents(&self, id: u64) -> Vec<u64> {
        self.volumes
            .values()
            .filter(|v| v.source.as_ref().is_some_and(|s| s.snapshot_id == id))
            .filter(|v| self.chunks_left(v.id) > 0)
            .map(|v| v.id)
            .collect()
    }

    fn snapshot_view(&self, s: &Snapshot) -> Snapshot {
        Snapshot {
            dependents: self.dependents(s.id),
            volume_name: self
                .volumes
                .get(&s.volume_id)
                .map(|v| v.name.clone())
                .unwrap_or_default(),
            ..s.clone()
        }
    }

    /// Snapshots as clients see them: of one volume (`volume` naming one), the one with id
    /// `id` (none when unknown), or all.
    pub fn snapshots(&self, volume: Option<&VolumeRef>, id: u64) -> Result<Vec<Snapshot>, Reject> {
        let only = match volume.filter(|r| r.id != 0 || !r.name.is_empty()) {
            Some(r) => Some(self.volume_id(r)?),
            None => None,
        };
        Ok(self
            .volumes
            .values()
            .filter(|v| only.is_none_or(|o| o == v.id))
            .flat_map(|v| &v.snapshots)
            .filter(|s| id == 0 || s.id == id)
            .map(|s| self.snapshot_view(s))
            .collect())
    }

    /// One snapshot as clients see it.
    pub fn snapshot_of(&self, r: &SnapshotRef) -> Result<Snapshot, Reject> {
        Ok(self.snapshot_view(self.snap(self.find_snapshot(r)?)))
    }

    /// Where snapshot `id` is: (volume id, position in its list).
    fn snapshot_at(&self, id: u64) -> Option<(u64, usize)> {
        self.volumes.values().find_map(|v| {
            v.snapshots
                .iter()
                .position(|s| s.id == id)
                .map(|i| (v.id, i))
        })
    }

    /// Resolves a snapshot named by id, or by volume and name.
    pub fn find_snapshot(&self, r: &SnapshotRef) -> Result<(u64, usize), Reject> {
        if r.id != 0 {
            return self
                .snapshot_at(r.id)
                .ok_or_else(|| Reject::not_found(format!("snapshot id {} not found", r.id)));
        }
        let vol = self.volume_id(r.volume.as_ref().ok_or_else(|| {
            Reject::invalid("a snapshot id, or a volume and a snapshot name, required")
        })?)?;
        let v = &self.volumes[&vol];
        v.snapshots
            .iter()
            .position(|s| s.name == r.name)
            .map(|i| (vol, i))
            .ok_or_else(|| {
                Reject::not_found(format!(
                    "snapshot {:?} of volume {:?} not found",
                    r.name, v.name
                ))
            })
    }

    /// A position from `find_snapshot`/`snapshot_at` on this same state.
    fn snap(&self, (vol, i): (u64, usize)) -> &Snapshot {
        &self.volumes[&vol].snapshots[i]
    }

    fn snap_mut(&mut self, (vol, i): (u64, usize)) -> Option<&mut Snapshot> {
        self.volumes.get_mut(&vol)?.snapshots.get_mut(i)
    }

    /// Volumes with a snapshot to take or delete and nobody holding them at `now`.
    pub fn unserved_work(&self, now: u64) -> Vec<u64> {
        self.volumes
            .values()
            .filter(|v| Self::pending_work(v) && self.live_attachment(v.id, now).is_none())
            .map(|v| v.id)
            .collect()
    }

    fn pending_work(v: &Volume) -> bool {
        v.snapshots.iter().any(|s| {
            is(s, SnapshotState::SnapshotCreating) || is(s, SnapshotState::SnapshotDeleting)
        })
    }

    /// The gateway to give snapshot work on volume `id` to: of the registered ones in id
    /// order, the one after the volume's last holder (so that work a gateway dropped moves
    /// on), else the first.
    pub fn pick_gateway(&self, id: u64) -> Result<String, Reject> {
        use std::ops::Bound::{Excluded, Unbounded};
        let last = self
            .volumes
            .get(&id)
            .and_then(|v| v.attachment.as_ref())
            .map(|a| a.gateway.as_str());
        last.and_then(|l| {
            self.gateways
                .range::<str, _>((Excluded(l), Unbounded))
                .next()
        })
        .or_else(|| self.gateways.iter().next())
        .map(|(g, _)| g.clone())
        .ok_or_else(|| Reject::precondition("no gateway is registered to take the snapshot"))
    }

    /// The leader's choice of who does new snapshot work on volume `id` at `now`: its live
    /// holder (empty), else `pick_gateway` (which gets a work attachment).
    pub fn work_gateway(&self, id: u64, now: u64) -> Result<String, Reject> {
        match self.live_attachment(id, now) {
            Some(_) => Ok(String::new()),
            None => self.pick_gateway(id),
        }
    }

    pub fn members(&self) -> &BTreeMap<u64, String> {
        &self.members
    }

    pub fn members_seen(&self) -> &BTreeSet<u64> {
        &self.members_seen
    }

    pub fn volume_count(&self) -> usize {
        self.volumes.len()
    }

    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    // ---------- members (from committed configuration changes) ----------

    pub fn set_member(&mut self, id: u64, addr: String) {
        self.members.insert(id, addr);
    }

    pub fn remove_member(&mut self, id: u64) {
        self.members.remove(&id);
    }

    // ---------- volumes ----------

    fn create_volume(&mut self, c: &pb::CreateVolumeCmd, now: u64) -> ApplyOutcome {
        let g = (c.size, c.replicas, c.chunk_size);
        let id = self.new_volume(&c.name, g, c.qos.as_ref(), &c.placement, now)?;
        Ok(apply_result::Result::Volume(self.volume_view(id)))
    }

    /// Validates and adds a volume (a create or a clone) of geometry (size, replicas, chunk
    /// size) on the leader's placement; returns its id.
    fn new_volume(
        &mut self,
        name: &str,
        (size, replicas, chunk_size): (u64, u32, u64),
        qos: Option<&pb::VolumeQos>,
        placement: &[pb::ReplicaSet],
        now: u64,
    ) -> Result<u64, Reject> {
        validate_name(name)?;
        if self.names.contains_key(name) {
            return Err(Reject::new(
                Code::AlreadyExists,
                format!("volume {name:?} already exists"),
            ));
        }
        let (replicas, chunk_size, chunks) = validate_geometry(size, replicas, chunk_size)?;
        let qos = validate_qos(qos)?;
        if placement.len() as u64 != chunks {
            return Err(Reject::new(
                Code::Internal,
                format!("placement has {} sets for {chunks} chunks", placement.len()),
            ));
        }
        for set in placement {
            self.check_set(&set.nodes, replicas)?;
        }
        let id = self.next_volume_id;
        self.next_volume_id += 1;
        self.epochs.insert(id, 1);
        for (index, set) in placement.iter().enumerate() {
            self.add_chunk(id, index as u64, set.nodes.clone(), chunk_size, 1);
        }
        let v = Volume {
            id,
            name: name.to_string(),
            size,
            replicas,
            chunk_size,
            state: VolumeState::VolumeAvailable as i32,
            created_ms: now,
            qos,
            ..Default::default()
        };
        self.names.insert(name.to_string(), id);
        self.volumes.insert(id, v);
        Ok(id)
    }

    /// A placement from the leader must still hold at apply: distinct, known, Up nodes.
    fn check_set(&self, nodes: &[String], replicas: u32) -> Result<(), Reject> {
        let distinct: BTreeSet<&String> = nodes.iter().collect();
        if nodes.len() != replicas as usize || distinct.len() != nodes.len() {
            return Err(Reject::new(
                Code::Aborted,
                "placement changed while the request was in flight; retry",
            ));
        }
        for n in nodes {
            match self.nodes.get(n) {
                Some(node) if node.state == NodeState::NodeUp as i32 => {}
                _ => {
                    return Err(Reject::new(
                        Code::Aborted,
                        format!("node {n} left service while the request was in flight; retry"),
                    ))
                }
            }
        }
        Ok(())
    }

    fn add_chunk(
        &mut self,
        volume_id: u64,
        index: u64,
        replicas: Vec<String>,
        size: u64,
        epoch: u64,
    ) {
        for n in &replicas {
            self.account(n, size as i128, 1);
        }
        self.chunks.insert(
            (volume_id, index),
            Chunk {
                volume_id,
                index,
                epoch,
                replicas,
                joining: String::new(),
                fill: false,
            },
        );
    }

    fn account(&mut self, node: &str, bytes: i128, chunks: i64) {
        if let Some(n) = self.nodes.get_mut(node) {
            n.allocated = (n.allocated as i128 + bytes).max(0) as u64;
            n.chunks = (n.chunks as i64 + chunks).max(0) as u64;
        }
    }

    fn next_epoch(&mut self, volume: u64) -> u64 {
        let e = self.epochs.entry(volume).or_insert(0);
        *e += 1;
        *e
    }

    fn resize_volume(&mut self, c: &pb::ResizeVolumeCmd) -> ApplyOutcome {
        let id = self.volume_id(c.volume.as_ref().unwrap_or(&VolumeRef::default()))?;
        let (old_size, replicas, chunk_size) = {
            let v = &self.volumes[&id];
            (v.size, v.replicas, v.chunk_size)
        };
        if c.size < old_size {
            return Err(Reject::precondition(format!(
                "shrinking is not supported: {} is below the current size {old_size}",
                c.size
            )));
        }
        let chunks = check_size(c.size, chunk_size)?;
        let have = old_size.div_ceil(chunk_size);
        if c.placement.len() as u64 != chunks - have {
            return Err(Reject::new(
                Code::Aborted,
                "volume changed while the resize was in flight; retry",
            ));
        }
        for set in &c.placement {
            self.check_set(&set.nodes, replicas)?;
        }
        for (i, set) in c.placement.iter().enumerate() {
            let epoch = self.next_epoch(id);
            self.add_chunk(id, have + i as u64, set.nodes.clone(), chunk_size, epoch);
        }
        if let Some(v) = self.volumes.get_mut(&id) {
            v.size = c.size;
        }
        Ok(apply_result::Result::Volume(self.volume_view(id)))
    }

    fn set_volume_qos(&mut self, c: &pb::SetVolumeQosCmd) -> ApplyOutcome {
        let id = self.volume_id(c.volume.as_ref().unwrap_or(&VolumeRef::default()))?;
        let qos = validate_qos(c.qos.as_ref())?;
        let Some(v) = self.volumes.get_mut(&id) else {
            return Err(Reject::not_found(format!("volume {id} not found")));
        };
        if v.state == VolumeState::VolumeDeleting as i32 {
            return Err(Reject::precondition(format!(
                "volume {:?} is being deleted",
                v.name
            )));
        }
        v.qos = qos;
        Ok(apply_result::Result::Volume(self.volume_view(id)))
    }

    fn delete_volume(&mut self, c: &pb::DeleteVolumeCmd, now: u64) -> ApplyOutcome {
        let id = self.volume_id(c.volume.as_ref().unwrap_or(&VolumeRef::default()))?;
        if let Some(a) = self.volumes[&id].attachment.as_ref() {
            if a.lease_expires_ms > now {
                return Err(Reject::precondition(format!(
                    "volume is attached to gateway {}; detach it first",
                    a.gateway
                )));
            }
        }
        // A clone or restore of another volume still reads this one's snapshots.
        if let Some(v) = self.volumes.values().find(|v| {
            v.id != id
                && v.source.as_ref().is_some_and(|s| s.volume_id == id)
                && self.chunks_left(v.id) > 0
        }) {
            return Err(Reject::precondition(format!(
                "volume {:?} is still being filled from it",
                v.name
            )));
        }
        let keys: Vec<(u64, u64)> = self
            .chunks
            .range((id, 0)..=(id, u64::MAX))
            .map(|(k, _)| *k)
            .collect();
        // Replicas carry the newest epoch any request brought them, writer epochs included: the
        // drop order must not be older, or storage keeps the data (fenced delete).
        let last_epoch = self.epochs.get(&id).copied().unwrap_or(0);
        for key in keys {
            if let Some(chunk) = self.chunks.remove(&key) {
                let size = self.volumes[&id].chunk_size;
                for n in chunk
                    .replicas
                    .iter()
                    .chain(Some(&chunk.joining).filter(|j| !j.is_empty()))
                {
                    self.account(n, -(size as i128), -1);
                    self.orphan(n, key, chunk.epoch.max(last_epoch));
                }
            }
        }
        self.tasks.retain(|_, t| t.volume_id != id);
        for m in self.stale.values_mut() {
            m.retain(|k, _| k.0 != id);
        }
        self.epochs.remove(&id);
        self.fills.remove(&id);
        // Its snapshots go with it; a snapshot of another volume it was filling from is free.
        if let Some(v) = self.volumes.remove(&id) {
            self.names.remove(&v.name);
            if let Some(src) = v.source {
                self.release(src.snapshot_id);
            }
        }
        Ok(apply_result::Result::Done(true))
    }

    fn orphan(&mut self, node: &str, key: (u64, u64), epoch: u64) {
        self.orphans
            .entry(node.to_string())
            .or_default()
            .insert(key, epoch);
        if let Some(s) = self.stale.get_mut(node) {
            s.remove(&key);
        }
    }

    /// A node placed on a chunk again must not be told to drop it.
    fn unorphan(&mut self, node: &str, key: (u64, u64)) {
        if let Some(m) = self.orphans.get_mut(node) {
            m.remove(&key);
            if m.is_empty() {
                self.orphans.remove(node);
            }
        }
    }

    fn clear_orphans(&mut self, c: &NodeChunks) {
        if let Some(m) = self.orphans.get_mut(&c.node_id) {
            for ch in &c.chunks {
                // Only the entry that was listed: a newer orphaning of the same chunk stays.
                if m.get(&(ch.volume_id, ch.index)) == Some(&ch.epoch) {
                    m.remove(&(ch.volume_id, ch.index));
                }
            }
            if m.is_empty() {
                self.orphans.remove(&c.node_id);
            }
        }
    }

    // ---------- attachments ----------

    /// The lease asked for, with the default filled in and the limit enforced.
    fn lease_length(lease_ms: u64) -> Result<u64, Reject> {
        match lease_ms {
            0 => Ok(DEFAULT_LEASE_MS),
            l if l <= MAX_LEASE_MS => Ok(l),
            l => Err(Reject::invalid(format!(
                "lease of {l} ms is beyond {MAX_LEASE_MS} ms"
            ))),
        }
    }

    /// A fresh attachment of `id` to `gateway`: the next writer epoch, which fences every
    /// earlier holder. Not stored yet.
    fn grant(&mut self, id: u64, gateway: &str, lease_ms: u64, now: u64) -> Attachment {
        Attachment {
            volume_id: id,
            gateway: gateway.to_string(),
            writer_epoch: self.next_epoch(id),
            lease_expires_ms: now.saturating_add(lease_ms),
            lease_ms,
            ..Default::default()
        }
    }

    fn set_attachment(&mut self, id: u64, a: Option<Attachment>) {
        if let Some(v) = self.volumes.get_mut(&id) {
            v.attachment = a;
        }
    }

    fn attach(&mut self, c: &pb::AttachCmd, now: u64) -> ApplyOutcome {
        let id = self.volume_id(c.volume.as_ref().unwrap_or(&VolumeRef::default()))?;
        if c.gateway.is_empty() {
            return Err(Reject::invalid("gateway id required"));
        }
        let lease_ms = Self::lease_length(c.lease_ms)?;
        let prev = self.volumes[&id].attachment.clone();
        if let Some(a) = &prev {
            if a.gateway != c.gateway && a.lease_expires_ms > now {
                if a.work {
                    return Err(busy(&self.volumes[&id].name, &a.gateway));
                }
                return Err(Reject::precondition(format!(
                    "volume is attached to gateway {} for another {} ms",
                    a.gateway,
                    a.lease_expires_ms - now
                )));
            }
        }
        let mut a = self.grant(id, &c.gateway, lease_ms, now);
        a.portal = c.portal.clone();
        // The holder attaching again (its gateway opening the volume, a restart) keeps the CSI
        // publications: the nodes still use the volume. A new holder starts with none.
        if let Some(prev) = prev.filter(|p| p.gateway == c.gateway) {
            // The work gateway opening the volume for its snapshot work.
            a.work = prev.work && prev.lease_expires_ms > now;
            a.readonly = prev.readonly;
            a.published = prev.published;
            if a.portal.is_empty() {
                a.portal = prev.portal;
            }
        }
        self.set_attachment(id, Some(a.clone()));
        Ok(apply_result::Result::Attachment(a))
    }

    fn current_attachment(
        &self,
        id: u64,
        gateway: &str,
        epoch: u64,
        now: u64,
    ) -> Result<&Attachment, Reject> {
        match &self.volumes[&id].attachment {
            Some(a)
                if a.gateway == gateway && a.writer_epoch == epoch && a.lease_expires_ms > now =>
            {
                Ok(a)
            }
            Some(a) if a.gateway == gateway && a.writer_epoch == epoch => Err(
                Reject::precondition("lease expired; attach again for a new writer epoch"),
            ),
            Some(a) => Err(Reject::precondition(format!(
                "stale attachment: volume is held by gateway {} at writer epoch {}",
                a.gateway, a.writer_epoch
            ))),
            None => Err(Reject::precondition("volume is not attached")),
        }
    }

    fn renew(&mut self, c: &pb::RenewCmd, now: u64) -> ApplyOutcome {
        let id = self.volume_id(c.volume.as_ref().unwrap_or(&VolumeRef::default()))?;
        let lease_ms = self
            .current_attachment(id, &c.gateway, c.writer_epoch, now)?
            .lease_ms;
        let v = self
            .volumes
            .get_mut(&id)
            .ok_or_else(|| Reject::not_found("volume"))?;
        let a = v
            .attachment
            .as_mut()
            .ok_or_else(|| Reject::precondition("volume is not attached"))?;
        a.lease_expires_ms = now.saturating_add(lease_ms);
        Ok(apply_result::Result::Attachment(a.clone()))
    }

    fn detach(&mut self, c: &pb::DetachCmd) -> ApplyOutcome {
        let id = self.volume_id(c.volume.as_ref().unwrap_or(&VolumeRef::default()))?;
        let v = self
            .volumes
            .get_mut(&id)
            .ok_or_else(|| Reject::not_found("volume"))?;
        match &v.attachment {
            None => Ok(apply_result::Result::Done(true)),
            Some(a) if c.force || a.gateway == c.gateway => {
                v.attachment = None;
                Ok(apply_result::Result::Done(true))
            }
            Some(a) => Err(Reject::precondition(format!(
                "volume is attached to gateway {}, not {:?} (use force to detach it)",
                a.gateway, c.gateway
            ))),
        }
    }

    // ---------- gateways ----------

    fn register_gateway(&mut self, c: &pb::RegisterGatewayRequest, now: u64) -> ApplyOutcome {
        if c.id.is_empty() || c.id.len() > 253 {
            return Err(Reject::invalid("gateway id must be 1 to 253 characters"));
        }
        let portal_ok = c.portal.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
        });
        if !portal_ok {
            return Err(Reject::invalid(format!(
                "gateway portal {:?} is not host:port",
                c.portal
            )));
        }
        let g = self
            .gateways
            .entry(c.id.clone())
            .or_insert_with(|| pb::Gateway {
                id: c.id.clone(),
                registered_ms: now,
                ..Default::default()
            });
        g.portal = c.portal.clone();
        Ok(apply_result::Result::Gateway(g.clone()))
    }

    // ---------- publications (CSI) ----------

    fn publish(&mut self, c: &pb::PublishCmd, now: u64) -> ApplyOutcome {
        let id = self.volume_id(c.volume.as_ref().unwrap_or(&VolumeRef::default()))?;
        if c.node.is_empty() {
            return Err(Reject::invalid("node id required"));
        }
        let lease_ms = Self::lease_length(c.lease_ms)?;
        let v = &self.volumes[&id];
        if v.state == VolumeState::VolumeDeleting as i32 {
            return Err(Reject::precondition(format!(
                "volume {:?} is being deleted",
                v.name
            )));
        }
        let mode = |readonly: bool| if readonly { "read-only" } else { "read-write" };
        // A lapsed work attachment holds nothing: replaced as if there were none.
        let current = match v.attachment.clone() {
            Some(a) if a.work && a.lease_expires_ms <= now => None,
            Some(a) if a.work && a.gateway != c.node => return Err(busy(&v.name, &a.gateway)),
            // The node's own gateway is doing snapshot work on it: it serves the volume now.
            Some(a) if a.work => Some(Attachment { work: false, ..a }),
            other => other,
        };
        let a = match current {
            None => {
                // The node's gateway opens it (its own attach, a new epoch again) and fills in
                // the portal.
                let mut a = self.grant(id, &c.node, lease_ms, now);
                a.readonly = c.readonly;
                a.published = vec![c.node.clone()];
                a
            }
            Some(a) if a.published.contains(&c.node) => {
                if a.readonly != c.readonly {
                    return Err(Reject::new(
                        Code::AlreadyExists,
                        format!(
                            "volume is published to {} {} already",
                            c.node,
                            mode(a.readonly)
                        ),
                    ));
                }
                // A retried publish: nothing changes, the epoch least of all.
                return Ok(apply_result::Result::Attachment(a));
            }
            // An operator attached it to this node's gateway: the publication takes it over.
            Some(mut a) if a.published.is_empty() && a.gateway == c.node => {
                a.published = vec![c.node.clone()];
                a.readonly = c.readonly;
                a
            }
            // More readers: they all use the gateway already serving it.
            Some(mut a) if a.readonly && c.readonly && !a.published.is_empty() => {
                a.published.push(c.node.clone());
                a
            }
            Some(a) if a.published.is_empty() => {
                return Err(Reject::precondition(format!(
                    "volume is attached to gateway {} (not published); cannot publish it to {}",
                    a.gateway, c.node
                )))
            }
            Some(a) => {
                return Err(Reject::precondition(format!(
                    "volume is published {} to {}; cannot publish it {} to {}",
                    mode(a.readonly),
                    a.published.join(", "),
                    mode(c.readonly),
                    c.node
                )))
            }
        };
        self.set_attachment(id, Some(a.clone()));
        Ok(apply_result::Result::Attachment(a))
    }

    fn unpublish(&mut self, c: &pb::UnpublishCmd) -> ApplyOutcome {
        let id = self.volume_id(c.volume.as_ref().unwrap_or(&VolumeRef::default()))?;
        if c.node.is_empty() {
            return Err(Reject::invalid("node id required"));
        }
        let Some(mut a) = self.volumes[&id].attachment.clone() else {
            return Ok(apply_result::Result::Done(true));
        };
        if !a.published.contains(&c.node) {
            return Ok(apply_result::Result::Done(true));
        }
        a.published.retain(|n| *n != c.node);
        // The last node out releases the volume like a detach. While others remain, the gateway
        // serving it keeps its lease and epoch, even when it is the departing node's.
        let keep = !a.published.is_empty();
        self.set_attachment(id, keep.then_some(a));
        Ok(apply_result::Result::Done(true))
    }

    // ---------- nodes ----------

    fn register_node(&mut self, c: &pb::RegisterNodeRequest) -> ApplyOutcome {
        if c.id.is_empty() || c.id.len() > MAX_NAME {
            return Err(Reject::invalid("node id must be 1 to 128 characters"));
        }
        if c.addr.parse::<std::net::SocketAddr>().is_err() && !c.addr.contains(':') {
            return Err(Reject::invalid(format!(
                "node address {:?} is not host:port",
                c.addr
            )));
        }
        let capacity = c.disks.iter().map(|d| d.capacity).sum();
        let node = self.nodes.entry(c.id.clone()).or_insert_with(|| Node {
            id: c.id.clone(),
            state: NodeState::NodeUp as i32,
            ..Default::default()
        });
        node.addr = c.addr.clone();
        node.zone = c.zone.clone();
        node.disks = c.disks.clone();
        node.capacity = capacity;
        // A Down node registering again comes back Up; a Draining one stays Draining.
        if node.state == NodeState::NodeDown as i32 {
            node.state = NodeState::NodeUp as i32;
            self.mark_stale(&c.id);
        }
        Ok(apply_result::Result::Node(self.nodes[&c.id].clone()))
    }

    fn set_node_state(&mut self, c: &pb::SetNodeStateCmd) -> ApplyOutcome {
        let state = NodeState::try_from(c.state)
            .ok()
            .filter(|s| *s != NodeState::Unspecified)
            .ok_or_else(|| Reject::invalid(format!("bad node state {}", c.state)))?;
        let node = self
            .nodes
            .get_mut(&c.id)
            .ok_or_else(|| Reject::not_found(format!("node {:?} not found", c.id)))?;
        let was = node.state;
        node.state = state as i32;
        if was == NodeState::NodeDown as i32 && state == NodeState::NodeUp {
            self.mark_stale(&c.id);
        }
        Ok(apply_result::Result::Node(self.nodes[&c.id].clone()))
    }

    /// A node returning from Down still listed in replica sets may have missed writes.
    fn mark_stale(&mut self, node: &str) {
        let held: BTreeMap<(u64, u64), u64> = self
            .chunks
            .iter()
            .filter(|(_, c)| c.replicas.iter().any(|r| r == node))
            .map(|(k, c)| (*k, c.epoch))
            .collect();
        if !held.is_empty() {
            self.stale.entry(node.to_string()).or_default().extend(held);
        }
    }

    /// The node reported it resynced (or the rebuild path confirmed) its stale replicas.
    fn reconcile_node(&mut self, id: &str) -> ApplyOutcome {
        if !self.nodes.contains_key(id) {
            return Err(Reject::not_found(format!("node {id:?} not found")));
        }
        self.stale.remove(id);
        Ok(apply_result::Result::Done(true))
    }

    fn node_usage(&mut self, id: &str, capacity: u64) -> ApplyOutcome {
        let node = self
            .nodes
            .get_mut(id)
            .ok_or_else(|| Reject::not_found(format!("node {id:?} not found")))?;
        node.capacity = capacity;
        Ok(apply_result::Result::Node(node.clone()))
    }

    // ---------- replica sets and recovery ----------

    fn remove_replica(&mut self, c: &pb::RemoveReplicaCmd) -> ApplyOutcome {
        let key = (c.volume_id, c.index);
        let (replicas, size) = self
            .volume_replicas(c.volume_id)
            .ok_or_else(|| Reject::not_found(format!("volume id {} not found", c.volume_id)))?;
        let _ = replicas;
        let chunk = self.chunks.get(&key).ok_or_else(|| {
            Reject::not_found(format!("chunk {}/{} not found", c.volume_id, c.index))
        })?;
        if c.writer_epoch != 0 {
            self.check_writer(c.volume_id, c.writer_epoch)?;
        }
        let in_set = chunk.replicas.contains(&c.node_id);
        let joining = chunk.joining == c.node_id;
        if !in_set && !joining {
            // Already removed (a retried report): answer with the current set.
            return Ok(apply_result::Result::Chunk(chunk.clone()));
        }
        if in_set && chunk.replicas.len() == 1 {
            return Err(Reject::precondition(format!(
                "node {} holds the last replica of chunk {}/{}",
                c.node_id, c.volume_id, c.index
            )));
        }
        let epoch = self.next_epoch(c.volume_id);
        let chunk = self
            .chunks
            .get_mut(&key)
            .ok_or_else(|| Reject::not_found("chunk"))?;
        if joining {
            chunk.joining.clear();
        } else {
            chunk.replicas.retain(|r| *r != c.node_id);
        }
        chunk.epoch = epoch;
        let out = chunk.clone();
        // A recovery task copying to a failed joiner is re-placed by the health loop.
        if joining {
            self.tasks
                .retain(|_, t| !(t.volume_id == c.volume_id && t.index == c.index));
        }
        self.account(&c.node_id, -(size as i128), -1);
        self.orphan(&c.node_id, key, epoch);
        Ok(apply_result::Result::Chunk(out))
    }

    fn create_tasks(&mut self, tasks: &[RecoveryTask], now: u64) -> ApplyOutcome {
        // All or nothing: validate every task first.
        for t in tasks {
            let chunk = self.chunks.get(&(t.volume_id, t.index)).ok_or_else(|| {
                Reject::new(
                    Code::Aborted,
                    format!("chunk {}/{} is gone", t.volume_id, t.index),
                )
            })?;
            let target_ok = self
                .nodes
                .get(&t.target)
                .is_some_and(|n| n.state == NodeState::NodeUp as i32);
            if !chunk.joining.is_empty()
                || chunk.replicas.contains(&t.target)
                || !target_ok
                || self.has_task_for(t.volume_id, t.index)
            {
                return Err(Reject::new(
                    Code::Aborted,
                    format!(
                        "chunk {}/{} changed since the task was planned",
                        t.volume_id, t.index
                    ),
                ));
            }
        }
        for t in tasks {
            let id = self.next_task_id;
            self.next_task_id += 1;
            let epoch = self.next_epoch(t.volume_id);
            let size = self.volumes.get(&t.volume_id).map_or(0, |v| v.chunk_size);
            if let Some(chunk) = self.chunks.get_mut(&(t.volume_id, t.index)) {
                chunk.joining = t.target.clone();
                chunk.epoch = epoch;
            }
            self.account(&t.target, size as i128, 1);
            self.unorphan(&t.target, (t.volume_id, t.index));
            self.tasks.insert(
                id,
                RecoveryTask {
                    id,
                    state: TaskState::TaskPending as i32,
                    created_ms: now,
                    copied_bytes: 0,
                    ..t.clone()
                },
            );
        }
        Ok(apply_result::Result::Done(true))
    }

    fn complete_task(&mut self, id: u64, success: bool) -> ApplyOutcome {
        let task = self
            .tasks
            .remove(&id)
            .ok_or_else(|| Reject::not_found(format!("recovery task {id} not found")))?;
        let key = (task.volume_id, task.index);
        let size = self
            .volumes
            .get(&task.volume_id)
            .map_or(0, |v| v.chunk_size);
        let epoch = self.next_epoch(task.volume_id);
        let Some(chunk) = self.chunks.get_mut(&key) else {
            return Err(Reject::not_found(format!(
                "chunk {}/{} not found",
                key.0, key.1
            )));
        };
        chunk.joining.clear();
        chunk.epoch = epoch;
        let mut dropped = Vec::new();
        if success {
            if chunk.replicas.contains(&task.lost) {
                chunk.replicas.retain(|r| *r != task.lost);
                dropped.push(task.lost.clone());
            }
            chunk.replicas.push(task.target.clone());
        } else {
            dropped.push(task.target.clone());
        }
        let out = chunk.clone();
        for n in dropped {
            self.account(&n, -(size as i128), -1);
            self.orphan(&n, key, epoch);
        }
        Ok(apply_result::Result::Task(CompleteTaskResponse {
            chunk: Some(out),
        }))
    }

    // ---------- volume snapshots, clones and restores ----------

    /// Only the current holder of volume `id` (at writer epoch `epoch`) reports on its chunks
    /// and snapshots.
    fn check_writer(&self, id: u64, epoch: u64) -> Result<(), Reject> {
        let current = self
            .volumes
            .get(&id)
            .and_then(|v| v.attachment.as_ref())
            .map(|a| a.writer_epoch);
        if current != Some(epoch) {
            return Err(Reject::precondition(format!(
                "writer epoch {epoch} is not the volume's current attachment ({current:?})"
            )));
        }
        Ok(())
    }

    /// A volume that may take new work: not being deleted.
    fn usable(&self, id: u64) -> Result<&Volume, Reject> {
        let v = self
            .volumes
            .get(&id)
            .ok_or_else(|| Reject::not_found(format!("volume id {id} not found")))?;
        if v.state == VolumeState::VolumeDeleting as i32 {
            return Err(Reject::precondition(format!(
                "volume {:?} is being deleted",
                v.name
            )));
        }
        Ok(v)
    }

    fn check_ready(s: &Snapshot) -> Result<(), Reject> {
        if is(s, SnapshotState::SnapshotReady) {
            return Ok(());
        }
        Err(Reject::precondition(format!(
            "snapshot {:?} is {}, not ready",
            s.name,
            snapshot_state(s)
        )))
    }

    /// Validates the leader's choice for snapshot work on volume `id` (`work_gateway`): empty
    /// means the live holder does it; a named gateway must be registered and the volume free.
    /// Returns the lease of the work attachment to make, if any (`grant_work`).
    fn check_work(
        &self,
        id: u64,
        gateway: &str,
        lease_ms: u64,
        now: u64,
    ) -> Result<Option<u64>, Reject> {
        match (gateway.is_empty(), self.live_attachment(id, now)) {
            (true, Some(_)) => Ok(None),
            (true, None) => Err(Reject::new(
                Code::Aborted,
                "the volume's attachment lapsed while the request was in flight; retry",
            )),
            (false, Some(a)) => Err(Reject::new(
                Code::Aborted,
                format!(
                    "volume was attached to gateway {} while the request was in flight; retry",
                    a.gateway
                ),
            )),
            (false, None) if !self.gateways.contains_key(gateway) => Err(Reject::precondition(
                format!("gateway {gateway:?} is not registered"),
            )),
            (false, None) => Self::lease_length(lease_ms).map(Some),
        }
    }

    /// A work attachment: a new writer epoch, like any attach, for a gateway that opens the
    /// volume only to take or delete its snapshots.
    fn grant_work(&mut self, id: u64, gateway: &str, lease: Option<u64>, now: u64) {
        if let Some(lease_ms) = lease {
            let a = self.grant(id, gateway, lease_ms, now);
            self.set_attachment(id, Some(Attachment { work: true, ..a }));
        }
    }

    fn create_snapshot(&mut self, c: &pb::CreateSnapshotCmd, now: u64) -> ApplyOutcome {
        let id = self.volume_id(c.volume.as_ref().unwrap_or(&VolumeRef::default()))?;
        let v = self.usable(id)?;
        validate_name(&c.name)
            .map_err(|e| Reject::invalid(e.message.replacen("volume name", "snapshot name", 1)))?;
        if v.snapshots.iter().any(|s| s.name == c.name) {
            return Err(Reject::new(
                Code::AlreadyExists,
                format!("volume {:?} has a snapshot {:?} already", v.name, c.name),
            ));
        }
        if v.snapshots.len() >= MAX_SNAPSHOTS_PER_VOLUME {
            return Err(Reject::new(
                Code::ResourceExhausted,
                format!(
                    "volume {:?} has {MAX_SNAPSHOTS_PER_VOLUME} snapshots, the most it may \
                     have; delete some first",
                    v.name
                ),
            ));
        }
        let s = Snapshot {
            id: self.next_snapshot_id,
            volume_id: id,
            name: c.name.clone(),
            state: SnapshotState::SnapshotCreating as i32,
            created_ms: now,
            size: v.size,
            internal: c.internal,
            ..Default::default()
        };
        let lease = self.check_work(id, &c.gateway, c.lease_ms, now)?;
        self.next_snapshot_id += 1;
        self.grant_work(id, &c.gateway, lease, now);
        if let Some(v) = self.volumes.get_mut(&id) {
            v.snapshots.push(s.clone());
        }
        Ok(apply_result::Result::Snapshot(self.snapshot_view(&s)))
    }

    fn snapshot_done(&mut self, c: &pb::SnapshotDoneRequest, now: u64) -> ApplyOutcome {
        let at = self
            .snapshot_at(c.id)
            .ok_or_else(|| Reject::not_found(format!("snapshot id {} not found", c.id)))?;
        self.check_writer(at.0, c.writer_epoch)?;
        let s = self.snap(at);
        let out = self.snapshot_view(s);
        let creating = is(s, SnapshotState::SnapshotCreating);
        if c.deleted && is(s, SnapshotState::SnapshotDeleting) {
            if let Some(v) = self.volumes.get_mut(&at.0) {
                v.snapshots.remove(at.1);
            }
            return Ok(apply_result::Result::Snapshot(out));
        }
        if !c.deleted && c.error.is_empty() && is(s, SnapshotState::SnapshotReady) {
            return Ok(apply_result::Result::Snapshot(out));
        }
        if c.deleted || !creating {
            return Err(Reject::precondition(format!(
                "snapshot {:?} is {}: cannot be reported {}",
                s.name,
                snapshot_state(s),
                if c.deleted { "deleted" } else { "taken" }
            )));
        }
        let s = self
            .snap_mut(at)
            .ok_or_else(|| Reject::not_found("snapshot"))?;
        if c.error.is_empty() {
            s.state = SnapshotState::SnapshotReady as i32;
            s.ready_ms = now;
        } else {
            s.state = SnapshotState::SnapshotFailed as i32;
            s.error = c.error.clone();
        }
        Ok(apply_result::Result::Snapshot(
            self.snapshot_view(self.snap(at)),
        ))
    }

    /// Checks that a snapshot may be deleted (no volume fills from it); returns where it is and
    /// whether it is being deleted already.
    pub fn deletable(&self, r: &SnapshotRef) -> Result<((u64, usize), bool), Reject> {
        let at = self.find_snapshot(r)?;
        let s = self.snap(at);
        let deps: Vec<&str> = self
            .dependents(s.id)
            .iter()
            .filter_map(|d| self.volumes.get(d))
            .map(|v| v.name.as_str())
            .collect();
        if !deps.is_empty() {
            return Err(Reject::precondition(format!(
                "snapshot {:?} is still being copied to volume(s) {}; delete it once they are filled",
                s.name,
                deps.join(", ")
            )));
        }
        Ok((at, is(s, SnapshotState::SnapshotDeleting)))
    }

    fn delete_snapshot(&mut self, c: &pb::DeleteSnapshotCmd, now: u64) -> ApplyOutcome {
        let (at, deleting) =
            self.deletable(c.snapshot.as_ref().unwrap_or(&SnapshotRef::default()))?;
        if !deleting {
            let lease = self.check_work(at.0, &c.gateway, c.lease_ms, now)?;
            self.grant_work(at.0, &c.gateway, lease, now);
            if let Some(s) = self.snap_mut(at) {
                s.state = SnapshotState::SnapshotDeleting as i32;
            }
        }
        Ok(apply_result::Result::Snapshot(
            self.snapshot_view(self.snap(at)),
        ))
    }

    /// What a clone copies: a READY snapshot `snapshot_id` of a volume not being deleted.
    pub fn clone_source(
        &self,
        source: &VolumeRef,
        snapshot_id: u64,
    ) -> Result<(&Volume, &Snapshot), Reject> {
        let v = self.usable(self.volume_id(source)?)?;
        let s = v
            .snapshots
            .iter()
            .find(|s| s.id == snapshot_id)
            .ok_or_else(|| {
                Reject::not_found(format!(
                    "snapshot id {snapshot_id} of volume {:?} not found",
                    v.name
                ))
            })?;
        Self::check_ready(s)?;
        Ok((v, s))
    }

    fn clone_volume(&mut self, c: &pb::CloneVolumeCmd, now: u64) -> ApplyOutcome {
        let (src, snap) = self.clone_source(
            c.source.as_ref().unwrap_or(&VolumeRef::default()),
            c.snapshot_id,
        )?;
        let size = clone_size(c.size, snap.size)?;
        let replicas = if c.replicas == 0 {
            src.replicas
        } else {
            c.replicas
        };
        let chunk_size = src.chunk_size;
        // The chunk holding the snapshot's end is filled too (the gateway zeroes the rest).
        let filled = snap.size.div_ceil(chunk_size);
        let source = VolumeSource {
            volume_id: src.id,
            snapshot_id: snap.id,
            ..Default::default()
        };
        let geometry = (size, replicas, chunk_size);
        let id = self.new_volume(&c.name, geometry, c.qos.as_ref(), &c.placement, now)?;
        self.set_source(id, source, filled);
        Ok(apply_result::Result::Volume(self.volume_view(id)))
    }

    /// Volume `id` is to be filled from `source` in its first `chunks` chunks (the others
    /// not); an earlier source is let go.
    fn set_source(&mut self, id: u64, source: VolumeSource, chunks: u64) {
        let mut left = 0;
        for (&(_, index), c) in self.chunks.range_mut((id, 0)..=(id, u64::MAX)) {
            c.fill = index < chunks;
            left += u64::from(c.fill);
        }
        // Only volumes with chunks left are listed (the form a restore rebuilds).
        if left > 0 {
            self.fills.insert(id, left);
        } else {
            self.fills.remove(&id);
        }
        let earlier = self
            .volumes
            .get_mut(&id)
            .and_then(|v| v.source.replace(source));
        if let Some(e) = earlier {
            self.release(e.snapshot_id);
        }
    }

    fn restore_snapshot(&mut self, c: &pb::RestoreSnapshotRequest, now: u64) -> ApplyOutcome {
        let at = self.find_snapshot(c.snapshot.as_ref().unwrap_or(&SnapshotRef::default()))?;
        let s = self.snap(at);
        Self::check_ready(s)?;
        let source = VolumeSource {
            volume_id: at.0,
            snapshot_id: s.id,
            ..Default::default()
        };
        let v = self.usable(at.0)?;
        if let Some(a) = self.live_attachment(at.0, now) {
            return Err(Reject::precondition(format!(
                "volume {:?} is attached to gateway {}; detach it first",
                v.name, a.gateway
            )));
        }
        // Every chunk, those beyond the snapshot's size too: the gateway zeroes them.
        self.set_source(at.0, source, u64::MAX);
        Ok(apply_result::Result::Volume(self.volume_view(at.0)))
    }

    fn source_copied(&mut self, c: &pb::SourceCopiedRequest) -> ApplyOutcome {
        if !self.volumes.contains_key(&c.volume_id) {
            return Err(Reject::not_found(format!(
                "volume id {} not found",
                c.volume_id
            )));
        }
        self.check_writer(c.volume_id, c.writer_epoch)?;
        let chunk = self
            .chunks
            .get_mut(&(c.volume_id, c.index))
            .ok_or_else(|| {
                Reject::not_found(format!("chunk {}/{} not found", c.volume_id, c.index))
            })?;
        if !chunk.fill {
            return Ok(apply_result::Result::Chunk(chunk.clone()));
        }
        chunk.fill = false;
        let out = chunk.clone();
        let left = self
            .fills
            .get(&c.volume_id)
            .map_or(0, |n| n.saturating_sub(1));
        if left > 0 {
            self.fills.insert(c.volume_id, left);
        } else {
            self.fills.remove(&c.volume_id);
            let src = self
                .volumes
                .get_mut(&c.volume_id)
                .and_then(|v| v.source.take());
            if let Some(src) = src {
                self.release(src.snapshot_id);
            }
        }
        Ok(apply_result::Result::Chunk(out))
    }

    /// A volume no longer fills from snapshot `id`: an internal snapshot (a clone's of a
    /// volume's present) that no other volume needs is deleted.
    fn release(&mut self, id: u64) {
        if !self.dependents(id).is_empty() {
            return;
        }
        if let Some(s) = self.snapshot_at(id).and_then(|at| self.snap_mut(at)) {
            if s.internal && !is(s, SnapshotState::SnapshotDeleting) {
                s.state = SnapshotState::SnapshotDeleting as i32;
            }
        }
    }

    fn assign_work(&mut self, c: &pb::AssignWorkCmd, now: u64) -> ApplyOutcome {
        let v = self
            .volumes
            .get(&c.volume_id)
            .ok_or_else(|| Reject::not_found(format!("volume id {} not found", c.volume_id)))?;
        if !Self::pending_work(v) {
            return Err(Reject::precondition(format!(
                "volume {:?} has no snapshot work pending",
                v.name
            )));
        }
        if c.gateway.is_empty() {
            return Err(Reject::invalid("gateway id required"));
        }
        let lease = self.check_work(c.volume_id, &c.gateway, c.lease_ms, now)?;
        self.grant_work(c.volume_id, &c.gateway, lease, now);
        let a = self.volumes[&c.volume_id].attachment.clone();
        Ok(apply_result::Result::Attachment(a.unwrap_or_default()))
    }

    // ---------- Raft snapshots ----------

    pub fn snapshot(&self) -> StateSnapshot {
        let node_chunks = |m: &BTreeMap<String, BTreeMap<(u64, u64), u64>>| {
            m.iter()
                .map(|(n, cs)| NodeChunks {
                    node_id: n.clone(),
                    chunks: Self::listed(Some(cs)),
                })
                .collect()
        };
        StateSnapshot {
            next_volume_id: self.next_volume_id,
            next_task_id: self.next_task_id,
            nodes: self.nodes.values().cloned().collect(),
            volumes: self.volumes.values().cloned().collect(),
            chunks: self.chunks.values().cloned().collect(),
            tasks: self.tasks.values().cloned().collect(),
            epochs: self
                .epochs
                .iter()
                .map(|(&volume_id, &epoch)| VolumeEpoch { volume_id, epoch })
                .collect(),
            orphans: node_chunks(&self.orphans),
            stale: node_chunks(&self.stale),
            members: self
                .members
                .iter()
                .map(|(&id, addr)| Member {
                    id,
                    addr: addr.clone(),
                    ..Default::default()
                })
                .collect(),
            members_seen: self.members_seen.iter().copied().collect(),
            gateways: self.gateways.values().cloned().collect(),
            next_snapshot_id: self.next_snapshot_id,
        }
    }

    pub fn restore(s: StateSnapshot) -> State {
        let keyed = |v: Vec<NodeChunks>| {
            v.into_iter()
                .map(|nc| {
                    let m = nc
                        .chunks
                        .into_iter()
                        .map(|c| ((c.volume_id, c.index), c.epoch))
                        .collect();
                    (nc.node_id, m)
                })
                .collect()
        };
        let mut st = State {
            next_volume_id: s.next_volume_id.max(1),
            next_task_id: s.next_task_id.max(1),
            nodes: s.nodes.into_iter().map(|n| (n.id.clone(), n)).collect(),
            names: s.volumes.iter().map(|v| (v.name.clone(), v.id)).collect(),
            volumes: s.volumes.into_iter().map(|v| (v.id, v)).collect(),
            chunks: s
                .chunks
                .into_iter()
                .map(|c| ((c.volume_id, c.index), c))
                .collect(),
            epochs: s
                .epochs
                .into_iter()
                .map(|e| (e.volume_id, e.epoch))
                .collect(),
            tasks: s.tasks.into_iter().map(|t| (t.id, t)).collect(),
            orphans: keyed(s.orphans),
            stale: keyed(s.stale),
            members: s.members.into_iter().map(|m| (m.id, m.addr)).collect(),
            members_seen: s.members_seen.into_iter().collect(),
            gateways: s.gateways.into_iter().map(|g| (g.id.clone(), g)).collect(),
            next_snapshot_id: s.next_snapshot_id.max(1),
            fills: BTreeMap::new(),
        };
        st.recount();
        st
    }

    /// Recomputes per-node allocation and chunks left to fill from the chunk map (after a
    /// restore).
    fn recount(&mut self) {
        for c in self.chunks.values().filter(|c| c.fill) {
            *self.fills.entry(c.volume_id).or_insert(0) += 1;
        }
        for n in self.nodes.values_mut() {
            n.allocated = 0;
            n.chunks = 0;
        }
        let sizes: BTreeMap<u64, u64> = self
            .volumes
            .iter()
            .map(|(&id, v)| (id, v.chunk_size))
            .collect();
        let holders: Vec<(String, u64)> = self
            .chunks
            .values()
            .flat_map(|c| {
                let size = sizes.get(&c.volume_id).copied().unwrap_or(0);
                c.replicas
                    .iter()
                    .chain(Some(&c.joining).filter(|j| !j.is_empty()))
                    .map(move |n| (n.clone(), size))
            })
            .collect();
        for (n, size) in holders {
            self.account(&n, size as i128, 1);
        }
    }
}

/// Turns an apply error back into the status the caller sees.
pub fn reject_status(e: &ApplyError) -> tonic::Status {
    tonic::Status::new(Code::from_i32(e.code), e.message.clone())
}

/// Fuzzing entry point (`fuzz/fuzz_targets/manager_apply.rs`): applies length-prefixed
/// commands from `data` to a small cluster (three nodes, one attached volume with a snapshot
/// being taken, one gateway) and checks that
/// nothing panics and that a snapshot round trip reproduces the state exactly.
#[doc(hidden)]
pub fn fuzz_apply(mut data: &[u8]) {
    use prost::Message as _;
    let mut st = State::new();
    let nodes: Vec<String> = ["n1", "n2", "n3"].iter().map(|s| s.to_string()).collect();
    for n in &nodes {
        st.apply(&Command {
            now_ms: 1,
            op: Some(Op::RegisterNode(pb::RegisterNodeRequest {
                id: n.clone(),
                addr: "127.0.0.1:1".into(),
                zone: String::new(),
                disks: Vec::new(),
            })),
        });
    }
    st.apply(&Command {
        now_ms: 1,
        op: Some(Op::CreateVolume(pb::CreateVolumeCmd {
            name: "v".into(),
            size: 4 * DEFAULT_CHUNK,
            replicas: 3,
            chunk_size: 0,
            // Limited, so that fuzzed QoS commands start from a set value too.
            qos: Some(pb::VolumeQos {
                write_iops: 100,
                burst_ms: Some(DEFAULT_QOS_BURST_MS),
                ..Default::default()
            }),
            placement: vec![
                pb::ReplicaSet {
                    nodes: nodes.clone()
                };
                4
            ],
        })),
    });
    st.apply(&Command {
        now_ms: 1,
        op: Some(Op::Attach(pb::AttachCmd {
            volume: Some(VolumeRef {
                id: 1,
                name: String::new(),
            }),
            gateway: "g".into(),
            lease_ms: 0,
            portal: "127.0.0.1:3260".into(),
        })),
    });
    // A registered gateway and a snapshot being taken, so that fuzzed snapshot, clone and
    // work commands find something to act on.
    st.apply(&Command {
        now_ms: 1,
        op: Some(Op::RegisterGateway(pb::RegisterGatewayRequest {
            id: "g".into(),
            portal: "127.0.0.1:3260".into(),
        })),
    });
    st.apply(&Command {
        now_ms: 1,
        op: Some(Op::CreateSnapshot(pb::CreateSnapshotCmd {
            volume: Some(VolumeRef {
                id: 1,
                name: String::new(),
            }),
            name: "s".into(),
            ..Default::default()
        })),
    });
    while data.len() >= 2 {
        let len = u16::from_le_bytes([data[0], data[1]]) as usize;
        data = &data[2..];
        let (msg, rest) = data.split_at(len.min(data.len()));
        data = rest;
        if let Ok(cmd) = Command::decode(msg) {
            st.apply(&cmd);
        }
    }
    let restored = State::restore(st.snapshot());
    assert_eq!(restored, st, "snapshot round trip changed the state");
}
