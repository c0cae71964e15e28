//! The storage daemon as a process: `ironsan storage` on real directories and sockets, driven
//! through the data-path client. Kill -9 in the middle of a write stream, a flipped bit found
//! by reads and by scrub, and a clean SIGTERM.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod storaged;

use storaged::{metric, Daemon};

use bytes::Bytes;
use ironsan_storage::{ChunkId, Error, WriteOpts};

const MIB: u64 = 1 << 20;

/// Contents of slot `slot` at generation `gen`: every byte says who wrote it.
fn content(slot: u64, gen: u64, len: usize) -> Bytes {
    let mut v = vec![0u8; len];
    for (i, b) in v.iter_mut().enumerate() {
        *b = (slot.wrapping_mul(131) ^ gen.wrapping_mul(29) ^ (i as u64 / 512)) as u8 | 1;
    }
    Bytes::from(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_write_stream_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let dirs = vec![dir.path().to_path_buf()];
    let mut d = Daemon::start(&dirs, &[]);
    let id = ChunkId::new(0xfeed, 0);
    let c = d.client().await;
    c.create(id, 64 * MIB, 1).await.unwrap();
    // 16 writers; writer k owns slots k, k+16, ... of 64 KiB (each write is a mix of whole and
    // partial blocks: 512 B .. 64 KiB at a sector offset), and records what was acknowledged.
    const SLOT: u64 = 64 * 1024;
    let slots = 64 * MIB / SLOT;
    let acked: Arc<Mutex<Vec<(u64, u64)>>> = Arc::new(Mutex::new(vec![(0, 0); slots as usize])); // (acked gen, in-flight gen)
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for k in 0..16u64 {
        let (c, acked, stop) = (d.client().await, acked.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut gen = 0u64;
            while !stop.load(Ordering::Relaxed) {
                gen += 1;
                let slot = k + 16 * (gen % (slots / 16));
                let len = 512 * (1 + (gen * 7 + k) % 128);
                acked.lock().unwrap()[slot as usize].1 = gen;
                match c
                    .write(
                        id,
                        slot * SLOT,
                        content(slot, gen, len as usize),
                        WriteOpts {
                            epoch: 1,
                            ..Default::default()
                        },
                    )
                    .await
                {
                    Ok(_) => {
                        let mut a = acked.lock().unwrap();
                        a[slot as usize] = (gen, 0);
                    }
                    Err(_) => return gen, // the daemon died under us
                }
            }
            gen
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    d.kill9();
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for w in writers {
        total += w.await.unwrap();
    }
    assert!(
        total > 200,
        "only {total} writes were issued before the kill"
    );
    let d = d.restart(&[]);
    let c = d.client().await;
    // The checksum table on disk trailed the data; recovery settled it from the write log.
    assert!(
        d.log().contains("write log replayed"),
        "no replay after kill -9; log:\n{}",
        d.log()
    );
    let acked = acked.lock().unwrap().clone();
    let mut checked = 0;
    for (slot, &(gen, inflight)) in acked.iter().enumerate() {
        let slot = slot as u64;
        let got = c
            .read(id, slot * SLOT, SLOT, 0)
            .await
            .unwrap_or_else(|e| panic!("slot {slot}: {e}"))
            .data;
        if gen == 0 && inflight == 0 {
            assert!(
                got.iter().all(|&b| b == 0),
                "slot {slot} never written but not zero"
            );
            continue;
        }
        // The slot holds the last acknowledged write, or the one in flight at the kill.
        let matches = |g: u64| {
            if g == 0 {
                return false;
            }
            let len = (512 * (1 + (g * 7 + slot % 16) % 128)) as usize;
            got[..len] == content(slot, g, len)[..]
        };
        assert!(
            matches(gen) || matches(inflight),
            "slot {slot}: acknowledged gen {gen} lost (in flight: {inflight})"
        );
        checked += 1;
    }
    assert!(checked > 16, "only {checked} slots were written");
    // Every block still carries a valid checksum.
    for off in (0..64 * MIB).step_by(MIB as usize) {
        c.read(id, off, MIB, 0)
            .await
            .unwrap_or_else(|e| panic!("read at {off}: {e}"));
    }
}

fn flip_bit(dir: &Path, id: ChunkId, at: u64) {
    use std::os::unix::fs::FileExt;
    let path = dir
        .join("chunks")
        .join(format!("{:016x}", id.volume))
        .join(format!("{:08x}.chunk", id.index));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x01;
    f.write_all_at(&b, at).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bit_fails_reads_over_the_wire_and_scrub_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let dirs = vec![dir.path().to_path_buf()];
    let mut d = Daemon::start(&dirs, &[]);
    let id = ChunkId::new(0xbad, 3);
    let c = d.client().await;
    c.create(id, 4 * MIB, 0).await.unwrap();
    c.write(id, 0, content(1, 1, 256 * 1024), WriteOpts::default())
        .await
        .unwrap();
    c.flush(None).await.unwrap();
    assert!(d.sigterm().success(), "SIGTERM exit; log:\n{}", d.log());
    // 4 MiB chunk: 4 KiB header + 4 KiB checksum table, then data; block 17, byte 100.
    flip_bit(dir.path(), id, 8192 + 17 * 4096 + 100);
    let d = d.restart(&["--scrub-rate", "64MiB"]);
    let c = d.client().await;
    let r = c.read(id, 0, 256 * 1024, 0).await;
    assert!(matches!(r, Err(Error::Checksum { block: 17, .. })), "{r:?}");
    assert_eq!(
        c.read(id, 0, 17 * 4096, 0).await.unwrap().data,
        content(1, 1, 256 * 1024).slice(..17 * 4096)
    );
    let mut found = 0.0;
    for _ in 0..100 {
        found = metric(&d.metrics(), "ironsan_storage_scrub_bad_blocks_total");
        if found > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        found >= 1.0,
        "scrub did not report the bad block; log:\n{}",
        d.log()
    );
    assert!(metric(&d.metrics(), "ironsan_storage_checksum_errors_total") >= 1.0);
    assert_eq!(c.info(id).await.unwrap().bad_blocks, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_cleanly_and_data_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let dirs = vec![
        dir.path().to_path_buf(),
        tempfile::tempdir().unwrap().keep(),
    ];
    let mut d = Daemon::start(&dirs, &[]);
    let c = d.client().await;
    let ids: Vec<ChunkId> = (0..4).map(|i| ChunkId::new(9, i)).collect();
    for (i, &id) in ids.iter().enumerate() {
        c.create(id, 4 * MIB, 2).await.unwrap();
        c.write(
            id,
            4096,
            content(i as u64, 2, 8192),
            WriteOpts {
                epoch: 2,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }
    let st = d.sigterm();
    assert!(st.success(), "exit status {st:?}; log:\n{}", d.log());
    let d = d.restart(&[]);
    let c = d.client().await;
    for (i, &id) in ids.iter().enumerate() {
        let info = c.info(id).await.unwrap();
        assert_eq!((info.epoch, info.version), (2, 1));
        assert_eq!(
            c.read(id, 4096, 8192, 0).await.unwrap().data,
            content(i as u64, 2, 8192)
        );
        let r = c
            .write(
                id,
                0,
                content(0, 0, 4096),
                WriteOpts {
                    epoch: 1,
                    ..Default::default()
                },
            )
            .await;
        assert!(
            matches!(r, Err(Error::StaleEpoch { current: 2, .. })),
            "{r:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dirs[1]);
}
