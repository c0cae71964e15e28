//! `ironsan storage`: one storage daemon serving the chunk store of its data directories on
//! the data path until SIGTERM/SIGINT, then draining its connections and shutting the store
//! down cleanly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use ironsan_common::{parse_size, ByteSize};
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
    data_dirs: Vec<PathBuf>,
    /// Data-path address (port 0 picks a free port; the ready line shows it).
    #[arg(long, env = "IRONSAN_STORAGE_LISTEN")]
    listen: SocketAddr,
    /// Manager to register with (registration arrives with the manager; logged only).
    #[arg(long, env = "IRONSAN_MANAGER")]
    manager: Option<String>,
    /// This node's id in the cluster.
    #[arg(long, env = "IRONSAN_NODE_ID")]
    node_id: Option<String>,
    /// Failure domain (zone) of this node.
    #[arg(long, env = "IRONSAN_ZONE")]
    zone: Option<String>,
    /// Serve Prometheus metrics on /metrics and /healthz at this address.
    #[arg(long, env = "IRONSAN_METRICS")]
    metrics: Option<SocketAddr>,
    /// How chunk files are read and written: io_uring where the kernel allows it, or plain
    /// pread/pwrite.
    #[arg(long, value_enum, default_value = "auto", env = "IRONSAN_IO_ENGINE")]
    io_engine: Engine,
    /// Background scrub rate per second (e.g. 32MiB; 0 disables scrubbing).
    #[arg(long, value_parser = parse_size, default_value = "32MiB", env = "IRONSAN_SCRUB_RATE")]
    scrub_rate: u64,
    /// Data-path connections served at once.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Requests in flight per connection before the daemon stops reading from it.
    #[arg(long, default_value_t = 128)]
    max_inflight: usize,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Engine {
    Auto,
    Blocking,
}

pub async fn run(args: StorageArgs) -> anyhow::Result<()> {
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
    // Before the store opens, so that its first gauges are recorded.
    crate::dev::start_metrics(args.metrics).await?;
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

    if let Some(m) = &args.manager {
        tracing::info!(manager = %m, "manager given: registration arrives with the manager");
    }

    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind data path {}", args.listen))?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    tokio::spawn(crate::dev::wait_for_signal(shutdown.clone()));
    tracing::info!(
        addr = %addr,
        node = args.node_id.as_deref().unwrap_or("-"),
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
    store.shutdown().await;
    tracing::info!("stopped cleanly");
    Ok(())
}
