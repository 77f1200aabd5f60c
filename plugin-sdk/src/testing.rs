//! Test a plugin without a supervisor.
//!
//! [`Harness::start`] serves a plugin in-process on a real Unix socket in a
//! temporary directory and connects a real gRPC client to it, so a test goes
//! through the same encoding, streaming and status paths the supervisor
//! uses.
//!
//! ```
//! use plugvisor_sdk::{Plugin, Request, Response, Status, async_trait, testing::Harness};
//!
//! struct Hello;
//!
//! #[async_trait]
//! impl Plugin for Hello {
//!     async fn handle(&self, req: Request) -> Result<Response, Status> {
//!         Ok(Response::new(format!("hello {}", String::from_utf8_lossy(&req.payload))))
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let mut h = Harness::start(Hello).await.unwrap();
//! h.initialize(serde_json::json!({})).await.unwrap();
//! assert_eq!(h.call("any", "world").await.unwrap(), "hello world");
//! h.shutdown().await.unwrap();
//! # }
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use plugvisor_proto::handshake::PROTOCOL_VERSION;
use plugvisor_proto::plugin_client::PluginClient;
use plugvisor_proto::{
    Chunk, ExportStateRequest, HandleRequest, HealthCheckRequest, InitializeRequest,
    InitializeResponse, RestoredState, ShutdownRequest, health_check_response,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tonic::Status;
use tonic::transport::{Channel, Endpoint};

use crate::plugin::{Bytes, Health, Plugin, Response, StateSnapshot};
use crate::serve::{CONNECTION_WINDOW, STREAM_WINDOW, ServeError, ServeOptions, serve_listener};
use crate::service::MAX_MESSAGE_SIZE;

/// How long [`Harness::shutdown`] waits for the server to drain.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

/// A plugin served in-process on a temporary Unix socket, with a client.
///
/// Dropping the harness stops the server; [`Harness::shutdown`] does it
/// through the `Shutdown` RPC and reports how serving ended.
pub struct Harness {
    client: PluginClient<Channel>,
    socket_path: PathBuf,
    /// Name sent in `Initialize`.
    plugin_name: String,
    /// How many plugins this harness has started, for instance ids.
    generation: u32,
    /// State to hand to the next `initialize`, set by `restart_with_state`.
    pending_state: Option<StateSnapshot>,
    server: Option<JoinHandle<Result<(), ServeError>>>,
    /// Dropping it stops the server, so a harness dropped mid-test cleans up.
    _stop: oneshot::Sender<()>,
    /// Holds the socket's directory; removed when the harness is dropped.
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("socket_path", &self.socket_path)
            .field("plugin_name", &self.plugin_name)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Harness {
    /// Serves `plugin` on a socket in a new temporary directory and connects
    /// to it. Call [`initialize`](Self::initialize) next, as the supervisor would.
    pub async fn start<P: Plugin>(plugin: P) -> Result<Harness, ServeError> {
        Self::start_generation(plugin, 1, None).await
    }

    async fn start_generation<P: Plugin>(
        plugin: P,
        generation: u32,
        pending_state: Option<StateSnapshot>,
    ) -> Result<Harness, ServeError> {
        let dir = tempfile::Builder::new()
            .prefix("plugvisor-harness-")
            .tempdir()
            .map_err(|source| ServeError::Bind {
                path: std::env::temp_dir(),
                source,
            })?;
        let socket_path = dir.path().join("plugin.sock");
        let listener =
            tokio::net::UnixListener::bind(&socket_path).map_err(|source| ServeError::Bind {
                path: socket_path.clone(),
                source,
            })?;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let options = ServeOptions {
            handle_signals: false,
            ..ServeOptions::default()
        };
        let server = tokio::spawn(serve_listener(plugin, listener, options, async {
            // Either an explicit stop or the harness being dropped.
            let _ = stop_rx.await;
        }));
        let client = connect(&socket_path).await?;
        Ok(Harness {
            client,
            socket_path,
            plugin_name: "test-plugin".to_string(),
            generation,
            pending_state,
            server: Some(server),
            _stop: stop_tx,
            _dir: dir,
        })
    }

    /// The socket the plugin listens on, for tests that bring their own client.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The raw generated client, for anything the helpers do not cover.
    pub fn client(&mut self) -> &mut PluginClient<Channel> {
        &mut self.client
    }

    /// Sets the plugin name sent by later [`initialize`](Self::initialize)
    /// calls (default `test-plugin`).
    pub fn with_plugin_name(mut self, name: impl Into<String>) -> Self {
        self.plugin_name = name.into();
        self
    }

    /// Calls `Initialize` with `config`, and with the state carried over by
    /// [`restart_with_state`](Self::restart_with_state) if any.
    pub async fn initialize(
        &mut self,
        config: serde_json::Value,
    ) -> Result<InitializeResponse, Status> {
        let state = self.pending_state.take();
        self.initialize_with_state(config, state).await
    }

    /// Calls `Initialize` with `config` and exactly the given restored state.
    pub async fn initialize_with_state(
        &mut self,
        config: serde_json::Value,
        state: Option<StateSnapshot>,
    ) -> Result<InitializeResponse, Status> {
        let request = InitializeRequest {
            plugin_name: self.plugin_name.clone(),
            instance_id: format!("{}-0-{}", self.plugin_name, self.generation),
            config_json: config.to_string(),
            protocol_version: PROTOCOL_VERSION,
            restored_state: state.map(|s| RestoredState {
                state: s.state,
                state_version: s.state_version,
            }),
        };
        Ok(self.client.initialize(request).await?.into_inner())
    }

    /// Calls `Handle` and returns the reply's payload.
    pub async fn call(&mut self, method: &str, payload: impl Into<Bytes>) -> Result<Bytes, Status> {
        Ok(self
            .call_with_metadata(method, payload, HashMap::new())
            .await?
            .payload)
    }

    /// Calls `Handle` with metadata and returns the whole reply.
    pub async fn call_with_metadata(
        &mut self,
        method: &str,
        payload: impl Into<Bytes>,
        metadata: HashMap<String, String>,
    ) -> Result<Response, Status> {
        let reply = self
            .client
            .handle(HandleRequest {
                method: method.to_string(),
                payload: payload.into(),
                metadata,
            })
            .await?
            .into_inner();
        Ok(Response {
            payload: reply.payload,
            metadata: reply.metadata,
            state_changed: reply.state_changed,
        })
    }

    /// Calls `HandleStream`, sending `chunks` (the first one names the
    /// method), and collects the reply's chunks.
    pub async fn stream<I, B>(&mut self, method: &str, chunks: I) -> Result<Vec<Bytes>, Status>
    where
        I: IntoIterator<Item = B>,
        I::IntoIter: Send + 'static,
        B: Into<Bytes> + 'static,
    {
        let mut data = chunks.into_iter().map(Into::into).peekable();
        // A stream with no data still needs a first chunk naming the method.
        let header = data.peek().is_none().then(|| Chunk {
            method: method.to_string(),
            data: Bytes::new(),
            metadata: HashMap::new(),
            state_changed: false,
        });
        let mut name = Some(method.to_string());
        let body = data.map(move |data| Chunk {
            method: name.take().unwrap_or_default(),
            data,
            metadata: HashMap::new(),
            state_changed: false,
        });
        let request = tokio_stream::iter(header.into_iter().chain(body));
        let mut reply = self.client.handle_stream(request).await?.into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = reply.next().await {
            out.push(chunk?.data);
        }
        Ok(out)
    }

    /// Calls `HealthCheck`.
    pub async fn health(&mut self) -> Result<Health, Status> {
        use health_check_response::Status as S;
        let reply = self
            .client
            .health_check(HealthCheckRequest {})
            .await?
            .into_inner();
        Ok(match reply.status() {
            S::Serving => Health::Serving,
            S::Degraded => Health::Degraded(reply.message),
            S::NotServing | S::Unspecified => Health::NotServing(reply.message),
        })
    }

    /// Calls `ExportState`.
    pub async fn export_state(&mut self) -> Result<StateSnapshot, Status> {
        let reply = self
            .client
            .export_state(ExportStateRequest {})
            .await?
            .into_inner();
        Ok(StateSnapshot::new(reply.state, reply.state_version))
    }

    /// What the supervisor does on a restart or upgrade: export this
    /// plugin's state, shut it down, start `plugin` in its place and hand it
    /// the state in the next [`initialize`](Self::initialize).
    ///
    /// # Panics
    ///
    /// Panics if exporting the state or shutting down fails: this is a test
    /// helper and either means the plugin under test is broken.
    pub async fn restart_with_state<Q: Plugin>(mut self, plugin: Q) -> Harness {
        let state = self
            .export_state()
            .await
            .unwrap_or_else(|s| panic!("ExportState failed before the restart: {s:?}"));
        let name = self.plugin_name.clone();
        let generation = self.generation + 1;
        self.shutdown()
            .await
            .unwrap_or_else(|e| panic!("Shutdown failed before the restart: {e}"));
        Self::start_generation(plugin, generation, Some(state))
            .await
            .unwrap_or_else(|e| panic!("restarting the plugin failed: {e}"))
            .with_plugin_name(name)
    }

    /// Sends `Shutdown` and waits for the server to drain and stop.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        if let Err(status) = self
            .client
            .shutdown(ShutdownRequest {
                deadline_ms: SHUTDOWN_WAIT.as_millis() as u64,
            })
            .await
        {
            tracing::warn!(?status, "Shutdown RPC failed; stopping the server directly");
        }
        let Some(server) = self.server.take() else {
            return Ok(());
        };
        drop(self.client);
        match tokio::time::timeout(SHUTDOWN_WAIT * 2, server).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => std::panic::resume_unwind(join.into_panic()),
            Err(_) => panic!("the plugin did not stop within {:?}", SHUTDOWN_WAIT * 2),
        }
    }
}

/// Connects a client tuned like the supervisor's: large windows and messages.
async fn connect(socket_path: &Path) -> Result<PluginClient<Channel>, ServeError> {
    let endpoint = Endpoint::from_shared(format!("unix://{}", socket_path.display()))
        .map_err(|source| ServeError::Connect {
            path: socket_path.to_path_buf(),
            source,
        })?
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| ServeError::Connect {
            path: socket_path.to_path_buf(),
            source,
        })?;
    Ok(PluginClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ByteStream, InitContext, Request, unknown_method};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tonic::Code;

    /// A counter plugin: `add` adds the payload's number, `get` reads it,
    /// `stream` echoes chunks in reverse byte order, `fail` fails.
    #[derive(Default)]
    struct Counter {
        total: AtomicU64,
        config: Mutex<serde_json::Value>,
        health: Mutex<Option<Health>>,
    }

    #[crate::async_trait]
    impl Plugin for Counter {
        fn version(&self) -> &str {
            "9.9.9"
        }
        fn methods(&self) -> Vec<String> {
            vec!["add".into(), "get".into()]
        }
        fn state_version(&self) -> u32 {
            7
        }
        async fn initialize(&self, ctx: InitContext) -> Result<(), Status> {
            if let Some(s) = ctx.restored_state {
                let text = String::from_utf8_lossy(&s.state).into_owned();
                let n = text
                    .parse()
                    .map_err(|_| Status::failed_precondition(format!("bad state `{text}`")))?;
                self.total.store(n, Ordering::SeqCst);
            }
            *self.config.lock().unwrap() = ctx.config;
            Ok(())
        }
        async fn handle(&self, req: Request) -> Result<Response, Status> {
            match req.method.as_str() {
                "add" => {
                    let n: u64 = std::str::from_utf8(&req.payload)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| Status::invalid_argument("not a number"))?;
                    self.total.fetch_add(n, Ordering::SeqCst);
                    Ok(Response::empty().state_changed())
                }
                "get" => Ok(Response::new(self.total.load(Ordering::SeqCst).to_string())
                    .with_metadata("unit", "things")),
                "config" => Ok(Response::new(self.config.lock().unwrap().to_string())),
                "meta" => Ok(Response::new(
                    req.metadata.get("k").cloned().unwrap_or_default(),
                )),
                "set_health" => {
                    *self.health.lock().unwrap() = Some(Health::Degraded("slow disk".into()));
                    Ok(Response::empty())
                }
                other => Err(unknown_method(other)),
            }
        }
        async fn handle_stream(
            &self,
            method: &str,
            _metadata: HashMap<String, String>,
            input: ByteStream,
        ) -> Result<ByteStream, Status> {
            match method {
                "reverse" => Ok(Box::pin(input.map(|r| {
                    r.map(|b| Bytes::from(b.iter().rev().copied().collect::<Vec<u8>>()))
                }))),
                other => Err(unknown_method(other)),
            }
        }
        async fn health(&self) -> Health {
            self.health
                .lock()
                .unwrap()
                .clone()
                .unwrap_or(Health::Serving)
        }
        async fn export_state(&self) -> Result<StateSnapshot, Status> {
            Ok(StateSnapshot::new(
                self.total.load(Ordering::SeqCst).to_string(),
                self.state_version(),
            ))
        }
    }

    #[tokio::test]
    async fn initialize_reports_identity_and_passes_config() {
        let mut h = Harness::start(Counter::default())
            .await
            .unwrap()
            .with_plugin_name("counter");
        let init = h
            .initialize(serde_json::json!({"greeting": "hi"}))
            .await
            .unwrap();
        assert_eq!(init.name, "counter", "default name is the assigned one");
        assert_eq!(init.version, "9.9.9");
        assert_eq!(init.methods, ["add", "get"]);
        assert_eq!(init.state_version, 7);
        assert_eq!(init.protocol_version, 1);
        assert_eq!(h.call("config", "").await.unwrap(), r#"{"greeting":"hi"}"#);
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn calls_return_payload_metadata_and_state_changed() {
        let mut h = Harness::start(Counter::default()).await.unwrap();
        h.initialize(serde_json::json!({})).await.unwrap();
        let added = h
            .call_with_metadata("add", "5", HashMap::new())
            .await
            .unwrap();
        assert!(added.state_changed);
        let got = h
            .call_with_metadata("get", "", HashMap::new())
            .await
            .unwrap();
        assert_eq!(got.payload, "5");
        assert!(!got.state_changed);
        assert_eq!(got.metadata.get("unit").map(String::as_str), Some("things"));
        let meta = HashMap::from([("k".to_string(), "v".to_string())]);
        assert_eq!(
            h.call_with_metadata("meta", "", meta)
                .await
                .unwrap()
                .payload,
            "v"
        );
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn errors_reach_the_caller_unchanged() {
        let mut h = Harness::start(Counter::default()).await.unwrap();
        let err = h.call("add", "five").await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(err.message(), "not a number");
        let err = h.call("nope", "").await.unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented);
        assert!(err.message().contains("`nope`"), "{}", err.message());
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn streams_chunks_both_ways() {
        let mut h = Harness::start(Counter::default()).await.unwrap();
        let out = h.stream("reverse", ["abc", "de"]).await.unwrap();
        assert_eq!(out, ["cba", "ed"]);
        let out = h.stream("reverse", Vec::<Bytes>::new()).await.unwrap();
        assert!(out.is_empty());
        let err = h.stream("nope", ["x"]).await.unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented);
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn health_reflects_the_plugin() {
        let mut h = Harness::start(Counter::default()).await.unwrap();
        assert_eq!(h.health().await.unwrap(), Health::Serving);
        h.call("set_health", "").await.unwrap();
        assert_eq!(
            h.health().await.unwrap(),
            Health::Degraded("slow disk".into())
        );
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn state_survives_a_restart() {
        let mut h = Harness::start(Counter::default()).await.unwrap();
        h.initialize(serde_json::json!({})).await.unwrap();
        h.call("add", "40").await.unwrap();
        h.call("add", "2").await.unwrap();
        assert_eq!(h.export_state().await.unwrap(), StateSnapshot::new("42", 7));

        let mut h = h.restart_with_state(Counter::default()).await;
        h.initialize(serde_json::json!({})).await.unwrap();
        assert_eq!(h.call("get", "").await.unwrap(), "42");
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn initialize_errors_keep_their_status() {
        let mut h = Harness::start(Counter::default()).await.unwrap();
        let err = h
            .initialize_with_state(serde_json::json!({}), Some(StateSnapshot::new("x", 7)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("bad state `x`"), "{}", err.message());
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn shutdown_waits_for_in_flight_calls() {
        struct Slow;
        #[crate::async_trait]
        impl Plugin for Slow {
            async fn handle(&self, _req: Request) -> Result<Response, Status> {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok(Response::new("done"))
            }
        }
        let mut h = Harness::start(Slow).await.unwrap();
        let mut client = h.client().clone();
        let in_flight = tokio::spawn(async move {
            client
                .handle(HandleRequest {
                    method: "slow".into(),
                    ..HandleRequest::default()
                })
                .await
        });
        // Let the call reach the plugin before asking it to stop.
        tokio::time::sleep(Duration::from_millis(50)).await;
        h.shutdown().await.unwrap();
        let reply = in_flight.await.unwrap().unwrap().into_inner();
        assert_eq!(reply.payload, "done");
    }

    #[tokio::test]
    async fn serves_the_standard_health_service() {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::health_client::HealthClient;
        let h = Harness::start(Counter::default()).await.unwrap();
        let channel = Endpoint::from_shared(format!("unix://{}", h.socket_path().display()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = HealthClient::new(channel);
        for service in ["", "plugvisor.v1.Plugin"] {
            let reply = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(reply.status(), ServingStatus::Serving);
        }
        let err = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "other".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        let mut watch = health
            .watch(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner();
        let first = watch.next().await.unwrap().unwrap();
        assert_eq!(first.status(), ServingStatus::Serving);
        h.shutdown().await.unwrap();
    }
}
