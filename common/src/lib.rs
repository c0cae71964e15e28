//! Shared pieces of IronSAN that every daemon uses: human-readable sizes, CRC32C helpers,
//! logging setup, the `/metrics` + `/healthz` endpoint, and the protobuf wire types.
//!
//! Nothing here knows about iSCSI, chunks or Raft; those live in their own crates.

pub mod crc;
pub mod observe;
pub mod proto;
pub mod size;

pub use size::{parse_size, ByteSize, SizeError};
