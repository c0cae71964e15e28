//! `ironsan csi`: the CSI driver (`csi.ironsan.io`) for Kubernetes, as the controller plugin,
//! the node plugin, or both, on a unix socket the CSI sidecars and kubelet talk to.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use ironsan_common::manager_client::ManagerClient;
use ironsan_csi::node::NodeConfig;
use ironsan_csi::{Config, Endpoint, Mode};
use tokio_util::sync::CancellationToken;

use crate::manager::parse_duration;

#[derive(Args, Debug)]
pub struct CsiArgs {
    /// Where to serve: unix:///path/csi.sock, or tcp://IP:PORT (tests, remote csi-sanity).
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub(crate) endpoint: Endpoint,
    /// controller (Deployment), node (DaemonSet on every node) or all.
    #[arg(long, env = "IRONSAN_CSI_MODE", default_value = "all")]
    pub(crate) mode: Mode,
    /// This node's id: the Kubernetes node name, also the --node-id of the gateway running on
    /// it (default: the hostname).
    #[arg(long, env = "IRONSAN_NODE_ID")]
    pub(crate) node_id: Option<String>,
    /// Manager members, comma-separated HOST:PORT (required for the controller).
    #[arg(long, env = "IRONSAN_MANAGER")]
    pub(crate) manager: Option<String>,
    /// The portal of the gateway on this node, which the node plugin logs in to.
    #[arg(long, env = "IRONSAN_PORTAL", default_value = "127.0.0.1:3260")]
    pub(crate) portal: String,
    /// This node's zone, reported as topology.csi.ironsan.io/zone.
    #[arg(long, env = "IRONSAN_ZONE")]
    pub(crate) zone: Option<String>,
    /// Where the node plugin keeps a record per staged volume (survives plugin restarts).
    #[arg(long, default_value = "/var/lib/ironsan-csi")]
    pub(crate) state_dir: PathBuf,
    /// Volumes this node may have published at once, reported to the scheduler (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub(crate) max_volumes: i64,
    /// Lease given to a published volume's gateway (default: the manager's, 10s).
    #[arg(long, value_parser = parse_duration)]
    pub(crate) lease: Option<Duration>,
    /// Serve Prometheus metrics on /metrics, /healthz and /readyz (ready once the socket is
    /// bound and, for the controller, the manager answers) at this address.
    #[arg(long, env = "IRONSAN_METRICS")]
    pub(crate) metrics: Option<SocketAddr>,
}

pub async fn run(args: CsiArgs) -> anyhow::Result<()> {
    let ready = crate::dev::start_metrics(args.metrics).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(crate::dev::wait_for_signal(shutdown.clone()));
    let node_id = match &args.node_id {
        Some(id) if id.trim().is_empty() => bail!("--node-id is empty"),
        Some(id) => id.trim().to_string(),
        None => crate::storage::hostname()
            .context("no --node-id given and the hostname is unavailable")?,
    };
    let manager = match &args.manager {
        Some(m) => Some(ManagerClient::new(m).context("--manager")?),
        None if args.mode != Mode::Node => bail!("--manager is required in {:?} mode", args.mode),
        None => None,
    };
    if args.max_volumes < 0 {
        bail!("--max-volumes must not be negative");
    }
    let cfg = Config {
        endpoint: args.endpoint,
        mode: args.mode,
        manager,
        lease: args.lease.unwrap_or(Duration::ZERO),
        node: NodeConfig {
            node_id,
            zone: args.zone.filter(|z| !z.trim().is_empty()),
            portal: args.portal,
            state_dir: args.state_dir,
            max_volumes: args.max_volumes,
        },
    };
    ironsan_csi::serve(cfg, shutdown, ready).await?;
    Ok(())
}
