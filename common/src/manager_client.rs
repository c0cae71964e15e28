//! The typed client of the manager's gRPC API (`proto/manager.proto`), shared by the CLI, the
//! storage daemon, the gateway and the CSI driver.
//!
//! A [`ManagerClient`] knows every member of the manager group (the comma-separated
//! `--manager` list). Any member answers any call, so a call goes to the member that answered
//! last; on a transport error, `UNAVAILABLE` (no leader or quorum there) or
//! `DEADLINE_EXCEEDED` it moves on to the next member, cycling through all of them with a short
//! backoff after each full round (50 ms doubling to 500 ms) until the overall deadline (10 s by
//! default). Every other status is the manager's answer and is returned at once.
//!
//! Members may be DNS names (a StatefulSet's `ironsan-manager-0.ironsan-manager...:7400`):
//! the channel's connector resolves the name at every (re)connect, so a name that does not
//! resolve yet only makes that member unavailable for the moment, like a member that is down.
//!
//! Channels connect lazily on first use (1 s connect timeout), so building a client never
//! blocks and needs no runtime; each attempt is bounded by the per-call timeout (5 s by
//! default, never beyond the overall deadline), which is also sent to the server as
//! `grpc-timeout`.
//!
//! **Retried mutations.** A mutation whose answer was lost (the connection broke, or the call
//! timed out after the leader committed it) is sent again to the next member, and may then be
//! refused because of its own earlier success: a `create_volume` answered `ALREADY_EXISTS`, a
//! `delete_volume` answered `NOT_FOUND`, an `attach` answered `FAILED_PRECONDITION`. Callers
//! that care (a create after a timeout) check the resulting state with a read.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};

use crate::proto::manager::{self as pb, manager_client::ManagerClient as GrpcClient};

/// The gRPC status and its codes, re-exported so callers can branch on [`ClientError::code`]
/// without depending on tonic themselves.
pub use tonic::{Code, Status};

/// Default bound on one attempt against one member.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound on a whole call, failovers and backoff included.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);
/// How long a connection attempt to one member may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest request the manager decodes from a client (gRPC's usual 4 MiB).
pub const MAX_REQUEST: usize = 4 << 20;
/// Largest answer: the chunk list of the largest volume (256 Ki chunks) fits.
pub const MAX_RESPONSE: usize = 64 << 20;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// Why a manager call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The member list could not be parsed.
    #[error("invalid manager address list: {0}")]
    InvalidMembers(String),
    /// A member answered with this (non-retryable) status.
    #[error("manager {member}: {} ({:?})", status.message(), status.code())]
    Status {
        member: String,
        status: tonic::Status,
    },
    /// No member gave an answer before the deadline.
    #[error("no manager member answered (tried {}); last error: {last}", tried.join(", "))]
    Unavailable { tried: Vec<String>, last: String },
}

impl ClientError {
    /// The gRPC code: the status's own, `UNAVAILABLE` when no member answered, and
    /// `INVALID_ARGUMENT` for a bad member list.
    pub fn code(&self) -> Code {
        match self {
            ClientError::InvalidMembers(_) => Code::InvalidArgument,
            ClientError::Status { status, .. } => status.code(),
            ClientError::Unavailable { .. } => Code::Unavailable,
        }
    }

    /// The status message as the manager wrote it (or this error's text otherwise).
    pub fn message(&self) -> String {
        match self {
            ClientError::Status { status, .. } => status.message().to_string(),
            other => other.to_string(),
        }
    }
}

struct Member {
    addr: String,
    endpoint: Endpoint,
    /// Built on first use: creating a tonic channel spawns its worker on the current runtime.
    channel: OnceLock<Channel>,
}

impl Member {
    fn grpc(&self) -> GrpcClient<Channel> {
        GrpcClient::new(
            self.channel
                .get_or_init(|| self.endpoint.connect_lazy())
                .clone(),
        )
        .max_decoding_message_size(MAX_RESPONSE)
    }
}

/// A failover client of the manager group. Cheap to clone; clones share connections and the
/// memory of which member answered last.
#[derive(Clone)]
pub struct ManagerClient {
    members: Arc<[Member]>,
    /// Index of the member that answered last.
    preferred: Arc<AtomicUsize>,
    call_timeout: Duration,
    deadline: Duration,
}

impl fmt::Debug for ManagerClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManagerClient")
            .field("members", &self.members())
            .field("call_timeout", &self.call_timeout)
            .field("deadline", &self.deadline)
            .finish()
    }
}

/// Checks one `host:port` address as members and advertised addresses are written: a DNS name
/// or IPv4 address, or a bracketed IPv6 address, and a non-zero port.
pub fn check_addr(addr: &str) -> Result<(), String> {
    let port = if let Some(rest) = addr.strip_prefix('[') {
        let (ip, port) = rest
            .split_once("]:")
            .ok_or_else(|| format!("{addr:?} is not [IPv6]:PORT"))?;
        ip.parse::<std::net::Ipv6Addr>()
            .map_err(|_| format!("{addr:?}: {ip:?} is not an IPv6 address"))?;
        port
    } else {
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| format!("{addr:?} has no port (expected HOST:PORT)"))?;
        if host.is_empty() {
            return Err(format!("{addr:?} has no host (expected HOST:PORT)"));
        }
        if !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        {
            return Err(format!(
                "{addr:?}: host {host:?} is not a name or IPv4 address (write IPv6 as [ADDR]:PORT)"
            ));
        }
        port
    };
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(()),
        _ => Err(format!("{addr:?}: {port:?} is not a port (1-65535)")),
    }
}

impl ManagerClient {
    /// A client of the members in `members`: `host:port` entries separated by commas
    /// (whitespace around entries is ignored; duplicates are dropped). Nothing connects yet.
    pub fn new(members: &str) -> Result<Self, ClientError> {
        if members.trim().is_empty() {
            return Err(ClientError::InvalidMembers(
                "no manager address given (expected HOST:PORT[,HOST:PORT...])".into(),
            ));
        }
        let mut list: Vec<Member> = Vec::new();
        for entry in members.split(',') {
            let addr = entry.trim();
            if addr.is_empty() {
                return Err(ClientError::InvalidMembers(format!(
                    "empty entry in {members:?}"
                )));
            }
            check_addr(addr).map_err(ClientError::InvalidMembers)?;
            if list.iter().any(|m| m.addr == addr) {
                continue;
            }
            let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| ClientError::InvalidMembers(format!("{addr:?}: {e}")))?
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5));
            list.push(Member {
                addr: addr.to_string(),
                endpoint,
                channel: OnceLock::new(),
            });
        }
        Ok(Self {
            members: list.into(),
            preferred: Arc::new(AtomicUsize::new(0)),
            call_timeout: DEFAULT_CALL_TIMEOUT,
            deadline: DEFAULT_DEADLINE,
        })
    }

    /// Bounds a whole call (every failover and backoff included); at least one attempt is
    /// always made.
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Bounds one attempt against one member.
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// The members, in the order given.
    pub fn members(&self) -> Vec<String> {
        self.members.iter().map(|m| m.addr.clone()).collect()
    }

    /// Runs one RPC with failover (see the module docs).
    async fn call<Req, Resp, F, Fut>(
        &self,
        method: &'static str,
        req: Req,
        mut rpc: F,
    ) -> Result<Resp, ClientError>
    where
        Req: Clone,
        F: FnMut(GrpcClient<Channel>, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let n = self.members.len();
        let start = Instant::now();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut backoff = BACKOFF_MIN;
        let mut tried: Vec<String> = Vec::new();
        let mut last = String::new();
        for attempt in 0usize.. {
            let remaining = self.deadline.saturating_sub(start.elapsed());
            if attempt > 0 && remaining.is_zero() {
                break;
            }
            let i = (first + attempt) % n;
            let member = &self.members[i];
            let limit = self
                .call_timeout
                .min(remaining)
                .max(Duration::from_millis(1));
            let mut request = tonic::Request::new(req.clone());
            request.set_timeout(limit);
            let outcome = tokio::time::timeout(limit, rpc(member.grpc(), request)).await;
            let why = match outcome {
                Ok(Ok(resp)) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok(resp.into_inner());
                }
                Ok(Err(status)) if retryable(&status) => {
                    let mut why = format!("{}: {}", member.addr, status.message());
                    // A local transport failure keeps its cause (refused, reset...) as source.
                    let mut cause = std::error::Error::source(&status);
                    while let Some(c) = cause {
                        let text = c.to_string();
                        if !why.contains(&text) {
                            why.push_str(&format!(": {text}"));
                        }
                        cause = c.source();
                    }
                    why.push_str(&format!(" ({:?})", status.code()));
                    why
                }
                Ok(Err(status)) => {
                    // It answered: it is alive, start there next time.
                    self.preferred.store(i, Ordering::Relaxed);
                    return Err(ClientError::Status {
                        member: member.addr.clone(),
                        status,
                    });
                }
                Err(_) => format!("{}: no answer within {limit:?}", member.addr),
            };
            tracing::debug!(method, member = %member.addr, "manager call failed over: {why}");
            if !tried.contains(&member.addr) {
                tried.push(member.addr.clone());
            }
            last = why;
            if (attempt + 1) % n == 0 {
                let remaining = self.deadline.saturating_sub(start.elapsed());
                tokio::time::sleep(backoff.min(remaining)).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
        Err(ClientError::Unavailable { tried, last })
    }
}

/// Whether a failed attempt should move on to the next member: the member has no leader or
/// quorum (`UNAVAILABLE`, also what tonic reports for a refused connection), ran out of time
/// (`DEADLINE_EXCEEDED`), or the call died in the transport (`CANCELLED`, or `UNKNOWN` raised
/// locally from an I/O error; a status sent by a server never carries a local source).
fn retryable(status: &tonic::Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => true,
        Code::Unknown => std::error::Error::source(status).is_some(),
        _ => false,
    }
}

/// One client method per RPC of the `Manager` service.
macro_rules! rpcs {
    ($( $(#[$doc:meta])* $name:ident($req:ty) -> $resp:ty; )*) => {
        impl ManagerClient {
            $(
                $(#[$doc])*
                pub async fn $name(&self, req: $req) -> Result<$resp, ClientError> {
                    self.call(stringify!($name), req, |mut c, r| async move { c.$name(r).await })
                        .await
                }
            )*
        }
    };
}

rpcs! {
    /// Creates a volume and places its chunks (`ALREADY_EXISTS` for a taken name).
    create_volume(pb::CreateVolumeRequest) -> pb::Volume;
    get_volume(pb::VolumeRef) -> pb::Volume;
    list_volumes(pb::ListVolumesRequest) -> pb::ListVolumesResponse;
    /// Grows a volume (`FAILED_PRECONDITION` for a shrink).
    resize_volume(pb::ResizeVolumeRequest) -> pb::Volume;
    delete_volume(pb::DeleteVolumeRequest) -> pb::DeleteVolumeResponse;
    /// Replaces a volume's QoS limits (unset or all zero: unlimited).
    set_volume_qos(pb::SetVolumeQosRequest) -> pb::Volume;
    /// Requests a snapshot (answered in state CREATING; poll `list_snapshots` for READY).
    create_snapshot(pb::CreateSnapshotRequest) -> pb::Snapshot;
    list_snapshots(pb::ListSnapshotsRequest) -> pb::ListSnapshotsResponse;
    /// Marks a snapshot for deletion (`FAILED_PRECONDITION` while clones copy from it).
    delete_snapshot(pb::SnapshotRef) -> pb::Snapshot;
    /// The holding gateway reports a snapshot taken, failed or deleted on every replica.
    snapshot_done(pb::SnapshotDoneRequest) -> pb::Snapshot;
    /// A new volume from a snapshot or from a volume's present content.
    clone_volume(pb::CloneVolumeRequest) -> pb::Volume;
    /// Rolls a detached volume back to a snapshot.
    restore_snapshot(pb::RestoreSnapshotRequest) -> pb::Volume;
    /// The holding gateway reports a chunk filled from the volume's source.
    source_copied(pb::SourceCopiedRequest) -> pb::Chunk;
    /// Takes the volume's lease for a gateway, with a new writer epoch.
    attach(pb::AttachRequest) -> pb::Attachment;
    renew(pb::RenewRequest) -> pb::Attachment;
    detach(pb::DetachRequest) -> pb::DetachResponse;
    /// Publishes a volume to a CSI node (attaching it to that node's gateway if no one holds
    /// it); idempotent for the same node and mode.
    publish(pb::PublishRequest) -> pb::Attachment;
    /// Unpublishes a volume from a CSI node; the last node out drops the attachment. `NOT_FOUND`
    /// only for an unknown volume.
    unpublish(pb::UnpublishRequest) -> pb::UnpublishResponse;
    /// Announces a gateway and its portal (idempotent).
    register_gateway(pb::RegisterGatewayRequest) -> pb::Gateway;
    /// A registered gateway (`NOT_FOUND` if none has that id).
    get_gateway(pb::GatewayRef) -> pb::Gateway;
    list_gateways(pb::ListGatewaysRequest) -> pb::ListGatewaysResponse;
    get_chunks(pb::GetChunksRequest) -> pb::GetChunksResponse;
    report_failed_replica(pb::ReportFailedReplicaRequest) -> pb::Chunk;
    register_node(pb::RegisterNodeRequest) -> pb::RegisterNodeResponse;
    /// A storage node's heartbeat (`NOT_FOUND`: the manager does not know it; register again).
    heartbeat(pb::HeartbeatRequest) -> pb::HeartbeatResponse;
    list_nodes(pb::ListNodesRequest) -> pb::ListNodesResponse;
    drain_node(pb::DrainNodeRequest) -> pb::Node;
    list_tasks(pb::ListTasksRequest) -> pb::ListTasksResponse;
    complete_task(pb::CompleteTaskRequest) -> pb::CompleteTaskResponse;
    task_progress(pb::TaskProgressRequest) -> pb::TaskProgressResponse;
    status(pb::StatusRequest) -> pb::ClusterStatus;
    add_member(pb::AddMemberRequest) -> pb::MembershipResponse;
    remove_member(pb::RemoveMemberRequest) -> pb::MembershipResponse;
    transfer_leader(pb::TransferLeaderRequest) -> pb::ClusterStatus;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::manager::manager_server::{Manager, ManagerServer};
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicU64;
    use tonic::{Request, Response, Status};

    #[test]
    fn parses_member_lists() {
        let c = ManagerClient::new(" 10.0.0.1:7400, m2.example:7400 ,[::1]:7400").unwrap();
        assert_eq!(
            c.members(),
            ["10.0.0.1:7400", "m2.example:7400", "[::1]:7400"]
        );
        assert_eq!(
            ManagerClient::new("a:1,a:1").unwrap().members(),
            ["a:1"],
            "duplicates dropped"
        );
        for bad in [
            "",
            "  ",
            "a:1,,b:2",
            "a:1,",
            "host",
            ":7400",
            "host:0",
            "host:http",
            "host:70000",
            "::1:7400",
            "[::1]",
            "[nope]:1",
            "http://host:7400",
            "a b:1",
        ] {
            let e = ManagerClient::new(bad).unwrap_err();
            assert!(matches!(e, ClientError::InvalidMembers(_)), "{bad:?}: {e}");
            assert_eq!(e.code(), Code::InvalidArgument);
        }
    }

    /// A member answering every `status` with a fixed outcome, counting calls.
    struct Fake {
        id: u64,
        fail: Option<Code>,
        delay: Duration,
        calls: Arc<AtomicU64>,
    }

    /// `impl Manager` with the given methods, every other one answering UNIMPLEMENTED. (The
    /// whole impl comes out of the macro so that `async_trait` sees expanded methods.)
    macro_rules! fake_manager {
        ($ty:ty { $($body:tt)* } unimplemented { $($name:ident($req:ty) -> $resp:ty;)* }) => {
            #[tonic::async_trait]
            impl Manager for $ty {
                $($body)*
                $(
                    async fn $name(&self, _: Request<$req>) -> Result<Response<$resp>, Status> {
                        Err(Status::unimplemented(stringify!($name)))
                    }
                )*
            }
        };
    }

    fake_manager! {
        Fake {
            async fn status(
                &self,
                _: Request<pb::StatusRequest>,
            ) -> Result<Response<pb::ClusterStatus>, Status> {
                self.calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(self.delay).await;
                match self.fail {
                    Some(code) => Err(Status::new(code, format!("member {} says no", self.id))),
                    None => Ok(Response::new(pb::ClusterStatus {
                        answered_by: self.id,
                        ..Default::default()
                    })),
                }
            }
        }
        unimplemented {
            create_volume(pb::CreateVolumeRequest) -> pb::Volume;
            get_volume(pb::VolumeRef) -> pb::Volume;
            list_volumes(pb::ListVolumesRequest) -> pb::ListVolumesResponse;
            resize_volume(pb::ResizeVolumeRequest) -> pb::Volume;
            delete_volume(pb::DeleteVolumeRequest) -> pb::DeleteVolumeResponse;
            set_volume_qos(pb::SetVolumeQosRequest) -> pb::Volume;
            create_snapshot(pb::CreateSnapshotRequest) -> pb::Snapshot;
            list_snapshots(pb::ListSnapshotsRequest) -> pb::ListSnapshotsResponse;
            delete_snapshot(pb::SnapshotRef) -> pb::Snapshot;
            snapshot_done(pb::SnapshotDoneRequest) -> pb::Snapshot;
            clone_volume(pb::CloneVolumeRequest) -> pb::Volume;
            restore_snapshot(pb::RestoreSnapshotRequest) -> pb::Volume;
            source_copied(pb::SourceCopiedRequest) -> pb::Chunk;
            attach(pb::AttachRequest) -> pb::Attachment;
            renew(pb::RenewRequest) -> pb::Attachment;
            detach(pb::DetachRequest) -> pb::DetachResponse;
            publish(pb::PublishRequest) -> pb::Attachment;
            unpublish(pb::UnpublishRequest) -> pb::UnpublishResponse;
            register_gateway(pb::RegisterGatewayRequest) -> pb::Gateway;
            get_gateway(pb::GatewayRef) -> pb::Gateway;
            list_gateways(pb::ListGatewaysRequest) -> pb::ListGatewaysResponse;
            get_chunks(pb::GetChunksRequest) -> pb::GetChunksResponse;
            report_failed_replica(pb::ReportFailedReplicaRequest) -> pb::Chunk;
            register_node(pb::RegisterNodeRequest) -> pb::RegisterNodeResponse;
            heartbeat(pb::HeartbeatRequest) -> pb::HeartbeatResponse;
            list_nodes(pb::ListNodesRequest) -> pb::ListNodesResponse;
            drain_node(pb::DrainNodeRequest) -> pb::Node;
            list_tasks(pb::ListTasksRequest) -> pb::ListTasksResponse;
            complete_task(pb::CompleteTaskRequest) -> pb::CompleteTaskResponse;
            task_progress(pb::TaskProgressRequest) -> pb::TaskProgressResponse;
            add_member(pb::AddMemberRequest) -> pb::MembershipResponse;
            remove_member(pb::RemoveMemberRequest) -> pb::MembershipResponse;
            transfer_leader(pb::TransferLeaderRequest) -> pb::ClusterStatus;
        }
    }

    /// Serves a fake member on a free loopback port; returns its address and call counter.
    async fn serve(id: u64, fail: Option<Code>, delay: Duration) -> (SocketAddr, Arc<AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(AtomicU64::new(0));
        let fake = Fake {
            id,
            fail,
            delay,
            calls: calls.clone(),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ManagerServer::new(fake))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        (addr, calls)
    }

    /// A loopback address nothing listens on.
    fn dead_addr() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    #[tokio::test]
    async fn fails_over_from_unavailable_and_remembers_who_answered() {
        let (a, a_calls) = serve(1, Some(Code::Unavailable), Duration::ZERO).await;
        let (b, b_calls) = serve(2, None, Duration::ZERO).await;
        let c = ManagerClient::new(&format!("{a},{b}")).unwrap();
        let st = c.status(pb::StatusRequest {}).await.unwrap();
        assert_eq!(st.answered_by, 2);
        assert_eq!(a_calls.load(Ordering::SeqCst), 1);
        // The next call starts with the member that answered.
        let st = c.clone().status(pb::StatusRequest {}).await.unwrap();
        assert_eq!(st.answered_by, 2);
        assert_eq!(a_calls.load(Ordering::SeqCst), 1);
        assert_eq!(b_calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn fails_over_from_a_dead_member_and_a_slow_one() {
        let (slow, _) = serve(1, None, Duration::from_secs(30)).await;
        let (b, _) = serve(2, None, Duration::ZERO).await;
        let c = ManagerClient::new(&format!("{},{slow},{b}", dead_addr()))
            .unwrap()
            .with_call_timeout(Duration::from_millis(300));
        let t = Instant::now();
        let st = c.status(pb::StatusRequest {}).await.unwrap();
        assert_eq!(st.answered_by, 2);
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn all_down_is_unavailable_within_the_deadline() {
        let (a, b) = (dead_addr(), dead_addr());
        let (c_addr, _) = serve(3, Some(Code::Unavailable), Duration::ZERO).await;
        let c = ManagerClient::new(&format!("{a},{b},{c_addr}"))
            .unwrap()
            .with_deadline(Duration::from_millis(800));
        let t = Instant::now();
        let e = c.status(pb::StatusRequest {}).await.unwrap_err();
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(700),
            "gave up early: {took:?}"
        );
        assert!(took < Duration::from_millis(2500), "overran: {took:?}");
        match &e {
            ClientError::Unavailable { tried, last } => {
                assert_eq!(tried.len(), 3, "{tried:?}");
                assert!(!last.is_empty());
            }
            other => panic!("{other}"),
        }
        assert_eq!(e.code(), Code::Unavailable);
    }

    #[tokio::test]
    async fn other_statuses_are_returned_without_failover() {
        let (a, a_calls) = serve(1, Some(Code::NotFound), Duration::ZERO).await;
        let (b, b_calls) = serve(2, None, Duration::ZERO).await;
        let c = ManagerClient::new(&format!("{a},{b}")).unwrap();
        let e = c.status(pb::StatusRequest {}).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        assert_eq!(e.message(), "member 1 says no");
        match e {
            ClientError::Status { member, .. } => assert_eq!(member, a.to_string()),
            other => panic!("{other}"),
        }
        assert_eq!(a_calls.load(Ordering::SeqCst), 1);
        assert_eq!(b_calls.load(Ordering::SeqCst), 0);
    }
}
