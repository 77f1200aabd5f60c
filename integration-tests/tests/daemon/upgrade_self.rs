//! `plugvisor upgrade-self`: the daemon replaced by a new binary, twice in
//! a row, while callers hammer the control socket; every plugin keeps its
//! pid, no call fails; a broken new binary leaves the old daemon serving.

use plugvisor_cli::control_client::ControlConnection;
use plugvisor_integration_tests::{Daemon, Sandbox, bin, wait_until_blocking};
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

/// Calls and calls on one call session (`Control.CallSession`) shared by
/// every caller; `method` on `plugin` with `payload`, answered `expect`.
/// Calls in flight when the daemon drains finish there; calls it did not
/// process are sent again on a new session. Any error is a failed call.
async fn call_on_a_session(
    session: plugvisor_cli::control_client::CallSession,
    call: (&'static str, &'static str, &'static str, &'static str),
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let (plugin, method, payload, expect) = call;
    while !stop.load(Ordering::SeqCst) {
        let started = Instant::now();
        let result = session
            .call(pb::CallRequest {
                plugin: plugin.into(),
                method: method.into(),
                payload: payload.as_bytes().to_vec().into(),
                ..Default::default()
            })
            .await;
        tally.took(started);
        match result {
            Ok(reply) if reply.payload == expect.as_bytes() => {
                tally.ok.fetch_add(1, Ordering::SeqCst)
            }
            other => {
                eprintln!("session call failed: {other:?}");
                tally.failed.fetch_add(1, Ordering::SeqCst)
            }
        };
    }
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
    let (on_session, slow_on_session) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
    let session = rt
        .block_on(plugvisor_cli::control_client::CallSession::connect(
            &daemon.control,
        ))
        .unwrap();
    let mut callers = Vec::new();
    // Slow calls on the session, so that some are in flight at each switch.
    callers.push(rt.spawn(call_on_a_session(
        session.clone(),
        ("talker", "sleep", "150", "slept"),
        stop.clone(),
        slow_on_session.clone(),
    )));
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
        callers.push(rt.spawn(call_on_a_session(
            session.clone(),
            ("echo", "upper", "hi", "HI"),
            stop.clone(),
            on_session.clone(),
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
        wait_calls(&on_session, 20);
        wait_calls(&slow_on_session, 2);
        // New output between the hand-overs: the followers must show it.
        daemon.cli_ok(&["restart", "talker"]);
        daemon.wait_ready("talker");
    }
    stop.store(true, Ordering::SeqCst);
    for caller in callers {
        rt.block_on(caller).unwrap();
    }
    let failed = per_call.failed.load(Ordering::SeqCst)
        + long_lived.failed.load(Ordering::SeqCst)
        + on_session.failed.load(Ordering::SeqCst)
        + slow_on_session.failed.load(Ordering::SeqCst);
    eprintln!(
        "per-connection: {} ok, {} sent again, longest {}us; long-lived: {} ok, {} sent again, longest {}us",
        per_call.ok.load(Ordering::SeqCst),
        per_call.resent.load(Ordering::SeqCst),
        per_call.longest_us.load(Ordering::SeqCst),
        long_lived.ok.load(Ordering::SeqCst),
        long_lived.resent.load(Ordering::SeqCst),
        long_lived.longest_us.load(Ordering::SeqCst),
    );
    eprintln!(
        "on a session: {} ok, {} slow ok, {} sent again, longest {}us / slow {}us",
        on_session.ok.load(Ordering::SeqCst),
        slow_on_session.ok.load(Ordering::SeqCst),
        session.resent(),
        on_session.longest_us.load(Ordering::SeqCst),
        slow_on_session.longest_us.load(Ordering::SeqCst),
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
    // Once its pre-flight runs (for 10 s), the first request holds the
    // upgrade.
    wait_until_blocking(Duration::from_secs(10), "the hanging pre-flight", || {
        children_of(daemon.pid()).iter().any(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("hangs"))
        })
    });
    let out = daemon.cli(&["upgrade-self", "--binary", "/bin/true"]);
    let second = String::from_utf8_lossy(&out.stderr).into_owned();
    let first = first.join().unwrap();
    assert!(
        second.contains("refused (not queued)"),
        "{second}\nfirst: {first:?}"
    );
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

/// The pids of the daemon's children, from /proc: its plugins and its
/// survivors' guard.
fn children_of(pid: i32) -> Vec<i32> {
    let mut children: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|stat| {
                stat[stat.rfind(')').unwrap() + 2..]
                    .split_whitespace()
                    .nth(1)
                    .and_then(|ppid| ppid.parse::<i32>().ok())
                    == Some(pid)
            })
        })
        .collect();
    children.sort_unstable();
    children
}

fn is_guard(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|b| *b == 0).nth(1) == Some(b"survivor-guard"))
}

/// The daemon's children but its survivors' guard: its plugins.
fn plugin_children_of(pid: i32) -> Vec<i32> {
    children_of(pid)
        .into_iter()
        .filter(|p| !is_guard(*p))
        .collect()
}

/// The daemon's survivors' guards (one, kept across switches).
fn guards_of(pid: i32) -> Vec<i32> {
    children_of(pid)
        .into_iter()
        .filter(|p| is_guard(*p))
        .collect()
}

fn pid_of(v: &serde_json::Value) -> i32 {
    v["pid"].as_i64().unwrap_or_default() as i32
}

/// A plugin that dies at moments spread over the hand-over: before the
/// request, during the pre-flight, while the state is taken, around the
/// exec, while the new image takes over. Each time the switch either
/// completes or is refused (the old image serves on); either way the dead
/// instance is reaped and the plugin restarted by whichever image
/// supervises it, and the daemon's children are exactly its plugins.
#[test]
fn a_plugin_crashing_during_the_hand_over_is_restarted_never_orphaned() {
    let sandbox = Sandbox::new();
    sandbox.plugin("echo", &bin("echo-plugin"), "");
    sandbox.plugin(
        "flaky",
        &bin("testplugin"),
        "restart: {initial_backoff: 10ms, multiplier: 1.0, jitter: 0.0, max_restarts: 100}",
    );
    let daemon = Daemon::start(&sandbox, &[]);
    let echo_pid = pid_of(&daemon.wait_ready("echo"));
    let guard = guards_of(daemon.pid());
    assert_eq!(guard.len(), 1, "one survivors' guard");
    let (mut completed, mut refused) = (0, 0);
    for delay in [0, 15, 30, 45, 60, 80, 100, 130, 160, 200] {
        let flaky = pid_of(&daemon.wait_ready("flaky"));
        // (With no delay, it may die before its answer is out.)
        let _ = daemon.cli(&["call", "flaky", "crash_in", "--data", &delay.to_string()]);
        let out = daemon.cli(&["upgrade-self"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            completed += 1;
        } else {
            // Refused: the children changed while the state was taken, or
            // the plugin was starting for too long; the old image serves on.
            assert!(stderr.contains("keeps running"), "{stderr}");
            refused += 1;
        }
        // Supervised by whichever image runs now: restarted, the dead
        // instance reaped (no zombie, no orphan).
        let mut now = serde_json::Value::Null;
        wait_until_blocking(Duration::from_secs(15), "flaky restarted", || {
            now = daemon.plugin("flaky");
            now["state"] == "ready" && pid_of(&now) != flaky
        });
        assert!(
            !Path::new(&format!("/proc/{flaky}")).exists(),
            "the crashed instance {flaky} was not reaped"
        );
        assert_eq!(pid_of(&daemon.plugin("echo")), echo_pid);
        let mut expected = vec![echo_pid, pid_of(&now)];
        expected.sort_unstable();
        assert_eq!(plugin_children_of(daemon.pid()), expected);
        // The survivors' guard is one, the same, all along.
        assert_eq!(guards_of(daemon.pid()), guard);
        assert_eq!(
            daemon.cli_ok(&["call", "echo", "upper", "--data", "ok"]),
            "OK"
        );
    }
    eprintln!("hand-overs with a crash: {completed} completed, {refused} refused");
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(daemon_info(&daemon, &rt).generation, completed);
    assert!(completed > 0, "no hand-over completed");
}

/// The plugin's cgroup (v1 here, whatever the host has otherwise) is the
/// one the new image uses: the same path, the process still in it, the
/// limit still enforced and its OOM kill read from the cgroup's counters.
#[test]
fn a_plugins_cgroup_is_taken_over_and_its_limit_still_applies() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return plugvisor_integration_tests::skip("managing cgroups needs root");
    }
    let sandbox = Sandbox::new();
    sandbox.plugin(
        "hog",
        &bin("testplugin"),
        "limits: {memory: 64MiB}\nrestart: {initial_backoff: 50ms}",
    );
    let daemon = Daemon::start(&sandbox, &[]);
    let before = daemon.wait_ready("hog");
    let mechanism = before["isolation"]["mechanism"]
        .as_str()
        .unwrap_or_default();
    if !mechanism.starts_with("cgroup") {
        return plugvisor_integration_tests::skip(format!(
            "the daemon runs without cgroups here ({mechanism})"
        ));
    }
    let cgroups = before["isolation"]["cgroups"].clone();
    let memory_dir = cgroups
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_str())
        .find(|c| c.contains("/memory/") || mechanism == "cgroup v2")
        .expect("a memory cgroup")
        .to_string();
    let pid = pid_of(&before);
    let procs = || std::fs::read_to_string(format!("{memory_dir}/cgroup.procs")).unwrap();
    assert!(procs().lines().any(|p| p == pid.to_string()));
    daemon.cli_ok(&["upgrade-self"]);
    let after = daemon.wait_ready("hog");
    assert_eq!(pid_of(&after), pid);
    assert_eq!(after["isolation"]["cgroups"], cgroups);
    assert!(procs().lines().any(|p| p == pid.to_string()));
    // Enforced, and seen by the new image as an OOM kill.
    let out = daemon.cli(&["call", "hog", "alloc", "--data", "256"]);
    assert!(!out.status.success(), "256 MiB fit in a 64 MiB limit");
    let mut oom = serde_json::Value::Null;
    wait_until_blocking(Duration::from_secs(10), "an oom backoff event", || {
        oom = daemon
            .cli_ok(&["events", "hog", "--json"])
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|e| e["state"] == "backoff")
            .unwrap_or_default();
        !oom.is_null()
    });
    assert_eq!(oom["exit"]["oom"], true, "{oom}");
    // The instance started by the first image, killed under the second.
    assert_eq!(oom["instance"], "hog-0-1", "{oom}");
    let restarted = daemon.wait_ready("hog");
    assert_ne!(pid_of(&restarted), pid);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Scrapes on new connections all through two hand-overs: the listener is
/// handed over, so none is refused or cut.
#[test]
fn the_metrics_endpoint_is_handed_over_and_never_refuses_a_scrape() {
    use std::io::{Read, Write};
    let sandbox = Sandbox::new();
    sandbox.plugin("echo", &bin("echo-plugin"), "");
    let address = format!("127.0.0.1:{}", free_port());
    let daemon = Daemon::start(&sandbox, &["--metrics-address", &address]);
    daemon.wait_ready("echo");
    let scrape = |address: &str| -> Result<String, String> {
        let mut stream = std::net::TcpStream::connect(address).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(stream, "GET /metrics HTTP/1.1\r\nHost: {address}\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .map_err(|e| e.to_string())?;
        if !response.starts_with("HTTP/1.1 200") {
            return Err(format!("answered `{response}`"));
        }
        Ok(response)
    };
    let first = scrape(&address).unwrap();
    assert!(
        first.contains("plugvisor_plugin_up{plugin=\"echo\"} 1"),
        "{first}"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let scraper = std::thread::spawn({
        let (stop, ok, failed, address) =
            (stop.clone(), ok.clone(), failed.clone(), address.clone());
        move || {
            while !stop.load(Ordering::SeqCst) {
                match scrape(&address) {
                    Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                    Err(e) => {
                        eprintln!("scrape failed: {e}");
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
        }
    });
    for _ in 0..2 {
        let before = ok.load(Ordering::SeqCst);
        daemon.cli_ok(&["upgrade-self"]);
        wait_until_blocking(Duration::from_secs(10), "scrapes after the switch", || {
            ok.load(Ordering::SeqCst) > before + 5
        });
    }
    stop.store(true, Ordering::SeqCst);
    scraper.join().unwrap();
    assert_eq!(failed.load(Ordering::SeqCst), 0);
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(daemon_info(&daemon, &rt).generation, 2);
}

/// What runs is handed over, not what the file says now: a manifest edited
/// but not reloaded stays unapplied across the switch (a reload applies it
/// later, as without one).
#[test]
fn an_edited_but_not_reloaded_manifest_is_not_taken_as_what_runs() {
    let sandbox = Sandbox::new();
    let manifest = sandbox.plugin("tp", &bin("testplugin"), "");
    let daemon = Daemon::start(&sandbox, &[]);
    let pid = pid_of(&daemon.wait_ready("tp"));
    let edited = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace("version: 1.0.0", "version: 2.0.0");
    std::fs::write(&manifest, edited).unwrap();
    daemon.cli_ok(&["upgrade-self"]);
    let tp = daemon.wait_ready("tp");
    assert_eq!(pid_of(&tp), pid);
    assert_eq!(tp["version"], "1.0.0", "{tp}");
    // The edit is still seen as a change, and a reload rolls it out.
    let out = daemon.cli_ok(&["reload", "--json"]);
    assert!(out.contains("\"upgraded\":[\"tp\"]"), "{out}");
    wait_until_blocking(Duration::from_secs(15), "tp at 2.0.0", || {
        let tp = daemon.plugin("tp");
        tp["version"] == "2.0.0" && tp["state"] == "ready"
    });
}

/// An operator's restart starts the restart history over, and a hand-over
/// carries that cleared history, not the one before the restart.
#[test]
fn an_operator_restart_clears_the_carried_backoff_history() {
    let sandbox = Sandbox::new();
    sandbox.plugin(
        "tp",
        &bin("testplugin"),
        "restart: {initial_backoff: 10ms, jitter: 0.0}",
    );
    let daemon = Daemon::start(&sandbox, &[]);
    let attempts = || -> Vec<u64> {
        daemon
            .cli_ok(&["events", "tp", "--json"])
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|e| e["state"] == "backoff")
            .map(|e| e["attempt"].as_u64().unwrap())
            .collect()
    };
    for n in 1..=3 {
        daemon.wait_ready("tp");
        let _ = daemon.cli(&["call", "tp", "crash"]);
        wait_until_blocking(Duration::from_secs(10), "a backoff", || {
            attempts().len() == n
        });
    }
    assert_eq!(attempts(), [1, 2, 3]);
    daemon.wait_ready("tp");
    daemon.cli_ok(&["restart", "tp"]);
    daemon.wait_ready("tp");
    daemon.cli_ok(&["upgrade-self"]);
    daemon.wait_ready("tp");
    let _ = daemon.cli(&["call", "tp", "crash"]);
    wait_until_blocking(Duration::from_secs(10), "a backoff", || {
        attempts().len() == 4
    });
    assert_eq!(
        attempts(),
        [1, 2, 3, 1],
        "the restart's clean slate was lost"
    );
}

/// The `sha256:` line of `inspect NAME`.
fn inspect_sha256(daemon: &Daemon, name: &str) -> String {
    let inspect = daemon.cli_ok(&["inspect", name]);
    inspect
        .lines()
        .find(|l| l.trim_start().starts_with("sha256:"))
        .unwrap_or_else(|| panic!("no sha256 line: {inspect}"))
        .to_string()
}

/// The `tick <n>` numbers in `plugvisor logs NAME`.
fn ticks(daemon: &Daemon, name: &str) -> Vec<u64> {
    daemon
        .cli_ok(&["logs", name, "--tail", "5000"])
        .lines()
        .filter_map(|l| l.split("tick ").nth(1))
        .filter_map(|n| {
            let digits: String = n.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// Every kind of plugin at once across a switch: a tenant entry, a bound
/// dependent, a plugin with hooks, a survivor (where cgroups exist). The
/// same processes in the same states with the same identity; no hook runs,
/// no requirement seen going down; the tenant answers with its own config;
/// the survivor's output written after the switch reaches `logs`.
#[test]
fn tenants_dependents_hooks_and_survivors_are_kept_across_a_switch() {
    let sandbox = Sandbox::new();
    let tp = bin("testplugin");
    let shared = sandbox.dir.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let record = shared.join("hooks.log");
    std::fs::create_dir_all(sandbox.plugins_dir().join("hooked")).unwrap();
    script(
        &sandbox.plugins_dir().join("hooked"),
        "record.sh",
        &format!(
            "echo \"$PLUGVISOR_HOOK $PLUGVISOR_INSTANCE_ID\" >> {}",
            record.display()
        ),
    );
    sandbox.plugin("base", &tp, "config: {greeting: base}");
    std::fs::write(
        sandbox.dir.path().join("plugvisor.yaml"),
        "plugins:\n  base:\n    tenants:\n      acme: {config: {greeting: acme}}\n",
    )
    .unwrap();
    sandbox.plugin("store", &tp, "");
    sandbox.plugin("api", &tp, "requires: [{name: store, on_crash: restart}]");
    sandbox.plugin(
        "hooked",
        &tp,
        "hooks:\n  \
           pre_start: {command: [./record.sh]}\n  \
           post_ready: {command: [./record.sh]}\n  \
           pre_stop: {command: [./record.sh]}\n  \
           post_exit: {command: [./record.sh]}",
    );
    sandbox.plugin(
        "survivor",
        &tp,
        "args: [--tick-ms, '10']\nsurvive_supervisor: true",
    );
    let config = sandbox.dir.path().join("plugvisor.yaml");
    let daemon = Daemon::start(&sandbox, &["--config", config.to_str().unwrap()]);
    let names = ["base", "base@acme", "store", "api", "hooked", "survivor"];
    for name in names {
        daemon.wait_ready(name);
    }
    wait_until_blocking(Duration::from_secs(10), "pre_start and post_ready", || {
        std::fs::read_to_string(&record).is_ok_and(|r| r.lines().count() >= 2)
    });
    // A survivor needs cgroups; without them it runs as a plain plugin
    // (checked the same), and its output is only checked where it is one.
    let survives = !daemon.log_text().contains("runs without cgroups");
    if survives {
        wait_until_blocking(Duration::from_secs(10), "the survivor's record", || {
            sandbox
                .dir
                .path()
                .join("state/.survivors/survivor-0-1/record.json")
                .exists()
        });
    } else {
        eprintln!("no cgroups here: the survivor's output is not checked");
    }
    let rows = |daemon: &Daemon| -> Vec<(String, i32, String, String)> {
        let mut rows: Vec<_> = daemon
            .ps()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap().to_string(),
                    pid_of(p),
                    p["state"].as_str().unwrap().to_string(),
                    p["sha256"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        rows.sort();
        rows
    };
    let before = rows(&daemon);
    assert_eq!(before.len(), names.len(), "{before:?}");
    assert!(
        before.iter().all(|r| r.1 > 0 && r.2 == "ready"),
        "{before:?}"
    );
    let inspected: Vec<String> = names.iter().map(|n| inspect_sha256(&daemon, n)).collect();
    let hooks_before = std::fs::read_to_string(&record).unwrap();
    let events_before = daemon.cli_ok(&["events", "--json"]).lines().count();
    let ticks_before = ticks(&daemon, "survivor");

    let guard = guards_of(daemon.pid());
    assert_eq!(guard.len(), 1, "one survivors' guard");

    let out = daemon.cli_ok(&["upgrade-self"]);
    assert!(out.contains("upgraded in place"), "{out}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(daemon_info(&daemon, &rt).generation, 1);
    // The guard goes on watching the new image: the same one, no second.
    assert_eq!(guards_of(daemon.pid()), guard);

    for name in names {
        daemon.wait_ready(name);
    }
    assert_eq!(rows(&daemon), before, "pids, states or digests changed");
    let inspected_after: Vec<String> = names.iter().map(|n| inspect_sha256(&daemon, n)).collect();
    assert_eq!(inspected_after, inspected);
    // The tenant answers with its own config, the plugin with its own.
    let greeting = |name: &str| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(&daemon.cli_ok(&["call", name, "config"]))
            .unwrap()["greeting"]
            .clone()
    };
    assert_eq!(greeting("base@acme"), "acme");
    assert_eq!(greeting("base"), "base");
    assert_eq!(
        daemon.cli_ok(&["call", "api", "echo", "--data", "up"]),
        "up"
    );
    // The survivor's output written after the switch reaches `logs`.
    if survives {
        let last = ticks_before.iter().max().copied().unwrap_or(0);
        wait_until_blocking(Duration::from_secs(10), "ticks after the switch", || {
            ticks(&daemon, "survivor").iter().any(|t| *t > last + 50)
        });
        // Each tick once, none missing: read on from exactly where the
        // old image's lines stopped.
        let after = ticks(&daemon, "survivor");
        let expected: Vec<u64> = (0..after.len() as u64).collect();
        assert_eq!(after, expected, "a tick shown twice or lost");
    }
    // A switch is no stop, no exit, no start: no hook ran.
    assert_eq!(std::fs::read_to_string(&record).unwrap(), hooks_before);
    let events = daemon.cli_ok(&["events", "--json"]);
    let new_events: Vec<&str> = events.lines().skip(events_before).collect();
    assert!(
        !events.contains("went down") && !events.contains("is ready again"),
        "{events}"
    );
    assert!(
        new_events
            .iter()
            .all(|e| e.contains("taken over by the new supervisor image")),
        "events other than the take-over: {new_events:#?}"
    );
    assert_eq!(new_events.len(), names.len(), "{new_events:#?}");
}

/// Every replica's pid of `name`, in replica order.
fn replica_pids(daemon: &Daemon, name: &str) -> Vec<i32> {
    daemon.plugin(name)["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(pid_of)
        .collect()
}

/// An autoscaled plugin at two replicas and a remote plugin over mutual
/// TLS across a switch: the replica count and every replica's pid kept;
/// the remote plugin (not a child) connected to again, called through the
/// new image, its process untouched.
#[test]
fn autoscaled_replicas_and_a_remote_mtls_plugin_are_kept_across_a_switch() {
    use plugvisor_integration_tests::tls::Pki;
    use std::io::BufRead;
    let sandbox = Sandbox::new();
    let dir = sandbox.dir.path();
    sandbox.plugin(
        "scaled",
        &bin("testplugin"),
        "replicas: {min: 2, max: 4, scale_up: {in_flight_per_replica: 2}, scale_down: {in_flight_per_replica: 0.5}, cooldown: 1s, interval: 100ms}",
    );
    let pki = Pki::new(dir, "good");
    let daemon_cert = pki.issue("daemon", &["plugvisor-daemon"]);
    let plugin_cert = pki.issue("plugin", &["echo.remote"]);
    let mut remote = KillOnDrop(
        std::process::Command::new(bin("echo-plugin"))
            .env_clear()
            .env("PLUGVISOR_TLS_LISTEN", "127.0.0.1:0")
            .env("PLUGVISOR_TLS_CERT", &plugin_cert.cert)
            .env("PLUGVISOR_TLS_KEY", &plugin_cert.key)
            .env("PLUGVISOR_TLS_CLIENT_CA", &pki.ca)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the remote plugin starts"),
    );
    let mut line = String::new();
    std::io::BufReader::new(remote.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let address = line
        .trim()
        .strip_prefix("plugvisor|1|tls|")
        .unwrap_or_else(|| panic!("a tls handshake line, got {line:?}"))
        .to_string();
    let remote_dir = sandbox.plugins_dir().join("far");
    std::fs::create_dir_all(&remote_dir).unwrap();
    std::fs::write(
        remote_dir.join("plugin.yaml"),
        format!(
            "name: far\nversion: 1.0.0\nremote:\n  address: {address}\n  ca: {}\n  cert: {}\n  key: {}\n  identity: echo.remote\n\
             restart: {{initial_backoff: 100ms, max_backoff: 400ms, max_restarts: 1000}}\n\
             health: {{interval: 200ms, timeout: 500ms}}\ntimeouts: {{start: 2s}}\n",
            pki.ca.display(),
            daemon_cert.cert.display(),
            daemon_cert.key.display()
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("far");
    wait_until_blocking(Duration::from_secs(15), "two ready replicas", || {
        let p = daemon.plugin("scaled");
        let replicas = p["replicas"].as_array().unwrap();
        replicas.len() == 2 && replicas.iter().all(|r| r["state"] == "ready")
    });
    let pids = replica_pids(&daemon, "scaled");
    assert!(
        pids.iter().all(|p| *p > 0) && pids[0] != pids[1],
        "{pids:?}"
    );
    assert_eq!(
        daemon.cli_ok(&["call", "far", "upper", "--data", "before"]),
        "BEFORE"
    );

    let out = daemon.cli_ok(&["upgrade-self"]);
    assert!(out.contains("upgraded in place"), "{out}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(daemon_info(&daemon, &rt).generation, 1);

    // The replicas: the same two processes, ready, still bounded 2-4.
    wait_until_blocking(Duration::from_secs(15), "both replicas ready", || {
        daemon.plugin("scaled")["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["state"] == "ready")
    });
    assert_eq!(replica_pids(&daemon, "scaled"), pids);
    let scaling = daemon.plugin("scaled")["scaling"].clone();
    assert_eq!(scaling["current"], 2, "{scaling}");
    assert_eq!(scaling["min"], 2, "{scaling}");
    assert_eq!(scaling["max"], 4, "{scaling}");
    for _ in 0..4 {
        assert_eq!(
            daemon
                .cli_ok(&["call", "scaled", "echo", "--data", "x"])
                .trim(),
            "x"
        );
    }
    // The remote plugin: connected to again over mTLS and called.
    let far = daemon.wait_ready("far");
    assert_eq!(far["state"], "ready", "{far}");
    assert_eq!(
        daemon.cli_ok(&["call", "far", "upper", "--data", "after"]),
        "AFTER"
    );
    assert!(
        remote.0.try_wait().unwrap().is_none(),
        "the remote plugin's process ended"
    );
}

/// A process of the test's own, killed whatever the test's outcome.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
