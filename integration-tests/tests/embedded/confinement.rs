//! The default seccomp filter and the per-plugin PID namespace, on real
//! plugin processes: what a confined plugin cannot do, what an unconfined
//! one can, how a seccomp kill reads, and that a plugin's descendants die
//! with it even when the daemon is SIGKILLed.

use plugvisor::isolation::{pidns, seccomp};
use plugvisor::{PluginState, Supervisor};
use plugvisor_integration_tests::{
    Daemon, Sandbox, bin, is_gone, next_event, wait_state, wait_until_blocking,
};
use prost::bytes::Bytes;
use std::time::Duration;

const SECS_10: Duration = Duration::from_secs(10);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
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
    serde_json::from_slice(&reply.payload)
        .unwrap_or_else(|e| panic!("{plugin}.{method}: not JSON: {e}"))
}

/// The `Seccomp:` field of a process's status, read from outside.
fn seccomp_field(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

async fn start(sandbox: &Sandbox, name: &str, extra: &str) -> (Supervisor, i32) {
    let sup = sandbox.supervisor();
    sup.add(
        sandbox.manifest(name, &bin("testplugin"), extra),
        &Default::default(),
    )
    .unwrap();
    sup.wait_ready(name, SECS_10).await.unwrap();
    let pid = sup
        .info(name)
        .unwrap()
        .pid
        .expect("a running plugin has a pid");
    (sup, pid)
}

#[tokio::test]
async fn a_default_plugin_runs_under_seccomp_and_blocked_calls_fail_with_eperm() {
    or_skip!(seccomp::probe());
    let sandbox = Sandbox::new();
    let (sup, pid) = start(&sandbox, "tp", "").await;
    assert_eq!(seccomp_field(pid), "2", "filter mode, seen from outside");
    assert_eq!(call(&sup, "tp", "pid_info", "").await["seccomp"], "2");
    for name in [
        "mount",
        "unshare_user",
        "ptrace",
        "keyctl",
        "bpf",
        "perf_event_open",
        "personality",
    ] {
        let r = call(&sup, "tp", "syscall", name).await;
        assert_eq!(r["error"], "EPERM", "{name}: {r}");
    }
    // Flags in memory: ENOSYS sends the C library back to clone.
    let r = call(&sup, "tp", "syscall", "clone3").await;
    assert_eq!(r["error"], "ENOSYS", "{r}");
    let info = sup.info("tp").unwrap();
    assert!(
        info.isolation
            .hardening
            .iter()
            .any(|h| h == "seccomp default (blocked calls fail with EPERM)"),
        "{:?}",
        info.isolation.hardening
    );
    sup.shutdown().await;
}

#[tokio::test]
async fn an_unconfined_plugin_is_not_filtered() {
    let sandbox = Sandbox::new();
    let (sup, pid) = start(&sandbox, "tp", "isolation: {seccomp: unconfined}").await;
    assert_eq!(seccomp_field(pid), "0");
    // Calls any process may make succeed without the filter.
    for name in ["ptrace", "keyctl"] {
        let r = call(&sup, "tp", "syscall", name).await;
        assert_eq!(r["errno"], 0, "{name}: {r}");
    }
    // clone3 with no arguments: the kernel's own EINVAL, not ENOSYS.
    let r = call(&sup, "tp", "syscall", "clone3").await;
    assert_ne!(r["error"], "ENOSYS", "{r}");
    if is_root() {
        let r = call(&sup, "tp", "syscall", "unshare_user").await;
        assert_eq!(r["errno"], 0, "{r}");
    }
    // Allowing one group leaves the rest in place.
    sup.add(
        sandbox.manifest(
            "debug",
            &bin("testplugin"),
            "isolation: {seccomp: {allow: ['@debug']}}",
        ),
        &Default::default(),
    )
    .unwrap();
    sup.wait_ready("debug", SECS_10).await.unwrap();
    if seccomp::probe().is_ok() {
        let r = call(&sup, "debug", "syscall", "ptrace").await;
        assert_eq!(r["errno"], 0, "{r}");
        let r = call(&sup, "debug", "syscall", "keyctl").await;
        assert_eq!(r["error"], "EPERM", "{r}");
    }
    sup.shutdown().await;
}

#[tokio::test]
async fn a_kill_mode_plugin_dies_with_sigsys_read_as_a_seccomp_kill() {
    or_skip!(seccomp::probe());
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    let mut events = sup.events();
    sup.add(
        sandbox.manifest(
            "tp",
            &bin("testplugin"),
            "isolation: {seccomp: {action: kill}}\nrestart: {policy: never}",
        ),
        &Default::default(),
    )
    .unwrap();
    wait_state(&mut events, "tp", PluginState::Ready, SECS_10).await;
    // In the plugin itself: the kill takes the whole process.
    let err = sup
        .call(
            "tp",
            "syscall",
            "keyctl,here".into(),
            Default::default(),
            None,
        )
        .await
        .unwrap_err();
    eprintln!("the call ended with: {err}");
    let gone = next_event(&mut events, "tp", SECS_10, |e| e.detail.exit_kind.is_some()).await;
    assert_eq!(gone.detail.exit_kind, Some("seccomp"), "{}", gone.reason);
    assert_eq!(gone.detail.signal, Some(libc::SIGSYS));
    assert!(gone.reason.contains("seccomp"), "{}", gone.reason);
    sup.shutdown().await;
}

#[tokio::test]
async fn a_plugin_is_pid_1_of_its_own_namespace_unless_it_opts_out() {
    or_skip!(pidns::probe());
    let sandbox = Sandbox::new();
    // The start itself proves the peer check: the socket's peer pid, as
    // the kernel translates it, is the spawned child's.
    let (sup, pid) = start(&sandbox, "tp", "").await;
    let own = call(&sup, "tp", "pid_info", "").await;
    assert_eq!(own["pid"], 1, "{own}");
    assert_eq!(own["host_pid"], pid, "{own}");
    let ours = std::fs::read_link("/proc/self/ns/pid").unwrap();
    assert_ne!(own["pid_ns"], ours.display().to_string(), "{own}");
    sup.add(
        sandbox.manifest(
            "shared",
            &bin("testplugin"),
            "isolation: {pid_namespace: false}",
        ),
        &Default::default(),
    )
    .unwrap();
    sup.wait_ready("shared", SECS_10).await.unwrap();
    let shared = call(&sup, "shared", "pid_info", "").await;
    let shared_pid = sup.info("shared").unwrap().pid.unwrap();
    assert_eq!(shared["pid"], shared_pid, "{shared}");
    assert_eq!(shared["pid_ns"], ours.display().to_string(), "{shared}");
    let hardening = sup.info("tp").unwrap().isolation.hardening;
    assert!(
        hardening
            .iter()
            .any(|h| h == "own PID namespace (the plugin is PID 1)"),
        "{hardening:?}"
    );
    // A graceful stop still works with the plugin as PID 1.
    let stopping = std::time::Instant::now();
    sup.shutdown().await;
    assert!(is_gone(pid));
    eprintln!("stopped in {:?}", stopping.elapsed());
}

#[test]
fn a_grandchild_dies_with_its_plugin_when_the_daemon_is_sigkilled() {
    or_skip!(pidns::probe());
    let sandbox = Sandbox::new();
    sandbox.plugin("ns", &bin("testplugin"), "args: [--double-fork]");
    sandbox.plugin(
        "shared",
        &bin("testplugin"),
        "args: [--double-fork]\nisolation: {pid_namespace: false}",
    );
    let mut daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("ns");
    daemon.wait_ready("shared");
    let grandchild = |name: &str| -> i32 {
        daemon
            .cli_ok(&["call", name, "grandchild"])
            .parse()
            .unwrap()
    };
    let (in_ns, outside) = (grandchild("ns"), grandchild("shared"));
    assert!(!is_gone(in_ns) && !is_gone(outside));
    daemon.stop_with(libc::SIGKILL);
    // The plugin dies of its parent-death signal, and with it, as PID 1,
    // everything in its namespace.
    wait_until_blocking(SECS_10, "the namespaced grandchild to die", || {
        is_gone(in_ns)
    });
    // Without the namespace nobody is left to kill the group: it survives.
    let survived = !is_gone(outside);
    // SAFETY: kill(2) on the pid of a process this test made the daemon
    // start; it is alive (checked just above) or already gone.
    unsafe { libc::kill(outside, libc::SIGKILL) };
    assert!(
        survived,
        "without a PID namespace the grandchild outlives a SIGKILLed daemon"
    );
}
