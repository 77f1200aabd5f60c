//! Container plugins: a plugin that is an OCI image run by `podman run`, or
//! an OCI bundle run by `runc run`, speaking the same protocol over a
//! socket in its socket directory, which is bind-mounted into the container
//! at the same path.
//!
//! The supervised child is the runtime in the foreground (`podman run`,
//! `runc run`): its exit is the plugin's exit, its stdout and stderr are
//! the plugin's, so supervision, logs, health checks and restarts are those
//! of any plugin. Limits go to the runtime, which enforces them with its
//! own cgroup. The socket peer must be the container's init process as the
//! runtime reports it (`podman inspect`, `runc state`): that replaces the
//! check that the peer is the spawned child. A container is removed
//! (`podman rm -f`, `runc delete -f`) when its instance is dropped, not when
//! it exits (`podman run` without `--rm`, `runc run --keep`): its cgroup
//! and state outlive the exit long enough to tell an OOM kill apart.
//!
//! The runtime's cgroup of a running container is found through its init
//! process and shown by `inspect` and `ps` like any plugin's (see
//! [`crate::isolation::Isolation::observe`]). Every container's name starts
//! with `plugvisor-<hash of the runtime directory>-` (podman ones are also
//! labelled `io.plugvisor.supervisor` and `io.plugvisor.instance`), so the
//! first container start of a supervisor removes what an earlier run of it
//! left ([`sweep_stale`]). `isolation.user` and `isolation.group` are
//! resolved on the host and the container runs as that numeric uid:gid,
//! which owns the socket directory.

use crate::manifest::{ContainerRuntime, ContainerSpec, Manifest, NetworkMode};
use crate::process::{ExitStatus, ProcessManager, SpawnSpec};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a runtime's helper command (inspect, state, rm) may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);
/// The podman label naming the supervisor (a hash of its runtime
/// directory) that started a container.
pub const LABEL_SUPERVISOR: &str = "io.plugvisor.supervisor";
/// The podman label naming the instance a container runs.
pub const LABEL_INSTANCE: &str = "io.plugvisor.instance";

/// The container's name: unique per runtime directory (so two supervisors
/// never share one) and per instance.
pub(crate) fn name(runtime_dir: &Path, instance_id: &str) -> String {
    format!("{}{instance_id}", prefix(runtime_dir))
}

/// What every container name of the supervisor using `runtime_dir` starts
/// with.
fn prefix(runtime_dir: &Path) -> String {
    format!("plugvisor-{}-", supervisor_tag(runtime_dir))
}

/// A hash of the runtime directory: FNV-1a, stable across runs and builds,
/// unlike the std hasher.
fn supervisor_tag(runtime_dir: &Path) -> String {
    let mut hash: u32 = 0x811c9dc5;
    for b in runtime_dir.as_os_str().as_encoded_bytes() {
        hash ^= u32::from(*b);
        hash = hash.wrapping_mul(0x01000193);
    }
    format!("{hash:08x}")
}

/// The host uid and gid a container plugin runs as: `isolation.user` and
/// `isolation.group` resolved on the host; `None` (the image's user) when
/// neither is set.
pub(crate) fn owner(m: &Manifest) -> Result<Option<(u32, u32)>, String> {
    let credentials = crate::isolation::preexec::Credentials::resolve(
        m.isolation.user.as_deref(),
        m.isolation.group.as_deref(),
    )?;
    Ok(credentials.map(|c| (c.uid, c.gid)))
}

/// A container that may exist: removed when dropped.
pub struct ContainerGuard {
    pub runtime: ContainerRuntime,
    pub program: PathBuf,
    pub name: String,
    /// runc: the per-instance bundle the supervisor wrote.
    bundle: Option<PathBuf>,
    /// The runtime's cgroup of the running container, once found.
    pub observed: Option<crate::isolation::ObservedCgroup>,
    /// Its OOM evidence, read the moment the container's init process
    /// ended (see [`ContainerGuard::watch_init`]).
    init_end: Option<tokio::sync::watch::Receiver<Option<crate::isolation::OomEvidence>>>,
    processes: Option<ProcessManager>,
    tasks: tokio_util::task::TaskTracker,
}

impl std::fmt::Debug for ContainerGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerGuard")
            .field("runtime", &self.runtime)
            .field("name", &self.name)
            .finish()
    }
}

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        let Some(processes) = self.processes.take() else {
            return;
        };
        let (runtime, program, name) = (self.runtime, self.program.clone(), self.name.clone());
        let bundle = self.bundle.take();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(container = %name, "no runtime left to remove the container");
            return;
        };
        let _enter = rt.enter();
        self.tasks.spawn(async move {
            if let Err(e) = remove(&processes, runtime, &program, &name).await {
                tracing::warn!(container = %name, "cannot remove the container: {e}");
            }
            if let Some(bundle) = bundle {
                let _ = std::fs::remove_dir_all(bundle);
            }
        });
    }
}

/// The guard of the container that instance `instance_id` of `m` runs,
/// taken over from a previous supervisor image (see [`crate::handover`]):
/// the container keeps running; it is removed, as any other, once the
/// instance has ended.
pub(crate) fn reattached(
    m: &Manifest,
    runtime_dir: &Path,
    instance_id: &str,
    processes: &ProcessManager,
    tasks: &tokio_util::task::TaskTracker,
) -> Option<ContainerGuard> {
    let c = m.container.as_ref()?;
    Some(ContainerGuard {
        runtime: c.runtime,
        program: m.exec.clone(),
        name: name(runtime_dir, instance_id),
        bundle: (c.runtime == ContainerRuntime::Runc)
            .then(|| runtime_dir.join("containers").join(instance_id)),
        observed: None,
        init_end: None,
        processes: Some(processes.handle()),
        tasks: tasks.clone(),
    })
}

/// What the supervisor runs for a container plugin, and the guard that
/// removes the container.
pub(crate) struct Plan {
    pub spec: SpawnSpec,
    pub guard: ContainerGuard,
}

/// Builds the runtime's command line for `m` (whose `container` is `c`):
/// the socket directory bind-mounted, the plugin's environment passed
/// through, limits handed to the runtime. For runc, writes the instance's
/// bundle (the manifest's `config.json` with those changes) first.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn plan(
    m: &Manifest,
    c: &ContainerSpec,
    runtime_dir: &Path,
    instance_id: &str,
    socket_dir: &Path,
    env: Vec<(OsString, OsString)>,
    processes: &ProcessManager,
    tasks: &tokio_util::task::TaskTracker,
) -> Result<Plan, String> {
    let name = name(runtime_dir, instance_id);
    let program = m.exec.clone();
    let mut guard = ContainerGuard {
        runtime: c.runtime,
        program: program.clone(),
        name: name.clone(),
        bundle: None,
        observed: None,
        init_end: None,
        processes: Some(processes.handle()),
        tasks: tasks.clone(),
    };
    let user = owner(m)?;
    let dir = socket_dir.display().to_string();
    let args = match c.runtime {
        ContainerRuntime::Podman => {
            let mut a: Vec<String> = Vec::new();
            if let Some(rt) = &c.oci_runtime {
                a.extend(["--runtime".into(), rt.clone()]);
            }
            a.extend([
                // No --rm: the guard removes it, after its exit was read.
                "run".into(),
                "--replace".into(),
                "--pull=never".into(),
                "--name".into(),
                name.clone(),
                "--label".into(),
                format!("{LABEL_SUPERVISOR}={}", supervisor_tag(runtime_dir)),
                "--label".into(),
                format!("{LABEL_INSTANCE}={instance_id}"),
                "--volume".into(),
                format!("{dir}:{dir}:rw"),
                "--network".into(),
                match m.isolation.network {
                    NetworkMode::None => "none".into(),
                    NetworkMode::Host => "host".into(),
                },
            ]);
            // By name only: the values come from podman's own environment,
            // which is the plugin's, so they never show in a command line.
            for (k, _) in &env {
                if k != "PATH" {
                    a.extend(["--env".into(), k.to_string_lossy().into_owned()]);
                }
            }
            let l = &m.limits;
            if let Some(mem) = l.memory {
                a.push(format!("--memory={}", mem.0));
                // No swap beyond the limit, as the cgroup limit means.
                a.push(format!("--memory-swap={}", mem.0));
            }
            if let Some(high) = l.memory_high {
                a.push(format!("--memory-reservation={}", high.0));
            }
            if let Some(pids) = l.pids {
                a.push(format!("--pids-limit={pids}"));
            }
            if let Some(cpu) = l.cpu {
                a.push(format!("--cpus={cpu}"));
            }
            // Without one, podman asks for its own default, which may be
            // above the hard limit the supervisor holds (and the container,
            // without CAP_SYS_RESOURCE, cannot raise it): keep ours.
            let nofile = l
                .nofile
                .map(|n| (n, n))
                .or_else(|| own(libc::RLIMIT_NOFILE));
            if let Some((soft, hard)) = nofile {
                a.push(format!("--ulimit=nofile={soft}:{hard}"));
            }
            // The same for processes, with a default of its own: the
            // supervisor's may be unreachable inside a container too.
            let nproc = l.nproc.unwrap_or(DEFAULT_NPROC);
            a.push(format!("--ulimit=nproc={nproc}:{nproc}"));
            if let Some((uid, gid)) = user {
                a.extend(["--user".into(), format!("{uid}:{gid}")]);
            }
            a.push(c.image.clone().unwrap_or_default());
            a.extend(m.args.iter().cloned());
            a
        }
        ContainerRuntime::Runc => {
            let source = c.bundle.clone().unwrap_or_default();
            let bundle = runtime_dir.join("containers").join(instance_id);
            guard.bundle = Some(bundle.clone());
            let config = runc_config(m, &source, socket_dir, &env, &name, user)?;
            write_bundle(&bundle, &config)?;
            // A container of this name left by a supervisor that was killed.
            let _ = remove(processes, c.runtime, &program, &name).await;
            vec![
                "run".into(),
                // Deleted by the guard, after its exit was read.
                "--keep".into(),
                "--bundle".into(),
                bundle.display().to_string(),
                name.clone(),
            ]
        }
    };
    Ok(Plan {
        spec: SpawnSpec {
            program,
            args,
            env,
            cwd: m.dir.clone(),
        },
        guard,
    })
}

/// RLIMIT_NPROC of a podman plugin whose manifest sets no `limits.nproc`
/// (podman's own default is refused where the supervisor lacks
/// CAP_SYS_RESOURCE). `limits.pids` is the per-container limit.
const DEFAULT_NPROC: u64 = 4096;

/// The supervisor's own limit of `resource` (soft, hard).
fn own(resource: libc::__rlimit_resource_t) -> Option<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one struct rlimit we own.
    let rc = unsafe { libc::getrlimit(resource, &mut limit) };
    (rc == 0).then_some((limit.rlim_cur, limit.rlim_max))
}

fn write_bundle(bundle: &Path, config: &serde_json::Value) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    let parent = bundle.parent().unwrap_or(bundle);
    crate::rundir::secure_dir(parent, 0o700).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(bundle);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(bundle)
        .map_err(|e| format!("cannot create the bundle {}: {e}", bundle.display()))?;
    let path = bundle.join("config.json");
    std::fs::write(&path, config.to_string())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The manifest's bundle `config.json`, changed for this instance: its root
/// made absolute, no terminal, the plugin's environment added, the socket
/// directory bind-mounted, the limits in `linux.resources` and the
/// container's own cgroup.
fn runc_config(
    m: &Manifest,
    source: &Path,
    socket_dir: &Path,
    env: &[(OsString, OsString)],
    name: &str,
    user: Option<(u32, u32)>,
) -> Result<serde_json::Value, String> {
    use serde_json::{Value, json};
    let path = source.join("config.json");
    let text = crate::manifest::read_bounded(&path, 1 << 20, "an OCI bundle config")?;
    let mut config: Value = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not valid JSON: {e}", path.display()))?;
    let bad = |what: &str| format!("{}: {what}", path.display());
    let obj = config
        .as_object_mut()
        .ok_or_else(|| bad("expected a JSON object"))?;
    let root = obj
        .get_mut("root")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| bad("`root.path` is missing"))?;
    let root_path = root
        .get("path")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("`root.path` is missing"))?;
    root.insert(
        "path".into(),
        Value::String(source.join(root_path).display().to_string()),
    );
    let process = obj
        .get_mut("process")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| bad("`process` is missing"))?;
    process.insert("terminal".into(), Value::Bool(false));
    if let Some((uid, gid)) = user {
        process.insert("user".into(), json!({"uid": uid, "gid": gid}));
    }
    let mut vars: Vec<Value> = process
        .get("env")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for (k, v) in env {
        let k = k.to_string_lossy();
        let prefix = format!("{k}=");
        vars.retain(|e| !e.as_str().is_some_and(|e| e.starts_with(&prefix)));
        vars.push(Value::String(format!("{k}={}", v.to_string_lossy())));
    }
    process.insert("env".into(), Value::Array(vars));
    let dir = socket_dir.display().to_string();
    let mounts = obj
        .entry("mounts")
        .or_insert_with(|| json!([]))
        .as_array_mut()
        .ok_or_else(|| bad("`mounts` is not a list"))?;
    mounts.push(json!({
        "destination": dir,
        "type": "bind",
        "source": dir,
        "options": ["rbind", "rw"],
    }));
    let linux = obj
        .entry("linux")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or_else(|| bad("`linux` is not an object"))?;
    linux.insert(
        "cgroupsPath".into(),
        Value::String(format!("/plugvisor-containers/{name}")),
    );
    let resources = linux
        .entry("resources")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or_else(|| bad("`linux.resources` is not an object"))?;
    let l = &m.limits;
    if l.memory.is_some() || l.memory_high.is_some() {
        let mut memory = serde_json::Map::new();
        if let Some(mem) = l.memory {
            memory.insert("limit".into(), json!(mem.0));
            memory.insert("swap".into(), json!(mem.0));
        }
        if let Some(high) = l.memory_high {
            memory.insert("reservation".into(), json!(high.0));
        }
        resources.insert("memory".into(), Value::Object(memory));
    }
    if let Some(pids) = l.pids {
        resources.insert("pids".into(), json!({"limit": pids}));
    }
    if let Some(cpu) = l.cpu {
        let period: u64 = 100_000;
        resources.insert(
            "cpu".into(),
            json!({"quota": (cpu * period as f64).round() as i64, "period": period}),
        );
    }
    Ok(config)
}

/// The host PID of the container's init process, as the runtime reports
/// it: the only process allowed to serve the plugin's socket.
pub(crate) async fn init_pid(
    processes: &ProcessManager,
    guard: &ContainerGuard,
) -> Result<i32, String> {
    let (args, what): (Vec<&str>, &str) = match guard.runtime {
        ContainerRuntime::Podman => (
            vec!["inspect", "--format", "{{.State.Pid}}", &guard.name],
            "podman inspect",
        ),
        ContainerRuntime::Runc => (vec!["state", &guard.name], "runc state"),
    };
    let out = tool(processes, &guard.program, &args).await?;
    let pid = match guard.runtime {
        ContainerRuntime::Podman => out.trim().parse::<i32>().ok(),
        ContainerRuntime::Runc => serde_json::from_str::<serde_json::Value>(&out)
            .ok()
            .and_then(|v| v["pid"].as_i64())
            .and_then(|p| i32::try_from(p).ok()),
    };
    match pid {
        Some(pid) if pid > 0 => Ok(pid),
        _ => Err(format!(
            "{what} {} gave no running process: `{}`",
            guard.name,
            out.trim()
        )),
    }
}

/// Removes the container `name`, running or not (`podman rm -f`, `runc
/// delete -f`). A container that does not exist is not an error.
pub(crate) async fn remove(
    processes: &ProcessManager,
    runtime: ContainerRuntime,
    program: &Path,
    name: &str,
) -> Result<(), String> {
    let result = match runtime {
        ContainerRuntime::Podman => {
            tool(processes, program, &["rm", "--force", "--ignore", name]).await
        }
        ContainerRuntime::Runc => tool(processes, program, &["delete", "--force", name]).await,
    };
    match result {
        Ok(_) => Ok(()),
        Err(e) if e.contains("does not exist") || e.contains("not exist") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Runs one of the runtime's helper commands through the process thread
/// and returns its stdout; `Err` carries its stderr.
async fn tool(processes: &ProcessManager, program: &Path, args: &[&str]) -> Result<String, String> {
    use tokio::io::AsyncReadExt;
    let spec = SpawnSpec {
        program: program.to_path_buf(),
        args: args.iter().map(|a| a.to_string()).collect(),
        env: vec![("PATH".into(), crate::instance::DEFAULT_PATH.into())],
        cwd: PathBuf::from("/"),
    };
    let command = format!("{} {}", program.display(), args.join(" "));
    let mut child = processes
        .spawn(&spec)
        .await
        .map_err(|e| format!("cannot run `{command}`: {e}"))?;
    let (mut stdout, mut stderr) = (child.stdout.take(), child.stderr.take());
    let run = async {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        // Bounded: these commands print a few lines.
        let read_out = async {
            if let Some(s) = stdout.as_mut() {
                let _ = s.take(1 << 20).read_to_end(&mut out).await;
            }
        };
        let read_err = async {
            if let Some(s) = stderr.as_mut() {
                let _ = s.take(64 << 10).read_to_end(&mut err).await;
            }
        };
        tokio::join!(read_out, read_err);
        (child.wait().await, out, err)
    };
    match tokio::time::timeout(TOOL_TIMEOUT, run).await {
        Ok((status, out, _)) if status.success() => Ok(String::from_utf8_lossy(&out).into_owned()),
        Ok((status, _, err)) => Err(format!(
            "`{command}` {status}: {}",
            String::from_utf8_lossy(&err).trim()
        )),
        Err(_) => {
            let _ = child.signal_group(libc::SIGKILL);
            Err(format!(
                "`{command}` did not finish within {}s",
                TOOL_TIMEOUT.as_secs()
            ))
        }
    }
}

impl ContainerGuard {
    /// Records the runtime's cgroup of the container whose init process is
    /// `pid` (through `isolation`) and watches that process: the moment it
    /// ends, the cgroup's OOM evidence is read, before the runtime's
    /// cleanup removes the cgroup (podman does as the container exits).
    pub(crate) fn observe(
        &mut self,
        isolation: &crate::isolation::Isolation,
        instance_id: &str,
        pid: i32,
    ) {
        self.observed = isolation.observe(instance_id, pid);
        let Some(observed) = &self.observed else {
            return;
        };
        let cgroup = observed.cgroup().clone();
        let pidfd = match pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(container = %self.name, "cannot watch its init process {pid}: {e}");
                return;
            }
        };
        let (tx, rx) = tokio::sync::watch::channel(None);
        self.init_end = Some(rx);
        self.tasks.spawn(async move {
            // SAFETY: the AsyncFd owns the OwnedFd, which stays open and
            // the same descriptor until the AsyncFd is dropped.
            let registered = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    pidfd,
                    tokio::io::Interest::READABLE,
                )
            };
            let Ok(fd) = registered else {
                return;
            };
            tokio::select! {
                // A pidfd turns readable when its process has exited.
                _ = fd.readable() => {
                    let evidence = cgroup.oom_evidence();
                    let _ = tx.send(Some(evidence));
                }
                // The instance is gone: nobody asks any more.
                _ = tx.closed() => {}
            }
        });
    }

    /// Whether the container that ended with `status` (the runtime's exit:
    /// 137 for a container killed by SIGKILL) was killed by the OOM killer:
    /// the runtime's cgroup counted an OOM kill (it is kept until the guard
    /// removes the container), or podman says so (`.State.OOMKilled`).
    /// Never guessed from the exit code alone.
    pub async fn oom_killed(&self, status: ExitStatus) -> bool {
        let killed = matches!(status, ExitStatus::Exited(137))
            || matches!(status, ExitStatus::Signaled { signal, .. } if signal == libc::SIGKILL);
        if !killed {
            return false;
        }
        if let Some(rx) = &self.init_end {
            let mut rx = rx.clone();
            // The runtime exits after its container's init: the watch has
            // seen it, or is about to.
            let seen = tokio::time::timeout(Duration::from_secs(1), rx.wait_for(Option::is_some))
                .await
                .ok()
                .and_then(|r| r.ok().and_then(|e| *e));
            if seen.is_some_and(|e| e.kills.is_some_and(|k| k > 0)) {
                return true;
            }
        }
        if let Some(observed) = &self.observed {
            let cgroup = observed.cgroup().clone();
            let evidence = tokio::task::spawn_blocking(move || cgroup.oom_evidence())
                .await
                .ok();
            if evidence.is_some_and(|e| e.kills.is_some_and(|k| k > 0)) {
                return true;
            }
        }
        match (self.runtime, &self.processes) {
            (ContainerRuntime::Podman, Some(processes)) => tool(
                processes,
                &self.program,
                &["inspect", "--format", "{{.State.OOMKilled}}", &self.name],
            )
            .await
            .is_ok_and(|out| out.trim() == "true"),
            _ => false,
        }
    }
}

/// Removes every container an earlier run of the supervisor using
/// `runtime_dir` left behind (it was killed before it could remove them),
/// and their runc bundles. Run before the first container of `runtime`
/// starts, when no container of this supervisor can be running. Returns
/// the names removed.
pub(crate) async fn sweep_stale(
    processes: &ProcessManager,
    runtime_dir: &Path,
    runtime: ContainerRuntime,
    program: &Path,
    keep: &[String],
) -> Result<Vec<String>, String> {
    let prefix = prefix(runtime_dir);
    // Instances taken over from a previous supervisor image run on.
    let kept: Vec<String> = keep.iter().map(|id| name(runtime_dir, id)).collect();
    let names: Vec<String> = match runtime {
        ContainerRuntime::Podman => {
            let label = format!("label={LABEL_SUPERVISOR}={}", supervisor_tag(runtime_dir));
            let out = tool(
                processes,
                program,
                &["ps", "--all", "--filter", &label, "--format", "{{.Names}}"],
            )
            .await?;
            out.lines()
                .map(str::trim)
                .filter(|n| n.starts_with(&prefix))
                .map(str::to_string)
                .collect()
        }
        ContainerRuntime::Runc => {
            let out = tool(processes, program, &["list", "--format", "json"]).await?;
            // `null` when there is none.
            let listed: Vec<serde_json::Value> = serde_json::from_str(out.trim())
                .ok()
                .and_then(|v: serde_json::Value| v.as_array().cloned())
                .unwrap_or_default();
            listed
                .iter()
                .filter_map(|c| c["id"].as_str())
                .filter(|n| n.starts_with(&prefix))
                .map(str::to_string)
                .collect()
        }
    };
    let mut removed = Vec::new();
    for name in names.into_iter().filter(|n| !kept.contains(n)) {
        remove(processes, runtime, program, &name).await?;
        removed.push(name);
    }
    if runtime == ContainerRuntime::Runc {
        let bundles = runtime_dir.join("containers");
        if keep.is_empty() {
            let _ = std::fs::remove_dir_all(bundles);
        } else if let Ok(dir) = std::fs::read_dir(&bundles) {
            for entry in dir.flatten() {
                if !keep.iter().any(|id| entry.file_name() == id.as_str()) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }
    Ok(removed)
}

/// A pidfd for `pid` (not a child of ours: the container's init).
fn pidfd_open(pid: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor and nobody else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}
