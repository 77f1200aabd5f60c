//! Initialize timeouts are known by the deadline the supervisor set, whatever
//! words the plugin's gRPC stack uses for them.
//!
//! The plugin here is this test binary itself, started by the supervisor
//! with `--exact serve_as_plugin`: a raw tonic server (no SDK), as a grpcio or
//! grpc-go plugin would be, whose Initialize behaves as `PV_TEST_INIT` says.

use plugvisor::PluginState;
use plugvisor_integration_tests::{Sandbox, wait_state};
use plugvisor_proto::handshake;
use plugvisor_proto::plugin_server::{Plugin, PluginServer};
use plugvisor_proto::*;
use std::io::Write;
use std::pin::Pin;
use std::time::Duration;
use tonic::{Request, Response, Status, Streaming};

const SECS_10: Duration = Duration::from_secs(10);
const MODE: &str = "PV_TEST_INIT";

struct RawPlugin {
    mode: String,
}

#[tonic::async_trait]
impl Plugin for RawPlugin {
    async fn initialize(
        &self,
        _: Request<InitializeRequest>,
    ) -> Result<Response<InitializeResponse>, Status> {
        match self.mode.as_str() {
            // What grpcio says when a handler outlives its deadline; here it
            // comes at once, so no timer in the supervisor can fire first.
            "deadline-exceeded" => Err(Status::deadline_exceeded("Deadline Exceeded")),
            "hang" => std::future::pending().await,
            _ => Err(Status::failed_precondition("cannot use that config")),
        }
    }

    async fn handle(&self, _: Request<HandleRequest>) -> Result<Response<HandleResponse>, Status> {
        Err(Status::unimplemented("handle"))
    }

    type HandleStreamStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<Chunk, Status>> + Send + 'static>>;

    async fn handle_stream(
        &self,
        _: Request<Streaming<Chunk>>,
    ) -> Result<Response<Self::HandleStreamStream>, Status> {
        Err(Status::unimplemented("handle_stream"))
    }

    type SessionStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<SessionResponse, Status>> + Send + 'static>>;

    /// Sessions are optional: a plugin without them serves Handle only.
    async fn session(
        &self,
        _: Request<Streaming<SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        Err(Status::unimplemented("session"))
    }

    async fn validate_config(
        &self,
        _: Request<plugvisor_proto::ValidateConfigRequest>,
    ) -> Result<Response<plugvisor_proto::ValidateConfigResponse>, Status> {
        Err(Status::unimplemented("validate_config"))
    }

    async fn health_check(
        &self,
        _: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        Err(Status::unimplemented("health_check"))
    }

    async fn export_state(
        &self,
        _: Request<ExportStateRequest>,
    ) -> Result<Response<ExportStateResponse>, Status> {
        Err(Status::unimplemented("export_state"))
    }

    async fn shutdown(
        &self,
        _: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownResponse>, Status> {
        std::process::exit(0)
    }
}

/// The plugin side: does nothing when run as a test, serves forever when the
/// supervisor started this binary.
#[test]
fn serve_as_plugin() {
    let Some(socket) = std::env::var_os(handshake::ENV_SOCKET) else {
        return;
    };
    let mode = std::env::var(MODE).unwrap_or_default();
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(async move {
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind the plugin socket");
        // A line of its own: libtest has printed `test serve_as_plugin ... `.
        let line = format!(
            "\n{}|{}|{}|{}\n",
            handshake::PREFIX,
            handshake::PROTOCOL_VERSION,
            handshake::NETWORK_UNIX,
            socket.to_string_lossy()
        );
        let mut out = std::io::stdout().lock();
        out.write_all(line.as_bytes()).expect("write the handshake");
        out.flush().expect("flush the handshake");
        drop(out);
        tonic::transport::Server::builder()
            .add_service(PluginServer::new(RawPlugin { mode }))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await
            .expect("serve");
    });
}

/// Starts this binary as plugin `raw` with Initialize in `mode`, and returns
/// the reason of the first failed start.
async fn first_start_failure(mode: &str, initialize_timeout: &str) -> String {
    let sandbox = Sandbox::new();
    let exe = std::env::current_exe().expect("the test binary's path");
    let sup = sandbox.supervisor();
    let mut events = sup.events();
    sup.add(
        sandbox.manifest(
            "raw",
            &exe,
            &format!(
                "args: [--exact, initialize::serve_as_plugin, --nocapture, --test-threads=1]\n\
                 env: {{{MODE}: {mode}}}\n\
                 timeouts: {{initialize: {initialize_timeout}}}\n\
                 restart: {{initial_backoff: 10s}}"
            ),
        ),
        &Default::default(),
    )
    .unwrap();
    // On failure, say what the plugin did and printed.
    let event = tokio::time::timeout(
        SECS_10,
        wait_state(&mut events, "raw", PluginState::Backoff, 2 * SECS_10),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no failed start within 10s; history: {:#?}; output: {:#?}",
            sup.history("raw"),
            sup.logs("raw").map(|l| l.tail(50))
        )
    });
    sup.shutdown().await;
    event.reason
}

#[tokio::test]
async fn deadline_exceeded_in_the_plugins_own_words_is_an_initialize_timeout() {
    let reason = first_start_failure("deadline-exceeded", "5s").await;
    assert!(
        reason.contains("Initialize did not answer within 5000ms"),
        "{reason}"
    );
}

#[tokio::test]
async fn an_initialize_that_never_answers_times_out_at_its_deadline() {
    let reason = first_start_failure("hang", "200ms").await;
    assert!(
        reason.contains("Initialize did not answer within 200ms"),
        "{reason}"
    );
}

#[tokio::test]
async fn other_initialize_errors_are_failures_with_the_plugins_status() {
    let reason = first_start_failure("fail", "5s").await;
    assert!(
        reason.contains("Initialize failed: FailedPrecondition: cannot use that config"),
        "{reason}"
    );
}
