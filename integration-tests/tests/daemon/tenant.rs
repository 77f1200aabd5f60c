//! Per-tenant instances through the daemon and the CLI: tenants from the
//! supervisor config and from `plugvisor tenant add`, each its own entry
//! `PLUGIN@TENANT` with its own config, limits, state and restart counter;
//! disabling one stops only it; metadata comes from the cache by checksum.

use plugvisor_integration_tests::{Daemon, Sandbox, bin, is_gone, wait_until_blocking};
use std::time::Duration;

fn config_json(daemon: &Daemon, name: &str) -> serde_json::Value {
    serde_json::from_str(&daemon.cli_ok(&["call", name, "config"])).expect("config is JSON")
}

fn pid(daemon: &Daemon, name: &str) -> u64 {
    daemon.plugin(name)["pid"].as_u64().expect("a pid")
}

fn tenants(daemon: &Daemon) -> Vec<serde_json::Value> {
    serde_json::from_str(&daemon.cli_ok(&["tenant", "list", "--json"])).unwrap()
}

fn start(sandbox: &Sandbox) -> Daemon {
    let config = sandbox.dir.path().join("plugvisor.yaml");
    Daemon::start(sandbox, &["--config", config.to_str().unwrap()])
}

#[test]
fn tenants_run_apart_and_disabling_one_stops_only_it() {
    let sandbox = Sandbox::new();
    sandbox.plugin(
        "tp",
        &bin("testplugin"),
        "config: {greeting: base}\nstate: {snapshot_on_change: true}\nrestart: {initial_backoff: 20ms}",
    );
    std::fs::write(
        sandbox.dir.path().join("plugvisor.yaml"),
        "plugins:\n  tp:\n    tenants:\n      acme: {config: {greeting: acme}, limits: {pids: 48}}\n",
    )
    .unwrap();
    let mut daemon = start(&sandbox);
    daemon.wait_ready("tp");
    daemon.wait_ready("tp@acme");

    // Its own config, over the plugin's; its name in its environment.
    assert_eq!(config_json(&daemon, "tp")["greeting"], "base");
    assert_eq!(config_json(&daemon, "tp@acme")["greeting"], "acme");
    let env: serde_json::Value =
        serde_json::from_str(&daemon.cli_ok(&["call", "tp@acme", "env"])).unwrap();
    assert_eq!(env["PLUGVISOR_TENANT"], "acme");
    assert_eq!(env["PLUGVISOR_PLUGIN_NAME"], "tp@acme");

    // A tenant added at runtime shows its binary's methods at once, from
    // the cache filled by acme's instance, before its own is ready.
    let added: Vec<serde_json::Value> = serde_json::from_str(&daemon.cli_ok(&[
        "tenant",
        "add",
        "beta",
        "--plugin",
        "tp",
        "--config",
        "greeting=beta",
        "--limit",
        "memory=64MiB",
        "--json",
    ]))
    .unwrap();
    assert_eq!(added.len(), 1, "{added:?}");
    assert_eq!(added[0]["name"], "tp@beta");
    assert_eq!(added[0]["source"], "runtime");
    assert_ne!(added[0]["state"], "ready", "not ready yet: {added:?}");
    let methods = added[0]["methods"].as_array().unwrap();
    assert!(
        methods.iter().any(|m| m == "incr"),
        "methods known before the instance is ready: {added:?}"
    );
    daemon.wait_ready("tp@beta");
    assert_eq!(config_json(&daemon, "tp@beta")["greeting"], "beta");

    // Limits: its own.
    let limits = daemon.plugin("tp@beta")["isolation"]["limits"].clone();
    assert!(
        limits
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["name"] == "memory" && l["value"] == "64MiB"),
        "{limits}"
    );
    let limits = daemon.plugin("tp@acme")["isolation"]["limits"].clone();
    assert!(
        limits
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["name"] == "pids" && l["value"] == "48"),
        "{limits}"
    );

    // State: each its own.
    daemon.cli_ok(&["call", "tp@acme", "incr", "--data", "3"]);
    daemon.cli_ok(&["call", "tp@beta", "incr", "--data", "7"]);
    assert_eq!(daemon.cli_ok(&["call", "tp", "state"]).trim(), "0");
    assert_eq!(daemon.cli_ok(&["call", "tp@acme", "state"]).trim(), "3");
    assert_eq!(daemon.cli_ok(&["call", "tp@beta", "state"]).trim(), "7");
    let state = sandbox.dir.path().join("state");
    assert!(state.join("tp@acme").is_dir() && state.join("tp@beta").is_dir());

    // Restart counters: each its own.
    let out = daemon.cli(&["call", "tp@acme", "crash"]);
    assert!(!out.status.success());
    wait_until_blocking(Duration::from_secs(15), "acme restarted", || {
        let p = daemon.plugin("tp@acme");
        p["restarts"] == 1 && p["state"] == "ready"
    });
    assert_eq!(daemon.plugin("tp")["restarts"], 0);
    assert_eq!(daemon.plugin("tp@beta")["restarts"], 0);
    assert_eq!(daemon.cli_ok(&["call", "tp@acme", "state"]).trim(), "3");

    // Disabling a tenant stops only its instance.
    let (base, acme, beta) = (
        pid(&daemon, "tp"),
        pid(&daemon, "tp@acme"),
        pid(&daemon, "tp@beta"),
    );
    daemon.cli_ok(&["tenant", "disable", "tp@beta"]);
    assert!(is_gone(beta as i32), "beta's instance stopped");
    assert!(!daemon.ps().iter().any(|p| p["name"] == "tp@beta"));
    assert_eq!(pid(&daemon, "tp"), base, "the plugin runs on");
    assert_eq!(pid(&daemon, "tp@acme"), acme, "the other tenant runs on");
    let out = daemon.cli(&["call", "tp@beta", "state"]);
    assert!(!out.status.success(), "a disabled tenant takes no call");
    let rows = tenants(&daemon);
    let row = rows.iter().find(|t| t["name"] == "tp@beta").unwrap();
    assert_eq!(row["enabled"], false, "{rows:?}");
    assert!(daemon.cli_ok(&["tenant", "list"]).contains("disabled"));

    // A reload keeps every tenant as it is.
    daemon.cli_ok(&["reload"]);
    assert_eq!(pid(&daemon, "tp@acme"), acme);
    assert!(!daemon.ps().iter().any(|p| p["name"] == "tp@beta"));

    // Enabled again, it restores its own state.
    daemon.cli_ok(&["tenant", "enable", "beta", "--plugin", "tp"]);
    daemon.wait_ready("tp@beta");
    assert_eq!(daemon.cli_ok(&["call", "tp@beta", "state"]).trim(), "7");
    assert_eq!(pid(&daemon, "tp@acme"), acme);

    // `restart --upgrade` of a tenant upgrades it from its plugin's
    // directory, handing over its state; the others stay.
    let beta_before = pid(&daemon, "tp@beta");
    daemon.cli_ok(&["restart", "tp@acme", "--upgrade"]);
    let upgraded = daemon.wait_ready("tp@acme");
    assert_ne!(upgraded["pid"].as_u64().unwrap(), acme, "a new instance");
    assert_eq!(daemon.cli_ok(&["call", "tp@acme", "state"]).trim(), "3");
    assert_eq!(pid(&daemon, "tp@beta"), beta_before);
    assert_eq!(pid(&daemon, "tp"), base);

    // A config tenant is removed in the config; a runtime one by `remove`.
    let out = daemon.cli(&["tenant", "remove", "tp@acme"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("declared in the supervisor config"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Runtime tenants outlive a restart of the daemon.
    daemon.stop_with(libc::SIGTERM);
    let daemon = start(&sandbox);
    daemon.wait_ready("tp@beta");
    assert_eq!(daemon.cli_ok(&["call", "tp@beta", "state"]).trim(), "7");
    let beta = pid(&daemon, "tp@beta");
    daemon.cli_ok(&["tenant", "remove", "tp@beta"]);
    assert!(is_gone(beta as i32));
    assert!(!tenants(&daemon).iter().any(|t| t["name"] == "tp@beta"));
}

#[test]
fn bad_tenants_are_refused_with_what_was_wrong() {
    let sandbox = Sandbox::new();
    sandbox.plugin("tp", &bin("testplugin"), "");
    std::fs::write(sandbox.dir.path().join("plugvisor.yaml"), "").unwrap();
    let daemon = start(&sandbox);
    daemon.wait_ready("tp");
    for (args, says) in [
        (
            vec!["tenant", "add", "../etc", "--plugin", "tp"],
            "not a valid tenant name",
        ),
        (
            vec!["tenant", "add", "Acme", "--plugin", "tp"],
            "not a valid tenant name",
        ),
        (vec!["tenant", "add", "x", "--plugin", "nope"], "nope"),
        (
            vec![
                "tenant",
                "add",
                "x",
                "--plugin",
                "tp",
                "--limit",
                "memory=lots",
            ],
            "limits",
        ),
        (
            vec![
                "tenant",
                "add",
                "x",
                "--plugin",
                "tp",
                "--env",
                "PLUGVISOR_TENANT=y",
            ],
            "set by the supervisor",
        ),
        (
            vec!["tenant", "disable", "ghost", "--plugin", "tp"],
            "ghost",
        ),
    ] {
        let out = daemon.cli(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(says),
            "{args:?}: `{stderr}` should say `{says}`"
        );
    }
    // Nothing half-made is left behind.
    assert!(daemon.cli_ok(&["tenant", "list", "--json"]).trim() == "[]");
    assert_eq!(daemon.ps().len(), 1);

    // A bad tenant in the config is refused by `check`, naming it.
    std::fs::write(
        sandbox.dir.path().join("plugvisor.yaml"),
        "plugins:\n  tp:\n    tenants:\n      a/b: {}\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin("plugvisor"))
        .args(["check", "--config"])
        .arg(sandbox.dir.path().join("plugvisor.yaml"))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("plugins.tp.tenants.a/b") && text.contains("not a valid tenant name"),
        "{text}"
    );
}

#[test]
fn a_tenant_whose_metadata_differs_from_its_binarys_is_refused() {
    let sandbox = Sandbox::new();
    sandbox.plugin("tp", &bin("testplugin"), "");
    std::fs::write(
        sandbox.dir.path().join("plugvisor.yaml"),
        "plugins:\n  tp:\n    tenants:\n      acme: {}\n",
    )
    .unwrap();
    let daemon = start(&sandbox);
    daemon.wait_ready("tp@acme");
    // Same binary and arguments, but this tenant's environment makes it
    // list another method: its metadata is not the binary's.
    daemon.cli_ok(&[
        "tenant",
        "add",
        "odd",
        "--plugin",
        "tp",
        "--env",
        "TESTPLUGIN_PHANTOM_METHOD=1",
    ]);
    let mut last = serde_json::Value::Null;
    wait_until_blocking(Duration::from_secs(15), "odd refused", || {
        last = daemon.plugin("tp@odd");
        last["state"] == "failed"
    });
    let reason = last["reason"].as_str().unwrap();
    assert!(
        reason.contains("differs from the metadata cached for the same binary")
            && reason.contains("phantom"),
        "{reason}"
    );
    assert_eq!(daemon.plugin("tp@acme")["state"], "ready");
}
