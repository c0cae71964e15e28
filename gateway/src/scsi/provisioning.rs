//! Thin provisioning: UNMAP, WRITE SAME (10)/(16) and GET LBA STATUS (SBC-3 5.28, 5.42,
//! 5.45, 5.16).
//!
//! Unmapped blocks read as zeroes (LBPRZ=1), which is what `BlockDevice::write_zeroes`
//! with `unmap` guarantees.

use bytes::{BufMut, Bytes, BytesMut};

use super::cdb::Fields;
use super::inquiry::limits;
use super::sense::{
    INVALID_FIELD_IN_CDB, INVALID_FIELD_IN_PARAMETER_LIST, LBA_OUT_OF_RANGE,
    PARAMETER_LIST_LENGTH_ERROR,
};
use super::{read_error, write_error, Done, Lun, LOGICAL_BLOCK};

/// Largest pattern buffer WRITE SAME builds at once.
const WRITE_SAME_CHUNK: u64 = 1 << 20;

/// Most descriptors one GET LBA STATUS answer carries.
const MAX_LBA_STATUS_DESCRIPTORS: usize = 64;

impl Lun {
    /// UNMAP: validates the whole parameter list, then deallocates each range.
    pub(super) async fn unmap(&self, cdb: &[u8], data: &Bytes) -> Done {
        let f = Fields(cdb);
        if f.bit(1, 0) {
            return Err(INVALID_FIELD_IN_CDB.into()); // ANCHOR: ANC_SUP is 0
        }
        let len = usize::from(f.u16(7));
        if len == 0 {
            return Ok(Bytes::new());
        }
        if len < 8 || data.len() < len {
            return Err(PARAMETER_LIST_LENGTH_ERROR.into());
        }
        let params = &data[..len];
        let p = Fields(params);
        let bd_len = usize::from(p.u16(2));
        if usize::from(p.u16(0)) + 2 > len || bd_len + 8 > len {
            return Err(INVALID_FIELD_IN_PARAMETER_LIST.into());
        }
        // A trailing partial descriptor is ignored (SBC-3 5.28.2).
        let count = bd_len / 16;
        if count > limits::MAX_UNMAP_DESCRIPTORS as usize {
            return Err(INVALID_FIELD_IN_PARAMETER_LIST.into());
        }
        let mut ranges = Vec::with_capacity(count);
        let mut total = 0u64;
        for i in 0..count {
            let d = Fields(&params[8 + 16 * i..8 + 16 * (i + 1)]);
            let (lba, blocks) = (d.u64(0), u64::from(d.u32(8)));
            self.check_range(lba, blocks)?;
            total += blocks;
            if total > u64::from(limits::MAX_UNMAP_LBAS) {
                return Err(INVALID_FIELD_IN_PARAMETER_LIST.into());
            }
            if blocks > 0 {
                ranges.push((lba, blocks));
            }
        }
        for (lba, blocks) in ranges {
            self.device
                .write_zeroes(lba * LOGICAL_BLOCK, blocks * LOGICAL_BLOCK, true)
                .await
                .map_err(write_error)?;
        }
        Ok(Bytes::new())
    }

    /// WRITE SAME (10)/(16). With UNMAP set the range is deallocated whatever the data-out
    /// holds, as Linux LIO does and libiscsi's WriteSame*.UnmapUntilEnd expects (it sends a
    /// non-zero block with UNMAP=1 and, with LBPRZ, reads zeroes back).
    pub(super) async fn write_same(&self, cdb: &[u8], data: &Bytes) -> Done {
        let f = Fields(cdb);
        let flags = f.u8(1);
        let sixteen = cdb.len() == 16;
        // WRPROTECT, ANCHOR (ANC_SUP=0), and the obsolete PBDATA/LBDATA bits.
        if flags & 0xf6 != 0 {
            return Err(INVALID_FIELD_IN_CDB.into());
        }
        let unmap = flags & 0x08 != 0;
        let ndob = sixteen && flags & 0x01 != 0;
        let (lba, mut blocks) = if sixteen {
            (f.u64(2), u64::from(f.u32(10)))
        } else {
            (u64::from(f.u32(2)), u64::from(f.u16(7)))
        };
        if blocks == 0 {
            // WSNZ=0: zero means "to the end of the medium", within MAXIMUM WRITE SAME LENGTH.
            blocks = self.blocks().checked_sub(lba).ok_or(LBA_OUT_OF_RANGE)?;
        }
        if blocks > limits::MAX_WRITE_SAME {
            return Err(INVALID_FIELD_IN_CDB.into());
        }
        self.check_range(lba, blocks)?;
        let block = if ndob {
            Bytes::from(vec![0u8; LOGICAL_BLOCK as usize])
        } else {
            match data.get(..LOGICAL_BLOCK as usize) {
                Some(b) => data.slice(..b.len()),
                None => return Err(INVALID_FIELD_IN_CDB.into()),
            }
        };
        if blocks == 0 {
            return Ok(Bytes::new());
        }
        let (offset, len) = (lba * LOGICAL_BLOCK, blocks * LOGICAL_BLOCK);
        if unmap || block.iter().all(|&b| b == 0) {
            self.device
                .write_zeroes(offset, len, unmap)
                .await
                .map_err(write_error)?;
            return Ok(Bytes::new());
        }
        let chunk_len = len.min(WRITE_SAME_CHUNK);
        let mut chunk = BytesMut::with_capacity(chunk_len as usize);
        while (chunk.len() as u64) < chunk_len {
            chunk.extend_from_slice(&block);
        }
        let chunk = chunk.freeze();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk_len);
            self.device
                .write(offset + done, chunk.slice(..n as usize), false)
                .await
                .map_err(write_error)?;
            done += n;
        }
        Ok(Bytes::new())
    }

    /// GET LBA STATUS: mapped / deallocated extents from the starting LBA on.
    pub(super) async fn get_lba_status(&self, cdb: &[u8]) -> Done {
        let f = Fields(cdb);
        let start = f.u64(2);
        let alloc = f.u32(10) as usize;
        let end = self.blocks();
        if start >= end {
            return Err(LBA_OUT_OF_RANGE.into());
        }
        let room = (alloc.saturating_sub(8) / 16).clamp(1, MAX_LBA_STATUS_DESCRIPTORS);
        let mut descs = BytesMut::new();
        let mut lba = start;
        while lba < end && descs.len() / 16 < room {
            let ext = self
                .device
                .allocation(lba * LOGICAL_BLOCK, (end - lba) * LOGICAL_BLOCK)
                .await
                .map_err(read_error)?;
            // Extents are byte ranges; report whole blocks and always make progress.
            let blocks = ext
                .len
                .div_ceil(LOGICAL_BLOCK)
                .clamp(1, end - lba)
                .min(u64::from(u32::MAX));
            descs.put_u64(lba);
            descs.put_u32(blocks as u32);
            descs.put_u8(if ext.mapped { 0 } else { 1 });
            descs.put_bytes(0, 3);
            lba += blocks;
        }
        let mut b = BytesMut::with_capacity(8 + descs.len());
        b.put_u32(4 + descs.len() as u32);
        b.put_u32(0);
        b.put_slice(&descs);
        b.truncate(alloc);
        Ok(b.freeze())
    }
}
