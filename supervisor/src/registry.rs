//! The registry: a TCP + mutual TLS endpoint (`plugvisor.v1.Registry`)
//! where remote plugins announce themselves and then send heartbeats.
//!
//! An announcement becomes a supervised remote plugin (see
//! [`crate::remote`]): the supervisor connects to the announced address
//! with the registry's own certificate, expecting the plugin's certificate
//! to carry the plugin's name as a DNS SAN, and routes calls to it like to
//! any other plugin. Each registration has a lease: no heartbeat for
//! `heartbeat_timeout` makes it unavailable, none for `remove_after`
//! removes it. A peer may register only the names its client certificate
//! carries as DNS SANs, and its announcements are rate-limited (a token
//! bucket per client certificate).
//!
//! One owner: the registrations live behind one mutex in [`Shared`]; each
//! lease's state is published to its plugin's actor through a watch
//! channel. Removals run in tracked tasks, so they finish even if the
//! caller that caused them goes away.

use crate::error::Error;
use crate::manifest::{Manifest, validate_address, validate_name};
use crate::status::{Event, EventDetail, PluginState};
use crate::supervisor::Supervisor;
use crate::tls::{self, TlsFiles};
use crate::units::HumanDuration;
use plugvisor_proto::registry_server::{self, RegistryServer};
use plugvisor_proto::{
    AnnounceRequest, AnnounceResponse, HeartbeatRequest, HeartbeatResponse, LeaveRequest,
    LeaveResponse,
};
use serde::Deserialize;
use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

/// Largest registry request accepted (an announcement is a few hundred bytes).
const MAX_REQUEST: usize = 64 << 10;
/// TLS handshakes in progress at once; more connections wait to be accepted.
const MAX_HANDSHAKES: usize = 64;
/// How long a connecting peer has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Capabilities (and methods) an announcement may list, and their length.
const MAX_LIST: usize = 256;
const MAX_ITEM: usize = 128;
/// Rate-limit buckets kept; idle full ones are dropped beyond this.
const MAX_BUCKETS: usize = 4096;

/// `registry:` in plugvisor.yaml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Where to listen, e.g. `0.0.0.0:7400`.
    pub listen: SocketAddr,
    /// The CA that signs the peers' client certificates and the plugins'
    /// server certificates.
    pub ca: PathBuf,
    /// The registry's certificate and key: presented to announcing peers,
    /// and as the client certificate when connecting to their plugins.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// How often peers are asked to send a heartbeat.
    #[serde(default = "default_interval")]
    pub heartbeat_interval: HumanDuration,
    /// No heartbeat for this long: the plugin is unavailable.
    #[serde(default = "default_timeout")]
    pub heartbeat_timeout: HumanDuration,
    /// No heartbeat for this long: the registration is removed.
    #[serde(default = "default_remove_after")]
    pub remove_after: HumanDuration,
    /// Announcements per second each peer (client certificate) may make,
    /// on average, and in a burst.
    #[serde(default = "default_rate")]
    pub announce_rate: f64,
    #[serde(default = "default_burst")]
    pub announce_burst: u32,
    /// Registrations at most, over all peers.
    #[serde(default = "default_max")]
    pub max_registrations: usize,
}

fn default_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(3))
}
fn default_remove_after() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_rate() -> f64 {
    1.0
}
fn default_burst() -> u32 {
    5
}
fn default_max() -> usize {
    256
}

impl RegistryConfig {
    /// A config with defaults for everything but where to listen and the
    /// TLS files.
    pub fn new(listen: SocketAddr, tls: TlsFiles) -> Self {
        RegistryConfig {
            listen,
            ca: tls.ca,
            cert: tls.cert,
            key: tls.key,
            heartbeat_interval: default_interval(),
            heartbeat_timeout: default_timeout(),
            remove_after: default_remove_after(),
            announce_rate: default_rate(),
            announce_burst: default_burst(),
            max_registrations: default_max(),
        }
    }

    /// Takes relative paths from `base` and checks the values; the message
    /// names the field.
    pub fn resolve(&mut self, base: &Path) -> Result<(), String> {
        for path in [&mut self.ca, &mut self.cert, &mut self.key] {
            *path = base.join(&*path);
        }
        let interval = self.heartbeat_interval.0;
        if interval.is_zero() {
            return Err("registry.heartbeat_interval: must be greater than zero".into());
        }
        if self.heartbeat_timeout.0 <= interval {
            return Err(format!(
                "registry.heartbeat_timeout: {:?} must be longer than heartbeat_interval ({:?}), or every plugin misses its heartbeats",
                self.heartbeat_timeout.0, interval
            ));
        }
        if self.remove_after.0 < self.heartbeat_timeout.0 {
            return Err(format!(
                "registry.remove_after: {:?} must be at least heartbeat_timeout ({:?})",
                self.remove_after.0, self.heartbeat_timeout.0
            ));
        }
        if !(self.announce_rate.is_finite() && self.announce_rate > 0.0) {
            return Err(format!(
                "registry.announce_rate: {} must be a positive number of announcements per second",
                self.announce_rate
            ));
        }
        if self.announce_burst == 0 {
            return Err("registry.announce_burst: must be at least 1".into());
        }
        Ok(())
    }

    fn tls(&self) -> TlsFiles {
        TlsFiles {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }
}

/// A registered plugin's link to its registration, carried in its manifest.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The peer that announced it: its address and certificate names.
    pub peer: String,
    pub capabilities: Vec<String>,
    /// The lease, as the registry sees it.
    pub lease: watch::Receiver<Lease>,
}

/// A registration's lease.
#[derive(Debug, Clone)]
pub struct Lease {
    pub liveness: Liveness,
    pub last_heartbeat: Instant,
}

/// Whether heartbeats arrive in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    /// None for `silent_for`, longer than `heartbeat_timeout`.
    Missed {
        silent_for: Duration,
    },
}

/// What a lease's silence calls for at `now`: a pure function of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseVerdict {
    Keep,
    Unavailable,
    Remove,
}

/// Decides a lease's fate from its last heartbeat.
pub fn judge(
    last: Instant,
    now: Instant,
    timeout: Duration,
    remove_after: Duration,
) -> LeaseVerdict {
    let silent = now.saturating_duration_since(last);
    if silent >= remove_after {
        LeaseVerdict::Remove
    } else if silent >= timeout {
        LeaseVerdict::Unavailable
    } else {
        LeaseVerdict::Keep
    }
}

/// A token bucket: `rate` tokens a second up to `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn full(burst: u32, now: Instant) -> Self {
        TokenBucket {
            tokens: f64::from(burst),
            last: now,
        }
    }

    /// Takes one token, or says how long until one is there.
    pub fn take(&mut self, now: Instant, rate: f64, burst: u32) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(burst));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }

    fn is_full(&self, now: Instant, rate: f64, burst: u32) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * rate >= f64::from(burst)
    }
}

/// Who is on the other end of a registry connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub addr: Option<SocketAddr>,
    /// The verified client certificate (mutual TLS requires one).
    pub cert: Option<CertificateDer<'static>>,
}

impl PeerInfo {
    /// Who the peer is, for people: its address and certificate names.
    fn describe(&self) -> String {
        let names = self
            .cert
            .as_ref()
            .map(tls::dns_names)
            .unwrap_or_default()
            .join(",");
        match self.addr {
            Some(a) => format!("{a} (certificate for {names})"),
            None => format!("certificate for {names}"),
        }
    }

    /// The rate-limit and ownership key: the client certificate itself.
    fn key(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.cert.as_ref().map(|c| c.as_ref()).hash(&mut h);
        h.finish()
    }
}

/// A TLS connection the registry's gRPC server serves; it carries the
/// peer's certificate into each request's extensions.
struct PeerConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
}

impl tonic::transport::server::Connected for PeerConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        let (tcp, session) = self.stream.get_ref();
        PeerInfo {
            addr: tcp.peer_addr().ok(),
            cert: session
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.clone().into_owned()),
        }
    }
}

impl AsyncRead for PeerConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// One registration, owned by [`Shared::entries`].
struct Entry {
    lease_id: String,
    peer_key: u64,
    lease: watch::Sender<Lease>,
}

/// The registry's state: one lock over the registrations and the buckets.
struct Shared {
    config: RegistryConfig,
    supervisor: Supervisor,
    state: Mutex<State>,
    /// Removals in progress: they finish even if their caller goes away.
    tasks: TaskTracker,
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    buckets: HashMap<u64, TokenBucket>,
}

/// A bound registry, ready to serve.
pub struct Registry {
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    config: RegistryConfig,
}

impl Registry {
    /// Loads the TLS files and binds the listen address; errors say which.
    pub async fn bind(config: RegistryConfig) -> Result<Registry, String> {
        let server = tls::server_config(&config.tls()).map_err(|e| format!("registry: {e}"))?;
        // The client side (to registered plugins) uses the same files:
        // check now rather than at the first announcement.
        tls::client_config(&config.tls()).map_err(|e| format!("registry: {e}"))?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| format!("registry: cannot listen on {}: {e}", config.listen))?;
        Ok(Registry {
            listener,
            acceptor: tokio_rustls::TlsAcceptor::from(server),
            config,
        })
    }

    /// The address it listens on (with the port chosen, for port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown`, then removes every registration.
    pub async fn serve(self, supervisor: Supervisor, shutdown: impl Future<Output = ()> + Send) {
        let shared = Arc::new(Shared {
            config: self.config,
            supervisor,
            state: Mutex::default(),
            tasks: TaskTracker::new(),
        });
        let (conns_tx, conns_rx) = tokio::sync::mpsc::channel::<std::io::Result<PeerConn>>(16);
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let accept_tasks = TaskTracker::new();
        let listener = self.listener;
        let acceptor = self.acceptor;
        let accept_loop = {
            let accept_tasks = accept_tasks.clone();
            async move {
                loop {
                    let Ok(permit) = handshakes.clone().acquire_owned().await else {
                        return;
                    };
                    let (tcp, _) = match listener.accept().await {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!("registry: accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let acceptor = acceptor.clone();
                    let conns = conns_tx.clone();
                    accept_tasks.spawn(async move {
                        let accepted = tls::accept(&acceptor, tcp, HANDSHAKE_TIMEOUT).await;
                        drop(permit);
                        match accepted {
                            Ok(stream) => {
                                let _ = conns.send(Ok(PeerConn { stream })).await;
                            }
                            Err(e) => tracing::warn!("registry: {e}"),
                        }
                    });
                }
            }
        };
        let sweeper = sweep(shared.clone());
        let service = RegistryServer::new(Service {
            shared: shared.clone(),
        })
        .max_decoding_message_size(MAX_REQUEST);
        let server = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::ReceiverStream::new(conns_rx),
                shutdown,
            );
        tokio::select! {
            result = server => {
                if let Err(e) = result {
                    tracing::error!("registry: the server failed: {e}");
                }
            }
            () = accept_loop => {}
            () = sweeper => {}
        }
        accept_tasks.close();
        let names: Vec<String> = {
            let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            state.entries.drain().map(|(name, _)| name).collect()
        };
        for name in names {
            leave(&shared, name, "the registry has shut down".into());
        }
        shared.tasks.close();
        shared.tasks.wait().await;
    }
}

/// Marks silent leases unavailable and removes those silent too long.
async fn sweep(shared: Arc<Shared>) {
    let timeout = shared.config.heartbeat_timeout.0;
    let remove_after = shared.config.remove_after.0;
    let period = (shared.config.heartbeat_interval.0 / 4).max(Duration::from_millis(20));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let mut gone = Vec::new();
        {
            let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            state.entries.retain(|name, entry| {
                let last = entry.lease.borrow().last_heartbeat;
                match judge(last, now, timeout, remove_after) {
                    LeaseVerdict::Keep => true,
                    LeaseVerdict::Unavailable => {
                        let silent_for = now.saturating_duration_since(last);
                        entry.lease.send_if_modified(|l| {
                            if l.liveness == Liveness::Alive {
                                l.liveness = Liveness::Missed { silent_for };
                                true
                            } else {
                                false
                            }
                        });
                        true
                    }
                    LeaseVerdict::Remove => {
                        gone.push((name.clone(), now.saturating_duration_since(last)));
                        false
                    }
                }
            });
            let (rate, burst) = (shared.config.announce_rate, shared.config.announce_burst);
            if state.buckets.len() > MAX_BUCKETS {
                state.buckets.retain(|_, b| !b.is_full(now, rate, burst));
            }
        }
        for (name, silent) in gone {
            leave(
                &shared,
                name,
                format!(
                    "no heartbeat for {}ms (remove_after {}ms)",
                    silent.as_millis(),
                    remove_after.as_millis()
                ),
            );
        }
    }
}

/// Removes a plugin that left (its entry is already gone), in a tracked
/// task, then says so in the event stream. Returns when it is removed.
fn leave(shared: &Arc<Shared>, name: String, why: String) -> tokio::sync::oneshot::Receiver<()> {
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let supervisor = shared.supervisor.clone();
    shared.tasks.spawn(async move {
        match supervisor.remove(&name).await {
            Ok(()) | Err(Error::UnknownPlugin(_)) => {}
            Err(e) => tracing::warn!(plugin = %name, "registry: removing it failed: {e}"),
        }
        let reason = format!("left the registry: {why}");
        tracing::info!(plugin = %name, "{reason}");
        supervisor.emit(Event {
            time: SystemTime::now(),
            plugin: name,
            replica: 0,
            instance: String::new(),
            state: PluginState::Stopped,
            reason,
            detail: EventDetail::default(),
        });
        let _ = done_tx.send(());
    });
    done
}

fn lease_id() -> String {
    let a = std::collections::hash_map::RandomState::new().hash_one(SystemTime::now());
    let b = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    format!("{a:016x}{b:016x}")
}

struct Service {
    shared: Arc<Shared>,
}

fn peer_of<T>(request: &Request<T>) -> Result<PeerInfo, Status> {
    let peer = request
        .extensions()
        .get::<PeerInfo>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no TLS peer information"))?;
    if peer.cert.is_none() {
        return Err(Status::unauthenticated("no client certificate presented"));
    }
    Ok(peer)
}

fn check_list(field: &str, items: &[String]) -> Result<(), Status> {
    if items.len() > MAX_LIST {
        return Err(Status::invalid_argument(format!(
            "{field}: {} entries, more than the {MAX_LIST} allowed",
            items.len()
        )));
    }
    if let Some(bad) = items
        .iter()
        .find(|i| i.is_empty() || i.len() > MAX_ITEM || i.chars().any(char::is_control))
    {
        return Err(Status::invalid_argument(format!(
            "{field}: `{}` is not a valid entry (1-{MAX_ITEM} printable characters)",
            bad.escape_debug()
        )));
    }
    Ok(())
}

/// The manifest a registration is supervised with.
fn manifest_for(
    config: &RegistryConfig,
    req: &AnnounceRequest,
    registration: Registration,
) -> Result<Manifest, Status> {
    let health_interval = config.heartbeat_interval.0.max(Duration::from_millis(500));
    let text = serde_yaml::to_string(&serde_json::json!({
        "name": req.name,
        "version": req.version,
        "remote": {
            "address": req.address,
            "ca": config.ca,
            "cert": config.cert,
            "key": config.key,
            "identity": req.name,
        },
        "capabilities": req.capabilities,
        "health": {"interval": format!("{}ms", health_interval.as_millis())},
        "restart": {"policy": "always", "initial_backoff": "200ms", "max_backoff": "5s"},
    }))
    .map_err(|e| Status::internal(format!("cannot build the manifest: {e}")))?;
    let path = PathBuf::from(format!("<registry>/{}", req.name));
    let mut manifest =
        Manifest::parse(&path, &text).map_err(|e| Status::invalid_argument(e.message.clone()))?;
    if let Some(remote) = &mut manifest.remote {
        remote.registration = Some(registration);
    }
    Ok(manifest)
}

#[tonic::async_trait]
impl registry_server::Registry for Service {
    async fn announce(
        &self,
        request: Request<AnnounceRequest>,
    ) -> Result<Response<AnnounceResponse>, Status> {
        let peer = peer_of(&request)?;
        let req = request.into_inner();
        let shared = &self.shared;
        let config = &shared.config;
        let now = Instant::now();
        {
            let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            let bucket = state
                .buckets
                .entry(peer.key())
                .or_insert_with(|| TokenBucket::full(config.announce_burst, now));
            if let Err(wait) = bucket.take(now, config.announce_rate, config.announce_burst) {
                return Err(Status::resource_exhausted(format!(
                    "announcements from {} are limited to {}/s (burst {}); retry in {}ms",
                    peer.describe(),
                    config.announce_rate,
                    config.announce_burst,
                    wait.as_millis().max(1)
                )));
            }
        }
        validate_name(&req.name).map_err(|m| Status::invalid_argument(format!("name: {m}")))?;
        semver::Version::parse(&req.version).map_err(|e| {
            Status::invalid_argument(format!(
                "version: `{}` is not a semantic version: {e}",
                req.version
            ))
        })?;
        validate_address(&req.address)
            .map_err(|m| Status::invalid_argument(format!("address: {m}")))?;
        if !req
            .address
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:[]_".contains(c))
        {
            return Err(Status::invalid_argument(format!(
                "address: `{}` holds characters no host:port has",
                req.address.escape_debug()
            )));
        }
        check_list("methods", &req.methods)?;
        check_list("capabilities", &req.capabilities)?;
        if let Some(cert) = &peer.cert {
            tls::certificate_allows(cert, &req.name).map_err(Status::permission_denied)?;
        }
        // Replace this peer's own registration of the name; refuse others'.
        let replaced = {
            let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            match state.entries.get(&req.name) {
                Some(e) if e.peer_key != peer.key() => {
                    return Err(Status::already_exists(format!(
                        "`{}` is registered by another peer",
                        req.name
                    )));
                }
                Some(_) => state.entries.remove(&req.name).is_some(),
                None => {
                    if state.entries.len() >= config.max_registrations {
                        return Err(Status::resource_exhausted(format!(
                            "the registry holds its maximum of {} registrations",
                            config.max_registrations
                        )));
                    }
                    if shared.supervisor.names().contains(&req.name) {
                        return Err(Status::already_exists(format!(
                            "`{}` is already supervised here (a local plugin, or one still leaving)",
                            req.name
                        )));
                    }
                    false
                }
            }
        };
        if replaced {
            let _ = leave(shared, req.name.clone(), "announced again; replaced".into()).await;
        }
        let (lease_tx, lease_rx) = watch::channel(Lease {
            liveness: Liveness::Alive,
            last_heartbeat: Instant::now(),
        });
        let registration = Registration {
            peer: peer.describe(),
            capabilities: req.capabilities.clone(),
            lease: lease_rx,
        };
        let manifest = manifest_for(config, &req, registration)?;
        let lease_id = lease_id();
        {
            // Added under the lock, so the name cannot be taken twice.
            let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            if state.entries.contains_key(&req.name) {
                return Err(Status::already_exists(format!(
                    "`{}` was registered meanwhile",
                    req.name
                )));
            }
            shared
                .supervisor
                .add(manifest, &Default::default())
                .map_err(|e| match e {
                    Error::Invalid(m) => Status::already_exists(m),
                    other => Status::from(other),
                })?;
            state.entries.insert(
                req.name.clone(),
                Entry {
                    lease_id: lease_id.clone(),
                    peer_key: peer.key(),
                    lease: lease_tx,
                },
            );
        }
        tracing::info!(plugin = %req.name, "registry: joined from {} at {}", peer.describe(), req.address);
        Ok(Response::new(AnnounceResponse {
            lease_id,
            heartbeat_interval_ms: config.heartbeat_interval.0.as_millis() as u64,
            heartbeat_timeout_ms: config.heartbeat_timeout.0.as_millis() as u64,
            remove_after_ms: config.remove_after.0.as_millis() as u64,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let peer = peer_of(&request)?;
        let req = request.into_inner();
        let state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        let entry = owned_entry(&state, &req.name, &req.lease_id, &peer)?;
        entry.lease.send_if_modified(|l| {
            l.last_heartbeat = Instant::now();
            let back = l.liveness != Liveness::Alive;
            l.liveness = Liveness::Alive;
            back
        });
        Ok(Response::new(HeartbeatResponse {
            heartbeat_interval_ms: self.shared.config.heartbeat_interval.0.as_millis() as u64,
        }))
    }

    async fn leave(
        &self,
        request: Request<LeaveRequest>,
    ) -> Result<Response<LeaveResponse>, Status> {
        let peer = peer_of(&request)?;
        let req = request.into_inner();
        {
            let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            owned_entry(&state, &req.name, &req.lease_id, &peer)?;
            state.entries.remove(&req.name);
        }
        let _ = leave(&self.shared, req.name, "it said Leave".into()).await;
        Ok(Response::new(LeaveResponse {}))
    }
}

fn owned_entry<'a>(
    state: &'a State,
    name: &str,
    lease_id: &str,
    peer: &PeerInfo,
) -> Result<&'a Entry, Status> {
    let entry = state.entries.get(name).ok_or_else(|| {
        Status::not_found(format!(
            "`{name}` is not registered (removed after missed heartbeats, or the daemon restarted); announce again"
        ))
    })?;
    if entry.peer_key != peer.key() {
        return Err(Status::permission_denied(format!(
            "`{name}` is registered by another peer"
        )));
    }
    if entry.lease_id != lease_id {
        return Err(Status::not_found(format!(
            "lease `{lease_id}` of `{name}` is not current; announce again"
        )));
    }
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(3, t0);
        for _ in 0..3 {
            assert_eq!(b.take(t0, 2.0, 3), Ok(()));
        }
        let wait = b.take(t0, 2.0, 3).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert!(b.take(t0 + Duration::from_millis(400), 2.0, 3).is_err());
        assert_eq!(b.take(t0 + Duration::from_millis(500), 2.0, 3), Ok(()));
        // Refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(b.take(later, 2.0, 3), Ok(()));
        }
        assert!(b.take(later, 2.0, 3).is_err());
    }

    #[test]
    fn silence_makes_a_lease_unavailable_then_removed() {
        let t0 = Instant::now();
        let (timeout, remove) = (Duration::from_secs(3), Duration::from_secs(30));
        let at = |s| t0 + Duration::from_secs(s);
        assert_eq!(judge(t0, at(2), timeout, remove), LeaseVerdict::Keep);
        assert_eq!(judge(t0, at(3), timeout, remove), LeaseVerdict::Unavailable);
        assert_eq!(
            judge(t0, at(29), timeout, remove),
            LeaseVerdict::Unavailable
        );
        assert_eq!(judge(t0, at(30), timeout, remove), LeaseVerdict::Remove);
    }

    #[test]
    fn config_refuses_a_timeout_within_the_interval() {
        let files = TlsFiles {
            ca: "ca.pem".into(),
            cert: "c.pem".into(),
            key: "k.pem".into(),
        };
        let mut c = RegistryConfig::new("127.0.0.1:0".parse().unwrap(), files);
        c.heartbeat_timeout = HumanDuration(Duration::from_millis(500));
        let e = c.resolve(Path::new("/etc/plugvisor")).unwrap_err();
        assert!(e.contains("registry.heartbeat_timeout"), "{e}");
        assert_eq!(c.ca, PathBuf::from("/etc/plugvisor/ca.pem"));
    }
}
