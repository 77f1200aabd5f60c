//! `Control.CallSession` through the real daemon: replies and error
//! statuses as unary `Call` gives them, calls running concurrently on one
//! stream, cancellation reaching the plugin, the per-session cap, and a
//! session that says nothing holding up neither calls nor shutdown.

use plugvisor_cli::call_session::MAX_IN_FLIGHT;
use plugvisor_cli::control_client::CallSession;
use plugvisor_integration_tests::{Daemon, Sandbox, bin};
use plugvisor_proto as pb;
use std::time::{Duration, Instant};
use tonic::Code;

fn request(plugin: &str, method: &str, payload: &str) -> pb::CallRequest {
    pb::CallRequest {
        plugin: plugin.into(),
        method: method.into(),
        payload: payload.as_bytes().to_vec().into(),
        ..Default::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn open_session(daemon: &Daemon) -> CallSession {
    CallSession::connect(&daemon.control).await.unwrap()
}

/// What the testplugin `tp` counts as cancelled sleeps.
async fn sleeps_cancelled(session: &CallSession) -> u64 {
    let reply = session
        .call(request("tp", "sleeps_cancelled", ""))
        .await
        .unwrap();
    String::from_utf8_lossy(&reply.payload).parse().unwrap()
}

/// Waits (10 s at most) until the plugin counted `n` cancelled sleeps.
async fn wait_sleeps_cancelled(session: &CallSession, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = sleeps_cancelled(session).await;
        if seen == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the plugin saw {seen} cancelled sleeps, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn a_session_answers_with_the_replies_and_statuses_of_unary_call() {
    let sandbox = Sandbox::new();
    sandbox.plugin("echo", &bin("echo-plugin"), "capabilities: [text.upper]");
    sandbox.plugin(
        "limited",
        &bin("echo-plugin"),
        "calls: {rate: 1/m, burst: 1}",
    );
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("echo");
    daemon.wait_ready("limited");
    runtime().block_on(async {
        let session = open_session(&daemon).await;
        let mut unary = plugvisor_cli::control::connect(&daemon.control)
            .await
            .unwrap();
        let reply = session.call(request("echo", "upper", "hi")).await.unwrap();
        assert_eq!(&reply.payload[..], b"HI");
        assert_eq!(reply.plugin, "echo");
        // By capability: the answering plugin is named.
        let by_capability = session
            .call(pb::CallRequest {
                capability: "text.upper".into(),
                method: "upper".into(),
                payload: b"cap".to_vec().into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            (&by_capability.payload[..], by_capability.plugin.as_str()),
            (&b"CAP"[..], "echo")
        );
        // Failures: the same code and message as unary `Call`.
        let failing = [
            request("nosuch", "upper", "x"),
            request("echo", "nosuch-method", "x"),
            request("", "upper", "x"),
        ];
        for r in failing {
            let through_session = session.call(r.clone()).await.unwrap_err();
            let through_unary = unary.call(r.clone()).await.unwrap_err();
            assert_eq!(
                (through_session.code(), through_session.message()),
                (through_unary.code(), through_unary.message()),
                "{r:?}"
            );
            assert_ne!(through_session.code(), Code::Ok);
        }
        // A rate-limited call: RESOURCE_EXHAUSTED with its retry hint.
        session
            .call(request("limited", "upper", "a"))
            .await
            .unwrap();
        let limited = session
            .call(request("limited", "upper", "b"))
            .await
            .unwrap_err();
        assert_eq!(limited.code(), Code::ResourceExhausted, "{limited:?}");
        let retry: u64 = limited
            .metadata()
            .get("retry-after-ms")
            .expect("the retry hint")
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(retry > 0 && retry <= 60_000, "{retry}");
        // Unary `Call` still works beside the session.
        let reply = unary
            .call(request("echo", "upper", "still"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&reply.payload[..], b"STILL");
        assert_eq!(session.resent(), 0);
    });
}

#[test]
fn a_slow_call_does_not_hold_up_a_fast_one_and_a_dropped_call_is_cancelled_at_the_plugin() {
    let sandbox = Sandbox::new();
    sandbox.plugin("tp", &bin("testplugin"), "");
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("tp");
    runtime().block_on(async {
        let session = open_session(&daemon).await;
        let slow = tokio::spawn({
            let session = session.clone();
            async move { session.call(request("tp", "sleep", "30000")).await }
        });
        // Fast calls on the same session (clones share it) while the slow
        // one is in flight.
        let started = Instant::now();
        for i in 0..20 {
            let text = format!("fast {i}");
            let reply = session.call(request("tp", "echo", &text)).await.unwrap();
            assert_eq!(reply.payload, text.as_bytes());
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "fast calls waited for the slow one: {:?}",
            started.elapsed()
        );
        assert!(!slow.is_finished(), "the slow call is still in flight");
        assert_eq!(sleeps_cancelled(&session).await, 0);
        // The caller drops its call: the plugin's handler is cancelled.
        slow.abort();
        assert!(slow.await.unwrap_err().is_cancelled());
        wait_sleeps_cancelled(&session, 1).await;
        // A call's own deadline: DEADLINE_EXCEEDED, and cancelled there too.
        let mut bounded = request("tp", "sleep", "30000");
        bounded.timeout_ms = 200;
        let started = Instant::now();
        let status = session.call(bounded).await.unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        wait_sleeps_cancelled(&session, 2).await;
        // Closing the whole session cancels what is in flight on it.
        let other = open_session(&daemon).await;
        let in_flight = tokio::spawn({
            let other = other.clone();
            async move { other.call(request("tp", "sleep", "30000")).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        in_flight.abort();
        drop(other);
        wait_sleeps_cancelled(&session, 3).await;
    });
}

#[test]
fn a_flooding_session_gets_resource_exhausted_beyond_its_cap_and_others_are_served() {
    let sandbox = Sandbox::new();
    // Room at the plugin for every call the session lets through, and for
    // the other client's.
    sandbox.plugin("tp", &bin("testplugin"), "calls: {max_in_flight: 1100}");
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("tp");
    runtime().block_on(async {
        // A raw session, to put more calls in flight than the cap at once.
        let mut client = plugvisor_cli::control::connect(&daemon.control)
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut replies = client
            .call_session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let extra = 10;
        for id in 1..=(MAX_IN_FLIGHT + extra) as u64 {
            tx.send(pb::CallSessionRequest {
                id,
                call: Some(request("tp", "sleep", "30000")),
                cancel: false,
            })
            .unwrap();
        }
        let mut refused = Vec::new();
        while refused.len() < extra {
            let reply = tokio::time::timeout(Duration::from_secs(20), replies.message())
                .await
                .expect("the refusals come at once")
                .unwrap()
                .expect("a reply");
            assert_eq!(reply.code, Code::ResourceExhausted as i32, "{reply:?}");
            assert!(reply.message.contains("calls in flight"), "{reply:?}");
            refused.push(reply.id);
        }
        refused.sort();
        let expected: Vec<u64> =
            ((MAX_IN_FLIGHT + 1) as u64..=(MAX_IN_FLIGHT + extra) as u64).collect();
        assert_eq!(refused, expected);
        // Another client is served meanwhile.
        let other = open_session(&daemon).await;
        let reply = other.call(request("tp", "echo", "me too")).await.unwrap();
        assert_eq!(&reply.payload[..], b"me too");
        // Cancel one by message: the plugin sees it; a bad id is refused.
        tx.send(pb::CallSessionRequest {
            id: 1,
            call: None,
            cancel: true,
        })
        .unwrap();
        wait_sleeps_cancelled(&other, 1).await;
        tx.send(pb::CallSessionRequest {
            id: 0,
            call: Some(request("tp", "echo", "x")),
            cancel: false,
        })
        .unwrap();
        let reply = replies.message().await.unwrap().unwrap();
        assert_eq!((reply.id, reply.code), (0, Code::InvalidArgument as i32));
        tx.send(pb::CallSessionRequest {
            id: 2,
            call: Some(request("tp", "echo", "x")),
            cancel: false,
        })
        .unwrap();
        let reply = replies.message().await.unwrap().unwrap();
        assert_eq!((reply.id, reply.code), (2, Code::InvalidArgument as i32));
        assert!(reply.message.contains("already in flight"), "{reply:?}");
        // The flooder goes away: every call it had in flight is cancelled.
        drop(tx);
        drop(replies);
        drop(client);
        wait_sleeps_cancelled(&other, MAX_IN_FLIGHT as u64).await;
    });
}

#[test]
fn a_silent_session_holds_up_neither_calls_nor_shutdown() {
    let sandbox = Sandbox::new();
    sandbox.plugin("echo", &bin("echo-plugin"), "");
    let mut daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("echo");
    let rt = runtime();
    let (drained, _session) = rt.block_on(async {
        let mut silent = Vec::new();
        for _ in 0..20 {
            let mut client = plugvisor_cli::control::connect(&daemon.control)
                .await
                .unwrap();
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<pb::CallSessionRequest>();
            let replies = client
                .call_session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            silent.push((tx, replies, client));
        }
        let session = open_session(&daemon).await;
        let reply = session.call(request("echo", "upper", "x")).await.unwrap();
        assert_eq!(&reply.payload[..], b"X");
        // Shutdown: each silent session hears that the daemon drains and
        // then ends with OK (nothing was in flight).
        let drained = tokio::spawn(async move {
            let mut notices = 0;
            for (_tx, mut replies, _client) in silent {
                let first = replies.message().await.unwrap().unwrap();
                assert!(first.draining && first.id == 0, "{first:?}");
                notices += 1;
                assert!(replies.message().await.unwrap().is_none());
            }
            notices
        });
        (drained, session)
    });
    let started = Instant::now();
    let status = daemon.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status}: {}", daemon.log_text());
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "shutdown waited on silent sessions: {:?}",
        started.elapsed()
    );
    let drained = rt.block_on(drained).unwrap();
    assert_eq!(drained, 20);
}

/// uid and gid of `nobody` / `nogroup` on Debian.
const NOBODY: u32 = 65534;

/// Opens a session and makes one call from a thread of its own whose
/// credentials are `nobody`'s (set on that thread alone, with the raw
/// system calls: the rest of the test keeps root's): the reply, or the
/// error it ended with.
fn call_as_nobody(daemon: &Daemon) -> Result<String, String> {
    let control = daemon.control.clone();
    std::thread::spawn(move || {
        // SAFETY: setresgid(2) and setresuid(2) as raw system calls change
        // the credentials of this thread only (glibc's wrappers would
        // change every thread's); the thread ends with the call.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_setresgid, NOBODY, NOBODY, NOBODY),
                0
            );
            assert_eq!(
                libc::syscall(libc::SYS_setresuid, NOBODY, NOBODY, NOBODY),
                0
            );
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let session = CallSession::connect(&control)
                .await
                .map_err(|e| format!("opening the session: {e}"))?;
            session
                .call(request("echo", "upper", "hi"))
                .await
                .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
                .map_err(|s| format!("the call: {s:?}"))
        })
    })
    .join()
    .expect("the caller thread")
}

#[test]
fn a_session_is_refused_to_a_user_not_allowed_and_served_to_an_allowed_one() {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return plugvisor_integration_tests::skip("calling as another user needs root");
    }
    let sandbox = Sandbox::new();
    // Reachable by others; the control socket is opened to them below, so
    // the credential check is what decides.
    std::fs::set_permissions(sandbox.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod the sandbox");
    sandbox.plugin("echo", &bin("echo-plugin"), "");
    let open = |daemon: &Daemon| {
        std::fs::set_permissions(&daemon.control, std::fs::Permissions::from_mode(0o666))
            .expect("chmod the control socket")
    };
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("echo");
    open(&daemon);
    let refused = call_as_nobody(&daemon).expect_err("nobody is not allowed");
    assert!(
        refused.contains("permission denied: uid 65534") && refused.contains("control_uids"),
        "says who was refused and how to allow them: {refused}"
    );
    // Root's session is served.
    runtime().block_on(async {
        let session = open_session(&daemon).await;
        let reply = session.call(request("echo", "upper", "hi")).await.unwrap();
        assert_eq!(&reply.payload[..], b"HI");
    });
    drop(daemon);

    let config = sandbox.dir.path().join("plugvisor.yaml");
    std::fs::write(&config, "control_uids: [65534]\n").expect("write the config");
    let daemon = Daemon::start(&sandbox, &["--config", config.to_str().unwrap()]);
    daemon.wait_ready("echo");
    open(&daemon);
    assert_eq!(call_as_nobody(&daemon), Ok("HI".to_string()));
}
