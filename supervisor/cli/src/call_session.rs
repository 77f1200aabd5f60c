//! `Control.CallSession`: many unary calls on one long-lived stream, each
//! tagged with an id the client chooses. The daemon's side ([`serve`]) and
//! the client ([`CallSession`]).
//!
//! A call through a session skips what a unary `Call` pays each time: a new
//! HTTP/2 stream (headers both ways, trailers, a task per stream on the
//! daemon) and the access check. The daemon runs a session's calls as a set
//! of futures polled by the session's own task, so calls run concurrently
//! (a slow call never holds up a fast one) without a task hop per call.
//!
//! Bounds: at most [`MAX_IN_FLIGHT`] calls of one session are in flight;
//! each call beyond that is answered RESOURCE_EXHAUSTED at once. A session
//! that says nothing costs its stream and nothing else. Replies go out only
//! as fast as the client reads them: a client that stops reading stops the
//! daemon reading its requests (HTTP/2 flow control), not the daemon.
//!
//! Draining (upgrade-self, shutdown): the daemon sends a notice (id 0,
//! `draining`), finishes the calls in flight, answers each call it reads
//! after the notice `not_processed`, and ends the stream with OK once none
//! is in flight. A stream that ends with OK has answered every call it
//! read, so a call left unanswered was never processed either. The client
//! sends such calls again, once, on a new session (a new connection, which
//! the next daemon image accepts).

use crate::control::Client;
use crate::control_client::ControlConnection;
use futures_util::stream::{FuturesUnordered, StreamExt};
use plugvisor::supervisor::Supervisor;
use plugvisor_proto as pb;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status, Streaming};

/// Calls of one session in flight at once; each call beyond this is
/// answered RESOURCE_EXHAUSTED.
pub const MAX_IN_FLIGHT: usize = 1024;

/// One call, as unary `Call` runs it: by plugin or by capability.
pub async fn call_one(
    supervisor: &Supervisor,
    r: pb::CallRequest,
) -> Result<pb::CallResponse, Status> {
    let timeout = (r.timeout_ms > 0).then(|| Duration::from_millis(r.timeout_ms));
    let (plugin, reply) = match (r.plugin.is_empty(), r.capability.is_empty()) {
        (false, true) => {
            let reply = supervisor
                .call(&r.plugin, &r.method, r.payload, r.metadata, timeout)
                .await?;
            (r.plugin, reply)
        }
        (true, false) => {
            supervisor
                .call_capability(&r.capability, &r.method, r.payload, r.metadata, timeout)
                .await?
        }
        _ => {
            return Err(Status::invalid_argument(
                "name either a plugin or a capability to call",
            ));
        }
    };
    Ok(pb::CallResponse {
        payload: reply.payload,
        metadata: reply.metadata,
        plugin,
    })
}

/// The reply to call `id` that ended with `status`.
fn failure(id: u64, status: &Status) -> pb::CallSessionResponse {
    let status_metadata = status
        .metadata()
        .iter()
        .filter_map(|entry| match entry {
            tonic::metadata::KeyAndValueRef::Ascii(key, value) => {
                Some((key.as_str().to_string(), value.to_str().ok()?.to_string()))
            }
            tonic::metadata::KeyAndValueRef::Binary(..) => None,
        })
        .collect();
    pb::CallSessionResponse {
        id,
        code: status.code() as i32,
        message: status.message().to_string(),
        status_metadata,
        ..Default::default()
    }
}

fn outcome(id: u64, result: Result<pb::CallResponse, Status>) -> pb::CallSessionResponse {
    match result {
        Ok(reply) => pb::CallSessionResponse {
            id,
            reply: Some(reply),
            ..Default::default()
        },
        Err(status) => failure(id, &status),
    }
}

/// A call in flight: its id and reply, or `None` once cancelled.
type InFlight = Pin<Box<dyn Future<Output = Option<pb::CallSessionResponse>> + Send>>;

/// The daemon's side of one session: reads calls from `input` and yields
/// their replies. `drain` fires when the daemon drains (upgrade-self or
/// shutdown). Dropping the stream (the client reset it, or its connection
/// closed) drops every call in flight, which cancels them at the plugins.
pub fn serve(
    supervisor: Supervisor,
    mut input: Streaming<pb::CallSessionRequest>,
    drain: CancellationToken,
) -> impl Stream<Item = Result<pb::CallSessionResponse, Status>> + Send + 'static {
    async_stream::stream! {
        let mut calls: FuturesUnordered<InFlight> = FuturesUnordered::new();
        // Dropping a call's sender cancels it.
        let mut cancels: HashMap<u64, oneshot::Sender<()>> = HashMap::new();
        let mut reading = true;
        let mut draining = false;
        loop {
            if (!reading || draining) && calls.is_empty() {
                // Every call read was answered.
                break;
            }
            tokio::select! {
                biased;
                Some(reply) = calls.next(), if !calls.is_empty() => {
                    if let Some(reply) = reply {
                        cancels.remove(&reply.id);
                        yield Ok(reply);
                    }
                }
                _ = drain.cancelled(), if !draining => {
                    draining = true;
                    yield Ok(pb::CallSessionResponse { draining: true, ..Default::default() });
                }
                next = input.next(), if reading => match next {
                    // Half-closed: no more calls; the ones in flight are answered.
                    None => reading = false,
                    // The client went away: its calls are cancelled as the
                    // stream is dropped.
                    Some(Err(status)) => {
                        tracing::debug!("call session ended by the client: {status}");
                        return;
                    }
                    Some(Ok(request)) => {
                        let id = request.id;
                        if request.cancel {
                            cancels.remove(&id);
                            continue;
                        }
                        let refused = match &request.call {
                            _ if id == 0 => Some(Status::invalid_argument("call id 0 is reserved: number calls from 1")),
                            None => Some(Status::invalid_argument(format!("call {id}: neither a call nor a cancellation"))),
                            Some(_) if cancels.contains_key(&id) => Some(Status::invalid_argument(format!(
                                "call id {id} is already in flight on this session"
                            ))),
                            Some(_) if calls.len() >= MAX_IN_FLIGHT => Some(Status::resource_exhausted(format!(
                                "call {id}: this session already has {MAX_IN_FLIGHT} calls in flight; wait for some to finish"
                            ))),
                            Some(_) => None,
                        };
                        if draining {
                            let mut reply = failure(id, &Status::unavailable(
                                "the daemon is draining (upgrade-self or shutdown) and did not process this call; send it again on a new session",
                            ));
                            reply.not_processed = true;
                            yield Ok(reply);
                            continue;
                        }
                        if let Some(status) = refused {
                            yield Ok(failure(id, &status));
                            continue;
                        }
                        let Some(call) = request.call else { continue };
                        let (cancel, cancelled) = oneshot::channel::<()>();
                        cancels.insert(id, cancel);
                        let supervisor = supervisor.clone();
                        calls.push(Box::pin(async move {
                            tokio::select! {
                                biased;
                                result = call_one(&supervisor, call) => Some(outcome(id, result)),
                                _ = cancelled => None,
                            }
                        }));
                    }
                },
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The client.

/// How a call on a session ended.
enum Outcome {
    Reply(pb::CallResponse),
    Status(Status),
    /// The daemon did not process it: safe to send again.
    NotProcessed(Status),
}

type Waiters = Mutex<HashMap<u64, oneshot::Sender<Outcome>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Inserts and removes are single calls: a poisoned map is consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One session stream.
struct Lane {
    /// The connection it was opened on.
    generation: u64,
    requests: mpsc::UnboundedSender<pb::CallSessionRequest>,
    waiting: Arc<Waiters>,
    /// Cleared by the daemon's draining notice or the stream's end: new
    /// calls go to a new session.
    open: Arc<AtomicBool>,
    /// Set by the reader before it answers the calls still waiting when
    /// the stream ended.
    ended: Arc<AtomicBool>,
    /// The reader task: it ends with the stream, and is aborted when the
    /// last handle to the lane goes.
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Lane {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A client of `Control.CallSession`: calls on one long-lived stream (opened
/// on the first call, and again after the daemon drained the last one).
/// Cheap to clone; clones share the stream and may call concurrently.
///
/// A call the daemon did not process (it drained for upgrade-self or
/// shutdown) is sent again, once, on a new session; see
/// [`CallSession::resent`]. Dropping a call's future cancels the call at the
/// plugin.
#[derive(Clone)]
pub struct CallSession {
    shared: Arc<Shared>,
}

struct Shared {
    connection: ControlConnection,
    client: Client,
    lane: tokio::sync::Mutex<Option<Arc<Lane>>>,
    next_id: AtomicU64,
    resent: AtomicU64,
}

impl std::fmt::Debug for CallSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallSession")
            .field("resent", &self.resent())
            .finish()
    }
}

impl CallSession {
    /// Sessions on `connection` (shared with its other clients).
    pub fn new(connection: ControlConnection) -> CallSession {
        CallSession {
            shared: Arc::new(Shared {
                client: crate::control::client(connection.clone()),
                connection,
                lane: tokio::sync::Mutex::new(None),
                next_id: AtomicU64::new(1),
                resent: AtomicU64::new(0),
            }),
        }
    }

    /// Connects to the control socket at `path` and opens a session (so a
    /// caller the daemon does not admit learns it here).
    pub async fn connect(path: &std::path::Path) -> Result<CallSession, Status> {
        let connection = ControlConnection::connect(path).await.map_err(|e| {
            Status::unavailable(format!(
                "cannot reach the plugvisor daemon at {}: {e}",
                path.display()
            ))
        })?;
        let session = CallSession::new(connection);
        session.shared.lane().await?;
        Ok(session)
    }

    /// Calls sent a second time because the daemon did not process them.
    pub fn resent(&self) -> u64 {
        self.shared.resent.load(Ordering::Relaxed)
    }

    /// Makes `request` as unary `Call` would, with the same reply or
    /// status.
    pub async fn call(&self, request: pb::CallRequest) -> Result<pb::CallResponse, Status> {
        let mut again = false;
        loop {
            let lane = self.shared.lane().await?;
            match self.shared.call_on(&lane, request.clone()).await {
                Outcome::Reply(reply) => return Ok(reply),
                Outcome::Status(status) => return Err(status),
                Outcome::NotProcessed(status) => {
                    lane.open.store(false, Ordering::Release);
                    if again {
                        return Err(status);
                    }
                    again = true;
                    self.shared.resent.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

impl Shared {
    /// The open session, or a new one.
    async fn lane(&self) -> Result<Arc<Lane>, Status> {
        let mut current = self.lane.lock().await;
        if let Some(lane) = current.as_ref() {
            if lane.open.load(Ordering::Acquire) {
                return Ok(lane.clone());
            }
            // It drained or ended: its connection has had its GOAWAY (or is
            // gone), and a stream opened on it now could still reach the
            // draining image. The next session goes on a fresh connection,
            // which only the next image accepts.
            self.connection
                .replace(lane.generation)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
        }
        // Nothing was sent on a session that failed to open: opening again
        // once (the transport moves to a fresh connection when the daemon
        // refused the stream) is safe.
        let lane = match self.open().await {
            Ok(lane) => lane,
            Err(status) if status.code() == Code::PermissionDenied => return Err(status),
            Err(status) => {
                tracing::debug!("opening a call session failed ({status}); trying once more");
                self.open().await?
            }
        };
        let lane = Arc::new(lane);
        *current = Some(lane.clone());
        Ok(lane)
    }

    async fn open(&self) -> Result<Lane, Status> {
        let (requests, rx) = mpsc::unbounded_channel();
        let generation = self.connection.generation();
        let mut client = self.client.clone();
        let replies = client
            .call_session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await?
            .into_inner();
        let waiting: Arc<Waiters> = Arc::default();
        let open = Arc::new(AtomicBool::new(true));
        let ended = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn(read_replies(
            replies,
            waiting.clone(),
            open.clone(),
            ended.clone(),
        ));
        Ok(Lane {
            generation,
            requests,
            waiting,
            open,
            ended,
            reader,
        })
    }

    async fn call_on(&self, lane: &Lane, call: pb::CallRequest) -> Outcome {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&lane.waiting).insert(id, tx);
        // The reader marks the lane ended before it answers the calls still
        // waiting: a call that got in after that would wait for nothing.
        if lane.ended.load(Ordering::Acquire) {
            lock(&lane.waiting).remove(&id);
            return Outcome::NotProcessed(Status::unavailable("the call session had ended"));
        }
        let sent = lane.requests.send(pb::CallSessionRequest {
            id,
            call: Some(call),
            cancel: false,
        });
        if sent.is_err() {
            // The stream's request side is gone: the call was never sent.
            if lock(&lane.waiting).remove(&id).is_some() {
                return Outcome::NotProcessed(Status::unavailable("the call session had ended"));
            }
        }
        let mut pending = Pending {
            lane,
            id,
            done: false,
        };
        let outcome = rx.await.unwrap_or_else(|_| {
            Outcome::Status(Status::unavailable(
                "the call session ended without an answer",
            ))
        });
        pending.done = true;
        outcome
    }
}

/// A call waiting for its reply: if dropped first, it leaves the waiting
/// list and cancels the call at the daemon.
struct Pending<'a> {
    lane: &'a Lane,
    id: u64,
    done: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if lock(&self.lane.waiting).remove(&self.id).is_some() {
            let _ = self.lane.requests.send(pb::CallSessionRequest {
                id: self.id,
                call: None,
                cancel: true,
            });
        }
    }
}

/// Hands each reply to its call. When the stream ends with OK, the calls
/// still waiting were never processed; when it fails, they may have been.
async fn read_replies(
    mut replies: Streaming<pb::CallSessionResponse>,
    waiting: Arc<Waiters>,
    open: Arc<AtomicBool>,
    ended: Arc<AtomicBool>,
) {
    // Whether the daemon ended the stream with OK (every call it read was
    // answered), and how.
    let (clean, status) = loop {
        match replies.message().await {
            Ok(Some(reply)) if reply.id == 0 && reply.draining => {
                open.store(false, Ordering::Release);
            }
            Ok(Some(reply)) => {
                let Some(tx) = lock(&waiting).remove(&reply.id) else {
                    // A cancelled call's late reply.
                    continue;
                };
                let _ = tx.send(outcome_of(reply));
            }
            Ok(None) => {
                break (
                    true,
                    Status::unavailable(
                        "the daemon ended the call session without processing this call",
                    ),
                );
            }
            Err(status) => break (false, status),
        }
    };
    open.store(false, Ordering::Release);
    ended.store(true, Ordering::Release);
    for (_, tx) in lock(&waiting).drain() {
        let _ = tx.send(if clean {
            Outcome::NotProcessed(status.clone())
        } else {
            Outcome::Status(Status::new(
                status.code(),
                format!(
                    "the call session broke with the call in flight: {}",
                    status.message()
                ),
            ))
        });
    }
}

fn outcome_of(reply: pb::CallSessionResponse) -> Outcome {
    if reply.code == 0
        && let Some(r) = reply.reply
    {
        return Outcome::Reply(r);
    }
    let mut metadata = tonic::metadata::MetadataMap::new();
    for (key, value) in &reply.status_metadata {
        if let (Ok(key), Ok(value)) = (
            key.parse::<tonic::metadata::AsciiMetadataKey>(),
            value.parse::<tonic::metadata::AsciiMetadataValue>(),
        ) {
            metadata.insert(key, value);
        }
    }
    let code = if reply.code == 0 {
        // OK without a reply: not what a daemon sends.
        Code::Internal
    } else {
        Code::from_i32(reply.code)
    };
    let status = Status::with_metadata(code, reply.message, metadata);
    if reply.not_processed {
        Outcome::NotProcessed(status)
    } else {
        Outcome::Status(status)
    }
}
