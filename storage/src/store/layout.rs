//! The chunk file: where a replica's data and checksums live on disk.
//!
//! ```text
//! [0, 4096)                 header: magic, format, chunk id, size, CRC32C of the header
//! [4096, data_start)        checksum table: one u32 per 4 KiB data block, padded to 4 KiB
//! [data_start, +size)       data (sparse: unwritten blocks are holes)
//! ```
//!
//! A table entry holds `crc32c(block) ^ crc32c(zero block)`, so a hole in the table describes
//! a hole in the data: a fresh file is consistent without writing anything. The table on disk
//! trails the data; the write log in RocksDB carries the new checksums of every write since the
//! last checkpoint, which is what lets recovery make data and table agree after a crash.

use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use ironsan_common::crc::crc32c;

use crate::chunk::{ChunkId, BLOCK};

pub const HEADER: u64 = 4096;
const MAGIC: &[u8; 8] = b"IRSNCHK1";
/// Checksum-table entries per 4 KiB table page.
pub const CRCS_PER_PAGE: u64 = BLOCK / 4;

static CRC_ZERO: LazyLock<u32> = LazyLock::new(|| crc32c(&[0u8; BLOCK as usize]));

/// The table form of one block's checksum.
pub fn stored_crc(block: &[u8]) -> u32 {
    crc32c(block) ^ *CRC_ZERO
}

pub fn blocks(size: u64) -> u64 {
    size.div_ceil(BLOCK)
}

pub fn table_bytes(size: u64) -> u64 {
    (blocks(size) * 4).div_ceil(BLOCK) * BLOCK
}

/// File offset of the first data byte.
pub fn data_start(size: u64) -> u64 {
    HEADER + table_bytes(size)
}

/// File offset of the table page holding block `block`'s entry.
pub fn table_page_offset(page: u64) -> u64 {
    HEADER + page * BLOCK
}

pub fn chunk_path(dir: &Path, id: ChunkId) -> PathBuf {
    dir.join("chunks")
        .join(format!("{:016x}", id.volume))
        .join(format!("{:08x}.chunk", id.index))
}

/// The 4 KiB header of a chunk file.
pub fn encode_header(id: ChunkId, size: u64) -> [u8; BLOCK as usize] {
    let mut h = [0u8; BLOCK as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&1u32.to_le_bytes());
    h[12..20].copy_from_slice(&id.volume.to_le_bytes());
    h[20..24].copy_from_slice(&id.index.to_le_bytes());
    h[24..32].copy_from_slice(&size.to_le_bytes());
    let crc = crc32c(&h[..32]);
    h[32..36].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks a header against what the metadata says the file holds.
pub fn check_header(h: &[u8], id: ChunkId, size: u64) -> Result<(), String> {
    if h.len() < 36 || &h[..8] != MAGIC {
        return Err("not an IronSAN chunk file (bad magic)".into());
    }
    let crc = u32::from_le_bytes([h[32], h[33], h[34], h[35]]);
    if crc32c(&h[..32]) != crc {
        return Err("header checksum mismatch".into());
    }
    let expect = encode_header(id, size);
    if h[..36] != expect[..36] {
        return Err("header names another chunk or size".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry() {
        let size = 64 << 20;
        assert_eq!(blocks(size), 16384);
        assert_eq!(table_bytes(size), 65536);
        assert_eq!(data_start(size), 4096 + 65536);
        assert_eq!(table_bytes(4096), 4096);
        assert_eq!(stored_crc(&[0u8; 4096]), 0);
        assert_ne!(stored_crc(&[1u8; 4096]), 0);
    }

    #[test]
    fn header_round_trip() {
        let id = ChunkId::new(7, 3);
        let h = encode_header(id, 1 << 20);
        assert!(check_header(&h, id, 1 << 20).is_ok());
        assert!(check_header(&h, ChunkId::new(7, 4), 1 << 20).is_err());
        let mut bad = h;
        bad[20] ^= 1;
        assert!(check_header(&bad, id, 1 << 20).is_err());
        assert!(check_header(&[0u8; 10], id, 1 << 20).is_err());
    }
}
