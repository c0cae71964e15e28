//! The storage daemon's data-path listener.
//!
//! Per connection: the reader (this connection's task) decodes frames and spawns one task per
//! request, which calls the [`Store`] and queues its answer for the writer task; answers go out
//! in completion order, matched by request id. At most `max_inflight` requests run per
//! connection: at the limit the reader stops reading, so TCP pushes back on the client.
//!
//! Bad input: a frame that fails framing (magic, CRC, size) or whose header does not decode
//! closes that connection only (logged); an unknown op or a bad field is answered with
//! UNKNOWN_OP / INVALID and the connection goes on. A client vanishing mid-request ends its
//! connection; the requests it had started finish and their answers are dropped.
//!
//! Shutdown: the token stops the accept loop and every reader; requests already started finish
//! and are answered, then the connections close and [`serve`] returns.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::chunk::{ChunkId, WrittenRange, MAX_CHUNK, MAX_IO};
use crate::error::{Error, Result};
use crate::frame::{FrameError, FrameReader, OutFrame};
use crate::metrics::{self, ServerMetrics};
use crate::store::{Store, WriteOpts};
use crate::wire::{self, Op, Request, Response, Status};

/// Largest data frame of a copy stream.
pub const COPY_PIECE: u64 = 1 << 20;
/// How long answers may take to leave at shutdown before the connection is cut.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Data frames a copy stream may have queued but not yet sent.
const COPY_WINDOW: usize = 4;
/// Most ranges one response lists; more are merged across their smallest gaps (copying a
/// little unchanged data is harmless, an oversized header is not).
pub const MAX_RANGES: usize = 2048;

#[derive(Clone, Copy, Debug)]
pub struct ServerConfig {
    /// Connections served at once; more are accepted and closed at once.
    pub max_connections: usize,
    /// Requests in flight per connection before the reader stops reading.
    pub max_inflight: usize,
    /// Time a frame may take from its first byte to its last before the connection is closed.
    pub frame_timeout: std::time::Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_inflight: 128,
            frame_timeout: std::time::Duration::from_secs(30),
        }
    }
}

struct Ctx {
    store: Arc<Store>,
    cfg: ServerConfig,
    metrics: ServerMetrics,
    shutdown: CancellationToken,
}

/// Serves the data path on `listener` with the default limits until `shutdown`.
pub async fn serve(listener: TcpListener, store: Arc<Store>, shutdown: CancellationToken) {
    serve_with(listener, store, ServerConfig::default(), shutdown).await
}

/// Serves the data path until `shutdown`, then drains every connection and returns.
pub async fn serve_with(
    listener: TcpListener,
    store: Arc<Store>,
    cfg: ServerConfig,
    shutdown: CancellationToken,
) {
    let ctx = Arc::new(Ctx {
        store,
        cfg,
        metrics: ServerMetrics::new(),
        shutdown: shutdown.clone(),
    });
    let conns = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(cfg.max_connections.max(1)));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (sock, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off a little instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = cfg.max_connections, "too many connections: refusing");
            metrics::connection_refused();
            continue;
        };
        let _ = sock.set_nodelay(true);
        conns.spawn(connection(ctx.clone(), sock, peer, slot));
    }
    conns.close();
    conns.wait().await;
}

async fn connection(ctx: Arc<Ctx>, sock: TcpStream, peer: SocketAddr, _slot: OwnedSemaphorePermit) {
    metrics::connection_opened();
    tracing::debug!(%peer, "data-path connection");
    let (rd, wr) = sock.into_split();
    let (tx, rx) = mpsc::channel(ctx.cfg.max_inflight * 2 + COPY_WINDOW);
    let writer = tokio::spawn(crate::frame::write_loop(wr, rx));
    let inflight = Arc::new(Semaphore::new(ctx.cfg.max_inflight.max(1)));
    let tasks = TaskTracker::new();
    let mut reader = FrameReader::new(rd).with_stall_timeout(ctx.cfg.frame_timeout);
    loop {
        let permit = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            p = inflight.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let frame = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            f = reader.read_frame() => f,
        };
        let frame = match frame {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(FrameError::Io(e)) => {
                tracing::debug!(%peer, error = %e, "connection read failed");
                break;
            }
            Err(FrameError::Stalled(d)) => {
                tracing::warn!(%peer, timeout = ?d, "frame not completed in time: closing the connection");
                break;
            }
            Err(FrameError::Truncated) => {
                tracing::info!(%peer, "client closed the connection in the middle of a frame");
                break;
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "corrupt frame: closing the connection");
                metrics::protocol_error();
                break;
            }
        };
        let req = match frame.request() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "corrupt frame: closing the connection");
                metrics::protocol_error();
                break;
            }
        };
        tasks.spawn(handle(ctx.clone(), req, frame.payload, tx.clone(), permit));
    }
    tasks.close();
    tasks.wait().await;
    drop(tx);
    // A peer that stops reading would hold the writer (and so shutdown) forever: once
    // shutting down, answers get DRAIN_TIMEOUT to leave, then the connection is cut.
    let mut writer = writer;
    let done = tokio::select! {
        r = &mut writer => Some(r),
        _ = ctx.shutdown.cancelled() => tokio::time::timeout(DRAIN_TIMEOUT, &mut writer).await.ok(),
    };
    match done {
        Some(Ok(Ok(()))) => {}
        Some(Ok(Err(e))) => tracing::debug!(%peer, error = %e, "connection write failed"),
        Some(Err(e)) => tracing::error!(%peer, error = %e, "connection writer panicked"),
        None => {
            tracing::warn!(%peer, "client not reading its answers: connection cut at shutdown");
            writer.abort();
        }
    }
    metrics::connection_closed();
    tracing::debug!(%peer, "data-path connection closed");
}

/// Runs one request and queues its answer(s).
async fn handle(
    ctx: Arc<Ctx>,
    req: Request,
    payload: Bytes,
    tx: mpsc::Sender<OutFrame>,
    _permit: OwnedSemaphorePermit,
) {
    let start = Instant::now();
    let bytes_in = payload.len();
    let (status, bytes_out) = if req.op == Op::Copy as i32 {
        copy(&ctx, &req, &tx).await
    } else {
        let (resp, data) = match Op::try_from(req.op) {
            Ok(op) if op != Op::Unspecified && op != Op::Copy => {
                match execute(&ctx.store, op, &req, payload).await {
                    Ok(r) => r,
                    Err(e) => (wire::error_response(req.request_id, &e), Bytes::new()),
                }
            }
            _ => (wire::unknown_op(req.request_id, req.op), Bytes::new()),
        };
        let status = Status::try_from(resp.status).unwrap_or(Status::Unspecified);
        let n = data.len();
        // A closed queue means the client is gone: nobody is left to answer.
        let _ = tx.send(OutFrame::new(&resp, data)).await;
        (status, n)
    };
    ctx.metrics
        .request(req.op, status, bytes_in, bytes_out, start.elapsed());
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid(msg.into())
}

fn opts(req: &Request) -> WriteOpts {
    WriteOpts {
        epoch: req.epoch,
        seq: req.seq,
        fua: req.fua,
    }
}

/// Checks that `offset + len` does not overflow and `len` is at most `max`.
fn check_extent(req: &Request, len: u64, max: u64) -> Result<()> {
    if len > max {
        return Err(invalid(format!("length {len} exceeds {max}")));
    }
    if req.offset.checked_add(len).is_none() {
        return Err(invalid(format!(
            "offset {} + length {len} overflows",
            req.offset
        )));
    }
    Ok(())
}

/// One single-answer request against the store.
async fn execute(
    store: &Store,
    op: Op,
    req: &Request,
    payload: Bytes,
) -> Result<(Response, Bytes)> {
    let id = wire::chunk_of(req);
    let mut resp = wire::ok(req.request_id);
    if op != Op::Write && !payload.is_empty() {
        return Err(invalid(format!("{} carries no payload", op.as_str_name())));
    }
    let mut data = Bytes::new();
    match op {
        Op::Create => {
            if req.size == 0 || req.size > MAX_CHUNK {
                return Err(invalid(format!(
                    "chunk size {} is not in 1..={MAX_CHUNK}",
                    req.size
                )));
            }
            let info = store.create(id, req.size, req.epoch).await?;
            resp.info = Some(wire::info_to_wire(&info));
        }
        Op::Write => {
            if req.length != payload.len() as u64 {
                return Err(invalid(format!(
                    "length {} but {} payload bytes",
                    req.length,
                    payload.len()
                )));
            }
            check_extent(req, req.length, MAX_IO)?;
            resp.seq = store.write(id, req.offset, payload, opts(req)).await?;
        }
        Op::Read => {
            check_extent(req, req.length, MAX_IO)?;
            let out = store.read(id, req.offset, req.length, req.epoch).await?;
            resp.version = out.version;
            data = out.data;
        }
        Op::WriteZeroes => {
            check_extent(req, req.length, MAX_CHUNK)?;
            resp.seq = store
                .write_zeroes(id, req.offset, req.length, req.unmap, opts(req))
                .await?;
        }
        Op::Flush => store.flush((!req.all).then_some(id)).await?,
        Op::Info => {
            let info = store.info(id).await?;
            resp.info = Some(wire::info_to_wire(&info));
        }
        Op::Delete => store.delete(id, req.epoch).await?,
        Op::WrittenSince => {
            let (ranges, version) = store.written_since(id, req.since).await?;
            resp.ranges = wire::ranges_to_wire(&coalesce(ranges, MAX_RANGES));
            resp.version = version;
        }
        Op::Snapshot => store.snapshot(id, req.snapshot, req.epoch).await?,
        Op::SnapshotDelete => store.snapshot_delete(id, req.snapshot, req.epoch).await?,
        Op::SnapshotRead => {
            check_extent(req, req.length, MAX_IO)?;
            let out = store
                .snapshot_read(id, req.snapshot, req.offset, req.length)
                .await?;
            resp.version = out.version;
            data = out.data;
        }
        Op::SnapshotList => {
            let list = store.snapshots(id).await?;
            resp.snapshots = wire::snapshots_to_wire(&list);
        }
        Op::Copy | Op::Unspecified => return Err(invalid("not a single-answer op")),
    }
    Ok((resp, data))
}

/// The streaming copy for rebuild: a header frame (ranges, version, whether they are the whole
/// chunk), one data frame per piece of at most [`COPY_PIECE`] bytes, an `end` frame. An error
/// at any point ends the stream with an error frame (`end` set). At most [`COPY_WINDOW`] data
/// frames wait for the socket, so a slow reader slows the copy instead of filling memory.
async fn copy(ctx: &Ctx, req: &Request, tx: &mpsc::Sender<OutFrame>) -> (Status, usize) {
    let mut sent = 0usize;
    let result = copy_stream(ctx, req, tx, &mut sent).await;
    let mut last = match &result {
        Ok(()) => wire::ok(req.request_id),
        Err(e) => wire::error_response(req.request_id, e),
    };
    last.end = true;
    let status = Status::try_from(last.status).unwrap_or(Status::Unspecified);
    if !matches!(result, Err(Error::Disconnected { .. })) {
        let _ = tx.send(OutFrame::new(&last, Bytes::new())).await;
    }
    (status, sent)
}

async fn copy_stream(
    ctx: &Ctx,
    req: &Request,
    tx: &mpsc::Sender<OutFrame>,
    sent: &mut usize,
) -> Result<()> {
    let id = wire::chunk_of(req);
    let gone = || Error::Disconnected {
        addr: "client".into(),
    };
    let (ranges, version, full) = if req.snapshot != 0 {
        snapshot_plan(&ctx.store, id, req.snapshot).await?
    } else {
        copy_plan(&ctx.store, id, req.since).await?
    };
    let mut head = wire::ok(req.request_id);
    head.ranges = wire::ranges_to_wire(&ranges);
    head.version = version;
    head.full = full;
    tx.send(OutFrame::new(&head, Bytes::new()))
        .await
        .map_err(|_| gone())?;
    let window = Arc::new(Semaphore::new(COPY_WINDOW));
    for r in &ranges {
        let end = r.offset.saturating_add(r.len);
        let mut off = r.offset;
        while off < end {
            let len = (end - off).min(COPY_PIECE);
            let permit = tokio::select! {
                _ = ctx.shutdown.cancelled() => return Err(Error::ShuttingDown),
                p = window.clone().acquire_owned() => p.map_err(|_| gone())?,
            };
            let out = if req.snapshot != 0 {
                ctx.store.snapshot_read(id, req.snapshot, off, len).await?
            } else {
                ctx.store.read(id, off, len, req.epoch).await?
            };
            let mut piece = wire::ok(req.request_id);
            piece.offset = off;
            *sent += out.data.len();
            let frame = OutFrame::new(&piece, out.data).with_permit(permit);
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return Err(Error::ShuttingDown),
                r = tx.send(frame) => r.map_err(|_| gone())?,
            }
            off += len;
        }
    }
    Ok(())
}

/// What a copy sends: the ranges written after `since` from the write log, or the whole chunk
/// when `since` is 0 or the log no longer reaches back that far (`full`).
async fn copy_plan(
    store: &Store,
    id: ChunkId,
    since: u64,
) -> Result<(Vec<WrittenRange>, u64, bool)> {
    if since > 0 {
        match store.written_since(id, since).await {
            Ok((ranges, version)) => return Ok((coalesce(ranges, MAX_RANGES), version, false)),
            Err(Error::LogTruncated { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    let info = store.info(id).await?;
    let whole = WrittenRange {
        offset: 0,
        len: info.size,
    };
    Ok((vec![whole], info.version, true))
}

/// What the copy of snapshot `snap` sends: all of it, with the chunk's version when it was taken.
async fn snapshot_plan(
    store: &Store,
    id: ChunkId,
    snap: u64,
) -> Result<(Vec<WrittenRange>, u64, bool)> {
    let info = store.info(id).await?;
    let s = store
        .snapshots(id)
        .await?
        .into_iter()
        .find(|s| s.id == snap)
        .ok_or(Error::SnapshotNotFound {
            chunk: id,
            snapshot: snap,
        })?;
    let whole = WrittenRange {
        offset: 0,
        len: info.size,
    };
    Ok((vec![whole], s.version, true))
}

/// Sorted ranges merged until at most `max` remain, closing the smallest gaps first.
pub fn coalesce(mut ranges: Vec<WrittenRange>, max: usize) -> Vec<WrittenRange> {
    ranges.sort_by_key(|r| r.offset);
    let mut gap = 0u64;
    loop {
        let mut out: Vec<WrittenRange> = Vec::with_capacity(ranges.len());
        for r in &ranges {
            match out.last_mut() {
                Some(l) if r.offset <= l.offset.saturating_add(l.len).saturating_add(gap) => {
                    let end = (l.offset + l.len).max(r.offset.saturating_add(r.len));
                    l.len = end - l.offset;
                }
                _ => out.push(*r),
            }
        }
        if out.len() <= max.max(1) || gap == u64::MAX {
            return out;
        }
        ranges = out;
        gap = if gap == 0 {
            4096
        } else {
            gap.saturating_mul(2)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(offset: u64, len: u64) -> WrittenRange {
        WrittenRange { offset, len }
    }

    #[test]
    fn coalesce_merges_smallest_gaps_first() {
        let v = vec![r(8192, 4096), r(0, 4096), r(4096, 4096), r(1 << 20, 4096)];
        assert_eq!(coalesce(v.clone(), 10), vec![r(0, 12288), r(1 << 20, 4096)]);
        assert_eq!(coalesce(v, 1), vec![r(0, (1 << 20) + 4096)]);
        let many: Vec<_> = (0..10_000u64).map(|i| r(i * 8192, 4096)).collect();
        let c = coalesce(many, MAX_RANGES);
        assert!(c.len() <= MAX_RANGES);
        assert_eq!(c.first().map(|x| x.offset), Some(0));
        assert_eq!(
            c.iter().map(|x| x.offset + x.len).max(),
            Some(9999 * 8192 + 4096)
        );
    }
}
