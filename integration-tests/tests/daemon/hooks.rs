//! Lifecycle hooks through the daemon: real hook scripts run at pre-start,
//! post-ready, pre-stop and post-exit with the plugin's environment; a
//! failing or hanging pre-start hook fails the start with its output in the
//! event.

use plugvisor_integration_tests::{Daemon, Sandbox, bin, is_gone, wait_until_blocking};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const SECS_10: Duration = Duration::from_secs(10);

/// Writes an executable shell script `name` into `dir`.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A directory any uid may write in (hooks run as the plugin's user).
fn shared_dir(sandbox: &Sandbox) -> PathBuf {
    let dir = sandbox.dir.path().join("shared");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    dir
}

fn events(daemon: &Daemon, name: &str) -> Vec<serde_json::Value> {
    daemon
        .cli_ok(&["events", name, "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).expect("an event is JSON"))
        .collect()
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn hooks_run_at_each_point_of_the_life_with_the_plugins_environment() {
    let sandbox = Sandbox::new();
    let shared = shared_dir(&sandbox);
    let record = shared.join("hooks.log");
    let plugin_dir = sandbox.plugins_dir().join("tp");
    script(
        &plugin_dir.join("hooks"),
        "record.sh",
        &format!(
            "echo \"$PLUGVISOR_HOOK $PLUGVISOR_PLUGIN_NAME $PLUGVISOR_REPLICA $PLUGVISOR_INSTANCE_ID uid=$(id -u) greeting=$GREETING pid=$PLUGVISOR_PLUGIN_PID kind=$PLUGVISOR_EXIT_KIND socket=$PLUGVISOR_PLUGIN_SOCKET arg=$1\" >> {}\necho \"hook $PLUGVISOR_HOOK said hello\"",
            record.display()
        ),
    );
    sandbox.plugin(
        "tp",
        &bin("testplugin"),
        "env: {GREETING: hi}\n\
         restart: {initial_backoff: 20ms, jitter: 0.0}\n\
         hooks:\n  \
           pre_start: {command: [./hooks/record.sh, one], timeout: 5s}\n  \
           post_ready: {command: [./hooks/record.sh, two]}\n  \
           pre_stop: {command: [./hooks/record.sh, three]}\n  \
           post_exit: {command: [./hooks/record.sh, four]}",
    );
    let daemon = Daemon::start(&sandbox, &[]);
    let row = daemon.wait_ready("tp");
    let first_pid = row["pid"].as_i64().expect("a pid");
    wait_until_blocking(SECS_10, "pre_start and post_ready", || {
        lines(&record).len() >= 2
    });
    let uid = daemon.cli_ok(&["call", "tp", "identity"]);
    let identity: serde_json::Value = serde_json::from_str(&uid).expect("identity is JSON");
    let plugin_uid = identity["uid"][0].as_str().expect("a uid").to_string();

    // A crash: post_exit with the reason, then the next start's hooks.
    let out = daemon.cli(&["call", "tp", "crash", "--data", "7"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    wait_until_blocking(SECS_10, "tp to restart", || {
        let row = daemon.plugin("tp");
        row["state"] == "ready" && row["pid"].as_i64() != Some(first_pid)
    });
    wait_until_blocking(SECS_10, "the second start's hooks", || {
        lines(&record).len() >= 5
    });
    daemon.cli_ok(&["stop", "tp"]);
    wait_until_blocking(SECS_10, "pre_stop and post_exit", || {
        lines(&record).len() >= 7
    });
    let got = lines(&record);
    let fields =
        |i: usize| -> Vec<String> { got[i].split(' ').map(str::to_string).collect::<Vec<_>>() };
    let hooks: Vec<String> = (0..got.len()).map(|i| fields(i)[0].clone()).collect();
    assert_eq!(
        hooks,
        [
            "pre_start",
            "post_ready",
            "post_exit",
            "pre_start",
            "post_ready",
            "pre_stop",
            "post_exit"
        ],
        "{got:#?}"
    );
    for (i, line) in got.iter().enumerate() {
        let f = fields(i);
        assert_eq!(f[1], "tp", "{line}");
        assert_eq!(f[2], "0", "{line}");
        // The plugin's environment and user, not its socket.
        assert!(
            line.contains(&format!("uid={plugin_uid} ")),
            "{line} vs {plugin_uid}"
        );
        assert!(line.contains("greeting=hi "), "{line}");
        assert!(line.contains("socket= "), "{line}");
    }
    // Instance ids: the first start, then the second.
    assert!(
        got[0].contains(" tp-0-1 ") && got[2].contains(" tp-0-1 "),
        "{got:#?}"
    );
    assert!(
        got[3].contains(" tp-0-2 ") && got[6].contains(" tp-0-2 "),
        "{got:#?}"
    );
    assert!(
        got[0].ends_with("arg=one") && got[1].ends_with("arg=two"),
        "{got:#?}"
    );
    assert!(got[1].contains(&format!("pid={first_pid} ")), "{got:#?}");
    assert!(got[2].contains("kind=exit "), "{}", got[2]);
    assert!(got[5].ends_with("arg=three"), "{}", got[5]);
    assert!(
        got[6].contains("kind=exit ") || got[6].contains("kind=signal "),
        "{}",
        got[6]
    );
    // Their output is in the plugin's log, under the hook's name.
    let logs = daemon.cli_ok(&["logs", "tp"]);
    assert!(logs.contains("hook post_ready said hello"), "{logs}");
}

#[test]
fn a_failing_pre_start_hook_fails_the_start_with_its_output() {
    let sandbox = Sandbox::new();
    let plugin_dir = sandbox.plugins_dir().join("tp");
    script(
        &plugin_dir,
        "check.sh",
        "echo \"checking the database\"\necho \"database unreachable: connection refused\" >&2\nexit 3",
    );
    sandbox.plugin(
        "tp",
        &bin("testplugin"),
        "restart: {initial_backoff: 20ms, max_backoff: 40ms, jitter: 0.0, max_restarts: 2, window: 60s}\n\
         hooks: {pre_start: {command: [./check.sh]}}",
    );
    let daemon = Daemon::start(&sandbox, &[]);
    wait_until_blocking(SECS_10, "tp to give up", || {
        daemon.plugin("tp")["state"] == "failed"
    });
    let row = daemon.plugin("tp");
    // The plugin itself never ran.
    assert!(row["pid"].is_null(), "{row}");
    let all = events(&daemon, "tp");
    let backoff = all
        .iter()
        .find(|e| e["state"] == "backoff")
        .unwrap_or_else(|| panic!("no backoff event: {all:#?}"));
    let reason = backoff["reason"].as_str().unwrap();
    assert!(
        reason.contains("pre_start hook `./check.sh` exited with code 3"),
        "{reason}"
    );
    assert!(
        reason.contains("database unreachable: connection refused"),
        "{reason}"
    );
    assert!(reason.contains("checking the database"), "{reason}");
    assert_eq!(backoff["exit"]["kind"], "hook", "{backoff}");
    // It counted toward the restart policy like any failed start.
    let failed = all.iter().rfind(|e| e["state"] == "failed").unwrap();
    assert!(
        failed["reason"].as_str().unwrap().contains("giving up"),
        "{failed}"
    );
    // And the output is in the plugin's log, under the hook's name.
    let logs = daemon.cli_ok(&["logs", "tp"]);
    assert!(logs.contains("database unreachable"), "{logs}");
}

#[test]
fn a_hanging_pre_start_hook_is_killed_with_its_process_group_at_its_timeout() {
    let sandbox = Sandbox::new();
    let shared = shared_dir(&sandbox);
    let pidfile = shared.join("sleeper.pid");
    let plugin_dir = sandbox.plugins_dir().join("tp");
    script(
        &plugin_dir,
        "hang.sh",
        &format!(
            "sleep 300 &\necho $! > {}\necho waiting forever\nwait",
            pidfile.display()
        ),
    );
    sandbox.plugin(
        "tp",
        &bin("testplugin"),
        "restart: {policy: never}\nhooks: {pre_start: {command: [./hang.sh], timeout: 300ms}}",
    );
    let daemon = Daemon::start(&sandbox, &[]);
    wait_until_blocking(SECS_10, "tp to stop after the failed start", || {
        daemon.plugin("tp")["state"] == "stopped"
    });
    let all = events(&daemon, "tp");
    let stopped = all.iter().rfind(|e| e["state"] == "stopped").unwrap();
    let reason = stopped["reason"].as_str().unwrap();
    assert!(
        reason.contains("did not finish within its timeout of 300ms and was killed"),
        "{reason}"
    );
    assert!(reason.contains("waiting forever"), "{reason}");
    // The background sleep went with the hook's process group.
    let sleeper: i32 = std::fs::read_to_string(&pidfile)
        .expect("the hook wrote its sleeper's pid")
        .trim()
        .parse()
        .unwrap();
    wait_until_blocking(SECS_10, "the hook's background sleep to die", || {
        is_gone(sleeper)
    });
}

#[test]
fn a_failing_post_ready_hook_restarts_the_instance() {
    let sandbox = Sandbox::new();
    let shared = shared_dir(&sandbox);
    let marker = shared.join("ran-once");
    let plugin_dir = sandbox.plugins_dir().join("tp");
    // Fails the first time, succeeds from then on.
    script(
        &plugin_dir,
        "register.sh",
        &format!(
            "if [ -e {m} ]; then exit 0; fi\ntouch {m}\necho \"load balancer said no\"\nexit 1",
            m = marker.display()
        ),
    );
    sandbox.plugin(
        "tp",
        &bin("testplugin"),
        "restart: {initial_backoff: 20ms, jitter: 0.0}\nhooks: {post_ready: {command: [./register.sh]}}",
    );
    let daemon = Daemon::start(&sandbox, &[]);
    wait_until_blocking(SECS_10, "tp ready after one restart", || {
        let row = daemon.plugin("tp");
        row["state"] == "ready" && row["restarts"] == 1
    });
    let all = events(&daemon, "tp");
    let backoff = all.iter().find(|e| e["state"] == "backoff").unwrap();
    let reason = backoff["reason"].as_str().unwrap();
    assert!(
        reason.contains("post_ready hook `./register.sh` exited with code 1"),
        "{reason}"
    );
    assert!(reason.contains("load balancer said no"), "{reason}");
}

#[test]
fn no_call_reaches_an_instance_before_its_post_ready_hook_ends() {
    let sandbox = Sandbox::new();
    let shared = shared_dir(&sandbox);
    let (started, done) = (shared.join("started"), shared.join("done"));
    let plugin_dir = sandbox.plugins_dir().join("tp");
    script(
        &plugin_dir,
        "register.sh",
        &format!(
            "touch {}\nsleep 2\ntouch {}",
            started.display(),
            done.display()
        ),
    );
    sandbox.plugin(
        "tp",
        &bin("testplugin"),
        "hooks: {post_ready: {command: [./register.sh], timeout: 10s}}",
    );
    let daemon = Daemon::start(&sandbox, &[]);
    wait_until_blocking(SECS_10, "the post_ready hook to start", || started.exists());
    // Initialized, its hook running: not ready, not routed.
    let row = daemon.plugin("tp");
    assert!(!done.exists(), "the hook ended too soon for this test");
    assert_eq!(row["state"], "initializing", "{row}");
    assert!(
        row["reason"]
            .as_str()
            .is_some_and(|r| r.contains("running its post_ready hook")),
        "{row}"
    );
    // A call now waits for the hook, then reaches the instance.
    let out = daemon.cli(&["call", "tp", "echo", "--data", "after", "--timeout", "10s"]);
    assert!(done.exists(), "a call was answered before post_ready ended");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "after");
    let all = events(&daemon, "tp");
    let ready = all.iter().position(|e| e["state"] == "ready");
    assert!(ready.is_some(), "{all:#?}");
}

#[test]
fn check_names_the_hook_field_that_is_wrong() {
    let sandbox = Sandbox::new();
    sandbox.plugin(
        "tp",
        &bin("testplugin"),
        "hooks: {pre_start: {command: [], timeout: 5s}}",
    );
    sandbox.plugin(
        "tq",
        &bin("testplugin"),
        "hooks: {post_exit: {command: [./x], timout: 5s}}",
    );
    let out = std::process::Command::new(bin("plugvisor"))
        .args(["check", "--plugins-dir"])
        .arg(sandbox.plugins_dir())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("field `hooks.pre_start.command`: must name a program"),
        "{text}"
    );
    assert!(
        text.contains("hooks.post_exit") && text.contains("unknown field `timout`"),
        "{text}"
    );
}
