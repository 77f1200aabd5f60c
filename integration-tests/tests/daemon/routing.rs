//! Through the real daemon: calls by capability and `ps --capability` from
//! the CLI, rate limits with their retry hint, and the gRPC health service
//! on TCP probed the way kubelet's `grpc` probe does it (a plaintext HTTP/2
//! connection, `grpc.health.v1.Health/Check` with the probe's `service`,
//! only SERVING passes).

use plugvisor_integration_tests::{Daemon, Sandbox, bin};
use std::time::{Duration, Instant};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plaintext HTTP/2 connection, as kubelet's `grpc` probe makes.
async fn connect(
    address: &str,
) -> Result<HealthClient<tonic::transport::Channel>, tonic::transport::Error> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
        .connect()
        .await?;
    Ok(HealthClient::new(channel))
}

/// One kubelet-style probe: a new connection, one Check, a 1 s timeout
/// (kubelet's default `timeoutSeconds`).
pub async fn probe(address: &str, service: &str) -> Result<ServingStatus, tonic::Status> {
    let attempt = async {
        let mut client = connect(address)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let reply = client
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await?;
        Ok(ServingStatus::try_from(reply.into_inner().status).unwrap_or(ServingStatus::Unknown))
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("probe timed out")))
}

/// Probes until the answer is `want` (10 s at most).
pub async fn wait_probe(address: &str, service: &str, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = probe(address, service).await;
        if matches!(&got, Ok(s) if *s == want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "probe of `{service}` answered {got:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_on_tcp_answers_liveness_readiness_and_per_plugin() {
    let sandbox = Sandbox::new();
    sandbox.plugin("echo", &bin("echo-plugin"), "");
    sandbox.plugin(
        "slow",
        &bin("testplugin"),
        "args: [--init-sleep-ms, \"1500\"]",
    );
    let address = format!("127.0.0.1:{}", free_port());
    let daemon = Daemon::start(&sandbox, &["--health-address", &address]);
    // Live at once; not ready while `slow` initializes.
    wait_probe(&address, "", ServingStatus::Serving).await;
    assert_eq!(
        probe(&address, "plugvisor.liveness").await.unwrap(),
        ServingStatus::Serving
    );
    let early = probe(&address, "plugvisor.readiness").await.unwrap();
    assert_eq!(
        early,
        ServingStatus::NotServing,
        "`slow` is still initializing"
    );
    wait_probe(&address, "plugvisor.readiness", ServingStatus::Serving).await;
    assert_eq!(
        probe(&address, "echo").await.unwrap(),
        ServingStatus::Serving
    );

    // A client that connects and says nothing holds nothing up.
    let silent = std::net::TcpStream::connect(&address).unwrap();
    assert_eq!(
        probe(&address, "echo").await.unwrap(),
        ServingStatus::Serving
    );

    // A stopped plugin: its service and readiness fail, liveness holds.
    tokio::task::block_in_place(|| daemon.cli_ok(&["stop", "echo"]));
    assert_eq!(
        probe(&address, "echo").await.unwrap(),
        ServingStatus::NotServing
    );
    assert_eq!(
        probe(&address, "plugvisor.readiness").await.unwrap(),
        ServingStatus::NotServing
    );
    assert_eq!(probe(&address, "").await.unwrap(), ServingStatus::Serving);
    // A service nobody serves is NOT_FOUND, as the health protocol says.
    let unknown = probe(&address, "nope").await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    tokio::task::block_in_place(|| daemon.cli_ok(&["start", "echo"]));
    wait_probe(&address, "plugvisor.readiness", ServingStatus::Serving).await;
    drop(silent);

    // The daemon stops even with a watch open, and the port closes.
    let mut client = connect(&address).await.unwrap();
    let mut watch = client
        .watch(HealthCheckRequest {
            service: "echo".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let mut daemon = daemon;
    let status = tokio::task::block_in_place(|| daemon.stop_with(libc::SIGTERM));
    assert!(status.success(), "{status}");
    assert!(
        std::net::TcpStream::connect(&address).is_err(),
        "the port is closed"
    );
}

#[test]
fn ps_and_call_by_capability_from_the_cli_fail_over_when_a_provider_stops() {
    let sandbox = Sandbox::new();
    for name in ["img-a", "img-b"] {
        sandbox.plugin(name, &bin("echo-plugin"), "capabilities: [image.resize]");
    }
    sandbox.plugin(
        "limited",
        &bin("echo-plugin"),
        "capabilities: [text.upper]\ncalls: {rate: 1/m, burst: 1}",
    );
    let daemon = Daemon::start(&sandbox, &[]);
    for name in ["img-a", "img-b", "limited"] {
        daemon.wait_ready(name);
    }
    let providers: Vec<serde_json::Value> =
        serde_json::from_str(&daemon.cli_ok(&["ps", "--capability", "image.resize", "--json"]))
            .unwrap();
    let names: Vec<_> = providers
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.contains(&"img-a") && names.contains(&"img-b"));
    assert_eq!(
        providers[0]["capabilities"],
        serde_json::json!(["image.resize"])
    );
    let table = daemon.cli_ok(&["ps", "--capability", "text.upper"]);
    assert!(
        table.contains("limited") && !table.contains("img-a"),
        "{table}"
    );

    let call = |cap: &str| {
        let out = daemon.cli(&["call", "--capability", cap, "upper", "--data", "pic"]);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, stdout, stderr) = call("image.resize");
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.trim(), "PIC");
    assert!(stderr.contains("answered by img-"), "{stderr}");

    daemon.cli_ok(&["stop", "img-a"]);
    for _ in 0..3 {
        let (code, _, stderr) = call("image.resize");
        assert_eq!(code, Some(0), "{stderr}");
        assert!(stderr.contains("answered by img-b"), "{stderr}");
    }
    daemon.cli_ok(&["stop", "img-b"]);
    let (code, _, stderr) = call("image.resize");
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("Unavailable") && stderr.contains("img-a is stopped"),
        "{stderr}"
    );
    let (code, _, stderr) = call("image.crop");
    assert_eq!(code, Some(1));
    assert!(stderr.contains("NotFound"), "{stderr}");

    // A rate-limited call says when to retry.
    let (code, _, stderr) = call("text.upper");
    assert_eq!(code, Some(0), "{stderr}");
    let (code, _, stderr) = call("text.upper");
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("ResourceExhausted") && stderr.contains("retry-after-ms: "),
        "{stderr}"
    );
    let inspect = daemon.cli_ok(&["inspect", "limited"]);
    assert!(
        inspect.contains("rate limit: calls: 1/m, burst 1"),
        "{inspect}"
    );
    assert!(inspect.contains("provides:   text.upper"), "{inspect}");
    // Usage errors: a method too many, or none.
    let out = daemon.cli(&["call", "--capability", "text.upper", "upper", "extra"]);
    assert_eq!(out.status.code(), Some(2));
}
