//! The supervisor: its public API, the state it shares with the per-replica
//! actors ([`crate::actor`]), and the call paths.
//!
//! Each plugin has `replicas` actors, each running one child through the
//! state machine `starting → initializing → ready ⇄ degraded → stopping →
//! stopped`, with `backoff` between restarts and `failed` when it gives up.
//! Calls are admitted through the plugin's bounded [`Admission`], routed to
//! the least-loaded ready instance ([`crate::routing`]), and wait for a
//! restarting plugin up to their deadline.

use crate::actor::{self, Command};
use crate::config::{PluginOverride, merge_json};
use crate::error::Error;
use crate::instance::StartError;
use crate::isolation::{Isolation, IsolationOptions, IsolationStatus};
use crate::logs::LogBuffer;
use crate::manifest::Manifest;
use crate::process::{ExitStatus, ProcessManager};
use crate::routing::{Admission, InFlight, Routes};
use crate::state::SnapshotStore;
use crate::transport::Connection;
use plugvisor_proto::plugin_client::PluginClient;
use plugvisor_proto::{Chunk, HandleRequest, HandleResponse};
use prost::bytes::Bytes;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use plugvisor_proto::health_check_response::Status as Health;

/// Where a plugin (or one replica of it) is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PluginState {
    Starting,
    Initializing,
    Ready,
    Degraded,
    Stopping,
    Stopped,
    Backoff,
    Failed,
}

impl PluginState {
    pub fn as_str(&self) -> &'static str {
        match self {
            PluginState::Starting => "starting",
            PluginState::Initializing => "initializing",
            PluginState::Ready => "ready",
            PluginState::Degraded => "degraded",
            PluginState::Stopping => "stopping",
            PluginState::Stopped => "stopped",
            PluginState::Backoff => "backoff",
            PluginState::Failed => "failed",
        }
    }

    /// Up and taking calls.
    pub fn is_up(&self) -> bool {
        matches!(self, PluginState::Ready | PluginState::Degraded)
    }
}

impl std::fmt::Display for PluginState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a child is gone.
#[derive(Debug, Clone)]
pub enum ExitReason {
    Exited(i32),
    Signaled {
        signal: i32,
        core_dumped: bool,
    },
    /// Killed by the kernel's OOM killer, as its cgroup's counters show.
    OomKilled,
    /// Failed `failure_threshold` consecutive health checks and was killed.
    HealthCheck(String),
    /// Never became ready: spawn, handshake, connect or Initialize failed.
    Start(StartError),
}

impl ExitReason {
    pub(crate) fn from_status(status: ExitStatus) -> Self {
        match status {
            ExitStatus::Exited(code) => ExitReason::Exited(code),
            ExitStatus::Signaled {
                signal,
                core_dumped,
            } => ExitReason::Signaled {
                signal,
                core_dumped,
            },
        }
    }

    /// A short label for metrics and filtering: `exit`, `signal`, `oom`,
    /// `health`, `start_timeout`, `initialize_timeout`, `handshake`, `start`.
    pub fn kind(&self) -> &'static str {
        match self {
            ExitReason::Exited(_) => "exit",
            ExitReason::Signaled { .. } => "signal",
            ExitReason::OomKilled => "oom",
            ExitReason::HealthCheck(_) => "health",
            ExitReason::Start(StartError::StartTimeout { .. }) => "start_timeout",
            ExitReason::Start(StartError::InitializeTimeout(_)) => "initialize_timeout",
            ExitReason::Start(StartError::Handshake(_)) => "handshake",
            ExitReason::Start(StartError::Refused(_)) => "refused",
            ExitReason::Start(StartError::OomKilled { .. }) => "oom",
            ExitReason::Start(_) => "start",
        }
    }

    /// Exited with code 0 on its own.
    pub(crate) fn is_clean(&self) -> bool {
        matches!(self, ExitReason::Exited(0))
    }

    /// The plugin was refused (a sha256 mismatch, a writable executable):
    /// restarting cannot help until someone changes it.
    pub(crate) fn is_refusal(&self) -> bool {
        matches!(self, ExitReason::Start(StartError::Refused(_)))
    }

    /// How a ready child's exit reads, given whether its cgroup counted an
    /// OOM kill that explains it.
    pub(crate) fn of_exit(status: ExitStatus, oom_killed: bool) -> Self {
        if oom_killed {
            ExitReason::OomKilled
        } else {
            ExitReason::from_status(status)
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Exited(code) => write!(f, "{}", ExitStatus::Exited(*code)),
            ExitReason::Signaled {
                signal,
                core_dumped,
            } => write!(
                f,
                "{}",
                ExitStatus::Signaled {
                    signal: *signal,
                    core_dumped: *core_dumped
                }
            ),
            ExitReason::OomKilled => write!(f, "killed by the OOM killer (memory limit)"),
            ExitReason::HealthCheck(why) => write!(f, "killed after failed health checks: {why}"),
            ExitReason::Start(e) => write!(f, "{e}"),
        }
    }
}

/// One state transition.
#[derive(Debug, Clone)]
pub struct Event {
    pub time: SystemTime,
    pub plugin: String,
    /// The instance concerned (`<plugin>-<replica>-<start>`); empty when none.
    pub instance: String,
    pub state: PluginState,
    pub reason: String,
}

/// A point-in-time view of one replica.
#[derive(Debug, Clone)]
pub struct ReplicaInfo {
    pub state: PluginState,
    pub reason: String,
    pub instance: String,
    pub pid: Option<i32>,
    pub restarts: u32,
    pub last_exit: Option<String>,
    pub ready_for: Option<Duration>,
}

/// A point-in-time view of one plugin, for `ps` and `inspect`. With one
/// replica the top-level fields are that replica's; with several, `state`
/// summarises them (ready when all are, degraded when some are up).
#[derive(Debug, Clone)]
pub struct PluginInfo {
    pub name: String,
    pub version: String,
    pub state: PluginState,
    /// Why it is in that state.
    pub reason: String,
    pub instance: String,
    pub pid: Option<i32>,
    /// Restarts of all replicas.
    pub restarts: u32,
    pub last_exit: Option<String>,
    pub ready_for: Option<Duration>,
    pub exec: PathBuf,
    pub methods: Vec<String>,
    pub replicas: Vec<ReplicaInfo>,
    /// Limits, what enforces them, live usage and hardening.
    pub isolation: IsolationStatus,
}

/// Settings of the supervisor itself.
#[derive(Debug, Clone)]
pub struct SupervisorOptions {
    /// Plugin sockets live under `<runtime_dir>/plugins/`.
    pub runtime_dir: PathBuf,
    /// Become a child subreaper and reap orphaned plugin descendants. Only one
    /// subreaping supervisor may run in a process; the daemon sets this.
    pub subreaper: bool,
    /// Where procfs is mounted (tests may point elsewhere).
    pub proc_root: PathBuf,
    /// Events kept per plugin.
    pub history: usize,
    /// Output lines kept per plugin.
    pub log_lines: usize,
    /// Where plugin state snapshots are kept; `None` keeps none.
    pub state_dir: Option<PathBuf>,
    /// cgroups (off by default when embedded: see [`crate::isolation::CgroupMode`])
    /// and whether writable executables may run.
    pub isolation: IsolationOptions,
}

impl SupervisorOptions {
    pub fn new(runtime_dir: impl Into<PathBuf>) -> Self {
        SupervisorOptions {
            runtime_dir: runtime_dir.into(),
            subreaper: false,
            proc_root: PathBuf::from("/proc"),
            history: 256,
            log_lines: 2000,
            state_dir: None,
            isolation: IsolationOptions::default(),
        }
    }
}

/// Status of one replica, updated by its actor.
#[derive(Debug, Clone)]
pub(crate) struct ReplicaStatus {
    pub state: PluginState,
    pub reason: String,
    pub instance: String,
    pub pid: Option<i32>,
    pub restarts: u32,
    pub last_exit: Option<String>,
    pub ready_since: Option<Instant>,
}

/// Mutable status of a plugin, behind one lock.
pub(crate) struct SlotStatus {
    /// The manifest the plugin runs now (an upgrade replaces it).
    pub manifest: Arc<Manifest>,
    /// The supervisor config's settings for this plugin, merged over the
    /// manifest (an upgrade or reload may replace them).
    pub overrides: PluginOverride,
    /// Config set at runtime through the control API, merged last.
    pub runtime_config: serde_json::Map<String, serde_json::Value>,
    pub methods: Vec<String>,
    pub replicas: Vec<ReplicaStatus>,
    pub history: VecDeque<Event>,
}

/// One supervised plugin.
pub(crate) struct Slot {
    pub name: String,
    pub status: Mutex<SlotStatus>,
    pub routes: Routes,
    pub admission: Admission,
    /// One command channel per replica actor.
    pub commands: Vec<mpsc::UnboundedSender<Command>>,
    pub logs: Arc<LogBuffer>,
    /// One snapshot store per replica, when the supervisor has a state dir.
    pub snapshots: Vec<Option<SnapshotStore>>,
    /// Serialises snapshot writes, so they land in export order.
    pub snapshot_lock: tokio::sync::Mutex<()>,
}

impl Slot {
    pub fn manifest(&self) -> Arc<Manifest> {
        lock(&self.status).manifest.clone()
    }

    /// The config sent in Initialize: the manifest's, with overrides merged.
    /// The config sent in Initialize: manifest defaults < supervisor config
    /// overrides < runtime overrides.
    pub fn config_for(&self, manifest: &Manifest) -> serde_json::Map<String, serde_json::Value> {
        let mut config = manifest.config.clone();
        let st = lock(&self.status);
        merge_json(&mut config, &st.overrides.config);
        merge_json(&mut config, &st.runtime_config);
        config
    }

    /// The manifest's environment with the overrides' on top.
    pub fn env_for(&self, manifest: &Manifest) -> Vec<(String, String)> {
        let mut env = manifest.env.clone();
        env.extend(lock(&self.status).overrides.env.clone());
        env.into_iter().collect()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Status updates are single assignments; a panic elsewhere cannot leave
    // them half-done, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) struct Shared {
    pub opts: SupervisorOptions,
    pub processes: ProcessManager,
    /// The limits' mechanism, chosen once at start-up, and live cgroups.
    pub isolation: Isolation,
    slots: RwLock<BTreeMap<String, Arc<Slot>>>,
    events: broadcast::Sender<Event>,
    pub cancel: CancellationToken,
    /// Replica actors and the orphan sweeper: awaited on shutdown.
    actors: TaskTracker,
    /// Output readers and exit waiters: end with their children.
    pub io_tasks: TaskTracker,
    pub metrics: crate::metrics::Metrics,
}

impl Shared {
    /// Records a replica's transition: status, bounded history, log, event.
    pub fn transition(
        &self,
        slot: &Slot,
        replica: usize,
        state: PluginState,
        instance: &str,
        reason: String,
    ) {
        let event = Event {
            time: SystemTime::now(),
            plugin: slot.name.clone(),
            instance: instance.to_string(),
            state,
            reason: reason.clone(),
        };
        {
            let mut st = lock(&slot.status);
            let r = &mut st.replicas[replica];
            r.state = state;
            r.reason = reason.clone();
            if st.history.len() >= self.opts.history {
                st.history.pop_front();
            }
            st.history.push_back(event.clone());
        }
        tracing::info!(plugin = %slot.name, instance, state = state.as_str(), "{reason}");
        let _ = self.events.send(event);
    }
}

/// Supervises a set of plugins. Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct Supervisor {
    shared: Arc<Shared>,
}

impl Supervisor {
    /// Creates a supervisor. Must be called inside a tokio runtime.
    pub fn new(opts: SupervisorOptions) -> std::io::Result<Supervisor> {
        let io_tasks = TaskTracker::new();
        let processes = ProcessManager::new(io_tasks.clone())?;
        let isolation =
            Isolation::start(&opts.isolation, &opts.proc_root).map_err(std::io::Error::other)?;
        let shared = Arc::new(Shared {
            processes,
            isolation,
            slots: RwLock::default(),
            events: broadcast::channel(4096).0,
            cancel: CancellationToken::new(),
            actors: TaskTracker::new(),
            io_tasks,
            metrics: crate::metrics::Metrics::default(),
            opts,
        });
        if shared.opts.subreaper {
            ProcessManager::become_subreaper()?;
            let mut sigchld =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
            let sweeper = shared.clone();
            shared.actors.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = sweeper.cancel.cancelled() => break,
                        _ = sigchld.recv() => {}
                        _ = tick.tick() => {}
                    }
                    sweeper.processes.sweep_orphans(&sweeper.opts.proc_root);
                }
            });
        }
        Ok(Supervisor { shared })
    }

    /// Adds a plugin and starts its replicas. The supervisor config's
    /// `overrides` are merged over the manifest.
    pub fn add(&self, manifest: Manifest, overrides: &PluginOverride) -> Result<(), Error> {
        if self.shared.cancel.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let mut slots = self.shared.slots.write().unwrap_or_else(|e| e.into_inner());
        if slots.contains_key(&manifest.name) {
            return Err(Error::Invalid(format!(
                "a plugin named `{}` is already supervised",
                manifest.name
            )));
        }
        let name = manifest.name.clone();
        let replicas = manifest.replicas as usize;
        let mut commands = Vec::with_capacity(replicas);
        let mut receivers = Vec::with_capacity(replicas);
        for _ in 0..replicas {
            let (tx, rx) = mpsc::unbounded_channel();
            commands.push(tx);
            receivers.push(rx);
        }
        let snapshots = (0..replicas)
            .map(|replica| {
                self.shared.opts.state_dir.as_deref().map(|dir| {
                    // Replica 0 keeps the plain name, so going from one
                    // replica to several keeps the existing snapshots.
                    let key = if replica == 0 {
                        name.clone()
                    } else {
                        format!("{name}@{replica}")
                    };
                    SnapshotStore::new(dir, &key)
                })
            })
            .collect();
        let slot = Arc::new(Slot {
            name: name.clone(),
            routes: Routes::new(&name, replicas),
            admission: Admission::new(
                &name,
                manifest.calls.max_in_flight,
                manifest.calls.max_queue,
            ),
            status: Mutex::new(SlotStatus {
                manifest: Arc::new(manifest),
                overrides: overrides.clone(),
                runtime_config: serde_json::Map::new(),
                methods: Vec::new(),
                replicas: vec![
                    ReplicaStatus {
                        state: PluginState::Starting,
                        reason: "added".into(),
                        instance: String::new(),
                        pid: None,
                        restarts: 0,
                        last_exit: None,
                        ready_since: None,
                    };
                    replicas
                ],
                history: VecDeque::new(),
            }),
            commands,
            logs: Arc::new(LogBuffer::new(self.shared.opts.log_lines)),
            snapshots,
            snapshot_lock: tokio::sync::Mutex::new(()),
        });
        slots.insert(name, slot.clone());
        drop(slots);
        for (replica, rx) in receivers.into_iter().enumerate() {
            self.shared.actors.spawn(actor::run_replica(
                self.shared.clone(),
                slot.clone(),
                replica,
                rx,
            ));
        }
        Ok(())
    }

    fn slot(&self, name: &str) -> Result<Arc<Slot>, Error> {
        self.shared
            .slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| Error::UnknownPlugin(name.to_string()))
    }

    /// Every plugin's current status, by name.
    pub fn list(&self) -> Vec<PluginInfo> {
        let slots: Vec<_> = self
            .shared
            .slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        slots
            .iter()
            .map(|s| info_of(s, &self.shared.isolation))
            .collect()
    }

    /// One plugin's status.
    pub fn info(&self, name: &str) -> Result<PluginInfo, Error> {
        Ok(info_of(&*self.slot(name)?, &self.shared.isolation))
    }

    /// Every future state transition of every plugin.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    /// The kept transitions of one plugin, oldest first.
    pub fn history(&self, name: &str) -> Result<Vec<Event>, Error> {
        let slot = self.slot(name)?;
        let st = lock(&slot.status);
        Ok(st.history.iter().cloned().collect())
    }

    /// The plugin's output buffer.
    pub fn logs(&self, name: &str) -> Result<Arc<LogBuffer>, Error> {
        Ok(self.slot(name)?.logs.clone())
    }

    /// Waits until some replica of the plugin is ready (or degraded).
    pub async fn wait_ready(&self, name: &str, timeout: Duration) -> Result<(), Error> {
        let slot = self.slot(name)?;
        pick(&slot, Instant::now() + timeout, timeout, None).await?;
        Ok(())
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
        let slot = self.slot(plugin)?;
        let started = Instant::now();
        // One look at the status serves the call and its metrics. Only
        // methods the plugin lists get their own label; callers cannot grow
        // the label set without bound.
        let (manifest, listed) = {
            let st = lock(&slot.status);
            (st.manifest.clone(), st.methods.iter().any(|m| m == method))
        };
        let result = self
            .call_slot(&slot, &manifest, method, payload, metadata, timeout)
            .await;
        let code = result
            .as_ref()
            .map_or_else(Error::code, |_| tonic::Code::Ok);
        self.shared.metrics.call(
            plugin,
            if listed { method } else { "other" },
            code,
            started.elapsed(),
        );
        result
    }

    async fn call_slot(
        &self,
        slot: &Slot,
        manifest: &Manifest,
        method: &str,
        mut payload: Bytes,
        mut metadata: HashMap<String, String>,
        timeout: Option<Duration>,
    ) -> Result<HandleResponse, Error> {
        let plugin = slot.name.as_str();
        let timeout = timeout.unwrap_or(manifest.timeouts.call.0);
        let deadline = Instant::now() + timeout;
        let _permit = slot.admission.admit(deadline, timeout).await?;
        let retry = manifest.idempotent.iter().any(|m| m == method);
        let mut lost: Option<String> = None;
        loop {
            let ready = pick(slot, deadline, timeout, lost.as_deref()).await?;
            // Only a call that may be sent again keeps a copy of its input.
            let (payload, metadata) = if retry {
                (payload.clone(), metadata.clone())
            } else {
                (std::mem::take(&mut payload), std::mem::take(&mut metadata))
            };
            let mut client = ready.client.clone();
            let mut request = tonic::Request::new(HandleRequest {
                method: method.to_string(),
                payload,
                metadata,
            });
            request.set_timeout(deadline.saturating_duration_since(Instant::now()));
            let result = tokio::time::timeout_at(deadline.into(), client.handle(request)).await;
            return match result {
                Ok(Ok(response)) => {
                    let response = response.into_inner();
                    if response.state_changed && manifest.state.snapshot_on_change {
                        actor::snapshot(slot, ready.replica, &ready.client, &ready.id)
                            .await
                            .map_err(|why| Error::Lost {
                                plugin: plugin.to_string(),
                                instance: ready.id.clone(),
                                reason: format!(
                                    "the call succeeded but its state could not be snapshotted: {why}"
                                ),
                            })?;
                    }
                    Ok(response)
                }
                Ok(Err(status)) => match call_error(status, plugin, &ready.id) {
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

    /// Streams `input` to `method` and returns the reply stream. The first
    /// chunk sent carries the method and metadata; nothing is buffered whole.
    /// `timeout` bounds waiting for a ready instance and the reply's start.
    pub async fn call_stream<S>(
        &self,
        plugin: &str,
        method: &str,
        metadata: HashMap<String, String>,
        input: S,
        timeout: Option<Duration>,
    ) -> Result<impl tokio_stream::Stream<Item = Result<Bytes, Error>> + use<S>, Error>
    where
        S: tokio_stream::Stream<Item = Bytes> + Send + 'static,
    {
        let slot = self.slot(plugin)?;
        let timeout = timeout.unwrap_or(slot.manifest().timeouts.call.0);
        let deadline = Instant::now() + timeout;
        let ready = pick(&slot, deadline, timeout, None).await?;
        let mut client = ready.client.clone();
        let first = Chunk {
            method: method.to_string(),
            data: Bytes::new(),
            metadata,
        };
        let chunks = tokio_stream::once(first).chain(input.map(|data| Chunk {
            data,
            ..Chunk::default()
        }));
        let response = tokio::time::timeout_at(deadline.into(), client.handle_stream(chunks))
            .await
            .map_err(|_| Error::Timeout {
                plugin: plugin.to_string(),
                method: method.to_string(),
                timeout,
            })?
            .map_err(|status| call_error(status, plugin, &ready.id))?;
        let plugin = plugin.to_string();
        // The stream keeps its instance counted as busy until it ends.
        Ok(response.into_inner().map(move |chunk| {
            chunk
                .map(|c| c.data)
                .map_err(|status| call_error(status, &plugin, &ready.id))
        }))
    }

    /// Asks a ready instance of the plugin for its state (ExportState).
    pub async fn export_state(
        &self,
        plugin: &str,
        timeout: Option<Duration>,
    ) -> Result<plugvisor_proto::ExportStateResponse, Error> {
        let slot = self.slot(plugin)?;
        let timeout = timeout.unwrap_or(slot.manifest().timeouts.call.0);
        let deadline = Instant::now() + timeout;
        let ready = pick(&slot, deadline, timeout, None).await?;
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
        let slot = self.slot(plugin)?;
        let timeout = slot.manifest().health.timeout.0;
        let ready = pick(&slot, Instant::now() + timeout, timeout, None).await?;
        actor::probe(&ready.client, timeout)
            .await
            .map_err(|reason| Error::Lost {
                plugin: plugin.to_string(),
                instance: ready.id.clone(),
                reason,
            })
    }

    /// Sends a command to every replica and waits for each to answer, one
    /// replica after the other (so a rolling restart keeps the others up).
    async fn command<T>(
        &self,
        name: &str,
        make: impl Fn(oneshot::Sender<T>) -> Command,
    ) -> Result<Vec<T>, Error> {
        let slot = self.slot(name)?;
        let mut answers = Vec::with_capacity(slot.commands.len());
        for commands in &slot.commands {
            let (tx, rx) = oneshot::channel();
            commands.send(make(tx)).map_err(|_| Error::ShuttingDown)?;
            answers.push(rx.await.map_err(|_| Error::ShuttingDown)?);
        }
        Ok(answers)
    }

    /// Stops a plugin gracefully; it stays stopped until started.
    pub async fn stop(&self, name: &str) -> Result<(), Error> {
        self.command(name, Command::Stop).await.map(drop)
    }

    /// Starts a stopped or failed plugin (no-op when running).
    pub async fn start(&self, name: &str) -> Result<(), Error> {
        self.command(name, Command::Start).await.map(drop)
    }

    /// Stops the plugin if it runs, clears its restart history (and a
    /// `failed` state), and starts it again, one replica at a time. Returns
    /// once each replica's new start began.
    pub async fn restart(&self, name: &str) -> Result<(), Error> {
        self.command(name, Command::Restart).await.map(drop)
    }

    /// Replaces a running plugin with `manifest` (a new version or binary)
    /// without dropping calls, one replica at a time: the new instance starts
    /// with the old one's freshly exported state, calls switch to it once it
    /// is ready, and the old one is drained and stopped after the probation
    /// window. If the new one fails to start, initialize or stay healthy
    /// meanwhile, calls stay on (or go back to) the old one and the error
    /// says why.
    pub async fn upgrade(&self, name: &str, manifest: Manifest) -> Result<(), Error> {
        let overrides = lock(&self.slot(name)?.status).overrides.clone();
        self.upgrade_with(name, manifest, overrides).await
    }

    /// [`Self::upgrade`] with new supervisor-config overrides for the plugin.
    pub async fn upgrade_with(
        &self,
        name: &str,
        manifest: Manifest,
        overrides: PluginOverride,
    ) -> Result<(), Error> {
        let slot = self.slot(name)?;
        if manifest.name != slot.name {
            return Err(Error::Invalid(format!(
                "the manifest is for `{}`, not `{name}`",
                manifest.name
            )));
        }
        if manifest.replicas as usize != slot.commands.len() {
            return Err(Error::Invalid(format!(
                "an upgrade cannot change replicas ({} to {}); restart the supervisor with the new manifest",
                slot.commands.len(),
                manifest.replicas
            )));
        }
        let manifest = Arc::new(manifest);
        let previous = std::mem::replace(&mut lock(&slot.status).overrides, overrides);
        let answers = self
            .command(name, |reply| Command::Upgrade(manifest.clone(), reply))
            .await?;
        match answers.into_iter().find_map(Result::err) {
            Some(why) => {
                lock(&slot.status).overrides = previous;
                Err(Error::UpgradeFailed {
                    plugin: name.to_string(),
                    reason: why,
                })
            }
            None => Ok(()),
        }
    }

    /// The Prometheus text exposition: event-fed series plus gauges read now.
    pub fn metrics_text(&self) -> String {
        let samples: Vec<crate::metrics::PluginSample> = self
            .list()
            .into_iter()
            .map(|info| {
                let usage = info.isolation.usage.clone().unwrap_or_default();
                let sha256 = self
                    .slot(&info.name)
                    .ok()
                    .and_then(|s| s.manifest().sha256.clone())
                    .unwrap_or_default();
                crate::metrics::PluginSample {
                    up: info.replicas.iter().any(|r| r.state.is_up()),
                    plugin: info.name,
                    version: info.version,
                    state: info.state.to_string(),
                    sha256,
                    enforcement: info.isolation.mechanism,
                    memory_bytes: usage.memory_current,
                    cpu_seconds: usage.cpu.map(|d| d.as_secs_f64()),
                    pids: usage.pids_current,
                }
            })
            .collect();
        self.shared.metrics.encode(&samples)
    }

    /// The config the plugin's next start gets (manifest < supervisor
    /// config < runtime overrides).
    pub fn config(&self, name: &str) -> Result<serde_json::Map<String, serde_json::Value>, Error> {
        let slot = self.slot(name)?;
        let manifest = slot.manifest();
        Ok(slot.config_for(&manifest))
    }

    /// Merges `changes` into the plugin's runtime config overrides (the top
    /// layer; a `null` value removes a key) and rolls the result out
    /// replica by replica without downtime, handing each new instance the
    /// old one's state. If the new config is rejected (Initialize fails),
    /// the overrides are put back and the old instances keep serving.
    pub async fn set_runtime_config(
        &self,
        name: &str,
        changes: serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), Error> {
        let slot = self.slot(name)?;
        let previous = {
            let mut st = lock(&slot.status);
            let previous = st.runtime_config.clone();
            for (key, value) in changes {
                if value.is_null() {
                    st.runtime_config.remove(&key);
                } else {
                    st.runtime_config.insert(key, value);
                }
            }
            previous
        };
        let manifest = (*slot.manifest()).clone();
        let result = self.upgrade(name, manifest).await;
        if result.is_err() {
            lock(&slot.status).runtime_config = previous;
        }
        result
    }

    /// Stops a plugin (with a last snapshot) and stops supervising it.
    pub async fn remove(&self, name: &str) -> Result<(), Error> {
        self.command(name, Command::Remove).await?;
        self.shared
            .slots
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        Ok(())
    }

    /// The names of the supervised plugins.
    pub fn names(&self) -> Vec<String> {
        self.shared
            .slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Stops every plugin gracefully (in parallel) and waits for all of them.
    pub async fn shutdown(&self) {
        self.shared.cancel.cancel();
        self.shared.actors.close();
        self.shared.actors.wait().await;
        self.shared.io_tasks.close();
        // Readers of output pipes end when the last holder of the pipe exits;
        // do not wait forever on a descendant that escaped its process group.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.shared.io_tasks.wait()).await;
        self.shared.isolation.shutdown();
    }
}

/// A ready instance of `slot`, waiting for one until `deadline`.
async fn pick(
    slot: &Slot,
    deadline: Instant,
    timeout: Duration,
    avoid: Option<&str>,
) -> Result<InFlight, Error> {
    slot.routes
        .pick(deadline, timeout, avoid, || {
            let st = lock(&slot.status);
            let states: Vec<String> = st
                .replicas
                .iter()
                .map(|r| format!("{}: {}", r.state, r.reason))
                .collect();
            states.join("; ")
        })
        .await
}

fn info_of(slot: &Slot, isolation: &Isolation) -> PluginInfo {
    let st = lock(&slot.status);
    let replicas: Vec<ReplicaInfo> = st
        .replicas
        .iter()
        .map(|r| ReplicaInfo {
            state: r.state,
            reason: r.reason.clone(),
            instance: r.instance.clone(),
            pid: r.pid,
            restarts: r.restarts,
            last_exit: r.last_exit.clone(),
            ready_for: r.ready_since.map(|t| t.elapsed()),
        })
        .collect();
    let first = &replicas[0];
    let (state, reason) = if replicas.len() == 1 {
        (first.state, first.reason.clone())
    } else {
        let up = replicas.iter().filter(|r| r.state.is_up()).count();
        let all_ready = replicas.iter().all(|r| r.state == PluginState::Ready);
        if all_ready {
            (
                PluginState::Ready,
                format!("{up}/{} replicas ready", replicas.len()),
            )
        } else if up > 0 {
            (
                PluginState::Degraded,
                format!("{up}/{} replicas up", replicas.len()),
            )
        } else {
            (first.state, first.reason.clone())
        }
    };
    PluginInfo {
        name: slot.name.clone(),
        version: st.manifest.version.to_string(),
        state,
        reason,
        instance: first.instance.clone(),
        pid: first.pid,
        restarts: replicas.iter().map(|r| r.restarts).sum(),
        last_exit: replicas.iter().find_map(|r| r.last_exit.clone()),
        ready_for: first.ready_for,
        exec: st.manifest.exec.clone(),
        methods: st.methods.clone(),
        isolation: isolation.status(&st.manifest, replicas.iter().map(|r| r.instance.as_str())),
        replicas,
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

/// Used by the actor for probes and exports on an instance it owns.
pub(crate) type Client = PluginClient<Connection>;
