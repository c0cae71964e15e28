//! Shared pieces of IronSAN that every daemon uses: human-readable sizes, CRC32C helpers,
//! logging setup, the `/metrics` + `/healthz` endpoint, the protobuf wire types and the
//! failover client of the manager (`manager_client`).
//!
//! Nothing here knows about iSCSI, chunks or Raft; those live in their own crates.

pub mod crc;
pub mod manager_client;
pub mod observe;
pub mod proto;
pub mod size;

pub use size::{parse_size, ByteSize, SizeError};
