//! `ironsan dev`: a gateway serving local sparse-file volumes from `--data-dir`.
//!
//! Volumes live in `<data-dir>/volumes/<name>.img`. Every volume found there is served at
//! start, so data and volumes survive restarts; `--volume NAME:SIZE` creates a volume or grows
//! an existing one (never shrinks it). The data dir is locked so that two processes never
//! serve the same files.

use std::fs::{self, File};
use std::net::SocketAddr;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use ironsan_common::{parse_size, ByteSize};
use ironsan_gateway::device::{BlockDevice, Engine, FileDevice};
use ironsan_gateway::iscsi::chap::Credentials;
use ironsan_gateway::scsi::PHYSICAL_BLOCK;
use ironsan_gateway::target::{self, Gateway, GatewayConfig};
use tokio_util::sync::CancellationToken;

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Where volumes and state live.
    #[arg(long, default_value = "./ironsan-data", env = "IRONSAN_DATA_DIR")]
    data_dir: PathBuf,
    /// iSCSI portal address (port 0 picks a free port; the ready line shows it).
    #[arg(long, default_value = "127.0.0.1:3260", env = "IRONSAN_PORTAL")]
    portal: SocketAddr,
    /// Volume to create or grow at start, as NAME:SIZE (e.g. vol1:1GiB). Repeatable.
    #[arg(long = "volume", value_parser = parse_volume)]
    volumes: Vec<VolumeSpec>,
    /// Require one-way CHAP from initiators, as USER:SECRET (secret 12-255 bytes).
    #[arg(long, value_parser = parse_credentials, env = "IRONSAN_CHAP")]
    chap: Option<Credentials>,
    /// Credentials the target answers with when the initiator asks for mutual CHAP.
    #[arg(long, value_parser = parse_credentials, env = "IRONSAN_MUTUAL_CHAP")]
    mutual_chap: Option<Credentials>,
    /// Serve Prometheus metrics on /metrics and /healthz at this address.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// How volume files are read and written: io_uring (falling back to the blocking pool
    /// where the kernel refuses it) or the blocking pool.
    #[arg(long, value_enum, default_value = "auto", env = "IRONSAN_IO_ENGINE")]
    io_engine: IoEngine,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum IoEngine {
    Auto,
    Blocking,
}

#[derive(Debug, Clone)]
struct VolumeSpec {
    name: String,
    size: u64,
}

fn parse_volume(s: &str) -> Result<VolumeSpec, String> {
    let (name, size) = s
        .split_once(':')
        .ok_or_else(|| format!("expected NAME:SIZE, got {s:?}"))?;
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
struct DirLock(#[allow(dead_code)] File);

fn lock_dir(dir: &Path) -> anyhow::Result<DirLock> {
    let f = File::create(dir.join("LOCK")).context("create lock file")?;
    // SAFETY: flock on a valid fd we own; no memory is shared with the kernel.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        bail!("{} is in use by another ironsan process", dir.display());
    }
    Ok(DirLock(f))
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
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
        let t = gw.add_target(&v.name, Arc::new(dev), Vec::new())?;
        tracing::info!(volume = %v.name, iqn = %t.iqn, size = %ByteSize(size), io, "volume ready");
    }

    start_metrics(args.metrics).await?;

    let listener = target::bind(args.portal)
        .await
        .with_context(|| format!("bind portal {}", args.portal))?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signal(shutdown.clone()));
    tracing::info!(addr = %addr, targets = wanted.len(), chap = args.chap.is_some(), "portal ready");
    gw.serve(listener, shutdown).await;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Installs the metrics recorder (before anything records) and serves `/metrics` when asked.
pub(crate) async fn start_metrics(addr: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    if let Some(addr) = addr {
        let bound = ironsan_common::observe::serve_metrics(addr)
            .await
            .context("bind metrics")?;
        tracing::info!(addr = %bound, "metrics ready");
    } else {
        ironsan_common::observe::metrics_handle();
    }
    Ok(())
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
