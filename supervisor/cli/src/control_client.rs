//! The control API's client transport: an HTTP/2 connection to the daemon's
//! control socket that is opened again when the daemon closes it, and that
//! sends a call again, once, on a fresh connection when the daemon provably
//! never processed it. That is what lets a client call all the time through
//! `upgrade-self` (the old daemon image closes its connections with GOAWAY,
//! the new one accepts on the same socket) without a single failed call.
//!
//! "Provably never processed", and so safe to send again whatever the
//! method does:
//! - the request was never written: the connection had closed before it
//!   got there, and hyper hands the request back;
//! - the daemon refused the stream: a GOAWAY (NO_ERROR) whose last stream
//!   id is below the request's (h2 fails the stream with that GOAWAY; a
//!   request made after a GOAWAY arrived is refused the same way before it
//!   is written), or RST_STREAM with REFUSED_STREAM;
//! - connecting was refused (nothing listens, or the listen backlog is
//!   full, which is waited out for [`BACKLOG_PATIENCE`]).
//!
//! Anything else (a connection lost with the call in flight, a reset
//! mid-call, any status the daemon answered) is returned as it is: the
//! daemon may have acted on the call. A call is sent at most twice.
//!
//! To be sent again, a unary request's body (one encoded message) is kept
//! until the call has its answer. A client-streaming request (`CallStream`)
//! is not kept: it is sent again only when hyper hands it back unsent.

use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use plugvisor::transport::{CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW};
use prost::bytes::Bytes;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::UnixStream;
use tonic::codegen::http;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Sender = SendRequest<tonic::body::Body>;

/// How long a connect waits for room in a full listen backlog.
pub const BACKLOG_PATIENCE: Duration = Duration::from_secs(5);

/// Client-streaming methods: their request bodies are not kept for a
/// second send.
const CLIENT_STREAMING: &[&str] = &[
    "/plugvisor.v1.Control/CallStream",
    "/plugvisor.v1.Control/CallSession",
];

/// The client of `Control.CallSession` (many calls on one stream).
pub use crate::call_session::CallSession;

/// A connection to the daemon's control socket, used as a tonic transport.
/// Cheap to clone: clones share the connection (and its replacement).
#[derive(Clone, Debug)]
pub struct ControlConnection {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    path: PathBuf,
    /// The connection calls go to, with how many times it was replaced (so
    /// that callers who saw the same one fail replace it only once).
    current: Mutex<(u64, Sender)>,
    /// Calls sent a second time.
    resent: AtomicU64,
}

impl ControlConnection {
    /// Connects to the control socket at `path`.
    pub async fn connect(path: &Path) -> io::Result<ControlConnection> {
        let sender = open(path).await?;
        Ok(ControlConnection {
            shared: Arc::new(Shared {
                path: path.to_path_buf(),
                current: Mutex::new((0, sender)),
                resent: AtomicU64::new(0),
            }),
        })
    }

    /// Which connection calls go to now: it changes each time one is
    /// replaced.
    pub fn generation(&self) -> u64 {
        lock(&self.shared.current).0
    }

    /// Opens a fresh connection in place of connection `generation`, unless
    /// it was replaced already: for a client that knows the daemon is
    /// draining that one (it told a call session so), so that its next
    /// stream goes to whoever accepts next.
    pub async fn replace(&self, generation: u64) -> io::Result<()> {
        self.shared.replace(generation).await.map(|_| ())
    }

    /// How many calls were sent a second time because the daemon never
    /// processed the first.
    pub fn resent(&self) -> u64 {
        self.shared.resent.load(Ordering::Relaxed)
    }
}

/// Opens an HTTP/2 connection on the socket at `path`.
async fn open(path: &Path) -> io::Result<Sender> {
    let started = Instant::now();
    let stream = loop {
        match UnixStream::connect(path).await {
            Ok(stream) => break stream,
            // The listen backlog is full (clients wait there while the
            // daemon changes images): not accepted, so not processed.
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    && started.elapsed() < BACKLOG_PATIENCE =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let (send, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| io::Error::other(plugvisor::transport::error_chain(&e)))?;
    // Owned by the connection itself: it ends when the daemon closes it or
    // every handle to it is dropped.
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("control connection closed: {e}");
        }
    });
    Ok(send)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Holds a plain value that a panic cannot leave half-written.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// The connection to send on: the current one, or a new one if it has
    /// closed.
    async fn sender(&self) -> io::Result<(u64, Sender)> {
        let (generation, sender) = lock(&self.current).clone();
        if sender.is_closed() {
            return self.replace(generation).await;
        }
        Ok((generation, sender))
    }

    /// Opens a fresh connection in place of connection `generation` (unless
    /// another call replaced it already).
    async fn replace(&self, generation: u64) -> io::Result<(u64, Sender)> {
        let fresh = open(&self.path).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot reach the plugvisor daemon at {} again: {e}",
                    self.path.display()
                ),
            )
        })?;
        let mut current = lock(&self.current);
        if current.0 == generation {
            *current = (generation + 1, fresh);
        }
        Ok(current.clone())
    }

    async fn send(
        &self,
        request: http::Request<tonic::body::Body>,
    ) -> Result<http::Response<Incoming>, BoxError> {
        let (request, kept) = if CLIENT_STREAMING.contains(&request.uri().path()) {
            (request, None)
        } else {
            let kept = Kept::of(request).await?;
            (kept.request(), Some(kept))
        };
        let (generation, mut sender) = self.sender().await?;
        let mut error = match sender.try_send_request(request).await {
            Ok(response) => return Ok(response),
            Err(e) => e,
        };
        let again = match error.take_message() {
            // Handed back unsent.
            Some(request) => request,
            None => match &kept {
                Some(kept) if never_processed(error.error()) => kept.request(),
                None if never_processed(error.error()) => {
                    // A streaming request is not kept, so it fails; but
                    // this connection refuses new streams: the caller's
                    // next one goes to a fresh connection.
                    self.replace(generation).await?;
                    return Err(error.into_error().into());
                }
                _ => return Err(error.into_error().into()),
            },
        };
        tracing::debug!(
            "control call {} not processed ({}); sending it again on a fresh connection",
            again.uri().path(),
            error.error()
        );
        self.resent.fetch_add(1, Ordering::Relaxed);
        let (_, mut fresh) = self.replace(generation).await?;
        fresh
            .try_send_request(again)
            .await
            .map_err(|e| e.into_error().into())
    }
}

/// Whether the daemon refused the call before processing it: a GOAWAY
/// (NO_ERROR) that does not cover its stream, or REFUSED_STREAM.
pub fn never_processed(error: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_remote()
                && ((h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR))
                    || (h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM)));
        }
        source = e.source();
    }
    false
}

/// A unary request kept whole, so that it can be sent again.
struct Kept {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
    extensions: http::Extensions,
    body: Bytes,
}

impl Kept {
    async fn of(request: http::Request<tonic::body::Body>) -> Result<Kept, BoxError> {
        use http_body_util::BodyExt;
        let (parts, body) = request.into_parts();
        // One encoded message, already bounded by the client's maximum
        // message size; an encoding error is the call's error.
        let body = body.collect().await?.to_bytes();
        Ok(Kept {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            headers: parts.headers,
            extensions: parts.extensions,
            body,
        })
    }

    fn request(&self) -> http::Request<tonic::body::Body> {
        let mut request = http::Request::new(tonic::body::Body::new(http_body_util::Full::new(
            self.body.clone(),
        )));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        *request.extensions_mut() = self.extensions.clone();
        request
    }
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Incoming>, BoxError>> + Send>>;

impl tower::Service<http::Request<tonic::body::Body>> for ControlConnection {
    type Response = http::Response<Incoming>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // A closed connection is replaced when the call is sent.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move { shared.send(request).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plugvisor_proto as pb;
    use prost::Message;
    use std::sync::atomic::AtomicUsize;

    /// What the hostile daemon does with the first connection's request.
    #[derive(Clone, Copy)]
    enum First {
        /// RST_STREAM(REFUSED_STREAM): not processed.
        Refuse,
        /// Takes it, then drops the connection unanswered: maybe processed.
        TakeAndDrop,
    }

    /// Serves DaemonInfo over raw HTTP/2 on `listener`; the first
    /// connection misbehaves as `first` says. Counts requests received.
    async fn daemon(listener: tokio::net::UnixListener, first: First, received: Arc<AtomicUsize>) {
        // Dropped (with every connection) when the server is aborted.
        let mut connections = tokio::task::JoinSet::new();
        let mut connection_no = 0;
        while let Ok((stream, _)) = listener.accept().await {
            connection_no += 1;
            connections.spawn(serve(stream, connection_no, first, received.clone()));
        }
    }

    async fn serve(
        stream: tokio::net::UnixStream,
        connection_no: u32,
        first: First,
        received: Arc<AtomicUsize>,
    ) {
        let mut conn = h2::server::handshake(stream).await.expect("h2 handshake");
        while let Some(request) = conn.accept().await {
            let (_request, mut respond) = request.expect("a request");
            received.fetch_add(1, Ordering::SeqCst);
            match (connection_no, first) {
                (1, First::Refuse) => {
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                    continue;
                }
                (1, First::TakeAndDrop) => break,
                _ => {}
            }
            let reply = pb::DaemonInfoResponse {
                pid: 42,
                ..Default::default()
            }
            .encode_to_vec();
            let mut body = vec![0u8];
            body.extend_from_slice(&(reply.len() as u32).to_be_bytes());
            body.extend_from_slice(&reply);
            let response = http::Response::builder()
                .header("content-type", "application/grpc")
                .body(())
                .expect("a response head");
            let mut send = respond
                .send_response(response, false)
                .expect("send headers");
            send.send_data(body.into(), false).expect("send data");
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            send.send_trailers(trailers).expect("send trailers");
        }
    }

    async fn call(first: First) -> (Result<u32, tonic::Status>, usize, u64) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("control.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let received = Arc::new(AtomicUsize::new(0));
        let server = tokio::spawn(daemon(listener, first, received.clone()));
        let connection = ControlConnection::connect(&path).await.expect("connect");
        let mut client = crate::control::client(connection.clone());
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            client.daemon_info(pb::DaemonInfoRequest {}),
        )
        .await
        .expect("the call ends");
        server.abort();
        (
            answer.map(|r| r.into_inner().pid),
            received.load(Ordering::SeqCst),
            connection.resent(),
        )
    }

    #[tokio::test]
    async fn a_refused_stream_is_sent_again_on_a_fresh_connection() {
        let (answer, received, resent) = call(First::Refuse).await;
        assert_eq!(answer.expect("answered the second time"), 42);
        assert_eq!((received, resent), (2, 1));
    }

    #[tokio::test]
    async fn a_call_lost_after_the_daemon_took_it_is_not_sent_again() {
        let (answer, received, resent) = call(First::TakeAndDrop).await;
        let status = answer.expect_err("the daemon dropped it");
        assert_eq!((received, resent), (1, 0), "{status:?}");
    }
}
