//! Autoscaling, embedded: a replica removed by scaling down leaves routing
//! first and stops only once the call it was serving has finished.

use plugvisor::PluginState;
use plugvisor_integration_tests::{Sandbox, bin, wait_until};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

const SECS_20: Duration = Duration::from_secs(20);

fn ready_replicas(sup: &plugvisor::Supervisor) -> usize {
    sup.info("tp")
        .unwrap()
        .replicas
        .iter()
        .filter(|r| r.state == PluginState::Ready)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_down_drains_the_calls_in_flight_on_the_removed_replica() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor_with_state();
    sup.add(
        sandbox.manifest(
            "tp",
            &bin("testplugin"),
            "replicas: {min: 1, max: 3, scale_up: {in_flight_per_replica: 2}, scale_down: {in_flight_per_replica: 1}, cooldown: 2s, interval: 50ms}\ntimeouts: {stop: 300ms}",
        ),
        &Default::default(),
    )
    .unwrap();
    sup.wait_ready("tp", SECS_20).await.unwrap();
    let call = |ms: &'static str| {
        let sup = sup.clone();
        tokio::spawn(async move {
            sup.call("tp", "sleep_pid", ms.into(), HashMap::new(), Some(SECS_20))
                .await
        })
    };
    // A load step of 6 calls on 1 replica: 3 replicas are needed.
    let step: Vec<_> = (0..6).map(|_| call("1000")).collect();
    wait_until(SECS_20, "3 ready replicas", || ready_replicas(&sup) == 3).await;
    for c in step {
        c.await.unwrap().expect("every call of the step succeeds");
    }
    // One long call per replica: calm enough (1 per replica) to scale down
    // once the cooldown passes, with a call in flight on the replica that
    // goes. The call outlasts `timeouts.stop` many times over: only the
    // drain before the stop lets it finish.
    let started = Instant::now();
    let long: Vec<_> = (0..3).map(|_| call("8000")).collect();
    let mut events = sup.events();
    let draining = plugvisor_integration_tests::next_event(&mut events, "tp", SECS_20, |e| {
        e.state == PluginState::Stopping && e.detail.scaled_to == Some(2)
    })
    .await;
    assert_eq!(draining.replica, 2, "the last replica goes first");
    assert!(draining.reason.contains("draining"), "{}", draining.reason);
    assert!(
        started.elapsed() < Duration::from_secs(7),
        "it began draining while the calls still ran"
    );
    let mut pids = HashSet::new();
    for c in long {
        let reply = c
            .await
            .unwrap()
            .expect("a call on a draining replica still succeeds");
        pids.insert(String::from_utf8_lossy(&reply.payload).into_owned());
    }
    let calls_done = SystemTime::now();
    assert_eq!(pids.len(), 3, "one long call ran on each replica");
    let stopped = plugvisor_integration_tests::next_event(&mut events, "tp", SECS_20, |e| {
        e.replica == 2 && e.state == PluginState::Stopped
    })
    .await;
    assert!(
        stopped.time + Duration::from_millis(500) >= calls_done,
        "the replica stopped only after its call finished ({:?} before the calls ended)",
        calls_done.duration_since(stopped.time).unwrap_or_default()
    );
    wait_until(SECS_20, "back to one replica", || {
        sup.info("tp").unwrap().replicas.len() == 1
    })
    .await;
    let scaling = sup.info("tp").unwrap().scaling.unwrap();
    assert_eq!((scaling.min, scaling.max, scaling.current), (1, 3, 1));
    sup.shutdown().await;
}
