//! `plugvisor upgrade-self` (and SIGUSR2), the daemon's side: replaces the
//! running daemon with a new plugvisor binary while every plugin keeps
//! running with the same pid.
//!
//! 1. Pre-flight: the new binary is run as a helper child
//!    (`<new> handover-check --format N <the daemon's config flags>`,
//!    bounded by [`PREFLIGHT_TIMEOUT`]). It must parse the config, accept
//!    the state format and say so on stdout; anything else (not executable,
//!    exit 1, garbage, a hang) refuses the upgrade with its reason while this
//!    daemon serves on. Only one upgrade runs at a time: another request is
//!    refused, not queued.
//! 2. Quiesce: this image stops accepting on the control socket and the
//!    metrics endpoint but keeps both listeners open (new clients wait in
//!    their backlogs), sends HTTP/2 GOAWAY to every control connection, and
//!    lets calls in flight finish. Follow streams end with
//!    [`crate::follow::handover_status`], so their clients connect again.
//! 3. Hand over: the supervisor's state and this daemon's part (the
//!    listener's descriptor, reload bookkeeping, timings) go to a sealed
//!    memfd (with the metrics listener's descriptor too); the process
//!    thread execs the new binary with exactly those
//!    descriptors inheritable (see [`plugvisor::handover`]). If the exec
//!    fails, or the state cannot be taken (a plugin is starting), this image
//!    serves on and `DaemonInfo.last_upgrade_error` says why.
//! 4. The new image ([`resume_env`]) reads the state, takes over the
//!    plugins and accepts on the inherited listener.
//!
//! Not covered by the pre-flight: a new binary that passes it and then
//! crashes after the exec, before it serves. The plugins, children of this
//! process, go down with it (their parent-death signal): the same as a
//! crash of the daemon.

use crate::control::{self, Access};
use crate::reload::Reloader;
use plugvisor::handover::{self, FORMAT, HandoverState};
use plugvisor::process::SpawnSpec;
use plugvisor::supervisor::Supervisor;
use plugvisor_proto as pb;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// The environment variable naming the descriptor of the hand-over state.
pub const ENV_FD: &str = "PLUGVISOR_HANDOVER_FD";
/// How long the new binary's pre-flight may take.
pub const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long calls in flight may run on once the switch begins.
pub const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// How long a plugin may stay starting or busy before the switch gives up.
const SETTLE: Duration = Duration::from_secs(5);
/// The line a binary's pre-flight prints when it can take over.
pub const PREFLIGHT_OK: &str = "plugvisor-handover-ok";

/// The daemon's part of the hand-over state.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct AppState {
    pub control_fd: i32,
    /// The metrics listener, if the daemon served metrics.
    #[serde(default)]
    pub metrics_fd: Option<i32>,
    /// The gRPC health listener (`health.address`), if served.
    #[serde(default)]
    pub health_fd: Option<i32>,
    /// The write end of the survivors' guard's pipe: the same guard goes on
    /// watching the new image (closing it would tell the guard the daemon
    /// died).
    #[serde(default)]
    pub guard_fd: Option<i32>,
    pub generation: u64,
    pub fingerprints: BTreeMap<String, String>,
    /// When `upgrade-self` was asked for, and when the old image stopped
    /// accepting control connections (unix ms).
    pub requested_unix_ms: u64,
    pub paused_unix_ms: u64,
}

/// How the daemon was launched: what an upgrade needs to launch the next.
#[derive(Default)]
pub struct Launch {
    /// The process manager whose process thread runs on the main thread.
    pub processes: Option<plugvisor::process::ProcessManager>,
    /// The arguments of `run` (after the program): the next image's.
    pub run_argv: Vec<OsString>,
    /// The arguments of the pre-flight (after the program).
    pub check_argv: Vec<OsString>,
}

/// A state handed over by a previous image: the supervisor's part, the
/// daemon's part and the inherited control listener.
pub struct Resumed {
    pub state: HandoverState,
    pub app: AppState,
    pub listener: tokio::net::UnixListener,
    pub metrics: Option<std::net::TcpListener>,
    pub health: Option<std::net::TcpListener>,
    pub guard: Option<OwnedFd>,
}

/// Reads the state a previous image handed over, if this image was started
/// by an `upgrade-self` (the state's descriptor is in [`ENV_FD`]).
pub fn resume_env() -> anyhow::Result<Option<Resumed>> {
    let Some(fd) = std::env::var_os(ENV_FD) else {
        return Ok(None);
    };
    let fd: i32 = fd
        .to_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("{ENV_FD}={fd:?} is not a descriptor number"))?;
    // SAFETY: the previous image passed this descriptor, once, for us alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut state = handover::read_state(fd)?;
    let app: AppState = serde_json::from_value(std::mem::take(&mut state.app))
        .map_err(|e| anyhow::anyhow!("the daemon's part of the hand-over state: {e}"))?;
    plugvisor::process::set_cloexec(app.control_fd, true);
    // SAFETY: the control listener, handed over by number, owned by us alone.
    let std_listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(app.control_fd) };
    std_listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(std_listener)?;
    let metrics = app.metrics_fd.map(|fd| {
        plugvisor::process::set_cloexec(fd, true);
        // SAFETY: the metrics listener, handed over by number, ours alone.
        unsafe { std::net::TcpListener::from_raw_fd(fd) }
    });
    let health = app.health_fd.map(|fd| {
        plugvisor::process::set_cloexec(fd, true);
        // SAFETY: the gRPC health listener, handed over by number, ours alone.
        unsafe { std::net::TcpListener::from_raw_fd(fd) }
    });
    let guard = app.guard_fd.map(|fd| {
        plugvisor::process::set_cloexec(fd, true);
        // SAFETY: the guard's pipe, handed over by number, ours alone.
        unsafe { OwnedFd::from_raw_fd(fd) }
    });
    Ok(Some(Resumed {
        state,
        app,
        listener,
        metrics,
        health,
        guard,
    }))
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

type Server = (
    CancellationToken,
    JoinHandle<Result<(), tonic::transport::Error>>,
);
type MetricsServer = (CancellationToken, JoinHandle<()>);

/// Serves the control socket and replaces the daemon on request.
pub struct Upgrader {
    supervisor: Supervisor,
    reloader: Arc<Reloader>,
    listener: Arc<tokio::net::UnixListener>,
    access: tokio::sync::watch::Receiver<Access>,
    /// The daemon's shutdown: the control server's token is its child.
    cancel: CancellationToken,
    server: Mutex<Option<Server>>,
    /// The metrics endpoint's listener, handed over like the control
    /// socket's, and its server.
    metrics: Option<Arc<tokio::net::TcpListener>>,
    metrics_server: Mutex<Option<MetricsServer>>,
    /// A copy of the gRPC health listener, handed over as it is: its
    /// server runs until the exec, and probes that arrive during the
    /// switch wait in its backlog for the new image.
    health: Mutex<Option<std::net::TcpListener>>,
    /// The survivors' guard's pipe (owned by the daemon, which outlives
    /// every switch), handed over so the guard goes on.
    guard_fd: Mutex<Option<std::os::fd::RawFd>>,
    run_argv: Vec<OsString>,
    check_argv: Vec<OsString>,
    /// The binary this image runs from: the default new binary.
    binary: PathBuf,
    generation: u64,
    /// Held by the running upgrade: another is refused.
    busy: Arc<tokio::sync::Mutex<()>>,
    last_error: Mutex<String>,
    /// Set while the control server stops for a switch: follow streams
    /// then end saying so, and their clients connect again.
    switching: std::sync::atomic::AtomicBool,
    last_handover_ms: u64,
    last_pause_ms: u64,
    tasks: tokio_util::task::TaskTracker,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain values, always consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Upgrader {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        supervisor: Supervisor,
        reloader: Arc<Reloader>,
        listener: tokio::net::UnixListener,
        access: tokio::sync::watch::Receiver<Access>,
        cancel: CancellationToken,
        launch: &Launch,
        resumed: Option<&AppState>,
        metrics: Option<tokio::net::TcpListener>,
    ) -> Arc<Upgrader> {
        let now = unix_ms(SystemTime::now());
        let (generation, handover_ms, pause_ms) = match resumed {
            Some(app) => (
                app.generation,
                now.saturating_sub(app.requested_unix_ms),
                now.saturating_sub(app.paused_unix_ms),
            ),
            None => (0, 0, 0),
        };
        Arc::new(Upgrader {
            supervisor,
            reloader,
            listener: Arc::new(listener),
            access,
            cancel,
            server: Mutex::new(None),
            metrics: metrics.map(Arc::new),
            metrics_server: Mutex::new(None),
            health: Mutex::new(None),
            guard_fd: Mutex::new(None),
            run_argv: launch.run_argv.clone(),
            check_argv: launch.check_argv.clone(),
            binary: std::env::current_exe().unwrap_or_default(),
            generation,
            busy: Arc::default(),
            last_error: Mutex::default(),
            switching: Default::default(),
            last_handover_ms: handover_ms,
            last_pause_ms: pause_ms,
            tasks: tokio_util::task::TaskTracker::new(),
        })
    }

    /// Hands `listener` (a copy of the gRPC health listener) over at every
    /// switch.
    pub fn keep_health_listener(&self, listener: std::net::TcpListener) {
        *lock(&self.health) = Some(listener);
    }

    /// Hands the survivors' guard's pipe (`fd`, held by the daemon for as
    /// long as it runs) over at every switch.
    pub fn keep_guard_pipe(&self, fd: std::os::fd::RawFd) {
        *lock(&self.guard_fd) = Some(fd);
    }

    /// Starts serving the control socket.
    pub fn start_server(self: &Arc<Self>) {
        let token = self.cancel.child_token();
        let task = tokio::spawn(control::serve_shared(
            self.supervisor.clone(),
            self.listener.clone(),
            self.access.clone(),
            Some(self.reloader.clone()),
            Some(self.clone()),
            token.clone(),
            DRAIN_GRACE,
        ));
        *lock(&self.server) = Some((token, task));
        if let Some(listener) = &self.metrics {
            let token = self.cancel.child_token();
            let task = tokio::spawn(crate::metrics_http::serve_shared(
                listener.clone(),
                self.supervisor.clone(),
                crate::metrics_http::Limits::default(),
                token.clone(),
            ));
            *lock(&self.metrics_server) = Some((token, task));
        }
    }

    /// Stops serving: no more accepts (the listener stays open), GOAWAY,
    /// calls in flight finish within the grace.
    pub async fn stop_server(&self) {
        let metrics = lock(&self.metrics_server).take();
        if let Some((token, task)) = metrics {
            token.cancel();
            if let Err(e) = task.await {
                tracing::warn!("metrics endpoint task: {e}");
            }
        }
        let server = lock(&self.server).take();
        if let Some((token, task)) = server {
            token.cancel();
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("control socket: {e}"),
                Err(e) => tracing::warn!("control socket task: {e}"),
            }
        }
    }

    /// Waits for an upgrade in progress to end (at shutdown).
    pub async fn finish(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Whether the control server is stopping for a switch to a new binary.
    pub fn switching(&self) -> bool {
        self.switching.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn info(&self) -> pb::DaemonInfoResponse {
        pb::DaemonInfoResponse {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            binary: self.binary.display().to_string(),
            generation: self.generation,
            last_upgrade_error: lock(&self.last_error).clone(),
            last_handover_ms: self.last_handover_ms,
            last_pause_ms: self.last_pause_ms,
        }
    }

    /// Checks `binary` (default: this image's) and, if it passes, starts the
    /// switch to it. Refused while another upgrade runs.
    pub async fn request(
        self: &Arc<Self>,
        binary: Option<PathBuf>,
    ) -> Result<pb::UpgradeSelfResponse, Status> {
        let guard = self.busy.clone().try_lock_owned().map_err(|_| {
            Status::failed_precondition(
                "an upgrade-self is already running; this request is refused (not queued): wait for it to finish, then try again",
            )
        })?;
        if self.cancel.is_cancelled() {
            return Err(Status::unavailable("the daemon is shutting down"));
        }
        let requested = SystemTime::now();
        let binary = binary.unwrap_or_else(|| self.binary.clone());
        let refuse = |why: String| {
            Status::failed_precondition(format!(
                "not upgraded to {}: {why}; this daemon keeps running",
                binary.display()
            ))
        };
        let binary = std::fs::canonicalize(&binary)
            .map_err(|e| refuse(format!("cannot resolve the path: {e}")))?;
        let version = self.preflight(&binary).await.map_err(refuse)?;
        lock(&self.last_error).clear();
        tracing::info!(
            binary = %binary.display(),
            version,
            "upgrade-self: the new binary passed its pre-flight; handing over"
        );
        let this = self.clone();
        let target = binary.clone();
        self.tasks.spawn(async move {
            let _guard = guard;
            this.switch(target, requested).await;
        });
        Ok(pb::UpgradeSelfResponse {
            binary: binary.display().to_string(),
            version,
            generation: self.generation + 1,
        })
    }

    /// Runs `<binary> handover-check`, bounded in time and output; the
    /// version it reports, or why it cannot take over.
    async fn preflight(&self, binary: &Path) -> Result<String, String> {
        use tokio::io::AsyncReadExt;
        let spec = SpawnSpec {
            program: binary.to_path_buf(),
            args: self
                .check_argv
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            env: vec![("PATH".into(), plugvisor::instance::DEFAULT_PATH.into())],
            cwd: "/".into(),
        };
        let mut child = self
            .supervisor
            .processes()
            .spawn(&spec)
            .await
            .map_err(|e| format!("cannot run it: {e}"))?;
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let read = |pipe: Option<tokio::net::unix::pipe::Receiver>| async move {
            let mut text = Vec::new();
            if let Some(pipe) = pipe {
                let _ = pipe.take(64 * 1024).read_to_end(&mut text).await;
            }
            String::from_utf8_lossy(&text).into_owned()
        };
        let ran = tokio::time::timeout(PREFLIGHT_TIMEOUT, async {
            tokio::join!(read(stdout), read(stderr), child.wait())
        })
        .await;
        let Ok((out, err, status)) = ran else {
            let _ = child.signal_group(libc::SIGKILL);
            let _ = child.signal(libc::SIGKILL);
            return Err(format!(
                "its pre-flight check (`handover-check`) did not finish within {}s, so it was killed",
                PREFLIGHT_TIMEOUT.as_secs()
            ));
        };
        let said = |text: &str| {
            let text = text.trim();
            let mut tail: String = text.chars().rev().take(400).collect();
            tail = tail.chars().rev().collect();
            if tail.is_empty() {
                "nothing".to_string()
            } else {
                format!("`{tail}`")
            }
        };
        if !status.success() {
            return Err(format!(
                "its pre-flight check (`handover-check`) {status}; it said {}",
                said(&format!("{out}{err}"))
            ));
        }
        let ok = out
            .lines()
            .find_map(|l| l.strip_prefix(PREFLIGHT_OK).map(str::trim));
        let Some(ok) = ok else {
            return Err(format!(
                "its pre-flight check exited 0 without saying it can take over (`{PREFLIGHT_OK} ...`); it said {}",
                said(&out)
            ));
        };
        let field = |name: &str| {
            ok.split_whitespace()
                .find_map(|f| f.strip_prefix(name))
                .map(str::to_string)
        };
        let version = field("version=").unwrap_or_default();
        match field("format=").and_then(|f| f.parse::<u32>().ok()) {
            Some(f) if f >= FORMAT => Ok(version),
            other => Err(format!(
                "it reads hand-over states up to format {}, this daemon writes format {FORMAT}",
                other.map_or("?".to_string(), |f| f.to_string())
            )),
        }
    }

    /// The switch itself; returns only if it failed (then this image serves
    /// on and the reason is kept for `DaemonInfo`).
    async fn switch(self: &Arc<Self>, binary: PathBuf, requested: SystemTime) {
        let paused = SystemTime::now();
        self.switching
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.stop_server().await;
        let why = self.try_switch(&binary, requested, paused).await;
        self.switching
            .store(false, std::sync::atomic::Ordering::SeqCst);
        tracing::error!(
            "upgrade-self to {} failed: {why}; this daemon keeps serving",
            binary.display()
        );
        *lock(&self.last_error) = why;
        if !self.cancel.is_cancelled() {
            self.start_server();
        }
    }

    async fn try_switch(&self, binary: &Path, requested: SystemTime, paused: SystemTime) -> String {
        let deadline = Instant::now() + SETTLE;
        let mut taken = loop {
            match self
                .supervisor
                .take_handover_state(Duration::from_secs(1))
                .await
            {
                Ok(taken) => break taken,
                Err(handover::HandoverError::Busy(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return e.to_string(),
            }
        };
        let health_fd = lock(&self.health).as_ref().map(|l| l.as_raw_fd());
        let guard_fd = *lock(&self.guard_fd);
        let app = AppState {
            control_fd: self.listener.as_raw_fd(),
            metrics_fd: self.metrics.as_ref().map(|l| l.as_raw_fd()),
            health_fd,
            guard_fd,
            generation: self.generation + 1,
            fingerprints: self.reloader.fingerprints().await,
            requested_unix_ms: unix_ms(requested),
            paused_unix_ms: unix_ms(paused),
        };
        taken.state.app = match serde_json::to_value(&app) {
            Ok(v) => v,
            Err(e) => return format!("cannot serialize the daemon's state: {e}"),
        };
        let memfd = match handover::write_state(&taken.state) {
            Ok(fd) => fd,
            Err(e) => return format!("cannot write the hand-over state: {e}"),
        };
        let mut env: Vec<(OsString, OsString)> =
            std::env::vars_os().filter(|(k, _)| k != ENV_FD).collect();
        env.push((ENV_FD.into(), memfd.as_raw_fd().to_string().into()));
        let mut args = vec![binary.as_os_str().to_os_string()];
        args.extend(self.run_argv.iter().cloned());
        let mut extra = vec![self.listener.as_raw_fd(), memfd.as_raw_fd()];
        extra.extend(self.metrics.as_ref().map(|l| l.as_raw_fd()));
        extra.extend(health_fd);
        extra.extend(guard_fd);
        let error = self
            .supervisor
            .exec_handover(&taken, &extra, binary.to_path_buf(), args, env)
            .await;
        error.to_string()
    }
}
