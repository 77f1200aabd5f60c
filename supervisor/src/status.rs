//! What the supervisor says about its plugins: states, exit reasons, events
//! and point-in-time views, and the per-plugin board they are published
//! on. Each replica's actor writes its own row of the board; the plugin's
//! coordinator writes the spec; everyone else only reads.

use crate::instance::StartError;
use crate::isolation::IsolationStatus;
use crate::process::ExitStatus;
use crate::spec::Spec;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

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
    /// A registered remote plugin that missed its heartbeats: not routed to
    /// until it sends one again, removed if it stays silent.
    Unavailable,
    /// Not started: a plugin it requires is not ready (the reason says
    /// which).
    Waiting,
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
            PluginState::Unavailable => "unavailable",
            PluginState::Waiting => "waiting",
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
    /// Killed with SIGSYS by its seccomp filter (`isolation.seccomp` with
    /// `action: kill`) for making a system call the filter blocks.
    SeccompKilled,
    /// Failed `failure_threshold` consecutive health checks and was killed.
    HealthCheck(String),
    /// Never became ready: spawn, handshake, connect or Initialize failed,
    /// or its saved state could not be read.
    Start(StartError),
    /// A remote plugin's connection failed or ended (see
    /// [`crate::remote::ConnectionLost`]).
    Remote(crate::remote::ConnectionLost),
    /// A re-adopted survivor ended; only its parent (not us) could learn
    /// how. See [`crate::adopt`].
    Unknown,
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
            ExitStatus::Unknown => ExitReason::Unknown,
        }
    }

    /// A short label for metrics and filtering: `exit`, `signal`, `oom`,
    /// `health`, `start_timeout`, `initialize_timeout`, `handshake`, `start`.
    pub fn kind(&self) -> &'static str {
        match self {
            ExitReason::Exited(_) => "exit",
            ExitReason::Signaled { .. } => "signal",
            ExitReason::OomKilled => "oom",
            ExitReason::SeccompKilled => "seccomp",
            ExitReason::HealthCheck(_) => "health",
            ExitReason::Start(StartError::StartTimeout { .. }) => "start_timeout",
            ExitReason::Start(StartError::InitializeTimeout(_)) => "initialize_timeout",
            ExitReason::Start(StartError::Handshake(_)) => "handshake",
            ExitReason::Start(StartError::Refused(_)) => "refused",
            ExitReason::Start(StartError::OomKilled { .. }) => "oom",
            ExitReason::Start(StartError::StateUnreadable(_)) => "snapshot",
            ExitReason::Start(StartError::Hook(_)) => "hook",
            ExitReason::Start(_) => "start",
            ExitReason::Remote(lost) => lost.kind(),
            ExitReason::Unknown => "unknown",
        }
    }

    /// Exited with code 0 on its own.
    pub(crate) fn is_clean(&self) -> bool {
        matches!(self, ExitReason::Exited(0))
    }

    /// The plugin was refused (a sha256 mismatch, a writable executable):
    /// restarting cannot help until someone changes it. (Unreadable state is
    /// retried with backoff: fixing its permissions brings the plugin back.)
    pub(crate) fn is_refusal(&self) -> bool {
        matches!(self, ExitReason::Start(StartError::Refused(_)))
    }

    /// A SIGSYS death reads as a seccomp kill when the plugin's filter
    /// kills (SECCOMP_RET_KILL_PROCESS ends a process with SIGSYS; nothing
    /// else in the kernel does).
    pub(crate) fn or_seccomp_kill(self, spec: &crate::isolation::seccomp::SeccompSpec) -> Self {
        let kills = spec.action == crate::isolation::seccomp::BlockAction::Kill;
        match self {
            ExitReason::Signaled { signal, .. } if signal == libc::SIGSYS && kills => {
                ExitReason::SeccompKilled
            }
            other => other,
        }
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
            ExitReason::SeccompKilled => write!(
                f,
                "killed by SIGSYS: seccomp blocked a system call (isolation.seccomp action: kill)"
            ),
            ExitReason::HealthCheck(why) => write!(f, "killed after failed health checks: {why}"),
            ExitReason::Start(e) => write!(f, "{e}"),
            ExitReason::Remote(lost) => write!(f, "{lost}"),
            ExitReason::Unknown => write!(f, "{}", ExitStatus::Unknown),
        }
    }
}

/// One state transition.
#[derive(Debug, Clone)]
pub struct Event {
    pub time: SystemTime,
    pub plugin: String,
    /// The replica concerned.
    pub replica: usize,
    /// The instance concerned (`<plugin>-<replica>-<start>`); empty when none.
    pub instance: String,
    pub state: PluginState,
    /// The reason, as a sentence for people.
    pub reason: String,
    /// The same facts as fields, for programs: nobody has to parse `reason`.
    pub detail: EventDetail,
}

/// The structured facts of an [`Event`]; each is set where it applies.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventDetail {
    /// The pid of the instance.
    pub pid: Option<i32>,
    /// The version the instance runs (or is being upgraded to).
    pub version: Option<String>,
    /// How the last instance ended: [`ExitReason::kind`].
    pub exit_kind: Option<&'static str>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Ended by the OOM killer, as its cgroup counted.
    pub oom: bool,
    /// Which restart this backoff leads to (1 for the first).
    pub attempt: Option<u32>,
    /// How long the backoff waits.
    pub delay: Option<Duration>,
    /// For a change made by autoscaling: the replica count it goes to.
    pub scaled_to: Option<usize>,
    /// The required plugin the event is about (waiting for it, its crash).
    pub requirement: Option<String>,
}

impl EventDetail {
    /// The fields that describe how an instance ended.
    pub fn of_exit(reason: &ExitReason) -> Self {
        let mut detail = EventDetail {
            exit_kind: Some(reason.kind()),
            ..EventDetail::default()
        };
        match reason {
            ExitReason::Exited(code) => detail.exit_code = Some(*code),
            ExitReason::Signaled { signal, .. } => detail.signal = Some(*signal),
            ExitReason::SeccompKilled => detail.signal = Some(libc::SIGSYS),
            ExitReason::OomKilled | ExitReason::Start(StartError::OomKilled { .. }) => {
                detail.oom = true
            }
            ExitReason::Start(StartError::ExitedEarly { status, .. }) => match status {
                ExitStatus::Exited(code) => detail.exit_code = Some(*code),
                ExitStatus::Signaled { signal, .. } => detail.signal = Some(*signal),
                ExitStatus::Unknown => {}
            },
            _ => {}
        }
        detail
    }
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
    /// What its last instance ran: digest and signer.
    pub identity: crate::signature::RunIdentity,
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
    /// The version the plugin itself reported in Initialize (its manifest's
    /// is `version`); they may differ.
    pub reported_version: Option<String>,
    pub replicas: Vec<ReplicaInfo>,
    /// Limits, what enforces them, live usage and hardening.
    pub isolation: IsolationStatus,
    /// Where a remote plugin runs; `None` for a local child.
    pub remote: Option<crate::remote::RemoteInfo>,
    /// What it provides (`capabilities:` in its manifest).
    pub capabilities: Vec<String>,
    /// Its `calls.rate` limits in force: `(scope, limit)`, scope `*` for
    /// the plugin's, else the method's name; limit like `500/s, burst 100`.
    pub rate_limits: Vec<(String, String)>,
    /// Autoscaling bounds and the last change, when the plugin autoscales.
    pub scaling: Option<crate::autoscale::ScalingInfo>,
    /// The plugins it requires (its manifest's `requires:`).
    pub requires: Vec<crate::dependencies::Requirement>,
    /// What runs (the first ready replica's, else the first replica's):
    /// the executable's digest and who signed it.
    pub identity: crate::signature::RunIdentity,
}

/// Status of one replica, written only by its actor.
#[derive(Debug, Clone)]
pub(crate) struct ReplicaStatus {
    pub state: PluginState,
    pub reason: String,
    pub instance: String,
    pub pid: Option<i32>,
    pub restarts: u32,
    pub last_exit: Option<String>,
    pub ready_since: Option<Instant>,
    /// What a hand-over needs of the running instance (see
    /// [`crate::handover`]); current only while `instance` and `pid` match.
    pub attached: Option<Arc<crate::handover::Attached>>,
    /// The actor's restart history as of its last exit, for a hand-over.
    pub tracker: Option<crate::policy::RestartTracker>,
    /// What its last instance ran.
    pub identity: crate::signature::RunIdentity,
    /// A zero-downtime upgrade of its ready instance is under way: calls
    /// wait (not fail) and the replica counts as up for its dependents.
    pub upgrading: bool,
}

impl ReplicaStatus {
    fn new() -> Self {
        ReplicaStatus {
            state: PluginState::Starting,
            reason: "added".into(),
            instance: String::new(),
            pid: None,
            restarts: 0,
            last_exit: None,
            ready_since: None,
            attached: None,
            tracker: None,
            identity: Default::default(),
            upgrading: false,
        }
    }
}

/// What a plugin publishes about itself, behind one lock: a view, not the
/// source of truth. The coordinator owns the spec and each actor its
/// replica; they write their part here for readers (`ps`, `inspect`, calls).
pub(crate) struct Board {
    inner: Mutex<BoardInner>,
    history_len: usize,
}

pub(crate) struct BoardInner {
    /// The spec the plugin runs (what the coordinator last committed).
    pub spec: Arc<Spec>,
    /// Methods the plugin reported in Initialize.
    pub methods: Vec<String>,
    /// The version the plugin reported in Initialize, when it said one.
    pub reported_version: Option<String>,
    pub replicas: Vec<ReplicaStatus>,
    pub history: VecDeque<Event>,
    /// The last change autoscaling made (reason, when), written by the
    /// coordinator.
    pub last_scaling: Option<(String, SystemTime)>,
}

impl Board {
    pub fn new(spec: Arc<Spec>, replicas: usize, history_len: usize) -> Self {
        Board {
            inner: Mutex::new(BoardInner {
                spec,
                methods: Vec::new(),
                reported_version: None,
                replicas: vec![ReplicaStatus::new(); replicas],
                history: VecDeque::new(),
                last_scaling: None,
            }),
            history_len,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, BoardInner> {
        // Every write is a few assignments; a panic elsewhere cannot leave
        // them half-done, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn spec(&self) -> Arc<Spec> {
        self.lock().spec.clone()
    }

    /// Records a transition of `event.replica`: its row and the bounded
    /// history.
    pub fn record(&self, event: &Event) {
        let mut b = self.lock();
        // A replica removed by scaling down has no row any more.
        if let Some(r) = b.replicas.get_mut(event.replica) {
            r.state = event.state;
            r.reason = event.reason.clone();
        }
        if b.history.len() >= self.history_len {
            b.history.pop_front();
        }
        b.history.push_back(event.clone());
    }

    /// Sets the number of replica rows (the coordinator's, when it
    /// scales): new rows start as `starting`.
    pub fn resize(&self, replicas: usize) {
        self.lock().replicas.resize(replicas, ReplicaStatus::new());
    }

    /// A summary of each replica, for "not ready" errors.
    pub fn why_waiting(&self) -> String {
        let b = self.lock();
        let states: Vec<String> = b
            .replicas
            .iter()
            .map(|r| format!("{}: {}", r.state, r.reason))
            .collect();
        states.join("; ")
    }
}

/// One plugin's view for `ps` and `inspect`, without isolation usage (the
/// caller reads that outside the board's lock).
pub(crate) fn info_of(name: &str, board: &Board) -> (PluginInfo, Arc<Spec>) {
    let b = board.lock();
    let replicas: Vec<ReplicaInfo> = b
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
            identity: r.identity.clone(),
        })
        .collect();
    let first = &replicas[0];
    let (state, reason) = if replicas.len() == 1 {
        (first.state, first.reason.clone())
    } else {
        let up = replicas.iter().filter(|r| r.state.is_up()).count();
        let all_ready = replicas.iter().all(|r| r.state == PluginState::Ready);
        let scaling = crate::autoscale::settling(&b.spec.manifest, &replicas);
        if all_ready {
            (
                PluginState::Ready,
                format!("{up}/{} replicas ready", replicas.len()),
            )
        } else if let Some(reason) = scaling {
            (PluginState::Ready, reason)
        } else if up > 0 {
            (
                PluginState::Degraded,
                format!("{up}/{} replicas up", replicas.len()),
            )
        } else {
            (first.state, first.reason.clone())
        }
    };
    let manifest = &b.spec.manifest;
    let scaling = manifest
        .autoscale
        .as_ref()
        .map(|a| crate::autoscale::ScalingInfo {
            min: a.min,
            max: a.max,
            current: replicas.len() as u32,
            last_reason: b.last_scaling.as_ref().map(|(r, _)| r.clone()),
            last_change: b.last_scaling.as_ref().map(|(_, t)| *t),
        });
    let info = PluginInfo {
        name: name.to_string(),
        version: manifest.version.to_string(),
        state,
        reason,
        instance: first.instance.clone(),
        pid: first.pid,
        restarts: replicas.iter().map(|r| r.restarts).sum(),
        last_exit: replicas.iter().find_map(|r| r.last_exit.clone()),
        ready_for: first.ready_for,
        exec: manifest.exec.clone(),
        methods: b.methods.clone(),
        reported_version: b.reported_version.clone(),
        isolation: Default::default(),
        remote: manifest.remote.as_ref().map(crate::remote::RemoteInfo::of),
        requires: manifest.requires.clone(),
        identity: replicas
            .iter()
            .find(|r| r.state.is_up())
            .unwrap_or(first)
            .identity
            .clone(),
        replicas,
        capabilities: manifest.capabilities.clone(),
        rate_limits: Vec::new(),
        scaling,
    };
    (info, b.spec.clone())
}
