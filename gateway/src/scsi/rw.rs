//! The data path: READ, WRITE, WRITE AND VERIFY, VERIFY, COMPARE AND WRITE, ORWRITE,
//! PRE-FETCH and SYNCHRONIZE CACHE (SBC-3 5.x).
//!
//! Every handler checks protection fields (we format without protection information, so a
//! non-zero RDPROTECT/WRPROTECT/VRPROTECT/ORPROTECT is INVALID FIELD IN CDB), the transfer
//! length against the Block Limits maximum, and the range against the capacity, before
//! touching the device.

use bytes::{Bytes, BytesMut};

use super::cdb::{rw_extent, Extent, Fields};
use super::inquiry::limits;
use super::sense::{ScsiResult, INVALID_FIELD_IN_CDB, LBA_OUT_OF_RANGE, MISCOMPARE_DURING_VERIFY};
use super::{read_error, write_error, Done, Lun, LOGICAL_BLOCK};

impl Lun {
    /// LBA OUT OF RANGE unless `lba..lba+blocks` lies within the capacity.
    pub(super) fn check_range(&self, lba: u64, blocks: u64) -> ScsiResult<()> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.blocks() => Ok(()),
            _ => Err(LBA_OUT_OF_RANGE.into()),
        }
    }

    /// Decodes and validates the extent of a READ/WRITE-family CDB.
    fn extent(&self, cdb: &[u8]) -> ScsiResult<Extent> {
        // Bits 7..5 of byte 1 are the protection field in every 10/12/16-byte form.
        if cdb.len() > 6 && Fields(cdb).u8(1) & 0xe0 != 0 {
            return Err(INVALID_FIELD_IN_CDB.into());
        }
        let e = rw_extent(cdb);
        if e.blocks > limits::MAX_TRANSFER {
            return Err(INVALID_FIELD_IN_CDB.into());
        }
        self.check_range(e.lba, u64::from(e.blocks))?;
        Ok(e)
    }

    /// The data-out bytes for `blocks` blocks; a short buffer never gets indexed past.
    fn payload(data: &Bytes, blocks: u64) -> ScsiResult<Bytes> {
        let len = usize::try_from(blocks * LOGICAL_BLOCK).map_err(|_| INVALID_FIELD_IN_CDB)?;
        if data.len() < len {
            return Err(INVALID_FIELD_IN_CDB.into());
        }
        Ok(data.slice(..len))
    }

    async fn read_blocks(&self, lba: u64, blocks: u64) -> ScsiResult<Bytes> {
        if blocks == 0 {
            return Ok(Bytes::new());
        }
        self.device
            .read(lba * LOGICAL_BLOCK, (blocks * LOGICAL_BLOCK) as usize)
            .await
            .map_err(read_error)
    }

    pub(super) async fn read(&self, cdb: &[u8]) -> Done {
        let e = self.extent(cdb)?;
        self.read_blocks(e.lba, u64::from(e.blocks)).await
    }

    pub(super) async fn write(&self, cdb: &[u8], data: &Bytes) -> Done {
        let fua = cdb.len() > 6 && Fields(cdb).bit(1, 3);
        self.write_extent(cdb, data, fua).await
    }

    /// WRITE AND VERIFY: written through (FUA) so the verification SBC asks for is against
    /// stable storage; BYTCHK=1 compares the data-out with itself, so it needs no read-back.
    pub(super) async fn write_and_verify(&self, cdb: &[u8], data: &Bytes) -> Done {
        let bytchk = (Fields(cdb).u8(1) >> 1) & 0x03;
        if bytchk > 1 {
            return Err(INVALID_FIELD_IN_CDB.into());
        }
        self.write_extent(cdb, data, true).await
    }

    async fn write_extent(&self, cdb: &[u8], data: &Bytes, fua: bool) -> Done {
        let e = self.extent(cdb)?;
        if e.blocks == 0 {
            return Ok(Bytes::new());
        }
        let payload = Self::payload(data, u64::from(e.blocks))?;
        self.device
            .write(e.lba * LOGICAL_BLOCK, payload, fua)
            .await
            .map_err(write_error)?;
        Ok(Bytes::new())
    }

    /// VERIFY: BYTCHK 00b reads the range (medium check); 01b compares with the data-out;
    /// 11b compares every block with the single data-out block.
    pub(super) async fn verify(&self, cdb: &[u8], data: &Bytes) -> Done {
        let bytchk = (Fields(cdb).u8(1) >> 1) & 0x03;
        if bytchk == 2 {
            return Err(INVALID_FIELD_IN_CDB.into());
        }
        let e = self.extent(cdb)?;
        let blocks = u64::from(e.blocks);
        let stored = self.read_blocks(e.lba, blocks).await?;
        let expected = match bytchk {
            0 => return Ok(Bytes::new()),
            1 => Self::payload(data, blocks)?,
            _ => {
                let one = Self::payload(data, 1)?;
                let mut all = BytesMut::with_capacity(stored.len());
                for _ in 0..blocks {
                    all.extend_from_slice(&one);
                }
                all.freeze()
            }
        };
        compare(&stored, &expected)?;
        Ok(Bytes::new())
    }

    /// COMPARE AND WRITE: data-out is the verify data then the write data. The dispatcher
    /// holds `io_order` exclusively, so no other write lands between the compare and the write.
    pub(super) async fn compare_and_write(&self, cdb: &[u8], data: &Bytes) -> Done {
        let f = Fields(cdb);
        if f.u8(1) & 0xe0 != 0 {
            return Err(INVALID_FIELD_IN_CDB.into());
        }
        let fua = f.bit(1, 3);
        let lba = f.u64(2);
        let blocks = u64::from(f.u8(13));
        if blocks > u64::from(limits::MAX_COMPARE_AND_WRITE) {
            return Err(INVALID_FIELD_IN_CDB.into());
        }
        self.check_range(lba, blocks)?;
        if blocks == 0 {
            return Ok(Bytes::new());
        }
        let both = Self::payload(data, 2 * blocks)?;
        let half = (blocks * LOGICAL_BLOCK) as usize;
        let (verify, write) = (both.slice(..half), both.slice(half..));
        let stored = self.read_blocks(lba, blocks).await?;
        compare(&stored, &verify)?;
        self.device
            .write(lba * LOGICAL_BLOCK, write, fua)
            .await
            .map_err(write_error)?;
        Ok(Bytes::new())
    }

    /// ORWRITE (16): stored data OR data-out, atomically like COMPARE AND WRITE.
    pub(super) async fn orwrite(&self, cdb: &[u8], data: &Bytes) -> Done {
        let e = self.extent(cdb)?;
        let fua = Fields(cdb).bit(1, 3);
        if e.blocks == 0 {
            return Ok(Bytes::new());
        }
        let payload = Self::payload(data, u64::from(e.blocks))?;
        let stored = self.read_blocks(e.lba, u64::from(e.blocks)).await?;
        let merged: Vec<u8> = stored
            .iter()
            .zip(payload.iter())
            .map(|(a, b)| a | b)
            .collect();
        self.device
            .write(e.lba * LOGICAL_BLOCK, Bytes::from(merged), fua)
            .await
            .map_err(write_error)?;
        Ok(Bytes::new())
    }

    /// PRE-FETCH: range check only; the backend has no cache to warm. Answers GOOD rather
    /// than CONDITION MET, which libiscsi's PreFetch tests do not accept as success.
    pub(super) fn prefetch(&self, cdb: &[u8]) -> Done {
        let (lba, blocks) = range_10_or_16(cdb);
        self.check_range(lba, blocks)?;
        Ok(Bytes::new())
    }

    /// SYNCHRONIZE CACHE: flushes the whole device (the range only bounds-checks). IMMED
    /// is honoured by flushing before answering anyway, which SBC permits.
    pub(super) async fn synchronize_cache(&self, cdb: &[u8]) -> Done {
        let (lba, blocks) = range_10_or_16(cdb);
        self.check_range(lba, blocks)?;
        self.device.flush().await.map_err(write_error)?;
        Ok(Bytes::new())
    }
}

/// MISCOMPARE with INFORMATION = offset of the first differing byte (SBC-3 5.3).
fn compare(stored: &[u8], expected: &[u8]) -> ScsiResult<()> {
    match stored.iter().zip(expected).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(at) => Err(MISCOMPARE_DURING_VERIFY
            .with_information(u32::try_from(at).unwrap_or(u32::MAX))
            .into()),
    }
}

/// LBA and block count of the 10- and 16-byte forms of PRE-FETCH and SYNCHRONIZE CACHE.
fn range_10_or_16(cdb: &[u8]) -> (u64, u64) {
    let f = Fields(cdb);
    if cdb.len() == 10 {
        (u64::from(f.u32(2)), u64::from(f.u16(7)))
    } else {
        (f.u64(2), u64::from(f.u32(10)))
    }
}
