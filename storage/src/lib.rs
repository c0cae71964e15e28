//! IronSAN's storage daemon: chunk replicas on local disks, and the data path that reaches them.
//!
//! - [`store`]: the chunk store. One engine thread per data directory owns an io_uring, the
//!   chunk files (O_DIRECT, a CRC32C per 4 KiB block) and the directory's RocksDB (chunk
//!   records, epochs, the write log).
//! - [`frame`], [`server`], [`client`]: the data-path protocol (length-prefixed frames with a
//!   prost header and a raw payload, CRC32C over both), the daemon's listener and the client
//!   pool the gateway uses. [`wire`] translates errors and types to and from the protobuf
//!   once; [`metrics`] holds the server's counters.
//! - [`membership`]: registration with the cluster manager and heartbeats carrying disk health,
//!   and the replica drops the manager orders in return.
//!
//! The unit everything is addressed by is a [`ChunkId`]: a volume id and a chunk index.

pub mod buf;
pub mod chunk;
pub mod client;
pub mod error;
pub mod frame;
pub mod membership;
pub mod metrics;
pub mod server;
pub mod store;
pub mod wire;

pub use buf::AlignedBuf;
pub use chunk::{ChunkId, ChunkInfo, SnapshotInfo, WrittenRange, BLOCK, MAX_IO, SECTOR};
pub use client::{Client, ClientConfig, CopyStream, Pool};
pub use error::{Error, Result};
pub use store::{DiskState, DiskStatus, IoEngine, ReadOut, Store, StoreConfig, WriteOpts};
