//! Making replicas agree: reconciliation before a chunk serves I/O, read repair, and the
//! rebuild copy of recovery tasks.
//!
//! **Reconcile** (DESIGN.md invariant 3). Every write of a gateway carries a per-chunk sequence
//! number and at most [`MAX_WRITES`] writes of a volume are in flight, so when a replica's
//! newest sequence number is `v`, every write numbered `v - MAX_WRITES` or lower reached it or
//! failed for good (and a failure makes the chunk reconcile before its next write). The ranges
//! in which replicas may differ are therefore those the write logs name after
//! `min(v) - WINDOW`, on any replica. Those ranges are copied from the most advanced replica
//! to the others; every replica of the set holds every acknowledged write, so whichever is
//! chosen, an acknowledged write survives and an unacknowledged one lands everywhere or
//! nowhere. Before looking, each replica is fenced with the new epoch (a read carrying it), so
//! a previous writer can no longer change what is being compared.
//!
//! **Rebuild**. A recovery task names a joining replica that writes already reach. The copy
//! goes piece by piece (1 MiB) under the chunk's range lock, so a write to the same piece
//! waits and lands after the copied data, never under it. Pieces that read as zeroes are
//! skipped (the new replica starts empty and sparse). Only when every piece is copied and
//! flushed does the task complete and the replica join the set.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use futures::future::join_all;
use ironsan_common::proto::manager::{
    CompleteTaskRequest, ListTasksRequest, RecoveryTask, TaskProgressRequest,
};
use ironsan_storage::chunk::WrittenRange;
use ironsan_storage::Error as StorageError;

use super::chunk::{Chunk, View};
use super::{replica_fault, unavailable, write_opts, Volume, MAX_WRITES};
use crate::device::DeviceError;

/// How far behind the newest sequence number replicas may differ; twice the in-flight bound
/// leaves room for retries and repairs.
const WINDOW: u64 = 2 * MAX_WRITES as u64;
/// Copy piece for reconcile and rebuild.
const COPY_PIECE: u64 = 1 << 20;
/// Pieces between two progress reports of a rebuild.
const PROGRESS_EVERY: u64 = 8;

/// What probing one replica found.
enum Probe {
    /// The chunk exists with this newest sequence number.
    Existing(u64),
    /// The chunk was missing and has just been created empty.
    Created,
}

fn read_err(e: StorageError) -> DeviceError {
    DeviceError::Read(std::io::Error::other(e.to_string()))
}

impl Volume {
    /// Fences one replica with `epoch` and learns its newest sequence number, creating the
    /// chunk if the replica does not have it.
    async fn probe(&self, node: &str, c: &Chunk, epoch: u64) -> Result<Probe, StorageError> {
        let id = self.cid(c);
        let client = self.client(node).await?;
        match client.read(id, 0, 512, epoch).await {
            Ok(out) => Ok(Probe::Existing(out.version)),
            // A bad first block is a repairable fault, not a lost replica.
            Err(StorageError::Checksum { .. }) => {
                Ok(Probe::Existing(client.info(id).await?.version))
            }
            Err(StorageError::NotFound(_)) => match client.create(id, self.chunk_size, epoch).await
            {
                Ok(_) | Err(StorageError::Exists(_)) => Ok(Probe::Created),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// Makes every replica of the chunk's set hold the same data (module docs).
    pub(super) async fn reconcile(&self, c: &Chunk) -> Result<(), DeviceError> {
        // No write may be in flight on the chunk while ranges are compared and copied: one
        // landing after its range was copied would leave the replicas different.
        let _all = c.locks.lock(0, self.chunk_size).await;
        for round in 0..4 {
            let view = c.view();
            if view.replicas.is_empty() {
                return Err(unavailable(format!("chunk {} has no replicas", c.index)));
            }
            let epoch = self.epoch_for(&view)?;
            let probes = join_all(
                view.replicas
                    .iter()
                    .map(|n| async move { (n.clone(), self.probe(n, c, epoch).await) }),
            )
            .await;
            if probes
                .iter()
                .any(|(_, r)| matches!(r, Err(StorageError::StaleEpoch { .. })))
            {
                self.fenced(c, view.epoch).await?;
                continue;
            }
            let existing: Vec<(String, u64)> = probes
                .iter()
                .filter_map(|(n, r)| match r {
                    Ok(Probe::Existing(v)) => Some((n.clone(), *v)),
                    _ => None,
                })
                .collect();
            let failed: Vec<(String, StorageError)> = probes
                .into_iter()
                .filter_map(|(n, r)| r.err().map(|e| (n, e)))
                .collect();
            if let Some((n, e)) = failed.iter().find(|(_, e)| !replica_fault(e)) {
                return Err(unavailable(format!("replica {n}: {e}")));
            }
            if !failed.is_empty() {
                if existing.is_empty() && round == 0 {
                    // Nodes may have moved (a restarted daemon on a new port): look again.
                    self.refresh(c).await?;
                    continue;
                }
                if existing.is_empty() {
                    // Every replica that answered is empty and the others are out of reach:
                    // serving the empty ones could return zeroes for acknowledged data.
                    let why: Vec<String> =
                        failed.iter().map(|(n, e)| format!("{n}: {e}")).collect();
                    return Err(unavailable(format!(
                        "chunk {}: no replica with data reachable ({})",
                        c.index,
                        why.join("; ")
                    )));
                }
                let outcomes: Vec<(String, Result<(), String>)> = view
                    .replicas
                    .iter()
                    .map(|n| match failed.iter().find(|(f, _)| f == n) {
                        Some((_, e)) => (n.clone(), Err(e.to_string())),
                        None => (n.clone(), Ok(())),
                    })
                    .collect();
                self.settle(c, &view, &outcomes).await?;
                continue;
            }
            let Some((source, top)) = existing.iter().max_by_key(|(_, v)| *v).cloned() else {
                // Never written anywhere (or created just now on every replica).
                return Ok(());
            };
            if top == 0 {
                // Sequence numbers start at 1: no replica was ever written.
                return Ok(());
            }
            let low = if existing.len() < view.replicas.len() {
                0
            } else {
                existing.iter().map(|(_, v)| *v).min().unwrap_or(0)
            };
            let since = low.saturating_sub(WINDOW);
            let others: Vec<&String> = view.replicas.iter().filter(|n| **n != source).collect();
            if others.is_empty() {
                c.seq_at_least(top + 1);
                return Ok(());
            }
            let seq = top + 1;
            let copied = match self
                .copy_ranges(c, &view, &existing, since, &source, &others, epoch, seq)
                .await
            {
                Ok(n) => n,
                Err((node, e)) if replica_fault(&e) => {
                    // A replica failed mid-reconcile: it leaves the set like after a failed
                    // write, and the reconcile starts over with the others.
                    let verdicts: Vec<(String, Result<(), String>)> = view
                        .replicas
                        .iter()
                        .map(|n| {
                            let r = if *n == node {
                                Err(e.to_string())
                            } else {
                                Ok(())
                            };
                            (n.clone(), r)
                        })
                        .collect();
                    self.settle(c, &view, &verdicts).await?;
                    continue;
                }
                Err((node, StorageError::StaleEpoch { .. })) => {
                    tracing::debug!(volume = %self.name, chunk = c.index, node = %node, "fenced during reconcile");
                    self.fenced(c, view.epoch).await?;
                    continue;
                }
                Err((node, e)) => return Err(unavailable(format!("reconcile on {node}: {e}"))),
            };
            c.seq_at_least(seq + 1);
            if copied > 0 {
                metrics::counter!("ironsan_gateway_reconciled_bytes_total", "volume" => self.name.clone())
                    .increment(copied);
                tracing::info!(volume = %self.name, chunk = c.index, source = %source, bytes = copied, "replicas reconciled");
            }
            return Ok(());
        }
        Err(unavailable("the chunk's replica set kept changing"))
    }

    /// Copies the diverging ranges from `source` to `others`; the failing node on error.
    #[allow(clippy::too_many_arguments)]
    async fn copy_ranges(
        &self,
        c: &Chunk,
        view: &View,
        existing: &[(String, u64)],
        since: u64,
        source: &str,
        others: &[&String],
        epoch: u64,
        seq: u64,
    ) -> Result<u64, (String, StorageError)> {
        let ranges = self.diverging(c, view, existing, since).await?;
        let id = self.cid(c);
        let mut copied = 0u64;
        for r in &ranges {
            let mut off = r.offset;
            while off < r.offset + r.len {
                let n = (r.offset + r.len - off).min(COPY_PIECE);
                let data = async { self.client(source).await?.read(id, off, n, epoch).await }
                    .await
                    .map_err(|e| (source.to_string(), e))?
                    .data;
                let writes = join_all(others.iter().map(|node| {
                    let data = data.clone();
                    async move {
                        let opts = write_opts(epoch, seq);
                        let r = async { self.client(node).await?.write(id, off, data, opts).await };
                        r.await.map_err(|e| ((*node).clone(), e))
                    }
                }))
                .await;
                if let Some(Err(e)) = writes.into_iter().find(|w| w.is_err()) {
                    return Err(e);
                }
                copied += n;
                off += n;
            }
        }
        Ok(copied)
    }

    /// Union of the ranges any replica logged after `since`; the whole chunk where a log no
    /// longer reaches back, or for a replica that was just created.
    async fn diverging(
        &self,
        c: &Chunk,
        view: &View,
        existing: &[(String, u64)],
        since: u64,
    ) -> Result<Vec<WrittenRange>, (String, StorageError)> {
        let whole = vec![WrittenRange {
            offset: 0,
            len: self.chunk_size,
        }];
        if existing.len() < view.replicas.len() {
            // A replica lost the chunk: it needs everything any other one holds.
            return Ok(whole);
        }
        let mut spans: BTreeMap<u64, u64> = BTreeMap::new();
        for (node, _) in existing {
            let r = async {
                self.client(node)
                    .await?
                    .written_since(self.cid(c), since)
                    .await
            };
            match r.await {
                Ok((ranges, _)) => {
                    for w in ranges {
                        let e = spans.entry(w.offset).or_insert(0);
                        *e = (*e).max(w.len);
                    }
                }
                Err(StorageError::LogTruncated { .. }) => return Ok(whole),
                Err(e) => return Err((node.clone(), e)),
            }
        }
        let mut merged: Vec<WrittenRange> = Vec::new();
        for (offset, len) in spans {
            match merged.last_mut() {
                Some(m) if offset <= m.offset + m.len => m.len = m.len.max(offset + len - m.offset),
                _ => merged.push(WrittenRange { offset, len }),
            }
        }
        Ok(merged)
    }

    /// Rewrites the 4 KiB blocks around `[off, off+len)` on the replicas that failed their
    /// checksum, from `good`, under the range lock so no write slips in between.
    pub(super) async fn repair(
        &self,
        c: &Chunk,
        off: u64,
        len: u64,
        good: &str,
        bad: &[String],
    ) -> Result<(), DeviceError> {
        let block = ironsan_storage::chunk::BLOCK;
        let start = off / block * block;
        let end = (off + len).div_ceil(block) * block;
        let _range = c.locks.lock(start, end).await;
        let view = c.view();
        let epoch = self.epoch_for(&view)?;
        let data = self
            .client(good)
            .await
            .map_err(read_err)?
            .read(self.cid(c), start, end - start, epoch)
            .await
            .map_err(read_err)?
            .data;
        for node in bad.iter().filter(|n| view.replicas.contains(n)) {
            let seq = c.next_seq();
            self.client(node)
                .await
                .map_err(read_err)?
                .write(self.cid(c), start, data.clone(), write_opts(epoch, seq))
                .await
                .map_err(read_err)?;
            metrics::counter!("ironsan_gateway_read_repairs_total", "volume" => self.name.clone())
                .increment(1);
            tracing::info!(volume = %self.name, chunk = c.index, node = %node, offset = start, len = end - start, "replica repaired");
        }
        Ok(())
    }

    /// Starts a copy for each new recovery task of this volume.
    pub(super) async fn poll_tasks(self: Arc<Self>) {
        let tasks = match self.mgr.list_tasks(ListTasksRequest {}).await {
            Ok(t) => t.tasks,
            Err(e) => {
                tracing::debug!(volume = %self.name, error = %e, "cannot list recovery tasks");
                return;
            }
        };
        for t in tasks.into_iter().filter(|t| t.volume_id == self.id) {
            let fresh = self
                .rebuilding
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(t.id);
            if !fresh {
                continue;
            }
            let me = self.clone();
            tokio::spawn(async move {
                let id = t.id;
                if let Ok(_slot) = me.rebuild_slots.acquire().await {
                    me.run_task(t).await;
                }
                me.rebuilding
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            });
        }
    }

    async fn run_task(&self, t: RecoveryTask) {
        let Ok(c) = self.chunk(t.index) else {
            return;
        };
        metrics::gauge!("ironsan_gateway_rebuilds_active").increment(1.0);
        let started = Instant::now();
        let r = self.rebuild(&c, &t).await;
        metrics::gauge!("ironsan_gateway_rebuilds_active").decrement(1.0);
        match r {
            Ok(Some(bytes)) => {
                let done = self
                    .mgr
                    .complete_task(CompleteTaskRequest {
                        id: t.id,
                        success: true,
                    })
                    .await;
                match done {
                    Ok(resp) => {
                        if let Some(chunk) = resp.chunk {
                            c.set_view(View::from_proto(&chunk));
                        }
                        metrics::counter!("ironsan_gateway_rebuilds_total", "volume" => self.name.clone()).increment(1);
                        tracing::info!(volume = %self.name, chunk = c.index, target = %t.target, bytes, ms = started.elapsed().as_millis() as u64, "rebuild complete: replica joined the set");
                    }
                    Err(e) => {
                        tracing::warn!(volume = %self.name, task = t.id, error = %e, "could not complete recovery task")
                    }
                }
            }
            // The task no longer applies (completed or re-planned meanwhile).
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(volume = %self.name, chunk = c.index, target = %t.target, error = %e, "rebuild failed");
                if !self.lease.is_lost() {
                    let _ = self
                        .mgr
                        .complete_task(CompleteTaskRequest {
                            id: t.id,
                            success: false,
                        })
                        .await;
                }
            }
        }
    }

    /// Copies the chunk to the task's target, its snapshots first (oldest first, each
    /// written into the target's chunk and snapshotted there, while writes skip the target),
    /// then the live content; `None` when the task is stale.
    async fn rebuild(&self, c: &Chunk, t: &RecoveryTask) -> Result<Option<u64>, DeviceError> {
        // Shared: snapshots are neither taken nor deleted while a copy runs.
        let _snaps = self.snap_lock.read().await;
        self.refresh(c).await?;
        if c.view().joining.as_deref() != Some(t.target.as_str()) {
            return Ok(None);
        }
        self.ready(c).await?;
        let view = c.view();
        let epoch = self.epoch_for(&view)?;
        let snapshots = self.list_snapshots(c, &view).await?;
        if !snapshots.is_empty() {
            c.hold(Some(t.target.clone()));
        }
        let r = self.copy_to(c, t, epoch, &snapshots).await;
        c.hold(None);
        r
    }

    /// The chunk's snapshots (ids, oldest first) as the first answering replica has them.
    async fn list_snapshots(&self, c: &Chunk, view: &View) -> Result<Vec<u64>, DeviceError> {
        let mut last = String::new();
        for i in self.read_order(view) {
            let node = &view.replicas[i];
            let r = match self.client(node).await {
                Ok(client) => client.snapshots(self.cid(c)).await,
                Err(e) => Err(e),
            };
            match r {
                Ok(list) => return Ok(list.into_iter().map(|s| s.id).collect()),
                Err(e) => last = format!("{node}: {e}"),
            }
        }
        Err(unavailable(format!(
            "cannot list the chunk's snapshots: {last}"
        )))
    }

    async fn copy_to(
        &self,
        c: &Chunk,
        t: &RecoveryTask,
        epoch: u64,
        snapshots: &[u64],
    ) -> Result<Option<u64>, DeviceError> {
        let id = self.cid(c);
        let target = self.client(&t.target).await.map_err(read_err)?;
        // A leftover from an earlier attempt may hold stale blocks where the source has
        // holes: start from an empty replica.
        match target.create(id, self.chunk_size, epoch).await {
            Ok(_) => {}
            Err(StorageError::Exists(_)) => {
                target.delete(id, epoch).await.map_err(read_err)?;
                target
                    .create(id, self.chunk_size, epoch)
                    .await
                    .map_err(read_err)?;
            }
            Err(e) => return Err(read_err(e)),
        }
        tracing::info!(volume = %self.name, chunk = c.index, target = %t.target, lost = %t.lost, snapshots = snapshots.len(), "rebuild started");
        let pieces = self.chunk_size.div_ceil(COPY_PIECE) as usize;
        // Pieces holding data on the target now (what a zero piece must clear).
        let mut filled = vec![false; pieces];
        let mut copied = 0u64;
        for &snap in snapshots {
            let view = c.view();
            for (i, was) in filled.iter_mut().enumerate() {
                let off = i as u64 * COPY_PIECE;
                let n = COPY_PIECE.min(self.chunk_size - off);
                let data = self
                    .snapshot_piece(&view.replicas, id, snap, off, n)
                    .await?;
                copied += self.put_piece(c, &target, epoch, off, data, was).await?;
            }
            target.snapshot(id, snap, epoch).await.map_err(read_err)?;
        }
        if !snapshots.is_empty() {
            // From here on writes reach the target again; every piece is copied after this.
            let _all = c.locks.lock(0, self.chunk_size).await;
            c.hold(None);
        }
        for (i, was) in filled.iter_mut().enumerate() {
            let off = i as u64 * COPY_PIECE;
            let n = COPY_PIECE.min(self.chunk_size - off);
            let _range = c.locks.lock(off, off + n).await;
            let view = c.view();
            if view.joining.as_deref() != Some(t.target.as_str()) {
                return Ok(None);
            }
            let epoch = self.epoch_for(&view)?;
            let data = self.read_from_set(c, &view, off, n, epoch).await?;
            copied += self.put_piece(c, &target, epoch, off, data, was).await?;
            let done = off + n;
            if (done / COPY_PIECE).is_multiple_of(PROGRESS_EVERY) {
                // Progress is informational: a failed report does not stop the copy.
                let _ = self
                    .mgr
                    .task_progress(TaskProgressRequest {
                        id: t.id,
                        copied_bytes: done,
                    })
                    .await;
            }
        }
        target.flush(Some(id)).await.map_err(read_err)?;
        Ok(Some(copied))
    }

    /// Writes one copied piece to a rebuild target: data as is, zeroes only where the target
    /// holds data (it starts empty and sparse). Answers the bytes written.
    async fn put_piece(
        &self,
        c: &Chunk,
        target: &ironsan_storage::client::Client,
        epoch: u64,
        off: u64,
        data: bytes::Bytes,
        filled: &mut bool,
    ) -> Result<u64, DeviceError> {
        let id = self.cid(c);
        let n = data.len() as u64;
        if data.iter().any(|&b| b != 0) {
            target
                .write(id, off, data, write_opts(epoch, c.next_seq()))
                .await
                .map_err(read_err)?;
            *filled = true;
        } else if *filled {
            target
                .write_zeroes(id, off, n, true, write_opts(epoch, c.next_seq()))
                .await
                .map_err(read_err)?;
            *filled = false;
        } else {
            return Ok(0);
        }
        metrics::counter!("ironsan_gateway_rebuild_bytes_total", "volume" => self.name.clone())
            .increment(n);
        Ok(n)
    }

    async fn read_from_set(
        &self,
        c: &Chunk,
        view: &View,
        off: u64,
        n: u64,
        epoch: u64,
    ) -> Result<bytes::Bytes, DeviceError> {
        let mut last = String::new();
        for i in self.read_order(view) {
            let node = &view.replicas[i];
            let r = match self.client(node).await {
                Ok(client) => client.read(self.cid(c), off, n, epoch).await,
                Err(e) => Err(e),
            };
            match r {
                Ok(out) => return Ok(out.data),
                Err(e) => last = format!("{node}: {e}"),
            }
        }
        Err(unavailable(format!("no source for the copy: {last}")))
    }
}
