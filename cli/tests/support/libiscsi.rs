//! A minimal safe wrapper over libiscsi's synchronous C API: the real iSCSI initiator the
//! fault-injection suite drives from many threads (one [`Session`] per thread).
//!
//! Needs libiscsi's headers and shared library:  `apt-get install -y libiscsi-dev`
//! (`scripts/install-test-deps.sh` installs it). The `#[link(name = "iscsi")]` below makes a
//! missing library a link error, never a silently skipped test.
//!
//! What it relies on, and why:
//! - Only the first field of `struct scsi_task` (`int status`) is read directly; sense data
//!   comes through `scsi_task_get_status`, data in through caller-owned iovecs
//!   (`iscsi_read16_iov_sync`, `scsi_task_set_iov_in`), so no other part of the task's layout
//!   matters.
//! - Automatic reconnection is switched off: a dropped connection fails the command in flight
//!   (`CANCELLED`) instead of libiscsi silently logging in again and replaying it, so the caller
//!   knows exactly which writes are in doubt. The caller reconnects with a new [`Session`].
//! - Every session of one worker uses the same initiator name and ISID, so a reconnect to the
//!   same gateway is a session *reinstatement* (RFC 7143 §6.3.5): the target finishes or aborts
//!   the old session's commands before the new one runs, and an in-doubt write cannot land
//!   after a later one.
//! - A per-PDU timeout (`iscsi_set_timeout`) bounds every command and the login, so no call
//!   waits forever on a target that stopped answering.
#![allow(dead_code)]

use std::ffi::{CStr, CString};
use std::fmt;
use std::os::raw::{c_char, c_int, c_void};
use std::ptr::NonNull;
use std::time::Duration;

/// Bytes per logical block the target reports (DESIGN.md: 512).
pub const LOGICAL_BLOCK: u32 = 512;

#[repr(C)]
struct IscsiContext {
    _opaque: [u8; 0],
}

/// `struct scsi_task`: only `status` (its first field) is ever read here.
#[repr(C)]
struct ScsiTask {
    status: c_int,
}

#[repr(C)]
struct ScsiIovec {
    iov_base: *mut c_void,
    iov_len: usize,
}

/// `struct scsi_sense`: the three leading fields, then room to spare for the bit fields that
/// follow in C (16 bytes in all on x86-64 and aarch64), which are never read.
#[repr(C)]
struct ScsiSense {
    error_type: u8,
    key: c_int,
    ascq: c_int,
    _rest: [u8; 32],
}

const ISCSI_SESSION_NORMAL: c_int = 2;
const ISCSI_HEADER_DIGEST_NONE: c_int = 0;
const ISCSI_HEADER_DIGEST_CRC32C: c_int = 3;

const SCSI_STATUS_GOOD: c_int = 0;
const SCSI_STATUS_CHECK_CONDITION: c_int = 2;
const SCSI_STATUS_CANCELLED: c_int = 0x0f00_0000;
const SCSI_STATUS_ERROR: c_int = 0x0f00_0001;
const SCSI_STATUS_TIMEOUT: c_int = 0x0f00_0002;

#[link(name = "iscsi")]
extern "C" {
    fn iscsi_create_context(initiator_name: *const c_char) -> *mut IscsiContext;
    fn iscsi_destroy_context(iscsi: *mut IscsiContext) -> c_int;
    fn iscsi_get_error(iscsi: *mut IscsiContext) -> *const c_char;
    fn iscsi_set_targetname(iscsi: *mut IscsiContext, name: *const c_char) -> c_int;
    fn iscsi_set_session_type(iscsi: *mut IscsiContext, session_type: c_int) -> c_int;
    fn iscsi_set_header_digest(iscsi: *mut IscsiContext, digest: c_int) -> c_int;
    fn iscsi_set_timeout(iscsi: *mut IscsiContext, timeout: c_int) -> c_int;
    fn iscsi_set_noautoreconnect(iscsi: *mut IscsiContext, state: c_int);
    fn iscsi_set_isid_random(iscsi: *mut IscsiContext, rnd: u32, qualifier: u32) -> c_int;
    fn iscsi_set_tcp_user_timeout(iscsi: *mut IscsiContext, timeout_ms: c_int);
    fn iscsi_full_connect_sync(
        iscsi: *mut IscsiContext,
        portal: *const c_char,
        lun: c_int,
    ) -> c_int;
    fn iscsi_logout_sync(iscsi: *mut IscsiContext) -> c_int;
    fn iscsi_write16_sync(
        iscsi: *mut IscsiContext,
        lun: c_int,
        lba: u64,
        data: *mut u8,
        datalen: u32,
        blocksize: c_int,
        wrprotect: c_int,
        dpo: c_int,
        fua: c_int,
        fua_nv: c_int,
        group_number: c_int,
    ) -> *mut ScsiTask;
    fn iscsi_read16_iov_sync(
        iscsi: *mut IscsiContext,
        lun: c_int,
        lba: u64,
        datalen: u32,
        blocksize: c_int,
        rdprotect: c_int,
        dpo: c_int,
        fua: c_int,
        fua_nv: c_int,
        group_number: c_int,
        iov: *mut ScsiIovec,
        niov: c_int,
    ) -> *mut ScsiTask;
    fn iscsi_synchronizecache10_sync(
        iscsi: *mut IscsiContext,
        lun: c_int,
        lba: c_int,
        num_blocks: c_int,
        syncnv: c_int,
        immed: c_int,
    ) -> *mut ScsiTask;
    fn iscsi_scsi_command_sync(
        iscsi: *mut IscsiContext,
        lun: c_int,
        task: *mut ScsiTask,
        data: *mut c_void,
    ) -> *mut ScsiTask;
    fn scsi_cdb_readcapacity16() -> *mut ScsiTask;
    fn scsi_cdb_modesense6(
        dbd: c_int,
        pc: c_int,
        page_code: c_int,
        sub_page_code: c_int,
        alloc_len: u8,
    ) -> *mut ScsiTask;
    fn scsi_task_set_iov_in(task: *mut ScsiTask, iov: *mut ScsiIovec, niov: c_int);
    fn scsi_task_get_status(task: *mut ScsiTask, sense: *mut ScsiSense) -> c_int;
    fn scsi_free_scsi_task(task: *mut ScsiTask);
}

/// Sense data of a CHECK CONDITION.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sense {
    /// Sense key (SPC-4 table 48): 2 NOT READY, 3 MEDIUM ERROR, 4 HARDWARE ERROR,
    /// 5 ILLEGAL REQUEST, 6 UNIT ATTENTION, 0xb ABORTED COMMAND.
    pub key: u8,
    /// ASC in the high byte, ASCQ in the low byte.
    pub asc_ascq: u16,
}

impl Sense {
    pub const NOT_READY: u8 = 0x02;
    pub const MEDIUM_ERROR: u8 = 0x03;
    pub const HARDWARE_ERROR: u8 = 0x04;
    pub const ILLEGAL_REQUEST: u8 = 0x05;
    pub const UNIT_ATTENTION: u8 = 0x06;
    pub const DATA_PROTECT: u8 = 0x07;
    pub const ABORTED_COMMAND: u8 = 0x0b;
}

impl fmt::Display for Sense {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.key {
            0x00 => "NO SENSE",
            0x01 => "RECOVERED ERROR",
            Self::NOT_READY => "NOT READY",
            Self::MEDIUM_ERROR => "MEDIUM ERROR",
            Self::HARDWARE_ERROR => "HARDWARE ERROR",
            Self::ILLEGAL_REQUEST => "ILLEGAL REQUEST",
            Self::UNIT_ATTENTION => "UNIT ATTENTION",
            Self::DATA_PROTECT => "DATA PROTECT",
            Self::ABORTED_COMMAND => "ABORTED COMMAND",
            _ => "other",
        };
        write!(
            f,
            "{name} (key {:#x}, ASC/ASCQ {:#06x})",
            self.key, self.asc_ascq
        )
    }
}

/// Why an iSCSI operation failed.
#[derive(Clone, Debug)]
pub enum IscsiError {
    /// Bad argument (e.g. a portal with a NUL byte, a buffer not a whole number of blocks).
    Invalid(String),
    /// libiscsi could not allocate a context.
    Context,
    /// TCP connect, login or the LUN check (TEST UNIT READY) failed.
    Connect { portal: String, message: String },
    /// The target answered CHECK CONDITION.
    CheckCondition {
        op: &'static str,
        sense: Sense,
        message: String,
    },
    /// The command outlived the session timeout.
    Timeout { op: &'static str, message: String },
    /// The connection broke (or could not send) while the command was outstanding.
    Connection { op: &'static str, message: String },
    /// Any other SCSI status (BUSY, TASK SET FULL, RESERVATION CONFLICT, ...).
    Status {
        op: &'static str,
        status: i32,
        message: String,
    },
    /// A command succeeded but its data made no sense.
    BadData { op: &'static str, message: String },
}

impl IscsiError {
    /// The session is unusable after this error and must be replaced.
    pub fn breaks_session(&self) -> bool {
        matches!(
            self,
            IscsiError::Connect { .. } | IscsiError::Timeout { .. } | IscsiError::Connection { .. }
        )
    }

    /// The sense key of a CHECK CONDITION.
    pub fn sense_key(&self) -> Option<u8> {
        match self {
            IscsiError::CheckCondition { sense, .. } => Some(sense.key),
            _ => None,
        }
    }

    /// A short label for counting errors by kind.
    pub fn kind(&self) -> String {
        match self {
            IscsiError::Invalid(_) => "invalid".into(),
            IscsiError::Context => "context".into(),
            IscsiError::Connect { .. } => "connect".into(),
            IscsiError::CheckCondition { sense, .. } => {
                format!("check-condition/{:#x}", sense.key)
            }
            IscsiError::Timeout { .. } => "timeout".into(),
            IscsiError::Connection { .. } => "connection".into(),
            IscsiError::Status { status, .. } => format!("status/{status:#x}"),
            IscsiError::BadData { .. } => "bad-data".into(),
        }
    }
}

impl fmt::Display for IscsiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IscsiError::Invalid(m) => write!(f, "invalid argument: {m}"),
            IscsiError::Context => write!(f, "libiscsi could not create a context"),
            IscsiError::Connect { portal, message } => {
                write!(f, "connect/login to {portal} failed: {message}")
            }
            IscsiError::CheckCondition { op, sense, message } => {
                write!(f, "{op}: CHECK CONDITION, {sense} ({message})")
            }
            IscsiError::Timeout { op, message } => write!(f, "{op}: timed out ({message})"),
            IscsiError::Connection { op, message } => {
                write!(f, "{op}: connection failed ({message})")
            }
            IscsiError::Status {
                op,
                status,
                message,
            } => write!(f, "{op}: SCSI status {status:#x} ({message})"),
            IscsiError::BadData { op, message } => write!(f, "{op}: {message}"),
        }
    }
}

impl std::error::Error for IscsiError {}

/// How to open a [`Session`].
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Initiator IQN; unique per worker (with `isid`), so sessions never collide.
    pub initiator: String,
    /// Qualifier of the ISID (the same value on every reconnect: reinstatement).
    pub isid: u32,
    pub target: String,
    pub lun: u32,
    /// CRC32C header digests (else none).
    pub header_digest: bool,
    /// Bound on login and on every command (libiscsi counts whole seconds, at least 1).
    pub timeout: Duration,
}

impl SessionConfig {
    pub fn new(initiator: &str, target: &str) -> SessionConfig {
        SessionConfig {
            initiator: initiator.to_string(),
            isid: 1,
            target: target.to_string(),
            lun: 0,
            header_digest: false,
            timeout: Duration::from_secs(10),
        }
    }
}

/// One logged-in iSCSI session to one LUN. Not shareable between threads (libiscsi contexts
/// are single-threaded); move it to the thread that uses it.
pub struct Session {
    ctx: NonNull<IscsiContext>,
    lun: c_int,
    portal: String,
}

// SAFETY: a libiscsi context has no thread affinity; it must only never be used by two
// threads at once, which `&mut self` on every operation guarantees (Session is not Sync).
unsafe impl Send for Session {}

/// Frees a task returned by a `*_sync` call, however the function returns.
struct Task(*mut ScsiTask);

impl Drop for Task {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the pointer came from libiscsi, is freed exactly once, and the command it
            // belongs to has completed (the sync call returned).
            unsafe { scsi_free_scsi_task(self.0) };
        }
    }
}

impl Session {
    /// Creates a context, logs in to `portal` (`HOST:PORT`) and checks the LUN is ready.
    pub fn connect(portal: &str, cfg: &SessionConfig) -> Result<Session, IscsiError> {
        let cstr = |s: &str, what: &str| {
            CString::new(s).map_err(|_| IscsiError::Invalid(format!("{what} {s:?} has a NUL")))
        };
        let initiator = cstr(&cfg.initiator, "initiator name")?;
        let target = cstr(&cfg.target, "target name")?;
        let portal_c = cstr(portal, "portal")?;
        let lun = c_int::try_from(cfg.lun)
            .map_err(|_| IscsiError::Invalid(format!("LUN {} out of range", cfg.lun)))?;
        let timeout = cfg.timeout.as_secs().clamp(1, 3600) as c_int;

        // SAFETY: a valid NUL-terminated string; NULL is checked below.
        let raw = unsafe { iscsi_create_context(initiator.as_ptr()) };
        let ctx = NonNull::new(raw).ok_or(IscsiError::Context)?;
        // From here `session` owns the context; dropping it destroys the context.
        let session = Session {
            ctx,
            lun,
            portal: portal.to_string(),
        };
        let p = session.ctx.as_ptr();
        let digest = if cfg.header_digest {
            ISCSI_HEADER_DIGEST_CRC32C
        } else {
            ISCSI_HEADER_DIGEST_NONE
        };
        // SAFETY: `p` is a live context not yet connected; the strings outlive the calls
        // (libiscsi copies them).
        let setup = unsafe {
            iscsi_set_noautoreconnect(p, 1);
            iscsi_set_tcp_user_timeout(p, timeout * 1000);
            [
                iscsi_set_targetname(p, target.as_ptr()),
                iscsi_set_session_type(p, ISCSI_SESSION_NORMAL),
                iscsi_set_header_digest(p, digest),
                iscsi_set_timeout(p, timeout),
                iscsi_set_isid_random(p, cfg.isid, 0),
            ]
        };
        if setup.iter().any(|&rc| rc != 0) {
            return Err(IscsiError::Connect {
                portal: portal.to_string(),
                message: format!("context setup: {}", session.error_text()),
            });
        }
        // SAFETY: as above; the call blocks until login and TEST UNIT READY finish or fail.
        let rc = unsafe { iscsi_full_connect_sync(p, portal_c.as_ptr(), lun) };
        if rc != 0 {
            return Err(IscsiError::Connect {
                portal: portal.to_string(),
                message: session.error_text(),
            });
        }
        Ok(session)
    }

    pub fn portal(&self) -> &str {
        &self.portal
    }

    fn error_text(&self) -> String {
        // SAFETY: the context is live; the returned string is owned by it and copied at once.
        let p = unsafe { iscsi_get_error(self.ctx.as_ptr()) };
        if p.is_null() {
            return String::new();
        }
        // SAFETY: libiscsi returns a NUL-terminated string.
        unsafe { CStr::from_ptr(p) }
            .to_string_lossy()
            .trim()
            .to_string()
    }

    /// Turns a finished task into Ok or the matching error.
    fn check(&self, op: &'static str, task: &Task) -> Result<(), IscsiError> {
        if task.0.is_null() {
            // The command could not even be queued: not logged in any more.
            return Err(IscsiError::Connection {
                op,
                message: self.error_text(),
            });
        }
        // SAFETY: a non-null task from a completed sync call; `status` is its first field.
        let status = unsafe { (*task.0).status };
        match status {
            SCSI_STATUS_GOOD => Ok(()),
            SCSI_STATUS_CHECK_CONDITION => {
                let mut sense = ScsiSense {
                    error_type: 0,
                    key: 0,
                    ascq: 0,
                    _rest: [0; 32],
                };
                // SAFETY: `sense` is larger than C's `struct scsi_sense`; the task is live.
                unsafe { scsi_task_get_status(task.0, &mut sense) };
                Err(IscsiError::CheckCondition {
                    op,
                    sense: Sense {
                        key: (sense.key & 0x0f) as u8,
                        asc_ascq: (sense.ascq & 0xffff) as u16,
                    },
                    message: self.error_text(),
                })
            }
            SCSI_STATUS_TIMEOUT => Err(IscsiError::Timeout {
                op,
                message: self.error_text(),
            }),
            SCSI_STATUS_CANCELLED | SCSI_STATUS_ERROR => Err(IscsiError::Connection {
                op,
                message: self.error_text(),
            }),
            other => Err(IscsiError::Status {
                op,
                status: other,
                message: self.error_text(),
            }),
        }
    }

    fn blocks(op: &'static str, len: usize) -> Result<u32, IscsiError> {
        if len == 0 || !len.is_multiple_of(LOGICAL_BLOCK as usize) {
            return Err(IscsiError::Invalid(format!(
                "{op}: {len} bytes is not a whole number of {LOGICAL_BLOCK}-byte blocks"
            )));
        }
        u32::try_from(len).map_err(|_| IscsiError::Invalid(format!("{op}: {len} bytes")))
    }

    /// WRITE(16) of `data` at byte `offset` (both multiples of 512); `fua` forces it to stable
    /// storage before the status.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), IscsiError> {
        let len = Self::blocks("WRITE(16)", data.len())?;
        if !offset.is_multiple_of(u64::from(LOGICAL_BLOCK)) {
            return Err(IscsiError::Invalid(format!("unaligned write at {offset}")));
        }
        // SAFETY: libiscsi only reads `data` (the C prototype lacks `const`), and only until
        // the sync call returns; the context is live and used by this thread alone.
        let task = Task(unsafe {
            iscsi_write16_sync(
                self.ctx.as_ptr(),
                self.lun,
                offset / u64::from(LOGICAL_BLOCK),
                data.as_ptr() as *mut u8,
                len,
                LOGICAL_BLOCK as c_int,
                0,
                0,
                c_int::from(fua),
                0,
                0,
            )
        });
        self.check("WRITE(16)", &task)
    }

    /// READ(16) into `buf` from byte `offset` (both multiples of 512).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IscsiError> {
        let len = Self::blocks("READ(16)", buf.len())?;
        if !offset.is_multiple_of(u64::from(LOGICAL_BLOCK)) {
            return Err(IscsiError::Invalid(format!("unaligned read at {offset}")));
        }
        let mut iov = ScsiIovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: the iovec points into `buf`, which outlives the call; libiscsi writes at most
        // `len` bytes into it and keeps no reference after the sync call returns.
        let task = Task(unsafe {
            iscsi_read16_iov_sync(
                self.ctx.as_ptr(),
                self.lun,
                offset / u64::from(LOGICAL_BLOCK),
                len,
                LOGICAL_BLOCK as c_int,
                0,
                0,
                0,
                0,
                0,
                &mut iov,
                1,
            )
        });
        self.check("READ(16)", &task)
    }

    /// SYNCHRONIZE CACHE(10) of the whole LUN.
    pub fn flush(&mut self) -> Result<(), IscsiError> {
        // SAFETY: live context, this thread only.
        let task =
            Task(unsafe { iscsi_synchronizecache10_sync(self.ctx.as_ptr(), self.lun, 0, 0, 0, 0) });
        self.check("SYNCHRONIZE CACHE(10)", &task)
    }

    /// Runs the command a libiscsi CDB builder made (`t`, NULL when it failed), its data-in
    /// going to `data`.
    fn data_in(
        &mut self,
        op: &'static str,
        t: *mut ScsiTask,
        data: &mut [u8],
    ) -> Result<(), IscsiError> {
        if t.is_null() {
            return Err(IscsiError::Context);
        }
        let mut iov = ScsiIovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: `t` is a fresh task from a CDB builder; the data-in iovec points at `data`,
        // which outlives the command. The task passed in is the task returned.
        let task = unsafe {
            scsi_task_set_iov_in(t, &mut iov, 1);
            // NULL back means "not queued" or "the event loop gave up with the command still
            // queued"; the two cannot be told apart, so the task is leaked rather than freed
            // while libiscsi might still point at it (rare error path, a few hundred bytes).
            Task(iscsi_scsi_command_sync(
                self.ctx.as_ptr(),
                self.lun,
                t,
                std::ptr::null_mut(),
            ))
        };
        self.check(op, &task)
    }

    /// MODE SENSE(6) of all pages: whether the LUN is write-protected (WP, bit 7 of the
    /// header's DEVICE-SPECIFIC PARAMETER), as Linux sd and qemu read it.
    pub fn write_protected(&mut self) -> Result<bool, IscsiError> {
        let mut data = [0u8; 255];
        // SAFETY: builds a CDB; no pointers involved.
        let t = unsafe { scsi_cdb_modesense6(0, 0, 0x3f, 0, 255) };
        self.data_in("MODE SENSE(6)", t, &mut data)?;
        Ok(data[2] & 0x80 != 0)
    }

    /// READ CAPACITY(16): (number of logical blocks, logical block size in bytes).
    pub fn capacity(&mut self) -> Result<(u64, u32), IscsiError> {
        let mut data = [0u8; 32];
        // SAFETY: builds a CDB; no pointers involved.
        let t = unsafe { scsi_cdb_readcapacity16() };
        self.data_in("READ CAPACITY(16)", t, &mut data)?;
        let last_lba = u64::from_be_bytes(data[0..8].try_into().expect("8 bytes"));
        let block = u32::from_be_bytes(data[8..12].try_into().expect("4 bytes"));
        if block == 0 {
            return Err(IscsiError::BadData {
                op: "READ CAPACITY(16)",
                message: "block length 0".into(),
            });
        }
        Ok((last_lba + 1, block))
    }

    /// Logs out cleanly (errors ignored: the context is destroyed anyway).
    pub fn logout(self) {
        // SAFETY: live, logged-in context; Drop destroys it afterwards.
        unsafe { iscsi_logout_sync(self.ctx.as_ptr()) };
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // SAFETY: we own the context; no command is outstanding (every call is synchronous).
        unsafe { iscsi_destroy_context(self.ctx.as_ptr()) };
    }
}
