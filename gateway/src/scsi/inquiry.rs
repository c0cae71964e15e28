//! INQUIRY: standard data and the vital product data pages (SPC-4 6.6, 7.8; SBC-3 6.6).

use bytes::{BufMut, Bytes, BytesMut};

use super::cdb::Fields;
use super::sense::{ScsiResult, INVALID_FIELD_IN_CDB};
use super::LunIdentity;

pub const VENDOR: &[u8; 8] = b"IRONSAN ";
pub const PRODUCT: &[u8; 16] = b"VOLUME          ";
pub const REVISION: &[u8; 4] = b"0001";

/// IEEE company id in the NAA designator. Placeholder until IronSAN registers an OUI; the
/// designator's uniqueness comes from the volume-derived 64-bit extension.
const IEEE_COMPANY_ID: u64 = 0x00_0000;

/// Limits reported in the Block Limits page and enforced by the handlers.
pub mod limits {
    /// MAXIMUM TRANSFER LENGTH in blocks (4 MiB).
    pub const MAX_TRANSFER: u32 = 8192;
    /// OPTIMAL TRANSFER LENGTH GRANULARITY and OPTIMAL UNMAP GRANULARITY: one physical block.
    pub const GRANULARITY: u32 = 8;
    /// MAXIMUM COMPARE AND WRITE LENGTH in blocks.
    pub const MAX_COMPARE_AND_WRITE: u8 = 255;
    /// MAXIMUM UNMAP LBA COUNT (per descriptor and per command) in blocks: 2 GiB.
    pub const MAX_UNMAP_LBAS: u32 = 0x40_0000;
    /// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
    pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
    /// MAXIMUM WRITE SAME LENGTH in blocks: 2 GiB.
    pub const MAX_WRITE_SAME: u64 = 0x40_0000;
}

/// VPD pages we serve, in ascending order (SPC-4 requires the supported list sorted).
const PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2];

/// VERSION DESCRIPTORs: SAM-5, iSCSI, SPC-4, SBC-3.
const VERSION_DESCRIPTORS: [u16; 4] = [0x00a0, 0x0960, 0x0460, 0x04c0];

pub fn inquiry(cdb: &[u8], id: &LunIdentity) -> ScsiResult<Bytes> {
    let f = Fields(cdb);
    let evpd = f.bit(1, 0);
    let cmddt = f.bit(1, 1);
    let page = f.u8(2);
    let alloc = usize::from(f.u16(3));
    if cmddt || (!evpd && page != 0) {
        return Err(INVALID_FIELD_IN_CDB.into());
    }
    let mut data = if evpd { vpd(page, id)? } else { standard() };
    data.truncate(alloc);
    Ok(data.freeze())
}

fn standard() -> BytesMut {
    let mut b = BytesMut::with_capacity(74);
    b.put_u8(0x00); // peripheral qualifier 0, direct access block device
    b.put_u8(0x00); // not removable
    b.put_u8(0x06); // SPC-4
    b.put_u8(0x10 | 0x02); // HISUP, response data format 2
    b.put_u8(0); // additional length, patched below
    b.put_u8(0x00); // no SCCS, ACC, TPGS, 3PC, PROTECT
    b.put_u8(0x00);
    b.put_u8(0x02); // CMDQUE
    b.put_slice(VENDOR);
    b.put_slice(PRODUCT);
    b.put_slice(REVISION);
    b.put_bytes(0, 20); // vendor specific
    b.put_bytes(0, 2); // clocking, QAS, IUS; reserved
    for v in VERSION_DESCRIPTORS {
        b.put_u16(v);
    }
    b.put_bytes(0, 16 - 2 * VERSION_DESCRIPTORS.len());
    b.put_bytes(0, 74 - b.len());
    b[4] = (b.len() - 5) as u8;
    b
}

fn vpd(page: u8, id: &LunIdentity) -> ScsiResult<BytesMut> {
    let mut body = BytesMut::new();
    match page {
        0x00 => body.put_slice(&PAGES),
        0x80 => body.put_slice(id.name.as_bytes()),
        0x83 => {
            // NAA IEEE Registered Extended (type 6), logical unit association, binary.
            body.put_slice(&[0x01, 0x03, 0x00, 16]);
            let vendor_specific = id.naa >> 28; // 36 bits
            body.put_u64((6 << 60) | (IEEE_COMPANY_ID << 36) | vendor_specific);
            body.put_u64(id.naa);
            // T10 vendor id: vendor + volume name, ASCII.
            let t10 = [&VENDOR[..], id.name.as_bytes()].concat();
            let t10 = &t10[..t10.len().min(251)];
            body.put_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
            body.put_slice(t10);
        }
        0xb0 => {
            use limits::*;
            body.put_u8(0); // WSNZ 0: WRITE SAME with 0 blocks means "to the end"
            body.put_u8(MAX_COMPARE_AND_WRITE);
            body.put_u16(GRANULARITY as u16);
            body.put_u32(MAX_TRANSFER);
            body.put_u32(MAX_TRANSFER); // optimal transfer length
            body.put_u32(MAX_TRANSFER); // maximum prefetch length
            body.put_u32(MAX_UNMAP_LBAS);
            body.put_u32(MAX_UNMAP_DESCRIPTORS);
            body.put_u32(GRANULARITY); // optimal unmap granularity
            body.put_u32(0x8000_0000); // UGAVALID, alignment 0
            body.put_u64(MAX_WRITE_SAME);
            body.put_bytes(0, 0x3c - body.len());
        }
        0xb1 => {
            body.put_u16(1); // non-rotating medium
            body.put_u8(0);
            body.put_u8(0); // form factor not reported
            body.put_bytes(0, 0x3c - body.len());
        }
        0xb2 => {
            body.put_u8(0); // threshold exponent
            body.put_u8(0x80 | 0x40 | 0x20 | 0x04); // LBPU, LBPWS, LBPWS10, LBPRZ
            body.put_u8(0x02); // provisioning type: thin
            body.put_u8(0);
        }
        _ => return Err(INVALID_FIELD_IN_CDB.into()),
    }
    let mut b = BytesMut::with_capacity(4 + body.len());
    b.put_u8(0x00);
    b.put_u8(page);
    b.put_u16(body.len() as u16);
    b.put_slice(&body);
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> LunIdentity {
        LunIdentity {
            name: "vol-a".into(),
            naa: 0x0123_4567_89ab_cdef,
        }
    }

    fn page(p: u8) -> Bytes {
        inquiry(&[0x12, 1, p, 0x10, 0, 0], &id()).unwrap()
    }

    #[test]
    fn standard_data() {
        let d = inquiry(&[0x12, 0, 0, 0, 0xff, 0], &id()).unwrap();
        assert_eq!(d.len(), 74);
        assert_eq!(d[2], 6);
        assert_eq!(d[3], 0x12);
        assert_eq!(usize::from(d[4]) + 5, d.len());
        assert_eq!(&d[8..16], b"IRONSAN ");
        assert_eq!(&d[16..22], b"VOLUME");
        assert_eq!(inquiry(&[0x12, 0, 0, 0, 5, 0], &id()).unwrap().len(), 5);
        assert!(inquiry(&[0x12, 2, 0, 0, 0xff, 0], &id()).is_err(), "CmdDt");
        assert!(
            inquiry(&[0x12, 0, 0x80, 0, 0xff, 0], &id()).is_err(),
            "page without EVPD"
        );
        assert!(inquiry(&[0x12, 1, 0x99, 0, 0xff, 0], &id()).is_err());
    }

    #[test]
    fn every_vpd_page_parses() {
        let list = page(0);
        let n = usize::from(u16::from_be_bytes([list[2], list[3]]));
        assert_eq!(&list[4..4 + n], &PAGES);
        for &p in &PAGES {
            let d = page(p);
            assert_eq!(d[1], p);
            assert_eq!(
                usize::from(u16::from_be_bytes([d[2], d[3]])) + 4,
                d.len(),
                "page {p:#x}"
            );
        }
        assert_eq!(&page(0x80)[4..], b"vol-a");
        let ids = page(0x83);
        assert_eq!((ids[4], ids[5], ids[7]), (0x01, 0x03, 16));
        assert_eq!(ids[8] >> 4, 6);
        assert_eq!(&ids[16..24], &0x0123_4567_89ab_cdefu64.to_be_bytes());
        let t10 = &ids[24..];
        assert_eq!((t10[0], t10[1] & 0x0f), (0x02, 0x01));
        assert_eq!(&t10[4..], b"IRONSAN vol-a");
        let bl = page(0xb0);
        assert_eq!(bl.len(), 64);
        assert_eq!(bl[5], 255);
        assert_eq!(
            u32::from_be_bytes([bl[8], bl[9], bl[10], bl[11]]),
            limits::MAX_TRANSFER
        );
        assert_eq!(u32::from_be_bytes([bl[28], bl[29], bl[30], bl[31]]), 8);
        assert_eq!(&page(0xb1)[4..6], &[0, 1]);
        let lbp = page(0xb2);
        assert_eq!(lbp[5] & 0xe4, 0xe4);
        assert_eq!(lbp[6] & 0x07, 2);
    }
}
