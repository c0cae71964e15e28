//! `ironsan gateway`: the iSCSI gateway of a cluster. It serves every volume the manager has
//! attached to its node id (`ironsan volume attach NAME --node ID`), replicated on the storage
//! daemons, until SIGTERM/SIGINT; then it drains its sessions and flushes. Each attach names
//! the portal initiators elsewhere should use (`--advertise`), which the manager records in the
//! attachment for the CSI node plugin.
//!
//! `/readyz`: ready once the portal serves and the gateway is registered with the manager and
//! heard from it recently (`cluster::Standing`). Manager addresses may be DNS names that do not
//! resolve yet (a StatefulSet's records appear as its pods start): everything retries.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use ironsan_common::manager_client::{check_addr, ManagerClient};
use ironsan_common::observe::Readiness;
use ironsan_gateway::cluster::{self, ClusterConfig, Standing};
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
    /// The portal address initiators on other hosts use, HOST:PORT, recorded in the attachments
    /// of the volumes served here (default: --portal when its IP is given; for 0.0.0.0 or [::]
    /// the local IP this host reaches the first manager from, with the portal's port).
    #[arg(long, env = "IRONSAN_GATEWAY_ADVERTISE")]
    pub(crate) advertise: Option<String>,
    /// This gateway's id: volumes attached to it are served here (default: the hostname).
    #[arg(long, env = "IRONSAN_NODE_ID")]
    pub(crate) node_id: Option<String>,
    /// Require one-way CHAP from initiators, as USER:SECRET (secret 12-255 bytes).
    #[arg(long, value_parser = parse_credentials, env = "IRONSAN_CHAP")]
    pub(crate) chap: Option<Credentials>,
    /// Credentials the target answers with when the initiator asks for mutual CHAP.
    #[arg(long, value_parser = parse_credentials, env = "IRONSAN_MUTUAL_CHAP")]
    pub(crate) mutual_chap: Option<Credentials>,
    /// Serve Prometheus metrics on /metrics, /healthz and /readyz at this address.
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
    let ready = crate::dev::start_metrics(args.metrics).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(crate::dev::wait_for_signal(shutdown.clone()));
    serve(args, shutdown, ready).await
}

/// Runs the gateway until `shutdown` (`ironsan dev` runs it in-process); `ready` answers
/// `/readyz`.
pub async fn serve(
    args: GatewayArgs,
    shutdown: CancellationToken,
    ready: Readiness,
) -> anyhow::Result<()> {
    let node_id = match &args.node_id {
        Some(id) if id.trim().is_empty() => bail!("--node-id is empty"),
        Some(id) => id.trim().to_string(),
        None => crate::storage::hostname()
            .context("no --node-id given and the hostname is unavailable")?,
    };
    let mgr = ManagerClient::new(&args.manager).context("--manager")?;
    if let Some(a) = &args.advertise {
        check_addr(a).map_err(|e| anyhow::anyhow!("--advertise: {e}"))?;
    }
    let gw = Gateway::new(GatewayConfig {
        chap: args.chap.clone(),
        mutual_chap: args.mutual_chap.clone(),
        ..Default::default()
    })
    .context("gateway configuration")?;
    let listener = target::bind(args.portal)
        .await
        .with_context(|| format!("bind portal {}", args.portal))?;
    let addr = listener.local_addr()?;
    let advertise = match advertised(args.advertise.as_deref(), addr, &mgr, &shutdown).await? {
        Some(a) => a,
        None => return Ok(()),
    };
    let mut cfg = ClusterConfig {
        replica: ReplicaConfig {
            gateway: node_id.clone(),
            lease_ms: args.lease.map_or(0, |d| d.as_millis() as u64),
            portal: advertise.clone(),
            ..Default::default()
        },
        ..Default::default()
    };
    cfg.data_path.request_timeout = args.io_timeout;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let standing = Arc::new(Standing::default());
    let serving = Arc::new(AtomicBool::new(false));
    {
        let (standing, serving) = (standing.clone(), serving.clone());
        ready.set(move || {
            if !serving.load(Ordering::Relaxed) {
                return Err("the portal does not serve yet".into());
            }
            standing.ready()
        });
    }
    let attached = tokio::spawn(cluster::serve_attached(
        gw.clone(),
        mgr,
        cfg,
        shutdown.clone(),
        Some(ready_tx),
        standing,
    ));
    // Initiators that connect at once should find the volumes attached here at start.
    let _ = tokio::time::timeout(Duration::from_secs(30), ready_rx).await;
    serving.store(true, Ordering::Relaxed);
    tracing::info!(addr = %addr, advertise = %advertise, node = %node_id, targets = gw.targets().len(), chap = args.chap.is_some(), "portal ready");
    gw.serve(listener, shutdown).await;
    let _ = attached.await;
    tracing::info!("gateway stopped cleanly");
    Ok(())
}

/// The portal address recorded in attachments: `--advertise`, else the bound address when its
/// IP is specified, else the local IP that routes to the first manager with the bound port.
/// The manager's name may not resolve yet: that is retried until `shutdown` (then `None`).
async fn advertised(
    flag: Option<&str>,
    bound: SocketAddr,
    mgr: &ManagerClient,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<String>> {
    if let Some(a) = flag {
        return Ok(Some(a.to_string()));
    }
    if !bound.ip().is_unspecified() {
        return Ok(Some(bound.to_string()));
    }
    let first = mgr.members().into_iter().next().unwrap_or_default();
    let mut backoff = Duration::from_millis(100);
    let mut warned: Option<std::time::Instant> = None;
    let resolved = loop {
        match tokio::net::lookup_host(&first).await {
            Ok(addrs) => break addrs.collect::<Vec<_>>(),
            Err(e) => {
                if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    tracing::warn!(manager = %first, error = %e, "cannot resolve the manager to find the advertised portal address yet; retrying");
                    warned = Some(std::time::Instant::now());
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    };
    let ip = route_to(&resolved, bound.is_ipv4())
        .await
        .with_context(|| {
            format!(
                "portal {bound} listens on every interface and the address that reaches manager \
             {first} is unknown: give --advertise HOST:PORT"
            )
        })?;
    if ip.is_loopback() {
        tracing::warn!(manager = %first, "the manager is reached over loopback: advertising a loopback portal, which initiators on other hosts cannot use (give --advertise)");
    }
    Ok(Some(SocketAddr::new(ip, bound.port()).to_string()))
}

/// The local IP the host would send from to reach one of `dests`: a connected UDP socket picks
/// it from the routing table without sending anything. A portal bound to 0.0.0.0 only accepts
/// IPv4, so only IPv4 destinations count then.
async fn route_to(dests: &[SocketAddr], ipv4_only: bool) -> std::io::Result<IpAddr> {
    let dest = dests
        .iter()
        .copied()
        .find(|a| a.is_ipv4() || !ipv4_only)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no usable address"))?;
    let any = if dest.is_ipv4() {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    };
    let sock = tokio::net::UdpSocket::bind(SocketAddr::new(any, 0)).await?;
    sock.connect(dest).await?;
    Ok(sock.local_addr()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn advertised_portal() {
        let stop = CancellationToken::new();
        let adv = |flag: Option<&'static str>, bound: SocketAddr, mgr: ManagerClient| {
            let stop = stop.clone();
            async move { advertised(flag, bound, &mgr, &stop).await }
        };
        let mgr = ManagerClient::new("127.0.0.1:7400").unwrap();
        let bound: SocketAddr = "10.1.2.3:3260".parse().unwrap();
        assert_eq!(
            adv(Some("gw.example:3261"), bound, mgr.clone())
                .await
                .unwrap()
                .unwrap(),
            "gw.example:3261"
        );
        assert_eq!(
            adv(None, bound, mgr.clone()).await.unwrap().unwrap(),
            "10.1.2.3:3260"
        );
        // Every interface: the one that reaches the manager, here loopback.
        let any: SocketAddr = "0.0.0.0:3999".parse().unwrap();
        assert_eq!(
            adv(None, any, mgr.clone()).await.unwrap().unwrap(),
            "127.0.0.1:3999"
        );
        // A manager named by DNS.
        let named = ManagerClient::new("localhost:7400").unwrap();
        let got = adv(None, any, named).await.unwrap().unwrap();
        assert_eq!(got, "127.0.0.1:3999");
        let any6: SocketAddr = "[::]:3999".parse().unwrap();
        let v6 = ManagerClient::new("[::1]:7400").unwrap();
        if std::net::UdpSocket::bind("[::1]:0").is_ok() {
            assert_eq!(
                adv(None, any6, v6.clone()).await.unwrap().unwrap(),
                "[::1]:3999"
            );
        }
        // A 0.0.0.0 portal cannot be reached over IPv6.
        assert!(adv(None, any, v6).await.is_err());
    }

    #[tokio::test]
    async fn advertised_portal_waits_for_the_managers_name() {
        // `.invalid` never resolves (RFC 6761): retried until the gateway is stopped.
        let mgr = ManagerClient::new("ironsan-manager-0.ironsan.invalid:7400").unwrap();
        let any: SocketAddr = "0.0.0.0:3999".parse().unwrap();
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            s.cancel();
        });
        let started = std::time::Instant::now();
        assert!(advertised(None, any, &mgr, &stop).await.unwrap().is_none());
        assert!(started.elapsed() >= Duration::from_millis(400));
    }
}
