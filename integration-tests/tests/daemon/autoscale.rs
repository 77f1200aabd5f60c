//! Autoscaling through the daemon and the CLI: a load step of slow calls
//! scales an autoscaled plugin up (the added replicas restore the shared
//! snapshot), and once the load stops it drains back down to `min`. Each
//! change is an event that quotes the readings and thresholds.

use plugvisor_integration_tests::{Daemon, Sandbox, bin, wait_until_blocking};
use std::process::{Command, Stdio};
use std::time::Duration;

fn scaling(daemon: &Daemon) -> serde_json::Value {
    daemon.plugin("tp")["scaling"].clone()
}

fn events(daemon: &Daemon) -> Vec<serde_json::Value> {
    daemon
        .cli_ok(&["events", "tp", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).expect("an event is JSON"))
        .collect()
}

#[test]
fn follows_a_load_step_up_and_back_down_to_min() {
    let sandbox = Sandbox::new();
    sandbox.plugin(
        "tp",
        &bin("testplugin"),
        "replicas: {min: 1, max: 4, scale_up: {in_flight_per_replica: 2}, scale_down: {in_flight_per_replica: 0.5}, cooldown: 1s, interval: 100ms}\nstate: {snapshot_on_change: true}",
    );
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("tp");
    let before = scaling(&daemon);
    assert_eq!(before["min"], 1, "{before}");
    assert_eq!(before["max"], 4, "{before}");
    assert_eq!(before["current"], 1, "an autoscaled plugin starts at min");
    assert!(
        daemon.cli_ok(&["ps"]).contains("1 (1-4)"),
        "ps shows replicas and bounds"
    );
    // State for the added replicas to restore.
    assert_eq!(
        daemon.cli_ok(&["call", "tp", "incr", "--data", "5"]).trim(),
        "5"
    );

    // The load step: 8 slow calls at once, 4 times the threshold.
    let callers: Vec<_> = (0..8)
        .map(|_| {
            Command::new(bin("plugvisor"))
                .arg("--control")
                .arg(&daemon.control)
                .args(["call", "tp", "sleep", "--data", "4000"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("a caller starts")
        })
        .collect();
    wait_until_blocking(Duration::from_secs(15), "scaled up and ready", || {
        let p = daemon.plugin("tp");
        let ready = p["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["state"] == "ready")
            .count();
        ready > 1
    });
    let up = scaling(&daemon);
    assert!(up["current"].as_u64().unwrap() > 1, "{up}");
    // Replicas being added do not make the plugin look degraded.
    assert_eq!(daemon.plugin("tp")["state"], "ready");
    let reason = up["last_reason"].as_str().unwrap_or_default().to_string();
    assert!(
        reason.contains("call(s) in flight on")
            && reason.contains("reached scale_up.in_flight_per_replica 2"),
        "the reason quotes the readings and the threshold: {reason}"
    );
    // The calls still sleep on replica 0: this one goes to an added
    // replica, which restored the shared snapshot.
    assert_eq!(
        daemon.cli_ok(&["call", "tp", "state"]).trim(),
        "5",
        "the added replica starts from the shared state"
    );
    let inspect = daemon.cli_ok(&["inspect", "tp"]);
    assert!(
        inspect.contains("(autoscaled between 1 and 4)") && inspect.contains("reached scale_up"),
        "{inspect}"
    );

    // Every call of the step completes: nothing was dropped by scaling.
    for caller in callers {
        let out = caller.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "a call failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            daemon.log_text()
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "slept");
    }

    // The load is gone: back to min, one drained replica at a time.
    wait_until_blocking(Duration::from_secs(30), "scaled back down to min", || {
        scaling(&daemon)["current"] == 1
    });
    let p = daemon.plugin("tp");
    assert_eq!(p["replicas"].as_array().unwrap().len(), 1, "{p}");
    assert_eq!(p["state"], "ready", "{p}");
    let down = scaling(&daemon)["last_reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        down.contains("at or below scale_down.in_flight_per_replica 0.5"),
        "{down}"
    );

    let events = events(&daemon);
    let scaled: Vec<_> = events.iter().filter(|e| e["scaled_to"].is_u64()).collect();
    let added = scaled.iter().filter(|e| e["state"] == "starting").count();
    assert!(added >= 1, "an event for each added replica: {scaled:#?}");
    let drains: Vec<_> = scaled.iter().filter(|e| e["state"] == "stopping").collect();
    assert_eq!(
        drains.len(),
        added,
        "each added replica was drained and removed: {scaled:#?}"
    );
    assert!(
        drains
            .iter()
            .all(|e| e["reason"].as_str().unwrap().contains("draining")),
        "{drains:#?}"
    );
    assert!(
        scaled
            .iter()
            .filter(|e| e["state"] == "starting")
            .all(|e| e["reason"]
                .as_str()
                .unwrap()
                .contains("restoring the shared snapshot")),
        "{scaled:#?}"
    );
}

#[test]
fn a_bad_policy_is_refused_by_check_naming_the_field() {
    let sandbox = Sandbox::new();
    let manifest = sandbox.plugin(
        "tp",
        &bin("testplugin"),
        "replicas: {min: 1, max: 4, scale_up: {in_flight_per_replica: 2}, scale_down: {in_flight_per_replica: 3}}",
    );
    let out = Command::new(bin("plugvisor"))
        .args(["check", "--plugins-dir"])
        .arg(sandbox.plugins_dir())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains(&manifest.display().to_string())
            && text.contains("replicas.scale_down.in_flight_per_replica")
            && text.contains("not below scale_up.in_flight_per_replica"),
        "{text}"
    );
}

#[test]
fn scales_on_cpu_read_from_the_cgroup() {
    let sandbox = Sandbox::new();
    sandbox.plugin(
        "tp",
        &bin("testplugin"),
        "replicas: {min: 1, max: 2, scale_up: {cpu_percent: 10}, scale_down: {cpu_percent: 2}, cooldown: 1s, interval: 200ms}",
    );
    let daemon = Daemon::start(&sandbox, &[]);
    let p = daemon.wait_ready("tp");
    let mechanism = p["isolation"]["mechanism"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if !mechanism.starts_with("cgroup") {
        plugvisor_integration_tests::skip(format!(
            "CPU is read from cgroups, and the daemon runs with {mechanism}"
        ));
        return;
    }
    // One thread spinning for 4s: up to one core, far over 10% even on a
    // busy machine.
    let spin = Command::new(bin("plugvisor"))
        .arg("--control")
        .arg(&daemon.control)
        .args(["call", "tp", "spin", "--data", "4000,1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("the caller starts");
    wait_until_blocking(Duration::from_secs(15), "scaled up on CPU", || {
        scaling(&daemon)["current"] == 2
    });
    let reason = scaling(&daemon)["last_reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reason.contains("per ready replica reached scale_up.cpu_percent 10"),
        "{reason}"
    );
    assert!(spin.wait_with_output().unwrap().status.success());
    wait_until_blocking(Duration::from_secs(20), "scaled down when idle", || {
        scaling(&daemon)["current"] == 1
    });
    let reason = scaling(&daemon)["last_reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reason.contains("at or below scale_down.cpu_percent 2"),
        "{reason}"
    );
}
