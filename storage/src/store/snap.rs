//! Snapshots of a chunk replica: copy-on-write into one sparse file per snapshot.
//!
//! A chunk's snapshots form a chain, oldest first. Only the newest one receives copies: the
//! first write (or zeroing, or unmap) of a block after it was taken copies the block's old data
//! into the newest snapshot's file, and its old checksum into RocksDB (`s` records), before the
//! live block changes. A block of snapshot `k` therefore lives in the oldest snapshot at or
//! after `k` that holds it (nothing changed the block between `k` and that one), else in the
//! live chunk (never overwritten since `k`). So a write costs one copy per block per snapshot
//! *interval*, whatever the number of snapshots, and deleting snapshot `k` hands the blocks
//! that its predecessor lacks down to it (they are the predecessor's content too) and frees
//! the rest.
//!
//! Snapshot file (`<index>.<snapshot>.snap` beside the chunk file): block `b` at offset
//! `b * 4096`, sparse; its checksums are the `s` records (the same stored form as the chunk's
//! table, so a zero checksum is a zero block that needs no data).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use super::meta::SnapRecord;
use crate::chunk::{ChunkId, BLOCK};

/// Most snapshots one chunk replica may hold.
pub const MAX_SNAPSHOTS: usize = 1024;

/// One snapshot as the engine keeps it.
pub(super) struct Snap {
    pub id: u64,
    pub rec: SnapRecord,
    pub file: File,
    /// Blocks held in this snapshot's file, with their stored checksums.
    pub held: HashMap<u64, u32>,
    /// Data copied in since the file was last fdatasync'ed.
    pub unsynced: bool,
}

/// Where a snapshot's file lives.
pub fn snap_path(dir: &Path, id: ChunkId, snap: u64) -> PathBuf {
    dir.join("chunks")
        .join(format!("{:016x}", id.volume))
        .join(format!("{:08x}.{snap:016x}.snap", id.index))
}

/// Parses a snapshot file name back into (chunk index, snapshot id).
pub fn parse_snap_name(name: &str) -> Option<(u32, u64)> {
    let rest = name.strip_suffix(".snap")?;
    let (index, snap) = rest.split_once('.')?;
    Some((
        u32::from_str_radix(index, 16).ok()?,
        u64::from_str_radix(snap, 16).ok()?,
    ))
}

/// Where block `b` of the snapshot at `pos` (in the oldest-first chain) is found: the chain
/// position holding it and its stored checksum, or `None` for the live chunk.
pub fn source(snaps: &[Snap], pos: usize, b: u64) -> Option<(usize, u32)> {
    snaps
        .iter()
        .enumerate()
        .skip(pos)
        .find_map(|(j, s)| s.held.get(&b).map(|&crc| (j, crc)))
}

/// File offset of block `b` in a snapshot file.
pub fn offset_of(b: u64) -> u64 {
    b * BLOCK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let p = snap_path(Path::new("/d"), ChunkId::new(0xab, 7), u64::MAX);
        let name = p.file_name().and_then(|n| n.to_str()).unwrap();
        assert_eq!(parse_snap_name(name), Some((7, u64::MAX)));
        assert_eq!(parse_snap_name("00000007.chunk"), None);
        assert_eq!(parse_snap_name("x.y.snap"), None);
    }

    #[test]
    fn a_block_comes_from_the_oldest_holder_at_or_after_the_snapshot() {
        let f = || tempfile::tempfile().unwrap();
        let snap = |id, held: &[(u64, u32)]| Snap {
            id,
            rec: SnapRecord::default(),
            file: f(),
            held: held.iter().copied().collect(),
            unsynced: false,
        };
        let chain = vec![
            snap(1, &[(0, 10)]),
            snap(2, &[(0, 20), (1, 21)]),
            snap(3, &[]),
        ];
        assert_eq!(source(&chain, 0, 0), Some((0, 10)));
        assert_eq!(source(&chain, 0, 1), Some((1, 21)));
        assert_eq!(source(&chain, 1, 0), Some((1, 20)));
        assert_eq!(source(&chain, 2, 0), None);
        assert_eq!(source(&chain, 0, 5), None);
    }
}
