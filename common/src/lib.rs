//! Shared pieces of IronSAN that every daemon uses: human-readable sizes, CRC32C helpers,
//! logging setup and the `/metrics` + `/healthz` endpoint.
//!
//! Nothing here knows about iSCSI, chunks or Raft; those live in their own crates.

pub mod crc;
pub mod observe;
pub mod size;

pub use size::{parse_size, ByteSize, SizeError};
