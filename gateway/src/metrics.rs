//! Gateway metrics: sessions, logins, rejected PDUs, and per-volume operation counts, bytes
//! and latencies. Handles are created once per volume so the data path only bumps atomics.

use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Histogram};

use crate::scsi::{Response, Status};

pub fn session_opened() {
    gauge!("ironsan_gateway_sessions").increment(1.0);
    counter!("ironsan_gateway_logins_total", "result" => "ok").increment(1);
}

pub fn session_closed() {
    gauge!("ironsan_gateway_sessions").decrement(1.0);
}

pub fn login_failed() {
    counter!("ironsan_gateway_logins_total", "result" => "failed").increment(1);
}

pub fn pdu_rejected() {
    counter!("ironsan_gateway_rejected_pdus_total").increment(1);
}

/// Per-volume counters.
pub struct TargetMetrics {
    reads: Counter,
    writes: Counter,
    others: Counter,
    read_bytes: Counter,
    write_bytes: Counter,
    errors: Counter,
    read_latency: Histogram,
    write_latency: Histogram,
}

impl TargetMetrics {
    pub fn new(volume: &str) -> Self {
        let v = volume.to_string();
        Self {
            reads: counter!("ironsan_gateway_commands_total", "volume" => v.clone(), "kind" => "read"),
            writes: counter!("ironsan_gateway_commands_total", "volume" => v.clone(), "kind" => "write"),
            others: counter!("ironsan_gateway_commands_total", "volume" => v.clone(), "kind" => "other"),
            read_bytes: counter!("ironsan_gateway_bytes_total", "volume" => v.clone(), "dir" => "read"),
            write_bytes: counter!("ironsan_gateway_bytes_total", "volume" => v.clone(), "dir" => "write"),
            errors: counter!("ironsan_gateway_check_conditions_total", "volume" => v.clone()),
            read_latency: histogram!("ironsan_gateway_latency_seconds", "volume" => v.clone(), "kind" => "read"),
            write_latency: histogram!("ironsan_gateway_latency_seconds", "volume" => v, "kind" => "write"),
        }
    }

    /// Records one completed command; `out_len` is the data-out it carried.
    pub fn command(&self, cdb: &[u8], resp: &Response, out_len: usize, elapsed: Duration) {
        if resp.status != Status::Good && resp.status != Status::ConditionMet {
            self.errors.increment(1);
        }
        match cdb.first() {
            Some(0x08 | 0x28 | 0xa8 | 0x88) => {
                self.reads.increment(1);
                self.read_bytes.increment(resp.data.len() as u64);
                self.read_latency.record(elapsed.as_secs_f64());
            }
            Some(0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e | 0x89 | 0x8b) => {
                self.writes.increment(1);
                self.write_bytes.increment(out_len as u64);
                self.write_latency.record(elapsed.as_secs_f64());
            }
            _ => self.others.increment(1),
        }
    }
}
