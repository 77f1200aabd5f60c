//! The actor's path for a remote plugin: its instance is a TLS connection.
//! Start = connect + Initialize; the instance ends when a connection ends
//! or health checks fail; a restart is a reconnect, decided by the same
//! restart policy as a local child's (`Actor::after_exit`). A registered
//! plugin also follows its lease: missed heartbeats make it unavailable
//! (not routed to) until a heartbeat comes back.

use super::{Actor, Command, Next, Outcome};
use crate::instance::probe;
use crate::registry::Liveness;
use crate::remote::{self, ConnectionLost, RemoteInstance};
use crate::replica::Replica;
use crate::routing::{ReadyInstance, Route};
use crate::status::{EventDetail, ExitReason, Health, PluginState};
use crate::upgrade;
use std::time::{Duration, Instant};

enum RemoteEnd {
    Lost(ConnectionLost),
    Command(Command),
    Cancelled,
}

impl Actor {
    /// Connects to the remote plugin, initializes it and serves calls
    /// through it until the connection ends or an order ends it.
    pub(super) async fn connect_and_run(
        &mut self,
        instance_id: &str,
    ) -> Result<Outcome, ExitReason> {
        let Some(spec) = self.spec.manifest.remote.clone() else {
            return Err(ExitReason::Start(crate::instance::StartError::Refused(
                "not a remote plugin".into(),
            )));
        };
        let (restored, note) =
            self.replica.restored_state().await.map_err(|why| {
                ExitReason::Start(crate::instance::StartError::StateUnreadable(why))
            })?;
        let joined = spec
            .registration
            .as_ref()
            .map(|r| format!(" (registered by {})", r.peer))
            .unwrap_or_default();
        self.replica.event(
            PluginState::Starting,
            instance_id,
            format!(
                "connecting to {} with mutual TLS, expecting identity `{}`{joined}",
                spec.address, spec.identity
            ),
            EventDetail {
                version: Some(self.spec.manifest.version.to_string()),
                ..EventDetail::default()
            },
        );
        let manifest = self.spec.manifest.clone();
        let started = async {
            let mut instance =
                remote::connect(&spec, instance_id, manifest.timeouts.start.0).await?;
            self.replica.update(|r| {
                r.instance = instance_id.to_string();
                r.pid = None;
            });
            self.replica.event(
                PluginState::Initializing,
                instance_id,
                format!(
                    "connected in {}ms; calling Initialize{note}",
                    instance.connected_at.elapsed().as_millis()
                ),
                EventDetail::default(),
            );
            let info =
                remote::initialize(&mut instance, &manifest, &self.spec.config, restored).await?;
            Ok::<_, ConnectionLost>((instance, info))
        };
        let launched = tokio::select! {
            r = started => r,
            _ = self.replica.host.cancel.cancelled() => return Ok(Outcome::Decided(Next::Exit)),
        };
        // A replica taken over from a previous supervisor image counted as
        // up (for its dependents) while it connected again: no longer.
        if launched.is_err() {
            self.replica.update(|r| r.upgrading = false);
        }
        let (mut instance, info) = launched.map_err(ExitReason::Remote)?;
        if info.sessions {
            let timeout = instance.connected_at.elapsed().max(Duration::from_secs(1));
            if let Ok(sessions) = crate::session::Sessions::open(
                &instance.client,
                crate::transport::PLUGIN_CONNECTIONS,
                timeout,
                &self.replica.host.io_tasks,
            )
            .await
            {
                instance.sessions = Some(std::sync::Arc::new(sessions));
            }
        }
        let ready_since = publish(&self.replica, &instance, &info, &spec.address);
        self.replica.update(|r| r.upgrading = false);
        loop {
            let manifest = self.spec.manifest.clone();
            let end = watch(&self.replica, &manifest, &mut instance, &mut self.commands).await;
            let (why, next, reply) = match end {
                RemoteEnd::Lost(lost) => {
                    self.replica.route(Route::Pending);
                    return Ok(Outcome::Gone {
                        reason: ExitReason::Remote(lost),
                        ready_since: Some(ready_since),
                        ended: Instant::now(),
                    });
                }
                RemoteEnd::Cancelled => ("the supervisor is shutting down", Next::Exit, None),
                RemoteEnd::Command(Command::Start(reply)) => {
                    let _ = reply.send(());
                    continue;
                }
                RemoteEnd::Command(Command::Stop(reply)) => {
                    ("stopped by request", Next::Idle, Some(reply))
                }
                RemoteEnd::Command(Command::Remove(reply)) => {
                    ("removed from the supervisor", Next::Exit, Some(reply))
                }
                RemoteEnd::Command(Command::Restart(reply)) => {
                    ("reconnect requested", Next::Start, Some(reply))
                }
                RemoteEnd::Command(Command::Retire { reply, .. }) => {
                    // Nothing to drain here beyond the connection: calls in
                    // flight finish as it closes.
                    ("removed by autoscaling", Next::Exit, Some(reply))
                }
                RemoteEnd::Command(Command::Upgrade(order)) => {
                    // Nothing runs here to switch: a committed upgrade (a new
                    // manifest or config) reconnects with the new spec.
                    match upgrade::nothing_running(order, &self.replica.host.cancel).await {
                        Some(new) => {
                            self.adopt(new);
                            (
                                "reconnecting with the new manifest or config",
                                Next::Start,
                                None,
                            )
                        }
                        None => continue,
                    }
                }
            };
            let restarting = matches!(next, Next::Start);
            disconnect(&self.replica, &manifest, instance, why, restarting).await;
            if restarting && reply.is_some() {
                self.replica.transition(
                    PluginState::Starting,
                    "",
                    "reconnecting by request".into(),
                );
            }
            if let Some(reply) = reply {
                let _ = reply.send(());
            }
            return Ok(Outcome::Decided(next));
        }
    }
}

fn ready_route(replica: &Replica, instance: &RemoteInstance) -> Route {
    Route::Ready(ReadyInstance::new(
        instance.id.clone(),
        replica.index,
        instance.client.clone(),
        instance.sessions.clone(),
        replica.snapshots.clone(),
    ))
}

/// Publishes a connected, initialized remote instance as ready.
fn publish(
    replica: &Replica,
    instance: &RemoteInstance,
    info: &plugvisor_proto::InitializeResponse,
    address: &str,
) -> Instant {
    let ready_since = Instant::now();
    replica
        .host
        .metrics
        .started(replica.name(), instance.connected_at.elapsed());
    {
        let mut b = replica.plugin.board.lock();
        b.methods = info.methods.clone();
        b.reported_version = (!info.version.is_empty()).then(|| info.version.clone());
        let r = &mut b.replicas[replica.index];
        r.ready_since = Some(ready_since);
        r.instance = instance.id.clone();
        r.pid = None;
    }
    replica.route(ready_route(replica, instance));
    replica.event(
        PluginState::Ready,
        &instance.id,
        format!(
            "ready in {}ms (remote at {address}, {} {})",
            instance.connected_at.elapsed().as_millis(),
            if info.name.is_empty() {
                replica.name()
            } else {
                &info.name
            },
            info.version
        ),
        EventDetail {
            version: Some(info.version.clone()),
            ..EventDetail::default()
        },
    );
    ready_since
}

/// Watches a ready remote instance: its connections, health probes,
/// snapshots, its lease when registered, and orders.
async fn watch(
    replica: &Replica,
    manifest: &crate::manifest::Manifest,
    instance: &mut RemoteInstance,
    commands: &mut tokio::sync::mpsc::Receiver<Command>,
) -> RemoteEnd {
    let address = manifest
        .remote
        .as_ref()
        .map(|r| r.address.clone())
        .unwrap_or_default();
    let mut lease = manifest
        .remote
        .as_ref()
        .and_then(|r| r.registration.as_ref())
        .map(|r| r.lease.clone());
    let interval = manifest.health.interval.0;
    let mut probes = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    probes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let every = manifest.state.snapshot_interval.0;
    let periodic = replica.snapshots.is_some() && !every.is_zero();
    let tick = every.max(Duration::from_millis(1));
    let mut snapshots = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    snapshots.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0u32;
    let mut degraded = false;
    let mut unavailable = false;
    loop {
        tokio::select! {
            closed = instance.closed.recv() => {
                let why = closed.map(|c| c.why).unwrap_or_else(|| "closed".into());
                return RemoteEnd::Lost(ConnectionLost::Disconnected { address, why });
            }
            _ = replica.host.cancel.cancelled() => return RemoteEnd::Cancelled,
            cmd = commands.recv() => return match cmd {
                Some(cmd) => RemoteEnd::Command(cmd),
                None => RemoteEnd::Cancelled,
            },
            changed = async { lease.as_mut()?.changed().await.ok() }, if lease.is_some() => {
                let Some(watch) = lease.as_mut() else { continue };
                if changed.is_none() {
                    // The registry is gone (shutting down); its removal follows.
                    lease = None;
                    continue;
                }
                let now = watch.borrow_and_update().clone();
                match now.liveness {
                    Liveness::Missed { silent_for } if !unavailable => {
                        unavailable = true;
                        let reason = format!(
                            "missed heartbeats: none for {}ms; not routed to until one arrives",
                            silent_for.as_millis()
                        );
                        replica.route(Route::Down { state: PluginState::Unavailable, reason: reason.clone() });
                        replica.transition(PluginState::Unavailable, &instance.id, reason);
                    }
                    Liveness::Alive if unavailable => {
                        unavailable = false;
                        replica.route(ready_route(replica, instance));
                        replica.transition(PluginState::Ready, &instance.id, "heartbeats resumed; routed to again".into());
                    }
                    _ => {}
                }
            }
            _ = snapshots.tick(), if periodic => {
                if let Some(store) = &replica.snapshots
                    && let Err(e) = store.take(&instance.client, manifest.timeouts.call.0).await
                {
                    replica.snapshot_failed(&instance.id, "(periodic)", &e);
                }
            }
            _ = probes.tick() => {
                let failure = match probe(&instance.client, manifest.health.timeout.0).await {
                    Ok((Health::Serving, _)) => {
                        failures = 0;
                        if degraded && !unavailable {
                            degraded = false;
                            replica.transition(PluginState::Ready, &instance.id, "health check: serving again".into());
                        }
                        None
                    }
                    Ok((Health::Degraded, message)) => {
                        failures = 0;
                        if !degraded && !unavailable {
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
                        return RemoteEnd::Lost(ConnectionLost::Health(format!("{failures} consecutive failed health checks; last: {why}")));
                    }
                }
            }
        }
    }
}

/// Disconnects from a remote instance on request: calls stop being routed
/// to it, a last snapshot is taken, and the connections close once the
/// calls still using them finish. The remote process is not asked to exit:
/// its life is not the supervisor's to end.
async fn disconnect(
    replica: &Replica,
    manifest: &crate::manifest::Manifest,
    instance: RemoteInstance,
    why: &str,
    restarting: bool,
) {
    if restarting {
        replica.route(Route::Pending);
    } else {
        replica.route(Route::Down {
            state: PluginState::Stopping,
            reason: why.to_string(),
        });
    }
    replica.transition(PluginState::Stopping, &instance.id, why.to_string());
    if let Some(snapshots) = &replica.snapshots
        && let Err(e) = snapshots
            .take(&instance.client, manifest.timeouts.call.0)
            .await
    {
        replica.snapshot_failed(&instance.id, "at disconnect", &e);
    }
    replica.update(|r| {
        r.pid = None;
        r.ready_since = None;
        r.last_exit = Some(format!("disconnected: {why}"));
    });
    let reason = format!("{why}; disconnected");
    if restarting {
        replica.transition(PluginState::Stopped, &instance.id, reason);
    } else {
        replica.down(
            &instance.id,
            PluginState::Stopped,
            reason,
            EventDetail::default(),
        );
    }
    drop(instance);
}
