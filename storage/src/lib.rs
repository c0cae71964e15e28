//! IronSAN's storage daemon: chunk replicas on local disks, and the data path that reaches them.
//!
//! - [`store`]: the chunk store. One engine thread per data directory owns an io_uring, the
//!   chunk files (O_DIRECT, a CRC32C per 4 KiB block) and the directory's RocksDB (chunk
//!   records, epochs, the write log).
//! - [`frame`], [`server`], [`client`]: the data-path protocol (length-prefixed frames with a
//!   prost header and a raw payload, CRC32C over both), the daemon's listener and the client
//!   pool the gateway uses.
//!
//! The unit everything is addressed by is a [`ChunkId`]: a volume id and a chunk index.

pub mod buf;
pub mod chunk;
pub mod error;
pub mod store;

pub use buf::AlignedBuf;
pub use chunk::{ChunkId, ChunkInfo, WrittenRange, BLOCK, SECTOR};
pub use error::{Error, Result};
pub use store::{DiskState, DiskStatus, IoEngine, ReadOut, Store, StoreConfig, WriteOpts};
