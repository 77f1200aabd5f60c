//! What the CLI prints for people: `events` and `logs` coloured on a
//! terminal (tmux) and never when piped or with NO_COLOR; `stop` and
//! `restart` printing each step as it happens.

use crate::support::tmux::Tmux;
use plugvisor_integration_tests::{Daemon, Sandbox, bin};

fn crashed_once() -> (Sandbox, Daemon) {
    let sandbox = Sandbox::new();
    sandbox.plugin("tp", &bin("testplugin"), "restart: {initial_backoff: 10ms}");
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("tp");
    let _ = daemon.cli(&["call", "tp", "crash"]);
    plugvisor_integration_tests::wait_until_blocking(
        std::time::Duration::from_secs(10),
        "tp back after its crash",
        || {
            let row = daemon.plugin("tp");
            row["restarts"] == 1 && row["state"] == "ready"
        },
    );
    (sandbox, daemon)
}

fn cli_line(daemon: &Daemon, env: &str, args: &str) -> String {
    format!(
        "env -u NO_COLOR {env} {} --control {} {args}",
        bin("plugvisor").display(),
        daemon.control.display()
    )
}

#[test]
fn events_and_logs_are_coloured_only_on_a_terminal() {
    let (sandbox, daemon) = crashed_once();

    let piped = daemon.cli_ok(&["events", "tp"]);
    assert!(piped.contains("backoff"), "{piped}");
    assert!(!piped.contains('\x1b'), "no colour when piped: {piped:?}");
    let piped = daemon.cli_ok(&["logs", "tp"]);
    assert!(piped.contains("crashing with exit code"), "{piped}");
    assert!(!piped.contains('\x1b'), "no colour when piped: {piped:?}");

    let Some(tmux) = Tmux::start(
        sandbox.dir.path(),
        &format!(
            "{}; {}",
            cli_line(&daemon, "", "events tp"),
            cli_line(&daemon, "", "logs tp")
        ),
    ) else {
        return;
    };
    tmux.wait_for("events and logs printed", |s| {
        s.contains("[exit 0]") && s.contains("crashing with exit code")
    });
    let screen = tmux.screen(true);
    let backoff = screen.lines().find(|l| l.contains("backoff")).unwrap();
    assert!(
        backoff.contains('\x1b'),
        "the state is coloured: {backoff:?}"
    );
    let ready = screen.lines().find(|l| l.contains(" ready ")).unwrap();
    assert!(
        ready.contains("\x1b[32m") || ready.contains("38;5;2m"),
        "ready is green: {ready:?}"
    );
    let stderr_line = screen
        .lines()
        .find(|l| l.contains("crashing with exit code"))
        .unwrap();
    assert!(
        stderr_line.contains('\x1b'),
        "stderr lines stand out: {stderr_line:?}"
    );
    drop(tmux);

    let Some(tmux) = Tmux::start(
        sandbox.dir.path(),
        &cli_line(&daemon, "NO_COLOR=1", "events tp"),
    ) else {
        return;
    };
    tmux.wait_for("events printed", |s| s.contains("[exit 0]"));
    let screen = tmux.screen(true);
    assert!(
        screen
            .lines()
            .filter(|l| l.contains("tp"))
            .all(|l| !l.contains('\x1b')),
        "NO_COLOR is respected:\n{screen:?}"
    );
}

#[test]
fn stop_and_restart_print_each_step_as_it_happens() {
    let (sandbox, daemon) = crashed_once();

    // Piped: steps on stderr, plain; the result alone on stdout.
    let out = daemon.cli(&["stop", "tp"]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stdout.trim(), "tp: stopped (now stopped)");
    let steps: Vec<&str> = stderr.lines().collect();
    assert!(
        steps.iter().any(|l| l.contains("stopping")) && steps.iter().any(|l| l.contains("stopped")),
        "a step per transition:\n{stderr}"
    );
    assert!(
        !steps.iter().any(|l| l.contains("backoff")),
        "no history replayed:\n{stderr}"
    );
    assert!(!stderr.contains('\x1b'), "{stderr:?}");
    daemon.cli_ok(&["start", "tp"]);
    daemon.wait_ready("tp");

    // On a terminal: the same steps, states in colour, result last.
    let Some(tmux) = Tmux::start(sandbox.dir.path(), &cli_line(&daemon, "", "restart tp")) else {
        return;
    };
    let screen = tmux.wait_for("the restart done", |s| s.contains("[exit 0]"));
    let lines: Vec<&str> = screen.lines().filter(|l| !l.trim().is_empty()).collect();
    let at = |what: &str| lines.iter().position(|l| l.contains(what));
    let (Some(stopping), Some(ready), Some(result)) =
        (at(" stopping "), at(" ready "), at("tp: restarted"))
    else {
        panic!("steps and result expected:\n{screen}");
    };
    assert!(stopping < ready && ready < result, "in order:\n{screen}");
    let coloured = tmux.screen(true);
    let ready_line = coloured.lines().find(|l| l.contains(" ready ")).unwrap();
    assert!(ready_line.contains('\x1b'), "{ready_line:?}");
}

#[test]
fn a_streamed_call_shows_its_progress_only_on_a_terminal() {
    let sandbox = Sandbox::new();
    sandbox.plugin("echo", &bin("echo-plugin"), "");
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("echo");
    let input = sandbox.dir.path().join("in.bin");
    std::fs::write(&input, vec![7u8; 24 << 20]).unwrap();
    let output = sandbox.dir.path().join("out.bin");
    let call = format!(
        "call echo echo --stream --data-file {} > {}",
        input.display(),
        output.display()
    );

    // Piped stderr: no progress at all.
    let piped = std::process::Command::new("sh")
        .arg("-c")
        .arg(cli_line(&daemon, "", &call))
        .output()
        .unwrap();
    assert!(piped.status.success(), "{piped:?}");
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(
        !stderr.contains("MiB/s"),
        "no progress when piped: {stderr:?}"
    );
    assert_eq!(std::fs::metadata(&output).unwrap().len(), 24 << 20);

    // On a terminal: bytes each way and the rate, then a last line.
    let Some(tmux) = Tmux::start(sandbox.dir.path(), &cli_line(&daemon, "", &call)) else {
        return;
    };
    let screen = tmux.wait_for("the streamed call's last progress line", |s| {
        s.contains("[exit 0]") && s.contains("done")
    });
    let last = screen.lines().find(|l| l.contains("done")).unwrap();
    assert!(
        last.contains("sent 24.0 MiB, received 24.0 MiB") && last.contains("MiB/s"),
        "{screen}"
    );
}
