//! `ironsan gateway`: the iSCSI gateway of a cluster. It serves every volume the manager has
//! attached to its node id (`ironsan volume attach NAME --node ID`), replicated on the storage
//! daemons, until SIGTERM/SIGINT; then it drains its sessions and flushes.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use ironsan_common::manager_client::ManagerClient;
use ironsan_gateway::cluster::{self, ClusterConfig};
use ironsan_gateway::iscsi::chap::Credentials;
use ironsan_gateway::replica::ReplicaConfig;
use ironsan_gateway::target::{self, Gateway, GatewayConfig};
use tokio_util::sync::CancellationToken;

use crate::dev::parse_credentials;
use crate::manager::parse_duration;

#[derive(Args, Debug)]
pub struct GatewayArgs {
    /// Manager members, comma-separated HOST:PORT.
    #[arg(long, env = "IRONSAN_MANAGER")]
    pub(crate) manager: String,
    /// iSCSI portal address.
    #[arg(long, default_value = "0.0.0.0:3260", env = "IRONSAN_PORTAL")]
    pub(crate) portal: SocketAddr,
    /// This gateway's id: volumes attached to it are served here (default: the hostname).
    #[arg(long, env = "IRONSAN_NODE_ID")]
    pub(crate) node_id: Option<String>,
    /// Require one-way CHAP from initiators, as USER:SECRET (secret 12-255 bytes).
    #[arg(long, value_parser = parse_credentials, env = "IRONSAN_CHAP")]
    pub(crate) chap: Option<Credentials>,
    /// Credentials the target answers with when the initiator asks for mutual CHAP.
    #[arg(long, value_parser = parse_credentials, env = "IRONSAN_MUTUAL_CHAP")]
    pub(crate) mutual_chap: Option<Credentials>,
    /// Serve Prometheus metrics on /metrics and /healthz at this address.
    #[arg(long, env = "IRONSAN_METRICS")]
    pub(crate) metrics: Option<SocketAddr>,
    /// Lease asked for when taking a volume (the manager's default is 10s).
    #[arg(long, value_parser = parse_duration)]
    pub(crate) lease: Option<Duration>,
    /// A replica that does not answer a request within this long is failed (reported to the
    /// manager and removed from the chunk's set).
    #[arg(long, value_parser = parse_duration, default_value = "4s")]
    pub(crate) io_timeout: Duration,
}

pub async fn run(args: GatewayArgs) -> anyhow::Result<()> {
    crate::dev::start_metrics(args.metrics).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(crate::dev::wait_for_signal(shutdown.clone()));
    serve(args, shutdown).await
}

/// Runs the gateway until `shutdown` (`ironsan dev` runs it in-process).
pub async fn serve(args: GatewayArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let node_id = match &args.node_id {
        Some(id) if id.trim().is_empty() => bail!("--node-id is empty"),
        Some(id) => id.trim().to_string(),
        None => crate::storage::hostname()
            .context("no --node-id given and the hostname is unavailable")?,
    };
    let mgr = ManagerClient::new(&args.manager).context("--manager")?;
    let gw = Gateway::new(GatewayConfig {
        chap: args.chap.clone(),
        mutual_chap: args.mutual_chap.clone(),
        ..Default::default()
    })
    .context("gateway configuration")?;
    let mut cfg = ClusterConfig {
        replica: ReplicaConfig {
            gateway: node_id.clone(),
            lease_ms: args.lease.map_or(0, |d| d.as_millis() as u64),
            ..Default::default()
        },
        ..Default::default()
    };
    cfg.data_path.request_timeout = args.io_timeout;
    let listener = target::bind(args.portal)
        .await
        .with_context(|| format!("bind portal {}", args.portal))?;
    let addr = listener.local_addr()?;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let attached = tokio::spawn(cluster::serve_attached(
        gw.clone(),
        mgr,
        cfg,
        shutdown.clone(),
        Some(ready_tx),
    ));
    // Initiators that connect at once should find the volumes attached here at start.
    let _ = tokio::time::timeout(Duration::from_secs(30), ready_rx).await;
    tracing::info!(addr = %addr, node = %node_id, targets = gw.targets().len(), chap = args.chap.is_some(), "portal ready");
    gw.serve(listener, shutdown).await;
    let _ = attached.await;
    tracing::info!("gateway stopped cleanly");
    Ok(())
}
