//! IronSAN's iSCSI target gateway.
//!
//! - [`device`]: the block-device trait a LUN serves from, and its file and memory backends.
//! - [`scsi`]: the SPC-4/SBC-3 command set of one logical unit.
//! - [`iscsi`]: RFC 7143: PDUs, login and negotiation, sessions, the portal.
//! - [`target`]: targets (one per volume) and the portal server that ties the rest together.
//! - [`replica`]: the replicated block device (a volume served from storage daemons).
//! - [`qos`]: per-volume IOPS and bandwidth limits (token buckets) on the command path.
//! - [`cluster`]: serving the volumes the manager attaches to this gateway.

pub mod cluster;
pub mod device;
pub mod iscsi;
pub mod metrics;
pub mod qos;
pub mod replica;
pub mod scsi;
pub mod target;
