//! An io_uring engine for file-backed volumes: one ring and one thread per open file.
//!
//! Callers on tokio tasks queue an [`Op`] on a channel and await a oneshot; the ring thread
//! pushes every queued op as an SQE, submits them in one `io_uring_enter`, reaps completions
//! and answers. An eventfd read is always armed in the ring, and callers write that eventfd
//! only when the thread has announced it is about to sleep, so a busy ring costs its callers
//! no syscall. Buffers (a `BytesMut` for reads, the caller's `Bytes` for writes) are owned by
//! the in-flight table until their completion arrives, which is what makes the raw pointers
//! handed to the kernel valid. With nothing in flight the thread sleeps on the channel
//! instead, which callers wake without any syscall of their own beyond the futex.
//!
//! Buffered writes are the exception: where the filesystem cannot do them without blocking
//! (ext4 refuses `RWF_NOWAIT` buffered writes), io_uring punts each one to an io-wq worker
//! and serialises them per inode anyway, costing an extra thread hop per write. So the ring
//! thread `pwrite`s itself, which is the same serialisation without the hop; reads and
//! fdatasync stay asynchronous in the ring.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::{Bytes, BytesMut};
use io_uring::{opcode, types, IoUring};
use tokio::sync::oneshot;

/// `user_data` of the eventfd read; op slots use their index.
const WAKE: u64 = u64::MAX;

enum Kind {
    Read { buf: BytesMut, done: usize },
    Write { data: Bytes, done: usize },
    Fdatasync,
}

struct Op {
    kind: Kind,
    offset: u64,
    reply: oneshot::Sender<io::Result<Bytes>>,
}

struct Wake {
    efd: OwnedFd,
    asleep: AtomicBool,
}

impl Wake {
    fn ring_bell(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to an eventfd we own. A failure (counter
        // overflow, impossible in practice) only delays the ring thread until the next op.
        unsafe { libc::write(self.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

/// Handle to one ring thread.
pub struct Ring {
    tx: Option<Sender<Op>>,
    wake: Arc<Wake>,
    thread: Option<JoinHandle<()>>,
}

impl Ring {
    /// Sets up a ring for `file`. Fails where io_uring is unavailable (old kernels, seccomp).
    pub fn new(file: Arc<File>, entries: u32) -> io::Result<Self> {
        let ring = IoUring::new(entries)?;
        // SAFETY: eventfd returns a new fd or -1; a valid one is owned by the OwnedFd.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh, valid fd that nothing else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(raw) };
        let wake = Arc::new(Wake {
            efd,
            asleep: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel();
        let w = wake.clone();
        let thread = std::thread::Builder::new()
            .name("ironsan-uring".into())
            .spawn(move || run(ring, file, rx, w))?;
        Ok(Self {
            tx: Some(tx),
            wake,
            thread: Some(thread),
        })
    }

    async fn submit(&self, kind: Kind, offset: u64) -> io::Result<Bytes> {
        let (reply, rx) = oneshot::channel();
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| io::Error::other("ring closed"))?;
        tx.send(Op {
            kind,
            offset,
            reply,
        })
        .map_err(|_| io::Error::other("ring thread gone"))?;
        if self.wake.asleep.swap(false, Ordering::SeqCst) {
            self.wake.ring_bell();
        }
        rx.await
            .map_err(|_| io::Error::other("ring thread dropped an op"))?
    }

    pub async fn read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        self.submit(
            Kind::Read {
                buf: BytesMut::zeroed(len),
                done: 0,
            },
            offset,
        )
        .await
    }

    pub async fn write(&self, offset: u64, data: Bytes) -> io::Result<()> {
        self.submit(Kind::Write { data, done: 0 }, offset)
            .await
            .map(|_| ())
    }

    pub async fn fdatasync(&self) -> io::Result<()> {
        self.submit(Kind::Fdatasync, 0).await.map(|_| ())
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Closing the channel and ringing the bell lets the thread finish in-flight ops and exit.
        self.tx = None;
        self.wake.ring_bell();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// In-flight ops by slot; a slot's index is its SQE's `user_data`.
#[derive(Default)]
struct Slots {
    ops: Vec<Option<Op>>,
    free: Vec<usize>,
    live: usize,
}

impl Slots {
    fn insert(&mut self, op: Op) -> usize {
        self.live += 1;
        match self.free.pop() {
            Some(i) => {
                self.ops[i] = Some(op);
                i
            }
            None => {
                self.ops.push(Some(op));
                self.ops.len() - 1
            }
        }
    }

    fn take(&mut self, i: usize) -> Option<Op> {
        let op = self.ops.get_mut(i)?.take()?;
        self.free.push(i);
        self.live -= 1;
        Some(op)
    }
}

fn sqe_for(fd: RawFd, slot: usize, op: &mut Op) -> io_uring::squeue::Entry {
    let fd = types::Fd(fd);
    let entry = match &mut op.kind {
        Kind::Read { buf, done } => {
            let rest = &mut buf[*done..];
            opcode::Read::new(fd, rest.as_mut_ptr(), rest.len() as u32)
                .offset(op.offset + *done as u64)
                .build()
        }
        Kind::Write { data, done } => {
            let rest = &data[*done..];
            opcode::Write::new(fd, rest.as_ptr(), rest.len() as u32)
                .offset(op.offset + *done as u64)
                .build()
        }
        Kind::Fdatasync => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
    };
    entry.user_data(slot as u64)
}

fn push(ring: &mut IoUring, entry: &io_uring::squeue::Entry) -> io::Result<()> {
    loop {
        // SAFETY: every pointer in `entry` points into a buffer owned by the in-flight table (or
        // the thread's eventfd buffer), which outlives the SQE's completion.
        if unsafe { ring.submission().push(entry) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
}

fn run(ring: IoUring, file: Arc<File>, rx: Receiver<Op>, wake: Arc<Wake>) {
    // The armed eventfd read writes here until the ring is gone; leaked (8 bytes per volume) so
    // that no teardown order can let the kernel write into freed memory.
    let bell: &'static mut [u8; 8] = Box::leak(Box::new([0u8; 8]));
    let mut ring = ring;
    let fd = file.as_raw_fd();
    let efd = wake.efd.as_raw_fd();
    let mut slots = Slots::default();
    let mut cqes: Vec<(u64, i32)> = Vec::with_capacity(64);
    let arm = |ring: &mut IoUring, bell: &mut [u8; 8]| {
        let e = opcode::Read::new(types::Fd(efd), bell.as_mut_ptr(), 8)
            .build()
            .user_data(WAKE);
        push(ring, &e)
    };
    if let Err(e) = arm(&mut ring, bell) {
        tracing::error!("io_uring: cannot arm the wake-up read: {e}");
        return;
    }
    let mut closed = false;
    loop {
        // Queue everything callers sent since the last round.
        loop {
            match rx.try_recv() {
                Ok(op) => enqueue(&mut ring, fd, &mut slots, op),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if closed && slots.live == 0 {
            return;
        }
        if slots.live == 0 {
            // Nothing in the kernel: sleep on the channel itself, a plain futex wake-up that is
            // cheaper than the eventfd's trip through io_uring (what QD1 latency is made of).
            match rx.recv() {
                Ok(op) => enqueue(&mut ring, fd, &mut slots, op),
                Err(_) => return,
            }
            continue;
        }
        wake.asleep.store(true, Ordering::SeqCst);
        // An op sent just before `asleep` was set found it false and rang no bell.
        let waited = match rx.try_recv() {
            Ok(op) => {
                wake.asleep.store(false, Ordering::SeqCst);
                enqueue(&mut ring, fd, &mut slots, op);
                ring.submit()
            }
            Err(TryRecvError::Disconnected) if slots.live == 0 => return,
            Err(_) => ring.submit_and_wait(1),
        };
        wake.asleep.store(false, Ordering::SeqCst);
        if let Err(e) = waited {
            if e.raw_os_error() != Some(libc::EINTR) {
                tracing::error!("io_uring_enter failed: {e}");
                fail_all(&mut slots, &e);
                return;
            }
        }
        cqes.clear();
        cqes.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        for &(ud, res) in &cqes {
            if ud == WAKE {
                if let Err(e) = arm(&mut ring, bell) {
                    tracing::error!("io_uring: cannot re-arm the wake-up read: {e}");
                    fail_all(&mut slots, &e);
                    return;
                }
                continue;
            }
            let Some(op) = slots.take(ud as usize) else {
                continue;
            };
            complete(&mut ring, fd, &mut slots, op, res);
        }
    }
}

fn enqueue(ring: &mut IoUring, fd: RawFd, slots: &mut Slots, op: Op) {
    if let Kind::Write { data, done } = &op.kind {
        let result = write_all_at(fd, &data[*done..], op.offset + *done as u64);
        let _ = op.reply.send(result.map(|()| Bytes::new()));
        return;
    }
    let slot = slots.insert(op);
    let Some(Some(op)) = slots.ops.get_mut(slot) else {
        return;
    };
    let entry = sqe_for(fd, slot, op);
    if let Err(e) = push(ring, &entry) {
        if let Some(op) = slots.take(slot) {
            let _ = op.reply.send(Err(e));
        }
    }
}

fn write_all_at(fd: RawFd, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: pwrite from a live slice to the volume's fd, which the thread keeps open.
        let n = unsafe { libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), offset as libc::off_t) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n as usize..];
        offset += n as u64;
    }
    Ok(())
}

/// Handles one completion: finished, resubmitted for the rest (short transfer), or failed.
fn complete(ring: &mut IoUring, fd: RawFd, slots: &mut Slots, mut op: Op, res: i32) {
    if res == -libc::EINTR || res == -libc::EAGAIN {
        return enqueue(ring, fd, slots, op);
    }
    if res < 0 {
        let _ = op.reply.send(Err(io::Error::from_raw_os_error(-res)));
        return;
    }
    let n = res as usize;
    let finished = match &mut op.kind {
        Kind::Read { buf, done } => {
            *done += n;
            // End of file: the rest stays zero (the buffer was zeroed), as a sparse tail reads.
            n == 0 || *done == buf.len()
        }
        Kind::Write { data, done } => {
            if n == 0 {
                let _ = op.reply.send(Err(io::ErrorKind::WriteZero.into()));
                return;
            }
            *done += n;
            *done == data.len()
        }
        Kind::Fdatasync => true,
    };
    if !finished {
        return enqueue(ring, fd, slots, op);
    }
    let out = match op.kind {
        Kind::Read { buf, .. } => buf.freeze(),
        _ => Bytes::new(),
    };
    let _ = op.reply.send(Ok(out));
}

/// The ring is unusable: fail every in-flight op. Their buffers are leaked, not freed, because
/// the kernel may still complete the SQEs that point into them.
fn fail_all(slots: &mut Slots, e: &io::Error) {
    for i in 0..slots.ops.len() {
        if let Some(op) = slots.take(i) {
            let _ = op.reply.send(Err(io::Error::new(e.kind(), e.to_string())));
            std::mem::forget(op.kind);
        }
    }
}
