//! Serving a plugin on another host: TCP with mutual TLS instead of the
//! supervisor's Unix socket, with the same graceful drain, and optionally
//! announcing it to a daemon's registry with heartbeats.
//!
//! [`crate::serve`] (and so [`crate::main`]) switch to this mode when
//! `PLUGVISOR_TLS_LISTEN` is set:
//!
//! | variable | meaning |
//! |---|---|
//! | `PLUGVISOR_TLS_LISTEN` | `host:port` to listen on (port 0 picks one) |
//! | `PLUGVISOR_TLS_CERT`, `PLUGVISOR_TLS_KEY` | the plugin's PEM certificate (its SANs are what the supervisor checks) and key |
//! | `PLUGVISOR_TLS_CLIENT_CA` | PEM CA the supervisor's client certificate must chain to |
//! | `PLUGVISOR_REGISTRY` | optional: `host:port` of a daemon's registry to announce to |
//! | `PLUGVISOR_REGISTRY_IDENTITY` | the SAN the registry's certificate carries (default: its host) |
//! | `PLUGVISOR_PLUGIN_NAME` | the name to register (default: [`Plugin::name`]) |
//! | `PLUGVISOR_ADVERTISE` | the address to announce (default: the bound address) |
//! | `PLUGVISOR_CAPABILITIES` | comma-separated capabilities to announce |
//!
//! Once listening, the plugin prints `plugvisor|1|tls|<bound address>` on
//! stdout. Plaintext clients, clients without a certificate, and clients
//! whose certificate the CA did not sign are refused, each with a warning
//! that says which.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use plugvisor_proto::registry_client::RegistryClient;
use plugvisor_proto::{AnnounceRequest, HeartbeatRequest, LeaveRequest};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::plugin::Plugin;
use crate::serve::{ServeError, ServeOptions, Signals, run};

/// How long a connecting client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The files of mutual TLS on the plugin's side.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The plugin's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA clients' certificates must chain to (PEM).
    pub client_ca: PathBuf,
}

/// Where to announce the plugin, and as what.
#[derive(Debug, Clone)]
pub struct RegistryTarget {
    /// `host:port` of the registry.
    pub address: String,
    /// The SAN the registry's certificate must carry.
    pub identity: String,
    /// The name to register: one of the plugin certificate's DNS SANs.
    pub name: Option<String>,
    /// The address the daemon should connect to; the bound one if `None`.
    pub advertise: Option<String>,
    pub capabilities: Vec<String>,
}

/// Remote serving, as the environment asks for it.
#[derive(Debug, Clone)]
pub struct RemoteEnv {
    pub listen: String,
    pub tls: TlsFiles,
    pub registry: Option<RegistryTarget>,
}

impl RemoteEnv {
    /// `None` unless `PLUGVISOR_TLS_LISTEN` is set.
    pub fn from_env() -> Result<Option<RemoteEnv>, ServeError> {
        Self::from_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<RemoteEnv>, ServeError> {
        let Some(listen) = var("PLUGVISOR_TLS_LISTEN") else {
            return Ok(None);
        };
        let need = |name: &'static str| {
            var(name).ok_or_else(|| {
                ServeError::Tls(format!(
                    "PLUGVISOR_TLS_LISTEN is set, so {name} must be too (a plugin serving TCP needs mutual TLS)"
                ))
            })
        };
        let tls = TlsFiles {
            cert: need("PLUGVISOR_TLS_CERT")?.into(),
            key: need("PLUGVISOR_TLS_KEY")?.into(),
            client_ca: need("PLUGVISOR_TLS_CLIENT_CA")?.into(),
        };
        let registry = var("PLUGVISOR_REGISTRY").map(|address| RegistryTarget {
            identity: var("PLUGVISOR_REGISTRY_IDENTITY").unwrap_or_else(|| {
                address
                    .rsplit_once(':')
                    .map_or(address.clone(), |(h, _)| h.to_string())
            }),
            address,
            name: var("PLUGVISOR_PLUGIN_NAME"),
            advertise: var("PLUGVISOR_ADVERTISE"),
            capabilities: var("PLUGVISOR_CAPABILITIES")
                .map(|c| {
                    c.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default(),
        });
        Ok(Some(RemoteEnv {
            listen,
            tls,
            registry,
        }))
    }
}

fn certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, ServeError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ServeError::Tls(format!("cannot read {what} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(ServeError::Tls(format!(
            "{what} {}: no PEM CERTIFICATE block in it",
            path.display()
        )));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, ServeError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| ServeError::Tls(format!("cannot read private key {}: {e}", path.display())))
}

fn roots(path: &Path) -> Result<Arc<rustls::RootCertStore>, ServeError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(path, "CA certificate")? {
        roots
            .add(c)
            .map_err(|e| ServeError::Tls(format!("CA certificate {}: {e}", path.display())))?;
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server side: presents `cert`, requires a client certificate signed
/// by `client_ca`.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, ServeError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots(&files.client_ca)?,
        provider(),
    )
    .build()
    .map_err(|e| ServeError::Tls(format!("client CA {}: {e}", files.client_ca.display())))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&files.cert, "certificate")?, key(&files.key)?)
        .map_err(|e| {
            ServeError::Tls(format!(
                "certificate {} and key {}: {e}",
                files.cert.display(),
                files.key.display()
            ))
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// An accepted TLS connection, as the gRPC server sees it.
pub struct TlsConn(tokio_rustls::server::TlsStream<TcpStream>);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = Option<SocketAddr>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.peer_addr().ok()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Accepts one connection: refuses plaintext (quoting its first bytes)
/// before the handshake, and says why a handshake failed.
pub async fn accept(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
) -> Result<TlsConn, String> {
    let peer = tcp
        .peer_addr()
        .map_or_else(|_| "an unknown peer".to_string(), |a| a.to_string());
    let _ = tcp.set_nodelay(true);
    let handshake = async {
        let mut first = [0u8; 16];
        let n = tcp.peek(&mut first).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("it closed before the TLS handshake".to_string());
        }
        if first[0] != 0x16 {
            return Err(format!(
                "a plaintext client on a TLS port (its first bytes: {:?})",
                String::from_utf8_lossy(&first[..n])
            ));
        }
        acceptor.accept(tcp).await.map_err(|e| {
            match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                Some(rustls::Error::InvalidCertificate(c)) => {
                    format!("its client certificate is refused: {c:?}")
                }
                Some(rustls::Error::NoCertificatesPresented) => {
                    "it presented no client certificate".to_string()
                }
                Some(other) => format!("the TLS handshake failed: {other}"),
                None => format!("the TLS handshake failed: {e}"),
            }
        })
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(stream)) => Ok(TlsConn(stream)),
        Ok(Err(why)) => Err(format!("refused a connection from {peer}: {why}")),
        Err(_) => Err(format!(
            "refused a connection from {peer}: no TLS handshake within {}s",
            HANDSHAKE_TIMEOUT.as_secs()
        )),
    }
}

/// Serves `plugin` on `listener` with mutual TLS until `shutdown`, a
/// `Shutdown` RPC or (with [`ServeOptions::handle_signals`]) SIGTERM or
/// SIGINT, then drains like [`crate::serve_listener`].
pub async fn serve_tls<P: Plugin>(
    plugin: P,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let signals = Signals::install_if(options.handle_signals)?;
    let (conns_tx, conns_rx) = tokio::sync::mpsc::channel::<std::io::Result<TlsConn>>(16);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    // At most this many handshakes at once: silent clients cannot pile up.
    let handshakes = Arc::new(tokio::sync::Semaphore::new(64));
    let accepting = async move {
        loop {
            let Ok(permit) = handshakes.clone().acquire_owned().await else {
                return;
            };
            let tcp = match listener.accept().await {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let conns = conns_tx.clone();
            tokio::spawn(async move {
                let accepted = accept(&acceptor, tcp).await;
                drop(permit);
                match accepted {
                    Ok(conn) => {
                        let _ = conns.send(Ok(conn)).await;
                    }
                    Err(why) => tracing::warn!("{why}"),
                }
            });
        }
    };
    let incoming = tokio_stream::wrappers::ReceiverStream::new(conns_rx);
    let served = run(Arc::new(plugin), incoming, &options, shutdown, signals);
    tokio::select! {
        result = served => result,
        () = accepting => Ok(()),
    }
}

/// What [`crate::serve`] runs when `PLUGVISOR_TLS_LISTEN` is set: bind,
/// print `plugvisor|1|tls|<address>`, serve, and keep a registration with
/// the registry if one is named (left again when draining starts).
pub async fn serve_remote<P: Plugin>(
    plugin: P,
    env: RemoteEnv,
    options: ServeOptions,
) -> Result<(), ServeError> {
    let tls = server_config(&env.tls)?;
    let listener = TcpListener::bind(&env.listen)
        .await
        .map_err(|e| ServeError::Tls(format!("cannot listen on {}: {e}", env.listen)))?;
    let bound = listener
        .local_addr()
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    println!(
        "plugvisor|{}|tls|{bound}",
        plugvisor_proto::handshake::PROTOCOL_VERSION
    );
    tracing::info!(address = %bound, "plugin listening with mutual TLS");
    let Some(target) = env.registry.clone() else {
        return serve_tls(plugin, listener, tls, options, std::future::pending()).await;
    };
    let announcement = AnnounceRequest {
        name: target
            .name
            .clone()
            .unwrap_or_else(|| plugin.name().to_string()),
        version: plugin.version().to_string(),
        address: target
            .advertise
            .clone()
            .unwrap_or_else(|| bound.to_string()),
        methods: plugin.methods(),
        capabilities: target.capabilities.clone(),
    };
    let client_files = TlsFiles {
        cert: env.tls.cert.clone(),
        key: env.tls.key.clone(),
        client_ca: env.tls.client_ca.clone(),
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let registration = keep_registered(client_files, target, announcement, stopped);
    let served = serve_tls(plugin, listener, tls, options, std::future::pending());
    tokio::pin!(registration);
    tokio::select! {
        result = served => {
            // Draining is over: leave, so the daemon stops routing here.
            let _ = stop.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(2), registration).await;
            result
        }
        () = &mut registration => Ok(()),
    }
}

/// A gRPC channel to the registry over TCP + mutual TLS.
pub async fn registry_client(
    files: &TlsFiles,
    address: &str,
    identity: &str,
) -> Result<RegistryClient<tonic::transport::Channel>, String> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(&files.client_ca).map_err(|e| e.to_string())?)
        .with_client_auth_cert(
            certs(&files.cert, "certificate").map_err(|e| e.to_string())?,
            key(&files.key).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(identity.to_string())
        .map_err(|_| format!("`{identity}` is not a DNS name or IP address"))?;
    let address = address.to_string();
    let channel = tonic::transport::Endpoint::from_static("http://registry.plugvisor")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_| {
            let (connector, name, address) = (connector.clone(), name.clone(), address.clone());
            async move {
                let tcp = TcpStream::connect(&address).await?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        })?;
    Ok(RegistryClient::new(channel))
}

/// Announces, then sends heartbeats at the interval the registry asks for,
/// announcing again when the registry forgot the lease; on `stop`, leaves.
/// Failures are logged and retried with backoff: the plugin keeps serving
/// whatever happens to the registry.
async fn keep_registered(
    files: TlsFiles,
    target: RegistryTarget,
    announcement: AnnounceRequest,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let session = async {
            let mut client = registry_client(&files, &target.address, &target.identity).await?;
            let lease = client
                .announce(announcement.clone())
                .await
                .map_err(|s| format!("Announce: {:?}: {}", s.code(), s.message()))?
                .into_inner();
            tracing::info!(registry = %target.address, name = %announcement.name, "registered");
            let mut interval = Duration::from_millis(lease.heartbeat_interval_ms.max(50));
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = stop.wait_for(|s| *s) => {
                        let _ = client.leave(LeaveRequest {
                            name: announcement.name.clone(),
                            lease_id: lease.lease_id.clone(),
                        }).await;
                        return Ok::<bool, String>(true);
                    }
                }
                let beat = client
                    .heartbeat(HeartbeatRequest {
                        name: announcement.name.clone(),
                        lease_id: lease.lease_id.clone(),
                    })
                    .await
                    .map_err(|s| format!("Heartbeat: {:?}: {}", s.code(), s.message()))?;
                interval = Duration::from_millis(beat.into_inner().heartbeat_interval_ms.max(50));
            }
        };
        match session.await {
            Ok(_) => return,
            Err(why) => {
                tracing::warn!(registry = %target.address, "registration lost: {why}; retrying in {}ms", backoff.as_millis());
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_listen_without_its_files_says_which_is_missing() {
        let vars = |k: &str| (k == "PLUGVISOR_TLS_LISTEN").then(|| "127.0.0.1:0".to_string());
        let e = RemoteEnv::from_vars(vars).unwrap_err().to_string();
        assert!(e.contains("PLUGVISOR_TLS_CERT"), "{e}");
        assert!(RemoteEnv::from_vars(|_| None).unwrap().is_none());
    }
}
