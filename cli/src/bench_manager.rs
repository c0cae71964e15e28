//! `ironsan bench manager` and `ironsan bench etcd`: committed metadata operations per second
//! on a manager group, and the same closed-loop load as etcd puts for a peer figure.
//!
//! Both keep `--concurrency` requests in flight until `--count` complete, then print one
//! `key=value` line for scripts and one line for people. The etcd client is a bare tonic call
//! to `etcdserverpb.KV/Put` with a hand-declared request message (field numbers from etcd's
//! rpc.proto), so the peer needs no extra crate or protoc.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use ironsan_common::proto::manager::{
    self as pb, manager_client::ManagerClient, CreateVolumeRequest, Disk, DiskState,
    GetChunksRequest, RegisterNodeRequest, VolumeRef,
};
use tonic::transport::{Channel, Endpoint};

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaOp {
    /// CreateVolume of a 1 GiB volume with 16 chunks of 64 MiB (one log entry each).
    Create,
    /// ReportFailedReplica: remove one replica of a chunk and bump its epoch.
    ReplicaChange,
}

#[derive(Args, Debug)]
pub struct ManagerBench {
    /// Members of the group (comma-separated); requests go to the first.
    #[arg(long, default_value = "127.0.0.1:7400")]
    manager: String,
    #[arg(long, value_enum)]
    op: MetaOp,
    #[arg(long, default_value_t = 2000)]
    count: u64,
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Register this many placeholder storage nodes first (placement needs Up nodes).
    #[arg(long, default_value_t = 0)]
    register_nodes: usize,
}

#[derive(Args, Debug)]
pub struct EtcdBench {
    /// An etcd client endpoint (host:port).
    #[arg(long, default_value = "127.0.0.1:2379")]
    endpoint: String,
    #[arg(long, default_value_t = 2000)]
    count: u64,
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Value size in bytes (a volume record with 16 replica sets is ~600 bytes).
    #[arg(long, default_value_t = 600)]
    value_size: usize,
}

fn channel(addr: &str) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .context("address")?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .connect_lazy())
}

/// Runs `count` operations with `concurrency` in flight; returns per-op latencies.
async fn closed_loop<F, Fut>(
    count: u64,
    concurrency: usize,
    op: F,
) -> anyhow::Result<(Vec<Duration>, Duration)>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (op, next) = (op.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, anyhow::Error>(lat);
                }
                let t = Instant::now();
                op(i).await?;
                lat.push(t.elapsed());
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((all, started.elapsed()))
}

fn report(what: &str, concurrency: usize, mut lat: Vec<Duration>, took: Duration) {
    lat.sort();
    let n = lat.len().max(1);
    let pct = |p: f64| {
        lat.get(((n as f64 * p) as usize).min(n - 1))
            .map_or(0, |d| d.as_micros())
    };
    let rate = lat.len() as f64 / took.as_secs_f64();
    println!(
        "op={what} concurrency={concurrency} ops={} secs={:.2} ops_per_sec={rate:.0} lat_p50_us={} lat_p99_us={}",
        lat.len(),
        took.as_secs_f64(),
        pct(0.5),
        pct(0.99)
    );
    println!(
        "{what} x{concurrency}: {rate:.0} committed ops/s, p50 {:.2} ms, p99 {:.2} ms",
        pct(0.5) as f64 / 1000.0,
        pct(0.99) as f64 / 1000.0
    );
}

pub async fn manager(a: ManagerBench) -> anyhow::Result<()> {
    let first = a
        .manager
        .split(',')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    let client = ManagerClient::new(channel(&first)?);
    for i in 0..a.register_nodes {
        client
            .clone()
            .register_node(RegisterNodeRequest {
                id: format!("bench-node-{i}"),
                addr: format!("127.0.0.1:{}", 20000 + i),
                zone: String::new(),
                disks: vec![Disk {
                    path: "/bench".into(),
                    state: DiskState::DiskHealthy as i32,
                    capacity: 1 << 50,
                    free: 1 << 50,
                }],
            })
            .await
            .context("register bench node")?;
    }
    let run = format!("{:x}", std::process::id());
    match a.op {
        MetaOp::Create => {
            let c = client.clone();
            let (lat, took) = closed_loop(a.count, a.concurrency, move |i| {
                let mut c = c.clone();
                let name = format!("bench-{run}-{i}");
                async move {
                    c.create_volume(CreateVolumeRequest {
                        name,
                        size: 1 << 30,
                        replicas: 3,
                        chunk_size: 0,
                        qos: None,
                    })
                    .await
                    .context("create volume")?;
                    Ok(())
                }
            })
            .await?;
            report("create", a.concurrency, lat, took);
        }
        MetaOp::ReplicaChange => {
            // One volume with a chunk per operation; each op removes one replica of its chunk
            // under the volume's writer epoch.
            let chunk_size = 1u64 << 20;
            let name = format!("bench-rc-{run}");
            let mut c = client.clone();
            c.create_volume(CreateVolumeRequest {
                name: name.clone(),
                size: a.count * chunk_size,
                replicas: 3,
                chunk_size,
                qos: None,
            })
            .await
            .context("create the replica-change volume")?;
            let att = c
                .attach(pb::AttachRequest {
                    volume: Some(VolumeRef {
                        id: 0,
                        name: name.clone(),
                    }),
                    gateway: "bench".into(),
                    lease_ms: 300_000,
                    portal: String::new(),
                })
                .await
                .context("attach")?
                .into_inner();
            let chunks = c
                .get_chunks(GetChunksRequest {
                    volume: Some(VolumeRef { id: 0, name }),
                    first: 0,
                    count: 0,
                })
                .await
                .context("get chunks")?
                .into_inner()
                .chunks;
            if chunks.len() as u64 != a.count {
                bail!("expected {} chunks, got {}", a.count, chunks.len());
            }
            let chunks = Arc::new(chunks);
            let (lat, took) = closed_loop(a.count, a.concurrency, move |i| {
                let mut c = client.clone();
                let ch = chunks[i as usize].clone();
                async move {
                    c.report_failed_replica(pb::ReportFailedReplicaRequest {
                        volume_id: att.volume_id,
                        index: ch.index,
                        node_id: ch.replicas[0].clone(),
                        writer_epoch: att.writer_epoch,
                        reason: "bench".into(),
                    })
                    .await
                    .context("report failed replica")?;
                    Ok(())
                }
            })
            .await?;
            report("replica-change", a.concurrency, lat, took);
        }
    }
    Ok(())
}

/// etcd's `PutRequest` (etcdserverpb, rpc.proto): key = 1, value = 2.
#[derive(Clone, PartialEq, prost::Message)]
struct EtcdPut {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// Only the presence of a response matters.
#[derive(Clone, PartialEq, prost::Message)]
struct EtcdPutResponse {}

pub async fn etcd(a: EtcdBench) -> anyhow::Result<()> {
    let ch = channel(&a.endpoint)?;
    let value = Arc::new(vec![b'x'; a.value_size]);
    let run = std::process::id();
    let (lat, took) = closed_loop(a.count, a.concurrency, move |i| {
        let mut grpc = tonic::client::Grpc::new(ch.clone());
        let req = EtcdPut {
            key: format!("bench/{run}/{i}").into_bytes(),
            value: value.to_vec(),
        };
        async move {
            grpc.ready().await.context("etcd connection")?;
            let path = tonic::codegen::http::uri::PathAndQuery::from_static("/etcdserverpb.KV/Put");
            let codec: tonic_prost::ProstCodec<EtcdPut, EtcdPutResponse> =
                tonic_prost::ProstCodec::default();
            grpc.unary(tonic::Request::new(req), path, codec)
                .await
                .context("etcd put")?;
            Ok(())
        }
    })
    .await?;
    report("etcd-put", a.concurrency, lat, took);
    Ok(())
}
