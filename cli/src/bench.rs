//! `ironsan bench storage`: a load generator for one storage daemon's data path.
//!
//! It creates the chunks a `--size` byte region needs (in a random volume unless `--volume`
//! is given; chunks that already exist are reused), optionally writes the region once, then
//! keeps `--iodepth` requests in flight for `--runtime` seconds and prints one `key=value`
//! line (for scripts) and one line for people.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Args, Subcommand};
use ironsan_common::{parse_size, ByteSize};
use ironsan_storage::{
    AlignedBuf, ChunkId, Client, ClientConfig, Error, WriteOpts, MAX_IO, SECTOR,
};

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Drive a storage daemon's data path and report IOPS, bandwidth and latency.
    Storage(StorageBench),
    /// Committed metadata operations per second on a manager group.
    Manager(crate::bench_manager::ManagerBench),
    /// The same closed-loop load as etcd puts (the peer figure for `bench manager`).
    Etcd(crate::bench_manager::EtcdBench),
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rw {
    Randread,
    Randwrite,
    Read,
    Write,
}

#[derive(Args, Debug)]
pub struct StorageBench {
    /// Data-path address of the daemon.
    #[arg(long)]
    addr: String,
    #[arg(long, value_enum)]
    rw: Rw,
    /// Request size (multiple of 512, at most 8 MiB).
    #[arg(long, value_parser = parse_size, default_value = "4KiB")]
    bs: u64,
    /// Requests kept in flight.
    #[arg(long, default_value_t = 1)]
    iodepth: usize,
    /// Region covered (spread over chunks of --chunk-size).
    #[arg(long, value_parser = parse_size, default_value = "1GiB")]
    size: u64,
    /// Seconds to run.
    #[arg(long, default_value_t = 10)]
    runtime: u64,
    #[arg(long, value_parser = parse_size, default_value = "64MiB")]
    chunk_size: u64,
    /// Write the whole region once before measuring (reads then hit allocated data).
    #[arg(long)]
    prefill: bool,
    /// Volume id to use (default: a random one).
    #[arg(long)]
    volume: Option<u64>,
    /// Data-path connections, requests spread round-robin.
    #[arg(long, default_value_t = 1)]
    conns: usize,
    /// Writes ask for stable storage (FUA).
    #[arg(long)]
    fua: bool,
}

pub async fn run(cmd: BenchCmd) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Storage(b) => storage(b).await,
        BenchCmd::Manager(b) => crate::bench_manager::manager(b).await,
        BenchCmd::Etcd(b) => crate::bench_manager::etcd(b).await,
    }
}

fn random_u64(salt: u64) -> u64 {
    std::collections::hash_map::RandomState::new().hash_one(salt)
}

const EPOCH: u64 = 1;

struct Target {
    clients: Vec<Client>,
    volume: u64,
    chunk_size: u64,
    next: AtomicU64,
}

impl Target {
    fn client(&self) -> &Client {
        let i = self.next.fetch_add(1, Ordering::Relaxed) as usize % self.clients.len();
        &self.clients[i]
    }

    fn locate(&self, off: u64) -> (ChunkId, u64) {
        (
            ChunkId::new(self.volume, (off / self.chunk_size) as u32),
            off % self.chunk_size,
        )
    }
}

async fn storage(a: StorageBench) -> anyhow::Result<()> {
    if a.bs == 0 || !a.bs.is_multiple_of(SECTOR) || a.bs > MAX_IO {
        bail!("--bs must be a multiple of {SECTOR} up to {MAX_IO}");
    }
    if !a.chunk_size.is_multiple_of(a.bs) || !a.size.is_multiple_of(a.bs) || a.size == 0 {
        bail!("--chunk-size and --size must be non-zero multiples of --bs");
    }
    let chunks = a.size.div_ceil(a.chunk_size);
    if chunks > u32::MAX as u64 {
        bail!("too many chunks");
    }
    let cfg = ClientConfig::default();
    let mut clients = Vec::new();
    for _ in 0..a.conns.max(1) {
        clients.push(Client::connect(&a.addr, &cfg).await?);
    }
    let volume = a.volume.unwrap_or_else(|| random_u64(0) | 1);
    let t = Arc::new(Target {
        clients,
        volume,
        chunk_size: a.chunk_size,
        next: AtomicU64::new(0),
    });
    for i in 0..chunks as u32 {
        let size = a.chunk_size.min(a.size - i as u64 * a.chunk_size);
        let size = size.next_multiple_of(4096);
        match t
            .client()
            .create(ChunkId::new(volume, i), size, EPOCH)
            .await
        {
            Ok(_) | Err(Error::Exists(_)) => {}
            Err(e) => return Err(e).context("create chunk"),
        }
    }
    let mut data = AlignedBuf::zeroed(a.bs as usize);
    for (i, b) in data.as_mut_slice().iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    let data = data.freeze();
    let opts = WriteOpts {
        epoch: EPOCH,
        seq: 0,
        fua: a.fua,
    };
    if a.prefill {
        let bs = (1u64 << 20).min(a.chunk_size);
        let fill = Bytes::from(vec![0x5au8; bs as usize]);
        let cursor = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (t, cursor, fill) = (t.clone(), cursor.clone(), fill.clone());
            let size = a.size;
            tasks.push(tokio::spawn(async move {
                loop {
                    let off = cursor.fetch_add(bs, Ordering::Relaxed);
                    if off >= size {
                        return Ok::<_, Error>(());
                    }
                    let len = bs.min(size - off);
                    let (id, at) = t.locate(off);
                    t.client()
                        .write(id, at, fill.slice(..len as usize), opts)
                        .await?;
                }
            }));
        }
        for task in tasks {
            task.await?.context("prefill")?;
        }
        t.client()
            .flush(None)
            .await
            .context("flush after prefill")?;
    }

    let blocks = a.size / a.bs;
    let stop = Arc::new(AtomicBool::new(false));
    let cursor = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..a.iodepth.max(1) {
        let (t, stop, cursor, data) = (t.clone(), stop.clone(), cursor.clone(), data.clone());
        let (rw, bs) = (a.rw, a.bs);
        let mut rng = random_u64(w as u64 + 1) | 1;
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<u32> = Vec::with_capacity(1 << 16);
            while !stop.load(Ordering::Relaxed) {
                let block = match rw {
                    Rw::Randread | Rw::Randwrite => {
                        // xorshift64: cheap and good enough to spread offsets.
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng % blocks
                    }
                    Rw::Read | Rw::Write => cursor.fetch_add(1, Ordering::Relaxed) % blocks,
                };
                let (id, off) = t.locate(block * bs);
                let t0 = Instant::now();
                match rw {
                    Rw::Randread | Rw::Read => {
                        t.client().read(id, off, bs, 0).await?;
                    }
                    Rw::Randwrite | Rw::Write => {
                        t.client().write(id, off, data.clone(), opts).await?;
                    }
                }
                lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
            }
            Ok::<_, Error>(lat)
        }));
    }
    tokio::time::sleep(Duration::from_secs(a.runtime)).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    let mut first_err = None;
    for task in tasks {
        match task.await? {
            Ok(l) => lat.extend(l),
            Err(e) => first_err = first_err.or(Some(e)),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if let Some(e) = first_err {
        return Err(e).context("benchmark request failed");
    }
    lat.sort_unstable();
    let ops = lat.len() as u64;
    let iops = ops as f64 / secs;
    let mibps = iops * a.bs as f64 / (1 << 20) as f64;
    let mean = if ops == 0 {
        0.0
    } else {
        lat.iter().map(|&x| x as f64).sum::<f64>() / ops as f64
    };
    let p99 = lat
        .get(((ops as f64 * 0.99) as usize).min(lat.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0);
    let rw = format!("{:?}", a.rw).to_lowercase();
    println!(
        "rw={rw} bs={} iodepth={} ops={ops} secs={secs:.2} iops={iops:.0} mibps={mibps:.1} lat_mean_us={mean:.1} lat_p99_us={p99}",
        a.bs, a.iodepth
    );
    println!(
        "{rw} {} QD{}: {iops:.0} IOPS, {mibps:.1} MiB/s, mean {mean:.0} us, p99 {p99} us",
        ByteSize(a.bs),
        a.iodepth
    );
    Ok(())
}
