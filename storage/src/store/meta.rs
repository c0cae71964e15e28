//! A data directory's metadata in RocksDB: chunk records, the write log and bad blocks.
//!
//! Keys (big-endian numbers, so iteration follows chunk and log order):
//! - `c` chunk(12) → [`ChunkRecord`]
//! - `l` chunk(12) lsn(8) → [`LogRecord`]: one per write, in the order the replica applied them
//! - `b` chunk(12) block(8) → empty: a block that failed its checksum and was not rewritten
//! - `S` chunk(12) snapshot(8) → [`SnapRecord`]: a snapshot of the chunk
//! - `s` chunk(12) snapshot(8) block(8) → stored crc (u32): a block the snapshot holds in its
//!   own file (see `snap.rs`)
//!
//! Records are written through the engine thread's batches, before the data they describe
//! (without a WAL sync, like the data itself: both survive a process kill; a flush syncs both).

use std::cell::RefCell;
use std::mem::ManuallyDrop;
use std::path::Path;

use rocksdb::{Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};

use crate::chunk::ChunkId;

/// What RocksDB holds for one chunk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChunkRecord {
    pub size: u64,
    pub epoch: u64,
    /// Highest write sequence number applied.
    pub version: u64,
    /// Log position of the newest log record.
    pub lsn: u64,
    /// Every record at or below this position has its checksums in the on-disk table.
    pub checkpoint_lsn: u64,
    /// Oldest log position still held.
    pub first_lsn: u64,
    /// Highest write sequence number among trimmed records: resync from below it needs a full copy.
    pub trimmed_seq: u64,
}

const RECORD_FIELDS: usize = 7;

impl ChunkRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(1 + 8 * RECORD_FIELDS);
        v.push(1u8);
        for x in [
            self.size,
            self.epoch,
            self.version,
            self.lsn,
            self.checkpoint_lsn,
            self.first_lsn,
            self.trimmed_seq,
        ] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != 1 + 8 * RECORD_FIELDS || b[0] != 1 {
            return None;
        }
        let f = |i: usize| {
            let s = 1 + 8 * i;
            u64::from_le_bytes(b[s..s + 8].try_into().unwrap_or([0; 8]))
        };
        Some(Self {
            size: f(0),
            epoch: f(1),
            version: f(2),
            lsn: f(3),
            checkpoint_lsn: f(4),
            first_lsn: f(5),
            trimmed_seq: f(6),
        })
    }
}

/// What RocksDB holds for one snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapRecord {
    /// Creation order among the chunk's snapshots (ids are the caller's, in any order).
    pub gen: u64,
    /// The chunk's version when it was taken.
    pub version: u64,
}

impl SnapRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(17);
        v.push(1u8);
        v.extend_from_slice(&self.gen.to_le_bytes());
        v.extend_from_slice(&self.version.to_le_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        let mut r = Reader(b);
        if r.u8()? != 1 {
            return None;
        }
        let (gen, version) = (r.u64()?, r.u64()?);
        r.0.is_empty().then_some(Self { gen, version })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogKind {
    Write = 1,
    /// Zeroes the range; checksums are given for the partial blocks at its ends only.
    Zero = 2,
}

/// One applied write: its range and the new checksums of the blocks it touched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRecord {
    pub kind: LogKind,
    pub seq: u64,
    pub epoch: u64,
    pub offset: u64,
    pub len: u64,
    /// `(block, stored crc)` for every block whose new contents are not all zero.
    pub crcs: Vec<(u64, u32)>,
}

impl LogRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(41 + self.crcs.len() * 12);
        v.push(self.kind as u8);
        for x in [self.seq, self.epoch, self.offset, self.len] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        // Blocks are consecutive in practice: store the first and then the CRCs in a run.
        let first = self.crcs.first().map_or(0, |c| c.0);
        let consecutive = self
            .crcs
            .iter()
            .enumerate()
            .all(|(i, c)| c.0 == first + i as u64);
        v.extend_from_slice(&(self.crcs.len() as u32).to_le_bytes());
        if consecutive {
            v.push(1);
            v.extend_from_slice(&first.to_le_bytes());
            for c in &self.crcs {
                v.extend_from_slice(&c.1.to_le_bytes());
            }
        } else {
            v.push(0);
            for c in &self.crcs {
                v.extend_from_slice(&c.0.to_le_bytes());
                v.extend_from_slice(&c.1.to_le_bytes());
            }
        }
        v
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        let mut r = Reader(b);
        let kind = match r.u8()? {
            1 => LogKind::Write,
            2 => LogKind::Zero,
            _ => return None,
        };
        let (seq, epoch, offset, len) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
        let n = r.u32()? as usize;
        let mut crcs = Vec::with_capacity(n.min(1 << 18));
        if r.u8()? == 1 {
            let first = r.u64()?;
            for i in 0..n {
                crcs.push((first + i as u64, r.u32()?));
            }
        } else {
            for _ in 0..n {
                crcs.push((r.u64()?, r.u32()?));
            }
        }
        r.0.is_empty().then_some(Self {
            kind,
            seq,
            epoch,
            offset,
            len,
            crcs,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (h, t) = self.0.split_at_checked(N)?;
        self.0 = t;
        h.try_into().ok()
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take::<4>().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take::<8>().map(u64::from_le_bytes)
    }
}

fn chunk_key(tag: u8, id: ChunkId) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[0] = tag;
    k[1..9].copy_from_slice(&id.volume.to_be_bytes());
    k[9..13].copy_from_slice(&id.index.to_be_bytes());
    k
}

fn chunk_sub_key(tag: u8, id: ChunkId, n: u64) -> [u8; 21] {
    let mut k = [0u8; 21];
    k[..13].copy_from_slice(&chunk_key(tag, id));
    k[13..].copy_from_slice(&n.to_be_bytes());
    k
}

fn snap_block_key(id: ChunkId, snap: u64, block: u64) -> [u8; 29] {
    let mut k = [0u8; 29];
    k[..21].copy_from_slice(&chunk_sub_key(b's', id, snap));
    k[21..].copy_from_slice(&block.to_be_bytes());
    k
}

fn chunk_of(key: &[u8]) -> Option<ChunkId> {
    let v = u64::from_be_bytes(key.get(1..9)?.try_into().ok()?);
    let i = u32::from_be_bytes(key.get(9..13)?.try_into().ok()?);
    Some(ChunkId::new(v, i))
}

fn sub_of(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(13..21)?.try_into().ok()?))
}

pub struct Meta {
    db: ManuallyDrop<DB>,
    /// The first failed write's error; see [`Meta::write`].
    broken: RefCell<Option<String>>,
}

impl Drop for Meta {
    fn drop(&mut self) {
        if self.broken.borrow().is_some() {
            // Closing a DB whose WAL writer saw an error can trip an assertion in Debian's
            // librocksdb (built with asserts) and abort the daemon: leak it instead.
            return;
        }
        // SAFETY: dropped exactly once, here.
        unsafe { ManuallyDrop::drop(&mut self.db) };
    }
}

impl Meta {
    pub fn open(path: &Path) -> Result<Self, String> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        // Few, small keys: a 4 MiB memtable is plenty, and a small WAL keeps restarts quick
        // and fits a nearly full disk.
        opts.set_write_buffer_size(4 << 20);
        opts.set_max_total_wal_size(64 << 20);
        // RocksDB's own info log lives on the same disk; once that disk fails, a second line
        // logged through its failed writer trips an assertion in Debian's librocksdb and
        // aborts the daemon. Errors reach our log through the returned statuses instead.
        opts.set_log_level(rocksdb::LogLevel::Fatal);
        opts.set_keep_log_file_num(1);
        let db = DB::open(&opts, path).map_err(|e| e.to_string())?;
        Ok(Self {
            db: ManuallyDrop::new(db),
            broken: RefCell::new(None),
        })
    }

    /// Writes a batch. After one failure every later write is refused without reaching
    /// RocksDB: its WAL writer keeps the error, and Debian's librocksdb (built with assertions)
    /// aborts the process on the next write through it. The directory is failed by then.
    pub fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), String> {
        if let Some(e) = self.broken.borrow().as_ref() {
            return Err(format!("stopped after an earlier write error: {e}"));
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch, &wo).map_err(|e| {
            let e = e.to_string();
            *self.broken.borrow_mut() = Some(e.clone());
            e
        })
    }

    pub fn is_broken(&self) -> bool {
        self.broken.borrow().is_some()
    }

    pub fn put_chunk(batch: &mut WriteBatch, id: ChunkId, rec: &ChunkRecord) {
        batch.put(chunk_key(b'c', id), rec.encode());
    }

    pub fn put_log(batch: &mut WriteBatch, id: ChunkId, lsn: u64, rec: &LogRecord) {
        batch.put(chunk_sub_key(b'l', id, lsn), rec.encode());
    }

    /// Drops log records with positions in `[from, to)`.
    pub fn trim_log(batch: &mut WriteBatch, id: ChunkId, from: u64, to: u64) {
        batch.delete_range(chunk_sub_key(b'l', id, from), chunk_sub_key(b'l', id, to));
    }

    pub fn put_bad(batch: &mut WriteBatch, id: ChunkId, block: u64) {
        batch.put(chunk_sub_key(b'b', id, block), []);
    }

    pub fn delete_bad(batch: &mut WriteBatch, id: ChunkId, block: u64) {
        batch.delete(chunk_sub_key(b'b', id, block));
    }

    /// Everything about a chunk, for deletion.
    pub fn delete_chunk(batch: &mut WriteBatch, id: ChunkId) {
        batch.delete(chunk_key(b'c', id));
        batch.delete_range(
            chunk_sub_key(b'l', id, 0),
            chunk_sub_key(b'l', id, u64::MAX),
        );
        batch.delete(chunk_sub_key(b'l', id, u64::MAX));
        batch.delete_range(
            chunk_sub_key(b'b', id, 0),
            chunk_sub_key(b'b', id, u64::MAX),
        );
        batch.delete(chunk_sub_key(b'b', id, u64::MAX));
        for tag in [b'S', b's'] {
            // Every key of this chunk under `tag` is at most 29 bytes: all sort below the
            // prefix followed by 16 0xff bytes, which is deleted on its own.
            let mut end = [0xffu8; 29];
            end[..13].copy_from_slice(&chunk_key(tag, id));
            batch.delete_range(&chunk_key(tag, id)[..], &end[..]);
            batch.delete(end);
        }
    }

    pub fn put_snap(batch: &mut WriteBatch, id: ChunkId, snap: u64, rec: &SnapRecord) {
        batch.put(chunk_sub_key(b'S', id, snap), rec.encode());
    }

    pub fn put_snap_block(batch: &mut WriteBatch, id: ChunkId, snap: u64, block: u64, crc: u32) {
        batch.put(snap_block_key(id, snap, block), crc.to_le_bytes());
    }

    /// A snapshot's record and every block record.
    pub fn delete_snap(batch: &mut WriteBatch, id: ChunkId, snap: u64) {
        batch.delete(chunk_sub_key(b'S', id, snap));
        batch.delete_range(
            snap_block_key(id, snap, 0),
            snap_block_key(id, snap, u64::MAX),
        );
        batch.delete(snap_block_key(id, snap, u64::MAX));
    }

    /// Every snapshot record of every chunk: (chunk, snapshot, record if decodable).
    pub fn snaps(&self) -> Result<Vec<(ChunkId, u64, Option<SnapRecord>)>, String> {
        self.scan(b'S', |k, v| {
            Some((chunk_of(k)?, sub_of(k)?, SnapRecord::decode(v)))
        })
    }

    /// Every block held by a snapshot: (chunk, snapshot, block, stored crc).
    pub fn snap_blocks(&self) -> Result<Vec<(ChunkId, u64, u64, u32)>, String> {
        self.scan(b's', |k, v| {
            let block = u64::from_be_bytes(k.get(21..29)?.try_into().ok()?);
            let crc = u32::from_le_bytes(v.try_into().ok()?);
            Some((chunk_of(k)?, sub_of(k)?, block, crc))
        })
    }

    /// Every chunk record; undecodable ones are returned as errors for the caller to report.
    pub fn chunks(&self) -> Result<Vec<(ChunkId, Option<ChunkRecord>)>, String> {
        self.scan(b'c', |k, v| Some((chunk_of(k)?, ChunkRecord::decode(v))))
    }

    /// Log records of `id` from position `from` on, in order.
    pub fn log(&self, id: ChunkId, from: u64) -> Result<Vec<(u64, Option<LogRecord>)>, String> {
        let start = chunk_sub_key(b'l', id, from);
        let prefix = chunk_key(b'l', id);
        let mut out = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(&start, Direction::Forward))
        {
            let (k, v) = item.map_err(|e| e.to_string())?;
            if !k.starts_with(&prefix) {
                break;
            }
            if let Some(lsn) = sub_of(&k) {
                out.push((lsn, LogRecord::decode(&v)));
            }
        }
        Ok(out)
    }

    /// Every recorded bad block, by chunk.
    pub fn bad_blocks(&self) -> Result<Vec<(ChunkId, u64)>, String> {
        self.scan(b'b', |k, _| Some((chunk_of(k)?, sub_of(k)?)))
    }

    fn scan<T>(&self, tag: u8, f: impl Fn(&[u8], &[u8]) -> Option<T>) -> Result<Vec<T>, String> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(&[tag], Direction::Forward))
        {
            let (k, v) = item.map_err(|e| e.to_string())?;
            if k.first() != Some(&tag) {
                break;
            }
            out.extend(f(&k, &v));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let c = ChunkRecord {
            size: 1,
            epoch: 2,
            version: 3,
            lsn: 4,
            checkpoint_lsn: 5,
            first_lsn: 6,
            trimmed_seq: 7,
        };
        assert_eq!(ChunkRecord::decode(&c.encode()), Some(c));
        assert_eq!(ChunkRecord::decode(&[1, 2, 3]), None);
        for crcs in [
            vec![(10, 1), (11, 2), (12, 3)],
            vec![(10, 1), (20, 2)],
            vec![],
        ] {
            let l = LogRecord {
                kind: LogKind::Write,
                seq: 9,
                epoch: 1,
                offset: 40960,
                len: 12288,
                crcs,
            };
            let enc = l.encode();
            assert_eq!(LogRecord::decode(&enc), Some(l));
            assert_eq!(LogRecord::decode(&enc[..enc.len() - 1]), None);
        }
    }

    #[test]
    fn log_iterates_one_chunk_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let m = Meta::open(dir.path()).unwrap();
        let (a, b) = (ChunkId::new(1, 0), ChunkId::new(1, 1));
        let mut batch = WriteBatch::default();
        for lsn in [3u64, 1, 2, 300] {
            let r = LogRecord {
                kind: LogKind::Zero,
                seq: lsn,
                epoch: 0,
                offset: 0,
                len: 4096,
                crcs: vec![],
            };
            Meta::put_log(&mut batch, a, lsn, &r);
            Meta::put_log(&mut batch, b, lsn, &r);
        }
        Meta::put_chunk(&mut batch, a, &ChunkRecord::default());
        m.write(batch, true).unwrap();
        let lsns: Vec<u64> = m.log(a, 2).unwrap().into_iter().map(|x| x.0).collect();
        assert_eq!(lsns, vec![2, 3, 300]);
        let mut batch = WriteBatch::default();
        Meta::trim_log(&mut batch, a, 0, 3);
        m.write(batch, false).unwrap();
        assert_eq!(m.log(a, 0).unwrap().len(), 2);
        assert_eq!(m.log(b, 0).unwrap().len(), 4);
        assert_eq!(m.chunks().unwrap().len(), 1);
        let mut batch = WriteBatch::default();
        Meta::delete_chunk(&mut batch, a);
        m.write(batch, false).unwrap();
        assert!(m.log(a, 0).unwrap().is_empty());
        assert!(m.chunks().unwrap().is_empty());
    }
}
