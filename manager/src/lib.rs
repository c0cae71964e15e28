//! The cluster manager: a Raft group (raft-rs) whose replicated state machine holds storage
//! nodes and their health, volumes, chunk placement with epochs, attachments with leases, and
//! recovery tasks. Every member serves the gRPC API of `ironsan_common::proto::manager`.
//!
//! - `raftlog`: raft-rs `Storage` on RocksDB (log, hard state, snapshots).
//! - `node`: the driver thread around `RawNode`; `transport`: member-to-member messages.
//! - `state`: the state machine; `placement`: where replicas go; `health`: the leader's
//!   heartbeat tracking and recovery planning.
//! - `service`: the gRPC services; `server`: one member, assembled.

pub mod error;
pub mod health;
pub mod node;
pub mod placement;
pub mod raftlog;
pub mod server;
pub mod service;
mod slog_bridge;
pub mod state;
pub mod transport;

pub use error::Error;
pub use server::{Server, ServerConfig};
