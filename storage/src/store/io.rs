//! Submission of a data directory's disk I/O: one io_uring, or plain syscalls where io_uring
//! is unavailable (chosen at start and logged).
//!
//! The engine thread pushes [`IoReq`]s tagged with a token and later reaps `(token, result)`
//! pairs; everything pushed in one round of the engine loop goes to the kernel in one
//! `io_uring_enter`. The engine keeps every buffer alive until its token completes. In
//! blocking mode a push runs the syscall at once and queues its completion, so the engine's
//! state machine is the same either way.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use io_uring::{opcode, types, IoUring};

/// Token of the armed eventfd read that wakes a sleeping ring.
pub const WAKE: u64 = u64::MAX;

/// One disk operation. Pointers stay valid until the token's completion is reaped.
#[derive(Clone, Copy, Debug)]
pub enum IoReq {
    Read {
        fd: RawFd,
        ptr: *mut u8,
        len: u32,
        offset: u64,
    },
    Write {
        fd: RawFd,
        ptr: *const u8,
        len: u32,
        offset: u64,
        dsync: bool,
    },
    Fdatasync {
        fd: RawFd,
    },
    /// `fallocate`: punch a hole (`punch`) or zero the range keeping its allocation.
    Zero {
        fd: RawFd,
        offset: u64,
        len: u64,
        punch: bool,
    },
}

/// Wakes the engine thread when it sleeps in the ring.
pub struct Bell {
    efd: OwnedFd,
    pub asleep: AtomicBool,
}

impl Bell {
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd returns a new fd or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd nothing else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Self {
            efd,
            asleep: AtomicBool::new(false),
        })
    }

    /// Called by senders after queuing a request.
    pub fn ring(&self) {
        if self.asleep.swap(false, Ordering::SeqCst) {
            self.ring_always();
        }
    }

    pub fn ring_always(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd; a failure only delays a wake-up.
        unsafe { libc::write(self.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

pub enum Io {
    Ring {
        ring: Box<IoUring>,
        bell_buf: &'static mut [u8; 8],
        efd: RawFd,
        armed: bool,
    },
    Blocking {
        done: VecDeque<(u64, i32)>,
    },
}

impl Io {
    /// io_uring if the kernel gives us one, else the blocking fallback.
    pub fn new(want_ring: bool, bell: &Bell) -> (Self, &'static str) {
        if want_ring {
            match IoUring::builder().setup_cqsize(1024).build(256) {
                Ok(ring) => {
                    // Leaked (8 bytes per directory) so the kernel can never write into freed
                    // memory whatever the teardown order.
                    let bell_buf = Box::leak(Box::new([0u8; 8]));
                    let io = Io::Ring {
                        ring: Box::new(ring),
                        bell_buf,
                        efd: bell.efd.as_raw_fd(),
                        armed: false,
                    };
                    return (io, "io_uring");
                }
                Err(e) => tracing::warn!("io_uring unavailable ({e}); using pread/pwrite"),
            }
        }
        (
            Io::Blocking {
                done: VecDeque::new(),
            },
            "pread/pwrite",
        )
    }

    pub fn is_ring(&self) -> bool {
        matches!(self, Io::Ring { .. })
    }

    /// Queues (ring) or performs (blocking) one operation.
    pub fn push(&mut self, token: u64, req: IoReq) -> io::Result<()> {
        match self {
            Io::Ring { ring, .. } => {
                let e = sqe(req).user_data(token);
                loop {
                    // SAFETY: the caller keeps every buffer `req` points into alive until this
                    // token completes.
                    if unsafe { ring.submission().push(&e) }.is_ok() {
                        return Ok(());
                    }
                    ring.submit()?;
                }
            }
            Io::Blocking { done } => {
                done.push_back((token, run_blocking(req)));
                Ok(())
            }
        }
    }

    /// Submits what was pushed; waits for at least one completion when `wait`.
    pub fn submit(&mut self, wait: bool) -> io::Result<()> {
        match self {
            Io::Ring {
                ring,
                bell_buf,
                efd,
                armed,
            } => {
                if !*armed {
                    let e = opcode::Read::new(types::Fd(*efd), bell_buf.as_mut_ptr(), 8)
                        .build()
                        .user_data(WAKE);
                    // SAFETY: bell_buf is leaked, so valid for the ring's lifetime.
                    while unsafe { ring.submission().push(&e) }.is_err() {
                        ring.submit()?;
                    }
                    *armed = true;
                }
                let r = if wait {
                    ring.submit_and_wait(1)
                } else {
                    ring.submit()
                };
                match r {
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
                    Err(e) => Err(e),
                    Ok(_) => Ok(()),
                }
            }
            Io::Blocking { .. } => Ok(()),
        }
    }

    /// Moves finished operations to `out` (the wake-up token is consumed here).
    pub fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        match self {
            Io::Ring { ring, armed, .. } => {
                for c in ring.completion() {
                    if c.user_data() == WAKE {
                        *armed = false;
                    } else {
                        out.push((c.user_data(), c.result()));
                    }
                }
            }
            Io::Blocking { done } => out.extend(done.drain(..)),
        }
    }

    /// Completions are waiting to be reaped without blocking.
    pub fn has_ready(&self) -> bool {
        match self {
            Io::Ring { .. } => false,
            Io::Blocking { done } => !done.is_empty(),
        }
    }
}

fn sqe(req: IoReq) -> io_uring::squeue::Entry {
    match req {
        IoReq::Read {
            fd,
            ptr,
            len,
            offset,
        } => opcode::Read::new(types::Fd(fd), ptr, len)
            .offset(offset)
            .build(),
        IoReq::Write {
            fd,
            ptr,
            len,
            offset,
            dsync,
        } => {
            let flags = if dsync { libc::RWF_DSYNC } else { 0 };
            opcode::Write::new(types::Fd(fd), ptr, len)
                .offset(offset)
                .rw_flags(flags)
                .build()
        }
        IoReq::Fdatasync { fd } => opcode::Fsync::new(types::Fd(fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        IoReq::Zero {
            fd,
            offset,
            len,
            punch,
        } => opcode::Fallocate::new(types::Fd(fd), len)
            .offset(offset)
            .mode(fallocate_mode(punch))
            .build(),
    }
}

fn fallocate_mode(punch: bool) -> i32 {
    if punch {
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
    } else {
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
    }
}

/// Runs `req` now; returns what io_uring would: bytes transferred or `-errno`.
pub fn run_blocking(req: IoReq) -> i32 {
    // SAFETY (all arms): the caller guarantees the pointers are valid for `len` bytes.
    let r: i64 = unsafe {
        match req {
            IoReq::Read {
                fd,
                ptr,
                len,
                offset,
            } => libc::pread(fd, ptr.cast(), len as usize, offset as libc::off_t) as i64,
            IoReq::Write {
                fd,
                ptr,
                len,
                offset,
                dsync,
            } => {
                let iov = libc::iovec {
                    iov_base: ptr as *mut libc::c_void,
                    iov_len: len as usize,
                };
                let flags = if dsync { libc::RWF_DSYNC } else { 0 };
                libc::pwritev2(fd, &iov, 1, offset as libc::off_t, flags) as i64
            }
            IoReq::Fdatasync { fd } => libc::fdatasync(fd) as i64,
            IoReq::Zero {
                fd,
                offset,
                len,
                punch,
            } => libc::fallocate(
                fd,
                fallocate_mode(punch),
                offset as libc::off_t,
                len as libc::off_t,
            ) as i64,
        }
    };
    if r < 0 {
        -io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        r as i32
    }
}
