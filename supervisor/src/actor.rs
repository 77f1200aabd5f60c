//! One replica's actor: starts its child, watches it (exit, health probes,
//! snapshots, operator commands), restarts it by the restart policy, and
//! carries out upgrades. The pure policy lives in [`crate::policy`]; the
//! child's start and stop in [`crate::instance`].

use crate::instance::{self, Instance, StartContext, StartError};
use crate::manifest::Manifest;
use crate::policy::{Decision, Jitter, RestartTracker};
use crate::process::{ExitStatus, wait_exit};
use crate::routing::{ReadyInstance, Route};
use crate::supervisor::{Client, ExitReason, Health, PluginState, Shared, Slot, lock};
use plugvisor_proto::{ExportStateRequest, HealthCheckRequest, RestoredState};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// What an operator (through the [`crate::Supervisor`]) asks of a replica.
pub(crate) enum Command {
    Start(oneshot::Sender<()>),
    Stop(oneshot::Sender<()>),
    Restart(oneshot::Sender<()>),
    /// Replace the running instance with one of this manifest; the answer is
    /// the reason of a rolled-back upgrade.
    Upgrade(Arc<Manifest>, oneshot::Sender<Result<(), String>>),
    /// Stop for good: the plugin is no longer supervised.
    Remove(oneshot::Sender<()>),
}

/// A replica of a plugin, as the actor sees it.
struct Replica<'a> {
    shared: &'a Shared,
    slot: &'a Slot,
    index: usize,
}

impl Replica<'_> {
    fn transition(&self, state: PluginState, instance: &str, reason: String) {
        self.shared
            .transition(self.slot, self.index, state, instance, reason);
    }

    fn route(&self, route: Route) {
        self.slot.routes.set(self.index, route);
    }

    /// Down: calls fail at once with this state and reason.
    fn down(&self, instance: &str, state: PluginState, reason: String) {
        self.route(Route::Down {
            state,
            reason: reason.clone(),
        });
        self.transition(state, instance, reason);
    }

    fn update(&self, f: impl FnOnce(&mut crate::supervisor::ReplicaStatus)) {
        f(&mut lock(&self.slot.status).replicas[self.index]);
    }
}

/// What to do after an instance is gone.
enum Next {
    Start,
    /// Stay down until an operator starts it.
    Idle,
    /// The supervisor is shutting down.
    Exit,
}

/// How a ready instance's watch ended.
enum RunEnd {
    Exited(ExitStatus),
    HealthFailed(String),
    Stop(oneshot::Sender<()>),
    Restart(oneshot::Sender<()>),
    Upgrade(Arc<Manifest>, oneshot::Sender<Result<(), String>>),
    Remove(oneshot::Sender<()>),
    Cancelled,
}

enum Outcome {
    /// The instance is gone on its own (crash, failed health checks).
    Gone {
        reason: ExitReason,
        ready_since: Option<Instant>,
    },
    /// Stopped on request or by shutdown; what follows is decided.
    Decided(Next),
}

/// The actor of one replica: starts it, watches it, restarts it.
pub(crate) async fn run_replica(
    shared: Arc<Shared>,
    slot: Arc<Slot>,
    index: usize,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let replica = Replica {
        shared: &shared,
        slot: &slot,
        index,
    };
    let mut manifest = slot.manifest();
    let mut tracker = RestartTracker::new(manifest.restart.clone());
    let mut tracker_source = manifest.clone();
    let mut jitter = Jitter::from_entropy();
    let mut starts: u64 = 0;
    let mut next = Next::Start;
    loop {
        match next {
            Next::Exit => break,
            Next::Idle => {
                next = idle(&replica, &mut commands, &mut tracker, &mut manifest).await;
                continue;
            }
            Next::Start => {}
        }
        starts += 1;
        let instance_id = format!("{}-{index}-{starts}", slot.name);
        let outcome = start_and_run(
            &replica,
            &mut manifest,
            &instance_id,
            &mut starts,
            &mut commands,
        )
        .await;
        // An upgrade brings its own restart spec and a fresh history.
        if !Arc::ptr_eq(&tracker_source, &manifest) {
            tracker = RestartTracker::new(manifest.restart.clone());
            tracker_source = manifest.clone();
        }
        let (reason, ready_since) = match outcome {
            Ok(Outcome::Gone {
                reason,
                ready_since,
            }) => (reason, ready_since),
            Ok(Outcome::Decided(n)) => {
                if matches!(n, Next::Start) {
                    tracker.clear();
                }
                next = n;
                continue;
            }
            Err(e) => (ExitReason::Start(e), None),
        };
        replica.update(|r| {
            r.last_exit = Some(reason.to_string());
            r.pid = None;
            r.ready_since = None;
        });
        replica.route(Route::Pending);
        if reason.is_refusal() {
            replica.down(
                &instance_id,
                PluginState::Failed,
                format!(
                    "{reason}; not restarted: `plugvisor restart {}` tries again once it is fixed",
                    slot.name
                ),
            );
            next = Next::Idle;
            continue;
        }
        next = match tracker.on_exit(
            Instant::now(),
            reason.is_clean(),
            ready_since,
            jitter.sample(),
        ) {
            Decision::Restart { delay, attempt } => {
                replica.update(|r| r.restarts += 1);
                shared.metrics.restarted(&slot.name, reason.kind());
                replica.transition(
                    PluginState::Backoff,
                    &instance_id,
                    format!(
                        "{reason} ({}); restart #{attempt} in {}ms",
                        reason.kind(),
                        delay.as_millis()
                    ),
                );
                backoff(&replica, delay, &mut commands, &mut tracker, &mut manifest).await
            }
            Decision::Stop { reason: why } => {
                replica.down(
                    &instance_id,
                    PluginState::Stopped,
                    format!("{reason}; {why}"),
                );
                Next::Idle
            }
            Decision::GiveUp { reason: why } => {
                replica.down(
                    &instance_id,
                    PluginState::Failed,
                    format!(
                        "{reason}; giving up: {why}; `plugvisor restart {}` starts it again",
                        slot.name
                    ),
                );
                Next::Idle
            }
        };
    }
    replica.route(Route::Down {
        state: PluginState::Stopped,
        reason: "the supervisor has shut down".into(),
    });
}

/// Answers an upgrade of a replica that runs no instance: the new manifest
/// is used from its next start.
fn adopt(
    manifest: &mut Arc<Manifest>,
    new: Arc<Manifest>,
    reply: oneshot::Sender<Result<(), String>>,
) {
    *manifest = new;
    let _ = reply.send(Ok(()));
}

/// Waits out a backoff delay; an operator's stop or restart cuts it short.
async fn backoff(
    replica: &Replica<'_>,
    delay: Duration,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    tracker: &mut RestartTracker,
    manifest: &mut Arc<Manifest>,
) -> Next {
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut sleep => return Next::Start,
            _ = replica.shared.cancel.cancelled() => return Next::Exit,
            cmd = commands.recv() => match cmd {
                Some(Command::Start(reply)) => { let _ = reply.send(()); }
                Some(Command::Restart(reply)) => {
                    tracker.clear();
                    let _ = reply.send(());
                    return Next::Start;
                }
                Some(Command::Stop(reply)) => {
                    replica.down("", PluginState::Stopped, "stopped by request".into());
                    let _ = reply.send(());
                    return Next::Idle;
                }
                Some(Command::Upgrade(new, reply)) => adopt(manifest, new, reply),
                Some(Command::Remove(reply)) => {
                    replica.down("", PluginState::Stopped, "removed".into());
                    let _ = reply.send(());
                    return Next::Exit;
                }
                None => return Next::Exit,
            }
        }
    }
}

/// Down (stopped or failed): waits for an operator's start or restart.
async fn idle(
    replica: &Replica<'_>,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    tracker: &mut RestartTracker,
    manifest: &mut Arc<Manifest>,
) -> Next {
    loop {
        tokio::select! {
            _ = replica.shared.cancel.cancelled() => return Next::Exit,
            cmd = commands.recv() => match cmd {
                Some(Command::Start(reply) | Command::Restart(reply)) => {
                    tracker.clear();
                    replica.route(Route::Pending);
                    let _ = reply.send(());
                    return Next::Start;
                }
                Some(Command::Stop(reply)) => { let _ = reply.send(()); }
                Some(Command::Upgrade(new, reply)) => adopt(manifest, new, reply),
                Some(Command::Remove(reply)) => {
                    let _ = reply.send(());
                    return Next::Exit;
                }
                None => return Next::Exit,
            }
        }
    }
}

/// Spawns and initializes an instance of `manifest`, with `restored` state.
/// On failure the child is already killed and reaped.
async fn launch(
    replica: &Replica<'_>,
    manifest: &Manifest,
    instance_id: &str,
    restored: Option<RestoredState>,
    note: &str,
) -> Result<(Instance, plugvisor_proto::InitializeResponse), StartError> {
    let slot = replica.slot;
    replica.transition(
        PluginState::Starting,
        instance_id,
        format!("spawning {} {}", manifest.exec.display(), manifest.version),
    );
    let ctx = StartContext {
        manifest,
        instance_id: instance_id.to_string(),
        runtime_dir: &replica.shared.opts.runtime_dir,
        env: slot.env_for(manifest),
        logs: slot.logs.clone(),
        processes: &replica.shared.processes,
        tasks: &replica.shared.io_tasks,
        isolation: Some(&replica.shared.isolation),
    };
    let mut instance = instance::spawn(ctx).await?;
    replica.update(|r| {
        r.instance = instance_id.to_string();
        r.pid = Some(instance.child.pid());
    });
    replica.transition(
        PluginState::Initializing,
        instance_id,
        format!(
            "handshake done in {}ms; calling Initialize{note}",
            instance.spawned_at.elapsed().as_millis()
        ),
    );
    match instance::initialize(
        &mut instance,
        manifest,
        &slot.config_for(manifest),
        restored,
    )
    .await
    {
        Ok(info) => Ok((instance, info)),
        Err(e) => {
            instance::kill_and_reap(&instance.child).await;
            Err(e)
        }
    }
}

/// Publishes a freshly initialized instance as ready.
fn publish(
    replica: &Replica<'_>,
    instance: &Instance,
    info: &plugvisor_proto::InitializeResponse,
) -> Instant {
    let ready_since = Instant::now();
    replica
        .shared
        .metrics
        .started(&replica.slot.name, instance.spawned_at.elapsed());
    {
        let mut st = lock(&replica.slot.status);
        st.methods = info.methods.clone();
        let r = &mut st.replicas[replica.index];
        r.ready_since = Some(ready_since);
        r.instance = instance.id.clone();
        r.pid = Some(instance.child.pid());
    }
    replica.route(Route::Ready(ReadyInstance::new(
        instance.id.clone(),
        replica.index,
        instance.client.clone(),
    )));
    replica.transition(
        PluginState::Ready,
        &instance.id,
        format!(
            "ready in {}ms (pid {}, {} {})",
            instance.spawned_at.elapsed().as_millis(),
            instance.child.pid(),
            if info.name.is_empty() {
                &replica.slot.name
            } else {
                &info.name
            },
            info.version
        ),
    );
    ready_since
}

/// Starts one instance and serves calls through it until it ends.
async fn start_and_run(
    replica: &Replica<'_>,
    manifest: &mut Arc<Manifest>,
    instance_id: &str,
    starts: &mut u64,
    commands: &mut mpsc::UnboundedReceiver<Command>,
) -> Result<Outcome, StartError> {
    let (restored, note) = restored_state(replica).await?;
    // Dropping a start in progress (on shutdown) kills its child: see
    // `Child`'s Drop.
    let (mut instance, info) = tokio::select! {
        r = launch(replica, manifest, instance_id, restored, &note) => r?,
        _ = replica.shared.cancel.cancelled() => return Ok(Outcome::Decided(Next::Exit)),
    };
    let mut ready_since = publish(replica, &instance, &info);
    loop {
        let end = watch_ready(replica, manifest, &mut instance, commands).await;
        return match end {
            // What the crashed child left in its process group goes with it
            // when `instance` is dropped (see `Child`'s Drop).
            RunEnd::Exited(status) => Ok(Outcome::Gone {
                reason: ExitReason::of_exit(status, instance.oom_killed(status)),
                ready_since: Some(ready_since),
            }),
            RunEnd::HealthFailed(why) => {
                replica.route(Route::Pending);
                instance::kill_and_reap(&instance.child).await;
                Ok(Outcome::Gone {
                    reason: ExitReason::HealthCheck(why),
                    ready_since: Some(ready_since),
                })
            }
            RunEnd::Cancelled => {
                stop_instance(
                    replica,
                    manifest,
                    &mut instance,
                    "the supervisor is shutting down",
                    false,
                    true,
                )
                .await;
                Ok(Outcome::Decided(Next::Exit))
            }
            RunEnd::Stop(reply) => {
                stop_instance(
                    replica,
                    manifest,
                    &mut instance,
                    "stopped by request",
                    false,
                    true,
                )
                .await;
                let _ = reply.send(());
                Ok(Outcome::Decided(Next::Idle))
            }
            RunEnd::Remove(reply) => {
                stop_instance(
                    replica,
                    manifest,
                    &mut instance,
                    "removed from the supervisor",
                    false,
                    true,
                )
                .await;
                let _ = reply.send(());
                Ok(Outcome::Decided(Next::Exit))
            }
            RunEnd::Restart(reply) => {
                stop_instance(
                    replica,
                    manifest,
                    &mut instance,
                    "restart requested",
                    true,
                    true,
                )
                .await;
                let _ = reply.send(());
                Ok(Outcome::Decided(Next::Start))
            }
            RunEnd::Upgrade(new, reply) => {
                *starts += 1;
                let new_id = format!("{}-{}-{}", replica.slot.name, replica.index, starts);
                match upgrade(replica, manifest, instance, &new, &new_id).await {
                    Ok((upgraded, since)) => {
                        instance = upgraded;
                        *manifest = new;
                        lock(&replica.slot.status).manifest = manifest.clone();
                        ready_since = since;
                        let _ = reply.send(Ok(()));
                    }
                    Err((old, why)) => {
                        instance = old;
                        let _ = reply.send(Err(why));
                    }
                }
                continue;
            }
        };
    }
}

/// Replaces `old` with an instance of `new`, handing over the freshly
/// exported state. Returns the instance to go on with: the new one, or the
/// old one and why the new one was rolled back.
async fn upgrade(
    replica: &Replica<'_>,
    current: &Manifest,
    mut old: Instance,
    new: &Arc<Manifest>,
    new_id: &str,
) -> Result<(Instance, Instant), (Instance, String)> {
    let started = Instant::now();
    let old_route = replica.slot.routes.ready(replica.index);
    // New calls wait (or go to other replicas) while the state moves over;
    // calls in flight on the old instance finish first.
    replica.route(Route::Pending);
    let (old_id, old_pid) = (old.id.clone(), old.child.pid());
    let restore_old = |why: String| {
        replica.update(|r| {
            r.instance = old_id.clone();
            r.pid = Some(old_pid);
        });
        if let Some(route) = &old_route {
            replica.route(Route::Ready(route.clone()));
        }
        replica.transition(
            PluginState::Ready,
            &old.id,
            format!(
                "upgrade to {} rolled back: {why}; still serving {}",
                new.version, current.version
            ),
        );
        why
    };
    if let Some(route) = &old_route
        && !route.drained(current.timeouts.call.0).await
    {
        let why = restore_old("calls on the old instance did not finish in time".into());
        return Err((old, why));
    }
    let state = match export(replica.slot, &old.client).await {
        Ok(state) => state,
        Err(why) => {
            let why = restore_old(format!("cannot export the old instance's state: {why}"));
            return Err((old, why));
        }
    };
    if let Some(store) = replica.slot.snapshots[replica.index].clone() {
        let (bytes, version) = (state.state.to_vec(), state.state_version);
        let _ = tokio::task::spawn_blocking(move || store.write(&bytes, version)).await;
    }
    let note = format!(
        "; upgrading from {} with {} bytes of state (version {})",
        current.version,
        state.state.len(),
        state.state_version
    );
    let restored = Some(RestoredState {
        state: state.state,
        state_version: state.state_version,
    });
    let (fresh, info) = match launch(replica, new, new_id, restored, &note).await {
        Ok(launched) => launched,
        Err(e) => {
            let why = restore_old(format!("the new instance did not start: {e}"));
            return Err((old, why));
        }
    };
    if let Err(why) =
        probe(&fresh.client, new.health.timeout.0)
            .await
            .and_then(|(h, msg)| match h {
                Health::Serving | Health::Degraded => Ok(()),
                other => Err(format!(
                    "health check answered {}: {msg}",
                    other.as_str_name()
                )),
            })
    {
        instance::kill_and_reap(&fresh.child).await;
        let why = restore_old(format!("the new instance is not healthy: {why}"));
        return Err((old, why));
    }
    let ready_since = publish(replica, &fresh, &info);
    let switched = started.elapsed();
    // Probation: the old instance stays up, taking no calls, in case the new
    // one fails soon after the switch.
    if let Err(why) = probation(new, &fresh).await {
        instance::kill_and_reap(&fresh.child).await;
        let why = restore_old(format!(
            "the new instance failed its probation: {why} (calls it took meanwhile are not carried back)"
        ));
        return Err((old, why));
    }
    stop_instance(
        replica,
        current,
        &mut old,
        "replaced by an upgrade",
        true,
        false,
    )
    .await;
    replica.transition(
        PluginState::Ready,
        &fresh.id,
        format!(
            "upgraded from {} to {}: calls switched after {}ms",
            current.version,
            new.version,
            switched.as_millis()
        ),
    );
    Ok((fresh, ready_since))
}

/// Watches a just-switched instance for `upgrade.probation`: an exit or a
/// failed health probe fails it. Operator commands wait until it is over.
async fn probation(manifest: &Manifest, instance: &Instance) -> Result<(), String> {
    let window = manifest.upgrade.probation.0;
    if window.is_zero() {
        return Ok(());
    }
    let every = (window / 4).max(Duration::from_millis(10));
    let end = tokio::time::sleep(window);
    let exited = wait_exit(instance.child.exit_watch());
    tokio::pin!(end, exited);
    loop {
        tokio::select! {
            _ = &mut end => return Ok(()),
            status = &mut exited => return Err(format!("it {status}")),
            _ = tokio::time::sleep(every) => {
                match probe(&instance.client, manifest.health.timeout.0).await {
                    Ok((Health::Serving | Health::Degraded, _)) => {}
                    Ok((status, message)) => return Err(format!("health check answered {}: {message}", status.as_str_name())),
                    Err(why) => return Err(format!("health check failed: {why}")),
                }
            }
        }
    }
}

/// Graceful stop of an instance, with its events. While a restart stops the
/// old instance, calls wait for the new one instead of failing. A stop takes
/// a last snapshot unless `snapshot` is false (an upgraded-away instance's
/// state is already older than its successor's).
async fn stop_instance(
    replica: &Replica<'_>,
    manifest: &Manifest,
    instance: &mut Instance,
    why: &str,
    restarting: bool,
    snapshot_first: bool,
) {
    if restarting {
        if replica
            .slot
            .routes
            .ready(replica.index)
            .is_some_and(|r| r.id == instance.id)
        {
            replica.route(Route::Pending);
        }
    } else {
        replica.route(Route::Down {
            state: PluginState::Stopping,
            reason: why.to_string(),
        });
    }
    replica.transition(PluginState::Stopping, &instance.id, why.to_string());
    if snapshot_first
        && instance.child.try_status().is_none()
        && let Err(e) = snapshot(replica.slot, replica.index, &instance.client, &instance.id).await
    {
        tracing::warn!(plugin = %replica.slot.name, instance = %instance.id, "no snapshot at stop: {e}");
    }
    let status = instance::stop(instance, manifest.timeouts.stop.0).await;
    let current = lock(&replica.slot.status).replicas[replica.index].instance == instance.id;
    if current {
        replica.update(|r| {
            r.last_exit = Some(status.to_string());
            r.pid = None;
            r.ready_since = None;
        });
    }
    let reason = format!("{why}; the plugin {status}");
    if restarting {
        replica.transition(PluginState::Stopped, &instance.id, reason);
    } else {
        replica.down(&instance.id, PluginState::Stopped, reason);
    }
}

/// Watches a ready instance: its exit, health probes, snapshots, commands.
async fn watch_ready(
    replica: &Replica<'_>,
    manifest: &Manifest,
    instance: &mut Instance,
    commands: &mut mpsc::UnboundedReceiver<Command>,
) -> RunEnd {
    let interval = manifest.health.interval.0;
    let mut probes = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    probes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0u32;
    let mut degraded = false;
    // Periodic snapshots; a zero interval (or no store) never ticks.
    let every = manifest.state.snapshot_interval.0;
    let periodic = replica.slot.snapshots[replica.index].is_some() && !every.is_zero();
    let tick = every.max(Duration::from_millis(1));
    let mut snapshots = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    snapshots.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let exited = wait_exit(instance.child.exit_watch());
    tokio::pin!(exited);
    loop {
        tokio::select! {
            status = &mut exited => return RunEnd::Exited(status),
            _ = replica.shared.cancel.cancelled() => return RunEnd::Cancelled,
            cmd = commands.recv() => match cmd {
                // Already running.
                Some(Command::Start(reply)) => { let _ = reply.send(()); }
                Some(Command::Stop(reply)) => return RunEnd::Stop(reply),
                Some(Command::Restart(reply)) => return RunEnd::Restart(reply),
                Some(Command::Upgrade(new, reply)) => return RunEnd::Upgrade(new, reply),
                Some(Command::Remove(reply)) => return RunEnd::Remove(reply),
                None => return RunEnd::Cancelled,
            },
            _ = snapshots.tick(), if periodic => {
                if let Err(e) = snapshot(replica.slot, replica.index, &instance.client, &instance.id).await {
                    tracing::warn!(plugin = %replica.slot.name, instance = %instance.id, "periodic snapshot failed: {e}");
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
                    replica.shared.metrics.health_failed(&replica.slot.name);
                    let threshold = manifest.health.failure_threshold;
                    tracing::warn!(plugin = %replica.slot.name, instance = %instance.id, "health check failed ({failures}/{threshold}): {why}");
                    if failures >= threshold {
                        return RunEnd::HealthFailed(format!("{failures} consecutive failed health checks; last: {why}"));
                    }
                }
            }
        }
    }
}

/// One HealthCheck with a deadline.
pub(crate) async fn probe(client: &Client, timeout: Duration) -> Result<(Health, String), String> {
    let mut client = client.clone();
    let mut request = tonic::Request::new(HealthCheckRequest {});
    request.set_timeout(timeout);
    match tokio::time::timeout(timeout, client.health_check(request)).await {
        Ok(Ok(response)) => {
            let r = response.into_inner();
            Ok((r.status(), r.message))
        }
        Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
        Err(_) => Err(format!("no answer within {}ms", timeout.as_millis())),
    }
}

/// ExportState with the plugin's call timeout.
async fn export(
    slot: &Slot,
    client: &Client,
) -> Result<plugvisor_proto::ExportStateResponse, String> {
    let timeout = slot.manifest().timeouts.call.0;
    let mut client = client.clone();
    let mut request = tonic::Request::new(ExportStateRequest {});
    request.set_timeout(timeout);
    Ok(tokio::time::timeout(timeout, client.export_state(request))
        .await
        .map_err(|_| {
            format!(
                "ExportState did not answer within {}ms",
                timeout.as_millis()
            )
        })?
        .map_err(|s| format!("ExportState failed: {:?}: {}", s.code(), s.message()))?
        .into_inner())
}

/// Exports the instance's state and writes it as the replica's newest
/// snapshot. Returns the snapshot's sequence number (`None` without a store).
pub(crate) async fn snapshot(
    slot: &Slot,
    replica: usize,
    client: &Client,
    instance: &str,
) -> Result<Option<u64>, String> {
    let Some(store) = slot.snapshots.get(replica).cloned().flatten() else {
        return Ok(None);
    };
    let _order = slot.snapshot_lock.lock().await;
    let state = export(slot, client).await?;
    let seq = tokio::task::spawn_blocking(move || store.write(&state.state, state.state_version))
        .await
        .map_err(|e| format!("the snapshot writer failed: {e}"))?
        .map_err(|e| e.to_string())?;
    tracing::debug!(plugin = %slot.name, instance, seq, "state snapshot written");
    Ok(Some(seq))
}

/// The newest good snapshot as Initialize's restored state, and a note for
/// the event trail (which snapshot, and any newer ones found corrupt).
/// A snapshot that cannot be read stops the start rather than losing it.
async fn restored_state(
    replica: &Replica<'_>,
) -> Result<(Option<RestoredState>, String), StartError> {
    let Some(store) = replica.slot.snapshots[replica.index].clone() else {
        return Ok((None, String::new()));
    };
    let loaded = tokio::task::spawn_blocking(move || store.load())
        .await
        .map_err(|e| StartError::StateUnreadable(format!("the snapshot reader failed: {e}")))?
        .map_err(|e| StartError::StateUnreadable(e.to_string()))?;
    let mut note = match &loaded.snapshot {
        Some(s) => format!(
            "; restoring snapshot #{} ({} bytes, state version {})",
            s.seq,
            s.state.len(),
            s.state_version
        ),
        None => String::new(),
    };
    if !loaded.skipped.is_empty() {
        tracing::warn!(plugin = %replica.slot.name, "skipped corrupt snapshots: {}", loaded.skipped.join("; "));
        note.push_str(&format!(
            "; skipped corrupt snapshot(s): {}",
            loaded.skipped.join("; ")
        ));
    }
    let restored = loaded.snapshot.map(|s| RestoredState {
        state: s.state.into(),
        state_version: s.state_version,
    });
    Ok((restored, note))
}
