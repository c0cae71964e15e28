//! The cluster manager: a Raft group (raft-rs) whose replicated state machine holds storage
//! nodes and their health, volumes, chunk placement with epochs, attachments with leases, and
//! recovery tasks. Its gRPC API (`ironsan_common::proto::manager`) is served by every member.

pub mod placement;
pub mod raftlog;
