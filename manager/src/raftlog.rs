//! The manager's Raft log: a [`raft::Storage`] for raft-rs kept in its own RocksDB.
//!
//! It owns everything raft-rs needs to survive a restart: the entries, the hard state, the conf
//! state and the latest snapshot (metadata and the state machine's data).
//!
//! Keys (one tag byte per kind; numbers big-endian so entries iterate in index order):
//! - `v` → `IRSNRLOG` + format version (u32 BE): written when the database is created, checked
//!   at every open
//! - `h` → [`HardState`], `c` → [`ConfState`] (raft-rs's protobuf encoding)
//! - `t` → truncated index (u64 BE) + its term (u64 BE): every entry at or below the index is
//!   gone; its term is kept so that `term(first_index - 1)` answers, as raft-rs requires
//! - `s` → the latest snapshot's [`SnapshotMetadata`], `d` → its data
//! - `e` index → [`Entry`] (raft-rs's protobuf encoding)
//!
//! Invariants, kept by every write and checked at open (a violation is [`Error::Corrupt`]; a gap
//! inside the log is found when it is read): entries are exactly `truncated+1 ..= last`;
//! `truncated <= snapshot index <= last`; `truncated <= commit <= last` (raft-rs panics on a hard
//! state outside its log). `first_index` is `truncated + 1`: after [`RaftLog::compact`] with a
//! `keep` tail that is below the snapshot index, so slightly-behind followers still get entries.
//!
//! For the driver of a `RawNode<RaftLog>`:
//! - Per Ready: `apply_snapshot` (if any), `persist(ready.entries(), ready.hs(), true)`, then
//!   after `advance`, `set_commit(light_ready.commit_index())` before applying the light
//!   Ready's committed entries.
//! - Restart: `Config::applied` must be the index the state machine really holds, and never
//!   above `hard_state().commit`. A state machine rebuilt from [`RaftLog::latest_snapshot`]
//!   holds the snapshot's index: pass that, not 0, or raft-rs replays the `keep` tail below the
//!   snapshot on top of it.
//! - The initial members are bootstrapped at index 0, so a member added later (started fresh,
//!   not bootstrapped) must receive a snapshot rather than the log from index 1, which does not
//!   carry the initial configuration: compact past index 1 before adding members, and snapshot
//!   again once the change adding a member is applied (`snapshot()` only serves snapshots whose
//!   conf state holds the recipient).
//! - Drop every clone of a handle before reopening the same directory (RocksDB's lock).
//!
//! Every mutation is one RocksDB write batch, so a crash leaves either all or none of it. The
//! bounds, hard state, conf state and snapshot metadata are cached in memory; entries and snapshot
//! data are read from RocksDB on demand. Writers hold `log` exclusively for their batch and
//! readers of entries hold it shared, so a reader never sees a log half truncated by a
//! concurrent compaction; `state` is only ever held for a copy or a swap, never across I/O.

use std::mem::ManuallyDrop;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use rocksdb::{Direction, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions, DB};

/// Value of the `v` key: magic, then the format version.
const FORMAT_MAGIC: &[u8; 8] = b"IRSNRLOG";
/// Bump on any incompatible change to the key layout or the value encodings.
pub const FORMAT_VERSION: u32 = 1;

const KEY_VERSION: &[u8] = b"v";
const KEY_HARD_STATE: &[u8] = b"h";
const KEY_CONF_STATE: &[u8] = b"c";
const KEY_TRUNCATED: &[u8] = b"t";
const KEY_SNAP_META: &[u8] = b"s";
const KEY_SNAP_DATA: &[u8] = b"d";
const ENTRY_TAG: u8 = b'e';

/// Larger indexes read from disk are corruption (and would overflow index arithmetic).
const MAX_INDEX: u64 = u64::MAX / 2;

type KeyValue = (Box<[u8]>, Box<[u8]>);

/// Why a raft log operation failed. Converts into [`raft::Error`] with the matching
/// [`StorageError`] (`Compacted`, `Unavailable`, `SnapshotOutOfDate`,
/// `SnapshotTemporarilyUnavailable`; everything else is `Other`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("raft log database: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("raft log corrupt: {0}")]
    Corrupt(String),
    #[error("raft log format: {0}")]
    Format(String),
    #[error("encode raft record: {0}")]
    Encode(#[from] protobuf::ProtobufError),
    #[error("raft log refuses writes after an earlier write error: {0}")]
    Broken(String),
    #[error("raft log entry {index} is compacted (first index {first_index})")]
    Compacted { index: u64, first_index: u64 },
    #[error("raft log entry {index} is unavailable (last index {last_index})")]
    Unavailable { index: u64, last_index: u64 },
    #[error("no snapshot at or above index {request_index} (latest: {latest})")]
    SnapshotTemporarilyUnavailable { request_index: u64, latest: u64 },
    #[error(
        "snapshot at index {index} is out of date (log truncated at {truncated}, \
         latest snapshot {snapshot_index}, commit {commit})"
    )]
    SnapshotOutOfDate {
        index: u64,
        truncated: u64,
        snapshot_index: u64,
        commit: u64,
    },
    #[error("entries starting at {first_new} leave a gap after the last index {last_index}")]
    Gap { first_new: u64, last_index: u64 },
    #[error(
        "entries starting at {first_new} overwrite compacted ones (first index {first_index})"
    )]
    OverwriteCompacted { first_new: u64, first_index: u64 },
    #[error("entries are not consecutive: {prev} is followed by {next}")]
    NotConsecutive { prev: u64, next: u64 },
    #[error("commit index {commit} is beyond the last index {last_index}")]
    CommitBeyondLog { commit: u64, last_index: u64 },
    #[error("cannot compact the raft log at {index}: {reason}")]
    CompactRejected { index: u64, reason: String },
    #[error("the raft log already holds state: bootstrap needs a fresh log")]
    NotFresh,
}

impl From<Error> for raft::Error {
    fn from(e: Error) -> Self {
        let s = match e {
            Error::Compacted { .. } => StorageError::Compacted,
            Error::Unavailable { .. } => StorageError::Unavailable,
            Error::SnapshotTemporarilyUnavailable { .. } => {
                StorageError::SnapshotTemporarilyUnavailable
            }
            Error::SnapshotOutOfDate { .. } => StorageError::SnapshotOutOfDate,
            e => StorageError::Other(Box::new(e)),
        };
        raft::Error::Store(s)
    }
}

/// What is cached in memory; replaced as a whole after each successful write.
#[derive(Clone, Debug, Default)]
struct State {
    hard_state: HardState,
    conf_state: ConfState,
    truncated_index: u64,
    truncated_term: u64,
    /// The last entry, or the truncated point when there are no entries.
    last_index: u64,
    last_term: u64,
    snapshot: Option<SnapshotMetadata>,
    fresh: bool,
}

impl State {
    fn first_index(&self) -> u64 {
        self.truncated_index + 1
    }

    fn snapshot_index(&self) -> u64 {
        self.snapshot.as_ref().map_or(0, |m| m.index)
    }
}

struct Inner {
    db: ManuallyDrop<DB>,
    /// Shared by readers of entries and snapshot data, exclusive for writers (see the module doc).
    log: RwLock<()>,
    state: RwLock<State>,
    /// The first failed write's error; see [`Inner::write`].
    broken: Mutex<Option<String>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.broken.get_mut().map_or(true, |b| b.is_some()) {
            // Closing a DB whose WAL writer saw an error can trip an assertion in Debian's
            // librocksdb (built with asserts) and abort the process: leak it instead.
            return;
        }
        // SAFETY: `db` is dropped exactly once, here, and never used afterwards.
        unsafe { ManuallyDrop::drop(&mut self.db) };
    }
}

/// The Raft log of one manager member. Cloning gives another handle to the same log.
#[derive(Clone)]
pub struct RaftLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RaftLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.inner.state();
        f.debug_struct("RaftLog")
            .field("first_index", &st.first_index())
            .field("last_index", &st.last_index)
            .field("commit", &st.hard_state.commit)
            .field("snapshot_index", &st.snapshot_index())
            .finish()
    }
}

fn entry_key(index: u64) -> [u8; 9] {
    let mut k = [ENTRY_TAG; 9];
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

fn index_of(key: &[u8]) -> Option<u64> {
    match key {
        [ENTRY_TAG, rest @ ..] => Some(u64::from_be_bytes(rest.try_into().ok()?)),
        _ => None,
    }
}

fn show_key(key: &[u8]) -> String {
    match index_of(key) {
        Some(i) => format!("entry {i}"),
        None => format!("key {:?}", String::from_utf8_lossy(key)),
    }
}

fn decode<M: protobuf::Message>(key: &[u8], value: &[u8]) -> Result<M, Error> {
    M::parse_from_bytes(value).map_err(|e| Error::Corrupt(format!("{}: {e}", show_key(key))))
}

fn decode_entry(key: &[u8], value: &[u8]) -> Result<Entry, Error> {
    let e: Entry = decode(key, value)?;
    match index_of(key) {
        Some(i) if i == e.index => Ok(e),
        _ => Err(Error::Corrupt(format!(
            "{} holds an entry with index {}",
            show_key(key),
            e.index
        ))),
    }
}

fn encode_truncated(index: u64, term: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&index.to_be_bytes());
    v[8..].copy_from_slice(&term.to_be_bytes());
    v
}

fn decode_truncated(value: &[u8]) -> Result<(u64, u64), Error> {
    let bad = || Error::Corrupt(format!("truncated state: {} bytes, want 16", value.len()));
    let (i, t) = value.split_at_checked(8).ok_or_else(bad)?;
    let i = u64::from_be_bytes(i.try_into().map_err(|_| bad())?);
    let t = u64::from_be_bytes(t.try_into().map_err(|_| bad())?);
    Ok((i, t))
}

fn format_value() -> Vec<u8> {
    let mut v = FORMAT_MAGIC.to_vec();
    v.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    v
}

impl Inner {
    fn state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of the cache; a writer changes the copy and stores it with [`Inner::set_state`].
    fn state_copy(&self) -> State {
        self.state().clone()
    }

    fn set_state(&self, st: State) {
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = st;
    }

    fn read_log(&self) -> RwLockReadGuard<'_, ()> {
        self.log.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_log(&self) -> RwLockWriteGuard<'_, ()> {
        self.log.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes a batch. After one failure every later write is refused without reaching
    /// RocksDB: its WAL writer keeps the error, and Debian's librocksdb (built with assertions)
    /// aborts the process on the next write through it.
    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), Error> {
        let mut broken = self.broken.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = broken.as_ref() {
            return Err(Error::Broken(e.clone()));
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch, &wo).map_err(|e| {
            *broken = Some(e.to_string());
            Error::Db(e)
        })
    }

    fn get_pb<M: protobuf::Message>(&self, key: &[u8]) -> Result<Option<M>, Error> {
        match self.db.get_pinned(key)? {
            Some(v) => decode(key, &v).map(Some),
            None => Ok(None),
        }
    }

    /// The term of entry `index`; the caller holds `log` (shared or exclusive).
    fn term(&self, st: &State, index: u64) -> Result<u64, Error> {
        if index == st.truncated_index {
            return Ok(st.truncated_term);
        }
        if let Some(m) = st.snapshot.as_ref().filter(|m| m.index == index) {
            return Ok(m.term);
        }
        if index < st.truncated_index {
            return Err(Error::Compacted {
                index,
                first_index: st.first_index(),
            });
        }
        if index > st.last_index {
            return Err(Error::Unavailable {
                index,
                last_index: st.last_index,
            });
        }
        if index == st.last_index {
            return Ok(st.last_term);
        }
        let key = entry_key(index);
        match self.db.get_pinned(key)? {
            Some(v) => Ok(decode_entry(&key, &v)?.term),
            None => Err(Error::Corrupt(format!(
                "entry {index} is missing (log holds {}..={})",
                st.first_index(),
                st.last_index
            ))),
        }
    }

    /// Entries `[low, high)` limited like [`raft::util::limit_size`]; the caller holds `log`.
    fn entries(
        &self,
        st: &State,
        low: u64,
        high: u64,
        max_size: Option<u64>,
    ) -> Result<Vec<Entry>, Error> {
        if low < st.first_index() {
            return Err(Error::Compacted {
                index: low,
                first_index: st.first_index(),
            });
        }
        if high > st.last_index + 1 || low > high {
            return Err(Error::Unavailable {
                index: high.saturating_sub(1),
                last_index: st.last_index,
            });
        }
        let max_size = match max_size {
            None | Some(raft::NO_LIMIT) => u64::MAX,
            Some(m) => m,
        };
        let mut out = Vec::new();
        if low == high {
            return Ok(out);
        }
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(entry_key(high).to_vec());
        let start = entry_key(low);
        let mut size = 0u64;
        for item in self
            .db
            .iterator_opt(IteratorMode::From(&start, Direction::Forward), ro)
        {
            let (k, v) = item?;
            let expected = low + out.len() as u64;
            if index_of(&k) != Some(expected) {
                return Err(Error::Corrupt(format!(
                    "entry {expected} is missing (found {})",
                    show_key(&k)
                )));
            }
            let e = decode_entry(&k, &v)?;
            size = size.saturating_add(u64::from(e.compute_size()));
            if !out.is_empty() && size > max_size {
                return Ok(out);
            }
            out.push(e);
        }
        if out.len() as u64 != high - low {
            return Err(Error::Corrupt(format!(
                "entry {} is missing (log holds {}..={})",
                low + out.len() as u64,
                st.first_index(),
                st.last_index
            )));
        }
        Ok(out)
    }

    fn snapshot_data(&self) -> Result<Vec<u8>, Error> {
        match self.db.get(KEY_SNAP_DATA)? {
            Some(d) => Ok(d),
            None => Err(Error::Corrupt("snapshot data is missing".into())),
        }
    }

    /// The first (forward) or last (reverse) entry key's index and value, if any.
    fn edge_entry(&self, forward: bool) -> Result<Option<KeyValue>, Error> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(vec![ENTRY_TAG]);
        ro.set_iterate_upper_bound(vec![ENTRY_TAG + 1]);
        let mode = if forward {
            IteratorMode::Start
        } else {
            IteratorMode::End
        };
        Ok(self.db.iterator_opt(mode, ro).next().transpose()?)
    }

    fn load(&self) -> Result<State, Error> {
        match self.db.get(KEY_VERSION)? {
            Some(v) if v == format_value() => {}
            Some(v) => {
                return Err(match v.strip_prefix(FORMAT_MAGIC.as_slice()) {
                    Some(ver) if ver.len() == 4 => Error::Format(format!(
                        "format version {}, this build reads version {FORMAT_VERSION}",
                        u32::from_be_bytes([ver[0], ver[1], ver[2], ver[3]])
                    )),
                    _ => Error::Format(format!("not an IronSAN raft log (version key {v:?})")),
                })
            }
            None => {
                if self.db.iterator(IteratorMode::Start).next().is_some() {
                    return Err(Error::Format(
                        "no format version key, but the database holds data".into(),
                    ));
                }
                let mut b = WriteBatch::default();
                b.put(KEY_VERSION, format_value());
                self.write(b, true)?;
            }
        }

        let hs: Option<HardState> = self.get_pb(KEY_HARD_STATE)?;
        let cs: Option<ConfState> = self.get_pb(KEY_CONF_STATE)?;
        let snapshot: Option<SnapshotMetadata> = self.get_pb(KEY_SNAP_META)?;
        let truncated = match self.db.get_pinned(KEY_TRUNCATED)? {
            Some(v) => Some(decode_truncated(&v)?),
            None => None,
        };
        let first = self.edge_entry(true)?;
        let last = self.edge_entry(false)?;
        let fresh = hs.is_none()
            && cs.is_none()
            && snapshot.is_none()
            && truncated.is_none()
            && first.is_none();
        let (truncated_index, truncated_term) = truncated.unwrap_or((0, 0));
        if truncated_index > MAX_INDEX {
            return Err(Error::Corrupt(format!(
                "truncated index {truncated_index} is impossible"
            )));
        }
        let mut st = State {
            hard_state: hs.unwrap_or_default(),
            conf_state: cs.unwrap_or_default(),
            truncated_index,
            truncated_term,
            last_index: truncated_index,
            last_term: truncated_term,
            snapshot,
            fresh,
        };
        if let (Some((fk, _)), Some((lk, lv))) = (first, last) {
            if index_of(&fk) != Some(truncated_index + 1) {
                return Err(Error::Corrupt(format!(
                    "first {} does not follow the truncated index {truncated_index}",
                    show_key(&fk)
                )));
            }
            let e = decode_entry(&lk, &lv)?;
            if e.index > MAX_INDEX {
                return Err(Error::Corrupt(format!(
                    "last entry index {} is impossible",
                    e.index
                )));
            }
            st.last_index = e.index;
            st.last_term = e.term;
        }
        let snap_index = st.snapshot_index();
        if st.snapshot.is_some() {
            if snap_index < truncated_index || snap_index > st.last_index {
                return Err(Error::Corrupt(format!(
                    "snapshot index {snap_index} outside the log (truncated at {truncated_index}, \
                     last {})",
                    st.last_index
                )));
            }
            if self.db.get_pinned(KEY_SNAP_DATA)?.is_none() {
                return Err(Error::Corrupt("snapshot data is missing".into()));
            }
        } else if truncated_index > 0 {
            return Err(Error::Corrupt(format!(
                "log truncated at {truncated_index} without a snapshot"
            )));
        }
        let commit = st.hard_state.commit;
        if commit < truncated_index || commit > st.last_index {
            return Err(Error::Corrupt(format!(
                "commit index {commit} outside the log (truncated at {truncated_index}, last {})",
                st.last_index
            )));
        }
        Ok(st)
    }
}

impl RaftLog {
    /// Opens or creates the log in `dir` (a RocksDB). Restores hard state, conf state, the latest
    /// snapshot's metadata and the entry bounds into an in-memory cache.
    pub fn open(dir: &Path) -> Result<RaftLog, Error> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        // Small records, compacted regularly: a 4 MiB memtable is plenty, and a small WAL keeps
        // restarts quick.
        opts.set_write_buffer_size(4 << 20);
        opts.set_max_total_wal_size(64 << 20);
        // As in the storage daemon's Meta: RocksDB's info log on a failed disk can trip an
        // assertion in Debian's librocksdb; errors reach us through the returned statuses.
        opts.set_log_level(rocksdb::LogLevel::Fatal);
        opts.set_keep_log_file_num(1);
        let db = DB::open(&opts, dir)?;
        let inner = Inner {
            db: ManuallyDrop::new(db),
            log: RwLock::new(()),
            state: RwLock::new(State::default()),
            broken: Mutex::new(None),
        };
        let st = inner.load()?;
        inner.set_state(st);
        Ok(RaftLog {
            inner: Arc::new(inner),
        })
    }

    /// True when nothing was ever written (fresh data dir): no hard state, no conf state, no
    /// entries, no snapshot.
    pub fn is_fresh(&self) -> bool {
        self.inner.state().fresh
    }

    /// Bootstraps a new group: conf state with these voters, at index 0 / term 0 (what raft-rs
    /// expects of a new member of the initial configuration). Synced. Fails on a log that is
    /// not fresh.
    pub fn bootstrap(&self, voters: &[u64]) -> Result<(), Error> {
        let _w = self.inner.write_log();
        let mut st = self.inner.state_copy();
        if !st.fresh {
            return Err(Error::NotFresh);
        }
        let cs = ConfState {
            voters: voters.to_vec(),
            ..Default::default()
        };
        let mut b = WriteBatch::default();
        b.put(KEY_CONF_STATE, cs.write_to_bytes()?);
        b.put(KEY_HARD_STATE, HardState::default().write_to_bytes()?);
        self.inner.write(b, true)?;
        st.conf_state = cs;
        st.fresh = false;
        self.inner.set_state(st);
        Ok(())
    }

    /// Persists one raft-rs Ready's worth in ONE RocksDB write batch: appends `entries` (first
    /// truncating any existing entries at index >= entries[0].index, as raft requires on
    /// conflict) and sets the hard state when given. `sync` = fsync the WAL.
    pub fn persist(
        &self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
        sync: bool,
    ) -> Result<(), Error> {
        if entries.is_empty() && hard_state.is_none() {
            return Ok(());
        }
        let _w = self.inner.write_log();
        let mut st = self.inner.state_copy();
        let mut b = WriteBatch::default();
        if let (Some(first), Some(last)) = (entries.first(), entries.last()) {
            if let Some(w) = entries
                .windows(2)
                .find(|w| w[0].index.checked_add(1) != Some(w[1].index))
            {
                return Err(Error::NotConsecutive {
                    prev: w[0].index,
                    next: w[1].index,
                });
            }
            if first.index < st.first_index() {
                return Err(Error::OverwriteCompacted {
                    first_new: first.index,
                    first_index: st.first_index(),
                });
            }
            if first.index > st.last_index + 1 {
                return Err(Error::Gap {
                    first_new: first.index,
                    last_index: st.last_index,
                });
            }
            if last.index < st.last_index {
                b.delete_range(entry_key(last.index + 1), entry_key(st.last_index + 1));
            }
            for e in entries {
                b.put(entry_key(e.index), e.write_to_bytes()?);
            }
            st.last_index = last.index;
            st.last_term = last.term;
        }
        if let Some(hs) = hard_state {
            st.hard_state = hs.clone();
        }
        if st.hard_state.commit > st.last_index {
            return Err(Error::CommitBeyondLog {
                commit: st.hard_state.commit,
                last_index: st.last_index,
            });
        }
        if hard_state.is_some() {
            b.put(KEY_HARD_STATE, st.hard_state.write_to_bytes()?);
        }
        self.inner.write(b, sync)?;
        st.fresh = false;
        self.inner.set_state(st);
        Ok(())
    }

    /// Raises the stored commit index to `commit` (never lowers it): for raft-rs's
    /// `LightReady::commit_index()`. Must be durable before entries up to `commit` are applied
    /// and that application is made durable, since a restart needs `Config::applied <= commit`.
    pub fn set_commit(&self, commit: u64, sync: bool) -> Result<(), Error> {
        let _w = self.inner.write_log();
        let mut st = self.inner.state_copy();
        if commit <= st.hard_state.commit {
            return Ok(());
        }
        if commit > st.last_index {
            return Err(Error::CommitBeyondLog {
                commit,
                last_index: st.last_index,
            });
        }
        st.hard_state.commit = commit;
        let mut b = WriteBatch::default();
        b.put(KEY_HARD_STATE, st.hard_state.write_to_bytes()?);
        self.inner.write(b, sync)?;
        st.fresh = false;
        self.inner.set_state(st);
        Ok(())
    }

    /// Records the conf state after a configuration change was applied. Synced.
    pub fn set_conf_state(&self, cs: &ConfState) -> Result<(), Error> {
        let _w = self.inner.write_log();
        let mut st = self.inner.state_copy();
        let mut b = WriteBatch::default();
        b.put(KEY_CONF_STATE, cs.write_to_bytes()?);
        self.inner.write(b, true)?;
        st.conf_state = cs.clone();
        st.fresh = false;
        self.inner.set_state(st);
        Ok(())
    }

    /// Installs a snapshot received from the leader: stores it (metadata + data), drops every
    /// entry (raft-rs only hands out a snapshot its log does not already match, and it takes the
    /// log to end at the snapshot), sets conf state from its metadata, and sets hard state's
    /// commit to the snapshot index (its term to at least the snapshot's). Synced.
    ///
    /// Fails with [`Error::SnapshotOutOfDate`] (raft's `SnapshotOutOfDate`) when the index is not
    /// beyond the truncated point, the latest snapshot and the commit index.
    pub fn apply_snapshot(&self, snap: &Snapshot) -> Result<(), Error> {
        let meta = snap.get_metadata();
        let index = meta.index;
        let _w = self.inner.write_log();
        let mut st = self.inner.state_copy();
        if index <= st.truncated_index
            || index <= st.snapshot_index()
            || index < st.hard_state.commit
        {
            return Err(Error::SnapshotOutOfDate {
                index,
                truncated: st.truncated_index,
                snapshot_index: st.snapshot_index(),
                commit: st.hard_state.commit,
            });
        }
        let mut b = WriteBatch::default();
        if st.last_index > st.truncated_index {
            b.delete_range(
                entry_key(st.truncated_index + 1),
                entry_key(st.last_index + 1),
            );
        }
        st.hard_state.commit = index;
        st.hard_state.term = st.hard_state.term.max(meta.term);
        st.conf_state = meta.get_conf_state().clone();
        b.put(KEY_SNAP_META, meta.write_to_bytes()?);
        b.put(KEY_SNAP_DATA, &snap.data);
        b.put(KEY_TRUNCATED, encode_truncated(index, meta.term));
        b.put(KEY_CONF_STATE, st.conf_state.write_to_bytes()?);
        b.put(KEY_HARD_STATE, st.hard_state.write_to_bytes()?);
        self.inner.write(b, true)?;
        st.truncated_index = index;
        st.truncated_term = meta.term;
        st.last_index = index;
        st.last_term = meta.term;
        st.snapshot = Some(meta.clone());
        st.fresh = false;
        self.inner.set_state(st);
        Ok(())
    }

    /// The local state machine made a snapshot of itself at applied `index` (its term looked up
    /// from the log): stores it as the latest snapshot (data = `data`, conf state = `cs`), then
    /// deletes log entries with index <= `index.saturating_sub(keep)` (a tail of `keep` entries
    /// stays so slightly-behind followers get entries, not a snapshot). Synced.
    ///
    /// Fails with [`Error::CompactRejected`] if `index` is 0, beyond the last entry or the
    /// stored commit index, or below the current snapshot.
    pub fn compact(
        &self,
        index: u64,
        cs: &ConfState,
        data: Vec<u8>,
        keep: u64,
    ) -> Result<(), Error> {
        let reject = |reason: String| Error::CompactRejected { index, reason };
        let _w = self.inner.write_log();
        let mut st = self.inner.state_copy();
        if index == 0 {
            return Err(reject("a snapshot at index 0 is empty".into()));
        }
        if index > st.last_index {
            return Err(reject(format!("beyond the last entry {}", st.last_index)));
        }
        if index > st.hard_state.commit {
            return Err(reject(format!(
                "beyond the commit index {}",
                st.hard_state.commit
            )));
        }
        if index < st.snapshot_index() {
            return Err(reject(format!(
                "below the latest snapshot {}",
                st.snapshot_index()
            )));
        }
        let term = self.inner.term(&st, index)?;
        let mut b = WriteBatch::default();
        let truncate_to = index.saturating_sub(keep);
        if truncate_to > st.truncated_index {
            let truncate_term = self.inner.term(&st, truncate_to)?;
            b.delete_range(
                entry_key(st.truncated_index + 1),
                entry_key(truncate_to + 1),
            );
            b.put(KEY_TRUNCATED, encode_truncated(truncate_to, truncate_term));
            st.truncated_index = truncate_to;
            st.truncated_term = truncate_term;
        }
        let meta = SnapshotMetadata {
            index,
            term,
            conf_state: Some(cs.clone()).into(),
            ..Default::default()
        };
        b.put(KEY_SNAP_META, meta.write_to_bytes()?);
        b.put(KEY_SNAP_DATA, data);
        self.inner.write(b, true)?;
        st.snapshot = Some(meta);
        st.fresh = false;
        self.inner.set_state(st);
        Ok(())
    }

    /// The latest stored snapshot (None if never made), metadata + data. A failure to read the
    /// data is logged and gives None; [`RaftLog::try_latest_snapshot`] returns it instead.
    pub fn latest_snapshot(&self) -> Option<Snapshot> {
        self.try_latest_snapshot().unwrap_or_else(|e| {
            tracing::error!(error = %e, "read the latest raft snapshot");
            None
        })
    }

    /// The latest stored snapshot, metadata + data.
    pub fn try_latest_snapshot(&self) -> Result<Option<Snapshot>, Error> {
        let _r = self.inner.read_log();
        let Some(meta) = self.inner.state().snapshot.clone() else {
            return Ok(None);
        };
        Ok(Some(Snapshot {
            data: self.inner.snapshot_data()?.into(),
            metadata: Some(meta).into(),
            ..Default::default()
        }))
    }

    pub fn hard_state(&self) -> HardState {
        self.inner.state().hard_state.clone()
    }

    pub fn conf_state(&self) -> ConfState {
        self.inner.state().conf_state.clone()
    }

    /// The first index [`raft::Storage::entries`] can return: the truncated index + 1.
    pub fn first_index(&self) -> u64 {
        self.inner.state().first_index()
    }

    /// The last entry's index, or the truncated index when the log holds no entries.
    pub fn last_index(&self) -> u64 {
        self.inner.state().last_index
    }

    /// The index and term of the latest snapshot, if any, without reading its data.
    pub fn snapshot_index_term(&self) -> Option<(u64, u64)> {
        self.inner
            .state()
            .snapshot
            .as_ref()
            .map(|m| (m.index, m.term))
    }
}

impl raft::Storage for RaftLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let st = self.inner.state();
        Ok(RaftState::new(st.hard_state.clone(), st.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let _r = self.inner.read_log();
        let st = self.inner.state_copy();
        Ok(self.inner.entries(&st, low, high, max_size.into())?)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let _r = self.inner.read_log();
        let st = self.inner.state_copy();
        Ok(self.inner.term(&st, idx)?)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(RaftLog::first_index(self))
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(RaftLog::last_index(self))
    }

    /// The latest stored snapshot when its index is at least `request_index` and its conf state
    /// holds `to`, otherwise `SnapshotTemporarilyUnavailable` (raft-rs retries later; the node
    /// driver snapshots regularly). That includes the case of no snapshot at all: raft-rs panics
    /// on an empty snapshot ("need non-empty snapshot"), and it only asks for one when a follower
    /// needs entries below `first_index`, which only a snapshot can have removed. A snapshot
    /// whose conf state lacks `to` (taken before `to` was added) would only be refused by `to`.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let snap = self.try_latest_snapshot()?;
        match snap {
            Some(s) if s.get_metadata().index >= request_index && has_member(&s, to) => Ok(s),
            s => Err(Error::SnapshotTemporarilyUnavailable {
                request_index,
                latest: s.map_or(0, |s| s.get_metadata().index),
            }
            .into()),
        }
    }
}

/// Whether the snapshot's configuration holds `id`, as raft-rs's `Raft::restore` checks.
fn has_member(snap: &Snapshot, id: u64) -> bool {
    let cs = snap.get_metadata().get_conf_state();
    cs.voters
        .iter()
        .chain(&cs.learners)
        .chain(&cs.voters_outgoing)
        .any(|v| *v == id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8; 8].into(),
            ..Default::default()
        }
    }

    /// Writes a raw value into a closed log's database.
    fn poke(dir: &Path, key: &[u8], value: &[u8]) {
        let db = DB::open_default(dir).unwrap();
        db.put(key, value).unwrap();
    }

    fn open_err(dir: &Path) -> Error {
        match RaftLog::open(dir) {
            Ok(_) => panic!("open succeeded"),
            Err(e) => e,
        }
    }

    #[test]
    fn keys_order_entries_by_index() {
        let keys: Vec<_> = [0u64, 1, 255, 256, u64::MAX].map(entry_key).into();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert_eq!(index_of(&entry_key(300)), Some(300));
        assert_eq!(index_of(b"e12"), None);
        assert_eq!(index_of(KEY_HARD_STATE), None);
        assert_eq!(decode_truncated(&encode_truncated(7, 3)).unwrap(), (7, 3));
        assert!(matches!(decode_truncated(&[0; 15]), Err(Error::Corrupt(_))));
        assert!(matches!(decode_truncated(&[0; 17]), Err(Error::Corrupt(_))));
    }

    #[test]
    fn corrupt_hard_state_fails_open() {
        let dir = tempfile::tempdir().unwrap();
        drop(RaftLog::open(dir.path()).unwrap());
        poke(dir.path(), KEY_HARD_STATE, &[0xff, 0xff, 0xff]);
        let e = open_err(dir.path());
        assert!(
            matches!(&e, Error::Corrupt(m) if m.contains("\"h\"")),
            "{e}"
        );
    }

    #[test]
    fn corrupt_last_entry_fails_open() {
        let dir = tempfile::tempdir().unwrap();
        let log = RaftLog::open(dir.path()).unwrap();
        log.persist(&[entry(1, 1), entry(2, 1)], None, true)
            .unwrap();
        drop(log);
        poke(dir.path(), &entry_key(2), b"\x08");
        let e = open_err(dir.path());
        assert!(
            matches!(&e, Error::Corrupt(m) if m.contains("entry 2")),
            "{e}"
        );
        // An entry stored under the wrong key is caught too.
        poke(
            dir.path(),
            &entry_key(2),
            &entry(5, 1).write_to_bytes().unwrap(),
        );
        let e = open_err(dir.path());
        assert!(
            matches!(&e, Error::Corrupt(m) if m.contains("index 5")),
            "{e}"
        );
    }

    #[test]
    fn corrupt_middle_entry_fails_reads_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let log = RaftLog::open(dir.path()).unwrap();
        let ents: Vec<_> = (1..=5).map(|i| entry(i, 1)).collect();
        log.persist(&ents, None, true).unwrap();
        drop(log);
        poke(dir.path(), &entry_key(3), &[0x0a, 0x80]);
        let log = RaftLog::open(dir.path()).unwrap();
        let ctx = || GetEntriesContext::empty(false);
        let e = log.entries(1, 6, None, ctx()).unwrap_err();
        assert!(
            matches!(&e, raft::Error::Store(StorageError::Other(o)) if o.to_string().contains("entry 3")),
            "{e}"
        );
        assert!(log.term(3).is_err());
        // Reads that stop before the bad entry still work.
        assert_eq!(log.entries(1, 3, None, ctx()).unwrap(), ents[..2].to_vec());
        assert_eq!(
            log.entries(1, 6, Some(0), ctx()).unwrap(),
            ents[..1].to_vec()
        );
        assert_eq!(log.term(4).unwrap(), 1);
    }

    #[test]
    fn missing_entry_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let log = RaftLog::open(dir.path()).unwrap();
        let ents: Vec<_> = (1..=5).map(|i| entry(i, 1)).collect();
        log.persist(&ents, None, true).unwrap();
        drop(log);
        DB::open_default(dir.path())
            .unwrap()
            .delete(entry_key(3))
            .unwrap();
        let log = RaftLog::open(dir.path()).unwrap();
        let e = log
            .entries(2, 5, None, GetEntriesContext::empty(false))
            .unwrap_err();
        assert!(e.to_string().contains("entry 3 is missing"), "{e}");
        let e = log.term(3).unwrap_err();
        assert!(e.to_string().contains("entry 3 is missing"), "{e}");
    }

    #[test]
    fn corrupt_snapshot_and_bounds_fail_open() {
        let dir = tempfile::tempdir().unwrap();
        let log = RaftLog::open(dir.path()).unwrap();
        let ents: Vec<_> = (1..=5).map(|i| entry(i, 1)).collect();
        let hs = HardState {
            term: 1,
            commit: 5,
            ..Default::default()
        };
        log.persist(&ents, Some(&hs), true).unwrap();
        log.compact(4, &ConfState::default(), b"sm".to_vec(), 1)
            .unwrap();
        drop(log);

        poke(dir.path(), KEY_SNAP_META, b"\xff");
        let e = open_err(dir.path());
        assert!(
            matches!(&e, Error::Corrupt(m) if m.contains("\"s\"")),
            "{e}"
        );

        let dir = tempfile::tempdir().unwrap();
        drop(RaftLog::open(dir.path()).unwrap());
        poke(dir.path(), KEY_TRUNCATED, b"short");
        assert!(matches!(open_err(dir.path()), Error::Corrupt(_)));

        // A hard state committing beyond the log would make raft-rs panic: refused at open.
        let dir = tempfile::tempdir().unwrap();
        drop(RaftLog::open(dir.path()).unwrap());
        let hs = HardState {
            commit: 9,
            ..Default::default()
        };
        poke(dir.path(), KEY_HARD_STATE, &hs.write_to_bytes().unwrap());
        let e = open_err(dir.path());
        assert!(
            matches!(&e, Error::Corrupt(m) if m.contains("commit index 9")),
            "{e}"
        );
    }

    #[test]
    fn impossible_indexes_fail_open() {
        let dir = tempfile::tempdir().unwrap();
        drop(RaftLog::open(dir.path()).unwrap());
        poke(dir.path(), KEY_TRUNCATED, &encode_truncated(u64::MAX, 1));
        let e = open_err(dir.path());
        assert!(
            matches!(&e, Error::Corrupt(m) if m.contains("impossible")),
            "{e}"
        );

        let dir = tempfile::tempdir().unwrap();
        drop(RaftLog::open(dir.path()).unwrap());
        poke(
            dir.path(),
            &entry_key(u64::MAX),
            &entry(u64::MAX, 1).write_to_bytes().unwrap(),
        );
        // The lone entry does not follow the (absent) truncated point either; both are caught.
        assert!(matches!(open_err(dir.path()), Error::Corrupt(_)));
    }

    #[test]
    fn format_version_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        drop(RaftLog::open(dir.path()).unwrap());
        let mut v = FORMAT_MAGIC.to_vec();
        v.extend_from_slice(&(FORMAT_VERSION + 1).to_be_bytes());
        poke(dir.path(), KEY_VERSION, &v);
        let e = open_err(dir.path());
        assert!(
            matches!(&e, Error::Format(m) if m.contains(&format!("format version {}", FORMAT_VERSION + 1))),
            "{e}"
        );

        // Some other database, without our version key.
        let dir = tempfile::tempdir().unwrap();
        poke(dir.path(), b"zzz", b"1");
        assert!(matches!(open_err(dir.path()), Error::Format(_)));
    }
}
