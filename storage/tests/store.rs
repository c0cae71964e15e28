//! The chunk store on real files: data, checksums, fencing, the write log, scrub and restarts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use ironsan_storage::{ChunkId, Error, IoEngine, Store, StoreConfig, WriteOpts};

const MIB: u64 = 1 << 20;

fn open(dirs: &[PathBuf], engine: IoEngine) -> Store {
    let cfg = StoreConfig {
        dirs: dirs.to_vec(),
        io_engine: engine,
        log_keep: 64,
        ..Default::default()
    };
    Store::open(cfg).expect("store opens")
}

fn pattern(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

fn w(epoch: u64) -> WriteOpts {
    WriteOpts {
        epoch,
        ..Default::default()
    }
}

async fn round_trip(engine: IoEngine) {
    let dir = tempfile::tempdir().unwrap();
    let dirs = vec![dir.path().to_path_buf()];
    let id = ChunkId::new(1, 0);
    {
        let s = open(&dirs, engine);
        let info = s.create(id, 4 * MIB, 1).await.unwrap();
        assert_eq!(
            (info.size, info.epoch, info.version, info.used),
            (4 * MIB, 1, 0, 0)
        );
        assert!(matches!(
            s.create(id, 4 * MIB, 1).await,
            Err(Error::Exists(_))
        ));
        // Aligned, unaligned-in-memory, and 512-byte writes straddling blocks.
        let a = pattern(1, 64 * 1024);
        assert_eq!(s.write(id, 0, a.clone(), w(1)).await.unwrap(), 1);
        let b = pattern(2, 4096 + 1024).slice(1..4097 + 512);
        s.write(id, MIB + 512, b.clone(), w(1)).await.unwrap();
        let r = s.read(id, 0, 64 * 1024, 0).await.unwrap();
        assert_eq!(r.data, a);
        assert_eq!(r.version, 2);
        let r = s.read(id, MIB, 8192, 1).await.unwrap();
        assert_eq!(&r.data[..512], &[0u8; 512][..]);
        assert_eq!(&r.data[512..512 + b.len()], &b[..]);
        assert_eq!(
            &r.data[512 + b.len()..],
            &vec![0u8; 8192 - 512 - b.len()][..]
        );
        // Zeroing the middle of the first write, partially covering blocks.
        s.write_zeroes(id, 1024, 16 * 1024, true, w(1))
            .await
            .unwrap();
        let r = s.read(id, 0, 64 * 1024, 0).await.unwrap();
        assert_eq!(&r.data[..1024], &a[..1024]);
        assert!(r.data[1024..17 * 1024].iter().all(|&x| x == 0));
        assert_eq!(&r.data[17 * 1024..], &a[17 * 1024..]);
        // FUA zeroing of a written range, unaligned at both ends: fallocate, edges, fdatasync.
        s.write(id, 2 * MIB, pattern(7, 65536), w(1)).await.unwrap();
        let fua = WriteOpts {
            epoch: 1,
            fua: true,
            ..Default::default()
        };
        s.write_zeroes(id, 2 * MIB + 512, 60 * 1024, false, fua)
            .await
            .unwrap();
        let r = s.read(id, 2 * MIB, 65536, 0).await.unwrap().data;
        assert_eq!(&r[..512], &pattern(7, 512)[..]);
        assert!(r[512..512 + 60 * 1024].iter().all(|&x| x == 0));
        assert_eq!(&r[512 + 60 * 1024..], &pattern(7, 65536)[512 + 60 * 1024..]);
        let info = s.info(id).await.unwrap();
        assert_eq!(info.version, 5);
        assert!(
            info.used >= 48 * 1024 && info.used < 64 * 1024 + 8192,
            "used {}",
            info.used
        );
        let (ranges, v) = s.written_since(id, 1).await.unwrap();
        assert_eq!(v, 5);
        assert_eq!(ranges.len(), 3);
        s.shutdown().await;
    }
    let s = open(&dirs, engine);
    let r = s.read(id, 0, 64 * 1024, 0).await.unwrap();
    assert!(r.data[1024..17 * 1024].iter().all(|&x| x == 0));
    assert_eq!(s.info(id).await.unwrap().version, 5);
    s.shutdown().await;
}

#[tokio::test]
async fn round_trip_io_uring() {
    round_trip(IoEngine::Auto).await;
}

#[tokio::test]
async fn round_trip_blocking() {
    round_trip(IoEngine::Blocking).await;
}

fn store1(dir: &Path) -> Store {
    open(&[dir.to_path_buf()], IoEngine::Auto)
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let s = store1(dir.path());
    let id = ChunkId::new(2, 0);
    assert!(matches!(
        s.read(id, 0, 4096, 0).await,
        Err(Error::NotFound(_))
    ));
    for size in [0, 1000, 2 << 30] {
        assert!(
            matches!(s.create(id, size, 0).await, Err(Error::Invalid(_))),
            "size {size}"
        );
    }
    s.create(id, MIB, 0).await.unwrap();
    let four_k = pattern(3, 4096);
    let cases: Vec<(u64, Bytes)> = vec![
        (MIB, four_k.clone()),            // past the end
        (MIB - 512, four_k.clone()),      // straddles the end
        (u64::MAX - 511, four_k.clone()), // overflows
        (100, four_k.clone()),            // misaligned offset
        (0, four_k.slice(..100)),         // misaligned length
        (0, Bytes::new()),                // empty
    ];
    for (off, data) in cases {
        let r = s.write(id, off, data.clone(), w(0)).await;
        assert!(
            matches!(r, Err(Error::OutOfRange { .. } | Error::Invalid(_))),
            "write {off}+{}: {r:?}",
            data.len()
        );
    }
    assert!(matches!(
        s.read(id, 0, 9 << 20, 0).await,
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        s.read(id, MIB, 512, 0).await,
        Err(Error::OutOfRange { .. })
    ));
    // Nothing was written by any of them.
    assert_eq!(s.info(id).await.unwrap().version, 0);
    assert!(s
        .read(id, 0, 8192, 0)
        .await
        .unwrap()
        .data
        .iter()
        .all(|&b| b == 0));
    s.shutdown().await;
}

#[tokio::test]
async fn stale_epochs_are_refused_and_new_ones_persist() {
    let dir = tempfile::tempdir().unwrap();
    let id = ChunkId::new(3, 1);
    let data = pattern(4, 4096);
    {
        let s = store1(dir.path());
        s.create(id, MIB, 5).await.unwrap();
        let r = s.write(id, 0, data.clone(), w(4)).await;
        assert!(
            matches!(
                r,
                Err(Error::StaleEpoch {
                    got: 4,
                    current: 5,
                    ..
                })
            ),
            "{r:?}"
        );
        s.write(id, 0, data.clone(), w(7)).await.unwrap();
        for stale in [5, 6] {
            let r = s.write(id, 4096, data.clone(), w(stale)).await;
            assert!(
                matches!(r, Err(Error::StaleEpoch { current: 7, .. })),
                "{r:?}"
            );
            assert!(matches!(
                s.write_zeroes(id, 0, 4096, true, w(stale)).await,
                Err(Error::StaleEpoch { .. })
            ));
            assert!(matches!(
                s.delete(id, stale).await,
                Err(Error::StaleEpoch { .. })
            ));
            assert!(matches!(
                s.read(id, 0, 4096, stale).await,
                Err(Error::StaleEpoch { .. })
            ));
        }
        // A read carrying a newer epoch raises it too: the old writer is fenced from then on.
        s.read(id, 0, 4096, 8).await.unwrap();
        assert!(matches!(
            s.write(id, 0, data.clone(), w(7)).await,
            Err(Error::StaleEpoch { current: 8, .. })
        ));
        // Refused writes changed nothing.
        assert_eq!(s.read(id, 0, 8192, 0).await.unwrap().data[..4096], data[..]);
        assert!(s
            .read(id, 4096, 4096, 0)
            .await
            .unwrap()
            .data
            .iter()
            .all(|&b| b == 0));
    }
    // Dropped without shutdown: the epoch was synced before it was obeyed.
    let s = store1(dir.path());
    assert_eq!(s.info(id).await.unwrap().epoch, 8);
    assert!(matches!(
        s.write(id, 0, data, w(7)).await,
        Err(Error::StaleEpoch { .. })
    ));
    s.delete(id, 8).await.unwrap();
    assert!(matches!(s.info(id).await, Err(Error::NotFound(_))));
    s.shutdown().await;
}

/// Where block `block` of a chunk of `size` bytes lives in its file (layout.rs).
fn data_offset(size: u64, block: u64) -> u64 {
    let table = (size / 4096 * 4).div_ceil(4096) * 4096;
    4096 + table + block * 4096
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
    b[0] ^= 0x10;
    f.write_all_at(&b, at).unwrap();
    f.sync_all().unwrap();
}

#[tokio::test]
async fn flipped_bit_is_caught_by_reads_and_scrub_and_healed_by_a_rewrite() {
    let dir = tempfile::tempdir().unwrap();
    let id = ChunkId::new(4, 2);
    let data = pattern(5, 64 * 1024);
    {
        let s = store1(dir.path());
        s.create(id, 4 * MIB, 1).await.unwrap();
        s.write(id, 0, data.clone(), w(1)).await.unwrap();
        s.shutdown().await;
    }
    flip_bit(dir.path(), id, data_offset(4 * MIB, 5) + 123);
    let s = store1(dir.path());
    // Reads touching block 5 fail with its number; reads around it succeed.
    let r = s.read(id, 0, 64 * 1024, 0).await;
    assert!(matches!(r, Err(Error::Checksum { block: 5, .. })), "{r:?}");
    assert!(matches!(
        s.read(id, 5 * 4096 + 512, 512, 0).await,
        Err(Error::Checksum { block: 5, .. })
    ));
    assert_eq!(
        s.read(id, 0, 5 * 4096, 0).await.unwrap().data,
        data.slice(..5 * 4096)
    );
    assert_eq!(
        s.read(id, 6 * 4096, 4096, 0).await.unwrap().data,
        data.slice(6 * 4096..7 * 4096)
    );
    // A partial write must not launder the corrupt block with a fresh checksum.
    let r = s.write(id, 5 * 4096, pattern(6, 512), w(1)).await;
    assert!(matches!(r, Err(Error::Checksum { block: 5, .. })), "{r:?}");
    assert_eq!(s.info(id).await.unwrap().bad_blocks, 1);
    // Scrub finds exactly that block.
    assert_eq!(s.scrub(id, 0, MIB).await.unwrap(), vec![5]);
    // Rewriting the whole block heals it.
    s.write(id, 5 * 4096, data.slice(5 * 4096..6 * 4096), w(1))
        .await
        .unwrap();
    assert_eq!(s.read(id, 0, 64 * 1024, 0).await.unwrap().data, data);
    assert_eq!(s.info(id).await.unwrap().bad_blocks, 0);
    assert!(s.scrub(id, 0, MIB).await.unwrap().is_empty());
    s.shutdown().await;
}

#[tokio::test]
async fn write_log_gives_ranges_since_a_version_until_it_is_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let s = store1(dir.path()); // log_keep 64
    let id = ChunkId::new(5, 0);
    s.create(id, 4 * MIB, 1).await.unwrap();
    for i in 0..40u64 {
        let seq = s
            .write(id, (i % 8) * 8192, pattern(i, 4096), w(1))
            .await
            .unwrap();
        assert_eq!(seq, i + 1);
    }
    let (ranges, v) = s.written_since(id, 36).await.unwrap();
    assert_eq!(v, 40);
    // Writes 37..40 touched slots 4..7: offsets 32 KiB..56 KiB, 4 KiB each.
    let want: Vec<(u64, u64)> = (4..8).map(|k| (k * 8192, 4096)).collect();
    assert_eq!(
        ranges.iter().map(|r| (r.offset, r.len)).collect::<Vec<_>>(),
        want
    );
    assert!(s.written_since(id, 40).await.unwrap().0.is_empty());
    // Client-assigned sequence numbers are kept.
    assert_eq!(
        s.write(
            id,
            0,
            pattern(99, 512),
            WriteOpts {
                epoch: 1,
                seq: 100,
                fua: true
            }
        )
        .await
        .unwrap(),
        100
    );
    for i in 0..200u64 {
        s.write(id, MIB + (i % 16) * 4096, pattern(i, 4096), w(1))
            .await
            .unwrap();
        if i % 50 == 0 {
            s.flush(Some(id)).await.unwrap();
        }
    }
    s.flush(None).await.unwrap();
    let info = s.info(id).await.unwrap();
    assert_eq!(info.version, 300);
    assert!(
        info.log_start > 1 && info.log_start <= 300 - 64,
        "log_start {}",
        info.log_start
    );
    let r = s.written_since(id, 10).await;
    assert!(matches!(r, Err(Error::LogTruncated { .. })), "{r:?}");
    let (ranges, _) = s.written_since(id, 290).await.unwrap();
    assert_eq!(ranges.iter().map(|r| r.len).sum::<u64>(), 10 * 4096);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sector_writes_into_shared_blocks_all_land() {
    // Eight writers own interleaved 512-byte sectors of the same 4 KiB blocks, so every write is
    // a read-modify-write racing the others; readers run alongside.
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(store1(dir.path()));
    let id = ChunkId::new(6, 0);
    s.create(id, MIB, 0).await.unwrap();
    let blocks = 32u64;
    let mut tasks = Vec::new();
    for k in 0..8u64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..3u64 {
                for b in 0..blocks {
                    let off = b * 4096 + k * 512;
                    s.write(id, off, pattern(k * 1000 + b + round * 7, 512), w(0))
                        .await
                        .unwrap();
                }
            }
        }));
    }
    for _ in 0..2 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..50 {
                s.read(id, 0, blocks * 4096, 0).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let got = s.read(id, 0, blocks * 4096, 0).await.unwrap().data;
    for b in 0..blocks {
        for k in 0..8u64 {
            let at = (b * 4096 + k * 512) as usize;
            assert_eq!(
                &got[at..at + 512],
                &pattern(k * 1000 + b + 14, 512)[..],
                "block {b} sector {k}"
            );
        }
    }
    assert!(s.scrub(id, 0, MIB).await.unwrap().is_empty());
    s.shutdown().await;
}
