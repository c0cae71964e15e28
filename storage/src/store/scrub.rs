//! Background scrub: re-reads every stored block at a bounded rate and verifies its checksum,
//! so corruption of cold data is found before a read (or a rebuild) needs it. After a chunk,
//! the blocks each of its snapshots holds itself (the rest of a snapshot is a newer
//! snapshot's or the chunk's, verified there).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Store;
use crate::chunk::BLOCK;

/// Bytes verified per request: small enough not to hold up client I/O on the same blocks.
const PIECE: u64 = 1 << 20;

/// Scrubs every chunk forever at about `rate` bytes per second, pausing `pause` between passes.
/// Returns when the store shuts down.
pub async fn run(store: Arc<Store>, rate: u64, pause: Duration) {
    if rate == 0 {
        return;
    }
    loop {
        let started = Instant::now();
        let (mut bytes, mut bad) = (0u64, 0u64);
        for id in store.list() {
            let Ok(info) = store.info(id).await else {
                continue;
            };
            let mut offset = 0;
            while offset < info.size {
                let len = PIECE.min(info.size - offset);
                let t = Instant::now();
                match store.scrub(id, offset, len).await {
                    Ok(blocks) => {
                        for b in &blocks {
                            tracing::warn!(chunk = %id, block = b, offset = b * BLOCK, "scrub: checksum mismatch");
                        }
                        bad += blocks.len() as u64;
                        metrics::counter!("ironsan_storage_scrub_bad_blocks_total")
                            .increment(blocks.len() as u64);
                    }
                    Err(crate::Error::ShuttingDown) => return,
                    // Deleted meanwhile, or its directory failed: move on.
                    Err(_) => break,
                }
                metrics::counter!("ironsan_storage_scrub_bytes_total").increment(len);
                bytes += len;
                offset += len;
                pace(t, len, rate).await;
            }
            for s in store.snapshots(id).await.unwrap_or_default() {
                if s.blocks == 0 {
                    continue;
                }
                // What a piece reads: the snapshot's share of the range, on average.
                let share = s.blocks as f64 * BLOCK as f64 / info.size.max(1) as f64;
                let mut offset = 0;
                while offset < info.size {
                    let len = PIECE.min(info.size - offset);
                    let t = Instant::now();
                    match store.snapshot_scrub(id, s.id, offset, len).await {
                        Ok(blocks) => {
                            for b in &blocks {
                                tracing::warn!(chunk = %id, snapshot = s.id, block = b, "scrub: checksum mismatch in a snapshot");
                            }
                            bad += blocks.len() as u64;
                            metrics::counter!("ironsan_storage_scrub_bad_blocks_total")
                                .increment(blocks.len() as u64);
                        }
                        Err(crate::Error::ShuttingDown) => return,
                        // Deleted meanwhile, or its directory failed: move on.
                        Err(_) => break,
                    }
                    let read = (len as f64 * share.min(1.0)) as u64;
                    metrics::counter!("ironsan_storage_scrub_bytes_total").increment(read);
                    bytes += read;
                    offset += len;
                    pace(t, read, rate).await;
                }
            }
        }
        metrics::counter!("ironsan_storage_scrub_passes_total").increment(1);
        tracing::info!(
            bytes,
            bad,
            secs = started.elapsed().as_secs(),
            "scrub pass complete"
        );
        tokio::time::sleep(pause).await;
    }
}

/// Sleeps so that a piece of `len` bytes started at `t` took `len / rate` seconds in all.
async fn pace(t: Instant, len: u64, rate: u64) {
    let budget = Duration::from_secs_f64(len as f64 / rate as f64);
    if let Some(rest) = budget.checked_sub(t.elapsed()) {
        tokio::time::sleep(rest).await;
    }
}
