//! One replica as its actor sees it: what it starts ([`Spec`]), where it
//! publishes (its route, its row of the board, events), and the steps every
//! path through its life shares: launch, publish, graceful stop.

use crate::host::Host;
use crate::instance::{self, Instance, Snapshots, StartContext, StartError};
use crate::logs::LogBuffer;
use crate::manifest::Manifest;
use crate::routing::{Admission, ReadyInstance, Route, Routes};
pub(crate) use crate::spec::Spec;
use crate::status::{Board, Event, EventDetail, ExitReason, PluginState, ReplicaStatus};
use plugvisor_proto::{InitializeResponse, RestoredState};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// What every part of one plugin shares: the facade reads it, the
/// coordinator and the actors publish through it.
pub(crate) struct Common {
    pub name: String,
    pub routes: Routes,
    pub admission: Admission,
    /// `calls.rate` limits, checked before admission.
    pub rate_limits: crate::ratelimit::RateLimitSlot,
    /// The plugin's `plugvisor_calls_in_flight` gauge.
    pub in_flight: prometheus_client::metrics::gauge::Gauge,
    /// The plugin's call series, kept per method.
    pub call_series: crate::metrics::CallSeries,
    pub board: Board,
    pub logs: Arc<LogBuffer>,
}

/// One replica of a plugin: the context its actor runs in. A clone is the
/// same context (shared handles), for a start its actor runs alongside its
/// own work (see [`crate::actor`]'s standby).
#[derive(Clone)]
pub(crate) struct Replica {
    pub host: Arc<Host>,
    pub plugin: Arc<Common>,
    pub index: usize,
    /// The replica's snapshot store, when the supervisor has a state dir.
    pub snapshots: Option<Arc<Snapshots>>,
}

impl Replica {
    pub fn name(&self) -> &str {
        &self.plugin.name
    }

    /// Records a transition: the board, the log, the event stream.
    pub fn event(&self, state: PluginState, instance: &str, reason: String, detail: EventDetail) {
        let event = Event {
            time: SystemTime::now(),
            plugin: self.plugin.name.clone(),
            replica: self.index,
            instance: instance.to_string(),
            state,
            reason,
            detail,
        };
        self.plugin.board.record(&event);
        tracing::info!(plugin = %event.plugin, instance, state = state.as_str(), "{}", event.reason);
        let _ = self.host.events.send(event);
    }

    pub fn transition(&self, state: PluginState, instance: &str, reason: String) {
        self.event(state, instance, reason, EventDetail::default());
    }

    pub fn route(&self, route: Route) {
        self.plugin.routes.set(self.index, route);
    }

    /// Down: calls fail at once with this state and reason.
    pub fn down(&self, instance: &str, state: PluginState, reason: String, detail: EventDetail) {
        self.route(Route::Down {
            state,
            reason: reason.clone(),
        });
        self.event(state, instance, reason, detail);
    }

    /// This replica, running no instance, was retired by a scale-down to
    /// `scaled_to` replicas.
    pub fn retired(&self, reason: String, scaled_to: usize) {
        self.down(
            "",
            PluginState::Stopped,
            reason,
            EventDetail {
                scaled_to: Some(scaled_to),
                ..EventDetail::default()
            },
        );
    }

    /// Updates this replica's row of the board.
    pub fn update(&self, f: impl FnOnce(&mut ReplicaStatus)) {
        // A replica removed by scaling down has no row any more.
        if let Some(row) = self.plugin.board.lock().replicas.get_mut(self.index) {
            f(row);
        }
    }

    /// Runs one lifecycle hook of `manifest` for `instance_id`, if the
    /// manifest has it. `env` is the plugin's environment (see
    /// [`crate::hooks`]).
    pub async fn hook(
        &self,
        manifest: &Manifest,
        env: &[(String, String)],
        name: &'static str,
        instance_id: &str,
        extra: &[(&str, String)],
    ) -> Result<(), crate::hooks::HookError> {
        let Some(hook) = manifest
            .hooks
            .each()
            .find(|(n, _)| *n == name)
            .map(|(_, h)| h)
        else {
            return Ok(());
        };
        let ctx = crate::hooks::HookContext {
            manifest,
            replica: self.index,
            instance_id,
            env,
            processes: &self.host.processes,
            isolation: Some(&self.host.isolation),
            logs: &self.plugin.logs,
        };
        let done = crate::hooks::run(&ctx, name, hook, extra).await?;
        tracing::info!(plugin = %self.plugin.name, instance = instance_id, "{name} hook done in {}ms", done.took.as_millis());
        Ok(())
    }

    /// Runs the post-ready hook of `instance` (initialized, not yet
    /// published) under `spec`.
    pub async fn post_ready(
        &self,
        spec: &Spec,
        instance: &Instance,
    ) -> Result<(), crate::hooks::HookError> {
        if spec.manifest.hooks.post_ready.is_some() {
            self.transition(
                PluginState::Initializing,
                &instance.id,
                "initialized; running its post_ready hook before it takes calls".into(),
            );
        }
        let extra = [("PLUGVISOR_PLUGIN_PID", instance.child.pid().to_string())];
        self.hook(
            &spec.manifest,
            &spec.env,
            "post_ready",
            &instance.id,
            &extra,
        )
        .await
    }

    /// A hook whose failure does not change the instance's course
    /// (pre-stop, post-exit): an event in the current state and a warning.
    pub async fn hook_reported(
        &self,
        manifest: &Manifest,
        env: &[(String, String)],
        name: &'static str,
        instance_id: &str,
        extra: &[(&str, String)],
    ) {
        if let Err(e) = self.hook(manifest, env, name, instance_id, extra).await {
            let state = self.plugin.board.lock().replicas[self.index].state;
            tracing::warn!(plugin = %self.plugin.name, instance = instance_id, "{e}");
            self.transition(state, instance_id, e.to_string());
        }
    }

    /// The environment the committed spec gives the plugin, for hooks run
    /// where only the manifest is at hand.
    pub fn committed_env(&self) -> Vec<(String, String)> {
        self.plugin.board.lock().spec.env.clone()
    }

    /// Spawns and initializes an instance of `spec`, with `restored` state.
    /// On failure the child is already killed and reaped.
    pub async fn launch(
        &self,
        spec: &Spec,
        instance_id: &str,
        restored: Option<RestoredState>,
        note: &str,
    ) -> Result<(Instance, InitializeResponse), StartError> {
        let instance = self.spawn_instance(spec, instance_id, "").await?;
        let reason = format!(
            "handshake done in {}ms; calling Initialize{note}",
            instance.spawned_at.elapsed().as_millis()
        );
        self.initialize_instance(spec, instance, restored, reason)
            .await
    }

    /// The first part of [`Self::launch`]: the `starting` event (its reason
    /// ends with `during`), the pre-start hook, the spawn, the handshake and
    /// the connection. On failure the child is already killed and reaped.
    pub async fn spawn_instance(
        &self,
        spec: &Spec,
        instance_id: &str,
        during: &str,
    ) -> Result<Instance, StartError> {
        let manifest = &spec.manifest;
        self.event(
            PluginState::Starting,
            instance_id,
            match &manifest.container {
                None => format!(
                    "spawning {} {}{during}",
                    manifest.exec.display(),
                    manifest.version
                ),
                Some(c) => {
                    format!(
                        "spawning container {} ({} {}) {}",
                        crate::container::name(&self.host.opts.runtime_dir, instance_id),
                        c.runtime.as_str(),
                        c.image
                            .clone()
                            .or_else(|| c.bundle.as_ref().map(|b| b.display().to_string()))
                            .unwrap_or_default(),
                        manifest.version
                    ) + during
                }
            },
            EventDetail {
                version: Some(manifest.version.to_string()),
                ..EventDetail::default()
            },
        );
        self.hook(manifest, &spec.env, "pre_start", instance_id, &[])
            .await
            .map_err(StartError::Hook)?;
        if let Some(c) = &manifest.container {
            self.host.sweep_containers(c.runtime, &manifest.exec).await;
        }
        let ctx = StartContext {
            manifest,
            instance_id: instance_id.to_string(),
            runtime_dir: &self.host.opts.runtime_dir,
            env: spec.env.clone(),
            logs: self.plugin.logs.clone(),
            processes: &self.host.processes,
            tasks: &self.host.io_tasks,
            isolation: Some(&self.host.isolation),
            survive: Some((
                manifest
                    .survive_supervisor
                    .unwrap_or(self.host.survivors.default),
                &self.host.survivors,
            )),
        };
        let instance = instance::spawn(ctx).await?;
        let pid = instance.child.pid();
        self.update(|r| {
            r.instance = instance_id.to_string();
            r.pid = Some(pid);
        });
        Ok(instance)
    }

    /// The second part of [`Self::launch`]: the `initializing` event (with
    /// `reason`), Initialize with `restored` state, the checks of its
    /// answer and its sessions. On failure the child is already killed and
    /// reaped.
    pub async fn initialize_instance(
        &self,
        spec: &Spec,
        mut instance: Instance,
        restored: Option<RestoredState>,
        reason: String,
    ) -> Result<(Instance, InitializeResponse), StartError> {
        let manifest = &spec.manifest;
        let pid = instance.child.pid();
        self.event(
            PluginState::Initializing,
            &instance.id,
            reason,
            EventDetail {
                pid: Some(pid),
                ..EventDetail::default()
            },
        );
        match instance::initialize(&mut instance, manifest, &spec.config, restored).await {
            Ok(info) => {
                if manifest.isolation.require_version_match
                    && let Some(m) = version_mismatch(manifest, &info)
                {
                    instance::kill_and_reap(&instance.child).await;
                    return Err(StartError::Refused(format!(
                        "{m}; refused because the manifest sets isolation.require_version_match: true"
                    )));
                }
                if let Err(why) =
                    crate::tenant::check_instance(&self.host.metadata, manifest, &info).await
                {
                    instance::kill_and_reap(&instance.child).await;
                    return Err(StartError::Refused(why));
                }
                if info.sessions {
                    self.open_sessions(&mut instance).await;
                }
                Ok((instance, info))
            }
            Err(e) => {
                instance::kill_and_reap(&instance.child).await;
                Err(e)
            }
        }
    }

    /// Opens the instance's sessions (one per connection). A plugin that
    /// offered them but cannot open them still serves unary Handle: the
    /// failure is logged, not fatal.
    pub(crate) async fn open_sessions(&self, instance: &mut Instance) {
        let timeout = instance.spawned_at.elapsed().max(Duration::from_secs(1));
        match crate::session::Sessions::open(
            &instance.client,
            crate::transport::PLUGIN_CONNECTIONS,
            timeout,
            &self.host.io_tasks,
        )
        .await
        {
            Ok(sessions) => instance.sessions = Some(Arc::new(sessions)),
            Err(status) => tracing::warn!(
                plugin = %self.plugin.name,
                instance = %instance.id,
                "the plugin offers sessions but none opened ({:?}: {}); calls use Handle",
                status.code(),
                status.message()
            ),
        }
    }

    /// Publishes a freshly initialized instance as ready.
    pub fn publish(&self, instance: &Instance, info: &InitializeResponse) -> Instant {
        let ready_since = Instant::now();
        let pid = instance.child.pid();
        self.host
            .metrics
            .started(&self.plugin.name, instance.spawned_at.elapsed());
        {
            let mut b = self.plugin.board.lock();
            b.methods = info.methods.clone();
            b.reported_version = (!info.version.is_empty()).then(|| info.version.clone());
            if let Some(r) = b.replicas.get_mut(self.index) {
                r.ready_since = Some(ready_since);
                r.instance = instance.id.clone();
                r.pid = Some(pid);
                r.identity = instance.identity.clone();
                r.attached = Some(Arc::new(crate::handover::Attached::of(instance)));
            }
        }
        self.route(Route::Ready(ReadyInstance::new(
            instance.id.clone(),
            self.index,
            instance.client.clone(),
            instance.sessions.clone(),
            self.snapshots.clone(),
        )));
        let manifest = self.plugin.board.lock().spec.manifest.clone();
        crate::adopt::commit_ready(self, instance, &manifest, info);
        let mismatch = version_mismatch(&manifest, info);
        if let Some(m) = &mismatch {
            tracing::warn!(plugin = %self.plugin.name, instance = %instance.id, "{m}");
        }
        self.event(
            PluginState::Ready,
            &instance.id,
            format!(
                "ready in {}ms (pid {pid}, {} {}){}",
                instance.spawned_at.elapsed().as_millis(),
                if info.name.is_empty() {
                    &self.plugin.name
                } else {
                    &info.name
                },
                info.version,
                mismatch
                    .map(|m| format!("; warning: {m}"))
                    .unwrap_or_default()
            ),
            EventDetail {
                pid: Some(pid),
                version: Some(info.version.clone()),
                ..EventDetail::default()
            },
        );
        ready_since
    }

    /// Graceful stop of an instance, with its events. While a restart stops
    /// the old instance (`restarting`), calls wait for the new one instead
    /// of failing. A stop takes a last snapshot if `snapshot_first` (an
    /// upgraded-away instance's state is already older than its
    /// successor's).
    pub async fn stop_instance(
        &self,
        manifest: &Manifest,
        instance: &mut Instance,
        why: &str,
        restarting: bool,
        snapshot_first: bool,
    ) {
        self.stop_instance_with(manifest, instance, why, restarting, snapshot_first, false)
            .await
    }

    /// [`Self::stop_instance`] for a stop on purpose (not an upgrade's
    /// switch): once it said `stopping`, the plugins bound to this one stop
    /// first when it is going down (see
    /// [`crate::dependencies::let_bound_dependents_stop`]).
    pub async fn stop_instance_releasing(
        &self,
        manifest: &Manifest,
        instance: &mut Instance,
        why: &str,
        restarting: bool,
    ) {
        self.stop_instance_with(manifest, instance, why, restarting, true, true)
            .await
    }

    async fn stop_instance_with(
        &self,
        manifest: &Manifest,
        instance: &mut Instance,
        why: &str,
        restarting: bool,
        snapshot_first: bool,
        release: bool,
    ) {
        if restarting {
            if self
                .plugin
                .routes
                .ready(self.index)
                .is_some_and(|r| r.id == instance.id)
            {
                self.route(Route::Pending);
            }
        } else {
            self.route(Route::Down {
                state: PluginState::Stopping,
                reason: why.to_string(),
            });
        }
        self.transition(PluginState::Stopping, &instance.id, why.to_string());
        if release {
            crate::dependencies::let_bound_dependents_stop(self, &instance.id).await;
        }
        let env = self.committed_env();
        if instance.child.try_status().is_none() {
            let pid = instance.child.pid().to_string();
            self.hook_reported(
                manifest,
                &env,
                "pre_stop",
                &instance.id,
                &[
                    ("PLUGVISOR_PLUGIN_PID", pid),
                    ("PLUGVISOR_STOP_REASON", why.to_string()),
                ],
            )
            .await;
        }
        if snapshot_first
            && instance.child.try_status().is_none()
            && let Some(snapshots) = &self.snapshots
            && let Err(e) = snapshots
                .take(&instance.client, manifest.timeouts.call.0)
                .await
        {
            self.snapshot_failed(&instance.id, "at stop", &e);
        }
        let status = instance::stop(instance, manifest.timeouts.stop.0).await;
        let current = self
            .plugin
            .board
            .lock()
            .replicas
            .get(self.index)
            .is_some_and(|r| r.instance == instance.id);
        if current {
            self.update(|r| {
                r.last_exit = Some(status.to_string());
                r.pid = None;
                r.ready_since = None;
            });
        }
        let reason = format!("{why}; the plugin {status}");
        let exit = ExitReason::from_status(status);
        self.hook_reported(
            manifest,
            &env,
            "post_exit",
            &instance.id,
            &[
                ("PLUGVISOR_EXIT_REASON", reason.clone()),
                ("PLUGVISOR_EXIT_KIND", exit.kind().to_string()),
            ],
        )
        .await;
        let detail = EventDetail::of_exit(&exit);
        if restarting {
            self.event(PluginState::Stopped, &instance.id, reason, detail);
        } else {
            self.down(&instance.id, PluginState::Stopped, reason, detail);
        }
    }

    /// A snapshot that could not be taken leaves a trace: an event, a
    /// warning and the metric.
    pub fn snapshot_failed(&self, instance: &str, when: &str, why: &str) {
        snapshot_failed(&self.host, &self.plugin, self.index, instance, when, why);
    }

    /// The newest good snapshot as Initialize's restored state, and a note
    /// for the event trail (which snapshot, and any newer ones found
    /// corrupt). An unreadable snapshot is an error: starting empty would
    /// silently lose the state.
    pub async fn restored_state(&self) -> Result<(Option<RestoredState>, String), String> {
        let Some(snapshots) = &self.snapshots else {
            return Ok((None, String::new()));
        };
        let store = snapshots.store.clone();
        let loaded = tokio::task::spawn_blocking(move || store.load())
            .await
            .map_err(|e| format!("the snapshot reader failed: {e}"))?
            .map_err(|e| e.to_string())?;
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
            tracing::warn!(plugin = %self.plugin.name, "skipped corrupt snapshots: {}", loaded.skipped.join("; "));
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
}

/// Records a failed snapshot of `instance` (replica `replica`): an event in
/// the plugin's current state, a warning and the metric. Nobody learns of it
/// only by chance.
pub(crate) fn snapshot_failed(
    host: &Host,
    plugin: &Common,
    replica: usize,
    instance: &str,
    when: &str,
    why: &str,
) {
    let state = plugin
        .board
        .lock()
        .replicas
        .get(replica)
        .map_or(PluginState::Stopped, |r| r.state);
    let event = Event {
        time: SystemTime::now(),
        plugin: plugin.name.clone(),
        replica,
        instance: instance.to_string(),
        state,
        reason: format!("state snapshot {when} failed: {why}"),
        detail: EventDetail::default(),
    };
    plugin.board.record(&event);
    tracing::warn!(plugin = %plugin.name, instance, "{}", event.reason);
    host.metrics.snapshot_failed(&plugin.name);
    let _ = host.events.send(event);
}

/// "the plugin reports version X, its manifest says Y", when they differ
/// (a plugin that reports none is not held to it).
fn version_mismatch(manifest: &Manifest, info: &InitializeResponse) -> Option<String> {
    let manifest_version = manifest.version.to_string();
    (!info.version.is_empty() && info.version != manifest_version).then(|| {
        format!(
            "the plugin reports version {} in Initialize, but its manifest {} says {manifest_version}",
            info.version,
            manifest.path.display()
        )
    })
}
