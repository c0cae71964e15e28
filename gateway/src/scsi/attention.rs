//! Unit attention conditions (SAM-5 5.14), queued per I_T nexus.
//!
//! A condition is established for every nexus the LUN has seen, reported once (CHECK
//! CONDITION, UNIT ATTENTION) on that nexus's next command other than INQUIRY, REPORT LUNS
//! and REQUEST SENSE, or returned and cleared by REQUEST SENSE.

use std::collections::{HashMap, HashSet, VecDeque};

use super::reservation::ItKey;
use super::sense::{key, Sense};

/// Pending unit attentions and the set of nexuses they go to.
#[derive(Debug, Default)]
pub struct UnitAttentions {
    known: HashSet<ItKey>,
    pending: HashMap<ItKey, VecDeque<(u8, u8)>>,
}

/// Bound on queued conditions per nexus; older ones are dropped first, as a real device
/// would collapse them.
const MAX_PENDING: usize = 8;

impl UnitAttentions {
    /// Records that `who` has issued commands; later broadcasts include it.
    pub fn seen(&mut self, who: &ItKey) {
        if !self.known.contains(who) {
            self.known.insert(who.clone());
        }
    }

    /// Queues `asc`/`ascq` for `who`, once.
    pub fn establish(&mut self, who: &ItKey, asc: u8, ascq: u8) {
        let q = self.pending.entry(who.clone()).or_default();
        if !q.contains(&(asc, ascq)) {
            if q.len() >= MAX_PENDING {
                q.pop_front();
            }
            q.push_back((asc, ascq));
        }
    }

    /// Queues `asc`/`ascq` for every known nexus.
    pub fn broadcast(&mut self, asc: u8, ascq: u8) {
        let all: Vec<ItKey> = self.known.iter().cloned().collect();
        for who in all {
            self.establish(&who, asc, ascq);
        }
    }

    /// Takes the oldest pending condition for `who`.
    pub fn take(&mut self, who: &ItKey) -> Option<Sense> {
        let q = self.pending.get_mut(who)?;
        let (asc, ascq) = q.pop_front()?;
        if q.is_empty() {
            self.pending.remove(who);
        }
        Some(Sense::new(key::UNIT_ATTENTION, asc, ascq))
    }
}
