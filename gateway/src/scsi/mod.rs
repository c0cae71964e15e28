//! SCSI block command set (SPC-4 / SBC-3) for one logical unit.
//!
//! The iSCSI layer hands a [`Command`] (CDB, the data-out buffer it collected, the I_T nexus)
//! to [`Lun::execute`] and gets a [`Response`]: status, sense data and the full data-in
//! buffer. Transport concerns (Expected Data Transfer Length, residuals, R2T, digests) stay
//! in `crate::iscsi`; this module never sees a PDU.
//!
//! Layout: [`opcodes`] is the table of supported commands (dispatch and REPORT SUPPORTED
//! OPERATION CODES both read it), [`sense`] the sense data and error type, [`cdb`] bounded
//! field access, `inquiry`, `mode`, `capacity` the SPC/SBC informational commands, `rw` the
//! data path, `provisioning` UNMAP / WRITE SAME / GET LBA STATUS, [`reservation`] SPC-2 and
//! persistent reservations, `attention` unit attentions.
//!
//! Concurrency: LUN state (unit attentions, reservations) sits behind a `std` mutex that is
//! never held across an `.await`. Data-path ordering uses one async `RwLock`, taken by the
//! dispatcher for every command the table marks as changing the medium: writes take it
//! shared, COMPARE AND WRITE and ORWRITE exclusively, so their read-compare-write is atomic
//! with respect to every other writer.
//!
//! Write protection: a LUN exported write-protected reports WP in MODE SENSE and refuses every
//! medium-changing command with DATA PROTECT / WRITE PROTECTED before it touches anything;
//! reads, cache flushes, mode pages and reservations work as usual. The flag is checked under
//! the write-ordering lock and [`Lun::set_write_protected`] switches it holding that lock
//! exclusively, so a switch is one point in the command order: writes that passed the check
//! have finished when it returns, and none starts after it.

mod attention;
mod capacity;
pub mod cdb;
mod inquiry;
mod mode;
pub mod opcodes;
mod provisioning;
pub mod reservation;
mod rw;
pub mod sense;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{BufMut, Bytes, BytesMut};

use crate::device::{BlockDevice, DeviceError, MemDevice};
use attention::UnitAttentions;
use cdb::Fields;
use opcodes::{Lookup, Medium};
use reservation::{ItKey, Reservations};
pub use sense::{sense, ScsiError, ScsiResult, Sense};
use sense::{INVALID_FIELD_IN_CDB, INVALID_OPCODE, WRITE_PROTECTED};

/// Logical block size reported to initiators.
pub const LOGICAL_BLOCK: u64 = 512;
/// Physical block size (READ CAPACITY 16: 8 logical per physical).
pub const PHYSICAL_BLOCK: u64 = 4096;

/// One I_T nexus: an initiator port (name + ISID) logged in through a target portal group.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Nexus {
    /// Unique for the life of the process; keys unit attentions and reservations.
    pub id: u64,
    /// iSCSI initiator name (`InitiatorName` at login).
    pub initiator: String,
    /// Initiator session id from the login PDU.
    pub isid: [u8; 6],
    /// Target portal group tag.
    pub tpgt: u16,
}

/// SCSI status byte values (SAM-5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Good = 0x00,
    CheckCondition = 0x02,
    ConditionMet = 0x04,
    Busy = 0x08,
    ReservationConflict = 0x18,
    TaskSetFull = 0x28,
    TaskAborted = 0x40,
}

/// A command as the transport delivers it.
pub struct Command<'a> {
    pub cdb: &'a [u8],
    /// Data-out bytes the initiator sent (empty for commands without data-out).
    pub data_out: Bytes,
    pub nexus: &'a Nexus,
}

/// What the logical unit answers.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: Status,
    /// Sense data (fixed format) with CHECK CONDITION.
    pub sense: Option<Bytes>,
    /// Data-in; the transport truncates it to the initiator's expected length.
    pub data: Bytes,
}

impl Response {
    /// CHECK CONDITION with fixed-format sense `key`/`asc`/`ascq` and no data.
    pub fn check_condition(key: u8, asc: u8, ascq: u8) -> Self {
        Self {
            status: Status::CheckCondition,
            sense: Some(sense(key, asc, ascq)),
            data: Bytes::new(),
        }
    }
}

/// Identity a LUN reports in INQUIRY and its VPD pages.
#[derive(Debug, Clone)]
pub struct LunIdentity {
    /// Volume name; also the unit serial number (VPD 0x80).
    pub name: String,
    /// Stable 64-bit NAA IEEE Registered Extended id (VPD 0x83), derived from the volume id.
    pub naa: u64,
}

/// What kind of reset a task management function asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetKind {
    Lun,
    TargetWarm,
}

/// A logical unit: the device plus the SCSI state around it (reservations, unit
/// attentions).
pub struct Lun {
    device: Arc<dyn BlockDevice>,
    identity: LunIdentity,
    state: Mutex<State>,
    /// Write ordering: shared for ordinary writes, exclusive for read-modify-write commands
    /// (COMPARE AND WRITE, ORWRITE). The one lock deliberately held across device awaits.
    io_order: tokio::sync::RwLock<()>,
    /// WP: medium-changing commands are refused. Changed only under `io_order` exclusive.
    write_protected: AtomicBool,
}

/// The write-ordering lock as a medium-changing command holds it.
enum OrderGuard<'a> {
    Shared(#[allow(dead_code)] tokio::sync::RwLockReadGuard<'a, ()>),
    Exclusive(#[allow(dead_code)] tokio::sync::RwLockWriteGuard<'a, ()>),
}

#[derive(Default)]
struct State {
    attention: UnitAttentions,
    reservations: Reservations,
}

/// ASC/ASCQ of the unit attentions established by this module.
mod ua {
    pub const BUS_DEVICE_RESET: (u8, u8) = (0x29, 0x03);
    pub const SCSI_BUS_RESET: (u8, u8) = (0x29, 0x02);
    pub const CAPACITY_CHANGED: (u8, u8) = (0x2a, 0x09);
    pub const MODE_PARAMETERS_CHANGED: (u8, u8) = (0x2a, 0x01);
}

/// What a successful handler hands back: data-in (possibly empty).
type Done = ScsiResult<Bytes>;

impl Lun {
    pub fn new(device: Arc<dyn BlockDevice>, identity: LunIdentity) -> Self {
        Self {
            device,
            identity,
            state: Mutex::new(State::default()),
            io_order: tokio::sync::RwLock::new(()),
            write_protected: AtomicBool::new(false),
        }
    }

    /// The LUN starts write-protected (before any initiator can see it) when `on`.
    pub fn with_write_protect(self, on: bool) -> Self {
        self.write_protected.store(on, Ordering::Relaxed);
        self
    }

    pub fn is_write_protected(&self) -> bool {
        self.write_protected.load(Ordering::Relaxed)
    }

    /// Switches write protection on the live LUN; returns whether it changed. Waits for the
    /// medium-changing commands in flight (they hold the write-ordering lock), so once it
    /// returns with protection on nothing writes any more; sessions stay. The WP bit in the
    /// mode parameter header changed: every nexus gets MODE PARAMETERS CHANGED, as SPC-4 has
    /// the other nexuses get it after a MODE SELECT changes a parameter (here none asked).
    pub async fn set_write_protected(&self, on: bool) -> bool {
        // Polled every second with the same value: no lock unless something changes.
        if self.is_write_protected() == on {
            return false;
        }
        let _order = self.io_order.write().await;
        if self.write_protected.swap(on, Ordering::Relaxed) == on {
            return false;
        }
        let (asc, ascq) = ua::MODE_PARAMETERS_CHANGED;
        self.state().attention.broadcast(asc, ascq);
        true
    }

    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }

    pub fn identity(&self) -> &LunIdentity {
        &self.identity
    }

    /// The state lock; a panic elsewhere while holding it leaves consistent data (every
    /// mutation is a single step), so poisoning is ignored.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Capacity in logical blocks.
    fn blocks(&self) -> u64 {
        self.device.size() / LOGICAL_BLOCK
    }

    /// LUN RESET / TARGET WARM RESET: drops SPC-2 reservations (persistent ones stay) and
    /// establishes a reset unit attention for every nexus seen so far.
    pub fn reset(&self, kind: ResetKind, by: Option<&Nexus>) {
        let _ = by; // SAM-5: the nexus that asked for the reset gets the unit attention too.
        let (asc, ascq) = match kind {
            ResetKind::Lun => ua::BUS_DEVICE_RESET,
            ResetKind::TargetWarm => ua::SCSI_BUS_RESET,
        };
        let mut st = self.state();
        st.reservations.clear_spc2();
        st.attention.broadcast(asc, ascq);
    }

    /// A nexus logged in: later unit attentions include it even before its first command.
    pub fn nexus_joined(&self, nexus: &Nexus) {
        self.state().attention.seen(&ItKey::from(nexus));
    }

    /// I_T nexus loss: its SPC-2 reservation and pending unit attentions go; persistent
    /// registrations stay.
    pub fn nexus_gone(&self, nexus: &Nexus) {
        let key = ItKey::from(nexus);
        let mut st = self.state();
        st.reservations.release_spc2(&key);
        st.attention.forget(&key);
    }

    /// The device was resized: CAPACITY DATA HAS CHANGED for every nexus.
    pub fn capacity_changed(&self) {
        let (asc, ascq) = ua::CAPACITY_CHANGED;
        self.state().attention.broadcast(asc, ascq);
    }

    /// Executes one command. Never panics on any CDB or data-out.
    pub async fn execute(&self, cmd: Command<'_>) -> Response {
        match self.run(&cmd).await {
            Ok(data) => Response {
                status: Status::Good,
                sense: None,
                data,
            },
            Err(ScsiError::Check(s)) => Response {
                status: Status::CheckCondition,
                sense: Some(s.to_bytes()),
                data: Bytes::new(),
            },
            Err(ScsiError::ReservationConflict) => Response {
                status: Status::ReservationConflict,
                sense: None,
                data: Bytes::new(),
            },
        }
    }

    async fn run(&self, cmd: &Command<'_>) -> Done {
        let who = ItKey::from(cmd.nexus);
        let lookup = opcodes::lookup(cmd.cdb);
        let opcode = Fields(cmd.cdb).u8(0);
        {
            let mut st = self.state();
            st.attention.seen(&who);
            // SAM-5 5.14: a pending unit attention preempts every command but these.
            if !matches!(opcode, 0x12 | 0xa0 | 0x03) {
                if let Some(s) = st.attention.take(&who) {
                    return Err(s.into());
                }
            }
            let info = match lookup {
                Lookup::Found(info) => info,
                Lookup::BadServiceAction => return Err(INVALID_FIELD_IN_CDB.into()),
                Lookup::Unknown => return Err(INVALID_OPCODE.into()),
            };
            st.reservations.check(&who, info.access)?;
        }
        let Lookup::Found(info) = lookup else {
            return Err(INVALID_OPCODE.into());
        };
        // Held until the handler is done; WP is read under it (see set_write_protected).
        let order = match info.medium {
            Medium::Unchanged => None,
            Medium::Write => Some(OrderGuard::Shared(self.io_order.read().await)),
            Medium::ReadModifyWrite => Some(OrderGuard::Exclusive(self.io_order.write().await)),
        };
        if order.is_some() && self.is_write_protected() {
            return Err(WRITE_PROTECTED.into());
        }
        // The transport may pass the whole 16-byte BHS CDB field: cut to the command's size.
        let cdb = cmd
            .cdb
            .get(..info.usage.len())
            .ok_or(INVALID_FIELD_IN_CDB)?;
        let data = &cmd.data_out;
        let f = Fields(cdb);
        match (info.opcode, info.service_action) {
            (0x00, _) => Ok(Bytes::new()),
            (0x03, _) => self.request_sense(&who, cdb),
            (0x08 | 0x28 | 0xa8 | 0x88, _) => self.read(cdb).await,
            (0x0a | 0x2a | 0xaa | 0x8a, _) => self.write(cdb, data).await,
            (0x2e | 0xae | 0x8e, _) => self.write_and_verify(cdb, data).await,
            (0x2f | 0xaf | 0x8f, _) => self.verify(cdb, data).await,
            (0x89, _) => self.compare_and_write(cdb, data).await,
            (0x8b, _) => self.orwrite(cdb, data).await,
            (0x34 | 0x90, _) => self.prefetch(cdb),
            (0x35 | 0x91, _) => self.synchronize_cache(cdb).await,
            (0x41 | 0x93, _) => self.write_same(cdb, data).await,
            (0x42, _) => self.unmap(cdb, data).await,
            (0x9e, Some(0x12)) => self.get_lba_status(cdb).await,
            (0x9e, _) => Ok(capacity::read_capacity16(self.blocks(), cdb)),
            (0x25, _) => Ok(capacity::read_capacity10(self.blocks())),
            (0x12, _) => inquiry::inquiry(cdb, &self.identity),
            (0x1a, _) => mode::mode_sense(cdb, false, self.blocks(), self.is_write_protected()),
            (0x5a, _) => mode::mode_sense(cdb, true, self.blocks(), self.is_write_protected()),
            (0x15, _) => mode::mode_select(cdb, false, data).map(|()| Bytes::new()),
            (0x55, _) => mode::mode_select(cdb, true, data).map(|()| Bytes::new()),
            (0xa0, _) => report_luns(cdb),
            (0xa3, _) => opcodes::report_supported(cdb),
            (0x16 | 0x56, _) => {
                // RESERVE(10) third-party and long-id forms are not supported.
                if info.opcode == 0x56 && f.u8(1) & 0x12 != 0 {
                    return Err(INVALID_FIELD_IN_CDB.into());
                }
                self.state().reservations.reserve_spc2(&who);
                Ok(Bytes::new())
            }
            (0x17 | 0x57, _) => {
                self.state().reservations.release_spc2(&who);
                Ok(Bytes::new())
            }
            (0x5e, _) => self.state().reservations.pr_in(cdb),
            (0x5f, _) => {
                let mut st = self.state();
                let notices = st.reservations.pr_out(&who, cdb, data)?;
                for (k, asc, ascq) in notices {
                    st.attention.establish(&k, asc, ascq);
                }
                Ok(Bytes::new())
            }
            // START STOP UNIT: nothing to spin; accepted, including LOEJ (libiscsi's
            // StartStopUnit tests accept GOOD on a non-removable unit).
            (0x1b, _) => Ok(Bytes::new()),
            // PREVENT ALLOW MEDIUM REMOVAL: non-removable medium, nothing to lock.
            (0x1e, _) => Ok(Bytes::new()),
            _ => Err(INVALID_OPCODE.into()),
        }
    }

    /// REQUEST SENSE: the pending unit attention (now cleared), else NO SENSE.
    fn request_sense(&self, who: &ItKey, cdb: &[u8]) -> Done {
        let alloc = usize::from(Fields(cdb).u8(4));
        let s = self
            .state()
            .attention
            .take(who)
            .unwrap_or(sense::NO_ADDITIONAL_SENSE);
        let mut b = s.to_bytes();
        b.truncate(alloc);
        Ok(b)
    }
}

/// REPORT LUNS: LUN 0 only (one target per volume).
fn report_luns(cdb: &[u8]) -> Done {
    let f = Fields(cdb);
    let alloc = f.u32(6) as usize;
    if alloc < 16 {
        return Err(INVALID_FIELD_IN_CDB.into());
    }
    let luns: usize = match f.u8(2) {
        0 | 2 => 1,
        1 => 0, // well-known logical units only: none
        _ => return Err(INVALID_FIELD_IN_CDB.into()),
    };
    let mut b = BytesMut::with_capacity(16);
    b.put_u32((luns * 8) as u32);
    b.put_u32(0);
    b.put_bytes(0, luns * 8);
    b.truncate(alloc);
    Ok(b.freeze())
}

/// Maps a device failure on a read path to sense data.
fn read_error(e: DeviceError) -> ScsiError {
    match e {
        DeviceError::OutOfRange { .. } => sense::LBA_OUT_OF_RANGE.into(),
        DeviceError::Task(_) => sense::INTERNAL_TARGET_FAILURE.into(),
        DeviceError::Unavailable(_) => sense::NOT_READY_UNAVAILABLE.into(),
        DeviceError::Fenced(_) => sense::NOT_READY_TRANSITION.into(),
        _ => sense::READ_ERROR.into(),
    }
}

/// Maps a device failure on a write path to sense data.
fn write_error(e: DeviceError) -> ScsiError {
    match e {
        DeviceError::OutOfRange { .. } => sense::LBA_OUT_OF_RANGE.into(),
        DeviceError::Task(_) => sense::INTERNAL_TARGET_FAILURE.into(),
        DeviceError::Unavailable(_) => sense::NOT_READY_UNAVAILABLE.into(),
        DeviceError::Fenced(_) => sense::NOT_READY_TRANSITION.into(),
        _ => sense::WRITE_ERROR.into(),
    }
}

/// Fuzzing entry point: `data[0]` selects the CDB length (6/10/12/16/32) and, with its top
/// bit, a write-protected LUN; then the CDB, then data-out. Runs against a 1 MiB memory
/// device; must never panic.
#[doc(hidden)]
pub fn fuzz_execute(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let len = [6usize, 10, 12, 16, 32][usize::from(sel) % 5].min(rest.len());
    let (cdb, data_out) = rest.split_at(len);
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() else {
        return;
    };
    let lun = Lun::new(
        Arc::new(MemDevice::new(1 << 20)),
        LunIdentity {
            name: "fuzz".into(),
            naa: 1,
        },
    )
    .with_write_protect(sel & 0x80 != 0);
    let nexus = Nexus {
        id: 1,
        initiator: "iqn.fuzz".into(),
        isid: [0; 6],
        tpgt: 1,
    };
    rt.block_on(lun.execute(Command {
        cdb,
        data_out: Bytes::copy_from_slice(data_out),
        nexus: &nexus,
    }));
}
