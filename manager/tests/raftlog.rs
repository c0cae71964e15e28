//! `RaftLog` as raft-rs storage: the `raft::Storage` contract against a real RocksDB, restarts,
//! compaction and snapshots, and a three-member raft-rs group running on it.

use std::collections::VecDeque;
use std::path::PathBuf;

use ironsan_manager::raftlog::{Error, RaftLog};
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Message, Snapshot, SnapshotMetadata};
use raft::{Config, GetEntriesContext, RawNode, StateRole, Storage, StorageError};

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: format!("entry {index}").into_bytes().into(),
        ..Default::default()
    }
}

fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
    range.map(|i| entry(i, term)).collect()
}

fn ctx() -> GetEntriesContext {
    GetEntriesContext::empty(false)
}

fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
    HardState {
        term,
        vote,
        commit,
        ..Default::default()
    }
}

fn store_err(e: raft::Error) -> StorageError {
    match e {
        raft::Error::Store(s) => s,
        e => panic!("not a storage error: {e}"),
    }
}

#[test]
fn handle_is_send_sync_clone() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    check::<RaftLog>();
}

/// Append, read back, term/first/last; a conflicting append truncates the suffix; `max_size`
/// limits like `raft::util::limit_size`.
#[test]
fn append_read_truncate_and_limit() {
    let dir = tempfile::tempdir().unwrap();
    let log = RaftLog::open(dir.path()).unwrap();
    assert!(log.is_fresh());
    assert_eq!((log.first_index(), log.last_index()), (1, 0));
    assert_eq!(log.term(0).unwrap(), 0);
    assert_eq!(
        store_err(log.term(1).unwrap_err()),
        StorageError::Unavailable
    );
    assert_eq!(log.entries(1, 1, None, ctx()).unwrap(), vec![]);

    log.persist(&entries(1..=5, 1), Some(&hard_state(1, 1, 2)), true)
        .unwrap();
    assert!(!log.is_fresh());
    assert_eq!((log.first_index(), log.last_index()), (1, 5));
    assert_eq!(log.entries(1, 6, None, ctx()).unwrap(), entries(1..=5, 1));
    assert_eq!(log.entries(2, 4, None, ctx()).unwrap(), entries(2..=3, 1));
    assert_eq!(log.term(5).unwrap(), 1);
    assert_eq!(
        store_err(log.term(6).unwrap_err()),
        StorageError::Unavailable
    );
    assert_eq!(
        store_err(log.entries(3, 7, None, ctx()).unwrap_err()),
        StorageError::Unavailable
    );
    assert_eq!(log.hard_state(), hard_state(1, 1, 2));

    // A new leader overwrites 4..=5 with 4..=4 at term 2: entry 5 must go.
    log.persist(&entries(4..=4, 2), None, true).unwrap();
    assert_eq!(log.last_index(), 4);
    assert_eq!(log.term(4).unwrap(), 2);
    assert_eq!(log.term(3).unwrap(), 1);
    assert_eq!(
        store_err(log.term(5).unwrap_err()),
        StorageError::Unavailable
    );
    let mut want = entries(1..=3, 1);
    want.extend(entries(4..=4, 2));
    assert_eq!(log.entries(1, 5, None, ctx()).unwrap(), want);
    // Overwriting in the middle and extending past the old end.
    log.persist(&entries(3..=8, 3), None, true).unwrap();
    assert_eq!(log.last_index(), 8);
    assert_eq!(log.term(2).unwrap(), 1);
    assert_eq!(log.term(3).unwrap(), 3);
    assert_eq!(log.entries(3, 9, None, ctx()).unwrap(), entries(3..=8, 3));

    // Invalid appends are refused and change nothing.
    assert!(matches!(
        log.persist(&entries(10..=11, 3), None, true),
        Err(Error::Gap {
            first_new: 10,
            last_index: 8
        })
    ));
    assert!(matches!(
        log.persist(&[entry(9, 3), entry(11, 3)], None, true),
        Err(Error::NotConsecutive { prev: 9, next: 11 })
    ));
    assert!(matches!(
        log.persist(&[], Some(&hard_state(3, 1, 9)), true),
        Err(Error::CommitBeyondLog { commit: 9, .. })
    ));
    assert_eq!(log.last_index(), 8);
    assert_eq!(log.hard_state(), hard_state(1, 1, 2));

    // max_size: the same cut as raft::util::limit_size, and always at least one entry.
    let all = log.entries(1, 9, None, ctx()).unwrap();
    let size = |e: &Entry| u64::from(e.compute_size());
    for max in [
        0,
        1,
        size(&all[0]),
        size(&all[0]) + size(&all[1]),
        100,
        1000,
    ] {
        let mut want = all.clone();
        raft::util::limit_size(&mut want, Some(max));
        let got = log.entries(1, 9, max, ctx()).unwrap();
        assert_eq!(got, want, "max_size {max}");
        assert!(!got.is_empty());
    }
    assert_eq!(
        log.entries(1, 9, Some(2 * size(&all[0])), ctx())
            .unwrap()
            .len(),
        2
    );
    assert_eq!(log.entries(1, 9, raft::NO_LIMIT, ctx()).unwrap(), all);
}

/// Everything written comes back after a reopen: hard state, conf state, entries, snapshot.
#[test]
fn reopen_restores_everything() {
    let dir = tempfile::tempdir().unwrap();
    let log = RaftLog::open(dir.path()).unwrap();
    log.bootstrap(&[1, 2, 3]).unwrap();
    assert!(matches!(log.bootstrap(&[1]), Err(Error::NotFresh)));
    log.persist(&entries(1..=10, 2), Some(&hard_state(2, 3, 8)), true)
        .unwrap();
    let cs = ConfState {
        voters: vec![1, 2, 3],
        learners: vec![4],
        ..Default::default()
    };
    log.set_conf_state(&cs).unwrap();
    log.compact(6, &cs, b"state at 6".to_vec(), 2).unwrap();
    log.set_commit(9, true).unwrap();
    drop(log);

    let log = RaftLog::open(dir.path()).unwrap();
    assert!(!log.is_fresh());
    assert_eq!(log.hard_state(), hard_state(2, 3, 9));
    assert_eq!(log.conf_state(), cs);
    let state = log.initial_state().unwrap();
    assert_eq!(
        (state.hard_state, state.conf_state),
        (hard_state(2, 3, 9), cs.clone())
    );
    assert_eq!((log.first_index(), log.last_index()), (5, 10));
    assert_eq!(log.entries(5, 11, None, ctx()).unwrap(), entries(5..=10, 2));
    assert_eq!(
        log.term(4).unwrap(),
        2,
        "the truncated entry's term is kept"
    );
    let snap = log.latest_snapshot().unwrap();
    assert_eq!(
        (snap.get_metadata().index, snap.get_metadata().term),
        (6, 2)
    );
    assert_eq!(snap.get_metadata().get_conf_state(), &cs);
    assert_eq!(&snap.data[..], b"state at 6");
    assert_eq!(log.snapshot_index_term(), Some((6, 2)));

    // A bootstrapped but otherwise empty log is not fresh after a reopen either.
    let dir = tempfile::tempdir().unwrap();
    RaftLog::open(dir.path()).unwrap().bootstrap(&[7]).unwrap();
    let log = RaftLog::open(dir.path()).unwrap();
    assert!(!log.is_fresh());
    assert_eq!(log.conf_state().voters, vec![7]);
    assert_eq!((log.first_index(), log.last_index()), (1, 0));
    assert!(log.latest_snapshot().is_none());
}

/// compact keeps `keep` entries below the snapshot, older ones are Compacted, snapshot() serves
/// it; apply_snapshot on a fresh log moves the log to the snapshot.
#[test]
fn compact_snapshot_and_apply_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let log = RaftLog::open(dir.path()).unwrap();
    let cs = ConfState {
        voters: vec![1, 2, 3],
        ..Default::default()
    };
    log.bootstrap(&cs.voters).unwrap();
    let mut ents = entries(1..=10, 1);
    ents.extend(entries(11..=20, 2));
    log.persist(&ents, Some(&hard_state(2, 1, 15)), true)
        .unwrap();

    // Nothing stored yet: raft-rs must be told to come back later, not given an empty snapshot.
    assert_eq!(
        store_err(log.snapshot(0, 2).unwrap_err()),
        StorageError::SnapshotTemporarilyUnavailable
    );
    for (index, why) in [(0, "index 0"), (16, "commit"), (21, "last entry")] {
        let e = log.compact(index, &cs, vec![], 0).unwrap_err();
        assert!(matches!(e, Error::CompactRejected { .. }), "{why}: {e}");
    }

    log.compact(12, &cs, b"sm@12".to_vec(), 4).unwrap();
    assert_eq!((log.first_index(), log.last_index()), (9, 20));
    assert_eq!(log.term(8).unwrap(), 1);
    assert_eq!(log.term(12).unwrap(), 2);
    assert_eq!(store_err(log.term(7).unwrap_err()), StorageError::Compacted);
    assert_eq!(
        store_err(log.entries(8, 12, None, ctx()).unwrap_err()),
        StorageError::Compacted
    );
    assert_eq!(log.entries(9, 21, None, ctx()).unwrap(), ents[8..].to_vec());
    let snap = log.snapshot(0, 2).unwrap();
    assert_eq!(
        (snap.get_metadata().index, snap.get_metadata().term),
        (12, 2)
    );
    assert_eq!(snap.get_metadata().get_conf_state(), &cs);
    assert_eq!(&snap.data[..], b"sm@12");
    assert_eq!(log.snapshot(12, 2).unwrap(), snap);
    // A member the snapshot's configuration does not know would refuse it: not sent.
    assert_eq!(
        store_err(log.snapshot(0, 9).unwrap_err()),
        StorageError::SnapshotTemporarilyUnavailable
    );
    assert_eq!(
        store_err(log.snapshot(13, 2).unwrap_err()),
        StorageError::SnapshotTemporarilyUnavailable
    );
    let e = log.compact(11, &cs, vec![], 0).unwrap_err();
    assert!(
        e.to_string().contains("below the latest snapshot 12"),
        "{e}"
    );
    assert!(matches!(
        log.persist(&entries(8..=8, 3), None, true),
        Err(Error::OverwriteCompacted {
            first_new: 8,
            first_index: 9
        })
    ));

    // A second compaction without a tail: the log starts right after the snapshot.
    log.compact(15, &cs, b"sm@15".to_vec(), 0).unwrap();
    assert_eq!((log.first_index(), log.last_index()), (16, 20));
    assert_eq!(log.term(15).unwrap(), 2);
    assert_eq!(
        store_err(log.term(14).unwrap_err()),
        StorageError::Compacted
    );
    assert_eq!(&log.snapshot(0, 3).unwrap().data[..], b"sm@15");

    // The snapshot installed on a fresh follower.
    let dir2 = tempfile::tempdir().unwrap();
    let follower = RaftLog::open(dir2.path()).unwrap();
    let sent = log.snapshot(0, 2).unwrap();
    follower.apply_snapshot(&sent).unwrap();
    assert!(!follower.is_fresh());
    assert_eq!((follower.first_index(), follower.last_index()), (16, 15));
    assert_eq!(follower.term(15).unwrap(), 2);
    assert_eq!(
        store_err(follower.term(14).unwrap_err()),
        StorageError::Compacted
    );
    assert_eq!(follower.conf_state(), cs);
    assert_eq!(follower.hard_state().commit, 15);
    assert_eq!(follower.hard_state().term, 2);
    assert_eq!(follower.latest_snapshot().unwrap(), sent);
    // The same snapshot again, or an older one, is out of date.
    assert!(matches!(
        follower.apply_snapshot(&sent),
        Err(Error::SnapshotOutOfDate { index: 15, .. })
    ));
    assert_eq!(
        store_err(raft::Error::from(
            follower.apply_snapshot(&sent).unwrap_err()
        )),
        StorageError::SnapshotOutOfDate
    );
    follower
        .persist(&ents[15..], Some(&hard_state(2, 0, 18)), true)
        .unwrap();
    assert_eq!(
        follower.entries(16, 21, None, ctx()).unwrap(),
        ents[15..].to_vec()
    );

    // A newer snapshot whose index/term the follower's log does not match: every entry goes.
    let newer = Snapshot {
        data: b"sm@25".to_vec().into(),
        metadata: Some(SnapshotMetadata {
            index: 25,
            term: 4,
            conf_state: Some(ConfState {
                voters: vec![1, 2],
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    follower.apply_snapshot(&newer).unwrap();
    assert_eq!((follower.first_index(), follower.last_index()), (26, 25));
    assert_eq!(follower.term(25).unwrap(), 4);
    assert_eq!(follower.conf_state().voters, vec![1, 2]);
    assert_eq!(follower.hard_state(), hard_state(4, 0, 25));
    drop(follower);
    let follower = RaftLog::open(dir2.path()).unwrap();
    assert_eq!((follower.first_index(), follower.last_index()), (26, 25));
    assert_eq!(follower.term(25).unwrap(), 4);
    assert_eq!(follower.latest_snapshot().unwrap(), newer);
    follower.persist(&entries(26..=27, 4), None, true).unwrap();
    assert_eq!(
        follower.entries(26, 28, None, ctx()).unwrap(),
        entries(26..=27, 4)
    );
}

// ---------------------------------------------------------------------------------------------
// A three-member raft-rs group on RaftLog, messages routed in memory.

/// One member: its raft-rs node while running, and a state machine that records the payloads
/// of applied entries (a u64 each). The state machine stands for durable state: it survives a
/// restart of the node, so the restarted node gets `Config::applied` = `applied`.
struct Member {
    id: u64,
    dir: PathBuf,
    node: Option<RawNode<RaftLog>>,
    applied: u64,
    values: Vec<u64>,
    snapshots_received: usize,
}

fn config(id: u64, applied: u64) -> Config {
    Config {
        id,
        applied,
        election_tick: 10,
        heartbeat_tick: 2,
        max_size_per_msg: 64 << 10,
        max_inflight_msgs: 64,
        ..Default::default()
    }
}

fn encode_values(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_be_bytes()).collect()
}

fn decode_values(data: &[u8]) -> Vec<u64> {
    assert_eq!(data.len() % 8, 0);
    data.chunks(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
        .collect()
}

impl Member {
    fn start(&mut self) {
        assert!(self.node.is_none());
        let log = RaftLog::open(&self.dir).unwrap();
        let node = RawNode::new(&config(self.id, self.applied), log, &raft::default_logger());
        self.node = Some(node.unwrap());
    }

    /// Drops the node and its log handle: RocksDB is closed, only the disk remains.
    fn stop(&mut self) {
        self.node = None;
    }

    fn node(&mut self) -> &mut RawNode<RaftLog> {
        self.node.as_mut().expect("member is running")
    }

    fn log(&self) -> &RaftLog {
        self.node.as_ref().expect("member is running").store()
    }

    fn is_leader(&self) -> bool {
        self.node
            .as_ref()
            .is_some_and(|n| n.raft.state == StateRole::Leader)
    }

    fn apply(&mut self, committed: Vec<Entry>) {
        for e in committed {
            assert_eq!(
                e.index,
                self.applied + 1,
                "member {} applies in order",
                self.id
            );
            self.applied = e.index;
            assert_eq!(e.get_entry_type(), EntryType::EntryNormal);
            if !e.data.is_empty() {
                self.values
                    .push(u64::from_be_bytes(e.data[..].try_into().unwrap()));
            }
        }
    }

    /// Handles one Ready as raft-rs 0.7 requires; returns whether there was one.
    fn handle_ready(&mut self, outbox: &mut VecDeque<Message>) -> bool {
        let node = self.node.as_mut().expect("member is running");
        if !node.has_ready() {
            return false;
        }
        let log = node.store().clone();
        let mut ready = node.ready();
        outbox.extend(ready.take_messages());
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            log.apply_snapshot(&snap).unwrap();
            self.values = decode_values(&snap.data);
            self.applied = snap.get_metadata().index;
            self.snapshots_received += 1;
        }
        let committed = ready.take_committed_entries();
        self.apply(committed);
        log.persist(ready.entries(), ready.hs(), true).unwrap();
        outbox.extend(ready.take_persisted_messages());
        let node = self.node.as_mut().expect("member is running");
        let mut light = node.advance(ready);
        if let Some(commit) = light.commit_index() {
            log.set_commit(commit, true).unwrap();
        }
        outbox.extend(light.take_messages());
        let committed = light.take_committed_entries();
        self.apply(committed);
        let applied = self.applied;
        self.node().advance_apply_to(applied);
        true
    }
}

struct Cluster {
    members: Vec<Member>,
    outbox: VecDeque<Message>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Cluster {
    /// Three bootstrapped members, all running.
    fn new() -> Cluster {
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let members = dirs
            .iter()
            .zip(1u64..)
            .map(|(d, id)| {
                let log = RaftLog::open(d.path()).unwrap();
                assert!(log.is_fresh());
                log.bootstrap(&[1, 2, 3]).unwrap();
                drop(log);
                let mut m = Member {
                    id,
                    dir: d.path().to_path_buf(),
                    node: None,
                    applied: 0,
                    values: vec![],
                    snapshots_received: 0,
                };
                m.start();
                m
            })
            .collect();
        Cluster {
            members,
            outbox: VecDeque::new(),
            _dirs: dirs,
        }
    }

    fn member(&mut self, id: u64) -> &mut Member {
        &mut self.members[id as usize - 1]
    }

    /// Handles Readys and delivers messages until nothing moves. Messages to stopped members
    /// are lost, as on a network.
    fn pump(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            for m in self.members.iter_mut().filter(|m| m.node.is_some()) {
                while m.handle_ready(&mut self.outbox) {
                    moved = true;
                }
            }
            while let Some(msg) = self.outbox.pop_front() {
                moved = true;
                if let Some(node) = self.members[msg.to as usize - 1].node.as_mut() {
                    // Errors here are raft-rs refusing a stale message; it logs them.
                    let _ = node.step(msg);
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the group never settled");
    }

    /// Ticks every running member and pumps, until `done` holds.
    fn run_until(&mut self, what: &str, done: impl Fn(&Cluster) -> bool) {
        for _ in 0..2_000 {
            self.pump();
            if done(self) {
                return;
            }
            for m in self.members.iter_mut().filter(|m| m.node.is_some()) {
                m.node().tick();
            }
        }
        panic!("timed out waiting for: {what}");
    }

    fn leader(&self) -> u64 {
        let leaders: Vec<_> = self.members.iter().filter(|m| m.is_leader()).collect();
        assert_eq!(leaders.len(), 1, "exactly one leader");
        leaders[0].id
    }

    fn propose(&mut self, values: std::ops::Range<u64>) {
        let leader = self.leader();
        for v in values {
            self.member(leader)
                .node()
                .propose(vec![], v.to_be_bytes().to_vec())
                .unwrap();
            self.pump();
        }
    }
}

fn values(n: u64) -> Vec<u64> {
    (0..n).collect()
}

#[test]
fn three_member_group_restart_and_snapshot_catch_up() {
    let mut c = Cluster::new();
    c.member(1).node().campaign().unwrap();
    c.run_until("member 1 leads and all apply its first entry", |c| {
        c.members[0].is_leader() && c.members.iter().all(|m| m.applied >= 1)
    });
    assert_eq!(c.leader(), 1);

    // All three commit 200 entries.
    c.propose(0..200);
    c.run_until("all apply 200 values", |c| {
        c.members.iter().all(|m| m.values.len() == 200)
    });
    for m in &c.members {
        assert_eq!(m.values, values(200), "member {}", m.id);
        assert_eq!(m.log().hard_state().commit, m.applied);
        assert_eq!(m.log().last_index(), m.applied);
    }

    // Member 3 stops and misses the next 100 entries; 1 and 2 still form a quorum.
    c.member(3).stop();
    c.propose(200..300);
    c.run_until("members 1 and 2 apply 300 values", |c| {
        c.members[..2].iter().all(|m| m.values.len() == 300)
    });
    assert_eq!(c.members[1].values, values(300));

    // Member 2 restarts while the leader alone takes 10 more (which cannot commit yet).
    c.member(2).stop();
    c.propose(300..310);
    assert_eq!(c.members[0].values.len(), 300, "no quorum without member 2");
    {
        let m = c.member(2);
        let log = RaftLog::open(&m.dir).unwrap();
        assert!(log.hard_state().commit >= m.applied);
        assert_eq!(log.last_index(), m.applied);
        assert_eq!(log.conf_state().voters, vec![1, 2, 3]);
        drop(log);
        m.start();
    }
    c.run_until("members 1 and 2 apply 310 values", |c| {
        c.members[..2].iter().all(|m| m.values.len() == 310)
    });
    assert_eq!(c.members[0].values, values(310));
    assert_eq!(c.members[1].values, values(310));
    assert_eq!(c.leader(), 1);

    // The leader snapshots its state machine and compacts, keeping a tail of 5 entries: what
    // member 3 lacks is gone from the leader's log.
    let (index, data) = {
        let m = &c.members[0];
        (m.applied, encode_values(&m.values))
    };
    let leader_log = c.members[0].log().clone();
    let cs = leader_log.conf_state();
    leader_log.compact(index, &cs, data, 5).unwrap();
    assert_eq!(leader_log.first_index(), index - 4);
    let member3_last = RaftLog::open(&c.members[2].dir).unwrap().last_index();
    assert!(member3_last < leader_log.first_index() - 1);
    // Every handle must be gone before the leader's log can be reopened below.
    drop(leader_log);

    // Member 3 comes back and catches up through the snapshot, then through entries.
    c.member(3).start();
    c.run_until("member 3 applies 310 values", |c| {
        c.members[2].values.len() == 310
    });
    let m3 = &c.members[2];
    assert_eq!(m3.snapshots_received, 1, "member 3 was sent the snapshot");
    assert_eq!(m3.values, values(310));
    assert_eq!(m3.log().snapshot_index_term().map(|s| s.0), Some(index));
    assert_eq!(m3.log().first_index(), index + 1);
    c.propose(310..320);
    c.run_until("all apply 320 values", |c| {
        c.members.iter().all(|m| m.values.len() == 320)
    });
    for m in &c.members {
        assert_eq!(m.values, values(320), "member {}", m.id);
    }
    assert_eq!(c.members[2].snapshots_received, 1);
    assert_eq!(
        c.members[0].snapshots_received + c.members[1].snapshots_received,
        0
    );

    // The leader crashes and loses its in-memory state machine; 2 and 3 elect a new leader and
    // go on. The old leader rebuilds from its latest snapshot and restarts with
    // `Config::applied` = the snapshot index: raft-rs replays only what follows the snapshot,
    // not the 5-entry tail kept below it (`apply` asserts that nothing is applied twice).
    c.member(1).stop();
    c.run_until("a new leader among 2 and 3", |c| {
        c.members[1..].iter().any(|m| m.is_leader())
    });
    c.propose(320..330);
    c.run_until("members 2 and 3 apply 330 values", |c| {
        c.members[1..].iter().all(|m| m.values.len() == 330)
    });
    {
        let m = c.member(1);
        let log = RaftLog::open(&m.dir).unwrap();
        let snap = log.latest_snapshot().unwrap();
        assert_eq!(snap.get_metadata().index, index);
        assert!(log.first_index() <= index);
        drop(log);
        m.values = decode_values(&snap.data);
        m.applied = snap.get_metadata().index;
        m.start();
    }
    c.run_until("member 1 applies 330 values", |c| {
        c.members[0].values.len() == 330
    });
    for m in &c.members {
        assert_eq!(m.values, values(330), "member {}", m.id);
    }
    assert_ne!(c.leader(), 1);
}
