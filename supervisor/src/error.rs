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
    /// Over a `calls.rate` limit: retry after `retry_after`.
    #[error(
        "plugin `{plugin}` is over its rate limit for {scope} ({limit}); retry in {}ms",
        retry_after.as_millis()
    )]
    RateLimited {
        plugin: String,
        /// `all methods`, or `method \`resize\``.
        scope: String,
        /// `500/s, burst 100`.
        limit: String,
        retry_after: Duration,
    },
    #[error("no plugin provides capability `{0}`; `plugvisor ps --capability {0}` lists providers")]
    UnknownCapability(String),
    /// Every provider of the capability is stopped or failed, or none was
    /// ready within the deadline.
    #[error("no provider of capability `{capability}` is ready: {reason}")]
    NoProvider { capability: String, reason: String },
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
            Error::Overloaded { .. } | Error::RateLimited { .. } => Code::ResourceExhausted,
            Error::UnknownCapability(_) => Code::NotFound,
            Error::NoProvider { .. } => Code::Unavailable,
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

/// The gRPC metadata key of a rate-limited call's retry hint, in
/// milliseconds.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        match e {
            Error::Plugin(status) => status,
            Error::RateLimited { retry_after, .. } => {
                let mut status = tonic::Status::new(e.code(), e.to_string());
                // The retry hint, for clients that back off by it.
                status.metadata_mut().insert(
                    RETRY_AFTER_MS,
                    tonic::metadata::MetadataValue::from(retry_after.as_millis() as u64),
                );
                status
            }
            other => tonic::Status::new(other.code(), other.to_string()),
        }
    }
}
