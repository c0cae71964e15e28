//! Sessions: the registry of logged-in initiator ports, TSIH allocation and session
//! reinstatement (RFC 7143 §6.3.5).
//!
//! A session is keyed by (InitiatorName, ISID, TargetName). A new leading login with the
//! key of a live session reinstates it: the old connection is cancelled and awaited before
//! the new one enters Full Feature Phase, so two connections never act for one initiator
//! port at once. We negotiate MaxConnections=1, so a session has exactly one connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::scsi::Nexus;
use crate::target::Target;

/// The identity of an initiator port at one target (discovery sessions have no target).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub initiator: String,
    pub isid: [u8; 6],
    pub target: Option<String>,
}

/// One logged-in session.
pub struct Session {
    pub key: SessionKey,
    pub tsih: u16,
    pub nexus: Nexus,
    pub target: Option<Arc<Target>>,
    /// Cancels the session's connection (reinstatement, shutdown).
    pub cancel: CancellationToken,
    /// Becomes `true` when the connection task has finished.
    done: watch::Receiver<bool>,
}

/// Dropped by the connection task when it ends; wakes a reinstating login.
pub struct SessionGuard {
    registry: Arc<Registry>,
    session: Arc<Session>,
    done: watch::Sender<bool>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let _ = self.done.send(true);
        self.registry.remove(&self.session);
        if let Some(t) = &self.session.target {
            t.lun.nexus_gone(&self.session.nexus);
        }
        crate::metrics::session_closed();
    }
}

impl SessionGuard {
    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }
}

/// All sessions of the gateway.
#[derive(Default)]
pub struct Registry {
    sessions: Mutex<HashMap<SessionKey, Arc<Session>>>,
    next_tsih: AtomicU16,
    next_nexus: AtomicU64,
}

impl Registry {
    /// Registers a new session for `key`, first ending any live session with the same key.
    pub async fn create(
        self: &Arc<Self>,
        key: SessionKey,
        target: Option<Arc<Target>>,
        tpgt: u16,
        parent: &CancellationToken,
    ) -> SessionGuard {
        let old = self
            .sessions
            .lock()
            .map(|mut s| s.remove(&key))
            .unwrap_or(None);
        if let Some(old) = old {
            tracing::info!(initiator = %key.initiator, tsih = old.tsih, "reinstating session");
            old.cancel.cancel();
            let mut done = old.done.clone();
            // The old connection drains its in-flight commands first; bound the wait so a
            // wedged backend cannot block logins forever.
            let _ = tokio::time::timeout(Duration::from_secs(30), done.wait_for(|d| *d)).await;
        }
        let tsih = loop {
            let t = self
                .next_tsih
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(1);
            if t != 0 {
                break t;
            }
        };
        let nexus = Nexus {
            id: self.next_nexus.fetch_add(1, Ordering::Relaxed) + 1,
            initiator: key.initiator.clone(),
            isid: key.isid,
            tpgt,
        };
        if let Some(t) = &target {
            t.lun.nexus_joined(&nexus);
        }
        let (done_tx, done_rx) = watch::channel(false);
        let session = Arc::new(Session {
            key: key.clone(),
            tsih,
            nexus,
            target,
            cancel: parent.child_token(),
            done: done_rx,
        });
        if let Ok(mut s) = self.sessions.lock() {
            s.insert(key, session.clone());
        }
        crate::metrics::session_opened();
        SessionGuard {
            registry: self.clone(),
            session,
            done: done_tx,
        }
    }

    /// Finds a live session by TSIH for a login that names one.
    pub fn find(&self, key: &SessionKey, tsih: u16) -> Option<Arc<Session>> {
        let s = self.sessions.lock().ok()?;
        s.get(key).filter(|s| s.tsih == tsih).cloned()
    }

    fn remove(&self, session: &Arc<Session>) {
        if let Ok(mut s) = self.sessions.lock() {
            if s.get(&session.key)
                .is_some_and(|cur| Arc::ptr_eq(cur, session))
            {
                s.remove(&session.key);
            }
        }
    }

    /// Ends every session logged in to `iqn` (the target is going away).
    pub fn end_target(&self, iqn: &str) {
        if let Ok(s) = self.sessions.lock() {
            for sess in s.values() {
                if sess.key.target.as_deref() == Some(iqn) {
                    sess.cancel.cancel();
                }
            }
        }
    }

    pub fn count(&self) -> usize {
        self.sessions.lock().map(|s| s.len()).unwrap_or(0)
    }
}
