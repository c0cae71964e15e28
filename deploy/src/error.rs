//! Why a rendering failed.

/// Errors of `ironsan-deploy`; each names the option, file or object at fault.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// An option out of range or malformed.
    #[error("invalid option {0}")]
    Option(String),
    /// A values file that is not YAML of the known keys.
    #[error("invalid values file: {0}")]
    Values(String),
    /// An object that does not serialize (a bug, never input).
    #[error("cannot serialize {0}")]
    Serialize(String),
    /// Writing the output.
    #[error("cannot write {0}")]
    Io(String),
}
