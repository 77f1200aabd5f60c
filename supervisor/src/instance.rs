//! One started child of a plugin: spawn, handshake, connect, Initialize, and
//! a graceful stop. The supervision loop in [`crate::supervisor`] decides when;
//! this module knows how.

use crate::isolation::preexec::ExecFd;
use crate::isolation::{CgroupLease, Isolation, PrepareError, Prepared};
use crate::logs::{LineReader, LogBuffer, LogLine};
use crate::manifest::Manifest;
use crate::process::{Child, ExitStatus, ProcessManager, SpawnSpec};
use crate::transport::Connection;
use plugvisor_proto::handshake::{self, Handshake};
use plugvisor_proto::plugin_client::PluginClient;
use plugvisor_proto::{InitializeRequest, InitializeResponse, RestoredState, ShutdownRequest};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// PATH given to every plugin; nothing else of the supervisor's environment is.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Socket paths longer than this do not fit in `sockaddr_un`.
const MAX_SOCKET_PATH: usize = 107;

/// Why a start failed. Each becomes the exit reason of the attempt.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StartError {
    #[error("cannot prepare the socket directory {path}: {reason}")]
    SocketDir { path: PathBuf, reason: String },
    #[error("cannot start {exec}: {reason}")]
    Spawn { exec: PathBuf, reason: String },
    #[error("{status} before the handshake{}", last_output(.output))]
    ExitedEarly {
        status: ExitStatus,
        output: Vec<String>,
    },
    #[error("no handshake within {}ms{}", .timeout.as_millis(), last_output(.output))]
    StartTimeout {
        timeout: Duration,
        output: Vec<String>,
    },
    #[error("handshake error: {0}")]
    Handshake(String),
    #[error("cannot connect to the plugin's socket: {0}")]
    Connect(String),
    #[error("Initialize did not answer within {}ms", .0.as_millis())]
    InitializeTimeout(Duration),
    #[error("Initialize failed: {0}")]
    InitializeFailed(String),
    /// The plugin may not run as it is (a sha256 mismatch, a writable
    /// executable, an unknown user): no restart helps until it changes.
    #[error("refused: {0}")]
    Refused(String),
    /// Its isolation could not be set up (a cgroup could not be made).
    #[error("cannot isolate {exec}: {reason}")]
    Isolation { exec: PathBuf, reason: String },
    /// The OOM killer ended it before the handshake: the memory limit is too
    /// low for it to start.
    #[error("killed by the OOM killer (memory limit) before the handshake{}", last_output(.output))]
    OomKilled { output: Vec<String> },
    /// A saved state snapshot could not be read (see
    /// [`crate::state::LoadError`]): starting without it would silently lose
    /// the state it may hold.
    #[error("cannot restore its saved state: {0}")]
    StateUnreadable(String),
    /// A lifecycle hook failed: pre-start (the plugin was not spawned) or
    /// post-ready (the instance was killed).
    #[error("{0}")]
    Hook(crate::hooks::HookError),
}

fn last_output(lines: &[String]) -> String {
    if lines.is_empty() {
        "; the plugin printed nothing".to_string()
    } else {
        format!("; last output: {}", lines.join(" | "))
    }
}

/// A child that has handshaken and been connected to, not yet initialized.
pub struct Instance {
    /// `<plugin>-<replica>-<start number>`, unique per start.
    pub id: String,
    pub child: Child,
    pub client: Client,
    /// The 0700 directory holding the socket; removed on drop.
    pub socket_dir: PathBuf,
    pub spawned_at: Instant,
    /// The instance's cgroup, when cgroups are in use: killed and removed
    /// when the instance is dropped.
    pub cgroup: Option<CgroupLease>,
    /// Its `Session` streams, once it said in Initialize that it serves them.
    pub(crate) sessions: Option<Arc<crate::session::Sessions>>,
    /// Copies of the read ends of its stdout and stderr pipes, close-on-exec,
    /// for a hand-over to a new supervisor image (see [`crate::handover`]).
    pub(crate) output: [Option<Arc<std::os::fd::OwnedFd>>; 2],
    /// A container plugin's container: removed when the instance is
    /// dropped.
    pub container: Option<crate::container::ContainerGuard>,
    /// What it runs: the executable's digest and signer (empty without
    /// isolation).
    pub identity: crate::signature::RunIdentity,
    /// `survive_supervisor`: its record and output files (see
    /// [`crate::adopt`]).
    pub survival: Option<crate::adopt::Survival>,
}

impl Instance {
    /// Whether the child, which ended with `status`, was ended by the OOM
    /// killer, as its cgroup's own counters say.
    pub fn oom_killed(&self, status: ExitStatus) -> bool {
        self.cgroup
            .as_ref()
            .is_some_and(|c| c.cgroup().oom_evidence().explains(status))
    }

    /// [`Self::oom_killed`], and for a container plugin what its runtime's
    /// cgroup or the runtime itself says (see
    /// [`crate::container::ContainerGuard::oom_killed`]).
    pub async fn ended_by_oom(&self, status: ExitStatus) -> bool {
        match &self.container {
            Some(guard) => guard.oom_killed(status).await,
            None => self.oom_killed(status),
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.socket_dir);
    }
}

/// What the supervisor hands a start: who, where, and its log buffer.
pub struct StartContext<'a> {
    pub manifest: &'a Manifest,
    pub instance_id: String,
    pub runtime_dir: &'a Path,
    pub env: Vec<(String, String)>,
    pub logs: Arc<LogBuffer>,
    pub processes: &'a ProcessManager,
    pub tasks: &'a tokio_util::task::TaskTracker,
    /// Limits, hardening and pinning; `None` spawns without them.
    pub isolation: Option<&'a Isolation>,
    /// Survive a crash of the supervisor, recorded in this directory.
    pub survive: Option<(crate::manifest::SurvivePolicy, &'a crate::adopt::Survivors)>,
}

/// Prepares `<runtime_dir>/plugins/<instance>/` with mode 0700, below a
/// `plugins` directory others may traverse but not list (0711). A plugin
/// that runs as another user gets its directory as its owner (`owner`).
fn socket_dir(
    runtime_dir: &Path,
    instance_id: &str,
    owner: Option<(u32, u32)>,
) -> Result<PathBuf, StartError> {
    use std::os::unix::fs::DirBuilderExt;
    let plugins = runtime_dir.join("plugins");
    let dir = plugins.join(instance_id);
    let fail = |reason: String| StartError::SocketDir {
        path: dir.clone(),
        reason,
    };
    let _ = std::fs::remove_dir_all(&dir);
    // Checked, not just created: a `plugins` that is a planted symlink, or
    // that others may write in, is refused.
    crate::rundir::secure_dir(&plugins, 0o711).map_err(|e| fail(e.to_string()))?;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| fail(e.to_string()))?;
    // Whatever the umask.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(|e| fail(e.to_string()))?;
    if let Some((uid, gid)) = owner {
        // Made by an older version, or by hand.
        let traversable = std::os::unix::fs::PermissionsExt::from_mode(0o711);
        std::fs::set_permissions(&plugins, traversable).map_err(|e| {
            fail(format!(
                "cannot set mode 0711 on {}: {e}",
                plugins.display()
            ))
        })?;
        reachable_by(&plugins, uid, gid).map_err(fail)?;
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
            .map_err(|e| fail(format!("cannot hand it to uid {uid} gid {gid}: {e}")))?;
    }
    Ok(dir)
}

/// Makes `<socket dir>/tmp`, mode 0700, owned by the plugin's user: the
/// private tmp of a plugin in a filesystem view. It goes with the socket
/// directory when the instance ends.
fn own_tmp(socket_dir: &Path, owner: Option<(u32, u32)>) -> Result<PathBuf, String> {
    use std::os::unix::fs::DirBuilderExt;
    let tmp = socket_dir.join("tmp");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .map_err(|e| format!("cannot create the private tmp {}: {e}", tmp.display()))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&tmp, Some(uid), Some(gid)).map_err(|e| {
            format!(
                "cannot hand the private tmp {} to uid {uid} gid {gid}: {e}",
                tmp.display()
            )
        })?;
    }
    Ok(tmp)
}

/// Checks that a plugin running as `uid`:`gid` can traverse every directory
/// down to `dir`, so that it can create its socket below it.
fn reachable_by(dir: &Path, uid: u32, gid: u32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    for ancestor in dir.ancestors() {
        let Ok(meta) = std::fs::metadata(ancestor) else {
            continue;
        };
        let bit = if meta.uid() == uid {
            0o100
        } else if meta.gid() == gid {
            0o010
        } else {
            0o001
        };
        if meta.mode() & bit == 0 {
            return Err(format!(
                "uid {uid} cannot reach its socket: {} is mode {:04o}; make it traversable (chmod o+x) or choose another runtime_dir",
                ancestor.display(),
                meta.mode() & 0o7777
            ));
        }
    }
    Ok(())
}

/// Isolation's part of a start: the executable checked, credentials
/// resolved, rlimits computed, the cgroup made. `None` without isolation.
async fn prepare_isolation(ctx: &StartContext<'_>) -> Result<Option<Prepared>, StartError> {
    let Some(isolation) = ctx.isolation else {
        return Ok(None);
    };
    match isolation.prepare(ctx.manifest, &ctx.instance_id).await {
        Ok(prepared) => Ok(Some(prepared)),
        Err(PrepareError::Refused(why)) => Err(StartError::Refused(why)),
        Err(PrepareError::Failed(why)) => Err(StartError::Isolation {
            exec: ctx.manifest.exec.clone(),
            reason: why,
        }),
    }
}

/// Spawns the plugin and waits for its handshake, then connects. On failure
/// the child's whole process group is killed and reaped before returning.
pub async fn spawn(ctx: StartContext<'_>) -> Result<Instance, StartError> {
    let m = ctx.manifest;
    // Checks and cgroup first: a refused plugin leaves nothing behind. A
    // container's isolation is its runtime's.
    let prepared = match m.container {
        Some(_) => None,
        None => prepare_isolation(&ctx).await?,
    };
    // Dropping the lease (on any failure below) kills and removes the cgroup.
    let cg = prepared.as_ref().and_then(|p| p.cgroup.clone());
    let cgroup = match (ctx.isolation, cg) {
        (Some(isolation), Some(cg)) => Some(isolation.lease(&ctx.instance_id, cg, ctx.tasks)),
        _ => None,
    };
    let mut prepared = prepared;
    let identity = prepared
        .as_ref()
        .map(|p| p.identity.clone())
        .unwrap_or_default();
    let owner = match &m.container {
        // The container's user, resolved on the host, owns its socket dir.
        Some(_) => crate::container::owner(m).map_err(StartError::Refused)?,
        None => prepared.as_ref().and_then(|p| p.owner),
    };
    let dir = socket_dir(ctx.runtime_dir, &ctx.instance_id, owner)?;
    let tmp = match &mut prepared {
        Some(p) if p.private_tmp => match own_tmp(&dir, owner).and_then(|tmp| {
            p.allow_own_dir(&dir)
                .map_err(|e| format!("cannot add it to the filesystem view: {e}"))?;
            Ok(tmp)
        }) {
            Ok(tmp) => Some(tmp),
            Err(reason) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(StartError::SocketDir { path: dir, reason });
            }
        },
        _ => None,
    };
    let survival = match survive_output(&ctx, &mut prepared, cgroup.is_some()) {
        Ok(survival) => survival,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
    };
    let socket = dir.join("plugin.sock");
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(StartError::SocketDir {
            path: socket.clone(),
            reason: format!(
                "the socket path is {} bytes, over the {MAX_SOCKET_PATH}-byte limit of Unix sockets; choose a shorter runtime_dir",
                socket.as_os_str().len()
            ),
        });
    }
    let mut env: Vec<(OsString, OsString)> = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        (handshake::ENV_SOCKET.into(), socket.clone().into()),
        (handshake::ENV_NAME.into(), m.name.clone().into()),
        (
            handshake::ENV_INSTANCE_ID.into(),
            ctx.instance_id.clone().into(),
        ),
        (
            handshake::ENV_PROTOCOL_VERSIONS.into(),
            handshake::PROTOCOL_VERSION.to_string().into(),
        ),
        (
            handshake::ENV_MAGIC_COOKIE.into(),
            handshake::MAGIC_COOKIE_VALUE.into(),
        ),
    ];
    // Unless the manifest's env points it elsewhere (a sealed executable
    // gets the list as it is, so no name may appear twice).
    if let Some(tmp) = tmp
        && !ctx.env.iter().any(|(k, _)| k == "TMPDIR")
    {
        env.push(("TMPDIR".into(), tmp.into()));
    }
    env.extend(ctx.env.iter().map(|(k, v)| (k.into(), v.into())));
    let (spec, mut container) = match &m.container {
        None => (
            SpawnSpec {
                program: m.exec.clone(),
                args: m.args.clone(),
                env,
                cwd: m.dir.clone(),
            },
            None,
        ),
        Some(c) => match crate::container::plan(
            m,
            c,
            ctx.runtime_dir,
            &ctx.instance_id,
            &dir,
            env,
            ctx.processes,
            ctx.tasks,
        )
        .await
        {
            Ok(plan) => (plan.spec, Some(plan.guard)),
            Err(reason) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(StartError::Spawn {
                    exec: m.exec.clone(),
                    reason,
                });
            }
        },
    };
    let spawned_at = Instant::now();
    let spawned = match prepared {
        None => ctx.processes.spawn(&spec).await,
        Some(p) => {
            let exec = match p.exec.exec_from_fd() {
                false => None,
                true => Some(ExecFd {
                    keep_open: p.exec.script,
                    fd: p.exec.fd,
                }),
            };
            ctx.processes.spawn_with(&spec, p.child, exec).await
        }
    };
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(StartError::Spawn {
                exec: m.exec.clone(),
                reason: e.to_string(),
            });
        }
    };
    let (handshake_tx, handshake_rx) = oneshot::channel();
    let output = output_copies(&child);
    match &survival {
        Some(s) => crate::adopt::start_tails(
            ctx.tasks,
            s,
            crate::adopt::TailSink {
                plugin: m.name.clone(),
                instance: ctx.instance_id.clone(),
                logs: ctx.logs.clone(),
            },
            &child,
            Some(handshake_tx),
        ),
        None => forward_output(&ctx, &mut child, Some(handshake_tx)),
    }
    let instance_id = ctx.instance_id.clone();
    let result = await_handshake(&ctx, &child, &socket, handshake_rx).await;
    // The memory limit may be too low for the plugin to start at all.
    let result = match result {
        Err(StartError::ExitedEarly { status, output })
            if cgroup
                .as_ref()
                .is_some_and(|c| c.cgroup().oom_evidence().explains(status)) =>
        {
            Err(StartError::OomKilled { output })
        }
        other => other,
    };
    let result = match result {
        Ok(()) => {
            let remaining = m.timeouts.start.0.saturating_sub(spawned_at.elapsed());
            // A container's socket is served by its init process, which the
            // runtime names; any other plugin's, by the child itself.
            let expected = match &mut container {
                Some(guard) => {
                    let init = crate::container::init_pid(ctx.processes, guard)
                        .await
                        .map_err(StartError::Connect);
                    // Its runtime's cgroup, for inspect, ps and OOM kills.
                    if let (Ok(pid), Some(isolation)) = (&init, ctx.isolation) {
                        guard.observe(isolation, &ctx.instance_id, *pid);
                    }
                    init
                }
                None => Ok(child.pid()),
            };
            match expected {
                Err(e) => Err(e),
                Ok(expected) => match tokio::time::timeout(
                    remaining.max(Duration::from_millis(100)),
                    crate::transport::connect_plugin(&socket, expected),
                )
                .await
                {
                    Ok(Ok(channel)) => Ok(channel),
                    Ok(Err(e)) => Err(StartError::Connect(e.to_string())),
                    Err(_) => Err(StartError::Connect(format!(
                        "no connection within the start timeout to {}",
                        socket.display()
                    ))),
                },
            }
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(channel) => Ok(Instance {
            id: instance_id,
            client: Client::new(channel),
            child,
            socket_dir: dir,
            spawned_at,
            cgroup,
            sessions: None,
            output,
            container,
            identity,
            survival,
        }),
        Err(e) => {
            kill_and_reap(&child).await;
            let _ = std::fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}

/// A survivor's output files, when the start asks to survive the
/// supervisor and can: it needs a cgroup (to stay contained unsupervised
/// and to be proven itself later); without one it is started as any other
/// plugin, and a warning says so.
fn survive_output(
    ctx: &StartContext<'_>,
    prepared: &mut Option<Prepared>,
    has_cgroup: bool,
) -> Result<Option<crate::adopt::Survival>, StartError> {
    let Some((policy, survivors)) = ctx.survive.filter(|(p, _)| p.enabled) else {
        return Ok(None);
    };
    let Some(p) = prepared.as_mut().filter(|_| has_cgroup) else {
        tracing::warn!(
            plugin = %ctx.manifest.name,
            instance = %ctx.instance_id,
            "survive_supervisor is set, but this supervisor runs without cgroups, which a survivor needs (to stay contained, and to prove its identity later): it will die with the supervisor"
        );
        return Ok(None);
    };
    let paths = survivors.paths(&ctx.instance_id);
    let fds = crate::adopt::create_output(&paths).map_err(|e| StartError::Spawn {
        exec: ctx.manifest.exec.clone(),
        reason: format!(
            "cannot create its output files in {}: {e}",
            paths.dir.display()
        ),
    })?;
    p.child.survive = true;
    p.child.output = Some(fds);
    Ok(Some(crate::adopt::Survival { paths, policy }))
}

/// Close-on-exec copies of the read ends of the child's output pipes.
pub(crate) fn output_copies(child: &Child) -> [Option<Arc<std::os::fd::OwnedFd>>; 2] {
    use std::os::fd::AsFd;
    let copy = |fd: Option<std::os::fd::BorrowedFd<'_>>| {
        fd.and_then(|fd| fd.try_clone_to_owned().ok()).map(Arc::new)
    };
    [
        copy(child.stdout.as_ref().map(|p| p.as_fd())),
        copy(child.stderr.as_ref().map(|p| p.as_fd())),
    ]
}

/// Starts the tasks that read the child's stdout and stderr. The first valid
/// handshake line on stdout goes to `handshake` (when one is awaited); every
/// other line is log output.
pub(crate) fn forward_output(
    ctx: &StartContext<'_>,
    child: &mut Child,
    handshake: Option<oneshot::Sender<Result<Handshake, String>>>,
) {
    let plugin = ctx.manifest.name.clone();
    if let Some(stdout) = child.stdout.take() {
        let (plugin, instance, logs) = (plugin.clone(), ctx.instance_id.clone(), ctx.logs.clone());
        ctx.tasks.spawn(async move {
            let mut reader = LineReader::new(stdout);
            let mut handshake = handshake;
            while let Some(line) = reader.next_line().await {
                if handshake.is_some() {
                    match Handshake::parse(&line) {
                        Ok(h) => {
                            if let Some(tx) = handshake.take() {
                                let _ = tx.send(Ok(h));
                            }
                            continue;
                        }
                        Err(handshake::HandshakeError::Malformed(why)) => {
                            if let Some(tx) = handshake.take() {
                                let _ = tx.send(Err(why));
                            }
                        }
                        Err(handshake::HandshakeError::NotAHandshake) => {}
                    }
                }
                record(&plugin, &logs, &instance, "stdout", line);
            }
            logs.finish(&plugin, &instance);
        });
    }
    if let Some(stderr) = child.stderr.take() {
        let (instance, logs) = (ctx.instance_id.clone(), ctx.logs.clone());
        ctx.tasks.spawn(async move {
            let mut reader = LineReader::new(stderr);
            while let Some(line) = reader.next_line().await {
                record(&plugin, &logs, &instance, "stderr", line);
            }
            logs.finish(&plugin, &instance);
        });
    }
}

fn record(plugin: &str, logs: &LogBuffer, instance: &str, stream: &'static str, line: String) {
    let line = LogLine {
        time: std::time::SystemTime::now(),
        instance: instance.to_string(),
        stream,
        line,
    };
    logs.record(plugin, line);
}

/// The last few lines this instance printed, for error messages.
fn recent_output(logs: &LogBuffer, instance: &str) -> Vec<String> {
    let lines: Vec<String> = logs
        .tail(usize::MAX)
        .into_iter()
        .filter(|l| l.instance == instance)
        .map(|l| format!("`{}`", l.line))
        .collect();
    first_and_last(lines, 3, 3)
}

/// The first `head` and last `tail` of `lines`, with how many were left out
/// between them: a crash dump's first lines say what happened (a Go
/// runtime's `fatal error`, a Python traceback's cause), its last lines
/// where.
fn first_and_last(mut lines: Vec<String>, head: usize, tail: usize) -> Vec<String> {
    if lines.len() <= head + tail {
        return lines;
    }
    let left_out = lines.len() - head - tail;
    let last = lines.split_off(lines.len() - tail);
    lines.truncate(head);
    lines.push(format!("({left_out} more lines)"));
    lines.extend(last);
    lines
}

async fn await_handshake(
    ctx: &StartContext<'_>,
    child: &Child,
    socket: &Path,
    handshake: oneshot::Receiver<Result<Handshake, String>>,
) -> Result<(), StartError> {
    let timeout = ctx.manifest.timeouts.start.0;
    let line = tokio::select! {
        biased;
        line = handshake => line,
        status = child.wait() => {
            // Output may still be in flight; give the readers a moment to
            // drain what the child printed before it died.
            tokio::time::sleep(Duration::from_millis(20)).await;
            return Err(StartError::ExitedEarly {
                status,
                output: recent_output(&ctx.logs, &ctx.instance_id),
            });
        }
        _ = tokio::time::sleep(timeout) => {
            return Err(StartError::StartTimeout {
                timeout,
                output: recent_output(&ctx.logs, &ctx.instance_id),
            });
        }
    };
    let handshake = match line {
        Ok(Ok(h)) => h,
        Ok(Err(why)) => return Err(StartError::Handshake(why)),
        Err(_) => {
            let status = child.wait().await;
            return Err(StartError::ExitedEarly {
                status,
                output: recent_output(&ctx.logs, &ctx.instance_id),
            });
        }
    };
    if handshake.protocol_version != handshake::PROTOCOL_VERSION {
        return Err(StartError::Handshake(format!(
            "`{handshake}` announces protocol version {}, but this supervisor speaks {}",
            handshake.protocol_version,
            handshake::PROTOCOL_VERSION
        )));
    }
    if handshake.network != handshake::NETWORK_UNIX {
        return Err(StartError::Handshake(format!(
            "`{handshake}` announces network `{}`; only `unix` is supported",
            handshake.network
        )));
    }
    if Path::new(&handshake.address) != socket {
        return Err(StartError::Handshake(format!(
            "`{handshake}` announces socket {}, but the plugin was told to listen on {}",
            handshake.address,
            socket.display()
        )));
    }
    Ok(())
}

/// Calls Initialize with the merged config and any restored state.
pub async fn initialize(
    instance: &mut Instance,
    manifest: &Manifest,
    config: &serde_json::Map<String, serde_json::Value>,
    restored: Option<RestoredState>,
) -> Result<InitializeResponse, StartError> {
    let request = InitializeRequest {
        plugin_name: manifest.name.clone(),
        instance_id: instance.id.clone(),
        config_json: serde_json::Value::Object(config.clone()).to_string(),
        protocol_version: handshake::PROTOCOL_VERSION,
        restored_state: restored,
    };
    let timeout = manifest.timeouts.initialize.0;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut request = tonic::Request::new(request);
    request.set_timeout(timeout);
    tokio::select! {
        result = instance.client.initialize(request) => match result {
            Ok(response) => Ok(response.into_inner()),
            // A timeout is known by the deadline this call was given, not by
            // the words of whoever noticed it: the plugin's server (grpcio,
            // grpc-go, tonic) answers DEADLINE_EXCEEDED in its own words, and
            // a client-side timeout (tonic's "Timeout expired", CANCELLED)
            // or a reset may end the call once the deadline has passed.
            Err(status)
                if status.code() == tonic::Code::DeadlineExceeded
                    || tokio::time::Instant::now() >= deadline =>
            {
                Err(StartError::InitializeTimeout(timeout))
            }
            Err(status) => Err(StartError::InitializeFailed(format!(
                "{:?}: {}",
                status.code(),
                status.message()
            ))),
        },
        _ = tokio::time::sleep_until(deadline) => Err(StartError::InitializeTimeout(timeout)),
        status = instance.child.wait() => Err(StartError::InitializeFailed(format!("the plugin {status} during Initialize"))),
    }
}

/// Kills the child's whole process group and waits for the child.
pub async fn kill_and_reap(child: &Child) -> ExitStatus {
    let _ = child.signal_group(libc::SIGKILL);
    let _ = child.signal(libc::SIGKILL);
    let status = child.wait().await;
    // Stragglers that were forked after the first kill.
    let _ = child.signal_group(libc::SIGKILL);
    status
}

/// Stops an instance: the Shutdown RPC (drain) gets the first half of
/// `timeout`, SIGTERM to the process group the second half, then SIGKILL.
/// Whatever is left of the process group afterwards is killed too.
pub async fn stop(instance: &mut Instance, timeout: Duration) -> ExitStatus {
    let half = timeout / 2;
    let child = &instance.child;
    if let Some(status) = child.try_status() {
        kill_leftovers(instance).await;
        return status;
    }
    let mut request = tonic::Request::new(ShutdownRequest {
        deadline_ms: half.as_millis() as u64,
    });
    request.set_timeout(half);
    let mut client = instance.client.clone();
    let drained = tokio::time::timeout(half, async {
        let _ = client.shutdown(request).await;
        child.wait().await
    })
    .await;
    let status = match drained {
        Ok(status) => status,
        Err(_) => {
            let _ = child.signal(libc::SIGTERM);
            let _ = child.signal_group(libc::SIGTERM);
            match tokio::time::timeout(timeout - half, child.wait()).await {
                Ok(status) => status,
                Err(_) => {
                    tracing::warn!(
                        instance = %instance.id,
                        "did not stop within {}ms of Shutdown and SIGTERM; sending SIGKILL",
                        timeout.as_millis()
                    );
                    kill_and_reap(child).await
                }
            }
        }
    };
    kill_leftovers(instance).await;
    status
}

/// Kills what is left of a stopped instance: its process group, and its
/// whole cgroup (descendants that left the group included).
async fn kill_leftovers(instance: &Instance) {
    let _ = instance.child.signal_group(libc::SIGKILL);
    if let Some(lease) = &instance.cgroup
        && let Err(e) = lease.kill_all().await
    {
        tracing::warn!(instance = %instance.id, "cannot kill the rest of its cgroup: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::first_and_last;

    #[test]
    fn a_long_crash_dump_keeps_its_first_and_last_lines() {
        let lines: Vec<String> = (1..=10).map(|i| format!("line {i}")).collect();
        assert_eq!(
            first_and_last(lines, 3, 3),
            [
                "line 1",
                "line 2",
                "line 3",
                "(4 more lines)",
                "line 8",
                "line 9",
                "line 10"
            ]
        );
        let short: Vec<String> = (1..=4).map(|i| format!("line {i}")).collect();
        assert_eq!(first_and_last(short.clone(), 3, 3), short);
    }
}

/// A connection to one instance's `Plugin` service: the generated client
/// (through `Deref`), and the connection itself for the calls made without
/// tonic's codec (`HandleStream`, see `stream_wire`). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    grpc: PluginClient<Connection>,
    connection: Connection,
}

impl Client {
    /// A client on `connection`, with the message size limits every
    /// plugin call uses.
    pub fn new(connection: Connection) -> Self {
        Client {
            grpc: PluginClient::with_origin(connection.clone(), crate::transport::origin())
                .max_decoding_message_size(crate::transport::MAX_MESSAGE)
                .max_encoding_message_size(crate::transport::MAX_MESSAGE),
            connection,
        }
    }

    /// The connection, for a call made without the generated client.
    pub fn connection(&self) -> Connection {
        self.connection.clone()
    }
}

impl std::ops::Deref for Client {
    type Target = PluginClient<Connection>;
    fn deref(&self) -> &Self::Target {
        &self.grpc
    }
}

impl std::ops::DerefMut for Client {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.grpc
    }
}

/// One HealthCheck with a deadline.
pub async fn probe(
    client: &Client,
    timeout: Duration,
) -> Result<(plugvisor_proto::health_check_response::Status, String), String> {
    let mut client = client.clone();
    let mut request = tonic::Request::new(plugvisor_proto::HealthCheckRequest {});
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

/// ExportState with a deadline.
pub async fn export(
    client: &Client,
    timeout: Duration,
) -> Result<plugvisor_proto::ExportStateResponse, String> {
    let mut client = client.clone();
    let mut request = tonic::Request::new(plugvisor_proto::ExportStateRequest {});
    request.set_timeout(timeout);
    Ok(tokio::time::timeout(timeout, client.export_state(request))
        .await
        .map_err(|_| {
            format!(
                "ExportState did not answer within {}ms",
                timeout.as_millis()
            )
        })?
        .map_err(|s| format!("ExportState failed: {:?}: {}", s.code(), s.message()))?
        .into_inner())
}

/// One replica's snapshot store, with the lock that keeps its writes in
/// export order. Shared by the replica's actor (periodic, at stop, at
/// upgrade) and the calls that snapshot on change.
#[derive(Debug)]
pub struct Snapshots {
    pub store: crate::state::SnapshotStore,
    order: Arc<tokio::sync::Mutex<()>>,
}

/// The right to write the next snapshot; held from export to write.
pub type SnapshotTurn = tokio::sync::OwnedMutexGuard<()>;

impl Snapshots {
    pub fn new(store: crate::state::SnapshotStore) -> Self {
        Snapshots {
            store,
            order: Arc::default(),
        }
    }

    /// Waits for the turn to write (snapshots land in export order).
    pub async fn turn(&self) -> SnapshotTurn {
        self.order.clone().lock_owned().await
    }

    /// Exports the instance's state and writes it as the newest snapshot.
    /// Returns the snapshot's sequence number.
    pub async fn take(&self, client: &Client, timeout: Duration) -> Result<u64, String> {
        let turn = self.turn().await;
        let state = export(client, timeout).await?;
        self.write(turn, state.state.to_vec(), state.state_version)
            .await
    }

    /// Writes `state` as the newest snapshot, holding `turn` until it is
    /// on disk. The write runs on the blocking pool: once started, it lands
    /// (and keeps the turn) even if the caller goes away.
    pub async fn write(
        &self,
        turn: SnapshotTurn,
        state: Vec<u8>,
        version: u32,
    ) -> Result<u64, String> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            store.write(&state, version)
        })
        .await
        .map_err(|e| format!("the snapshot writer failed: {e}"))?
        .map_err(|e| e.to_string())
    }
}
