//! Where a call goes: each replica of a plugin publishes its route (ready
//! with a client, pending while it starts or restarts, or down) in one watch
//! channel; a call picks the least-loaded ready instance, or waits for one
//! until its deadline. Admission bounds the calls a plugin takes at once and
//! how many may queue for a slot, so overload answers RESOURCE_EXHAUSTED
//! instead of growing without bound. Every count a call holds (its call
//! slot, its place in the queue, its instance's in-flight count) is a guard
//! that gives it back on drop, so a call dropped at any `await` leaks nothing.

use crate::error::Error;
use crate::instance::{Client, Snapshots};
use crate::status::PluginState;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};

/// A ready instance that calls can go to.
pub(crate) struct ReadyInstance {
    pub id: String,
    /// Which replica of the plugin it is.
    pub replica: usize,
    pub client: Client,
    /// Its session streams, when the plugin serves them (else unary Handle).
    pub sessions: Option<Arc<crate::session::Sessions>>,
    /// The replica's snapshot store, for calls that change state when the
    /// plugin snapshots on change.
    pub snapshots: Option<Arc<Snapshots>>,
    /// Calls in flight on this instance, for least-loaded routing and drains.
    in_flight: AtomicUsize,
    /// Notified when `in_flight` drops to zero.
    idle: Notify,
}

impl ReadyInstance {
    pub fn new(
        id: String,
        replica: usize,
        client: Client,
        sessions: Option<Arc<crate::session::Sessions>>,
        snapshots: Option<Arc<Snapshots>>,
    ) -> Arc<Self> {
        Arc::new(ReadyInstance {
            id,
            replica,
            client,
            sessions,
            snapshots,
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
        })
    }

    /// Waits until no call is in flight on this instance, up to `timeout`.
    /// Returns false if calls were still running when it gave up.
    pub async fn drained(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let idle = self.idle.notified();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.in_flight.load(Ordering::Acquire) == 0;
            }
        }
    }
}

/// A call's hold on an instance: counted in flight until dropped.
pub(crate) struct InFlight(Arc<ReadyInstance>);

impl InFlight {
    /// Counts a call on `instance` if it still has the `seen` calls in
    /// flight it was chosen with: of concurrent callers that chose the same
    /// least-loaded instance, one gets it and the others choose again (and
    /// see it one call busier), so a burst spreads over the replicas.
    fn claim(instance: &Arc<ReadyInstance>, seen: usize) -> Option<Self> {
        instance
            .in_flight
            .compare_exchange(seen, seen + 1, Ordering::AcqRel, Ordering::Relaxed)
            .ok()
            .map(|_| InFlight(instance.clone()))
    }
}

impl std::ops::Deref for InFlight {
    type Target = ReadyInstance;
    fn deref(&self) -> &ReadyInstance {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// What calls see of one replica.
#[derive(Clone)]
pub(crate) enum Route {
    Ready(Arc<ReadyInstance>),
    /// Starting, restarting, in backoff or being upgraded: calls wait.
    Pending,
    /// Stopped or failed: calls fail at once (unless another replica is up).
    Down {
        state: PluginState,
        reason: String,
    },
}

/// The routes of every replica of one plugin.
pub(crate) struct Routes {
    plugin: String,
    routes: watch::Sender<Vec<Route>>,
}

impl Routes {
    pub fn new(plugin: &str, replicas: usize) -> Self {
        Routes {
            plugin: plugin.to_string(),
            routes: watch::channel(vec![Route::Pending; replicas]).0,
        }
    }

    /// Publishes a replica's route. A replica removed by scaling down has
    /// no route any more: what it still says is dropped.
    pub fn set(&self, replica: usize, route: Route) {
        self.routes.send_modify(|routes| {
            if let Some(slot) = routes.get_mut(replica) {
                *slot = route;
            }
        });
    }

    /// The replica's current ready instance, if it is ready.
    pub fn ready(&self, replica: usize) -> Option<Arc<ReadyInstance>> {
        match self.routes.borrow().get(replica) {
            Some(Route::Ready(r)) => Some(r.clone()),
            _ => None,
        }
    }

    /// Whether some replica is ready now, and whether every one is down
    /// (stopped or failed, none starting): `(ready, all_down)`.
    pub fn readiness(&self) -> (bool, bool) {
        let routes = self.routes.borrow();
        (
            routes.iter().any(|r| matches!(r, Route::Ready(_))),
            routes.iter().all(|r| matches!(r, Route::Down { .. })),
        )
    }

    /// Sets the number of replicas (the coordinator's, when it scales):
    /// new ones are pending; removed ones must have stopped already.
    pub fn resize(&self, replicas: usize) {
        self.routes
            .send_modify(|routes| routes.resize(replicas, Route::Pending));
    }

    /// The load on the replicas now, for the autoscaling policy.
    pub fn load(&self) -> Load {
        let routes = self.routes.borrow();
        let mut load = Load {
            replicas: routes.len(),
            ..Load::default()
        };
        for route in routes.iter() {
            match route {
                Route::Ready(r) => {
                    load.ready_ids.push(r.id.clone());
                    load.in_flight += r.in_flight.load(Ordering::Relaxed);
                }
                Route::Pending => load.pending += 1,
                Route::Down { .. } => {}
            }
        }
        load
    }

    /// The least-loaded ready instance other than `avoid`, waiting for one
    /// until `deadline`. Fails at once when every replica is down.
    pub async fn pick(
        &self,
        deadline: Instant,
        timeout: Duration,
        avoid: Option<&str>,
        why_waiting: impl Fn() -> String,
    ) -> Result<InFlight, Error> {
        let mut rx = self.routes.subscribe();
        loop {
            match choose(&rx.borrow_and_update(), avoid) {
                Choice::Ready(instance, seen) => match InFlight::claim(&instance, seen) {
                    Some(call) => return Ok(call),
                    // Another call took it first: choose again at once.
                    None => continue,
                },
                Choice::Down { state, reason } => {
                    return Err(Error::NotRunning {
                        plugin: self.plugin.clone(),
                        state: state.to_string(),
                        reason,
                    });
                }
                Choice::Wait => {}
            }
            match tokio::time::timeout_at(deadline.into(), rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(Error::ShuttingDown),
                Err(_) => {
                    return Err(Error::NotReady {
                        plugin: self.plugin.clone(),
                        waited: timeout,
                        reason: why_waiting(),
                    });
                }
            }
        }
    }
}

/// What [`Routes::load`] reads.
#[derive(Debug, Default)]
pub(crate) struct Load {
    pub replicas: usize,
    /// The ready instances' ids.
    pub ready_ids: Vec<String>,
    /// Replicas starting or restarting.
    pub pending: usize,
    /// Calls in flight on the ready instances.
    pub in_flight: usize,
}

enum Choice {
    /// The least-loaded ready instance, with the calls it had in flight.
    Ready(Arc<ReadyInstance>, usize),
    Wait,
    Down {
        state: PluginState,
        reason: String,
    },
}

fn choose(routes: &[Route], avoid: Option<&str>) -> Choice {
    let best = routes
        .iter()
        .filter_map(|r| match r {
            Route::Ready(i) if Some(i.id.as_str()) != avoid => Some(i),
            _ => None,
        })
        .map(|i| (i, i.in_flight.load(Ordering::Acquire)))
        .min_by_key(|(_, seen)| *seen);
    if let Some((instance, seen)) = best {
        return Choice::Ready(instance.clone(), seen);
    }
    let any_coming = routes.iter().any(|r| match r {
        Route::Pending => true,
        // The instance to avoid is still published: its replacement will come.
        Route::Ready(_) => true,
        Route::Down { .. } => false,
    });
    if any_coming {
        return Choice::Wait;
    }
    match routes.iter().find_map(|r| match r {
        Route::Down { state, reason } => Some((*state, reason.clone())),
        _ => None,
    }) {
        Some((state, reason)) => Choice::Down { state, reason },
        None => Choice::Wait,
    }
}

/// Bounds a plugin's calls: at most `max_in_flight` at once, at most
/// `max_queue` waiting for a slot; beyond that, RESOURCE_EXHAUSTED.
pub(crate) struct Admission {
    plugin: String,
    /// The plugin's `plugvisor_calls_queued` gauge.
    queued_gauge: prometheus_client::metrics::gauge::Gauge,
    permits: Arc<Semaphore>,
    max_in_flight: usize,
    queued: AtomicUsize,
    max_queue: usize,
}

/// A call's place in the admission queue: given back when dropped, whether
/// the call got its slot, timed out, or was dropped while it waited.
struct QueuePlace<'a> {
    count: &'a AtomicUsize,
    /// Counts the place in `plugvisor_calls_queued` too.
    _gauge: crate::metrics::GaugeGuard,
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    pub fn new(
        plugin: &str,
        max_in_flight: usize,
        max_queue: usize,
        queued_gauge: prometheus_client::metrics::gauge::Gauge,
    ) -> Self {
        Admission {
            plugin: plugin.to_string(),
            queued_gauge,
            permits: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            queued: AtomicUsize::new(0),
            max_queue,
        }
    }

    /// A slot for one call, waiting in the bounded queue until `deadline`.
    /// The slot is held until the permit is dropped (a stream holds it until
    /// it ends).
    pub async fn admit(
        &self,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<OwnedSemaphorePermit, Error> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let _place = self.queue_place()?;
        let result =
            tokio::time::timeout_at(deadline.into(), self.permits.clone().acquire_owned()).await;
        match result {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(Error::ShuttingDown),
            Err(_) => Err(Error::NotReady {
                plugin: self.plugin.clone(),
                waited: timeout,
                reason: format!("all {} call slots stayed busy", self.max_in_flight),
            }),
        }
    }

    /// Takes a place in the queue, or answers overloaded when it is full.
    fn queue_place(&self) -> Result<QueuePlace<'_>, Error> {
        let taken = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_queue).then_some(n + 1)
            });
        match taken {
            Ok(_) => Ok(QueuePlace {
                count: &self.queued,
                _gauge: crate::metrics::GaugeGuard::hold(self.queued_gauge.clone()),
            }),
            Err(_) => Err(Error::Overloaded {
                plugin: self.plugin.clone(),
                in_flight: self.max_in_flight,
                queued: self.max_queue,
            }),
        }
    }

    /// Calls waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Calls waiting for a slot now.
    #[cfg(test)]
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An instance whose connection goes nowhere: routing never calls it.
    async fn instance(id: &str) -> Arc<ReadyInstance> {
        let (ours, theirs) = tokio::net::UnixStream::pair().unwrap();
        std::mem::forget(theirs);
        let connection = crate::transport::handshake(ours).await.unwrap();
        ReadyInstance::new(
            id.to_string(),
            0,
            crate::instance::Client::new(connection),
            None,
            None,
        )
    }

    #[tokio::test]
    async fn picks_the_least_loaded_ready_instance() {
        let routes = Routes::new("p", 3);
        let (a, b) = (instance("a").await, instance("b").await);
        routes.set(0, Route::Ready(a.clone()));
        routes.set(1, Route::Ready(b.clone()));
        routes.set(
            2,
            Route::Down {
                state: PluginState::Failed,
                reason: "x".into(),
            },
        );
        let far = Instant::now() + Duration::from_secs(1);
        let first = routes
            .pick(far, Duration::from_secs(1), None, String::new)
            .await
            .unwrap();
        let second = routes
            .pick(far, Duration::from_secs(1), None, String::new)
            .await
            .unwrap();
        assert_ne!(
            first.id, second.id,
            "the second call goes to the idle instance"
        );
        drop(first);
        let third = routes
            .pick(far, Duration::from_secs(1), Some("a"), String::new)
            .await
            .unwrap();
        assert_eq!(third.id, "b", "avoids the lost instance");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_that_chose_the_same_instance_at_once_spread_over_the_replicas() {
        let routes = Arc::new(Routes::new("p", 2));
        let (a, b) = (instance("a").await, instance("b").await);
        routes.set(0, Route::Ready(a.clone()));
        routes.set(1, Route::Ready(b.clone()));
        let far = Instant::now() + Duration::from_secs(1);
        // Two callers both chose `a` with nothing in flight: the first
        // claims it, the second finds it busier than it saw.
        let Choice::Ready(chosen, seen) = choose(&routes.routes.borrow(), None) else {
            panic!("a ready instance")
        };
        assert_eq!((chosen.id.as_str(), seen), ("a", 0));
        let first = InFlight::claim(&chosen, seen).expect("the first claim");
        assert!(InFlight::claim(&chosen, seen).is_none(), "a stale choice");
        // Choosing again (as `pick` does) takes the idle one.
        let second = routes
            .pick(far, Duration::from_secs(1), None, String::new)
            .await
            .unwrap();
        assert_eq!((first.id.as_str(), second.id.as_str()), ("a", "b"));
        drop((first, second));
        // 8 callers at once on both worker threads, each holding its call:
        // a claim only succeeds on an instance no busier than the other, so
        // they end up evenly spread.
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let routes = routes.clone();
                tokio::spawn(async move {
                    routes
                        .pick(far, Duration::from_secs(1), None, String::new)
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut calls = Vec::new();
        for t in tasks {
            calls.push(t.await.unwrap());
        }
        let on_a = calls.iter().filter(|c| c.id == "a").count();
        assert_eq!(on_a, 4, "8 concurrent calls over 2 idle replicas");
    }

    #[tokio::test]
    async fn fails_fast_when_every_replica_is_down_and_waits_while_one_is_pending() {
        let routes = Routes::new("p", 2);
        routes.set(
            0,
            Route::Down {
                state: PluginState::Stopped,
                reason: "stopped by request".into(),
            },
        );
        routes.set(
            1,
            Route::Down {
                state: PluginState::Failed,
                reason: "gave up".into(),
            },
        );
        let soon = Instant::now() + Duration::from_millis(50);
        let err = routes
            .pick(soon, Duration::from_millis(50), None, String::new)
            .await
            .err()
            .unwrap();
        assert!(matches!(err, Error::NotRunning { .. }), "{err}");
        routes.set(1, Route::Pending);
        let soon = Instant::now() + Duration::from_millis(50);
        let err = routes
            .pick(soon, Duration::from_millis(50), None, || "backoff".into())
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("backoff"), "{err}");
    }

    #[tokio::test]
    async fn a_full_queue_answers_overloaded() {
        let admission = Admission::new("p", 1, 1, Default::default());
        let far = Instant::now() + Duration::from_secs(5);
        let held = admission.admit(far, Duration::from_secs(5)).await.unwrap();
        let queued = admission.admit(far, Duration::from_secs(5));
        tokio::pin!(queued);
        // The second waits in the queue...
        assert!(futures_poll(&mut queued).await.is_none());
        // ...so the third finds the queue full.
        let err = admission
            .admit(far, Duration::from_secs(5))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, Error::Overloaded { .. }), "{err}");
        drop(held);
        assert!(queued.await.is_ok());
    }

    #[tokio::test]
    async fn a_call_dropped_while_queued_gives_its_place_back() {
        let gauge = prometheus_client::metrics::gauge::Gauge::default();
        let admission = Admission::new("p", 1, 2, gauge.clone());
        let far = Instant::now() + Duration::from_secs(5);
        let held = admission.admit(far, Duration::from_secs(5)).await.unwrap();
        // More cancelled waiters than the queue holds: each gives its place
        // back when it is dropped (a client that went away, a timeout).
        for _ in 0..5 {
            let waiting = admission.admit(far, Duration::from_secs(5));
            tokio::pin!(waiting);
            assert!(futures_poll(&mut waiting).await.is_none(), "it queues");
            assert_eq!(admission.queued(), 1);
            assert_eq!(gauge.get(), 1, "and the queued gauge says so");
        }
        assert_eq!(admission.queued(), 0, "every dropped waiter left the queue");
        assert_eq!(gauge.get(), 0);
        let cut_short = tokio::time::timeout(
            Duration::from_millis(20),
            admission.admit(far, Duration::from_secs(5)),
        )
        .await;
        assert!(cut_short.is_err(), "a call cut short by a timeout");
        assert_eq!(admission.queued(), 0);
        // The queue still takes calls: the next one waits for the slot.
        let next = admission.admit(far, Duration::from_secs(5));
        tokio::pin!(next);
        assert!(futures_poll(&mut next).await.is_none());
        drop(held);
        assert!(next.await.is_ok(), "and gets it once the slot is free");
    }

    /// Polls a future once.
    async fn futures_poll<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut *f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }

    #[tokio::test]
    async fn drained_waits_for_in_flight_calls() {
        let i = instance("a").await;
        let call = InFlight::claim(&i, 0).expect("an idle instance");
        assert!(!i.drained(Duration::from_millis(20)).await);
        let waiter = tokio::spawn({
            let i = i.clone();
            async move { i.drained(Duration::from_secs(5)).await }
        });
        drop(call);
        assert!(waiter.await.unwrap());
    }
}
