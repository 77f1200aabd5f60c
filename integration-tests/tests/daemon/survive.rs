//! `survive_supervisor`: plugins that outlive a SIGKILLed daemon, are
//! re-adopted by the next one with the same pid and no output lost, and are
//! never confused with a stranger that holds a recorded pid.

use plugvisor_integration_tests::{Daemon, Sandbox, bin, is_gone, skip, wait_until_blocking};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

const SECS_10: Duration = Duration::from_secs(10);

fn survivors_dir(sandbox: &Sandbox) -> PathBuf {
    sandbox.dir.path().join("state/.survivors")
}

fn record_path(sandbox: &Sandbox, instance: &str) -> PathBuf {
    survivors_dir(sandbox).join(instance).join("record.json")
}

/// The pid `ps` shows for `name`.
fn pid_of(daemon: &Daemon, name: &str) -> i32 {
    daemon.plugin(name)["pid"].as_i64().expect("a pid") as i32
}

/// Waits for the record of a ready survivor; `None` (after saying why) when
/// this host cannot make survivors (no cgroups).
fn wait_record(sandbox: &Sandbox, daemon: &Daemon, instance: &str) -> Option<serde_json::Value> {
    let path = record_path(sandbox, instance);
    let mut found = None;
    let deadline = std::time::Instant::now() + SECS_10;
    loop {
        if daemon.log_text().contains("runs without cgroups") {
            break;
        }
        found = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if found.is_some() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no record {} within 10s:\n{}",
            path.display(),
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    if found.is_none() {
        skip("the daemon runs without cgroups here, which survivors need");
    }
    found
}

/// The `tick <n>` numbers in `text`.
fn ticks_in(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.split("tick ").nth(1))
        .filter_map(|n| {
            let digits: String = n.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// The `tick <n>` numbers in `plugvisor logs`.
fn ticks(daemon: &Daemon, name: &str) -> Vec<u64> {
    ticks_in(&daemon.cli_ok(&["logs", name, "--tail", "5000"]))
}

fn stranger() -> Child {
    Command::new("sleep")
        .arg("1000")
        .spawn()
        .expect("a stranger process")
}

/// `/proc/<pid>/stat` field 22.
fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    rest.split_whitespace().nth(19).unwrap().parse().unwrap()
}

fn forge(sandbox: &Sandbox, instance: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = record_path(sandbox, instance);
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut record);
    std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();
}

#[test]
fn survivors_are_readopted_after_a_daemon_sigkill_with_no_output_lost() {
    let sandbox = Sandbox::new();
    sandbox.plugin(
        "tp",
        &bin("testplugin"),
        "args: [--tick-ms, '10']\nsurvive_supervisor: true",
    );
    sandbox.plugin("echo", &bin("echo-plugin"), "");
    let mut daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("tp");
    daemon.wait_ready("echo");
    let Some(record) = wait_record(&sandbox, &daemon, "tp-0-1") else {
        return;
    };
    let survivor = pid_of(&daemon, "tp");
    let plain = pid_of(&daemon, "echo");
    assert_eq!(record["pid"].as_i64(), Some(survivor as i64));

    daemon.stop_with(libc::SIGKILL);
    // What the first daemon read, as its log re-emitted it.
    let before = ticks_in(&daemon.log_text());
    assert!(!before.is_empty(), "the first daemon logged no tick");
    // The plugin without the option dies with the daemon, as before.
    wait_until_blocking(Duration::from_secs(1), "echo to die", || is_gone(plain));
    // The survivor keeps writing to its output with nobody reading it: wait
    // until it has written well past what the dead daemon read.
    let out = survivors_dir(&sandbox).join("tp-0-1/stdout");
    let read = std::fs::read_to_string(survivors_dir(&sandbox).join("tp-0-1/stdout.offset"))
        .map_or(0, |s| s.trim().parse::<u64>().unwrap_or(0));
    wait_until_blocking(SECS_10, "output written while unsupervised", || {
        std::fs::metadata(&out).is_ok_and(|m| m.len() > read + 30 * 8)
    });
    assert!(
        !is_gone(survivor),
        "the survivor died without its supervisor"
    );

    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("tp");
    assert_eq!(
        pid_of(&daemon, "tp"),
        survivor,
        "the same process is re-adopted"
    );
    daemon.wait_ready("echo");
    assert_ne!(pid_of(&daemon, "echo"), plain);
    let events = daemon.cli_ok(&["events", "--json"]);
    assert!(events.contains("re-adopted pid"), "{events}");
    let tp_inits = events
        .lines()
        .filter(|l| l.contains("\"tp-0-1\"") && l.contains("calling Initialize"))
        .count();
    assert_eq!(tp_inits, 0, "Initialize is not sent again: {events}");
    // Calls reach it over the re-checked socket.
    assert_eq!(daemon.cli_ok(&["call", "tp", "echo", "--data", "hi"]), "hi");
    // Where it runs in a PID namespace of its own, its pid there differs
    // from the one recorded and checked (the daemon's view).
    let ids: serde_json::Value =
        serde_json::from_str(&daemon.cli_ok(&["call", "tp", "pid_info"])).unwrap();
    assert_eq!(ids["host_pid"].as_i64(), Some(survivor as i64), "{ids}");
    if ids["pid"].as_i64() != Some(survivor as i64) {
        eprintln!("the survivor runs in its own PID namespace: {ids}");
    }
    // Every tick, from the first, written before, during and after the gap.
    let mut seen = Vec::new();
    let last_before = *before.iter().max().unwrap();
    wait_until_blocking(SECS_10, "ticks after the re-adoption", || {
        seen = ticks(&daemon, "tp");
        seen.iter().max().is_some_and(|m| *m > last_before + 100)
    });
    // The second daemon went on from where the first stopped reading.
    assert!(
        seen.iter().min().is_some_and(|m| *m <= last_before + 1),
        "{last_before} {seen:?}"
    );
    seen.extend(before);
    let max = *seen.iter().max().unwrap();
    let missing: Vec<u64> = (0..=max).filter(|n| !seen.contains(n)).collect();
    assert!(missing.is_empty(), "lines lost: {missing:?}");

    // Its end is seen through its pidfd (it is not the daemon's child), and
    // it is restarted as a survivor again.
    // SAFETY: kill(2) of the plugin process this test saw re-adopted.
    unsafe { libc::kill(survivor, libc::SIGKILL) };
    let mut restarted = 0;
    wait_until_blocking(SECS_10, "a restart after the adopted one died", || {
        restarted = daemon.plugin("tp")["pid"].as_i64().unwrap_or(0) as i32;
        restarted != 0 && restarted != survivor && daemon.plugin("tp")["state"] == "ready"
    });
    let events = daemon.cli_ok(&["events", "--json"]);
    assert!(events.contains("status unknown: not our child"), "{events}");
    assert!(!record_path(&sandbox, "tp-0-1").exists());
    wait_record(&sandbox, &daemon, "tp-0-2");

    // An operator's shutdown stops survivors too.
    let mut daemon = daemon;
    daemon.stop_with(libc::SIGTERM);
    wait_until_blocking(SECS_10, "the survivor to stop", || is_gone(restarted));
    assert!(!record_path(&sandbox, "tp-0-2").exists());
}

#[test]
fn a_stranger_with_a_recorded_pid_is_neither_adopted_nor_signalled() {
    let sandbox = Sandbox::new();
    for name in ["sa", "sb", "sc"] {
        sandbox.plugin(name, &bin("testplugin"), "survive_supervisor: true");
    }
    let mut daemon = Daemon::start(&sandbox, &[]);
    for name in ["sa", "sb", "sc"] {
        daemon.wait_ready(name);
    }
    if wait_record(&sandbox, &daemon, "sa-0-1").is_none() {
        return;
    }
    wait_record(&sandbox, &daemon, "sb-0-1");
    wait_record(&sandbox, &daemon, "sc-0-1");
    let old: Vec<i32> = ["sa", "sb", "sc"]
        .iter()
        .map(|n| pid_of(&daemon, n))
        .collect();
    daemon.stop_with(libc::SIGKILL);

    // sa's pid now "belongs" to a stranger that started at another time.
    let mut s1 = stranger();
    forge(&sandbox, "sa-0-1", |r| r["pid"] = s1.id().into());
    // sb's to one with the very start time and uid recorded (as if the pid
    // were reused at the same tick): only the cgroup tells them apart.
    let mut s2 = stranger();
    let s2_time = start_time(s2.id());
    forge(&sandbox, "sb-0-1", |r| {
        r["pid"] = s2.id().into();
        r["start_time"] = s2_time.into();
        r["uid"] = 0.into();
    });
    // sc exited while nobody supervised it.
    // SAFETY: kill(2) of the plugin process this test saw started.
    unsafe { libc::kill(old[2], libc::SIGKILL) };
    wait_until_blocking(SECS_10, "sc to exit", || is_gone(old[2]));

    let daemon = Daemon::start(&sandbox, &[]);
    for name in ["sa", "sb", "sc"] {
        daemon.wait_ready(name);
    }
    let new: Vec<i32> = ["sa", "sb", "sc"]
        .iter()
        .map(|n| pid_of(&daemon, n))
        .collect();
    for (i, name) in ["sa", "sb", "sc"].iter().enumerate() {
        assert_ne!(new[i], old[i], "{name} was adopted");
    }
    assert!(!new.contains(&(s1.id() as i32)) && !new.contains(&(s2.id() as i32)));
    assert!(
        s1.try_wait().unwrap().is_none(),
        "the first stranger was signalled"
    );
    assert!(
        s2.try_wait().unwrap().is_none(),
        "the second stranger was signalled"
    );
    let events = daemon.cli_ok(&["events", "--json"]);
    assert!(events.contains("another process has its pid"), "{events}");
    assert!(events.contains("is not in the plugin's cgroup"), "{events}");
    assert!(events.contains("is gone"), "{events}");
    // The real survivors the records no longer named are ours, in our
    // cgroups: they went with those cgroups.
    wait_until_blocking(SECS_10, "the unadopted survivors to go", || {
        is_gone(old[0]) && is_gone(old[1])
    });
    for mut s in [s1, s2] {
        let _ = s.kill();
        let _ = s.wait();
    }
}

#[test]
fn two_daemons_never_share_the_survivors() {
    let sandbox = Sandbox::new();
    sandbox.plugin("echo", &bin("echo-plugin"), "");
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("echo");
    // Same state dir, another runtime dir and control socket.
    let out = Command::new(bin("plugvisor"))
        .arg("--control")
        .arg(sandbox.dir.path().join("other.sock"))
        .arg("run")
        .arg("--plugins-dir")
        .arg(sandbox.plugins_dir())
        .arg("--runtime-dir")
        .arg(sandbox.dir.path().join("run2"))
        .arg("--state-dir")
        .arg(sandbox.dir.path().join("state"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another supervisor uses this state directory"),
        "{err}"
    );
}

#[test]
fn the_guard_kills_a_survivor_left_unsupervised_past_its_bound() {
    let sandbox = Sandbox::new();
    sandbox.plugin(
        "tp",
        &bin("testplugin"),
        "survive_supervisor: {max_unsupervised: 1s}",
    );
    let mut daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("tp");
    if wait_record(&sandbox, &daemon, "tp-0-1").is_none() {
        return;
    }
    let survivor = pid_of(&daemon, "tp");
    daemon.stop_with(libc::SIGKILL);
    // It is still there right after the daemon died...
    assert!(!is_gone(survivor));
    // ...and goes at its bound, killed by the guard the daemon left.
    let deadline = std::time::Instant::now() + SECS_10;
    while !is_gone(survivor) {
        assert!(
            std::time::Instant::now() < deadline,
            "the guard did not kill the survivor:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = daemon.log_text();
    assert!(log.contains("its max_unsupervised: killing pid"), "{log}");
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("tp");
    assert_ne!(pid_of(&daemon, "tp"), survivor);
    let events = daemon.cli_ok(&["events", "--json"]);
    assert!(events.contains("is gone"), "{events}");
}

#[test]
fn a_flood_while_unsupervised_is_bounded_and_said() {
    let sandbox = Sandbox::new();
    sandbox.plugin(
        "tp",
        &bin("testplugin"),
        "args: [--tick-ms, '0']\nsurvive_supervisor: {max_output: 64KiB}",
    );
    let mut daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("tp");
    if wait_record(&sandbox, &daemon, "tp-0-1").is_none() {
        return;
    }
    let survivor = pid_of(&daemon, "tp");
    daemon.stop_with(libc::SIGKILL);
    let dir = survivors_dir(&sandbox).join("tp-0-1");
    let dropped = |stream: &str| {
        std::fs::read_to_string(dir.join(format!("{stream}.dropped")))
            .map_or(0, |s| s.trim().parse::<u64>().unwrap_or(0))
    };
    let before = dropped("stdout");
    // The guard trims what nobody reads.
    wait_until_blocking(SECS_10, "the guard to drop unread output", || {
        dropped("stdout") > before + (1 << 20)
    });
    // And gives the space back: what the file takes on disk stays far
    // below what was written into it.
    use std::os::unix::fs::MetadataExt;
    let mut seen = (0, 0);
    wait_until_blocking(SECS_10, "the dropped output's space to be freed", || {
        let meta = std::fs::metadata(dir.join("stdout")).unwrap();
        seen = (meta.blocks() * 512, meta.len());
        seen.1 > 4 << 20 && seen.0 < seen.1 / 4
    });
    assert!(!is_gone(survivor), "the flooding survivor died");
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("tp");
    assert_eq!(pid_of(&daemon, "tp"), survivor);
    wait_until_blocking(SECS_10, "the drop to be said in its log", || {
        daemon
            .cli_ok(&["logs", "tp", "--tail", "5000"])
            .contains("dropped unread")
    });
}
