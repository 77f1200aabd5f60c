//! The supervisor's public API: adding and removing plugins, operator
//! operations, status, and the call paths.
//!
//! Each plugin has one coordinator (module `plugin`) that owns what it
//! should run, and `replicas` actors (module `actor`) that each own one
//! child. This facade owns neither: it sends operations to coordinators and
//! routes calls through what the actors publish. Calls are admitted through
//! the plugin's bounded admission (module `routing`), go to the
//! least-loaded ready instance, and wait for a restarting plugin up to their
//! deadline.

mod by_capability;

use crate::config::PluginOverride;
use crate::error::Error;
use crate::host::Host;
use crate::instance::probe;
use crate::isolation::Isolation;
use crate::logs::LogBuffer;
use crate::manifest::Manifest;
use crate::plugin::{self, Op, PluginHandle, Registry};
use crate::process::ProcessManager;
use crate::replica::Common;
use crate::routing::InFlight;
use crate::status::info_of;
use crate::transport::BodyAbort;
use plugvisor_proto::{Chunk, HandleRequest, HandleResponse};
use prost::bytes::Bytes;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedSemaphorePermit, broadcast};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::host::SupervisorOptions;
pub use crate::status::{
    Event, EventDetail, ExitReason, Health, PluginInfo, PluginState, ReplicaInfo,
};

/// Supervises a set of plugins. Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct Supervisor {
    pub(crate) host: Arc<Host>,
    pub(crate) plugins: Arc<Registry>,
}

impl Supervisor {
    /// Creates a supervisor. Must be called inside a tokio runtime. Probing
    /// the cgroup tree and cleaning what an earlier run left there reads and
    /// writes cgroupfs in this call; [`Self::launch`] does that on the
    /// blocking pool instead.
    pub fn new(opts: SupervisorOptions) -> std::io::Result<Supervisor> {
        let survivors = Self::survivors(&opts)?;
        let isolation = Isolation::start_keeping(
            &opts.isolation,
            &opts.proc_root,
            &Self::keep(&opts, &survivors),
        )
        .map_err(std::io::Error::other)?;
        Self::with_isolation(opts, isolation, survivors)
    }

    /// Locks the survivors' directory and reads what an earlier run left.
    fn survivors(opts: &SupervisorOptions) -> std::io::Result<Arc<crate::adopt::Survivors>> {
        crate::adopt::Survivors::open(
            &opts.survivors_dir(),
            &opts.proc_root,
            opts.survive_supervisor,
        )
        .map(Arc::new)
    }

    /// [`Self::new`], with the cgroup probing and stale-cgroup cleanup on
    /// the blocking pool (what the daemon uses).
    pub async fn launch(opts: SupervisorOptions) -> std::io::Result<Supervisor> {
        Self::launch_with(opts, None).await
    }

    /// [`Self::launch`], spawning children through `processes` (a manager
    /// whose process thread the caller runs; see
    /// [`ProcessManager::detached`]) instead of a manager of its own.
    pub async fn launch_with(
        opts: SupervisorOptions,
        processes: Option<ProcessManager>,
    ) -> std::io::Result<Supervisor> {
        let o = opts.clone();
        let survivors = tokio::task::spawn_blocking(move || Self::survivors(&o))
            .await
            .map_err(std::io::Error::other)??;
        let keep = Self::keep(&opts, &survivors);
        let isolation = Isolation::start_async_keeping(&opts.isolation, &opts.proc_root, &keep)
            .await
            .map_err(std::io::Error::other)?;
        Self::with_isolation_and(opts, isolation, processes, survivors)
    }

    /// The instances whose cgroups and socket directories an earlier run
    /// left and this one keeps: those taken over from a previous image of
    /// this supervisor, and survivors of a crashed one to re-adopt.
    fn keep(opts: &SupervisorOptions, survivors: &crate::adopt::Survivors) -> Vec<String> {
        let mut keep = opts.keep_instances.clone();
        keep.extend(survivors.keep());
        keep
    }

    fn with_isolation(
        opts: SupervisorOptions,
        isolation: Isolation,
        survivors: Arc<crate::adopt::Survivors>,
    ) -> std::io::Result<Supervisor> {
        Self::with_isolation_and(opts, isolation, None, survivors)
    }

    fn with_isolation_and(
        opts: SupervisorOptions,
        isolation: Isolation,
        processes: Option<ProcessManager>,
        survivors: Arc<crate::adopt::Survivors>,
    ) -> std::io::Result<Supervisor> {
        // Sockets live there: refuse a directory others could write in, and
        // clear what an earlier run left (but the sockets of instances
        // taken over or to re-adopt).
        let swept =
            crate::rundir::prepare_keeping(&opts.runtime_dir, &Self::keep(&opts, &survivors))
                .map_err(std::io::Error::other)?;
        if swept > 0 {
            tracing::info!(
                "removed {swept} stale socket director{} of an earlier run",
                if swept == 1 { "y" } else { "ies" }
            );
        }
        let io_tasks = TaskTracker::new();
        let processes = match processes {
            Some(p) => p,
            None => ProcessManager::new()?,
        };
        let plugins: Arc<Registry> = Arc::default();
        let host = Arc::new(Host {
            registry: Arc::downgrade(&plugins),
            processes,
            isolation,
            events: broadcast::channel(4096).0,
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            io_tasks,
            metrics: crate::metrics::Metrics::default(),
            capabilities: Default::default(),
            metadata: Default::default(),
            container_sweeps: Default::default(),
            opts,
            survivors,
        });
        // Outside a runtime, the first `add` starts it.
        if tokio::runtime::Handle::try_current().is_ok() {
            crate::adopt::keep_beating(&host);
        }
        if host.opts.subreaper {
            // Orphaned descendants of plugins are reparented here and reaped
            // by the process manager's reaper, woken on SIGCHLD.
            host.processes.adopt_orphans()?;
            let mut sigchld =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
            let sweeper = host.clone();
            host.tasks.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = sweeper.cancel.cancelled() => break,
                        _ = sigchld.recv() => {}
                        _ = tick.tick() => {}
                    }
                    sweeper.processes.reap_orphans();
                }
            });
        }
        Ok(Supervisor { host, plugins })
    }

    /// Adds a plugin and starts its replicas. The supervisor config's
    /// `overrides` are merged over the manifest.
    pub fn add(&self, manifest: Manifest, overrides: &PluginOverride) -> Result<(), Error> {
        if self.host.cancel.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let exists = self
            .plugins
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&manifest.name);
        if exists {
            return Err(Error::Invalid(format!(
                "a plugin named `{}` is already supervised",
                manifest.name
            )));
        }
        crate::dependencies::check_add(&self.plugins, &manifest).map_err(Error::Invalid)?;
        let mut plugins = self.plugins.write().unwrap_or_else(|e| e.into_inner());
        if plugins.contains_key(&manifest.name) {
            return Err(Error::Invalid(format!(
                "a plugin named `{}` is already supervised",
                manifest.name
            )));
        }
        let name = manifest.name.clone();
        crate::adopt::keep_beating(&self.host);
        let handle = plugin::spawn(&self.host, &self.plugins, manifest, overrides.clone());
        crate::tenant::prefill(&self.host.metadata, &handle.common.board);
        plugins.insert(name, handle);
        Ok(())
    }

    /// Adds `tenant` of a plugin as its own entry, `<plugin>@<tenant>`
    /// (see [`crate::tenant`]): `base` is the plugin's manifest and
    /// `base_overrides` its supervisor-config overrides, under the tenant's.
    pub fn add_tenant(
        &self,
        base: &Manifest,
        base_overrides: &PluginOverride,
        tenant: &str,
        spec: &crate::tenant::TenantSpec,
    ) -> Result<(), Error> {
        let (manifest, overrides) =
            crate::tenant::entry_for(base, base_overrides, tenant, spec).map_err(Error::Invalid)?;
        self.add(manifest, &overrides)
    }

    fn plugin(&self, name: &str) -> Result<Arc<PluginHandle>, Error> {
        self.plugins
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| Error::UnknownPlugin(name.to_string()))
    }

    fn common(&self, name: &str) -> Result<Arc<Common>, Error> {
        Ok(self.plugin(name)?.common.clone())
    }

    /// Every plugin's current status, by name, with live cgroup usage.
    pub fn list(&self) -> Vec<PluginInfo> {
        self.list_with(true)
    }

    /// [`Self::list`]; `usage: false` skips reading each plugin's cgroup
    /// usage (a few file reads per plugin) when nobody shows it.
    pub fn list_with(&self, usage: bool) -> Vec<PluginInfo> {
        let plugins: Vec<_> = self
            .plugins
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|p| p.common.clone())
            .collect();
        plugins.iter().map(|c| self.info_with(c, usage)).collect()
    }

    /// The board's view, with isolation usage read outside its lock.
    fn info_of(&self, common: &Common) -> PluginInfo {
        self.info_with(common, true)
    }

    fn info_with(&self, common: &Common, usage: bool) -> PluginInfo {
        let (mut info, spec) = info_of(&common.name, &common.board);
        info.isolation = self.host.isolation.status_with(
            &spec.manifest,
            info.replicas.iter().map(|r| r.instance.as_str()),
            usage,
        );
        info.rate_limits = common.rate_limits.current().describe();
        info
    }

    /// The manifest a plugin runs now (what its coordinator last committed).
    pub fn manifest(&self, name: &str) -> Result<Arc<Manifest>, Error> {
        Ok(self.common(name)?.board.spec().manifest.clone())
    }

    /// One plugin's status.
    pub fn info(&self, name: &str) -> Result<PluginInfo, Error> {
        Ok(self.info_of(&*self.common(name)?))
    }

    /// The process manager: every child of this supervisor, helpers
    /// included, must be spawned through it (in daemon mode its reaper
    /// reaps every child of the process).
    pub fn processes(&self) -> &ProcessManager {
        &self.host.processes
    }

    /// Every future state transition of every plugin.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.host.events.subscribe()
    }

    /// The kept transitions of one plugin, oldest first.
    pub fn history(&self, name: &str) -> Result<Vec<Event>, Error> {
        let common = self.common(name)?;
        let board = common.board.lock();
        Ok(board.history.iter().cloned().collect())
    }

    /// The plugin's output buffer.
    pub fn logs(&self, name: &str) -> Result<Arc<LogBuffer>, Error> {
        Ok(self.common(name)?.logs.clone())
    }

    /// Waits until some replica of the plugin is ready (or degraded).
    pub async fn wait_ready(&self, name: &str, timeout: Duration) -> Result<(), Error> {
        let common = self.common(name)?;
        pick(&common, Instant::now() + timeout, timeout, None).await?;
        Ok(())
    }

    /// The manifest the plugin runs and whether it lists `method`, from one
    /// look at its board.
    fn call_setup(common: &Common, method: &str) -> (Arc<Manifest>, bool) {
        let board = common.board.lock();
        (
            board.spec.manifest.clone(),
            board.methods.iter().any(|m| m == method),
        )
    }

    /// Calls `method` on a plugin. Waits for a restarting plugin up to the
    /// deadline (`timeout`, else the manifest's `timeouts.call`). A call is
    /// sent once, unless its method is listed as idempotent in the manifest:
    /// then it is sent again if its instance dies during the call.
    pub async fn call(
        &self,
        plugin: &str,
        method: &str,
        payload: Bytes,
        metadata: HashMap<String, String>,
        timeout: Option<Duration>,
    ) -> Result<HandleResponse, Error> {
        let common = self.common(plugin)?;
        let (manifest, listed) = Self::call_setup(&common, method);
        // Recorded when dropped: a call dropped mid-way counts as cancelled.
        let mut record = CallRecord::new(&self.host, &common, method, listed);
        let result = call_once(
            &self.host, &common, &manifest, method, payload, metadata, timeout,
        )
        .await;
        record.code = result
            .as_ref()
            .map_or_else(Error::code, |_| tonic::Code::Ok);
        result
    }

    /// Streams `input` to `method` and returns the reply stream. The first
    /// chunk sent carries the method and metadata; nothing is buffered
    /// whole. The call is admitted and counted like any other, and holds its
    /// call slot until the reply stream ends or is dropped. `timeout` bounds
    /// waiting for a slot, a ready instance and the reply's start.
    ///
    /// If `input` yields an error (the caller's upload broke off), the call
    /// to the plugin is cancelled (its stream is reset, so the plugin never
    /// mistakes a short upload for a whole one) and the reply stream ends
    /// with [`Error::Cancelled`].
    pub async fn call_stream<S>(
        &self,
        plugin: &str,
        method: &str,
        metadata: HashMap<String, String>,
        input: S,
        timeout: Option<Duration>,
    ) -> Result<impl Stream<Item = Result<Bytes, Error>> + Send + use<S>, Error>
    where
        S: Stream<Item = Result<Bytes, tonic::Status>> + Send + 'static,
    {
        let common = self.common(plugin)?;
        let (manifest, listed) = Self::call_setup(&common, method);
        let mut record = CallRecord::new(&self.host, &common, method, listed);
        let timeout = timeout.unwrap_or(manifest.timeouts.call.0);
        let deadline = Instant::now() + timeout;
        let fail = |record: &mut CallRecord, e: Error| {
            record.code = e.code();
            e
        };
        if let Err(e) = common.rate_limits.check(method) {
            return Err(fail(&mut record, e));
        }
        let permit = match common.admission.admit(deadline, timeout).await {
            Ok(permit) => permit,
            Err(e) => return Err(fail(&mut record, e)),
        };
        let ready = match pick(&common, deadline, timeout, None).await {
            Ok(ready) => ready,
            Err(e) => return Err(fail(&mut record, e)),
        };
        let abort = Arc::new(Abort::default());
        let first = Chunk {
            method: method.to_string(),
            data: Bytes::new(),
            metadata,
            ..Chunk::default()
        };
        let upload = tokio_stream::once(first).chain(Upload {
            inner: Box::pin(input),
            abort: abort.clone(),
            failed: false,
        });
        // Chunks go as they are, without tonic's codec: see `stream_wire`.
        let call = crate::stream_wire::call(ready.client.connection(), upload, abort.body.clone());
        let started = tokio::select! {
            // An upload that broke off also fails the reply: say why first.
            biased;
            why = abort.wait() => {
                return Err(fail(&mut record, cancelled(&common.name, method, why)));
            }
            r = tokio::time::timeout_at(deadline.into(), call) => r,
        };
        let response = match started {
            Ok(Ok(replies)) => replies,
            Ok(Err(status)) => {
                // The upload breaking off (on another thread, after the
                // biased look above) resets the stream: that is the cause.
                let e = match abort.get() {
                    Some(why) => cancelled(&common.name, method, why),
                    None => call_error(status, &common.name, &ready.id),
                };
                return Err(fail(&mut record, e));
            }
            Err(_) => {
                let e = Error::Timeout {
                    plugin: common.name.clone(),
                    method: method.to_string(),
                    timeout,
                };
                return Err(fail(&mut record, e));
            }
        };
        Ok(Download {
            inner: Some(response),
            abort,
            method: method.to_string(),
            record,
            ready,
            _permit: permit,
            snapshot_on_change: manifest
                .state
                .snapshot_on_change
                .then_some(manifest.timeouts.call.0),
            common: common.clone(),
            state_changed: false,
            saving: None,
        })
    }

    /// Asks a ready instance of the plugin for its state (ExportState).
    pub async fn export_state(
        &self,
        plugin: &str,
        timeout: Option<Duration>,
    ) -> Result<plugvisor_proto::ExportStateResponse, Error> {
        let common = self.common(plugin)?;
        let timeout = timeout.unwrap_or(common.board.spec().manifest.timeouts.call.0);
        let deadline = Instant::now() + timeout;
        let ready = pick(&common, deadline, timeout, None).await?;
        let mut client = ready.client.clone();
        let mut request = tonic::Request::new(plugvisor_proto::ExportStateRequest {});
        request.set_timeout(timeout);
        match tokio::time::timeout_at(deadline.into(), client.export_state(request)).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(call_error(status, plugin, &ready.id)),
            Err(_) => Err(Error::Timeout {
                plugin: plugin.to_string(),
                method: "ExportState".into(),
                timeout,
            }),
        }
    }

    /// Probes a ready instance's HealthCheck now, as the supervisor's own
    /// probes do.
    pub async fn health_check(&self, plugin: &str) -> Result<(Health, String), Error> {
        let common = self.common(plugin)?;
        let timeout = common.board.spec().manifest.health.timeout.0;
        let ready = pick(&common, Instant::now() + timeout, timeout, None).await?;
        probe(&ready.client, timeout)
            .await
            .map_err(|reason| Error::Lost {
                plugin: plugin.to_string(),
                instance: ready.id.clone(),
                reason,
            })
    }

    /// [`Self::health_check`], with what answered: the instance, the
    /// version it runs, its executable's digest and signer.
    pub async fn health_report(&self, plugin: &str) -> Result<HealthReport, Error> {
        let common = self.common(plugin)?;
        let timeout = common.board.spec().manifest.health.timeout.0;
        let ready = pick(&common, Instant::now() + timeout, timeout, None).await?;
        let (health, message) =
            probe(&ready.client, timeout)
                .await
                .map_err(|reason| Error::Lost {
                    plugin: plugin.to_string(),
                    instance: ready.id.clone(),
                    reason,
                })?;
        let board = common.board.lock();
        Ok(HealthReport {
            health,
            message,
            instance: ready.id.clone(),
            version: board.spec.manifest.version.to_string(),
            identity: board
                .replicas
                .get(ready.replica)
                .map(|r| r.identity.clone())
                .unwrap_or_default(),
        })
    }

    /// The trusted keys and `require_signatures` that starts check now.
    pub fn signature_policy(&self) -> Arc<crate::signature::SignaturePolicy> {
        self.host.isolation.signature_policy()
    }

    /// Replaces the trusted keys and `require_signatures` (a reload): every
    /// start from now on checks the new ones. Returns the running plugins
    /// whose signature does not verify under them, with why; they keep
    /// running, get an event saying so, and their next start is refused.
    pub async fn set_signature_policy(
        &self,
        policy: crate::signature::SignaturePolicy,
    ) -> Vec<(String, String)> {
        let policy = Arc::new(policy);
        self.host.isolation.set_signature_policy((*policy).clone());
        crate::signature::recheck_running(&self.plugins, &self.host, policy).await
    }

    /// `names` ordered for stopping or removing them one after the other:
    /// each before every plugin it requires (directly or through others).
    pub fn dependents_first(&self, names: Vec<String>) -> Vec<String> {
        crate::dependencies::dependents_first(&self.plugins, names)
    }

    /// Stops a plugin gracefully; it stays stopped until started.
    pub async fn stop(&self, name: &str) -> Result<(), Error> {
        self.plugin(name)?.run(Op::Stop).await
    }

    /// Starts a stopped or failed plugin (no-op when running).
    pub async fn start(&self, name: &str) -> Result<(), Error> {
        self.plugin(name)?.run(Op::Start).await
    }

    /// Stops the plugin if it runs, clears its restart history (and a
    /// `failed` state), and starts it again, one replica at a time. Returns
    /// once each replica's new start began.
    pub async fn restart(&self, name: &str) -> Result<(), Error> {
        self.plugin(name)?.run(Op::Restart).await
    }

    /// Replaces a running plugin with `manifest` (a new version or binary)
    /// without dropping calls, on every replica or on none: each new
    /// instance starts with its predecessor's freshly exported state, calls
    /// switch to it once it is ready, and the old one is kept through the
    /// probation window. Only when every replica has switched are the old
    /// instances stopped; if any fails to start, initialize or stay healthy,
    /// every replica goes back to the old version and the error says why.
    /// The upgrade runs on its own: dropping this future does not stop it.
    pub async fn upgrade(&self, name: &str, manifest: Manifest) -> Result<(), Error> {
        crate::dependencies::check_add(&self.plugins, &manifest).map_err(Error::Invalid)?;
        let manifest = Arc::new(manifest);
        self.plugin(name)?
            .run(|reply| Op::Upgrade {
                manifest,
                overrides: None,
                reply,
            })
            .await
    }

    /// [`Self::upgrade`] with new supervisor-config overrides for the plugin.
    pub async fn upgrade_with(
        &self,
        name: &str,
        manifest: Manifest,
        overrides: PluginOverride,
    ) -> Result<(), Error> {
        crate::dependencies::check_add(&self.plugins, &manifest).map_err(Error::Invalid)?;
        let manifest = Arc::new(manifest);
        self.plugin(name)?
            .run(|reply| Op::Upgrade {
                manifest,
                overrides: Some(overrides),
                reply,
            })
            .await
    }

    /// The Prometheus text exposition: event-fed series plus gauges read now.
    pub fn metrics_text(&self) -> String {
        let plugins: Vec<_> = self
            .plugins
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|p| p.common.clone())
            .collect();
        let samples: Vec<crate::metrics::PluginSample> = plugins
            .iter()
            .map(|common| {
                let info = self.info_of(common);
                let usage = info.isolation.usage.clone().unwrap_or_default();
                // What runs; before a first start, the manifest's pin.
                let sha256 = info
                    .identity
                    .sha256
                    .clone()
                    .or_else(|| common.board.spec().manifest.sha256.clone())
                    .unwrap_or_default();
                let signer = info
                    .identity
                    .signer
                    .as_ref()
                    .map(|s| s.name.clone())
                    .unwrap_or_default();
                crate::metrics::PluginSample {
                    up: info.replicas.iter().any(|r| r.state.is_up()),
                    plugin: info.name,
                    version: info.version,
                    state: info.state.to_string(),
                    sha256,
                    signer,
                    enforcement: info.isolation.mechanism,
                    memory_bytes: usage.memory_current,
                    cpu_seconds: usage.cpu.map(|d| d.as_secs_f64()),
                    pids: usage.pids_current,
                }
            })
            .collect();
        self.host.metrics.encode(&samples)
    }

    /// The config the plugin's next start gets (manifest < supervisor
    /// config < runtime overrides).
    pub fn config(&self, name: &str) -> Result<serde_json::Map<String, serde_json::Value>, Error> {
        Ok(self.common(name)?.board.spec().config.clone())
    }

    /// Merges `changes` into the plugin's runtime config overrides (the top
    /// layer; a `null` value removes a key) and rolls the result out to
    /// every replica without downtime, handing each new instance the old
    /// one's state. If any replica rejects the new config (Initialize
    /// fails), every replica keeps the old one, and so does every later
    /// restart. The rollout runs on its own: dropping this future does not
    /// stop it.
    pub async fn set_runtime_config(
        &self,
        name: &str,
        changes: serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), Error> {
        self.plugin(name)?
            .run(|reply| Op::SetConfig { changes, reply })
            .await
    }

    /// Stops a plugin (with a last snapshot) and stops supervising it.
    pub async fn remove(&self, name: &str) -> Result<(), Error> {
        self.plugin(name)?.run(Op::Remove).await
    }

    /// Sends an event that belongs to no live plugin (a registered plugin
    /// that left) to the event stream.
    pub(crate) fn emit(&self, event: Event) {
        let _ = self.host.events.send(event);
    }

    /// The names of the supervised plugins.
    pub fn names(&self) -> Vec<String> {
        self.plugins
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Kills the survivors of the previous supervisor (see [`crate::adopt`])
    /// that no plugin of this one claims: their plugin is gone, or has
    /// fewer replicas now. Call once the plugins are added. Returns how many.
    pub async fn release_survivors(&self) -> usize {
        let wanted: HashMap<String, usize> = self
            .list_with(false)
            .into_iter()
            .map(|p| (p.name, p.replicas.len()))
            .collect();
        crate::adopt::release(&self.host, |plugin, replica| {
            wanted.get(plugin).is_some_and(|n| replica < *n)
        })
        .await
    }

    /// Stops every plugin gracefully and waits for all of them: dependents
    /// before what they require (in waves), then the rest in parallel.
    pub async fn shutdown(&self) {
        for wave in crate::dependencies::stop_waves(&self.plugins) {
            let mut stops = tokio::task::JoinSet::new();
            for name in wave {
                if let Ok(handle) = self.plugin(&name) {
                    stops.spawn(async move { handle.run(Op::Stop).await });
                }
            }
            while stops.join_next().await.is_some() {}
        }
        self.host.cancel.cancel();
        self.host.tasks.close();
        self.host.tasks.wait().await;
        self.host.io_tasks.close();
        // Readers of output pipes end when the last holder of the pipe exits;
        // do not wait forever on a descendant that escaped its process group.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.host.io_tasks.wait()).await;
        self.host.isolation.shutdown();
        self.host.survivors.release();
    }
}

/// A health probe's answer and what gave it.
#[derive(Debug, Clone)]
pub struct HealthReport {
    pub health: Health,
    pub message: String,
    /// The instance that answered.
    pub instance: String,
    /// The manifest version it runs.
    pub version: String,
    /// Its executable's digest and signer.
    pub identity: crate::signature::RunIdentity,
}

/// A ready instance of the plugin, waiting for one until `deadline`.
async fn pick(
    common: &Common,
    deadline: Instant,
    timeout: Duration,
    avoid: Option<&str>,
) -> Result<InFlight, Error> {
    common
        .routes
        .pick(deadline, timeout, avoid, || common.board.why_waiting())
        .await
}

/// One unary call, admitted, routed, and retried once on a lost instance
/// when its method is idempotent.
async fn call_once(
    host: &Host,
    common: &Common,
    manifest: &Manifest,
    method: &str,
    mut payload: Bytes,
    mut metadata: HashMap<String, String>,
    timeout: Option<Duration>,
) -> Result<HandleResponse, Error> {
    let plugin = common.name.as_str();
    let timeout = timeout.unwrap_or(manifest.timeouts.call.0);
    let deadline = Instant::now() + timeout;
    common.rate_limits.check(method)?;
    let _permit = common.admission.admit(deadline, timeout).await?;
    let retry = manifest.idempotent.iter().any(|m| m == method);
    let mut lost: Option<String> = None;
    loop {
        let ready = pick(common, deadline, timeout, lost.as_deref()).await?;
        // Only a call that may be sent again keeps a copy of its input.
        let (payload, metadata) = if retry {
            (payload.clone(), metadata.clone())
        } else {
            (std::mem::take(&mut payload), std::mem::take(&mut metadata))
        };
        let call = HandleRequest {
            method: method.to_string(),
            payload,
            metadata,
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        let result =
            tokio::time::timeout_at(deadline.into(), send(plugin, &ready, call, remaining)).await;
        return match result {
            Ok(Ok(response)) => {
                if response.state_changed
                    && manifest.state.snapshot_on_change
                    && let Some(snapshots) = &ready.snapshots
                    && let Err(why) = snapshots
                        .take(&ready.client, manifest.timeouts.call.0)
                        .await
                {
                    crate::replica::snapshot_failed(
                        host,
                        common,
                        ready.replica,
                        &ready.id,
                        &format!("after a `{method}` call that changed state"),
                        &why,
                    );
                    return Err(Error::NotPersisted {
                        plugin: plugin.to_string(),
                        instance: ready.id.clone(),
                        reason: why,
                    });
                }
                Ok(response)
            }
            Ok(Err(e)) => match e {
                Error::Lost { .. } if retry => {
                    tracing::debug!(plugin, method, instance = %ready.id, "instance lost mid-call; sending the idempotent call again");
                    lost = Some(ready.id.clone());
                    continue;
                }
                e => Err(e),
            },
            Err(_) => Err(Error::Timeout {
                plugin: plugin.to_string(),
                method: method.to_string(),
                timeout,
            }),
        };
    }
}

/// Sends one Handle call to `ready`: over one of its sessions when it has
/// them, else as a unary call.
async fn send(
    plugin: &str,
    ready: &InFlight,
    call: HandleRequest,
    remaining: Duration,
) -> Result<HandleResponse, Error> {
    let call = match &ready.sessions {
        Some(sessions) => match sessions.call(call, remaining).await {
            Ok(crate::session::Outcome::Reply(reply)) => return Ok(reply),
            Ok(crate::session::Outcome::Status(status)) => return Err(Error::Plugin(status)),
            Ok(crate::session::Outcome::Lost(reason)) => {
                return Err(Error::Lost {
                    plugin: plugin.to_string(),
                    instance: ready.id.clone(),
                    reason,
                });
            }
            // No live session: unary below.
            Err(call) => call,
        },
        None => call,
    };
    let mut client = ready.client.clone();
    let mut request = tonic::Request::new(call);
    request.set_timeout(remaining);
    client
        .handle(request)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| call_error(status, plugin, &ready.id))
}

/// A call's metrics, recorded once when dropped: whatever way the call
/// ended, a caller that went away included (counted as cancelled).
struct CallRecord {
    host: Arc<Host>,
    /// The method's series (the method, or `other` for one the plugin does
    /// not list: callers cannot grow the label set without bound).
    series: Arc<crate::metrics::MethodSeries>,
    started: Instant,
    code: tonic::Code,
    /// Counts the call in `plugvisor_calls_in_flight` until it ends.
    _in_flight: crate::metrics::GaugeGuard,
}

impl CallRecord {
    fn new(host: &Arc<Host>, common: &Common, method: &str, listed: bool) -> Self {
        CallRecord {
            host: host.clone(),
            _in_flight: crate::metrics::GaugeGuard::hold(common.in_flight.clone()),
            series: common
                .call_series
                .method(if listed { method } else { "other" }),
            started: Instant::now(),
            code: tonic::Code::Cancelled,
        }
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        self.series.record(self.code, self.started.elapsed());
    }
}

/// The caller's upload broke off: why, and who to wake.
#[derive(Default)]
struct Abort {
    why: Mutex<Option<tonic::Status>>,
    /// Fails the request body, so the plugin sees an error, not an end.
    body: BodyAbort,
    /// Wakes a reply that has not started yet.
    notify: Notify,
    /// Wakes a reply stream being read.
    waker: Mutex<Option<Waker>>,
}

impl Abort {
    fn set(&self, why: tonic::Status) {
        *lock(&self.why) = Some(why);
        self.body.abort();
        self.notify.notify_waiters();
        if let Some(waker) = lock(&self.waker).take() {
            waker.wake();
        }
    }

    fn get(&self) -> Option<tonic::Status> {
        lock(&self.why).clone()
    }

    /// Waits until the upload breaks off.
    async fn wait(&self) -> tonic::Status {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(why) = self.get() {
                return why;
            }
            notified.await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Single assignments only: a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn cancelled(plugin: &str, method: &str, why: tonic::Status) -> Error {
    Error::Cancelled {
        plugin: plugin.to_string(),
        method: method.to_string(),
        reason: format!("the caller's upload broke off: {}", why.message()),
    }
}

/// The caller's chunks on their way to the plugin. An error from the caller
/// is never turned into an end of stream: the upload stalls, and the reply
/// side resets the plugin's stream.
struct Upload {
    inner: Pin<Box<dyn Stream<Item = Result<Bytes, tonic::Status>> + Send>>,
    abort: Arc<Abort>,
    failed: bool,
}

impl Stream for Upload {
    type Item = Chunk;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Chunk>> {
        if self.failed {
            return Poll::Pending;
        }
        match self.inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(data))) => Poll::Ready(Some(Chunk {
                data,
                ..Chunk::default()
            })),
            Poll::Ready(Some(Err(why))) => {
                self.failed = true;
                self.abort.set(why);
                Poll::Pending
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A snapshot in progress: its sequence number, or why it failed.
type Saving = Pin<Box<dyn std::future::Future<Output = Result<u64, String>> + Send>>;

/// The plugin's reply chunks. Holds the call's slot, its instance and its
/// metrics until it ends or is dropped; dropping it early resets the
/// plugin's stream (the plugin sees the call cancelled).
struct Download {
    inner: Option<crate::stream_wire::Replies>,
    abort: Arc<Abort>,
    method: String,
    record: CallRecord,
    ready: InFlight,
    _permit: OwnedSemaphorePermit,
    /// Snapshot when a reply chunk says the call changed state, before
    /// the caller sees the end (`state.snapshot_on_change`): its timeout.
    snapshot_on_change: Option<Duration>,
    common: Arc<Common>,
    state_changed: bool,
    /// The snapshot being taken at the end of the stream.
    saving: Option<Saving>,
}

impl Stream for Download {
    type Item = Result<Bytes, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(saving) = this.saving.as_mut() {
            let saved = std::task::ready!(saving.as_mut().poll(cx));
            this.saving = None;
            return match saved {
                Ok(_) => {
                    this.record.code = tonic::Code::Ok;
                    Poll::Ready(None)
                }
                Err(why) => {
                    crate::replica::snapshot_failed(
                        &this.record.host,
                        &this.common,
                        this.ready.replica,
                        &this.ready.id,
                        &format!("after a `{}` stream that changed state", this.method),
                        &why,
                    );
                    let e = Error::NotPersisted {
                        plugin: this.record.series.plugin().to_string(),
                        instance: this.ready.id.clone(),
                        reason: why,
                    };
                    this.record.code = e.code();
                    Poll::Ready(Some(Err(e)))
                }
            };
        }
        if this.inner.is_none() {
            return Poll::Ready(None);
        }
        *lock(&this.abort.waker) = Some(cx.waker().clone());
        if let Some(why) = this.abort.get() {
            // Dropping the response resets the plugin's stream now.
            this.inner = None;
            this.record.code = tonic::Code::Cancelled;
            return Poll::Ready(Some(Err(cancelled(
                this.record.series.plugin(),
                &this.method,
                why,
            ))));
        }
        loop {
            let Some(inner) = this.inner.as_mut() else {
                return Poll::Ready(None);
            };
            match Pin::new(inner).poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    this.state_changed |= chunk.state_changed;
                    // A chunk that only carries the flag is not data.
                    if chunk.data.is_empty() && chunk.state_changed {
                        continue;
                    }
                    return Poll::Ready(Some(Ok(chunk.data)));
                }
                Poll::Ready(Some(Err(status))) => {
                    this.inner = None;
                    // The upload breaking off resets the stream: that is the cause.
                    let e = match this.abort.get() {
                        Some(why) => cancelled(this.record.series.plugin(), &this.method, why),
                        None => call_error(status, this.record.series.plugin(), &this.ready.id),
                    };
                    this.record.code = e.code();
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    this.inner = None;
                    if let (true, Some(timeout), Some(snapshots)) = (
                        this.state_changed,
                        this.snapshot_on_change,
                        this.ready.snapshots.clone(),
                    ) {
                        // The end waits for the snapshot, as a unary call's
                        // reply does.
                        let client = this.ready.client.clone();
                        this.saving =
                            Some(Box::pin(
                                async move { snapshots.take(&client, timeout).await },
                            ));
                        return self.poll_next(cx);
                    }
                    this.record.code = tonic::Code::Ok;
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Drop for Download {
    /// A reply dropped before its end (the caller went away) breaks the
    /// upload off too, if it is still going: the plugin must not take what
    /// it got so far for the whole input.
    fn drop(&mut self) {
        if self.inner.is_some() {
            self.abort.body.abort();
        }
    }
}

/// Maps a failed call's status: the plugin's own statuses pass unchanged;
/// transport failures (the child died mid-call) become [`Error::Lost`].
pub(crate) fn call_error(status: tonic::Status, plugin: &str, instance: &str) -> Error {
    if let Some(mut cause) = std::error::Error::source(&status) {
        // The innermost cause says what happened ("broken pipe", "connection
        // reset"); the layers above it only repeat "transport error".
        while let Some(next) = cause.source() {
            cause = next;
        }
        Error::Lost {
            plugin: plugin.to_string(),
            instance: instance.to_string(),
            reason: cause.to_string(),
        }
    } else {
        Error::Plugin(status)
    }
}
