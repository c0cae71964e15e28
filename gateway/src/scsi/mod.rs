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

/// Sense keys (SPC-4).
pub mod key {
    pub const NO_SENSE: u8 = 0x00;
    pub const MEDIUM_ERROR: u8 = 0x03;
    pub const ILLEGAL_REQUEST: u8 = 0x05;
    pub const UNIT_ATTENTION: u8 = 0x06;
}

/// Fixed-format sense data.
pub fn sense(key: u8, asc: u8, ascq: u8) -> Bytes {
    let mut s = vec![0u8; 18];
    s[0] = 0x70;
    s[2] = key;
    s[7] = 10;
    s[12] = asc;
    s[13] = ascq;
    Bytes::from(s)
}

// TEMPORARY transport-test stub; replaced by the full command set.
impl Lun {
    pub fn new(device: Arc<dyn BlockDevice>, identity: LunIdentity) -> Self {
        Self { device, identity }
    }
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }
    pub fn identity(&self) -> &LunIdentity {
        &self.identity
    }
    pub fn reset(&self, _kind: ResetKind, _by: Option<&Nexus>) {}
    pub fn nexus_gone(&self, _nexus: &Nexus) {}
    pub async fn execute(&self, cmd: Command<'_>) -> Response {
        let c = cmd.cdb;
        let good = |data: Vec<u8>| Response { status: Status::Good, sense: None, data: Bytes::from(data) };
        let bad = || Response { status: Status::CheckCondition, sense: Some(sense(key::ILLEGAL_REQUEST, 0x20, 0)), data: Bytes::new() };
        let blocks = self.device.size() / LOGICAL_BLOCK;
        let be32 = |i: usize| c.get(i..i + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as u64).unwrap_or(0);
        let be16 = |i: usize| c.get(i..i + 2).map(|b| u16::from_be_bytes([b[0], b[1]]) as u64).unwrap_or(0);
        let be64 = |i: usize| (be32(i) << 32) | be32(i + 4);
        match c.first() {
            Some(0x00) => good(vec![]),
            Some(0x12) => {
                let mut d = vec![0u8; 36];
                d[2] = 6; d[3] = 2; d[4] = 31; d[7] = 0x02;
                d[8..16].copy_from_slice(b"IRONSAN ");
                d[16..32].copy_from_slice(b"VOLUME          ");
                d.truncate(be16(3) as usize);
                good(d)
            }
            Some(0x25) => {
                let mut d = vec![0u8; 8];
                d[0..4].copy_from_slice(&((blocks - 1).min(0xffff_ffff) as u32).to_be_bytes());
                d[4..8].copy_from_slice(&512u32.to_be_bytes());
                good(d)
            }
            Some(0x9e) => {
                let mut d = vec![0u8; 32];
                d[0..8].copy_from_slice(&(blocks - 1).to_be_bytes());
                d[8..12].copy_from_slice(&512u32.to_be_bytes());
                d[13] = 3;
                d.truncate(be32(10) as usize);
                good(d)
            }
            Some(0xa0) => { let mut d = vec![0u8; 16]; d[3] = 8; good(d) }
            Some(0x35) | Some(0x91) => match self.device.flush().await { Ok(()) => good(vec![]), Err(_) => bad() },
            Some(op @ (0x28 | 0x88 | 0x2a | 0x8a)) => {
                let (lba, n) = if matches!(op, 0x28 | 0x2a) { (be32(2), be16(7)) } else { (be64(2), be32(10)) };
                if lba + n > blocks { return Response { status: Status::CheckCondition, sense: Some(sense(key::ILLEGAL_REQUEST, 0x21, 0)), data: Bytes::new() }; }
                if matches!(op, 0x28 | 0x88) {
                    match self.device.read(lba * 512, (n * 512) as usize).await { Ok(d) => Response { status: Status::Good, sense: None, data: d }, Err(_) => bad() }
                } else {
                    match self.device.write(lba * 512, cmd.data_out, false).await { Ok(()) => good(vec![]), Err(_) => bad() }
                }
            }
            _ => bad(),
        }
    }
}

#[doc(hidden)]
pub fn fuzz_execute(_data: &[u8]) {}
