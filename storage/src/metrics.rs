//! Storage daemon metrics: data-path requests and latency by op, errors by status, bytes in and
//! out, connections and dropped (corrupt) connections; and the membership's registrations,
//! heartbeats and ordered drops. Per-op handles are created once per server so a request only
//! bumps atomics; errors and membership events are rare and use the macros.

use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Histogram};

use crate::wire::{Op, Status};

/// Ops by wire number; index 0 collects unknown ones.
const OPS: [&str; 10] = [
    "unknown",
    "create",
    "write",
    "read",
    "write_zeroes",
    "flush",
    "info",
    "delete",
    "written_since",
    "copy",
];

struct PerOp {
    requests: Counter,
    latency: Histogram,
}

pub struct ServerMetrics {
    ops: Vec<PerOp>,
    bytes_in: Counter,
    bytes_out: Counter,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerMetrics {
    pub fn new() -> Self {
        Self {
            ops: OPS
                .iter()
                .map(|&op| PerOp {
                    requests: counter!("ironsan_storage_requests_total", "op" => op),
                    latency: histogram!("ironsan_storage_latency_seconds", "op" => op),
                })
                .collect(),
            bytes_in: counter!("ironsan_storage_bytes_total", "dir" => "in"),
            bytes_out: counter!("ironsan_storage_bytes_total", "dir" => "out"),
        }
    }

    /// One finished request: its op, status, payload bytes received and sent.
    pub fn request(&self, op: i32, status: Status, bytes_in: usize, bytes_out: usize, t: Duration) {
        let i = match Op::try_from(op) {
            Ok(Op::Unspecified) | Err(_) => 0,
            Ok(o) => o as usize,
        };
        if let Some(m) = self.ops.get(i) {
            m.requests.increment(1);
            m.latency.record(t.as_secs_f64());
        }
        self.bytes_in.increment(bytes_in as u64);
        self.bytes_out.increment(bytes_out as u64);
        if status != Status::Ok {
            counter!("ironsan_storage_errors_total", "status" => status.as_str_name()).increment(1);
        }
    }
}

pub fn connection_opened() {
    gauge!("ironsan_storage_connections").increment(1.0);
}

pub fn connection_closed() {
    gauge!("ironsan_storage_connections").decrement(1.0);
}

/// A connection closed because of a corrupt frame.
pub fn protocol_error() {
    counter!("ironsan_storage_protocol_errors_total").increment(1);
}

/// A connection refused because the server is at its connection limit.
pub fn connection_refused() {
    counter!("ironsan_storage_refused_connections_total").increment(1);
}

/// One heartbeat to the manager: `ok`, `not_found` (the manager forgot the node) or `error`.
pub fn manager_heartbeat(result: &'static str) {
    counter!("ironsan_storage_manager_heartbeats_total", "result" => result).increment(1);
}

/// One registration attempt with the manager: `ok` or `error`.
pub fn manager_registration(result: &'static str) {
    counter!("ironsan_storage_manager_registrations_total", "result" => result).increment(1);
}

/// A replica deleted on the manager's order.
pub fn manager_chunk_dropped() {
    counter!("ironsan_storage_manager_dropped_chunks_total").increment(1);
}
