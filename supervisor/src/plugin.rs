//! One plugin's coordinator: the single owner of what the plugin should run
//! (manifest, supervisor-config overrides, runtime config) and the only
//! sender of orders to its replicas' actors.
//!
//! Operator operations ([`Op`]) reach it over a bounded channel and run one
//! at a time, in its own task: a caller that goes away after sending one
//! (a closed control connection, a `timeout()` around the call) changes
//! nothing, since the operation finishes or rolls back without it. A change
//! of config or version is committed to the coordinator's state only once
//! every replica runs it, so a rejected config can never be picked up by a
//! later crash-restart.

mod scale;

use crate::actor::{Command, run_replica, run_replica_resumed};
use crate::config::PluginOverride;
use crate::error::Error;
use crate::host::Host;
use crate::instance::Snapshots;
use crate::logs::LogBuffer;
use crate::manifest::Manifest;
use crate::replica::{Common, Replica, Spec};
use crate::routing::{Admission, Routes};
use crate::state::SnapshotStore;
use crate::status::Board;
use crate::upgrade::{Order, Verdict};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use tokio::sync::{mpsc, oneshot};

/// Orders waiting for a replica's actor; the coordinator sends one at a
/// time and waits for its answer, so this rarely holds more than one.
const REPLICA_QUEUE: usize = 4;
/// Operations waiting for a plugin's coordinator; beyond this, callers wait
/// (and may give up) before their operation is accepted.
const OP_QUEUE: usize = 16;

type Reply<T = ()> = oneshot::Sender<Result<T, Error>>;

/// What an operator asks of a plugin.
pub(crate) enum Op {
    Start(Reply),
    Stop(Reply),
    Restart(Reply),
    /// Run `manifest` (with new overrides, if given) on every replica, or on
    /// none.
    Upgrade {
        manifest: Arc<Manifest>,
        overrides: Option<PluginOverride>,
        reply: Reply,
    },
    /// Merge into the runtime config (a `null` removes a key) and roll it
    /// out like an upgrade.
    SetConfig {
        changes: serde_json::Map<String, serde_json::Value>,
        reply: Reply,
    },
    /// Stop every replica (with a last snapshot) and stop supervising.
    Remove(Reply),
    /// What a hand-over to a new supervisor image carries of the
    /// coordinator: the overrides and the runtime config.
    Handover(Reply<(PluginOverride, serde_json::Map<String, serde_json::Value>)>),
    /// Autoscaling: run `to` replicas (kept within the manifest's
    /// `replicas.min`/`max`), adding or draining replicas; `reason` goes
    /// into the events.
    Scale {
        to: usize,
        reason: String,
        reply: Reply,
    },
}

/// The supervised plugins, by name.
pub(crate) type Registry = RwLock<BTreeMap<String, Arc<PluginHandle>>>;

/// What the facade holds of a plugin: what it shares with the actors (to
/// route calls and read status) and the way to its coordinator.
pub(crate) struct PluginHandle {
    pub common: Arc<Common>,
    ops: mpsc::Sender<Op>,
}

impl PluginHandle {
    /// Sends an operation and waits for its answer. Dropping this future
    /// before the operation was accepted cancels nothing that started;
    /// dropping it after leaves the operation to finish on its own.
    pub async fn run<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, Error> {
        let (reply, answer) = oneshot::channel();
        self.ops
            .send(op(reply))
            .await
            .map_err(|_| Error::ShuttingDown)?;
        answer.await.map_err(|_| Error::ShuttingDown)?
    }
}

/// Starts a plugin: its coordinator and one actor per replica, tracked by
/// the host.
pub(crate) fn spawn(
    host: &Arc<Host>,
    registry: &Arc<Registry>,
    manifest: Manifest,
    overrides: PluginOverride,
) -> Arc<PluginHandle> {
    spawn_resumed(host, registry, manifest, overrides, None)
}

/// [`spawn`], for a plugin taken over from a previous supervisor image with
/// its runtime config, history, output and replicas (see
/// [`crate::handover`]).
pub(crate) fn spawn_resumed(
    host: &Arc<Host>,
    registry: &Arc<Registry>,
    manifest: Manifest,
    overrides: PluginOverride,
    mut restore: Option<crate::handover::Restore>,
) -> Arc<PluginHandle> {
    let name = manifest.name.clone();
    let mut replicas = manifest.replicas as usize;
    if let (Some(policy), Some(restore)) = (&manifest.autoscale, &restore) {
        // As many as ran: replicas added by scaling keep running.
        replicas = restore
            .replicas()
            .clamp(policy.min as usize, policy.max as usize);
    }
    let manifest = Arc::new(manifest);
    let runtime = restore
        .as_mut()
        .map(|r| std::mem::take(&mut r.runtime))
        .unwrap_or_default();
    let spec = Arc::new(Spec::new(manifest.clone(), &overrides, &runtime));
    let (in_flight, queued) = host.metrics.call_gauges(&name);
    let common = Arc::new(Common {
        name: name.clone(),
        routes: Routes::new(&name, replicas),
        admission: Admission::new(
            &name,
            manifest.calls.max_in_flight,
            manifest.calls.max_queue,
            queued,
        ),
        rate_limits: crate::ratelimit::RateLimitSlot::new(crate::ratelimit::RateLimits::new(
            &name,
            &manifest.calls,
            &host.metrics,
        )),
        in_flight,
        call_series: host.metrics.call_series(&name),
        board: Board::new(spec.clone(), replicas, host.opts.history),
        logs: Arc::new(LogBuffer::new(host.opts.log_lines)),
    });
    host.capabilities.set(
        &name,
        crate::capability::Locality::of(&manifest),
        &manifest.capabilities,
    );
    let mut resumed = match restore {
        Some(restore) => crate::handover::restore_board(&common, restore)
            .into_iter()
            .map(Some)
            .collect(),
        None => Vec::new(),
    };
    resumed.resize_with(replicas, || None);
    let mut orders = Vec::with_capacity(replicas);
    let mut tasks = Vec::with_capacity(replicas);
    for (index, resumed) in resumed.into_iter().enumerate() {
        let (tx, task) = start_replica_resumed(host, &common, &spec, index, None, resumed);
        orders.push(tx);
        tasks.push(task);
    }
    let (ops, rx) = mpsc::channel(OP_QUEUE);
    let handle = Arc::new(PluginHandle { common, ops });
    let mut coordinator = Coordinator {
        host: host.clone(),
        registry: registry.clone(),
        handle: Arc::downgrade(&handle),
        common: handle.common.clone(),
        manifest,
        overrides,
        runtime,
        replicas: orders,
        replica_tasks: tasks,
        ops: handle.ops.downgrade(),
        policy: None,
    };
    coordinator.keep_policy();
    host.tasks.spawn(coordinator.run(rx));
    handle
}

/// Starts replica `index`'s actor on `spec`; `added` is the event that
/// says why it was added (by autoscaling), recorded before it starts.
fn start_replica(
    host: &Arc<Host>,
    common: &Arc<Common>,
    spec: &Arc<Spec>,
    index: usize,
    added: Option<(String, crate::status::EventDetail)>,
) -> (mpsc::Sender<Command>, tokio::task::JoinHandle<()>) {
    start_replica_resumed(host, common, spec, index, added, None)
}

/// [`start_replica`], for a replica taken over from a previous supervisor
/// image when `resumed` is set (see [`crate::handover`]).
fn start_replica_resumed(
    host: &Arc<Host>,
    common: &Arc<Common>,
    spec: &Arc<Spec>,
    index: usize,
    added: Option<(String, crate::status::EventDetail)>,
    resumed: Option<crate::actor::Resumed>,
) -> (mpsc::Sender<Command>, tokio::task::JoinHandle<()>) {
    let name = &common.name;
    let (tx, rx) = mpsc::channel(REPLICA_QUEUE);
    let snapshots = host.opts.state_dir.as_deref().map(|dir| {
        // Replica 0 keeps the plain name, so going from one replica to
        // several keeps the existing snapshots.
        let key = if index == 0 {
            name.clone()
        } else {
            format!("{name}@{index}")
        };
        Arc::new(Snapshots::new(SnapshotStore::new(dir, &key)))
    });
    let replica = Replica {
        host: host.clone(),
        plugin: common.clone(),
        index,
        snapshots,
    };
    if let Some((reason, detail)) = added {
        replica.event(crate::status::PluginState::Starting, "", reason, detail);
    }
    let task = match resumed {
        Some(resumed) => host
            .tasks
            .spawn(run_replica_resumed(replica, spec.clone(), rx, resumed)),
        None => host.tasks.spawn(run_replica(replica, spec.clone(), rx)),
    };
    (tx, task)
}

/// The owner of a plugin's desired state.
struct Coordinator {
    host: Arc<Host>,
    registry: Arc<Registry>,
    /// Its own entry in the registry, to remove on `Remove` (and only it).
    handle: std::sync::Weak<PluginHandle>,
    common: Arc<Common>,
    manifest: Arc<Manifest>,
    overrides: PluginOverride,
    runtime: serde_json::Map<String, serde_json::Value>,
    replicas: Vec<mpsc::Sender<Command>>,
    /// Each replica's actor task, awaited when scaling down removes it.
    replica_tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Its own operations channel, for the autoscaling policy task (weak:
    /// the coordinator must not keep its own channel open).
    ops: mpsc::WeakSender<Op>,
    /// Stops the autoscaling policy task when dropped or replaced.
    policy: Option<tokio_util::sync::DropGuard>,
}

impl Coordinator {
    async fn run(mut self, mut ops: mpsc::Receiver<Op>) {
        loop {
            let op = tokio::select! {
                _ = self.host.cancel.cancelled() => return,
                op = ops.recv() => match op {
                    Some(op) => op,
                    None => return,
                },
            };
            match op {
                Op::Start(reply) => {
                    let _ = reply.send(self.each(Command::Start).await);
                }
                Op::Stop(reply) => {
                    let _ = reply.send(self.each(Command::Stop).await);
                }
                Op::Restart(reply) => {
                    let _ = reply.send(self.each(Command::Restart).await);
                }
                Op::Upgrade {
                    manifest,
                    overrides,
                    reply,
                } => {
                    let overrides = overrides.unwrap_or_else(|| self.overrides.clone());
                    let runtime = self.runtime.clone();
                    // A config change on the same version is validated by
                    // the running replicas first, as `plugvisor config` is.
                    let current = Spec::new(self.manifest.clone(), &self.overrides, &runtime);
                    let new = Spec::new(manifest.clone(), &overrides, &runtime);
                    let asked = if crate::validate::changed_config(&current, &new) {
                        crate::validate::ask_replicas(
                            &self.common,
                            self.replicas.len(),
                            &new.config,
                            self.manifest.timeouts.call.0,
                        )
                        .await
                    } else {
                        Ok(())
                    };
                    let result = match asked {
                        Ok(()) => self.roll_out(manifest, overrides, runtime).await,
                        Err(refused) => Err(refused),
                    };
                    let _ = reply.send(result);
                }
                Op::SetConfig { changes, reply } => {
                    let mut runtime = self.runtime.clone();
                    for (key, value) in changes {
                        if value.is_null() {
                            runtime.remove(&key);
                        } else {
                            runtime.insert(key, value);
                        }
                    }
                    let config = Spec::new(self.manifest.clone(), &self.overrides, &runtime).config;
                    let asked = crate::validate::ask_replicas(
                        &self.common,
                        self.replicas.len(),
                        &config,
                        self.manifest.timeouts.call.0,
                    )
                    .await;
                    let result = match asked {
                        Ok(()) => {
                            self.roll_out(self.manifest.clone(), self.overrides.clone(), runtime)
                                .await
                        }
                        Err(refused) => Err(refused),
                    };
                    let _ = reply.send(result);
                }
                Op::Handover(reply) => {
                    let _ = reply.send(Ok((self.overrides.clone(), self.runtime.clone())));
                }
                Op::Scale { to, reason, reply } => {
                    let _ = reply.send(self.scale(to, reason).await);
                }
                Op::Remove(reply) => {
                    self.policy = None;
                    let result = self.each(Command::Remove).await;
                    let mut registry = self.registry.write().unwrap_or_else(|e| e.into_inner());
                    if let Some(current) = registry.get(&self.common.name)
                        && std::ptr::eq(Arc::as_ptr(current), self.handle.as_ptr())
                    {
                        registry.remove(&self.common.name);
                        self.host.capabilities.remove(&self.common.name);
                    }
                    drop(registry);
                    let _ = reply.send(result);
                    return;
                }
            }
        }
    }

    /// Sends an order to every replica and waits for each to answer, one
    /// replica after the other (so a rolling restart keeps the others up).
    async fn each(&self, make: impl Fn(oneshot::Sender<()>) -> Command) -> Result<(), Error> {
        for replica in &self.replicas {
            let (tx, rx) = oneshot::channel();
            replica
                .send(make(tx))
                .await
                .map_err(|_| Error::ShuttingDown)?;
            rx.await.map_err(|_| Error::ShuttingDown)?;
        }
        Ok(())
    }

    /// Runs a new spec on every replica, or on none: each replica switches
    /// in turn; if one fails, those that switched go back. Only a commit
    /// changes what the coordinator holds.
    async fn roll_out(
        &mut self,
        manifest: Arc<Manifest>,
        overrides: PluginOverride,
        runtime: serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), Error> {
        let name = self.common.name.clone();
        if manifest.name != name {
            return Err(Error::Invalid(format!(
                "the manifest is for `{}`, not `{name}`",
                manifest.name
            )));
        }
        if !manifest.accepts_replicas(self.replicas.len()) {
            return Err(Error::Invalid(format!(
                "an upgrade cannot change replicas ({} to {}); remove and add the plugin (or reload) to change them",
                self.replicas.len(),
                manifest.replicas
            )));
        }
        let spec = Arc::new(Spec::new(manifest.clone(), &overrides, &runtime));
        let from = self.manifest.version.clone();
        let mut switched: Vec<oneshot::Sender<Verdict>> = Vec::new();
        let mut failure: Option<String> = None;
        for (index, replica) in self.replicas.iter().enumerate() {
            let (switched_tx, switched_rx) = oneshot::channel();
            let (verdict_tx, verdict_rx) = oneshot::channel();
            let order = Order {
                spec: spec.clone(),
                switched: switched_tx,
                decision: verdict_rx,
            };
            if replica.send(Command::Upgrade(order)).await.is_err() {
                failure = Some(format!("replica {index} has stopped"));
                break;
            }
            match switched_rx.await {
                Ok(Ok(())) => switched.push(verdict_tx),
                Ok(Err(why)) => {
                    failure = Some(format!("replica {index}: {why}"));
                    break;
                }
                Err(_) => {
                    failure = Some(format!("replica {index} has stopped"));
                    break;
                }
            }
        }
        let commit = failure.is_none();
        let reason = match &failure {
            Some(why) => format!("another replica's upgrade failed ({why})"),
            None => String::new(),
        };
        let mut done = Vec::with_capacity(switched.len());
        for verdict in switched {
            let (tx, rx) = oneshot::channel();
            let _ = verdict.send(Verdict {
                commit,
                reason: reason.clone(),
                done: tx,
            });
            done.push(rx);
        }
        for rx in done {
            let _ = rx.await;
        }
        if self.host.cancel.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        match failure {
            None => {
                // The new manifest's limits and capabilities take effect
                // with it, and only then.
                self.common
                    .rate_limits
                    .replace(crate::ratelimit::RateLimits::new(
                        &name,
                        &manifest.calls,
                        &self.host.metrics,
                    ));
                self.host.capabilities.set(
                    &name,
                    crate::capability::Locality::of(&manifest),
                    &manifest.capabilities,
                );
                self.manifest = manifest;
                self.overrides = overrides;
                self.runtime = runtime;
                self.common.board.lock().spec = spec;
                self.keep_policy();
                Ok(())
            }
            Some(why) => Err(Error::UpgradeFailed {
                plugin: name,
                reason: format!(
                    "{why}; all {} replica(s) run {from} again",
                    self.replicas.len()
                ),
            }),
        }
    }
}
