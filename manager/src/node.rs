//! The Raft driver: one OS thread owns the `RawNode`, its RocksDB log and the state machine.
//!
//! Everything else talks to it through a channel (`RaftNode` is the cloneable handle): incoming
//! peer messages, proposals, ReadIndex requests, configuration changes. The thread ticks every
//! `tick`, and after each batch of input handles one `Ready`: persist entries and hard state in
//! one synced RocksDB batch, then send messages, apply committed entries, answer waiting callers.
//! RocksDB writes are blocking, which is why this is a thread and not a tokio task; the state is
//! shared behind an `RwLock` that is only held for an apply or a read, never across I/O.
//!
//! Restart cost is bounded: every `snapshot_every` applied entries the state is snapshotted into
//! the log store and older entries are compacted away (`raftlog.rs`).

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use ironsan_common::proto::manager::{ApplyResult, Command, Member, StateSnapshot};
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, Entry, EntryType, Message, Snapshot};
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use crate::error::Error;
use crate::raftlog::RaftLog;
use crate::state::State;
use crate::transport::Transport;

/// Tuning of one member.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: u64,
    /// Raft tick; elections time out after 10-20 ticks, leaders heartbeat every 2.
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Snapshot the state machine and compact the log every this many applied entries.
    pub snapshot_every: u64,
    /// Entries kept behind a snapshot for slightly lagging followers.
    pub log_keep: u64,
}

impl NodeConfig {
    pub fn new(id: u64) -> Self {
        NodeConfig {
            id,
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_every: 5000,
            log_keep: 1000,
        }
    }
}

/// What the driver publishes after every `Ready` for handlers to consult without a round trip.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RaftStatus {
    pub id: u64,
    /// 0 when no leader is known.
    pub leader: u64,
    pub term: u64,
    pub is_leader: bool,
    pub commit: u64,
    pub applied: u64,
    pub snapshot_index: u64,
    /// Voters and learners with their addresses; `matched` is known on the leader only.
    pub members: Vec<Member>,
    /// This member was removed from the group.
    pub removed: bool,
}

impl RaftStatus {
    /// Readiness of this member: a voter of the group's current configuration that knows a
    /// leader. A member alone (its peers not up), cut off, waiting to be added (`--join`) or
    /// removed is not ready, so a StatefulSet rolls its next pod only once this one is back in
    /// a quorum. Else the reason, one line.
    pub fn ready(&self) -> Result<(), String> {
        if self.removed {
            return Err(format!("member {} was removed from the group", self.id));
        }
        match self.members.iter().find(|m| m.id == self.id) {
            None if self.members.is_empty() => {
                return Err(format!(
                    "member {} has no configuration yet: waiting to be added (add-member)",
                    self.id
                ))
            }
            None => {
                return Err(format!(
                    "member {} is not in the group's configuration",
                    self.id
                ))
            }
            Some(m) if !m.voter => {
                return Err(format!("member {} is not a voter", self.id));
            }
            Some(_) => {}
        }
        if self.leader == 0 {
            return Err(format!(
                "member {} knows no leader (term {}): no quorum reached yet",
                self.id, self.term
            ));
        }
        Ok(())
    }
}

/// The outcome of [`RaftNode::hand_over`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handover {
    /// Another member leads (or none is known): nothing to hand over.
    NotLeader,
    /// No other voter to take over (a group of one).
    Alone,
    /// This member now leads.
    To(u64),
    /// The member asked to take over did not in time.
    TimedOut(u64),
}

enum Msg {
    Raft(Box<Message>),
    Propose(Box<Command>, oneshot::Sender<Result<ApplyResult, Error>>),
    Read(oneshot::Sender<Result<(), Error>>),
    ConfChange(ConfChange, String, oneshot::Sender<Result<(), Error>>),
    TransferLeader(u64),
    Unreachable(u64),
    SnapshotDone(u64, SnapshotStatus),
    Shutdown,
}

/// Cloneable handle to the driver thread.
#[derive(Clone)]
pub struct RaftNode {
    id: u64,
    tx: mpsc::Sender<Msg>,
    status: watch::Receiver<RaftStatus>,
    changed: watch::Receiver<u64>,
    state: Arc<RwLock<State>>,
    addrs: Arc<RwLock<BTreeMap<u64, String>>>,
    thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

/// Channel for the transport's delivery reports back into the driver.
#[derive(Clone)]
pub struct Reporter(mpsc::Sender<Msg>);

impl Reporter {
    pub fn unreachable(&self, to: u64) {
        let _ = self.0.send(Msg::Unreachable(to));
    }
    pub fn snapshot(&self, to: u64, ok: bool) {
        let s = if ok {
            SnapshotStatus::Finish
        } else {
            SnapshotStatus::Failure
        };
        let _ = self.0.send(Msg::SnapshotDone(to, s));
    }
}

impl RaftNode {
    /// Opens the log, restores the state machine from the latest snapshot, and starts the
    /// driver thread. `peers` are the addresses known from flags (this member included);
    /// committed configuration changes add to them. `bootstrap` lists the initial voters for a
    /// fresh log (empty for a member that joins an existing group and waits to be added).
    pub fn start(
        cfg: NodeConfig,
        log: RaftLog,
        peers: BTreeMap<u64, String>,
        bootstrap: &[u64],
        runtime: tokio::runtime::Handle,
    ) -> Result<RaftNode, Error> {
        if log.is_fresh() && !bootstrap.is_empty() {
            log.bootstrap(bootstrap)?;
        }
        let (state, applied) = match log.latest_snapshot() {
            Some(s) => {
                let snap = StateSnapshot::decode(s.get_data())
                    .map_err(|e| Error::Corrupt(format!("state snapshot: {e}")))?;
                (State::restore(snap), s.get_metadata().index)
            }
            None => (State::new(), 0),
        };
        let mut addrs = peers;
        for (id, a) in state.members() {
            addrs.insert(*id, a.clone());
        }
        let addrs = Arc::new(RwLock::new(addrs));
        let rcfg = raft::Config {
            id: cfg.id,
            election_tick: cfg.election_ticks,
            heartbeat_tick: cfg.heartbeat_ticks,
            applied,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            read_only_option: raft::ReadOnlyOption::Safe,
            ..Default::default()
        };
        rcfg.validate()?;
        let logger = crate::slog_bridge::logger(cfg.id);
        let raw = RawNode::new(&rcfg, log.clone(), &logger)?;
        let state = Arc::new(RwLock::new(state));
        let (tx, rx) = mpsc::channel();
        let (status_tx, status) = watch::channel(RaftStatus {
            id: cfg.id,
            ..Default::default()
        });
        // A restart replays the log after the snapshot: the snapshot's index stands for
        // everything before it.
        let (changed_tx, changed) = watch::channel(applied);
        let transport = Transport::new(cfg.id, runtime, addrs.clone(), Reporter(tx.clone()));
        let mut driver = Driver {
            snapshot_index: log.latest_snapshot().map_or(0, |s| s.get_metadata().index),
            cfg: cfg.clone(),
            raw,
            log,
            state: state.clone(),
            addrs: addrs.clone(),
            transport,
            status_tx,
            changed_tx,
            rx,
            next_tag: 1,
            proposals: HashMap::new(),
            reads: HashMap::new(),
            read_waiting: Vec::new(),
            conf_pending: None,
            applied,
            snapshot_now: false,
            was_leader: false,
        };
        // The configuration restored from the log, published before anyone can ask: a
        // restarted member is never seen without its members (its readiness would say it waits
        // to be added).
        driver.publish();
        let thread = std::thread::Builder::new()
            .name(format!("raft-{}", cfg.id))
            .spawn(move || driver.run())
            .map_err(|e| Error::Config(format!("spawn raft thread: {e}")))?;
        Ok(RaftNode {
            id: cfg.id,
            tx,
            status,
            changed,
            state,
            addrs,
            thread: Arc::new(std::sync::Mutex::new(Some(thread))),
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn status(&self) -> RaftStatus {
        self.status.borrow().clone()
    }

    pub fn watch_status(&self) -> watch::Receiver<RaftStatus> {
        self.status.clone()
    }

    /// The index of the last applied command that changed what gateways serve (volumes,
    /// attachments, snapshots, gateways; not lease renewals): what `ListVolumes` long polls on.
    pub fn watch_changed(&self) -> watch::Receiver<u64> {
        self.changed.clone()
    }

    /// [`RaftStatus::ready`] of the latest status, without copying it.
    pub fn ready(&self) -> Result<(), String> {
        self.status.borrow().ready()
    }

    /// Hands leadership to the most caught-up other voter and waits up to `within` for a new
    /// leader to be known here. For a clean stop: the group then has a leader at once instead
    /// of after an election timeout.
    pub async fn hand_over(&self, within: Duration) -> Handover {
        let status = self.status();
        if !status.is_leader {
            return Handover::NotLeader;
        }
        let Some(to) = status
            .members
            .iter()
            .filter(|m| m.id != self.id && m.voter)
            .max_by_key(|m| m.matched)
            .map(|m| m.id)
        else {
            return Handover::Alone;
        };
        let mut watch = self.watch_status();
        if self.transfer_leader(to).is_err() {
            return Handover::TimedOut(to);
        }
        let outcome = tokio::time::timeout(within, async {
            loop {
                let leader = watch.borrow_and_update().leader;
                if leader != 0 && leader != self.id {
                    return Some(leader);
                }
                if watch.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await;
        match outcome {
            Ok(Some(leader)) => Handover::To(leader),
            _ => Handover::TimedOut(to),
        }
    }

    /// The leader's address, when one is known and it is not this member.
    pub fn leader_addr(&self) -> Option<(u64, String)> {
        let leader = self.status.borrow().leader;
        if leader == 0 || leader == self.id {
            return None;
        }
        self.addrs
            .read()
            .ok()
            .and_then(|a| a.get(&leader).cloned())
            .map(|a| (leader, a))
    }

    /// Read access to the applied state. Never hold the guard across an await.
    pub fn state(&self) -> RwLockReadGuard<'_, State> {
        match self.state.read() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Hands a peer's message to the driver.
    pub fn step(&self, m: Message) -> Result<(), Error> {
        self.tx
            .send(Msg::Raft(Box::new(m)))
            .map_err(|_| Error::ShuttingDown)
    }

    /// Proposes a command on this member (it must be the leader) and waits for its outcome.
    pub async fn propose(&self, cmd: Command, timeout: Duration) -> Result<ApplyResult, Error> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Propose(Box::new(cmd), tx))
            .map_err(|_| Error::ShuttingDown)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::ShuttingDown),
            Err(_) => Err(Error::Timeout("commit")),
        }
    }

    /// Waits until this member's state reflects every write committed before the call
    /// (Raft ReadIndex, confirmed by a quorum of heartbeats: no clock assumption).
    pub async fn linearize(&self, timeout: Duration) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (tx, rx) = oneshot::channel();
            self.tx
                .send(Msg::Read(tx))
                .map_err(|_| Error::ShuttingDown)?;
            // A new leader drops read requests until it has committed an entry of its term,
            // and a leaderless member drops them outright: retry in short rounds.
            let round = Duration::from_millis(500).min(deadline - tokio::time::Instant::now());
            match tokio::time::timeout(round, rx).await {
                Ok(Ok(r)) => return r,
                Ok(Err(_)) => return Err(Error::ShuttingDown),
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    return Err(if self.status.borrow().leader == 0 {
                        Error::NoLeader { member: self.id }
                    } else {
                        Error::Timeout("read index")
                    })
                }
                Err(_) => {}
            }
        }
    }

    /// Adds (`addr` given) or removes a voter; returns once the change is applied here. While
    /// the leader still has to apply an earlier change (or, newly elected, its inherited tail)
    /// the change is offered again until `timeout`.
    pub async fn change_member(
        &self,
        id: u64,
        addr: Option<String>,
        timeout: Duration,
    ) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.change_member_once(id, addr.clone(), left).await {
                Err(Error::ConfChangePending) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(Error::ConfChangePending) => {
                    return Err(Error::Timeout("configuration change"))
                }
                r => return r,
            }
        }
    }

    async fn change_member_once(
        &self,
        id: u64,
        addr: Option<String>,
        timeout: Duration,
    ) -> Result<(), Error> {
        let mut cc = ConfChange {
            node_id: id,
            ..Default::default()
        };
        let addr = match addr {
            Some(a) => {
                cc.set_change_type(ConfChangeType::AddNode);
                a
            }
            None => {
                cc.set_change_type(ConfChangeType::RemoveNode);
                String::new()
            }
        };
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::ConfChange(cc, addr, tx))
            .map_err(|_| Error::ShuttingDown)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::ShuttingDown),
            Err(_) => Err(Error::Timeout("configuration change")),
        }
    }

    pub fn transfer_leader(&self, to: u64) -> Result<(), Error> {
        self.tx
            .send(Msg::TransferLeader(to))
            .map_err(|_| Error::ShuttingDown)
    }

    /// Stops the driver thread after its current round and waits for it, so the log store is
    /// closed before the process exits. Everything acknowledged is already durable.
    pub async fn shutdown(&self) {
        let _ = self.tx.send(Msg::Shutdown);
        let handle = match self.thread.lock() {
            Ok(mut t) => t.take(),
            Err(p) => p.into_inner().take(),
        };
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }
}

struct Driver {
    cfg: NodeConfig,
    raw: RawNode<RaftLog>,
    log: RaftLog,
    state: Arc<RwLock<State>>,
    addrs: Arc<RwLock<BTreeMap<u64, String>>>,
    transport: Transport,
    status_tx: watch::Sender<RaftStatus>,
    changed_tx: watch::Sender<u64>,
    rx: mpsc::Receiver<Msg>,
    next_tag: u64,
    proposals: HashMap<u64, oneshot::Sender<Result<ApplyResult, Error>>>,
    reads: HashMap<u64, oneshot::Sender<Result<(), Error>>>,
    read_waiting: Vec<(u64, oneshot::Sender<Result<(), Error>>)>,
    conf_pending: Option<(u64, oneshot::Sender<Result<(), Error>>)>,
    applied: u64,
    snapshot_index: u64,
    /// A configuration change was applied: snapshot at once and keep no tail, so a member
    /// being added (which starts with an empty log and no configuration) is caught up by a
    /// snapshot that names it, never by entries from index 1 that cannot.
    snapshot_now: bool,
    was_leader: bool,
}

/// Proposal contexts: who proposed (member id) and which of its proposals (tag).
fn context(member: u64, tag: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(16);
    c.extend_from_slice(&member.to_be_bytes());
    c.extend_from_slice(&tag.to_be_bytes());
    c
}

fn parse_context(c: &[u8]) -> Option<(u64, u64)> {
    let member = u64::from_be_bytes(c.get(0..8)?.try_into().ok()?);
    let tag = u64::from_be_bytes(c.get(8..16)?.try_into().ok()?);
    Some((member, tag))
}

impl Driver {
    fn run(&mut self) {
        let mut next_tick = Instant::now() + self.cfg.tick;
        info!(
            member = self.cfg.id,
            applied = self.applied,
            "raft member started"
        );
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(wait) {
                Ok(m) => {
                    if !self.handle(m) {
                        break;
                    }
                    // Take everything queued so one Ready (one synced write) covers it all.
                    let mut stop = false;
                    for _ in 0..4096 {
                        match self.rx.try_recv() {
                            Ok(m) => {
                                if !self.handle(m) {
                                    stop = true;
                                    break;
                                }
                            }
                            Err(_) => break,
                        }
                    }
                    if stop {
                        break;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if Instant::now() >= next_tick {
                self.raw.tick();
                // ReadIndex requests raft-rs dropped (no leader yet, a leader new in its term)
                // are retried by their callers as new requests: forget the abandoned ones.
                self.reads.retain(|_, reply| !reply.is_closed());
                next_tick = Instant::now() + self.cfg.tick;
            }
            if let Err(e) = self.on_ready() {
                // A log write failed: this member can no longer promise durability.
                tracing::error!(member = self.cfg.id, error = %e, "raft persistence failed; member stops");
                break;
            }
        }
        self.fail_pending(|| Error::ShuttingDown);
        info!(member = self.cfg.id, "raft member stopped");
    }

    fn handle(&mut self, m: Msg) -> bool {
        match m {
            Msg::Raft(m) => {
                if let Err(e) = self.raw.step(*m) {
                    tracing::debug!(error = %e, "raft step");
                }
            }
            Msg::Propose(cmd, reply) => {
                if self.raw.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(Error::NoLeader {
                        member: self.cfg.id,
                    }));
                    return true;
                }
                let tag = self.next_tag;
                self.next_tag += 1;
                match self
                    .raw
                    .propose(context(self.cfg.id, tag), cmd.encode_to_vec())
                {
                    Ok(()) => {
                        self.proposals.insert(tag, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            Msg::Read(reply) => {
                let tag = self.next_tag;
                self.next_tag += 1;
                self.raw.read_index(tag.to_be_bytes().to_vec());
                self.reads.insert(tag, reply);
            }
            Msg::ConfChange(cc, addr, reply) => {
                if self.raw.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(Error::NoLeader {
                        member: self.cfg.id,
                    }));
                } else if self.conf_pending.is_some() {
                    let _ = reply.send(Err(Error::Rejected(crate::state::Reject::new(
                        tonic::Code::FailedPrecondition,
                        "another membership change is in progress",
                    ))));
                } else if self.raw.raft.has_pending_conf() {
                    // raft-rs would silently turn the change into an empty entry (a newly
                    // elected leader counts its whole unapplied tail as a pending change), and
                    // `conf_pending` would then wait for an entry that never comes.
                    let _ = reply.send(Err(Error::ConfChangePending));
                } else {
                    let id = cc.node_id;
                    match self.raw.propose_conf_change(addr.into_bytes(), cc) {
                        Ok(()) => self.conf_pending = Some((id, reply)),
                        Err(e) => {
                            let _ = reply.send(Err(e.into()));
                        }
                    }
                }
            }
            Msg::TransferLeader(to) => self.raw.transfer_leader(to),
            Msg::Unreachable(to) => self.raw.report_unreachable(to),
            Msg::SnapshotDone(to, s) => self.raw.report_snapshot(to, s),
            Msg::Shutdown => return false,
        }
        true
    }

    fn on_ready(&mut self) -> Result<(), Error> {
        if !self.raw.has_ready() {
            self.publish();
            return Ok(());
        }
        let mut rd = self.raw.ready();
        if !rd.messages().is_empty() {
            self.transport.send(rd.take_messages());
        }
        if !rd.snapshot().is_empty() {
            self.install_snapshot(rd.snapshot().clone())?;
        }
        let committed = rd.take_committed_entries();
        self.apply(committed)?;
        let reads = rd.take_read_states();
        for rs in reads {
            let Some(tag) = rs.request_ctx.get(0..8).and_then(|b| b.try_into().ok()) else {
                continue;
            };
            if let Some(reply) = self.reads.remove(&u64::from_be_bytes(tag)) {
                self.read_waiting.push((rs.index, reply));
            }
        }
        // Entries, votes and terms must be on disk before anyone hears of them; a hard state
        // that only moved its commit index need not be synced (raft-rs's `must_sync`).
        let sync = rd.must_sync();
        self.log.persist(rd.entries(), rd.hs(), sync)?;
        if !rd.persisted_messages().is_empty() {
            self.transport.send(rd.take_persisted_messages());
        }
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            // Saved before applying, but not synced: it rides on the next synced write. The
            // state machine lives in memory and restarts from the snapshot, whose index the
            // log store only accepts at or below a stored commit, so a commit index lost in a
            // crash is just learned again from the leader.
            self.log.set_commit(commit, false)?;
        }
        self.transport.send(light.take_messages());
        let committed = light.take_committed_entries();
        self.apply(committed)?;
        self.raw.advance_apply_to(self.applied);
        self.release_reads();
        self.maybe_snapshot()?;
        self.publish();
        Ok(())
    }

    fn install_snapshot(&mut self, snap: Snapshot) -> Result<(), Error> {
        let data = StateSnapshot::decode(snap.get_data())
            .map_err(|e| Error::Corrupt(format!("snapshot from leader: {e}")))?;
        self.log.apply_snapshot(&snap)?;
        let state = State::restore(data);
        if let Ok(mut a) = self.addrs.write() {
            for (id, addr) in state.members() {
                a.insert(*id, addr.clone());
            }
        }
        *self.state_mut() = state;
        self.applied = snap.get_metadata().index;
        self.snapshot_index = self.applied;
        self.changed_tx.send_replace(self.applied);
        info!(
            member = self.cfg.id,
            index = self.applied,
            "installed snapshot from leader"
        );
        Ok(())
    }

    fn state_mut(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        match self.state.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), Error> {
        for e in entries {
            if e.index <= self.applied {
                continue;
            }
            self.applied = e.index;
            match e.get_entry_type() {
                EntryType::EntryNormal if e.data.is_empty() => {}
                EntryType::EntryNormal => {
                    let reply = parse_context(&e.context)
                        .filter(|(m, _)| *m == self.cfg.id)
                        .and_then(|(_, tag)| self.proposals.remove(&tag));
                    let result = match Command::decode(e.data.as_ref()) {
                        Ok(cmd) => {
                            let r = self.state_mut().apply(&cmd);
                            if changes_volumes(&cmd) {
                                self.changed_tx.send_replace(e.index);
                            }
                            Ok(r)
                        }
                        Err(err) => {
                            // Skipped identically on every member: the log stays in agreement.
                            warn!(index = e.index, error = %err, "undecodable command skipped");
                            Err(Error::Corrupt(format!("entry {}: {err}", e.index)))
                        }
                    };
                    if let Some(reply) = reply {
                        let _ = reply.send(result);
                    }
                }
                EntryType::EntryConfChange => {
                    let cc = match ConfChange::parse_from_bytes(&e.data) {
                        Ok(cc) => cc,
                        Err(err) => {
                            warn!(index = e.index, error = %err, "undecodable conf change skipped");
                            continue;
                        }
                    };
                    let cs = self.raw.apply_conf_change(&cc)?;
                    self.log.set_conf_state(&cs)?;
                    self.snapshot_now = true;
                    let addr = String::from_utf8_lossy(&e.context).into_owned();
                    match cc.get_change_type() {
                        ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                            if !addr.is_empty() {
                                if let Ok(mut a) = self.addrs.write() {
                                    a.insert(cc.node_id, addr.clone());
                                }
                                self.state_mut().set_member(cc.node_id, addr.clone());
                            }
                            info!(member = cc.node_id, %addr, "member added");
                        }
                        ConfChangeType::RemoveNode => {
                            self.state_mut().remove_member(cc.node_id);
                            info!(member = cc.node_id, "member removed");
                        }
                    }
                    if let Some((id, reply)) = self.conf_pending.take() {
                        if id == cc.node_id {
                            // The caller reads the membership from the status next.
                            self.publish();
                            let _ = reply.send(Ok(()));
                        } else {
                            self.conf_pending = Some((id, reply));
                        }
                    }
                }
                EntryType::EntryConfChangeV2 => {
                    warn!(
                        index = e.index,
                        "joint configuration changes are not used; skipped"
                    );
                }
            }
        }
        Ok(())
    }

    fn release_reads(&mut self) {
        let applied = self.applied;
        let (ready, waiting): (Vec<_>, Vec<_>) = self
            .read_waiting
            .drain(..)
            .partition(|(i, _)| *i <= applied);
        self.read_waiting = waiting;
        for (_, reply) in ready {
            let _ = reply.send(Ok(()));
        }
    }

    fn maybe_snapshot(&mut self) -> Result<(), Error> {
        let due = self.applied >= self.snapshot_index + self.cfg.snapshot_every;
        if !(due || self.snapshot_now) || self.applied <= self.snapshot_index {
            return Ok(());
        }
        let keep = if self.snapshot_now {
            0
        } else {
            self.cfg.log_keep
        };
        self.snapshot_now = false;
        // The whole pause is measured: serialising the state stops this thread too.
        let started = Instant::now();
        let data = {
            let st = match self.state.read() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            st.snapshot().encode_to_vec()
        };
        let cs = self.raw.raft.prs().conf().to_conf_state();
        let bytes = data.len();
        self.log.compact(self.applied, &cs, data, keep)?;
        self.snapshot_index = self.applied;
        info!(
            member = self.cfg.id,
            index = self.applied,
            bytes,
            took_ms = started.elapsed().as_millis() as u64,
            "state snapshot taken, log compacted"
        );
        metrics::counter!("ironsan_manager_snapshots_total").increment(1);
        metrics::histogram!("ironsan_manager_snapshot_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }

    fn fail_pending(&mut self, err: impl Fn() -> Error) {
        for (_, reply) in self.proposals.drain() {
            let _ = reply.send(Err(err()));
        }
        for (_, reply) in self.reads.drain() {
            let _ = reply.send(Err(err()));
        }
        for (_, reply) in self.read_waiting.drain(..) {
            let _ = reply.send(Err(err()));
        }
        if let Some((_, reply)) = self.conf_pending.take() {
            let _ = reply.send(Err(err()));
        }
    }

    fn publish(&mut self) {
        let is_leader = self.raw.raft.state == StateRole::Leader;
        if self.was_leader && !is_leader {
            // Entries proposed here may still commit under the next leader, or be overwritten.
            self.fail_pending(|| Error::LeadershipLost);
        }
        self.was_leader = is_leader;
        let r = &self.raw.raft;
        let conf = r.prs().conf().to_conf_state();
        let addrs = match self.addrs.read() {
            Ok(a) => a.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let member = |id: u64, voter: bool| Member {
            id,
            addr: addrs.get(&id).cloned().unwrap_or_default(),
            leader: id == r.leader_id,
            matched: if is_leader {
                r.prs().get(id).map_or(0, |p| p.matched)
            } else {
                0
            },
            voter,
        };
        let mut members: Vec<Member> = conf.voters.iter().map(|&id| member(id, true)).collect();
        members.extend(conf.learners.iter().map(|&id| member(id, false)));
        members.sort_by_key(|m| m.id);
        let removed = !members.is_empty() && !members.iter().any(|m| m.id == self.cfg.id);
        let status = RaftStatus {
            id: self.cfg.id,
            leader: r.leader_id,
            term: r.term,
            is_leader,
            commit: r.raft_log.committed,
            applied: self.applied,
            snapshot_index: self.snapshot_index,
            members,
            removed,
        };
        metrics::gauge!("ironsan_manager_term").set(status.term as f64);
        metrics::gauge!("ironsan_manager_commit_index").set(status.commit as f64);
        metrics::gauge!("ironsan_manager_applied_index").set(status.applied as f64);
        metrics::gauge!("ironsan_manager_is_leader").set(if is_leader { 1.0 } else { 0.0 });
        self.status_tx.send_if_modified(|s| {
            if *s != status {
                *s = status;
                true
            } else {
                false
            }
        });
    }
}

/// Whether a command may change what `ListVolumes` answers to gateways. The frequent
/// bookkeeping (lease renewals, usage, no-ops) does not, so a long poll is not woken by it.
fn changes_volumes(cmd: &Command) -> bool {
    use ironsan_common::proto::manager::command::Op;
    !matches!(
        cmd.op,
        None | Some(Op::Noop(_))
            | Some(Op::Renew(_))
            | Some(Op::NodeUsage(_))
            | Some(Op::MemberSeen(_))
            | Some(Op::ClearOrphans(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64, voter: bool) -> Member {
        Member {
            id,
            voter,
            ..Default::default()
        }
    }

    #[test]
    fn ready_means_a_voter_that_knows_a_leader() {
        let mut s = RaftStatus {
            id: 2,
            leader: 1,
            members: vec![member(1, true), member(2, true), member(3, true)],
            ..Default::default()
        };
        assert_eq!(s.ready(), Ok(()));
        s.leader = 0;
        assert!(s.ready().unwrap_err().contains("knows no leader"));
        s.leader = 2;
        assert_eq!(s.ready(), Ok(()));
        s.members[1].voter = false;
        assert!(s.ready().unwrap_err().contains("not a voter"));
        s.members.remove(1);
        assert!(s.ready().unwrap_err().contains("not in the group"));
        s.removed = true;
        assert!(s.ready().unwrap_err().contains("removed"));
        let fresh = RaftStatus {
            id: 4,
            ..Default::default()
        };
        assert!(fresh.ready().unwrap_err().contains("waiting to be added"));
    }
}
