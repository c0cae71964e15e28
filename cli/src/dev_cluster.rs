//! `ironsan dev` as a cluster: managers, storage daemons and the gateway as tasks of one
//! process, talking over loopback exactly as separate daemons would (see `dev.rs`). Its
//! `/readyz` is ready when every one of them is, else names the first that is not.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ironsan_common::manager_client::ManagerClient;
use ironsan_common::observe::Readiness;
use ironsan_common::proto::manager as pb;
use ironsan_common::ByteSize;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::dev::{lock_dir, wait_for_signal, DevArgs, IoEngine, VolumeSpec};

/// The gateway's node id in a dev cluster.
pub const GATEWAY_ID: &str = "dev";

/// Addresses fixed at first start, reused afterwards (storage daemons could move, but a
/// stable address spares the gateway a stale one right after a restart).
struct Layout {
    managers: Vec<String>,
    storage: Vec<String>,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn port(base: u16, i: u64) -> anyhow::Result<u16> {
    if base == 0 {
        return free_port();
    }
    u16::try_from(base as u64 + i).context("port beyond 65535")
}

/// The strings of a JSON array (nothing for anything else).
fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn layout(dir: &Path, args: &DevArgs) -> anyhow::Result<Layout> {
    let path = dir.join("cluster.json");
    if let Ok(text) = fs::read_to_string(&path) {
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let managers = strings(&v["managers"]);
        let mut storage = strings(&v["storage"]);
        if managers.is_empty() {
            bail!("{} lists no managers", path.display());
        }
        // More storage daemons than last time: the new ones get ports now.
        for i in storage.len() as u64..args.storage {
            storage.push(format!("127.0.0.1:{}", port(args.storage_port, i)?));
        }
        storage.truncate(args.storage as usize);
        write_layout(&path, &managers, &storage)?;
        if managers.len() as u64 != args.managers {
            bail!(
                "{} was created with {} manager(s); start it with --managers {} (a Raft group's size is changed with `ironsan manager add-member`)",
                dir.display(),
                managers.len(),
                managers.len()
            );
        }
        return Ok(Layout { managers, storage });
    }
    let managers = (0..args.managers)
        .map(|i| Ok(format!("127.0.0.1:{}", port(args.manager_port, i)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let storage = (0..args.storage)
        .map(|i| Ok(format!("127.0.0.1:{}", port(args.storage_port, i)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    write_layout(&path, &managers, &storage)?;
    Ok(Layout { managers, storage })
}

fn write_layout(path: &Path, managers: &[String], storage: &[String]) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(&json!({ "managers": managers, "storage": storage }))?;
    fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("create {}", args.data_dir.display()))?;
    let _lock = lock_dir(&args.data_dir)?;
    if args.data_dir.join("volumes").is_dir() {
        tracing::warn!(dir = %args.data_dir.join("volumes").display(), "sparse-file volumes of `--local` are not served in cluster mode");
    }
    let layout = layout(&args.data_dir, &args)?;
    let ready = crate::dev::start_metrics(args.metrics).await?;
    // Each part's readiness, by name; the whole is ready when all are.
    let mut parts: Vec<(String, Readiness)> = Vec::new();
    let members = layout.managers.join(",");
    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signal(shutdown.clone()));

    let stop_managers = CancellationToken::new();
    let mut managers: Vec<JoinHandle<anyhow::Result<()>>> = Vec::new();
    for (i, addr) in layout.managers.iter().enumerate() {
        let id = i as u64 + 1;
        let listen: SocketAddr = addr.parse().context("manager address in cluster.json")?;
        let peers = layout
            .managers
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(j, a)| (j as u64 + 1, a.clone()))
            .collect();
        let margs = crate::manager::DaemonArgs {
            id: Some(id),
            id_from_hostname: false,
            listen,
            advertise: None,
            data_dir: Some(args.data_dir.join(format!("manager-{id}"))),
            peers,
            join: false,
            metrics: None,
            node_timeout: args.node_timeout,
            recovery_grace: args.recovery_grace,
            max_overcommit: args.max_overcommit,
            heartbeat_interval: Duration::from_secs(1),
            raft_tick: Duration::from_millis(100),
            snapshot_every: 5000,
            manager: String::new(),
            json: false,
        };
        let part = Readiness::new();
        parts.push((format!("manager {id}"), part.clone()));
        managers.push(tokio::spawn(crate::manager::serve(
            margs,
            stop_managers.clone(),
            part,
        )));
    }

    let stop_storage = CancellationToken::new();
    let mut storage: Vec<JoinHandle<anyhow::Result<()>>> = Vec::new();
    for (i, addr) in layout.storage.iter().enumerate() {
        let n = i + 1;
        let sargs = crate::storage::StorageArgs {
            data_dirs: vec![args.data_dir.join(format!("storage-{n}"))],
            listen: addr.parse().context("storage address in cluster.json")?,
            manager: Some(members.clone()),
            advertise: None,
            node_id: Some(format!("node{n}")),
            zone: None,
            metrics: None,
            io_engine: match args.io_engine {
                IoEngine::Auto => crate::storage::Engine::Auto,
                IoEngine::Blocking => crate::storage::Engine::Blocking,
            },
            scrub_rate: 32 << 20,
            max_connections: 1024,
            max_inflight: 128,
        };
        let part = Readiness::new();
        parts.push((format!("storage node{n}"), part.clone()));
        storage.push(tokio::spawn(crate::storage::serve(
            sargs,
            stop_storage.clone(),
            part,
        )));
    }
    let gateway = Readiness::new();
    parts.push(("gateway".into(), gateway.clone()));
    ready.set(move || {
        for (name, part) in &parts {
            part.check().map_err(|e| format!("{name}: {e}"))?;
        }
        Ok(())
    });

    let outcome = tokio::select! {
        r = prepare(&members, &args) => r,
        _ = shutdown.cancelled() => Ok(()),
    };
    if outcome.is_ok() && !shutdown.is_cancelled() {
        let gargs = crate::gateway::GatewayArgs {
            manager: members.clone(),
            portal: args.portal,
            // The bound portal (127.0.0.1:PORT by default), or the loopback address that
            // reaches the managers when --portal is 0.0.0.0.
            advertise: None,
            node_id: Some(GATEWAY_ID.into()),
            chap: args.chap.clone(),
            mutual_chap: args.mutual_chap.clone(),
            metrics: None,
            lease: None,
            io_timeout: Duration::from_secs(4),
        };
        tracing::info!(managers = %members, storage = args.storage, "cluster ready: `ironsan volume ... --manager {members}`");
        if let Err(e) = crate::gateway::serve(gargs, shutdown.clone(), gateway).await {
            tracing::error!(error = %format!("{e:#}"), "gateway failed");
        }
    }
    // The gateway has drained and flushed: storage next, the managers last.
    stop_storage.cancel();
    for s in storage {
        report(s.await, "storage daemon");
    }
    stop_managers.cancel();
    for m in managers {
        report(m.await, "manager");
    }
    outcome?;
    tracing::info!("stopped cleanly");
    Ok(())
}

fn report(r: Result<anyhow::Result<()>, tokio::task::JoinError>, what: &str) {
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "{what} failed"),
        Err(e) => tracing::error!(error = %e, "{what} task failed"),
    }
}

/// Waits for the storage daemons to register, then creates, grows and attaches the volumes
/// named on the command line.
async fn prepare(members: &str, args: &DevArgs) -> anyhow::Result<()> {
    let mgr = ManagerClient::new(members)?.with_deadline(Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = match mgr.list_nodes(pb::ListNodesRequest {}).await {
            Ok(r) => r
                .nodes
                .iter()
                .filter(|n| n.state == pb::NodeState::NodeUp as i32)
                .count() as u64,
            Err(_) => 0,
        };
        if up >= args.storage {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "only {up} of {} storage daemons registered within 60 s",
                args.storage
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for v in &args.volumes {
        ensure_volume(&mgr, v, args.storage).await?;
    }
    Ok(())
}

async fn ensure_volume(mgr: &ManagerClient, v: &VolumeSpec, storage: u64) -> anyhow::Result<()> {
    let vref = pb::VolumeRef {
        id: 0,
        name: v.name.clone(),
    };
    let existing = match mgr.get_volume(vref.clone()).await {
        Ok(vol) => Some(vol),
        Err(e) if e.code() == tonic::Code::NotFound => None,
        Err(e) => return Err(e).context("look up volume"),
    };
    match existing {
        Some(vol) if vol.size < v.size => {
            mgr.resize_volume(pb::ResizeVolumeRequest {
                volume: Some(vref.clone()),
                size: v.size,
            })
            .await
            .with_context(|| format!("grow volume {}", v.name))?;
            tracing::info!(volume = %v.name, size = %ByteSize(v.size), "volume grown");
        }
        Some(vol) => {
            if vol.size > v.size {
                tracing::warn!(volume = %v.name, size = %ByteSize(vol.size), "volume is larger than --volume asks; keeping its size");
            }
        }
        None => {
            let replicas = v.replicas.unwrap_or(3.min(storage as u32));
            mgr.create_volume(pb::CreateVolumeRequest {
                name: v.name.clone(),
                size: v.size,
                replicas,
                chunk_size: 0,
                qos: None,
            })
            .await
            .with_context(|| format!("create volume {}", v.name))?;
            tracing::info!(volume = %v.name, size = %ByteSize(v.size), replicas, "volume created");
        }
    }
    mgr.attach(pb::AttachRequest {
        volume: Some(vref),
        gateway: GATEWAY_ID.into(),
        lease_ms: 0,
        // The gateway's own attach sets its portal; an empty one keeps what it set before.
        portal: String::new(),
    })
    .await
    .with_context(|| format!("attach volume {} to the dev gateway", v.name))?;
    Ok(())
}
