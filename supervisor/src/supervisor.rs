//! The supervisor: one actor task per plugin runs its state machine
//! (`starting → initializing → ready ⇄ degraded → stopping → stopped`, with
//! `backoff` between restarts and `failed` when it gives up), and calls are
//! routed to the plugin's ready instance through a watch channel, so a call
//! made while a plugin restarts waits for it up to the call's deadline.

use crate::config::{PluginOverride, merge_json};
use crate::error::Error;
use crate::instance::{self, Instance, StartContext, StartError};
use crate::logs::LogBuffer;
use crate::manifest::Manifest;
use crate::policy::{Decision, Jitter, RestartTracker};
use crate::process::{ExitStatus, ProcessManager, wait_exit};
use crate::state::SnapshotStore;
pub use plugvisor_proto::health_check_response::Status as Health;
use plugvisor_proto::plugin_client::PluginClient;
use plugvisor_proto::{Chunk, HandleRequest, HandleResponse, HealthCheckRequest};
use prost::bytes::Bytes;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;

/// Where a plugin is in its life.
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
    fn from_status(status: ExitStatus) -> Self {
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
            ExitReason::Start(_) => "start",
        }
    }

    /// Exited with code 0 on its own.
    fn is_clean(&self) -> bool {
        matches!(self, ExitReason::Exited(0))
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
    /// The instance concerned; empty when there is none.
    pub instance: String,
    pub state: PluginState,
    pub reason: String,
}

/// A point-in-time view of one plugin, for `ps` and `inspect`.
#[derive(Debug, Clone)]
pub struct PluginInfo {
    pub name: String,
    pub version: String,
    pub state: PluginState,
    /// Why it is in that state.
    pub reason: String,
    pub instance: String,
    pub pid: Option<i32>,
    pub restarts: u32,
    pub last_exit: Option<String>,
    pub ready_for: Option<Duration>,
    pub exec: PathBuf,
    pub methods: Vec<String>,
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
        }
    }
}

/// A ready instance that calls can go to.
struct ReadyInstance {
    id: String,
    client: PluginClient<Channel>,
}

/// What a call sees of a plugin.
#[derive(Clone)]
enum Route {
    Ready(Arc<ReadyInstance>),
    /// Starting, restarting or in backoff: calls wait.
    Pending,
    /// Stopped or failed: calls fail at once.
    Down {
        state: PluginState,
        reason: String,
    },
}

enum Command {
    Start(oneshot::Sender<()>),
    Stop(oneshot::Sender<()>),
    Restart(oneshot::Sender<()>),
}

/// Mutable status of a plugin, behind one lock.
struct SlotStatus {
    manifest: Arc<Manifest>,
    state: PluginState,
    reason: String,
    instance: String,
    pid: Option<i32>,
    restarts: u32,
    last_exit: Option<String>,
    ready_since: Option<Instant>,
    methods: Vec<String>,
    history: VecDeque<Event>,
}

struct Slot {
    name: String,
    /// Manifest config with the supervisor config's overrides merged in.
    config: serde_json::Map<String, serde_json::Value>,
    env: Vec<(String, String)>,
    call_timeout: Duration,
    /// Methods that may be sent again after their instance died mid-call.
    idempotent: std::collections::HashSet<String>,
    status: Mutex<SlotStatus>,
    route: watch::Sender<Route>,
    commands: mpsc::UnboundedSender<Command>,
    logs: Arc<LogBuffer>,
    /// Snapshot store, when the supervisor has a state dir.
    snapshots: Option<SnapshotStore>,
    /// Serialises snapshot writes, so they land in export order.
    snapshot_lock: tokio::sync::Mutex<()>,
    snapshot_on_change: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Status updates are single assignments; a panic elsewhere cannot leave
    // them half-done, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Shared {
    opts: SupervisorOptions,
    processes: ProcessManager,
    slots: RwLock<BTreeMap<String, Arc<Slot>>>,
    events: broadcast::Sender<Event>,
    cancel: CancellationToken,
    /// Plugin actors and the orphan sweeper: awaited on shutdown.
    actors: TaskTracker,
    /// Output readers and exit waiters: end with their children.
    io_tasks: TaskTracker,
}

impl Shared {
    fn transition(&self, slot: &Slot, state: PluginState, instance: &str, reason: String) {
        let event = Event {
            time: SystemTime::now(),
            plugin: slot.name.clone(),
            instance: instance.to_string(),
            state,
            reason: reason.clone(),
        };
        {
            let mut st = lock(&slot.status);
            st.state = state;
            st.reason = reason.clone();
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
        let shared = Arc::new(Shared {
            processes,
            slots: RwLock::default(),
            events: broadcast::channel(4096).0,
            cancel: CancellationToken::new(),
            actors: TaskTracker::new(),
            io_tasks,
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

    /// Adds a plugin and starts it. The supervisor config's `overrides` are
    /// merged over the manifest.
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
        let mut config = manifest.config.clone();
        merge_json(&mut config, &overrides.config);
        let mut env = manifest.env.clone();
        env.extend(overrides.env.clone());
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let name = manifest.name.clone();
        let snapshot_on_change = manifest.state.snapshot_on_change;
        let slot = Arc::new(Slot {
            name: name.clone(),
            config,
            env: env.into_iter().collect(),
            call_timeout: manifest.timeouts.call.0,
            idempotent: manifest.idempotent.iter().cloned().collect(),
            status: Mutex::new(SlotStatus {
                manifest: Arc::new(manifest),
                state: PluginState::Starting,
                reason: "added".into(),
                instance: String::new(),
                pid: None,
                restarts: 0,
                last_exit: None,
                ready_since: None,
                methods: Vec::new(),
                history: VecDeque::new(),
            }),
            route: watch::channel(Route::Pending).0,
            commands,
            logs: Arc::new(LogBuffer::new(self.shared.opts.log_lines)),
            snapshots: self
                .shared
                .opts
                .state_dir
                .as_deref()
                .map(|dir| SnapshotStore::new(dir, &name)),
            snapshot_lock: tokio::sync::Mutex::new(()),
            snapshot_on_change,
        });
        slots.insert(name, slot.clone());
        drop(slots);
        self.shared
            .actors
            .spawn(run_plugin(self.shared.clone(), slot, commands_rx));
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
        slots.iter().map(|s| info_of(s)).collect()
    }

    /// One plugin's status.
    pub fn info(&self, name: &str) -> Result<PluginInfo, Error> {
        Ok(info_of(&*self.slot(name)?))
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

    /// Waits until the plugin is ready (or degraded), up to `timeout`.
    pub async fn wait_ready(&self, name: &str, timeout: Duration) -> Result<(), Error> {
        let slot = self.slot(name)?;
        ready_instance(&slot, Instant::now() + timeout, timeout).await?;
        Ok(())
    }

    /// Calls `method` on a plugin. Waits for a restarting plugin up to the
    /// deadline (`timeout`, else the manifest's `timeouts.call`). A call is
    /// sent once: it is never retried on another instance.
    pub async fn call(
        &self,
        plugin: &str,
        method: &str,
        mut payload: Bytes,
        mut metadata: HashMap<String, String>,
        timeout: Option<Duration>,
    ) -> Result<HandleResponse, Error> {
        let slot = self.slot(plugin)?;
        let timeout = timeout.unwrap_or(slot.call_timeout);
        let deadline = Instant::now() + timeout;
        let retry = slot.idempotent.contains(method);
        let mut lost_instance: Option<String> = None;
        loop {
            let ready = match &lost_instance {
                None => ready_instance(&slot, deadline, timeout).await?,
                Some(lost) => next_instance(&slot, lost, deadline, timeout).await?,
            };
            let mut client = ready.client.clone();
            // Only a call that may be sent again keeps a copy of its input.
            let (payload, metadata) = if retry {
                (payload.clone(), metadata.clone())
            } else {
                (std::mem::take(&mut payload), std::mem::take(&mut metadata))
            };
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
                    if response.state_changed && slot.snapshot_on_change {
                        snapshot(&slot, &ready.client, &ready.id)
                            .await
                            .map_err(|why| Error::Lost {
                                plugin: plugin.to_string(),
                                instance: ready.id.clone(),
                                reason: format!("the call succeeded but its state could not be snapshotted: {why}"),
                            })?;
                    }
                    Ok(response)
                }
                Ok(Err(status)) => match call_error(status, plugin, &ready.id) {
                    Error::Lost { .. } if retry => {
                        tracing::debug!(plugin, method, instance = %ready.id, "instance lost mid-call; retrying the idempotent method");
                        lost_instance = Some(ready.id.clone());
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
        let timeout = timeout.unwrap_or(slot.call_timeout);
        let deadline = Instant::now() + timeout;
        let ready = ready_instance(&slot, deadline, timeout).await?;
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
        let instance = ready.id.clone();
        Ok(response.into_inner().map(move |chunk| {
            chunk
                .map(|c| c.data)
                .map_err(|status| call_error(status, &plugin, &instance))
        }))
    }

    /// Asks the plugin's ready instance for its state (ExportState).
    pub async fn export_state(
        &self,
        plugin: &str,
        timeout: Option<Duration>,
    ) -> Result<plugvisor_proto::ExportStateResponse, Error> {
        let slot = self.slot(plugin)?;
        let timeout = timeout.unwrap_or(slot.call_timeout);
        let deadline = Instant::now() + timeout;
        let ready = ready_instance(&slot, deadline, timeout).await?;
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

    /// Probes the plugin's HealthCheck now, as the supervisor's own probes do.
    pub async fn health_check(&self, plugin: &str) -> Result<(Health, String), Error> {
        let slot = self.slot(plugin)?;
        let timeout = lock(&slot.status).manifest.health.timeout.0;
        let ready = ready_instance(&slot, Instant::now() + timeout, timeout).await?;
        probe(&ready.client, timeout)
            .await
            .map_err(|reason| Error::Lost {
                plugin: plugin.to_string(),
                instance: ready.id.clone(),
                reason,
            })
    }

    async fn command(
        &self,
        name: &str,
        make: fn(oneshot::Sender<()>) -> Command,
    ) -> Result<(), Error> {
        let slot = self.slot(name)?;
        let (tx, rx) = oneshot::channel();
        slot.commands
            .send(make(tx))
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)
    }

    /// Stops a plugin gracefully; it stays stopped until started.
    pub async fn stop(&self, name: &str) -> Result<(), Error> {
        self.command(name, Command::Stop).await
    }

    /// Starts a stopped or failed plugin (no-op when running).
    pub async fn start(&self, name: &str) -> Result<(), Error> {
        self.command(name, Command::Start).await
    }

    /// Stops the plugin if it runs, clears its restart history (and a
    /// `failed` state), and starts it again. Returns once the new start began.
    pub async fn restart(&self, name: &str) -> Result<(), Error> {
        self.command(name, Command::Restart).await
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
    }
}

fn info_of(slot: &Slot) -> PluginInfo {
    let st = lock(&slot.status);
    PluginInfo {
        name: slot.name.clone(),
        version: st.manifest.version.to_string(),
        state: st.state,
        reason: st.reason.clone(),
        instance: st.instance.clone(),
        pid: st.pid,
        restarts: st.restarts,
        last_exit: st.last_exit.clone(),
        ready_for: st.ready_since.map(|t| t.elapsed()),
        exec: st.manifest.exec.clone(),
        methods: st.methods.clone(),
    }
}

/// Maps a failed call's status: the plugin's own statuses pass unchanged;
/// transport failures (the child died mid-call) become [`Error::Lost`].
fn call_error(status: tonic::Status, plugin: &str, instance: &str) -> Error {
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

/// The plugin's ready instance, waiting for one until `deadline`.
async fn ready_instance(
    slot: &Slot,
    deadline: Instant,
    timeout: Duration,
) -> Result<Arc<ReadyInstance>, Error> {
    if let Route::Ready(r) = &*slot.route.borrow() {
        return Ok(r.clone());
    }
    let mut rx = slot.route.subscribe();
    loop {
        match &*rx.borrow_and_update() {
            Route::Ready(r) => return Ok(r.clone()),
            Route::Down { state, reason } => {
                return Err(Error::NotRunning {
                    plugin: slot.name.clone(),
                    state: state.to_string(),
                    reason: reason.clone(),
                });
            }
            Route::Pending => {}
        }
        match tokio::time::timeout_at(deadline.into(), rx.changed()).await {
            Ok(Ok(())) => continue,
            Ok(Err(_)) => return Err(Error::ShuttingDown),
            Err(_) => {
                let st = lock(&slot.status);
                return Err(Error::NotReady {
                    plugin: slot.name.clone(),
                    waited: timeout,
                    reason: format!("{}: {}", st.state, st.reason),
                });
            }
        }
    }
}

/// Exports the instance's state and writes it as the plugin's newest
/// snapshot. Returns the snapshot's sequence number (`None` without a store).
async fn snapshot(
    slot: &Slot,
    client: &PluginClient<Channel>,
    instance: &str,
) -> Result<Option<u64>, String> {
    let Some(store) = &slot.snapshots else {
        return Ok(None);
    };
    let _order = slot.snapshot_lock.lock().await;
    let mut client = client.clone();
    let mut request = tonic::Request::new(plugvisor_proto::ExportStateRequest {});
    request.set_timeout(slot.call_timeout);
    let state = tokio::time::timeout(slot.call_timeout, client.export_state(request))
        .await
        .map_err(|_| {
            format!(
                "ExportState did not answer within {}ms",
                slot.call_timeout.as_millis()
            )
        })?
        .map_err(|s| format!("ExportState failed: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let store = store.clone();
    let seq = tokio::task::spawn_blocking(move || store.write(&state.state, state.state_version))
        .await
        .map_err(|e| format!("the snapshot writer failed: {e}"))?
        .map_err(|e| e.to_string())?;
    tracing::debug!(plugin = %slot.name, instance, seq, "state snapshot written");
    Ok(Some(seq))
}

/// The newest good snapshot as Initialize's restored state, and a note for
/// the event trail (which snapshot, and any newer ones found corrupt).
async fn restored_state(slot: &Slot) -> (Option<plugvisor_proto::RestoredState>, String) {
    let Some(store) = slot.snapshots.clone() else {
        return (None, String::new());
    };
    let loaded = tokio::task::spawn_blocking(move || store.load())
        .await
        .unwrap_or_default();
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
        tracing::warn!(plugin = %slot.name, "skipped corrupt snapshots: {}", loaded.skipped.join("; "));
        note.push_str(&format!(
            "; skipped corrupt snapshot(s): {}",
            loaded.skipped.join("; ")
        ));
    }
    let restored = loaded.snapshot.map(|s| plugvisor_proto::RestoredState {
        state: s.state.into(),
        state_version: s.state_version,
    });
    (restored, note)
}

/// A ready instance other than `lost`, waiting for one until `deadline`.
async fn next_instance(
    slot: &Slot,
    lost: &str,
    deadline: Instant,
    timeout: Duration,
) -> Result<Arc<ReadyInstance>, Error> {
    let mut rx = slot.route.subscribe();
    loop {
        let still_lost = matches!(&*rx.borrow_and_update(), Route::Ready(r) if r.id == lost);
        if !still_lost {
            return ready_instance(slot, deadline, timeout).await;
        }
        match tokio::time::timeout_at(deadline.into(), rx.changed()).await {
            Ok(Ok(())) => continue,
            Ok(Err(_)) => return Err(Error::ShuttingDown),
            Err(_) => {
                return Err(Error::NotReady {
                    plugin: slot.name.clone(),
                    waited: timeout,
                    reason: format!("instance `{lost}` was lost and none replaced it"),
                });
            }
        }
    }
}

/// How a ready instance's run ended.
enum RunEnd {
    Exited(ExitStatus),
    HealthFailed(String),
    Stop(oneshot::Sender<()>),
    Restart(oneshot::Sender<()>),
    Cancelled,
}

/// What to do after an instance is gone.
enum Next {
    /// Start again now.
    Start,
    /// Stay down until an operator starts it.
    Idle,
    /// The supervisor is shutting down.
    Exit,
}

/// The actor of one plugin: starts it, watches it, restarts it.
async fn run_plugin(
    shared: Arc<Shared>,
    slot: Arc<Slot>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let manifest = lock(&slot.status).manifest.clone();
    let mut tracker = RestartTracker::new(manifest.restart.clone());
    let mut jitter = Jitter::from_entropy();
    let mut starts: u64 = 0;
    let mut next = Next::Start;
    loop {
        match next {
            Next::Exit => break,
            Next::Idle => {
                next = idle(&shared, &slot, &mut commands, &mut tracker).await;
                continue;
            }
            Next::Start => {}
        }
        starts += 1;
        let instance_id = format!("{}-0-{starts}", slot.name);
        let (reason, ready_since) =
            match start_and_run(&shared, &slot, &manifest, &instance_id, &mut commands).await {
                Ok(Outcome::Gone {
                    reason,
                    ready_since,
                }) => (reason, ready_since),
                Ok(Outcome::Decided(n)) => {
                    next = n;
                    if matches!(next, Next::Start) {
                        tracker.clear();
                    }
                    continue;
                }
                Err(e) => (ExitReason::Start(e), None),
            };
        {
            let mut st = lock(&slot.status);
            st.last_exit = Some(reason.to_string());
            st.pid = None;
            st.ready_since = None;
        }
        slot.route.send_replace(Route::Pending);
        next = match tracker.on_exit(
            Instant::now(),
            reason.is_clean(),
            ready_since,
            jitter.sample(),
        ) {
            Decision::Restart { delay, attempt } => {
                lock(&slot.status).restarts += 1;
                shared.transition(
                    &slot,
                    PluginState::Backoff,
                    &instance_id,
                    format!(
                        "{reason} ({}); restart #{attempt} in {}ms",
                        reason.kind(),
                        delay.as_millis()
                    ),
                );
                backoff(&shared, &slot, delay, &mut commands, &mut tracker).await
            }
            Decision::Stop { reason: why } => {
                stopped(
                    &shared,
                    &slot,
                    &instance_id,
                    PluginState::Stopped,
                    format!("{reason}; {why}"),
                );
                Next::Idle
            }
            Decision::GiveUp { reason: why } => {
                stopped(
                    &shared,
                    &slot,
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
    slot.route.send_replace(Route::Down {
        state: PluginState::Stopped,
        reason: "the supervisor has shut down".into(),
    });
}

fn stopped(shared: &Shared, slot: &Slot, instance: &str, state: PluginState, reason: String) {
    slot.route.send_replace(Route::Down {
        state,
        reason: reason.clone(),
    });
    shared.transition(slot, state, instance, reason);
}

/// Waits out a backoff delay; an operator's stop or restart cuts it short.
async fn backoff(
    shared: &Shared,
    slot: &Slot,
    delay: Duration,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    tracker: &mut RestartTracker,
) -> Next {
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut sleep => return Next::Start,
            _ = shared.cancel.cancelled() => return Next::Exit,
            cmd = commands.recv() => match cmd {
                Some(Command::Start(reply)) => { let _ = reply.send(()); }
                Some(Command::Restart(reply)) => {
                    tracker.clear();
                    let _ = reply.send(());
                    return Next::Start;
                }
                Some(Command::Stop(reply)) => {
                    stopped(shared, slot, "", PluginState::Stopped, "stopped by request".into());
                    let _ = reply.send(());
                    return Next::Idle;
                }
                None => return Next::Exit,
            }
        }
    }
}

/// Down (stopped or failed): waits for an operator's start or restart.
async fn idle(
    shared: &Shared,
    slot: &Slot,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    tracker: &mut RestartTracker,
) -> Next {
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => return Next::Exit,
            cmd = commands.recv() => match cmd {
                Some(Command::Start(reply) | Command::Restart(reply)) => {
                    tracker.clear();
                    slot.route.send_replace(Route::Pending);
                    let _ = reply.send(());
                    return Next::Start;
                }
                Some(Command::Stop(reply)) => { let _ = reply.send(()); }
                None => return Next::Exit,
            }
        }
    }
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

/// Starts one instance, serves calls through it until it ends.
async fn start_and_run(
    shared: &Shared,
    slot: &Slot,
    manifest: &Manifest,
    instance_id: &str,
    commands: &mut mpsc::UnboundedReceiver<Command>,
) -> Result<Outcome, StartError> {
    shared.transition(
        slot,
        PluginState::Starting,
        instance_id,
        format!("spawning {}", manifest.exec.display()),
    );
    let ctx = StartContext {
        manifest,
        instance_id: instance_id.to_string(),
        runtime_dir: &shared.opts.runtime_dir,
        env: slot.env.clone(),
        logs: slot.logs.clone(),
        processes: &shared.processes,
        tasks: &shared.io_tasks,
    };
    // Dropping a start in progress (on shutdown) kills its child: see
    // `Child`'s Drop.
    let mut instance = tokio::select! {
        r = instance::spawn(ctx) => r?,
        _ = shared.cancel.cancelled() => return Ok(Outcome::Decided(Next::Exit)),
    };
    {
        let mut st = lock(&slot.status);
        st.instance = instance_id.to_string();
        st.pid = Some(instance.child.pid());
    }
    let (restored, note) = restored_state(slot).await;
    shared.transition(
        slot,
        PluginState::Initializing,
        instance_id,
        format!(
            "handshake done in {}ms; calling Initialize{note}",
            instance.spawned_at.elapsed().as_millis()
        ),
    );
    let init = tokio::select! {
        r = instance::initialize(&mut instance, manifest, &slot.config, restored) => r,
        _ = shared.cancel.cancelled() => {
            instance::kill_and_reap(&instance.child).await;
            return Ok(Outcome::Decided(Next::Exit));
        }
    };
    let info = match init {
        Ok(info) => info,
        Err(e) => {
            instance::kill_and_reap(&instance.child).await;
            return Err(e);
        }
    };
    let ready_since = Instant::now();
    {
        let mut st = lock(&slot.status);
        st.methods = info.methods.clone();
        st.ready_since = Some(ready_since);
    }
    slot.route
        .send_replace(Route::Ready(Arc::new(ReadyInstance {
            id: instance_id.to_string(),
            client: instance.client.clone(),
        })));
    shared.transition(
        slot,
        PluginState::Ready,
        instance_id,
        format!(
            "ready in {}ms (pid {}, {} {})",
            instance.spawned_at.elapsed().as_millis(),
            instance.child.pid(),
            if info.name.is_empty() {
                &slot.name
            } else {
                &info.name
            },
            info.version
        ),
    );
    let end = watch_ready(shared, slot, manifest, &mut instance, commands).await;
    match end {
        RunEnd::Exited(status) => Ok(Outcome::Gone {
            reason: ExitReason::from_status(status),
            ready_since: Some(ready_since),
        }),
        RunEnd::HealthFailed(why) => {
            slot.route.send_replace(Route::Pending);
            instance::kill_and_reap(&instance.child).await;
            Ok(Outcome::Gone {
                reason: ExitReason::HealthCheck(why),
                ready_since: Some(ready_since),
            })
        }
        RunEnd::Cancelled => {
            stop_instance(
                shared,
                slot,
                manifest,
                &mut instance,
                "the supervisor is shutting down",
                false,
            )
            .await;
            Ok(Outcome::Decided(Next::Exit))
        }
        RunEnd::Stop(reply) => {
            stop_instance(
                shared,
                slot,
                manifest,
                &mut instance,
                "stopped by request",
                false,
            )
            .await;
            let _ = reply.send(());
            Ok(Outcome::Decided(Next::Idle))
        }
        RunEnd::Restart(reply) => {
            stop_instance(
                shared,
                slot,
                manifest,
                &mut instance,
                "restart requested",
                true,
            )
            .await;
            let _ = reply.send(());
            Ok(Outcome::Decided(Next::Start))
        }
    }
}

/// Graceful stop of a ready instance, with its events. While a restart
/// stops the old instance, calls wait for the new one instead of failing.
async fn stop_instance(
    shared: &Shared,
    slot: &Slot,
    manifest: &Manifest,
    instance: &mut Instance,
    why: &str,
    restarting: bool,
) {
    slot.route.send_replace(if restarting {
        Route::Pending
    } else {
        Route::Down {
            state: PluginState::Stopping,
            reason: why.to_string(),
        }
    });
    shared.transition(slot, PluginState::Stopping, &instance.id, why.to_string());
    if instance.child.try_status().is_none()
        && let Err(e) = snapshot(slot, &instance.client, &instance.id).await
    {
        tracing::warn!(plugin = %slot.name, instance = %instance.id, "no snapshot at stop: {e}");
    }
    let status = instance::stop(instance, manifest.timeouts.stop.0).await;
    {
        let mut st = lock(&slot.status);
        st.last_exit = Some(status.to_string());
        st.pid = None;
        st.ready_since = None;
    }
    let reason = format!("{why}; the plugin {status}");
    if restarting {
        shared.transition(slot, PluginState::Stopped, &instance.id, reason);
    } else {
        stopped(shared, slot, &instance.id, PluginState::Stopped, reason);
    }
}

/// Watches a ready instance: its exit, health probes, operator commands.
async fn watch_ready(
    shared: &Shared,
    slot: &Slot,
    manifest: &Manifest,
    instance: &mut Instance,
    commands: &mut mpsc::UnboundedReceiver<Command>,
) -> RunEnd {
    let exit = instance.child.exit_watch();
    let interval = manifest.health.interval.0;
    let mut probes = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    probes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0u32;
    let mut degraded = false;
    // Periodic snapshots; a zero interval (or no store) never ticks.
    let every = manifest.state.snapshot_interval.0;
    let periodic = slot.snapshots.is_some() && !every.is_zero();
    let mut snapshots = tokio::time::interval_at(
        tokio::time::Instant::now() + every.max(Duration::from_millis(1)),
        every.max(Duration::from_millis(1)),
    );
    snapshots.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let exited = wait_exit(exit);
    tokio::pin!(exited);
    loop {
        tokio::select! {
            status = &mut exited => return RunEnd::Exited(status),
            _ = shared.cancel.cancelled() => return RunEnd::Cancelled,
            cmd = commands.recv() => match cmd {
                // Already running.
                Some(Command::Start(reply)) => { let _ = reply.send(()); }
                Some(Command::Stop(reply)) => return RunEnd::Stop(reply),
                Some(Command::Restart(reply)) => return RunEnd::Restart(reply),
                None => return RunEnd::Cancelled,
            },
            _ = snapshots.tick(), if periodic => {
                if let Err(e) = snapshot(slot, &instance.client, &instance.id).await {
                    tracing::warn!(plugin = %slot.name, instance = %instance.id, "periodic snapshot failed: {e}");
                }
            }
            _ = probes.tick() => {
                match probe(&instance.client, manifest.health.timeout.0).await {
                    Ok((Health::Serving, _)) => {
                        failures = 0;
                        if degraded {
                            degraded = false;
                            shared.transition(slot, PluginState::Ready, &instance.id, "health check: serving again".into());
                        }
                    }
                    Ok((Health::Degraded, message)) => {
                        failures = 0;
                        if !degraded {
                            degraded = true;
                            shared.transition(slot, PluginState::Degraded, &instance.id, format!("health check: degraded: {message}"));
                        }
                    }
                    Ok((status, message)) => {
                        failures += 1;
                        let why = format!("health check answered {}: {message}", status.as_str_name());
                        if let Some(end) = health_failure(slot, manifest, instance, failures, why) {
                            return end;
                        }
                    }
                    Err(why) => {
                        failures += 1;
                        if let Some(end) = health_failure(slot, manifest, instance, failures, why) {
                            return end;
                        }
                    }
                }
            }
        }
    }
}

fn health_failure(
    slot: &Slot,
    manifest: &Manifest,
    instance: &Instance,
    failures: u32,
    why: String,
) -> Option<RunEnd> {
    let threshold = manifest.health.failure_threshold;
    tracing::warn!(plugin = %slot.name, instance = %instance.id, "health check failed ({failures}/{threshold}): {why}");
    (failures >= threshold).then(|| {
        RunEnd::HealthFailed(format!(
            "{failures} consecutive failed health checks; last: {why}"
        ))
    })
}

async fn probe(
    client: &PluginClient<Channel>,
    timeout: Duration,
) -> Result<(Health, String), String> {
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
