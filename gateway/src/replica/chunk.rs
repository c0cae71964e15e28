//! One chunk as the gateway sees it: its replica set and epoch (from the manager), its next
//! write sequence number, the byte ranges being written, and whether its replicas have been
//! reconciled since this gateway took the volume.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The manager's view of a chunk's replicas, as last fetched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    pub epoch: u64,
    /// Node ids, in placement order.
    pub replicas: Vec<String>,
    /// A rebuild target: written to, never read from, until its task completes.
    pub joining: Option<String>,
    /// To be filled from the volume's source (clone, restore) before any I/O.
    pub fill: bool,
}

impl View {
    pub fn from_proto(c: &ironsan_common::proto::manager::Chunk) -> Self {
        View {
            epoch: c.epoch,
            replicas: c.replicas.clone(),
            joining: Some(c.joining.clone()).filter(|j| !j.is_empty()),
            fill: c.fill,
        }
    }

    /// Every node a write must reach: the set, then the joiner.
    pub fn write_targets(&self) -> impl Iterator<Item = &String> {
        self.replicas.iter().chain(self.joining.iter())
    }
}

pub struct Chunk {
    pub index: u32,
    /// Shared, so that an I/O takes a reference rather than copying the node list.
    view: Mutex<Arc<View>>,
    /// Sequence number the next write takes (replicas order their write logs by it).
    next_seq: AtomicU64,
    /// False until the replicas were reconciled under this gateway's writer epoch, and again
    /// after a write whose outcome differs between replicas.
    ready: AtomicBool,
    /// Written since the last flush (a flush only needs to reach these chunks' replicas).
    written: AtomicBool,
    /// Held while reconciling, so one task does it and the others wait for it.
    pub sync: tokio::sync::Mutex<()>,
    /// A joiner whose snapshots are still being rebuilt: writes and snapshot operations skip
    /// it until its live copy starts (`sync.rs`).
    held: Mutex<Option<String>>,
    pub locks: RangeLocks,
}

impl Chunk {
    pub fn new(index: u32, view: View) -> Self {
        Chunk {
            index,
            view: Mutex::new(Arc::new(view)),
            next_seq: AtomicU64::new(1),
            ready: AtomicBool::new(false),
            written: AtomicBool::new(false),
            sync: tokio::sync::Mutex::new(()),
            held: Mutex::new(None),
            locks: RangeLocks::default(),
        }
    }

    pub fn view(&self) -> Arc<View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Installs a newer view; an older one (a slow answer overtaken by a newer) is ignored.
    pub fn set_view(&self, v: View) {
        let mut cur = self.view.lock().unwrap_or_else(|p| p.into_inner());
        if v.epoch >= cur.epoch {
            *cur = Arc::new(v);
        }
    }

    /// Every node a write must reach now: the set, then the joiner unless it is held (only
    /// a chunk with a joiner looks at the hold, so the common path takes no lock).
    pub fn write_targets<'a>(&self, view: &'a View) -> impl Iterator<Item = &'a String> {
        let held = match view.joining {
            Some(_) => self.held.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            None => None,
        };
        view.write_targets()
            .filter(move |n| held.as_ref() != Some(*n))
    }

    pub fn hold(&self, joiner: Option<String>) {
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = joiner;
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::AcqRel)
    }

    /// Makes the next sequence number at least `seq`.
    pub fn seq_at_least(&self, seq: u64) {
        self.next_seq.fetch_max(seq, Ordering::AcqRel);
    }

    pub fn mark_written(&self) {
        self.written.store(true, Ordering::Release);
    }

    /// Whether the chunk was written since the last call (the flag is cleared).
    pub fn take_written(&self) -> bool {
        self.written.swap(false, Ordering::AcqRel)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }
}

/// Byte-range locks within one chunk. Overlapping writes must reach every replica in the same
/// order, or two replicas could end up holding different "last" data for a block that both
/// acknowledged; so a write waits for any overlapping one in flight (FIFO is not promised,
/// only mutual exclusion). Rebuild copies take the same locks for the piece they copy.
#[derive(Default)]
pub struct RangeLocks {
    held: Mutex<Vec<(u64, u64, u64)>>,
    next_id: AtomicU64,
    released: Notify,
}

/// Releases its range on drop.
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    id: u64,
}

impl RangeLocks {
    pub async fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        loop {
            // Register interest before checking, so a release in between is not missed.
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
                if !held.iter().any(|&(s, e, _)| s < end && start < e) {
                    held.push((start, end, id));
                    return RangeGuard { locks: self, id };
                }
            }
            notified.await;
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|p| p.into_inner());
        held.retain(|&(_, _, id)| id != self.id);
        drop(held);
        self.locks.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_ranges_exclude_each_other() {
        let locks = Arc::new(RangeLocks::default());
        let g = locks.lock(0, 4096).await;
        // Disjoint: immediate.
        let other = tokio::time::timeout(Duration::from_millis(100), locks.lock(4096, 8192)).await;
        assert!(other.is_ok(), "a disjoint range must not wait");
        drop(other);
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock(1024, 2048).await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "an overlapping range must wait");
        drop(g);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("released range must wake the waiter")
            .expect("waiter task");
    }
}
