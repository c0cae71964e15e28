//! Raft messages between members: one tokio task per peer drains that peer's queue into one
//! `RaftPeer.Send` gRPC call per batch.
//!
//! Peer addresses may be DNS names that resolve only later (a StatefulSet's records appear as
//! its pods start): the lazy channel resolves at every reconnect, so an unresolvable peer is
//! just an unreachable one until its name appears.
//!
//! Raft tolerates loss, so the transport never retries a failed batch: it reports the peer
//! unreachable (the leader then probes instead of streaming) and drops what was queued beyond
//! a bound. Messages are raft-rs's own protobuf (rust-protobuf 2) carried as bytes; the
//! receiving side decodes them, which is only safe from members of the group
//! (RUSTSEC-2024-0437): the manager port must sit on a network only members and operators reach.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ironsan_common::proto::manager::raft_peer_client::RaftPeerClient;
use ironsan_common::proto::manager::RaftBatch;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use crate::node::Reporter;

/// A peer queue longer than this is cut: Raft resends what matters.
const MAX_QUEUED: usize = 4096;
const SEND_TIMEOUT: Duration = Duration::from_secs(3);
/// Large enough for a state snapshot of the biggest allowed state.
pub const MAX_MESSAGE: usize = 256 << 20;

struct Peer {
    addr: String,
    tx: mpsc::UnboundedSender<Message>,
}

pub struct Transport {
    me: u64,
    runtime: tokio::runtime::Handle,
    addrs: Arc<RwLock<BTreeMap<u64, String>>>,
    peers: HashMap<u64, Peer>,
    reporter: Reporter,
}

impl Transport {
    pub fn new(
        me: u64,
        runtime: tokio::runtime::Handle,
        addrs: Arc<RwLock<BTreeMap<u64, String>>>,
        reporter: Reporter,
    ) -> Self {
        Transport {
            me,
            runtime,
            addrs,
            peers: HashMap::new(),
            reporter,
        }
    }

    /// Queues messages for their peers; never blocks.
    pub fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            let to = m.to;
            let addr = match self.addrs.read() {
                Ok(a) => a.get(&to).cloned(),
                Err(p) => p.into_inner().get(&to).cloned(),
            };
            let Some(addr) = addr else {
                tracing::debug!(to, "no address for raft peer; message dropped");
                self.reporter.unreachable(to);
                continue;
            };
            let stale = self
                .peers
                .get(&to)
                .is_none_or(|p| p.addr != addr || p.tx.is_closed());
            if stale {
                let (tx, rx) = mpsc::unbounded_channel();
                self.runtime.spawn(peer_task(
                    self.me,
                    to,
                    addr.clone(),
                    rx,
                    self.reporter.clone(),
                ));
                self.peers.insert(to, Peer { addr, tx });
            }
            if let Some(p) = self.peers.get(&to) {
                let _ = p.tx.send(m);
            }
        }
    }
}

fn channel(addr: &str) -> Option<Channel> {
    let ep = Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5));
    Some(ep.connect_lazy())
}

async fn peer_task(
    me: u64,
    to: u64,
    addr: String,
    mut rx: mpsc::UnboundedReceiver<Message>,
    reporter: Reporter,
) {
    let Some(ch) = channel(&addr) else {
        tracing::warn!(to, %addr, "bad raft peer address");
        return;
    };
    let mut client = RaftPeerClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.clear();
        batch.push(first);
        while let Ok(m) = rx.try_recv() {
            batch.push(m);
        }
        if batch.len() > MAX_QUEUED {
            let cut = batch.len() - MAX_QUEUED;
            batch.drain(..cut);
        }
        let snapshots: Vec<bool> = batch
            .iter()
            .map(|m| m.get_msg_type() == MessageType::MsgSnapshot)
            .collect();
        let messages = batch
            .iter()
            .filter_map(|m| m.write_to_bytes().ok())
            .collect();
        let req = RaftBatch { from: me, messages };
        let ok = matches!(
            tokio::time::timeout(SEND_TIMEOUT, client.send(req)).await,
            Ok(Ok(_))
        );
        if !ok {
            reporter.unreachable(to);
        }
        for (i, is_snap) in snapshots.into_iter().enumerate() {
            if is_snap {
                tracing::info!(
                    to,
                    ok,
                    index = batch[i].get_snapshot().get_metadata().index,
                    "snapshot sent"
                );
                reporter.snapshot(to, ok);
            }
        }
    }
}
