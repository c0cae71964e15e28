//! Per-chunk snapshots through the real server, on real files and real sockets: frozen content
//! under later writes and unmaps, chains of snapshots, deletion and the space it frees, fencing,
//! typed errors, checksums of snapshot data, and survival of a restart and of kill -9.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ironsan_storage::server;
use ironsan_storage::{ChunkId, Client, ClientConfig, Error, Store, StoreConfig, WriteOpts};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
const C: ChunkId = ChunkId::new(0x5a, 3);
const CHUNK: u64 = 4 * MIB;
/// Environment variable that turns `snapshot_daemon_child` into a daemon on that directory.
const CHILD_DIR: &str = "IRONSAN_SNAPSHOT_CHILD_DIR";

/// A storage daemon in this process on `dir`, served over a real socket.
struct Daemon {
    addr: String,
    store: Arc<Store>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Daemon {
    async fn start(dir: &Path) -> Daemon {
        let store = Arc::new(open_store(dir));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server::serve(listener, store.clone(), shutdown.clone()));
        Daemon {
            addr,
            store,
            shutdown,
            task,
        }
    }

    async fn client(&self) -> Client {
        Client::connect(&self.addr, &cfg()).await.expect("connect")
    }

    /// Stops serving and shuts the store down cleanly (checkpoint, threads joined).
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("server task");
        self.store.shutdown().await;
    }
}

fn open_store(dir: &Path) -> Store {
    Store::open(StoreConfig {
        dirs: vec![dir.to_path_buf()],
        scrub_rate: 0,
        ..Default::default()
    })
    .expect("open store")
}

fn cfg() -> ClientConfig {
    ClientConfig {
        request_timeout: Duration::from_secs(10),
        ..Default::default()
    }
}

fn w(epoch: u64) -> WriteOpts {
    WriteOpts {
        epoch,
        ..Default::default()
    }
}

/// `len` bytes that differ with `seed` and along the buffer.
fn pattern(seed: u64, len: u64) -> Bytes {
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

fn chunk_dir(dir: &Path) -> PathBuf {
    dir.join("chunks").join(format!("{:016x}", C.volume))
}

fn snap_file(dir: &Path, snap: u64) -> PathBuf {
    chunk_dir(dir).join(format!("{:08x}.{snap:016x}.snap", C.index))
}

/// Bytes allocated on disk by every file of the chunk (chunk file and snapshot files).
fn allocated(dir: &Path) -> u64 {
    std::fs::read_dir(chunk_dir(dir))
        .map(|d| {
            d.flatten()
                .filter_map(|f| f.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

async fn read_snap(c: &Client, snap: u64, offset: u64, len: u64) -> Bytes {
    c.snapshot_read(C, snap, offset, len)
        .await
        .unwrap_or_else(|e| panic!("snapshot {snap} at {offset}+{len}: {e}"))
        .data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_keeps_a_while_the_chunk_reads_b() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path()).await;
    let c = d.client().await;
    c.create(C, CHUNK, 1).await.unwrap();
    let a = pattern(1, MIB);
    c.write(C, 0, a.clone(), w(1)).await.unwrap();
    c.snapshot(C, 100, 1).await.unwrap();
    // B over part of A, unaligned at both ends (read-modify-write edges).
    let b = pattern(2, 128 * KIB + 1024);
    let at = 64 * KIB + 512;
    c.write(C, at, b.clone(), w(1)).await.unwrap();

    let live = c.read(C, 0, MIB, 0).await.unwrap().data;
    let mut expect = a.to_vec();
    expect[at as usize..at as usize + b.len()].copy_from_slice(&b);
    assert_eq!(&live[..], &expect[..], "the chunk reads B over A");
    assert_eq!(read_snap(&c, 100, 0, MIB).await, a, "the snapshot reads A");
    // Sub-block read of the snapshot, and a range never written (zeros).
    assert_eq!(
        read_snap(&c, 100, at, 1024).await,
        a.slice(at as usize..at as usize + 1024)
    );
    assert_eq!(
        read_snap(&c, 100, 2 * MIB, 8 * KIB).await,
        Bytes::from(vec![0u8; 8192])
    );

    // The rebuild's streaming read of the snapshot: all of it, the version when taken.
    let mut stream = c.copy_snapshot(C, 100).await.unwrap();
    assert!(stream.full);
    assert_eq!(stream.version, 1);
    let mut streamed = vec![0u8; CHUNK as usize];
    while let Some(piece) = stream.next().await {
        let (off, data) = piece.unwrap();
        streamed[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    assert_eq!(&streamed[..MIB as usize], &a[..]);
    assert!(streamed[MIB as usize..].iter().all(|&b| b == 0));
    assert!(matches!(
        c.copy_snapshot(C, 5).await.map(|_| ()),
        Err(Error::SnapshotNotFound { snapshot: 5, .. })
    ));
    assert!(matches!(c.snapshot(C, 0, 1).await, Err(Error::Invalid(_))));

    let list = c.snapshots(C).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].id, 100);
    assert_eq!(list[0].version, 1, "taken after the first write");
    // The copy-on-write is of the touched blocks only: 128 KiB + 1 KiB at 64.5 KiB spans 33.
    assert_eq!(list[0].blocks, 33);
    assert!(
        (33 * 4096..64 * 4096).contains(&list[0].used),
        "{}",
        list[0].used
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_snapshots_keep_their_own_views_and_deleting_one_frees_only_its_space() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path()).await;
    let c = d.client().await;
    c.create(C, CHUNK, 1).await.unwrap();
    // Generation g writes the shared range [0, 256 KiB) and a range of its own; snapshot g
    // follows it. Snapshot g must read generation g in the shared range, and in every own range
    // what was written up to g.
    let shared = 256 * KIB;
    let own = |g: u64| MIB + g * 64 * KIB;
    for g in 1..=10u64 {
        c.write(C, 0, pattern(g, shared), w(1)).await.unwrap();
        c.write(C, own(g), pattern(1000 + g, 64 * KIB), w(1))
            .await
            .unwrap();
        c.snapshot(C, g * 10, 1).await.unwrap();
    }
    c.write(C, 0, pattern(99, shared), w(1)).await.unwrap();
    c.write_zeroes(C, own(1), 10 * 64 * KIB, true, w(1))
        .await
        .unwrap();

    let check = |c: Client, gens: Vec<u64>| async move {
        for g in gens {
            assert_eq!(
                read_snap(&c, g * 10, 0, shared).await,
                pattern(g, shared),
                "snapshot {g}"
            );
            for o in 1..=10u64 {
                let want = if o <= g {
                    pattern(1000 + o, 64 * KIB)
                } else {
                    Bytes::from(vec![0u8; 64 * KIB as usize])
                };
                assert_eq!(
                    read_snap(&c, g * 10, own(o), 64 * KIB).await,
                    want,
                    "snapshot {g}, range of generation {o}"
                );
            }
        }
        c
    };
    let c = check(c, (1..=10).collect()).await;
    assert_eq!(
        c.read(C, 0, shared, 0).await.unwrap().data,
        pattern(99, shared)
    );

    let list = c.snapshots(C).await.unwrap();
    assert_eq!(
        list.iter().map(|s| s.id).collect::<Vec<_>>(),
        (1..=10).map(|g| g * 10).collect::<Vec<_>>(),
        "listed oldest first"
    );
    let used_5 = list[4].used;
    assert!(used_5 >= shared, "snapshot 5 holds the shared range");

    // Snapshot 4 holds the shared range itself, so deleting 5 hands nothing of it down; its own
    // range (written before 5, unmapped after 10) lives in snapshot 10 and stays there.
    let before = allocated(dir.path());
    c.snapshot_delete(C, 50, 1).await.unwrap();
    assert!(!snap_file(dir.path(), 50).exists());
    let after = allocated(dir.path());
    assert!(
        after + used_5 <= before + 4096,
        "deleting snapshot 5 frees its {used_5} bytes: {before} -> {after}"
    );
    let c = check(c, vec![1, 2, 3, 4, 6, 7, 8, 9, 10]).await;
    assert!(matches!(
        c.snapshot_read(C, 50, 0, 4096).await,
        Err(Error::SnapshotNotFound { snapshot: 50, .. })
    ));

    // Deleting the newest hands down to 9 what only 10 held (the own ranges of generations 1-9,
    // copied by the unmap): every older snapshot still reads them, now through 9.
    c.snapshot_delete(C, 100, 1).await.unwrap();
    let c = check(c, vec![1, 2, 9]).await;

    // The chain survives a clean restart.
    drop(c);
    d.stop().await;
    let d = Daemon::start(dir.path()).await;
    let c = d.client().await;
    let c = check(c, vec![1, 2, 3, 4, 6, 7, 8, 9]).await;

    // Deleting the chunk deletes its snapshots.
    c.delete(C, 1).await.unwrap();
    let left: Vec<_> = std::fs::read_dir(chunk_dir(dir.path()))
        .unwrap()
        .flatten()
        .map(|f| f.file_name())
        .collect();
    assert!(
        left.is_empty(),
        "files left after the chunk's delete: {left:?}"
    );
    c.create(C, CHUNK, 2).await.unwrap();
    assert!(c.snapshots(C).await.unwrap().is_empty());
    assert!(matches!(
        c.snapshot_read(C, 10, 0, 4096).await,
        Err(Error::SnapshotNotFound { .. })
    ));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmap_after_a_snapshot_leaves_the_snapshot_alone() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path()).await;
    let c = d.client().await;
    c.create(C, CHUNK, 1).await.unwrap();
    let a = pattern(7, 2 * MIB);
    c.write(C, MIB, a.slice(..MIB as usize), w(1))
        .await
        .unwrap();
    c.write(C, 2 * MIB, a.slice(MIB as usize..), w(1))
        .await
        .unwrap();
    c.snapshot(C, 1, 1).await.unwrap();
    let before = c.info(C).await.unwrap().used;
    // Unmap the whole chunk, with unaligned ends inside the written range too.
    c.write_zeroes(C, 0, CHUNK, true, w(1)).await.unwrap();
    c.write_zeroes(C, MIB + 512, 4096, false, w(1))
        .await
        .unwrap();
    assert_eq!(
        c.read(C, MIB, 2 * MIB, 0).await.unwrap().data,
        Bytes::from(vec![0u8; 2 * MIB as usize])
    );
    assert!(
        c.info(C).await.unwrap().used < before,
        "the live chunk released its blocks"
    );
    assert_eq!(read_snap(&c, 1, MIB, 2 * MIB).await, a);
    assert_eq!(
        read_snap(&c, 1, 0, MIB).await,
        Bytes::from(vec![0u8; MIB as usize])
    );
    // Unwritten blocks cost the snapshot no data.
    let s = c.snapshots(C).await.unwrap();
    assert_eq!(s[0].blocks, CHUNK / 4096);
    assert!((2 * MIB..3 * MIB).contains(&s[0].used), "{}", s[0].used);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_ops_are_fenced_and_errors_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path()).await;
    let c = d.client().await;
    c.create(C, CHUNK, 5).await.unwrap();
    c.write(C, 0, pattern(1, 4096), w(5)).await.unwrap();

    let r = c.snapshot(C, 1, 4).await;
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
    assert!(c.snapshots(C).await.unwrap().is_empty(), "nothing made");
    c.snapshot(C, 1, 5).await.unwrap();
    let r = c.snapshot_delete(C, 1, 3).await;
    assert!(matches!(r, Err(Error::StaleEpoch { .. })), "{r:?}");
    assert_eq!(c.snapshots(C).await.unwrap().len(), 1, "still there");
    // A newer epoch on a snapshot fences older writers like a write does.
    c.snapshot(C, 2, 6).await.unwrap();
    let r = c.write(C, 0, pattern(2, 4096), w(5)).await;
    assert!(
        matches!(r, Err(Error::StaleEpoch { current: 6, .. })),
        "{r:?}"
    );

    let r = c.snapshot(C, 1, 6).await;
    assert!(
        matches!(r, Err(Error::SnapshotExists { snapshot: 1, chunk }) if chunk == C),
        "{r:?}"
    );
    let r = c.snapshot_read(C, 77, 0, 4096).await;
    assert!(
        matches!(r, Err(Error::SnapshotNotFound { snapshot: 77, chunk }) if chunk == C),
        "{r:?}"
    );
    let r = c.snapshot_delete(C, 77, 6).await;
    assert!(
        matches!(r, Err(Error::SnapshotNotFound { snapshot: 77, .. })),
        "{r:?}"
    );
    let missing = ChunkId::new(1, 1);
    assert!(matches!(
        c.snapshot(missing, 1, 6).await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        c.snapshots(missing).await,
        Err(Error::NotFound(_))
    ));
    // Bounds are the chunk's.
    assert!(matches!(
        c.snapshot_read(C, 1, CHUNK, 4096).await,
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        c.snapshot_read(C, 1, 100, 4096).await,
        Err(Error::Invalid(_))
    ));
    assert!(c.is_alive());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_snapshot_block_is_a_checksum_error_not_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path()).await;
    let c = d.client().await;
    c.create(C, CHUNK, 1).await.unwrap();
    c.write(C, 0, pattern(1, 64 * KIB), w(1)).await.unwrap();
    c.snapshot(C, 9, 1).await.unwrap();
    c.write(C, 0, pattern(2, 64 * KIB), w(1)).await.unwrap();
    // Flush so the copy sits in the file, then flip one bit of block 3 of the snapshot.
    c.flush(Some(C)).await.unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(snap_file(dir.path(), 9))
        .unwrap();
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, 3 * 4096 + 100).unwrap();
    byte[0] ^= 0x10;
    f.write_all_at(&byte, 3 * 4096 + 100).unwrap();
    f.sync_all().unwrap();

    let r = c.snapshot_read(C, 9, 0, 64 * KIB).await;
    assert!(
        matches!(r, Err(Error::Checksum { block: 3, .. })),
        "{:?}",
        r.map(|o| o.data.len())
    );
    // The scrub of the snapshot's own blocks finds it too (and only it).
    let found = d.store.snapshot_scrub(C, 9, 0, CHUNK).await;
    assert!(matches!(found.as_deref(), Ok([3])), "{found:?}");
    // Other blocks of the snapshot, and the live chunk, are unaffected.
    assert_eq!(
        read_snap(&c, 9, 4 * 4096, 4096).await,
        pattern(1, 64 * KIB).slice(4 * 4096..5 * 4096)
    );
    assert_eq!(
        c.read(C, 0, 64 * KIB, 0).await.unwrap().data,
        pattern(2, 64 * KIB)
    );
    assert_eq!(c.info(C).await.unwrap().bad_blocks, 0);
    d.stop().await;
}

/// The daemon process killed by `snapshot_survives_kill_9`: serves `$IRONSAN_SNAPSHOT_CHILD_DIR`
/// and prints its address. Run only by that test (it starts this binary with `--ignored`).
#[test]
#[ignore = "the daemon process of snapshot_survives_kill_9, started by it"]
fn snapshot_daemon_child() {
    let dir = PathBuf::from(std::env::var(CHILD_DIR).expect("run by snapshot_survives_kill_9"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let store = Arc::new(open_store(&dir));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        println!("ADDR {}", listener.local_addr().expect("addr"));
        server::serve(listener, store, CancellationToken::new()).await;
    });
}

struct ChildDaemon(Child);

impl Drop for ChildDaemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts this test binary as a daemon process on `dir`; returns it and its address.
fn spawn_child(dir: &Path) -> (ChildDaemon, String) {
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "snapshot_daemon_child",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_DIR, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn daemon");
    let out = child.stdout.take().expect("stdout");
    let child = ChildDaemon(child);
    for line in BufReader::new(out).lines() {
        let line = line.expect("daemon output");
        if let Some(addr) = line.strip_prefix("ADDR ") {
            return (child, addr.to_string());
        }
    }
    panic!("the daemon process exited without serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_child(dir.path());
    let c = Client::connect(&addr, &cfg()).await.unwrap();
    c.create(C, CHUNK, 1).await.unwrap();
    let a = pattern(3, 2 * MIB);
    c.write(C, 0, a.slice(..MIB as usize), w(1)).await.unwrap();
    c.write(C, MIB, a.slice(MIB as usize..), w(1))
        .await
        .unwrap();
    c.snapshot(C, 1, 1).await.unwrap();
    // A stream of overwrites is under way when the process is killed: no flush anywhere.
    let writer = {
        let c = c.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                let off = (n * 192 * KIB) % (2 * MIB - 64 * KIB);
                if c.write(C, off, pattern(100 + n, 64 * KIB), w(1))
                    .await
                    .is_err()
                {
                    return n;
                }
                n += 1;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    child.0.kill().expect("kill -9");
    let _ = child.0.wait();
    let acked = writer.await.unwrap();
    assert!(acked > 0, "no overwrite was acknowledged before the kill");
    drop(c);

    let d = Daemon::start(dir.path()).await;
    let c = d.client().await;
    assert_eq!(read_snap(&c, 1, 0, 2 * MIB).await, a, "snapshot 1 reads A");
    // The live chunk reads, block by block, A or one of the overwrites, and no checksum error.
    c.read(C, 0, 2 * MIB, 0).await.unwrap();

    // A snapshot acknowledged right before the kill, with nothing after it, survives too.
    c.snapshot(C, 2, 1).await.unwrap();
    let frozen = c.read(C, 0, 2 * MIB, 0).await.unwrap().data;
    drop(c);
    d.stop().await;
    let (mut child, addr) = spawn_child(dir.path());
    let c = Client::connect(&addr, &cfg()).await.unwrap();
    c.snapshot(C, 3, 1).await.unwrap();
    child.0.kill().expect("kill -9");
    let _ = child.0.wait();
    drop(c);
    let d = Daemon::start(dir.path()).await;
    let c = d.client().await;
    let ids: Vec<u64> = c.snapshots(C).await.unwrap().iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![1, 2, 3]);
    assert_eq!(read_snap(&c, 1, 0, 2 * MIB).await, a);
    assert_eq!(read_snap(&c, 2, 0, 2 * MIB).await, frozen);
    assert_eq!(read_snap(&c, 3, 0, 2 * MIB).await, frozen);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_falls_between_the_writes_admitted_before_and_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = open_store(dir.path());
    s.create(C, CHUNK, 1).await.unwrap();
    s.write(C, 0, pattern(1, 2 * MIB), w(1)).await.unwrap();
    // Sent in this order on the engine's queue (join! polls its futures in order, and the first
    // poll sends): a write over the range, the snapshot, another write over the same range.
    let (w1, snap, w2) = tokio::join!(
        s.write(C, 0, pattern(2, 2 * MIB), w(1)),
        s.snapshot(C, 1, 1),
        s.write(C, MIB, pattern(3, MIB), w(1)),
    );
    w1.unwrap();
    snap.unwrap();
    w2.unwrap();
    let frozen = s.snapshot_read(C, 1, 0, 2 * MIB).await.unwrap().data;
    assert_eq!(
        frozen,
        pattern(2, 2 * MIB),
        "the first write is in, the second is not"
    );
    let live = s.read(C, MIB, MIB, 0).await.unwrap().data;
    assert_eq!(live, pattern(3, MIB));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_snapshots_each_keep_their_block() {
    let dir = tempfile::tempdir().unwrap();
    let s = open_store(dir.path());
    s.create(C, CHUNK, 1).await.unwrap();
    // Block 0 changes before every snapshot; block n is written once, before snapshot n.
    for n in 1..=200u64 {
        s.write(C, 0, pattern(n, 4096), w(1)).await.unwrap();
        s.write(C, n * 4096, pattern(10_000 + n, 4096), w(1))
            .await
            .unwrap();
        s.snapshot(C, n, 1).await.unwrap();
    }
    s.write(C, 0, pattern(0, 4096), w(1)).await.unwrap();
    for n in (1..=200u64).step_by(7).chain([200]) {
        let got = s.snapshot_read(C, n, 0, 4096).await.unwrap().data;
        assert_eq!(got, pattern(n, 4096), "block 0 of snapshot {n}");
        let got = s.snapshot_read(C, n, n * 4096, 4096).await.unwrap().data;
        assert_eq!(got, pattern(10_000 + n, 4096), "block {n} of snapshot {n}");
        if n < 200 {
            let got = s
                .snapshot_read(C, n, (n + 1) * 4096, 4096)
                .await
                .unwrap()
                .data;
            assert_eq!(
                got,
                Bytes::from(vec![0u8; 4096]),
                "block {} of snapshot {n}",
                n + 1
            );
        }
    }
    let list = s.snapshots(C).await.unwrap();
    assert_eq!(list.len(), 200);
    // Each snapshot holds its generation of block 0 only: no full copies.
    assert!(list.iter().all(|x| x.blocks <= 2), "{:?}", &list[..3]);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmapping_more_than_the_copy_window_copies_all_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = open_store(dir.path());
    let id = ChunkId::new(9, 0);
    s.create(id, 32 * MIB, 1).await.unwrap();
    // 24 MiB of data around an 8 MiB hole: copied in windows of at most 8 MiB.
    for k in [0u64, 1, 3] {
        s.write(id, k * 8 * MIB, pattern(k, 8 * MIB), w(1))
            .await
            .unwrap();
    }
    s.snapshot(id, 1, 1).await.unwrap();
    s.write_zeroes(id, 0, 32 * MIB, true, w(1)).await.unwrap();
    for k in 0..4u64 {
        let want = if k == 2 {
            Bytes::from(vec![0u8; 8 * MIB as usize])
        } else {
            pattern(k, 8 * MIB)
        };
        let got = s.snapshot_read(id, 1, k * 8 * MIB, 8 * MIB).await.unwrap();
        assert!(got.data == want, "snapshot range {k}");
        let live = s.read(id, k * 8 * MIB, 8 * MIB, 0).await.unwrap().data;
        assert!(live.iter().all(|&b| b == 0), "live range {k} unmapped");
    }
    let list = s.snapshots(id).await.unwrap();
    assert_eq!(list[0].blocks, 32 * MIB / 4096);
    assert!(
        (24 * MIB..25 * MIB).contains(&list[0].used),
        "{}",
        list[0].used
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_made_snapshots_are_absent_and_a_lost_file_takes_the_older_ones() {
    let dir = tempfile::tempdir().unwrap();
    let s = open_store(dir.path());
    s.create(C, CHUNK, 1).await.unwrap();
    for n in 1..=3u64 {
        s.write(C, 0, pattern(n, 64 * KIB), w(1)).await.unwrap();
        s.snapshot(C, n, 1).await.unwrap();
    }
    s.write(C, 0, pattern(9, 64 * KIB), w(1)).await.unwrap();
    s.shutdown().await;
    drop(s);

    // A file made by a create that crashed before its record: removed at open, id free.
    std::fs::write(snap_file(dir.path(), 77), b"half made").unwrap();
    let s = open_store(dir.path());
    assert!(!snap_file(dir.path(), 77).exists());
    let ids: Vec<u64> = s.snapshots(C).await.unwrap().iter().map(|x| x.id).collect();
    assert_eq!(ids, vec![1, 2, 3]);
    s.snapshot(C, 77, 1).await.unwrap();
    s.snapshot_delete(C, 77, 1).await.unwrap();
    s.shutdown().await;
    drop(s);

    // Snapshot 2's file is lost: 1 may hold blocks through it, so both go; 3 stays whole.
    std::fs::remove_file(snap_file(dir.path(), 2)).unwrap();
    let s = open_store(dir.path());
    let ids: Vec<u64> = s.snapshots(C).await.unwrap().iter().map(|x| x.id).collect();
    assert_eq!(ids, vec![3]);
    assert!(
        !snap_file(dir.path(), 1).exists(),
        "snapshot 1's file removed"
    );
    let got = s.snapshot_read(C, 3, 0, 64 * KIB).await.unwrap().data;
    assert_eq!(got, pattern(3, 64 * KIB));
    assert!(matches!(
        s.snapshot_read(C, 1, 0, 4096).await,
        Err(Error::SnapshotNotFound { .. })
    ));
    s.shutdown().await;
}
