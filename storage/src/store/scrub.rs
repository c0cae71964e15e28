//! Background scrub: re-reads every stored block at a bounded rate and verifies its checksum,
//! so corruption of cold data is found before a read (or a rebuild) needs it.

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
                // Sleep so that this piece took len/rate seconds in all.
                let budget = Duration::from_secs_f64(len as f64 / rate as f64);
                if let Some(rest) = budget.checked_sub(t.elapsed()) {
                    tokio::time::sleep(rest).await;
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
