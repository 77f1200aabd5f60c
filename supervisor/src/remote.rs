//! Remote plugins: plugins that run on another host and serve
//! `plugvisor.v1.Plugin` over TCP with mutual TLS. The supervisor does not
//! spawn them; a replica's "instance" is a set of TLS connections, its
//! "start" is connect + Initialize, and its "restart" is a reconnect under
//! the same restart policy (backoff, give-up) as a local child. The actor
//! side lives in `actor/remote.rs`; this module holds what it connects
//! with and how a lost connection reads.

use crate::manifest::{Manifest, RemoteSpec};
use crate::tls::{ConnectError, TlsError};
use crate::transport;
use plugvisor_proto::handshake;
use plugvisor_proto::{InitializeRequest, InitializeResponse, RestoredState};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Why a remote plugin's connection failed or ended.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectionLost {
    /// The TCP connection or the TLS handshake failed.
    #[error("{0}")]
    Connect(ConnectError),
    /// Its CA, certificate or key could not be loaded.
    #[error("cannot load its TLS files: {0}")]
    Config(TlsError),
    /// `failure_threshold` consecutive health checks failed.
    #[error("disconnected after failed health checks: {0}")]
    Health(String),
    /// A connection ended under it (the plugin went away, the network broke).
    #[error("the connection to {address} ended: {why}")]
    Disconnected { address: String, why: String },
    /// Initialize failed or did not answer.
    #[error("{0}")]
    Initialize(String),
}

impl ConnectionLost {
    /// A short label for metrics and events: `unreachable`, a TLS
    /// rejection's kind (`unknown_ca`, `expired`, `wrong_identity`,
    /// `refused_by_peer`, `plaintext`, ...), `tls_config`, `health`,
    /// `disconnected`, `initialize`.
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectionLost::Connect(ConnectError::Unreachable { .. }) => "unreachable",
            ConnectionLost::Connect(ConnectError::Tls { rejection, .. }) => rejection.kind(),
            ConnectionLost::Config(_) => "tls_config",
            ConnectionLost::Health(_) => "health",
            ConnectionLost::Disconnected { .. } => "disconnected",
            ConnectionLost::Initialize(_) => "initialize",
        }
    }
}

/// Where a remote plugin runs, for `ps` and `inspect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteInfo {
    pub address: String,
    pub identity: String,
    /// `manifest` or `registry`.
    pub origin: &'static str,
    /// The peer that registered it: its address and certificate names.
    pub registered_by: Option<String>,
    pub capabilities: Vec<String>,
    /// Time since its last heartbeat, for a registered plugin.
    pub last_heartbeat: Option<Duration>,
}

impl RemoteInfo {
    pub(crate) fn of(spec: &RemoteSpec) -> Self {
        let registration = spec.registration.as_ref();
        RemoteInfo {
            address: spec.address.clone(),
            identity: spec.identity.clone(),
            origin: if registration.is_some() {
                "registry"
            } else {
                "manifest"
            },
            registered_by: registration.map(|r| r.peer.clone()),
            capabilities: registration
                .map(|r| r.capabilities.clone())
                .unwrap_or_default(),
            last_heartbeat: registration.map(|r| r.lease.borrow().last_heartbeat.elapsed()),
        }
    }
}

/// Checks offline that a remote manifest's TLS files load and go together
/// (`plugvisor check`).
pub(crate) fn check(spec: &RemoteSpec) -> Result<(), String> {
    crate::tls::client_config(&spec.tls)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// One connected remote instance: its connections and what ends them.
pub(crate) struct RemoteInstance {
    pub id: String,
    pub client: crate::instance::Client,
    /// Gets why as soon as one of its connections ends.
    pub closed: mpsc::Receiver<transport::Closed>,
    pub connected_at: Instant,
    pub sessions: Option<Arc<crate::session::Sessions>>,
}

/// Connects to a remote plugin ([`transport::PLUGIN_CONNECTIONS`] TLS
/// connections, each checked against the CA and identity). The TLS files
/// are read at each connect, so renewed certificates are picked up by the
/// next reconnect.
pub(crate) async fn connect(
    spec: &RemoteSpec,
    id: &str,
    timeout: Duration,
) -> Result<RemoteInstance, ConnectionLost> {
    let config = crate::tls::client_config(&spec.tls).map_err(ConnectionLost::Config)?;
    let identity = crate::tls::server_name(&spec.identity)
        .map_err(|m| ConnectionLost::Config(TlsError::Config(format!("remote.identity: {m}"))))?;
    let connected_at = Instant::now();
    let mut streams = Vec::with_capacity(transport::PLUGIN_CONNECTIONS);
    for _ in 0..transport::PLUGIN_CONNECTIONS {
        streams.push(
            crate::tls::connect(&spec.address, &identity, config.clone(), timeout)
                .await
                .map_err(ConnectionLost::Connect)?,
        );
    }
    let (connection, closed) =
        transport::over_streams(streams)
            .await
            .map_err(|e| ConnectionLost::Disconnected {
                address: spec.address.clone(),
                why: format!("HTTP/2 handshake failed: {e}"),
            })?;
    let client = crate::instance::Client::new(connection);
    Ok(RemoteInstance {
        id: id.to_string(),
        client,
        closed,
        connected_at,
        sessions: None,
    })
}

/// Calls Initialize on a connected remote plugin. A TLS refusal that only
/// shows now (TLS 1.3 servers judge the client's certificate after the
/// client's handshake is done) is reported as such.
pub(crate) async fn initialize(
    instance: &mut RemoteInstance,
    manifest: &Manifest,
    config: &serde_json::Map<String, serde_json::Value>,
    restored: Option<RestoredState>,
) -> Result<InitializeResponse, ConnectionLost> {
    let address = manifest
        .remote
        .as_ref()
        .map(|r| r.address.clone())
        .unwrap_or_default();
    let request = InitializeRequest {
        plugin_name: manifest.name.clone(),
        instance_id: instance.id.clone(),
        config_json: serde_json::Value::Object(config.clone()).to_string(),
        protocol_version: handshake::PROTOCOL_VERSION,
        restored_state: restored,
    };
    let timeout = manifest.timeouts.initialize.0;
    let mut request = tonic::Request::new(request);
    request.set_timeout(timeout);
    match tokio::time::timeout(timeout, instance.client.initialize(request)).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => {
            let mut rejection =
                std::error::Error::source(&status).and_then(crate::tls::find_rejection);
            let mut closed_why = Vec::new();
            if rejection.is_none() {
                // The connections' own tasks may hold the peer's alert.
                let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
                while let Ok(Some(closed)) =
                    tokio::time::timeout_at(deadline, instance.closed.recv()).await
                {
                    if closed.rejection.is_some() {
                        rejection = closed.rejection;
                        break;
                    }
                    closed_why.push(closed.why);
                }
            }
            if let Some(rejection) = rejection {
                return Err(ConnectionLost::Connect(ConnectError::Tls {
                    address,
                    rejection,
                }));
            }
            let closed = if closed_why.is_empty() {
                String::new()
            } else {
                format!("; the connection closed: {}", closed_why.join("; "))
            };
            Err(ConnectionLost::Initialize(format!(
                "Initialize failed: {:?}: {}{closed}",
                status.code(),
                status.message()
            )))
        }
        Err(_) => Err(ConnectionLost::Initialize(format!(
            "Initialize did not answer within {}ms",
            timeout.as_millis()
        ))),
    }
}
