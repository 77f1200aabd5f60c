//! What every plugin of one supervisor shares: its options, the process
//! spawner, the isolation mechanism, the event stream, metrics, the
//! shutdown token and the trackers of every task it starts.

use crate::isolation::{Isolation, IsolationOptions};
use crate::metrics::Metrics;
use crate::process::ProcessManager;
use crate::status::Event;
use std::path::PathBuf;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    /// Instances taken over from a previous supervisor image: their socket
    /// directories and cgroups are not swept at start.
    pub keep_instances: Vec<String>,
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
            keep_instances: Vec::new(),
        }
    }
}

pub(crate) struct Host {
    pub opts: SupervisorOptions,
    pub processes: ProcessManager,
    /// The limits' mechanism, chosen once at start-up, and live cgroups.
    pub isolation: Isolation,
    pub events: broadcast::Sender<Event>,
    /// Fired once, at shutdown: every coordinator and actor stops.
    pub cancel: CancellationToken,
    /// Coordinators, replica actors and the orphan sweeper: awaited on
    /// shutdown.
    pub tasks: TaskTracker,
    /// Output readers and exit waiters: end with their children.
    pub io_tasks: TaskTracker,
    pub metrics: Metrics,
}
