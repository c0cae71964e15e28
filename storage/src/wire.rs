//! Translation between the storage crate's types and the data-path protobuf, done once here:
//! every [`Error`] becomes a status code plus the fields needed to rebuild it, and a remote
//! status becomes the very same `Error` variant on the client (a stale epoch carries the
//! replica's epoch, a checksum error its block), so the gateway branches on causes, not text.

use std::io;

pub use ironsan_common::proto::datapath::{
    ChunkInfo as WireChunkInfo, ErrorDetail, Op, Range, Request, Response,
    SnapshotInfo as WireSnapshotInfo, Status,
};

use crate::chunk::{ChunkId, ChunkInfo, SnapshotInfo, WrittenRange};
use crate::error::Error;

/// The chunk a request addresses.
pub fn chunk_of(req: &Request) -> ChunkId {
    ChunkId::new(req.volume, req.index)
}

pub fn info_to_wire(i: &ChunkInfo) -> WireChunkInfo {
    WireChunkInfo {
        size: i.size,
        epoch: i.epoch,
        version: i.version,
        log_start: i.log_start,
        used: i.used,
        bad_blocks: i.bad_blocks,
        disk: i.disk as u32,
    }
}

pub fn info_from_wire(id: ChunkId, i: &WireChunkInfo) -> ChunkInfo {
    ChunkInfo {
        id,
        size: i.size,
        epoch: i.epoch,
        version: i.version,
        log_start: i.log_start,
        used: i.used,
        bad_blocks: i.bad_blocks,
        disk: i.disk as usize,
    }
}

pub fn snapshots_to_wire(s: &[SnapshotInfo]) -> Vec<WireSnapshotInfo> {
    s.iter()
        .map(|s| WireSnapshotInfo {
            id: s.id,
            version: s.version,
            used: s.used,
            blocks: s.blocks,
        })
        .collect()
}

pub fn snapshots_from_wire(s: &[WireSnapshotInfo]) -> Vec<SnapshotInfo> {
    s.iter()
        .map(|s| SnapshotInfo {
            id: s.id,
            version: s.version,
            used: s.used,
            blocks: s.blocks,
        })
        .collect()
}

pub fn ranges_to_wire(r: &[WrittenRange]) -> Vec<Range> {
    r.iter()
        .map(|r| Range {
            offset: r.offset,
            len: r.len,
        })
        .collect()
}

pub fn ranges_from_wire(r: &[Range]) -> Vec<WrittenRange> {
    r.iter()
        .map(|r| WrittenRange {
            offset: r.offset,
            len: r.len,
        })
        .collect()
}

/// A successful response to `request_id`.
pub fn ok(request_id: u64) -> Response {
    Response {
        request_id,
        status: Status::Ok as i32,
        ..Default::default()
    }
}

/// The status code of `e` (client-side variants never travel; they map to the nearest code).
pub fn status_of(e: &Error) -> Status {
    match e {
        Error::NotFound(_) => Status::NotFound,
        Error::Exists(_) => Status::Exists,
        Error::SnapshotNotFound { .. } => Status::SnapshotNotFound,
        Error::SnapshotExists { .. } => Status::SnapshotExists,
        Error::StaleEpoch { .. } => Status::StaleEpoch,
        Error::OutOfRange { .. } => Status::OutOfRange,
        Error::Checksum { .. } => Status::Checksum,
        Error::NoSpace { .. } => Status::NoSpace,
        Error::DiskFailed { .. } => Status::DiskFailed,
        Error::LogTruncated { .. } => Status::LogTruncated,
        Error::Invalid(_) | Error::Protocol(_) => Status::Invalid,
        Error::Io { .. } | Error::Connect { .. } | Error::Disconnected { .. } => Status::Io,
        Error::Timeout { .. } => Status::Io,
        Error::Meta { .. } => Status::Meta,
        Error::ShuttingDown => Status::ShuttingDown,
        Error::Remote { code, .. } => Status::try_from(*code).unwrap_or(Status::Invalid),
    }
}

/// The error response to `request_id` for `e`.
pub fn error_response(request_id: u64, e: &Error) -> Response {
    let mut d = ErrorDetail::default();
    let chunk = |c: &ChunkId, d: &mut ErrorDetail| {
        d.volume = c.volume;
        d.index = c.index;
    };
    match e {
        Error::NotFound(c) | Error::Exists(c) => chunk(c, &mut d),
        Error::SnapshotNotFound { chunk: c, snapshot }
        | Error::SnapshotExists { chunk: c, snapshot } => {
            chunk(c, &mut d);
            d.snapshot = *snapshot;
        }
        Error::StaleEpoch {
            chunk: c,
            got,
            current,
        } => {
            chunk(c, &mut d);
            d.got = *got;
            d.current = *current;
        }
        Error::OutOfRange {
            chunk: c,
            offset,
            len,
            size,
        } => {
            chunk(c, &mut d);
            (d.offset, d.len, d.size) = (*offset, *len, *size);
        }
        Error::Checksum { chunk: c, block } => {
            chunk(c, &mut d);
            d.block = *block;
        }
        Error::NoSpace { dir } => d.dir = dir.clone(),
        Error::DiskFailed { dir, reason } | Error::Meta { dir, reason } => {
            d.dir = dir.clone();
            d.reason = reason.clone();
        }
        Error::LogTruncated {
            chunk: c,
            since,
            log_start,
        } => {
            chunk(c, &mut d);
            (d.since, d.log_start) = (*since, *log_start);
        }
        Error::Io { dir, source } => {
            d.dir = dir.clone();
            d.reason = source.to_string();
            d.errno = source.raw_os_error().unwrap_or(0);
        }
        Error::Invalid(m) | Error::Protocol(m) => d.reason = m.clone(),
        Error::Remote { message, .. } => d.reason = message.clone(),
        Error::ShuttingDown
        | Error::Connect { .. }
        | Error::Disconnected { .. }
        | Error::Timeout { .. } => {}
    }
    Response {
        request_id,
        status: status_of(e) as i32,
        message: e.to_string(),
        error: Some(d),
        ..Default::default()
    }
}

/// An UNKNOWN_OP answer.
pub fn unknown_op(request_id: u64, op: i32) -> Response {
    Response {
        request_id,
        status: Status::UnknownOp as i32,
        message: format!("unknown op {op}"),
        ..Default::default()
    }
}

/// The error a non-OK response stands for (`None` for OK).
pub fn response_error(r: &Response) -> Option<Error> {
    let d = r.error.clone().unwrap_or_default();
    let c = ChunkId::new(d.volume, d.index);
    let status = match Status::try_from(r.status) {
        Ok(Status::Ok) => return None,
        Ok(s) => s,
        Err(_) => {
            return Some(Error::Protocol(format!(
                "unknown status {} ({})",
                r.status, r.message
            )))
        }
    };
    Some(match status {
        Status::Ok => return None,
        Status::NotFound => Error::NotFound(c),
        Status::Exists => Error::Exists(c),
        Status::SnapshotNotFound => Error::SnapshotNotFound {
            chunk: c,
            snapshot: d.snapshot,
        },
        Status::SnapshotExists => Error::SnapshotExists {
            chunk: c,
            snapshot: d.snapshot,
        },
        Status::StaleEpoch => Error::StaleEpoch {
            chunk: c,
            got: d.got,
            current: d.current,
        },
        Status::OutOfRange => Error::OutOfRange {
            chunk: c,
            offset: d.offset,
            len: d.len,
            size: d.size,
        },
        Status::Checksum => Error::Checksum {
            chunk: c,
            block: d.block,
        },
        Status::NoSpace => Error::NoSpace { dir: d.dir },
        Status::DiskFailed => Error::DiskFailed {
            dir: d.dir,
            reason: d.reason,
        },
        Status::LogTruncated => Error::LogTruncated {
            chunk: c,
            since: d.since,
            log_start: d.log_start,
        },
        Status::Invalid => Error::Invalid(if d.reason.is_empty() {
            r.message.clone()
        } else {
            d.reason
        }),
        Status::Io => Error::Io {
            dir: d.dir,
            source: if d.errno != 0 {
                io::Error::from_raw_os_error(d.errno)
            } else {
                io::Error::other(d.reason)
            },
        },
        Status::Meta => Error::Meta {
            dir: d.dir,
            reason: d.reason,
        },
        Status::ShuttingDown => Error::ShuttingDown,
        Status::UnknownOp => Error::Remote {
            code: r.status,
            message: r.message.clone(),
        },
        Status::Unspecified => Error::Protocol(format!("response without status ({})", r.message)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_round_trips() {
        let c = ChunkId::new(9, 4);
        let errors = vec![
            Error::NotFound(c),
            Error::Exists(c),
            Error::SnapshotNotFound {
                chunk: c,
                snapshot: 12,
            },
            Error::SnapshotExists {
                chunk: c,
                snapshot: 13,
            },
            Error::StaleEpoch {
                chunk: c,
                got: 3,
                current: 5,
            },
            Error::OutOfRange {
                chunk: c,
                offset: 1,
                len: 2,
                size: 3,
            },
            Error::Checksum {
                chunk: c,
                block: 77,
            },
            Error::NoSpace { dir: "/d".into() },
            Error::DiskFailed {
                dir: "/d".into(),
                reason: "EIO".into(),
            },
            Error::LogTruncated {
                chunk: c,
                since: 4,
                log_start: 10,
            },
            Error::Invalid("bad".into()),
            Error::Io {
                dir: "/d".into(),
                source: io::Error::from_raw_os_error(libc::EIO),
            },
            Error::Meta {
                dir: "/d".into(),
                reason: "corrupt".into(),
            },
            Error::ShuttingDown,
        ];
        for e in errors {
            let r = error_response(42, &e);
            assert_eq!(r.request_id, 42);
            let back = response_error(&r).expect("an error");
            assert_eq!(back.to_string(), e.to_string());
            assert_eq!(status_of(&back), status_of(&e));
        }
        assert!(response_error(&ok(1)).is_none());
        assert!(matches!(
            response_error(&unknown_op(1, 99)),
            Some(Error::Remote { .. })
        ));
        let weird = Response {
            status: 1000,
            ..Default::default()
        };
        assert!(matches!(response_error(&weird), Some(Error::Protocol(_))));
    }
}
