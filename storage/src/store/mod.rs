//! The chunk store: every data directory of this daemon, behind one async API.
//!
//! Each directory (`disk.rs`) is served by its own engine thread that owns the directory's
//! io_uring, chunk files and RocksDB; this module routes a request to the directory holding
//! its chunk and places new chunks on the healthy directory with the most free space.

mod disk;
mod io;
mod layout;
mod meta;
pub mod scrub;
mod snap;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use disk::{Disk, Req};

use crate::chunk::{ChunkId, ChunkInfo, SnapshotInfo, WrittenRange};
use crate::error::{Error, Result};

/// How chunk files are read and written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoEngine {
    /// io_uring where the kernel allows it, else plain pread/pwrite.
    #[default]
    Auto,
    /// pread/pwrite on the engine thread (no io_uring).
    Blocking,
}

#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// One directory per disk.
    pub dirs: Vec<PathBuf>,
    pub io_engine: IoEngine,
    /// Write-log records kept per chunk for resync beyond the last checkpoint.
    pub log_keep: u64,
    /// Scrub rate in bytes per second (0 disables scrubbing).
    pub scrub_rate: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            dirs: Vec::new(),
            io_engine: IoEngine::Auto,
            log_keep: 4096,
            scrub_rate: 32 << 20,
        }
    }
}

/// Options of a mutating request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteOpts {
    /// The writer's epoch (fencing).
    pub epoch: u64,
    /// The writer's sequence number for this write; 0 lets the replica assign the next one.
    pub seq: u64,
    /// Reach stable storage (data, checksums and log record) before answering.
    pub fua: bool,
}

/// Data read from a chunk, with the chunk's version when the read was admitted.
#[derive(Clone, Debug)]
pub struct ReadOut {
    pub data: Bytes,
    pub version: u64,
}

/// Health of one data directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskState {
    Healthy,
    /// ENOSPC seen: no new chunks; reads and overwrites continue.
    Full,
    /// EIO, EROFS or an unusable metadata store: every request is refused.
    Failed(String),
}

#[derive(Clone, Debug)]
pub struct DiskStatus {
    pub index: usize,
    pub path: PathBuf,
    pub state: DiskState,
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub chunks: u64,
    pub io_engine: &'static str,
}

/// How often dirty chunks are checkpointed in the background.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);
/// Rest between two scrub passes over everything.
pub const SCRUB_PAUSE: Duration = Duration::from_secs(3600);

/// Every data directory of one storage daemon.
pub struct Store {
    disks: Vec<Disk>,
    /// Which directory holds each chunk.
    index: RwLock<HashMap<ChunkId, usize>>,
    cfg: StoreConfig,
}

impl Store {
    /// Opens (or initialises) every directory, replaying each one's write log. Blocking: call it
    /// before the runtime serves requests or from `spawn_blocking`. A directory that cannot be
    /// opened is reported as failed and the others serve; it is an error only if none opens.
    pub fn open(cfg: StoreConfig) -> Result<Self> {
        if cfg.dirs.is_empty() {
            return Err(Error::Invalid("no data directory given".into()));
        }
        let want_ring = cfg.io_engine == IoEngine::Auto;
        let mut disks = Vec::new();
        let mut index = HashMap::new();
        for (i, dir) in cfg.dirs.iter().enumerate() {
            let (disk, ids) = Disk::open(i, dir.clone(), want_ring, cfg.log_keep);
            for id in ids {
                if let Some(other) = index.insert(id, i) {
                    tracing::error!(chunk = %id, "chunk found in data directories {other} and {i}; serving the latter");
                }
            }
            disks.push(disk);
        }
        if disks
            .iter()
            .all(|d| matches!(d.shared.state(), DiskState::Failed(_)))
        {
            let reasons: Vec<String> = disks.iter().map(|d| d.failed_error().to_string()).collect();
            return Err(Error::Invalid(format!(
                "no usable data directory: {}",
                reasons.join("; ")
            )));
        }
        Ok(Self {
            disks,
            index: RwLock::new(index),
            cfg,
        })
    }

    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    fn disk_of(&self, id: ChunkId) -> Result<&Disk> {
        let i = self
            .index
            .read()
            .ok()
            .and_then(|m| m.get(&id).copied())
            .ok_or(Error::NotFound(id))?;
        self.disks.get(i).ok_or(Error::NotFound(id))
    }

    /// Creates an empty (sparse) chunk of `size` bytes on the healthy directory with the most
    /// free space.
    pub async fn create(&self, id: ChunkId, size: u64, epoch: u64) -> Result<ChunkInfo> {
        if self
            .index
            .read()
            .map(|m| m.contains_key(&id))
            .unwrap_or(false)
        {
            return Err(Error::Exists(id));
        }
        let mut candidates: Vec<(u64, &Disk)> = self
            .disks
            .iter()
            .filter(|d| !matches!(d.shared.state(), DiskState::Failed(_)))
            .map(|d| (disk::free_bytes(&d.path), d))
            .collect();
        candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
        let mut last = None;
        for (_, d) in candidates {
            match d
                .call(|reply| Req::Create {
                    id,
                    size,
                    epoch,
                    reply,
                })
                .await
            {
                Ok(info) => {
                    if let Ok(mut m) = self.index.write() {
                        m.insert(id, d.index);
                    }
                    return Ok(info);
                }
                // A full or failing directory: try the next one.
                Err(
                    e @ (Error::NoSpace { .. }
                    | Error::DiskFailed { .. }
                    | Error::Io { .. }
                    | Error::Meta { .. }),
                ) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(Error::NoSpace {
            dir: "every data directory".into(),
        }))
    }

    /// Writes `data` at `offset`; returns the write's sequence number.
    pub async fn write(
        &self,
        id: ChunkId,
        offset: u64,
        data: Bytes,
        opts: WriteOpts,
    ) -> Result<u64> {
        self.disk_of(id)?
            .call(|reply| Req::Write {
                id,
                offset,
                data,
                opts,
                reply,
            })
            .await
    }

    /// Zeroes `len` bytes at `offset`, releasing whole blocks when `unmap`.
    pub async fn write_zeroes(
        &self,
        id: ChunkId,
        offset: u64,
        len: u64,
        unmap: bool,
        opts: WriteOpts,
    ) -> Result<u64> {
        self.disk_of(id)?
            .call(|reply| Req::Zero {
                id,
                offset,
                len,
                unmap,
                opts,
                reply,
            })
            .await
    }

    /// Reads `len` bytes at `offset`, verifying every block's checksum. `epoch` 0 skips fencing.
    pub async fn read(&self, id: ChunkId, offset: u64, len: u64, epoch: u64) -> Result<ReadOut> {
        self.disk_of(id)?
            .call(|reply| Req::Read {
                id,
                offset,
                len,
                epoch,
                reply,
            })
            .await
    }

    /// Verifies the checksums of `[offset, offset+len)`; returns the blocks that fail (and
    /// records them as bad).
    pub async fn scrub(&self, id: ChunkId, offset: u64, len: u64) -> Result<Vec<u64>> {
        self.disk_of(id)?
            .call(|reply| Req::Scrub {
                id,
                offset,
                len,
                reply,
            })
            .await
    }

    /// Makes everything acknowledged before it durable: one chunk, or all chunks when `None`.
    pub async fn flush(&self, id: Option<ChunkId>) -> Result<()> {
        if let Some(id) = id {
            return self
                .disk_of(id)?
                .call(|reply| Req::Flush {
                    id: Some(id),
                    reply: Some(reply),
                })
                .await;
        }
        let mut first_err = None;
        for d in self
            .disks
            .iter()
            .filter(|d| !matches!(d.shared.state(), DiskState::Failed(_)))
        {
            if let Err(e) = d
                .call(|reply| Req::Flush {
                    id: None,
                    reply: Some(reply),
                })
                .await
            {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Starts the store's background work on the current runtime: a checkpoint of every
    /// directory every [`CHECKPOINT_EVERY`] (bounding the write log that a restart replays, as
    /// ext4's commit interval bounds its journal), and the scrubber at the configured rate.
    pub fn start_background(self: &Arc<Self>) {
        let store = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(s) = store.upgrade() else { return };
                s.checkpoint();
            }
        });
        tokio::spawn(scrub::run(self.clone(), self.cfg.scrub_rate, SCRUB_PAUSE));
    }

    /// Starts a checkpoint of every directory without waiting for it.
    pub fn checkpoint(&self) {
        for d in &self.disks {
            d.send(Req::Flush {
                id: None,
                reply: None,
            });
        }
    }

    pub async fn info(&self, id: ChunkId) -> Result<ChunkInfo> {
        self.disk_of(id)?
            .call(|reply| Req::Info { id, reply })
            .await
    }

    /// Deletes a chunk replica and its records.
    pub async fn delete(&self, id: ChunkId, epoch: u64) -> Result<()> {
        self.disk_of(id)?
            .call(|reply| Req::Delete { id, epoch, reply })
            .await?;
        if let Ok(mut m) = self.index.write() {
            m.remove(&id);
        }
        Ok(())
    }

    /// Ranges written after sequence number `since` (merged, sorted), and the chunk's version.
    /// [`Error::LogTruncated`] when the log no longer reaches back that far: copy everything.
    pub async fn written_since(&self, id: ChunkId, since: u64) -> Result<(Vec<WrittenRange>, u64)> {
        self.disk_of(id)?
            .call(|reply| Req::Since { id, since, reply })
            .await
    }

    /// Takes snapshot `snap` (non-zero) of chunk `id`: ordered after every write acknowledged before it
    /// and before every write admitted after it; durable once answered. A write-class request:
    /// `epoch` is fenced like a write's.
    pub async fn snapshot(&self, id: ChunkId, snap: u64, epoch: u64) -> Result<()> {
        // 0 stands for "no snapshot" on the wire (a copy of the chunk itself).
        if snap == 0 {
            return Err(Error::Invalid("snapshot ids are non-zero".into()));
        }
        self.disk_of(id)?
            .call(|reply| Req::Snapshot {
                id,
                snap,
                epoch,
                reply,
            })
            .await
    }

    /// Deletes snapshot `snap` of chunk `id`, freeing the space only it held.
    pub async fn snapshot_delete(&self, id: ChunkId, snap: u64, epoch: u64) -> Result<()> {
        self.disk_of(id)?
            .call(|reply| Req::SnapshotDelete {
                id,
                snap,
                epoch,
                reply,
            })
            .await
    }

    /// Reads `len` bytes at `offset` of snapshot `snap` of chunk `id`, verifying every block's
    /// checksum; the version is the chunk's when the snapshot was taken.
    pub async fn snapshot_read(
        &self,
        id: ChunkId,
        snap: u64,
        offset: u64,
        len: u64,
    ) -> Result<ReadOut> {
        self.disk_of(id)?
            .call(|reply| Req::SnapshotRead {
                id,
                snap,
                offset,
                len,
                reply,
            })
            .await
    }

    /// Verifies the blocks snapshot `snap` of chunk `id` holds itself in `[offset, offset+len)`;
    /// returns the ones that fail (logged and counted; they stay readable as errors only).
    pub async fn snapshot_scrub(
        &self,
        id: ChunkId,
        snap: u64,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u64>> {
        self.disk_of(id)?
            .call(|reply| Req::SnapshotScrub {
                id,
                snap,
                offset,
                len,
                reply,
            })
            .await
    }

    /// The snapshots of chunk `id`, oldest first, with the space each holds.
    pub async fn snapshots(&self, id: ChunkId) -> Result<Vec<SnapshotInfo>> {
        self.disk_of(id)?
            .call(|reply| Req::SnapshotList { id, reply })
            .await
    }

    /// Every chunk on every directory, sorted.
    pub fn list(&self) -> Vec<ChunkId> {
        let mut v: Vec<ChunkId> = self
            .index
            .read()
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default();
        v.sort_unstable();
        v
    }

    /// Bytes allocated on disk per volume (chunk files with their headers and tables, and
    /// their snapshot files), from the files' block counts: one `stat` per file of each
    /// volume's directory, so call it off the runtime's workers.
    pub fn usage(&self) -> BTreeMap<u64, u64> {
        let dirs: BTreeSet<(u64, usize)> = self
            .index
            .read()
            .map(|m| m.iter().map(|(id, d)| (id.volume, *d)).collect())
            .unwrap_or_default();
        let mut out = BTreeMap::new();
        for (volume, d) in dirs {
            let Some(disk) = self.disks.get(d) else {
                continue;
            };
            let dir = layout::chunk_path(&disk.path, ChunkId { volume, index: 0 });
            let Some(Ok(entries)) = dir.parent().map(std::fs::read_dir) else {
                continue;
            };
            // Files deleted meanwhile simply count nothing.
            let bytes: u64 = entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum();
            *out.entry(volume).or_insert(0) += bytes;
        }
        out
    }

    pub fn disks(&self) -> Vec<DiskStatus> {
        self.disks
            .iter()
            .map(|d| {
                let (total_bytes, free_bytes) = disk::statvfs(&d.path).unwrap_or((0, 0));
                DiskStatus {
                    index: d.index,
                    path: d.path.clone(),
                    state: d.shared.state(),
                    total_bytes,
                    free_bytes,
                    chunks: d.shared.chunks.load(Ordering::Relaxed),
                    io_engine: d.shared.engine,
                }
            })
            .collect()
    }

    /// Waits for in-flight requests, checkpoints every directory and stops the engine threads.
    /// Requests arriving afterwards get [`Error::ShuttingDown`].
    pub async fn shutdown(&self) {
        for d in &self.disks {
            if let Err(e) = d.call(|reply| Req::Shutdown { reply }).await {
                if !matches!(e, Error::DiskFailed { .. }) {
                    tracing::warn!(dir = %d.path.display(), "shutdown: {e}");
                }
            }
        }
        for d in &self.disks {
            d.join();
        }
    }
}
