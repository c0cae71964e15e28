//! Reservations: SPC-2 RESERVE/RELEASE and SPC-4 persistent reservations (PR IN / PR OUT).
//!
//! All state lives in [`Reservations`], guarded by the LUN's state mutex (never held across
//! an await). Registrations are keyed by the I_T nexus *identity* ([`ItKey`]: initiator
//! port name, ISID, portal group), not by the transport's per-login id, because SPC-4 ties a
//! registration to the initiator port and it must survive a reconnect. APTPL (persistence
//! across power loss) is not supported and is refused.

use std::collections::BTreeMap;

use bytes::{BufMut, Bytes, BytesMut};

use super::cdb::Fields;
use super::sense::{
    ScsiError, ScsiResult, Sense, INVALID_FIELD_IN_CDB, INVALID_FIELD_IN_PARAMETER_LIST,
    PARAMETER_LIST_LENGTH_ERROR,
};
use super::Nexus;

/// The identity of an I_T nexus as reservations see it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ItKey {
    pub initiator: String,
    pub isid: [u8; 6],
    pub tpgt: u16,
}

impl From<&Nexus> for ItKey {
    fn from(n: &Nexus) -> Self {
        Self {
            initiator: n.initiator.clone(),
            isid: n.isid,
            tpgt: n.tpgt,
        }
    }
}

/// How a command is treated under a reservation (SPC-4 table 66, SBC-3 table 13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Never conflicts (INQUIRY, REPORT LUNS, PR IN/OUT, ...).
    Always,
    /// Allowed under SPC-2 reservations too (RELEASE).
    Release,
    /// Reads: allowed for non-holders under Write Exclusive types only.
    Read,
    /// Writes and everything else: conflicts for non-holders.
    Write,
    /// SPC-2 RESERVE: conflicts whenever another nexus or a persistent reservation holds it.
    Reserve,
}

/// PR types (SPC-4 table 205).
pub mod pr_type {
    pub const WRITE_EXCLUSIVE: u8 = 1;
    pub const EXCLUSIVE_ACCESS: u8 = 3;
    pub const WE_REGISTRANTS_ONLY: u8 = 5;
    pub const EA_REGISTRANTS_ONLY: u8 = 6;
    pub const WE_ALL_REGISTRANTS: u8 = 7;
    pub const EA_ALL_REGISTRANTS: u8 = 8;
}

fn valid_type(t: u8) -> bool {
    matches!(t, 1 | 3 | 5 | 6 | 7 | 8)
}

fn all_registrants(t: u8) -> bool {
    matches!(t, pr_type::WE_ALL_REGISTRANTS | pr_type::EA_ALL_REGISTRANTS)
}

fn registrants_only_or_all(t: u8) -> bool {
    matches!(t, 5..=8)
}

fn exclusive_access(t: u8) -> bool {
    matches!(
        t,
        pr_type::EXCLUSIVE_ACCESS | pr_type::EA_REGISTRANTS_ONLY | pr_type::EA_ALL_REGISTRANTS
    )
}

#[derive(Debug, Clone)]
struct Reservation {
    holder: ItKey,
    kind: u8,
}

/// Unit attentions a PR OUT asks the caller to establish, by nexus identity.
pub type Notices = Vec<(ItKey, u8, u8)>;

pub const RESERVATIONS_PREEMPTED: (u8, u8) = (0x2a, 0x03);
pub const RESERVATIONS_RELEASED: (u8, u8) = (0x2a, 0x04);
pub const REGISTRATIONS_PREEMPTED: (u8, u8) = (0x2a, 0x05);

const INVALID_RELEASE: Sense = Sense::new(super::sense::key::ILLEGAL_REQUEST, 0x26, 0x04);

/// Reservation state of one LUN.
#[derive(Debug, Default)]
pub struct Reservations {
    /// SPC-2 RESERVE(6)/(10) holder.
    spc2: Option<ItKey>,
    registrations: BTreeMap<ItKey, u64>,
    reservation: Option<Reservation>,
    generation: u32,
}

impl Reservations {
    fn is_holder(&self, who: &ItKey) -> bool {
        match &self.reservation {
            Some(r) if all_registrants(r.kind) => self.registrations.contains_key(who),
            Some(r) => &r.holder == who,
            None => false,
        }
    }

    /// RESERVATION CONFLICT if `who` may not run a command of class `access` now.
    pub fn check(&self, who: &ItKey, access: Access) -> ScsiResult<()> {
        if access == Access::Always {
            return Ok(());
        }
        if let Some(h) = &self.spc2 {
            if h != who && access != Access::Release {
                return Err(ScsiError::ReservationConflict);
            }
        }
        let Some(r) = &self.reservation else {
            return Ok(());
        };
        if access == Access::Reserve {
            // SPC-4 5.13.3: RESERVE(6)/(10) conflict while a persistent reservation exists.
            return Err(ScsiError::ReservationConflict);
        }
        if access == Access::Release || self.is_holder(who) {
            return Ok(());
        }
        if registrants_only_or_all(r.kind) && self.registrations.contains_key(who) {
            return Ok(());
        }
        match access {
            Access::Read if !exclusive_access(r.kind) => Ok(()),
            _ => Err(ScsiError::ReservationConflict),
        }
    }

    /// SPC-2 RESERVE(6)/(10); the caller has run [`Self::check`] with [`Access::Reserve`].
    pub fn reserve_spc2(&mut self, who: &ItKey) {
        self.spc2 = Some(who.clone());
    }

    /// SPC-2 RELEASE: a release by a non-holder is GOOD and changes nothing (SPC-2 7.17).
    pub fn release_spc2(&mut self, who: &ItKey) {
        if self.spc2.as_ref() == Some(who) {
            self.spc2 = None;
        }
    }

    /// Drops any SPC-2 reservation (LUN reset, target reset).
    pub fn clear_spc2(&mut self) {
        self.spc2 = None;
    }

    pub fn spc2_holder(&self) -> Option<&ItKey> {
        self.spc2.as_ref()
    }

    /// PERSISTENT RESERVE IN; `cdb` is at least 10 bytes long.
    pub fn pr_in(&self, cdb: &[u8]) -> ScsiResult<Bytes> {
        let f = Fields(cdb);
        let alloc = usize::from(f.u16(7));
        let mut b = BytesMut::new();
        match f.u8(1) & 0x1f {
            0 => {
                b.put_u32(self.generation);
                b.put_u32((self.registrations.len() * 8) as u32);
                for key in self.registrations.values() {
                    b.put_u64(*key);
                }
            }
            1 => {
                b.put_u32(self.generation);
                match &self.reservation {
                    Some(r) => {
                        b.put_u32(16);
                        let key = if all_registrants(r.kind) {
                            0
                        } else {
                            self.registrations.get(&r.holder).copied().unwrap_or(0)
                        };
                        b.put_u64(key);
                        b.put_u32(0);
                        b.put_u8(0);
                        b.put_u8(r.kind & 0x0f); // scope 0 = LU_SCOPE
                        b.put_u16(0);
                    }
                    None => b.put_u32(0),
                }
            }
            2 => {
                b.put_u16(8);
                b.put_u8(0x00); // no CRH, SIP_C, ATP_C, PTPL_C
                b.put_u8(0x80); // TMV: the type mask is valid; ALLOW COMMANDS 0
                b.put_u8(0x80 | 0x40 | 0x20 | 0x08 | 0x02); // WR_EX_AR EX_AC_RO WR_EX_RO EX_AC WR_EX
                b.put_u8(0x01); // EX_AC_AR
                b.put_u16(0);
            }
            3 => {
                let mut descs = BytesMut::new();
                for (who, key) in &self.registrations {
                    let tid = transport_id(who);
                    descs.put_u64(*key);
                    descs.put_u32(0);
                    let holder = self.is_holder(who);
                    descs.put_u8(u8::from(holder));
                    descs.put_u8(match (&self.reservation, holder) {
                        (Some(r), true) => r.kind & 0x0f,
                        _ => 0,
                    });
                    descs.put_u32(0);
                    descs.put_u16(1); // relative target port identifier
                    descs.put_u32(tid.len() as u32);
                    descs.put_slice(&tid);
                }
                b.put_u32(self.generation);
                b.put_u32(descs.len() as u32);
                b.put_slice(&descs);
            }
            _ => return Err(INVALID_FIELD_IN_CDB.into()),
        }
        b.truncate(alloc);
        Ok(b.freeze())
    }

    /// PERSISTENT RESERVE OUT. Returns the unit attentions to establish for other nexuses.
    pub fn pr_out(&mut self, who: &ItKey, cdb: &[u8], params: &[u8]) -> ScsiResult<Notices> {
        let f = Fields(cdb);
        let sa = f.u8(1) & 0x1f;
        let scope = f.u8(2) >> 4;
        let kind = f.u8(2) & 0x0f;
        let list_len = f.u32(5) as usize;
        if sa > 7 {
            return Err(INVALID_FIELD_IN_CDB.into());
        }
        if sa == 7 {
            // REGISTER AND MOVE needs a second target port; not supported.
            return Err(INVALID_FIELD_IN_CDB.into());
        }
        if list_len != 24 || params.len() < 24 {
            return Err(PARAMETER_LIST_LENGTH_ERROR.into());
        }
        let p = Fields(params);
        let res_key = p.u64(0);
        let sa_key = p.u64(8);
        let flags = p.u8(20);
        // SPEC_I_PT, ALL_TG_PT and APTPL are reported unsupported in REPORT CAPABILITIES.
        if flags & 0x0d != 0 {
            return Err(INVALID_FIELD_IN_PARAMETER_LIST.into());
        }
        let registered = self.registrations.get(who).copied();
        let needs_scope = matches!(sa, 1 | 2 | 4 | 5);
        if needs_scope && (scope != 0 || !valid_type(kind)) {
            return Err(INVALID_FIELD_IN_CDB.into());
        }
        match sa {
            0 | 6 => {
                if sa == 0 && registered.unwrap_or(0) != res_key {
                    return Err(ScsiError::ReservationConflict);
                }
                Ok(self.register(who, registered.is_some(), sa_key))
            }
            _ => {
                if registered != Some(res_key) {
                    return Err(ScsiError::ReservationConflict);
                }
                match sa {
                    1 => self.reserve(who, kind).map(|()| Vec::new()),
                    2 => self.release(who, kind),
                    3 => Ok(self.clear(who)),
                    _ => self.preempt(who, res_key, sa_key, kind),
                }
            }
        }
    }

    fn others(&self, who: &ItKey, code: (u8, u8)) -> Notices {
        self.registrations
            .keys()
            .filter(|k| *k != who)
            .map(|k| (k.clone(), code.0, code.1))
            .collect()
    }

    fn register(&mut self, who: &ItKey, registered: bool, sa_key: u64) -> Notices {
        let mut notices = Vec::new();
        if sa_key == 0 {
            if registered {
                notices = self.unregister(who);
                self.generation = self.generation.wrapping_add(1);
            }
        } else {
            self.registrations.insert(who.clone(), sa_key);
            self.generation = self.generation.wrapping_add(1);
        }
        notices
    }

    /// Removes `who`'s registration and the reservation it carried (SPC-4 5.13.11.2.2).
    fn unregister(&mut self, who: &ItKey) -> Notices {
        let was_holder = self.is_holder(who);
        self.registrations.remove(who);
        let Some(r) = self.reservation.clone() else {
            return Vec::new();
        };
        if all_registrants(r.kind) {
            if self.registrations.is_empty() {
                self.reservation = None;
            }
            return Vec::new();
        }
        if was_holder {
            self.reservation = None;
            if registrants_only_or_all(r.kind) {
                return self.others(who, RESERVATIONS_RELEASED);
            }
        }
        Vec::new()
    }

    fn reserve(&mut self, who: &ItKey, kind: u8) -> ScsiResult<()> {
        match &self.reservation {
            None => {
                self.reservation = Some(Reservation {
                    holder: who.clone(),
                    kind,
                });
                Ok(())
            }
            Some(r) if r.kind == kind && self.is_holder(who) => Ok(()),
            Some(_) => Err(ScsiError::ReservationConflict),
        }
    }

    fn release(&mut self, who: &ItKey, kind: u8) -> ScsiResult<Notices> {
        let Some(r) = self.reservation.clone() else {
            return Ok(Vec::new());
        };
        if !self.is_holder(who) {
            return Ok(Vec::new());
        }
        if r.kind != kind {
            return Err(INVALID_RELEASE.into());
        }
        self.reservation = None;
        Ok(if registrants_only_or_all(r.kind) {
            self.others(who, RESERVATIONS_RELEASED)
        } else {
            Vec::new()
        })
    }

    fn clear(&mut self, who: &ItKey) -> Notices {
        let notices = self.others(who, RESERVATIONS_PREEMPTED);
        self.registrations.clear();
        self.reservation = None;
        self.generation = self.generation.wrapping_add(1);
        notices
    }

    /// Removes every registration (other than `who`'s) whose key is `key`; `None` when none.
    fn remove_key(&mut self, who: &ItKey, key: u64) -> Option<Notices> {
        let gone: Vec<ItKey> = self
            .registrations
            .iter()
            .filter(|(k, v)| **v == key && *k != who)
            .map(|(k, _)| k.clone())
            .collect();
        // The preempting nexus may name its own key; it then stays registered (SPC-4 5.13.11.2.4).
        let own = self.registrations.get(who) == Some(&key);
        if gone.is_empty() && !own {
            return None;
        }
        for k in &gone {
            self.registrations.remove(k);
        }
        let (asc, ascq) = REGISTRATIONS_PREEMPTED;
        Some(gone.into_iter().map(|k| (k, asc, ascq)).collect())
    }

    fn preempt(
        &mut self,
        who: &ItKey,
        _res_key: u64,
        sa_key: u64,
        kind: u8,
    ) -> ScsiResult<Notices> {
        let notices = match self.reservation.clone() {
            Some(r) if all_registrants(r.kind) && sa_key == 0 => {
                // Preempting an all-registrants reservation with key 0 removes everyone else
                // and makes `who` the holder of a new reservation.
                let gone: Vec<ItKey> = self
                    .registrations
                    .keys()
                    .filter(|k| *k != who)
                    .cloned()
                    .collect();
                for k in &gone {
                    self.registrations.remove(k);
                }
                self.reservation = Some(Reservation {
                    holder: who.clone(),
                    kind,
                });
                let (asc, ascq) = REGISTRATIONS_PREEMPTED;
                gone.into_iter().map(|k| (k, asc, ascq)).collect()
            }
            Some(r)
                if !all_registrants(r.kind)
                    && self.registrations.get(&r.holder) == Some(&sa_key) =>
            {
                let mut notices = self.remove_key(who, sa_key).unwrap_or_default();
                self.reservation = Some(Reservation {
                    holder: who.clone(),
                    kind,
                });
                if r.kind != kind {
                    // Registrants that stay see the type change as a release (SPC-4 5.13.11.2.4).
                    let gone: Vec<ItKey> = notices.iter().map(|n| n.0.clone()).collect();
                    let (asc, ascq) = RESERVATIONS_RELEASED;
                    notices.extend(
                        self.registrations
                            .keys()
                            .filter(|k| *k != who && !gone.contains(k))
                            .map(|k| (k.clone(), asc, ascq)),
                    );
                }
                notices
            }
            _ => {
                if sa_key == 0 {
                    return Err(INVALID_FIELD_IN_PARAMETER_LIST.into());
                }
                self.remove_key(who, sa_key)
                    .ok_or(ScsiError::ReservationConflict)?
            }
        };
        self.generation = self.generation.wrapping_add(1);
        Ok(notices)
    }
}

/// iSCSI TransportID, format 01b "initiator port" (SPC-4 7.6.4.6): "name,i,0xISID",
/// NUL-terminated and padded to a multiple of four, at least 20 bytes.
fn transport_id(who: &ItKey) -> Bytes {
    let isid: String = who.isid.iter().map(|b| format!("{b:02x}")).collect();
    let mut name = format!("{},i,0x{isid}", who.initiator).into_bytes();
    name.push(0);
    while name.len() % 4 != 0 || name.len() < 16 {
        name.push(0);
    }
    let mut b = BytesMut::with_capacity(4 + name.len());
    b.put_u8(0x40 | 0x05);
    b.put_u8(0);
    b.put_u16(name.len() as u16);
    b.put_slice(&name);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn it(n: u8) -> ItKey {
        ItKey {
            initiator: format!("iqn.test:{n}"),
            isid: [n; 6],
            tpgt: 1,
        }
    }

    fn out(
        r: &mut Reservations,
        who: &ItKey,
        sa: u8,
        kind: u8,
        key: u64,
        sa_key: u64,
    ) -> ScsiResult<Notices> {
        let cdb = [0x5f, sa, kind, 0, 0, 0, 0, 0, 24, 0];
        let mut p = vec![0u8; 24];
        p[..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        r.pr_out(who, &cdb, &p)
    }

    #[test]
    fn conflict_matrix_we_and_ea() {
        let (a, b, c) = (it(1), it(2), it(3));
        for kind in [
            pr_type::WRITE_EXCLUSIVE,
            pr_type::EXCLUSIVE_ACCESS,
            pr_type::WE_REGISTRANTS_ONLY,
            pr_type::EA_ALL_REGISTRANTS,
        ] {
            let mut r = Reservations::default();
            out(&mut r, &a, 6, 0, 0, 0xa).unwrap();
            out(&mut r, &b, 6, 0, 0, 0xb).unwrap();
            out(&mut r, &a, 1, kind, 0xa, 0).unwrap();
            // Holder: everything allowed.
            assert!(r.check(&a, Access::Write).is_ok());
            // Registered non-holder: allowed only for registrants-only / all-registrants types.
            let reg_ok = registrants_only_or_all(kind);
            assert_eq!(r.check(&b, Access::Write).is_ok(), reg_ok, "type {kind}");
            // Unregistered: reads pass only under write-exclusive types.
            assert_eq!(
                r.check(&c, Access::Read).is_ok(),
                !exclusive_access(kind),
                "type {kind}"
            );
            assert_eq!(
                r.check(&c, Access::Write),
                Err(ScsiError::ReservationConflict)
            );
            assert!(r.check(&c, Access::Always).is_ok());
            // Another registrant cannot take a different reservation.
            if !all_registrants(kind) {
                assert_eq!(
                    out(&mut r, &b, 1, kind, 0xb, 0),
                    Err(ScsiError::ReservationConflict)
                );
            }
        }
    }

    #[test]
    fn unregistering_holder_releases_unless_all_registrants() {
        let (a, b) = (it(1), it(2));
        let mut r = Reservations::default();
        out(&mut r, &a, 6, 0, 0, 1).unwrap();
        out(&mut r, &b, 6, 0, 0, 2).unwrap();
        out(&mut r, &a, 1, pr_type::EA_REGISTRANTS_ONLY, 1, 0).unwrap();
        let n = out(&mut r, &a, 0, 0, 1, 0).unwrap();
        assert!(r.reservation.is_none());
        assert_eq!(n, vec![(b.clone(), 0x2a, 0x04)]);

        out(&mut r, &a, 6, 0, 0, 1).unwrap();
        out(&mut r, &a, 1, pr_type::WE_ALL_REGISTRANTS, 1, 0).unwrap();
        out(&mut r, &a, 0, 0, 1, 0).unwrap();
        assert!(
            r.reservation.is_some(),
            "b still registered keeps an all-registrants reservation"
        );
        let rr = r.pr_in(&[0x5e, 1, 0, 0, 0, 0, 0, 0, 24, 0]).unwrap();
        assert_eq!(&rr[8..16], &[0; 8], "all-registrants reports key 0");
        assert_eq!(rr[21], pr_type::WE_ALL_REGISTRANTS);
        out(&mut r, &b, 2, pr_type::WE_ALL_REGISTRANTS, 2, 0).unwrap();
        assert!(r.reservation.is_none());
    }

    #[test]
    fn preempt_and_register_rules() {
        let (a, b) = (it(1), it(2));
        let mut r = Reservations::default();
        // Unregistered nexus with the wrong key, or reserving, conflicts.
        assert_eq!(
            out(&mut r, &a, 0, 0, 5, 1),
            Err(ScsiError::ReservationConflict)
        );
        assert_eq!(
            out(&mut r, &a, 1, 1, 0, 0),
            Err(ScsiError::ReservationConflict)
        );
        out(&mut r, &a, 0, 0, 0, 1).unwrap();
        out(&mut r, &b, 0, 0, 0, 2).unwrap();
        out(&mut r, &a, 1, pr_type::WRITE_EXCLUSIVE, 1, 0).unwrap();
        let n = out(&mut r, &b, 4, pr_type::EXCLUSIVE_ACCESS, 2, 1).unwrap();
        assert_eq!(n, vec![(a.clone(), 0x2a, 0x05)]);
        assert!(r.check(&b, Access::Write).is_ok());
        assert_eq!(
            r.check(&a, Access::Read),
            Err(ScsiError::ReservationConflict)
        );
        // Preempting a key nobody holds conflicts; key 0 without all-registrants is invalid.
        assert_eq!(
            out(&mut r, &b, 4, 1, 2, 9),
            Err(ScsiError::ReservationConflict)
        );
        assert!(matches!(
            out(&mut r, &b, 4, 1, 2, 0),
            Err(ScsiError::Check(_))
        ));
        // Bad parameter list length and APTPL.
        let cdb = [0x5f, 6, 0, 0, 0, 0, 0, 0, 23, 0];
        assert!(r.pr_out(&a, &cdb, &[0; 24]).is_err());
        let mut p = [0u8; 24];
        p[20] = 1;
        assert_eq!(
            r.pr_out(&a, &[0x5f, 6, 0, 0, 0, 0, 0, 0, 24, 0], &p),
            Err(INVALID_FIELD_IN_PARAMETER_LIST.into())
        );
        let keys = r.pr_in(&[0x5e, 0, 0, 0, 0, 0, 0, 0, 255, 0]).unwrap();
        assert_eq!(u32::from_be_bytes([keys[4], keys[5], keys[6], keys[7]]), 8);
        let full = r.pr_in(&[0x5e, 3, 0, 0, 0, 0, 0, 0x10, 0, 0]).unwrap();
        assert!(full.len() > 24 + 20);
        for sa in 4..0x20 {
            assert!(r.pr_in(&[0x5e, sa, 0, 0, 0, 0, 0, 0, 255, 0]).is_err());
        }
    }

    #[test]
    fn spc2_reservations() {
        let (a, b) = (it(1), it(2));
        let mut r = Reservations::default();
        r.check(&a, Access::Reserve).unwrap();
        r.reserve_spc2(&a);
        assert_eq!(
            r.check(&b, Access::Reserve),
            Err(ScsiError::ReservationConflict)
        );
        assert_eq!(
            r.check(&b, Access::Read),
            Err(ScsiError::ReservationConflict)
        );
        assert!(r.check(&b, Access::Release).is_ok());
        r.release_spc2(&b);
        assert_eq!(r.spc2_holder(), Some(&a));
        r.release_spc2(&a);
        assert!(r.check(&b, Access::Write).is_ok());
    }
}
