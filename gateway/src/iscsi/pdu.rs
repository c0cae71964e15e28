//! iSCSI PDUs (RFC 7143 §11): the 48-byte Basic Header Segment, framing on the wire with
//! optional CRC32C digests, and encoding for the writer.
//!
//! Parsing is pure ([`try_parse`] works on a byte buffer) so that it can be fuzzed and unit
//! tested without sockets. Every length read from the wire is bounded before anything is
//! allocated for it: the data segment by the negotiated MaxRecvDataSegmentLength, the AHS by
//! its one-byte length field.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ironsan_common::crc::{crc32c, crc32c_append};

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;
/// The reserved "no tag" value for ITT and TTT.
pub const NO_TAG: u32 = 0xffff_ffff;

/// Opcodes (RFC 7143 §11.1.1).
pub mod op {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_CMD: u8 = 0x01;
    pub const TMF_REQ: u8 = 0x02;
    pub const LOGIN_REQ: u8 = 0x03;
    pub const TEXT_REQ: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT_REQ: u8 = 0x06;
    pub const SNACK: u8 = 0x10;
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RSP: u8 = 0x21;
    pub const TMF_RSP: u8 = 0x22;
    pub const LOGIN_RSP: u8 = 0x23;
    pub const TEXT_RSP: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RSP: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC: u8 = 0x32;
    pub const REJECT: u8 = 0x3f;
}

/// Reject reasons (RFC 7143 §11.17.1).
pub mod reject {
    pub const DATA_DIGEST: u8 = 0x02;
    pub const SNACK: u8 = 0x03;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const NOT_SUPPORTED: u8 = 0x05;
    pub const IMMEDIATE_REJECTED: u8 = 0x06;
    pub const TASK_IN_PROGRESS: u8 = 0x07;
    pub const INVALID_DATA_ACK: u8 = 0x08;
    pub const INVALID_FIELD: u8 = 0x09;
    pub const OUT_OF_RESOURCES: u8 = 0x0a;
    pub const WAITING_FOR_LOGOUT: u8 = 0x0c;
}

/// A Basic Header Segment with typed accessors for the fields shared by most PDUs.
#[derive(Clone, PartialEq, Eq)]
pub struct Bhs(pub [u8; BHS_LEN]);

impl std::fmt::Debug for Bhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bhs(op={:#04x} itt={:#x} dlen={})", self.opcode(), self.itt(), self.data_len())
    }
}

impl Bhs {
    /// A zeroed header with `opcode` set.
    pub fn new(opcode: u8) -> Self {
        let mut b = [0u8; BHS_LEN];
        b[0] = opcode;
        Self(b)
    }
    pub fn opcode(&self) -> u8 {
        self.0[0] & 0x3f
    }
    pub fn immediate(&self) -> bool {
        self.0[0] & 0x40 != 0
    }
    pub fn flags(&self) -> u8 {
        self.0[1]
    }
    pub fn set_flags(&mut self, f: u8) {
        self.0[1] = f;
    }
    pub fn final_bit(&self) -> bool {
        self.0[1] & 0x80 != 0
    }
    /// TotalAHSLength in bytes.
    pub fn ahs_len(&self) -> usize {
        self.0[4] as usize * 4
    }
    pub fn data_len(&self) -> usize {
        u32::from_be_bytes([0, self.0[5], self.0[6], self.0[7]]) as usize
    }
    /// Sets DataSegmentLength; callers keep `len` below 2^24 (segments are bounded by
    /// MaxRecvDataSegmentLength, itself at most 2^24-1).
    pub fn set_data_len(&mut self, len: usize) {
        let b = (len as u32).to_be_bytes();
        self.0[5..8].copy_from_slice(&b[1..4]);
    }
    pub fn lun(&self) -> u64 {
        self.u64_at(8)
    }
    pub fn set_lun(&mut self, lun: u64) {
        self.0[8..16].copy_from_slice(&lun.to_be_bytes());
    }
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }
    pub fn set_itt(&mut self, v: u32) {
        self.set_u32(16, v);
    }
    pub fn u16_at(&self, i: usize) -> u16 {
        u16::from_be_bytes([self.0[i], self.0[i + 1]])
    }
    pub fn set_u16(&mut self, i: usize, v: u16) {
        self.0[i..i + 2].copy_from_slice(&v.to_be_bytes());
    }
    pub fn u32_at(&self, i: usize) -> u32 {
        u32::from_be_bytes([self.0[i], self.0[i + 1], self.0[i + 2], self.0[i + 3]])
    }
    pub fn set_u32(&mut self, i: usize, v: u32) {
        self.0[i..i + 4].copy_from_slice(&v.to_be_bytes());
    }
    pub fn u64_at(&self, i: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[i..i + 8]);
        u64::from_be_bytes(b)
    }
}

/// A received PDU: header, additional header segments and the data segment (padding and
/// digests stripped). `data` is a zero-copy slice of the receive buffer.
#[derive(Debug, Clone)]
pub struct Pdu {
    pub bhs: Bhs,
    pub ahs: Bytes,
    pub data: Bytes,
}

/// Framing parameters negotiated at login.
#[derive(Debug, Clone, Copy)]
pub struct Framing {
    pub header_digest: bool,
    pub data_digest: bool,
    /// Largest data segment we accept (our declared MaxRecvDataSegmentLength).
    pub max_data: usize,
}

/// Why a PDU could not be taken off the wire.
#[derive(Debug, thiserror::Error)]
pub enum PduError {
    #[error("header digest mismatch")]
    HeaderDigest,
    #[error("data digest mismatch")]
    DataDigest(Bhs),
    #[error("data segment of {len} bytes exceeds the limit of {max}")]
    DataTooLong { bhs: Bhs, len: usize, max: usize },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// Takes one whole PDU off the front of `buf` if it holds one. `Ok(None)`: need more bytes.
/// On error nothing sensible can follow on this connection, and the caller closes it (after a
/// Reject where the header is known).
pub fn try_parse(buf: &mut BytesMut, framing: &Framing) -> Result<Option<Pdu>, PduError> {
    if buf.len() < BHS_LEN {
        return Ok(None);
    }
    let mut bhs = Bhs([0; BHS_LEN]);
    bhs.0.copy_from_slice(&buf[..BHS_LEN]);
    let ahs_len = bhs.ahs_len();
    let hd = if framing.header_digest { 4 } else { 0 };
    let dlen = bhs.data_len();
    if dlen > framing.max_data {
        return Err(PduError::DataTooLong { bhs, len: dlen, max: framing.max_data });
    }
    let dd = if framing.data_digest && dlen > 0 { 4 } else { 0 };
    let header_total = BHS_LEN + ahs_len + hd;
    let total = header_total + dlen + pad4(dlen) + dd;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    if hd > 0 {
        let want = u32::from_le_bytes([
            buf[header_total - 4],
            buf[header_total - 3],
            buf[header_total - 2],
            buf[header_total - 1],
        ]);
        if crc32c(&buf[..BHS_LEN + ahs_len]) != want {
            return Err(PduError::HeaderDigest);
        }
    }
    let mut frame = buf.split_to(total).freeze();
    frame.advance(BHS_LEN);
    let ahs = frame.split_to(ahs_len);
    frame.advance(hd);
    let padded = frame.split_to(dlen + pad4(dlen));
    if dd > 0 {
        let want = frame.get_u32_le();
        if crc32c(&padded) != want {
            return Err(PduError::DataDigest(bhs));
        }
    }
    let data = padded.slice(..dlen);
    Ok(Some(Pdu { bhs, ahs, data }))
}

/// How the writer treats StatSN for an outgoing PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatSn {
    /// No StatSN field (Data-In without status).
    None,
    /// Carries the next StatSN without consuming it (R2T, unsolicited NOP-In, Async).
    Current,
    /// Carries the next StatSN and consumes it (responses).
    Advance,
}

/// A PDU on its way out. The writer stamps StatSN/ExpCmdSN/MaxCmdSN (bytes 24..36) just
/// before sending, so that the numbers are in order on the wire whatever task produced it.
#[derive(Debug, Clone)]
pub struct OutPdu {
    pub bhs: Bhs,
    pub data: Bytes,
    pub statsn: StatSn,
    /// Opcodes without ExpCmdSN/MaxCmdSN fields (none in practice) set this false.
    pub stamp_cmdsn: bool,
}

impl OutPdu {
    pub fn new(bhs: Bhs, data: Bytes, statsn: StatSn) -> Self {
        Self { bhs, data, statsn, stamp_cmdsn: true }
    }

    /// Appends the wire form to `parts`: header (+digest), data, padding (+digest).
    pub fn encode(mut self, framing: &Framing, parts: &mut Vec<Bytes>) {
        self.bhs.set_data_len(self.data.len());
        let mut head = BytesMut::with_capacity(BHS_LEN + 4);
        head.put_slice(&self.bhs.0);
        if framing.header_digest {
            head.put_u32_le(crc32c(&self.bhs.0));
        }
        parts.push(head.freeze());
        if self.data.is_empty() {
            return;
        }
        let pad = pad4(self.data.len());
        let mut tail = BytesMut::with_capacity(8);
        tail.put_bytes(0, pad);
        if framing.data_digest {
            let crc = crc32c_append(crc32c(&self.data), &tail);
            tail.put_u32_le(crc);
        }
        parts.push(self.data);
        if !tail.is_empty() {
            parts.push(tail.freeze());
        }
    }
}

/// Entry point for `cargo fuzz`: parses `data` under every framing and checks that the parser
/// neither panics nor takes more bytes than it was given.
#[doc(hidden)]
pub fn fuzz_parse(data: &[u8]) {
    for (hd, dd) in [(false, false), (true, false), (false, true), (true, true)] {
        let framing = Framing { header_digest: hd, data_digest: dd, max_data: 64 * 1024 };
        let mut buf = BytesMut::from(data);
        let mut taken = 0;
        while let Ok(Some(pdu)) = try_parse(&mut buf, &framing) {
            taken += BHS_LEN + pdu.ahs.len() + pdu.data.len();
            assert!(taken <= data.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framing(hd: bool, dd: bool) -> Framing {
        Framing { header_digest: hd, data_digest: dd, max_data: 8192 }
    }

    fn wire(pdu: OutPdu, f: &Framing) -> BytesMut {
        let mut parts = Vec::new();
        pdu.encode(f, &mut parts);
        let mut b = BytesMut::new();
        for p in parts {
            b.extend_from_slice(&p);
        }
        b
    }

    #[test]
    fn round_trip_with_and_without_digests() {
        for (hd, dd) in [(false, false), (true, true), (true, false), (false, true)] {
            let f = framing(hd, dd);
            let mut bhs = Bhs::new(op::SCSI_CMD);
            bhs.set_itt(0x1234);
            let out = OutPdu::new(bhs.clone(), Bytes::from_static(b"hello"), StatSn::None);
            let mut buf = wire(out, &f);
            let extra = if hd { 4 } else { 0 } + if dd { 4 } else { 0 };
            assert_eq!(buf.len(), 48 + 8 + extra);
            // Byte by byte: never a PDU before the last byte arrives.
            let all = buf.split();
            let mut acc = BytesMut::new();
            for (i, b) in all.iter().enumerate() {
                acc.extend_from_slice(&[*b]);
                let got = try_parse(&mut acc, &f).unwrap();
                if i + 1 < all.len() {
                    assert!(got.is_none());
                } else {
                    let pdu = got.unwrap();
                    assert_eq!(pdu.bhs.itt(), 0x1234);
                    assert_eq!(&pdu.data[..], b"hello");
                    assert!(acc.is_empty());
                }
            }
        }
    }

    #[test]
    fn digest_errors_are_detected() {
        let f = framing(true, true);
        let mut buf = wire(OutPdu::new(Bhs::new(op::NOP_OUT), Bytes::from_static(b"ping"), StatSn::None), &f);
        buf[60] ^= 1; // inside the data segment
        assert!(matches!(try_parse(&mut buf, &f), Err(PduError::DataDigest(_))));
        let mut buf = wire(OutPdu::new(Bhs::new(op::NOP_OUT), Bytes::new(), StatSn::None), &f);
        buf[3] ^= 1;
        assert!(matches!(try_parse(&mut buf, &f), Err(PduError::HeaderDigest)));
    }

    #[test]
    fn oversized_segment_is_refused_before_allocation() {
        let f = framing(false, false);
        let mut bhs = Bhs::new(op::SCSI_CMD);
        bhs.set_data_len(0x00ff_ffff);
        let mut buf = BytesMut::from(&bhs.0[..]);
        assert!(matches!(try_parse(&mut buf, &f), Err(PduError::DataTooLong { len: 0x00ff_ffff, .. })));
    }

    #[test]
    fn fuzz_entry_handles_garbage() {
        fuzz_parse(&[0xff; 200]);
        fuzz_parse(&[]);
        fuzz_parse(&[0u8; 47]);
    }
}
