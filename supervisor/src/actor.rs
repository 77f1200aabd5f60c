//! One replica's actor: the only owner of its running instance, its restart
//! history and the spec it starts. It starts the child, watches it (exit,
//! health probes, periodic snapshots), restarts it by the restart policy,
//! and carries out what its plugin's coordinator orders (start, stop,
//! restart, upgrade, remove). The pure policy lives in [`crate::policy`],
//! the steps of an upgrade in [`crate::upgrade`].

mod remote;
mod standby;

use crate::instance::{self, Instance, StartError, probe};
use crate::policy::{Decision, Jitter, RestartTracker};
use crate::process::{ExitStatus, wait_exit};
use crate::replica::{Replica, Spec};
use crate::routing::Route;
use crate::status::{EventDetail, ExitReason, Health, PluginState};
use crate::upgrade::{self, Order};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// What the coordinator asks of a replica. Each carries where to answer;
/// the actor answers once the order is carried out.
pub(crate) enum Command {
    Start(oneshot::Sender<()>),
    Stop(oneshot::Sender<()>),
    Restart(oneshot::Sender<()>),
    /// Switch to a new spec, then wait for the coordinator's decision.
    Upgrade(Order),
    /// Stop for good: the plugin is no longer supervised.
    Remove(oneshot::Sender<()>),
    /// Stop for good because autoscaling removes this replica: leave
    /// routing first, let the calls in flight finish, then stop (with a
    /// last snapshot).
    Retire {
        reason: String,
        /// The replica count autoscaling goes to.
        scaled_to: usize,
        reply: oneshot::Sender<()>,
    },
}

/// What to do after an instance is gone.
enum Next {
    Start,
    /// Stay down until an operator starts it.
    Idle,
    /// The supervisor is shutting down, or the plugin was removed.
    Exit,
    /// The backoff has elapsed and an instance started during it waits
    /// for its Initialize (see [`standby`]).
    Standby(Box<standby::Standby>),
}

/// How a ready instance's watch ended.
enum RunEnd {
    /// The child exited, observed at this instant.
    Exited(ExitStatus, Instant),
    HealthFailed(String),
    /// A requirement with `on_crash: restart` went down: stop, wait for it.
    RequirementDown(String),
    Command(Command),
    Cancelled,
}

enum Outcome {
    /// The instance is gone on its own (crash, failed health checks).
    Gone {
        reason: ExitReason,
        ready_since: Option<Instant>,
        /// When its end was observed: the backoff counts from here.
        ended: Instant,
    },
    /// Stopped on request or by shutdown; what follows is decided.
    Decided(Next),
}

/// What the actor owns besides its instance.
struct Actor {
    replica: Replica,
    spec: Arc<Spec>,
    tracker: RestartTracker,
    jitter: Jitter,
    starts: u64,
    commands: mpsc::Receiver<Command>,
}

/// The actor of one replica: starts it, watches it, restarts it.
pub(crate) async fn run_replica(
    replica: Replica,
    spec: Arc<Spec>,
    commands: mpsc::Receiver<Command>,
) {
    let tracker = RestartTracker::new(spec.manifest.restart.clone());
    let resumed = Resumed {
        starts: 0,
        tracker,
        instance: None,
        start: true,
    };
    run_replica_resumed(replica, spec, commands, resumed).await
}

/// A replica taken over from a previous supervisor image (see
/// [`crate::handover`]).
pub(crate) struct Resumed {
    /// Starts so far: instance ids go on from there.
    pub starts: u64,
    pub tracker: RestartTracker,
    /// Its running instance, to reattach to.
    pub instance: Option<crate::handover::SavedInstance>,
    /// Without an instance: start one (`true`: it was between restarts) or
    /// stay down until an operator starts it.
    pub start: bool,
}

/// [`run_replica`] for a replica taken over with its history, and its
/// running instance if it had one.
pub(crate) async fn run_replica_resumed(
    replica: Replica,
    spec: Arc<Spec>,
    commands: mpsc::Receiver<Command>,
    resumed: Resumed,
) {
    let mut actor = Actor {
        tracker: resumed.tracker,
        replica,
        spec,
        jitter: Jitter::from_entropy(),
        starts: resumed.starts,
        commands,
    };
    let first = if resumed.start || resumed.instance.is_some() {
        Next::Start
    } else {
        Next::Idle
    };
    actor.run(resumed.instance, first).await;
    actor.replica.route(Route::Down {
        state: PluginState::Stopped,
        reason: "the supervisor has shut down".into(),
    });
}

impl Actor {
    fn next_id(&mut self) -> String {
        self.starts += 1;
        format!(
            "{}-{}-{}",
            self.replica.name(),
            self.replica.index,
            self.starts
        )
    }

    /// Takes a new spec; a new manifest (an upgrade) starts a fresh restart
    /// history, a config change keeps it.
    fn adopt(&mut self, spec: Arc<Spec>) {
        if !Arc::ptr_eq(&spec.manifest, &self.spec.manifest) {
            self.tracker = RestartTracker::new(spec.manifest.restart.clone());
            self.publish_history();
        }
        self.spec = spec;
    }

    /// Starts a fresh restart history (an operator's start or restart), as
    /// if the plugin had never crashed.
    fn clear_history(&mut self) {
        self.tracker.clear();
        self.publish_history();
    }

    /// Copies the restart history to the board, where a hand-over to a new
    /// supervisor image reads it.
    fn publish_history(&self) {
        let tracker = self.tracker.clone();
        self.replica.update(|r| r.tracker = Some(tracker));
    }

    /// Runs the replica from `next`; an `adopted` instance is served
    /// first, in place of the first start.
    async fn run(&mut self, mut adopted: Option<crate::handover::SavedInstance>, mut next: Next) {
        // A survivor of a crashed supervisor, proven to be itself (none
        // when this replica was taken over from a previous image of this
        // supervisor: that instance is the one it runs).
        let mut survivor = match adopted {
            Some(_) => None,
            None => crate::adopt::claim(&self.replica, &self.spec).await,
        };
        if let Some((_, _, start)) = &survivor {
            self.starts = *start;
        }
        loop {
            let mut standby = None;
            match next {
                Next::Exit => return,
                Next::Idle => {
                    next = self.idle().await;
                    continue;
                }
                Next::Start => {}
                Next::Standby(s) => standby = Some(s),
            }
            let (instance_id, outcome) = match adopted.take() {
                // Taken over running: its requirements were met when it
                // started, and a hand-over is no going down of theirs.
                Some(saved) => {
                    let id = saved.id.clone();
                    match crate::handover::reattach(&self.replica, &self.spec, saved).await {
                        Ok((instance, ready_since)) => {
                            (id, Box::pin(self.serve(instance, ready_since)).await)
                        }
                        Err(reason) => (id, Err(reason)),
                    }
                }
                // A re-adopted survivor is running already: nothing to
                // wait for, and it ran its post_ready hook when it started.
                None if survivor.is_some() => {
                    let (instance, info, _) = survivor.take().expect("checked");
                    let id = instance.id.clone();
                    let ready_since = self.replica.publish(&instance, &info);
                    (id, Box::pin(self.serve(instance, ready_since)).await)
                }
                None => {
                    match crate::dependencies::wait_for_requirements(
                        &self.replica,
                        &self.spec,
                        &mut self.commands,
                    )
                    .await
                    {
                        crate::dependencies::WaitEnd::Ready => {}
                        crate::dependencies::WaitEnd::Exit => {
                            if let Some(s) = standby {
                                standby::discard(&self.replica, *s).await;
                            }
                            return;
                        }
                        crate::dependencies::WaitEnd::Command(cmd) => {
                            if let Some(s) = standby {
                                standby::discard(&self.replica, *s).await;
                            }
                            next = self.while_waiting(cmd).await;
                            continue;
                        }
                    }
                    match standby {
                        // Started during the backoff under the spec still in
                        // force: only its Initialize is left.
                        Some(s) if Arc::ptr_eq(&s.spec, &self.spec) => {
                            let instance_id = s.instance.id.clone();
                            // Boxed: the actor's future would otherwise hold
                            // two whole starts side by side.
                            let outcome = Box::pin(self.initialize_standby(*s)).await;
                            (instance_id, outcome)
                        }
                        other => {
                            if let Some(s) = other {
                                standby::discard(&self.replica, *s).await;
                            }
                            let instance_id = self.next_id();
                            let outcome = self.start_and_run(&instance_id).await;
                            (instance_id, outcome)
                        }
                    }
                }
            };
            let (reason, ready_since, ended) = match outcome {
                Ok(Outcome::Gone {
                    reason,
                    ready_since,
                    ended,
                }) => (reason, ready_since, ended),
                Ok(Outcome::Decided(n)) => {
                    if matches!(n, Next::Start) {
                        self.clear_history();
                    }
                    next = n;
                    continue;
                }
                Err(reason) => (reason, None, Instant::now()),
            };
            next = self
                .after_exit(&instance_id, reason, ready_since, ended)
                .await;
        }
    }

    /// Decides what follows an instance that ended on its own (observed
    /// at `ended`).
    async fn after_exit(
        &mut self,
        instance_id: &str,
        reason: ExitReason,
        ready_since: Option<Instant>,
        ended: Instant,
    ) -> Next {
        if spawned(&reason) {
            self.replica
                .hook_reported(
                    &self.spec.manifest,
                    &self.spec.env,
                    "post_exit",
                    instance_id,
                    &[
                        ("PLUGVISOR_EXIT_REASON", reason.to_string()),
                        ("PLUGVISOR_EXIT_KIND", reason.kind().to_string()),
                    ],
                )
                .await;
        }
        let replica = &self.replica;
        replica.update(|r| {
            r.last_exit = Some(reason.to_string());
            r.pid = None;
            r.ready_since = None;
        });
        replica.route(Route::Pending);
        let detail = EventDetail::of_exit(&reason);
        if reason.is_refusal() {
            replica.down(
                instance_id,
                PluginState::Failed,
                format!(
                    "{reason}; not restarted: `plugvisor restart {}` tries again once it is fixed",
                    replica.name()
                ),
                detail,
            );
            return Next::Idle;
        }
        let decision = self.tracker.on_exit(
            Instant::now(),
            reason.is_clean(),
            ready_since,
            self.jitter.sample(),
        );
        self.publish_history();
        match decision {
            Decision::Restart { delay, attempt } => {
                replica.update(|r| r.restarts += 1);
                replica
                    .host
                    .metrics
                    .restarted(replica.name(), reason.kind());
                replica.event(
                    PluginState::Backoff,
                    instance_id,
                    format!(
                        "{reason} ({}); restart #{attempt} in {}ms",
                        reason.kind(),
                        delay.as_millis()
                    ),
                    EventDetail {
                        attempt: Some(attempt),
                        delay: Some(delay),
                        ..detail
                    },
                );
                // Counted from the exit, not from this point (the post-exit
                // hook and the bookkeeping above take time too). Only an
                // instance that had been ready has its successor started
                // during the backoff: a start that fails waits it out.
                let deadline = ended + delay;
                let prestart = ready_since.is_some() && standby::allowed(&self.spec);
                // Boxed: it holds a start of its own (the standby's).
                Box::pin(self.backoff(deadline, prestart)).await
            }
            Decision::Stop { reason: why } => {
                replica.down(
                    instance_id,
                    PluginState::Stopped,
                    format!("{reason}; {why}"),
                    detail,
                );
                Next::Idle
            }
            Decision::GiveUp { reason: why } => {
                replica.down(
                    instance_id,
                    PluginState::Failed,
                    format!(
                        "{reason}; giving up: {why}; `plugvisor restart {}` starts it again",
                        replica.name()
                    ),
                    detail,
                );
                Next::Idle
            }
        }
    }

    /// Runs the post-ready hook of an initialized instance before it is
    /// published, so it takes calls only once the hook succeeded. A failure
    /// kills the instance and is its exit reason (the restart policy
    /// answers it like a failed start).
    async fn post_ready(&self, instance: &Instance) -> Option<ExitReason> {
        let result = tokio::select! {
            r = self.replica.post_ready(&self.spec, instance) => r,
            // The watch that follows sees it and stops the instance.
            _ = self.replica.host.cancel.cancelled() => Ok(()),
        };
        let e = result.err()?;
        instance::kill_and_reap(&instance.child).await;
        Some(ExitReason::Start(StartError::Hook(e)))
    }

    /// Waits out a backoff until `deadline`; an operator's stop or restart
    /// cuts it short. With `prestart`, the next instance is spawned (at
    /// once, or [`standby::LEAD`] before the deadline of a longer backoff)
    /// and handed on, handshaken, once the deadline has passed (see
    /// [`standby`]); every order but a start discards it first.
    async fn backoff(&mut self, deadline: Instant, prestart: bool) -> Next {
        let sleep = standby::sleep_until(deadline);
        tokio::pin!(sleep);
        let mut pending = standby::Pending::default();
        // A start due now starts now, not at the timer's next tick.
        let start_at = standby::start_at(deadline);
        let mut to_start = prestart;
        if to_start && start_at <= Instant::now() {
            to_start = false;
            let id = self.next_id();
            pending.start(&self.replica, &self.spec, id, deadline);
        }
        let lead = tokio::time::sleep_until(start_at.into());
        tokio::pin!(lead);
        let mut elapsed = false;
        loop {
            let cmd = tokio::select! {
                _ = &mut lead, if to_start && !elapsed => {
                    to_start = false;
                    let id = self.next_id();
                    pending.start(&self.replica, &self.spec, id, deadline);
                    continue;
                }
                _ = &mut sleep, if !elapsed => {
                    elapsed = true;
                    match pending.on_elapsed() {
                        Some(next) => return next,
                        None => continue,
                    }
                }
                started = standby::started(&mut pending.starting) => {
                    match pending.on_started(&self.replica, started, elapsed, deadline) {
                        Some(next) => return next,
                        None => continue,
                    }
                }
                status = standby::exited(&pending.ready) => {
                    pending.on_exited(&self.replica, status, deadline).await;
                    continue;
                }
                _ = self.replica.host.cancel.cancelled() => {
                    pending.discard(&self.replica).await;
                    return Next::Exit;
                }
                cmd = self.commands.recv() => cmd,
            };
            if !matches!(cmd, Some(Command::Start(_))) {
                pending.discard(&self.replica).await;
            }
            match cmd {
                Some(Command::Start(reply)) => {
                    let _ = reply.send(());
                }
                Some(Command::Restart(reply)) => {
                    self.clear_history();
                    self.replica.transition(
                        PluginState::Starting,
                        "",
                        "restart requested; backoff cut short".into(),
                    );
                    let _ = reply.send(());
                    return Next::Start;
                }
                Some(Command::Stop(reply)) => {
                    self.replica.down(
                        "",
                        PluginState::Stopped,
                        "stopped by request".into(),
                        EventDetail::default(),
                    );
                    let _ = reply.send(());
                    return Next::Idle;
                }
                Some(Command::Upgrade(order)) => self.upgrade_idle(order).await,
                Some(Command::Remove(reply)) => {
                    self.replica.down(
                        "",
                        PluginState::Stopped,
                        "removed".into(),
                        EventDetail::default(),
                    );
                    let _ = reply.send(());
                    return Next::Exit;
                }
                Some(Command::Retire {
                    reason,
                    scaled_to,
                    reply,
                }) => {
                    self.replica.retired(reason, scaled_to);
                    let _ = reply.send(());
                    return Next::Exit;
                }
                None => return Next::Exit,
            }
        }
    }

    /// An order that arrived while waiting for requirements.
    async fn while_waiting(&mut self, cmd: Command) -> Next {
        match cmd {
            Command::Start(reply) | Command::Restart(reply) => {
                self.tracker.clear();
                let _ = reply.send(());
                Next::Start
            }
            Command::Stop(reply) => {
                self.replica.down(
                    "",
                    PluginState::Stopped,
                    "stopped by request".into(),
                    EventDetail::default(),
                );
                let _ = reply.send(());
                Next::Idle
            }
            Command::Upgrade(order) => {
                self.upgrade_idle(order).await;
                Next::Start
            }
            Command::Remove(reply) => {
                self.replica.down(
                    "",
                    PluginState::Stopped,
                    "removed".into(),
                    EventDetail::default(),
                );
                let _ = reply.send(());
                Next::Exit
            }
            Command::Retire {
                reason,
                scaled_to,
                reply,
            } => {
                self.replica.retired(reason, scaled_to);
                let _ = reply.send(());
                Next::Exit
            }
        }
    }

    /// Down (stopped or failed): waits for an operator's start or restart.
    async fn idle(&mut self) -> Next {
        loop {
            let cmd = tokio::select! {
                _ = self.replica.host.cancel.cancelled() => return Next::Exit,
                cmd = self.commands.recv() => cmd,
            };
            match cmd {
                Some(Command::Start(reply) | Command::Restart(reply)) => {
                    self.clear_history();
                    self.replica.route(Route::Pending);
                    // The answer reads the state: say it is starting now,
                    // not the `stopped` it is leaving.
                    self.replica
                        .transition(PluginState::Starting, "", "start requested".into());
                    let _ = reply.send(());
                    return Next::Start;
                }
                Some(Command::Stop(reply)) => {
                    let _ = reply.send(());
                }
                Some(Command::Upgrade(order)) => self.upgrade_idle(order).await,
                Some(Command::Remove(reply)) => {
                    let _ = reply.send(());
                    return Next::Exit;
                }
                Some(Command::Retire {
                    reason,
                    scaled_to,
                    reply,
                }) => {
                    self.replica.event(
                        PluginState::Stopped,
                        "",
                        reason,
                        EventDetail {
                            scaled_to: Some(scaled_to),
                            ..EventDetail::default()
                        },
                    );
                    let _ = reply.send(());
                    return Next::Exit;
                }
                None => return Next::Exit,
            }
        }
    }

    /// An upgrade of a replica that runs no instance: nothing to switch; the
    /// new spec is used from its next start if the coordinator commits.
    async fn upgrade_idle(&mut self, order: Order) {
        if let Some(spec) = upgrade::nothing_running(order, &self.replica.host.cancel).await {
            self.adopt(spec);
        }
    }

    /// Starts one instance and serves calls through it until it ends.
    async fn start_and_run(&mut self, instance_id: &str) -> Result<Outcome, ExitReason> {
        if self.spec.manifest.remote.is_some() {
            return self.connect_and_run(instance_id).await;
        }
        let (restored, note) = self
            .replica
            .restored_state()
            .await
            .map_err(|why| ExitReason::Start(StartError::StateUnreadable(why)))?;
        // Dropping a start in progress (on shutdown) kills its child: see
        // `Child`'s Drop.
        let launched = tokio::select! {
            r = self.replica.launch(&self.spec, instance_id, restored, &note) => r,
            _ = self.replica.host.cancel.cancelled() => return Ok(Outcome::Decided(Next::Exit)),
        };
        let (instance, info) = launched.map_err(ExitReason::Start)?;
        // Boxed: serving is the largest part of the actor's future.
        Box::pin(self.publish_and_serve(instance, info)).await
    }

    /// Runs the post-ready hook of an initialized instance, publishes it
    /// and serves calls through it until it ends.
    async fn publish_and_serve(
        &mut self,
        instance: Instance,
        info: plugvisor_proto::InitializeResponse,
    ) -> Result<Outcome, ExitReason> {
        if let Some(reason) = self.post_ready(&instance).await {
            return Ok(Outcome::Gone {
                reason,
                ready_since: None,
                ended: Instant::now(),
            });
        }
        let ready_since = self.replica.publish(&instance, &info);
        self.serve(instance, ready_since).await
    }

    /// Serves calls through a ready instance until it ends.
    async fn serve(
        &mut self,
        mut instance: Instance,
        mut ready_since: Instant,
    ) -> Result<Outcome, ExitReason> {
        // Kept across the loop, so a requirement's change is told once; a
        // new manifest (an upgrade) brings a new watch.
        let mut requirements = crate::dependencies::Watch::new(&self.replica, &self.spec.manifest);
        let mut watched = self.spec.manifest.clone();
        loop {
            let manifest = self.spec.manifest.clone();
            if !Arc::ptr_eq(&manifest, &watched) {
                requirements = crate::dependencies::Watch::new(&self.replica, &manifest);
                watched = manifest.clone();
            }
            let end = watch_ready(
                &self.replica,
                &manifest,
                &mut instance,
                &mut self.commands,
                &mut requirements,
            )
            .await;
            let (why, next, reply) = match end {
                // What the crashed child left in its process group goes with
                // it when `instance` is dropped (see `Child`'s Drop).
                RunEnd::Exited(status, ended) => {
                    let oom = instance.ended_by_oom(status).await;
                    return Ok(Outcome::Gone {
                        reason: ExitReason::of_exit(status, oom)
                            .or_seccomp_kill(&manifest.isolation.seccomp),
                        ready_since: Some(ready_since),
                        ended,
                    });
                }
                RunEnd::RequirementDown(why) => {
                    self.replica
                        .stop_instance_releasing(&manifest, &mut instance, &why, true)
                        .await;
                    return Ok(Outcome::Decided(Next::Start));
                }
                RunEnd::HealthFailed(why) => {
                    self.replica.route(Route::Pending);
                    instance::kill_and_reap(&instance.child).await;
                    return Ok(Outcome::Gone {
                        reason: ExitReason::HealthCheck(why),
                        ready_since: Some(ready_since),
                        ended: Instant::now(),
                    });
                }
                RunEnd::Cancelled => ("the supervisor is shutting down", Next::Exit, None),
                RunEnd::Command(Command::Start(reply)) => {
                    // Already running.
                    let _ = reply.send(());
                    continue;
                }
                RunEnd::Command(Command::Stop(reply)) => {
                    ("stopped by request", Next::Idle, Some(reply))
                }
                RunEnd::Command(Command::Remove(reply)) => {
                    ("removed from the supervisor", Next::Exit, Some(reply))
                }
                RunEnd::Command(Command::Restart(reply)) => {
                    ("restart requested", Next::Start, Some(reply))
                }
                RunEnd::Command(Command::Retire {
                    reason,
                    scaled_to,
                    reply,
                }) => {
                    self.retire(&manifest, &mut instance, &reason, scaled_to)
                        .await;
                    let _ = reply.send(());
                    return Ok(Outcome::Decided(Next::Exit));
                }
                RunEnd::Command(Command::Upgrade(order)) => {
                    let new_id = self.next_id();
                    let current = self.spec.clone();
                    let result = {
                        let _upgrading = Upgrading::mark(&self.replica);
                        upgrade::run(&self.replica, &current, instance, order, &new_id).await
                    };
                    instance = result.instance;
                    if let Some(since) = result.ready_since {
                        ready_since = since;
                    }
                    if let Some(spec) = result.adopted {
                        self.adopt(spec);
                    }
                    continue;
                }
            };
            let restarting = matches!(next, Next::Start);
            self.replica
                .stop_instance_releasing(&manifest, &mut instance, why, restarting)
                .await;
            if restarting && reply.is_some() {
                // The answer reads the state: the new start has begun.
                self.replica
                    .transition(PluginState::Starting, "", "restarting by request".into());
            }
            if let Some(reply) = reply {
                let _ = reply.send(());
            }
            return Ok(Outcome::Decided(next));
        }
    }
}

/// Marks a replica as upgrading (see [`crate::status::ReplicaStatus`]) for
/// as long as it lives.
struct Upgrading<'a>(&'a Replica);

impl<'a> Upgrading<'a> {
    fn mark(replica: &'a Replica) -> Self {
        replica.update(|r| r.upgrading = true);
        Upgrading(replica)
    }
}

impl Drop for Upgrading<'_> {
    fn drop(&mut self) {
        self.0.update(|r| r.upgrading = false);
    }
}

impl Actor {
    /// Scaling down: no new call comes to this replica, the calls in
    /// flight finish (up to `timeouts.call`, the longest a call is given),
    /// then it stops gracefully with a last snapshot.
    async fn retire(
        &self,
        manifest: &crate::manifest::Manifest,
        instance: &mut Instance,
        reason: &str,
        scaled_to: usize,
    ) {
        let replica = &self.replica;
        let ready = replica.plugin.routes.ready(replica.index);
        replica.route(Route::Down {
            state: PluginState::Stopping,
            reason: reason.to_string(),
        });
        replica.event(
            PluginState::Stopping,
            &instance.id,
            format!("{reason}; draining the calls in flight"),
            EventDetail {
                scaled_to: Some(scaled_to),
                ..EventDetail::default()
            },
        );
        if let Some(ready) = ready
            && !ready.drained(manifest.timeouts.call.0).await
        {
            tracing::warn!(plugin = %replica.name(), instance = %instance.id, "calls still in flight after timeouts.call; stopping anyway");
        }
        replica
            .stop_instance(manifest, instance, reason, false, true)
            .await;
    }
}

/// Watches a ready instance: its exit, health probes, snapshots, commands.
async fn watch_ready(
    replica: &Replica,
    manifest: &crate::manifest::Manifest,
    instance: &mut Instance,
    commands: &mut mpsc::Receiver<Command>,
    requirements: &mut crate::dependencies::Watch,
) -> RunEnd {
    let interval = manifest.health.interval.0;
    let mut probes = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    probes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0u32;
    let mut degraded = false;
    // Periodic snapshots; a zero interval (or no store) never ticks.
    let every = manifest.state.snapshot_interval.0;
    let periodic = replica.snapshots.is_some() && !every.is_zero();
    let tick = every.max(Duration::from_millis(1));
    let mut snapshots = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    snapshots.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let exited = wait_exit(instance.child.exit_watch());
    tokio::pin!(exited);
    loop {
        tokio::select! {
            status = &mut exited => return RunEnd::Exited(status, Instant::now()),
            change = requirements.next() => {
                let went = if change.up { "is ready again" } else { "went down" };
                let detail = EventDetail {
                    requirement: Some(change.name.clone()),
                    ..EventDetail::default()
                };
                let state = replica.plugin.board.lock().replicas[replica.index].state;
                replica.event(
                    state,
                    &instance.id,
                    format!("required plugin {} {went} ({})", change.name, change.why),
                    detail,
                );
                if !change.up && change.on_crash == crate::dependencies::OnCrash::Restart {
                    return RunEnd::RequirementDown(format!(
                        "required plugin {} went down; starting again once it is ready (on_crash: restart)",
                        change.name
                    ));
                }
            }
            _ = replica.host.cancel.cancelled() => return RunEnd::Cancelled,
            cmd = commands.recv() => return match cmd {
                Some(cmd) => RunEnd::Command(cmd),
                None => RunEnd::Cancelled,
            },
            _ = snapshots.tick(), if periodic => {
                if let Some(store) = &replica.snapshots
                    && let Err(e) = store.take(&instance.client, manifest.timeouts.call.0).await
                {
                    replica.snapshot_failed(&instance.id, "(periodic)", &e);
                }
            }
            _ = probes.tick() => {
                let outcome = probe(&instance.client, manifest.health.timeout.0).await;
                let failure = match outcome {
                    Ok((Health::Serving, _)) => {
                        failures = 0;
                        if degraded {
                            degraded = false;
                            replica.transition(PluginState::Ready, &instance.id, "health check: serving again".into());
                        }
                        None
                    }
                    Ok((Health::Degraded, message)) => {
                        failures = 0;
                        if !degraded {
                            degraded = true;
                            replica.transition(PluginState::Degraded, &instance.id, format!("health check: degraded: {message}"));
                        }
                        None
                    }
                    Ok((status, message)) => Some(format!("health check answered {}: {message}", status.as_str_name())),
                    Err(why) => Some(why),
                };
                if let Some(why) = failure {
                    failures += 1;
                    replica.host.metrics.health_failed(replica.name());
                    let threshold = manifest.health.failure_threshold;
                    tracing::warn!(plugin = %replica.name(), instance = %instance.id, "health check failed ({failures}/{threshold}): {why}");
                    if failures >= threshold {
                        return RunEnd::HealthFailed(format!("{failures} consecutive failed health checks; last: {why}"));
                    }
                }
            }
        }
    }
}

/// Whether an instance that ended for `reason` had been spawned (its
/// post-exit hook then runs): not when a check, its sandbox or its
/// pre-start hook stopped it first.
fn spawned(reason: &ExitReason) -> bool {
    match reason {
        ExitReason::Start(e) => {
            !matches!(
                e,
                StartError::SocketDir { .. }
                    | StartError::Spawn { .. }
                    | StartError::Refused(_)
                    | StartError::Isolation { .. }
                    | StartError::StateUnreadable(_)
            ) && !matches!(e, StartError::Hook(h) if h.hook == "pre_start")
        }
        _ => true,
    }
}
