//! Chunk identity and the facts a replica reports about itself.

use std::fmt;

/// Checksum granularity: one CRC32C per 4 KiB block of a chunk.
pub const BLOCK: u64 = 4096;
/// Addressing granularity: offsets and lengths are multiples of the 512-byte logical block.
pub const SECTOR: u64 = 512;
/// Largest read or write one request may carry.
pub const MAX_IO: u64 = 8 << 20;
/// Largest chunk a replica may be created with.
pub const MAX_CHUNK: u64 = 1 << 30;

/// A chunk: the unit of placement, `(volume id, index)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId {
    pub volume: u64,
    pub index: u32,
}

impl ChunkId {
    pub const fn new(volume: u64, index: u32) -> Self {
        Self { volume, index }
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}/{}", self.volume, self.index)
    }
}

/// What a replica knows about one of its chunks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkInfo {
    pub id: ChunkId,
    /// Size in bytes (a multiple of [`BLOCK`]).
    pub size: u64,
    /// Newest epoch this replica has seen; older mutating requests are refused.
    pub epoch: u64,
    /// Sequence number of the newest write applied (0: never written).
    pub version: u64,
    /// Oldest sequence number the write log still holds ranges for.
    pub log_start: u64,
    /// Bytes of data actually allocated on disk (thin provisioning).
    pub used: u64,
    /// Blocks known to fail their checksum (found by reads or scrub), not yet rewritten.
    pub bad_blocks: u64,
    /// Index of the data directory holding the chunk.
    pub disk: usize,
}

/// A range written since some sequence number, from the write log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WrittenRange {
    pub offset: u64,
    pub len: u64,
}

/// One snapshot of a chunk replica (see `store/snap.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The caller's snapshot id.
    pub id: u64,
    /// The chunk's version when the snapshot was taken.
    pub version: u64,
    /// Bytes allocated on disk for the blocks this snapshot holds itself.
    pub used: u64,
    /// Blocks this snapshot holds itself (copied before an overwrite, or kept when a newer
    /// snapshot was deleted).
    pub blocks: u64,
}
