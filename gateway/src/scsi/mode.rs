//! MODE SENSE (6)/(10) and MODE SELECT (6)/(10) (SPC-4 6.11-6.14, 7.5).
//!
//! Pages: Caching (08h, WCE=1: writes land in the page cache / replicas' OS until
//! SYNCHRONIZE CACHE or FUA), Control (0Ah, D_SENSE=0 so fixed-format sense) and
//! Informational Exceptions Control (1Ch). No field is changeable: MODE SELECT accepts a
//! parameter list that restates the current values and refuses any change with INVALID
//! FIELD IN PARAMETER LIST, which SPC-4 allows for unchangeable fields.
//!
//! The mode parameter header's DEVICE-SPECIFIC PARAMETER carries WP (bit 7; SBC-3 mode parameters) for
//! a write-protected logical unit; Linux sd, qemu and libiscsi's test suite read it from MODE
//! SENSE(6) to treat the disk as read-only. It is not changeable by MODE SELECT.

use bytes::{BufMut, Bytes, BytesMut};

use super::cdb::Fields;
use super::sense::{
    ScsiResult, INVALID_FIELD_IN_CDB, INVALID_FIELD_IN_PARAMETER_LIST, PARAMETER_LIST_LENGTH_ERROR,
    SAVING_PARAMETERS_NOT_SUPPORTED,
};
use super::LOGICAL_BLOCK;

/// Current values of each page, including the two-byte page header.
fn page(code: u8) -> Option<&'static [u8]> {
    const CACHING: [u8; 20] = [
        0x08, 0x12, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    // QUEUE ALGORITHM MODIFIER 1: unrestricted reordering (the initiator orders what matters).
    const CONTROL: [u8; 12] = [0x0a, 0x0a, 0x00, 0x10, 0, 0, 0, 0, 0xff, 0xff, 0, 0];
    // DEXCPT: informational exception reporting disabled.
    const IEC: [u8; 12] = [0x1c, 0x0a, 0x08, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    match code {
        0x08 => Some(&CACHING),
        0x0a => Some(&CONTROL),
        0x1c => Some(&IEC),
        _ => None,
    }
}

const ALL_PAGES: [u8; 3] = [0x08, 0x0a, 0x1c];

/// Which values MODE SENSE reports (PAGE CONTROL).
#[derive(Clone, Copy, PartialEq, Eq)]
enum PageControl {
    Current,
    Changeable,
    Default,
}

fn put_page(b: &mut BytesMut, code: u8, pc: PageControl) {
    let Some(p) = page(code) else { return };
    match pc {
        PageControl::Current | PageControl::Default => b.put_slice(p),
        PageControl::Changeable => {
            b.put_slice(&p[..2]);
            b.put_bytes(0, p.len() - 2);
        }
    }
}

/// MODE SENSE (6) when `ten` is false, else MODE SENSE (10); `write_protected` sets WP.
pub fn mode_sense(cdb: &[u8], ten: bool, blocks: u64, write_protected: bool) -> ScsiResult<Bytes> {
    let f = Fields(cdb);
    let dbd = f.bit(1, 3);
    let llbaa = ten && f.bit(1, 4);
    let pc = match f.u8(2) >> 6 {
        0 => PageControl::Current,
        1 => PageControl::Changeable,
        2 => PageControl::Default,
        _ => return Err(SAVING_PARAMETERS_NOT_SUPPORTED.into()),
    };
    let code = f.u8(2) & 0x3f;
    let subpage = f.u8(3);
    let alloc = if ten {
        usize::from(f.u16(7))
    } else {
        usize::from(f.u8(4))
    };

    let mut pages = BytesMut::new();
    match (code, subpage) {
        (0x3f, 0x00 | 0xff) => ALL_PAGES.iter().for_each(|&c| put_page(&mut pages, c, pc)),
        (c, 0x00) if page(c).is_some() => put_page(&mut pages, c, pc),
        _ => return Err(INVALID_FIELD_IN_CDB.into()),
    }

    let mut bd = BytesMut::new();
    if !dbd {
        let n = if pc == PageControl::Changeable {
            0
        } else {
            blocks
        };
        if llbaa {
            bd.put_u64(n);
            bd.put_u32(0);
            bd.put_u32(LOGICAL_BLOCK as u32);
        } else {
            bd.put_u32(u32::try_from(n).unwrap_or(u32::MAX));
            bd.put_u8(0);
            bd.put_uint(LOGICAL_BLOCK, 3);
        }
    }
    // DEVICE-SPECIFIC PARAMETER: WP, and DPOFUA (DPO and FUA bits honoured).
    let device_specific = if write_protected { 0x80 } else { 0 } | 0x10;
    let mut b = BytesMut::new();
    if ten {
        let len = 8 + bd.len() + pages.len();
        b.put_u16((len - 2) as u16);
        b.put_u8(0);
        b.put_u8(device_specific);
        b.put_u8(u8::from(llbaa && !dbd));
        b.put_u8(0);
        b.put_u16(bd.len() as u16);
    } else {
        let len = 4 + bd.len() + pages.len();
        b.put_u8(u8::try_from(len - 1).unwrap_or(u8::MAX));
        b.put_u8(0);
        b.put_u8(device_specific);
        b.put_u8(bd.len() as u8);
    }
    b.put_slice(&bd);
    b.put_slice(&pages);
    b.truncate(alloc);
    Ok(b.freeze())
}

/// MODE SELECT (6) when `ten` is false, else MODE SELECT (10).
pub fn mode_select(cdb: &[u8], ten: bool, params: &[u8]) -> ScsiResult<()> {
    let f = Fields(cdb);
    let pf = f.bit(1, 4);
    let sp = f.bit(1, 0);
    let len = if ten {
        usize::from(f.u16(7))
    } else {
        usize::from(f.u8(4))
    };
    if sp {
        return Err(INVALID_FIELD_IN_CDB.into());
    }
    if len == 0 {
        return Ok(());
    }
    if !pf {
        // Vendor-specific page format is not supported.
        return Err(INVALID_FIELD_IN_CDB.into());
    }
    if params.len() < len {
        return Err(PARAMETER_LIST_LENGTH_ERROR.into());
    }
    let params = &params[..len];
    let p = Fields(params);
    let (header, bd_len) = if ten {
        (8, usize::from(p.u16(6)))
    } else {
        (4, usize::from(p.u8(3)))
    };
    if params.len() < header || params.len() < header + bd_len {
        return Err(PARAMETER_LIST_LENGTH_ERROR.into());
    }
    // Block descriptors may only restate the block length (or leave it zero).
    let bd = &params[header..header + bd_len];
    let long = ten && p.bit(4, 0);
    let step = if long { 16 } else { 8 };
    if bd_len % step != 0 {
        return Err(INVALID_FIELD_IN_PARAMETER_LIST.into());
    }
    for d in bd.chunks(step) {
        let bl = if long {
            u64::from(Fields(d).u32(12))
        } else {
            u64::from(Fields(d).u24(5))
        };
        if bl != 0 && bl != LOGICAL_BLOCK {
            return Err(INVALID_FIELD_IN_PARAMETER_LIST.into());
        }
    }
    let mut rest = &params[header + bd_len..];
    while !rest.is_empty() {
        if rest.len() < 2 || rest[0] & 0x40 != 0 {
            // Truncated page header, or a subpage (we have none).
            return Err(INVALID_FIELD_IN_PARAMETER_LIST.into());
        }
        let current = page(rest[0] & 0x3f).ok_or(INVALID_FIELD_IN_PARAMETER_LIST)?;
        let plen = usize::from(rest[1]) + 2;
        if plen != current.len() || rest.len() < plen {
            return Err(INVALID_FIELD_IN_PARAMETER_LIST.into());
        }
        // Nothing is changeable: the page must restate the current values.
        if rest[2..plen] != current[2..] {
            return Err(INVALID_FIELD_IN_PARAMETER_LIST.into());
        }
        rest = &rest[plen..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sense_all_pages_and_descriptors() {
        let d = mode_sense(&[0x1a, 0, 0x3f, 0, 0xff, 0], false, 2048, false).unwrap();
        assert_eq!(usize::from(d[0]) + 1, d.len());
        assert_eq!(d[3], 8);
        assert_eq!(&d[4..8], &[0, 0, 8, 0]);
        assert_eq!(d[12], 0x08);
        assert_eq!(d[14] & 0x04, 0x04, "WCE");
        assert_eq!(d.len(), 4 + 8 + 20 + 12 + 12);
        let d = mode_sense(
            &[0x5a, 0x18, 0x0a, 0, 0, 0, 0, 0, 0xff, 0],
            true,
            2048,
            false,
        )
        .unwrap();
        assert_eq!((d[7], d[8]), (0, 0x0a), "DBD: no descriptors");
        assert_eq!(d[10] & 0x04, 0, "D_SENSE is 0");
        let d = mode_sense(
            &[0x5a, 0x10, 0x08, 0, 0, 0, 0, 0, 0xff, 0],
            true,
            2048,
            false,
        )
        .unwrap();
        assert_eq!((d[4], d[7]), (1, 16), "long LBA descriptor");
        assert!(
            mode_sense(&[0x1a, 0, 0xc8, 0, 0xff, 0], false, 1, false).is_err(),
            "saved values"
        );
        assert!(
            mode_sense(&[0x1a, 0, 0x01, 0, 0xff, 0], false, 1, false).is_err(),
            "unknown page"
        );
        let ch = mode_sense(&[0x1a, 8, 0x48, 0, 0xff, 0], false, 1, false).unwrap();
        assert!(ch[6..].iter().all(|&b| b == 0), "nothing changeable");
        assert_eq!(
            mode_sense(&[0x1a, 0, 0x3f, 0, 4, 0], false, 1, false)
                .unwrap()
                .len(),
            4
        );
    }

    #[test]
    fn write_protect_bit_in_both_headers() {
        for wp in [false, true] {
            let six = mode_sense(&[0x1a, 0, 0x3f, 0, 0xff, 0], false, 2048, wp).unwrap();
            let ten = mode_sense(&[0x5a, 0, 0x3f, 0, 0, 0, 0, 0, 0xff, 0], true, 2048, wp).unwrap();
            let expect = if wp { 0x90 } else { 0x10 };
            assert_eq!((six[2], ten[3]), (expect, expect), "WP {wp}, DPOFUA");
        }
    }

    #[test]
    fn select_accepts_current_and_refuses_changes() {
        let current = mode_sense(&[0x1a, 0, 0x08, 0, 0xff, 0], false, 2048, false).unwrap();
        let mut list = current.to_vec();
        list[0] = 0;
        let cdb = [0x15, 0x10, 0, 0, list.len() as u8, 0];
        mode_select(&cdb, false, &list).unwrap();
        list[14] &= !0x04; // clear WCE
        assert_eq!(
            mode_select(&cdb, false, &list),
            Err(INVALID_FIELD_IN_PARAMETER_LIST.into())
        );
        assert!(mode_select(&cdb, false, &list[..5]).is_err());
        assert!(
            mode_select(&[0x15, 0x11, 0, 0, 4, 0], false, &[0; 4]).is_err(),
            "SP"
        );
        mode_select(&[0x15, 0x10, 0, 0, 0, 0], false, &[]).unwrap();
    }
}
