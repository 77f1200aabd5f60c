//! `plugvisor upgrade-self`: the daemon replaced by a new binary, twice in
//! a row, while callers hammer the control socket; every plugin keeps its
//! pid, no call fails; a broken new binary leaves the old daemon serving.

use plugvisor_cli::control_client::ControlConnection;
use plugvisor_integration_tests::{Daemon, Sandbox, bin};
use plugvisor_proto as pb;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A copy of the plugvisor binary: "a new binary" for the daemon.
fn copy_of_plugvisor(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::copy(bin("plugvisor"), &path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    /// Calls the client sent again because the daemon never processed them.
    resent: AtomicU64,
    /// The longest call, in microseconds.
    longest_us: AtomicU64,
}

impl Tally {
    fn took(&self, started: Instant) {
        self.longest_us
            .fetch_max(started.elapsed().as_micros() as u64, Ordering::SeqCst);
    }
}

async fn echo(client: &mut plugvisor_cli::control::Client) -> Result<(), tonic::Status> {
    let reply = client
        .call(pb::CallRequest {
            plugin: "echo".into(),
            method: "upper".into(),
            payload: b"hi".to_vec().into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(&reply.payload[..], b"HI");
    Ok(())
}

/// Calls and calls: a new connection per call. Any error is a failed
/// call: the control client itself sends again a call the daemon never
/// processed.
async fn call_per_connection(control: PathBuf, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    while !stop.load(Ordering::SeqCst) {
        let started = Instant::now();
        let result = match ControlConnection::connect(&control).await {
            Ok(connection) => {
                let mut client = plugvisor_cli::control::client(connection.clone());
                let result = echo(&mut client).await.map_err(|s| s.to_string());
                tally
                    .resent
                    .fetch_add(connection.resent(), Ordering::SeqCst);
                result
            }
            Err(e) => Err(e.to_string()),
        };
        tally.took(started);
        match result {
            Ok(()) => tally.ok.fetch_add(1, Ordering::SeqCst),
            Err(e) => {
                eprintln!("per-connection call failed: {e}");
                tally.failed.fetch_add(1, Ordering::SeqCst)
            }
        };
    }
}

/// Calls and calls on one long-lived connection, which the daemon closes
/// (GOAWAY) at each hand-over. Any error is a failed call.
async fn call_on_one_connection(control: PathBuf, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let connection = ControlConnection::connect(&control).await.unwrap();
    let mut client = plugvisor_cli::control::client(connection.clone());
    while !stop.load(Ordering::SeqCst) {
        let started = Instant::now();
        let result = echo(&mut client).await;
        tally.took(started);
        match result {
            Ok(()) => tally.ok.fetch_add(1, Ordering::SeqCst),
            Err(e) => {
                eprintln!("long-lived call failed: {e}");
                tally.failed.fetch_add(1, Ordering::SeqCst)
            }
        };
    }
    tally
        .resent
        .fetch_add(connection.resent(), Ordering::SeqCst);
}

fn lines(text: &str) -> Vec<String> {
    text.lines().map(str::to_string).collect()
}

/// `plugvisor logs -f` / `events -f` as a child process writing to a file.
struct Follower {
    child: std::process::Child,
    out: PathBuf,
}

impl Follower {
    fn start(daemon: &Daemon, args: &[&str]) -> Follower {
        let out = daemon
            .control
            .with_file_name(format!("follow-{}.out", args[0]));
        let child = std::process::Command::new(bin("plugvisor"))
            .arg("--control")
            .arg(&daemon.control)
            .args(args)
            .stdout(std::fs::File::create(&out).unwrap())
            .spawn()
            .unwrap();
        Follower { child, out }
    }

    /// Its output once it has `n` lines (or after a deadline, to show what
    /// it had); it must still be following.
    fn lines_once(mut self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let read = |out: &Path| lines(&std::fs::read_to_string(out).unwrap_or_default());
        while read(&self.out).len() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the follower stopped: {:?}",
            read(&self.out)
        );
        // No more than the daemon holds either.
        std::thread::sleep(Duration::from_millis(200));
        read(&self.out)
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn daemon_info(daemon: &Daemon, rt: &tokio::runtime::Runtime) -> pb::DaemonInfoResponse {
    rt.block_on(async {
        let mut client = plugvisor_cli::control::connect(&daemon.control)
            .await
            .unwrap();
        client
            .daemon_info(pb::DaemonInfoRequest {})
            .await
            .unwrap()
            .into_inner()
    })
}

#[test]
fn two_upgrades_under_concurrent_callers_keep_every_plugin_and_fail_no_call() {
    let sandbox = Sandbox::new();
    sandbox.plugin("echo", &bin("echo-plugin"), "");
    sandbox.plugin("kv", &bin("kv-plugin"), "");
    sandbox.plugin("talker", &bin("testplugin"), "args: [\"--junk\", \"3\"]");
    let daemon = Daemon::start(&sandbox, &[]);
    let echo_pid = daemon.wait_ready("echo")["pid"].clone();
    let kv_pid = daemon.wait_ready("kv")["pid"].clone();
    daemon.wait_ready("talker");
    daemon.cli_ok(&["call", "kv", "set", "--data", "colour=blue"]);
    let events_before = daemon.cli_ok(&["events", "--json"]).lines().count();
    // Followers of the logs and events, carried across both hand-overs.
    let follow_logs = Follower::start(&daemon, &["logs", "-f", "talker", "--tail", "0", "--json"]);
    let follow_events = Follower::start(&daemon, &["events", "-f", "--json"]);
    let new = copy_of_plugvisor(sandbox.dir.path(), "plugvisor-new");
    let newer = copy_of_plugvisor(sandbox.dir.path(), "plugvisor-newer");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (per_call, long_lived) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
    let mut callers = Vec::new();
    for _ in 0..3 {
        callers.push(rt.spawn(call_per_connection(
            daemon.control.clone(),
            stop.clone(),
            per_call.clone(),
        )));
        callers.push(rt.spawn(call_on_one_connection(
            daemon.control.clone(),
            stop.clone(),
            long_lived.clone(),
        )));
    }
    let wait_calls = |tally: &Tally, n: u64| {
        let deadline = Instant::now() + Duration::from_secs(20);
        let from = tally.ok.load(Ordering::SeqCst);
        while tally.ok.load(Ordering::SeqCst) < from + n {
            assert!(Instant::now() < deadline, "calls stopped going through");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_calls(&per_call, 20);
    for binary in [&new, &newer] {
        let out = daemon.cli_ok(&["upgrade-self", "--binary", binary.to_str().unwrap()]);
        assert!(out.contains("upgraded in place"), "{out}");
        // Calls go on through the new image, on both kinds of connection.
        wait_calls(&per_call, 20);
        wait_calls(&long_lived, 20);
        // New output between the hand-overs: the followers must show it.
        daemon.cli_ok(&["restart", "talker"]);
        daemon.wait_ready("talker");
    }
    stop.store(true, Ordering::SeqCst);
    for caller in callers {
        rt.block_on(caller).unwrap();
    }
    let failed = per_call.failed.load(Ordering::SeqCst) + long_lived.failed.load(Ordering::SeqCst);
    eprintln!(
        "per-connection: {} ok, {} sent again, longest {}us; long-lived: {} ok, {} sent again, longest {}us",
        per_call.ok.load(Ordering::SeqCst),
        per_call.resent.load(Ordering::SeqCst),
        per_call.longest_us.load(Ordering::SeqCst),
        long_lived.ok.load(Ordering::SeqCst),
        long_lived.resent.load(Ordering::SeqCst),
        long_lived.longest_us.load(Ordering::SeqCst),
    );
    assert_eq!(failed, 0, "calls failed during the hand-overs");

    let info = daemon_info(&daemon, &rt);
    assert_eq!(info.generation, 2);
    assert_eq!(info.pid as i32, daemon.pid(), "the daemon's pid is kept");
    assert_eq!(Path::new(&info.binary), newer.canonicalize().unwrap());
    assert!(info.last_upgrade_error.is_empty(), "{info:?}");
    // Same plugin processes, state intact, history and output continuous.
    assert_eq!(daemon.plugin("echo")["pid"], echo_pid);
    assert_eq!(daemon.plugin("kv")["pid"], kv_pid);
    assert_eq!(
        daemon.cli_ok(&["call", "kv", "get", "--data", "colour"]),
        "blue"
    );
    let events = daemon.cli_ok(&["events", "--json"]);
    assert!(events.lines().count() >= events_before + 4, "{events}");
    assert_eq!(
        events
            .matches("taken over by the new supervisor image")
            .count(),
        6
    );
    let logs = daemon.cli_ok(&["logs", "kv"]);
    assert!(logs.contains("plugin listening"), "{logs}");
    // The followers went on across both switches: exactly what the daemon
    // holds now, nothing twice, nothing missing (the talker's output of
    // three starts, the events of both take-overs).
    let logs = daemon.cli_ok(&["logs", "talker", "--tail", "0", "--json"]);
    assert_eq!(
        logs.matches("junk line 1 before handshake").count(),
        3,
        "{logs}"
    );
    assert_eq!(follow_logs.lines_once(logs.lines().count()), lines(&logs));
    let mut held = lines(&events);
    let mut followed = follow_events.lines_once(held.len());
    held.sort();
    followed.sort();
    assert_eq!(followed, held);
    // The plugins are still the daemon's children (and die with it).
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", kv_pid)).unwrap();
    let ppid: i32 = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(ppid, daemon.pid());
}

#[test]
fn a_broken_new_binary_is_refused_and_the_old_daemon_serves_on() {
    let sandbox = Sandbox::new();
    sandbox.plugin("echo", &bin("echo-plugin"), "");
    let daemon = Daemon::start(&sandbox, &[]);
    let echo_pid = daemon.wait_ready("echo")["pid"].clone();
    let dir = sandbox.dir.path();
    let not_executable = dir.join("not-executable");
    std::fs::write(&not_executable, "nothing").unwrap();
    let cases = [
        (not_executable, "cannot run it"),
        (
            script(dir, "exits-1", "echo broken config >&2; exit 1"),
            "exited with code 1",
        ),
        (
            script(dir, "garbage", "echo lalala"),
            "without saying it can take over",
        ),
        (
            script(
                dir,
                "old-format",
                "echo plugvisor-handover-ok format=0 version=0.0.1",
            ),
            "up to format 0",
        ),
    ];
    for (binary, why) in &cases {
        let out = daemon.cli(&["upgrade-self", "--binary", binary.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(why), "{why}: {stderr}");
        assert!(stderr.contains("keeps running"), "{stderr}");
        assert_eq!(
            daemon.cli_ok(&["call", "echo", "upper", "--data", "x"]),
            "X"
        );
    }
    // A pre-flight that hangs is killed after its time; meanwhile another
    // upgrade-self is refused, not queued.
    let hangs = script(dir, "hangs", "sleep 1000");
    let control = daemon.control.clone();
    let first = std::thread::spawn(move || {
        std::process::Command::new(bin("plugvisor"))
            .arg("--control")
            .arg(&control)
            .args(["upgrade-self", "--binary", hangs.to_str().unwrap()])
            .output()
            .unwrap()
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    let second = loop {
        let out = daemon.cli(&["upgrade-self", "--binary", "/bin/true"]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if stderr.contains("already running") || Instant::now() > deadline {
            break stderr;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(second.contains("refused (not queued)"), "{second}");
    let first = first.join().unwrap();
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert_eq!(first.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("did not finish within 10s"), "{stderr}");
    assert_eq!(
        daemon.cli_ok(&["call", "echo", "upper", "--data", "y"]),
        "Y"
    );
    assert_eq!(daemon.plugin("echo")["pid"], echo_pid);
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(daemon_info(&daemon, &rt).generation, 0);
}
