//! The replicated block device: one volume served from chunk replicas on storage daemons.
//!
//! [`Volume`] implements [`BlockDevice`], so the SCSI layer above is unchanged. Below it:
//!
//! - **Lease** (`lease.rs`): attach gives a writer epoch; a keeper task renews at a third of
//!   the lease. Every I/O first proves the lease on the gateway's own clock, else it fails
//!   with NOT READY. Storage sees `max(writer epoch, chunk epoch)` on every request, so a
//!   gateway that lost the volume is refused there too.
//! - **Writes** take the chunk's range lock (overlapping writes reach all replicas in one
//!   order), then go to every replica of the set and to a rebuild target in parallel with one
//!   sequence number. Success needs every replica of the set (DESIGN.md invariant 2); failed
//!   replicas are reported to the manager, and once it has committed their removal the write
//!   succeeds on the rest. If no replica took it, or the manager cannot be reached, the write
//!   fails and the chunk is reconciled before its next I/O.
//! - **Reads** go to one replica of the set, the fastest by a moving average; an error moves
//!   to the next, and a checksum mismatch is repaired from a good copy in the background.
//! - **Convergence** (`sync.rs`): before the first I/O to a chunk under a new writer epoch,
//!   and after any write whose outcome may differ between replicas, the replicas are fenced
//!   with the new epoch and every range any of them logged in the last writes' window is
//!   copied from the most advanced one to the others.
//! - **Rebuild** (`sync.rs`): the manager's recovery tasks for this volume are copied here,
//!   piece by piece under the range lock, while writes reach the joining replica too; the task
//!   completes (and the replica joins the set) only after the whole chunk is copied.

mod chunk;
mod lease;
mod snapshot;
mod sync;

pub use snapshot::{has_work, SnapshotDevice};

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::{join_all, BoxFuture};
use ironsan_common::manager_client::{ClientError, ManagerClient};
use ironsan_common::proto::manager::{
    AttachRequest, GetChunksRequest, RenewRequest, ReportFailedReplicaRequest, VolumeRef,
};
use ironsan_storage::chunk::ChunkId;
use ironsan_storage::client::Pool;
use ironsan_storage::{Error as StorageError, WriteOpts};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::device::{check_range, BlockDevice, DeviceError, Extent};
use chunk::{Chunk, View};
use lease::Lease;

/// Largest piece of one I/O sent to a replica in one request.
const MAX_PIECE: u64 = 4 << 20;
/// Writes in flight per volume. Bounds how far behind a replica's log can be on a write that
/// never reached it, which is what the convergence window relies on.
pub const MAX_WRITES: usize = 256;
/// Most chunks a volume can have (the manager's limit): a chunk map naming a higher index is
/// ignored rather than grown into.
const MAX_CHUNKS: u32 = 256 << 10;
/// Chunk copies of one volume running at once.
const REBUILDS: usize = 4;

#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// This gateway's id: the holder named in attachments.
    pub gateway: String,
    /// Lease asked for at attach (0: the manager's default).
    pub lease_ms: u64,
    /// The iSCSI portal (HOST:PORT) this gateway advertises: every attach records it in the
    /// attachment, where CSI nodes find where to log in. Empty keeps the attachment's.
    pub portal: String,
    /// How often the keeper looks for recovery tasks of the volume.
    pub task_poll: Duration,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            gateway: "gateway".into(),
            lease_ms: 0,
            portal: String::new(),
            task_poll: Duration::from_secs(1),
        }
    }
}

/// Why a volume could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("manager: {0}")]
    Manager(#[from] ClientError),
    #[error("volume {0} has no chunks")]
    Empty(String),
}

/// One volume served from its replicas.
pub struct Volume {
    pub name: String,
    pub id: u64,
    size: AtomicU64,
    chunk_size: u64,
    cfg: ReplicaConfig,
    mgr: ManagerClient,
    pool: Arc<Pool>,
    lease: Lease,
    chunks: RwLock<Arc<Vec<Arc<Chunk>>>>,
    /// Storage node id → data-path address.
    nodes: RwLock<HashMap<String, String>>,
    /// Moving average of read latency per node, in microseconds.
    latency: Mutex<HashMap<String, f64>>,
    writes: Semaphore,
    /// Recovery tasks being copied, by task id.
    rebuilding: Mutex<HashSet<u64>>,
    /// Copies run at once; the others queue, so a node failure does not start hundreds.
    rebuild_slots: Semaphore,
    /// Snapshot take/delete hold it exclusively, rebuilds shared (`snapshot.rs`).
    snap_lock: tokio::sync::RwLock<()>,
    /// The clone or restore source `fill` chunks are copied from (from the manager's record).
    source: Mutex<Option<snapshot::Source>>,
    /// A background fill, and snapshot work, are running.
    filling: AtomicBool,
    snapshotting: AtomicBool,
    /// Snapshot work this gateway finished and reported (id, take), never started again.
    snapshots_done: Mutex<HashSet<(u64, bool)>>,
    stop: CancellationToken,
}

/// A replica's answer to one fanned-out request.
type Outcome = (String, Result<(), StorageError>);
/// What `settle` needs of an outcome: the node, and why it failed.
type Verdict = (String, Result<(), String>);

fn verdicts(outcomes: Vec<Outcome>) -> Vec<Verdict> {
    outcomes
        .into_iter()
        .map(|(n, r)| (n, r.map_err(|e| e.to_string())))
        .collect()
}

/// Failures that take a replica out of service; anything else is our own bug or a fence.
fn replica_fault(e: &StorageError) -> bool {
    !matches!(
        e,
        StorageError::Invalid(_)
            | StorageError::OutOfRange { .. }
            | StorageError::StaleEpoch { .. }
    )
}

/// Why a fan-out's answers cannot be settled by removing failed replicas.
enum Refusal {
    /// A replica has seen a newer epoch: re-read the chunk's set (or stop being the writer).
    Fenced,
    /// A replica refused the request itself (no fault of the replica).
    Refused(String),
}

fn refusal(outcomes: &[Outcome]) -> Option<Refusal> {
    if outcomes
        .iter()
        .any(|(_, r)| matches!(r, Err(StorageError::StaleEpoch { .. })))
    {
        return Some(Refusal::Fenced);
    }
    outcomes.iter().find_map(|(n, r)| match r {
        Err(e) if !replica_fault(e) => Some(Refusal::Refused(format!(
            "replica {n} refused the request: {e}"
        ))),
        _ => None,
    })
}

/// A replicated write's options (FUA is set per request where the initiator asked).
fn write_opts(epoch: u64, seq: u64) -> WriteOpts {
    WriteOpts {
        epoch,
        seq,
        fua: false,
    }
}

fn unavailable(what: impl std::fmt::Display) -> DeviceError {
    DeviceError::Unavailable(what.to_string())
}

impl Volume {
    /// Attaches the volume for this gateway (a new writer epoch, fencing any earlier holder,
    /// this gateway's previous life included; the attachment records our portal and keeps its
    /// CSI publications) and loads its chunk map. Starts the keeper that
    /// renews the lease and runs recovery tasks; [`Volume::close`] stops it.
    pub async fn open(
        mgr: ManagerClient,
        pool: Arc<Pool>,
        cfg: ReplicaConfig,
        name: &str,
    ) -> Result<Arc<Volume>, OpenError> {
        let sent = Instant::now();
        let a = mgr
            .attach(AttachRequest {
                volume: Some(VolumeRef {
                    id: 0,
                    name: name.to_string(),
                }),
                gateway: cfg.gateway.clone(),
                lease_ms: cfg.lease_ms,
                portal: cfg.portal.clone(),
            })
            .await?;
        let v = mgr
            .get_volume(VolumeRef {
                id: a.volume_id,
                name: String::new(),
            })
            .await?;
        let vol = Arc::new(Volume {
            name: name.to_string(),
            id: a.volume_id,
            size: AtomicU64::new(v.size),
            chunk_size: v.chunk_size,
            cfg,
            mgr,
            pool,
            lease: Lease::default(),
            chunks: RwLock::new(Arc::new(Vec::new())),
            nodes: RwLock::new(HashMap::new()),
            latency: Mutex::new(HashMap::new()),
            writes: Semaphore::new(MAX_WRITES),
            rebuilding: Mutex::new(HashSet::new()),
            rebuild_slots: Semaphore::new(REBUILDS),
            snap_lock: tokio::sync::RwLock::new(()),
            source: Mutex::new(snapshot::source_of(&v)),
            filling: AtomicBool::new(false),
            snapshotting: AtomicBool::new(false),
            snapshots_done: Mutex::new(HashSet::new()),
            stop: CancellationToken::new(),
        });
        vol.lease
            .granted(a.writer_epoch, sent, Duration::from_millis(a.lease_ms));
        vol.load_map().await?;
        if vol.chunk_list().is_empty() {
            return Err(OpenError::Empty(name.to_string()));
        }
        tokio::spawn(vol.clone().keeper());
        tracing::info!(volume = %name, id = vol.id, writer_epoch = a.writer_epoch, lease_ms = a.lease_ms, "serving volume");
        Ok(vol)
    }

    /// Stops the keeper; I/O fails from now on (the lease is given up, not released: the
    /// manager lets another gateway in when it runs out, or at once on `detach`).
    pub fn close(&self, why: &str) {
        self.lease.lose(why.to_string());
        self.stop.cancel();
    }

    /// Stops renewing (gateway shutdown): in-flight I/O finishes under the lease it holds.
    pub fn stop_keeper(&self) {
        self.stop.cancel();
    }

    /// False once the lease is lost for good.
    pub fn is_serving(&self) -> bool {
        !self.lease.is_lost()
    }

    fn chunk_list(&self) -> Arc<Vec<Arc<Chunk>>> {
        self.chunks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn chunk(&self, index: u64) -> Result<Arc<Chunk>, DeviceError> {
        self.chunk_list()
            .get(index as usize)
            .cloned()
            .ok_or_else(|| unavailable(format!("chunk {index} is not in the chunk map")))
    }

    fn cid(&self, c: &Chunk) -> ChunkId {
        ChunkId::new(self.id, c.index)
    }

    fn addr(&self, node: &str) -> Option<String> {
        self.nodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .cloned()
    }

    /// This volume as the manager's requests name it.
    fn vref(&self) -> VolumeRef {
        VolumeRef {
            id: self.id,
            name: String::new(),
        }
    }

    /// Fetches `count` chunks' replica sets from `first` (0: all) and installs them.
    async fn fetch_map(&self, first: u64, count: u64) -> Result<(), ClientError> {
        let r = self
            .mgr
            .get_chunks(GetChunksRequest {
                volume: Some(self.vref()),
                first,
                count,
            })
            .await?;
        self.install(&r);
        Ok(())
    }

    /// Fetches the whole chunk map (and grows the chunk list after a resize).
    async fn load_map(&self) -> Result<(), ClientError> {
        self.fetch_map(0, 0).await
    }

    /// Re-reads one chunk's replica set.
    async fn refresh(&self, c: &Chunk) -> Result<(), DeviceError> {
        self.fetch_map(c.index as u64, 1)
            .await
            .map_err(|e| unavailable(format!("chunk map: {e}")))
    }

    fn install(&self, r: &ironsan_common::proto::manager::GetChunksResponse) {
        {
            let mut nodes = self.nodes.write().unwrap_or_else(|p| p.into_inner());
            for n in &r.nodes {
                nodes.insert(n.id.clone(), n.addr.clone());
            }
        }
        let mut list = self.chunks.write().unwrap_or_else(|p| p.into_inner());
        let mut grown: Option<Vec<Arc<Chunk>>> = None;
        for pc in &r.chunks {
            let Some(index) = u32::try_from(pc.index).ok().filter(|&i| i < MAX_CHUNKS) else {
                continue;
            };
            let view = View::from_proto(pc);
            match list.get(index as usize) {
                Some(c) => c.set_view(view),
                None => {
                    let g = grown.get_or_insert_with(|| list.as_ref().clone());
                    while g.len() < index as usize {
                        // A gap (a partial answer): filled by a later full load.
                        let i = g.len() as u32;
                        g.push(Arc::new(Chunk::new(i, View::default())));
                    }
                    if g.len() == index as usize {
                        g.push(Arc::new(Chunk::new(index, view)));
                    } else {
                        g[index as usize].set_view(view);
                    }
                }
            }
        }
        if let Some(g) = grown {
            *list = Arc::new(g);
        }
    }

    /// Picks up a grown volume: the new size and its chunks.
    pub async fn resized(&self, size: u64) -> Result<bool, ClientError> {
        if size <= self.size() {
            return Ok(false);
        }
        self.load_map().await?;
        self.size.store(size, Ordering::Release);
        Ok(true)
    }

    /// Storage epoch for a request on a chunk with `view`.
    fn epoch_for(&self, view: &View) -> Result<u64, DeviceError> {
        Ok(self.lease.check()?.max(view.epoch))
    }

    /// The chunk's replicas are consistent under this writer epoch (reconciling them first if
    /// needed) and hold its content (filled from the volume's source first if marked).
    async fn ready(&self, c: &Chunk) -> Result<(), DeviceError> {
        if c.is_ready() {
            return Ok(());
        }
        let _g = c.sync.lock().await;
        if c.is_ready() {
            return Ok(());
        }
        self.reconcile(c).await?;
        if c.view().fill {
            self.fill(c).await?;
        }
        c.set_ready(true);
        Ok(())
    }

    // ---------- fan-out and failure handling ----------

    /// Reports the set replicas that failed; answers whether every replica of the resulting
    /// set is among those that succeeded (so the operation counts as done).
    async fn settle(
        &self,
        c: &Chunk,
        view: &View,
        outcomes: &[Verdict],
    ) -> Result<bool, DeviceError> {
        let ok: HashSet<&str> = outcomes
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(n, _)| n.as_str())
            .collect();
        let failed: Vec<(&String, &String)> = outcomes
            .iter()
            .filter_map(|(n, r)| r.as_ref().err().map(|e| (n, e)))
            .collect();
        if failed.is_empty() {
            return Ok(true);
        }
        if !view.replicas.iter().any(|r| ok.contains(r.as_str())) {
            // Nobody took it: nothing to remove (the manager would refuse the last replica
            // anyway); the chunk may differ between replicas now.
            c.set_ready(false);
            let why: Vec<String> = failed.iter().map(|(n, e)| format!("{n}: {e}")).collect();
            return Err(unavailable(why.join("; ")));
        }
        let writer_epoch = self.lease.epoch();
        for (node, e) in &failed {
            metrics::counter!("ironsan_gateway_replica_failures_total", "volume" => self.name.clone())
                .increment(1);
            tracing::warn!(volume = %self.name, chunk = c.index, node = %node, error = %e, "replica failed; reporting it");
            let r = self
                .mgr
                .report_failed_replica(ReportFailedReplicaRequest {
                    volume_id: self.id,
                    index: c.index as u64,
                    node_id: (*node).clone(),
                    writer_epoch,
                    reason: (*e).clone(),
                })
                .await;
            match r {
                Ok(chunk) => c.set_view(View::from_proto(&chunk)),
                Err(e) => {
                    c.set_ready(false);
                    if e.code() == Code::FailedPrecondition {
                        self.check_still_writer().await;
                    }
                    return Err(unavailable(format!(
                        "could not remove failed replica {node}: {e}"
                    )));
                }
            }
        }
        let now = c.view();
        Ok(now.replicas.iter().all(|r| ok.contains(r.as_str())))
    }

    /// After a refusal that may mean someone else holds the volume now: ask the manager and
    /// give the lease up if so.
    async fn check_still_writer(&self) {
        let r = self.mgr.get_volume(self.vref()).await;
        if let Ok(v) = r {
            let ours = v.attachment.as_ref().is_some_and(|a| {
                a.gateway == self.cfg.gateway && a.writer_epoch == self.lease.epoch()
            });
            if !ours {
                tracing::warn!(volume = %self.name, "another writer holds the volume: stopping I/O");
                self.lease.lose("another gateway holds the volume");
            }
        }
    }

    /// A storage request was fenced: either the chunk's set changed (re-read it and go on) or
    /// another writer took over (stop).
    async fn fenced(&self, c: &Chunk, seen_epoch: u64) -> Result<(), DeviceError> {
        self.refresh(c).await?;
        if c.view().epoch > seen_epoch {
            return Ok(());
        }
        self.check_still_writer().await;
        self.lease.check().map(|_| ())?;
        // Ours still, yet refused: a replica has seen a newer epoch than the manager gave us.
        c.set_ready(false);
        Err(DeviceError::Fenced(
            "a replica refused the current epoch".into(),
        ))
    }

    /// Runs one mutating request on every write target of a chunk, under its range lock.
    async fn mutate<F>(&self, c: &Chunk, start: u64, end: u64, op: F) -> Result<(), DeviceError>
    where
        F: Fn(
            ironsan_storage::client::Client,
            ChunkId,
            WriteOpts,
        ) -> BoxFuture<'static, Result<u64, StorageError>>,
    {
        let _permit = self
            .writes
            .acquire()
            .await
            .map_err(|_| DeviceError::Task("volume closed".into()))?;
        for _ in 0..4 {
            self.ready(c).await?;
            let _range = c.locks.lock(start, end).await;
            // Found inconsistent while this write waited: reconcile (which needs the whole
            // chunk, so this range is released first), then try again.
            if !c.is_ready() {
                continue;
            }
            let view = c.view();
            let epoch = self.epoch_for(&view)?;
            let seq = c.next_seq();
            let id = self.cid(c);
            c.mark_written();
            let outcomes: Vec<Outcome> = join_all(c.write_targets(&view).map(|node| {
                let node = node.clone();
                let op = &op;
                async move {
                    let r = match self.client(&node).await {
                        Ok(client) => op(client, id, write_opts(epoch, seq)).await.map(|_| ()),
                        Err(e) => Err(e),
                    };
                    (node, r)
                }
            }))
            .await;
            match refusal(&outcomes) {
                Some(Refusal::Fenced) => {
                    self.fenced(c, view.epoch).await?;
                    continue;
                }
                Some(Refusal::Refused(why)) => {
                    c.set_ready(false);
                    return Err(DeviceError::Write(std::io::Error::other(why)));
                }
                None => {}
            }
            // A failed joiner only fails its rebuild; the set decides the outcome.
            let joining_failed = view
                .joining
                .as_ref()
                .filter(|j| outcomes.iter().any(|(n, r)| n == *j && r.is_err()));
            if let Some(j) = joining_failed {
                self.drop_joiner(c, j).await;
            }
            let set_outcomes = verdicts(
                outcomes
                    .into_iter()
                    .filter(|(n, _)| view.replicas.contains(n))
                    .collect(),
            );
            if self.settle(c, &view, &set_outcomes).await? {
                return Ok(());
            }
        }
        c.set_ready(false);
        Err(unavailable("the chunk's replica set kept changing"))
    }

    /// The rebuild target failed a write: take it out (the manager re-plans the task).
    async fn drop_joiner(&self, c: &Chunk, node: &str) {
        tracing::warn!(volume = %self.name, chunk = c.index, node, "rebuild target failed a write; dropping it");
        let r = self
            .mgr
            .report_failed_replica(ReportFailedReplicaRequest {
                volume_id: self.id,
                index: c.index as u64,
                node_id: node.to_string(),
                writer_epoch: self.lease.epoch(),
                reason: "write to rebuild target failed".into(),
            })
            .await;
        match r {
            Ok(chunk) => c.set_view(View::from_proto(&chunk)),
            Err(e) => {
                tracing::warn!(volume = %self.name, error = %e, "could not drop the rebuild target")
            }
        }
    }

    async fn client(&self, node: &str) -> Result<ironsan_storage::client::Client, StorageError> {
        let addr = self.addr(node).ok_or_else(|| StorageError::Connect {
            addr: node.to_string(),
            source: std::io::Error::other("node has no known address"),
        })?;
        self.pool.get(&addr).await
    }

    // ---------- reads ----------

    /// Replicas of the set, fastest first.
    /// Indexes into `view.replicas`, fastest first (no allocation beyond the small index list).
    fn read_order(&self, view: &View) -> Vec<usize> {
        let lat = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let speed = |i: &usize| lat.get(&view.replicas[*i]).copied().unwrap_or(0.0);
        let mut order: Vec<usize> = (0..view.replicas.len()).collect();
        order.sort_by(|a, b| speed(a).total_cmp(&speed(b)));
        order
    }

    fn observe_latency(&self, node: &str, took: Duration, failed: bool) {
        let us = if failed { 1e7 } else { took.as_micros() as f64 };
        let mut lat = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        match lat.get_mut(node) {
            Some(e) => *e = 0.8 * *e + 0.2 * us,
            None => {
                lat.insert(node.to_string(), us);
            }
        }
    }

    async fn read_piece(&self, c: &Chunk, off: u64, len: u64) -> Result<Bytes, DeviceError> {
        self.ready(c).await?;
        let id = self.cid(c);
        for attempt in 0..3 {
            let view = c.view();
            let epoch = self.epoch_for(&view)?;
            let mut bad = Vec::new();
            let mut errors = Vec::new();
            let mut stale = false;
            for i in self.read_order(&view) {
                let node = &view.replicas[i];
                let t = Instant::now();
                let r = match self.client(node).await {
                    Ok(client) => client.read(id, off, len, epoch).await,
                    Err(e) => Err(e),
                };
                self.observe_latency(node, t.elapsed(), r.is_err());
                match r {
                    Ok(out) => {
                        if !bad.is_empty() {
                            // Rare; done before answering so that nothing outlives the I/O.
                            if let Err(e) = self.repair(c, off, len, node, &bad).await {
                                tracing::warn!(volume = %self.name, chunk = c.index, error = %e, "read repair failed");
                            }
                        }
                        return Ok(out.data);
                    }
                    Err(StorageError::Checksum { .. }) => {
                        metrics::counter!("ironsan_gateway_checksum_errors_total", "volume" => self.name.clone()).increment(1);
                        tracing::warn!(volume = %self.name, chunk = c.index, node = %node, "checksum mismatch; reading another replica");
                        bad.push(node.clone());
                    }
                    Err(StorageError::StaleEpoch { .. }) => {
                        stale = true;
                        break;
                    }
                    Err(e) if replica_fault(&e) => errors.push(format!("{node}: {e}")),
                    Err(e) => return Err(DeviceError::Read(std::io::Error::other(e.to_string()))),
                }
            }
            if stale {
                self.fenced(c, view.epoch).await?;
                continue;
            }
            if !bad.is_empty() {
                errors.push(format!("checksum mismatch on {}", bad.join(", ")));
            }
            if attempt == 0 {
                // Nodes may have moved (a restarted daemon on a new port): look again.
                self.refresh(c).await?;
                continue;
            }
            return Err(unavailable(errors.join("; ")));
        }
        Err(unavailable("the chunk's replica set kept changing"))
    }

    // ---------- BlockDevice helpers ----------

    /// Splits a volume range into (chunk index, offset in chunk, length) pieces of at most
    /// [`MAX_PIECE`].
    fn pieces(&self, offset: u64, len: u64) -> Vec<(u64, u64, u64)> {
        let mut out = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let index = pos / self.chunk_size;
            let in_chunk = pos % self.chunk_size;
            let n = (end - pos).min(self.chunk_size - in_chunk).min(MAX_PIECE);
            out.push((index, in_chunk, n));
            pos += n;
        }
        out
    }

    async fn do_read(&self, offset: u64, len: usize) -> Result<Bytes, DeviceError> {
        check_range(offset, len as u64, self.size())?;
        let pieces = self.pieces(offset, len as u64);
        if let [(index, off, n)] = pieces[..] {
            let c = self.chunk(index)?;
            return self.read_piece(&c, off, n).await;
        }
        let parts = join_all(pieces.iter().map(|&(index, off, n)| async move {
            let c = self.chunk(index)?;
            self.read_piece(&c, off, n).await
        }))
        .await;
        let mut out = BytesMut::with_capacity(len);
        for p in parts {
            out.extend_from_slice(&p?);
        }
        Ok(out.freeze())
    }

    async fn do_write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DeviceError> {
        check_range(offset, data.len() as u64, self.size())?;
        let parts = join_all(self.pieces(offset, data.len() as u64).into_iter().map(
            |(index, off, n)| {
                let start = (index * self.chunk_size + off - offset) as usize;
                let piece = data.slice(start..start + n as usize);
                async move {
                    let c = self.chunk(index)?;
                    self.mutate(&c, off, off + n, move |client, id, mut opts| {
                        opts.fua = fua;
                        let piece = piece.clone();
                        Box::pin(async move { client.write(id, off, piece, opts).await })
                    })
                    .await
                }
            },
        ))
        .await;
        parts.into_iter().collect()
    }

    async fn do_write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), DeviceError> {
        check_range(offset, len, self.size())?;
        let parts = join_all(self.pieces(offset, len).into_iter().map(
            |(index, off, n)| async move {
                let c = self.chunk(index)?;
                self.mutate(&c, off, off + n, move |client, id, opts| {
                    Box::pin(async move { client.write_zeroes(id, off, n, unmap, opts).await })
                })
                .await
            },
        ))
        .await;
        parts.into_iter().collect()
    }

    /// Makes every write acknowledged so far durable on every replica: one `all` flush per
    /// node holding a chunk written since the last flush. A replica that cannot flush is
    /// failed like one that cannot write.
    async fn do_flush(&self) -> Result<(), DeviceError> {
        self.lease.check()?;
        let written: Vec<Arc<Chunk>> = self
            .chunk_list()
            .iter()
            .filter(|c| c.take_written())
            .cloned()
            .collect();
        let nodes: HashSet<String> = written
            .iter()
            .flat_map(|c| c.view().write_targets().cloned().collect::<Vec<_>>())
            .collect();
        let outcomes: Vec<Outcome> = join_all(nodes.iter().map(|node| async move {
            let r = match self.client(node).await {
                Ok(client) => client.flush(None).await,
                Err(e) => Err(e),
            };
            (node.clone(), r)
        }))
        .await;
        let failed: HashMap<&str, String> = outcomes
            .iter()
            .filter_map(|(n, r)| r.as_ref().err().map(|e| (n.as_str(), e.to_string())))
            .collect();
        if failed.is_empty() {
            return Ok(());
        }
        for c in &written {
            c.mark_written();
            let view = c.view();
            let mine: Vec<Verdict> = view
                .replicas
                .iter()
                .map(|n| match failed.get(n.as_str()) {
                    Some(e) => (n.clone(), Err(format!("flush: {e}"))),
                    None => (n.clone(), Ok(())),
                })
                .collect();
            if !self.settle(c, &view, &mine).await? {
                return Err(unavailable("replica set changed during flush"));
            }
        }
        Ok(())
    }
}

impl BlockDevice for Volume {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read(&self, offset: u64, len: usize) -> BoxFuture<'_, Result<Bytes, DeviceError>> {
        Box::pin(self.do_read(offset, len))
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<(), DeviceError>> {
        Box::pin(self.do_write(offset, data, fua))
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> BoxFuture<'_, Result<(), DeviceError>> {
        Box::pin(self.do_write_zeroes(offset, len, unmap))
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), DeviceError>> {
        Box::pin(self.do_flush())
    }

    fn allocation(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Extent, DeviceError>> {
        Box::pin(async move {
            Ok(Extent {
                offset,
                len,
                mapped: true,
            })
        })
    }
}

impl Volume {
    /// Renews the lease at a third of its length (faster after a failure) and runs the
    /// volume's recovery tasks, until closed.
    async fn keeper(self: Arc<Self>) {
        let mut next_renew = Instant::now();
        let mut next_tasks = Instant::now();
        loop {
            let wake = next_renew.min(next_tasks);
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
            if Instant::now() >= next_renew {
                next_renew = Instant::now() + self.renew().await;
            }
            if Instant::now() >= next_tasks {
                self.clone().poll_tasks().await;
                next_tasks = Instant::now() + self.cfg.task_poll;
            }
            if self.lease.is_lost() {
                return;
            }
        }
    }

    /// One renewal; answers when to try the next.
    async fn renew(&self) -> Duration {
        let sent = Instant::now();
        let r = self
            .mgr
            .renew(RenewRequest {
                volume: Some(self.vref()),
                gateway: self.cfg.gateway.clone(),
                writer_epoch: self.lease.epoch(),
            })
            .await;
        match r {
            Ok(a) => {
                let lease = Duration::from_millis(a.lease_ms);
                self.lease.granted(a.writer_epoch, sent, lease);
                metrics::gauge!("ironsan_gateway_lease_remaining_seconds", "volume" => self.name.clone())
                    .set(self.lease.remaining().as_secs_f64());
                (lease / 3).max(Duration::from_millis(100))
            }
            Err(e) if matches!(e.code(), Code::FailedPrecondition | Code::NotFound) => {
                tracing::warn!(volume = %self.name, error = %e, "lease renewal refused: stopping I/O");
                self.lease
                    .lose(format!("lease renewal refused: {}", e.message()));
                Duration::from_secs(1)
            }
            Err(e) => {
                tracing::warn!(volume = %self.name, error = %e, remaining_ms = self.lease.remaining().as_millis() as u64, "lease renewal failed; retrying");
                Duration::from_millis(300)
            }
        }
    }
}
