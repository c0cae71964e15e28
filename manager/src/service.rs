//! The gRPC services every member serves: `Manager` (clients) and `RaftPeer` (members).
//!
//! Mutations become `Command`s. On the leader a command is stamped with the leader's clock,
//! given its placement (the leader alone holds the soft state placement needs), proposed, and
//! answered once applied. A follower forwards the unstamped command to the leader over
//! `RaftPeer.Forward`. Reads wait for Raft's ReadIndex and are then served from this member's
//! applied state, so any member answers them linearizably. Leader-only calls that are not
//! commands (heartbeats, node lists with soft state, membership) are forwarded as the same
//! `Manager` call. `Status` is answered locally without a quorum, so a cut-off member can still
//! say what it sees.
//!
//! Snapshot commands get their leader decisions in `place` too, forwarded or not: which gateway
//! does the work (the volume's live holder, else a registered one given a work attachment) and
//! a clone's placement. A clone of a volume's present is two commands from whichever member
//! took the call: an internal snapshot, then (once the holder made it READY) the clone of it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ironsan_common::proto::manager::{
    self as pb, apply_result, command::Op, manager_client::ManagerClient, manager_server,
    raft_peer_client::RaftPeerClient, raft_peer_server, ApplyResult, Command, NodeState,
    ReplicaSet,
};
use prost::Message as _;
use protobuf::Message as _;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::health::{Health, HealthConfig};
use crate::node::RaftNode;
use crate::placement::Placer;
use crate::state::{self, reject_status, Reject};
use crate::transport::MAX_MESSAGE;
use ironsan_common::manager_client::{MAX_REQUEST, MAX_RESPONSE};

const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);
const READ_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a clone of a volume's present waits for its internal snapshot, and how often it
/// looks.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(60);
const SNAPSHOT_POLL: Duration = Duration::from_millis(20);

#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    node: RaftNode,
    health: Arc<Health>,
    cfg: HealthConfig,
    channels: Mutex<HashMap<String, Channel>>,
}

/// Longest a `ListVolumes` long poll waits (its caller's call timeout is 5 s by default).
const MAX_LIST_WAIT_MS: u32 = 10_000;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn volume_ref(r: Option<pb::VolumeRef>) -> pb::VolumeRef {
    r.unwrap_or_default()
}

/// The internal snapshot a clone of a volume's present is made from: `clone.<clone name>`,
/// or for a name too long for that a stable hash of it (FNV-1a).
fn internal_snapshot_name(clone: &str) -> String {
    let name = format!("clone.{clone}");
    if name.len() <= state::MAX_NAME {
        return name;
    }
    let h = clone.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("clone.{h:016x}")
}

impl Service {
    pub fn new(node: RaftNode, health: Arc<Health>, cfg: HealthConfig) -> Self {
        Service {
            inner: Arc::new(Inner {
                node,
                health,
                cfg,
                channels: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Client requests are small and come from anywhere that reaches the port: the usual
    /// 4 MiB bound. Answers may carry a large volume's chunk list.
    pub fn manager_server(&self) -> manager_server::ManagerServer<Service> {
        manager_server::ManagerServer::new(self.clone())
            .max_decoding_message_size(MAX_REQUEST)
            .max_encoding_message_size(MAX_RESPONSE)
    }

    pub fn peer_server(&self) -> raft_peer_server::RaftPeerServer<Service> {
        raft_peer_server::RaftPeerServer::new(self.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    fn node(&self) -> &RaftNode {
        &self.inner.node
    }

    fn channel(&self, addr: &str) -> Result<Channel, Status> {
        let mut map = match self.inner.channels.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let ch = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Status::internal(format!("leader address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .connect_lazy();
        map.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    /// The leader's `Manager` client, for forwarding leader-only calls.
    fn leader(&self) -> Result<ManagerClient<Channel>, Status> {
        let (_, addr) = self.node().leader_addr().ok_or_else(|| {
            Status::from(Error::NoLeader {
                member: self.node().id(),
            })
        })?;
        Ok(ManagerClient::new(self.channel(&addr)?).max_decoding_message_size(MAX_RESPONSE))
    }

    fn is_leader(&self) -> bool {
        self.node().status().is_leader
    }

    /// Runs a command through Raft wherever this member stands; returns its applied result.
    pub async fn submit(&self, op: Op) -> Result<apply_result::Result, Status> {
        let cmd = Command {
            now_ms: 0,
            op: Some(op),
        };
        let result = if self.is_leader() {
            self.submit_as_leader(cmd).await?
        } else {
            let (_, addr) = self.node().leader_addr().ok_or_else(|| {
                Status::from(Error::NoLeader {
                    member: self.node().id(),
                })
            })?;
            let mut peer = RaftPeerClient::new(self.channel(&addr)?)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE);
            let resp = tokio::time::timeout(
                COMMIT_TIMEOUT + Duration::from_secs(1),
                peer.forward(pb::ForwardRequest {
                    command: cmd.encode_to_vec(),
                }),
            )
            .await
            .map_err(|_| Status::from(Error::Timeout("forward to leader")))?
            .map_err(|status| Status::from(Error::Forward { addr, status }))?;
            ApplyResult::decode(resp.into_inner().result.as_ref())
                .map_err(|e| Status::internal(format!("leader's answer: {e}")))?
        };
        match result.result {
            Some(apply_result::Result::Error(e)) => Err(reject_status(&e)),
            Some(r) => Ok(r),
            None => Err(Status::internal("empty apply result")),
        }
    }

    async fn submit_as_leader(&self, mut cmd: Command) -> Result<ApplyResult, Status> {
        cmd.now_ms = now_ms();
        self.place(&mut cmd)?;
        let started = std::time::Instant::now();
        let r = self.node().propose(cmd, COMMIT_TIMEOUT).await;
        metrics::histogram!("ironsan_manager_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(r?)
    }

    fn placer(&self, st: &state::State, replicas: u32) -> Result<Placer, Status> {
        Placer::new(
            self.inner.health.candidates(st),
            replicas as usize,
            self.inner.cfg.scatter_width,
        )
        .map_err(|e| Status::resource_exhausted(format!("cannot place replicas: {e}")))
    }

    /// Checks a new volume (create or clone) against the committed state and places it:
    /// returns its (replicas, chunk size) with defaults filled in, and its replica sets.
    fn place_volume(
        &self,
        st: &state::State,
        name: &str,
        size: u64,
        replicas: u32,
        chunk_size: u64,
    ) -> Result<(u32, u64, Vec<ReplicaSet>), Status> {
        state::validate_name(name).map_err(Error::from)?;
        if st
            .volume_id(&pb::VolumeRef {
                id: 0,
                name: name.to_string(),
            })
            .is_ok()
        {
            return Err(Status::already_exists(format!(
                "volume {name:?} already exists"
            )));
        }
        let (replicas, chunk_size, chunks) =
            state::validate_geometry(size, replicas, chunk_size).map_err(Error::from)?;
        self.check_overcommit(st, size.saturating_mul(u64::from(replicas)))?;
        let sets = self
            .placer(st, replicas)?
            .place(chunks, chunk_size)
            .map_err(|e| {
                Status::resource_exhausted(format!("cannot place volume {name:?}: {e}"))
            })?;
        let sets = sets.into_iter().map(|nodes| ReplicaSet { nodes }).collect();
        Ok((replicas, chunk_size, sets))
    }

    /// Leader decisions, on commands proposed here or forwarded by a follower: placement for
    /// creates, clones and grows, and who does snapshot work (only the leader holds the soft
    /// state placement needs, and its clock says which attachments are live).
    fn place(&self, cmd: &mut Command) -> Result<(), Status> {
        let st = self.node().state();
        let now = cmd.now_ms;
        match cmd.op.as_mut() {
            Some(Op::CreateVolume(c)) => {
                (c.replicas, c.chunk_size, c.placement) =
                    self.place_volume(&st, &c.name, c.size, c.replicas, c.chunk_size)?;
            }
            Some(Op::CloneVolume(c)) => {
                let (src, snap) = st
                    .clone_source(&volume_ref(c.source.clone()), c.snapshot_id)
                    .map_err(Error::from)?;
                c.size = state::clone_size(c.size, snap.size).map_err(Error::from)?;
                if c.replicas == 0 {
                    c.replicas = src.replicas;
                }
                (c.replicas, _, c.placement) =
                    self.place_volume(&st, &c.name, c.size, c.replicas, src.chunk_size)?;
            }
            Some(Op::CreateSnapshot(c)) => {
                let id = st
                    .volume_id(&volume_ref(c.volume.clone()))
                    .map_err(Error::from)?;
                c.gateway = st.work_gateway(id, now).map_err(Error::from)?;
                c.lease_ms = state::DEFAULT_LEASE_MS;
            }
            Some(Op::DeleteSnapshot(c)) => {
                let ((volume, _), deleting) = st
                    .deletable(&c.snapshot.clone().unwrap_or_default())
                    .map_err(Error::from)?;
                if !deleting {
                    c.gateway = st.work_gateway(volume, now).map_err(Error::from)?;
                    c.lease_ms = state::DEFAULT_LEASE_MS;
                }
            }
            Some(Op::ResizeVolume(c)) => {
                let v = st
                    .volume(&volume_ref(c.volume.clone()))
                    .map_err(Error::from)?;
                if c.size < v.size {
                    return Err(Status::failed_precondition(format!(
                        "shrinking is not supported: {} is below the current size {}",
                        c.size, v.size
                    )));
                }
                if c.size == 0 || !c.size.is_multiple_of(state::LOGICAL_BLOCK) {
                    return Err(Status::invalid_argument(
                        "size must be a non-zero multiple of 512",
                    ));
                }
                self.check_overcommit(
                    &st,
                    (c.size - v.size).saturating_mul(u64::from(v.replicas)),
                )?;
                let have = v.size.div_ceil(v.chunk_size);
                let want = c.size.div_ceil(v.chunk_size);
                if want > state::MAX_CHUNKS_PER_VOLUME {
                    return Err(Status::invalid_argument(format!(
                        "size {} is beyond the limit for chunk size {}",
                        c.size, v.chunk_size
                    )));
                }
                if want > have {
                    let sets = self
                        .placer(&st, v.replicas)?
                        .place(want - have, v.chunk_size)
                        .map_err(|e| {
                            Status::resource_exhausted(format!("cannot place the new chunks: {e}"))
                        })?;
                    c.placement = sets.into_iter().map(|nodes| ReplicaSet { nodes }).collect();
                }
            }
            _ => {}
        }
        Ok(())
    }

    async fn read(&self) -> Result<(), Status> {
        self.node()
            .linearize(READ_TIMEOUT)
            .await
            .map_err(Status::from)
    }

    fn node_view(&self, mut n: pb::Node) -> pb::Node {
        if let Some((free, disks, ago)) = self.inner.health.soft(&n.id) {
            n.free = free;
            n.disks = disks;
            n.last_seen_ms_ago = ago.as_millis() as u64;
        }
        n
    }

    fn volume_view(&self, mut v: pb::Volume) -> pb::Volume {
        v.used_bytes = self.inner.health.used_bytes(v.id);
        v
    }

    /// Refuses a create or grow that would take the provisioned bytes (size times replicas,
    /// every volume) past `max_overcommit` times the Up nodes' raw capacity; past 1x it warns.
    fn check_overcommit(&self, st: &state::State, more: u64) -> Result<(), Status> {
        let (provisioned, capacity) = provisioned_and_capacity(st);
        let after = provisioned.saturating_add(more);
        if capacity == 0 || more == 0 {
            return Ok(());
        }
        let ratio = after as f64 / capacity as f64;
        let max = self.inner.cfg.max_overcommit;
        if max > 0.0 && ratio > max {
            return Err(Status::resource_exhausted(format!(
                "over-commit: {after} bytes provisioned (size x replicas, all volumes) would be \
                 {ratio:.2}x the {capacity} bytes of raw capacity; the limit is {max}x \
                 (--max-overcommit)"
            )));
        }
        if ratio > 1.0 {
            tracing::warn!(
                provisioned = after,
                capacity,
                ratio = format!("{ratio:.2}"),
                "volumes are over-committed: more provisioned than raw capacity"
            );
        }
        Ok(())
    }

    fn cluster_status(&self) -> pb::ClusterStatus {
        let s = self.node().status();
        let st = self.node().state();
        let count =
            |state: NodeState| st.nodes().filter(|n| n.state == state as i32).count() as u64;
        let degraded = st
            .all_chunks()
            .filter(|c| {
                st.volume_replicas(c.volume_id)
                    .is_some_and(|(r, _)| st.chunk_degraded(c, r))
            })
            .count() as u64;
        let (provisioned_bytes, capacity_bytes) = provisioned_and_capacity(&st);
        pb::ClusterStatus {
            answered_by: s.id,
            leader: s.leader,
            term: s.term,
            commit_index: s.commit,
            applied_index: s.applied,
            members: s.members.clone(),
            nodes_up: count(NodeState::NodeUp),
            nodes_down: count(NodeState::NodeDown),
            nodes_draining: count(NodeState::NodeDraining),
            volumes: st.volume_count() as u64,
            chunks: st.chunk_count() as u64,
            degraded_chunks: degraded,
            recovery_tasks: st.tasks().count() as u64,
            recovery_bytes_copied: self.inner.health.progress(&st).values().sum(),
            recovery_bytes_total: st
                .tasks()
                .filter_map(|t| st.volume_replicas(t.volume_id).map(|(_, size)| size))
                .sum(),
            snapshot_index: s.snapshot_index,
            members_seen: st.members_seen().iter().copied().collect(),
            provisioned_bytes,
            capacity_bytes,
        }
    }

    /// The membership as this member's status shows it; the driver publishes a change before
    /// it answers the change's caller, so this includes it.
    fn members(&self) -> pb::MembershipResponse {
        pb::MembershipResponse {
            members: self.node().status().members,
        }
    }

    /// Waits until snapshot `id` is READY, polling this member's applied state; a FAILED one
    /// is refused with its error.
    async fn wait_ready(&self, id: u64) -> Result<(), Status> {
        let deadline = Instant::now() + SNAPSHOT_WAIT;
        // A follower may not have applied the snapshot's creation yet: catch up first.
        self.read().await?;
        loop {
            let found = self
                .node()
                .state()
                .snapshots(None, id)
                .map_err(Error::from)?;
            match found.first() {
                None => {
                    return Err(Status::aborted(format!(
                        "snapshot id {id} was deleted while the clone waited for it"
                    )))
                }
                Some(s) if s.state == pb::SnapshotState::SnapshotReady as i32 => return Ok(()),
                Some(s) if s.state == pb::SnapshotState::SnapshotFailed as i32 => {
                    return Err(Status::failed_precondition(format!(
                        "the snapshot of the source failed: {}",
                        s.error
                    )))
                }
                Some(_) => {}
            }
            if Instant::now() >= deadline {
                return Err(Status::deadline_exceeded(format!(
                    "the snapshot of the source was not taken within {} s",
                    SNAPSHOT_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(SNAPSHOT_POLL).await;
        }
    }

    /// A clone of the source's present: an internal snapshot, then the clone of it. The
    /// snapshot is deleted again if the clone does not come about.
    async fn clone_present(&self, mut cmd: pb::CloneVolumeCmd) -> Result<pb::Volume, Status> {
        // What would refuse the clone anyway is refused before a snapshot is taken for it.
        self.read().await?;
        {
            let st = self.node().state();
            let src = st
                .volume(&volume_ref(cmd.source.clone()))
                .map_err(Error::from)?;
            let name = pb::VolumeRef {
                id: 0,
                name: cmd.name.clone(),
            };
            if st.volume_id(&name).is_ok() {
                return Err(Status::already_exists(format!(
                    "volume {:?} already exists",
                    cmd.name
                )));
            }
            let size = state::clone_size(cmd.size, src.size).map_err(Error::from)?;
            let replicas = if cmd.replicas == 0 {
                src.replicas
            } else {
                cmd.replicas
            };
            state::validate_geometry(size, replicas, src.chunk_size).map_err(Error::from)?;
        }
        let op = Op::CreateSnapshot(pb::CreateSnapshotCmd {
            volume: cmd.source.clone(),
            name: internal_snapshot_name(&cmd.name),
            gateway: String::new(),
            lease_ms: 0,
            internal: true,
        });
        let apply_result::Result::Snapshot(snap) = self.submit(op).await? else {
            return Err(Status::internal("unexpected apply result for a snapshot"));
        };
        let cloned = match self.wait_ready(snap.id).await {
            Ok(()) => {
                cmd.snapshot_id = snap.id;
                self.submit(Op::CloneVolume(cmd)).await
            }
            Err(e) => Err(e),
        };
        match cloned {
            Ok(apply_result::Result::Volume(v)) => Ok(v),
            Ok(other) => Err(Status::internal(format!(
                "unexpected apply result {other:?}"
            ))),
            Err(e) => {
                let op = Op::DeleteSnapshot(pb::DeleteSnapshotCmd {
                    snapshot: Some(pb::SnapshotRef {
                        id: snap.id,
                        ..Default::default()
                    }),
                    gateway: String::new(),
                    lease_ms: 0,
                });
                if let Err(d) = self.submit(op).await {
                    tracing::warn!(snapshot = snap.id, error = %d, "deleting a clone's internal snapshot");
                }
                Err(e)
            }
        }
    }
}

/// Every volume's size times its replicas, and the raw capacity of the Up nodes.
fn provisioned_and_capacity(st: &state::State) -> (u64, u64) {
    let provisioned = st
        .volumes()
        .iter()
        .map(|v| v.size.saturating_mul(u64::from(v.replicas)))
        .fold(0u64, u64::saturating_add);
    let capacity = st
        .nodes()
        .filter(|n| n.state == NodeState::NodeUp as i32)
        .map(|n| n.capacity)
        .fold(0u64, u64::saturating_add);
    (provisioned, capacity)
}

macro_rules! expect {
    ($r:expr, $variant:ident) => {
        match $r {
            apply_result::Result::$variant(v) => Ok(Response::new(v)),
            other => Err(Status::internal(format!(
                "unexpected apply result {other:?}"
            ))),
        }
    };
}

#[tonic::async_trait]
impl manager_server::Manager for Service {
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        // Checked here too so a bad request is refused without touching the leader.
        state::validate_name(&r.name).map_err(Error::from)?;
        state::validate_geometry(r.size, r.replicas, r.chunk_size).map_err(Error::from)?;
        let qos = state::validate_qos(r.qos.as_ref()).map_err(Error::from)?;
        let op = Op::CreateVolume(pb::CreateVolumeCmd {
            name: r.name,
            size: r.size,
            replicas: r.replicas,
            chunk_size: r.chunk_size,
            placement: Vec::new(),
            qos,
        });
        expect!(self.submit(op).await?, Volume)
    }

    async fn get_volume(
        &self,
        req: Request<pb::VolumeRef>,
    ) -> Result<Response<pb::Volume>, Status> {
        if !self.is_leader() {
            // The leader holds the soft state (space used).
            if let Ok(mut leader) = self.leader() {
                if let Ok(resp) = leader.get_volume(req.get_ref().clone()).await {
                    return Ok(resp);
                }
            }
        }
        self.read().await?;
        let v = self
            .node()
            .state()
            .volume(&req.into_inner())
            .map_err(Error::from)?;
        Ok(Response::new(self.volume_view(v)))
    }

    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let req = req.into_inner();
        if !self.is_leader() {
            if let Ok(mut leader) = self.leader() {
                if let Ok(resp) = leader.list_volumes(req).await {
                    return Ok(resp);
                }
            }
        }
        if req.wait_ms > 0 {
            // A long poll: until a change past what the caller saw, or the wait is over.
            let wait = Duration::from_millis(req.wait_ms.min(MAX_LIST_WAIT_MS).into());
            let mut changed = self.node().watch_changed();
            let _ = tokio::time::timeout(wait, changed.wait_for(|&c| c != req.changed_after)).await;
        }
        // Taken before the read: a change after it wakes the caller's next poll at once.
        let changed = *self.node().watch_changed().borrow();
        self.read().await?;
        let volumes = self.node().state().volumes();
        let volumes = volumes.into_iter().map(|v| self.volume_view(v)).collect();
        Ok(Response::new(pb::ListVolumesResponse { volumes, changed }))
    }

    async fn resize_volume(
        &self,
        req: Request<pb::ResizeVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        let op = Op::ResizeVolume(pb::ResizeVolumeCmd {
            volume: r.volume,
            size: r.size,
            placement: Vec::new(),
        });
        expect!(self.submit(op).await?, Volume)
    }

    async fn set_volume_qos(
        &self,
        req: Request<pb::SetVolumeQosRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        // Checked here too so a bad request is refused without touching the leader.
        state::validate_qos(r.qos.as_ref()).map_err(Error::from)?;
        let op = Op::SetVolumeQos(pb::SetVolumeQosCmd {
            volume: r.volume,
            qos: r.qos,
        });
        expect!(self.submit(op).await?, Volume)
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let op = Op::DeleteVolume(pb::DeleteVolumeCmd {
            volume: req.into_inner().volume,
        });
        self.submit(op).await?;
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn create_snapshot(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        let r = req.into_inner();
        let op = Op::CreateSnapshot(pb::CreateSnapshotCmd {
            volume: r.volume,
            name: r.name,
            gateway: String::new(),
            lease_ms: 0,
            internal: false,
        });
        expect!(self.submit(op).await?, Snapshot)
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let r = req.into_inner();
        self.read().await?;
        let snapshots = self
            .node()
            .state()
            .snapshots(r.volume.as_ref(), r.id)
            .map_err(Error::from)?;
        Ok(Response::new(pb::ListSnapshotsResponse { snapshots }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::SnapshotRef>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        let op = Op::DeleteSnapshot(pb::DeleteSnapshotCmd {
            snapshot: Some(req.into_inner()),
            gateway: String::new(),
            lease_ms: 0,
        });
        expect!(self.submit(op).await?, Snapshot)
    }

    async fn snapshot_done(
        &self,
        req: Request<pb::SnapshotDoneRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        expect!(
            self.submit(Op::SnapshotDone(req.into_inner())).await?,
            Snapshot
        )
    }

    async fn clone_volume(
        &self,
        req: Request<pb::CloneVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        // Checked here too so a bad request is refused before any snapshot is taken for it.
        state::validate_name(&r.name).map_err(Error::from)?;
        let qos = state::validate_qos(r.qos.as_ref()).map_err(Error::from)?;
        let mut cmd = pb::CloneVolumeCmd {
            name: r.name,
            source: r.source,
            snapshot_id: 0,
            size: r.size,
            replicas: r.replicas,
            placement: Vec::new(),
            qos,
        };
        if r.snapshot.is_empty() {
            return Ok(Response::new(self.clone_present(cmd).await?));
        }
        // Names are unique within a volume and ids never reused: resolved here, checked again
        // (READY, of this source) at apply.
        self.read().await?;
        cmd.snapshot_id = self
            .node()
            .state()
            .snapshot_of(&pb::SnapshotRef {
                id: 0,
                volume: cmd.source.clone(),
                name: r.snapshot,
            })
            .map_err(Error::from)?
            .id;
        expect!(self.submit(Op::CloneVolume(cmd)).await?, Volume)
    }

    async fn restore_snapshot(
        &self,
        req: Request<pb::RestoreSnapshotRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        expect!(
            self.submit(Op::RestoreSnapshot(req.into_inner())).await?,
            Volume
        )
    }

    async fn source_copied(
        &self,
        req: Request<pb::SourceCopiedRequest>,
    ) -> Result<Response<pb::Chunk>, Status> {
        expect!(
            self.submit(Op::SourceCopied(req.into_inner())).await?,
            Chunk
        )
    }

    async fn attach(
        &self,
        req: Request<pb::AttachRequest>,
    ) -> Result<Response<pb::Attachment>, Status> {
        let r = req.into_inner();
        let op = Op::Attach(pb::AttachCmd {
            volume: r.volume,
            gateway: r.gateway,
            lease_ms: r.lease_ms,
            portal: r.portal,
        });
        expect!(self.submit(op).await?, Attachment)
    }

    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::Attachment>, Status> {
        let r = req.into_inner();
        let op = Op::Renew(pb::RenewCmd {
            volume: r.volume,
            gateway: r.gateway,
            writer_epoch: r.writer_epoch,
        });
        expect!(self.submit(op).await?, Attachment)
    }

    async fn detach(
        &self,
        req: Request<pb::DetachRequest>,
    ) -> Result<Response<pb::DetachResponse>, Status> {
        let r = req.into_inner();
        let op = Op::Detach(pb::DetachCmd {
            volume: r.volume,
            gateway: r.gateway,
            force: r.force,
        });
        self.submit(op).await?;
        Ok(Response::new(pb::DetachResponse {}))
    }

    async fn publish(
        &self,
        req: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::Attachment>, Status> {
        let r = req.into_inner();
        let op = Op::Publish(pb::PublishCmd {
            volume: r.volume,
            node: r.node,
            readonly: r.readonly,
            lease_ms: r.lease_ms,
        });
        expect!(self.submit(op).await?, Attachment)
    }

    async fn unpublish(
        &self,
        req: Request<pb::UnpublishRequest>,
    ) -> Result<Response<pb::UnpublishResponse>, Status> {
        let r = req.into_inner();
        let op = Op::Unpublish(pb::UnpublishCmd {
            volume: r.volume,
            node: r.node,
        });
        self.submit(op).await?;
        Ok(Response::new(pb::UnpublishResponse {}))
    }

    async fn register_gateway(
        &self,
        req: Request<pb::RegisterGatewayRequest>,
    ) -> Result<Response<pb::Gateway>, Status> {
        let r = req.into_inner();
        // A restart re-registers unchanged: no log entry for that.
        if let Ok(g) = self.node().state().gateway(&r.id) {
            if g.portal == r.portal {
                return Ok(Response::new(g));
            }
        }
        expect!(self.submit(Op::RegisterGateway(r)).await?, Gateway)
    }

    async fn get_gateway(
        &self,
        req: Request<pb::GatewayRef>,
    ) -> Result<Response<pb::Gateway>, Status> {
        self.read().await?;
        let g = self
            .node()
            .state()
            .gateway(&req.into_inner().id)
            .map_err(Error::from)?;
        Ok(Response::new(g))
    }

    async fn list_gateways(
        &self,
        _: Request<pb::ListGatewaysRequest>,
    ) -> Result<Response<pb::ListGatewaysResponse>, Status> {
        self.read().await?;
        let gateways = self.node().state().gateways().cloned().collect();
        Ok(Response::new(pb::ListGatewaysResponse { gateways }))
    }

    async fn get_chunks(
        &self,
        req: Request<pb::GetChunksRequest>,
    ) -> Result<Response<pb::GetChunksResponse>, Status> {
        let r = req.into_inner();
        self.read().await?;
        let st = self.node().state();
        let chunks = st
            .chunks(&volume_ref(r.volume), r.first, r.count)
            .map_err(Error::from)?;
        let mut ids: Vec<&String> = chunks
            .iter()
            .flat_map(|c| {
                c.replicas
                    .iter()
                    .chain(Some(&c.joining).filter(|j| !j.is_empty()))
            })
            .collect();
        ids.sort();
        ids.dedup();
        let nodes = ids
            .into_iter()
            .filter_map(|id| st.node(id).cloned())
            .collect();
        Ok(Response::new(pb::GetChunksResponse { chunks, nodes }))
    }

    async fn report_failed_replica(
        &self,
        req: Request<pb::ReportFailedReplicaRequest>,
    ) -> Result<Response<pb::Chunk>, Status> {
        let r = req.into_inner();
        if r.writer_epoch == 0 {
            return Err(Status::invalid_argument("writer_epoch required"));
        }
        tracing::warn!(volume = r.volume_id, index = r.index, node = %r.node_id, reason = %r.reason, "replica reported failed");
        let op = Op::RemoveReplica(pb::RemoveReplicaCmd {
            volume_id: r.volume_id,
            index: r.index,
            node_id: r.node_id,
            writer_epoch: r.writer_epoch,
        });
        expect!(self.submit(op).await?, Chunk)
    }

    async fn register_node(
        &self,
        req: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeResponse>, Status> {
        let r = req.into_inner();
        let node = expect!(self.submit(Op::RegisterNode(r)).await?, Node)?.into_inner();
        Ok(Response::new(pb::RegisterNodeResponse {
            node: Some(node),
            heartbeat_interval_ms: self.inner.cfg.heartbeat_interval.as_millis() as u64,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        if !self.is_leader() {
            return self.leader()?.heartbeat(req.into_inner()).await;
        }
        let r = req.into_inner();
        let (resp, follow_up) = {
            let st = self.node().state();
            self.inner.health.heartbeat(&st, &r, &self.inner.cfg)?
        };
        for op in follow_up {
            if let Err(e) = self.submit(op).await {
                tracing::warn!(node = %r.id, error = %e, "committing heartbeat follow-up");
            }
        }
        Ok(Response::new(resp))
    }

    async fn list_nodes(
        &self,
        req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        if !self.is_leader() {
            // The leader holds the soft state (free space, last heartbeat).
            if let Ok(mut leader) = self.leader() {
                if let Ok(resp) = leader.list_nodes(req.into_inner()).await {
                    return Ok(resp);
                }
            }
        }
        self.read().await?;
        let nodes: Vec<pb::Node> = self.node().state().nodes().cloned().collect();
        let nodes = nodes.into_iter().map(|n| self.node_view(n)).collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn drain_node(
        &self,
        req: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let op = Op::SetNodeState(pb::SetNodeStateCmd {
            id: req.into_inner().id,
            state: NodeState::NodeDraining as i32,
            reason: "drain requested".into(),
        });
        expect!(self.submit(op).await?, Node)
    }

    async fn list_tasks(
        &self,
        _: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        self.read().await?;
        let st = self.node().state();
        let progress = self.inner.health.progress(&st);
        let tasks = st
            .tasks()
            .map(|t| match progress.get(&t.id) {
                Some(&copied) => pb::RecoveryTask {
                    copied_bytes: copied,
                    state: pb::TaskState::TaskRunning as i32,
                    ..t.clone()
                },
                None => t.clone(),
            })
            .collect();
        Ok(Response::new(pb::ListTasksResponse { tasks }))
    }

    async fn task_progress(
        &self,
        req: Request<pb::TaskProgressRequest>,
    ) -> Result<Response<pb::TaskProgressResponse>, Status> {
        if !self.is_leader() {
            return self.leader()?.task_progress(req.into_inner()).await;
        }
        let r = req.into_inner();
        self.inner.health.task_progress(r.id, r.copied_bytes);
        Ok(Response::new(pb::TaskProgressResponse {}))
    }

    async fn complete_task(
        &self,
        req: Request<pb::CompleteTaskRequest>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        expect!(self.submit(Op::CompleteTask(req.into_inner())).await?, Task)
    }

    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        Ok(Response::new(self.cluster_status()))
    }

    async fn add_member(
        &self,
        req: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let r = req.into_inner();
        if r.id == 0 {
            return Err(Status::invalid_argument("member id must be non-zero"));
        }
        if !r.addr.contains(':') {
            return Err(Status::invalid_argument(format!(
                "member address {:?} is not host:port",
                r.addr
            )));
        }
        if !self.is_leader() {
            return self.leader()?.add_member(r).await;
        }
        if self.node().status().members.iter().any(|m| m.id == r.id) {
            return Err(Status::already_exists(format!(
                "member {} is already in the group",
                r.id
            )));
        }
        self.node()
            .change_member(r.id, Some(r.addr), COMMIT_TIMEOUT)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(self.members()))
    }

    async fn remove_member(
        &self,
        req: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let r = req.into_inner();
        if !self.is_leader() {
            return self.leader()?.remove_member(r).await;
        }
        let status = self.node().status();
        if !status.members.iter().any(|m| m.id == r.id) {
            return Err(Status::not_found(format!(
                "member {} is not in the group",
                r.id
            )));
        }
        if status.members.len() == 1 {
            return Err(Status::failed_precondition("cannot remove the last member"));
        }
        if r.id == status.id {
            return Err(Status::failed_precondition(format!(
                "member {} is the leader: transfer leadership first (ironsan manager transfer-leader)",
                r.id
            )));
        }
        self.node()
            .change_member(r.id, None, COMMIT_TIMEOUT)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(self.members()))
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        let r = req.into_inner();
        if !self.is_leader() {
            return self.leader()?.transfer_leader(r).await;
        }
        let status = self.node().status();
        let to = if r.to != 0 {
            if !status.members.iter().any(|m| m.id == r.to && m.voter) {
                return Err(Status::not_found(format!(
                    "member {} is not a voter of the group",
                    r.to
                )));
            }
            r.to
        } else {
            // The most caught-up follower.
            status
                .members
                .iter()
                .filter(|m| m.id != status.id && m.voter)
                .max_by_key(|m| m.matched)
                .map(|m| m.id)
                .ok_or_else(|| Status::failed_precondition("no other voter to transfer to"))?
        };
        if to == status.id {
            return Ok(Response::new(self.cluster_status()));
        }
        let mut watch = self.node().watch_status();
        self.node().transfer_leader(to).map_err(Status::from)?;
        let done = tokio::time::timeout(COMMIT_TIMEOUT, async {
            loop {
                if watch.borrow().leader == to {
                    return;
                }
                if watch.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        if done.is_err() {
            return Err(Status::deadline_exceeded(format!(
                "member {to} did not take over within {} s",
                COMMIT_TIMEOUT.as_secs()
            )));
        }
        Ok(Response::new(self.cluster_status()))
    }
}

#[tonic::async_trait]
impl raft_peer_server::RaftPeer for Service {
    async fn send(&self, req: Request<pb::RaftBatch>) -> Result<Response<pb::RaftAck>, Status> {
        let batch = req.into_inner();
        for bytes in batch.messages {
            let m = raft::eraftpb::Message::parse_from_bytes(&bytes).map_err(|e| {
                Status::invalid_argument(format!("raft message from {}: {e}", batch.from))
            })?;
            self.node().step(m).map_err(Status::from)?;
        }
        Ok(Response::new(pb::RaftAck {}))
    }

    async fn forward(
        &self,
        req: Request<pb::ForwardRequest>,
    ) -> Result<Response<pb::ForwardResponse>, Status> {
        let cmd = Command::decode(req.into_inner().command.as_ref())
            .map_err(|e| Status::invalid_argument(format!("forwarded command: {e}")))?;
        if !self.is_leader() {
            // No second hop: the caller retries once it learns the new leader.
            return Err(Error::NoLeader {
                member: self.node().id(),
            }
            .into());
        }
        let result = self.submit_as_leader(cmd).await?;
        Ok(Response::new(pb::ForwardResponse {
            result: result.encode_to_vec(),
        }))
    }
}

impl From<Reject> for Status {
    fn from(r: Reject) -> Status {
        Status::new(r.code, r.message)
    }
}
