//! Running a plugin: read the handshake environment, listen on the assigned
//! socket, announce it on stdout, serve until asked to stop, drain, return.
//!
//! Most plugins only call [`crate::main`] or [`serve`]. Plugins that need to
//! do something unusual between reading the environment and serving (the
//! supervisor's own fault-injection test plugin) use [`HandshakeEnv`] and
//! [`serve_listener`] directly.

use std::future::Future;
use std::io::{self, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use plugvisor_proto::handshake::{
    self, ENV_MAGIC_COOKIE, ENV_NAME, ENV_PROTOCOL_VERSIONS, ENV_SOCKET, Handshake,
    MAGIC_COOKIE_VALUE, NETWORK_UNIX, PROTOCOL_VERSION,
};
use tokio::net::UnixListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{oneshot, watch};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;

use crate::plugin::Plugin;
use crate::service::{Routes, Shared};

/// HTTP/2 flow-control windows. Large windows let a `HandleStream` of 1 MiB
/// chunks flow without waiting for WINDOW_UPDATE round trips; over a Unix
/// socket memory is the only cost.
pub(crate) const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// See [`STREAM_WINDOW`].
pub(crate) const CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;
/// Largest HTTP/2 frame the server accepts: a whole 1 MiB chunk, prefix
/// included, fits in one frame, so its data is read without a copy.
pub(crate) const MAX_FRAME_SIZE: u32 = 2 * 1024 * 1024;

/// How [`serve_with`] and [`serve_listener`] behave. `Default` is what a
/// normal plugin wants.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Drain and return on SIGTERM or SIGINT. Default `true`; turn it off
    /// when the process handles those signals itself (or, in tests, must not
    /// install handlers).
    pub handle_signals: bool,
    /// How long draining may take after SIGTERM/SIGINT, after the shutdown
    /// future passed to [`serve_listener`] fires, or after a `Shutdown` RPC
    /// with `deadline_ms: 0`. When it passes, serving returns anyway.
    /// Default 10 s.
    pub drain_timeout: Duration,
    /// Whether a `Shutdown` RPC stops the server. Default `true`. Only
    /// fault-injection plugins that simulate a plugin ignoring `Shutdown`
    /// turn it off.
    pub honor_shutdown_rpc: bool,
    /// The line to print on stdout once the server is ready (listening, signal
    /// handlers installed). [`serve_with`] fills it from [`HandshakeEnv`] when
    /// it is `None`; [`serve_listener`] prints it as given, or nothing.
    pub handshake: Option<Handshake>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            handle_signals: true,
            drain_timeout: Duration::from_secs(10),
            honor_shutdown_rpc: true,
            handshake: None,
        }
    }
}

/// Why a plugin could not start or keep serving. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The magic cookie is missing: someone ran the plugin by hand.
    #[error(
        "This is a plugvisor plugin. It is meant to be started by the plugvisor supervisor, \
         not run by hand.\nPut it in a plugin directory next to a plugin.yaml and run \
         `plugvisor run --plugins-dir DIR`; to try it without a supervisor, use the \
         `plugvisor_sdk::testing` harness."
    )]
    NotStartedBySupervisor,
    /// A handshake variable the supervisor always sets is missing.
    #[error("{var} is not set; the plugvisor supervisor sets it when it starts a plugin")]
    MissingEnv {
        /// The variable's name.
        var: &'static str,
    },
    /// `PLUGVISOR_PLUGIN_SOCKET` is not an absolute path.
    #[error("{ENV_SOCKET} must be an absolute path, got `{}`", path.display())]
    SocketNotAbsolute {
        /// What the variable held.
        path: PathBuf,
    },
    /// The supervisor offers no protocol version this SDK speaks.
    #[error(
        "{ENV_PROTOCOL_VERSIONS} is `{seen}`, but this plugin speaks protocol version \
         {PROTOCOL_VERSION} only. Hint: use a supervisor and a plugvisor-sdk of matching versions"
    )]
    UnsupportedProtocol {
        /// What the variable held.
        seen: String,
    },
    /// Something other than a socket sits at the socket path.
    #[error(
        "refusing to listen on {}: it exists and is not a socket; remove it or pick another path",
        path.display()
    )]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// A stale socket file could not be removed.
    #[error("failed to remove stale socket {}: {source}", path.display())]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Listening on the socket path failed.
    #[error("failed to listen on {}: {source}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The handshake line could not be written to stdout.
    #[error("failed to write the handshake line to stdout: {source}")]
    Announce {
        /// The underlying error.
        source: io::Error,
    },
    /// SIGTERM/SIGINT handlers could not be installed.
    #[error("failed to install SIGTERM/SIGINT handlers: {source}")]
    Signals {
        /// The underlying error.
        source: io::Error,
    },
    /// The Tokio runtime could not be built.
    #[error("failed to start the Tokio runtime: {source}")]
    Runtime {
        /// The underlying error.
        source: io::Error,
    },
    /// The gRPC server failed.
    #[error("the plugin's gRPC server failed: {0}")]
    Serve(#[source] tonic::transport::Error),
    /// Serving over TCP + mutual TLS could not be set up (a bad
    /// certificate file, an address that cannot be bound).
    #[error("{0}")]
    Tls(String),
    /// The test harness could not connect to the plugin it started.
    #[error("failed to connect to the plugin at {}: {source}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        source: tonic::transport::Error,
    },
}

/// The handshake environment the supervisor sets, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeEnv {
    /// The absolute path the plugin must listen on (`PLUGVISOR_PLUGIN_SOCKET`).
    pub socket_path: PathBuf,
    /// The protocol versions the supervisor speaks (`PLUGVISOR_PROTOCOL_VERSIONS`);
    /// known to contain this SDK's version.
    pub protocol_versions: Vec<u32>,
    /// The plugin's name as the supervisor knows it (`PLUGVISOR_PLUGIN_NAME`).
    pub plugin_name: Option<String>,
}

impl HandshakeEnv {
    /// Reads and checks the process environment: the magic cookie first (a
    /// plugin run by hand gets [`ServeError::NotStartedBySupervisor`]), then
    /// the socket path and the protocol versions.
    pub fn from_env() -> Result<Self, ServeError> {
        Self::from_vars(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()))
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, ServeError> {
        if var(ENV_MAGIC_COOKIE).as_deref() != Some(MAGIC_COOKIE_VALUE) {
            return Err(ServeError::NotStartedBySupervisor);
        }
        let socket = var(ENV_SOCKET)
            .filter(|s| !s.is_empty())
            .ok_or(ServeError::MissingEnv { var: ENV_SOCKET })?;
        let socket_path = PathBuf::from(socket);
        if !socket_path.is_absolute() {
            return Err(ServeError::SocketNotAbsolute { path: socket_path });
        }
        let seen = var(ENV_PROTOCOL_VERSIONS).ok_or(ServeError::MissingEnv {
            var: ENV_PROTOCOL_VERSIONS,
        })?;
        let protocol_versions = handshake::parse_versions(&seen);
        if !protocol_versions.contains(&PROTOCOL_VERSION) {
            return Err(ServeError::UnsupportedProtocol { seen });
        }
        Ok(HandshakeEnv {
            socket_path,
            protocol_versions,
            plugin_name: var(ENV_NAME).filter(|s| !s.is_empty()),
        })
    }

    /// Listens on [`socket_path`](Self::socket_path), replacing a stale
    /// socket left by an earlier run. Must be called inside a Tokio runtime.
    pub fn bind(&self) -> Result<UnixListener, ServeError> {
        bind(&self.socket_path)
    }

    /// The handshake line announcing this SDK's protocol on the assigned path.
    pub fn handshake(&self) -> Handshake {
        Handshake {
            protocol_version: PROTOCOL_VERSION,
            network: NETWORK_UNIX.to_string(),
            address: self.socket_path.to_string_lossy().into_owned(),
        }
    }
}

/// Listens on `path`, first removing a stale socket there (but never a file
/// of another kind).
fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| ServeError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Ok(_) => {
            return Err(ServeError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ServeError::Bind {
                path: path.to_path_buf(),
                source,
            });
        }
    }
    UnixListener::bind(path).map_err(|source| ServeError::Bind {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `line` and a newline to stdout and flushes it. Called only once
/// the socket is listening: the supervisor connects as soon as it reads it.
fn announce(line: &Handshake) -> Result<(), ServeError> {
    let mut out = io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|source| ServeError::Announce { source })
}

/// Serves `plugin` the way the supervisor expects, with default options:
/// see [`serve_with`].
pub async fn serve<P: Plugin>(plugin: P) -> Result<(), ServeError> {
    serve_with(plugin, ServeOptions::default()).await
}

/// Does the whole handshake and serves `plugin` until a `Shutdown` RPC,
/// SIGTERM or SIGINT, then drains in-flight calls, calls
/// [`Plugin::shutdown`] and returns `Ok(())`.
///
/// Steps: check the magic cookie, socket path and protocol versions
/// ([`HandshakeEnv::from_env`]); set up logging to stderr
/// ([`crate::init_logging`]); listen on the socket; print
/// `plugvisor|1|unix|<path>` on stdout; serve the `plugvisor.v1.Plugin` and
/// `grpc.health.v1.Health` services.
pub async fn serve_with<P: Plugin>(plugin: P, mut options: ServeOptions) -> Result<(), ServeError> {
    // A plugin run on another host serves TCP + mutual TLS instead.
    if let Some(remote) = crate::tls::RemoteEnv::from_env()? {
        crate::init_logging();
        return crate::tls::serve_remote(plugin, remote, options).await;
    }
    let env = HandshakeEnv::from_env()?;
    crate::init_logging();
    let listener = env.bind()?;
    options.handshake.get_or_insert_with(|| env.handshake());
    let result = serve_listener(plugin, listener, options, std::future::pending()).await;
    // Best effort: the supervisor owns the directory and cleans it up anyway.
    let _ = std::fs::remove_file(&env.socket_path);
    result
}

/// Serves `plugin` on an already bound listener, without reading the
/// environment: for plugins that bind or announce in their own way, and for
/// the test harness. Prints [`ServeOptions::handshake`], if set, once signal
/// handlers are installed, so a SIGTERM right after it drains instead of
/// killing the process.
///
/// Returns after draining once `shutdown` completes, a `Shutdown` RPC
/// arrives (unless [`ServeOptions::honor_shutdown_rpc`] is off) or, with
/// [`ServeOptions::handle_signals`], SIGTERM or SIGINT arrives.
pub async fn serve_listener<P: Plugin>(
    plugin: P,
    listener: UnixListener,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let signals = Signals::install_if(options.handle_signals)?;
    if let Some(line) = &options.handshake {
        announce(line)?;
        tracing::info!(handshake = %line, "plugin listening");
    }
    let incoming = UnixListenerStream::new(listener);
    run(Arc::new(plugin), incoming, &options, shutdown, signals).await
}

/// SIGTERM and SIGINT, turned into a future.
pub(crate) struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    pub(crate) fn install_if(wanted: bool) -> Result<Option<Signals>, ServeError> {
        if !wanted {
            return Ok(None);
        }
        let install = |kind| signal(kind).map_err(|source| ServeError::Signals { source });
        Ok(Some(Signals {
            term: install(SignalKind::terminate())?,
            int: install(SignalKind::interrupt())?,
        }))
    }

    /// The name of the next signal received; never completes when `None`.
    async fn recv(signals: Option<&mut Signals>) -> &'static str {
        match signals {
            Some(s) => tokio::select! {
                _ = s.term.recv() => "SIGTERM",
                _ = s.int.recv() => "SIGINT",
            },
            None => std::future::pending().await,
        }
    }
}

/// The serve loop shared by every entry point, over any stream of
/// connections (a Unix listener's, or accepted TLS connections).
pub(crate) async fn run<P, I, IO, IE>(
    plugin: Arc<P>,
    incoming: I,
    options: &ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
    mut signals: Option<Signals>,
) -> Result<(), ServeError>
where
    P: Plugin,
    I: tokio_stream::Stream<Item = Result<IO, IE>>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (shutdown_tx, mut shutdown_rx) = watch::channel(None);
    let shared = Arc::new(Shared {
        draining: watch::channel(false).0,
        shutdown_tx,
        honor_shutdown_rpc: options.honor_shutdown_rpc,
        default_drain: options.drain_timeout,
    });
    let routes = Routes::new(Arc::clone(&plugin), Arc::clone(&shared));

    // Fires the server's graceful shutdown and tells us the drain deadline.
    let (deadline_tx, mut deadline_rx) = oneshot::channel();
    let default_drain = options.drain_timeout;
    let stop_shared = Arc::clone(&shared);
    let stop = async move {
        let deadline = tokio::select! {
            rpc = shutdown_rx.wait_for(Option::is_some) => {
                // `Shared` keeps the sender alive, so this is always `Ok(Some(_))`.
                rpc.ok().and_then(|d| *d).unwrap_or(default_drain)
            }
            name = Signals::recv(signals.as_mut()) => {
                tracing::info!("{name} received; draining");
                default_drain
            }
            () = shutdown => default_drain,
        };
        stop_shared.draining.send_replace(true);
        let _ = deadline_tx.send(tokio::time::Instant::now() + deadline);
    };

    let server = Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .serve_with_incoming_shutdown(routes, incoming, stop);
    tokio::pin!(server);

    // Serve until a stop request, then drain until its deadline. The server
    // may finish in the very poll that delivered the request (nothing left
    // to drain), hence the first branch.
    let mut until = None;
    let result = tokio::select! {
        result = &mut server => result,
        Ok(at) = &mut deadline_rx => {
            until = Some(at);
            match tokio::time::timeout_at(at, &mut server).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!(
                        "in-flight calls did not finish within the drain deadline; exiting anyway"
                    );
                    return Ok(());
                }
            }
        }
    };
    result.map_err(ServeError::Serve)?;
    let hook = plugin.shutdown();
    match until {
        Some(at) => {
            if tokio::time::timeout_at(at, hook).await.is_err() {
                tracing::warn!(
                    "the plugin's shutdown hook did not finish within the drain deadline"
                );
            }
        }
        None => hook.await,
    }
    tracing::info!("stopped serving");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn good() -> Vec<(&'static str, &'static str)> {
        vec![
            (ENV_MAGIC_COOKIE, MAGIC_COOKIE_VALUE),
            (ENV_SOCKET, "/run/p/plugin.sock"),
            (ENV_PROTOCOL_VERSIONS, "1"),
            (ENV_NAME, "echo"),
        ]
    }

    #[test]
    fn reads_a_complete_handshake_environment() {
        let env = HandshakeEnv::from_vars(vars(&good())).unwrap();
        assert_eq!(env.socket_path, PathBuf::from("/run/p/plugin.sock"));
        assert_eq!(env.plugin_name.as_deref(), Some("echo"));
        assert_eq!(
            env.handshake().to_string(),
            "plugvisor|1|unix|/run/p/plugin.sock"
        );
    }

    #[test]
    fn without_the_cookie_explains_what_the_binary_is() {
        let mut v = good();
        v.retain(|(k, _)| *k != ENV_MAGIC_COOKIE);
        let err = HandshakeEnv::from_vars(vars(&v)).unwrap_err();
        assert!(matches!(err, ServeError::NotStartedBySupervisor));
        assert!(
            err.to_string()
                .starts_with("This is a plugvisor plugin. It is meant to be started by the plugvisor supervisor, not run by hand."),
            "{err}"
        );
        v.push((ENV_MAGIC_COOKIE, "wrong"));
        assert!(matches!(
            HandshakeEnv::from_vars(vars(&v)),
            Err(ServeError::NotStartedBySupervisor)
        ));
    }

    #[test]
    fn refuses_a_relative_socket_path() {
        let mut v = good();
        v[1] = (ENV_SOCKET, "plugin.sock");
        let err = HandshakeEnv::from_vars(vars(&v)).unwrap_err();
        assert!(err.to_string().contains("`plugin.sock`"), "{err}");
    }

    #[test]
    fn refuses_protocol_versions_without_1_quoting_them() {
        let mut v = good();
        v[2] = (ENV_PROTOCOL_VERSIONS, "2,3");
        let err = HandshakeEnv::from_vars(vars(&v)).unwrap_err();
        assert!(err.to_string().contains("`2,3`"), "{err}");
        v[2] = (ENV_PROTOCOL_VERSIONS, "3, 1");
        assert!(HandshakeEnv::from_vars(vars(&v)).is_ok());
    }

    #[tokio::test]
    async fn bind_replaces_a_stale_socket_but_not_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plugin.sock");
        let first = bind(&path).unwrap();
        drop(first);
        // The socket file is still there; binding again must succeed.
        bind(&path).unwrap();

        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(bind(&file), Err(ServeError::NotASocket { .. })));
    }
}
