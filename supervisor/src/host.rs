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
    /// Calls by capability try local providers before remote ones (else
    /// load alone decides).
    pub prefer_local: bool,
    /// `survive_supervisor` for plugins whose manifest does not say (the
    /// supervisor config's default). See [`crate::adopt`].
    pub survive_supervisor: crate::manifest::SurvivePolicy,
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
            prefer_local: true,
            survive_supervisor: crate::manifest::SurvivePolicy::OFF,
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
    /// The supervised plugins, for looking up what a plugin requires (weak:
    /// the facade owns it).
    pub registry: std::sync::Weak<crate::plugin::Registry>,
    /// Who provides which capability; coordinators keep their plugin's
    /// entry current.
    pub capabilities: crate::capability::CapabilityIndex,
    /// Plugin metadata by executable checksum (see [`crate::tenant`]).
    pub metadata: std::sync::Arc<crate::tenant::MetadataCache>,
    /// Per container runtime (podman, runc): the sweep of containers an
    /// earlier run left, done before this run's first container starts.
    pub container_sweeps: [tokio::sync::OnceCell<()>; 2],
    /// Survivors of an earlier run, and where this run's are recorded.
    pub survivors: std::sync::Arc<crate::adopt::Survivors>,
}

impl SupervisorOptions {
    /// Where survivors are recorded: below the state dir, else the runtime
    /// dir.
    pub fn survivors_dir(&self) -> PathBuf {
        self.state_dir
            .as_ref()
            .unwrap_or(&self.runtime_dir)
            .join(crate::adopt::DIR_NAME)
    }
}

impl Host {
    /// Removes, once per runtime and before any container of this
    /// supervisor runs, the containers an earlier run left behind (see
    /// [`crate::container::sweep_stale`]). A failure is logged: the start
    /// goes on (its own container is replaced by name anyway).
    pub async fn sweep_containers(
        &self,
        runtime: crate::manifest::ContainerRuntime,
        program: &std::path::Path,
    ) {
        let cell = &self.container_sweeps[runtime as usize];
        cell.get_or_init(|| async {
            match crate::container::sweep_stale(
                &self.processes,
                &self.opts.runtime_dir,
                runtime,
                program,
                &self.opts.keep_instances,
            )
            .await
            {
                Ok(removed) if removed.is_empty() => {}
                Ok(removed) => tracing::info!(
                    "removed {} stale {} container(s) of an earlier run: {}",
                    removed.len(),
                    runtime.as_str(),
                    removed.join(", ")
                ),
                Err(e) => tracing::warn!(
                    "cannot sweep stale {} containers of an earlier run: {e}",
                    runtime.as_str()
                ),
            }
        })
        .await;
    }
}
