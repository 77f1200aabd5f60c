//! Calls over `Session` streams: a plugin that offers sessions (see
//! `InitializeResponse.sessions`) gets a few long-lived bidirectional
//! streams, one per connection, and each `Handle` call becomes one tagged
//! message on one of them instead of a new HTTP/2 stream. That saves the
//! stream set-up, the headers and the per-stream task on both sides, which
//! are most of a small call's cost on a local socket.
//!
//! Each lane (one session stream) has a reader task that hands every reply
//! to the call waiting for its id. A call dropped before its reply (the
//! caller went away, its deadline passed) removes itself and tells the
//! plugin to stop working on it. When a lane ends (the plugin drains or
//! dies), its waiting calls fail as lost and later calls use the other lanes
//! or, with none left, unary `Handle`.

use crate::instance::Client;
use plugvisor_proto::{HandleRequest, HandleResponse, SessionRequest, SessionResponse};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

/// How a call on a session ended.
pub(crate) enum Outcome {
    Reply(HandleResponse),
    /// The plugin's own error status, as Handle would have returned it.
    Status(tonic::Status),
    /// The session ended before the reply: the instance drained or died.
    Lost(String),
}

type Waiters = Mutex<HashMap<u64, oneshot::Sender<Outcome>>>;

/// One session stream.
struct Lane {
    requests: mpsc::UnboundedSender<SessionRequest>,
    waiting: Arc<Waiters>,
    alive: Arc<AtomicBool>,
}

/// The sessions of one instance.
pub(crate) struct Sessions {
    lanes: Vec<Lane>,
    next_lane: AtomicUsize,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("lanes", &self.lanes.len())
            .finish()
    }
}

fn lock(w: &Waiters) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Outcome>>> {
    // Inserts and removes are single calls: a poisoned map is consistent.
    w.lock().unwrap_or_else(|e| e.into_inner())
}

impl Sessions {
    /// Opens `lanes` sessions on `client` (its connections are used in
    /// turn), all at once: each waits for the plugin's response headers, so
    /// opening them one after another would cost a round trip per lane.
    /// Their reader tasks are tracked by `tasks` and end with the sessions.
    pub async fn open(
        client: &Client,
        lanes: usize,
        timeout: Duration,
        tasks: &TaskTracker,
    ) -> Result<Sessions, tonic::Status> {
        type Opening = std::pin::Pin<
            Box<
                dyn std::future::Future<
                        Output = Result<
                            tonic::Response<tonic::Streaming<SessionResponse>>,
                            tonic::Status,
                        >,
                    > + Send,
            >,
        >;
        let mut senders = Vec::with_capacity(lanes);
        let mut opening: Vec<Opening> = Vec::with_capacity(lanes);
        for _ in 0..lanes {
            let (tx, rx) = mpsc::unbounded_channel();
            let mut client = client.clone();
            senders.push(tx);
            opening.push(Box::pin(async move {
                client
                    .session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
                    .await
            }));
        }
        // Dropped (cancelled) together if the deadline passes first.
        let mut answered: Vec<Option<Result<_, tonic::Status>>> =
            std::iter::repeat_with(|| None).take(lanes).collect();
        let all = std::future::poll_fn(|cx| {
            for (future, slot) in opening.iter_mut().zip(answered.iter_mut()) {
                if slot.is_none()
                    && let std::task::Poll::Ready(r) = future.as_mut().poll(cx)
                {
                    *slot = Some(r);
                }
            }
            match answered.iter().all(Option::is_some) {
                true => std::task::Poll::Ready(()),
                false => std::task::Poll::Pending,
            }
        });
        tokio::time::timeout(timeout, all)
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("opening a session timed out"))?;
        let mut opened = Vec::with_capacity(lanes);
        for (tx, answer) in senders.into_iter().zip(answered) {
            let replies = answer
                .ok_or_else(|| tonic::Status::internal("a session was left unopened"))??
                .into_inner();
            let waiting: Arc<Waiters> = Arc::default();
            let alive = Arc::new(AtomicBool::new(true));
            tasks.spawn(read_replies(replies, waiting.clone(), alive.clone()));
            opened.push(Lane {
                requests: tx,
                waiting,
                alive,
            });
        }
        Ok(Sessions {
            lanes: opened,
            next_lane: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
        })
    }

    /// Sends `call` on a live session and waits for its outcome. Gives the
    /// call back when no session is live (send it with unary Handle).
    /// Dropping the future before the outcome cancels the call at the
    /// plugin.
    pub async fn call(
        &self,
        call: HandleRequest,
        timeout: Duration,
    ) -> Result<Outcome, HandleRequest> {
        let n = self.lanes.len();
        let first = self.next_lane.fetch_add(1, Ordering::Relaxed);
        let Some(lane) = (0..n)
            .map(|i| &self.lanes[(first + i) % n])
            .find(|l| l.alive.load(Ordering::Acquire))
        else {
            return Err(call);
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&lane.waiting).insert(id, tx);
        // The reader marks a lane dead before it fails its waiting calls: a
        // call that got in after that would wait for nothing.
        if !lane.alive.load(Ordering::Acquire) {
            lock(&lane.waiting).remove(&id);
            return Err(call);
        }
        let sent = lane.requests.send(SessionRequest {
            id,
            call: Some(call),
            cancel: false,
            timeout_ms: timeout.as_millis().min(u64::MAX as u128) as u64,
        });
        if let Err(mpsc::error::SendError(request)) = sent {
            lock(&lane.waiting).remove(&id);
            lane.alive.store(false, Ordering::Release);
            // The request holds the call it was given.
            return Err(request.call.unwrap_or_default());
        }
        let mut pending = Pending {
            lane,
            id,
            done: false,
        };
        let outcome = rx
            .await
            .unwrap_or_else(|_| Outcome::Lost("the session ended".into()));
        pending.done = true;
        Ok(outcome)
    }
}

/// A call waiting for its reply: if dropped first, it leaves the waiting
/// list and cancels the call at the plugin.
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
            let _ = self.lane.requests.send(SessionRequest {
                id: self.id,
                call: None,
                cancel: true,
                timeout_ms: 0,
            });
        }
    }
}

/// Hands each reply to its call; when the stream ends, fails the calls
/// still waiting as lost.
async fn read_replies(
    mut replies: tonic::Streaming<SessionResponse>,
    waiting: Arc<Waiters>,
    alive: Arc<AtomicBool>,
) {
    let why = loop {
        match replies.message().await {
            Ok(Some(reply)) => {
                let Some(tx) = lock(&waiting).remove(&reply.id) else {
                    // A cancelled call's late reply.
                    continue;
                };
                let outcome = match reply.reply {
                    Some(r) if reply.code == 0 => Outcome::Reply(r),
                    _ => Outcome::Status(tonic::Status::new(
                        tonic::Code::from_i32(reply.code),
                        reply.message,
                    )),
                };
                let _ = tx.send(outcome);
            }
            Ok(None) => break "the plugin ended the session".to_string(),
            Err(status) => break format!("the session broke: {}", status.message()),
        }
    };
    alive.store(false, Ordering::Release);
    for (_, tx) in lock(&waiting).drain() {
        let _ = tx.send(Outcome::Lost(why.clone()));
    }
}
