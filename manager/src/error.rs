//! The manager's error enum and its one translation to gRPC statuses.

use tonic::{Code, Status};

use crate::state::Reject;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The state machine refused the request (validation at apply or before proposing).
    #[error("{}", .0.message)]
    Rejected(Reject),
    /// No leader is known here: an election is running or this member is cut off from a
    /// majority. Another member may answer.
    #[error("no leader reachable from member {member}: election in progress or this member is in a minority partition")]
    NoLeader { member: u64 },
    /// The leader changed before the command committed; it may or may not take effect.
    #[error(
        "leadership changed before the request committed; its outcome is unknown, check and retry"
    )]
    LeadershipLost,
    /// The leader has not yet applied its previous configuration change, or (newly elected)
    /// the entries it inherited; Raft allows one change in flight.
    #[error("the leader is still applying an earlier configuration change; retry")]
    ConfChangePending,
    #[error("timed out waiting for the Raft group ({0}); the group may have lost its quorum")]
    Timeout(&'static str),
    #[error("member is shutting down")]
    ShuttingDown,
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("raft log: {0}")]
    Log(#[from] crate::raftlog::Error),
    #[error("forwarding to the leader at {addr}: {status}")]
    Forward { addr: String, status: Status },
    #[error("{0}")]
    Config(String),
    #[error("corrupt entry: {0}")]
    Corrupt(String),
}

impl From<Reject> for Error {
    fn from(r: Reject) -> Self {
        Error::Rejected(r)
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match e {
            Error::Rejected(r) => Status::new(r.code, r.message),
            // A status from the leader goes back to the client unchanged.
            Error::Forward { status, .. } if status.code() != Code::Unavailable => status,
            e @ (Error::NoLeader { .. }
            | Error::LeadershipLost
            | Error::ShuttingDown
            | Error::ConfChangePending
            | Error::Forward { .. }) => Status::unavailable(e.to_string()),
            e @ Error::Timeout(_) => Status::deadline_exceeded(e.to_string()),
            Error::Raft(raft::Error::ProposalDropped) => {
                Status::unavailable("proposal dropped: leadership is changing; retry")
            }
            e @ Error::Config(_) => Status::invalid_argument(e.to_string()),
            e => Status::internal(e.to_string()),
        }
    }
}
