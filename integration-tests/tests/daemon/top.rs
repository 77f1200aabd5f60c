//! `plugvisor top` used as an SRE would: in a real terminal (tmux) against
//! a live daemon whose plugin crashes, reading what the screen shows after
//! each key; and piped, where it prints one plain snapshot.

use crate::support::tmux::{SCREEN_TIMEOUT, Tmux, row};
use plugvisor_integration_tests::{Daemon, Sandbox, bin, wait_until_blocking};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// `tp` gives up (goes `failed`) on its second crash within a minute.
fn sandbox() -> Sandbox {
    let sandbox = Sandbox::new();
    sandbox.plugin("echo", &bin("echo-plugin"), "");
    sandbox.plugin(
        "tp",
        &bin("testplugin"),
        "restart: {initial_backoff: 10ms, max_restarts: 1, window: 60s}",
    );
    sandbox
}

#[test]
fn top_shows_live_rows_and_steers_a_crashing_plugin() {
    let sandbox = sandbox();
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("echo");
    let first_pid = daemon.wait_ready("tp")["pid"].as_i64().unwrap();
    let command = format!(
        "{} --control {} top --interval 300ms",
        bin("plugvisor").display(),
        daemon.control.display()
    );
    let Some(tmux) = Tmux::start(sandbox.dir.path(), &command) else {
        return;
    };

    // One row per plugin, with its state and pid.
    let screen = tmux.wait_for("both plugins listed as ready", |s| {
        row(s, "echo").is_some_and(|r| r[1] == "ready")
            && row(s, "tp").is_some_and(|r| r[1] == "ready" && r[2] == first_pid.to_string())
    });
    assert!(screen.contains("2/2 plugins"), "{screen}");
    assert!(
        screen.contains("CALLS/S") && screen.contains("P99"),
        "{screen}"
    );

    // Calls show up as a rate and a latency while they go on.
    let calling = Arc::new(AtomicBool::new(true));
    let caller = std::thread::spawn({
        let (calling, control) = (calling.clone(), daemon.control.clone());
        move || {
            while calling.load(Ordering::Relaxed) {
                let _ = std::process::Command::new(bin("plugvisor"))
                    .arg("--control")
                    .arg(&control)
                    .args(["call", "echo", "upper", "--data", "x"])
                    .output();
            }
        }
    });
    tmux.wait_for("echo's calls/s and p50", |s| {
        row(s, "echo")
            .is_some_and(|r| r[7].parse::<f64>().is_ok_and(|rate| rate > 0.0) && r[9] != "-")
    });
    calling.store(false, Ordering::Relaxed);
    caller.join().unwrap();

    // A crash: the restart count goes up, the row is marked, the pid moves.
    // The mark lasts a few seconds from when top sees the restart, and the
    // new instance may take longer than that to be ready on a busy host:
    // wait for each on its own.
    let out = daemon.cli(&["call", "tp", "crash"]);
    assert_eq!(out.status.code(), Some(1));
    tmux.wait_for("tp restarted once, marked", |s| {
        row(s, "tp").is_some_and(|r| r[4] == "1") && s.lines().any(|l| l.starts_with("! tp"))
    });
    let screen = tmux.wait_for("tp ready again", |s| {
        row(s, "tp").is_some_and(|r| r[1] == "ready" && r[4] == "1")
    });
    assert!(
        !row(&screen, "tp")
            .unwrap()
            .contains(&first_pid.to_string().as_str()),
        "{screen}"
    );

    // Sorting by RESTARTS (key 5, largest first) puts tp on top.
    tmux.keys(&["5"]);
    // Header and rows of one and the same frame.
    tmux.wait_for("sorted by restarts, tp first", |s| {
        s.contains("sort RESTARTS ▼") && s.lines().nth(2).is_some_and(|l| l.contains("tp"))
    });

    // The filter keeps matching rows only.
    tmux.keys(&["/"]);
    tmux.type_text("echo");
    tmux.keys(&["Enter"]);
    tmux.wait_for("only echo", |s| {
        s.contains("filter `echo`")
            && s.contains("1/2 plugins")
            && row(s, "echo").is_some()
            && row(s, "tp").is_none()
    });
    tmux.keys(&["Escape"]);
    tmux.wait_for("the filter cleared", |s| s.contains("2/2 plugins"));

    // The detail pane of the selected plugin (tp, first row): its events
    // (the crash's backoff) and its log lines (what it said when crashing).
    tmux.keys(&["Home", "Enter"]);
    tmux.wait_for("tp's events and logs", |s| {
        s.contains("tp: events")
            && s.contains("tp: logs")
            && s.contains("backoff")
            && s.contains("crashing with exit code")
    });

    // Restart asks first; `n` cancels, `y` does it.
    tmux.keys(&["r"]);
    tmux.wait_for("the confirmation", |s| s.contains("Restart tp? [y/N]"));
    tmux.keys(&["n"]);
    tmux.wait_for("cancelled", |s| s.contains("cancelled: restart tp"));
    let before = daemon.plugin("tp")["pid"].to_string();
    tmux.keys(&["r"]);
    tmux.wait_for("the confirmation again", |s| {
        s.contains("Restart tp? [y/N]")
    });
    tmux.keys(&["y"]);
    tmux.wait_for("the restart done", |s| s.contains("restart tp: done"));
    tmux.wait_for("tp ready with a new pid", |s| {
        row(s, "tp").is_some_and(|r| r[1] == "ready" && r[2] != before)
    });

    // Two crashes within the window: tp gives up and shows as failed, in
    // red. The second crash must reach the restarted instance: wait for a
    // ready tp with a new pid (the crashed one may still show as ready
    // until its exit is seen).
    let crashed = daemon.wait_ready("tp")["pid"].as_i64().unwrap();
    let _ = daemon.cli(&["call", "tp", "crash"]);
    let mut restarted = 0;
    wait_until_blocking(
        SCREEN_TIMEOUT,
        "tp ready again after the first crash",
        || {
            let tp = daemon.plugin("tp");
            restarted = tp["pid"].as_i64().unwrap_or(0);
            tp["state"] == "ready" && restarted != crashed
        },
    );
    tmux.wait_for("tp back after the first crash", |s| {
        row(s, "tp").is_some_and(|r| r[1] == "ready" && r[2] == restarted.to_string())
    });
    let _ = daemon.cli(&["call", "tp", "crash"]);
    tmux.wait_for("tp failed", |s| {
        row(s, "tp").is_some_and(|r| r[1] == "failed")
    });
    let coloured = tmux.screen(true);
    let failed_line = coloured
        .lines()
        .find(|l| l.contains("failed") && l.contains("tp"))
        .unwrap_or_default();
    // tmux writes red as SGR 31 or as palette colour 1.
    assert!(
        failed_line.contains("\x1b[31m") || failed_line.contains("\x1b[38;5;1m"),
        "the failed state is red: {failed_line:?}"
    );

    // q leaves the screen as it was.
    tmux.keys(&["q"]);
    let screen = tmux.wait_for("top exited", |s| s.contains("[exit 0]"));
    assert!(
        !screen.contains("CALLS/S"),
        "the alternate screen is gone:\n{screen}"
    );
}

#[test]
fn top_without_a_terminal_prints_one_plain_snapshot() {
    let sandbox = sandbox();
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("echo");
    daemon.wait_ready("tp");
    daemon.cli_ok(&["call", "echo", "upper", "--data", "x"]);
    let out = daemon.cli_ok(&["top", "--interval", "200ms", "--sort", "name"]);
    assert!(!out.contains('\x1b'), "no escape codes when piped: {out:?}");
    let lines: Vec<_> = out.lines().collect();
    assert_eq!(lines.len(), 3, "a header and one row per plugin:\n{out}");
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("CALLS/S"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("echo") && lines[1].contains("ready"),
        "{out}"
    );
    assert!(lines[2].starts_with("tp"), "{out}");

    let out = daemon.cli_ok(&["top", "--once", "--interval", "200ms", "--filter", "tp"]);
    assert_eq!(out.lines().count(), 2, "{out}");

    let bad = daemon.cli(&["top", "--once", "--sort", "bogus"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not a column"));
}
