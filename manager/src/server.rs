//! One manager member: opens its Raft log, refuses to start in an unsafe situation, starts the
//! Raft driver, the leader's health loop and the gRPC server, and stops cleanly.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ironsan_common::proto::manager::{command::Op, manager_client::ManagerClient, StatusRequest};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::error::Error;
use crate::health::{Health, HealthConfig};
use crate::node::{Handover, NodeConfig, RaftNode};
use crate::raftlog::RaftLog;
use crate::service::Service;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub id: u64,
    pub listen: SocketAddr,
    /// The address peers and clients use for this member (defaults to `listen`).
    pub advertise: String,
    pub data_dir: PathBuf,
    /// Other members of the initial group (id -> host:port), or of the group to join.
    pub peers: BTreeMap<u64, String>,
    /// Start empty and wait to be added with `add-member`, instead of bootstrapping.
    pub join: bool,
    pub raft: NodeConfig,
    pub health: HealthConfig,
}

/// A running member.
pub struct Server {
    pub node: RaftNode,
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    stop: CancellationToken,
}

impl Server {
    pub async fn start(cfg: ServerConfig) -> Result<Server, Error> {
        if cfg.id == 0 {
            return Err(Error::Config("member id must be non-zero".into()));
        }
        if cfg.peers.contains_key(&cfg.id) {
            return Err(Error::Config(format!(
                "--peer lists this member's own id {}; list only the others",
                cfg.id
            )));
        }
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| Error::Config(format!("create {}: {e}", cfg.data_dir.display())))?;
        let dir = cfg.data_dir.join("raft");
        let log = tokio::task::spawn_blocking(move || RaftLog::open(&dir))
            .await
            .map_err(|e| Error::Config(format!("open raft log: {e}")))??;
        let fresh = log.is_fresh();
        if fresh && !cfg.join {
            refuse_if_group_exists(cfg.id, &cfg.peers).await?;
        }
        let mut voters: Vec<u64> = cfg.peers.keys().copied().collect();
        voters.push(cfg.id);
        voters.sort_unstable();
        let bootstrap = if fresh && !cfg.join {
            voters
        } else {
            Vec::new()
        };
        let mut addrs = cfg.peers.clone();
        addrs.insert(cfg.id, cfg.advertise.clone());
        let node = RaftNode::start(
            cfg.raft.clone(),
            log,
            addrs,
            &bootstrap,
            tokio::runtime::Handle::current(),
        )?;
        info!(member = cfg.id, fresh, join = cfg.join, data_dir = %cfg.data_dir.display(), "manager member starting");

        let health = Arc::new(Health::default());
        let service = Service::new(node.clone(), health.clone(), cfg.health.clone());
        let stop = CancellationToken::new();
        tokio::spawn(health_loop(
            service.clone(),
            node.clone(),
            health,
            cfg.health.clone(),
            stop.clone(),
        ));

        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| Error::Config(format!("listen on {}: {e}", cfg.listen)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Config(format!("local address: {e}")))?;
        let incoming = tokio_stream_listener(listener);
        let shutdown = stop.clone();
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .add_service(service.manager_server())
                .add_service(service.peer_server())
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned()),
        );
        info!(member = cfg.id, %addr, "manager ready");
        Ok(Server {
            node,
            addr,
            task,
            stop,
        })
    }

    /// A clean stop for rolling restarts: a leader first hands leadership to the most
    /// caught-up follower and waits up to `handover` for it to take over (serving on
    /// meanwhile, so calls in flight are forwarded to the new leader), then shuts down. The
    /// group so has a leader again within a round trip instead of an election timeout.
    pub async fn stop(self, handover: Duration) {
        let started = std::time::Instant::now();
        let id = self.node.id();
        match self.node.hand_over(handover).await {
            Handover::NotLeader | Handover::Alone => {}
            Handover::To(to) => info!(
                member = id,
                new_leader = to,
                took_ms = started.elapsed().as_millis() as u64,
                "stopping: leadership handed over"
            ),
            Handover::TimedOut(to) => warn!(
                member = id,
                to,
                "stopping: member {to} did not take leadership over within {} ms; the group \
                 elects a leader after its election timeout",
                handover.as_millis()
            ),
        }
        self.shutdown().await;
    }

    /// Stops serving, then stops the Raft driver. Everything acknowledged is already synced.
    pub async fn shutdown(self) {
        self.stop.cancel();
        match tokio::time::timeout(Duration::from_secs(5), self.task).await {
            Ok(Ok(Err(e))) => warn!(error = %e, "grpc server"),
            Err(_) => warn!("grpc server did not stop within 5 s"),
            _ => {}
        }
        self.node.shutdown().await;
    }
}

fn tokio_stream_listener(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| {
            let _ = s.set_nodelay(true);
            s
        });
        Some((r, l))
    })
}

/// A member whose data dir is empty must not bootstrap into a group that already exists if it
/// ever held entries there: its earlier votes and log are gone, so counting it toward a quorum
/// could lose commits. It is told how to rejoin instead. The leader records each member that
/// has matched entries (`MemberSeen`), so an initial member that merely starts late (pods of a
/// StatefulSet started in parallel) is told apart and joins. The gap: a member wiped after it
/// voted or persisted its first entries but before the leader recorded it is taken for a late
/// starter.
async fn refuse_if_group_exists(id: u64, peers: &BTreeMap<u64, String>) -> Result<(), Error> {
    for (peer, addr) in peers {
        let Ok(ep) = tonic::transport::Endpoint::from_shared(format!("http://{addr}")) else {
            return Err(Error::Config(format!(
                "peer {peer} address {addr:?} is not host:port"
            )));
        };
        let ep = ep
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(1));
        let Ok(ch) = ep.connect().await else { continue };
        let Ok(s) = ManagerClient::new(ch).status(StatusRequest {}).await else {
            continue;
        };
        let s = s.into_inner();
        if s.commit_index > 0 && !s.members_seen.contains(&id) {
            // An initial member starting late (its peers already elected and committed): it
            // never held entries, so it has no votes or data to have lost.
            info!(
                member = id,
                peer, "the group already runs; this member never joined it and starts fresh"
            );
            return Ok(());
        }
        if s.commit_index > 0 {
            return Err(Error::Config(format!(
                "member {id} has an empty data dir, but the group it names already exists \
                 (member {peer} at {addr} is at commit index {}). Its earlier Raft state is lost, \
                 so it must not rejoin as itself: remove it (`ironsan manager remove-member --id {id}`), \
                 add a member with a new id (`ironsan manager add-member --id N --addr HOST:PORT`) \
                 and start that with --join",
                s.commit_index
            )));
        }
    }
    Ok(())
}

/// The leader's periodic checks (health.rs); idle on followers.
async fn health_loop(
    service: Service,
    node: RaftNode,
    health: Arc<Health>,
    cfg: HealthConfig,
    stop: CancellationToken,
) {
    let period = (cfg.heartbeat_interval / 2).max(Duration::from_millis(100));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let leader = node.status().is_leader;
        health.set_leader(leader);
        if !leader {
            continue;
        }
        let ops = {
            let st = node.state();
            let status = node.status();
            let mut ops = health.plan(&st, &cfg);
            // Record members once they hold entries (see `refuse_if_group_exists`).
            ops.extend(
                status
                    .members
                    .iter()
                    .filter(|m| m.matched > 0 && !st.members_seen().contains(&m.id))
                    .map(|m| Op::MemberSeen(m.id)),
            );
            ops
        };
        for op in ops {
            let what = format!("{op:?}");
            match service.submit(op).await {
                Ok(_) => info!(decision = %truncate(&what), "health decision committed"),
                Err(e) => {
                    warn!(decision = %truncate(&what), error = %e, "health decision not committed")
                }
            }
        }
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(200) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
