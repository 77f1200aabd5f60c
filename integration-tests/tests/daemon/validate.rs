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
