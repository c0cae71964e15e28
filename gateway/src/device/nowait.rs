//! Non-blocking fast paths: `preadv2`/`pwritev2` with `RWF_NOWAIT` complete inline when the
//! page cache can serve them and fail with EAGAIN instead of blocking otherwise. A tokio task
//! may call them without stalling its worker, and a hit costs no thread hand-off at all.
//!
//! Filesystems that cannot do non-blocking buffered writes (ext4 as of Linux 6.18) answer
//! every such write with EAGAIN; [`Writes`] notices and stops trying for that device.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};

/// After this many EAGAINs in a row without a success, writes stop trying RWF_NOWAIT.
const GIVE_UP_AFTER: u32 = 64;

/// Reads all of `buf` at `offset` if the page cache holds it; `false` means "use the slow path".
pub fn read(file: &File, buf: &mut [u8], offset: u64) -> bool {
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: one iovec over a live, writable buffer; RWF_NOWAIT never blocks.
    let n = unsafe {
        libc::preadv2(
            file.as_raw_fd(),
            &iov,
            1,
            offset as libc::off_t,
            libc::RWF_NOWAIT,
        )
    };
    n >= 0 && n as usize == buf.len()
}

/// Per-device state of the non-blocking write path.
#[derive(Default)]
pub struct Writes {
    misses: AtomicU32,
}

impl Writes {
    /// Writes all of `data` at `offset` without blocking if the filesystem allows; `false`
    /// means nothing or only part was written and the caller must write it all the slow way.
    pub fn try_write(&self, file: &File, data: &[u8], offset: u64) -> bool {
        if self.misses.load(Ordering::Relaxed) >= GIVE_UP_AFTER {
            return false;
        }
        let iov = libc::iovec {
            iov_base: data.as_ptr() as *mut _,
            iov_len: data.len(),
        };
        // SAFETY: one iovec over a live buffer the kernel only reads; RWF_NOWAIT never blocks.
        let n = unsafe {
            libc::pwritev2(
                file.as_raw_fd(),
                &iov,
                1,
                offset as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if n >= 0 && n as usize == data.len() {
            self.misses.store(0, Ordering::Relaxed);
            return true;
        }
        // A partial write is harmless: the slow path rewrites the same bytes.
        self.misses.fetch_add(1, Ordering::Relaxed);
        false
    }
}
