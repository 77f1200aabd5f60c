//! Pre-start: after a crash of a ready instance, its successor is spawned
//! and handshaken during the backoff and initialized once the backoff has
//! elapsed. A plugin that fails before it is ready gets the whole backoff
//! with nothing running; every order during the backoff (stop, restart,
//! upgrade, config change, shutdown) kills the standby and leaves neither a
//! process nor a cgroup behind.

use plugvisor::isolation::fs::HostFs;
use plugvisor::isolation::{CgroupMode, ProbeOptions, probe};
use plugvisor::{Event, PluginState, Supervisor, SupervisorOptions};
use plugvisor_integration_tests::{Sandbox, bin, is_gone, next_event, wait_state, wait_until};
use prost::bytes::Bytes;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::broadcast::Receiver;

const SECS_10: Duration = Duration::from_secs(10);
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Long enough to act during it, short enough for a quick test.
const LONG: &str = "restart: {initial_backoff: 3s, max_backoff: 3s, multiplier: 1.0, jitter: 0.0}";

fn tp() -> PathBuf {
    bin("testplugin")
}

/// A supervisor with real cgroups when this machine has them (root, every
/// controller), so that a leaked cgroup would be seen; without, processes
/// are still checked.
fn supervisor(sandbox: &Sandbox, what: &str) -> (Supervisor, bool) {
    static N: AtomicU32 = AtomicU32::new(0);
    let mut opts = SupervisorOptions::new(sandbox.runtime_dir());
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let parent = format!(
        "plugvisor-test-prestart-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let usable = root
        && probe(&ProbeOptions {
            fs: Arc::new(HostFs),
            root: CGROUP_ROOT.into(),
            proc_root: "/proc".into(),
            parent: parent.clone(),
            pid: std::process::id() as i32,
        })
        .is_ok_and(|t| {
            let c = t.controllers();
            c.memory && c.cpu && c.pids
        });
    if usable {
        opts.isolation.cgroups = CgroupMode::Probe {
            root: CGROUP_ROOT.into(),
            parent,
            require: true,
        };
    } else {
        eprintln!("prestart/{what}: no usable cgroups here; checking processes only");
    }
    (
        Supervisor::new(opts).expect("the supervisor starts"),
        usable,
    )
}

/// The cgroup directories `pid` is in (one per v1 hierarchy, or the v2
/// one), other than the root.
fn cgroups_of(pid: i32) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            if path == "/" || !path.contains("plugvisor-test-prestart") {
                return None;
            }
            let hierarchy = match controllers {
                "" => String::new(),
                c => c
                    .split(',')
                    .find(|c| *c == "pids" || *c == "memory")?
                    .to_string(),
            };
            Some(PathBuf::from(CGROUP_ROOT).join(hierarchy).join(&path[1..]))
        })
        .collect()
}

/// Kills the ready instance of `name` and returns its pid, the instant
/// before the kill, and the `backoff` event that followed.
async fn crash(
    sup: &Supervisor,
    events: &mut Receiver<Event>,
    name: &str,
) -> (i32, Instant, Event) {
    sup.wait_ready(name, SECS_10).await.unwrap();
    let pid = sup.info(name).unwrap().pid.unwrap();
    let before = Instant::now();
    // SAFETY: signals the plugin process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let backoff = wait_state(events, name, PluginState::Backoff, SECS_10).await;
    assert!(
        backoff.reason.contains("killed by SIGKILL"),
        "{}",
        backoff.reason
    );
    (pid, before, backoff)
}

/// Waits for the standby of `name` to be handshaken during the backoff:
/// its `starting` events, and its pid.
async fn standby(events: &mut Receiver<Event>, name: &str) -> (Event, i32) {
    let spawning = wait_state(events, name, PluginState::Starting, SECS_10).await;
    assert!(
        spawning.reason.contains("during the backoff"),
        "the next instance is started during the backoff: {}",
        spawning.reason
    );
    let handshaken = wait_state(events, name, PluginState::Starting, SECS_10).await;
    assert!(
        handshaken
            .reason
            .contains("Initialize when the backoff has elapsed"),
        "{}",
        handshaken.reason
    );
    assert_eq!(handshaken.instance, spawning.instance);
    let pid = handshaken.detail.pid.expect("the standby's pid");
    assert!(!is_gone(pid), "the standby {pid} runs");
    (spawning, pid)
}

async fn pid_of(sup: &Supervisor, name: &str) -> i32 {
    let reply = sup
        .call(name, "pid", Bytes::new(), Default::default(), Some(SECS_10))
        .await
        .unwrap();
    std::str::from_utf8(&reply.payload)
        .unwrap()
        .parse()
        .unwrap()
}

/// Asserts the standby `pid` and its cgroups are gone, and its socket
/// directory.
async fn assert_left_nothing(sandbox: &Sandbox, pid: i32, cgroups: &[PathBuf], instance: &str) {
    assert!(
        is_gone(pid),
        "the standby {pid} was killed before the answer"
    );
    wait_until(SECS_10, "the standby's cgroups to be removed", || {
        cgroups.iter().all(|c| !c.exists())
    })
    .await;
    let dir = sandbox.runtime_dir().join("plugins").join(instance);
    assert!(!dir.exists(), "{} is left behind", dir.display());
}

#[tokio::test]
async fn a_crashed_ready_plugin_is_ready_again_no_earlier_than_the_backoff_via_a_prestarted_instance()
 {
    let sandbox = Sandbox::new();
    let (sup, _) = supervisor(&sandbox, "ready");
    let mut events = sup.events();
    sup.add(
        sandbox.manifest(
            "tp",
            &tp(),
            "restart: {initial_backoff: 400ms, max_backoff: 400ms, multiplier: 1.0, jitter: 0.0}",
        ),
        &Default::default(),
    )
    .unwrap();
    let (old, before, backoff) = crash(&sup, &mut events, "tp").await;
    assert_eq!(backoff.detail.delay, Some(Duration::from_millis(400)));
    let (spawning, standby_pid) = standby(&mut events, "tp").await;
    // Spawned at once, not after the backoff.
    let early = spawning.time.duration_since(backoff.time).unwrap();
    assert!(
        early < Duration::from_millis(200),
        "spawned {early:?} after the crash"
    );
    // While it waits: `starting`, its pid shown, no restart counted twice.
    let info = sup.info("tp").unwrap();
    assert_eq!(info.state, PluginState::Starting);
    assert_eq!(info.pid, Some(standby_pid));
    assert_eq!(info.restarts, 1);
    let initializing = wait_state(&mut events, "tp", PluginState::Initializing, SECS_10).await;
    let initialize_seen = Instant::now();
    assert!(
        initialize_seen - before >= Duration::from_millis(400),
        "Initialize was sent {:?} after the crash, before the 400ms backoff",
        initialize_seen - before
    );
    assert!(
        initializing
            .reason
            .contains("during the backoff; backoff elapsed"),
        "{}",
        initializing.reason
    );
    let ready = wait_state(&mut events, "tp", PluginState::Ready, SECS_10).await;
    assert_eq!(ready.instance, spawning.instance);
    assert!(Instant::now() - before >= Duration::from_millis(400));
    // The instance that serves is the one started during the backoff.
    assert_eq!(pid_of(&sup, "tp").await, standby_pid);
    assert_ne!(standby_pid, old);
    assert!(is_gone(old));
    let info = sup.info("tp").unwrap();
    assert_eq!(info.restarts, 1);
    assert_eq!(info.last_exit.as_deref(), Some("killed by SIGKILL"));
    sup.shutdown().await;
    assert!(is_gone(standby_pid));
}

#[tokio::test]
async fn a_plugin_that_fails_before_ready_waits_out_the_whole_backoff_with_nothing_started() {
    // Exits at start, fails Initialize: neither was ever ready.
    for (name, args) in [
        ("exits", "args: [--exit-immediately, \"7\"]"),
        ("initfails", "args: [--init-fail]"),
    ] {
        let sandbox = Sandbox::new();
        let (sup, _) = supervisor(&sandbox, name);
        let mut events = sup.events();
        sup.add(
            sandbox.manifest(
                name,
                &tp(),
                &format!("{args}\nrestart: {{initial_backoff: 150ms, max_backoff: 150ms, multiplier: 1.0, jitter: 0.0, max_restarts: 100, window: 1m}}"),
            ),
            &Default::default(),
        )
        .unwrap();
        for _ in 0..3 {
            let backoff = wait_state(&mut events, name, PluginState::Backoff, SECS_10).await;
            let start = wait_state(&mut events, name, PluginState::Starting, SECS_10).await;
            assert!(
                !start.reason.contains("during the backoff"),
                "{name}: {}",
                start.reason
            );
            // The backoff counts from the exit, which the event follows by
            // a few microseconds.
            let gap = start.time.duration_since(backoff.time).unwrap();
            assert!(
                gap + Duration::from_millis(2) >= Duration::from_millis(150),
                "{name}: exec {gap:?} after the failure, within the 150ms backoff"
            );
        }
        sup.shutdown().await;
    }
}

#[tokio::test]
async fn stop_during_the_backoff_kills_the_standby_and_its_cgroup() {
    let sandbox = Sandbox::new();
    let (sup, with_cgroups) = supervisor(&sandbox, "stop");
    let mut events = sup.events();
    sup.add(sandbox.manifest("tp", &tp(), LONG), &Default::default())
        .unwrap();
    let (_, _, backoff) = crash(&sup, &mut events, "tp").await;
    let (spawning, pid) = standby(&mut events, "tp").await;
    // A 3s backoff: started 2s before its end (which counts from the exit,
    // a little before the event), not idle for all of it.
    let after = spawning.time.duration_since(backoff.time).unwrap();
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(3),
        "the standby was spawned {after:?} into a 3s backoff"
    );
    let cgroups = cgroups_of(pid);
    assert_eq!(!cgroups.is_empty(), with_cgroups, "{cgroups:?}");
    assert!(cgroups.iter().all(|c| c.exists()));
    sup.stop("tp").await.unwrap();
    assert_left_nothing(&sandbox, pid, &cgroups, &spawning.instance).await;
    let info = sup.info("tp").unwrap();
    assert_eq!(info.state, PluginState::Stopped);
    assert_eq!(info.pid, None);
    // Nothing starts once the backoff would have elapsed.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert_eq!(sup.info("tp").unwrap().state, PluginState::Stopped);
    sup.shutdown().await;
}

#[tokio::test]
async fn restart_during_the_backoff_replaces_the_standby_with_a_fresh_start() {
    let sandbox = Sandbox::new();
    let (sup, _) = supervisor(&sandbox, "restart");
    let mut events = sup.events();
    sup.add(sandbox.manifest("tp", &tp(), LONG), &Default::default())
        .unwrap();
    crash(&sup, &mut events, "tp").await;
    let (spawning, pid) = standby(&mut events, "tp").await;
    let cgroups = cgroups_of(pid);
    let asked = Instant::now();
    sup.restart("tp").await.unwrap();
    assert_left_nothing(&sandbox, pid, &cgroups, &spawning.instance).await;
    sup.wait_ready("tp", SECS_10).await.unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "the backoff was cut short"
    );
    let new = pid_of(&sup, "tp").await;
    assert_ne!(new, pid);
    assert_eq!(sup.info("tp").unwrap().restarts, 1);
    sup.shutdown().await;
}

#[tokio::test]
async fn upgrade_and_config_change_during_the_backoff_kill_the_standby() {
    let sandbox = Sandbox::new();
    let (sup, _) = supervisor(&sandbox, "upgrade");
    let mut events = sup.events();
    sup.add(sandbox.manifest("tp", &tp(), LONG), &Default::default())
        .unwrap();

    // A config change: the standby was started with the old config.
    crash(&sup, &mut events, "tp").await;
    let (spawning, pid) = standby(&mut events, "tp").await;
    let cgroups = cgroups_of(pid);
    let changes = serde_json::json!({"greeting": "changed"});
    sup.set_runtime_config("tp", changes.as_object().unwrap().clone())
        .await
        .unwrap();
    assert_left_nothing(&sandbox, pid, &cgroups, &spawning.instance).await;
    let reply = sup
        .call(
            "tp",
            "config",
            Bytes::new(),
            Default::default(),
            Some(SECS_10),
        )
        .await
        .unwrap();
    let config: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(config["greeting"], "changed");
    assert_ne!(pid_of(&sup, "tp").await, pid);

    // An upgrade: the next start runs the new version, not the standby.
    crash(&sup, &mut events, "tp").await;
    let (spawning, pid) = standby(&mut events, "tp").await;
    let cgroups = cgroups_of(pid);
    let v2 = sandbox.plugin("tp", &tp(), LONG);
    let text = std::fs::read_to_string(&v2).unwrap();
    std::fs::write(&v2, text.replace("version: 1.0.0", "version: 2.0.0")).unwrap();
    sup.upgrade("tp", plugvisor::manifest::Manifest::load(&v2).unwrap())
        .await
        .unwrap();
    assert_left_nothing(&sandbox, pid, &cgroups, &spawning.instance).await;
    let start = next_event(&mut events, "tp", SECS_10, |e| {
        e.state == PluginState::Starting
    })
    .await;
    assert!(
        start.reason.contains(" 2.0.0") && !start.reason.contains("during the backoff"),
        "{}",
        start.reason
    );
    assert_ne!(start.instance, spawning.instance);
    let ready = wait_state(&mut events, "tp", PluginState::Ready, SECS_10).await;
    assert_eq!(ready.instance, start.instance);
    assert_ne!(pid_of(&sup, "tp").await, pid);
    sup.shutdown().await;
}

#[tokio::test]
async fn shutdown_during_the_backoff_kills_the_standby() {
    let sandbox = Sandbox::new();
    let (sup, _) = supervisor(&sandbox, "shutdown");
    let mut events = sup.events();
    sup.add(sandbox.manifest("tp", &tp(), LONG), &Default::default())
        .unwrap();
    crash(&sup, &mut events, "tp").await;
    let (spawning, pid) = standby(&mut events, "tp").await;
    let cgroups = cgroups_of(pid);
    sup.shutdown().await;
    assert_left_nothing(&sandbox, pid, &cgroups, &spawning.instance).await;
}

#[tokio::test]
async fn a_standby_that_dies_during_the_backoff_is_followed_by_the_usual_start() {
    let sandbox = Sandbox::new();
    let (sup, _) = supervisor(&sandbox, "dies");
    let mut events = sup.events();
    sup.add(
        sandbox.manifest(
            "tp",
            &tp(),
            "restart: {initial_backoff: 1s, max_backoff: 1s, multiplier: 1.0, jitter: 0.0}",
        ),
        &Default::default(),
    )
    .unwrap();
    let (_, before, _) = crash(&sup, &mut events, "tp").await;
    let (spawning, pid) = standby(&mut events, "tp").await;
    let cgroups = cgroups_of(pid);
    // SAFETY: signals the standby this test's supervisor started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let noted = wait_state(&mut events, "tp", PluginState::Backoff, SECS_10).await;
    assert!(
        noted
            .reason
            .contains("started during the backoff ended before its Initialize (killed by SIGKILL)"),
        "{}",
        noted.reason
    );
    assert_left_nothing(&sandbox, pid, &cgroups, &spawning.instance).await;
    // The usual start, at the deadline: spawned after the backoff.
    let start = wait_state(&mut events, "tp", PluginState::Starting, SECS_10).await;
    assert!(
        !start.reason.contains("during the backoff"),
        "{}",
        start.reason
    );
    assert!(before.elapsed() >= Duration::from_secs(1));
    sup.wait_ready("tp", SECS_10).await.unwrap();
    assert_ne!(pid_of(&sup, "tp").await, pid);
    // One crash, one restart: the standby's death is no restart.
    assert_eq!(sup.info("tp").unwrap().restarts, 1);
    sup.shutdown().await;
}

#[tokio::test]
async fn prestart_false_starts_nothing_before_the_backoff_has_elapsed() {
    let sandbox = Sandbox::new();
    let (sup, _) = supervisor(&sandbox, "optout");
    let mut events = sup.events();
    sup.add(
        sandbox.manifest(
            "tp",
            &tp(),
            "restart: {initial_backoff: 300ms, max_backoff: 300ms, multiplier: 1.0, jitter: 0.0, prestart: false}",
        ),
        &Default::default(),
    )
    .unwrap();
    let (_, before, _) = crash(&sup, &mut events, "tp").await;
    let start = wait_state(&mut events, "tp", PluginState::Starting, SECS_10).await;
    let started = before.elapsed();
    assert!(
        !start.reason.contains("during the backoff"),
        "{}",
        start.reason
    );
    assert!(
        started >= Duration::from_millis(300),
        "spawned {started:?} after the crash"
    );
    sup.wait_ready("tp", SECS_10).await.unwrap();
    sup.shutdown().await;
}

#[tokio::test]
async fn giving_up_after_max_restarts_leaves_no_standby() {
    let sandbox = Sandbox::new();
    let (sup, _) = supervisor(&sandbox, "giveup");
    let mut events = sup.events();
    sup.add(
        sandbox.manifest(
            "tp",
            &tp(),
            "restart: {initial_backoff: 50ms, max_backoff: 50ms, multiplier: 1.0, jitter: 0.0, max_restarts: 2, window: 1m}",
        ),
        &Default::default(),
    )
    .unwrap();
    for attempt in 1..=2 {
        let (_, _, backoff) = crash(&sup, &mut events, "tp").await;
        assert_eq!(backoff.detail.attempt, Some(attempt));
        // (Its handshake may outlast a 50ms backoff on a busy machine:
        // then Initialize follows it at once, with no event between.)
        let spawning = wait_state(&mut events, "tp", PluginState::Starting, SECS_10).await;
        assert!(
            spawning.reason.contains("during the backoff"),
            "{}",
            spawning.reason
        );
        wait_state(&mut events, "tp", PluginState::Ready, SECS_10).await;
    }
    sup.wait_ready("tp", SECS_10).await.unwrap();
    let pid = sup.info("tp").unwrap().pid.unwrap();
    // SAFETY: signals the plugin process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let failed = wait_state(&mut events, "tp", PluginState::Failed, SECS_10).await;
    assert!(
        failed.reason.contains("more than 2 restarts"),
        "{}",
        failed.reason
    );
    let info = sup.info("tp").unwrap();
    assert_eq!((info.restarts, info.pid), (2, None));
    // Nothing was started after the give-up.
    let history = sup.history("tp").unwrap();
    let last = history.last().unwrap();
    assert_eq!(last.state, PluginState::Failed, "{history:?}");
    sup.shutdown().await;
}
