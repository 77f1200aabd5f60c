//! The operator's surface, end to end with the real daemon: sd_notify under a
//! fake systemd, the systemd unit checked by `systemd-analyze`, the control
//! socket's credential check, shell completions, a plugin flooding its
//! output, and the container image built and run with podman.
//!
//! Tests that need what this machine lacks (root, systemd-analyze, podman)
//! print `SKIP: <reason>` and return.

use plugvisor_integration_tests::{Daemon, Sandbox, bin, wait_until_blocking};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECS_10: Duration = Duration::from_secs(10);
/// uid and gid of `nobody` / `nogroup` on Debian.
const NOBODY: u32 = 65534;

use plugvisor_integration_tests::skip;

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The repository's root (this crate is `<repo>/integration-tests`).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration-tests sits in the repository")
        .to_path_buf()
}

/// True when `program --version` runs.
fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// ---------------------------------------------------------------- sd_notify

/// A fake systemd: the datagram socket `$NOTIFY_SOCKET` points at, read by a
/// thread that records every message with the time it arrived.
struct NotifySocket {
    path: PathBuf,
    messages: Arc<Mutex<Vec<(Instant, String)>>>,
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl NotifySocket {
    fn bind(path: PathBuf) -> NotifySocket {
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let messages = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (messages, stop) = (messages.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(n) = socket.recv(&mut buf) {
                        let message = text(&buf[..n]);
                        messages.lock().unwrap().push((Instant::now(), message));
                    }
                }
            })
        };
        NotifySocket {
            path,
            messages,
            stop,
            reader: Some(reader),
        }
    }

    fn messages(&self) -> Vec<(Instant, String)> {
        self.messages.lock().unwrap().clone()
    }

    /// Waits for a message with `line` as one of its lines and returns it.
    fn wait_for(&self, line: &str, timeout: Duration) -> (Instant, String) {
        let mut found = None;
        wait_until_blocking(timeout, &format!("`{line}` on NOTIFY_SOCKET"), || {
            found = self
                .messages()
                .into_iter()
                .find(|(_, m)| m.lines().any(|l| l == line));
            found.is_some()
        });
        found.expect("found above")
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

#[test]
fn tells_systemd_ready_status_watchdog_and_stopping() {
    let sandbox = Sandbox::new();
    sandbox.plugin("echo", &bin("echo-plugin"), "");
    let systemd = NotifySocket::bind(sandbox.dir.path().join("notify.sock"));
    let mut daemon = Daemon::start_with(&sandbox, &[], |command| {
        command
            .env("NOTIFY_SOCKET", &systemd.path)
            .env("WATCHDOG_USEC", "200000")
            .env_remove("WATCHDOG_PID");
    });

    let (ready_at, ready) = systemd.wait_for("READY=1", SECS_10);
    assert!(
        ready.lines().any(|l| l.starts_with("STATUS=")),
        "READY=1 comes with a STATUS=: {ready:?}"
    );
    // WATCHDOG_USEC=200000: a ping every 100 ms, so two well within a second.
    let pings = || -> Vec<Instant> {
        systemd
            .messages()
            .into_iter()
            .filter(|(at, m)| *at >= ready_at && m.lines().any(|l| l == "WATCHDOG=1"))
            .map(|(at, _)| at)
            .collect()
    };
    wait_until_blocking(SECS_10, "two WATCHDOG=1 pings", || pings().len() >= 2);
    let first_two = pings()[1] - ready_at;
    assert!(
        first_two < Duration::from_secs(1),
        "the second ping came {first_two:?} after READY=1; expected every 100 ms"
    );
    // STATUS= follows the plugins.
    daemon.wait_ready("echo");
    systemd.wait_for("STATUS=1/1 plugin(s) up", SECS_10);

    let status = daemon.stop_with(libc::SIGTERM);
    assert!(status.success(), "the daemon exited with {status}");
    let (_, stopping) = systemd.wait_for("STOPPING=1", SECS_10);
    assert!(stopping.contains("STATUS=stopping"), "{stopping:?}");
    let all: Vec<String> = systemd.messages().into_iter().map(|(_, m)| m).collect();
    eprintln!(
        "sd_notify: {} messages, {} pings; first: {:?}",
        all.len(),
        pings().len(),
        &all[..all.len().min(3)]
    );
}

// ------------------------------------------------------------- systemd unit

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    if !have("systemd-analyze") {
        return skip("systemd-analyze is not installed (Debian: the `systemd` package)");
    }
    let unit = std::fs::read_to_string(repo().join("docker/plugvisor.service"))
        .expect("docker/plugvisor.service");
    for setting in [
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=",
        "Delegate=yes",
    ] {
        assert!(
            unit.lines().any(|l| l.starts_with(setting)),
            "the unit lacks {setting}"
        );
    }
    // systemd-analyze checks that ExecStart's program exists: point it at
    // the binary just built instead of the installed path.
    const INSTALLED: &str = "ExecStart=/usr/local/bin/plugvisor ";
    assert!(unit.contains(INSTALLED), "ExecStart changed: {unit}");
    let built = format!("ExecStart={} ", bin("plugvisor").display());
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("plugvisor.service");
    std::fs::write(&path, unit.replace(INSTALLED, &built)).expect("write the unit");

    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze runs");
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    assert!(
        !stderr.contains("plugvisor.service"),
        "systemd-analyze verify warns about the unit: {stderr}"
    );
}

// --------------------------------------------------- control socket access

/// Runs the CLI (a copy in the sandbox, which nobody may read) as `uid`/`gid`.
fn cli_as(daemon: &Daemon, cli: &Path, uid: u32, gid: u32, args: &[&str]) -> Output {
    Command::new(cli)
        .arg("--control")
        .arg(&daemon.control)
        .args(args)
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::null())
        .output()
        .expect("the CLI runs")
}

/// A sandbox that user `nobody` can reach: its directory opened to others
/// (sockets stay guarded by their own modes), with a copy of the CLI.
fn sandbox_for_nobody() -> (Sandbox, PathBuf) {
    let sandbox = Sandbox::new();
    std::fs::set_permissions(sandbox.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod the sandbox");
    let cli = sandbox.dir.path().join("plugvisor-cli");
    std::fs::copy(bin("plugvisor"), &cli).expect("copy the CLI");
    sandbox.plugin("echo", &bin("echo-plugin"), "");
    (sandbox, cli)
}

fn make_world_connectable(daemon: &Daemon) {
    std::fs::set_permissions(&daemon.control, std::fs::Permissions::from_mode(0o666))
        .expect("chmod the control socket");
}

#[test]
fn control_socket_refuses_users_not_allowed_and_admits_configured_ones() {
    if !is_root() {
        return skip("running the CLI as another user needs root");
    }
    let (sandbox, cli) = sandbox_for_nobody();
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("echo");
    let mode = std::fs::metadata(&daemon.control)
        .expect("the control socket exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "control socket mode {mode:o}");

    // 0660 stops nobody at connect(2) already.
    let out = cli_as(&daemon, &cli, NOBODY, NOBODY, &["ps"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    // World-connectable, the credential check is what refuses it.
    make_world_connectable(&daemon);
    for args in [&["ps"][..], &["call", "echo", "upper", "--data", "hi"]] {
        let out = cli_as(&daemon, &cli, NOBODY, NOBODY, args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        assert!(
            stderr.to_lowercase().contains("permission denied"),
            "{args:?}: {stderr}"
        );
        assert!(
            stderr.contains("uid 65534") && stderr.contains("control_uids"),
            "says who was refused and how to allow them: {stderr}"
        );
    }
    // Root still may.
    assert!(daemon.cli_ok(&["ps"]).contains("echo"));
    drop(daemon);

    for allow in ["control_uids: [65534]", "control_gids: [65534]"] {
        let config = sandbox.dir.path().join("plugvisor.yaml");
        std::fs::write(&config, format!("{allow}\n")).expect("write the config");
        let daemon = Daemon::start(&sandbox, &["--config", config.to_str().unwrap()]);
        daemon.wait_ready("echo");
        if allow.starts_with("control_uids") {
            make_world_connectable(&daemon);
        } else {
            // An allowed group gets the socket (mode 0660) itself.
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(&daemon.control).expect("the control socket");
            assert_eq!(
                (meta.gid(), meta.mode() & 0o777),
                (NOBODY, 0o660),
                "{allow}"
            );
        }
        let out = cli_as(&daemon, &cli, NOBODY, NOBODY, &["ps"]);
        assert!(out.status.success(), "{allow}: {out:?}");
        assert!(text(&out.stdout).contains("echo"), "{out:?}");
        let out = cli_as(
            &daemon,
            &cli,
            NOBODY,
            NOBODY,
            &["call", "echo", "upper", "--data", "hi"],
        );
        assert_eq!(text(&out.stdout), "HI", "{allow}: {out:?}");
    }
}

/// A group no account here has as its primary group.
const EXTRA_GROUP: u32 = 4242;

/// Runs the CLI as `nobody` with primary group `nobody` and exactly the
/// supplementary groups `groups`.
fn cli_as_nobody_in(daemon: &Daemon, cli: &Path, groups: &[u32], args: &[&str]) -> Output {
    let groups: Vec<libc::gid_t> = groups.to_vec();
    let mut command = Command::new(cli);
    command
        .arg("--control")
        .arg(&daemon.control)
        .args(args)
        .stdin(Stdio::null());
    // SAFETY: the closure only makes the setgroups(2), setgid(2) and
    // setuid(2) system calls on memory allocated before the fork, all
    // async-signal-safe; the order drops root last, after the groups are set.
    // (`Command::uid` would clear the supplementary groups after this ran.)
    unsafe {
        command.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.output().expect("the CLI runs")
}

#[test]
fn control_socket_admits_a_user_through_a_supplementary_group() {
    if !is_root() {
        return skip("running the CLI as another user with other groups needs root");
    }
    let (sandbox, cli) = sandbox_for_nobody();
    let config = sandbox.dir.path().join("plugvisor.yaml");
    std::fs::write(&config, format!("control_gids: [{EXTRA_GROUP}]\n")).expect("write the config");
    let daemon = Daemon::start(&sandbox, &["--config", config.to_str().unwrap()]);
    daemon.wait_ready("echo");

    // The group reaches the 0660 socket and passes the credential check,
    // though SO_PEERCRED names only the primary group, nobody.
    let out = cli_as_nobody_in(&daemon, &cli, &[EXTRA_GROUP], &["ps"]);
    assert!(
        out.status.success(),
        "{out:?}\ndaemon log:\n{}",
        daemon.log_text()
    );
    assert!(text(&out.stdout).contains("echo"), "{out:?}");
    let out = cli_as_nobody_in(
        &daemon,
        &cli,
        &[27, EXTRA_GROUP],
        &["call", "echo", "upper", "--data", "hi"],
    );
    assert_eq!(text(&out.stdout), "HI", "{out:?}");

    // Without the group, the socket's mode refuses the connection...
    let out = cli_as_nobody_in(&daemon, &cli, &[], &["ps"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // ...and, world-connectable, so does the credential check.
    make_world_connectable(&daemon);
    let out = cli_as_nobody_in(&daemon, &cli, &[27], &["ps"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr.to_lowercase().contains("permission denied") && stderr.contains("uid 65534"),
        "{stderr}"
    );
}

// ------------------------------------------------------- shell completions

#[test]
fn completions_are_valid_scripts_that_know_the_subcommands() {
    let completions = |shell: &str| {
        let out = Command::new(bin("plugvisor"))
            .args(["completions", shell])
            .output()
            .expect("the CLI runs");
        assert!(out.status.success(), "completions {shell}: {out:?}");
        text(&out.stdout)
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let bash = completions("bash");
    for verb in ["run", "ps", "inspect", "logs", "call", "completions"] {
        assert!(bash.contains(verb), "bash completion lacks `{verb}`");
    }
    let script = dir.path().join("plugvisor.bash");
    std::fs::write(&script, &bash).expect("write the script");
    let out = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .expect("bash runs");
    assert!(out.status.success(), "bash -n: {}", text(&out.stderr));
    // And it completes: `plugvisor in<TAB>` and `plugvisor logs --t<TAB>`.
    let complete = |words: &str, cword: usize| {
        let program = format!(
            "source {}; COMP_WORDS=({words}); COMP_CWORD={cword}; \
             _plugvisor plugvisor \"${{COMP_WORDS[$COMP_CWORD]}}\" \"${{COMP_WORDS[$COMP_CWORD-1]}}\"; \
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display()
        );
        let out = Command::new("bash")
            .args(["-c", &program])
            .output()
            .expect("bash runs");
        text(&out.stdout)
    };
    assert_eq!(complete("plugvisor in", 1).trim(), "inspect");
    assert_eq!(complete("plugvisor logs --t", 2).trim(), "--tail");

    for (shell, check) in [("zsh", ["-n"]), ("fish", ["--no-execute"])] {
        let script = completions(shell);
        assert!(script.contains("inspect"), "{shell} completion");
        if !have(shell) {
            skip(format!(
                "{shell} is not installed; its script's syntax is unchecked"
            ));
            continue;
        }
        let path = dir.path().join(format!("plugvisor.{shell}"));
        std::fs::write(&path, script).expect("write the script");
        let out = Command::new(shell)
            .args(check)
            .arg(&path)
            .output()
            .expect("the shell runs");
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
    }
}

// --------------------------------------------------------------- log flood

/// Resident memory of `pid` in KiB, from `/proc/<pid>/status`.
fn vm_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// What happened while a flood ran.
#[derive(Debug, Default)]
struct DuringFlood {
    /// Calls to the other plugin answered during the flood.
    calls: usize,
    slowest_call: Duration,
    slowest_ps: Duration,
    peak_rss_kib: u64,
    /// The flooder's answer: bytes written and how long it took.
    flood_reply: String,
}

impl std::fmt::Display for DuringFlood {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({} calls to echo meanwhile, slowest {:?}; slowest ps {:?}; daemon RSS peak {} MiB)",
            self.flood_reply,
            self.calls,
            self.slowest_call,
            self.slowest_ps,
            self.peak_rss_kib / 1024
        )
    }
}

/// Runs `plugvisor call flooder METHOD --data MIB` and, until it answers,
/// keeps calling `echo` and listing plugins, timing each.
fn flood_and_measure(daemon: &Daemon, method: &str, mib: u32) -> DuringFlood {
    std::thread::scope(|scope| {
        let flooding = scope.spawn(|| {
            daemon.cli_ok(&[
                "call",
                "flooder",
                method,
                "--data",
                &mib.to_string(),
                "--timeout",
                "300s",
            ])
        });
        let mut during = DuringFlood::default();
        while !flooding.is_finished() {
            let t = Instant::now();
            let payload = format!("ping {}", during.calls);
            assert_eq!(
                daemon.cli_ok(&["call", "echo", "echo", "--data", &payload]),
                payload
            );
            during.slowest_call = during.slowest_call.max(t.elapsed());
            during.calls += 1;
            if during.calls % 5 == 0 {
                let t = Instant::now();
                assert_eq!(daemon.plugin("echo")["state"], "ready");
                during.slowest_ps = during.slowest_ps.max(t.elapsed());
            }
            during.peak_rss_kib = during.peak_rss_kib.max(vm_rss_kib(daemon.pid()));
        }
        during.flood_reply = flooding.join().expect("the flood call");
        during
    })
}

#[test]
fn a_plugin_flooding_its_output_stalls_neither_the_daemon_nor_other_plugins() {
    const FLOOD_MIB: u32 = 64;
    const LINE_MIB: u32 = 32;
    let sandbox = Sandbox::new();
    sandbox.plugin("flooder", &bin("testplugin"), "");
    sandbox.plugin("echo", &bin("echo-plugin"), "");
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("flooder");
    daemon.wait_ready("echo");
    let rss_before = vm_rss_kib(daemon.pid());

    // 64 MiB of ~100-byte lines.
    let lines = flood_and_measure(&daemon, "flood", FLOOD_MIB);
    eprintln!("flood, {FLOOD_MIB} MiB of lines: {lines}");
    let mut tail = String::new();
    wait_until_blocking(SECS_10, "the flood's last line in `logs`", || {
        tail = daemon.cli_ok(&["logs", "flooder", "--tail", "5"]);
        tail.contains("flood done:")
    });
    let tail_lines: Vec<&str> = tail.lines().collect();
    assert_eq!(tail_lines.len(), 5, "{tail}");
    assert!(
        tail_lines[4].contains("stdout flood done:"),
        "the last line is the flood's last: {tail}"
    );
    assert!(tail_lines[3].contains("flood line "), "{tail}");

    // 32 MiB without a single newline: kept as capped pieces.
    let one_line = flood_and_measure(&daemon, "flood_line", LINE_MIB);
    eprintln!("flood, {LINE_MIB} MiB in one line: {one_line}");
    wait_until_blocking(SECS_10, "the long line in `logs`", || {
        tail = daemon.cli_ok(&["logs", "flooder", "--tail", "5"]);
        tail.lines().filter(|l| l.ends_with("xxxx")).count() == 5
    });
    for line in tail.lines() {
        assert!(
            line.len() <= plugvisor::logs::MAX_LINE + 64,
            "a log line of {} bytes",
            line.len()
        );
    }

    let rss_after = vm_rss_kib(daemon.pid());
    let peak = lines.peak_rss_kib.max(one_line.peak_rss_kib).max(rss_after);
    eprintln!(
        "daemon RSS: {} MiB before, {} MiB peak, {} MiB after",
        rss_before / 1024,
        peak / 1024,
        rss_after / 1024
    );
    for during in [&lines, &one_line] {
        assert!(
            during.calls >= 1,
            "no call overlapped the flood: {during:?}"
        );
        assert!(
            during.slowest_call < Duration::from_secs(1),
            "a call took {:?} during the flood",
            during.slowest_call
        );
        assert!(
            during.slowest_ps < Duration::from_secs(1),
            "ps took {:?} during the flood",
            during.slowest_ps
        );
    }
    assert!(
        peak < 200 * 1024,
        "the daemon grew to {} MiB (from {} MiB)",
        peak / 1024,
        rss_before / 1024
    );
    assert_eq!(daemon.plugin("flooder")["restarts"], 0);
}

// ---------------------------------------------------------------- container

/// Exit code of `docker/test-container.sh` when containers cannot run here.
const CONTAINER_SKIP: i32 = 77;
const CONTAINER_DEADLINE: Duration = Duration::from_secs(300);

#[test]
fn container_image_runs_the_daemon_with_plugins_from_a_volume() {
    if !have("podman") {
        return skip("podman is not installed (Debian: apt-get install podman runc debootstrap)");
    }
    let bin_dir = bin("plugvisor")
        .parent()
        .expect("binaries have a directory")
        .to_path_buf();
    let log = tempfile::NamedTempFile::new().expect("a log file");
    let started = Instant::now();
    let mut script = Command::new(repo().join("docker/test-container.sh"))
        .arg(&bin_dir)
        .stdin(Stdio::null())
        .stdout(log.reopen().expect("log"))
        .stderr(log.reopen().expect("log"))
        // Its own process group, so a deadline stops podman and debootstrap too.
        .process_group(0)
        .spawn()
        .expect("docker/test-container.sh runs");
    let status = loop {
        if let Some(status) = script.try_wait().expect("wait for the script") {
            break Some(status);
        }
        if started.elapsed() > CONTAINER_DEADLINE {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let status = status.unwrap_or_else(|| {
        // SIGTERM lets the script's trap remove its container and image.
        let group = -(script.id() as i32);
        // SAFETY: signals the process group of the script this test spawned.
        unsafe { libc::kill(group, libc::SIGTERM) };
        let grace = Instant::now();
        while script.try_wait().expect("wait").is_none() && grace.elapsed() < SECS_10 * 3 {
            std::thread::sleep(Duration::from_millis(100));
        }
        // SAFETY: as above; whatever is left of the group is killed.
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = script.wait();
        panic!(
            "docker/test-container.sh took over {CONTAINER_DEADLINE:?}:\n{}",
            std::fs::read_to_string(log.path()).unwrap_or_default()
        );
    });
    let output = std::fs::read_to_string(log.path()).unwrap_or_default();
    if status.code() == Some(CONTAINER_SKIP) {
        let reason = output.lines().rfind(|l| l.starts_with("SKIP: "));
        return skip(reason.map_or("docker/test-container.sh skipped", |l| &l[6..]));
    }
    assert!(
        status.success(),
        "docker/test-container.sh: {status}\n{output}"
    );
    // The script checked `plugvisor ps` in the container; show it too.
    assert!(
        output
            .lines()
            .any(|l| l.starts_with("echo ") && l.contains("ready")),
        "{output}"
    );
    assert!(
        output
            .lines()
            .any(|l| l.starts_with("kv ") && l.contains("ready")),
        "{output}"
    );
    eprintln!(
        "container test took {:.1}s:\n{output}",
        started.elapsed().as_secs_f64()
    );
}
