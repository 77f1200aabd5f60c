//! The CLI verbs not covered elsewhere, end to end against a live daemon:
//! `logs -f` seeing a crash as it happens, `stop` / `start` / `restart`,
//! `call -` reading stdin, `inspect --json`, `logs --json`, `version`.

use plugvisor_integration_tests::{Daemon, Sandbox, bin, is_gone, wait_until_blocking};
use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SECS_10: Duration = Duration::from_secs(10);

fn sandbox() -> Sandbox {
    let sandbox = Sandbox::new();
    sandbox.plugin("echo", &bin("echo-plugin"), "");
    sandbox.plugin("tp", &bin("testplugin"), "restart: {initial_backoff: 20ms}");
    sandbox
}

#[test]
fn logs_follow_shows_a_crash_as_it_happens() {
    let sandbox = sandbox();
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("tp");
    let mut follower = Command::new(bin("plugvisor"))
        .arg("--control")
        .arg(&daemon.control)
        .args(["logs", "tp", "-f", "--tail", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The tail line arrives first: the follower is attached.
    rx.recv_timeout(SECS_10).expect("the tail arrives");
    let out = daemon.cli(&["call", "tp", "crash", "--data", "9"]);
    assert_eq!(out.status.code(), Some(1), "the crashing call fails");
    let deadline = Instant::now() + SECS_10;
    let line = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the crash's output is streamed");
        if line.contains("crashing with exit code 9") {
            break line;
        }
    };
    assert!(
        line.starts_with("tp-0-1 stderr"),
        "instance and stream lead: {line}"
    );
    let _ = follower.kill();
    let _ = follower.wait();
    reader.join().unwrap();
    let json = daemon.cli_ok(&["logs", "tp", "--tail", "200", "--json"]);
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines
            .iter()
            .all(|l| l["instance"].is_string() && l["stream"].is_string())
    );
    assert!(
        lines
            .iter()
            .any(|l| l["line"].as_str().unwrap().contains("crashing"))
    );
}

#[test]
fn stop_start_and_restart_from_the_cli() {
    let sandbox = sandbox();
    let daemon = Daemon::start(&sandbox, &[]);
    let pid = daemon.wait_ready("echo")["pid"].as_i64().unwrap() as i32;
    let out = daemon.cli_ok(&["stop", "echo"]);
    assert!(out.contains("echo: stopped (now stopped)"), "{out}");
    assert!(is_gone(pid));
    let out = daemon.cli(&["call", "echo", "echo", "--data", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stopped"),
        "{out:?}"
    );
    daemon.cli_ok(&["start", "echo"]);
    let pid = daemon.wait_ready("echo")["pid"].as_i64().unwrap() as i32;
    daemon.cli_ok(&["restart", "echo"]);
    wait_until_blocking(SECS_10, "a new echo instance", || {
        let row = daemon.plugin("echo");
        row["state"] == "ready" && row["pid"].as_i64() != Some(pid as i64)
    });
    assert!(is_gone(pid));
    let inspect: serde_json::Value =
        serde_json::from_str(&daemon.cli_ok(&["inspect", "echo", "--json"])).unwrap();
    let history = inspect["history"].as_array().unwrap();
    let states: Vec<&str> = history
        .iter()
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert!(
        states.windows(2).any(|w| w == ["stopping", "stopped"]),
        "{states:?}"
    );
    assert_eq!(inspect["state"], "ready");
    let out = daemon.cli(&["stop", "nosuch"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn call_reads_its_payload_from_stdin() {
    let sandbox = sandbox();
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("echo");
    let mut child = Command::new(bin("plugvisor"))
        .arg("--control")
        .arg(&daemon.control)
        .args(["call", "echo", "upper", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"from stdin")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"FROM STDIN");
    let json: serde_json::Value =
        serde_json::from_str(&daemon.cli_ok(&["call", "echo", "echo", "--data", "j", "--json"]))
            .unwrap();
    assert_eq!(json["payload"], "j");
}

#[test]
fn version_prints_the_version() {
    let out = Command::new(bin("plugvisor"))
        .arg("version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("plugvisor {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn config_shows_the_merged_layers_and_sets_runtime_overrides_without_downtime() {
    let sandbox = Sandbox::new();
    sandbox.plugin(
        "tp",
        &bin("testplugin"),
        "config: {a: 1, keep: manifest}\nupgrade: {probation: 100ms}",
    );
    let config = sandbox.dir.path().join("plugvisor.yaml");
    std::fs::write(
        &config,
        "plugins:\n  tp:\n    config: {b: 2, keep: config}\n",
    )
    .unwrap();
    let daemon = Daemon::start(&sandbox, &["--config", config.to_str().unwrap()]);
    let pid = daemon.wait_ready("tp")["pid"].as_i64().unwrap();
    let shown: serde_json::Value = serde_json::from_str(&daemon.cli_ok(&["config", "tp"])).unwrap();
    assert_eq!(shown, serde_json::json!({"a": 1, "b": 2, "keep": "config"}));

    // Runtime overrides win over both, and reach a new instance.
    daemon.cli_ok(&["config", "tp", "keep=runtime", "c=[3]"]);
    let received: serde_json::Value =
        serde_json::from_str(&daemon.cli_ok(&["call", "tp", "config"])).unwrap();
    assert_eq!(
        received,
        serde_json::json!({"a": 1, "b": 2, "keep": "runtime", "c": [3]})
    );
    let row = daemon.plugin("tp");
    assert_ne!(
        row["pid"].as_i64().unwrap(),
        pid,
        "a new instance took over"
    );
    assert_eq!(row["restarts"], 0, "by an upgrade, not a crash");
    // `null` removes a runtime key; the layer below shows through again.
    daemon.cli_ok(&["config", "tp", "keep=null"]);
    let received: serde_json::Value =
        serde_json::from_str(&daemon.cli_ok(&["call", "tp", "config"])).unwrap();
    assert_eq!(received["keep"], "config");
    let out = daemon.cli(&["config", "tp", "novalue"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn check_json_lists_plugins_errors_and_warnings() {
    let sandbox = sandbox();
    std::fs::create_dir_all(sandbox.plugins_dir().join("bad")).unwrap();
    std::fs::write(
        sandbox.plugins_dir().join("bad/plugin.yaml"),
        "name: bad\nversion: x\nexec: ./x\n",
    )
    .unwrap();
    let config = sandbox.dir.path().join("plugvisor.yaml");
    std::fs::write(&config, "plugins:\n  ghost: {}\n").unwrap();
    let out = Command::new(bin("plugvisor"))
        .args(["check", "--json", "--config"])
        .arg(&config)
        .arg("--plugins-dir")
        .arg(sandbox.plugins_dir())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["echo", "tp"]);
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{v}");
    assert!(
        errors[0]
            .as_str()
            .unwrap()
            .contains("bad/plugin.yaml: field `version`"),
        "{v}"
    );
    assert!(
        v["warnings"][0].as_str().unwrap().contains("`ghost`"),
        "{v}"
    );
}

/// The newest modification time of the files under `dir`.
fn newest_under(dir: &std::path::Path) -> std::time::SystemTime {
    let mut newest = std::time::UNIX_EPOCH;
    for entry in std::fs::read_dir(dir).expect("read the source dir") {
        let entry = entry.expect("a directory entry");
        let meta = entry.metadata().expect("metadata");
        let time = if meta.is_dir() {
            newest_under(&entry.path())
        } else {
            meta.modified().expect("mtime")
        };
        newest = newest.max(time);
    }
    newest
}

#[test]
fn the_binaries_under_test_are_not_older_than_their_sources() {
    let plugvisor = bin("plugvisor");
    let built = std::fs::metadata(&plugvisor)
        .and_then(|m| m.modified())
        .expect("the binary's mtime");
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root");
    for sources in ["supervisor/src", "supervisor/cli/src"] {
        let newest = newest_under(&repo.join(sources));
        assert!(
            built >= newest,
            "{} is older than {sources}: the tests would run a stale binary",
            plugvisor.display()
        );
    }
}

#[test]
fn health_prints_no_trailing_space_and_an_oversized_call_streams_naming_the_limit() {
    let sandbox = sandbox();
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("echo");
    // The status, then what answered: version, short digest of the file it
    // runs, signer. One line, nothing trailing.
    let digest = plugvisor::isolation::pin::sha256_file(&bin("echo-plugin")).unwrap();
    assert_eq!(
        daemon.cli_ok(&["health", "echo"]),
        format!(
            "echo: SERVING (version 1.0.0, sha256 {}, unsigned)\n",
            &digest[..12]
        )
    );

    let big = sandbox.dir.path().join("big.bin");
    let file = std::fs::File::create(&big).expect("create the payload file");
    file.set_len(64 << 20).expect("a 64 MiB payload");
    drop(file);
    let out = daemon.cli(&[
        "call",
        "echo",
        "upper",
        "--data-file",
        big.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("over the 64 MiB limit of one message")
            && stderr.contains("streaming it to echo.upper (HandleStream)")
            && !stderr.contains("h2 protocol error"),
        "{stderr}"
    );
    assert_eq!(out.stdout.len(), 64 << 20, "the whole reply came back");
    // The daemon is unharmed.
    assert_eq!(
        daemon.cli_ok(&["call", "echo", "upper", "--data", "ok"]),
        "OK"
    );
}
