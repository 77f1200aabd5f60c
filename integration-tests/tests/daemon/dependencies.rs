//! `requires:` through the daemon and CLI: start order, what `ps --json`
//! and `inspect` show, and a missing requirement or a cycle reported by
//! `check` and at start, naming both ends, without stopping the others.

use plugvisor_integration_tests::{Daemon, Sandbox, bin};
use std::process::Command;

#[test]
fn the_daemon_orders_plugins_by_requires_and_reports_broken_ones_naming_both_ends() {
    let sandbox = Sandbox::new();
    let tp = bin("testplugin");
    sandbox.plugin("kv", &tp, "args: [--init-sleep-ms, '200']");
    sandbox.plugin(
        "api",
        &tp,
        "requires: [{name: kv, version: '^1', on_crash: restart}]",
    );
    sandbox.plugin("web", &tp, "requires: [ghost]");
    sandbox.plugin("a", &tp, "requires: [b]");
    sandbox.plugin("b", &tp, "requires: [a]");

    let check = Command::new(bin("plugvisor"))
        .args(["check", "--plugins-dir"])
        .arg(sandbox.plugins_dir())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{report}");
    assert!(
        report.contains("web requires ghost, which is not among the loaded plugins"),
        "{report}"
    );
    assert!(report.contains("cycle: a → b → a"), "{report}");

    let daemon = Daemon::start(&sandbox, &[]);
    let api = daemon.wait_ready("api");
    assert_eq!(api["requires"][0]["name"], "kv", "{api}");
    assert_eq!(api["requires"][0]["version"], "^1", "{api}");
    assert_eq!(api["requires"][0]["on_crash"], "restart", "{api}");
    daemon.wait_ready("kv");
    let inspect = daemon.cli_ok(&["inspect", "api"]);
    assert!(
        inspect.contains("requires:   kv ^1 (on crash: restart)"),
        "{inspect}"
    );
    // api waited for kv, which was slow to initialize.
    let events = daemon.cli_ok(&["events", "--json"]);
    let lines: Vec<serde_json::Value> = events
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // History is per plugin; compare event times (kv takes 200 ms to
    // initialize, so they are well apart).
    let at = |plugin: &str, state: &str| {
        lines
            .iter()
            .find(|e| e["plugin"] == plugin && e["state"] == state)
            .and_then(|e| e["time_ms"].as_u64())
            .unwrap_or_else(|| panic!("no {state} event of {plugin}: {events}"))
    };
    assert!(at("api", "waiting") < at("kv", "ready"), "{events}");
    assert!(at("api", "starting") >= at("kv", "ready"), "{events}");
    let names: Vec<String> = daemon
        .ps()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["api", "kv"], "broken plugins are left out");
    let log = daemon.log_text();
    assert!(
        log.contains("web requires ghost") && log.contains("requirements form a cycle: a → b → a"),
        "{log}"
    );
}
