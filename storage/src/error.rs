//! The storage crate's errors. Each variant is a distinct answer on the wire, so a client can
//! tell a stale writer from a corrupt block from a full disk.

use std::io;

use crate::chunk::ChunkId;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("chunk {0} not found")]
    NotFound(ChunkId),
    #[error("chunk {0} already exists")]
    Exists(ChunkId),
    #[error("snapshot {snapshot} of chunk {chunk} not found")]
    SnapshotNotFound { chunk: ChunkId, snapshot: u64 },
    #[error("snapshot {snapshot} of chunk {chunk} already exists")]
    SnapshotExists { chunk: ChunkId, snapshot: u64 },
    #[error("stale epoch {got} for chunk {chunk}: this replica has seen {current}")]
    StaleEpoch {
        chunk: ChunkId,
        got: u64,
        current: u64,
    },
    #[error("range {offset}+{len} is outside chunk {chunk} ({size} bytes)")]
    OutOfRange {
        chunk: ChunkId,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("checksum mismatch in chunk {chunk}, block {block}")]
    Checksum { chunk: ChunkId, block: u64 },
    #[error("no space left in data directory {dir}")]
    NoSpace { dir: String },
    #[error("data directory {dir} has failed: {reason}")]
    DiskFailed { dir: String, reason: String },
    #[error(
        "write log of chunk {chunk} starts at {log_start}, after {since}: a full copy is needed"
    )]
    LogTruncated {
        chunk: ChunkId,
        since: u64,
        log_start: u64,
    },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("I/O error in {dir}: {source}")]
    Io { dir: String, source: io::Error },
    #[error("metadata store in {dir}: {reason}")]
    Meta { dir: String, reason: String },
    #[error("the storage daemon is shutting down")]
    ShuttingDown,
    // Client side of the data path.
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("connection to {addr} lost")]
    Disconnected { addr: String },
    #[error("request to {addr} timed out after {ms} ms")]
    Timeout { addr: String, ms: u64 },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{message} (remote error {code})")]
    Remote { code: i32, message: String },
}
