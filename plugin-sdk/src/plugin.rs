//! The [`Plugin`] trait a plugin author implements, and the plain types it
//! speaks in. Nothing here knows about gRPC framing or sockets: the SDK's
//! server turns the `plugvisor.v1.Plugin` RPCs into calls on this trait.

use std::collections::HashMap;
use std::pin::Pin;

use tokio_stream::Stream;
use tonic::Status;

pub use tonic::codegen::Bytes;

/// A stream of payload pieces, in or out of [`Plugin::handle_stream`].
///
/// An `Err` item ends the stream with that status.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send + 'static>>;

/// What the supervisor tells a plugin in `Initialize`.
#[derive(Debug, Clone)]
pub struct InitContext {
    /// The name the supervisor knows the plugin by (the manifest's `name`).
    pub plugin_name: String,
    /// Unique per started child, e.g. `echo-0-3` (name, replica, start count).
    pub instance_id: String,
    /// The merged configuration (manifest defaults < supervisor config <
    /// runtime overrides). An empty `config_json` arrives as an empty object.
    pub config: serde_json::Value,
    /// The protocol version the supervisor chose.
    pub protocol_version: u32,
    /// The state a previous instance exported, when a snapshot exists.
    /// Check [`StateSnapshot::state_version`] before trusting the bytes.
    pub restored_state: Option<StateSnapshot>,
}

/// Opaque plugin state and the version of its format: what
/// [`Plugin::export_state`] returns and what [`InitContext::restored_state`]
/// hands back after a restart or upgrade.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateSnapshot {
    /// The state in whatever encoding the plugin chose.
    pub state: Bytes,
    /// The format version of `state`, so a newer plugin can migrate or refuse it.
    pub state_version: u32,
}

impl StateSnapshot {
    /// A snapshot of `state` written in format `state_version`.
    pub fn new(state: impl Into<Bytes>, state_version: u32) -> Self {
        StateSnapshot {
            state: state.into(),
            state_version,
        }
    }
}

/// One `Handle` call.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The method the caller asked for. Answer unknown ones with
    /// [`unknown_method`] (status `UNIMPLEMENTED`).
    pub method: String,
    /// The caller's bytes, untouched.
    pub payload: Bytes,
    /// Free-form key/value pairs from the caller (trace ids, content types...).
    pub metadata: HashMap<String, String>,
}

/// The reply to one `Handle` call.
#[derive(Debug, Clone, Default)]
pub struct Response {
    /// The bytes returned to the caller.
    pub payload: Bytes,
    /// Key/value pairs returned to the caller.
    pub metadata: HashMap<String, String>,
    /// True when the call changed the plugin's exportable state, so the
    /// supervisor knows a snapshot is due.
    pub state_changed: bool,
}

impl Response {
    /// A reply carrying `payload`, no metadata, state unchanged.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Response {
            payload: payload.into(),
            ..Response::default()
        }
    }

    /// An empty reply.
    pub fn empty() -> Self {
        Response::default()
    }

    /// Marks the reply as having changed the plugin's exportable state.
    pub fn state_changed(mut self) -> Self {
        self.state_changed = true;
        self
    }

    /// Adds one metadata pair to the reply.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }
}

/// What a plugin reports about itself in `HealthCheck`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Up and answering.
    Serving,
    /// Not able to answer calls; the supervisor counts it as a failed probe.
    NotServing(String),
    /// Up and answering, but impaired: kept running, shown to operators.
    Degraded(String),
}

/// The status for a method the plugin does not serve: `UNIMPLEMENTED`,
/// naming the method. Return it from the fallback arm of
/// [`Plugin::handle`]'s `match`.
pub fn unknown_method(method: &str) -> Status {
    Status::unimplemented(format!(
        "method `{method}` is not implemented by this plugin"
    ))
}

/// A plugvisor plugin. Only [`handle`](Plugin::handle) is required; every
/// other method has a default that suits a stateless plugin.
///
/// The SDK calls these methods concurrently from several tasks, so the
/// plugin keeps its mutable state behind its own locks or atomics.
#[tonic::async_trait]
pub trait Plugin: Send + Sync + 'static {
    /// The name the plugin reports in `Initialize`. The default, an empty
    /// string, means "the name the supervisor gave me": the SDK then reports
    /// [`InitContext::plugin_name`].
    fn name(&self) -> &str {
        ""
    }

    /// The plugin's own version, reported in `Initialize`. Plugins usually
    /// return `env!("CARGO_PKG_VERSION")`.
    fn version(&self) -> &str {
        "0.0.0"
    }

    /// The methods [`handle`](Plugin::handle) accepts, reported in
    /// `Initialize` so operators and the supervisor can see them. Empty by
    /// default, which means "not advertised".
    fn methods(&self) -> Vec<String> {
        Vec::new()
    }

    /// The methods [`handle_stream`](Plugin::handle_stream) accepts,
    /// reported in `Initialize` (`stream_methods`). Empty by default, which
    /// declares that the plugin does not stream; a plugin that implements
    /// `handle_stream` lists its methods here.
    fn stream_methods(&self) -> Vec<String> {
        Vec::new()
    }

    /// Whether a completed `HandleStream` call of `method` changed the
    /// plugin's exportable state (the streaming counterpart of
    /// [`Response::state_changed`]). When true, the reply stream ends with
    /// a chunk marked `state_changed`, so a supervisor that snapshots on
    /// change saves the state before the caller sees the end. False by
    /// default.
    fn stream_changes_state(&self, method: &str) -> bool {
        let _ = method;
        false
    }

    /// The format version of what [`export_state`](Plugin::export_state)
    /// writes. 0 (the default) means the plugin keeps no state.
    fn state_version(&self) -> u32 {
        0
    }

    /// Called once, first, with the configuration and any restored state.
    /// An error keeps the plugin from becoming ready; use
    /// `Status::invalid_argument` for bad configuration and
    /// `Status::failed_precondition` for state the plugin cannot read.
    async fn initialize(&self, ctx: InitContext) -> Result<(), Status> {
        let _ = ctx;
        Ok(())
    }

    /// Answers one call. Errors reach the caller unchanged. Return
    /// [`unknown_method`] for methods the plugin does not serve.
    async fn handle(&self, req: Request) -> Result<Response, Status>;

    /// Answers one streamed call: `input` yields the request's pieces as they
    /// arrive, and the returned stream is sent back as it is produced, so
    /// neither side holds the whole payload. `UNIMPLEMENTED` by default.
    async fn handle_stream(
        &self,
        method: &str,
        metadata: HashMap<String, String>,
        input: ByteStream,
    ) -> Result<ByteStream, Status> {
        let _ = (metadata, input);
        Err(unknown_method(method))
    }

    /// Reports the plugin's health. [`Health::Serving`] by default.
    async fn health(&self) -> Health {
        Health::Serving
    }

    /// Says whether the plugin can run with `config` (the complete merged
    /// config it would be initialized with), before an operator's
    /// `plugvisor config` change is rolled out: `Err(reason)` refuses it,
    /// nothing changes, and the operator sees `reason`. Accepts everything
    /// by default.
    async fn validate_config(&self, config: &serde_json::Value) -> Result<(), String> {
        let _ = config;
        Ok(())
    }

    /// The plugin's state, for snapshots, restarts and upgrades. Empty by
    /// default.
    async fn export_state(&self) -> Result<StateSnapshot, Status> {
        Ok(StateSnapshot::new(Bytes::new(), self.state_version()))
    }

    /// Called once after the server stopped accepting calls and drained the
    /// in-flight ones, just before the process exits. Flush and close here.
    async fn shutdown(&self) {}
}
