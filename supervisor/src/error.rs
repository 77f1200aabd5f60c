//! The errors a caller of the supervisor sees, and their one mapping to gRPC
//! status codes.

use std::time::Duration;

/// Why a call or a command did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no plugin named `{0}`; `plugvisor ps` lists the plugins")]
    UnknownPlugin(String),
    #[error("plugin `{plugin}` is {state}: {reason}")]
    NotRunning {
        plugin: String,
        state: String,
        reason: String,
    },
    #[error("plugin `{plugin}` was not ready within {}ms ({reason})", waited.as_millis())]
    NotReady {
        plugin: String,
        waited: Duration,
        reason: String,
    },
    #[error("plugin `{plugin}` instance `{instance}` went away during the call: {reason}")]
    Lost {
        plugin: String,
        instance: String,
        reason: String,
    },
    #[error("call to `{plugin}` method `{method}` did not finish within {}ms", timeout.as_millis())]
    Timeout {
        plugin: String,
        method: String,
        timeout: Duration,
    },
    /// The plugin answered with an error status: passed on unchanged.
    #[error("{0}")]
    Plugin(tonic::Status),
    #[error(
        "plugin `{plugin}` is overloaded: {in_flight} calls in flight and {queued} queued; retry later"
    )]
    Overloaded {
        plugin: String,
        in_flight: usize,
        queued: usize,
    },
    /// The call happened, but the state it changed could not be saved: a
    /// retry would apply it twice, and a restart would lose it.
    #[error(
        "plugin `{plugin}` instance `{instance}` answered, but its state could not be saved: {reason}; the call took effect, do not retry it blindly"
    )]
    NotPersisted {
        plugin: String,
        instance: String,
        reason: String,
    },
    /// The caller's side of a streamed call broke off; the plugin was told
    /// the call is cancelled.
    #[error("call to `{plugin}` method `{method}` cancelled: {reason}")]
    Cancelled {
        plugin: String,
        method: String,
        reason: String,
    },
    #[error("upgrade of `{plugin}` failed and was rolled back: {reason}")]
    UpgradeFailed { plugin: String, reason: String },
    #[error("the supervisor is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// The gRPC status code this error maps to: the one place the mapping
    /// is made.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Error::Plugin(status) => status.code(),
            Error::UnknownPlugin(_) => Code::NotFound,
            Error::Timeout { .. } => Code::DeadlineExceeded,
            Error::Invalid(_) => Code::InvalidArgument,
            Error::Overloaded { .. } => Code::ResourceExhausted,
            Error::UpgradeFailed { .. } => Code::FailedPrecondition,
            Error::NotPersisted { .. } => Code::DataLoss,
            Error::Cancelled { .. } => Code::Cancelled,
            Error::NotRunning { .. }
            | Error::NotReady { .. }
            | Error::Lost { .. }
            | Error::ShuttingDown => Code::Unavailable,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        match e {
            Error::Plugin(status) => status,
            other => tonic::Status::new(other.code(), other.to_string()),
        }
    }
}
