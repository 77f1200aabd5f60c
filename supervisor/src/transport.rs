//! gRPC over Unix-domain sockets: the client connection used for plugins
//! (with the peer-credential check) and for the control socket.
//!
//! A client talks HTTP/2 through hyper's `SendRequest` directly. tonic's
//! `Channel` would put a buffer task between every call and the connection;
//! on a local socket that hop is a large share of a call's latency, and a
//! plugin connection never needs the `Channel`'s reconnecting and balancing
//! (a lost plugin connection means a lost instance, which the supervisor
//! replaces).

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use tokio::net::UnixStream;
use tonic::codegen::http;

/// HTTP/2 flow-control windows: large enough that a 64 MiB stream is not
/// throttled by window updates on a local socket.
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 8 << 20;
/// Largest HTTP/2 frame we accept: big frames move streams in fewer pieces,
/// and a whole 1 MiB gRPC message (with its prefix) fits in one, so its
/// data can be read without copying (see `stream_wire`).
pub const MAX_FRAME: u32 = 2 << 20;
/// Largest single gRPC message accepted either way.
pub const MAX_MESSAGE: usize = 64 << 20;

/// HTTP/2 connections to one peer (usually one; plugins get
/// [`PLUGIN_CONNECTIONS`]), used as a tonic transport. Each call takes the
/// next connection in turn, so concurrent calls are not all serialised
/// through one connection's task on each side. Cheap to clone: clones share
/// the connections.
#[derive(Clone, Debug)]
pub struct Connection {
    senders: Arc<[SendRequest<tonic::body::Body>]>,
    next: Arc<AtomicUsize>,
    /// The connection this clone's next call goes to (chosen in poll_ready).
    current: usize,
}

/// Connections opened to each plugin instance.
pub const PLUGIN_CONNECTIONS: usize = 2;

impl Connection {
    fn new(senders: Vec<SendRequest<tonic::body::Body>>) -> Self {
        Connection {
            senders: senders.into(),
            next: Arc::default(),
            current: 0,
        }
    }
}

type ResponseFuture = Pin<
    Box<dyn Future<Output = Result<http::Response<hyper::body::Incoming>, hyper::Error>> + Send>,
>;

impl tower::Service<http::Request<tonic::body::Body>> for Connection {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.senders.len() > 1 {
            self.current = self.next.fetch_add(1, Ordering::Relaxed) % self.senders.len();
        }
        let mut sender = self.senders[self.current].clone();
        match sender.poll_ready(cx) {
            // A closed connection is reported by the call itself: tonic turns
            // a failed `poll_ready` into a status without its cause ("Service
            // was not ready"), which would read as the plugin's own error,
            // while a failed send keeps the transport error as its source and
            // reads as a lost instance (retried when idempotent).
            Poll::Ready(Err(_)) => Poll::Ready(Ok(())),
            other => other,
        }
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        if let Some(abort) = request.extensions_mut().remove::<BodyAbort>() {
            request = request.map(|inner| tonic::body::Body::new(AbortableBody { inner, abort }));
        }
        let mut sender = self.senders[self.current].clone();
        Box::pin(async move { sender.send_request(request).await })
    }
}

/// Put in a streamed request's extensions, it lets the caller break the
/// upload off with an error: the request body then fails, and HTTP/2 resets
/// the stream with INTERNAL_ERROR, which the peer reads as an error.
///
/// Simply dropping the call is not enough: that resets with CANCEL, and
/// gRPC servers (tonic among them) read a cancelled request stream as its
/// clean end, so a plugin would take a cut-off upload for a whole one.
#[derive(Clone, Debug, Default)]
pub struct BodyAbort(Arc<AbortState>);

#[derive(Debug, Default)]
struct AbortState {
    set: std::sync::atomic::AtomicBool,
    /// The body's task, parked waiting for the next chunk.
    waker: std::sync::Mutex<Option<std::task::Waker>>,
}

impl BodyAbort {
    /// Fails the body (once it is polled again, which this arranges).
    pub fn abort(&self) {
        self.0.set.store(true, Ordering::Release);
        let waker = self
            .0
            .waker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn is_set(&self) -> bool {
        self.0.set.load(Ordering::Acquire)
    }
}

struct AbortableBody {
    inner: tonic::body::Body,
    abort: BodyAbort,
}

impl AbortableBody {
    fn broken() -> tonic::Status {
        tonic::Status::cancelled("the caller's upload broke off")
    }
}

impl hyper::body::Body for AbortableBody {
    type Data = prost::bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        if self.abort.is_set() {
            return Poll::Ready(Some(Err(Self::broken())));
        }
        *self.abort.0.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        // Polling the upload may be what broke it off.
        if frame.is_pending() && self.abort.is_set() {
            return Poll::Ready(Some(Err(Self::broken())));
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The origin every request names; the socket, not the name, says where.
pub fn origin() -> http::Uri {
    http::Uri::from_static("http://plugvisor.local")
}

/// HTTP/2 over an already connected stream. The connection is driven by a
/// task of its own that ends when either side closes it.
pub(crate) async fn handshake(stream: UnixStream) -> io::Result<Connection> {
    Ok(Connection::new(vec![sender(stream).await?]))
}

async fn sender(stream: UnixStream) -> io::Result<SendRequest<tonic::body::Body>> {
    sender_with(stream, None).await
}

/// HTTP/2 over already connected streams (TCP + TLS to a remote plugin),
/// one connection each. The receiver gets why as soon as any of them ends:
/// a remote plugin has no process to watch, its connections are its life.
pub(crate) async fn over_streams<S>(
    streams: Vec<S>,
) -> io::Result<(Connection, tokio::sync::mpsc::Receiver<Closed>)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (closed_tx, closed) = tokio::sync::mpsc::channel(streams.len().max(1));
    let mut senders = Vec::with_capacity(streams.len());
    for stream in streams {
        senders.push(sender_with(stream, Some(closed_tx.clone())).await?);
    }
    Ok((Connection::new(senders), closed))
}

/// Why a watched connection ended.
#[derive(Debug, Clone)]
pub(crate) struct Closed {
    pub why: String,
    /// Set when TLS refused the connection (the peer's alert, say).
    pub rejection: Option<crate::tls::Rejection>,
}

async fn sender_with<S>(
    stream: S,
    closed: Option<tokio::sync::mpsc::Sender<Closed>>,
) -> io::Result<SendRequest<tonic::body::Body>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| io::Error::other(error_chain(&e)))?;
    // Owned by the connection itself: it ends when the peer goes away (the
    // plugin exits) or every handle to it is dropped.
    tokio::spawn(async move {
        let why = match connection.await {
            Ok(()) => Closed {
                why: "the peer closed the connection".to_string(),
                rejection: None,
            },
            Err(e) => {
                tracing::debug!("connection closed: {e}");
                let rejection = crate::tls::find_rejection(&e);
                Closed {
                    why: match &rejection {
                        Some(r) => r.to_string(),
                        None => error_chain(&e),
                    },
                    rejection,
                }
            }
        };
        if let Some(closed) = closed {
            let _ = closed.try_send(why);
        }
    });
    Ok(send)
}

/// Connects to a plugin's socket and refuses it unless the process on the
/// other end (SO_PEERCRED) is `expected_pid`, the child we spawned.
pub async fn connect_plugin(path: &Path, expected_pid: i32) -> io::Result<Connection> {
    let mut senders = Vec::with_capacity(PLUGIN_CONNECTIONS);
    for _ in 0..PLUGIN_CONNECTIONS {
        let stream = UnixStream::connect(path).await?;
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
        senders.push(sender(stream).await?);
    }
    Ok(Connection::new(senders))
}

/// Connects to a Unix socket with no peer check (the control socket).
pub async fn connect_unix(path: &Path) -> io::Result<Connection> {
    handshake(UnixStream::connect(path).await?).await
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
