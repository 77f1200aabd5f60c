//! The embedded `Supervisor` against real plugin processes: handshake,
//! Initialize, calls, streams, health, state, crashes, restarts and stops.

use plugvisor::{Error, PluginState};
use plugvisor_integration_tests::{Sandbox, bin, is_gone, next_event, wait_state, wait_until};
use prost::bytes::Bytes;
use std::time::Duration;

const SECS_10: Duration = Duration::from_secs(10);

fn tp() -> std::path::PathBuf {
    bin("testplugin")
}

#[tokio::test]
async fn config_arrives_in_initialize_and_calls_round_trip() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    let mut events = sup.events();
    sup.add(
        sandbox.manifest("tp", &tp(), "config: {greeting: hello, nested: {n: 1}}"),
        &plugvisor::config::PluginOverride {
            config: serde_json::json!({"nested": {"m": 2}})
                .as_object()
                .unwrap()
                .clone(),
            ..Default::default()
        },
    )
    .unwrap();
    sup.add(
        sandbox.manifest("echo", &bin("echo-plugin"), ""),
        &Default::default(),
    )
    .unwrap();
    wait_state(&mut events, "tp", PluginState::Ready, SECS_10).await;
    sup.wait_ready("echo", SECS_10).await.unwrap();

    let reply = sup
        .call("tp", "config", Bytes::new(), Default::default(), None)
        .await
        .unwrap();
    let config: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(
        config,
        serde_json::json!({"greeting": "hello", "nested": {"n": 1, "m": 2}})
    );

    let reply = sup
        .call("echo", "upper", "hi".into(), Default::default(), None)
        .await
        .unwrap();
    assert_eq!(&reply.payload[..], b"HI");
    let reply = sup
        .call("echo", "echo", "same".into(), Default::default(), None)
        .await
        .unwrap();
    assert_eq!(&reply.payload[..], b"same");

    // A plugin's own error status reaches the caller unchanged.
    let err = sup
        .call("echo", "nope", Bytes::new(), Default::default(), None)
        .await
        .unwrap_err();
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");

    // Unknown plugin.
    let err = sup
        .call("missing", "echo", Bytes::new(), Default::default(), None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnknownPlugin(_)), "{err}");

    // The environment is clean: only PATH, the PLUGVISOR_* handshake variables.
    let reply = sup
        .call("tp", "env", Bytes::new(), Default::default(), None)
        .await
        .unwrap();
    let env: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&reply.payload).unwrap();
    let mut keys: Vec<_> = env.keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            "PATH",
            "PLUGVISOR_INSTANCE_ID",
            "PLUGVISOR_MAGIC_COOKIE",
            "PLUGVISOR_PLUGIN_NAME",
            "PLUGVISOR_PLUGIN_SOCKET",
            "PLUGVISOR_PROTOCOL_VERSIONS"
        ]
    );
    // And it sees no descriptor beyond 0-2 except its own (socket, epoll...):
    // none of them is one of ours, which would show as a pipe or a socket
    // inherited before the plugin ran. The plugin reports fds it opened itself
    // too, so check stdin is /dev/null here and leave the rest to isolation tests.
    let reply = sup
        .call("tp", "fd_targets", Bytes::new(), Default::default(), None)
        .await
        .unwrap();
    let fds: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(fds["0"], "/dev/null", "{fds}");
    sup.shutdown().await;
}

#[tokio::test]
async fn handle_stream_round_trips_64_mib() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    sup.add(
        sandbox.manifest("echo", &bin("echo-plugin"), ""),
        &Default::default(),
    )
    .unwrap();
    sup.wait_ready("echo", SECS_10).await.unwrap();
    const CHUNK: usize = 1 << 20;
    let chunks: Vec<Bytes> = (0..64u8).map(|i| Bytes::from(vec![i; CHUNK])).collect();
    let input = tokio_stream::iter(chunks.into_iter().map(Ok));
    let mut output = sup
        .call_stream(
            "echo",
            "echo",
            Default::default(),
            input,
            Some(Duration::from_secs(30)),
        )
        .await
        .unwrap();
    use tokio_stream::StreamExt;
    let mut received = Vec::with_capacity(64 * CHUNK);
    while let Some(chunk) = output.next().await {
        received.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(received.len(), 64 * CHUNK);
    for (i, block) in received.chunks(CHUNK).enumerate() {
        assert!(block.iter().all(|b| *b == i as u8), "chunk {i} differs");
    }
    sup.shutdown().await;
}

#[tokio::test]
async fn health_check_and_export_state_answer() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    sup.add(sandbox.manifest("tp", &tp(), ""), &Default::default())
        .unwrap();
    sup.wait_ready("tp", SECS_10).await.unwrap();
    let (health, _) = sup.health_check("tp").await.unwrap();
    assert_eq!(health, plugvisor::supervisor::Health::Serving);
    for _ in 0..3 {
        sup.call("tp", "incr", Bytes::new(), Default::default(), None)
            .await
            .unwrap();
    }
    let state = sup.export_state("tp", None).await.unwrap();
    assert_eq!(state.state_version, 1);
    assert!(!state.state.is_empty());
    let reply = sup
        .call("tp", "state", Bytes::new(), Default::default(), None)
        .await
        .unwrap();
    assert_eq!(&reply.payload[..], b"3");
    sup.shutdown().await;
}

#[tokio::test]
async fn junk_before_the_handshake_is_logged_and_the_plugin_starts() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    sup.add(
        sandbox.manifest("tp", &tp(), "args: [--junk, \"3\"]"),
        &Default::default(),
    )
    .unwrap();
    sup.wait_ready("tp", SECS_10).await.unwrap();
    let lines: Vec<String> = sup
        .logs("tp")
        .unwrap()
        .tail(100)
        .into_iter()
        .map(|l| l.line)
        .collect();
    assert!(
        lines
            .iter()
            .filter(|l| l.contains("before handshake"))
            .count()
            == 3,
        "{lines:#?}"
    );
    sup.shutdown().await;
}

#[tokio::test]
async fn a_plugin_that_never_handshakes_fails_with_a_clear_reason_while_others_run() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    let mut events = sup.events();
    sup.add(
        sandbox.manifest(
            "silent",
            &tp(),
            "args: [--junk, \"1\", --no-handshake]\ntimeouts: {start: 300ms}\nrestart: {policy: never}",
        ),
        &Default::default(),
    )
    .unwrap();
    sup.add(
        sandbox.manifest("echo", &bin("echo-plugin"), ""),
        &Default::default(),
    )
    .unwrap();
    let event = wait_state(&mut events, "silent", PluginState::Stopped, SECS_10).await;
    assert!(
        event.reason.contains("no handshake within 300ms"),
        "{}",
        event.reason
    );
    assert!(
        event.reason.contains("junk line 1"),
        "quotes what was seen: {}",
        event.reason
    );
    let info = sup.info("silent").unwrap();
    assert_eq!(info.state, PluginState::Stopped);
    assert!(info.pid.is_none());
    let reply = sup
        .call("echo", "upper", "ok".into(), Default::default(), None)
        .await
        .unwrap();
    assert_eq!(&reply.payload[..], b"OK");
    // Calls to it fail at once, saying why.
    let err = sup
        .call("silent", "echo", Bytes::new(), Default::default(), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no handshake"), "{err}");
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
    sup.shutdown().await;
}

#[tokio::test]
async fn handshake_with_wrong_path_or_version_is_refused_quoting_the_line() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    // One receiver per plugin: waiting on one must not swallow the other's
    // events.
    let mut path_events = sup.events();
    let mut version_events = sup.events();
    let never = "restart: {policy: never}";
    sup.add(
        sandbox.manifest("path", &tp(), &format!("args: [--wrong-path]\n{never}")),
        &Default::default(),
    )
    .unwrap();
    sup.add(
        sandbox.manifest("version", &tp(), &format!("args: [--bad-version]\n{never}")),
        &Default::default(),
    )
    .unwrap();
    let e = wait_state(&mut path_events, "path", PluginState::Stopped, SECS_10).await;
    assert!(e.reason.contains("handshake error"), "{}", e.reason);
    assert!(e.reason.contains("was told to listen on"), "{}", e.reason);
    assert!(
        e.reason.contains("`plugvisor|1|unix|"),
        "quotes the line: {}",
        e.reason
    );
    let e = wait_state(
        &mut version_events,
        "version",
        PluginState::Stopped,
        SECS_10,
    )
    .await;
    assert!(e.reason.contains("protocol version 99"), "{}", e.reason);
    sup.shutdown().await;
}

#[tokio::test]
async fn a_killed_plugin_comes_back_and_waiting_calls_succeed() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    let mut events = sup.events();
    sup.add(
        sandbox.manifest("tp", &tp(), "restart: {initial_backoff: 50ms, jitter: 0.0}"),
        &Default::default(),
    )
    .unwrap();
    wait_state(&mut events, "tp", PluginState::Ready, SECS_10).await;
    let pid = sup.info("tp").unwrap().pid.unwrap();
    // SAFETY: signals the plugin process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let backoff = next_event(&mut events, "tp", SECS_10, |e| {
        e.state == PluginState::Backoff
    })
    .await;
    assert!(
        backoff.reason.contains("killed by SIGKILL"),
        "{}",
        backoff.reason
    );
    // A call made while it restarts waits for the new instance.
    let reply = sup
        .call("tp", "pid", Bytes::new(), Default::default(), Some(SECS_10))
        .await
        .unwrap();
    let new_pid: i32 = std::str::from_utf8(&reply.payload)
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(new_pid, pid);
    let info = sup.info("tp").unwrap();
    assert_eq!(info.restarts, 1);
    assert_eq!(info.last_exit.as_deref(), Some("killed by SIGKILL"));
    assert!(is_gone(pid));
    sup.shutdown().await;
}

#[tokio::test]
async fn an_in_flight_call_during_a_crash_gets_unavailable() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    sup.add(sandbox.manifest("tp", &tp(), ""), &Default::default())
        .unwrap();
    sup.wait_ready("tp", SECS_10).await.unwrap();
    let pid = sup.info("tp").unwrap().pid.unwrap();
    let caller = sup.clone();
    let call = tokio::spawn(async move {
        caller
            .call(
                "tp",
                "sleep",
                "5000".into(),
                Default::default(),
                Some(SECS_10),
            )
            .await
    });
    // Wait until the plugin has the call in hand: `count` answers how many
    // calls came before it, so the k-th `count` answers more than k once the
    // sleep call has arrived.
    let deadline = std::time::Instant::now() + SECS_10;
    for k in 0.. {
        let reply = sup
            .call("tp", "count", Bytes::new(), Default::default(), None)
            .await
            .unwrap();
        let before: u64 = std::str::from_utf8(&reply.payload)
            .unwrap()
            .parse()
            .unwrap();
        if before > k {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the sleep call never arrived"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // SAFETY: signals the plugin process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let err = call.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Lost { .. }), "{err}");
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
    sup.shutdown().await;
}

#[tokio::test]
async fn a_hanging_initialize_fails_with_a_timeout_reason() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    let mut events = sup.events();
    sup.add(
        sandbox.manifest(
            "slow",
            &tp(),
            "args: [--init-sleep-ms, \"5000\"]\ntimeouts: {initialize: 200ms}\nrestart: {policy: never}",
        ),
        &Default::default(),
    )
    .unwrap();
    let e = wait_state(&mut events, "slow", PluginState::Stopped, SECS_10).await;
    assert!(
        e.reason.contains("Initialize did not answer within 200ms"),
        "{}",
        e.reason
    );
    sup.shutdown().await;
}

#[tokio::test]
async fn a_plugin_ignoring_sigterm_is_killed_after_its_grace() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    let mut events = sup.events();
    sup.add(
        sandbox.manifest(
            "stubborn",
            &tp(),
            "args: [--ignore-sigterm]\ntimeouts: {stop: 600ms}",
        ),
        &Default::default(),
    )
    .unwrap();
    sup.wait_ready("stubborn", SECS_10).await.unwrap();
    let pid = sup.info("stubborn").unwrap().pid.unwrap();
    let started = std::time::Instant::now();
    sup.stop("stubborn").await.unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(600),
        "stopped too early: {took:?}"
    );
    let e = wait_state(&mut events, "stubborn", PluginState::Stopped, SECS_10).await;
    assert!(e.reason.contains("killed by SIGKILL"), "{}", e.reason);
    assert!(is_gone(pid));
    // Stopped stays stopped, and calls say so.
    let err = sup
        .call("stubborn", "echo", Bytes::new(), Default::default(), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("stopped"), "{err}");
    // Start brings it back.
    sup.start("stubborn").await.unwrap();
    sup.wait_ready("stubborn", SECS_10).await.unwrap();
    sup.shutdown().await;
}

#[tokio::test]
async fn stop_leaves_no_descendant_behind() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    sup.add(
        sandbox.manifest("forker", &tp(), "args: [--double-fork]"),
        &Default::default(),
    )
    .unwrap();
    sup.wait_ready("forker", SECS_10).await.unwrap();
    let pid = sup.info("forker").unwrap().pid.unwrap();
    let reply = sup
        .call(
            "forker",
            "grandchild",
            Bytes::new(),
            Default::default(),
            None,
        )
        .await
        .unwrap();
    let grandchild: i32 = std::str::from_utf8(&reply.payload)
        .unwrap()
        .parse()
        .unwrap();
    assert!(!is_gone(grandchild), "the grandchild runs before the stop");
    sup.shutdown().await;
    assert!(is_gone(pid), "the plugin is gone");
    wait_until(SECS_10, "the grandchild to die", || is_gone(grandchild)).await;
}

#[tokio::test]
async fn failing_health_checks_restart_the_child() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    let mut events = sup.events();
    sup.add(
        sandbox.manifest(
            "sick",
            &tp(),
            "health: {interval: 50ms, timeout: 500ms, failure_threshold: 2}\nrestart: {initial_backoff: 10ms}",
        ),
        &Default::default(),
    )
    .unwrap();
    wait_state(&mut events, "sick", PluginState::Ready, SECS_10).await;
    let pid = sup.info("sick").unwrap().pid.unwrap();
    sup.call(
        "sick",
        "set_health",
        "DEGRADED".into(),
        Default::default(),
        None,
    )
    .await
    .unwrap();
    let e = wait_state(&mut events, "sick", PluginState::Degraded, SECS_10).await;
    assert!(e.reason.contains("degraded"), "{}", e.reason);
    // Degraded is up: calls still go through.
    sup.call("sick", "echo", "x".into(), Default::default(), None)
        .await
        .unwrap();
    sup.call(
        "sick",
        "set_health",
        "NOT_SERVING".into(),
        Default::default(),
        None,
    )
    .await
    .unwrap();
    let e = wait_state(&mut events, "sick", PluginState::Backoff, SECS_10).await;
    assert!(
        e.reason.contains("2 consecutive failed health checks"),
        "{}",
        e.reason
    );
    assert!(e.reason.contains("(health)"), "{}", e.reason);
    wait_state(&mut events, "sick", PluginState::Ready, SECS_10).await;
    assert_ne!(sup.info("sick").unwrap().pid.unwrap(), pid);
    assert!(is_gone(pid));
    sup.shutdown().await;
}

#[tokio::test]
async fn a_crash_loop_follows_the_backoff_curve_then_fails_until_restarted() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    let mut events = sup.events();
    sup.add(
        sandbox.manifest(
            "crashy",
            &tp(),
            "args: [--exit-immediately, \"7\"]\nrestart: {initial_backoff: 40ms, multiplier: 2.0, max_backoff: 200ms, jitter: 0.0, max_restarts: 4, window: 1m}",
        ),
        &Default::default(),
    )
    .unwrap();
    let mut last_backoff = None;
    let mut gaps = Vec::new();
    for attempt in 1..=4u32 {
        let e = wait_state(&mut events, "crashy", PluginState::Backoff, SECS_10).await;
        assert!(e.reason.contains("exited with code 7"), "{}", e.reason);
        // The same facts as fields: nobody parses the reason.
        assert_eq!(e.detail.exit_code, Some(7), "{e:?}");
        assert_eq!(e.detail.exit_kind, Some("start"), "before the handshake");
        assert_eq!(e.detail.attempt, Some(attempt), "{e:?}");
        let want = [40u64, 80, 160, 200][attempt as usize - 1];
        assert_eq!(e.detail.delay, Some(Duration::from_millis(want)), "{e:?}");
        let start = wait_state(&mut events, "crashy", PluginState::Starting, SECS_10).await;
        let gap = start.time.duration_since(e.time).unwrap();
        gaps.push(gap);
        last_backoff = Some(e);
    }
    let expected = [40u64, 80, 160, 200];
    for (gap, want) in gaps.iter().zip(expected) {
        let want = Duration::from_millis(want);
        // The backoff counts from the exit, which the event follows by a
        // few microseconds.
        assert!(
            *gap + Duration::from_millis(2) >= want && *gap < want + Duration::from_millis(150),
            "gaps {gaps:?} do not follow {expected:?} ms"
        );
    }
    drop(last_backoff);
    let failed = wait_state(&mut events, "crashy", PluginState::Failed, SECS_10).await;
    assert!(
        failed.reason.contains("more than 4 restarts within 60s"),
        "{}",
        failed.reason
    );
    assert_eq!(sup.info("crashy").unwrap().state, PluginState::Failed);
    // restart clears failed: it starts again (and crashes again).
    sup.restart("crashy").await.unwrap();
    let e = wait_state(&mut events, "crashy", PluginState::Backoff, SECS_10).await;
    assert_eq!(e.detail.attempt, Some(1), "the history was cleared: {e:?}");
    sup.shutdown().await;
}

#[tokio::test]
async fn an_idempotent_call_that_loses_its_instance_is_retried_once_it_is_back() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    let mut events = sup.events();
    sup.add(
        sandbox.manifest(
            "tp",
            &tp(),
            "idempotent: [pid]\nrestart: {initial_backoff: 10ms}",
        ),
        &Default::default(),
    )
    .unwrap();
    wait_state(&mut events, "tp", PluginState::Ready, SECS_10).await;
    // `crash` kills the instance mid-call: not idempotent, so it fails...
    let err = sup
        .call(
            "tp",
            "crash",
            Bytes::new(),
            Default::default(),
            Some(SECS_10),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Lost { .. }), "{err}");
    wait_state(&mut events, "tp", PluginState::Ready, SECS_10).await;
    let pid = sup.info("tp").unwrap().pid.unwrap();
    // ...while `pid`, marked idempotent, survives a kill racing with it.
    // SAFETY: signals the plugin process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let reply = sup
        .call("tp", "pid", Bytes::new(), Default::default(), Some(SECS_10))
        .await
        .unwrap();
    let answered: i32 = std::str::from_utf8(&reply.payload)
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(answered, pid, "answered by the restarted instance");
    sup.shutdown().await;
}

#[tokio::test]
async fn the_backoff_resets_after_a_stable_run() {
    let sandbox = Sandbox::new();
    let sup = sandbox.supervisor();
    let mut events = sup.events();
    sup.add(
        sandbox.manifest(
            "tp",
            &tp(),
            "restart: {initial_backoff: 20ms, multiplier: 4.0, jitter: 0.0, reset_after: 300ms}",
        ),
        &Default::default(),
    )
    .unwrap();
    let crash = |sup: plugvisor::Supervisor| async move {
        let _ = sup
            .call(
                "tp",
                "crash",
                Bytes::new(),
                Default::default(),
                Some(SECS_10),
            )
            .await;
    };
    wait_state(&mut events, "tp", PluginState::Ready, SECS_10).await;
    crash(sup.clone()).await;
    let e = wait_state(&mut events, "tp", PluginState::Backoff, SECS_10).await;
    assert!(e.reason.contains("restart #1 in 20ms"), "{}", e.reason);
    // Crash again right after it is ready: the curve goes on.
    wait_state(&mut events, "tp", PluginState::Ready, SECS_10).await;
    crash(sup.clone()).await;
    let e = wait_state(&mut events, "tp", PluginState::Backoff, SECS_10).await;
    assert!(e.reason.contains("restart #2 in 80ms"), "{}", e.reason);
    // Ready for longer than reset_after: it starts over.
    let ready = wait_state(&mut events, "tp", PluginState::Ready, SECS_10).await;
    wait_until(SECS_10, "a stable run of 300ms", || {
        ready.time.elapsed().unwrap_or_default() > Duration::from_millis(350)
    })
    .await;
    crash(sup.clone()).await;
    let e = wait_state(&mut events, "tp", PluginState::Backoff, SECS_10).await;
    assert!(e.reason.contains("restart #1 in 20ms"), "{}", e.reason);
    sup.shutdown().await;
}
