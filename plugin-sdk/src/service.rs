//! The gRPC side of a plugin: the `plugvisor.v1.Plugin` service and the
//! standard `grpc.health.v1.Health` service, both backed by one [`Plugin`],
//! and a two-way router so they share one listener.
//!
//! tonic's own router pulls in axum; routing two services by path prefix is
//! a string comparison, so it is done here instead.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use plugvisor_proto::handshake::PROTOCOL_VERSION;
use plugvisor_proto::plugin_server::{Plugin as PluginService, PluginServer};
use plugvisor_proto::{
    Chunk, ExportStateRequest, ExportStateResponse, HandleRequest, HandleResponse,
    HealthCheckRequest, HealthCheckResponse, InitializeRequest, InitializeResponse, SessionRequest,
    SessionResponse, ShutdownRequest, ShutdownResponse, ValidateConfigRequest,
    ValidateConfigResponse, health_check_response,
};
use tokio::sync::watch;
use tokio_stream::{Stream, StreamExt};
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::{Status, Streaming};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health as StdHealthService, HealthServer};

use crate::plugin::{ByteStream, Health, InitContext, Plugin, Request, StateSnapshot};

/// The service name the standard health service answers for, besides "".
const PLUGIN_SERVICE_NAME: &str = "plugvisor.v1.Plugin";
/// How often a `grpc.health.v1.Health/Watch` stream re-reads the plugin's health.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// Path prefix of the standard health service's RPCs.
const HEALTH_PATH_PREFIX: &str = "/grpc.health.v1.Health/";

/// State the RPC handlers share with the serve loop.
pub(crate) struct Shared {
    /// Set once shutdown begins so health checks report NOT_SERVING while
    /// in-flight calls drain, and health `Watch` streams end.
    pub(crate) draining: watch::Sender<bool>,
    /// A `Shutdown` RPC's drain deadline, for the serve loop to act on.
    pub(crate) shutdown_tx: watch::Sender<Option<Duration>>,
    /// False only for fault-injection plugins whose `Shutdown` must be a no-op.
    pub(crate) honor_shutdown_rpc: bool,
    /// Drain deadline used when a `Shutdown` request carries `deadline_ms: 0`.
    pub(crate) default_drain: Duration,
}

/// Adapts a [`Plugin`] to the generated `plugvisor.v1.Plugin` service.
pub(crate) struct PluginAdapter<P> {
    pub(crate) plugin: Arc<P>,
    pub(crate) shared: Arc<Shared>,
}

pub(crate) type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, Status>> + Send + 'static>>;
type SessionStream = Pin<Box<dyn Stream<Item = Result<SessionResponse, Status>> + Send + 'static>>;

/// Serves one session: reads calls, runs each in its own task, and sends
/// each outcome back tagged with its id. A cancellation aborts its call.
async fn run_session<P: Plugin>(
    plugin: Arc<P>,
    mut requests: Streaming<SessionRequest>,
    replies: tokio::sync::mpsc::UnboundedSender<SessionResponse>,
    mut draining: watch::Receiver<bool>,
) {
    let mut calls = tokio::task::JoinSet::new();
    let mut running: HashMap<u64, tokio::task::AbortHandle> = HashMap::new();
    let mut reading = true;
    loop {
        if !reading && calls.is_empty() {
            return;
        }
        tokio::select! {
            request = requests.message(), if reading => match request {
                Ok(Some(r)) if r.cancel => {
                    if let Some(call) = running.remove(&r.id) {
                        call.abort();
                    }
                }
                Ok(Some(SessionRequest { id, call: Some(call), .. })) => {
                    let (plugin, replies) = (plugin.clone(), replies.clone());
                    let task = calls.spawn(async move {
                        let outcome = plugin
                            .handle(Request {
                                method: call.method,
                                payload: call.payload,
                                metadata: call.metadata,
                            })
                            .await;
                        let reply = match outcome {
                            Ok(resp) => SessionResponse {
                                id,
                                reply: Some(HandleResponse {
                                    payload: resp.payload,
                                    metadata: resp.metadata,
                                    state_changed: resp.state_changed,
                                }),
                                code: 0,
                                message: String::new(),
                            },
                            Err(status) => SessionResponse {
                                id,
                                reply: None,
                                code: status.code() as i32,
                                message: status.message().to_string(),
                            },
                        };
                        let _ = replies.send(reply);
                        id
                    });
                    running.insert(id, task);
                }
                Ok(Some(_)) => {}
                // The supervisor closed its side (or the connection broke):
                // answer what runs, then end.
                Ok(None) | Err(_) => reading = false,
            },
            changed = draining.changed(), if reading => {
                if changed.is_err() || *draining.borrow() {
                    reading = false;
                }
            }
            Some(done) = calls.join_next_with_id() => match done {
                Ok((_, id)) => {
                    running.remove(&id);
                }
                Err(e) => {
                    // Aborted (cancelled: no reply wanted) or panicked: a
                    // panic still answers, so its caller is not left waiting.
                    let id = running
                        .iter()
                        .find(|(_, h)| h.id() == e.id())
                        .map(|(id, _)| *id);
                    if let Some(id) = id {
                        running.remove(&id);
                        if e.is_panic() {
                            let _ = replies.send(SessionResponse {
                                id,
                                reply: None,
                                code: tonic::Code::Internal as i32,
                                message: "the plugin's handler panicked".into(),
                            });
                        }
                    }
                }
            },
        }
    }
}

/// Parses `config_json`: empty means an empty object.
fn parse_config(config_json: &str) -> Result<serde_json::Value, Status> {
    if config_json.trim().is_empty() {
        return Ok(serde_json::Value::Object(serde_json::Map::new()));
    }
    serde_json::from_str(config_json).map_err(|e| {
        Status::invalid_argument(format!(
            "Initialize: config_json is not valid JSON ({e}); expected a JSON object"
        ))
    })
}

#[tonic::async_trait]
impl<P: Plugin> PluginService for PluginAdapter<P> {
    async fn initialize(
        &self,
        request: tonic::Request<InitializeRequest>,
    ) -> Result<tonic::Response<InitializeResponse>, Status> {
        let req = request.into_inner();
        if req.protocol_version != 0 && req.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "Initialize asked for protocol version {}; this plugin speaks {PROTOCOL_VERSION}",
                req.protocol_version
            )));
        }
        let ctx = InitContext {
            config: parse_config(&req.config_json)?,
            plugin_name: req.plugin_name,
            instance_id: req.instance_id,
            protocol_version: req.protocol_version,
            restored_state: req
                .restored_state
                .map(|s| StateSnapshot::new(s.state, s.state_version)),
        };
        let assigned_name = ctx.plugin_name.clone();
        self.plugin.initialize(ctx).await?;
        let name = match self.plugin.name() {
            "" => assigned_name,
            own => own.to_string(),
        };
        Ok(tonic::Response::new(InitializeResponse {
            name,
            version: self.plugin.version().to_string(),
            methods: self.plugin.methods(),
            stream_methods: self.plugin.stream_methods(),
            state_version: self.plugin.state_version(),
            protocol_version: PROTOCOL_VERSION,
            sessions: true,
        }))
    }

    async fn handle(
        &self,
        request: tonic::Request<HandleRequest>,
    ) -> Result<tonic::Response<HandleResponse>, Status> {
        let req = request.into_inner();
        let resp = self
            .plugin
            .handle(Request {
                method: req.method,
                payload: req.payload,
                metadata: req.metadata,
            })
            .await?;
        Ok(tonic::Response::new(HandleResponse {
            payload: resp.payload,
            metadata: resp.metadata,
            state_changed: resp.state_changed,
        }))
    }

    type SessionStream = SessionStream;

    /// Many `Handle` calls on one stream: each runs in a task of its own and
    /// its outcome goes back tagged with its id, in whatever order calls
    /// finish. The stream ends once the supervisor closes its side, or the
    /// plugin drains, and every call it started has answered, so a drain is
    /// never held up by an idle session.
    async fn session(
        &self,
        request: tonic::Request<Streaming<SessionRequest>>,
    ) -> Result<tonic::Response<Self::SessionStream>, Status> {
        let requests = request.into_inner();
        let (replies, rx) = tokio::sync::mpsc::unbounded_channel();
        let plugin = self.plugin.clone();
        let draining = self.shared.draining.subscribe();
        tokio::spawn(run_session(plugin, requests, replies, draining));
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(Ok),
        )))
    }

    type HandleStreamStream = ChunkStream;

    async fn handle_stream(
        &self,
        request: tonic::Request<Streaming<Chunk>>,
    ) -> Result<tonic::Response<Self::HandleStreamStream>, Status> {
        // `Routes` serves this path itself (see `stream_wire`); this is the
        // same call through tonic's codec.
        open_stream(&*self.plugin, request.into_inner())
            .await
            .map(tonic::Response::new)
    }

    async fn health_check(
        &self,
        _request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, Status> {
        use health_check_response::Status as S;
        let (status, message) = if *self.shared.draining.borrow() {
            (S::NotServing, "shutting down".to_string())
        } else {
            match self.plugin.health().await {
                Health::Serving => (S::Serving, String::new()),
                Health::NotServing(msg) => (S::NotServing, msg),
                Health::Degraded(msg) => (S::Degraded, msg),
            }
        };
        Ok(tonic::Response::new(HealthCheckResponse {
            status: status.into(),
            message,
        }))
    }

    async fn validate_config(
        &self,
        request: tonic::Request<ValidateConfigRequest>,
    ) -> Result<tonic::Response<ValidateConfigResponse>, Status> {
        let config = parse_config(&request.into_inner().config_json)?;
        let (accepted, reason) = match self.plugin.validate_config(&config).await {
            Ok(()) => (true, String::new()),
            Err(reason) => (false, reason),
        };
        Ok(tonic::Response::new(ValidateConfigResponse {
            accepted,
            reason,
        }))
    }

    async fn export_state(
        &self,
        _request: tonic::Request<ExportStateRequest>,
    ) -> Result<tonic::Response<ExportStateResponse>, Status> {
        let snapshot = self.plugin.export_state().await?;
        Ok(tonic::Response::new(ExportStateResponse {
            state: snapshot.state,
            state_version: snapshot.state_version,
        }))
    }

    async fn shutdown(
        &self,
        request: tonic::Request<ShutdownRequest>,
    ) -> Result<tonic::Response<ShutdownResponse>, Status> {
        let deadline_ms = request.into_inner().deadline_ms;
        if self.shared.honor_shutdown_rpc {
            let deadline = match deadline_ms {
                0 => self.shared.default_drain,
                ms => Duration::from_millis(ms),
            };
            tracing::info!(?deadline, "Shutdown requested; draining");
            // The serve loop acts on this once the reply is on its way: the
            // call is in flight, so the graceful drain lets it finish.
            self.shared.shutdown_tx.send_replace(Some(deadline));
        } else {
            tracing::warn!("Shutdown requested but ignored (honor_shutdown_rpc is off)");
        }
        Ok(tonic::Response::new(ShutdownResponse {}))
    }
}

/// Serves `grpc.health.v1.Health` from the plugin's own [`Plugin::health`],
/// so stock tools (`grpc_health_probe`, Kubernetes gRPC probes) see what the
/// supervisor sees. DEGRADED counts as SERVING there: the plugin still answers.
pub(crate) struct StdHealth<P> {
    pub(crate) plugin: Arc<P>,
    pub(crate) shared: Arc<Shared>,
}

async fn std_status<P: Plugin>(plugin: &P, shared: &Shared) -> ServingStatus {
    if *shared.draining.borrow() {
        return ServingStatus::NotServing;
    }
    match plugin.health().await {
        Health::Serving | Health::Degraded(_) => ServingStatus::Serving,
        Health::NotServing(_) => ServingStatus::NotServing,
    }
}

fn check_service_name(service: &str) -> Result<(), Status> {
    if service.is_empty() || service == PLUGIN_SERVICE_NAME {
        Ok(())
    } else {
        Err(Status::not_found(format!(
            "unknown service `{service}`; this plugin serves `{PLUGIN_SERVICE_NAME}` (or ask for \"\")"
        )))
    }
}

#[tonic::async_trait]
impl<P: Plugin> StdHealthService for StdHealth<P> {
    async fn check(
        &self,
        request: tonic::Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<tonic::Response<tonic_health::pb::HealthCheckResponse>, Status> {
        check_service_name(&request.get_ref().service)?;
        let status = std_status(&*self.plugin, &self.shared).await;
        Ok(tonic::Response::new(
            tonic_health::pb::HealthCheckResponse {
                status: status.into(),
            },
        ))
    }

    type WatchStream = Pin<
        Box<
            dyn Stream<Item = Result<tonic_health::pb::HealthCheckResponse, Status>>
                + Send
                + 'static,
        >,
    >;

    async fn watch(
        &self,
        request: tonic::Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, Status> {
        check_service_name(&request.get_ref().service)?;
        let plugin = Arc::clone(&self.plugin);
        let shared = Arc::clone(&self.shared);
        let mut draining = shared.draining.subscribe();
        // Polls the plugin and sends a message whenever the status changes,
        // the first one immediately, as the health protocol asks. Ends with
        // NOT_SERVING when shutdown begins, so a watcher never holds up the drain.
        let stream = async_stream::stream! {
            let mut last = None;
            loop {
                let status = std_status(&*plugin, &shared).await;
                if last != Some(status) {
                    last = Some(status);
                    yield Ok(tonic_health::pb::HealthCheckResponse { status: status.into() });
                }
                if status == ServingStatus::NotServing && *draining.borrow() {
                    break;
                }
                tokio::select! {
                    () = tokio::time::sleep(WATCH_INTERVAL) => {}
                    _ = draining.changed() => {}
                }
            }
        };
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

/// Starts a `HandleStream` call on `chunks` (the first one names the
/// method): the plugin's reply chunks, ending with an empty chunk that says
/// the state changed when the method changes state.
pub(crate) async fn open_stream<P, S>(plugin: &P, mut chunks: S) -> Result<ChunkStream, Status>
where
    P: Plugin,
    S: Stream<Item = Result<Chunk, Status>> + Send + Unpin + 'static,
{
    let first = chunks.next().await.transpose()?.ok_or_else(|| {
        Status::invalid_argument(
            "HandleStream: the request stream ended before its first chunk, \
             which must name the method",
        )
    })?;
    if first.method.is_empty() {
        return Err(Status::invalid_argument(
            "HandleStream: the first chunk must name the method",
        ));
    }
    // The first chunk's data is part of the payload unless it is only a header.
    let head = (!first.data.is_empty()).then_some(Ok(first.data));
    let input: ByteStream =
        Box::pin(tokio_stream::iter(head).chain(chunks.map(|c| c.map(|c| c.data))));
    let changes_state = plugin.stream_changes_state(&first.method);
    let output = plugin
        .handle_stream(&first.method, first.metadata, input)
        .await?;
    let output = output.map(|data| {
        data.map(|data| Chunk {
            method: String::new(),
            data,
            metadata: HashMap::new(),
            state_changed: false,
        })
    });
    // A stream that ended well and changed state says so in one last,
    // empty chunk; an error ends the stream before it.
    let last = changes_state.then(|| {
        Ok(Chunk {
            state_changed: true,
            ..Chunk::default()
        })
    });
    Ok(Box::pin(output.chain(tokio_stream::iter(last))))
}

/// Routes requests to the plugin service or the standard health service.
pub(crate) struct Routes<P: Plugin> {
    plugin: PluginServer<PluginAdapter<P>>,
    health: HealthServer<StdHealth<P>>,
    /// For `HandleStream`, served here without tonic's codec.
    streams: Arc<P>,
}

impl<P: Plugin> Clone for Routes<P> {
    fn clone(&self) -> Self {
        Routes {
            plugin: self.plugin.clone(),
            health: self.health.clone(),
            streams: Arc::clone(&self.streams),
        }
    }
}

/// Largest message either side may send or receive: big enough for any
/// sensible `Handle` payload; bigger payloads belong in `HandleStream`.
pub(crate) const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

impl<P: Plugin> Routes<P> {
    pub(crate) fn new(plugin: Arc<P>, shared: Arc<Shared>) -> Self {
        let health = HealthServer::new(StdHealth {
            plugin: Arc::clone(&plugin),
            shared: Arc::clone(&shared),
        });
        let streams = Arc::clone(&plugin);
        let plugin = PluginServer::new(PluginAdapter { plugin, shared })
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        Routes {
            plugin,
            health,
            streams,
        }
    }
}

impl<P: Plugin> Service<http::Request<Body>> for Routes<P> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Both generated servers are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() == crate::stream_wire::PATH {
            let plugin = Arc::clone(&self.streams);
            Box::pin(async move {
                let started = match crate::stream_wire::RequestChunks::new(req) {
                    Ok(chunks) => open_stream(&*plugin, chunks).await,
                    Err(status) => Err(status),
                };
                Ok(match started {
                    Ok(chunks) => crate::stream_wire::reply(chunks),
                    Err(status) => status.into_http(),
                })
            })
        } else if req.uri().path().starts_with(HEALTH_PATH_PREFIX) {
            self.health.call(req)
        } else {
            // Unknown paths get the generated server's UNIMPLEMENTED reply.
            self.plugin.call(req)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_an_empty_object() {
        assert_eq!(parse_config("").unwrap(), serde_json::json!({}));
        assert_eq!(parse_config("  ").unwrap(), serde_json::json!({}));
        assert_eq!(
            parse_config(r#"{"a":1}"#).unwrap(),
            serde_json::json!({"a": 1})
        );
    }

    #[test]
    fn bad_config_is_invalid_argument_quoting_the_parse_error() {
        let err = parse_config("{nope").unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("config_json"), "{}", err.message());
    }

    #[test]
    fn health_service_names() {
        assert!(check_service_name("").is_ok());
        assert!(check_service_name("plugvisor.v1.Plugin").is_ok());
        assert_eq!(
            check_service_name("other").unwrap_err().code(),
            tonic::Code::NotFound
        );
    }
}
