//! `plugvisor config` asks the running plugin to validate a new config
//! first: a refused config is not rolled out, and the operator sees the
//! plugin's reason.

use plugvisor_integration_tests::{Daemon, Sandbox, bin};

/// The instance pid `ps` shows (replica 0's).
fn pids(daemon: &Daemon, name: &str) -> Vec<i64> {
    daemon.plugin(name)["pid"].as_i64().into_iter().collect()
}

#[test]
fn a_config_the_plugin_refuses_is_not_rolled_out_and_its_reason_is_shown() {
    let sandbox = Sandbox::new();
    sandbox.plugin(
        "tp",
        &bin("testplugin"),
        "replicas: 2\nconfig: {mode: calm}\nupgrade: {probation: 50ms}",
    );
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("tp");
    let before = pids(&daemon, "tp");
    assert!(!before.is_empty());

    let out = daemon.cli(&["config", "tp", "mode=wild", "refuse=\"no wild mode here\""]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr.contains("`tp` refused the new config"), "{stderr}");
    assert!(
        stderr.contains("`refuse` is set: \"no wild mode here\""),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was changed"), "{stderr}");
    // Nothing changed: same processes, same config, nothing in the runtime
    // overrides.
    assert_eq!(pids(&daemon, "tp"), before);
    let shown: serde_json::Value =
        serde_json::from_str(&daemon.cli_ok(&["config", "tp"])).expect("config is JSON");
    assert_eq!(shown["mode"], "calm", "{shown}");
    assert!(shown.get("refuse").is_none(), "{shown}");
    let seen: serde_json::Value =
        serde_json::from_str(&daemon.cli_ok(&["call", "tp", "config"])).expect("JSON");
    assert_eq!(seen["mode"], "calm", "{seen}");

    // One it accepts is rolled out.
    daemon.cli_ok(&["config", "tp", "mode=wild"]);
    let seen: serde_json::Value =
        serde_json::from_str(&daemon.cli_ok(&["call", "tp", "config"])).expect("JSON");
    assert_eq!(seen["mode"], "wild", "{seen}");
}

/// The config `call tp config` shows, from whichever replica answers.
fn running_config(daemon: &Daemon) -> serde_json::Value {
    serde_json::from_str(&daemon.cli_ok(&["call", "tp", "config"])).expect("config is JSON")
}

#[test]
fn config_changes_through_reload_and_upgrade_are_validated_all_or_nothing() {
    let sandbox = Sandbox::new();
    let manifest = |version: &str, config: &str| {
        let path = sandbox.plugin(
            "tp",
            &bin("testplugin"),
            &format!("replicas: 2\nconfig: {config}\nupgrade: {{probation: 50ms}}"),
        );
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            text.replace("version: 1.0.0", &format!("version: {version}")),
        )
        .unwrap();
    };
    manifest("1.0.0", "{mode: calm}");
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("tp");
    let before = pids(&daemon, "tp");

    // Same version, new config: the running plugin is asked first.
    manifest("1.0.0", "{mode: wild, refuse: reloads are checked too}");
    let out = daemon.cli(&["reload"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stdout.contains("failed:    tp: `tp` refused the new config")
            && stdout.contains("`refuse` is set: \"reloads are checked too\"")
            && stdout.contains("nothing was changed"),
        "{stdout}"
    );
    let out = daemon.cli(&["restart", "tp", "--upgrade"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("`tp` refused the new config"),
        "{out:?}"
    );
    assert_eq!(pids(&daemon, "tp"), before, "a refused change restarted tp");
    assert_eq!(running_config(&daemon)["mode"], "calm");

    // A new version with a new config: the new version is asked before it
    // takes calls, and its refusal rolls the upgrade back.
    manifest("2.0.0", "{mode: wild, refuse: not in 2.0 either}");
    let out = daemon.cli(&["reload"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stdout.contains(
            "the new instance refused the new config: `refuse` is set: \"not in 2.0 either\""
        ) && stdout.contains("run 1.0.0 again"),
        "{stdout}"
    );
    assert_eq!(
        pids(&daemon, "tp"),
        before,
        "a refused upgrade left tp changed"
    );
    assert_eq!(running_config(&daemon)["mode"], "calm");
    assert_eq!(daemon.plugin("tp")["version"], "1.0.0");

    // What the plugin accepts is rolled out.
    manifest("1.0.0", "{mode: wild}");
    daemon.cli_ok(&["reload"]);
    for _ in 0..4 {
        assert_eq!(running_config(&daemon)["mode"], "wild");
    }
}
