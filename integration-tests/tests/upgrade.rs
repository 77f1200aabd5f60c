//! Replicas, backpressure and zero-downtime upgrades, with real processes.

use plugvisor::manifest::Manifest;
use plugvisor::{Error, PluginState, Supervisor};
use plugvisor_integration_tests::{Sandbox, bin, is_gone, next_event, wait_state};
use prost::bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const SECS_10: Duration = Duration::from_secs(10);

/// A manifest for `name` at `version` in its own version directory.
fn versioned(
    sandbox: &Sandbox,
    name: &str,
    version: &str,
    exec: &std::path::Path,
    extra: &str,
) -> Manifest {
    let dir = sandbox.plugins_dir().join(name).join(version);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("plugin.yaml");
    std::fs::write(
        &path,
        format!(
            "name: {name}\nversion: {version}\nexec: {}\n{extra}\n",
            exec.display()
        ),
    )
    .unwrap();
    Manifest::load(&path).unwrap()
}

/// Eight callers writing and reading kv until told to stop. Returns the
/// keys whose writes were acknowledged and the failures seen.
struct Load {
    stop: Arc<AtomicBool>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    calls: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(sup: &Supervisor, plugin: &'static str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let calls = Arc::new(AtomicUsize::new(0));
        let tasks = (0..8)
            .map(|caller| {
                let (sup, stop, failures, calls) =
                    (sup.clone(), stop.clone(), failures.clone(), calls.clone());
                tokio::spawn(async move {
                    let mut acknowledged = Vec::new();
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let key = format!("c{caller}-{n}");
                        n += 1;
                        let set = sup
                            .call(
                                plugin,
                                "set",
                                Bytes::from(format!("{key}=v")),
                                HashMap::new(),
                                Some(SECS_10),
                            )
                            .await;
                        calls.fetch_add(1, Ordering::Relaxed);
                        match set {
                            Ok(_) => acknowledged.push(key),
                            Err(e) => failures.lock().unwrap().push(format!("set {key}: {e}")),
                        }
                    }
                    acknowledged
                })
            })
            .collect();
        Load {
            stop,
            failures,
            calls,
            tasks,
        }
    }

    /// Waits until `more` further calls completed, so load runs across an event.
    async fn wait_calls(&self, more: usize) {
        let target = self.calls.load(Ordering::Relaxed) + more;
        let deadline = Instant::now() + SECS_10;
        while self.calls.load(Ordering::Relaxed) < target {
            assert!(Instant::now() < deadline, "the callers stalled");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn finish(self) -> (Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut keys = Vec::new();
        for task in self.tasks {
            keys.extend(task.await.unwrap());
        }
        let failures = self.failures.lock().unwrap().clone();
        (keys, failures)
    }
}

#[tokio::test]
async fn upgrading_kv_v1_to_v2_under_load_drops_no_call_and_carries_the_state() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor_with_state();
    let mut events = sup.events();
    let v1 = versioned(
        &sandbox,
        "kv",
        "1.0.0",
        &bin("kv-plugin"),
        "args: [--state-version, \"1\"]\nupgrade: {probation: 300ms}",
    );
    let v2 = versioned(
        &sandbox,
        "kv",
        "2.0.0",
        &bin("kv-plugin"),
        "upgrade: {probation: 300ms}",
    );
    sup.add(v1, &Default::default()).unwrap();
    wait_state(&mut events, "kv", PluginState::Ready, SECS_10).await;
    let old_pid = sup.info("kv").unwrap().pid.unwrap();

    let load = Load::start(&sup, "kv");
    load.wait_calls(200).await;
    let started = Instant::now();
    sup.upgrade("kv", v2).await.unwrap();
    let took = started.elapsed();
    load.wait_calls(200).await;
    let (keys, failures) = load.finish().await;

    assert!(
        failures.is_empty(),
        "failed calls during the upgrade: {failures:#?}"
    );
    let switched = sup
        .history("kv")
        .unwrap()
        .into_iter()
        .find(|e| e.reason.contains("calls switched after"))
        .expect("an upgrade event");
    println!(
        "upgrade kv 1.0.0 -> 2.0.0 under 8 callers: {} acknowledged writes, 0 failed; {}; upgrade() took {}ms including 300ms probation",
        keys.len(),
        switched.reason,
        took.as_millis()
    );
    let info = sup.info("kv").unwrap();
    assert_eq!(info.version, "2.0.0");
    assert_ne!(info.pid.unwrap(), old_pid);
    assert!(is_gone(old_pid), "the old instance was stopped");
    // Every acknowledged write is there, on the v2 instance, which migrated
    // the v1 state it was handed (revisions start at 1).
    let count: usize = String::from_utf8(
        sup.call("kv", "count", Bytes::new(), HashMap::new(), None)
            .await
            .unwrap()
            .payload
            .to_vec(),
    )
    .unwrap()
    .parse()
    .unwrap();
    assert_eq!(count, keys.len());
    for key in keys.iter().step_by(37) {
        let reply = sup
            .call("kv", "get", Bytes::from(key.clone()), HashMap::new(), None)
            .await
            .unwrap();
        assert_eq!(&reply.payload[..], b"v", "{key}");
    }
    let rev = sup
        .call(
            "kv",
            "rev",
            Bytes::from(keys[0].clone()),
            HashMap::new(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(&rev.payload[..], b"1");
    sup.shutdown().await;
}

#[tokio::test]
async fn a_new_version_that_fails_initialize_is_rolled_back_without_a_failed_call() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor_with_state();
    let v1 = versioned(&sandbox, "kv", "1.0.0", &bin("kv-plugin"), "");
    let broken = versioned(
        &sandbox,
        "kv",
        "2.0.0",
        &bin("testplugin"),
        "args: [--init-fail]",
    );
    sup.add(v1, &Default::default()).unwrap();
    sup.wait_ready("kv", SECS_10).await.unwrap();
    let old_pid = sup.info("kv").unwrap().pid.unwrap();
    let load = Load::start(&sup, "kv");
    load.wait_calls(100).await;
    let err = sup.upgrade("kv", broken).await.unwrap_err();
    assert!(matches!(err, Error::UpgradeFailed { .. }), "{err}");
    assert!(err.to_string().contains("Initialize failed"), "{err}");
    load.wait_calls(100).await;
    let (keys, failures) = load.finish().await;
    assert!(failures.is_empty(), "{failures:#?}");
    let info = sup.info("kv").unwrap();
    assert_eq!(info.version, "1.0.0");
    assert_eq!(info.pid, Some(old_pid), "still the old instance");
    assert!(
        sup.history("kv")
            .unwrap()
            .iter()
            .any(|e| e.reason.contains("rolled back")),
        "the event trail says why"
    );
    let count = sup
        .call("kv", "count", Bytes::new(), HashMap::new(), None)
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&count.payload),
        keys.len().to_string()
    );
    sup.shutdown().await;
}

#[tokio::test]
async fn a_new_version_that_dies_during_probation_hands_calls_back_to_the_old_one() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor_with_state();
    let mut events = sup.events();
    let v1 = versioned(
        &sandbox,
        "tp",
        "1.0.0",
        &bin("testplugin"),
        "idempotent: [echo]",
    );
    let v2 = versioned(
        &sandbox,
        "tp",
        "2.0.0",
        &bin("testplugin"),
        "idempotent: [echo]\nupgrade: {probation: 5s}",
    );
    sup.add(v1, &Default::default()).unwrap();
    wait_state(&mut events, "tp", PluginState::Ready, SECS_10).await;
    let old_pid = sup.info("tp").unwrap().pid.unwrap();
    let upgrading = tokio::spawn({
        let sup = sup.clone();
        async move { sup.upgrade("tp", v2).await }
    });
    // The new instance is published; kill it during its probation.
    let ready = next_event(&mut events, "tp", SECS_10, |e| {
        e.state == PluginState::Ready && e.instance == "tp-0-2"
    })
    .await;
    let new_pid = sup.info("tp").unwrap().pid.unwrap();
    assert_ne!(new_pid, old_pid, "{ready:?}");
    // SAFETY: signals a plugin process this test's supervisor started.
    unsafe { libc::kill(new_pid, libc::SIGKILL) };
    let err = upgrading.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("failed its probation"), "{err}");
    let reply = sup
        .call("tp", "pid", Bytes::new(), HashMap::new(), Some(SECS_10))
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&reply.payload), old_pid.to_string());
    assert_eq!(sup.info("tp").unwrap().version, "1.0.0");
    sup.shutdown().await;
}

#[tokio::test]
async fn replicas_spread_concurrent_calls_to_the_least_loaded() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor_with_state();
    sup.add(
        sandbox.manifest("tp", &bin("testplugin"), "replicas: 3"),
        &Default::default(),
    )
    .unwrap();
    let mut events = sup.events();
    let mut ready = 0;
    while ready < 3 {
        next_event(&mut events, "tp", SECS_10, |e| {
            e.state == PluginState::Ready
        })
        .await;
        ready = sup
            .info("tp")
            .unwrap()
            .replicas
            .iter()
            .filter(|r| r.state == PluginState::Ready)
            .count();
    }
    let info = sup.info("tp").unwrap();
    assert_eq!(info.state, PluginState::Ready);
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let sup = sup.clone();
            tokio::spawn(async move {
                sup.call(
                    "tp",
                    "sleep_pid",
                    "300".into(),
                    HashMap::new(),
                    Some(SECS_10),
                )
                .await
            })
        })
        .collect();
    let mut per_pid: HashMap<String, usize> = HashMap::new();
    for call in calls {
        let reply = call.await.unwrap().unwrap();
        *per_pid
            .entry(String::from_utf8_lossy(&reply.payload).into_owned())
            .or_default() += 1;
    }
    assert_eq!(per_pid.len(), 3, "{per_pid:?}");
    assert!(per_pid.values().all(|n| *n == 2), "{per_pid:?}");
    sup.shutdown().await;
}

#[tokio::test]
async fn replicas_survive_one_crash_without_failing_idempotent_calls() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor_with_state();
    sup.add(
        sandbox.manifest(
            "tp",
            &bin("testplugin"),
            "replicas: 3\nidempotent: [echo]\nrestart: {initial_backoff: 50ms}",
        ),
        &Default::default(),
    )
    .unwrap();
    let mut events = sup.events();
    while sup
        .info("tp")
        .unwrap()
        .replicas
        .iter()
        .any(|r| r.state != PluginState::Ready)
    {
        next_event(&mut events, "tp", SECS_10, |_| true).await;
    }
    let victim = sup.info("tp").unwrap().replicas[1].pid.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let (sup, stop) = (sup.clone(), stop.clone());
            tokio::spawn(async move {
                let mut failures = Vec::new();
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    if let Err(e) = sup
                        .call("tp", "echo", "x".into(), HashMap::new(), Some(SECS_10))
                        .await
                    {
                        failures.push(e.to_string());
                    }
                }
                (n, failures)
            })
        })
        .collect();
    // SAFETY: signals a plugin process this test's supervisor started.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    // Replica 1's second instance: it restarted on its own (start-up's
    // `ready` events may still be queued, so match the instance exactly).
    next_event(&mut events, "tp", SECS_10, |e| {
        e.state == PluginState::Ready && e.instance == "tp-1-2"
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for caller in callers {
        let (n, failures) = caller.await.unwrap();
        total += n;
        assert!(failures.is_empty(), "{failures:#?}");
    }
    assert!(total > 0);
    let info = sup.info("tp").unwrap();
    assert_eq!(info.replicas[1].restarts, 1);
    assert_eq!(info.replicas[0].restarts + info.replicas[2].restarts, 0);
    sup.shutdown().await;
}

#[tokio::test]
async fn a_full_call_queue_answers_resource_exhausted() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor_with_state();
    sup.add(
        sandbox.manifest(
            "tp",
            &bin("testplugin"),
            "calls: {max_in_flight: 2, max_queue: 2}",
        ),
        &Default::default(),
    )
    .unwrap();
    sup.wait_ready("tp", SECS_10).await.unwrap();
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let sup = sup.clone();
            tokio::spawn(async move {
                sup.call("tp", "sleep", "400".into(), HashMap::new(), Some(SECS_10))
                    .await
            })
        })
        .collect();
    let mut ok = 0;
    let mut exhausted = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(
                    tonic::Status::from(e).code(),
                    tonic::Code::ResourceExhausted
                );
                exhausted += 1;
            }
        }
    }
    assert_eq!((ok, exhausted), (4, 2), "2 run, 2 queue, 2 are turned away");
    sup.shutdown().await;
}
