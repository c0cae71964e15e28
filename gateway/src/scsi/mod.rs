//! SCSI block command set (SPC-4 / SBC-3) for one logical unit.
//!
//! The iSCSI layer hands a [`Command`] (CDB, the data-out buffer it collected, the I_T nexus)
//! to [`Lun::execute`] and gets a [`Response`]: status, sense data and the full data-in
//! buffer. Transport concerns (Expected Data Transfer Length, residuals, R2T, digests) stay
//! in `crate::iscsi`; this module never sees a PDU.
//!
//! INTERFACE NOTE (to be replaced by the module's own docs): everything below the types
//! in this file is implemented in sibling modules.

use std::sync::Arc;

use bytes::Bytes;

use crate::device::BlockDevice;

/// Logical block size reported to initiators.
pub const LOGICAL_BLOCK: u64 = 512;
/// Physical block size (READ CAPACITY 16: 8 logical per physical).
pub const PHYSICAL_BLOCK: u64 = 4096;

/// One I_T nexus: an initiator port (name + ISID) logged in through a target portal group.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Nexus {
    /// Unique for the life of the process; keys unit attentions and reservations.
    pub id: u64,
    /// iSCSI initiator name (`InitiatorName` at login).
    pub initiator: String,
    /// Initiator session id from the login PDU.
    pub isid: [u8; 6],
    /// Target portal group tag.
    pub tpgt: u16,
}

/// SCSI status byte values (SAM-5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Good = 0x00,
    CheckCondition = 0x02,
    ConditionMet = 0x04,
    Busy = 0x08,
    ReservationConflict = 0x18,
    TaskSetFull = 0x28,
    TaskAborted = 0x40,
}

/// A command as the transport delivers it.
pub struct Command<'a> {
    pub cdb: &'a [u8],
    /// Data-out bytes the initiator sent (empty for commands without data-out).
    pub data_out: Bytes,
    pub nexus: &'a Nexus,
}

/// What the logical unit answers.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: Status,
    /// Sense data (fixed format) with CHECK CONDITION.
    pub sense: Option<Bytes>,
    /// Data-in; the transport truncates it to the initiator's expected length.
    pub data: Bytes,
}

/// Identity a LUN reports in INQUIRY and its VPD pages.
#[derive(Debug, Clone)]
pub struct LunIdentity {
    /// Volume name; also the unit serial number (VPD 0x80).
    pub name: String,
    /// Stable 64-bit NAA IEEE Registered Extended id (VPD 0x83), derived from the volume id.
    pub naa: u64,
}

/// What kind of reset a task management function asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetKind {
    Lun,
    TargetWarm,
}

/// A logical unit: the device plus the SCSI state around it (mode pages, reservations,
/// unit attentions).
pub struct Lun {
    device: Arc<dyn BlockDevice>,
    identity: LunIdentity,
}

impl Lun {
    pub fn new(device: Arc<dyn BlockDevice>, identity: LunIdentity) -> Self {
        Self { device, identity }
    }
}
