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
        .find(|e| e.reason.contains("calls switched"))
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
                        // A failing call can return without awaiting
                        // anything; let the supervisor's tasks run.
                        tokio::task::yield_now().await;
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

/// The pid of every replica, in replica order.
fn replica_pids(sup: &Supervisor, name: &str) -> Vec<i32> {
    sup.info(name)
        .unwrap()
        .replicas
        .iter()
        .map(|r| r.pid.expect("a running replica"))
        .collect()
}

#[tokio::test]
async fn an_upgrade_that_fails_on_one_replica_rolls_every_replica_back() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    let mut events = sup.events();
    let exec = bin("testplugin");
    let v1 = versioned(&sandbox, "t", "1.0.0", &exec, "replicas: 2");
    // Replica 0 of 2.0.0 starts fine and takes calls; replica 1 fails
    // Initialize, after replica 0 has already switched.
    let v2 = versioned(
        &sandbox,
        "t",
        "2.0.0",
        &exec,
        "replicas: 2\nconfig: {init_fail_replica: 1}\nupgrade: {probation: 0s}",
    );
    sup.add(v1, &Default::default()).unwrap();
    for _ in 0..2 {
        wait_state(&mut events, "t", PluginState::Ready, SECS_10).await;
    }
    let before = replica_pids(&sup, "t");

    let err = sup.upgrade("t", v2).await.unwrap_err();
    assert!(matches!(err, Error::UpgradeFailed { .. }), "{err}");
    assert!(
        err.to_string().contains("all 2 replica(s) run 1.0.0 again"),
        "the reply says which version runs: {err}"
    );
    let info = sup.info("t").unwrap();
    assert_eq!(info.version, "1.0.0", "the plugin still says 1.0.0");
    assert_eq!(
        replica_pids(&sup, "t"),
        before,
        "both replicas are back on their original 1.0.0 instances"
    );
    assert!(
        !sup.config("t").unwrap().contains_key("init_fail_replica"),
        "the rejected config is not kept"
    );
    // Replica 0 said it went back, and why.
    let history = sup.history("t").unwrap();
    assert!(
        history.iter().any(|e| e.replica == 0
            && e.reason.contains("rolled back")
            && e.reason.contains("another replica")),
        "{history:#?}"
    );
    // Calls reach both old instances.
    for _ in 0..4 {
        sup.call("t", "echo", Bytes::from("x"), HashMap::new(), None)
            .await
            .unwrap();
    }
    // A crash-restart brings back 1.0.0 with the old config.
    sup.call("t", "crash", Bytes::new(), HashMap::new(), None)
        .await
        .unwrap_err();
    wait_state(&mut events, "t", PluginState::Backoff, SECS_10).await;
    wait_state(&mut events, "t", PluginState::Ready, SECS_10).await;
    assert_eq!(sup.info("t").unwrap().version, "1.0.0");
    sup.shutdown().await;
}

#[tokio::test]
async fn a_rejected_config_is_rolled_back_even_when_its_caller_goes_away() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    let mut events = sup.events();
    sup.add(
        versioned(&sandbox, "t", "1.0.0", &bin("testplugin"), ""),
        &Default::default(),
    )
    .unwrap();
    wait_state(&mut events, "t", PluginState::Ready, SECS_10).await;
    let pid = sup.info("t").unwrap().pid.unwrap();

    // The caller gives up long before the rollout can finish (Ctrl-C on
    // `plugvisor config`): the rollout goes on without it.
    let mut changes = serde_json::Map::new();
    changes.insert("init_fail_replica".into(), serde_json::json!(0));
    let gave_up = tokio::time::timeout(
        Duration::from_millis(1),
        sup.set_runtime_config("t", changes),
    )
    .await;
    assert!(gave_up.is_err(), "the caller went away mid-rollout");
    next_event(&mut events, "t", SECS_10, |e| {
        e.reason.contains("rolled back")
    })
    .await;
    assert!(
        !sup.config("t").unwrap().contains_key("init_fail_replica"),
        "the rejected config was not kept"
    );
    assert_eq!(
        sup.info("t").unwrap().pid,
        Some(pid),
        "the old instance serves"
    );
    // The next crash-restart starts with the old config, and succeeds.
    sup.call("t", "crash", Bytes::new(), HashMap::new(), None)
        .await
        .unwrap_err();
    wait_state(&mut events, "t", PluginState::Backoff, SECS_10).await;
    wait_state(&mut events, "t", PluginState::Ready, SECS_10).await;
    sup.shutdown().await;
}

#[tokio::test]
async fn streams_count_against_the_call_limits() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    sup.add(
        sandbox.manifest(
            "t",
            &bin("testplugin"),
            "calls: {max_in_flight: 1, max_queue: 0}",
        ),
        &Default::default(),
    )
    .unwrap();
    sup.wait_ready("t", SECS_10).await.unwrap();
    // A stream whose upload stays open holds the only call slot...
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, tonic::Status>>(1);
    let streaming = sup.clone();
    let held = tokio::spawn(async move {
        use tokio_stream::StreamExt;
        let mut reply = streaming
            .call_stream(
                "t",
                "count",
                HashMap::new(),
                tokio_stream::wrappers::ReceiverStream::new(rx),
                None,
            )
            .await?;
        let mut out = Vec::new();
        while let Some(chunk) = reply.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok::<_, Error>(out)
    });
    tx.send(Ok(Bytes::from("abc"))).await.unwrap();
    let logs = sup.logs("t").unwrap();
    plugvisor_integration_tests::wait_until(SECS_10, "the upload to start", || {
        logs.tail(50)
            .iter()
            .any(|l| l.line.contains("testplugin: upload started"))
    })
    .await;
    // ...so a unary call is refused until it ends.
    let err = sup
        .call("t", "echo", Bytes::from("x"), HashMap::new(), None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Overloaded { .. }),
        "the open stream holds the call slot: {err}"
    );
    let metrics = sup.metrics_text();
    assert!(
        metrics.contains("plugvisor_calls_in_flight{plugin=\"t\"} 1"),
        "the open stream is in flight: {metrics}"
    );
    drop(tx);
    assert_eq!(held.await.unwrap().unwrap(), b"3");
    sup.call("t", "echo", Bytes::from("x"), HashMap::new(), None)
        .await
        .expect("the slot is free once the stream ended");
    // And the stream is in the call metrics, with its method and code.
    let metrics = sup.metrics_text();
    assert!(
        metrics.contains("plugvisor_calls_in_flight{plugin=\"t\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("plugvisor_calls_total{plugin=\"t\",method=\"count\",code=\"Ok\"} 1"),
        "{metrics}"
    );
    sup.shutdown().await;
}

#[tokio::test]
async fn a_broken_upload_reaches_the_plugin_as_cancelled_never_as_a_short_payload() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    sup.add(
        sandbox.manifest("t", &bin("testplugin"), ""),
        &Default::default(),
    )
    .unwrap();
    sup.wait_ready("t", SECS_10).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, tonic::Status>>(4);
    let streaming = sup.clone();
    let call = tokio::spawn(async move {
        use tokio_stream::StreamExt;
        let upload = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut reply = streaming
            .call_stream("t", "count", HashMap::new(), upload, None)
            .await?;
        let mut out = Vec::new();
        while let Some(chunk) = reply.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok::<_, Error>(out)
    });
    tx.send(Ok(Bytes::from(vec![1u8; 1000]))).await.unwrap();
    tx.send(Ok(Bytes::from(vec![2u8; 1000]))).await.unwrap();
    let logs = sup.logs("t").unwrap();
    plugvisor_integration_tests::wait_until(SECS_10, "the upload to start", || {
        logs.tail(50)
            .iter()
            .any(|l| l.line.contains("testplugin: upload started"))
    })
    .await;
    // The caller's side breaks off mid-upload.
    tx.send(Err(tonic::Status::cancelled("the client went away")))
        .await
        .unwrap();
    let result = call.await.unwrap();
    let err = result.expect_err("a broken upload never reads as a complete one");
    assert_eq!(err.code(), tonic::Code::Cancelled, "{err}");
    // The plugin saw the upload break, not end.
    plugvisor_integration_tests::wait_until(SECS_10, "the plugin's verdict on its upload", || {
        logs.tail(50).iter().any(|l| {
            l.line.contains("testplugin: upload broken") || l.line.contains("upload complete")
        })
    })
    .await;
    let lines: Vec<String> = logs.tail(50).into_iter().map(|l| l.line).collect();
    assert!(
        lines.iter().any(|l| l.contains("upload broken after")),
        "{lines:#?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("upload complete")),
        "{lines:#?}"
    );
    sup.shutdown().await;
}

#[tokio::test]
async fn a_rolled_back_upgrade_leaves_no_new_format_snapshot_for_the_old_binary() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor_with_state();
    let mut events = sup.events();
    let v1 = versioned(
        &sandbox,
        "kv",
        "1.0.0",
        &bin("kv-plugin"),
        "args: [--state-version, \"1\"]\nstate: {snapshot_on_change: true, snapshot_interval: 0s}",
    );
    let v2 = versioned(
        &sandbox,
        "kv",
        "2.0.0",
        &bin("kv-plugin"),
        "state: {snapshot_on_change: true, snapshot_interval: 0s}\nupgrade: {probation: 10s}",
    );
    sup.add(v1, &Default::default()).unwrap();
    wait_state(&mut events, "kv", PluginState::Ready, SECS_10).await;
    let old_pid = sup.info("kv").unwrap().pid.unwrap();
    sup.call("kv", "set", Bytes::from("a=1"), HashMap::new(), None)
        .await
        .unwrap();
    let upgrading = tokio::spawn({
        let sup = sup.clone();
        async move { sup.upgrade("kv", v2).await }
    });
    // The new instance is published (its probation has begun).
    next_event(&mut events, "kv", SECS_10, |e| {
        e.state == PluginState::Ready && e.instance == "kv-0-2"
    })
    .await;
    // The new version takes a write during its probation: a version 2
    // snapshot lands on disk...
    sup.call("kv", "set", Bytes::from("b=2"), HashMap::new(), None)
        .await
        .unwrap();
    let store = plugvisor::state::SnapshotStore::new(&sandbox.state_dir(), "kv");
    let newest = store.load().unwrap().snapshot.unwrap();
    assert_eq!(newest.state_version, 2, "the new version wrote its format");
    // ...then it dies before its probation ends.
    let new_pid = sup.info("kv").unwrap().pid.unwrap();
    assert_ne!(new_pid, old_pid);
    // SAFETY: signals a plugin process this test's supervisor started.
    unsafe { libc::kill(new_pid, libc::SIGKILL) };
    let err = upgrading.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("failed its probation"), "{err}");
    // The old binary never gets the new format back: the newest snapshot is
    // the old version's again.
    let newest = store.load().unwrap().snapshot.unwrap();
    assert_eq!(newest.state_version, 1, "{newest:?}");
    assert_eq!(sup.info("kv").unwrap().pid, Some(old_pid));
    sup.shutdown().await;
}
