//! One data directory, served by one engine thread.
//!
//! The thread owns everything about the directory: its io_uring ([`super::io`]), the chunk
//! files, the in-memory checksum tables and its RocksDB ([`super::meta`]). Owning the state on
//! one thread needs no locks and lets each loop round batch its work: all requests that
//! arrived are admitted, every log record they produce goes into one RocksDB write, and every
//! disk operation into one `io_uring_enter`.
//!
//! A write goes through these steps:
//! 1. fencing (epoch) and range checks; requests overlapping an in-flight write on the same
//!    4 KiB blocks wait, so a read never sees a block whose table entry is being changed;
//! 2. if the chunk has snapshots, the blocks the newest one does not hold yet are copied into
//!    it (read, written to its file, recorded with their old checksums: see `snap.rs`);
//! 3. partial 4 KiB blocks at either end are read and verified (read-modify-write);
//! 4. the log record with the new blocks' checksums is written to RocksDB;
//! 5. the data is written (O_DIRECT where possible, `RWF_DSYNC` for FUA);
//! 6. the in-memory table is updated and the writer answered.
//!
//! The table reaches the file at checkpoints (each flush, and every few seconds). Because the
//! log record precedes the data, recovery after a crash can settle every block written since
//! the last checkpoint: it keeps whichever of the table's or the log's checksums the data on
//! disk matches, and marks the block bad if neither (a torn write that was never acknowledged).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rocksdb::WriteBatch;
use tokio::sync::oneshot;

use super::io::{Bell, Io, IoReq};
use super::layout::{self, stored_crc, CRCS_PER_PAGE};
use super::meta::{ChunkRecord, LogKind, LogRecord, Meta, SnapRecord};
use super::snap::{self, Snap, MAX_SNAPSHOTS};
use super::{DiskState, ReadOut, WriteOpts};
use crate::buf::{self, AlignedBuf};
use crate::chunk::{
    ChunkId, ChunkInfo, SnapshotInfo, WrittenRange, BLOCK, MAX_CHUNK, MAX_IO, SECTOR,
};
use crate::error::{Error, Result};

type Reply<T> = oneshot::Sender<Result<T>>;

/// A request for the engine thread.
pub(super) enum Req {
    Create {
        id: ChunkId,
        size: u64,
        epoch: u64,
        reply: Reply<ChunkInfo>,
    },
    Write {
        id: ChunkId,
        offset: u64,
        data: Bytes,
        opts: WriteOpts,
        reply: Reply<u64>,
    },
    Zero {
        id: ChunkId,
        offset: u64,
        len: u64,
        unmap: bool,
        opts: WriteOpts,
        reply: Reply<u64>,
    },
    Read {
        id: ChunkId,
        offset: u64,
        len: u64,
        epoch: u64,
        reply: Reply<ReadOut>,
    },
    Scrub {
        id: ChunkId,
        offset: u64,
        len: u64,
        reply: Reply<Vec<u64>>,
    },
    Flush {
        id: Option<ChunkId>,
        reply: Option<Reply<()>>,
    },
    Info {
        id: ChunkId,
        reply: Reply<ChunkInfo>,
    },
    Delete {
        id: ChunkId,
        epoch: u64,
        reply: Reply<()>,
    },
    Since {
        id: ChunkId,
        since: u64,
        reply: Reply<(Vec<WrittenRange>, u64)>,
    },
    Shutdown {
        reply: Reply<()>,
    },
    Snapshot {
        id: ChunkId,
        snap: u64,
        epoch: u64,
        reply: Reply<()>,
    },
    SnapshotDelete {
        id: ChunkId,
        snap: u64,
        epoch: u64,
        reply: Reply<()>,
    },
    SnapshotRead {
        id: ChunkId,
        snap: u64,
        offset: u64,
        len: u64,
        reply: Reply<ReadOut>,
    },
    SnapshotList {
        id: ChunkId,
        reply: Reply<Vec<SnapshotInfo>>,
    },
    /// Verifies the blocks snapshot `snap` holds itself in `[offset, offset+len)`.
    SnapshotScrub {
        id: ChunkId,
        snap: u64,
        offset: u64,
        len: u64,
        reply: Reply<Vec<u64>>,
    },
}

/// What the rest of the daemon may read about a directory without asking its thread.
pub(super) struct Shared {
    pub state: Mutex<DiskState>,
    pub chunks: AtomicU64,
    pub engine: &'static str,
}

impl Shared {
    pub fn state(&self) -> DiskState {
        self.state
            .lock()
            .map(|s| s.clone())
            .unwrap_or(DiskState::Failed("poisoned".into()))
    }
}

/// Handle to one directory's engine thread (or to a directory that failed to open).
pub(super) struct Disk {
    pub index: usize,
    pub path: PathBuf,
    pub shared: Arc<Shared>,
    tx: Option<Sender<Req>>,
    bell: Option<Arc<Bell>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Disk {
    /// Opens the directory, recovers its chunks and starts its thread. Returns the chunks found.
    /// A directory that cannot be opened becomes a failed disk, not an error.
    pub fn open(
        index: usize,
        path: PathBuf,
        want_ring: bool,
        log_keep: u64,
    ) -> (Self, Vec<ChunkId>) {
        match Engine::open(index, &path, want_ring, log_keep) {
            Ok((engine, shared)) => {
                let ids: Vec<ChunkId> = engine.chunks.keys().copied().collect();
                let bell = engine.bell.clone();
                let (tx, rx) = mpsc::channel();
                let thread = std::thread::Builder::new()
                    .name(format!("ironsan-disk{index}"))
                    .spawn(move || engine.run(rx));
                match thread {
                    Ok(t) => {
                        let disk = Self {
                            index,
                            path,
                            shared,
                            tx: Some(tx),
                            bell: Some(bell),
                            thread: Mutex::new(Some(t)),
                        };
                        (disk, ids)
                    }
                    Err(e) => (
                        Self::failed(index, path, format!("cannot start thread: {e}")),
                        vec![],
                    ),
                }
            }
            Err(reason) => {
                tracing::error!(dir = %path.display(), "data directory failed to open: {reason}");
                (Self::failed(index, path, reason), vec![])
            }
        }
    }

    fn failed(index: usize, path: PathBuf, reason: String) -> Self {
        set_state_gauge(
            &path.display().to_string(),
            &DiskState::Failed(reason.clone()),
        );
        Self {
            index,
            path,
            shared: Arc::new(Shared {
                state: Mutex::new(DiskState::Failed(reason)),
                chunks: AtomicU64::new(0),
                engine: "none",
            }),
            tx: None,
            bell: None,
            thread: Mutex::new(None),
        }
    }

    /// Sends a request built around a fresh reply channel and awaits the answer.
    pub async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Req) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        let req = make(reply);
        let Some(tx) = &self.tx else {
            return Err(self.failed_error());
        };
        tx.send(req).map_err(|_| Error::ShuttingDown)?;
        if let Some(b) = &self.bell {
            b.ring();
        }
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Queues a request nobody waits for (background checkpoints).
    pub fn send(&self, req: Req) {
        if let (Some(tx), Some(b)) = (&self.tx, &self.bell) {
            if tx.send(req).is_ok() {
                b.ring();
            }
        }
    }

    pub fn failed_error(&self) -> Error {
        let reason = match self.shared.state() {
            DiskState::Failed(r) => r,
            _ => "engine stopped".into(),
        };
        Error::DiskFailed {
            dir: self.path.display().to_string(),
            reason,
        }
    }

    pub fn join(&self) {
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

impl Drop for Disk {
    /// Closing the channel stops the thread once its in-flight I/O is done (no checkpoint:
    /// that is [`Req::Shutdown`]'s job; recovery covers the rest).
    fn drop(&mut self) {
        self.tx = None;
        if let Some(b) = &self.bell {
            b.ring_always();
        }
        self.join();
    }
}

fn set_state_gauge(dir: &str, state: &DiskState) {
    let v = match state {
        DiskState::Healthy => 0.0,
        DiskState::Full => 1.0,
        DiskState::Failed(_) => 2.0,
    };
    metrics::gauge!("ironsan_storage_disk_state", "dir" => dir.to_string()).set(v);
}

/// A `Vec` of slots addressed by index, reusing freed ones.
struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<usize>,
    live: usize,
}

impl<T> Slab<T> {
    fn new() -> Self {
        Self {
            items: Vec::new(),
            free: Vec::new(),
            live: 0,
        }
    }
    fn insert(&mut self, t: T) -> usize {
        self.live += 1;
        if let Some(i) = self.free.pop() {
            self.items[i] = Some(t);
            i
        } else {
            self.items.push(Some(t));
            self.items.len() - 1
        }
    }
    fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.items.get_mut(i)?.as_mut()
    }
    fn remove(&mut self, i: usize) -> Option<T> {
        let t = self.items.get_mut(i)?.take()?;
        self.free.push(i);
        self.live -= 1;
        Some(t)
    }
}

/// One chunk replica as the engine keeps it.
struct Chunk {
    file: File,
    rec: ChunkRecord,
    /// Stored checksums, one per block (see [`layout`]).
    crcs: Vec<u32>,
    /// Table pages changed since they were last written to the file.
    dirty_pages: BTreeSet<u64>,
    /// Data written since the file was last fdatasync'ed.
    unsynced: bool,
    inflight: Vec<Span>,
    waiting: VecDeque<usize>,
    /// Log positions of writes admitted but not finished: a checkpoint stops below them.
    inflight_lsns: BTreeSet<u64>,
    bad: BTreeSet<u64>,
    /// Snapshots, oldest first (see `snap.rs`).
    snaps: Vec<Snap>,
}

impl Chunk {
    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
    fn data_start(&self) -> u64 {
        layout::data_start(self.rec.size)
    }
    fn conflicts(&self, s: &Span) -> bool {
        self.inflight
            .iter()
            .any(|o| o.b0 < s.b1 && s.b0 < o.b1 && (o.write || s.write))
    }
}

/// Blocks `[b0, b1)` an op holds while in flight.
#[derive(Clone, Copy)]
struct Span {
    b0: u64,
    b1: u64,
    write: bool,
    op: usize,
}

enum Answer {
    Seq(Reply<u64>),
    Read(Reply<ReadOut>),
    Scrub(Reply<Vec<u64>>),
    Unit(Option<Reply<()>>),
}

enum Kind {
    /// Write (`data: Some`) or zero (`data: None`) of `[offset, offset+len)`.
    Write {
        offset: u64,
        len: u64,
        data: Option<Bytes>,
        unmap: bool,
        opts: WriteOpts,
        seq: u64,
        lsn: u64,
        /// Head and tail blocks read for read-modify-write: (block, buffer).
        edges: Vec<(u64, AlignedBuf)>,
        /// Buffers being written, kept alive until their completions: (first block, data).
        out: Vec<(u64, Bytes)>,
        /// New stored checksums of the span's blocks (zero for blocks left zero).
        crcs: Vec<u32>,
        /// A FUA zeroing still owes its fdatasync (issued once its writes and fallocate are
        /// done: io_uring does not order an fsync after operations submitted with it).
        sync_due: bool,
        /// Copy-on-write into the newest snapshot, done before anything else of the write.
        cow: Cow,
    },
    Read {
        offset: u64,
        len: u64,
        buf: Option<AlignedBuf>,
        version: u64,
    },
    Delete,
    /// Snapshot creation: holds the whole chunk, so it is ordered after the writes before it
    /// and before the writes after it.
    Snapshot {
        snap: u64,
    },
    /// Read of a snapshot: each run of blocks from the file the chain puts it in (`plan`: per
    /// block, where it comes from and the checksum to verify), all into `buf`. Holds its blocks
    /// like a read, so no write changes them and no snapshot create or delete reshapes the
    /// chain meanwhile. `own` (scrub): only the blocks the snapshot holds itself.
    SnapRead {
        snap: u64,
        offset: u64,
        len: u64,
        own: bool,
        buf: AlignedBuf,
        plan: Vec<(Src, u32)>,
        version: u64,
    },
    /// Snapshot deletion, holding the whole chunk like creation (no copy-on-write into the
    /// snapshot is under way when it runs). `file` is the deleted snapshot's, unlinked once
    /// the records are gone.
    SnapshotDelete {
        snap: u64,
        file: Option<File>,
    },
    /// Checkpoint: table pages, then fdatasync, then the records (one chunk, or all if None).
    Flush {
        stage: u8,
        targets: Vec<(ChunkId, u64)>,
        pages: Vec<AlignedBuf>,
    },
}

/// Where a block of a snapshot read comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Src {
    /// The live chunk (no snapshot at or after this one holds it).
    Chunk,
    /// The snapshot at this chain position.
    Snap(usize),
    /// Not read (a scrub of one snapshot's own blocks).
    Skip,
}

/// A write's copy of old blocks into the newest snapshot (see `snap.rs`).
#[derive(Default)]
struct Cow {
    /// 0: nothing (left) to copy; 1: old blocks being read; 2: being written to the snapshot.
    stage: u8,
    /// The snapshot receiving the copies.
    snap: u64,
    /// Every block to record as held, with its old stored checksum (zero blocks need no data).
    recs: Vec<(u64, u32)>,
    /// Runs read from the chunk, (first block, data); kept alive until their writes complete.
    bufs: Vec<(u64, AlignedBuf)>,
    /// Runs `[r0, r1)` not read yet: a large zeroing copies [`COW_WINDOW`] at a time.
    todo: VecDeque<(u64, u64)>,
    /// Some data was written to the snapshot's file.
    wrote: bool,
}

struct Op {
    id: ChunkId,
    kind: Kind,
    answer: Answer,
    span: Option<Span>,
    ios: u32,
    err: Option<Error>,
}

struct IoSlot {
    op: usize,
    /// Bytes the operation must transfer (0: fdatasync, fallocate).
    want: u32,
    /// For reads: the buffer being filled, handed back to the op on completion.
    read_buf: Option<AlignedBuf>,
    /// Which block a read-modify-write edge read is for.
    edge: Option<u64>,
    /// First block of a copy-on-write run being read.
    cow: Option<u64>,
    /// A read (a short one is an I/O error; a short write means a full disk).
    read: bool,
}

struct Engine {
    index: usize,
    dir: PathBuf,
    name: String,
    meta: Meta,
    io: Io,
    bell: Arc<Bell>,
    shared: Arc<Shared>,
    direct: bool,
    log_keep: u64,
    chunks: HashMap<ChunkId, Chunk>,
    ops: Slab<Op>,
    ios: Slab<IoSlot>,
    batch: WriteBatch,
    batch_sync: bool,
    batch_chunks: HashSet<ChunkId>,
    batch_waiters: Vec<usize>,
    closing: Option<Reply<()>>,
    space: Space,
    /// Files of deleted snapshots, kept open until no I/O is in flight (a queued fdatasync may
    /// still name their descriptor).
    retired: Vec<File>,
    _lock: File,
}

/// Free space below which the directory takes no more writes, so that RocksDB (and the
/// checkpoints it needs) never meet ENOSPC themselves. Checked at most every 50 ms.
struct Space {
    reserve: u64,
    free: u64,
    checked: Instant,
}

fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl Engine {
    fn open(
        index: usize,
        dir: &Path,
        want_ring: bool,
        log_keep: u64,
    ) -> Result<(Self, Arc<Shared>), String> {
        std::fs::create_dir_all(dir.join("chunks"))
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let lock =
            File::create(dir.join("LOCK")).map_err(|e| format!("cannot create LOCK: {e}"))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err("another storage daemon holds this directory (LOCK)".into());
        }
        let direct = probe_direct(dir);
        let meta = Meta::open(&dir.join("meta")).map_err(|e| format!("metadata store: {e}"))?;
        let bell = Arc::new(Bell::new().map_err(|e| format!("eventfd: {e}"))?);
        let (io, engine_name) = Io::new(want_ring, &bell);
        let name = dir.display().to_string();
        tracing::info!(dir = %name, io = engine_name, direct, "data directory open");
        let shared = Arc::new(Shared {
            state: Mutex::new(DiskState::Healthy),
            chunks: AtomicU64::new(0),
            engine: engine_name,
        });
        set_state_gauge(&name, &DiskState::Healthy);
        let mut e = Self {
            index,
            dir: dir.to_path_buf(),
            name,
            meta,
            io,
            bell,
            shared: shared.clone(),
            direct,
            log_keep: log_keep.max(16),
            chunks: HashMap::new(),
            ops: Slab::new(),
            ios: Slab::new(),
            batch: WriteBatch::default(),
            batch_sync: false,
            batch_chunks: HashSet::new(),
            batch_waiters: Vec::new(),
            closing: None,
            retired: Vec::new(),
            space: Space {
                reserve: space_reserve(dir),
                free: u64::MAX,
                checked: Instant::now() - Duration::from_secs(1),
            },
            _lock: lock,
        };
        e.recover()?;
        shared
            .chunks
            .store(e.chunks.len() as u64, Ordering::Relaxed);
        Ok((e, shared))
    }

    fn open_file(&self, path: &Path, create: bool) -> io::Result<File> {
        let mut o = OpenOptions::new();
        o.read(true).write(true);
        if create {
            o.create_new(true);
        }
        if self.direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(path)
    }

    /// Loads every chunk and settles blocks written since each chunk's last checkpoint.
    fn recover(&mut self) -> Result<(), String> {
        let bad = self.meta.bad_blocks()?;
        let mut batch = WriteBatch::default();
        let mut known = HashSet::new();
        for (id, rec) in self.meta.chunks()? {
            known.insert(id);
            let Some(rec) = rec else {
                tracing::error!(dir = %self.name, chunk = %id, "undecodable chunk record; chunk dropped");
                Meta::delete_chunk(&mut batch, id);
                continue;
            };
            match self.load_chunk(id, rec) {
                Ok(mut c) => {
                    c.bad.extend(bad.iter().filter(|b| b.0 == id).map(|b| b.1));
                    self.chunks.insert(id, c);
                }
                Err(e) => {
                    // The replica is unusable; forgetting it lets the cluster re-replicate.
                    tracing::error!(dir = %self.name, chunk = %id, "chunk lost: {e}");
                    Meta::delete_chunk(&mut batch, id);
                }
            }
        }
        let snaps = self.load_snaps(&mut batch)?;
        self.meta.write(batch, true)?;
        self.remove_orphans(&known, &snaps);
        let ids: Vec<ChunkId> = self.chunks.keys().copied().collect();
        for id in ids {
            self.replay(id)?;
        }
        self.checkpoint_sync(None)
    }

    fn load_chunk(&self, id: ChunkId, rec: ChunkRecord) -> Result<Chunk, String> {
        let path = layout::chunk_path(&self.dir, id);
        let file = self
            .open_file(&path, false)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut head = AlignedBuf::zeroed(BLOCK as usize);
        file.read_exact_at(head.as_mut_slice(), 0)
            .map_err(|e| format!("reading header: {e}"))?;
        layout::check_header(head.as_slice(), id, rec.size)?;
        let mut table = AlignedBuf::zeroed(layout::table_bytes(rec.size) as usize);
        file.read_exact_at(table.as_mut_slice(), layout::HEADER)
            .map_err(|e| format!("reading checksums: {e}"))?;
        let crcs = table
            .as_slice()
            .chunks_exact(4)
            .take(layout::blocks(rec.size) as usize)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(new_chunk(file, rec, crcs))
    }

    /// Chunk files without a record are leftovers of an interrupted create or delete.
    fn remove_orphans(&self, known: &HashSet<ChunkId>, snaps: &HashSet<(ChunkId, u64)>) {
        let Ok(vols) = std::fs::read_dir(self.dir.join("chunks")) else {
            return;
        };
        for vol in vols.flatten() {
            let Some(volume) = vol
                .file_name()
                .to_str()
                .and_then(|s| u64::from_str_radix(s, 16).ok())
            else {
                continue;
            };
            let Ok(files) = std::fs::read_dir(vol.path()) else {
                continue;
            };
            for f in files.flatten() {
                let name = f.file_name();
                // Snapshot files without a record: an interrupted snapshot create or delete.
                if let Some((index, snap)) = name.to_str().and_then(snap::parse_snap_name) {
                    if !snaps.contains(&(ChunkId::new(volume, index), snap)) {
                        tracing::warn!(dir = %self.name, file = %f.path().display(), "removing orphan snapshot file");
                        let _ = std::fs::remove_file(f.path());
                    }
                    continue;
                }
                let Some(index) = name
                    .to_str()
                    .and_then(|s| s.strip_suffix(".chunk"))
                    .and_then(|s| u32::from_str_radix(s, 16).ok())
                else {
                    continue;
                };
                if !known.contains(&ChunkId::new(volume, index)) {
                    tracing::warn!(dir = %self.name, file = %f.path().display(), "removing orphan chunk file");
                    let _ = std::fs::remove_file(f.path());
                }
            }
        }
    }

    /// Settles the blocks of every log record past the checkpoint (see the module docs).
    fn replay(&mut self, id: ChunkId) -> Result<(), String> {
        let Some(c) = self.chunks.get(&id) else {
            return Ok(());
        };
        if c.rec.lsn <= c.rec.checkpoint_lsn {
            return Ok(());
        }
        let records = self.meta.log(id, c.rec.checkpoint_lsn + 1)?;
        // Every checksum a block may legitimately hold now: the table's and each record's.
        let mut candidates: HashMap<u64, Vec<u32>> = HashMap::new();
        for (_, rec) in &records {
            let Some(rec) = rec else { continue };
            let (b0, b1) = block_span(rec.offset, rec.len);
            let given: HashMap<u64, u32> = rec.crcs.iter().copied().collect();
            for b in b0..b1 {
                candidates
                    .entry(b)
                    .or_default()
                    .push(given.get(&b).copied().unwrap_or(0));
            }
        }
        let c = self.chunks.get_mut(&id).ok_or("chunk vanished")?;
        let start = c.data_start();
        let mut block = AlignedBuf::zeroed(BLOCK as usize);
        let (mut fixed, mut torn) = (0u64, 0u64);
        let mut blocks: Vec<u64> = candidates.keys().copied().collect();
        blocks.sort_unstable();
        for b in blocks {
            if b >= c.crcs.len() as u64 {
                continue;
            }
            c.file
                .read_exact_at(block.as_mut_slice(), start + b * BLOCK)
                .map_err(|e| format!("replay read: {e}"))?;
            let actual = stored_crc(block.as_slice());
            if actual == c.crcs[b as usize] {
                continue;
            }
            if candidates.get(&b).is_some_and(|v| v.contains(&actual)) {
                c.crcs[b as usize] = actual;
                c.dirty_pages.insert(b / CRCS_PER_PAGE);
                fixed += 1;
            } else {
                tracing::warn!(dir = %self.name, chunk = %id, block = b, "torn block after crash: marked bad");
                c.bad.insert(b);
                torn += 1;
            }
        }
        c.unsynced = true;
        if fixed + torn > 0 {
            tracing::info!(dir = %self.name, chunk = %id, records = records.len(), fixed, torn, "write log replayed");
        }
        let mut batch = WriteBatch::default();
        for &b in &c.bad {
            Meta::put_bad(&mut batch, id, b);
        }
        self.meta.write(batch, false)
    }

    /// Synchronous checkpoint used at open: tables, fdatasync, records.
    fn checkpoint_sync(&mut self, only: Option<ChunkId>) -> Result<(), String> {
        let mut batch = WriteBatch::default();
        for (id, c) in self.chunks.iter_mut() {
            if only.is_some_and(|o| o != *id) || (!c.unsynced && c.dirty_pages.is_empty()) {
                continue;
            }
            for p in std::mem::take(&mut c.dirty_pages) {
                let page = table_page(&c.crcs, p);
                c.file
                    .write_all_at(page.as_slice(), layout::table_page_offset(p))
                    .map_err(|e| format!("writing checksums: {e}"))?;
            }
            c.file.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
            for s in c.snaps.iter_mut().filter(|s| s.unsynced) {
                s.file
                    .sync_data()
                    .map_err(|e| format!("fdatasync of snapshot {}: {e}", s.id))?;
                s.unsynced = false;
            }
            c.unsynced = false;
            c.rec.checkpoint_lsn = c.rec.lsn;
            Meta::put_chunk(&mut batch, *id, &c.rec);
        }
        self.meta.write(batch, true)
    }

    // ---- the loop ------------------------------------------------------------------------

    fn run(mut self, rx: Receiver<Req>) {
        let mut done = Vec::with_capacity(64);
        let mut disconnected = false;
        loop {
            loop {
                match rx.try_recv() {
                    Ok(req) => self.admit(req),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
            done.clear();
            self.io.reap(&mut done);
            for &(token, res) in &done {
                self.complete(token as usize, res);
            }
            self.commit_batch();
            if self.ios.live == 0 && !self.retired.is_empty() {
                self.retired.clear();
            }
            if self.ops.live == 0 && self.ios.live == 0 {
                if let Some(reply) = self.closing.take() {
                    let r = self
                        .checkpoint_sync(None)
                        .map_err(|reason| self.meta_error(reason));
                    let _ = reply.send(r);
                    return;
                }
                if disconnected {
                    return;
                }
            }
            if self.io.has_ready() || !done.is_empty() {
                if let Err(e) = self.io.submit(false) {
                    self.ring_broken(e);
                }
                continue;
            }
            if self.ios.live == 0 {
                // Nothing in the kernel: sleep on the channel (a plain futex wake-up).
                if let Err(e) = self.io.submit(false) {
                    self.ring_broken(e);
                }
                match rx.recv() {
                    Ok(req) => self.admit(req),
                    Err(_) => disconnected = true,
                }
                continue;
            }
            self.bell.asleep.store(true, Ordering::SeqCst);
            // A request sent just before `asleep` was set rang no bell: look once more.
            let r = match rx.try_recv() {
                Ok(req) => {
                    self.bell.asleep.store(false, Ordering::SeqCst);
                    self.admit(req);
                    self.commit_batch();
                    self.io.submit(false)
                }
                Err(_) => self.io.submit(self.io.is_ring()),
            };
            self.bell.asleep.store(false, Ordering::SeqCst);
            if let Err(e) = r {
                self.ring_broken(e);
            }
        }
    }

    /// io_uring_enter itself failed: nothing more can be done on this directory.
    fn ring_broken(&mut self, e: io::Error) {
        tracing::error!(dir = %self.name, "io_uring_enter failed: {e}");
        self.set_state(DiskState::Failed(format!("io_uring: {e}")));
        // In-flight buffers are leaked: the kernel may still write into them.
        for slot in self.ios.items.iter_mut().filter_map(|s| s.take()) {
            std::mem::forget(slot);
        }
        self.ios = Slab::new();
        let live: Vec<usize> = (0..self.ops.items.len())
            .filter(|&i| self.ops.items[i].is_some())
            .collect();
        for i in live {
            if let Some(op) = self.ops.get_mut(i) {
                op.ios = 0;
            }
            let err = self.disk_failed();
            self.finish(i, Err(err));
        }
    }

    fn set_state(&self, state: DiskState) {
        if let Ok(mut s) = self.shared.state.lock() {
            if *s != state && !matches!(*s, DiskState::Failed(_)) {
                match &state {
                    DiskState::Failed(r) => {
                        tracing::error!(dir = %self.name, "data directory failed: {r}")
                    }
                    DiskState::Full => tracing::warn!(dir = %self.name, "data directory full"),
                    DiskState::Healthy => {
                        tracing::info!(dir = %self.name, "data directory healthy again")
                    }
                }
                set_state_gauge(&self.name, &state);
                *s = state;
            }
        }
    }

    fn disk_failed(&self) -> Error {
        let reason = match self.shared.state() {
            DiskState::Failed(r) => r,
            _ => "failed".into(),
        };
        Error::DiskFailed {
            dir: self.name.clone(),
            reason,
        }
    }

    /// Turns an errno from this directory into the client's error, updating the disk's state.
    fn io_error(&self, errno: i32) -> Error {
        let e = io::Error::from_raw_os_error(errno);
        metrics::counter!("ironsan_storage_io_errors_total", "dir" => self.name.clone())
            .increment(1);
        match errno {
            libc::ENOSPC | libc::EDQUOT => {
                self.set_state(DiskState::Full);
                Error::NoSpace {
                    dir: self.name.clone(),
                }
            }
            libc::EIO | libc::EROFS | libc::ENODEV | libc::ENXIO | libc::EUCLEAN | libc::EBADF => {
                self.set_state(DiskState::Failed(e.to_string()));
                Error::DiskFailed {
                    dir: self.name.clone(),
                    reason: e.to_string(),
                }
            }
            _ => Error::Io {
                dir: self.name.clone(),
                source: e,
            },
        }
    }

    /// Like [`Self::has_room`], and counts `bytes` as used until the next look at the
    /// filesystem (overwrites are counted too: the estimate errs on the full side).
    fn take_room(&mut self, bytes: u64) -> bool {
        let ok = self.has_room();
        self.space.free = self.space.free.saturating_sub(bytes);
        ok
    }

    /// Whether the directory has room for more data; moves it between Healthy and Full.
    fn has_room(&mut self) -> bool {
        if self.space.checked.elapsed() >= Duration::from_millis(50) {
            self.space.free = free_bytes(&self.dir);
            self.space.checked = Instant::now();
        }
        let state = self.shared.state();
        if self.space.free < self.space.reserve {
            self.set_state(DiskState::Full);
            return false;
        }
        if state == DiskState::Full
            && self.space.free >= self.space.reserve + self.space.reserve / 2
            && !self.meta.is_broken()
        {
            self.set_state(DiskState::Healthy);
        }
        true
    }

    fn meta_error(&self, reason: String) -> Error {
        if reason.contains("No space") {
            self.set_state(DiskState::Full);
            return Error::NoSpace {
                dir: self.name.clone(),
            };
        }
        self.set_state(DiskState::Failed(format!("metadata store: {reason}")));
        Error::Meta {
            dir: self.name.clone(),
            reason,
        }
    }

    // ---- admission -----------------------------------------------------------------------

    fn admit(&mut self, req: Req) {
        if self.closing.is_some() {
            return refuse(req, Error::ShuttingDown);
        }
        if let DiskState::Failed(_) = self.shared.state() {
            if !matches!(req, Req::Shutdown { .. }) {
                let err = self.disk_failed();
                return refuse(req, err);
            }
        }
        match req {
            Req::Create {
                id,
                size,
                epoch,
                reply,
            } => {
                let _ = reply.send(self.create(id, size, epoch));
            }
            Req::Info { id, reply } => {
                let _ = reply.send(self.info(id));
            }
            Req::Since { id, since, reply } => {
                self.commit_batch();
                let _ = reply.send(self.since(id, since));
            }
            Req::Shutdown { reply } => {
                self.closing = Some(reply);
                let queued: Vec<usize> = self
                    .chunks
                    .values_mut()
                    .flat_map(|c| c.waiting.drain(..))
                    .collect();
                for op in queued {
                    self.finish(op, Err(Error::ShuttingDown));
                }
            }
            Req::Flush { id, reply } => {
                let op = Op {
                    id: id.unwrap_or(ChunkId::new(0, 0)),
                    kind: Kind::Flush {
                        stage: 0,
                        targets: Vec::new(),
                        pages: Vec::new(),
                    },
                    answer: Answer::Unit(reply),
                    span: None,
                    ios: 0,
                    err: None,
                };
                if let Some(id) = id {
                    if !self.chunks.contains_key(&id) {
                        return finish_answer(op.answer, Err(Error::NotFound(id)));
                    }
                }
                let i = self.ops.insert(op);
                self.flush_start(i, id);
            }
            Req::Write { ref data, .. } if !self.take_room(data.len() as u64) => {
                refuse(
                    req,
                    Error::NoSpace {
                        dir: self.name.clone(),
                    },
                );
            }
            Req::Zero {
                unmap: false, len, ..
            } if !self.take_room(len) => {
                refuse(
                    req,
                    Error::NoSpace {
                        dir: self.name.clone(),
                    },
                );
            }
            Req::Write {
                id,
                offset,
                data,
                opts,
                reply,
            } => {
                let len = data.len() as u64;
                self.admit_io(id, offset, len, Some(data), false, opts, Answer::Seq(reply));
            }
            Req::Zero {
                id,
                offset,
                len,
                unmap,
                opts,
                reply,
            } => {
                self.admit_io(id, offset, len, None, unmap, opts, Answer::Seq(reply));
            }
            Req::Read {
                id,
                offset,
                len,
                epoch,
                reply,
            } => {
                let opts = WriteOpts {
                    epoch,
                    ..Default::default()
                };
                self.admit_read(id, offset, len, opts, Answer::Read(reply));
            }
            Req::Scrub {
                id,
                offset,
                len,
                reply,
            } => {
                self.admit_read(id, offset, len, WriteOpts::default(), Answer::Scrub(reply));
            }
            Req::Snapshot {
                id,
                snap,
                epoch,
                reply,
            } => {
                self.admit_whole_chunk(id, epoch, Kind::Snapshot { snap }, Some(reply));
            }
            Req::SnapshotDelete {
                id,
                snap,
                epoch,
                reply,
            } => {
                self.admit_whole_chunk(
                    id,
                    epoch,
                    Kind::SnapshotDelete { snap, file: None },
                    Some(reply),
                );
            }
            Req::SnapshotRead {
                id,
                snap,
                offset,
                len,
                reply,
            } => self.admit_snap_read(id, snap, offset, len, false, Answer::Read(reply)),
            Req::SnapshotScrub {
                id,
                snap,
                offset,
                len,
                reply,
            } => self.admit_snap_read(id, snap, offset, len, true, Answer::Scrub(reply)),
            Req::SnapshotList { id, reply } => {
                let _ = reply.send(self.snapshot_list(id));
            }
            Req::Delete { id, epoch, reply } => {
                let r = self.fence(id, epoch);
                let size = match r {
                    Ok(()) => self.chunks.get(&id).map_or(0, |c| c.rec.size),
                    Err(e) => return finish_answer(Answer::Unit(Some(reply)), Err(e)),
                };
                let op = Op {
                    id,
                    kind: Kind::Delete,
                    answer: Answer::Unit(Some(reply)),
                    span: Some(Span {
                        b0: 0,
                        b1: layout::blocks(size).max(1),
                        write: true,
                        op: 0,
                    }),
                    ios: 0,
                    err: None,
                };
                self.enqueue(op);
            }
        }
    }

    /// Queues a snapshot read (or, with `own`, a scrub of the snapshot's own blocks).
    fn admit_snap_read(
        &mut self,
        id: ChunkId,
        snap: u64,
        offset: u64,
        len: u64,
        own: bool,
        answer: Answer,
    ) {
        if let Err(e) = self.check_range(id, offset, len, MAX_IO) {
            return finish_answer(answer, Err(e));
        }
        let (b0, b1) = block_span(offset, len);
        self.enqueue(Op {
            id,
            kind: Kind::SnapRead {
                snap,
                offset,
                len,
                own,
                buf: AlignedBuf::zeroed(0),
                plan: Vec::new(),
                version: 0,
            },
            answer,
            span: Some(Span {
                b0,
                b1,
                write: false,
                op: 0,
            }),
            ios: 0,
            err: None,
        });
    }

    /// Fences and queues an op that holds the whole chunk (snapshot create and delete): it
    /// starts once every op admitted before it on the chunk is done, and ops admitted after it
    /// wait for it.
    fn admit_whole_chunk(&mut self, id: ChunkId, epoch: u64, kind: Kind, reply: Option<Reply<()>>) {
        let answer = Answer::Unit(reply);
        if let Err(e) = self.fence(id, epoch) {
            return finish_answer(answer, Err(e));
        }
        let size = self.chunks.get(&id).map_or(0, |c| c.rec.size);
        self.enqueue(Op {
            id,
            kind,
            answer,
            span: Some(Span {
                b0: 0,
                b1: layout::blocks(size).max(1),
                write: true,
                op: 0,
            }),
            ios: 0,
            err: None,
        });
    }

    /// Epoch check of a request on `id`; a newer epoch is queued for a synced record, which
    /// every mutation of this request waits for.
    fn fence(&mut self, id: ChunkId, epoch: u64) -> Result<()> {
        let c = self.chunks.get_mut(&id).ok_or(Error::NotFound(id))?;
        if epoch < c.rec.epoch {
            metrics::counter!("ironsan_storage_stale_epoch_total").increment(1);
            return Err(Error::StaleEpoch {
                chunk: id,
                got: epoch,
                current: c.rec.epoch,
            });
        }
        if epoch > c.rec.epoch {
            tracing::info!(dir = %self.name, chunk = %id, from = c.rec.epoch, to = epoch, "new epoch");
            c.rec.epoch = epoch;
            self.batch_chunks.insert(id);
            self.batch_sync = true;
        }
        Ok(())
    }

    fn check_range(&self, id: ChunkId, offset: u64, len: u64, max: u64) -> Result<()> {
        let c = self.chunks.get(&id).ok_or(Error::NotFound(id))?;
        if !offset.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR) || len == 0 {
            return Err(Error::Invalid(format!(
                "offset {offset} and length {len} must be non-zero multiples of {SECTOR}"
            )));
        }
        if len > max {
            return Err(Error::Invalid(format!(
                "length {len} exceeds the limit of {max} bytes"
            )));
        }
        if offset.checked_add(len).is_none_or(|end| end > c.rec.size) {
            return Err(Error::OutOfRange {
                chunk: id,
                offset,
                len,
                size: c.rec.size,
            });
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn admit_io(
        &mut self,
        id: ChunkId,
        offset: u64,
        len: u64,
        data: Option<Bytes>,
        unmap: bool,
        opts: WriteOpts,
        answer: Answer,
    ) {
        let max = if data.is_some() { MAX_IO } else { MAX_CHUNK };
        if let Err(e) = self
            .check_range(id, offset, len, max)
            .and_then(|()| self.fence(id, opts.epoch))
        {
            return finish_answer(answer, Err(e));
        }
        let (b0, b1) = block_span(offset, len);
        let op = Op {
            id,
            kind: Kind::Write {
                offset,
                len,
                data,
                unmap,
                opts,
                seq: 0,
                lsn: 0,
                edges: Vec::new(),
                out: Vec::new(),
                crcs: Vec::new(),
                sync_due: false,
                cow: Cow::default(),
            },
            answer,
            span: Some(Span {
                b0,
                b1,
                write: true,
                op: 0,
            }),
            ios: 0,
            err: None,
        };
        self.enqueue(op);
    }

    fn admit_read(&mut self, id: ChunkId, offset: u64, len: u64, opts: WriteOpts, answer: Answer) {
        let fenced = if opts.epoch == 0 {
            Ok(())
        } else {
            self.fence(id, opts.epoch)
        };
        if let Err(e) = self.check_range(id, offset, len, MAX_IO).and(fenced) {
            return finish_answer(answer, Err(e));
        }
        let (b0, b1) = block_span(offset, len);
        let op = Op {
            id,
            kind: Kind::Read {
                offset,
                len,
                buf: None,
                version: 0,
            },
            answer,
            span: Some(Span {
                b0,
                b1,
                write: false,
                op: 0,
            }),
            ios: 0,
            err: None,
        };
        self.enqueue(op);
    }

    /// Starts `op` now, or parks it behind conflicting (or earlier parked) ops on its chunk.
    fn enqueue(&mut self, op: Op) {
        let id = op.id;
        let i = self.ops.insert(op);
        let Some(op) = self.ops.get_mut(i) else {
            return;
        };
        let Some(span) = op.span.as_mut() else { return };
        span.op = i;
        let span = *span;
        let Some(c) = self.chunks.get_mut(&id) else {
            return self.finish(i, Err(Error::NotFound(id)));
        };
        if !c.waiting.is_empty() || c.conflicts(&span) {
            c.waiting.push_back(i);
            return;
        }
        c.inflight.push(span);
        self.start(i);
    }

    /// Lets parked ops of `id` run, in order, as far as none conflicts.
    fn unpark(&mut self, id: ChunkId) {
        loop {
            let Some(c) = self.chunks.get_mut(&id) else {
                return;
            };
            let Some(&next) = c.waiting.front() else {
                return;
            };
            let Some(span) = self.ops.get_mut(next).and_then(|o| o.span) else {
                c.waiting.pop_front();
                continue;
            };
            if c.conflicts(&span) {
                return;
            }
            c.waiting.pop_front();
            c.inflight.push(span);
            self.start(next);
        }
    }

    fn start(&mut self, i: usize) {
        let Some(op) = self.ops.get_mut(i) else {
            return;
        };
        let id = op.id;
        match &mut op.kind {
            Kind::Delete => {
                if self.chunks.contains_key(&id) {
                    Meta::delete_chunk(&mut self.batch, id);
                    self.batch_chunks.remove(&id);
                    self.batch_sync = true;
                    self.batch_waiters.push(i);
                } else {
                    self.finish(i, Err(Error::NotFound(id)));
                }
            }
            Kind::Read {
                offset,
                len,
                version,
                ..
            } => {
                let (offset, len) = (*offset, *len);
                let Some(c) = self.chunks.get(&id) else {
                    return self.finish(i, Err(Error::NotFound(id)));
                };
                *version = c.rec.version;
                let (b0, b1) = block_span(offset, len);
                let mut b = AlignedBuf::zeroed(((b1 - b0) * BLOCK) as usize);
                let req = IoReq::Read {
                    fd: c.fd(),
                    ptr: b.as_mut_ptr(),
                    len: b.len() as u32,
                    offset: c.data_start() + b0 * BLOCK,
                };
                self.submit_io(i, req, Some(b), None);
            }
            Kind::SnapRead { .. } => self.snapshot_read_start(i),
            Kind::SnapshotDelete { snap, .. } => {
                let snap = *snap;
                match self.snapshot_delete(id, snap) {
                    Ok(file) => {
                        if let Some(Op {
                            kind: Kind::SnapshotDelete { file: f, .. },
                            ..
                        }) = self.ops.get_mut(i)
                        {
                            *f = Some(file);
                        }
                        self.batch_sync = true;
                        self.batch_waiters.push(i);
                    }
                    Err(e) => self.finish(i, Err(e)),
                }
            }
            Kind::Snapshot { snap } => {
                let snap = *snap;
                match self.snapshot_create(id, snap) {
                    Ok(()) => {
                        self.batch_sync = true;
                        self.batch_waiters.push(i);
                    }
                    Err(e) => self.finish(i, Err(e)),
                }
            }
            Kind::Write { offset, len, .. } => {
                let (b0, b1) = block_span(*offset, *len);
                // Before anything of the write reaches the chunk, the newest snapshot gets the
                // old contents of the blocks it does not hold yet.
                match self.cow_start(i, id, b0, b1) {
                    Ok(true) => {}
                    Ok(false) => self.start_edges(i),
                    Err(e) => self.finish(i, Err(e)),
                }
            }
            Kind::Flush { .. } => {}
        }
    }

    /// Reads the partly covered blocks at the ends of write `i` (read-modify-write), or goes
    /// straight to [`Self::prepare_write`] when there are none.
    fn start_edges(&mut self, i: usize) {
        let Some(op) = self.ops.get_mut(i) else {
            return;
        };
        let id = op.id;
        let Kind::Write { offset, len, .. } = &op.kind else {
            return;
        };
        let (offset, len) = (*offset, *len);
        let (b0, b1) = block_span(offset, len);
        let Some(c) = self.chunks.get(&id) else {
            return self.finish(i, Err(Error::NotFound(id)));
        };
        let (fd, start) = (c.fd(), c.data_start());
        let end = offset + len;
        let mut edges = Vec::new();
        if offset % BLOCK != 0 {
            edges.push(b0);
        }
        if end % BLOCK != 0 && (b1 - 1 != b0 || edges.is_empty()) {
            edges.push(b1 - 1);
        }
        // Only partly covered blocks need their old contents (for data and zeroes alike).
        if edges.is_empty() {
            return self.prepare_write(i);
        }
        for b in edges {
            let mut buf = AlignedBuf::zeroed(BLOCK as usize);
            let req = IoReq::Read {
                fd,
                ptr: buf.as_mut_ptr(),
                len: BLOCK as u32,
                offset: start + b * BLOCK,
            };
            self.submit_io(i, req, Some(buf), Some(b));
        }
    }

    fn submit_io(
        &mut self,
        op: usize,
        req: IoReq,
        read_buf: Option<AlignedBuf>,
        edge: Option<u64>,
    ) {
        let want = match req {
            IoReq::Read { len, .. } | IoReq::Write { len, .. } => len,
            _ => 0,
        };
        let slot = self.ios.insert(IoSlot {
            op,
            want,
            read: matches!(req, IoReq::Read { .. }),
            read_buf,
            edge,
            cow: None,
        });
        self.push_io(op, slot, req);
    }

    /// Queues the read of a copy-on-write run starting at block `r0` into `buf`.
    fn submit_cow_read(&mut self, op: usize, req: IoReq, buf: AlignedBuf, r0: u64) {
        let want = match req {
            IoReq::Read { len, .. } => len,
            _ => 0,
        };
        let slot = self.ios.insert(IoSlot {
            op,
            want,
            read_buf: Some(buf),
            edge: None,
            cow: Some(r0),
            read: true,
        });
        self.push_io(op, slot, req);
    }

    fn push_io(&mut self, op: usize, slot: usize, req: IoReq) {
        if let Some(o) = self.ops.get_mut(op) {
            o.ios += 1;
        }
        if let Err(e) = self.io.push(slot as u64, req) {
            self.ios.remove(slot);
            if let Some(o) = self.ops.get_mut(op) {
                o.ios -= 1;
            }
            let err = self.io_error(errno_of(&e));
            self.fail_op(op, err);
        }
    }

    /// Records the first error of an op; it is answered once its in-flight I/O has drained.
    fn fail_op(&mut self, i: usize, err: Error) {
        let Some(op) = self.ops.get_mut(i) else {
            return;
        };
        if op.err.is_none() {
            op.err = Some(err);
        }
        if op.ios == 0 {
            let err = op.err.take().unwrap_or(Error::ShuttingDown);
            self.finish(i, Err(err));
        }
    }

    /// Builds the data to write, its checksums and its log record; queues the record.
    fn prepare_write(&mut self, i: usize) {
        let Some(op) = self.ops.get_mut(i) else {
            return;
        };
        let id = op.id;
        let Some(c) = self.chunks.get_mut(&id) else {
            return self.finish(i, Err(Error::NotFound(id)));
        };
        let Kind::Write {
            offset,
            len,
            data,
            opts,
            seq,
            lsn,
            edges,
            out,
            crcs,
            ..
        } = &mut op.kind
        else {
            return;
        };
        let (b0, b1) = block_span(*offset, *len);
        let head = (*offset - b0 * BLOCK) as usize;
        let mut record_crcs = Vec::new();
        match data {
            Some(d) => {
                let whole = head == 0 && d.len() as u64 == (b1 - b0) * BLOCK;
                let buf: Bytes = if whole && buf::is_aligned(d) {
                    d.clone()
                } else {
                    let mut m = AlignedBuf::zeroed(((b1 - b0) * BLOCK) as usize);
                    for (b, e) in edges.iter() {
                        let at = ((b - b0) * BLOCK) as usize;
                        m.as_mut_slice()[at..at + BLOCK as usize].copy_from_slice(e.as_slice());
                    }
                    m.as_mut_slice()[head..head + d.len()].copy_from_slice(d);
                    m.freeze()
                };
                crcs.extend(buf.chunks(BLOCK as usize).map(stored_crc));
                record_crcs.extend(crcs.iter().enumerate().map(|(k, &v)| (b0 + k as u64, v)));
                out.push((b0, buf));
            }
            None => {
                crcs.resize((b1 - b0) as usize, 0);
                let end = *offset + *len;
                for (b, e) in edges.iter_mut() {
                    let s = e.as_mut_slice();
                    let from = ((*offset).max(*b * BLOCK) - *b * BLOCK) as usize;
                    let to = (end.min((*b + 1) * BLOCK) - *b * BLOCK) as usize;
                    s[from..to].fill(0);
                    let crc = stored_crc(s);
                    crcs[(*b - b0) as usize] = crc;
                    if crc != 0 {
                        record_crcs.push((*b, crc));
                    }
                }
                for (b, e) in std::mem::take(edges) {
                    out.push((b, e.freeze()));
                }
            }
        }
        c.rec.lsn += 1;
        *lsn = c.rec.lsn;
        *seq = if opts.seq == 0 {
            c.rec.version + 1
        } else {
            opts.seq
        };
        c.rec.version = c.rec.version.max(*seq);
        c.inflight_lsns.insert(*lsn);
        let rec = LogRecord {
            kind: if data.is_some() {
                LogKind::Write
            } else {
                LogKind::Zero
            },
            seq: *seq,
            epoch: opts.epoch,
            offset: *offset,
            len: *len,
            crcs: record_crcs,
        };
        Meta::put_log(&mut self.batch, id, *lsn, &rec);
        self.batch_chunks.insert(id);
        self.batch_sync |= opts.fua;
        self.batch_waiters.push(i);
    }

    /// Writes the queued records in one RocksDB batch, then lets their ops continue.
    fn commit_batch(&mut self) {
        if self.batch_chunks.is_empty() && self.batch_waiters.is_empty() && self.batch.is_empty() {
            return;
        }
        let mut batch = std::mem::take(&mut self.batch);
        for id in self.batch_chunks.drain() {
            if let Some(c) = self.chunks.get(&id) {
                Meta::put_chunk(&mut batch, id, &c.rec);
            }
        }
        let sync = std::mem::take(&mut self.batch_sync);
        let waiters = std::mem::take(&mut self.batch_waiters);
        let result = self.meta.write(batch, sync).map_err(|e| self.meta_error(e));
        for i in waiters {
            match &result {
                Ok(()) => self.after_batch(i),
                Err(e) => {
                    let e = clone_error(e);
                    self.fail_op(i, e);
                }
            }
        }
    }

    fn after_batch(&mut self, i: usize) {
        let Some(op) = self.ops.get_mut(i) else {
            return;
        };
        let id = op.id;
        match &mut op.kind {
            Kind::Delete => {
                if let Some(c) = self.chunks.remove(&id) {
                    let path = layout::chunk_path(&self.dir, id);
                    if let Err(e) = std::fs::remove_file(&path) {
                        tracing::warn!(file = %path.display(), "cannot remove deleted chunk file: {e}");
                    }
                    for s in &c.snaps {
                        let path = snap::snap_path(&self.dir, id, s.id);
                        if let Err(e) = std::fs::remove_file(&path) {
                            tracing::warn!(file = %path.display(), "cannot remove a deleted chunk's snapshot file: {e}");
                        }
                    }
                    self.retired.extend(c.snaps.into_iter().map(|s| s.file));
                    let waiting: Vec<usize> = c.waiting.into_iter().collect();
                    self.shared.chunks.fetch_sub(1, Ordering::Relaxed);
                    // Space was freed: look at the filesystem again on the next write.
                    self.space.checked = Instant::now() - Duration::from_secs(1);
                    self.finish(i, Ok(Done::Unit));
                    for w in waiting {
                        self.finish(w, Err(Error::NotFound(id)));
                    }
                } else {
                    self.finish(i, Err(Error::NotFound(id)));
                }
            }
            Kind::Write {
                offset,
                len,
                data,
                unmap,
                opts,
                out,
                ..
            } => {
                let Some(c) = self.chunks.get(&id) else {
                    return self.finish(i, Err(Error::NotFound(id)));
                };
                let (fd, start) = (c.fd(), c.data_start());
                let mut reqs = Vec::new();
                for (b, buf) in out.iter() {
                    reqs.push(IoReq::Write {
                        fd,
                        ptr: buf.as_ptr(),
                        len: buf.len() as u32,
                        offset: start + b * BLOCK,
                        dsync: opts.fua,
                    });
                }
                if data.is_none() {
                    // Whole blocks inside the range: punch (unmap) or zero them in place.
                    let first = offset.div_ceil(BLOCK);
                    let last = (*offset + *len) / BLOCK;
                    if last > first {
                        reqs.push(IoReq::Zero {
                            fd,
                            offset: start + first * BLOCK,
                            len: (last - first) * BLOCK,
                            punch: *unmap,
                        });
                    }
                    if let (true, Some(op)) = (opts.fua, self.ops.get_mut(i)) {
                        if let Kind::Write { sync_due, .. } = &mut op.kind {
                            *sync_due = true;
                        }
                    }
                }
                if reqs.is_empty() {
                    return self.write_done(i);
                }
                for r in reqs {
                    self.submit_io(i, r, None, None);
                }
            }
            Kind::Flush { stage, .. } if *stage == 2 => self.finish(i, Ok(Done::Unit)),
            Kind::Snapshot { .. } => self.finish(i, Ok(Done::Unit)),
            Kind::SnapshotDelete { snap, file } => {
                let (snap, file) = (*snap, file.take());
                let path = snap::snap_path(&self.dir, id, snap);
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(file = %path.display(), "cannot remove deleted snapshot file: {e}");
                }
                self.retired.extend(file);
                // Space was freed: look at the filesystem again on the next write.
                self.space.checked = Instant::now() - Duration::from_secs(1);
                self.finish(i, Ok(Done::Unit));
            }
            _ => {}
        }
    }

    // ---- completions ---------------------------------------------------------------------

    fn complete(&mut self, token: usize, res: i32) {
        let Some(slot) = self.ios.remove(token) else {
            return;
        };
        let i = slot.op;
        let Some(op) = self.ops.get_mut(i) else {
            return;
        };
        op.ios = op.ios.saturating_sub(1);
        if res < 0 {
            let err = self.io_error(-res);
            return self.fail_op(i, err);
        }
        if slot.want != 0 && res as u32 != slot.want {
            // Inside a file's size a short read means trouble, and a short write a full disk.
            let err = if slot.read {
                Error::Io {
                    dir: self.name.clone(),
                    source: io::Error::other(format!("short read: {res} of {} bytes", slot.want)),
                }
            } else {
                self.io_error(libc::ENOSPC)
            };
            return self.fail_op(i, err);
        }
        let Some(op) = self.ops.get_mut(i) else {
            return;
        };
        match &mut op.kind {
            Kind::Read { buf, .. } => *buf = slot.read_buf,
            Kind::Write { edges, cow, .. } => match (slot.edge, slot.cow, slot.read_buf) {
                (Some(b), _, Some(data)) => edges.push((b, data)),
                (None, Some(r0), Some(data)) => cow.bufs.push((r0, data)),
                _ => {}
            },
            _ => {}
        }
        if op.ios > 0 {
            return;
        }
        if let Some(err) = op.err.take() {
            return self.finish(i, Err(err));
        }
        match &op.kind {
            Kind::Read { .. } => self.read_done(i),
            Kind::Write { cow, .. } if cow.stage == 1 => self.cow_write(i),
            Kind::Write { cow, .. } if cow.stage == 2 => {
                if !self.cow_read_next(i) {
                    self.start_edges(i)
                }
            }
            Kind::Write { lsn, edges, .. } => {
                if *lsn == 0 {
                    // Edge reads are in: verify them before building on them.
                    let id = op.id;
                    let bad = self.chunks.get(&id).and_then(|c| {
                        edges
                            .iter()
                            .find(|(b, e)| {
                                c.crcs.get(*b as usize) != Some(&stored_crc(e.as_slice()))
                            })
                            .map(|e| e.0)
                    });
                    match bad {
                        Some(b) => {
                            self.mark_bad(id, b);
                            self.finish(
                                i,
                                Err(Error::Checksum {
                                    chunk: id,
                                    block: b,
                                }),
                            )
                        }
                        None => self.prepare_write(i),
                    }
                } else {
                    self.write_done(i)
                }
            }
            Kind::Flush { .. } => self.flush_advance(i),
            Kind::SnapRead { .. } => self.snapshot_read_done(i),
            Kind::Delete | Kind::Snapshot { .. } | Kind::SnapshotDelete { .. } => {}
        }
    }

    fn write_done(&mut self, i: usize) {
        let Some(op) = self.ops.get_mut(i) else {
            return;
        };
        let id = op.id;
        if let Kind::Write { sync_due, .. } = &mut op.kind {
            if std::mem::take(sync_due) {
                if let Some(fd) = self.chunks.get(&id).map(Chunk::fd) {
                    return self.submit_io(i, IoReq::Fdatasync { fd }, None, None);
                }
            }
        }
        let Some(op) = self.ops.get_mut(i) else {
            return;
        };
        let Kind::Write {
            offset,
            len,
            seq,
            lsn,
            crcs,
            ..
        } = &op.kind
        else {
            return;
        };
        let (b0, _) = block_span(*offset, *len);
        let Some(c) = self.chunks.get_mut(&id) else {
            return self.finish(i, Err(Error::NotFound(id)));
        };
        let mut healed = Vec::new();
        for (k, &crc) in crcs.iter().enumerate() {
            let b = b0 + k as u64;
            if let Some(slot) = c.crcs.get_mut(b as usize) {
                if *slot != crc {
                    *slot = crc;
                    c.dirty_pages.insert(b / CRCS_PER_PAGE);
                }
            }
            if c.bad.remove(&b) {
                healed.push(b);
            }
        }
        for b in healed {
            Meta::delete_bad(&mut self.batch, id, b);
        }
        c.unsynced = true;
        c.inflight_lsns.remove(lsn);
        let seq = *seq;
        self.finish(i, Ok(Done::Seq(seq)));
    }

    fn read_done(&mut self, i: usize) {
        let Some(op) = self.ops.get_mut(i) else {
            return;
        };
        let id = op.id;
        let scrub = matches!(op.answer, Answer::Scrub(_));
        let Kind::Read {
            offset,
            len,
            buf,
            version,
        } = &mut op.kind
        else {
            return;
        };
        let (offset, len, version) = (*offset, *len, *version);
        let Some(buf) = buf.take() else {
            return self.finish(i, Err(Error::ShuttingDown));
        };
        let (b0, _) = block_span(offset, len);
        let Some(c) = self.chunks.get(&id) else {
            return self.finish(i, Err(Error::NotFound(id)));
        };
        let bad: Vec<u64> = buf
            .as_slice()
            .chunks(BLOCK as usize)
            .enumerate()
            .filter(|(k, blk)| c.crcs.get(b0 as usize + k) != Some(&stored_crc(blk)))
            .map(|(k, _)| b0 + k as u64)
            .collect();
        for &b in &bad {
            self.mark_bad(id, b);
        }
        if scrub {
            return self.finish(i, Ok(Done::Blocks(bad)));
        }
        if let Some(&b) = bad.first() {
            return self.finish(
                i,
                Err(Error::Checksum {
                    chunk: id,
                    block: b,
                }),
            );
        }
        let head = (offset - b0 * BLOCK) as usize;
        let data = buf.freeze().slice(head..head + len as usize);
        self.finish(i, Ok(Done::Read(ReadOut { data, version })));
    }

    /// After a failed write, makes the table agree with whatever part of it reached the disk,
    /// as recovery would, so an unacknowledged write leaves old or new data, not bad blocks.
    fn settle(&mut self, id: ChunkId, b0: u64, new: &[u32]) {
        if matches!(self.shared.state(), DiskState::Failed(_)) {
            return;
        }
        let mut block = AlignedBuf::zeroed(BLOCK as usize);
        let mut torn = Vec::new();
        let Some(c) = self.chunks.get_mut(&id) else {
            return;
        };
        let start = c.data_start();
        for (k, &crc) in new.iter().enumerate() {
            let b = b0 + k as u64;
            if c.file
                .read_exact_at(block.as_mut_slice(), start + b * BLOCK)
                .is_err()
            {
                torn.push(b);
                continue;
            }
            let actual = stored_crc(block.as_slice());
            if actual == crc && c.crcs[b as usize] != crc {
                c.crcs[b as usize] = crc;
                c.dirty_pages.insert(b / CRCS_PER_PAGE);
                c.unsynced = true;
            } else if actual != c.crcs[b as usize] {
                torn.push(b);
            }
        }
        for b in torn {
            self.mark_bad(id, b);
        }
    }

    fn mark_bad(&mut self, id: ChunkId, block: u64) {
        metrics::counter!("ironsan_storage_checksum_errors_total", "dir" => self.name.clone())
            .increment(1);
        if let Some(c) = self.chunks.get_mut(&id) {
            if c.bad.insert(block) {
                tracing::warn!(dir = %self.name, chunk = %id, block, "checksum mismatch");
                Meta::put_bad(&mut self.batch, id, block);
            }
        }
    }

    /// Answers op `i`, releases its blocks and lets parked ops behind it run.
    fn finish(&mut self, i: usize, result: Result<Done>) {
        let Some(op) = self.ops.remove(i) else { return };
        if let (
            Err(_),
            Kind::Write {
                offset,
                len,
                lsn,
                crcs,
                ..
            },
        ) = (&result, &op.kind)
        {
            if *lsn != 0 {
                self.settle(op.id, block_span(*offset, *len).0, crcs);
            }
        }
        if let Some(c) = self.chunks.get_mut(&op.id) {
            c.inflight.retain(|s| s.op != i);
            c.waiting.retain(|&w| w != i);
            if let Kind::Write { lsn, .. } = &op.kind {
                c.inflight_lsns.remove(lsn);
            }
        }
        let id = op.id;
        let answer = op.answer;
        finish_answer_done(answer, result);
        self.unpark(id);
    }

    // ---- flush / checkpoint --------------------------------------------------------------

    fn flush_start(&mut self, i: usize, only: Option<ChunkId>) {
        let mut targets = Vec::new();
        let mut pages_out = Vec::new();
        let mut reqs = Vec::new();
        for (id, c) in self.chunks.iter_mut() {
            if only.is_some_and(|o| o != *id) || (!c.unsynced && c.dirty_pages.is_empty()) {
                continue;
            }
            let cp = c.inflight_lsns.first().map_or(c.rec.lsn, |l| l - 1);
            targets.push((*id, cp));
            for p in std::mem::take(&mut c.dirty_pages) {
                let page = table_page(&c.crcs, p);
                reqs.push(IoReq::Write {
                    fd: c.fd(),
                    ptr: page.as_slice().as_ptr(),
                    len: BLOCK as u32,
                    offset: layout::table_page_offset(p),
                    dsync: false,
                });
                pages_out.push(page);
            }
        }
        let Some(op) = self.ops.get_mut(i) else {
            return;
        };
        if targets.is_empty() {
            return self.finish(i, Ok(Done::Unit));
        }
        if let Kind::Flush {
            targets: t,
            pages,
            stage,
        } = &mut op.kind
        {
            *t = targets;
            *pages = pages_out;
            *stage = 0;
        }
        if reqs.is_empty() {
            return self.flush_advance(i);
        }
        for r in reqs {
            self.submit_io(i, r, None, None);
        }
    }

    fn flush_advance(&mut self, i: usize) {
        let Some(op) = self.ops.get_mut(i) else {
            return;
        };
        let Kind::Flush {
            stage,
            targets,
            pages,
        } = &mut op.kind
        else {
            return;
        };
        pages.clear();
        *stage += 1;
        match *stage {
            1 => {
                let mut reqs = Vec::new();
                for (id, _) in targets.iter() {
                    if let Some(c) = self.chunks.get_mut(id) {
                        c.unsynced = false;
                        reqs.push(IoReq::Fdatasync { fd: c.fd() });
                        for s in c.snaps.iter_mut().filter(|s| s.unsynced) {
                            s.unsynced = false;
                            reqs.push(IoReq::Fdatasync {
                                fd: s.file.as_raw_fd(),
                            });
                        }
                    }
                }
                if reqs.is_empty() {
                    return self.flush_advance(i);
                }
                for r in reqs {
                    self.submit_io(i, r, None, None);
                }
            }
            _ => {
                let targets = std::mem::take(targets);
                for (id, cp) in targets {
                    self.checkpoint_record(id, cp);
                }
                self.batch_sync = true;
                self.batch_waiters.push(i);
                if let Some(op) = self.ops.get_mut(i) {
                    if let Kind::Flush { stage, .. } = &mut op.kind {
                        *stage = 2;
                    }
                }
            }
        }
    }

    /// Advances `id`'s checkpoint to `cp` and trims its log beyond what resync keeps.
    fn checkpoint_record(&mut self, id: ChunkId, cp: u64) {
        let keep = self.log_keep;
        let Some(c) = self.chunks.get_mut(&id) else {
            return;
        };
        c.rec.checkpoint_lsn = c.rec.checkpoint_lsn.max(cp);
        let held = c.rec.lsn.saturating_sub(c.rec.first_lsn);
        if held > keep + keep / 4 {
            // Only records already in the table may go; resync needs to know the newest
            // sequence number they covered.
            let upto = (c.rec.lsn - keep).min(c.rec.checkpoint_lsn + 1);
            if upto > c.rec.first_lsn {
                let first = c.rec.first_lsn;
                if let Ok(recs) = self.meta.log(id, first) {
                    let trimmed = recs
                        .iter()
                        .take_while(|r| r.0 < upto)
                        .filter_map(|r| r.1.as_ref().map(|l| l.seq))
                        .max();
                    if let Some(c) = self.chunks.get_mut(&id) {
                        c.rec.trimmed_seq = c.rec.trimmed_seq.max(trimmed.unwrap_or(0));
                        c.rec.first_lsn = upto;
                    }
                    Meta::trim_log(&mut self.batch, id, first, upto);
                }
            }
        }
        self.batch_chunks.insert(id);
    }

    // ---- synchronous requests ------------------------------------------------------------

    fn create(&mut self, id: ChunkId, size: u64, epoch: u64) -> Result<ChunkInfo> {
        if size == 0 || !size.is_multiple_of(BLOCK) || size > MAX_CHUNK {
            return Err(Error::Invalid(format!(
                "chunk size {size} must be a non-zero multiple of {BLOCK} up to {MAX_CHUNK}"
            )));
        }
        if self.chunks.contains_key(&id) {
            return Err(Error::Exists(id));
        }
        if !self.has_room() || self.shared.state() == DiskState::Full {
            return Err(Error::NoSpace {
                dir: self.name.clone(),
            });
        }
        let path = layout::chunk_path(&self.dir, id);
        let made = (|| -> io::Result<File> {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let f = self.open_file(&path, true)?;
            let header = AlignedBuf::copy_from(&layout::encode_header(id, size));
            f.write_all_at(header.as_slice(), 0)?;
            f.set_len(layout::data_start(size) + size)?;
            f.sync_all()?;
            if let Some(parent) = path.parent() {
                File::open(parent)?.sync_all()?;
            }
            Ok(f)
        })();
        let file = match made {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(self.io_error(errno_of(&e)));
            }
        };
        let rec = ChunkRecord {
            size,
            epoch,
            ..Default::default()
        };
        let mut batch = WriteBatch::default();
        Meta::put_chunk(&mut batch, id, &rec);
        if let Err(e) = self.meta.write(batch, true) {
            let _ = std::fs::remove_file(&path);
            return Err(self.meta_error(e));
        }
        let crcs = vec![0; layout::blocks(size) as usize];
        self.chunks.insert(id, new_chunk(file, rec, crcs));
        self.shared.chunks.fetch_add(1, Ordering::Relaxed);
        self.info(id)
    }

    fn info(&self, id: ChunkId) -> Result<ChunkInfo> {
        let c = self.chunks.get(&id).ok_or(Error::NotFound(id))?;
        Ok(ChunkInfo {
            id,
            size: c.rec.size,
            epoch: c.rec.epoch,
            version: c.rec.version,
            log_start: c.rec.trimmed_seq + 1,
            used: allocated(&c.file, c.data_start(), c.data_start() + c.rec.size),
            bad_blocks: c.bad.len() as u64,
            disk: self.index,
        })
    }

    fn since(&self, id: ChunkId, since: u64) -> Result<(Vec<WrittenRange>, u64)> {
        let c = self.chunks.get(&id).ok_or(Error::NotFound(id))?;
        if since < c.rec.trimmed_seq {
            return Err(Error::LogTruncated {
                chunk: id,
                since,
                log_start: c.rec.trimmed_seq + 1,
            });
        }
        let recs = self
            .meta
            .log(id, c.rec.first_lsn)
            .map_err(|e| self.meta_error(e))?;
        let mut ranges: Vec<(u64, u64)> = recs
            .iter()
            .filter_map(|(_, r)| r.as_ref())
            .filter(|r| r.seq > since)
            .map(|r| (r.offset, r.offset + r.len))
            .collect();
        ranges.sort_unstable();
        let mut merged: Vec<WrittenRange> = Vec::new();
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(m) if s <= m.offset + m.len => m.len = m.len.max(e - m.offset),
                _ => merged.push(WrittenRange {
                    offset: s,
                    len: e - s,
                }),
            }
        }
        Ok((merged, c.rec.version))
    }
}

// ---- snapshots (see `snap.rs`) -----------------------------------------------------------

/// Longest run copied or read in one system call by the snapshot paths.
const SNAP_RUN: u64 = 256;
/// Most bytes one write's copy-on-write holds in memory at a time.
const COW_WINDOW: u64 = 8 << 20;

impl Engine {
    /// Starts write `i`'s copy of the blocks of `[b0, b1)` that the newest snapshot does not
    /// hold yet: their old data is read from the chunk (in runs), written to the snapshot's
    /// file, and only then ([`Self::cow_commit`]) recorded, before the write's own log record
    /// and data. The op holds these blocks, so nothing else changes them meanwhile; zero blocks
    /// are recorded without data (a hole in the snapshot file). Returns whether I/O is under way.
    fn cow_start(&mut self, i: usize, id: ChunkId, b0: u64, b1: u64) -> Result<bool> {
        let c = self.chunks.get(&id).ok_or(Error::NotFound(id))?;
        let Some(newest) = c.snaps.last() else {
            return Ok(false);
        };
        let mut recs: Vec<(u64, u32)> = Vec::new();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for b in b0..b1 {
            if newest.held.contains_key(&b) {
                continue;
            }
            let crc = c.crcs.get(b as usize).copied().unwrap_or(0);
            recs.push((b, crc));
            if crc == 0 && !c.bad.contains(&b) {
                continue;
            }
            match runs.last_mut() {
                Some((r0, r1)) if *r1 == b && *r1 - *r0 < SNAP_RUN => *r1 = b + 1,
                _ => runs.push((b, b + 1)),
            }
        }
        if recs.is_empty() {
            return Ok(false);
        }
        let snap = newest.id;
        if let Some(Op {
            kind: Kind::Write { cow, .. },
            ..
        }) = self.ops.get_mut(i)
        {
            *cow = Cow {
                stage: 1,
                snap,
                recs,
                bufs: Vec::new(),
                todo: runs.into(),
                wrote: false,
            };
        }
        Ok(self.cow_read_next(i))
    }

    /// Reads the next window of write `i`'s copy runs. Returns false (after recording the copy
    /// with [`Self::cow_commit`]) when none is left.
    fn cow_read_next(&mut self, i: usize) -> bool {
        let Some(op) = self.ops.get_mut(i) else {
            return false;
        };
        let id = op.id;
        let Kind::Write { cow, .. } = &mut op.kind else {
            return false;
        };
        let Some(c) = self.chunks.get(&id) else {
            return false;
        };
        let (fd, start) = (c.fd(), c.data_start());
        cow.stage = 1;
        cow.bufs.clear();
        let mut reqs = Vec::new();
        let mut bytes = 0;
        while bytes < COW_WINDOW {
            let Some((r0, r1)) = cow.todo.pop_front() else {
                break;
            };
            let mut buf = AlignedBuf::zeroed(((r1 - r0) * BLOCK) as usize);
            bytes += buf.len() as u64;
            let req = IoReq::Read {
                fd,
                ptr: buf.as_mut_ptr(),
                len: buf.len() as u32,
                offset: start + r0 * BLOCK,
            };
            reqs.push((req, buf, r0));
        }
        if reqs.is_empty() {
            self.cow_commit(i);
            return false;
        }
        for (req, buf, r0) in reqs {
            self.submit_cow_read(i, req, buf, r0);
        }
        true
    }

    /// The old blocks of write `i` are in: write them to the snapshot's file.
    fn cow_write(&mut self, i: usize) {
        let Some(op) = self.ops.get_mut(i) else {
            return;
        };
        let id = op.id;
        let Kind::Write { cow, .. } = &mut op.kind else {
            return;
        };
        cow.stage = 2;
        cow.wrote |= !cow.bufs.is_empty();
        let fd = self
            .chunks
            .get(&id)
            .and_then(|c| c.snaps.iter().find(|s| s.id == cow.snap))
            .map(|s| s.file.as_raw_fd());
        let Some(fd) = fd else {
            // Snapshot creates and deletes hold the whole chunk: they cannot run meanwhile.
            return self.finish(
                i,
                Err(Error::Invalid(
                    "internal: copy-on-write target vanished".into(),
                )),
            );
        };
        let reqs: Vec<IoReq> = cow
            .bufs
            .iter()
            .map(|(r0, buf)| IoReq::Write {
                fd,
                ptr: buf.as_slice().as_ptr(),
                len: buf.len() as u32,
                offset: snap::offset_of(*r0),
                dsync: true,
            })
            .collect();
        if reqs.is_empty() {
            if !self.cow_read_next(i) {
                self.start_edges(i);
            }
            return;
        }
        for r in reqs {
            self.submit_io(i, r, None, None);
        }
    }

    /// The copies of write `i` are in the snapshot's file: record them (in the batch that
    /// precedes the write's data) and mark the blocks held.
    fn cow_commit(&mut self, i: usize) {
        let Some(op) = self.ops.get_mut(i) else {
            return;
        };
        let id = op.id;
        let Kind::Write { cow, .. } = &mut op.kind else {
            return;
        };
        let cow = std::mem::take(cow);
        let Some(c) = self.chunks.get_mut(&id) else {
            return;
        };
        let Some(s) = c.snaps.iter_mut().find(|s| s.id == cow.snap) else {
            return;
        };
        for (b, crc) in cow.recs {
            s.held.insert(b, crc);
            Meta::put_snap_block(&mut self.batch, id, s.id, b, crc);
        }
        // The old data may have been flushed long ago: the copy (written with RWF_DSYNC) and its
        // records must be durable before the block is overwritten, or a power loss could leave
        // the snapshot without it.
        self.batch_sync = true;
        if cow.wrote {
            s.unsynced = true;
            c.unsynced = true;
        }
    }

    /// Makes snapshot `snap` of `id`: its (empty, sparse) file and its record. Runs when the
    /// snapshot op holds the whole chunk; the record commits (synced) before it is answered.
    fn snapshot_create(&mut self, id: ChunkId, snap: u64) -> Result<()> {
        if !self.has_room() {
            return Err(Error::NoSpace {
                dir: self.name.clone(),
            });
        }
        let c = self.chunks.get(&id).ok_or(Error::NotFound(id))?;
        if c.snaps.iter().any(|s| s.id == snap) {
            return Err(Error::SnapshotExists {
                chunk: id,
                snapshot: snap,
            });
        }
        if c.snaps.len() >= MAX_SNAPSHOTS {
            return Err(Error::Invalid(format!(
                "chunk {id} already holds {MAX_SNAPSHOTS} snapshots"
            )));
        }
        let size = c.rec.size;
        let rec = SnapRecord {
            gen: c.snaps.last().map_or(1, |s| s.rec.gen + 1),
            version: c.rec.version,
        };
        let path = snap::snap_path(&self.dir, id, snap);
        // A leftover of a delete whose unlink failed has no record: it may go.
        let _ = std::fs::remove_file(&path);
        let made = (|| -> io::Result<File> {
            let f = self.open_file(&path, true)?;
            f.set_len(size)?;
            f.sync_all()?;
            if let Some(parent) = path.parent() {
                File::open(parent)?.sync_all()?;
            }
            Ok(f)
        })();
        let file = match made {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(self.io_error(errno_of(&e)));
            }
        };
        Meta::put_snap(&mut self.batch, id, snap, &rec);
        if let Some(c) = self.chunks.get_mut(&id) {
            c.snaps.push(Snap {
                id: snap,
                rec,
                file,
                held: HashMap::new(),
                unsynced: false,
            });
        }
        tracing::info!(dir = %self.name, chunk = %id, snapshot = snap, version = rec.version, "snapshot taken");
        Ok(())
    }

    /// Deletes snapshot `snap` of `id` while its op holds the whole chunk. The blocks it holds
    /// that its predecessor lacks are the predecessor's content too: they are copied down
    /// (synced) and recorded in the same synced batch that drops the snapshot; the rest is
    /// freed with its file, which the caller unlinks once that batch is in. A crash before the
    /// batch leaves the snapshot whole (the predecessor's extra data is unreferenced).
    fn snapshot_delete(&mut self, id: ChunkId, snap: u64) -> Result<File> {
        let c = self.chunks.get_mut(&id).ok_or(Error::NotFound(id))?;
        let pos = c
            .snaps
            .iter()
            .position(|s| s.id == snap)
            .ok_or(Error::SnapshotNotFound {
                chunk: id,
                snapshot: snap,
            })?;
        let mut moved: Vec<(u64, u32)> = Vec::new();
        if pos > 0 {
            let (prev, gone) = (&c.snaps[pos - 1], &c.snaps[pos]);
            moved = gone
                .held
                .iter()
                .filter(|(b, _)| !prev.held.contains_key(b))
                .map(|(&b, &crc)| (b, crc))
                .collect();
            moved.sort_unstable();
            // Rare and bounded by the snapshot's size: plain pread/pwrite on this thread, in
            // runs of adjacent blocks with data.
            let mut runs: Vec<(u64, u64)> = Vec::new();
            for &(b, crc) in &moved {
                if crc == 0 {
                    continue;
                }
                match runs.last_mut() {
                    Some((r0, r1)) if *r1 == b && *r1 - *r0 < SNAP_RUN => *r1 = b + 1,
                    _ => runs.push((b, b + 1)),
                }
            }
            let copy = || -> io::Result<()> {
                for &(r0, r1) in &runs {
                    let mut buf = AlignedBuf::zeroed(((r1 - r0) * BLOCK) as usize);
                    gone.file
                        .read_exact_at(buf.as_mut_slice(), snap::offset_of(r0))?;
                    prev.file
                        .write_all_at(buf.as_slice(), snap::offset_of(r0))?;
                }
                if !runs.is_empty() {
                    prev.file.sync_data()?;
                }
                Ok(())
            };
            if let Err(e) = copy() {
                let errno = errno_of(&e);
                return Err(self.io_error(errno));
            }
            let prev_id = prev.id;
            for &(b, crc) in &moved {
                Meta::put_snap_block(&mut self.batch, id, prev_id, b, crc);
            }
        }
        Meta::delete_snap(&mut self.batch, id, snap);
        let c = self.chunks.get_mut(&id).ok_or(Error::NotFound(id))?;
        if pos > 0 {
            if let Some(prev) = c.snaps.get_mut(pos - 1) {
                prev.held.extend(moved.iter().copied());
            }
        }
        let gone = c.snaps.remove(pos);
        tracing::info!(dir = %self.name, chunk = %id, snapshot = snap, handed_down = moved.len(), "snapshot deleted");
        Ok(gone.file)
    }

    /// Starts snapshot read `i`: plans where each block comes from (the oldest snapshot at or
    /// after this one holding it, else the chunk) and reads each run into the op's buffer.
    fn snapshot_read_start(&mut self, i: usize) {
        let Some(op) = self.ops.get_mut(i) else {
            return;
        };
        let id = op.id;
        let Kind::SnapRead {
            snap,
            offset,
            len,
            own,
            buf,
            plan,
            version,
        } = &mut op.kind
        else {
            return;
        };
        let Some(c) = self.chunks.get(&id) else {
            return self.finish(i, Err(Error::NotFound(id)));
        };
        let Some(pos) = c.snaps.iter().position(|s| s.id == *snap) else {
            let err = Error::SnapshotNotFound {
                chunk: id,
                snapshot: *snap,
            };
            return self.finish(i, Err(err));
        };
        *version = c.snaps[pos].rec.version;
        let (b0, b1) = block_span(*offset, *len);
        *plan = (b0..b1)
            .map(|b| {
                if *own {
                    return match c.snaps[pos].held.get(&b) {
                        Some(&crc) => (Src::Snap(pos), crc),
                        None => (Src::Skip, 0),
                    };
                }
                match snap::source(&c.snaps, pos, b) {
                    Some((j, crc)) => (Src::Snap(j), crc),
                    None => (Src::Chunk, c.crcs.get(b as usize).copied().unwrap_or(0)),
                }
            })
            .collect();
        *buf = AlignedBuf::zeroed(((b1 - b0) * BLOCK) as usize);
        let mut reqs = Vec::new();
        let mut k = 0usize;
        while k < plan.len() {
            let src = plan[k].0;
            let mut e = k + 1;
            while e < plan.len() && plan[e].0 == src && ((e - k) as u64) < SNAP_RUN {
                e += 1;
            }
            let (fd, at) = match src {
                Src::Snap(j) => match c.snaps.get(j) {
                    Some(s) => (s.file.as_raw_fd(), snap::offset_of(b0 + k as u64)),
                    None => {
                        k = e;
                        continue;
                    }
                },
                Src::Chunk => (c.fd(), c.data_start() + (b0 + k as u64) * BLOCK),
                Src::Skip => {
                    k = e;
                    continue;
                }
            };
            let piece = &mut buf.as_mut_slice()[k * BLOCK as usize..e * BLOCK as usize];
            reqs.push(IoReq::Read {
                fd,
                ptr: piece.as_mut_ptr(),
                len: piece.len() as u32,
                offset: at,
            });
            k = e;
        }
        if reqs.is_empty() {
            return self.snapshot_read_done(i);
        }
        for r in reqs {
            self.submit_io(i, r, None, None);
        }
    }

    /// Snapshot read `i` is in: verify every block against the checksum recorded with it. A
    /// mismatch is an error, never data; in a snapshot's own block it does not mark the chunk.
    fn snapshot_read_done(&mut self, i: usize) {
        let Some(op) = self.ops.get_mut(i) else {
            return;
        };
        let id = op.id;
        let Kind::SnapRead {
            snap,
            offset,
            len,
            buf,
            plan,
            version,
            ..
        } = &mut op.kind
        else {
            return;
        };
        let (snap, offset, len, version) = (*snap, *offset, *len, *version);
        let scrub = matches!(op.answer, Answer::Scrub(_));
        let (b0, _) = block_span(offset, len);
        let bad_live = |b: u64| self.chunks.get(&id).is_some_and(|c| c.bad.contains(&b));
        let bad: Vec<(u64, bool)> = buf
            .as_slice()
            .chunks(BLOCK as usize)
            .zip(plan.iter())
            .enumerate()
            .filter(|(k, (blk, (src, crc)))| match src {
                Src::Skip => false,
                Src::Snap(_) => stored_crc(blk) != *crc,
                Src::Chunk => stored_crc(blk) != *crc || bad_live(b0 + *k as u64),
            })
            .map(|(k, (_, (src, _)))| (b0 + k as u64, *src == Src::Chunk))
            .take(if scrub { usize::MAX } else { 1 })
            .collect();
        let buf = std::mem::replace(buf, AlignedBuf::zeroed(0));
        for &(b, live) in &bad {
            if live {
                self.mark_bad(id, b);
            } else {
                metrics::counter!("ironsan_storage_checksum_errors_total", "dir" => self.name.clone())
                    .increment(1);
                tracing::warn!(dir = %self.name, chunk = %id, snapshot = snap, block = b, "checksum mismatch in a snapshot");
            }
        }
        if scrub {
            let blocks = bad.into_iter().map(|(b, _)| b).collect();
            return self.finish(i, Ok(Done::Blocks(blocks)));
        }
        if let Some(&(b, _)) = bad.first() {
            let err = Error::Checksum {
                chunk: id,
                block: b,
            };
            return self.finish(i, Err(err));
        }
        let head = (offset - b0 * BLOCK) as usize;
        let data = buf.freeze().slice(head..head + len as usize);
        self.finish(i, Ok(Done::Read(ReadOut { data, version })))
    }

    fn snapshot_list(&self, id: ChunkId) -> Result<Vec<SnapshotInfo>> {
        let c = self.chunks.get(&id).ok_or(Error::NotFound(id))?;
        Ok(c.snaps
            .iter()
            .map(|s| SnapshotInfo {
                id: s.id,
                version: s.rec.version,
                used: allocated(&s.file, 0, c.rec.size),
                blocks: s.held.len() as u64,
            })
            .collect())
    }

    /// Loads the snapshots of the loaded chunks at open. A snapshot whose file is gone takes the
    /// older ones with it (their blocks may live in it); each loss is logged.
    fn load_snaps(&mut self, batch: &mut WriteBatch) -> Result<HashSet<(ChunkId, u64)>, String> {
        let mut broken: HashMap<ChunkId, u64> = HashMap::new();
        for (id, sid, rec) in self.meta.snaps()? {
            let path = snap::snap_path(&self.dir, id, sid);
            let file = match (rec, self.chunks.contains_key(&id)) {
                (Some(rec), true) => match self.open_file(&path, false) {
                    Ok(f) => Some((rec, f)),
                    Err(e) => {
                        tracing::error!(dir = %self.name, chunk = %id, snapshot = sid, "snapshot lost: {}: {e}", path.display());
                        let g = broken.entry(id).or_default();
                        *g = (*g).max(rec.gen);
                        None
                    }
                },
                (None, true) => {
                    tracing::error!(dir = %self.name, chunk = %id, snapshot = sid, "undecodable snapshot record; snapshot dropped");
                    broken.insert(id, u64::MAX);
                    None
                }
                (_, false) => None,
            };
            match (file, self.chunks.get_mut(&id)) {
                (Some((rec, file)), Some(c)) => c.snaps.push(Snap {
                    id: sid,
                    rec,
                    file,
                    held: HashMap::new(),
                    unsynced: false,
                }),
                _ => Meta::delete_snap(batch, id, sid),
            }
        }
        for (id, sid, b, crc) in self.meta.snap_blocks()? {
            if let Some(s) = self
                .chunks
                .get_mut(&id)
                .and_then(|c| c.snaps.iter_mut().find(|s| s.id == sid))
            {
                s.held.insert(b, crc);
            }
        }
        let mut known = HashSet::new();
        for (id, c) in self.chunks.iter_mut() {
            c.snaps.sort_unstable_by_key(|s| s.rec.gen);
            if let Some(&upto) = broken.get(id) {
                for s in c.snaps.iter().filter(|s| s.rec.gen <= upto) {
                    tracing::error!(dir = %self.name, chunk = %id, snapshot = s.id, "snapshot dropped: a newer one it depends on is lost");
                    Meta::delete_snap(batch, *id, s.id);
                }
                c.snaps.retain(|s| s.rec.gen > upto);
            }
            known.extend(c.snaps.iter().map(|s| (*id, s.id)));
        }
        Ok(known)
    }
}

/// What a finished op hands back.
enum Done {
    Seq(u64),
    Read(ReadOut),
    Blocks(Vec<u64>),
    Unit,
}

fn finish_answer(answer: Answer, result: Result<()>) {
    finish_answer_done(answer, result.map(|()| Done::Unit));
}

fn finish_answer_done(answer: Answer, result: Result<Done>) {
    let mismatch = || Error::Invalid("internal: op finished with the wrong kind of answer".into());
    match answer {
        Answer::Seq(r) => {
            let _ = r.send(result.and_then(|d| {
                if let Done::Seq(s) = d {
                    Ok(s)
                } else {
                    Err(mismatch())
                }
            }));
        }
        Answer::Read(r) => {
            let _ = r.send(result.and_then(|d| {
                if let Done::Read(o) = d {
                    Ok(o)
                } else {
                    Err(mismatch())
                }
            }));
        }
        Answer::Scrub(r) => {
            let _ = r.send(result.and_then(|d| {
                if let Done::Blocks(b) = d {
                    Ok(b)
                } else {
                    Err(mismatch())
                }
            }));
        }
        Answer::Unit(Some(r)) => {
            let _ = r.send(result.map(|_| ()));
        }
        Answer::Unit(None) => {}
    }
}

fn refuse(req: Req, err: Error) {
    match req {
        Req::Create { reply, .. } | Req::Info { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Req::Write { reply, .. } | Req::Zero { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Req::Read { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Req::Scrub { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Req::Flush { reply, .. } => {
            if let Some(r) = reply {
                let _ = r.send(Err(err));
            }
        }
        Req::Delete { reply, .. } | Req::Shutdown { reply } => {
            let _ = reply.send(Err(err));
        }
        Req::Since { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Req::Snapshot { reply, .. } | Req::SnapshotDelete { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Req::SnapshotRead { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Req::SnapshotList { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Req::SnapshotScrub { reply, .. } => {
            let _ = reply.send(Err(err));
        }
    }
}

/// Errors are not `Clone` (they carry `io::Error`); batch failures answer many ops.
fn clone_error(e: &Error) -> Error {
    match e {
        Error::NoSpace { dir } => Error::NoSpace { dir: dir.clone() },
        Error::Meta { dir, reason } => Error::Meta {
            dir: dir.clone(),
            reason: reason.clone(),
        },
        Error::DiskFailed { dir, reason } => Error::DiskFailed {
            dir: dir.clone(),
            reason: reason.clone(),
        },
        other => Error::Invalid(other.to_string()),
    }
}

fn new_chunk(file: File, rec: ChunkRecord, crcs: Vec<u32>) -> Chunk {
    Chunk {
        file,
        rec,
        crcs,
        dirty_pages: BTreeSet::new(),
        unsynced: false,
        inflight: Vec::new(),
        waiting: VecDeque::new(),
        inflight_lsns: BTreeSet::new(),
        bad: BTreeSet::new(),
        snaps: Vec::new(),
    }
}

/// The 4 KiB blocks `[b0, b1)` that a byte range touches.
fn block_span(offset: u64, len: u64) -> (u64, u64) {
    (offset / BLOCK, (offset + len).div_ceil(BLOCK))
}

/// Table page `p` as it should be on disk.
fn table_page(crcs: &[u32], p: u64) -> AlignedBuf {
    let mut page = AlignedBuf::zeroed(BLOCK as usize);
    let first = (p * CRCS_PER_PAGE) as usize;
    for (k, crc) in crcs
        .iter()
        .skip(first)
        .take(CRCS_PER_PAGE as usize)
        .enumerate()
    {
        page.as_mut_slice()[k * 4..k * 4 + 4].copy_from_slice(&crc.to_le_bytes());
    }
    page
}

/// Whether the filesystem under `dir` takes O_DIRECT (tmpfs before 6.6 and some FUSE do not).
fn probe_direct(dir: &Path) -> bool {
    let path = dir.join(".direct-probe");
    let r = (|| -> io::Result<()> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)?;
        let b = AlignedBuf::zeroed(BLOCK as usize);
        f.write_all_at(b.as_slice(), 0)
    })();
    let _ = std::fs::remove_file(&path);
    if let Err(e) = &r {
        tracing::warn!(dir = %dir.display(), "O_DIRECT unavailable ({e}); using the page cache");
    }
    r.is_ok()
}

/// A twentieth of the filesystem, between 8 MiB and 1 GiB.
fn space_reserve(dir: &Path) -> u64 {
    statvfs(dir).map_or(8 << 20, |s| (s.0 / 20).clamp(8 << 20, 1 << 30))
}

pub(super) fn free_bytes(dir: &Path) -> u64 {
    statvfs(dir).map_or(0, |s| s.1)
}

/// (total, available) bytes of the filesystem holding `dir`.
pub(super) fn statvfs(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the zeroed struct from a valid C string path.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    let frsize = s.f_frsize;
    Some((s.f_blocks * frsize, s.f_bavail * frsize))
}

/// Bytes allocated in `[from, to)` of `f`, walking its data extents.
fn allocated(f: &File, from: u64, to: u64) -> u64 {
    let fd = f.as_raw_fd();
    let mut total = 0;
    let mut at = from as libc::off_t;
    while (at as u64) < to {
        // SAFETY: lseek on a valid fd has no memory effects.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 || data as u64 >= to {
            break;
        }
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { to } else { (hole as u64).min(to) };
        total += end - data as u64;
        at = end as libc::off_t;
    }
    total
}
