//! The chunk store: every data directory of this daemon, behind one async API.
//!
//! Each directory ([`disk`]) is served by its own engine thread that owns the directory's
//! io_uring, chunk files and RocksDB; this module routes a request to the directory holding
//! its chunk and places new chunks on the healthy directory with the most free space.

use std::path::PathBuf;

use bytes::Bytes;

use crate::chunk::{ChunkId, ChunkInfo, WrittenRange};
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

/// Every data directory of one storage daemon.
pub struct Store {
    _cfg: StoreConfig,
}

impl Store {
    /// Opens (or initialises) every directory, replaying each one's write log. Blocking: call it
    /// before the runtime serves requests or from `spawn_blocking`. A directory that cannot be
    /// opened is reported as failed; the others serve.
    pub fn open(cfg: StoreConfig) -> Result<Self> {
        if cfg.dirs.is_empty() {
            return Err(Error::Invalid("no data directory given".into()));
        }
        Ok(Self { _cfg: cfg })
    }

    /// Creates an empty (sparse) chunk of `size` bytes.
    pub async fn create(&self, id: ChunkId, size: u64, epoch: u64) -> Result<ChunkInfo> {
        let _ = (id, size, epoch);
        Err(Error::Invalid("not implemented yet".into()))
    }

    /// Writes `data` at `offset`; returns the write's sequence number.
    pub async fn write(
        &self,
        id: ChunkId,
        offset: u64,
        data: Bytes,
        opts: WriteOpts,
    ) -> Result<u64> {
        let _ = (id, offset, data, opts);
        Err(Error::Invalid("not implemented yet".into()))
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
        let _ = (id, offset, len, unmap, opts);
        Err(Error::Invalid("not implemented yet".into()))
    }

    /// Reads `len` bytes at `offset`, verifying every block's checksum. `epoch` 0 skips fencing.
    pub async fn read(&self, id: ChunkId, offset: u64, len: u64, epoch: u64) -> Result<ReadOut> {
        let _ = (id, offset, len, epoch);
        Err(Error::Invalid("not implemented yet".into()))
    }

    /// Makes everything acknowledged before it durable: one chunk, or all chunks when `None`.
    pub async fn flush(&self, id: Option<ChunkId>) -> Result<()> {
        let _ = id;
        Err(Error::Invalid("not implemented yet".into()))
    }

    pub async fn info(&self, id: ChunkId) -> Result<ChunkInfo> {
        let _ = id;
        Err(Error::Invalid("not implemented yet".into()))
    }

    /// Deletes a chunk replica and its records.
    pub async fn delete(&self, id: ChunkId, epoch: u64) -> Result<()> {
        let _ = (id, epoch);
        Err(Error::Invalid("not implemented yet".into()))
    }

    /// Ranges written after sequence number `since` (merged, sorted), and the chunk's version.
    /// [`Error::LogTruncated`] when the log no longer reaches back that far: copy everything.
    pub async fn written_since(&self, id: ChunkId, since: u64) -> Result<(Vec<WrittenRange>, u64)> {
        let _ = (id, since);
        Err(Error::Invalid("not implemented yet".into()))
    }

    /// Every chunk on every healthy directory.
    pub fn list(&self) -> Vec<ChunkId> {
        Vec::new()
    }

    pub fn disks(&self) -> Vec<DiskStatus> {
        Vec::new()
    }

    /// Flushes everything and stops the engine threads.
    pub async fn shutdown(&self) {}
}
