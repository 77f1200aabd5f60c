//! The standard gRPC health service (`grpc.health.v1.Health`) on a TCP
//! port (`health.address`), for probes that cannot reach the control
//! socket: Kubernetes' `grpc` liveness and readiness probes,
//! `grpc_health_probe`, load balancers.
//!
//! Services a probe may name:
//!
//! | service | SERVING when |
//! |---|---|
//! | `""`, `plugvisor.liveness` | the daemon answers on its control socket (a real `List` round trip) |
//! | `plugvisor.readiness` | live, and every required plugin (`health.required`, default all) has a ready or degraded replica |
//! | a plugin's name | that plugin has a ready or degraded replica |
//!
//! Anything else is NOT_FOUND, as the health protocol asks. The names with
//! a dot can never be plugin names, so no plugin shadows them.

use plugvisor::Supervisor;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// The service name of the daemon's liveness.
pub const LIVENESS: &str = "plugvisor.liveness";
/// The service name of the daemon's readiness.
pub const READINESS: &str = "plugvisor.readiness";
/// How long the control socket may take to answer a liveness check.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a `Watch` looks again.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Answers health checks from the supervisor's state and its control socket.
#[derive(Clone)]
pub struct Checker {
    supervisor: Supervisor,
    control: PathBuf,
    /// The plugins readiness waits for; `None`: every supervised plugin.
    required: Option<Vec<String>>,
}

impl Checker {
    pub fn new(supervisor: Supervisor, control: PathBuf, required: Option<Vec<String>>) -> Self {
        Checker {
            supervisor,
            control,
            required,
        }
    }

    /// The status of `service`; `None` for a service nobody serves.
    pub async fn status(&self, service: &str) -> Option<ServingStatus> {
        let serving = |ok: bool| {
            if ok {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            }
        };
        match service {
            "" | LIVENESS => Some(serving(self.live().await)),
            READINESS => Some(serving(self.live().await && self.ready())),
            plugin => self
                .supervisor
                .info(plugin)
                .ok()
                .map(|info| serving(info.replicas.iter().any(|r| r.state.is_up()))),
        }
    }

    /// The control API answers a `List` over its socket.
    async fn live(&self) -> bool {
        let attempt = async {
            let mut client = crate::control::connect(&self.control).await?;
            client
                .list(plugvisor_proto::ListRequest::default())
                .await
                .map_err(anyhow::Error::from)
        };
        match tokio::time::timeout(CONTROL_TIMEOUT, attempt).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                tracing::warn!("liveness: the control API does not answer: {e:#}");
                false
            }
            Err(_) => {
                tracing::warn!("liveness: the control API took over {CONTROL_TIMEOUT:?} to answer");
                false
            }
        }
    }

    /// Every required plugin has a ready or degraded replica.
    fn ready(&self) -> bool {
        let plugins = self.supervisor.list_with(false);
        let up = |name: &str| {
            plugins
                .iter()
                .any(|p| p.name == name && p.replicas.iter().any(|r| r.state.is_up()))
        };
        match &self.required {
            Some(required) => required.iter().all(|name| up(name)),
            None => plugins.iter().all(|p| up(&p.name)),
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for Checker {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = &request.get_ref().service;
        match self.status(service).await {
            Some(status) => Ok(Response::new(HealthCheckResponse {
                status: status as i32,
            })),
            None => Err(Status::not_found(format!(
                "no service `{service}`: ask for \"\", `{LIVENESS}`, `{READINESS}` or a plugin's name"
            ))),
        }
    }

    type WatchStream = WatchStream;

    /// Sends the status now and again whenever it changes (looked at every
    /// second); SERVICE_UNKNOWN for a service nobody serves, as the protocol
    /// asks, in case it appears later.
    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let service = request.into_inner().service;
        let checker = self.clone();
        let stream = async_stream::stream! {
            let mut last = None;
            let mut tick = tokio::time::interval(WATCH_INTERVAL);
            loop {
                tick.tick().await;
                let now = checker
                    .status(&service)
                    .await
                    .unwrap_or(ServingStatus::ServiceUnknown);
                if last != Some(now) {
                    last = Some(now);
                    yield Ok(HealthCheckResponse { status: now as i32 });
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Serves the health service on `listener` until `cancel` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    checker: Checker,
    cancel: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = tonic::transport::Server::builder()
        .timeout(Duration::from_secs(5))
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(HealthServer::new(checker))
        .serve_with_incoming_shutdown(incoming, cancel.clone().cancelled_owned());
    tokio::pin!(server);
    tokio::select! {
        ended = &mut server => ended,
        _ = cancel.cancelled() => {
            // Watches and clients that connected and said nothing would
            // hold a graceful end forever: they get a moment, then the
            // server and every connection it holds are dropped.
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(ended) => ended,
                Err(_) => Ok(()),
            }
        }
    }
}

/// How long open health connections may linger once shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
