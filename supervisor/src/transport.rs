//! gRPC over Unix-domain sockets: the client channel used for plugins (with
//! the peer-credential check) and for the control socket.

use hyper_util::rt::TokioIo;
use std::io;
use std::path::{Path, PathBuf};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// HTTP/2 flow-control windows: large enough that a 64 MiB stream is not
/// throttled by window updates on a local socket.
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 8 << 20;
/// Largest single gRPC message accepted either way.
pub const MAX_MESSAGE: usize = 64 << 20;

fn endpoint() -> Endpoint {
    Endpoint::from_static("http://plugvisor.invalid")
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
}

/// Connects to a plugin's socket and refuses it unless the process on the
/// other end (SO_PEERCRED) is `expected_pid`, the child we spawned.
pub async fn connect_plugin(path: &Path, expected_pid: i32) -> io::Result<Channel> {
    let path = path.to_path_buf();
    endpoint()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = UnixStream::connect(&path).await?;
                let cred = stream.peer_cred()?;
                if cred.pid() != Some(expected_pid) {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!(
                            "socket {} is served by pid {}, not by the plugin's pid {expected_pid}",
                            path.display(),
                            cred.pid().map_or("unknown".to_string(), |p| p.to_string())
                        ),
                    ));
                }
                Ok::<_, io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| io::Error::other(error_chain(&e)))
}

/// Connects to a Unix socket with no peer check (the control socket).
pub async fn connect_unix(path: &Path) -> io::Result<Channel> {
    let path: PathBuf = path.to_path_buf();
    endpoint()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(&path).await?)) }
        }))
        .await
        .map_err(|e| io::Error::other(error_chain(&e)))
}

/// "a: b: c" from an error and its sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}
