//! The real `plugvisor` daemon and CLI, end to end: plugins started from a
//! plugins directory, CLI verbs over the control socket, clean shutdown, and
//! no plugin process outliving the daemon.

use plugvisor_integration_tests::{Daemon, Sandbox, bin, is_gone, wait_until_blocking};
use std::time::Duration;

const SECS_10: Duration = Duration::from_secs(10);

fn sandbox_with_examples() -> Sandbox {
    let sandbox = Sandbox::new();
    sandbox.plugin("echo", &bin("echo-plugin"), "config: {greeting: hello}");
    sandbox.plugin("kv", &bin("kv-plugin"), "");
    sandbox.plugin(
        "tp",
        &bin("testplugin"),
        "args: [--double-fork]\nrestart: {initial_backoff: 20ms}",
    );
    sandbox
}

#[test]
fn call_through_the_daemon_prints_the_reply() {
    let sandbox = sandbox_with_examples();
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("echo");
    assert_eq!(
        daemon.cli_ok(&["call", "echo", "upper", "--data", "hi"]),
        "HI"
    );
    let file = sandbox.dir.path().join("payload");
    std::fs::write(&file, "from a file").unwrap();
    assert_eq!(
        daemon.cli_ok(&[
            "call",
            "echo",
            "echo",
            "--data-file",
            file.to_str().unwrap()
        ]),
        "from a file"
    );
    // kv keeps what it is told.
    daemon.wait_ready("kv");
    daemon.cli_ok(&["call", "kv", "set", "--data", "colour=blue"]);
    assert_eq!(
        daemon.cli_ok(&["call", "kv", "get", "--data", "colour"]),
        "blue"
    );
    let state = daemon.cli_ok(&["state", "export", "kv", "--json"]);
    assert!(state.contains("colour"), "{state}");

    // A plugin's error reaches the CLI, which exits 1.
    let out = daemon.cli(&["call", "kv", "get", "--data", "absent"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NotFound"),
        "{out:?}"
    );
    let out = daemon.cli(&["call", "nosuch", "echo"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no plugin named `nosuch`"),
        "{out:?}"
    );
}

#[test]
fn ps_lists_plugins_as_a_table_and_as_json() {
    let sandbox = sandbox_with_examples();
    let daemon = Daemon::start(&sandbox, &[]);
    for name in ["echo", "kv", "tp"] {
        daemon.wait_ready(name);
    }
    let rows = daemon.ps();
    assert_eq!(rows.len(), 3);
    for row in &rows {
        for key in ["name", "version", "state", "pid", "restarts"] {
            assert!(row.get(key).is_some(), "`{key}` missing in {row}");
        }
        assert_eq!(row["state"], "ready");
        assert!(row["pid"].as_u64().unwrap() > 0);
        assert_eq!(row["restarts"], 0);
    }
    let table = daemon.cli_ok(&["ps"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("echo ") && l.contains("ready")),
        "{table}"
    );
    let inspect = daemon.cli_ok(&["inspect", "echo"]);
    assert!(inspect.contains("state:      ready"), "{inspect}");
    assert!(inspect.contains("upper"), "lists methods: {inspect}");
    let health = daemon.cli_ok(&["health", "echo"]);
    assert!(health.contains("SERVING"), "{health}");
}

#[test]
fn a_killed_plugin_comes_back_and_events_tell_why() {
    let sandbox = sandbox_with_examples();
    let daemon = Daemon::start(&sandbox, &[]);
    let before = daemon.wait_ready("tp");
    let pid = before["pid"].as_i64().unwrap() as i32;
    let grandchild: i32 = daemon
        .cli_ok(&["call", "tp", "grandchild"])
        .parse()
        .unwrap();
    // SAFETY: signals a plugin process of the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_until_blocking(SECS_10, "tp to restart", || {
        let row = daemon.plugin("tp");
        row["state"] == "ready" && row["pid"].as_i64() != Some(pid as i64)
    });
    let row = daemon.plugin("tp");
    assert_eq!(row["restarts"], 1);
    assert_eq!(row["last_exit"], "killed by SIGKILL");
    // What the crashed plugin forked went down with it.
    wait_until_blocking(SECS_10, "the crashed plugin's grandchild to die", || {
        is_gone(grandchild)
    });
    let events = daemon.cli_ok(&["events", "tp", "--json"]);
    assert!(
        events
            .lines()
            .any(|l| l.contains("\"backoff\"") && l.contains("killed by SIGKILL")),
        "{events}"
    );
}

#[test]
fn sigterm_stops_every_plugin_and_its_descendants() {
    let sandbox = sandbox_with_examples();
    let mut daemon = Daemon::start(&sandbox, &[]);
    for name in ["echo", "kv", "tp"] {
        daemon.wait_ready(name);
    }
    let pids: Vec<i32> = daemon
        .ps()
        .iter()
        .map(|r| r["pid"].as_i64().unwrap() as i32)
        .collect();
    let grandchild: i32 = daemon
        .cli_ok(&["call", "tp", "grandchild"])
        .parse()
        .unwrap();
    assert!(!is_gone(grandchild));
    let status = daemon.stop_with(libc::SIGTERM);
    assert!(
        status.success(),
        "the daemon exits 0 on SIGTERM: {status}\n{}",
        daemon.log_text()
    );
    for pid in pids.iter().chain([&grandchild]) {
        wait_until_blocking(SECS_10, &format!("pid {pid} to be gone"), || is_gone(*pid));
    }
    let log = daemon.log_text();
    assert!(
        log.contains("Shutdown requested; draining"),
        "plugins drained: {log}"
    );
    assert!(!daemon.control.exists(), "the control socket is removed");
}

#[test]
fn idle_and_half_sent_control_connections_do_not_keep_the_daemon_alive() {
    use std::io::{Read, Write};
    let sandbox = Sandbox::new();
    sandbox.plugin("echo", &bin("echo-plugin"), "");
    let mut daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("echo");
    let connect = || std::os::unix::net::UnixStream::connect(&daemon.control).expect("connect");
    // Three clients that never send the HTTP/2 preface, one that stops halfway.
    let mut streams: Vec<_> = (0..3).map(|_| connect()).collect();
    let mut half = connect();
    half.write_all(b"PRI * HTTP/2.0\r\n")
        .expect("half a preface");
    streams.push(half);
    // The daemon accepts in order: once a later client is answered, all four
    // are connections the server holds, not sockets waiting in the backlog.
    assert!(daemon.cli_ok(&["ps"]).contains("echo"));

    let status = daemon.stop_with(libc::SIGTERM);
    assert!(
        status.success(),
        "the daemon exits 0 on SIGTERM: {status}\n{}",
        daemon.log_text()
    );
    for mut stream in streams {
        stream
            .set_read_timeout(Some(SECS_10))
            .expect("read timeout");
        let mut rest = Vec::new();
        // The daemon closed it: end of file (after any GOAWAY), or a reset.
        let _ = stream.read_to_end(&mut rest);
    }
    assert!(
        daemon
            .log_text()
            .contains("closing 4 control connection(s)"),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn sigkill_to_the_daemon_takes_its_plugins_down_within_a_second() {
    let sandbox = sandbox_with_examples();
    let mut daemon = Daemon::start(&sandbox, &[]);
    for name in ["echo", "kv", "tp"] {
        daemon.wait_ready(name);
    }
    let pids: Vec<i32> = daemon
        .ps()
        .iter()
        .map(|r| r["pid"].as_i64().unwrap() as i32)
        .collect();
    let grandchild: i32 = daemon
        .cli_ok(&["call", "tp", "grandchild"])
        .parse()
        .unwrap();
    daemon.stop_with(libc::SIGKILL);
    for pid in pids {
        wait_until_blocking(
            Duration::from_secs(1),
            &format!("plugin pid {pid} to die"),
            || is_gone(pid),
        );
    }
    // Without a cgroup nothing can reach a grandchild once the supervisor is
    // SIGKILLed (the isolation tests cover the cgroup case); clean it up.
    // SAFETY: signals a process this test's plugin forked.
    unsafe { libc::kill(grandchild, libc::SIGKILL) };
}

#[test]
fn a_bad_manifest_does_not_stop_the_good_plugins() {
    let sandbox = sandbox_with_examples();
    let bad = sandbox.plugins_dir().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(
        bad.join("plugin.yaml"),
        "name: bad\nversion: 1.0.0\nexec: ./x\nrestart: {policy: sometimes}\n",
    )
    .unwrap();
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("echo");
    assert_eq!(daemon.ps().len(), 3);
    let log = daemon.log_text();
    assert!(
        log.contains("bad/plugin.yaml") && log.contains("sometimes"),
        "{log}"
    );
}

#[test]
fn strict_mode_refuses_to_start_with_a_bad_manifest() {
    let sandbox = sandbox_with_examples();
    std::fs::create_dir_all(sandbox.plugins_dir().join("bad")).unwrap();
    std::fs::write(sandbox.plugins_dir().join("bad/plugin.yaml"), "name: [").unwrap();
    let out = std::process::Command::new(bin("plugvisor"))
        .arg("--control")
        .arg(sandbox.dir.path().join("ctl.sock"))
        .args(["run", "--strict", "--plugins-dir"])
        .arg(sandbox.plugins_dir())
        .arg("--runtime-dir")
        .arg(sandbox.runtime_dir())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("strict"),
        "{out:?}"
    );
}

#[test]
fn check_validates_offline_and_exits_1_on_errors() {
    let sandbox = sandbox_with_examples();
    let run = |dir: &std::path::Path| {
        std::process::Command::new(bin("plugvisor"))
            .args(["check", "--plugins-dir"])
            .arg(dir)
            .output()
            .unwrap()
    };
    let out = run(&sandbox.plugins_dir());
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 plugin(s), 0 error(s)"));
    std::fs::create_dir_all(sandbox.plugins_dir().join("bad")).unwrap();
    std::fs::write(
        sandbox.plugins_dir().join("bad/plugin.yaml"),
        "name: bad\nversion: 1.0\nexec: ./x\n",
    )
    .unwrap();
    let out = run(&sandbox.plugins_dir());
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("bad/plugin.yaml: field `version`"), "{text}");
}

#[test]
fn cli_without_a_daemon_says_where_it_looked() {
    let sandbox = Sandbox::new();
    let socket = sandbox.dir.path().join("nobody.sock");
    let out = std::process::Command::new(bin("plugvisor"))
        .arg("--control")
        .arg(&socket)
        .arg("ps")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(socket.to_str().unwrap()), "{err}");
    assert!(err.contains("plugvisor run"), "{err}");
}

#[test]
fn usage_errors_exit_2() {
    let out = std::process::Command::new(bin("plugvisor"))
        .args(["frobnicate"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = std::process::Command::new(bin("plugvisor"))
        .args(["call"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Zombie children of `pid` (its threads' children in state Z).
fn zombie_children(pid: i32) -> Vec<i32> {
    let mut zombies = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for child in children
            .split_whitespace()
            .filter_map(|c| c.parse::<i32>().ok())
        {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            if stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
            {
                zombies.push(child);
            }
        }
    }
    zombies
}

#[test]
fn no_zombie_after_100_crash_restart_cycles() {
    let sandbox = Sandbox::new();
    // Each start double-forks a grandchild (orphaned to the daemon, the
    // subreaper, when its parent exits) and then exits with code 1.
    sandbox.plugin(
        "crashy",
        &bin("testplugin"),
        "args: [--double-fork, --exit-immediately, \"1\"]\nrestart: {initial_backoff: 1ms, max_backoff: 2ms, jitter: 0.0, max_restarts: 100000, window: 1s}",
    );
    let daemon = Daemon::start(&sandbox, &[]);
    wait_until_blocking(Duration::from_secs(60), "100 restarts", || {
        daemon.plugin("crashy")["restarts"].as_u64().unwrap_or(0) >= 100
    });
    daemon.cli_ok(&["stop", "crashy"]);
    // Everything that exited has been reaped: the daemon has no zombie child
    // once the sweeper has run (it runs on SIGCHLD and every second).
    wait_until_blocking(Duration::from_secs(5), "no zombie children", || {
        zombie_children(daemon.pid()).is_empty()
    });
}

#[test]
fn events_follow_sees_a_crash_as_it_happens() {
    let sandbox = sandbox_with_examples();
    let daemon = Daemon::start(&sandbox, &[]);
    let pid = daemon.wait_ready("tp")["pid"].as_i64().unwrap() as i32;
    let mut follower = std::process::Command::new(bin("plugvisor"))
        .arg("--control")
        .arg(&daemon.control)
        .args(["events", "tp", "-f", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The past comes first: the follower is attached once `ready` shows.
    let deadline = std::time::Instant::now() + SECS_10;
    loop {
        let line = rx
            .recv_timeout(deadline - std::time::Instant::now())
            .expect("history arrives");
        if line.contains("\"ready\"") {
            break;
        }
    }
    // SAFETY: signals a plugin process of the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + SECS_10;
    let seen = loop {
        let line = rx
            .recv_timeout(deadline - std::time::Instant::now())
            .expect("the crash is streamed");
        if line.contains("\"backoff\"") {
            break line;
        }
    };
    assert!(seen.contains("killed by SIGKILL"), "{seen}");
    let _ = follower.kill();
    let _ = follower.wait();
    reader.join().unwrap();
}

/// The Python example's launcher, when its virtualenv exists.
fn python_echo() -> Option<std::path::PathBuf> {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()?
        .to_path_buf();
    let launcher = repo.join("examples/python-echo/python-echo");
    if !repo.join(".venv/bin/python3").exists() {
        plugvisor_integration_tests::skip(
            "the Python virtualenv is missing (run scripts/setup-python.sh)",
        );
        return None;
    }
    Some(launcher)
}

#[test]
fn the_python_plugin_runs_beside_the_rust_ones_and_comes_back_after_a_kill() {
    let Some(launcher) = python_echo() else {
        return;
    };
    let sandbox = sandbox_with_examples();
    sandbox.plugin(
        "python-echo",
        &launcher,
        "timeouts: {start: 20s}\nrestart: {initial_backoff: 20ms}",
    );
    let daemon = Daemon::start(&sandbox, &[]);
    let row = daemon.wait_ready("python-echo");
    daemon.wait_ready("echo");
    assert_eq!(
        daemon.cli_ok(&["call", "python-echo", "upper", "--data", "from python"]),
        "FROM PYTHON"
    );
    assert_eq!(
        daemon.cli_ok(&["call", "echo", "upper", "--data", "from rust"]),
        "FROM RUST"
    );
    let out = daemon.cli(&["call", "python-echo", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Unimplemented"),
        "{out:?}"
    );
    let pid = row["pid"].as_i64().unwrap() as i32;
    // SAFETY: signals a plugin process of the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_until_blocking(Duration::from_secs(30), "python-echo to restart", || {
        let row = daemon.plugin("python-echo");
        row["state"] == "ready" && row["pid"].as_i64() != Some(pid as i64)
    });
    assert_eq!(
        daemon.cli_ok(&["call", "python-echo", "echo", "--data", "again"]),
        "again"
    );
    assert_eq!(
        daemon.plugin("python-echo")["last_exit"],
        "killed by SIGKILL"
    );
    // Its stderr lines are captured with the plugin's name.
    let logs = daemon.cli_ok(&["logs", "python-echo", "--tail", "50"]);
    assert!(!logs.is_empty(), "the python plugin's output is captured");
}

/// Uploads `chunks` to the test plugin's `count` through `Control.CallStream`,
/// marking the last chunk `end_of_input` only when `complete`.
fn upload(daemon: &Daemon, chunks: usize, complete: bool) -> Result<Vec<u8>, tonic::Status> {
    use plugvisor_proto as pb;
    use tokio_stream::StreamExt;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = plugvisor_cli::control::connect(&daemon.control)
            .await
            .unwrap();
        let requests: Vec<pb::CallChunk> = (0..chunks)
            .map(|i| pb::CallChunk {
                plugin: if i == 0 { "tp".into() } else { String::new() },
                method: if i == 0 {
                    "count".into()
                } else {
                    String::new()
                },
                data: vec![7u8; 1000].into(),
                end_of_input: complete && i + 1 == chunks,
                ..Default::default()
            })
            .collect();
        let mut reply = client
            .call_stream(tokio_stream::iter(requests))
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = reply.next().await {
            out.extend_from_slice(&chunk?.data);
        }
        Ok(out)
    })
}

#[test]
fn an_upload_without_its_end_mark_is_cancelled_not_taken_as_whole() {
    let sandbox = Sandbox::new();
    sandbox.plugin("tp", &bin("testplugin"), "");
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("tp");
    // Marked complete: the plugin counts every byte.
    assert_eq!(upload(&daemon, 3, true).unwrap(), b"3000");
    // The stream ends without the mark (the client went away): the call is
    // cancelled and the plugin sees its input fail.
    let err = upload(&daemon, 3, false).unwrap_err();
    assert_eq!(err.code(), tonic::Code::Cancelled, "{err:?}");
    assert_eq!(upload(&daemon, 2, true).unwrap(), b"2000");
    // Depending on timing the plugin sees the cut upload fail, or never sees
    // it at all; it never counts it as complete. The plugin's stderr reaches
    // the daemon's log buffer on its own time: wait for the last upload's
    // line (everything it wrote before is there by then).
    let mut logs = String::new();
    wait_until_blocking(SECS_10, "the last upload in tp's log", || {
        logs = daemon.cli_ok(&["logs", "tp", "--tail", "50"]);
        logs.contains("upload complete: 2000 bytes")
    });
    let complete: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("upload complete"))
        .collect();
    assert_eq!(
        complete.len(),
        2,
        "only the two marked uploads were taken whole:\n{logs}"
    );
    assert!(
        complete[0].contains("upload complete: 3000 bytes"),
        "{logs}"
    );
}

#[test]
fn events_json_carries_the_exit_as_fields() {
    let sandbox = Sandbox::new();
    sandbox.plugin(
        "tp",
        &bin("testplugin"),
        "restart: {initial_backoff: 50ms, jitter: 0.0}",
    );
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("tp");
    let out = daemon.cli(&["call", "tp", "crash", "--data", "9"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let backoff = || {
        daemon
            .cli_ok(&["events", "tp", "--json"])
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|e| e["state"] == "backoff")
    };
    wait_until_blocking(SECS_10, "a backoff event", || backoff().is_some());
    let e = backoff().unwrap();
    assert_eq!(e["exit"]["kind"], "exit", "{e}");
    assert_eq!(e["exit"]["code"], 9, "{e}");
    assert_eq!(e["exit"]["oom"], false, "{e}");
    assert_eq!(e["attempt"], 1, "{e}");
    assert_eq!(e["delay_ms"], 50, "{e}");
    assert_eq!(e["replica"], 0, "{e}");
}

#[test]
fn a_runtime_dir_others_can_write_or_a_planted_symlink_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let sandbox = Sandbox::new();
    let run = |runtime: &std::path::Path| {
        std::process::Command::new(bin("plugvisor"))
            .args(["run", "--plugins-dir"])
            .arg(sandbox.plugins_dir())
            .arg("--runtime-dir")
            .arg(runtime)
            .arg("--state-dir")
            .arg(sandbox.dir.path().join("state"))
            .output()
            .unwrap()
    };
    // Pre-created by someone else as a world-writable directory.
    let open = sandbox.dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = run(&open);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("writable by everyone (mode 0777)"),
        "{stderr}"
    );
    // Its `plugins` subdirectory planted as a symlink to another directory.
    let planted = sandbox.dir.path().join("planted");
    std::fs::create_dir(&planted).unwrap();
    let elsewhere = sandbox.dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, planted.join("plugins")).unwrap();
    let out = run(&planted);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("plugins") && stderr.contains("symbolic link"),
        "{stderr}"
    );
}

#[test]
fn start_and_restart_report_the_new_start_not_the_old_stop() {
    let sandbox = Sandbox::new();
    sandbox.plugin("tp", &bin("testplugin"), "");
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("tp");
    for _ in 0..5 {
        daemon.cli_ok(&["stop", "tp"]);
        let started = daemon.cli_ok(&["start", "tp"]);
        assert!(
            !started.contains("now stopped"),
            "the reply raced the state it reports: {started}"
        );
        daemon.wait_ready("tp");
        let restarted = daemon.cli_ok(&["restart", "tp"]);
        assert!(
            !restarted.contains("now stopped"),
            "the reply raced the state it reports: {restarted}"
        );
        daemon.wait_ready("tp");
    }
}
