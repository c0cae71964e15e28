//! IronSAN's CSI driver (`csi.ironsan.io`): how Kubernetes provisions, attaches, stages,
//! expands and inspects IronSAN volumes.
//!
//! - [`identity`]: plugin info, capabilities, and a probe that is healthy only while the
//!   manager answers. The same rule makes the controller's `/readyz` (with the socket bound);
//!   the node plugin is ready once its socket is bound.
//! - [`controller`]: volumes are manager volumes; the CSI volume id is the IronSAN volume name.
//!   Publishing a volume to a node attaches it to the gateway running on that node (same id),
//!   under a lease; the publish context names the portal, IQN and LUN.
//! - [`node`]: iSCSI login to the node's gateway, mkfs when blank, mount, bind mounts, online
//!   expansion and usage statistics, each idempotent and safe to repeat after a crash.
//! - [`capability`]: which access modes and access types are supported, shared by both sides.
//!
//! The services come from the `bpfman-csi` crate (CSI spec v1.9, generated for tonic 0.11), so
//! the socket is served by tonic 0.11 while the manager is reached with the workspace's
//! tonic 0.14 client.

// tonic's `Status` is the error of every generated service method; helpers return it too.
#![allow(clippy::result_large_err)]

pub mod capability;
pub mod controller;
mod error;
pub mod identity;
mod metrics;
pub mod node;
pub mod volume;

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ironsan_common::manager_client::ManagerClient;
use ironsan_common::observe::Readiness;
use tokio_util::sync::CancellationToken;
use tonic011::transport::Server;

/// The CSI spec's generated types and services.
pub use bpfman_csi::v1 as csi;
pub use error::CsiError;

/// The driver name Kubernetes knows the plugin by.
pub const DRIVER_NAME: &str = "csi.ironsan.io";
/// Topology key naming the node (its gateway) a volume is reachable from.
pub const TOPOLOGY_NODE: &str = "topology.csi.ironsan.io/node";
/// Topology key naming the node's zone, when it has one.
pub const TOPOLOGY_ZONE: &str = "topology.csi.ironsan.io/zone";

/// Which services this process serves (identity is always served).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Controller,
    Node,
    All,
}

impl Mode {
    fn controller(self) -> bool {
        matches!(self, Mode::Controller | Mode::All)
    }
    fn node(self) -> bool {
        matches!(self, Mode::Node | Mode::All)
    }
}

impl FromStr for Mode {
    type Err = CsiError;
    fn from_str(s: &str) -> Result<Self, CsiError> {
        match s {
            "controller" => Ok(Mode::Controller),
            "node" => Ok(Mode::Node),
            "all" => Ok(Mode::All),
            _ => Err(CsiError::Config(format!(
                "mode {s:?} is not controller, node or all"
            ))),
        }
    }
}

/// Where the gRPC server listens: `unix:///path/csi.sock` (what kubelet and the sidecars use)
/// or `tcp://host:port` (for tests and csi-sanity against a remote node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

impl FromStr for Endpoint {
    type Err = CsiError;
    fn from_str(s: &str) -> Result<Self, CsiError> {
        let bad = |why: &str| CsiError::Config(format!("endpoint {s:?}: {why}"));
        if let Some(path) = s.strip_prefix("unix://") {
            // `unix:///csi/csi.sock` (absolute) and `unix://csi.sock` (relative) are both seen.
            if path.is_empty() {
                return Err(bad("no socket path"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = s.strip_prefix("tcp://") {
            let addr = addr.parse().map_err(|_| bad("expected tcp://IP:PORT"))?;
            return Ok(Endpoint::Tcp(addr));
        }
        if s.starts_with('/') {
            return Ok(Endpoint::Unix(PathBuf::from(s)));
        }
        Err(bad("expected unix:///path or tcp://IP:PORT"))
    }
}

/// Everything the driver needs to serve.
#[derive(Debug, Clone)]
pub struct Config {
    pub endpoint: Endpoint,
    pub mode: Mode,
    /// The manager group; required for the controller, optional for the node (the probe and
    /// volume condition use it when given).
    pub manager: Option<ManagerClient>,
    /// Lease a published volume's attachment is granted (0: the manager's default).
    pub lease: Duration,
    pub node: node::NodeConfig,
}

/// How often the controller's readiness asks the manager.
const READY_PROBE_EVERY: Duration = Duration::from_secs(2);

/// Sets `ready`: the socket is bound (`bound`) and, for the controller, the manager answered
/// the last probe, which a background task repeats every [`READY_PROBE_EVERY`] until
/// `shutdown` (a `/readyz` request itself never waits for the network).
fn watch_readiness(
    cfg: &Config,
    ready: &Readiness,
    bound: Arc<AtomicBool>,
    shutdown: &CancellationToken,
) {
    let manager = match (&cfg.manager, cfg.mode.controller()) {
        (Some(m), true) => Some(m.clone()),
        _ => None,
    };
    let last: Arc<RwLock<Result<(), String>>> = Arc::new(RwLock::new(Err(
        "the IronSAN manager has not been asked yet".into(),
    )));
    if let Some(mgr) = manager.clone() {
        let (last, shutdown) = (last.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                let r = identity::manager_answers(&mgr).await;
                match last.write() {
                    Ok(mut l) => *l = r,
                    Err(p) => *p.into_inner() = r,
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(READY_PROBE_EVERY) => {}
                }
            }
        });
    }
    let controller = manager.is_some();
    ready.set(move || {
        if !bound.load(Ordering::Relaxed) {
            return Err("the CSI socket is not bound yet".into());
        }
        if !controller {
            return Ok(());
        }
        match last.read() {
            Ok(l) => l.clone(),
            Err(p) => p.into_inner().clone(),
        }
    });
}

/// Serves the CSI services until `shutdown`, then removes the socket file. `ready` answers
/// the plugin's `/readyz`.
pub async fn serve(
    cfg: Config,
    shutdown: CancellationToken,
    ready: Readiness,
) -> Result<(), CsiError> {
    use csi::controller_server::ControllerServer;
    use csi::identity_server::IdentityServer;
    use csi::node_server::NodeServer;

    let identity = identity::IdentityService::new(cfg.manager.clone());
    let controller = if cfg.mode.controller() {
        let mgr = cfg
            .manager
            .clone()
            .ok_or_else(|| CsiError::Config("the controller needs --manager".to_string()))?;
        Some(ControllerServer::new(controller::ControllerService::new(
            mgr, cfg.lease,
        )))
    } else {
        None
    };
    let node = if cfg.mode.node() {
        Some(NodeServer::new(
            node::NodeService::new(cfg.node.clone(), cfg.manager.clone()).await?,
        ))
    } else {
        None
    };
    let router = Server::builder()
        .layer(metrics::ObserveLayer)
        .add_service(IdentityServer::new(identity))
        .add_optional_service(controller)
        .add_optional_service(node);
    let bound = Arc::new(AtomicBool::new(false));
    watch_readiness(&cfg, &ready, bound.clone(), &shutdown);
    let serving = || {
        bound.store(true, Ordering::Relaxed);
        tracing::info!(endpoint = ?cfg.endpoint, mode = ?cfg.mode, node = %cfg.node.node_id, "CSI driver serving")
    };
    match &cfg.endpoint {
        Endpoint::Unix(path) => {
            let listener = bind_unix(path)?;
            serving();
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let served = router
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
                .await;
            let _ = std::fs::remove_file(path);
            served?;
        }
        Endpoint::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| CsiError::Io(format!("bind {addr}"), e))?;
            serving();
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            router
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
                .await?;
        }
    }
    tracing::info!("CSI driver stopped");
    Ok(())
}

/// Binds the socket, replacing a stale one left by an earlier life (kubelet reuses the path).
fn bind_unix(path: &std::path::Path) -> Result<tokio::net::UnixListener, CsiError> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| CsiError::Io(format!("create {dir:?}"), e))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .map_err(|e| CsiError::Io(format!("remove stale socket {path:?}"), e))?,
        Ok(_) => {
            return Err(CsiError::Config(format!(
                "{path:?} exists and is not a socket"
            )))
        }
        Err(_) => {}
    }
    tokio::net::UnixListener::bind(path).map_err(|e| CsiError::Io(format!("bind {path:?}"), e))
}
