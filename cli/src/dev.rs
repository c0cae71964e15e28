//! `ironsan dev`: a whole cluster in one process on loopback — manager member(s), storage
//! daemons (one data dir each) and a gateway (node id `dev`) serving replicated volumes.
//!
//! Layout under `--data-dir`: `manager-N/`, `storage-N/`, and `cluster.json`, which records
//! the managers' addresses at first start (a Raft group's member addresses cannot change
//! under it). `--volume NAME:SIZE[:REPLICAS]` creates a volume (or grows it; never shrinks),
//! and attaches it to the dev gateway; volumes attached to `dev` earlier are served again, so
//! data and volumes survive restarts. `ironsan volume ...` works against the cluster.
//! Shutdown stops the gateway first (drain, flush), then storage, then the managers.
//!
//! `--local` keeps the single-process gateway of sparse files
//! (`<data-dir>/volumes/<name>.img`, no manager, no replication) for protocol work.
//! The data dir is locked so that two processes never serve the same files.

use std::fs::{self, File};
use std::net::SocketAddr;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use ironsan_common::observe::Readiness;
use ironsan_common::{parse_size, ByteSize};
use ironsan_gateway::device::{BlockDevice, Engine, FileDevice};
use ironsan_gateway::iscsi::chap::Credentials;
use ironsan_gateway::scsi::PHYSICAL_BLOCK;
use ironsan_gateway::target::{self, Gateway, GatewayConfig, TargetOptions};
use tokio_util::sync::CancellationToken;

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Where volumes and state live.
    #[arg(long, default_value = "./ironsan-data", env = "IRONSAN_DATA_DIR")]
    pub(crate) data_dir: PathBuf,
    /// iSCSI portal address (port 0 picks a free port; the ready line shows it).
    #[arg(long, default_value = "127.0.0.1:3260", env = "IRONSAN_PORTAL")]
    pub(crate) portal: SocketAddr,
    /// Volume to create or grow at start and serve, as NAME:SIZE[:REPLICAS] (e.g. vol1:1GiB;
    /// replicas default to 3, or the number of storage daemons if fewer). Repeatable.
    #[arg(long = "volume", value_parser = parse_volume)]
    pub(crate) volumes: Vec<VolumeSpec>,
    /// Manager members (1, 3 or 5).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=5))]
    pub(crate) managers: u64,
    /// Storage daemons, each with its own data dir.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=16))]
    pub(crate) storage: u64,
    /// First manager port (members take the next ones); 0 picks free ports at first start.
    /// Recorded in cluster.json: later starts reuse the recorded addresses.
    #[arg(long, default_value_t = 7400)]
    pub(crate) manager_port: u16,
    /// First storage data-path port; 0 picks free ports.
    #[arg(long, default_value_t = 7500)]
    pub(crate) storage_port: u16,
    /// A storage node silent this long is declared Down.
    #[arg(long, value_parser = crate::manager::parse_duration, default_value = "5s")]
    pub(crate) node_timeout: std::time::Duration,
    /// A Down node's chunks are re-replicated after this long.
    #[arg(long, value_parser = crate::manager::parse_duration, default_value = "10s")]
    pub(crate) recovery_grace: std::time::Duration,
    /// Refuse volumes past this many times the storage daemons' raw capacity (size x
    /// replicas; 0: only warn past 1x).
    #[arg(long, value_parser = crate::manager::parse_overcommit, default_value = "0")]
    pub(crate) max_overcommit: f64,
    /// Serve sparse files from this process only: no manager, storage or replication.
    #[arg(long)]
    pub(crate) local: bool,
    /// Require one-way CHAP from initiators, as USER:SECRET (secret 12-255 bytes).
    #[arg(long, value_parser = parse_credentials, env = "IRONSAN_CHAP")]
    pub(crate) chap: Option<Credentials>,
    /// Credentials the target answers with when the initiator asks for mutual CHAP.
    #[arg(long, value_parser = parse_credentials, env = "IRONSAN_MUTUAL_CHAP")]
    pub(crate) mutual_chap: Option<Credentials>,
    /// Serve Prometheus metrics on /metrics and /healthz at this address.
    #[arg(long)]
    pub(crate) metrics: Option<SocketAddr>,
    /// How chunk files (and `--local` volume files) are read and written: io_uring (falling back to the blocking pool
    /// where the kernel refuses it) or the blocking pool.
    #[arg(long, value_enum, default_value = "auto", env = "IRONSAN_IO_ENGINE")]
    pub(crate) io_engine: IoEngine,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub(crate) enum IoEngine {
    Auto,
    Blocking,
}

#[derive(Debug, Clone)]
pub(crate) struct VolumeSpec {
    pub(crate) name: String,
    pub(crate) size: u64,
    pub(crate) replicas: Option<u32>,
}

fn parse_volume(s: &str) -> Result<VolumeSpec, String> {
    let (name, rest) = s
        .split_once(':')
        .ok_or_else(|| format!("expected NAME:SIZE[:REPLICAS], got {s:?}"))?;
    let (size, replicas) = match rest.split_once(':') {
        Some((size, r)) => {
            let r: u32 = r
                .parse()
                .ok()
                .filter(|r| (1..=5).contains(r))
                .ok_or_else(|| format!("replicas must be 1 to 5, got {r:?}"))?;
            (size, Some(r))
        }
        None => (rest, None),
    };
    target::check_volume_name(name).map_err(|e| e.to_string())?;
    let size = parse_size(size).map_err(|e| e.to_string())?;
    if size == 0 || size % PHYSICAL_BLOCK != 0 {
        return Err(format!(
            "volume size must be a positive multiple of {PHYSICAL_BLOCK} bytes, got {size}"
        ));
    }
    Ok(VolumeSpec {
        name: name.to_string(),
        size,
        replicas,
    })
}

pub(crate) fn parse_credentials(s: &str) -> Result<Credentials, String> {
    let (user, secret) = s.split_once(':').ok_or("expected USER:SECRET")?;
    Ok(Credentials {
        user: user.to_string(),
        secret: secret.to_string(),
    })
}

/// Holds an exclusive `flock` on the data dir for the life of the process.
pub(crate) struct DirLock(#[allow(dead_code)] File);

pub(crate) fn lock_dir(dir: &Path) -> anyhow::Result<DirLock> {
    let f = File::create(dir.join("LOCK")).context("create lock file")?;
    // SAFETY: flock on a valid fd we own; no memory is shared with the kernel.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        bail!("{} is in use by another ironsan process", dir.display());
    }
    Ok(DirLock(f))
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    if args.local {
        run_local(args).await
    } else {
        crate::dev_cluster::run(args).await
    }
}

async fn run_local(args: DevArgs) -> anyhow::Result<()> {
    let vol_dir = args.data_dir.join("volumes");
    fs::create_dir_all(&vol_dir).with_context(|| format!("create {}", vol_dir.display()))?;
    let _lock = lock_dir(&args.data_dir)?;

    let config = GatewayConfig {
        chap: args.chap.clone(),
        mutual_chap: args.mutual_chap.clone(),
        ..Default::default()
    };
    let gw = Gateway::new(config).context("gateway configuration")?;

    let mut wanted: Vec<VolumeSpec> = args.volumes.clone();
    for entry in fs::read_dir(&vol_dir).context("list volumes")? {
        let path = entry?.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".img"))
        else {
            continue;
        };
        if !wanted.iter().any(|v| v.name == name) {
            wanted.push(VolumeSpec {
                name: name.to_string(),
                size: 0,
                replicas: None,
            });
        }
    }
    if wanted.is_empty() {
        tracing::warn!("no volumes: add one with --volume NAME:SIZE");
    }
    for v in &wanted {
        let path = vol_dir.join(format!("{}.img", v.name));
        let engine = match args.io_engine {
            IoEngine::Auto => Engine::Auto,
            IoEngine::Blocking => Engine::Blocking,
        };
        let dev = FileDevice::open_with(&path, v.size, engine)
            .with_context(|| format!("open volume {}", path.display()))?;
        if v.size != 0 && dev.size() > v.size {
            tracing::warn!(volume = %v.name, size = %ByteSize(dev.size()), "volume is larger than --volume asks; keeping its size");
        }
        let size = dev.size();
        let io = dev.engine();
        let t = gw.add_target(&v.name, Arc::new(dev), TargetOptions::default())?;
        tracing::info!(volume = %v.name, iqn = %t.iqn, size = %ByteSize(size), io, "volume ready");
    }

    let ready = start_metrics(args.metrics).await?;

    let listener = target::bind(args.portal)
        .await
        .with_context(|| format!("bind portal {}", args.portal))?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signal(shutdown.clone()));
    // Every volume is open and the portal bound: nothing else to wait for.
    ready.set(|| Ok(()));
    tracing::info!(addr = %addr, targets = wanted.len(), chap = args.chap.is_some(), "portal ready");
    gw.serve(listener, shutdown).await;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Installs the metrics recorder (before anything records) and serves `/metrics`, `/healthz`
/// and `/readyz` when asked. The returned readiness says "starting" until the daemon sets its
/// check; without `addr` nobody asks it.
pub(crate) async fn start_metrics(addr: Option<std::net::SocketAddr>) -> anyhow::Result<Readiness> {
    let ready = Readiness::new();
    if let Some(addr) = addr {
        let bound = ironsan_common::observe::serve_metrics(addr, ready.clone())
            .await
            .context("bind metrics")?;
        tracing::info!(addr = %bound, "metrics ready");
    } else {
        ironsan_common::observe::metrics_handle();
    }
    Ok(ready)
}

pub(crate) async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
}
