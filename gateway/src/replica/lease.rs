//! The writer lease of one volume as the gateway can prove it.
//!
//! The manager grants a lease of `lease_ms` from its own clock. The gateway never compares
//! clocks: it counts the lease from the moment it *sent* the request that was granted, on its
//! monotonic clock, so it stops I/O no later than the manager lets another gateway in (a
//! takeover that comes earlier anyway, say after a leader change, is fenced at storage by the
//! new writer epoch).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::device::DeviceError;

#[derive(Debug, Default)]
struct State {
    writer_epoch: u64,
    valid_until: Option<Instant>,
    /// Released, detached or taken over: no renewal can bring it back.
    lost: Option<String>,
}

#[derive(Debug, Default)]
pub struct Lease {
    state: Mutex<State>,
}

impl Lease {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The writer epoch, if the lease is provably valid now.
    pub fn check(&self) -> Result<u64, DeviceError> {
        let s = self.state();
        if let Some(why) = &s.lost {
            return Err(DeviceError::Fenced(why.clone()));
        }
        match s.valid_until {
            Some(t) if Instant::now() < t => Ok(s.writer_epoch),
            _ => Err(DeviceError::Fenced(
                "the volume's lease could not be renewed in time".into(),
            )),
        }
    }

    /// A grant (attach or renewal) at `epoch`, for a request sent at `sent`.
    pub fn granted(&self, epoch: u64, sent: Instant, lease: Duration) {
        let mut s = self.state();
        if s.lost.is_some() {
            return;
        }
        s.writer_epoch = epoch;
        s.valid_until = Some(sent + lease);
    }

    /// The epoch of the current (or last) grant, valid or not.
    pub fn epoch(&self) -> u64 {
        self.state().writer_epoch
    }

    pub fn lose(&self, why: impl Into<String>) {
        let mut s = self.state();
        if s.lost.is_none() {
            s.lost = Some(why.into());
        }
    }

    pub fn is_lost(&self) -> bool {
        self.state().lost.is_some()
    }

    /// Time left on the lease (zero when lapsed or lost).
    pub fn remaining(&self) -> Duration {
        let s = self.state();
        match (&s.lost, s.valid_until) {
            (None, Some(t)) => t.saturating_duration_since(Instant::now()),
            _ => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_counts_from_the_sending_time() {
        let l = Lease::default();
        assert!(l.check().is_err(), "no grant yet");
        l.granted(7, Instant::now(), Duration::from_secs(10));
        assert_eq!(l.check().expect("valid lease"), 7);
        // A grant whose request left long ago is already over.
        let old = Instant::now() - Duration::from_secs(11);
        let l2 = Lease::default();
        l2.granted(3, old, Duration::from_secs(10));
        assert!(l2.check().is_err());
        l.lose("detached");
        assert!(l.check().is_err());
        l.granted(8, Instant::now(), Duration::from_secs(10));
        assert!(l.check().is_err(), "a lost lease stays lost");
    }
}
