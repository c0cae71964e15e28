//! Bounds-checked field access to CDBs and parameter lists.
//!
//! Every read of initiator-supplied bytes goes through [`Fields`], which yields zero for bytes
//! past the end instead of panicking; handlers check lengths explicitly where a short buffer
//! is an error of its own.

use super::sense::{ScsiResult, INVALID_FIELD_IN_CDB};

/// Big-endian fields of a byte slice; reads past the end see zero bytes.
#[derive(Clone, Copy)]
pub struct Fields<'a>(pub &'a [u8]);

impl Fields<'_> {
    pub fn u8(&self, at: usize) -> u8 {
        self.0.get(at).copied().unwrap_or(0)
    }

    pub fn bit(&self, at: usize, bit: u8) -> bool {
        self.u8(at) & (1 << bit) != 0
    }

    fn be(&self, at: usize, n: usize) -> u64 {
        (0..n).fold(0u64, |acc, i| {
            (acc << 8) | u64::from(self.u8(at.saturating_add(i)))
        })
    }

    pub fn u16(&self, at: usize) -> u16 {
        self.be(at, 2) as u16
    }

    pub fn u24(&self, at: usize) -> u32 {
        self.be(at, 3) as u32
    }

    pub fn u32(&self, at: usize) -> u32 {
        self.be(at, 4) as u32
    }

    pub fn u64(&self, at: usize) -> u64 {
        self.be(at, 8)
    }
}

/// CDB length implied by the operation code's group (SPC-4 4.2.5.1); `None` for the
/// reserved and vendor-specific groups, where the length cannot be known.
pub fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        3 if opcode == 0x7f => Some(32),
        _ => None,
    }
}

/// Fails with INVALID FIELD IN CDB unless the CDB has at least its group's length.
pub fn check_len(cdb: &[u8]) -> ScsiResult<()> {
    match cdb.first().copied().and_then(cdb_len) {
        Some(n) if cdb.len() >= n => Ok(()),
        _ => Err(INVALID_FIELD_IN_CDB.into()),
    }
}

/// Block address and count of the READ/WRITE/VERIFY family, decoded by CDB size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub lba: u64,
    pub blocks: u32,
}

/// LBA and transfer length of a 6/10/12/16-byte CDB of the usual layout.
/// READ(6)/WRITE(6) encode a length of 0 as 256 blocks (SBC-3 5.15).
pub fn rw_extent(cdb: &[u8]) -> Extent {
    let f = Fields(cdb);
    match cdb.len() {
        6 => {
            let blocks = match f.u8(4) {
                0 => 256,
                n => u32::from(n),
            };
            Extent {
                lba: u64::from(f.u24(1) & 0x1f_ffff),
                blocks,
            }
        }
        10 => Extent {
            lba: u64::from(f.u32(2)),
            blocks: u32::from(f.u16(7)),
        },
        12 => Extent {
            lba: u64::from(f.u32(2)),
            blocks: f.u32(6),
        },
        _ => Extent {
            lba: f.u64(2),
            blocks: f.u32(10),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_never_panic() {
        let f = Fields(&[1, 2, 3]);
        assert_eq!(f.u16(0), 0x0102);
        assert_eq!(f.u32(1), 0x0203_0000);
        assert_eq!(f.u64(usize::MAX), 0);
        assert!(f.bit(0, 0));
    }

    #[test]
    fn extents() {
        assert_eq!(
            rw_extent(&[0x08, 0x1f, 0xff, 0xff, 0, 0]),
            Extent {
                lba: 0x1f_ffff,
                blocks: 256
            }
        );
        let mut c = [0u8; 16];
        c[0] = 0x88;
        c[9] = 5;
        c[13] = 7;
        assert_eq!(rw_extent(&c), Extent { lba: 5, blocks: 7 });
        assert_eq!(cdb_len(0x12), Some(6));
        assert_eq!(cdb_len(0xa3), Some(12));
        assert_eq!(cdb_len(0x9e), Some(16));
        assert_eq!(cdb_len(0x7f), Some(32));
        assert_eq!(cdb_len(0xc0), None);
        assert!(check_len(&[0x28, 0, 0]).is_err());
    }
}
