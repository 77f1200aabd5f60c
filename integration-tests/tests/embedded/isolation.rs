//! Isolation end to end, with real processes and, where the machine allows
//! (root, cgroup v1 or v2 with controllers), real cgroups: memory, pids and
//! cpu limits that hold, OOM kills reported as such, rlimits, hardening and
//! binary pinning. A test that needs what the machine lacks prints
//! `SKIP: <why>` and returns.

use plugvisor::isolation::fake::FakeCgroupFs;
use plugvisor::isolation::fs::HostFs;
use plugvisor::isolation::pin::{Executable, sha256_file};
use plugvisor::isolation::preexec::{ChildSetup, ExecFd};
use plugvisor::isolation::{CgroupMode, ProbeOptions, probe};
use plugvisor::process::{ExitStatus, ProcessManager, SpawnSpec};
use plugvisor::{PluginState, Supervisor, SupervisorOptions};
use plugvisor_integration_tests::{
    Daemon, Sandbox, bin, is_gone, next_event, wait_state, wait_until,
};
use prost::bytes::Bytes;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const SECS_10: Duration = Duration::from_secs(10);
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

fn tp() -> PathBuf {
    bin("testplugin")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A parent cgroup name no other test (or run) uses.
fn unique_parent(what: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "plugvisor-test-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Real cgroups on this machine for an embedded supervisor, or why not.
fn real_cgroups(what: &str) -> Result<CgroupMode, String> {
    if !is_root() {
        return Err("managing cgroups needs root".into());
    }
    let parent = unique_parent(what);
    let tree = probe(&ProbeOptions {
        fs: Arc::new(HostFs),
        root: CGROUP_ROOT.into(),
        proc_root: "/proc".into(),
        parent: parent.clone(),
        pid: std::process::id() as i32,
    })?;
    let c = tree.controllers();
    if !(c.memory && c.cpu && c.pids) {
        return Err(format!(
            "the {} tree lacks a controller (has {c})",
            tree.mechanism()
        ));
    }
    Ok(CgroupMode::Probe {
        root: CGROUP_ROOT.into(),
        parent,
        require: true,
    })
}

fn supervisor(sandbox: &Sandbox, cgroups: CgroupMode) -> Supervisor {
    let mut opts = SupervisorOptions::new(sandbox.runtime_dir());
    opts.isolation.cgroups = cgroups;
    Supervisor::new(opts).expect("the supervisor starts")
}

macro_rules! or_skip {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(why) => {
                plugvisor_integration_tests::skip(why);
                return;
            }
        }
    };
}

async fn call(sup: &Supervisor, plugin: &str, method: &str, payload: &str) -> serde_json::Value {
    let reply = sup
        .call(
            plugin,
            method,
            Bytes::from(payload.to_string()),
            Default::default(),
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("{plugin}.{method}({payload}): {e}"));
    serde_json::from_slice(&reply.payload).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&reply.payload).into_owned())
    })
}

#[tokio::test]
async fn a_memory_hog_is_oom_killed_reported_as_oom_and_restarted() {
    let cgroups = or_skip!(real_cgroups("oom"));
    let sandbox = Sandbox::new();
    let sup = supervisor(&sandbox, cgroups);
    let mut events = sup.events();
    sup.add(
        sandbox.manifest(
            "hog",
            &tp(),
            "limits: {memory: 64MiB}\nrestart: {initial_backoff: 50ms}",
        ),
        &Default::default(),
    )
    .unwrap();
    wait_state(&mut events, "hog", PluginState::Ready, SECS_10).await;
    let info = sup.info("hog").unwrap();
    assert_eq!(
        info.isolation.mechanism.split(' ').next(),
        Some("cgroup"),
        "{info:?}"
    );

    // 256 MiB touched page by page: far over the limit.
    let err = sup
        .call("hog", "alloc", "256".into(), Default::default(), None)
        .await
        .unwrap_err();
    eprintln!("the hog's call ended with: {err}");
    let backoff = wait_state(&mut events, "hog", PluginState::Backoff, SECS_10).await;
    assert!(
        backoff
            .reason
            .contains("killed by the OOM killer (memory limit) (oom)"),
        "{}",
        backoff.reason
    );
    wait_state(&mut events, "hog", PluginState::Ready, SECS_10).await;
    let info = sup.info("hog").unwrap();
    assert_eq!(info.restarts, 1);
    assert_eq!(
        info.last_exit.as_deref(),
        Some("killed by the OOM killer (memory limit)")
    );
    // Modest allocations still work in the new instance.
    assert_eq!(call(&sup, "hog", "alloc", "8").await, 8);
    sup.shutdown().await;
}

/// Reads a cgroup file of `info`'s first cgroup in the hierarchy `controller`.
fn cgroup_file(info: &plugvisor::PluginInfo, controller: &str, file: &str) -> Option<String> {
    let dir = info.isolation.cgroup.iter().find(|d| {
        d.components().any(|c| c.as_os_str() == controller)
            || info.isolation.mechanism == "cgroup v2"
    })?;
    std::fs::read_to_string(dir.join(file)).ok()
}

#[tokio::test]
async fn a_cpu_spinner_is_held_to_its_quota() {
    let cgroups = or_skip!(real_cgroups("cpu"));
    let sandbox = Sandbox::new();
    let sup = supervisor(&sandbox, cgroups);
    sup.add(
        sandbox.manifest("spinner", &tp(), "limits: {cpu: 0.5}"),
        &Default::default(),
    )
    .unwrap();
    sup.wait_ready("spinner", SECS_10).await.unwrap();
    let before = sup
        .info("spinner")
        .unwrap()
        .isolation
        .usage
        .unwrap()
        .cpu
        .unwrap();
    let started = Instant::now();
    // Two threads spinning for 3 s would use 6 s of CPU on two free cores.
    let r = call(&sup, "spinner", "spin", "3000,2").await;
    let window = started.elapsed();
    let after = sup
        .info("spinner")
        .unwrap()
        .isolation
        .usage
        .unwrap()
        .cpu
        .unwrap();
    let cgroup_cpu = after - before;
    let plugin_cpu = Duration::from_millis(r["cpu_ms"].as_u64().unwrap());
    let ratio = cgroup_cpu.as_secs_f64() / window.as_secs_f64();
    eprintln!(
        "cpu: 0.5 cores: over {window:?} of wall time the cgroup used {cgroup_cpu:?} \
         ({ratio:.2} cores); the plugin measured {plugin_cpu:?}"
    );
    // Held to the quota (plus one CFS period of slack).
    let allowed = window.mul_f64(0.5) + Duration::from_millis(150);
    assert!(cgroup_cpu <= allowed, "{cgroup_cpu:?} > {allowed:?}");
    assert!(plugin_cpu <= allowed, "{plugin_cpu:?} > {allowed:?}");
    // And it did run (not starved to nothing).
    assert!(cgroup_cpu >= Duration::from_millis(300), "{cgroup_cpu:?}");
    let throttled =
        cgroup_file(&sup.info("spinner").unwrap(), "cpu", "cpu.stat").unwrap_or_default();
    eprintln!("cpu.stat: {}", throttled.replace('\n', "; "));
    sup.shutdown().await;
}

#[tokio::test]
async fn the_nofile_limit_gives_emfile() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    sup.add(
        sandbox.manifest("files", &tp(), "limits: {nofile: 64}"),
        &Default::default(),
    )
    .unwrap();
    sup.wait_ready("files", SECS_10).await.unwrap();
    let r = call(&sup, "files", "open_files", "1000").await;
    assert_eq!(r["error"], "EMFILE", "{r}");
    let opened = r["opened"].as_u64().unwrap();
    assert!(opened > 0 && opened < 64, "{r}");
    let id = call(&sup, "files", "identity", "").await;
    assert_eq!(id["rlimits"]["nofile"], serde_json::json!([64, 64]), "{id}");
    sup.shutdown().await;
}

#[tokio::test]
async fn rlimits_and_hardening_defaults_reach_the_plugin() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    sup.add(sandbox.manifest("plain", &tp(), ""), &Default::default())
        .unwrap();
    sup.add(
        sandbox.manifest(
            "limited",
            &tp(),
            "limits: {core: 1MiB, data: 1GiB, cpu_time: 1h, nproc: 5000}\nisolation: {no_new_privs: false, seccomp: unconfined}",
        ),
        &Default::default(),
    )
    .unwrap();
    sup.wait_ready("plain", SECS_10).await.unwrap();
    sup.wait_ready("limited", SECS_10).await.unwrap();
    let plain = call(&sup, "plain", "identity", "").await;
    // No core dumps and no new privileges unless asked.
    assert_eq!(
        plain["rlimits"]["core"],
        serde_json::json!([0, 0]),
        "{plain}"
    );
    assert_eq!(plain["no_new_privs"], "1", "{plain}");
    let limited = call(&sup, "limited", "identity", "").await;
    let r = &limited["rlimits"];
    assert_eq!(
        r["core"],
        serde_json::json!([1 << 20, 1 << 20]),
        "{limited}"
    );
    assert_eq!(
        r["data"],
        serde_json::json!([1u64 << 30, 1u64 << 30]),
        "{limited}"
    );
    assert_eq!(r["cpu"], serde_json::json!([3600, 3605]), "{limited}");
    assert_eq!(r["nproc"], serde_json::json!([5000, 5000]), "{limited}");
    assert_eq!(limited["no_new_privs"], "0", "{limited}");
    // Without no_new_privs a seccomp filter cannot be installed: refused
    // up front, with the way out.
    let mut events = sup.events();
    sup.add(
        sandbox.manifest("nofilter", &tp(), "isolation: {no_new_privs: false}"),
        &Default::default(),
    )
    .unwrap();
    let failed = plugvisor_integration_tests::wait_state(
        &mut events,
        "nofilter",
        plugvisor::PluginState::Failed,
        SECS_10,
    )
    .await;
    assert!(
        failed
            .reason
            .contains("set isolation.seccomp: unconfined too"),
        "{}",
        failed.reason
    );
    sup.shutdown().await;
}

#[tokio::test]
async fn a_plugin_sees_only_fds_0_to_2_plus_its_sockets() {
    let cgroups = real_cgroups("fds").unwrap_or_else(|why| {
        eprintln!("(no cgroups: {why}; checking descriptors without them)");
        CgroupMode::Off
    });
    // A descriptor the supervisor's process holds without O_CLOEXEC: the
    // plugin must not get it.
    // SAFETY: open(2) with a valid C string; the descriptor is closed below.
    let leaked = unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
    assert!(leaked >= 3);
    let sandbox = Sandbox::new();
    let sup = supervisor(&sandbox, cgroups);
    let pin = sha256_file(&tp()).unwrap();
    // Pinned: the executable's descriptor is in play too, and must not leak.
    sup.add(
        sandbox.manifest("fds", &tp(), &format!("sha256: {pin}")),
        &Default::default(),
    )
    .unwrap();
    sup.wait_ready("fds", SECS_10).await.unwrap();
    let fds = call(&sup, "fds", "fd_targets", "").await;
    // SAFETY: closes the descriptor opened above, which nothing else uses.
    unsafe { libc::close(leaked) };
    let fds = fds.as_object().unwrap();
    assert_eq!(fds["0"], "/dev/null", "{fds:?}");
    assert!(fds["1"].as_str().unwrap().starts_with("pipe:"), "{fds:?}");
    assert!(fds["2"].as_str().unwrap().starts_with("pipe:"), "{fds:?}");
    for (fd, target) in fds {
        let target = target.as_str().unwrap();
        if fd.parse::<i32>().unwrap() <= 2 {
            continue;
        }
        // Its own: the listening and accepted sockets, and its async
        // runtime's epoll and eventfd. Nothing inherited: no file, no pipe.
        assert!(
            target.starts_with("socket:") || target.starts_with("anon_inode:"),
            "fd {fd} -> {target}: inherited from the supervisor? all: {fds:?}"
        );
    }
    sup.shutdown().await;
}

#[tokio::test]
async fn a_network_none_plugin_cannot_reach_a_local_listener() {
    if !is_root() {
        plugvisor_integration_tests::skip("an empty network namespace needs root (CAP_SYS_ADMIN)");
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    sup.add(
        sandbox.manifest("sealed", &tp(), "isolation: {network: none}"),
        &Default::default(),
    )
    .unwrap();
    sup.add(sandbox.manifest("open", &tp(), ""), &Default::default())
        .unwrap();
    sup.wait_ready("sealed", SECS_10).await.unwrap();
    sup.wait_ready("open", SECS_10).await.unwrap();
    // Its Unix socket works (the call arrives); TCP does not.
    let sealed = call(&sup, "sealed", "connect", &addr).await;
    assert_eq!(sealed["connected"], false, "{sealed}");
    assert!(
        sealed["error"].as_str().unwrap().contains("ENETUNREACH"),
        "{sealed}"
    );
    let id = call(&sup, "sealed", "identity", "").await;
    assert_eq!(id["interfaces"], serde_json::json!(["lo"]), "{id}");
    // The control: the same plugin with the host network connects.
    let open = call(&sup, "open", "connect", &addr).await;
    assert_eq!(open["connected"], true, "{open}");
    let hardening = sup.info("sealed").unwrap().isolation.hardening;
    assert!(
        hardening.contains(&"network none".to_string()),
        "{hardening:?}"
    );
    sup.shutdown().await;
}

#[tokio::test]
async fn a_plugin_runs_as_the_user_it_names_and_owns_its_socket_directory() {
    if !is_root() {
        plugvisor_integration_tests::skip("dropping to another user needs root");
        return;
    }
    let sandbox = Sandbox::new();
    // The plugin (as nobody) must reach its manifest directory and socket.
    std::fs::set_permissions(
        sandbox.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let sup = sandbox.supervisor();
    sup.add(
        sandbox.manifest("nobody", &tp(), "isolation: {user: nobody}"),
        &Default::default(),
    )
    .unwrap();
    sup.wait_ready("nobody", SECS_10).await.unwrap();
    let id = call(&sup, "nobody", "identity", "").await;
    let nobody = nix_user_ids("nobody");
    assert_eq!(
        id["uid"],
        serde_json::json!([nobody.0; 4].map(|u| u.to_string())),
        "{id}"
    );
    assert_eq!(id["gid"][0], nobody.1.to_string(), "{id}");
    let dir = sandbox.runtime_dir().join("plugins/nobody-0-1");
    let meta = std::fs::metadata(&dir).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), nobody.0);
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o700
    );
    sup.shutdown().await;
}

/// The uid and gid of `user`, from the user database.
fn nix_user_ids(user: &str) -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let line = passwd
        .lines()
        .find(|l| l.starts_with(&format!("{user}:")))
        .unwrap_or_else(|| panic!("no {user} in /etc/passwd"));
    let fields: Vec<&str> = line.split(':').collect();
    (fields[2].parse().unwrap(), fields[3].parse().unwrap())
}

#[tokio::test]
async fn a_sha256_mismatch_is_refused_naming_both_digests() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    let mut events = sup.events();
    let wrong = "0".repeat(64);
    let actual = sha256_file(&tp()).unwrap();
    sup.add(
        sandbox.manifest("pinned", &tp(), &format!("sha256: {wrong}")),
        &Default::default(),
    )
    .unwrap();
    let failed = wait_state(&mut events, "pinned", PluginState::Failed, SECS_10).await;
    assert!(
        failed.reason.contains(&format!("expected {wrong}")),
        "{}",
        failed.reason
    );
    assert!(
        failed.reason.contains(&format!("actual {actual}")),
        "{}",
        failed.reason
    );
    // Refused once, not retried with backoff.
    let info = sup.info("pinned").unwrap();
    assert_eq!(info.restarts, 0, "{info:?}");
    assert!(info.pid.is_none());
    sup.shutdown().await;
}

#[tokio::test]
async fn a_binary_replaced_after_verification_is_not_the_one_executed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plugin");
    std::fs::copy(tp(), &path).unwrap();
    let digest = sha256_file(&path).unwrap();
    let verified = Executable::open(&path, Some(&digest), false).unwrap();
    assert!(verified.exec_from_fd());
    // Replaced between the check and exec: another binary renamed over it.
    let other = dir.path().join("plugin.new");
    std::fs::copy(bin("echo-plugin"), &other).unwrap();
    std::fs::rename(&other, &path).unwrap();
    assert_ne!(sha256_file(&path).unwrap(), digest);

    let processes = ProcessManager::new().unwrap();
    // testplugin exits with 7 when told so; echo-plugin knows no such flag.
    let spec = SpawnSpec {
        program: path.clone(),
        args: vec!["--exit-immediately".into(), "7".into()],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        cwd: dir.path().to_path_buf(),
    };
    let child = processes
        .spawn_with(
            &spec,
            ChildSetup::default(),
            Some(ExecFd {
                fd: verified.fd,
                keep_open: false,
            }),
        )
        .await
        .unwrap();
    assert_eq!(
        child.wait().await,
        ExitStatus::Exited(7),
        "the verified bytes ran"
    );
    // The control: by path, the replacement runs.
    let by_path = processes.spawn(&spec).await.unwrap();
    assert_ne!(by_path.wait().await, ExitStatus::Exited(7));
}

#[tokio::test]
async fn a_pinned_plugin_whose_binary_changed_is_refused_at_its_next_start() {
    let sandbox = Sandbox::new();
    let exe = sandbox.dir.path().join("pinned-bin");
    std::fs::copy(tp(), &exe).unwrap();
    let digest = sha256_file(&exe).unwrap();
    let sup = sandbox.supervisor();
    let mut events = sup.events();
    sup.add(
        sandbox.manifest(
            "pinned",
            &exe,
            &format!("sha256: {digest}\nrestart: {{initial_backoff: 10ms}}"),
        ),
        &Default::default(),
    )
    .unwrap();
    wait_state(&mut events, "pinned", PluginState::Ready, SECS_10).await;
    let new = sandbox.dir.path().join("pinned-bin.new");
    std::fs::copy(bin("echo-plugin"), &new).unwrap();
    std::fs::rename(&new, &exe).unwrap();
    let _ = sup
        .call("pinned", "crash", "5".into(), Default::default(), None)
        .await;
    let failed = wait_state(&mut events, "pinned", PluginState::Failed, SECS_10).await;
    assert!(
        failed.reason.contains("sha256 mismatch"),
        "{}",
        failed.reason
    );
    assert!(
        failed.reason.contains(&format!("expected {digest}")),
        "{}",
        failed.reason
    );
    sup.shutdown().await;
}

#[tokio::test]
async fn a_group_writable_executable_is_refused_unless_allowed() {
    let sandbox = Sandbox::new();
    let exe = sandbox.dir.path().join("writable-bin");
    std::fs::copy(tp(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o775)).unwrap();
    let sup = sandbox.supervisor();
    let mut events = sup.events();
    sup.add(sandbox.manifest("writable", &exe, ""), &Default::default())
        .unwrap();
    let failed = wait_state(&mut events, "writable", PluginState::Failed, SECS_10).await;
    assert!(
        failed.reason.contains("writable by its group"),
        "{}",
        failed.reason
    );
    sup.shutdown().await;

    let mut opts = SupervisorOptions::new(sandbox.runtime_dir());
    opts.isolation.allow_writable_executables = true;
    let allowing = Supervisor::new(opts).unwrap();
    allowing
        .add(sandbox.manifest("writable", &exe, ""), &Default::default())
        .unwrap();
    allowing.wait_ready("writable", SECS_10).await.unwrap();
    allowing.shutdown().await;
}

#[tokio::test]
async fn the_child_joins_its_cgroup_before_exec_and_oom_is_read_from_its_counters() {
    // No root needed: a cgroup v2 tree in a temp dir. The child writes `0`
    // into the instance's cgroup.procs between fork and exec.
    let fake = Arc::new(FakeCgroupFs::v2(&["memory", "cpu", "pids"]).unwrap());
    let tree = probe(&ProbeOptions {
        fs: fake.clone(),
        root: fake.root(),
        proc_root: fake.proc_root(),
        parent: "plugvisor".into(),
        pid: 4_194_400,
    })
    .unwrap();
    let sandbox = Sandbox::new();
    let sup = supervisor(&sandbox, CgroupMode::Tree(tree));
    let mut events = sup.events();
    sup.add(
        sandbox.manifest(
            "fakeoom",
            &tp(),
            "limits: {memory: 64MiB, cpu: 0.25, pids: 50}\nrestart: {initial_backoff: 10ms}",
        ),
        &Default::default(),
    )
    .unwrap();
    wait_state(&mut events, "fakeoom", PluginState::Ready, SECS_10).await;
    let dir = "plugvisor/fakeoom-0-1";
    assert_eq!(
        fake.file(&format!("{dir}/cgroup.procs")),
        "0",
        "joined before exec"
    );
    assert_eq!(
        fake.written(&format!("{dir}/memory.max")).as_deref(),
        Some("67108864")
    );
    assert_eq!(
        fake.written(&format!("{dir}/cpu.max")).as_deref(),
        Some("25000 100000")
    );
    assert_eq!(
        fake.written(&format!("{dir}/pids.max")).as_deref(),
        Some("50")
    );
    let info = sup.info("fakeoom").unwrap();
    assert_eq!(info.isolation.mechanism, "cgroup v2");
    assert_eq!(info.isolation.cgroup, vec![fake.root().join(dir)]);
    assert!(info.isolation.usage.is_some());

    // A SIGKILL alone is a signal...
    let pid = info.pid.unwrap();
    // SAFETY: kill(2) on the plugin's own PID, which the supervisor has not reaped.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let backoff = wait_state(&mut events, "fakeoom", PluginState::Backoff, SECS_10).await;
    assert!(
        backoff.reason.contains("killed by SIGKILL (signal)"),
        "{}",
        backoff.reason
    );
    wait_state(&mut events, "fakeoom", PluginState::Ready, SECS_10).await;
    // ...and the instance's cgroup is removed once it is gone.
    let gone = fake.root().join(dir);
    wait_until(SECS_10, "the old cgroup removed", || !gone.exists()).await;
    // A SIGKILL the cgroup counts as an OOM kill is an OOM kill.
    let dir = "plugvisor/fakeoom-0-2";
    fake.set_file(
        &format!("{dir}/memory.events"),
        "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n",
    )
    .unwrap();
    let pid = sup.info("fakeoom").unwrap().pid.unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let backoff = wait_state(&mut events, "fakeoom", PluginState::Backoff, SECS_10).await;
    assert!(
        backoff.reason.contains("killed by the OOM killer"),
        "{}",
        backoff.reason
    );
    assert!(backoff.reason.contains("(oom)"), "{}", backoff.reason);
    sup.shutdown().await;
    // The cgroup is killed (cgroup.kill) and removed after the plugin exits.
    assert!(
        fake.written(&format!("{dir}/cgroup.kill")).is_some() || !fake.root().join(dir).exists()
    );
}

#[tokio::test]
async fn stale_cgroups_of_an_earlier_run_are_killed_and_removed_at_start_up() {
    let cgroups = or_skip!(real_cgroups("stale"));
    let CgroupMode::Probe { parent, .. } = &cgroups else {
        unreachable!()
    };
    // What an earlier run that was SIGKILLed could leave: a cgroup with a
    // process still in it, in every hierarchy.
    let mut sleeper = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .unwrap();
    let mut dirs = Vec::new();
    for controller in ["memory", "cpu", "cpuacct", "pids", "freezer"] {
        let mount = Path::new(CGROUP_ROOT).join(controller);
        if !mount.join("tasks").exists() {
            continue;
        }
        let dir = mount.join(parent).join("old-0-1");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.procs"), sleeper.id().to_string()).unwrap();
        dirs.push(dir);
    }
    if dirs.is_empty() {
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        plugvisor_integration_tests::skip("no cgroup v1 hierarchies to leave a stale cgroup in");
        return;
    }
    let sandbox = Sandbox::new();
    let sup = supervisor(&sandbox, cgroups.clone());
    let status = sleeper.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    for dir in &dirs {
        assert!(!dir.exists(), "{} is left", dir.display());
    }
    sup.shutdown().await;
    // A clean shutdown leaves no parent behind either.
    for dir in &dirs {
        assert!(
            !dir.parent().unwrap().exists(),
            "{} is left",
            dir.parent().unwrap().display()
        );
    }
}

/// Stops the daemon with SIGTERM on drop (even when a test fails), so it
/// kills its plugins' cgroups instead of leaving them behind.
struct Graceful(Daemon);

impl Drop for Graceful {
    fn drop(&mut self) {
        if let Ok(None) = self.0.child.try_wait() {
            // SAFETY: kill(2) on our own, not yet reaped, child.
            unsafe { libc::kill(self.0.pid(), libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn inspect_json(daemon: &Daemon, name: &str) -> serde_json::Value {
    serde_json::from_str(&daemon.cli_ok(&["inspect", name, "--json"])).unwrap()
}

#[test]
fn a_fork_bomb_is_held_by_the_pids_limit_while_the_daemon_and_others_answer() {
    if let Err(why) = real_cgroups("bomb-check") {
        plugvisor_integration_tests::skip(why);
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.plugin("bomb", &tp(), "limits: {pids: 64, cpu: 0.5}");
    sandbox.plugin("echo", &bin("echo-plugin"), "");
    let daemon = Graceful(Daemon::start(&sandbox, &[]));
    let d = &daemon.0;
    d.wait_ready("bomb");
    d.wait_ready("echo");

    let out = d.cli_ok(&["call", "bomb", "fork_bomb", "--data", "5000"]);
    let bomb: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(bomb["error"], "EAGAIN", "{bomb}");
    let forked = bomb["forked"].as_u64().unwrap();
    assert!(forked < 64, "{bomb}");

    // While the bomb's processes sit at the limit and keep trying to fork:
    let mut latencies = Vec::new();
    for i in 0..20 {
        let started = Instant::now();
        let reply = d.cli_ok(&["call", "echo", "upper", "--data", &format!("ping {i}")]);
        latencies.push(started.elapsed());
        assert_eq!(reply, format!("PING {i}"));
        d.cli_ok(&["ps"]);
    }
    latencies.sort();
    eprintln!(
        "fork bomb held: forked {forked} before EAGAIN; echo calls through the CLI: p50 {:?}, max {:?}",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    assert!(
        latencies[latencies.len() - 1] < Duration::from_secs(3),
        "{latencies:?}"
    );
    let info = inspect_json(d, "bomb");
    let usage = &info["isolation"]["usage"];
    assert!(usage["pids"].as_u64().unwrap() <= 64, "{info}");
    assert!(usage["pids_rejected"].as_u64().unwrap() > 0, "{info}");
    let pids_dir = info["isolation"]["cgroups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| PathBuf::from(d.as_str().unwrap()))
        .find(|d| d.components().any(|c| c.as_os_str() == "pids") || d.join("pids.max").exists())
        .unwrap();
    let procs: Vec<i32> = std::fs::read_to_string(pids_dir.join("cgroup.procs"))
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(
        procs.len() > forked as usize,
        "the children forked too: {procs:?}"
    );

    // Stopping it kills every process of its cgroup and removes the cgroup.
    d.cli_ok(&["stop", "bomb"]);
    plugvisor_integration_tests::wait_until_blocking(SECS_10, "the bomb's processes gone", || {
        procs.iter().all(|&p| is_gone(p))
    });
    plugvisor_integration_tests::wait_until_blocking(SECS_10, "the bomb's cgroup removed", || {
        !pids_dir.exists()
    });
    assert_eq!(
        d.cli_ok(&["call", "echo", "upper", "--data", "still here"]),
        "STILL HERE"
    );
}

#[test]
fn inspect_shows_limits_live_usage_and_the_mechanism() {
    let sandbox = Sandbox::new();
    sandbox.plugin(
        "limited",
        &tp(),
        "limits: {memory: 96MiB, cpu: 0.5, pids: 100, nofile: 512}",
    );
    let with_cgroups = real_cgroups("inspect-check").is_ok();
    let daemon = Graceful(Daemon::start(&sandbox, &[]));
    let d = &daemon.0;
    d.wait_ready("limited");
    let text = d.cli_ok(&["inspect", "limited"]);
    eprintln!("{text}");
    assert!(text.contains("nofile  512        rlimit NOFILE"), "{text}");
    assert!(text.contains("core    0B         rlimit CORE"), "{text}");
    assert!(text.contains("hardening:  clean environment"), "{text}");
    let json = inspect_json(d, "limited");
    let iso = &json["isolation"];
    if with_cgroups {
        let mechanism = iso["mechanism"].as_str().unwrap();
        assert!(
            mechanism == "cgroup v1" || mechanism == "cgroup v2",
            "{json}"
        );
        assert!(text.contains(&format!("isolation:  {mechanism}")), "{text}");
        assert!(text.contains("memory  96MiB"), "{text}");
        assert!(text.contains("usage:      memory "), "{text}");
        let usage = &iso["usage"];
        assert!(usage["memory_bytes"].as_u64().unwrap() > 0, "{json}");
        assert!(usage["pids"].as_u64().unwrap() >= 1, "{json}");
        assert!(usage["cpu_usec"].as_u64().is_some(), "{json}");
        assert_eq!(usage["oom_kills"], 0, "{json}");
    } else {
        plugvisor_integration_tests::skip(
            "(part) no cgroups here; checking the rlimits-only report",
        );
        assert!(text.contains("isolation:  rlimits only: "), "{text}");
    }
    drop(daemon);

    // Without a cgroup tree: rlimits only, said once at start-up and in inspect.
    let config = sandbox.dir.path().join("nocgroup.yaml");
    std::fs::write(&config, "cgroup: {root: /nonexistent-cgroupfs}\n").unwrap();
    let daemon = Graceful(Daemon::start(
        &sandbox,
        &["--config", config.to_str().unwrap()],
    ));
    let d = &daemon.0;
    d.wait_ready("limited");
    let text = d.cli_ok(&["inspect", "limited"]);
    assert!(
        text.contains("isolation:  rlimits only: no cgroup filesystem at /nonexistent-cgroupfs"),
        "{text}"
    );
    assert!(
        text.contains("pids    100        not enforced: no cgroup"),
        "{text}"
    );
    assert!(
        text.contains("usage:      - (no running instance in a cgroup)"),
        "{text}"
    );
    let log = d.log_text();
    assert_eq!(log.matches("no usable cgroup tree").count(), 1, "{log}");
}

#[test]
fn cgroup_require_makes_a_missing_tree_fatal() {
    let sandbox = Sandbox::new();
    sandbox.plugin("echo", &bin("echo-plugin"), "");
    let config = sandbox.dir.path().join("require.yaml");
    std::fs::write(
        &config,
        "cgroup: {root: /nonexistent-cgroupfs, require: true}\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin("plugvisor"))
        .arg("--control")
        .arg(sandbox.dir.path().join("ctl.sock"))
        .args(["run", "--config"])
        .arg(&config)
        .arg("--plugins-dir")
        .arg(sandbox.plugins_dir())
        .arg("--runtime-dir")
        .arg(sandbox.runtime_dir())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cgroups are required (cgroup.require: true) but cannot be used: no cgroup filesystem at /nonexistent-cgroupfs"),
        "{stderr}"
    );
}

#[test]
fn check_reports_a_pin_mismatch_offline() {
    let sandbox = Sandbox::new();
    sandbox.plugin(
        "good",
        &tp(),
        &format!("sha256: {}", sha256_file(&tp()).unwrap()),
    );
    sandbox.plugin("bad", &tp(), &format!("sha256: {}", "ab".repeat(32)));
    let out = std::process::Command::new(bin("plugvisor"))
        .args(["check", "--plugins-dir"])
        .arg(sandbox.plugins_dir())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("ok    good 1.0.0"), "{stdout}");
    assert!(
        stdout.contains("bad/plugin.yaml: sha256 mismatch") && stdout.contains(&"ab".repeat(32)),
        "{stdout}"
    );
}

#[tokio::test]
async fn limits_apply_to_every_instance_and_refusals_wait_for_an_operator() {
    // A refused plugin does not keep the others from running.
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    let mut events = sup.events();
    sup.add(
        sandbox.manifest("refused", &tp(), &format!("sha256: {}", "1".repeat(64))),
        &Default::default(),
    )
    .unwrap();
    sup.add(
        sandbox.manifest("fine", &tp(), "limits: {nofile: 100}"),
        &Default::default(),
    )
    .unwrap();
    next_event(&mut events, "refused", SECS_10, |e| {
        e.state == PluginState::Failed
    })
    .await;
    sup.wait_ready("fine", SECS_10).await.unwrap();
    let id = call(&sup, "fine", "identity", "").await;
    assert_eq!(id["rlimits"]["nofile"], serde_json::json!([100, 100]));
    sup.shutdown().await;
}

/// The thread ids of `pid`, from procfs.
fn threads_of(pid: i32) -> Vec<String> {
    let mut tids: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    tids.sort();
    tids
}

#[tokio::test]
async fn every_thread_of_a_plugin_is_in_its_cgroup_in_each_hierarchy_and_the_supervisor_is_not() {
    // The child joins between fork and exec, while it has one thread (on
    // v1 through `tasks`, which moves that thread only): the threads the
    // plugin starts afterwards, and its forks, must all be inside, and
    // nothing of the supervisor.
    let cgroups = or_skip!(real_cgroups("join"));
    let sandbox = Sandbox::new();
    let sup = supervisor(&sandbox, cgroups);
    sup.add(sandbox.manifest("joiner", &tp(), ""), &Default::default())
        .unwrap();
    sup.wait_ready("joiner", SECS_10).await.unwrap();
    // Host pid (it is PID 1 in its own namespace).
    let pid: i32 = call(&sup, "joiner", "pid", "").await.as_i64().unwrap() as i32;
    let threads = threads_of(pid);
    assert!(
        threads.len() > 1,
        "the test plugin runs a multi-threaded runtime: {threads:?}"
    );
    let info = sup.info("joiner").unwrap();
    assert!(!info.isolation.cgroup.is_empty(), "{:?}", info.isolation);
    let me = std::process::id().to_string();
    let my_threads = threads_of(std::process::id() as i32);
    for dir in &info.isolation.cgroup {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        let procs: Vec<&str> = procs.lines().collect();
        assert!(
            procs.contains(&pid.to_string().as_str()),
            "{pid} not in {}: {procs:?}",
            dir.display()
        );
        assert!(
            !procs.contains(&me.as_str()),
            "the supervisor joined {}",
            dir.display()
        );
        // v1: each thread, one by one.
        if let Ok(tasks) = std::fs::read_to_string(dir.join("tasks")) {
            let tasks: Vec<&str> = tasks.lines().collect();
            for tid in &threads {
                assert!(
                    tasks.contains(&tid.as_str()),
                    "thread {tid} of {pid} not in {}: {tasks:?}",
                    dir.display()
                );
            }
            for tid in &my_threads {
                assert!(
                    !tasks.contains(&tid.as_str()),
                    "supervisor thread {tid} in {}",
                    dir.display()
                );
            }
        }
    }
    sup.shutdown().await;
}
