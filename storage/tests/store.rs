//! The chunk store on real files: data, checksums, fencing, the write log, scrub and restarts.

use std::path::PathBuf;

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
        let info = s.info(id).await.unwrap();
        assert_eq!(info.version, 3);
        assert!(
            info.used >= 48 * 1024 && info.used < 64 * 1024 + 8192,
            "used {}",
            info.used
        );
        let (ranges, v) = s.written_since(id, 1).await.unwrap();
        assert_eq!(v, 3);
        assert_eq!(ranges.len(), 2);
        s.shutdown().await;
    }
    let s = open(&dirs, engine);
    let r = s.read(id, 0, 64 * 1024, 0).await.unwrap();
    assert!(r.data[1024..17 * 1024].iter().all(|&x| x == 0));
    assert_eq!(s.info(id).await.unwrap().version, 3);
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
