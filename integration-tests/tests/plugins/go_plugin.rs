//! The Go example plugin (`examples/go-echo`, grpc-go from Debian's packages
//! in GOPATH mode), built by its `build.sh`: it passes `plugvisor
//! conformance`, and runs under the real daemon: called through the CLI
//! (unary and streamed), killed, and back.

use plugvisor_integration_tests::{Daemon, Sandbox, bin, skip, wait_until_blocking};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration-tests sits in the repository")
        .to_path_buf()
}

/// Builds go-echo once per test process into `<target>/go-echo/go-echo`;
/// `Err` says why it cannot be built here (no Go toolchain or packages).
pub(crate) fn go_echo() -> Result<PathBuf, String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            if Command::new("go").arg("version").output().is_err() {
                return Err("no `go` on PATH (apt-get install golang-go golang-google-grpc-dev golang-google-protobuf-dev protobuf-compiler protoc-gen-go protoc-gen-go-grpc; .ci/run does)".into());
            }
            let out = bin("plugvisor")
                .parent()
                .and_then(Path::parent)
                .expect("binaries sit in <target>/<profile>")
                .join("go-echo");
            let build = Command::new(repo().join("examples/go-echo/build.sh"))
                .env("OUT", &out)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run examples/go-echo/build.sh: {e}"))?;
            let stderr = String::from_utf8_lossy(&build.stderr);
            if build.status.success() {
                return Ok(out.join("go-echo"));
            }
            if stderr.contains("not found") || stderr.contains("is not in /usr/share/gocode") {
                // The script names the missing tool or package.
                return Err(stderr.trim().to_string());
            }
            panic!("examples/go-echo/build.sh failed with {}:\n{stderr}", build.status);
        })
        .clone()
}

#[test]
fn go_example_conforms() {
    let plugin = match go_echo() {
        Ok(plugin) => plugin,
        Err(why) => return skip(why),
    };
    let sandbox = Sandbox::new();
    let manifest = sandbox.plugin("go-echo", &plugin, "limits: {pids: 64}");
    let out = Command::new(bin("plugvisor"))
        .arg("conformance")
        .arg(&manifest)
        .stdin(Stdio::null())
        .output()
        .expect("plugvisor runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.ends_with(
            "10 passed, 0 failed, 2 skipped: go-echo conforms to plugvisor protocol 1\n"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("its `config` method returned the token"),
        "{stdout}"
    );
    assert!(stdout.contains("grpc.health.v1 Check: SERVING"), "{stdout}");
}

#[test]
fn go_example_runs_under_the_daemon_and_comes_back_after_a_kill() {
    let plugin = match go_echo() {
        Ok(plugin) => plugin,
        Err(why) => return skip(why),
    };
    let sandbox = Sandbox::new();
    sandbox.plugin(
        "go",
        &plugin,
        "config: {greeting: hi}\nlimits: {pids: 64}\nrestart: {initial_backoff: 20ms}",
    );
    let daemon = Daemon::start(&sandbox, &[]);
    let first = daemon.wait_ready("go");
    assert_eq!(
        first["methods"],
        serde_json::json!(["echo", "upper", "config"])
    );

    assert_eq!(
        daemon.cli_ok(&["call", "go", "echo", "--data", "hi there"]),
        "hi there"
    );
    assert_eq!(
        daemon.cli_ok(&["call", "go", "upper", "--data", "hi"]),
        "HI"
    );
    let config: serde_json::Value =
        serde_json::from_str(&daemon.cli_ok(&["call", "go", "config"])).expect("config is JSON");
    assert_eq!(config["greeting"], "hi");
    assert_eq!(
        daemon.cli_ok(&["call", "go", "upper", "--stream", "--data", "streamed"]),
        "STREAMED"
    );
    let out = daemon.cli(&["call", "go", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("Unimplemented: go-echo has no method \"nope\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let pid = first["pid"].as_i64().expect("a pid") as i32;
    // SAFETY: kill(2) on the plugin's pid, which the daemon has not reaped
    // while it is reported as running.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let mut again = serde_json::Value::Null;
    wait_until_blocking(
        Duration::from_secs(15),
        "go-echo back after SIGKILL",
        || {
            again = daemon.plugin("go");
            again["state"] == "ready" && again["pid"].as_i64() != Some(pid as i64)
        },
    );
    assert!(again["restarts"].as_u64() >= Some(1), "{again}");
    assert_eq!(
        daemon.cli_ok(&["call", "go", "echo", "--data", "again"]),
        "again"
    );
    // Its stderr is captured as JSON log records.
    let logs = daemon.cli_ok(&["logs", "go", "--tail", "50"]);
    assert!(logs.contains("\"message\":\"serving\""), "{logs}");
}

/// go-echo does not implement ValidateConfig (its server embeds
/// `UnimplementedPluginServer`, so the RPC answers UNIMPLEMENTED): the
/// optional check is skipped, and `plugvisor config` rolls the change out.
#[test]
fn a_config_change_reaches_a_plugin_without_validate_config() {
    let plugin = match go_echo() {
        Ok(plugin) => plugin,
        Err(why) => return skip(why),
    };
    let sandbox = Sandbox::new();
    sandbox.plugin(
        "go",
        &plugin,
        "config: {greeting: hi}\nreplicas: 2\nlimits: {pids: 64}\nupgrade: {probation: 50ms}",
    );
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("go");

    let out = daemon.cli(&["config", "go", "greeting=\"hello\"", "extra=3"]);
    assert!(
        out.status.success(),
        "a plugin without ValidateConfig refused a config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for _ in 0..4 {
        // Calls spread over both replicas: each runs the new config.
        let config: serde_json::Value =
            serde_json::from_str(&daemon.cli_ok(&["call", "go", "config"])).expect("JSON");
        assert_eq!(config["greeting"], "hello", "{config}");
        assert_eq!(config["extra"], 3, "{config}");
    }
    let shown: serde_json::Value =
        serde_json::from_str(&daemon.cli_ok(&["config", "go"])).expect("config is JSON");
    assert_eq!(shown["greeting"], "hello", "{shown}");
}
