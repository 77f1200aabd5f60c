//! Hand-over of a running supervisor to a new image of itself, with every
//! plugin left running under the same PID.
//!
//! The old image takes its state ([`Supervisor::take_handover_state`]):
//! the plugin set with each plugin's manifest, overrides and runtime config,
//! each replica's restart history and running instance (PID, pidfd, output
//! pipes, socket directory, cgroup), the event history and the log tail. It
//! is serialized (versioned by [`MAGIC`] and [`FORMAT`]) by the embedding
//! application, which then has the process thread exec the new image
//! ([`Supervisor::exec_handover`]) with exactly the handed-over descriptors
//! inheritable. The process thread is the parent of every plugin: the exec
//! kills every other thread, but not it, so no parent-death signal fires and
//! the plugins stay its children. The new image reads the state back
//! ([`read_state`]) and [`Supervisor::resume`]s: each replica's actor
//! tracks its inherited child, reads its output pipes again, reconnects to
//! its socket (no second Initialize: the plugin already runs), reopens its
//! sessions and serves calls.
//!
//! What is not carried: Prometheus counters (they start at zero again, which
//! Prometheus reads as a counter reset), and output a plugin wrote in the
//! last moment before the exec that the old image had read but not yet
//! finished as a line.

use crate::actor::Resumed;
use crate::config::PluginOverride;
use crate::host::SupervisorOptions;
use crate::instance::{self, Instance, StartContext, StartError};
use crate::logs::LogLine;
use crate::manifest::Manifest;
use crate::plugin::{self, Op};
use crate::policy::RestartTracker;
use crate::process::{ExecRequest, ProcessManager};
use crate::replica::{Common, Replica, Spec};
use crate::routing::{ReadyInstance, Route};
use crate::status::{Event, EventDetail, ExitReason, PluginState};
use crate::supervisor::Supervisor;
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Marks a hand-over state.
pub const MAGIC: &str = "plugvisor-handover";
/// The state format this build writes and the newest it reads. A build
/// refuses a state of a newer format, and says so before anything changes
/// (the old image asks the new binary first).
pub const FORMAT: u32 = 1;

/// What a hand-over needs of a running instance, published on the board
/// when it becomes ready.
#[derive(Debug)]
pub struct Attached {
    pub id: String,
    pub pid: i32,
    pidfd: Arc<OwnedFd>,
    output: [Option<Arc<OwnedFd>>; 2],
    socket_dir: PathBuf,
    sessions: bool,
    cgroup: bool,
    identity: crate::signature::RunIdentity,
    /// A survivor's files, whose tails a hand-over freezes.
    survivor: Option<crate::adopt::Paths>,
}

impl Attached {
    pub(crate) fn of(instance: &Instance) -> Attached {
        Attached {
            id: instance.id.clone(),
            pid: instance.child.pid(),
            pidfd: instance.child.pidfd().clone(),
            output: instance.output.clone(),
            socket_dir: instance.socket_dir.clone(),
            sessions: instance.sessions.is_some(),
            cgroup: instance.cgroup.is_some(),
            identity: instance.identity.clone(),
            survivor: instance.survival.as_ref().map(|s| s.paths.clone()),
        }
    }
}

/// Survivors' tails frozen for a hand-over: thawed when it does not happen
/// (the old image serves on and reads on).
#[derive(Default)]
struct Frozen(Vec<crate::adopt::Paths>);

impl Drop for Frozen {
    fn drop(&mut self) {
        for paths in &self.0 {
            paths.gate.thaw();
        }
    }
}

/// The serialized state: versioned, plain data, descriptors by number.
#[derive(Debug, Serialize, Deserialize)]
pub struct HandoverState {
    pub magic: String,
    pub format: u32,
    /// The version of the image that wrote it.
    pub written_by: String,
    pub plugins: Vec<SavedPlugin>,
    /// The embedding application's own part (the daemon's control socket,
    /// its reload bookkeeping, ...).
    pub app: serde_json::Value,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SavedPlugin {
    pub manifest_path: PathBuf,
    /// The text of the manifest as it runs (not the file's text now),
    /// parsed again by the new image.
    pub manifest_text: String,
    pub overrides: PluginOverride,
    pub runtime: serde_json::Map<String, serde_json::Value>,
    pub methods: Vec<String>,
    pub reported_version: Option<String>,
    pub history: Vec<SavedEvent>,
    pub logs: Vec<SavedLine>,
    pub replicas: Vec<SavedReplica>,
    /// What the running manifest changes of the parsed text: a tenant's
    /// entry is the plugin's manifest renamed, with the tenant's limits and
    /// environment (see [`crate::tenant::entry_for`]).
    #[serde(default)]
    pub entry: Option<SavedEntry>,
    /// The last autoscaling decision and when (unix ms): the new image's
    /// policy counts its cooldown from there.
    #[serde(default)]
    pub last_scaling: Option<(String, u64)>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SavedEntry {
    pub name: String,
    pub limits: crate::manifest::Limits,
    pub env: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SavedEvent {
    pub unix_ms: u64,
    pub replica: usize,
    pub instance: String,
    pub state: String,
    pub reason: String,
    pub pid: Option<i32>,
    pub version: Option<String>,
    pub exit_kind: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub oom: bool,
    pub attempt: Option<u32>,
    pub delay_ms: Option<u64>,
    #[serde(default)]
    pub scaled_to: Option<usize>,
    #[serde(default)]
    pub requirement: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SavedLine {
    pub unix_ms: u64,
    pub instance: String,
    pub stderr: bool,
    pub line: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SavedReplica {
    pub state: String,
    pub reason: String,
    pub last_instance: String,
    pub restarts: u32,
    pub last_exit: Option<String>,
    /// Starts so far (instance ids go on from there).
    pub starts: u64,
    /// The restart policy's attempt count and its recent restarts' ages.
    pub attempt: u32,
    pub recent_ms: Vec<u64>,
    pub instance: Option<SavedInstanceFds>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SavedInstanceFds {
    pub id: String,
    pub pid: i32,
    pub pidfd: RawFd,
    pub stdout: Option<RawFd>,
    pub stderr: Option<RawFd>,
    pub socket_dir: PathBuf,
    pub sessions: bool,
    pub cgroup: bool,
    pub ready_for_ms: u64,
    /// What it runs (sha256, signer), as checked when it started.
    #[serde(default)]
    pub identity: crate::signature::RunIdentity,
}

/// A running instance as the new image received it, its descriptors owned.
#[derive(Debug)]
pub struct SavedInstance {
    pub id: String,
    pid: i32,
    pidfd: OwnedFd,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    socket_dir: PathBuf,
    sessions: bool,
    cgroup: bool,
    ready_for: Duration,
    identity: crate::signature::RunIdentity,
}

/// The state taken by the old image, with the descriptors it names held
/// open until the exec.
pub struct Taken {
    pub state: HandoverState,
    /// Every descriptor the state names.
    pub keep_fds: Vec<RawFd>,
    /// The PIDs of the running instances.
    pub pids: Vec<i32>,
    _hold: Vec<Arc<OwnedFd>>,
    _frozen: Frozen,
}

/// Why a hand-over cannot be done now, or the state cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// Something is in motion (a start, a stop, an operation): try again.
    #[error("{0}; nothing was handed over, try again in a moment")]
    Busy(String),
    #[error("{0}")]
    Unreadable(String),
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn state_of(name: &str) -> Option<PluginState> {
    use PluginState::*;
    [
        Starting,
        Initializing,
        Ready,
        Degraded,
        Stopping,
        Stopped,
        Backoff,
        Failed,
        Unavailable,
        Waiting,
    ]
    .into_iter()
    .find(|s| s.as_str() == name)
}

/// [`crate::status::ExitReason::kind`]'s names, as the static strings events
/// carry.
fn exit_kind(name: &str) -> Option<&'static str> {
    [
        "exit",
        "signal",
        "oom",
        "seccomp",
        "health",
        "start_timeout",
        "initialize_timeout",
        "handshake",
        "refused",
        "snapshot",
        "start",
    ]
    .into_iter()
    .find(|k| *k == name)
}

/// The starts of a replica, from its last instance id `<plugin>-<replica>-<n>`.
fn starts_of(instance: &str) -> u64 {
    instance
        .rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

impl Supervisor {
    /// Takes the state a new image needs to carry on. Refused
    /// ([`HandoverError::Busy`]) while a replica is starting or stopping or
    /// a plugin's operation (an upgrade, a config change) does not finish
    /// within `wait`.
    pub async fn take_handover_state(&self, wait: Duration) -> Result<Taken, HandoverError> {
        let plugins: Vec<_> = self
            .plugins
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let now_i = Instant::now();
        let mut saved = Vec::with_capacity(plugins.len());
        let mut keep_fds = Vec::new();
        let mut pids = Vec::new();
        let mut hold = Vec::new();
        let mut frozen = Frozen::default();
        for handle in plugins {
            let name = handle.common.name.clone();
            // Answered by the coordinator between operations: none runs now.
            let answer = tokio::time::timeout(wait, handle.run(Op::Handover)).await;
            let (overrides, runtime) = match answer {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => return Err(HandoverError::Busy(format!("plugin `{name}`: {e}"))),
                Err(_) => {
                    return Err(HandoverError::Busy(format!(
                        "plugin `{name}` is busy with an operation (an upgrade, a restart or a config change) for over {}ms",
                        wait.as_millis()
                    )));
                }
            };
            let common = &handle.common;
            let board = common.board.lock();
            let manifest = board.spec.manifest.clone();
            if manifest
                .remote
                .as_ref()
                .is_some_and(|r| r.registration.is_some())
            {
                // A registration lives as long as its lease in the
                // registry, which does not outlive this image: the plugin
                // announces itself again to the new one (see the module
                // docs).
                continue;
            }
            let remote = manifest.remote.is_some();
            // The manifest as it runs (the file may have been edited, and
            // not reloaded, since).
            let manifest_text = manifest.source.to_string();
            let mut replicas = Vec::with_capacity(board.replicas.len());
            for (index, r) in board.replicas.iter().enumerate() {
                if matches!(
                    r.state,
                    PluginState::Starting | PluginState::Initializing | PluginState::Stopping
                ) {
                    return Err(HandoverError::Busy(format!(
                        "plugin `{name}` replica {index} is {}",
                        r.state
                    )));
                }
                let instance = if r.state.is_up() && !remote {
                    let attached = r
                        .attached
                        .as_ref()
                        .filter(|a| a.id == r.instance && r.pid == Some(a.pid))
                        .ok_or_else(|| {
                            HandoverError::Busy(format!(
                                "plugin `{name}` replica {index} is switching instances"
                            ))
                        })?;
                    keep_fds.push(attached.pidfd.as_raw_fd());
                    hold.push(attached.pidfd.clone());
                    for fd in attached.output.iter().flatten() {
                        keep_fds.push(fd.as_raw_fd());
                        hold.push(fd.clone());
                    }
                    pids.push(attached.pid);
                    // Its output read on by the new image from exactly
                    // after the last line carried in the log buffer below.
                    if let Some(paths) = &attached.survivor {
                        frozen.0.push(paths.clone());
                        paths.gate.freeze(paths).map_err(|e| {
                            HandoverError::Busy(format!(
                                "plugin `{name}` replica {index}: cannot save how far its output was read: {e}"
                            ))
                        })?;
                    }
                    Some(SavedInstanceFds {
                        id: attached.id.clone(),
                        pid: attached.pid,
                        pidfd: attached.pidfd.as_raw_fd(),
                        stdout: attached.output[0].as_ref().map(|f| f.as_raw_fd()),
                        stderr: attached.output[1].as_ref().map(|f| f.as_raw_fd()),
                        socket_dir: attached.socket_dir.clone(),
                        sessions: attached.sessions,
                        cgroup: attached.cgroup,
                        ready_for_ms: r
                            .ready_since
                            .map_or(0, |s| now_i.duration_since(s).as_millis() as u64),
                        identity: attached.identity.clone(),
                    })
                } else {
                    None
                };
                let (attempt, recent) = r
                    .tracker
                    .as_ref()
                    .map(|t| t.export(now_i))
                    .unwrap_or_default();
                replicas.push(SavedReplica {
                    state: r.state.as_str().to_string(),
                    reason: r.reason.clone(),
                    last_instance: r.instance.clone(),
                    restarts: r.restarts,
                    last_exit: r.last_exit.clone(),
                    starts: starts_of(&r.instance),
                    attempt,
                    recent_ms: recent.iter().map(|d| d.as_millis() as u64).collect(),
                    instance,
                });
            }
            let history = board
                .history
                .iter()
                .map(|e| SavedEvent {
                    unix_ms: unix_ms(e.time),
                    replica: e.replica,
                    instance: e.instance.clone(),
                    state: e.state.as_str().to_string(),
                    reason: e.reason.clone(),
                    pid: e.detail.pid,
                    version: e.detail.version.clone(),
                    exit_kind: e.detail.exit_kind.map(str::to_string),
                    exit_code: e.detail.exit_code,
                    signal: e.detail.signal,
                    oom: e.detail.oom,
                    attempt: e.detail.attempt,
                    delay_ms: e.detail.delay.map(|d| d.as_millis() as u64),
                    scaled_to: e.detail.scaled_to,
                    requirement: e.detail.requirement.clone(),
                })
                .collect();
            let methods = board.methods.clone();
            let reported_version = board.reported_version.clone();
            let last_scaling = board
                .last_scaling
                .as_ref()
                .map(|(note, at)| (note.clone(), unix_ms(*at)));
            let entry = Some(SavedEntry {
                name: manifest.name.clone(),
                limits: manifest.limits.clone(),
                env: manifest.env.clone(),
            });
            drop(board);
            let logs = common
                .logs
                .tail(usize::MAX)
                .into_iter()
                .map(|l| SavedLine {
                    unix_ms: unix_ms(l.time),
                    instance: l.instance,
                    stderr: l.stream == "stderr",
                    line: l.line,
                })
                .collect();
            saved.push(SavedPlugin {
                manifest_path: manifest.path.clone(),
                manifest_text,
                overrides,
                runtime,
                methods,
                reported_version,
                history,
                logs,
                replicas,
                entry,
                last_scaling,
            });
        }
        Ok(Taken {
            state: HandoverState {
                magic: MAGIC.into(),
                format: FORMAT,
                written_by: env!("CARGO_PKG_VERSION").into(),
                plugins: saved,
                app: serde_json::Value::Null,
            },
            keep_fds,
            pids,
            _hold: hold,
            _frozen: frozen,
        })
    }

    /// Execs `program` from the process thread, handing over `taken`'s
    /// descriptors and `extra_fds`. Returns only on failure, with nothing
    /// changed: the caller serves on.
    pub async fn exec_handover(
        &self,
        taken: &Taken,
        extra_fds: &[RawFd],
        program: PathBuf,
        args: Vec<OsString>,
        env: Vec<(OsString, OsString)>,
    ) -> std::io::Error {
        let mut keep_fds = taken.keep_fds.clone();
        keep_fds.extend_from_slice(extra_fds);
        self.host
            .processes
            .exec(ExecRequest {
                program,
                args,
                env,
                keep_fds,
                expected: taken.pids.clone(),
            })
            .await
    }

    /// Starts a supervisor that carries on from `state`, taken by a previous
    /// image of this process: its plugins' running instances are taken
    /// over, the others start (or stay down) as they were. `processes` must
    /// run on the thread that performed the exec (the parent of the
    /// plugins). A plugin whose manifest no longer parses is not taken
    /// over: its instances are killed, and the reason is returned.
    pub async fn resume(
        mut opts: SupervisorOptions,
        processes: ProcessManager,
        state: HandoverState,
    ) -> std::io::Result<(Supervisor, Vec<String>)> {
        let mut plugins = Vec::with_capacity(state.plugins.len());
        for saved in state.plugins {
            let instances = saved
                .replicas
                .iter()
                .filter_map(|r| r.instance.as_ref().map(|i| i.id.clone()));
            opts.keep_instances.extend(instances);
            plugins.push(saved);
        }
        let supervisor = Supervisor::launch_with(opts, Some(processes)).await?;
        let mut errors = Vec::new();
        let mut parsed = Vec::with_capacity(plugins.len());
        for mut saved in plugins {
            match running_manifest(&saved) {
                Ok(manifest) => parsed.push((manifest, saved)),
                Err(e) => {
                    // Not supervised any more: its children must not run on.
                    for r in saved.replicas.iter_mut() {
                        if let Some(i) = take_fds(r.instance.take())
                            && let Ok(child) = supervisor
                                .host
                                .processes
                                .track(i.pid, i.pidfd, i.stdout, i.stderr)
                                .await
                        {
                            instance::kill_and_reap(&child).await;
                        }
                    }
                    errors.push(format!(
                        "plugin not taken over, its instances were stopped: {e}"
                    ));
                }
            }
        }
        // Every plugin is in the registry before any replica looks at its
        // requirements: a dependent never sees its requirement missing.
        let mut registry = supervisor
            .plugins
            .write()
            .unwrap_or_else(|e| e.into_inner());
        for (manifest, mut saved) in parsed {
            let restore = Restore {
                runtime: std::mem::take(&mut saved.runtime),
                saved,
            };
            let name = manifest.name.clone();
            let overrides = restore.saved.overrides.clone();
            let handle = plugin::spawn_resumed(
                &supervisor.host,
                &supervisor.plugins,
                manifest,
                overrides,
                Some(restore),
            );
            registry.insert(name, handle);
        }
        drop(registry);
        Ok((supervisor, errors))
    }
}

/// The manifest a saved plugin ran: its text parsed again, with what its
/// entry changed of it (a tenant's name, limits and environment).
fn running_manifest(saved: &SavedPlugin) -> Result<Manifest, String> {
    let mut manifest =
        Manifest::parse(&saved.manifest_path, &saved.manifest_text).map_err(|e| e.to_string())?;
    if let Some(entry) = &saved.entry {
        manifest.name = entry.name.clone();
        manifest.limits = entry.limits.clone();
        manifest.env = entry.env.clone();
    }
    Ok(manifest)
}

/// The inherited descriptors of a saved instance, owned from here on.
fn take_fds(saved: Option<SavedInstanceFds>) -> Option<SavedInstance> {
    let s = saved?;
    // SAFETY: the previous image handed these descriptors over by number,
    // each once, and nothing else in this process owns them.
    let own = |fd: RawFd| unsafe { OwnedFd::from_raw_fd(fd) };
    let owned = SavedInstance {
        pidfd: own(s.pidfd),
        stdout: s.stdout.map(own),
        stderr: s.stderr.map(own),
        id: s.id,
        pid: s.pid,
        socket_dir: s.socket_dir,
        sessions: s.sessions,
        cgroup: s.cgroup,
        ready_for: Duration::from_millis(s.ready_for_ms),
        identity: s.identity,
    };
    for fd in [
        Some(&owned.pidfd),
        owned.stdout.as_ref(),
        owned.stderr.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        crate::process::set_cloexec(fd.as_raw_fd(), true);
    }
    Some(owned)
}

/// What [`plugin::spawn_resumed`] restores of a plugin.
pub(crate) struct Restore {
    pub runtime: serde_json::Map<String, serde_json::Value>,
    saved: SavedPlugin,
}

impl Restore {
    /// The replicas it ran: more than its manifest's count when autoscaling
    /// had added some.
    pub(crate) fn replicas(&self) -> usize {
        self.saved.replicas.len()
    }
}

/// Puts a plugin's history, output, rows and routes back; returns what
/// each replica's actor resumes from.
pub(crate) fn restore_board(common: &Common, restore: Restore) -> Vec<Resumed> {
    let saved = restore.saved;
    for line in saved.logs {
        common.logs.push(LogLine {
            time: from_unix_ms(line.unix_ms),
            instance: line.instance,
            stream: if line.stderr { "stderr" } else { "stdout" },
            line: line.line,
        });
    }
    let now = Instant::now();
    let mut resumed = Vec::with_capacity(saved.replicas.len());
    let mut board = common.board.lock();
    board.methods = saved.methods;
    board.reported_version = saved.reported_version;
    board.last_scaling = saved
        .last_scaling
        .map(|(note, ms)| (note, from_unix_ms(ms)));
    let remote = board.spec.manifest.remote.is_some();
    let name = common.name.clone();
    board.history = saved
        .history
        .into_iter()
        .filter_map(|e| {
            Some(Event {
                time: from_unix_ms(e.unix_ms),
                plugin: name.clone(),
                replica: e.replica,
                instance: e.instance,
                state: state_of(&e.state)?,
                reason: e.reason,
                detail: EventDetail {
                    pid: e.pid,
                    version: e.version,
                    exit_kind: e.exit_kind.as_deref().and_then(exit_kind),
                    exit_code: e.exit_code,
                    signal: e.signal,
                    oom: e.oom,
                    attempt: e.attempt,
                    delay: e.delay_ms.map(Duration::from_millis),
                    scaled_to: e.scaled_to,
                    requirement: e.requirement,
                },
            })
        })
        .collect();
    let restart = board.spec.manifest.restart.clone();
    let rows = board.replicas.len();
    for (index, r) in saved.replicas.into_iter().enumerate().take(rows) {
        let state = state_of(&r.state).unwrap_or(PluginState::Starting);
        let recent: Vec<Duration> = r
            .recent_ms
            .iter()
            .map(|ms| Duration::from_millis(*ms))
            .collect();
        let tracker = RestartTracker::restore(restart.clone(), r.attempt, &recent, now);
        let row = &mut board.replicas[index];
        row.state = state;
        row.reason = r.reason.clone();
        row.instance = r.last_instance;
        row.restarts = r.restarts;
        row.last_exit = r.last_exit;
        row.tracker = Some(tracker.clone());
        // Shown at once: the instance is being taken over, not started.
        row.pid = r.instance.as_ref().map(|i| i.pid);
        // A remote plugin is connected to again: it counts as up for its
        // dependents meanwhile, and calls wait for it.
        row.upgrading = remote && state.is_up();
        if matches!(state, PluginState::Stopped | PluginState::Failed) {
            common.routes.set(
                index,
                Route::Down {
                    state,
                    reason: r.reason,
                },
            );
        }
        resumed.push(Resumed {
            starts: r.starts,
            tracker,
            start: !matches!(state, PluginState::Stopped | PluginState::Failed),
            instance: take_fds(r.instance),
        });
    }
    resumed
}

/// Takes over a running instance: tracks the inherited child, reads its
/// output again, reconnects to its socket, reopens its sessions and
/// publishes it as ready. On failure the child is killed and reaped, and
/// the reason is the instance's exit reason (the restart policy applies).
pub(crate) async fn reattach(
    replica: &Replica,
    spec: &Spec,
    saved: SavedInstance,
) -> Result<(Instance, Instant), ExitReason> {
    let host = &replica.host;
    let id = saved.id.clone();
    // A survivor (`survive_supervisor`) writes to files, not pipes: its
    // output is read on from where this supervisor's record says.
    let piped = saved.stdout.is_some() || saved.stderr.is_some();
    let mut child = host
        .processes
        .track(saved.pid, saved.pidfd, saved.stdout, saved.stderr)
        .await
        .map_err(|e| {
            ExitReason::Start(StartError::Spawn {
                exec: spec.manifest.exec.clone(),
                reason: format!("cannot take over pid {}: {e}", saved.pid),
            })
        })?;
    let output = instance::output_copies(&child);
    let ctx = StartContext {
        manifest: &spec.manifest,
        instance_id: id.clone(),
        runtime_dir: &host.opts.runtime_dir,
        env: Vec::new(),
        logs: replica.plugin.logs.clone(),
        processes: &host.processes,
        tasks: &host.io_tasks,
        isolation: Some(&host.isolation),
        survive: None,
    };
    let policy = spec
        .manifest
        .survive_supervisor
        .unwrap_or(host.survivors.default);
    let paths = host.survivors.paths(&id);
    let survival = (!piped && policy.enabled && paths.dir.is_dir())
        .then_some(crate::adopt::Survival { paths, policy });
    match &survival {
        Some(s) => crate::adopt::start_tails(
            &host.io_tasks,
            s,
            crate::adopt::TailSink {
                plugin: replica.name().to_string(),
                instance: id.clone(),
                logs: replica.plugin.logs.clone(),
            },
            &child,
            None,
        ),
        None => instance::forward_output(&ctx, &mut child, None),
    }
    let cgroup = if saved.cgroup {
        host.isolation.relet(&id, &host.io_tasks)
    } else {
        None
    };
    let socket = saved.socket_dir.join("plugin.sock");
    let timeout = spec.manifest.timeouts.start.0;
    // A container plugin's child is its runtime; the socket is served by
    // the container's init process, which the runtime names.
    let mut container = crate::container::reattached(
        &spec.manifest,
        &host.opts.runtime_dir,
        &id,
        &host.processes,
        &host.io_tasks,
    );
    let expected = match &mut container {
        Some(guard) => match crate::container::init_pid(&host.processes, guard).await {
            Ok(pid) => {
                guard.observe(&host.isolation, &id, pid);
                pid
            }
            Err(e) => {
                instance::kill_and_reap(&child).await;
                return Err(ExitReason::Start(StartError::Connect(format!(
                    "cannot find the container's process after the supervisor's hand-over: {e}"
                ))));
            }
        },
        None => saved.pid,
    };
    let channel =
        match tokio::time::timeout(timeout, crate::transport::connect_plugin(&socket, expected))
            .await
        {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => {
                instance::kill_and_reap(&child).await;
                return Err(ExitReason::Start(StartError::Connect(format!(
                    "cannot reconnect to {} after the supervisor's hand-over: {e}",
                    socket.display()
                ))));
            }
            Err(_) => {
                instance::kill_and_reap(&child).await;
                return Err(ExitReason::Start(StartError::Connect(format!(
                    "no connection to {} within {}ms after the supervisor's hand-over",
                    socket.display(),
                    timeout.as_millis()
                ))));
            }
        };
    let client = crate::instance::Client::new(channel);
    let mut instance = Instance {
        id: id.clone(),
        child,
        client,
        socket_dir: saved.socket_dir,
        spawned_at: Instant::now(),
        cgroup,
        sessions: None,
        output,
        survival,
        container,
        identity: saved.identity,
    };
    if saved.sessions {
        match crate::session::Sessions::open(
            &instance.client,
            crate::transport::PLUGIN_CONNECTIONS,
            Duration::from_secs(1),
            &host.io_tasks,
        )
        .await
        {
            Ok(sessions) => instance.sessions = Some(Arc::new(sessions)),
            Err(status) => tracing::warn!(
                plugin = %replica.name(),
                instance = %id,
                "sessions did not reopen after the hand-over ({:?}: {}); calls use Handle",
                status.code(),
                status.message()
            ),
        }
    }
    let ready_since = Instant::now()
        .checked_sub(saved.ready_for)
        .unwrap_or_else(Instant::now);
    let pid = saved.pid;
    replica.update(|r| {
        r.ready_since = Some(ready_since);
        r.instance = id.clone();
        r.pid = Some(pid);
        r.identity = instance.identity.clone();
        r.attached = Some(Arc::new(Attached::of(&instance)));
    });
    replica.route(Route::Ready(ReadyInstance::new(
        id.clone(),
        replica.index,
        instance.client.clone(),
        instance.sessions.clone(),
        replica.snapshots.clone(),
    )));
    replica.event(
        PluginState::Ready,
        &id,
        format!("taken over by the new supervisor image (pid {pid} kept running)"),
        EventDetail {
            pid: Some(pid),
            ..EventDetail::default()
        },
    );
    Ok((instance, ready_since))
}

/// Writes `state` to a sealed memfd (close-on-exec until handed over) and
/// returns it, positioned at the start.
pub fn write_state(state: &HandoverState) -> std::io::Result<OwnedFd> {
    use std::io::{Seek, Write};
    let bytes = serde_json::to_vec(state).map_err(std::io::Error::other)?;
    // SAFETY: memfd_create with a NUL-terminated name and flags; the new
    // descriptor is owned by nobody else.
    let fd = unsafe {
        libc::memfd_create(
            c"plugvisor-handover".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: just returned by memfd_create.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut file = std::fs::File::from(fd);
    file.write_all(&bytes)?;
    file.rewind()?;
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: fcntl F_ADD_SEALS on our own memfd.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file.into())
}

/// Reads a state handed over in `fd` (and closes it). A state of another
/// kind, or of a format newer than [`FORMAT`], is refused with the reason.
pub fn read_state(fd: OwnedFd) -> Result<HandoverState, HandoverError> {
    use std::io::Read;
    let mut text = Vec::new();
    std::fs::File::from(fd)
        .read_to_end(&mut text)
        .map_err(|e| HandoverError::Unreadable(format!("cannot read the hand-over state: {e}")))?;
    parse_state(&text)
}

/// [`read_state`] on bytes.
pub fn parse_state(bytes: &[u8]) -> Result<HandoverState, HandoverError> {
    #[derive(Deserialize)]
    struct Header {
        magic: String,
        format: u32,
        #[serde(default)]
        written_by: String,
    }
    let header: Header = serde_json::from_slice(bytes).map_err(|e| {
        HandoverError::Unreadable(format!("the hand-over state is not a plugvisor state: {e}"))
    })?;
    if header.magic != MAGIC {
        return Err(HandoverError::Unreadable(format!(
            "the hand-over state is not a plugvisor state (magic `{}`)",
            header.magic
        )));
    }
    check_format(header.format).map_err(|why| {
        HandoverError::Unreadable(format!(
            "{why} (written by plugvisor {})",
            header.written_by
        ))
    })?;
    serde_json::from_slice(bytes).map_err(|e| {
        HandoverError::Unreadable(format!(
            "the hand-over state (format {}) does not parse: {e}",
            header.format
        ))
    })
}

/// Whether this build reads states of `format`.
pub fn check_format(format: u32) -> Result<(), String> {
    if format == 0 || format > FORMAT {
        return Err(format!(
            "hand-over state format {format} cannot be read by plugvisor {} (it reads format 1 to {FORMAT})",
            env!("CARGO_PKG_VERSION")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_format_is_refused_with_both_versions() {
        let text = format!(
            r#"{{"magic":"{MAGIC}","format":{},"written_by":"9.0.0","plugins":[],"app":null}}"#,
            FORMAT + 1
        );
        let e = parse_state(text.as_bytes()).unwrap_err().to_string();
        assert!(e.contains(&format!("format {}", FORMAT + 1)), "{e}");
        assert!(e.contains("9.0.0"), "{e}");
    }

    #[test]
    fn another_kind_of_state_is_refused() {
        let e = parse_state(br#"{"magic":"x","format":1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("magic `x`"), "{e}");
        let e = parse_state(b"garbage").unwrap_err().to_string();
        assert!(e.contains("not a plugvisor state"), "{e}");
    }

    #[test]
    fn a_state_round_trips_through_a_sealed_memfd() {
        let state = HandoverState {
            magic: MAGIC.into(),
            format: FORMAT,
            written_by: "1.2.3".into(),
            plugins: Vec::new(),
            app: serde_json::json!({"control_fd": 7}),
        };
        let fd = write_state(&state).unwrap();
        // Sealed: nobody can change it between the two images.
        // SAFETY: write(2) of one byte to our own memfd.
        let rc = unsafe { libc::write(fd.as_raw_fd(), b"x".as_ptr().cast(), 1) };
        assert!(rc < 0, "a sealed memfd took a write");
        let back = read_state(fd).unwrap();
        assert_eq!(back.written_by, "1.2.3");
        assert_eq!(back.app["control_fd"], 7);
    }

    #[test]
    fn restart_history_survives_as_ages() {
        let spec = crate::manifest::RestartSpec::default();
        let now = Instant::now();
        let restored = RestartTracker::restore(spec, 3, &[Duration::from_millis(10)], now);
        let (attempt, ages) = restored.export(now);
        assert_eq!(attempt, 3);
        assert_eq!(ages, vec![Duration::from_millis(10)]);
    }
}
