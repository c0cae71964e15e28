//! Sense data (SPC-4 4.5.3, fixed format) and the error type command handlers return.
//!
//! Handlers return `Result<_, ScsiError>`; [`crate::scsi::Lun::execute`] turns an error into
//! CHECK CONDITION with fixed-format sense (D_SENSE is 0 in the control mode page) or into
//! RESERVATION CONFLICT. The transport builds its own sense (e.g. for a digest error) with
//! [`sense`].

use bytes::{BufMut, Bytes, BytesMut};

/// Sense keys (SPC-4 table 54) used by this target.
pub mod key {
    pub const NO_SENSE: u8 = 0x00;
    pub const NOT_READY: u8 = 0x02;
    pub const MEDIUM_ERROR: u8 = 0x03;
    pub const HARDWARE_ERROR: u8 = 0x04;
    pub const ILLEGAL_REQUEST: u8 = 0x05;
    pub const UNIT_ATTENTION: u8 = 0x06;
    pub const DATA_PROTECT: u8 = 0x07;
    pub const ABORTED_COMMAND: u8 = 0x0b;
    pub const MISCOMPARE: u8 = 0x0e;
}

/// One sense condition: key, additional sense code and qualifier, optional INFORMATION.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    /// INFORMATION field (VALID bit set when present), e.g. the miscompare offset.
    pub information: Option<u32>,
}

impl Sense {
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Self {
            key,
            asc,
            ascq,
            information: None,
        }
    }

    pub const fn with_information(mut self, info: u32) -> Self {
        self.information = Some(info);
        self
    }

    /// Fixed-format (response code 0x70) sense bytes, 18 long.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(18);
        let valid = if self.information.is_some() { 0x80 } else { 0 };
        b.put_u8(valid | 0x70);
        b.put_u8(0); // obsolete
        b.put_u8(self.key & 0x0f);
        b.put_u32(self.information.unwrap_or(0));
        b.put_u8(10); // additional sense length: bytes 8..18
        b.put_u32(0); // command-specific information
        b.put_u8(self.asc);
        b.put_u8(self.ascq);
        b.put_u8(0); // field replaceable unit code
        b.put_bytes(0, 3); // sense-key specific
        b.freeze()
    }
}

/// Fixed-format sense bytes for the transport and tests.
pub fn sense(key: u8, asc: u8, ascq: u8) -> Bytes {
    Sense::new(key, asc, ascq).to_bytes()
}

// The conditions handlers raise, named as in SPC-4 Annex D.
pub const INVALID_OPCODE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00);
pub const LBA_OUT_OF_RANGE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00);
pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00);
pub const LUN_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x25, 0x00);
pub const INVALID_FIELD_IN_PARAMETER_LIST: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x00);
pub const PARAMETER_LIST_LENGTH_ERROR: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x1a, 0x00);
pub const SAVING_PARAMETERS_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x39, 0x00);
pub const INSUFFICIENT_REGISTRATION_RESOURCES: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x55, 0x04);
pub const READ_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x11, 0x00);
pub const WRITE_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x0c, 0x00);
/// No replica reachable: the I/O fails plainly (an initiator must not retry into stale data).
pub const NOT_READY_UNAVAILABLE: Sense = Sense::new(key::NOT_READY, 0x04, 0x00);
/// The gateway lost the volume's lease: another gateway is taking over (retryable elsewhere).
pub const NOT_READY_TRANSITION: Sense = Sense::new(key::NOT_READY, 0x04, 0x0a);
pub const INTERNAL_TARGET_FAILURE: Sense = Sense::new(key::HARDWARE_ERROR, 0x44, 0x00);
pub const MISCOMPARE_DURING_VERIFY: Sense = Sense::new(key::MISCOMPARE, 0x1d, 0x00);
/// A command that would change the medium of a write-protected logical unit.
pub const WRITE_PROTECTED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x00);
pub const NO_ADDITIONAL_SENSE: Sense = Sense::new(key::NO_SENSE, 0x00, 0x00);

/// Why a command did not complete with GOOD status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScsiError {
    /// CHECK CONDITION with this sense.
    #[error("check condition: key {:#x} asc/ascq {:#04x}/{:#04x}", .0.key, .0.asc, .0.ascq)]
    Check(Sense),
    /// RESERVATION CONFLICT status, no sense.
    #[error("reservation conflict")]
    ReservationConflict,
}

impl From<Sense> for ScsiError {
    fn from(s: Sense) -> Self {
        ScsiError::Check(s)
    }
}

pub type ScsiResult<T> = Result<T, ScsiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_format_layout() {
        let s = MISCOMPARE_DURING_VERIFY.with_information(0x1234).to_bytes();
        assert_eq!(s.len(), 18);
        assert_eq!(s[0], 0xf0);
        assert_eq!(s[2], 0x0e);
        assert_eq!(&s[3..7], &[0, 0, 0x12, 0x34]);
        assert_eq!(s[7], 10);
        assert_eq!((s[12], s[13]), (0x1d, 0));
        let s = sense(key::ILLEGAL_REQUEST, 0x24, 0);
        assert_eq!(s[0], 0x70);
        assert_eq!((s[2], s[12]), (5, 0x24));
    }
}
