//! Volume snapshots, clones and restores, as the gateway holding the volume carries them out.
//!
//! The manager only records them (`Volume.snapshots`, `Volume.source`, `Chunk.fill`); the
//! gateway attached to the volume — or one the manager attaches it to for the job (a `work`
//! attachment) — does the work on the replicas and reports back:
//!
//! - **Take** (CREATING -> READY): every chunk is first made consistent (and filled, for a
//!   clone), then the volume's writes are paused by taking every write permit, so none is in
//!   flight and none starts; the acknowledged writes are flushed; every replica of every chunk
//!   takes the snapshot (`OP_SNAPSHOT`, copy-on-write at storage); writes resume. The pause is
//!   one round of snapshot requests, so the image is one point between writes across all
//!   chunks: crash-consistent. A replica that fails its request is reported like one that
//!   fails a write (removed, then rebuilt with its snapshots); if no replica of a chunk took
//!   it, the partial snapshot is deleted and the snapshot FAILED.
//! - **Delete** (DELETING -> gone): `OP_SNAPSHOT_DELETE` on every replica; a replica that does
//!   not answer is retried on the next poll.
//! - **Fill** (clone, restore): a chunk marked `fill` is copied from the source snapshot (read
//!   from the source chunk's replicas, 1 MiB at a time; zero pieces become unmaps) into its
//!   replicas before its first I/O, then reported (`SourceCopied`); the volume's remaining
//!   chunks are filled in the background while it is held, so the clone becomes independent
//!   of its source.
//!
//! Snapshot operations hold the volume's snapshot lock exclusively and rebuilds hold it
//! shared (`sync.rs`): a rebuilt replica receives the chunk's snapshots before its live copy,
//! and a snapshot never lands on a half-copied replica.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::future::join_all;
use ironsan_common::proto::manager::{
    self as pb, GetChunksRequest, ListSnapshotsRequest, SnapshotDoneRequest, SnapshotState,
    SourceCopiedRequest, VolumeRef,
};
use ironsan_storage::chunk::ChunkId;
use ironsan_storage::Error as StorageError;

use super::chunk::{Chunk, View};
use super::{refusal, unavailable, write_opts, Refusal, Verdict, Volume, MAX_WRITES};
use crate::device::DeviceError;

/// Fill piece: the unit read from the source snapshot and written to the replicas.
const FILL_PIECE: u64 = 1 << 20;
/// Chunks snapshotted (or made ready) at once.
const PARALLEL: usize = 16;

/// Where a volume's `fill` chunks come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Source {
    pub volume_id: u64,
    pub snapshot_id: u64,
}

pub(super) fn source_of(v: &pb::Volume) -> Option<Source> {
    v.source.as_ref().map(|s| Source {
        volume_id: s.volume_id,
        snapshot_id: s.snapshot_id,
    })
}

/// Whether the manager's record of the volume asks its holder for snapshot work.
pub fn has_work(v: &pb::Volume) -> bool {
    v.snapshots.iter().any(|s| pending(s).is_some())
}

/// What a snapshot in this state needs from the holder: true = take, false = delete.
fn pending(s: &pb::Snapshot) -> Option<bool> {
    match SnapshotState::try_from(s.state) {
        Ok(SnapshotState::SnapshotCreating) => Some(true),
        Ok(SnapshotState::SnapshotDeleting) => Some(false),
        _ => None,
    }
}

fn storage_err(what: &str, e: impl std::fmt::Display) -> DeviceError {
    unavailable(format!("{what}: {e}"))
}

/// Runs `f` on every chunk, [`PARALLEL`] at a time; the first error wins.
async fn each_chunk<'a, F, Fut>(chunks: &'a [Arc<Chunk>], f: F) -> Result<(), DeviceError>
where
    F: Fn(&'a Chunk) -> Fut,
    Fut: std::future::Future<Output = Result<(), DeviceError>>,
{
    let slots = tokio::sync::Semaphore::new(PARALLEL);
    let results = join_all(chunks.iter().map(|c| {
        let run = f(c);
        let slots = &slots;
        async move {
            let _slot = slots.acquire().await;
            run.await
        }
    }))
    .await;
    results.into_iter().collect()
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

impl Volume {
    /// Follows the manager's record of this volume (every pass of the serving gateway): starts
    /// the snapshot work it names and the background fill of a clone or restore. At most one
    /// of each runs at a time; what is left is picked up on a later poll.
    pub fn follow(self: &Arc<Self>, v: &pb::Volume) {
        let source = source_of(v);
        *self.source.lock().unwrap_or_else(|p| p.into_inner()) = source;
        if source.is_some() && !self.filling.swap(true, Ordering::AcqRel) {
            let me = self.clone();
            tokio::spawn(async move {
                me.fill_all().await;
                me.filling.store(false, Ordering::Release);
            });
        }
        let work: Vec<(u64, bool)> = {
            // A list read before our own report committed must not start the work again.
            let done = self
                .snapshots_done
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            v.snapshots
                .iter()
                .filter_map(|s| Some((s.id, pending(s)?)))
                .filter(|w| !done.contains(w))
                .collect()
        };
        if !work.is_empty() && !self.snapshotting.swap(true, Ordering::AcqRel) {
            let me = self.clone();
            tokio::spawn(async move {
                for (id, take) in work {
                    if me.stop.is_cancelled() {
                        break;
                    }
                    if take {
                        me.take(id).await;
                    } else {
                        me.remove(id).await;
                    }
                }
                me.snapshotting.store(false, Ordering::Release);
            });
        }
    }

    fn done(&self, id: u64, take: bool) {
        self.snapshots_done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((id, take));
    }

    /// Snapshot work or a fill is under way.
    pub fn busy(&self) -> bool {
        self.snapshotting.load(Ordering::Acquire) || self.filling.load(Ordering::Acquire)
    }

    // ---------- take ----------

    /// Takes snapshot `id` of the whole volume (module docs) and reports the outcome.
    async fn take(&self, id: u64) {
        let started = Instant::now();
        let (error, pause) = match self.take_all(id).await {
            Ok(pause) => (String::new(), pause),
            Err(e) => {
                tracing::warn!(volume = %self.name, snapshot = id, error = %e, "snapshot failed; removing what was taken");
                // Best effort: a replica that keeps a piece is cleaned by the delete of the
                // FAILED record.
                let _ = self.delete_everywhere(id).await;
                (e.to_string(), 0.0)
            }
        };
        if self.lease.is_lost() {
            // Whoever holds the volume next takes it again from the start.
            return;
        }
        let r = self
            .mgr
            .snapshot_done(SnapshotDoneRequest {
                id,
                writer_epoch: self.lease.epoch(),
                deleted: false,
                error: error.clone(),
            })
            .await;
        if r.is_ok() {
            self.done(id, true);
        }
        match r {
            Ok(_) if error.is_empty() => {
                metrics::histogram!("ironsan_gateway_snapshot_pause_seconds").record(pause);
                tracing::info!(volume = %self.name, snapshot = id, pause_ms = (pause * 1e3) as u64, total_ms = started.elapsed().as_millis() as u64, "snapshot taken");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(volume = %self.name, snapshot = id, error = %e, "cannot report the snapshot")
            }
        }
    }

    /// Answers how long writes were paused, in seconds.
    async fn take_all(&self, id: u64) -> Result<f64, DeviceError> {
        let _excl = self.snap_lock.write().await;
        let chunks = self.chunk_list();
        // Consistent and filled first, so that the pause is only the snapshot requests.
        each_chunk(&chunks, |c| self.ready(c)).await?;
        let paused = Instant::now();
        let _pause = self
            .writes
            .acquire_many(MAX_WRITES as u32)
            .await
            .map_err(|_| DeviceError::Task("volume closed".into()))?;
        self.do_flush().await?;
        each_chunk(&chunks, |c| self.snapshot_chunk(c, id)).await?;
        Ok(paused.elapsed().as_secs_f64())
    }

    /// Snapshot `snap` on every replica of the chunk's set. Failed replicas are reported (and
    /// so removed, to be rebuilt with the snapshot) like failed writes.
    async fn snapshot_chunk(&self, c: &Chunk, snap: u64) -> Result<(), DeviceError> {
        let id = self.cid(c);
        for _ in 0..4 {
            if !c.is_ready() {
                self.ready(c).await?;
            }
            let view = c.view();
            let epoch = self.epoch_for(&view)?;
            let outcomes = join_all(view.replicas.iter().map(|node| async move {
                let r = match self.client(node).await {
                    Ok(client) => match client.snapshot(id, snap, epoch).await {
                        // Left by an earlier attempt at another moment: take it again now.
                        Err(StorageError::SnapshotExists { .. }) => {
                            match client.snapshot_delete(id, snap, epoch).await {
                                Ok(()) => client.snapshot(id, snap, epoch).await,
                                Err(e) => Err(e),
                            }
                        }
                        r => r,
                    },
                    Err(e) => Err(e),
                };
                (node.clone(), r)
            }))
            .await;
            match refusal(&outcomes) {
                Some(Refusal::Fenced) => {
                    self.fenced(c, view.epoch).await?;
                    continue;
                }
                Some(Refusal::Refused(why)) => return Err(unavailable(why)),
                None => {}
            }
            let verdicts: Vec<Verdict> = outcomes
                .into_iter()
                .map(|(n, r)| (n, r.map_err(|e| e.to_string())))
                .collect();
            if self.settle(c, &view, &verdicts).await? {
                return Ok(());
            }
        }
        Err(unavailable("the chunk's replica set kept changing"))
    }

    // ---------- delete ----------

    /// Deletes snapshot `id` from every replica and reports it; on failure it is retried on a
    /// later poll (the record stays DELETING).
    async fn remove(&self, id: u64) {
        let r = {
            let _excl = self.snap_lock.write().await;
            self.delete_everywhere(id).await
        };
        if let Err(e) = r {
            tracing::warn!(volume = %self.name, snapshot = id, error = %e, "snapshot delete incomplete; retrying later");
            return;
        }
        let done = self
            .mgr
            .snapshot_done(SnapshotDoneRequest {
                id,
                writer_epoch: self.lease.epoch(),
                deleted: true,
                error: String::new(),
            })
            .await;
        match done {
            Ok(_) => {
                self.done(id, false);
                tracing::info!(volume = %self.name, snapshot = id, "snapshot deleted")
            }
            Err(e) => {
                tracing::warn!(volume = %self.name, snapshot = id, error = %e, "cannot report the deleted snapshot")
            }
        }
    }

    /// `OP_SNAPSHOT_DELETE` on every replica of every chunk (missing counts as deleted).
    async fn delete_everywhere(&self, snap: u64) -> Result<(), DeviceError> {
        let chunks = self.chunk_list();
        each_chunk(&chunks, |c| async move {
            let id = self.cid(c);
            let view = c.view();
            let epoch = self.epoch_for(&view)?;
            for node in &view.replicas {
                let client = self.client(node).await.map_err(|e| storage_err(node, e))?;
                match client.snapshot_delete(id, snap, epoch).await {
                    Ok(())
                    | Err(StorageError::SnapshotNotFound { .. })
                    | Err(StorageError::NotFound(_)) => {}
                    Err(e) => return Err(storage_err(node, e)),
                }
            }
            Ok(())
        })
        .await
    }

    // ---------- fill (clone, restore) ----------

    fn source(&self) -> Option<Source> {
        *self.source.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fills every chunk still marked, one after the other, while the volume is served.
    async fn fill_all(&self) {
        for c in self.chunk_list().iter() {
            if self.stop.is_cancelled() || self.source().is_none() {
                return;
            }
            if c.view().fill {
                if let Err(e) = self.ready(c).await {
                    tracing::warn!(volume = %self.name, chunk = c.index, error = %e, "background fill failed; retrying later");
                    return;
                }
            }
        }
    }

    /// Copies the chunk's content from the volume's source snapshot into its replicas (the
    /// caller holds the chunk's sync lock, before any I/O) and reports it copied.
    pub(super) async fn fill(&self, c: &Chunk) -> Result<(), DeviceError> {
        let src = self
            .source()
            .ok_or_else(|| unavailable("chunk to be filled but the volume has no source"))?;
        let snap = self
            .mgr
            .list_snapshots(ListSnapshotsRequest {
                volume: None,
                id: src.snapshot_id,
            })
            .await
            .map_err(|e| storage_err("source snapshot", e))?
            .snapshots
            .into_iter()
            .next()
            .ok_or_else(|| unavailable(format!("source snapshot {} is gone", src.snapshot_id)))?;
        let started = Instant::now();
        let start = c.index as u64 * self.chunk_size;
        // Past the snapshot's size the source held nothing: zeroes (a grown clone or volume).
        let from = if start < snap.size {
            Some(self.source_chunk(src.volume_id, c.index as u64).await?)
        } else {
            None
        };
        let _all = c.locks.lock(0, self.chunk_size).await;
        let id = self.cid(c);
        let mut copied = 0u64;
        let mut off = 0;
        while off < self.chunk_size {
            let n = FILL_PIECE.min(self.chunk_size - off);
            let data = match &from {
                Some((sid, nodes)) => Some(
                    self.snapshot_piece(nodes, *sid, src.snapshot_id, off, n)
                        .await?,
                ),
                None => None,
            };
            let view = c.view();
            let epoch = self.epoch_for(&view)?;
            let seq = c.next_seq();
            let data = data.filter(|d| !is_zero(d));
            copied += data.as_ref().map_or(0, |_| n);
            let results = join_all(c.write_targets(&view).map(|node| {
                let data = data.clone();
                async move {
                    let client = self.client(node).await?;
                    match data {
                        Some(d) => client.write(id, off, d, write_opts(epoch, seq)).await,
                        None => {
                            client
                                .write_zeroes(id, off, n, true, write_opts(epoch, seq))
                                .await
                        }
                    }
                    .map(|_| ())
                }
            }))
            .await;
            if let Some(e) = results.into_iter().find_map(Result::err) {
                return Err(storage_err("fill", e));
            }
            off += n;
        }
        let view = c.view();
        for node in c.write_targets(&view) {
            let client = self.client(node).await.map_err(|e| storage_err(node, e))?;
            client
                .flush(Some(id))
                .await
                .map_err(|e| storage_err(node, e))?;
        }
        let chunk = self
            .mgr
            .source_copied(SourceCopiedRequest {
                volume_id: self.id,
                index: c.index as u64,
                writer_epoch: self.lease.epoch(),
            })
            .await
            .map_err(|e| storage_err("report the filled chunk", e))?;
        c.set_view(View::from_proto(&chunk));
        metrics::counter!("ironsan_gateway_fill_bytes_total", "volume" => self.name.clone())
            .increment(copied);
        tracing::info!(volume = %self.name, chunk = c.index, bytes = copied, ms = started.elapsed().as_millis() as u64, "chunk filled from its source");
        Ok(())
    }

    /// The source volume's chunk `index`: its id and replicas (their addresses learnt).
    async fn source_chunk(
        &self,
        volume: u64,
        index: u64,
    ) -> Result<(ChunkId, Vec<String>), DeviceError> {
        let r = self
            .mgr
            .get_chunks(GetChunksRequest {
                volume: Some(VolumeRef {
                    id: volume,
                    name: String::new(),
                }),
                first: index,
                count: 1,
            })
            .await
            .map_err(|e| storage_err("source chunk map", e))?;
        let chunk = r
            .chunks
            .iter()
            .find(|ch| ch.index == index)
            .ok_or_else(|| unavailable(format!("source chunk {index} is not in its map")))?;
        {
            let mut nodes = self.nodes.write().unwrap_or_else(|p| p.into_inner());
            let known: HashMap<&str, &str> = r
                .nodes
                .iter()
                .map(|n| (n.id.as_str(), n.addr.as_str()))
                .collect();
            for id in &chunk.replicas {
                if let Some(addr) = known.get(id.as_str()) {
                    nodes.insert(id.clone(), addr.to_string());
                }
            }
        }
        Ok((ChunkId::new(volume, index as u32), chunk.replicas.clone()))
    }

    /// Reads a piece of snapshot `snap` of chunk `id` from the first of `nodes` that has it.
    pub(super) async fn snapshot_piece(
        &self,
        nodes: &[String],
        id: ChunkId,
        snap: u64,
        off: u64,
        n: u64,
    ) -> Result<Bytes, DeviceError> {
        let mut errors = Vec::new();
        for node in nodes {
            let r = match self.client(node).await {
                Ok(client) => client.snapshot_read(id, snap, off, n).await,
                Err(e) => Err(e),
            };
            match r {
                Ok(out) => return Ok(out.data),
                Err(e) => errors.push(format!("{node}: {e}")),
            }
        }
        Err(unavailable(format!(
            "snapshot {snap} of chunk {} unreadable: {}",
            id.index,
            errors.join("; ")
        )))
    }
}

/// A READY snapshot served read-only: reads go to its chunks' replicas (`OP_SNAPSHOT_READ`),
/// the fastest first; the gateway exports it write-protected beside its volume.
pub struct SnapshotDevice {
    vol: Arc<Volume>,
    snap: u64,
    size: u64,
}

impl SnapshotDevice {
    pub fn new(vol: Arc<Volume>, snap: &pb::Snapshot) -> Self {
        SnapshotDevice {
            vol,
            snap: snap.id,
            size: snap.size,
        }
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes, DeviceError> {
        crate::device::check_range(offset, len as u64, self.size)?;
        let mut out = bytes::BytesMut::with_capacity(len);
        for (index, off, n) in self.vol.pieces(offset, len as u64) {
            let c = self.vol.chunk(index)?;
            let view = c.view();
            let order: Vec<String> = self
                .vol
                .read_order(&view)
                .into_iter()
                .map(|i| view.replicas[i].clone())
                .collect();
            let piece = self
                .vol
                .snapshot_piece(&order, self.vol.cid(&c), self.snap, off, n)
                .await?;
            out.extend_from_slice(&piece);
        }
        Ok(out.freeze())
    }
}

fn read_only() -> DeviceError {
    DeviceError::Write(std::io::Error::other("a snapshot is read-only"))
}

impl crate::device::BlockDevice for SnapshotDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(
        &self,
        offset: u64,
        len: usize,
    ) -> futures::future::BoxFuture<'_, Result<Bytes, DeviceError>> {
        Box::pin(self.read_at(offset, len))
    }

    fn write(
        &self,
        _: u64,
        _: Bytes,
        _: bool,
    ) -> futures::future::BoxFuture<'_, Result<(), DeviceError>> {
        Box::pin(async { Err(read_only()) })
    }

    fn write_zeroes(
        &self,
        _: u64,
        _: u64,
        _: bool,
    ) -> futures::future::BoxFuture<'_, Result<(), DeviceError>> {
        Box::pin(async { Err(read_only()) })
    }

    fn flush(&self) -> futures::future::BoxFuture<'_, Result<(), DeviceError>> {
        Box::pin(async { Ok(()) })
    }

    fn allocation(
        &self,
        offset: u64,
        len: u64,
    ) -> futures::future::BoxFuture<'_, Result<crate::device::Extent, DeviceError>> {
        Box::pin(async move {
            Ok(crate::device::Extent {
                offset,
                len,
                mapped: true,
            })
        })
    }
}
