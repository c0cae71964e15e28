//! The table of supported commands and REPORT SUPPORTED OPERATION CODES (SPC-4 6.35).
//!
//! [`COMMANDS`] is the single source of truth: [`super::Lun::execute`] refuses any operation
//! code that is not in it (INVALID COMMAND OPERATION CODE) and any service action that is not
//! (INVALID FIELD IN CDB), and REPORT SUPPORTED OPERATION CODES reports exactly it, so the two
//! cannot drift apart. Each entry also says whether the command changes the medium
//! ([`Medium`]): that decides the write-ordering lock it runs under and whether a
//! write-protected logical unit refuses it, so a new write command cannot forget either.

use bytes::{BufMut, Bytes, BytesMut};

use super::cdb::Fields;
use super::reservation::Access;
use super::sense::{ScsiResult, INVALID_FIELD_IN_CDB};

/// One supported command (an operation code, or one service action of it).
pub struct CommandInfo {
    pub opcode: u8,
    /// Service action (in CDB byte 1, bits 4..0) for opcodes that have them.
    pub service_action: Option<u8>,
    pub name: &'static str,
    /// CDB USAGE DATA: which bits of each CDB byte the target looks at. Its length is the CDB
    /// length.
    pub usage: &'static [u8],
    pub access: Access,
    pub medium: Medium,
}

/// Whether and how a command changes the medium.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Medium {
    /// Reads it, or leaves it alone (mode pages, reservations and cache flushes are not data).
    Unchanged,
    /// Writes it: runs holding the write-ordering lock shared.
    Write,
    /// Reads, then writes depending on what it read (COMPARE AND WRITE, ORWRITE): runs holding
    /// the lock exclusively, so no other write lands in between.
    ReadModifyWrite,
}

use Access::{Always, Read, Release, Reserve, Write};

macro_rules! cmd {
    ($op:expr, $sa:expr, $name:expr, $access:expr, [$($u:expr),* $(,)?]) => {
        cmd!($op, $sa, $name, $access, Medium::Unchanged, [$($u),*])
    };
    ($op:expr, $sa:expr, $name:expr, $access:expr, $medium:expr, [$($u:expr),* $(,)?]) => {
        CommandInfo {
            opcode: $op,
            service_action: $sa,
            name: $name,
            usage: &[$($u),*],
            access: $access,
            medium: $medium,
        }
    };
}

/// Every command [`super::Lun::execute`] implements, sorted by opcode and service action.
pub static COMMANDS: &[CommandInfo] = &[
    cmd!(0x00, None, "TEST UNIT READY", Always, [0x00, 0, 0, 0, 0, 0]),
    cmd!(
        0x03,
        None,
        "REQUEST SENSE",
        Always,
        [0x03, 0x01, 0, 0, 0xff, 0]
    ),
    cmd!(
        0x08,
        None,
        "READ(6)",
        Read,
        [0x08, 0x1f, 0xff, 0xff, 0xff, 0]
    ),
    cmd!(
        0x0a,
        None,
        "WRITE(6)",
        Write,
        Medium::Write,
        [0x0a, 0x1f, 0xff, 0xff, 0xff, 0]
    ),
    cmd!(
        0x12,
        None,
        "INQUIRY",
        Always,
        [0x12, 0x01, 0xff, 0xff, 0xff, 0]
    ),
    cmd!(
        0x15,
        None,
        "MODE SELECT(6)",
        Write,
        [0x15, 0x11, 0, 0, 0xff, 0]
    ),
    cmd!(0x16, None, "RESERVE(6)", Reserve, [0x16, 0, 0, 0, 0, 0]),
    cmd!(0x17, None, "RELEASE(6)", Release, [0x17, 0, 0, 0, 0, 0]),
    cmd!(
        0x1a,
        None,
        "MODE SENSE(6)",
        Read,
        [0x1a, 0x08, 0xff, 0xff, 0xff, 0]
    ),
    cmd!(
        0x1b,
        None,
        "START STOP UNIT",
        Write,
        [0x1b, 0x01, 0, 0x0f, 0xf7, 0]
    ),
    cmd!(
        0x1e,
        None,
        "PREVENT ALLOW MEDIUM REMOVAL",
        Write,
        [0x1e, 0, 0, 0, 0x03, 0]
    ),
    cmd!(
        0x25,
        None,
        "READ CAPACITY(10)",
        Always,
        [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    ),
    cmd!(
        0x28,
        None,
        "READ(10)",
        Read,
        [0x28, 0x18, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0]
    ),
    cmd!(
        0x2a,
        None,
        "WRITE(10)",
        Write,
        Medium::Write,
        [0x2a, 0x18, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0]
    ),
    cmd!(
        0x2e,
        None,
        "WRITE AND VERIFY(10)",
        Write,
        Medium::Write,
        [0x2e, 0x16, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0]
    ),
    cmd!(
        0x2f,
        None,
        "VERIFY(10)",
        Read,
        [0x2f, 0x16, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0]
    ),
    cmd!(
        0x34,
        None,
        "PRE-FETCH(10)",
        Read,
        [0x34, 0x02, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0]
    ),
    cmd!(
        0x35,
        None,
        "SYNCHRONIZE CACHE(10)",
        Write,
        [0x35, 0x02, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0]
    ),
    cmd!(
        0x41,
        None,
        "WRITE SAME(10)",
        Write,
        Medium::Write,
        [0x41, 0x08, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0]
    ),
    cmd!(
        0x42,
        None,
        "UNMAP",
        Write,
        Medium::Write,
        [0x42, 0, 0, 0, 0, 0, 0x1f, 0xff, 0xff, 0]
    ),
    cmd!(
        0x55,
        None,
        "MODE SELECT(10)",
        Write,
        [0x55, 0x11, 0, 0, 0, 0, 0, 0xff, 0xff, 0]
    ),
    cmd!(
        0x56,
        None,
        "RESERVE(10)",
        Reserve,
        [0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    ),
    cmd!(
        0x57,
        None,
        "RELEASE(10)",
        Release,
        [0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    ),
    cmd!(
        0x5a,
        None,
        "MODE SENSE(10)",
        Read,
        [0x5a, 0x18, 0xff, 0xff, 0, 0, 0, 0xff, 0xff, 0]
    ),
    cmd!(
        0x5e,
        Some(0x00),
        "PERSISTENT RESERVE IN / READ KEYS",
        Always,
        [0x5e, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0]
    ),
    cmd!(
        0x5e,
        Some(0x01),
        "PERSISTENT RESERVE IN / READ RESERVATION",
        Always,
        [0x5e, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0]
    ),
    cmd!(
        0x5e,
        Some(0x02),
        "PERSISTENT RESERVE IN / REPORT CAPABILITIES",
        Always,
        [0x5e, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0]
    ),
    cmd!(
        0x5e,
        Some(0x03),
        "PERSISTENT RESERVE IN / READ FULL STATUS",
        Always,
        [0x5e, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0]
    ),
    cmd!(
        0x5f,
        Some(0x00),
        "PERSISTENT RESERVE OUT / REGISTER",
        Always,
        [0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0]
    ),
    cmd!(
        0x5f,
        Some(0x01),
        "PERSISTENT RESERVE OUT / RESERVE",
        Always,
        [0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0]
    ),
    cmd!(
        0x5f,
        Some(0x02),
        "PERSISTENT RESERVE OUT / RELEASE",
        Always,
        [0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0]
    ),
    cmd!(
        0x5f,
        Some(0x03),
        "PERSISTENT RESERVE OUT / CLEAR",
        Always,
        [0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0]
    ),
    cmd!(
        0x5f,
        Some(0x04),
        "PERSISTENT RESERVE OUT / PREEMPT",
        Always,
        [0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0]
    ),
    cmd!(
        0x5f,
        Some(0x05),
        "PERSISTENT RESERVE OUT / PREEMPT AND ABORT",
        Always,
        [0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0]
    ),
    cmd!(
        0x5f,
        Some(0x06),
        "PERSISTENT RESERVE OUT / REGISTER AND IGNORE EXISTING KEY",
        Always,
        [0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0]
    ),
    cmd!(
        0x88,
        None,
        "READ(16)",
        Read,
        [
            0x88, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x1f, 0
        ]
    ),
    cmd!(
        0x89,
        None,
        "COMPARE AND WRITE",
        Write,
        Medium::ReadModifyWrite,
        [0x89, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0xff, 0x1f, 0]
    ),
    cmd!(
        0x8a,
        None,
        "WRITE(16)",
        Write,
        Medium::Write,
        [
            0x8a, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x1f, 0
        ]
    ),
    cmd!(
        0x8b,
        None,
        "ORWRITE(16)",
        Write,
        Medium::ReadModifyWrite,
        [
            0x8b, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x1f, 0
        ]
    ),
    cmd!(
        0x8e,
        None,
        "WRITE AND VERIFY(16)",
        Write,
        Medium::Write,
        [
            0x8e, 0x16, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x1f, 0
        ]
    ),
    cmd!(
        0x8f,
        None,
        "VERIFY(16)",
        Read,
        [
            0x8f, 0x16, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x1f, 0
        ]
    ),
    cmd!(
        0x90,
        None,
        "PRE-FETCH(16)",
        Read,
        [
            0x90, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x1f, 0
        ]
    ),
    cmd!(
        0x91,
        None,
        "SYNCHRONIZE CACHE(16)",
        Write,
        [
            0x91, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x1f, 0
        ]
    ),
    cmd!(
        0x93,
        None,
        "WRITE SAME(16)",
        Write,
        Medium::Write,
        [
            0x93, 0x09, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x1f, 0
        ]
    ),
    cmd!(
        0x9e,
        Some(0x10),
        "READ CAPACITY(16)",
        Always,
        [0x9e, 0x1f, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0]
    ),
    cmd!(
        0x9e,
        Some(0x12),
        "GET LBA STATUS",
        Read,
        [
            0x9e, 0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,
            0
        ]
    ),
    cmd!(
        0xa0,
        None,
        "REPORT LUNS",
        Always,
        [0xa0, 0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0]
    ),
    cmd!(
        0xa3,
        Some(0x0c),
        "REPORT SUPPORTED OPERATION CODES",
        Always,
        [0xa3, 0x1f, 0x87, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]
    ),
    cmd!(
        0xa8,
        None,
        "READ(12)",
        Read,
        [0xa8, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0]
    ),
    cmd!(
        0xaa,
        None,
        "WRITE(12)",
        Write,
        Medium::Write,
        [0xaa, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0]
    ),
    cmd!(
        0xae,
        None,
        "WRITE AND VERIFY(12)",
        Write,
        Medium::Write,
        [0xae, 0x16, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0]
    ),
    cmd!(
        0xaf,
        None,
        "VERIFY(12)",
        Read,
        [0xaf, 0x16, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0]
    ),
];

/// Whether any entry of `opcode` carries a service action.
fn has_service_actions(opcode: u8) -> bool {
    COMMANDS
        .iter()
        .any(|c| c.opcode == opcode && c.service_action.is_some())
}

/// How [`lookup`] classifies a CDB.
pub enum Lookup {
    Found(&'static CommandInfo),
    /// Known operation code, unknown service action: INVALID FIELD IN CDB.
    BadServiceAction,
    /// INVALID COMMAND OPERATION CODE.
    Unknown,
}

/// Finds the table entry for a CDB (opcode, and service action where the opcode has them).
pub fn lookup(cdb: &[u8]) -> Lookup {
    let f = Fields(cdb);
    let op = f.u8(0);
    if cdb.is_empty() || !COMMANDS.iter().any(|c| c.opcode == op) {
        return Lookup::Unknown;
    }
    let sa = f.u8(1) & 0x1f;
    let found = COMMANDS
        .iter()
        .find(|c| c.opcode == op && c.service_action.is_none_or(|s| s == sa));
    found.map_or(Lookup::BadServiceAction, Lookup::Found)
}

/// Nominal and recommended timeouts (seconds) reported with RCTD; conservative for a
/// networked backend.
const NOMINAL_TIMEOUT: u32 = 30;
const RECOMMENDED_TIMEOUT: u32 = 60;

fn put_timeouts(b: &mut BytesMut) {
    b.put_u16(0x0a);
    b.put_u8(0);
    b.put_u8(0);
    b.put_u32(NOMINAL_TIMEOUT);
    b.put_u32(RECOMMENDED_TIMEOUT);
}

/// REPORT SUPPORTED OPERATION CODES (MAINTENANCE IN, service action 0Ch).
pub fn report_supported(cdb: &[u8]) -> ScsiResult<Bytes> {
    let f = Fields(cdb);
    let rctd = f.bit(2, 7);
    let options = f.u8(2) & 0x07;
    let req_op = f.u8(3);
    let req_sa = f.u16(4);
    let alloc = f.u32(6) as usize;
    let mut b = BytesMut::new();
    match options {
        0 => {
            let desc_len = if rctd { 20 } else { 8 };
            b.put_u32((COMMANDS.len() * desc_len) as u32);
            for c in COMMANDS {
                b.put_u8(c.opcode);
                b.put_u8(0);
                b.put_u16(c.service_action.map_or(0, u16::from));
                b.put_u8(0);
                b.put_u8(if rctd { 0x02 } else { 0 } | u8::from(c.service_action.is_some()));
                b.put_u16(c.usage.len() as u16);
                if rctd {
                    put_timeouts(&mut b);
                }
            }
        }
        1..=3 => {
            let with_sa = has_service_actions(req_op);
            // Option 1 names an opcode without service actions, option 2 one with them;
            // option 3 accepts either (SPC-4 table 288).
            let entry = match (options, with_sa) {
                (1, true) | (2, false) => return Err(INVALID_FIELD_IN_CDB.into()),
                (3, false) if req_sa != 0 => None,
                (_, false) => COMMANDS.iter().find(|c| c.opcode == req_op),
                (_, true) => COMMANDS.iter().find(|c| {
                    c.opcode == req_op && c.service_action.map(u16::from) == Some(req_sa)
                }),
            };
            b.put_u8(0);
            match entry {
                Some(c) => {
                    b.put_u8(if rctd { 0x80 } else { 0 } | 0x03);
                    b.put_u16(c.usage.len() as u16);
                    b.put_slice(c.usage);
                    if rctd {
                        put_timeouts(&mut b);
                    }
                }
                None => {
                    b.put_u8(0x01); // not supported
                    b.put_u16(0);
                }
            }
        }
        _ => return Err(INVALID_FIELD_IN_CDB.into()),
    }
    b.truncate(alloc);
    Ok(b.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::cdb::cdb_len;

    #[test]
    fn table_is_consistent() {
        for w in COMMANDS.windows(2) {
            let key = |c: &CommandInfo| (c.opcode, c.service_action);
            assert!(key(&w[0]) < key(&w[1]), "{} out of order", w[1].name);
        }
        for c in COMMANDS {
            assert_eq!(c.usage.first(), Some(&c.opcode), "{}", c.name);
            assert_eq!(Some(c.usage.len()), cdb_len(c.opcode), "{}", c.name);
        }
    }

    #[test]
    fn formats() {
        let all = report_supported(&[0xa3, 0x0c, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0]).unwrap();
        assert_eq!(all.len(), 4 + 8 * COMMANDS.len());
        let rctd = report_supported(&[0xa3, 0x0c, 0x80, 0, 0, 0, 0, 0, 0x10, 0, 0, 0]).unwrap();
        assert_eq!(rctd.len(), 4 + 20 * COMMANDS.len());
        assert_eq!(rctd[4 + 5] & 0x02, 0x02);
        assert_eq!(&rctd[4 + 8..4 + 10], &[0, 0x0a]);
        let one = report_supported(&[0xa3, 0x0c, 1, 0x28, 0, 0, 0, 0, 1, 0, 0, 0]).unwrap();
        assert_eq!((one[1], one[3], one[4]), (3, 10, 0x28));
        assert!(report_supported(&[0xa3, 0x0c, 1, 0x9e, 0, 0, 0, 0, 1, 0, 0, 0]).is_err());
        let two = report_supported(&[0xa3, 0x0c, 2, 0x9e, 0, 0x10, 0, 0, 1, 0, 0, 0]).unwrap();
        assert_eq!((two[1], two[4]), (3, 0x9e));
        assert!(report_supported(&[0xa3, 0x0c, 2, 0x28, 0, 0, 0, 0, 1, 0, 0, 0]).is_err());
        let three = report_supported(&[0xa3, 0x0c, 3, 0xc0, 0, 0, 0, 0, 1, 0, 0, 0]).unwrap();
        assert_eq!(three[1], 1);
        assert!(report_supported(&[0xa3, 0x0c, 4, 0, 0, 0, 0, 0, 1, 0, 0, 0]).is_err());
    }
}
