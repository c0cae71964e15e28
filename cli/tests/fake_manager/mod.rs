//! Test fixture: a fake `Manager` gRPC server in the test process. It records every request,
//! keeps just enough state to answer the CLI and the storage daemon plausibly (volumes by
//! name, registered nodes, a canned cluster status) and can be told to fail a method with a
//! status. Snapshots progress by themselves as they are listed: a CREATING one becomes READY
//! (or FAILED, with [`State::snapshot_error`]) and a DELETING one disappears after
//! [`State::snapshot_polls`] listings, like a gateway doing the work. It is not the manager: the real one is tested against these same clients in the
//! manager's own suite.
//!
//! The server runs on a runtime of its own (a background thread), so tests may block on it:
//! [`FakeManager::wait`] sleeps on a condition variable that every request signals.
#![allow(dead_code)]

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ironsan_common::proto::manager as pb;
use ironsan_common::proto::manager::manager_server::{Manager, ManagerServer};
use tonic::{Code, Request, Response, Status};

/// What the fake knows and has seen.
#[derive(Default)]
pub struct State {
    /// Every request, in arrival order: method name and the request message.
    pub calls: Vec<(&'static str, Instant, Box<dyn Any + Send>)>,
    pub volumes: Vec<pb::Volume>,
    pub nodes: Vec<pb::Node>,
    pub status: pb::ClusterStatus,
    /// Answer the named method with this status (every time, until removed).
    pub fail: HashMap<&'static str, (Code, String)>,
    /// Interval returned by `register_node` and every heartbeat.
    pub heartbeat_interval_ms: u64,
    /// Sent with every heartbeat answer.
    pub drop_chunks: Vec<pb::Chunk>,
    pub resync_chunks: Vec<pb::Chunk>,
    /// Sent with every heartbeat answer.
    pub recovery_pending: u64,
    /// Listings a CREATING or DELETING snapshot stays so before it moves on.
    pub snapshot_polls: usize,
    /// Snapshots being taken fail with this error instead of becoming READY.
    pub snapshot_error: Option<String>,
    /// Listings each snapshot has been seen in its present state.
    snapshot_seen: HashMap<u64, usize>,
    next_volume_id: u64,
    next_snapshot_id: u64,
}

impl State {
    /// The requests of `method` so far, in order.
    pub fn requests<T: Clone + 'static>(&self, method: &str) -> Vec<T> {
        self.calls
            .iter()
            .filter(|(m, _, _)| *m == method)
            .filter_map(|(_, _, r)| r.downcast_ref::<T>().cloned())
            .collect()
    }

    /// When each request of `method` arrived.
    pub fn times(&self, method: &str) -> Vec<Instant> {
        self.calls
            .iter()
            .filter(|(m, _, _)| *m == method)
            .map(|(_, t, _)| *t)
            .collect()
    }

    pub fn count(&self, method: &str) -> usize {
        self.calls.iter().filter(|(m, _, _)| *m == method).count()
    }

    fn find_volume(&self, r: &pb::VolumeRef) -> Option<usize> {
        self.volumes
            .iter()
            .position(|v| (r.id != 0 && v.id == r.id) || (r.id == 0 && v.name == r.name))
    }

    /// The volume's index, or NOT_FOUND.
    fn volume(&self, r: Option<&pb::VolumeRef>) -> Result<usize, Status> {
        let r = r.cloned().unwrap_or_default();
        self.find_volume(&r).ok_or_else(|| volume_not_found(&r))
    }

    /// (volume index, snapshot index) of a snapshot named by id or by volume and name.
    fn find_snapshot(&self, r: &pb::SnapshotRef) -> Result<(usize, usize), Status> {
        let not_found = || Status::not_found(format!("no snapshot {:?} (id {})", r.name, r.id));
        if r.id != 0 {
            return self
                .volumes
                .iter()
                .enumerate()
                .find_map(|(vi, v)| {
                    let si = v.snapshots.iter().position(|s| s.id == r.id)?;
                    Some((vi, si))
                })
                .ok_or_else(not_found);
        }
        let vi = self.volume(r.volume.as_ref())?;
        let si = self.volumes[vi]
            .snapshots
            .iter()
            .position(|s| s.name == r.name)
            .ok_or_else(not_found)?;
        Ok((vi, si))
    }

    /// One listing's worth of the gateway's work: snapshots seen `snapshot_polls` times in
    /// CREATING become READY (or FAILED), in DELETING go.
    fn advance_snapshots(&mut self) {
        let polls = self.snapshot_polls;
        let error = self.snapshot_error.clone();
        let seen = &mut self.snapshot_seen;
        for v in &mut self.volumes {
            v.snapshots.retain_mut(|s| {
                let n = seen.entry(s.id).or_default();
                *n += 1;
                if *n <= polls {
                    return true;
                }
                *n = 0;
                match pb::SnapshotState::try_from(s.state) {
                    Ok(pb::SnapshotState::SnapshotCreating) => {
                        match &error {
                            Some(e) => {
                                s.state = pb::SnapshotState::SnapshotFailed as i32;
                                s.error = e.clone();
                            }
                            None => {
                                s.state = pb::SnapshotState::SnapshotReady as i32;
                                s.ready_ms = s.created_ms + 420;
                            }
                        }
                        true
                    }
                    Ok(pb::SnapshotState::SnapshotDeleting) => false,
                    _ => true,
                }
            });
        }
    }

    /// A new volume (ids from the fake's counter) holding `template`'s other fields.
    fn add_volume(&mut self, template: pb::Volume) -> Result<pb::Volume, Status> {
        if self.volumes.iter().any(|v| v.name == template.name) {
            return Err(Status::already_exists(format!(
                "volume {:?} exists",
                template.name
            )));
        }
        let v = pb::Volume {
            id: self.next_volume_id,
            state: pb::VolumeState::VolumeAvailable as i32,
            created_ms: 1_700_000_000_000,
            ..template
        };
        self.next_volume_id += 1;
        self.volumes.push(v.clone());
        Ok(v)
    }
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

/// A running fake; the server stops when this is dropped.
pub struct FakeManager {
    pub addr: String,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl FakeManager {
    pub fn start() -> FakeManager {
        Self::start_at("127.0.0.1:0")
    }

    /// Serves at `addr` (a manager that comes up late).
    pub fn start_at(addr: &str) -> FakeManager {
        let listener = std::net::TcpListener::bind(addr).expect("bind fake manager");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr").to_string();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                heartbeat_interval_ms: 1000,
                snapshot_polls: 3,
                next_volume_id: 1,
                next_snapshot_id: 1,
                ..Default::default()
            }),
            changed: Condvar::new(),
        });
        let svc = Svc(shared.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("fake manager runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let _ = tonic::transport::Server::builder()
                    .add_service(ManagerServer::new(svc))
                    .serve_with_incoming_shutdown(
                        tonic::transport::server::TcpIncoming::from(listener),
                        async {
                            let _ = stopped.await;
                        },
                    )
                    .await;
            });
        });
        FakeManager {
            addr,
            shared,
            stop: Some(stop),
        }
    }

    /// Locks the fake's state (to read what it saw or change what it answers).
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap()
    }

    /// Waits until `cond` holds (re-checked after every request), at most `timeout`.
    pub fn wait(&self, timeout: Duration, cond: impl Fn(&State) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.state();
        loop {
            if cond(&s) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self.shared.changed.wait_timeout(s, left).unwrap().0;
        }
    }
}

impl Drop for FakeManager {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

struct Svc(Arc<Shared>);

type Answer<T> = Result<Response<T>, Status>;

impl Svc {
    /// Records the request and runs `f` on the state, unless the method is set to fail.
    fn handle<Req: Clone + Send + 'static, Resp>(
        &self,
        method: &'static str,
        req: Request<Req>,
        f: impl FnOnce(&mut State, Req) -> Result<Resp, Status>,
    ) -> Answer<Resp> {
        let req = req.into_inner();
        let mut s = self.0.state.lock().unwrap();
        s.calls
            .push((method, Instant::now(), Box::new(req.clone())));
        let out = match s.fail.get(method) {
            Some((code, msg)) => Err(Status::new(*code, msg.clone())),
            None => f(&mut s, req),
        };
        drop(s);
        self.0.changed.notify_all();
        out.map(Response::new)
    }
}

fn volume_not_found(r: &pb::VolumeRef) -> Status {
    Status::not_found(format!("no volume {:?} (id {})", r.name, r.id))
}

#[tonic::async_trait]
impl Manager for Svc {
    async fn create_volume(&self, req: Request<pb::CreateVolumeRequest>) -> Answer<pb::Volume> {
        self.handle("create_volume", req, |s, r| {
            s.add_volume(pb::Volume {
                name: r.name,
                size: r.size,
                replicas: if r.replicas == 0 { 3 } else { r.replicas },
                chunk_size: if r.chunk_size == 0 {
                    64 << 20
                } else {
                    r.chunk_size
                },
                qos: r.qos,
                ..Default::default()
            })
        })
    }

    async fn get_volume(&self, req: Request<pb::VolumeRef>) -> Answer<pb::Volume> {
        self.handle("get_volume", req, |s, r| {
            let i = s.find_volume(&r).ok_or_else(|| volume_not_found(&r))?;
            Ok(s.volumes[i].clone())
        })
    }

    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Answer<pb::ListVolumesResponse> {
        self.handle("list_volumes", req, |s, _| {
            Ok(pb::ListVolumesResponse {
                volumes: s.volumes.clone(),
                changed: 0,
            })
        })
    }

    async fn resize_volume(&self, req: Request<pb::ResizeVolumeRequest>) -> Answer<pb::Volume> {
        self.handle("resize_volume", req, |s, r| {
            let vref = r.volume.unwrap_or_default();
            let i = s
                .find_volume(&vref)
                .ok_or_else(|| volume_not_found(&vref))?;
            if r.size < s.volumes[i].size {
                return Err(Status::failed_precondition("volumes cannot shrink"));
            }
            s.volumes[i].size = r.size;
            Ok(s.volumes[i].clone())
        })
    }

    async fn set_volume_qos(&self, req: Request<pb::SetVolumeQosRequest>) -> Answer<pb::Volume> {
        self.handle("set_volume_qos", req, |s, r| {
            let vref = r.volume.unwrap_or_default();
            let i = s
                .find_volume(&vref)
                .ok_or_else(|| volume_not_found(&vref))?;
            s.volumes[i].qos = r.qos;
            Ok(s.volumes[i].clone())
        })
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Answer<pb::DeleteVolumeResponse> {
        self.handle("delete_volume", req, |s, r| {
            let vref = r.volume.unwrap_or_default();
            let i = s
                .find_volume(&vref)
                .ok_or_else(|| volume_not_found(&vref))?;
            s.volumes.remove(i);
            Ok(pb::DeleteVolumeResponse {})
        })
    }

    async fn create_snapshot(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Answer<pb::Snapshot> {
        self.handle("create_snapshot", req, |s, r| {
            let vi = s.volume(r.volume.as_ref())?;
            let v = &s.volumes[vi];
            if v.state == pb::VolumeState::VolumeDeleting as i32 {
                return Err(Status::failed_precondition("the volume is being deleted"));
            }
            if v.snapshots.iter().any(|x| x.name == r.name) {
                return Err(Status::already_exists(format!(
                    "volume {:?} has a snapshot {:?}",
                    v.name, r.name
                )));
            }
            let snap = pb::Snapshot {
                id: s.next_snapshot_id,
                volume_id: v.id,
                name: r.name,
                state: pb::SnapshotState::SnapshotCreating as i32,
                created_ms: 1_700_000_000_000 + 1000 * s.next_snapshot_id,
                size: v.size,
                volume_name: v.name.clone(),
                ..Default::default()
            };
            s.next_snapshot_id += 1;
            s.volumes[vi].snapshots.push(snap.clone());
            Ok(snap)
        })
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Answer<pb::ListSnapshotsResponse> {
        self.handle("list_snapshots", req, |s, r| {
            s.advance_snapshots();
            let only = match &r.volume {
                Some(v) => Some(s.volume(Some(v))?),
                None => None,
            };
            let snapshots = s
                .volumes
                .iter()
                .enumerate()
                .filter(|(vi, _)| only.is_none_or(|o| o == *vi))
                .flat_map(|(_, v)| v.snapshots.iter())
                .filter(|x| r.id == 0 || x.id == r.id)
                .cloned()
                .collect();
            Ok(pb::ListSnapshotsResponse { snapshots })
        })
    }

    async fn delete_snapshot(&self, req: Request<pb::SnapshotRef>) -> Answer<pb::Snapshot> {
        self.handle("delete_snapshot", req, |s, r| {
            let (vi, si) = s.find_snapshot(&r)?;
            let snap = &mut s.volumes[vi].snapshots[si];
            if !snap.dependents.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "volumes {:?} still copy from it",
                    snap.dependents
                )));
            }
            snap.state = pb::SnapshotState::SnapshotDeleting as i32;
            let snap = snap.clone();
            s.snapshot_seen.insert(snap.id, 0);
            Ok(snap)
        })
    }

    async fn snapshot_done(&self, req: Request<pb::SnapshotDoneRequest>) -> Answer<pb::Snapshot> {
        self.handle("snapshot_done", req, |_, _| {
            Err(Status::unimplemented("snapshot_done"))
        })
    }

    async fn clone_volume(&self, req: Request<pb::CloneVolumeRequest>) -> Answer<pb::Volume> {
        self.handle("clone_volume", req, |s, r| {
            let vi = s.volume(r.source.as_ref())?;
            let src = s.volumes[vi].clone();
            let (snapshot_id, snapshot_name, snap_size) = if r.snapshot.is_empty() {
                // The real manager takes an internal snapshot; the fake only names one.
                (0, format!("clone-{}", r.name), src.size)
            } else {
                let snap = src
                    .snapshots
                    .iter()
                    .find(|x| x.name == r.snapshot)
                    .ok_or_else(|| Status::not_found(format!("no snapshot {:?}", r.snapshot)))?;
                if snap.state != pb::SnapshotState::SnapshotReady as i32 {
                    return Err(Status::failed_precondition("the snapshot is not ready"));
                }
                (snap.id, snap.name.clone(), snap.size)
            };
            if r.size != 0 && r.size < snap_size {
                return Err(Status::invalid_argument(format!(
                    "size {} is below the source's {snap_size}",
                    r.size
                )));
            }
            let size = if r.size == 0 { snap_size } else { r.size };
            s.add_volume(pb::Volume {
                name: r.name,
                size,
                replicas: if r.replicas == 0 {
                    src.replicas
                } else {
                    r.replicas
                },
                chunk_size: src.chunk_size,
                qos: r.qos,
                source: Some(pb::VolumeSource {
                    volume_id: src.id,
                    snapshot_id,
                    chunks_left: size.div_ceil(src.chunk_size.max(1)),
                    volume_name: src.name,
                    snapshot_name,
                }),
                ..Default::default()
            })
        })
    }

    async fn restore_snapshot(
        &self,
        req: Request<pb::RestoreSnapshotRequest>,
    ) -> Answer<pb::Volume> {
        self.handle("restore_snapshot", req, |s, r| {
            let (vi, si) = s.find_snapshot(&r.snapshot.unwrap_or_default())?;
            let v = &mut s.volumes[vi];
            if v.attachment.is_some() {
                return Err(Status::failed_precondition("the volume is attached"));
            }
            let snap = v.snapshots[si].clone();
            if snap.state != pb::SnapshotState::SnapshotReady as i32 {
                return Err(Status::failed_precondition("the snapshot is not ready"));
            }
            v.source = Some(pb::VolumeSource {
                volume_id: v.id,
                snapshot_id: snap.id,
                chunks_left: snap.size.div_ceil(v.chunk_size.max(1)),
                volume_name: v.name.clone(),
                snapshot_name: snap.name,
            });
            Ok(v.clone())
        })
    }

    async fn source_copied(&self, req: Request<pb::SourceCopiedRequest>) -> Answer<pb::Chunk> {
        self.handle("source_copied", req, |_, _| {
            Err(Status::unimplemented("source_copied"))
        })
    }

    async fn attach(&self, req: Request<pb::AttachRequest>) -> Answer<pb::Attachment> {
        self.handle("attach", req, |_, _| Err(Status::unimplemented("attach")))
    }

    async fn renew(&self, req: Request<pb::RenewRequest>) -> Answer<pb::Attachment> {
        self.handle("renew", req, |_, _| Err(Status::unimplemented("renew")))
    }

    async fn detach(&self, req: Request<pb::DetachRequest>) -> Answer<pb::DetachResponse> {
        self.handle("detach", req, |_, _| Err(Status::unimplemented("detach")))
    }

    async fn publish(&self, req: Request<pb::PublishRequest>) -> Answer<pb::Attachment> {
        self.handle("publish", req, |_, _| Err(Status::unimplemented("publish")))
    }

    async fn unpublish(&self, req: Request<pb::UnpublishRequest>) -> Answer<pb::UnpublishResponse> {
        self.handle("unpublish", req, |_, _| {
            Err(Status::unimplemented("unpublish"))
        })
    }

    async fn register_gateway(
        &self,
        req: Request<pb::RegisterGatewayRequest>,
    ) -> Answer<pb::Gateway> {
        self.handle("register_gateway", req, |_, _| {
            Err(Status::unimplemented("register_gateway"))
        })
    }

    async fn get_gateway(&self, req: Request<pb::GatewayRef>) -> Answer<pb::Gateway> {
        self.handle("get_gateway", req, |_, _| {
            Err(Status::unimplemented("get_gateway"))
        })
    }

    async fn list_gateways(
        &self,
        req: Request<pb::ListGatewaysRequest>,
    ) -> Answer<pb::ListGatewaysResponse> {
        self.handle("list_gateways", req, |_, _| {
            Err(Status::unimplemented("list_gateways"))
        })
    }

    async fn get_chunks(
        &self,
        req: Request<pb::GetChunksRequest>,
    ) -> Answer<pb::GetChunksResponse> {
        self.handle("get_chunks", req, |_, _| {
            Err(Status::unimplemented("get_chunks"))
        })
    }

    async fn report_failed_replica(
        &self,
        req: Request<pb::ReportFailedReplicaRequest>,
    ) -> Answer<pb::Chunk> {
        self.handle("report_failed_replica", req, |_, _| {
            Err(Status::unimplemented("report_failed_replica"))
        })
    }

    async fn register_node(
        &self,
        req: Request<pb::RegisterNodeRequest>,
    ) -> Answer<pb::RegisterNodeResponse> {
        self.handle("register_node", req, |s, r| {
            let node = pb::Node {
                id: r.id.clone(),
                addr: r.addr,
                zone: r.zone,
                state: pb::NodeState::NodeUp as i32,
                capacity: r.disks.iter().map(|d| d.capacity).sum(),
                free: r.disks.iter().map(|d| d.free).sum(),
                disks: r.disks,
                ..Default::default()
            };
            s.nodes.retain(|n| n.id != r.id);
            s.nodes.push(node.clone());
            Ok(pb::RegisterNodeResponse {
                node: Some(node),
                heartbeat_interval_ms: s.heartbeat_interval_ms,
            })
        })
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Answer<pb::HeartbeatResponse> {
        self.handle("heartbeat", req, |s, r| {
            let n = s
                .nodes
                .iter_mut()
                .find(|n| n.id == r.id)
                .ok_or_else(|| Status::not_found(format!("no node {:?}", r.id)))?;
            n.free = r.disks.iter().map(|d| d.free).sum();
            n.disks = r.disks;
            let state = n.state;
            Ok(pb::HeartbeatResponse {
                state,
                heartbeat_interval_ms: s.heartbeat_interval_ms,
                drop_chunks: s.drop_chunks.clone(),
                resync_chunks: s.resync_chunks.clone(),
                recovery_pending: s.recovery_pending,
            })
        })
    }

    async fn list_nodes(
        &self,
        req: Request<pb::ListNodesRequest>,
    ) -> Answer<pb::ListNodesResponse> {
        self.handle("list_nodes", req, |s, _| {
            Ok(pb::ListNodesResponse {
                nodes: s.nodes.clone(),
            })
        })
    }

    async fn drain_node(&self, req: Request<pb::DrainNodeRequest>) -> Answer<pb::Node> {
        self.handle("drain_node", req, |s, r| {
            let n = s
                .nodes
                .iter_mut()
                .find(|n| n.id == r.id)
                .ok_or_else(|| Status::not_found(format!("no node {:?}", r.id)))?;
            n.state = pb::NodeState::NodeDraining as i32;
            Ok(n.clone())
        })
    }

    async fn list_tasks(
        &self,
        req: Request<pb::ListTasksRequest>,
    ) -> Answer<pb::ListTasksResponse> {
        self.handle("list_tasks", req, |_, _| {
            Ok(pb::ListTasksResponse::default())
        })
    }

    async fn task_progress(
        &self,
        req: Request<pb::TaskProgressRequest>,
    ) -> Answer<pb::TaskProgressResponse> {
        self.handle("task_progress", req, |_, _| {
            Err(Status::unimplemented("task_progress"))
        })
    }

    async fn complete_task(
        &self,
        req: Request<pb::CompleteTaskRequest>,
    ) -> Answer<pb::CompleteTaskResponse> {
        self.handle("complete_task", req, |_, _| {
            Err(Status::unimplemented("complete_task"))
        })
    }

    async fn status(&self, req: Request<pb::StatusRequest>) -> Answer<pb::ClusterStatus> {
        self.handle("status", req, |s, _| Ok(s.status.clone()))
    }

    async fn add_member(
        &self,
        req: Request<pb::AddMemberRequest>,
    ) -> Answer<pb::MembershipResponse> {
        self.handle("add_member", req, |_, _| {
            Err(Status::unimplemented("add_member"))
        })
    }

    async fn remove_member(
        &self,
        req: Request<pb::RemoveMemberRequest>,
    ) -> Answer<pb::MembershipResponse> {
        self.handle("remove_member", req, |_, _| {
            Err(Status::unimplemented("remove_member"))
        })
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::TransferLeaderRequest>,
    ) -> Answer<pb::ClusterStatus> {
        self.handle("transfer_leader", req, |_, _| {
            Err(Status::unimplemented("transfer_leader"))
        })
    }
}
