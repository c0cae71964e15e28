//! The driver's errors: [`CsiError`] for starting up, and the mapping of manager answers onto
//! the gRPC codes the CSI spec asks for.

use ironsan_common::manager_client::ClientError;
use tonic011::{Code, Status};

/// Why the driver could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic011::transport::Error),
}

/// A manager error as a CSI status, prefixed with what was being done. The manager already
/// speaks gRPC codes (NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, RESOURCE_EXHAUSTED,
/// UNAVAILABLE, ...) with the meanings CSI gives them, so the code carries over; "no member
/// answered" is UNAVAILABLE, which the sidecars retry.
pub(crate) fn manager_status(what: &str, e: &ClientError) -> Status {
    Status::new(
        Code::from_i32(e.code() as i32),
        format!("{what}: {}", e.message()),
    )
}

pub(crate) fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg)
}
