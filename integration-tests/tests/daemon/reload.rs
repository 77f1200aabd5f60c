//! Reloading the real daemon: SIGHUP and `plugvisor reload` add, remove and
//! upgrade plugins; a broken manifest changes nothing for its plugin; and
//! `plugvisor restart NAME --upgrade` moves a plugin to a new version with
//! its state.

use plugvisor_integration_tests::{Daemon, Sandbox, bin, is_gone, wait_until_blocking};
use std::time::Duration;

const SECS_10: Duration = Duration::from_secs(10);

fn write_manifest(sandbox: &Sandbox, rel: &str, text: &str) {
    let path = sandbox.plugins_dir().join(rel).join("plugin.yaml");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[test]
fn reload_adds_removes_and_changes_plugins_and_skips_broken_ones() {
    let sandbox = Sandbox::new();
    let echo = bin("echo-plugin");
    let tp = bin("testplugin");
    sandbox.plugin("echo", &echo, "config: {greeting: hello}");
    sandbox.plugin("gone", &tp, "");
    sandbox.plugin("stay", &tp, "");
    let daemon = Daemon::start(&sandbox, &[]);
    for name in ["echo", "gone", "stay"] {
        daemon.wait_ready(name);
    }
    let gone_pid = daemon.plugin("gone")["pid"].as_i64().unwrap() as i32;
    let stay_pid = daemon.plugin("stay")["pid"].as_i64().unwrap();
    assert_eq!(daemon.cli_ok(&["call", "echo", "greet"]), "hello");

    // Add one, remove one, change one's config, break one.
    sandbox.plugin("added", &echo, "");
    std::fs::remove_dir_all(sandbox.plugins_dir().join("gone")).unwrap();
    sandbox.plugin("echo", &echo, "config: {greeting: bonjour}");
    write_manifest(
        &sandbox,
        "stay",
        "name: stay\nversion: 1.0.0\nexec: ./x\nbogus: 1\n",
    );

    let out = daemon.cli(&["reload", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed plugin makes reload exit 1"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["added"], serde_json::json!(["added"]), "{report}");
    assert_eq!(report["removed"], serde_json::json!(["gone"]), "{report}");
    assert_eq!(report["upgraded"], serde_json::json!(["echo"]), "{report}");
    let failed = report["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{report}");
    assert_eq!(failed[0]["name"], "stay");
    assert!(
        failed[0]["reason"]
            .as_str()
            .unwrap()
            .contains("unknown field `bogus`"),
        "{report}"
    );

    daemon.wait_ready("added");
    assert_eq!(daemon.cli_ok(&["call", "echo", "greet"]), "bonjour");
    wait_until_blocking(SECS_10, "the removed plugin's process to exit", || {
        is_gone(gone_pid)
    });
    assert!(daemon.ps().iter().all(|p| p["name"] != "gone"));
    // The broken one runs on as it was.
    assert_eq!(daemon.plugin("stay")["pid"].as_i64().unwrap(), stay_pid);
    assert_eq!(daemon.plugin("stay")["state"], "ready");

    // Repair `stay`; a second reload (by SIGHUP) leaves everything alone.
    sandbox.plugin("stay", &tp, "");
    // SAFETY: signals the daemon process this test started.
    unsafe { libc::kill(daemon.pid(), libc::SIGHUP) };
    wait_until_blocking(SECS_10, "the SIGHUP reload", || {
        daemon.log_text().matches("reload: added").count() >= 2
    });
    let log = daemon.log_text();
    let last = log.lines().rfind(|l| l.contains("reload: added")).unwrap();
    // `stay` is back to exactly what it was started from: nothing to do.
    assert!(last.contains("unchanged: added, echo, stay"), "{last}");
    assert!(last.contains("upgraded: -"), "{last}");
}

#[test]
fn restart_upgrade_moves_kv_to_v2_with_its_state() {
    let sandbox = Sandbox::new();
    let kv = bin("kv-plugin");
    write_manifest(
        &sandbox,
        "kv/1.0.0",
        &format!(
            "name: kv\nversion: 1.0.0\nexec: {}\nargs: [--state-version, \"1\"]\nupgrade: {{probation: 200ms}}\n",
            kv.display()
        ),
    );
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("kv");
    daemon.cli_ok(&["call", "kv", "set", "--data", "city=Lisbon"]);
    let out = daemon.cli(&["call", "kv", "rev", "--data", "city"]);
    assert_eq!(out.status.code(), Some(1), "v1 has no `rev`");

    write_manifest(
        &sandbox,
        "kv/2.0.0",
        &format!(
            "name: kv\nversion: 2.0.0\nexec: {}\nupgrade: {{probation: 200ms}}\n",
            kv.display()
        ),
    );
    let out = daemon.cli_ok(&["restart", "kv", "--upgrade"]);
    assert!(out.contains("upgraded"), "{out}");
    let row = daemon.plugin("kv");
    assert_eq!(row["version"], "2.0.0");
    assert_eq!(
        daemon.cli_ok(&["call", "kv", "get", "--data", "city"]),
        "Lisbon"
    );
    assert_eq!(daemon.cli_ok(&["call", "kv", "rev", "--data", "city"]), "1");
    let events = daemon.cli_ok(&["events", "kv"]);
    assert!(events.contains("upgraded from 1.0.0 to 2.0.0"), "{events}");
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `plugvisor ps` run as user `nobody` with a copy of the CLI it may run.
fn ps_as_nobody(daemon: &Daemon, cli: &std::path::Path) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    std::process::Command::new(cli)
        .arg("--control")
        .arg(&daemon.control)
        .arg("ps")
        .uid(65534)
        .gid(65534)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("the CLI runs")
}

#[test]
fn reload_applies_live_settings_and_names_those_needing_a_restart() {
    use std::os::unix::fs::PermissionsExt;
    let sandbox = Sandbox::new();
    sandbox.plugin("echo", &bin("echo-plugin"), "");
    std::fs::set_permissions(sandbox.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod the sandbox");
    let cli = sandbox.dir.path().join("plugvisor-cli");
    std::fs::copy(bin("plugvisor"), &cli).expect("copy the CLI");
    let config = sandbox.dir.path().join("plugvisor.yaml");
    std::fs::write(&config, "strict: false\n").expect("write the config");
    let daemon = Daemon::start(&sandbox, &["--config", config.to_str().unwrap()]);
    daemon.wait_ready("echo");
    std::fs::set_permissions(&daemon.control, std::fs::Permissions::from_mode(0o666))
        .expect("chmod the control socket");
    let root = is_root();
    if root {
        let out = ps_as_nobody(&daemon, &cli);
        assert_eq!(out.status.code(), Some(1), "not allowed yet: {out:?}");
    } else {
        plugvisor_integration_tests::skip("running the CLI as another user needs root");
    }

    std::fs::write(&config, "control_uids: [65534]\nlog_format: json\n").expect("write");
    let reload = || -> serde_json::Value {
        serde_json::from_str(&daemon.cli_ok(&["reload", "--json"])).expect("JSON")
    };
    let report = reload();
    assert_eq!(
        report["settings_applied"],
        serde_json::json!(["control_uids"]),
        "{report}"
    );
    assert_eq!(
        report["settings_need_restart"],
        serde_json::json!(["log_format"]),
        "{report}"
    );
    // Applied once; a restart-only setting stays reported until a restart.
    let report = reload();
    assert_eq!(
        report["settings_applied"],
        serde_json::json!([]),
        "{report}"
    );
    assert_eq!(
        report["settings_need_restart"],
        serde_json::json!(["log_format"]),
        "{report}"
    );
    let text = daemon.cli_ok(&["reload"]);
    assert!(
        text.contains("settings changed but not applied until the daemon restarts: log_format"),
        "{text}"
    );
    assert!(
        daemon
            .log_text()
            .contains("changed settings not applied until the daemon restarts: log_format"),
        "{}",
        daemon.log_text()
    );
    if root {
        let out = ps_as_nobody(&daemon, &cli);
        assert!(out.status.success(), "control_uids reloaded: {out:?}");
    }
}

#[test]
fn strict_reload_changes_nothing_when_a_manifest_is_broken() {
    let sandbox = Sandbox::new();
    let echo = bin("echo-plugin");
    sandbox.plugin("echo", &echo, "");
    let config = sandbox.dir.path().join("plugvisor.yaml");
    std::fs::write(&config, "strict: true\n").expect("write the config");
    let daemon = Daemon::start(&sandbox, &["--config", config.to_str().unwrap()]);
    daemon.wait_ready("echo");

    sandbox.plugin("added", &echo, "");
    write_manifest(
        &sandbox,
        "broken",
        "name: broken\nversion: 1.0.0\nexec: ./x\nbogus: 1\n",
    );
    let out = daemon.cli(&["reload"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr.contains("`strict` is set") && stderr.contains("bogus"),
        "{stderr}"
    );
    let names: Vec<_> = daemon.ps().iter().map(|p| p["name"].clone()).collect();
    assert_eq!(names, ["echo"], "nothing was added");

    std::fs::remove_dir_all(sandbox.plugins_dir().join("broken")).expect("rm");
    let report: serde_json::Value =
        serde_json::from_str(&daemon.cli_ok(&["reload", "--json"])).expect("JSON");
    assert_eq!(report["added"], serde_json::json!(["added"]), "{report}");
}

#[test]
fn reload_adds_in_dependency_order_and_removes_dependents_first() {
    let sandbox = Sandbox::new();
    let tp = bin("testplugin");
    // Names whose alphabetical order is the wrong one each time: zweb
    // requires auth (removed: zweb first), app requires zdb (added: zdb
    // first). notify only, so no stop waits for another on its own.
    sandbox.plugin("auth", &tp, "");
    sandbox.plugin("zweb", &tp, "requires: [auth]");
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("auth");
    daemon.wait_ready("zweb");

    sandbox.plugin("app", &tp, "requires: [zdb]");
    sandbox.plugin("zdb", &tp, "");
    let report: serde_json::Value =
        serde_json::from_str(&daemon.cli_ok(&["reload", "--json"])).unwrap();
    assert_eq!(
        report["added"],
        serde_json::json!(["zdb", "app"]),
        "{report}"
    );
    assert_eq!(report["failed"], serde_json::json!([]), "{report}");
    daemon.wait_ready("app");

    for name in ["auth", "zweb"] {
        std::fs::remove_dir_all(sandbox.plugins_dir().join(name)).unwrap();
    }
    let report: serde_json::Value =
        serde_json::from_str(&daemon.cli_ok(&["reload", "--json"])).unwrap();
    assert_eq!(
        report["removed"],
        serde_json::json!(["zweb", "auth"]),
        "{report}"
    );
    // zweb was gone before auth began stopping.
    let log = daemon.log_text();
    let line = |plugin: &str, what: &str| {
        log.lines()
            .position(|l| l.contains(&format!("plugin={plugin}")) && l.contains(what))
            .unwrap_or_else(|| panic!("no `{what}` line of {plugin} in {log}"))
    };
    assert!(
        line("zweb", "state=\"stopped\"") < line("auth", "state=\"stopping\""),
        "{log}"
    );
}
