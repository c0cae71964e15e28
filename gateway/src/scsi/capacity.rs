//! READ CAPACITY (10)/(16) and the geometry constants they report.

use bytes::{BufMut, Bytes, BytesMut};

use super::cdb::Fields;
use super::{LOGICAL_BLOCK, PHYSICAL_BLOCK};

/// log2(logical blocks per physical block), READ CAPACITY (16) byte 13.
pub const LBPPB_EXPONENT: u8 = (PHYSICAL_BLOCK / LOGICAL_BLOCK).trailing_zeros() as u8;

/// READ CAPACITY (10): last LBA, or FFFFFFFFh when it does not fit (SBC-3 5.16.2).
pub fn read_capacity10(blocks: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(8);
    let last = blocks.saturating_sub(1);
    b.put_u32(u32::try_from(last).unwrap_or(u32::MAX));
    b.put_u32(LOGICAL_BLOCK as u32);
    b.freeze()
}

/// READ CAPACITY (16) with thin provisioning reported (LBPME, LBPRZ).
pub fn read_capacity16(blocks: u64, cdb: &[u8]) -> Bytes {
    let alloc = Fields(cdb).u32(10) as usize;
    let mut b = BytesMut::with_capacity(32);
    b.put_u64(blocks.saturating_sub(1));
    b.put_u32(LOGICAL_BLOCK as u32);
    b.put_u8(0); // no protection information
    b.put_u8(LBPPB_EXPONENT & 0x0f);
    b.put_u16(0x8000 | 0x4000); // LBPME, LBPRZ; lowest aligned LBA 0
    b.put_bytes(0, 16);
    b.truncate(alloc);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_fields() {
        assert_eq!(&read_capacity10(2048)[..], &[0, 0, 0x07, 0xff, 0, 0, 2, 0]);
        assert_eq!(&read_capacity10(1 << 40)[..4], &[0xff; 4]);
        let mut cdb = [0u8; 16];
        cdb[0] = 0x9e;
        cdb[1] = 0x10;
        cdb[13] = 32;
        let d = read_capacity16(2048, &cdb);
        assert_eq!(d.len(), 32);
        assert_eq!(d[7], 0xff);
        assert_eq!(d[13], 3);
        assert_eq!(d[14] & 0xc0, 0xc0);
        cdb[13] = 12;
        assert_eq!(read_capacity16(2048, &cdb).len(), 12);
    }
}
