//! Least privilege by default, end to end with real processes: under a root
//! supervisor each plugin runs as its own dynamic uid with no capabilities
//! and no_new_privs, named capabilities are kept and nothing else, plugins
//! cannot reach each other's sockets, setuid executables and (when
//! required) unpinned ones are refused, and `inspect` shows what each plugin
//! holds. What the kernel says is read from `/proc/<pid>/status`. A test
//! that needs root prints `SKIP: <why>` and returns.

use plugvisor::isolation::pin::sha256_file;
use plugvisor::{PluginState, Supervisor};
use plugvisor_integration_tests::{Daemon, Sandbox, bin, wait_state};
use prost::bytes::Bytes;
use std::path::{Path, PathBuf};
use std::time::Duration;

const SECS_10: Duration = Duration::from_secs(10);
const NO_CAPS: &str = "0000000000000000";

fn tp() -> PathBuf {
    bin("testplugin")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

macro_rules! root_or_skip {
    ($what:expr) => {
        if !is_root() {
            plugvisor_integration_tests::skip(format!("{} needs a root supervisor", $what));
            return;
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

/// `Field:` of `/proc/<pid>/status`, split on whitespace.
fn proc_status(pid: i32, field: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The socket of plugin `name`'s running instance.
fn socket_of(sandbox: &Sandbox, sup: &Supervisor, name: &str) -> PathBuf {
    let info = sup.info(name).unwrap();
    sandbox
        .runtime_dir()
        .join("plugins")
        .join(&info.instance)
        .join("plugin.sock")
}

#[tokio::test]
async fn a_default_plugin_runs_as_its_own_uid_with_no_capabilities() {
    root_or_skip!("changing a plugin's uid");
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    sup.add(sandbox.manifest("plain", &tp(), ""), &Default::default())
        .unwrap();
    sup.wait_ready("plain", SECS_10).await.unwrap();
    let pid = sup.info("plain").unwrap().pid.unwrap();
    let uids = proc_status(pid, "Uid:");
    let uid: u32 = uids[0].parse().unwrap();
    assert!((61184..=65519).contains(&uid), "uid {uid}");
    let four = vec![uid.to_string(); 4];
    assert_eq!(uids, four, "real, effective, saved, fs");
    assert_eq!(proc_status(pid, "Gid:"), four);
    assert_eq!(proc_status(pid, "Groups:"), [uid.to_string()]);
    for set in ["CapEff:", "CapPrm:", "CapInh:", "CapBnd:", "CapAmb:"] {
        assert_eq!(proc_status(pid, set), [NO_CAPS], "{set}");
    }
    assert_eq!(proc_status(pid, "NoNewPrivs:"), ["1"]);
    // The plugin sees the same of itself.
    let id = call(&sup, "plain", "identity", "").await;
    assert_eq!(id["cap_bnd"], NO_CAPS, "{id}");
    // Its socket directory is its own, and nobody else's.
    let dir = socket_of(&sandbox, &sup, "plain");
    let meta = std::fs::metadata(dir.parent().unwrap()).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), uid);
    assert_eq!(std::os::unix::fs::MetadataExt::mode(&meta) & 0o777, 0o700);
    // inspect says so.
    let iso = sup.info("plain").unwrap().isolation;
    assert_eq!((iso.uid, iso.gid), (Some(uid), Some(uid)));
    assert!(iso.dynamic_user && iso.capabilities.is_empty() && iso.no_new_privs);
    // The same name gets the same uid after a restart.
    sup.restart("plain").await.unwrap();
    sup.wait_ready("plain", SECS_10).await.unwrap();
    let again = sup.info("plain").unwrap().pid.unwrap();
    assert_ne!(again, pid);
    assert_eq!(proc_status(again, "Uid:")[0], uid.to_string());
    sup.shutdown().await;
}

#[tokio::test]
async fn root_is_an_explicit_opt_in_and_still_has_no_capabilities() {
    root_or_skip!("running a plugin as root");
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    sup.add(
        sandbox.manifest("rooted", &tp(), "isolation: {user: root}"),
        &Default::default(),
    )
    .unwrap();
    sup.wait_ready("rooted", SECS_10).await.unwrap();
    let pid = sup.info("rooted").unwrap().pid.unwrap();
    assert_eq!(proc_status(pid, "Uid:"), ["0"; 4]);
    for set in ["CapEff:", "CapPrm:", "CapBnd:", "CapAmb:"] {
        assert_eq!(proc_status(pid, set), [NO_CAPS], "{set}");
    }
    let iso = sup.info("rooted").unwrap().isolation;
    assert_eq!(iso.uid, Some(0));
    assert_eq!(iso.identity, "manifest isolation.user");
    assert!(
        iso.hardening
            .iter()
            .any(|h| h == "user root (explicit opt-in)"),
        "{:?}",
        iso.hardening
    );
    sup.shutdown().await;
}

#[tokio::test]
async fn two_plugins_get_different_uids_and_cannot_reach_each_others_socket() {
    root_or_skip!("per-plugin uids");
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    for name in ["alpha", "beta"] {
        sup.add(sandbox.manifest(name, &tp(), ""), &Default::default())
            .unwrap();
    }
    sup.wait_ready("alpha", SECS_10).await.unwrap();
    sup.wait_ready("beta", SECS_10).await.unwrap();
    let uid = |name: &str| proc_status(sup.info(name).unwrap().pid.unwrap(), "Uid:")[0].clone();
    assert_ne!(uid("alpha"), uid("beta"));
    let beta = socket_of(&sandbox, &sup, "beta");
    let tried = call(&sup, "alpha", "connect_unix", beta.to_str().unwrap()).await;
    assert_eq!(tried["ok"], false, "{tried}");
    assert!(
        tried["error"].as_str().unwrap().starts_with("EACCES"),
        "{tried}"
    );
    // Its own socket it reaches.
    let own = socket_of(&sandbox, &sup, "alpha");
    let tried = call(&sup, "alpha", "connect_unix", own.to_str().unwrap()).await;
    assert_eq!(tried["ok"], true, "{tried}");
    sup.shutdown().await;
}

#[tokio::test]
async fn a_named_capability_is_kept_across_exec_and_nothing_else() {
    root_or_skip!("handing a capability to a non-root uid");
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    sup.add(
        sandbox.manifest(
            "web",
            &tp(),
            "isolation: {capabilities: [CAP_NET_BIND_SERVICE]}",
        ),
        &Default::default(),
    )
    .unwrap();
    sup.add(sandbox.manifest("plain", &tp(), ""), &Default::default())
        .unwrap();
    sup.wait_ready("web", SECS_10).await.unwrap();
    sup.wait_ready("plain", SECS_10).await.unwrap();
    let pid = sup.info("web").unwrap().pid.unwrap();
    assert_ne!(proc_status(pid, "Uid:")[0], "0");
    let bind_service = format!("{:016x}", 1u64 << 10);
    for set in ["CapEff:", "CapPrm:", "CapInh:", "CapBnd:", "CapAmb:"] {
        assert_eq!(proc_status(pid, set), vec![bind_service.clone()], "{set}");
    }
    // Port 80 may be taken on a host: any free privileged port shows it.
    let port = (600..1000)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free privileged port");
    let addr = format!("127.0.0.1:{port}");
    let bound = call(&sup, "web", "bind", &addr).await;
    assert_eq!(bound["ok"], true, "{bound}");
    let refused = call(&sup, "plain", "bind", &addr).await;
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(
        refused["error"].as_str().unwrap().starts_with("EACCES"),
        "{refused}"
    );
    assert_eq!(
        sup.info("web").unwrap().isolation.capabilities,
        ["CAP_NET_BIND_SERVICE"]
    );
    sup.shutdown().await;
}

#[test]
fn an_unknown_capability_is_a_manifest_error_naming_the_field() {
    let sandbox = Sandbox::new();
    let path = sandbox.plugin("bad", &tp(), "isolation: {capabilities: [CAP_FLY]}");
    let e = plugvisor::manifest::Manifest::load(&path).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("isolation.capabilities"), "{e}");
    assert!(
        e.to_string().contains("`CAP_FLY` is not a capability"),
        "{e}"
    );
}

/// A copy of the test plugin in the sandbox with `mode`.
fn copy_with_mode(sandbox: &Sandbox, dir: &str, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = sandbox.dir.path().join(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("testplugin");
    std::fs::copy(tp(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(mode)).unwrap();
    exe
}

#[tokio::test]
async fn a_setuid_executable_is_refused_with_the_reason() {
    let sandbox = Sandbox::new();
    let exe = copy_with_mode(&sandbox, "bin", 0o4755);
    let sup = sandbox.supervisor();
    let mut events = sup.events();
    sup.add(sandbox.manifest("suid", &exe, ""), &Default::default())
        .unwrap();
    let failed = wait_state(&mut events, "suid", PluginState::Failed, SECS_10).await;
    assert!(
        failed
            .reason
            .contains("is set-user-ID or set-group-ID (mode 4755)"),
        "{}",
        failed.reason
    );
    assert_eq!(sup.info("suid").unwrap().restarts, 0);
    sup.shutdown().await;
}

#[tokio::test]
async fn an_executable_the_plugin_user_cannot_reach_is_refused_naming_the_directory() {
    root_or_skip!("running as a dynamic uid");
    let sandbox = Sandbox::new();
    let exe = copy_with_mode(&sandbox, "private", 0o755);
    let private = exe.parent().unwrap().to_path_buf();
    std::fs::set_permissions(
        &private,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let sup = sandbox.supervisor();
    let mut events = sup.events();
    sup.add(sandbox.manifest("hidden", &exe, ""), &Default::default())
        .unwrap();
    let failed = wait_state(&mut events, "hidden", PluginState::Failed, SECS_10).await;
    assert!(
        failed.reason.contains("cannot run its executable")
            && failed
                .reason
                .contains(&format!("{} is mode 0700", private.display())),
        "{}",
        failed.reason
    );
    // Pinned, it runs from a sealed in-memory copy: no path to reach.
    sup.add(
        sandbox.manifest(
            "hidden-pinned",
            &exe,
            &format!("sha256: {}", sha256_file(&exe).unwrap()),
        ),
        &Default::default(),
    )
    .unwrap();
    sup.wait_ready("hidden-pinned", SECS_10).await.unwrap();
    sup.shutdown().await;
}

fn check(sandbox: &Sandbox, config: Option<&Path>) -> (Option<i32>, String) {
    let mut cmd = std::process::Command::new(bin("plugvisor"));
    cmd.arg("check");
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    let out = cmd
        .arg("--plugins-dir")
        .arg(sandbox.plugins_dir())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn check_warns_about_an_unpinned_executable_and_fails_when_pinning_is_required() {
    let sandbox = Sandbox::new();
    sandbox.plugin(
        "pinned",
        &tp(),
        &format!("sha256: {}", sha256_file(&tp()).unwrap()),
    );
    sandbox.plugin("loose", &tp(), "");
    let (code, out) = check(&sandbox, None);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("ok    loose 1.0.0"), "{out}");
    assert!(
        out.contains("loose/plugin.yaml") && out.contains("is not pinned (no `sha256:`)"),
        "{out}"
    );
    assert_eq!(out.matches("is not pinned").count(), 1, "{out}");
    let config = sandbox.dir.path().join("plugvisor.yaml");
    std::fs::write(&config, "isolation: {require_pinning: true}\n").unwrap();
    let (code, out) = check(&sandbox, Some(&config));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("error") && out.contains("isolation.require_pinning: true"),
        "{out}"
    );
    assert!(out.contains("ok    pinned 1.0.0"), "{out}");
}

#[test]
fn the_daemon_refuses_an_unpinned_plugin_when_pinning_is_required() {
    let sandbox = Sandbox::new();
    sandbox.plugin("loose", &tp(), "");
    sandbox.plugin(
        "pinned",
        &tp(),
        &format!("sha256: {}", sha256_file(&tp()).unwrap()),
    );
    let config = sandbox.dir.path().join("plugvisor.yaml");
    std::fs::write(&config, "isolation: {require_pinning: true}\n").unwrap();
    let daemon = Daemon::start(&sandbox, &["--config", config.to_str().unwrap()]);
    daemon.wait_ready("pinned");
    let deadline = std::time::Instant::now() + SECS_10;
    loop {
        let loose = daemon.plugin("loose");
        if loose["state"] == "failed" {
            let reason = loose["reason"].as_str().unwrap_or_default();
            assert!(reason.contains("require_pinning"), "{loose}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{loose}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn inspect_json_through_the_daemon_shows_uid_capabilities_and_no_new_privs() {
    let sandbox = Sandbox::new();
    sandbox.plugin("plain", &tp(), "");
    sandbox.plugin(
        "web",
        &tp(),
        "isolation: {capabilities: [CAP_NET_BIND_SERVICE]}",
    );
    let daemon = Daemon::start(&sandbox, &[]);
    let inspect = |name: &str| -> serde_json::Value {
        serde_json::from_str(&daemon.cli_ok(&["inspect", name, "--json"])).unwrap()
    };
    daemon.wait_ready("plain");
    let plain = inspect("plain");
    let iso = &plain["isolation"];
    assert_eq!(iso["no_new_privs"], true, "{iso}");
    assert_eq!(iso["capabilities"], serde_json::json!([]), "{iso}");
    if !is_root() {
        // Not root: the plugin runs as the daemon's uid, and inspect says so.
        let degraded = iso["degraded"].to_string();
        assert!(degraded.contains("supervisor not root"), "{iso}");
        plugvisor_integration_tests::skip("per-plugin uids and capabilities need a root daemon");
        return;
    }
    daemon.wait_ready("web");
    let uid = iso["uid"].as_u64().unwrap();
    assert!((61184..=65519).contains(&uid), "{iso}");
    assert_eq!(iso["gid"], uid, "{iso}");
    assert_eq!(iso["dynamic_user"], true, "{iso}");
    assert_eq!(iso["identity"], "dynamic", "{iso}");
    let pid = plain["pid"].as_i64().unwrap() as i32;
    assert_eq!(proc_status(pid, "Uid:")[0], uid.to_string());
    let web = inspect("web");
    assert_eq!(
        web["isolation"]["capabilities"],
        serde_json::json!(["CAP_NET_BIND_SERVICE"]),
        "{web}"
    );
    assert_ne!(web["isolation"]["uid"], uid, "{web}");
    // The human form too.
    let human = daemon.cli_ok(&["inspect", "plain"]);
    assert!(
        human.contains(&format!("uid {uid} gid {uid} (dynamic)")),
        "{human}"
    );
    assert!(human.contains("caps:       none"), "{human}");
    assert!(human.contains("nnp:        yes"), "{human}");
}
