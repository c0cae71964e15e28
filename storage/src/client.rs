//! The data-path client: one pipelined TCP connection ([`Client`]) and a pool of them keyed
//! by address ([`Pool`]), as the gateway uses them.
//!
//! A [`Client`] gives every request a fresh id, parks a oneshot for it in the pending map and
//! queues the frame for the connection's writer task; the reader task completes whichever
//! request each answer names, so answers may come in any order. A request that outlives its
//! timeout fails with [`Error::Timeout`] alone (its late answer is dropped); when the
//! connection breaks, every pending request fails with [`Error::Disconnected`] and the client
//! stays dead — the [`Pool`] replaces it on next use, with exponential backoff after failed
//! connects. Remote errors come back as the very `Error` variants the daemon's store returned.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::chunk::{ChunkId, ChunkInfo, SnapshotInfo, WrittenRange};
use crate::error::{Error, Result};
use crate::frame::{FrameReader, OutFrame};
use crate::store::{ReadOut, WriteOpts};
use crate::wire::{self, Op, Request, Response};

#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub connect_timeout: Duration,
    /// Time from queueing a request to its answer (or, for a copy, between two frames).
    pub request_timeout: Duration,
    /// Connections per address in a [`Pool`], used round-robin.
    pub conns_per_addr: usize,
    /// First wait after a failed connect; doubled per failure up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Frames queued for the socket per connection before senders wait.
    pub queue: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(30),
            conns_per_addr: 2,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            queue: 256,
        }
    }
}

/// One answer frame.
struct Reply {
    header: Response,
    payload: Bytes,
}

enum Waiter {
    One(oneshot::Sender<Result<Reply>>),
    Stream(mpsc::Sender<Result<Reply>>),
}

struct Conn {
    addr: String,
    tx: mpsc::Sender<OutFrame>,
    pending: Mutex<HashMap<u64, Waiter>>,
    next_id: AtomicU64,
    /// Cancelled when the connection is dead (or dropped): ends the reader.
    dead: CancellationToken,
    timeout: Duration,
}

impl Conn {
    fn disconnected(&self) -> Error {
        Error::Disconnected {
            addr: self.addr.clone(),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiter>> {
        // A poisoned map only means a panic elsewhere; the map itself is still consistent.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the connection dead and fails everything pending.
    fn kill(&self) {
        self.dead.cancel();
        let waiters: Vec<Waiter> = self.pending().drain().map(|(_, w)| w).collect();
        for w in waiters {
            match w {
                Waiter::One(tx) => {
                    let _ = tx.send(Err(self.disconnected()));
                }
                Waiter::Stream(tx) => {
                    let _ = tx.try_send(Err(self.disconnected()));
                }
            }
        }
    }

    /// Registers a waiter under a fresh id, unless the connection is already dead.
    fn register(&self, w: Waiter) -> Result<u64> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut p = self.pending();
        // Checked under the lock: `kill` drains after cancelling, so no waiter is stranded.
        if self.dead.is_cancelled() {
            return Err(self.disconnected());
        }
        p.insert(id, w);
        Ok(id)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.dead.cancel();
    }
}

/// Removes a request's waiter if its caller gives up (timeout or dropped future).
struct PendingGuard<'a> {
    conn: &'a Conn,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.conn.pending().remove(&self.id);
    }
}

/// One data-path connection; cheap to clone (clones share the connection).
#[derive(Clone)]
pub struct Client {
    conn: Arc<Conn>,
}

impl Client {
    /// Connects to `addr` (TCP_NODELAY) and starts the connection's reader and writer.
    pub async fn connect(addr: &str, cfg: &ClientConfig) -> Result<Client> {
        let connect_err = |source| Error::Connect {
            addr: addr.to_string(),
            source,
        };
        let sock = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| connect_err(std::io::ErrorKind::TimedOut.into()))?
            .map_err(connect_err)?;
        let _ = sock.set_nodelay(true);
        let (rd, wr) = sock.into_split();
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        let conn = Arc::new(Conn {
            addr: addr.to_string(),
            tx,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            dead: CancellationToken::new(),
            timeout: cfg.request_timeout,
        });
        let weak = Arc::downgrade(&conn);
        let dead = conn.dead.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::frame::write_loop(wr, rx).await {
                tracing::debug!(error = %e, "data-path connection write failed");
            }
            dead.cancel();
        });
        tokio::spawn(read_loop(weak, conn.dead.clone(), FrameReader::new(rd)));
        Ok(Client { conn })
    }

    pub fn addr(&self) -> &str {
        &self.conn.addr
    }

    /// False once the connection has broken; such a client only returns `Disconnected`.
    pub fn is_alive(&self) -> bool {
        !self.conn.dead.is_cancelled()
    }

    fn timeout_err(&self) -> Error {
        Error::Timeout {
            addr: self.conn.addr.clone(),
            ms: self.conn.timeout.as_millis() as u64,
        }
    }

    /// Sends one request and waits for its single answer; a non-OK status is the error.
    async fn call(&self, mut req: Request, payload: Bytes) -> Result<Reply> {
        let conn = &*self.conn;
        let (otx, orx) = oneshot::channel();
        req.request_id = conn.register(Waiter::One(otx))?;
        let _guard = PendingGuard {
            conn,
            id: req.request_id,
        };
        let frame = OutFrame::new(&req, payload);
        let wait = async {
            conn.tx.send(frame).await.map_err(|_| conn.disconnected())?;
            orx.await.map_err(|_| conn.disconnected())?
        };
        let reply = tokio::time::timeout(conn.timeout, wait)
            .await
            .map_err(|_| self.timeout_err())??;
        match wire::response_error(&reply.header) {
            Some(e) => Err(e),
            None => Ok(reply),
        }
    }

    fn request(op: Op, id: ChunkId) -> Request {
        Request {
            op: op as i32,
            volume: id.volume,
            index: id.index,
            ..Default::default()
        }
    }

    fn info_of(id: ChunkId, r: &Reply) -> Result<ChunkInfo> {
        r.header
            .info
            .as_ref()
            .map(|i| wire::info_from_wire(id, i))
            .ok_or_else(|| Error::Protocol("answer without chunk info".into()))
    }

    /// Creates an empty chunk of `size` bytes.
    pub async fn create(&self, id: ChunkId, size: u64, epoch: u64) -> Result<ChunkInfo> {
        let mut req = Self::request(Op::Create, id);
        req.size = size;
        req.epoch = epoch;
        let r = self.call(req, Bytes::new()).await?;
        Self::info_of(id, &r)
    }

    /// Writes `data` at `offset`; returns the write's sequence number.
    pub async fn write(
        &self,
        id: ChunkId,
        offset: u64,
        data: Bytes,
        opts: WriteOpts,
    ) -> Result<u64> {
        let mut req = Self::request(Op::Write, id);
        req.offset = offset;
        req.length = data.len() as u64;
        req.epoch = opts.epoch;
        req.seq = opts.seq;
        req.fua = opts.fua;
        Ok(self.call(req, data).await?.header.seq)
    }

    /// Zeroes `len` bytes at `offset` (releasing whole blocks when `unmap`).
    pub async fn write_zeroes(
        &self,
        id: ChunkId,
        offset: u64,
        len: u64,
        unmap: bool,
        opts: WriteOpts,
    ) -> Result<u64> {
        let mut req = Self::request(Op::WriteZeroes, id);
        req.offset = offset;
        req.length = len;
        req.unmap = unmap;
        req.epoch = opts.epoch;
        req.seq = opts.seq;
        req.fua = opts.fua;
        Ok(self.call(req, Bytes::new()).await?.header.seq)
    }

    /// Reads `len` bytes at `offset`, with the chunk's version (also the read-range-for-copy).
    pub async fn read(&self, id: ChunkId, offset: u64, len: u64, epoch: u64) -> Result<ReadOut> {
        let mut req = Self::request(Op::Read, id);
        req.offset = offset;
        req.length = len;
        req.epoch = epoch;
        read_out(self.call(req, Bytes::new()).await?, len)
    }

    /// Makes everything acknowledged before it durable: one chunk, or all with `None`.
    pub async fn flush(&self, id: Option<ChunkId>) -> Result<()> {
        let mut req = Self::request(Op::Flush, id.unwrap_or(ChunkId::new(0, 0)));
        req.all = id.is_none();
        self.call(req, Bytes::new()).await.map(|_| ())
    }

    pub async fn info(&self, id: ChunkId) -> Result<ChunkInfo> {
        let r = self.call(Self::request(Op::Info, id), Bytes::new()).await?;
        Self::info_of(id, &r)
    }

    pub async fn delete(&self, id: ChunkId, epoch: u64) -> Result<()> {
        let mut req = Self::request(Op::Delete, id);
        req.epoch = epoch;
        self.call(req, Bytes::new()).await.map(|_| ())
    }

    /// Ranges written after `since` (merged) and the chunk's version.
    /// Takes snapshot `snap` of chunk `id` (fenced by `epoch` like a write).
    pub async fn snapshot(&self, id: ChunkId, snap: u64, epoch: u64) -> Result<()> {
        let mut req = Self::request(Op::Snapshot, id);
        req.snapshot = snap;
        req.epoch = epoch;
        self.call(req, Bytes::new()).await.map(|_| ())
    }

    /// Deletes snapshot `snap` of chunk `id` (fenced by `epoch` like a write).
    pub async fn snapshot_delete(&self, id: ChunkId, snap: u64, epoch: u64) -> Result<()> {
        let mut req = Self::request(Op::SnapshotDelete, id);
        req.snapshot = snap;
        req.epoch = epoch;
        self.call(req, Bytes::new()).await.map(|_| ())
    }

    /// Reads `len` bytes at `offset` of snapshot `snap` of chunk `id` (also the piece reader of
    /// a snapshot's rebuild); the version is the chunk's when the snapshot was taken.
    pub async fn snapshot_read(
        &self,
        id: ChunkId,
        snap: u64,
        offset: u64,
        len: u64,
    ) -> Result<ReadOut> {
        let mut req = Self::request(Op::SnapshotRead, id);
        req.snapshot = snap;
        req.offset = offset;
        req.length = len;
        read_out(self.call(req, Bytes::new()).await?, len)
    }

    /// The snapshots of chunk `id`, oldest first, with the space each holds.
    pub async fn snapshots(&self, id: ChunkId) -> Result<Vec<SnapshotInfo>> {
        let r = self
            .call(Self::request(Op::SnapshotList, id), Bytes::new())
            .await?;
        Ok(wire::snapshots_from_wire(&r.header.snapshots))
    }

    pub async fn written_since(&self, id: ChunkId, since: u64) -> Result<(Vec<WrittenRange>, u64)> {
        let mut req = Self::request(Op::WrittenSince, id);
        req.since = since;
        let r = self.call(req, Bytes::new()).await?;
        Ok((wire::ranges_from_wire(&r.header.ranges), r.header.version))
    }

    /// Starts the streaming copy of a chunk for rebuild (see [`CopyStream`]). The stream's
    /// pieces share this connection and a slow consumer holds up its other answers: give
    /// rebuilds their own connection ([`Pool::copy`] does).
    pub async fn copy(&self, id: ChunkId, since: u64, epoch: u64) -> Result<CopyStream> {
        self.copy_stream(id, since, epoch, 0).await
    }

    /// Streams the whole content of snapshot `snap` (non-zero) of chunk `id`, as [`Self::copy`]
    /// does a chunk: the rebuild of a snapshot on a new replica. The stream's version is the
    /// chunk's when the snapshot was taken; it is always `full`.
    pub async fn copy_snapshot(&self, id: ChunkId, snap: u64) -> Result<CopyStream> {
        if snap == 0 {
            return Err(Error::Invalid("snapshot ids are non-zero".into()));
        }
        self.copy_stream(id, 0, 0, snap).await
    }

    async fn copy_stream(
        &self,
        id: ChunkId,
        since: u64,
        epoch: u64,
        snapshot: u64,
    ) -> Result<CopyStream> {
        let conn = &*self.conn;
        let (stx, srx) = mpsc::channel(8);
        let mut req = Self::request(Op::Copy, id);
        req.since = since;
        req.epoch = epoch;
        req.snapshot = snapshot;
        req.request_id = conn.register(Waiter::Stream(stx))?;
        let mut stream = CopyStream {
            client: self.clone(),
            id: req.request_id,
            rx: srx,
            ranges: Vec::new(),
            version: 0,
            full: false,
            done: false,
        };
        conn.tx
            .send(OutFrame::new(&req, Bytes::new()))
            .await
            .map_err(|_| conn.disconnected())?;
        let head = stream.frame().await?;
        stream.ranges = wire::ranges_from_wire(&head.header.ranges);
        stream.version = head.header.version;
        stream.full = head.header.full;
        if head.header.end {
            stream.done = true;
        }
        Ok(stream)
    }
}

/// A chunk being copied: the plan (`ranges`, `version`, `full`), then its data piece by piece.
pub struct CopyStream {
    client: Client,
    id: u64,
    rx: mpsc::Receiver<Result<Reply>>,
    /// What will be sent, in order.
    pub ranges: Vec<WrittenRange>,
    /// The chunk's version when the copy was planned.
    pub version: u64,
    /// True when the ranges are the whole chunk (asked from 0, or the log was truncated).
    pub full: bool,
    done: bool,
}

impl CopyStream {
    async fn frame(&mut self) -> Result<Reply> {
        let r = tokio::time::timeout(self.client.conn.timeout, self.rx.recv())
            .await
            .map_err(|_| self.client.timeout_err())?;
        let reply = match r {
            Some(r) => r?,
            None => return Err(self.client.conn.disconnected()),
        };
        if let Some(e) = wire::response_error(&reply.header) {
            self.done = true;
            return Err(e);
        }
        Ok(reply)
    }

    /// The next piece as (offset in the chunk, data); `None` once the stream has ended.
    pub async fn next(&mut self) -> Option<Result<(u64, Bytes)>> {
        if self.done {
            return None;
        }
        match self.frame().await {
            Ok(r) if r.header.end => {
                self.done = true;
                None
            }
            Ok(r) => Some(Ok((r.header.offset, r.payload))),
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

impl Drop for CopyStream {
    fn drop(&mut self) {
        self.client.conn.pending().remove(&self.id);
    }
}

/// Delivers every answer frame to its waiter until the connection ends, then fails the rest.
async fn read_loop(
    conn: Weak<Conn>,
    dead: CancellationToken,
    mut reader: FrameReader<tokio::net::tcp::OwnedReadHalf>,
) {
    loop {
        let frame = tokio::select! {
            _ = dead.cancelled() => break,
            f = reader.read_frame() => f,
        };
        let Some(conn) = conn.upgrade() else { return };
        let reply = match frame.and_then(|f| match f {
            Some(f) => Ok(Some((f.response()?, f.payload))),
            None => Ok(None),
        }) {
            Ok(Some((header, payload))) => Reply { header, payload },
            Ok(None) => {
                tracing::debug!(addr = %conn.addr, "storage daemon closed the connection");
                conn.kill();
                return;
            }
            Err(e) => {
                if !matches!(e, crate::frame::FrameError::Io(_)) {
                    tracing::warn!(addr = %conn.addr, error = %e, "bad frame from storage daemon: closing");
                }
                conn.kill();
                return;
            }
        };
        let id = reply.header.request_id;
        let last = reply.header.end || wire::response_error(&reply.header).is_some();
        let waiter = {
            let mut p = conn.pending();
            match p.get(&id) {
                Some(Waiter::Stream(tx)) if !last => Some(Waiter::Stream(tx.clone())),
                Some(_) => p.remove(&id),
                // Timed out or abandoned: the answer has nobody to go to.
                None => None,
            }
        };
        match waiter {
            Some(Waiter::One(tx)) => {
                let _ = tx.send(Ok(reply));
            }
            // Waiting here is the stream's flow control: the socket stops being read.
            Some(Waiter::Stream(tx)) => {
                let _ = tx.send(Ok(reply)).await;
            }
            None => {}
        }
    }
    if let Some(conn) = conn.upgrade() {
        conn.kill();
    }
}

/// Connections by address, several per address used round-robin, (re)connected lazily.
pub struct Pool {
    cfg: ClientConfig,
    addrs: Mutex<HashMap<String, Arc<AddrSlots>>>,
}

struct AddrSlots {
    next: AtomicUsize,
    slots: Vec<tokio::sync::Mutex<Slot>>,
}

#[derive(Default)]
struct Slot {
    client: Option<Client>,
    failures: u32,
    retry_at: Option<Instant>,
}

impl AddrSlots {
    /// A live connection of another slot than `except`, if one is free to look at now.
    fn live_sibling(&self, except: usize) -> Option<Client> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != except)
            .find_map(|(_, s)| {
                let s = s.try_lock().ok()?;
                s.client.as_ref().filter(|c| c.is_alive()).cloned()
            })
    }
}

/// A read's answer: exactly `len` bytes of payload, with the chunk's version.
fn read_out(r: Reply, len: u64) -> Result<ReadOut> {
    if r.payload.len() as u64 != len {
        return Err(Error::Protocol(format!(
            "asked for {len} bytes, got {}",
            r.payload.len()
        )));
    }
    Ok(ReadOut {
        data: r.payload,
        version: r.header.version,
    })
}

impl Pool {
    pub fn new(cfg: ClientConfig) -> Self {
        Self {
            cfg,
            addrs: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> &ClientConfig {
        &self.cfg
    }

    fn slots(&self, addr: &str) -> Arc<AddrSlots> {
        let mut m = self.addrs.lock().unwrap_or_else(|p| p.into_inner());
        // The common case allocates nothing.
        if let Some(s) = m.get(addr) {
            return s.clone();
        }
        m.entry(addr.to_string())
            .or_insert_with(|| {
                Arc::new(AddrSlots {
                    next: AtomicUsize::new(0),
                    slots: (0..self.cfg.conns_per_addr.max(1))
                        .map(|_| tokio::sync::Mutex::new(Slot::default()))
                        .collect(),
                })
            })
            .clone()
    }

    /// A live connection to `addr`: the next one round-robin, reconnected if it broke. After a
    /// failed connect the slot refuses at once (`Connect`) until its backoff has passed.
    pub async fn get(&self, addr: &str) -> Result<Client> {
        let a = self.slots(addr);
        let i = a.next.fetch_add(1, Ordering::Relaxed) % a.slots.len();
        let mut slot = a.slots[i].lock().await;
        if let Some(c) = &slot.client {
            if c.is_alive() {
                return Ok(c.clone());
            }
            tracing::info!(addr, "data-path connection lost: reconnecting");
            slot.client = None;
        }
        if let Some(at) = slot.retry_at {
            if Instant::now() < at {
                // The daemon may be back (a restart) while this slot still waits: a sibling
                // that reconnected since serves instead of failing the request.
                if let Some(c) = a.live_sibling(i) {
                    return Ok(c);
                }
                return Err(Error::Connect {
                    addr: addr.to_string(),
                    source: std::io::Error::other(format!(
                        "backing off after {} failed connects",
                        slot.failures
                    )),
                });
            }
        }
        match Client::connect(addr, &self.cfg).await {
            Ok(c) => {
                *slot = Slot {
                    client: Some(c.clone()),
                    failures: 0,
                    retry_at: None,
                };
                Ok(c)
            }
            Err(e) => {
                slot.failures = slot.failures.saturating_add(1);
                let exp = slot.failures.saturating_sub(1).min(16);
                let wait = self
                    .cfg
                    .backoff_min
                    .saturating_mul(1 << exp)
                    .min(self.cfg.backoff_max);
                slot.retry_at = Some(Instant::now() + wait);
                Err(e)
            }
        }
    }

    /// A streaming copy on a connection of its own, so a rebuild never holds up the pool's
    /// connections (the connection closes when the stream is dropped).
    pub async fn copy(
        &self,
        addr: &str,
        id: ChunkId,
        since: u64,
        epoch: u64,
    ) -> Result<CopyStream> {
        Client::connect(addr, &self.cfg)
            .await?
            .copy(id, since, epoch)
            .await
    }
}
