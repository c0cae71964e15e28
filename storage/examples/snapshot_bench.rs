//! Write cost of snapshots on one chunk store (no network): random 4 KiB writes at a queue depth
//! of 32 into a 64 MiB chunk holding 0, 1 or 10 snapshots.
//!
//! For each case a fresh chunk is filled, then `n` snapshots are taken with a pass of random
//! writes between two of them (so every snapshot holds blocks). Measured after the last one:
//! - `first pass`: one write to every block, in a scattered order: each is the first
//!   overwrite of its block since the last snapshot, which pays the copy-on-write;
//! - `steady`, `steady 2`: random writes for a few seconds, twice (every block already
//!   copied: no copy).
//!
//! ```text
//! cargo run --release -p ironsan-storage --example snapshot_bench -- [DIR] [SECONDS]
//! ```
//! DIR defaults to a temporary directory under /var/tmp (a real disk, not tmpfs).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ironsan_storage::{ChunkId, Store, StoreConfig, WriteOpts};

const CHUNK: u64 = 64 << 20;
const BS: u64 = 4096;
const QD: usize = 32;
const BLOCKS: u64 = CHUNK / BS;
/// The writer's epoch: the chunks are created at 1.
const W: WriteOpts = WriteOpts {
    epoch: 1,
    seq: 0,
    fua: false,
};

struct Stats {
    ops: u64,
    secs: f64,
    p50_us: f64,
    p99_us: f64,
}

/// `QD` writers doing 4 KiB writes until `ops` are done or `dur` has passed: random blocks, or
/// with `every` each block once (write `n` goes to block `n * odd mod BLOCKS`, a permutation).
async fn run(
    store: &Arc<Store>,
    id: ChunkId,
    ops: u64,
    dur: Duration,
    seed: u64,
    every: bool,
) -> Stats {
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..QD {
        let (store, count) = (store.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let mut x = (seed * 1000 + w as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let data = Bytes::from(vec![(w as u8) ^ (seed as u8); BS as usize]);
            let mut lat = Vec::new();
            loop {
                let n = count.fetch_add(1, Ordering::Relaxed);
                if n >= ops || start.elapsed() >= dur {
                    return lat;
                }
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let block = if every {
                    n.wrapping_mul(0x9E37_79B9) % BLOCKS
                } else {
                    x % BLOCKS
                };
                let off = block * BS;
                let t = Instant::now();
                store.write(id, off, data.clone(), W).await.expect("write");
                lat.push(t.elapsed());
            }
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("writer"));
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    Stats {
        ops: lat.len() as u64,
        secs,
        p50_us: pct(0.5),
        p99_us: pct(0.99),
    }
}

fn line(case: &str, phase: &str, s: &Stats) {
    println!(
        "{case:>12}  {phase:<10}  {:>8.0} IOPS  p50 {:>7.1} us  p99 {:>8.1} us  ({} writes in {:.2} s)",
        s.ops as f64 / s.secs,
        s.p50_us,
        s.p99_us,
        s.ops,
        s.secs
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let tmp;
    let dir: PathBuf = match args.next() {
        Some(d) => d.into(),
        None => {
            tmp = tempfile::tempdir_in("/var/tmp").expect("tempdir");
            tmp.path().to_path_buf()
        }
    };
    let secs: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(5);
    let store = Arc::new(
        Store::open(StoreConfig {
            dirs: vec![dir.clone()],
            scrub_rate: 0,
            ..Default::default()
        })
        .expect("open store"),
    );
    store.start_background();
    println!(
        "chunk store in {}: random {BS}-byte writes, QD {QD}, {} MiB chunk",
        dir.display(),
        CHUNK >> 20
    );
    // 0 again at the end: how much the machine's noise moves the figures.
    for (i, snaps) in [0u64, 1, 10, 0].into_iter().enumerate() {
        let id = ChunkId::new(1, i as u32);
        store.create(id, CHUNK, 1).await.expect("create");
        let fill = Bytes::from(vec![0xa5u8; 1 << 20]);
        for off in (0..CHUNK).step_by(1 << 20) {
            store.write(id, off, fill.clone(), W).await.expect("fill");
        }
        for s in 0..snaps {
            if s > 0 {
                run(&store, id, BLOCKS, Duration::MAX, 100 + s, true).await;
            }
            store.snapshot(id, s + 1, 1).await.expect("snapshot");
        }
        store.flush(None).await.expect("flush");
        let case = format!("{snaps} snapshots");
        let first = run(&store, id, BLOCKS, Duration::MAX, 7, true).await;
        line(&case, "first pass", &first);
        // Twice: whether a difference is transient (background compaction) or lasting.
        for phase in ["steady", "steady 2"] {
            let steady = run(&store, id, u64::MAX, Duration::from_secs(secs), 8, false).await;
            line(&case, phase, &steady);
        }
        let list = store.snapshots(id).await.expect("list");
        let held: u64 = list.iter().map(|s| s.used).sum();
        println!(
            "{case:>12}  snapshot space {:.1} MiB",
            held as f64 / (1 << 20) as f64
        );
    }
    store.shutdown().await;
}
