//! `ironsan storage`: one storage daemon serving the chunk store of its data directories on
//! the data path until SIGTERM/SIGINT, then draining its connections and shutting the store
//! down cleanly. With `--manager` it also registers with the cluster manager and heartbeats
//! (`ironsan_storage::membership`), beside the data path and without delaying it.
//!
//! `/readyz`: standalone, ready once the data path listens; with `--manager`, once the store
//! is open, the data path listens and the membership's standing is good (registered, a recent
//! heartbeat accepted, nothing owed: see `membership::Standing`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use ironsan_common::manager_client::{check_addr, ManagerClient};
use ironsan_common::observe::Readiness;
use ironsan_common::{parse_size, ByteSize};
use ironsan_storage::membership::{self, MembershipConfig, Standing};
use ironsan_storage::server::{self, ServerConfig};
use ironsan_storage::{IoEngine, Store, StoreConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Args, Debug)]
pub struct StorageArgs {
    /// A data directory (one per disk). Repeatable; comma-separated in the environment.
    #[arg(
        long = "data-dir",
        required = true,
        env = "IRONSAN_DATA_DIRS",
        value_delimiter = ','
    )]
    pub(crate) data_dirs: Vec<PathBuf>,
    /// Data-path address (port 0 picks a free port; the ready line shows it).
    #[arg(long, env = "IRONSAN_STORAGE_LISTEN")]
    pub(crate) listen: SocketAddr,
    /// Manager members to register with, comma-separated HOST:PORT (none: run standalone).
    #[arg(long, env = "IRONSAN_MANAGER")]
    pub(crate) manager: Option<String>,
    /// Data-path address announced to the manager, HOST:PORT (default: the listen address,
    /// with the bound port; required when listening on 0.0.0.0 or [::]). A DNS name is
    /// resolved by gateways at each connect, so it may resolve only later.
    #[arg(long, env = "IRONSAN_STORAGE_ADVERTISE")]
    pub(crate) advertise: Option<String>,
    /// This node's id in the cluster (default: the hostname).
    #[arg(long, env = "IRONSAN_NODE_ID")]
    pub(crate) node_id: Option<String>,
    /// Failure domain (zone) of this node.
    #[arg(long, env = "IRONSAN_ZONE")]
    pub(crate) zone: Option<String>,
    /// Serve Prometheus metrics on /metrics, /healthz and /readyz at this address.
    #[arg(long, env = "IRONSAN_METRICS")]
    pub(crate) metrics: Option<SocketAddr>,
    /// How chunk files are read and written: io_uring where the kernel allows it, or plain
    /// pread/pwrite.
    #[arg(long, value_enum, default_value = "auto", env = "IRONSAN_IO_ENGINE")]
    pub(crate) io_engine: Engine,
    /// Background scrub rate per second (e.g. 32MiB; 0 disables scrubbing).
    #[arg(long, value_parser = parse_size, default_value = "32MiB", env = "IRONSAN_SCRUB_RATE")]
    pub(crate) scrub_rate: u64,
    /// Data-path connections served at once.
    #[arg(long, default_value_t = 1024)]
    pub(crate) max_connections: usize,
    /// Requests in flight per connection before the daemon stops reading from it.
    #[arg(long, default_value_t = 128)]
    pub(crate) max_inflight: usize,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub(crate) enum Engine {
    Auto,
    Blocking,
}

/// What `--manager` needs, checked before anything starts.
struct Registration {
    client: ManagerClient,
    node_id: String,
    zone: String,
}

fn registration(args: &StorageArgs) -> anyhow::Result<Option<Registration>> {
    let Some(members) = &args.manager else {
        return Ok(None);
    };
    let client = ManagerClient::new(members).context("--manager")?;
    let node_id = match &args.node_id {
        Some(id) if id.trim().is_empty() => bail!("--node-id is empty"),
        Some(id) => id.trim().to_string(),
        None => hostname().context("no --node-id given and the hostname is unavailable")?,
    };
    match &args.advertise {
        Some(a) => check_addr(a).map_err(|e| anyhow::anyhow!("--advertise: {e}"))?,
        None if args.listen.ip().is_unspecified() => bail!(
            "listening on {} (every interface): give --advertise HOST:PORT, the data-path \
             address gateways and other nodes reach this daemon at",
            args.listen
        ),
        None => {}
    }
    Ok(Some(Registration {
        client,
        node_id,
        zone: args.zone.clone().unwrap_or_default(),
    }))
}

pub(crate) fn hostname() -> anyhow::Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname(2) writes at most `buf.len()` bytes into the buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("gethostname");
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = std::str::from_utf8(&buf[..end])
        .context("hostname is not UTF-8")?
        .trim();
    if name.is_empty() {
        bail!("the hostname is empty");
    }
    Ok(name.to_string())
}

pub async fn run(args: StorageArgs) -> anyhow::Result<()> {
    // Flag mistakes fail before anything starts.
    registration(&args)?;
    // Before the store opens, so that its first gauges are recorded.
    let ready = crate::dev::start_metrics(args.metrics).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(crate::dev::wait_for_signal(shutdown.clone()));
    serve(args, shutdown, ready).await
}

/// Runs the daemon until `shutdown` (`ironsan dev` runs several in one process); `ready`
/// answers `/readyz`.
pub async fn serve(
    args: StorageArgs,
    shutdown: CancellationToken,
    ready: Readiness,
) -> anyhow::Result<()> {
    // Flag mistakes fail before the store opens.
    let registration = registration(&args)?;
    for d in &args.data_dirs {
        std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
    }
    let cfg = StoreConfig {
        dirs: args.data_dirs.clone(),
        io_engine: match args.io_engine {
            Engine::Auto => IoEngine::Auto,
            Engine::Blocking => IoEngine::Blocking,
        },
        scrub_rate: args.scrub_rate,
        ..Default::default()
    };
    // Opening replays each directory's write log: blocking work, off the runtime's workers.
    let store = tokio::task::spawn_blocking(move || Store::open(cfg))
        .await
        .context("open the chunk store")?
        .context("open the chunk store")?;
    let store = Arc::new(store);
    store.start_background();
    for d in store.disks() {
        tracing::info!(disk = d.index, path = %d.path.display(), state = ?d.state, chunks = d.chunks, free = %ByteSize(d.free_bytes), io = d.io_engine, "data directory");
    }

    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind data path {}", args.listen))?;
    let addr = listener.local_addr()?;
    let node = registration
        .as_ref()
        .map(|r| r.node_id.clone())
        .or_else(|| args.node_id.clone())
        .unwrap_or_else(|| "-".into());
    // Registration and heartbeats run beside the data path; they never hold it up.
    let standing = Arc::new(Standing::default());
    if registration.is_some() {
        let standing = standing.clone();
        ready.set(move || standing.ready());
    } else {
        ready.set(|| Ok(()));
    }
    let membership = registration.map(|r| {
        let cfg = MembershipConfig {
            node_id: r.node_id,
            addr: args.advertise.clone().unwrap_or_else(|| addr.to_string()),
            zone: r.zone,
        };
        tracing::info!(manager = ?r.client.members(), node = %cfg.node_id, advertise = %cfg.addr, "registering with the manager");
        tokio::spawn(membership::run(
            r.client,
            store.clone(),
            cfg,
            standing,
            shutdown.clone(),
        ))
    });
    tracing::info!(
        addr = %addr,
        node = %node,
        zone = args.zone.as_deref().unwrap_or("-"),
        dirs = args.data_dirs.len(),
        "storage ready"
    );
    let cfg = ServerConfig {
        max_connections: args.max_connections,
        max_inflight: args.max_inflight,
        ..Default::default()
    };
    server::serve_with(listener, store.clone(), cfg, shutdown).await;
    if let Some(m) = membership {
        // Cancelled with the server; it may be deleting a replica the manager ordered dropped.
        let _ = m.await;
    }
    store.shutdown().await;
    tracing::info!("stopped cleanly");
    Ok(())
}
