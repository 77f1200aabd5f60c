//! Container plugins through the daemon: the test plugin in a local OCI
//! image run by podman, and in an OCI bundle run by runc. Both are built
//! here, offline, from the test plugin's binary and the libraries it links.

use plugvisor_integration_tests::{Daemon, Sandbox, bin, skip, wait_until_blocking};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const SECS_30: Duration = Duration::from_secs(30);
const MIB_64: u64 = 64 << 20;

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"))
}

/// A root filesystem holding `/testplugin` and the libraries it links.
fn rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let plugin = bin("testplugin");
    std::fs::copy(&plugin, root.join("testplugin")).unwrap();
    let ldd = run("ldd", &[plugin.to_str().unwrap()]);
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let lib = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(PathBuf::from);
        if let Some(lib) = lib {
            let to = root.join(lib.strip_prefix("/").unwrap());
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(&lib, &to).unwrap();
        }
    }
    root
}

/// The uid:gid container plugins run as (`isolation.user: nobody`).
const NOBODY: u32 = 65534;

fn write_manifest(sandbox: &Sandbox, container: &str) -> PathBuf {
    write_plugin(sandbox, "tp", container)
}

fn write_plugin(sandbox: &Sandbox, name: &str, container: &str) -> PathBuf {
    let dir = sandbox.plugins_dir().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("plugin.yaml"),
        format!(
            "name: {name}\nversion: 1.0.0\ncontainer: {container}\n\
             limits: {{memory: 64MiB, pids: 64}}\n\
             isolation: {{user: nobody, group: nogroup}}\n\
             restart: {{initial_backoff: 50ms, jitter: 0.0}}\n\
             timeouts: {{start: 20s, stop: 10s}}\n"
        ),
    )
    .unwrap();
    dir
}

/// The container name from the latest `spawning container` event.
fn container_name(daemon: &Daemon) -> String {
    container_name_of(daemon, "tp")
}

fn container_name_of(daemon: &Daemon, plugin: &str) -> String {
    let events = daemon.cli_ok(&["events", plugin, "--json"]);
    events
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|e| {
            e["reason"]
                .as_str()?
                .strip_prefix("spawning container ")
                .map(|r| r.split(' ').next().unwrap().to_string())
        })
        .unwrap_or_else(|| panic!("no `spawning container` event:\n{events}"))
}

fn wait_ready(daemon: &Daemon) -> serde_json::Value {
    let deadline = std::time::Instant::now() + SECS_30;
    loop {
        let last = daemon.plugin("tp");
        if last["state"] == "ready" {
            return last;
        }
        if std::time::Instant::now() > deadline {
            panic!(
                "tp is not ready: {last}\n{}",
                daemon.cli_ok(&["events", "tp"])
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What both runtimes must do: start, call, the memory limit in the
/// container's cgroup, crash and restart (the old container removed), stop
/// (the container removed). `exists` says whether a container is there.
fn exercise(daemon: &Daemon, exists: &dyn Fn(&str) -> bool, host_limit: &dyn Fn(&str) -> String) {
    wait_ready(daemon);
    let first = container_name(daemon);
    assert!(exists(&first), "{first} is not there");
    assert_eq!(
        daemon.cli_ok(&["call", "tp", "echo", "--data", "from a container"]),
        "from a container"
    );
    // The limit reached the runtime's cgroup, as the plugin sees it.
    let limit = daemon.cli_ok(&[
        "call",
        "tp",
        "cat",
        "--data",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]);
    assert_eq!(limit.trim(), MIB_64.to_string(), "memory.limit_in_bytes");
    // And as the host sees the runtime's cgroup.
    assert_eq!(host_limit(&first).trim(), MIB_64.to_string());
    // The plugin runs in its own PID namespace, as PID 1.
    let env = daemon.cli_ok(&["call", "tp", "cat", "--data", "/proc/self/stat"]);
    assert!(env.starts_with("1 "), "{env}");
    // As isolation.user, resolved on the host: nobody's uid and gid.
    let status = daemon.cli_ok(&["call", "tp", "cat", "--data", "/proc/self/status"]);
    let ids = |key: &str| -> Vec<u32> {
        let line = status.lines().find(|l| l.starts_with(key)).unwrap();
        line.split_whitespace()
            .skip(1)
            .map(|n| n.parse().unwrap())
            .collect()
    };
    assert_eq!(ids("Uid:"), [NOBODY; 4], "{status}");
    assert_eq!(ids("Gid:"), [NOBODY; 4], "{status}");
    // The runtime's cgroup, shown like any plugin's, with live usage.
    let isolation = &daemon.plugin("tp")["isolation"];
    let cgroups: Vec<&str> = isolation["cgroups"]
        .as_array()
        .expect("cgroups")
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(
        cgroups.iter().any(|c| c.contains("/memory/")),
        "{isolation}"
    );
    let memory = isolation["usage"]["memory_bytes"].as_u64().unwrap_or(0);
    assert!(memory > 0 && memory <= MIB_64, "{isolation}");
    let inspect = daemon.cli_ok(&["inspect", "tp"]);
    assert!(inspect.contains(cgroups[0]), "{inspect}");

    // Over its memory limit: the OOM killer, recognised as such.
    let out = daemon.cli(&["call", "tp", "alloc", "--data", "256"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    wait_until_blocking(SECS_30, "tp back after the OOM kill", || {
        let r = daemon.plugin("tp");
        r["state"] == "ready" && r["restarts"] == 1
    });
    let events = daemon.cli_ok(&["events", "tp", "--json"]);
    assert!(
        events.lines().any(|l| l.contains("\"backoff\"")
            && l.contains("killed by the OOM killer")
            && l.contains("\"oom\":true")),
        "{events}"
    );
    let row = daemon.plugin("tp");

    let out = daemon.cli(&["call", "tp", "crash", "--data", "7"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    wait_until_blocking(SECS_30, "tp to restart", || {
        let r = daemon.plugin("tp");
        r["state"] == "ready" && r["restarts"] == 2 && r["pid"] != row["pid"]
    });
    let events = daemon.cli_ok(&["events", "tp", "--json"]);
    assert!(
        events
            .lines()
            .any(|l| l.contains("\"backoff\"") && l.contains("exited with code 7")),
        "{events}"
    );
    let second = container_name(daemon);
    assert_ne!(first, second);
    wait_until_blocking(SECS_30, "the crashed containers to be removed", || {
        !exists(&first)
    });
    assert_eq!(
        daemon.cli_ok(&["call", "tp", "echo", "--data", "again"]),
        "again"
    );

    daemon.cli_ok(&["stop", "tp"]);
    assert_eq!(daemon.plugin("tp")["state"], "stopped");
    wait_until_blocking(SECS_30, "the stopped container to be removed", || {
        !exists(&second)
    });
}

/// A daemon killed with SIGKILL cannot remove its containers: the next
/// daemon on the same runtime directory removes them before its first
/// container starts, even those of plugins it no longer runs.
fn stale_containers_are_swept(sandbox: &Sandbox, container: &str, exists: &dyn Fn(&str) -> bool) {
    std::fs::remove_dir_all(sandbox.plugins_dir().join("tp")).unwrap();
    write_plugin(sandbox, "old", container);
    let mut daemon = Daemon::start(sandbox, &[]);
    wait_until_blocking(SECS_30, "old ready", || {
        daemon.plugin("old")["state"] == "ready"
    });
    let stale = container_name_of(&daemon, "old");
    daemon.stop_with(libc::SIGKILL);
    assert!(exists(&stale), "{stale} did not outlive its daemon");

    std::fs::remove_dir_all(sandbox.plugins_dir().join("old")).unwrap();
    write_manifest(sandbox, container);
    let daemon = Daemon::start(sandbox, &[]);
    wait_ready(&daemon);
    assert!(!exists(&stale), "{stale} is still there");
    let log = daemon.log_text();
    assert!(
        log.contains(&format!("container(s) of an earlier run: {stale}")),
        "{log}"
    );
    daemon.cli_ok(&["stop", "tp"]);
}

#[test]
fn a_podman_image_plugin_is_supervised_like_any_other() {
    if !have("podman") || !have("runc") {
        return skip("podman or runc is not installed (Debian: apt-get install podman runc)");
    }
    let sandbox = Sandbox::new();
    let root = rootfs(sandbox.dir.path());
    let tar = sandbox.dir.path().join("rootfs.tar");
    let out = run(
        "tar",
        &[
            "-C",
            root.to_str().unwrap(),
            "-cf",
            tar.to_str().unwrap(),
            ".",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let tag = sandbox
        .dir
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_lowercase();
    let image = format!("localhost/plugvisor-testplugin:{tag}");
    let out = run(
        "podman",
        &[
            "--runtime",
            "runc",
            "import",
            "--change",
            "ENTRYPOINT [\"/testplugin\"]",
            tar.to_str().unwrap(),
            &image,
        ],
    );
    assert!(out.status.success(), "podman import: {out:?}");
    struct Image(String);
    impl Drop for Image {
        fn drop(&mut self) {
            let _ = run("podman", &["rmi", "--force", &self.0]);
        }
    }
    let _image = Image(image.clone());
    let container = format!("{{runtime: podman, image: \"{image}\", oci_runtime: runc}}");
    write_manifest(&sandbox, &container);
    let daemon = Daemon::start(&sandbox, &[]);
    let exists = |name: &str| {
        run("podman", &["container", "exists", name])
            .status
            .success()
    };
    let host_limit = |name: &str| {
        let out = run(
            "podman",
            &["inspect", "--format", "{{.HostConfig.Memory}}", name],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    exercise(&daemon, &exists, &host_limit);
    drop(daemon);
    stale_containers_are_swept(&sandbox, &container, &exists);
}

#[test]
fn a_runc_bundle_plugin_is_supervised_like_any_other() {
    if !have("runc") {
        return skip("runc is not installed (Debian: apt-get install runc)");
    }
    let sandbox = Sandbox::new();
    // Outside the plugin's directory: two plugins share it.
    let bundle = sandbox.dir.path().join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    let root = rootfs(&bundle);
    assert!(root.ends_with("rootfs"));
    let out = Command::new("runc")
        .arg("spec")
        .current_dir(&bundle)
        .output()
        .unwrap();
    assert!(out.status.success(), "runc spec: {out:?}");
    let path = bundle.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["process"]["args"] = serde_json::json!(["/testplugin"]);
    std::fs::write(&path, config.to_string()).unwrap();
    let container = format!("{{runtime: runc, bundle: {}}}", bundle.display());
    write_manifest(&sandbox, &container);
    let daemon = Daemon::start(&sandbox, &[]);
    let exists = |name: &str| run("runc", &["state", name]).status.success();
    // The container's own cgroup, where the bundle's cgroupsPath put it.
    let host_limit = |name: &str| {
        let file =
            format!("/sys/fs/cgroup/memory/plugvisor-containers/{name}/memory.limit_in_bytes");
        std::fs::read_to_string(&file).unwrap_or_else(|e| format!("{file}: {e}"))
    };
    exercise(&daemon, &exists, &host_limit);
    drop(daemon);
    stale_containers_are_swept(&sandbox, &container, &exists);
}
