//! Prometheus metrics scraped over HTTP from the real daemon and parsed:
//! every series the daemon defines shows up and moves with what happened.

use plugvisor_integration_tests::{Daemon, Sandbox, bin, wait_until_blocking};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::Duration;

const SECS_10: Duration = Duration::from_secs(10);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GETs `path` and returns (status line, body).
fn get(address: &str, path: &str) -> (String, String) {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(SECS_10)).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

/// Parses the text exposition: `series{labels}` → value. Every line must be
/// a comment or a sample whose value is a number.
fn parse(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line `{line}`"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in `{line}`"));
        samples.insert(series.to_string(), value);
    }
    samples
}

fn value(samples: &HashMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no `{series}` in {:#?}", samples.keys().collect::<Vec<_>>()))
}

#[test]
fn metrics_are_served_and_follow_what_happens() {
    let sandbox = Sandbox::new();
    sandbox.plugin("echo", &bin("echo-plugin"), "");
    sandbox.plugin(
        "tp",
        &bin("testplugin"),
        "health: {interval: 30ms, timeout: 500ms, failure_threshold: 1000}\nrestart: {initial_backoff: 10ms}",
    );
    let address = format!("127.0.0.1:{}", free_port());
    let daemon = Daemon::start(&sandbox, &["--metrics-address", &address]);
    daemon.wait_ready("echo");
    let tp_pid = daemon.wait_ready("tp")["pid"].as_i64().unwrap() as i32;

    daemon.cli_ok(&["call", "echo", "upper", "--data", "x"]);
    daemon.cli_ok(&["call", "echo", "upper", "--data", "y"]);
    assert_eq!(
        daemon
            .cli(&["call", "echo", "no-such-method"])
            .status
            .code(),
        Some(1)
    );
    daemon.cli_ok(&["call", "tp", "set_health", "--data", "NOT_SERVING"]);
    // SAFETY: signals a plugin process of the daemon this test started.
    unsafe { libc::kill(tp_pid, libc::SIGKILL) };
    wait_until_blocking(SECS_10, "tp to restart", || {
        let row = daemon.plugin("tp");
        row["restarts"] == 1 && row["state"] == "ready"
    });
    daemon.cli_ok(&["call", "tp", "set_health", "--data", "NOT_SERVING"]);

    let mut samples = HashMap::new();
    wait_until_blocking(SECS_10, "health failures to be counted", || {
        let (status, body) = get(&address, "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK");
        samples = parse(&body);
        samples
            .get("plugvisor_health_check_failures_total{plugin=\"tp\"}")
            .is_some_and(|v| *v >= 2.0)
    });
    assert_eq!(value(&samples, "plugvisor_plugin_up{plugin=\"echo\"}"), 1.0);
    assert_eq!(
        value(
            &samples,
            "plugvisor_plugin_state{plugin=\"echo\",state=\"ready\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "plugvisor_plugin_state{plugin=\"echo\",state=\"failed\"}"
        ),
        0.0
    );
    assert_eq!(
        value(
            &samples,
            "plugvisor_restarts_total{plugin=\"tp\",reason=\"signal\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "plugvisor_calls_total{plugin=\"echo\",method=\"upper\",code=\"Ok\"}"
        ),
        2.0
    );
    assert_eq!(
        value(
            &samples,
            "plugvisor_calls_total{plugin=\"echo\",method=\"other\",code=\"Unimplemented\"}"
        ),
        1.0,
        "an unlisted method is counted under `other`"
    );
    assert_eq!(
        value(
            &samples,
            "plugvisor_call_errors_total{plugin=\"echo\",method=\"other\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "plugvisor_call_duration_seconds_count{plugin=\"echo\",method=\"upper\"}"
        ),
        2.0
    );
    assert!(
        value(
            &samples,
            "plugvisor_call_duration_seconds_sum{plugin=\"echo\",method=\"upper\"}"
        ) > 0.0
    );
    assert_eq!(
        value(
            &samples,
            "plugvisor_start_duration_seconds_count{plugin=\"tp\"}"
        ),
        2.0
    );
    let info = samples
        .keys()
        .find(|k| k.starts_with("plugvisor_plugin_info{plugin=\"echo\",version=\"1.0.0\""))
        .unwrap_or_else(|| panic!("no info series: {:#?}", samples.keys().collect::<Vec<_>>()));
    if info.contains("enforcement=\"cgroup") {
        assert!(value(&samples, "plugvisor_plugin_memory_bytes{plugin=\"echo\"}") > 0.0);
        assert!(value(&samples, "plugvisor_plugin_pids{plugin=\"echo\"}") >= 1.0);
        assert!(samples.contains_key("plugvisor_plugin_cpu_seconds_total{plugin=\"echo\"}"));
    } else {
        plugvisor_integration_tests::skip(format!("usage gauges need cgroups here ({info})"));
    }
    // The OOM counter is exercised end to end by the isolation tests and in
    // the metrics unit test; here it must exist, at 0, from the start.
    let (_, body) = get(&address, "/metrics");
    assert!(
        body.contains("# TYPE plugvisor_oom_kills counter")
            && body.contains("plugvisor_oom_kills_total{plugin=\"echo\"} 0"),
        "{body}"
    );
    let (status, _) = get(&address, "/other");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
}

#[test]
fn idle_connections_neither_stop_a_scrape_nor_keep_the_daemon_alive() {
    let sandbox = Sandbox::new();
    sandbox.plugin("echo", &bin("echo-plugin"), "");
    let address = format!("127.0.0.1:{}", free_port());
    let mut daemon = Daemon::start(&sandbox, &["--metrics-address", &address]);
    daemon.wait_ready("echo");
    wait_until_blocking(SECS_10, "the metrics endpoint to listen", || {
        std::net::TcpStream::connect(&address).is_ok()
    });

    // More silent clients than the endpoint serves at once, and one that
    // stops in the middle of its headers.
    let mut idle: Vec<std::net::TcpStream> = (0..100)
        .map(|_| std::net::TcpStream::connect(&address).expect("connect"))
        .collect();
    idle[0]
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x")
        .expect("half a request");

    let mut scrape = std::net::TcpStream::connect(&address).expect("connect");
    scrape
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(scrape, "GET /metrics HTTP/1.1\r\nHost: {address}\r\n\r\n").unwrap();
    let mut response = String::new();
    scrape
        .read_to_string(&mut response)
        .expect("the scrape is answered despite the idle clients");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.to_lowercase()
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    assert!(
        body.contains("plugvisor_plugin_up{plugin=\"echo\"} 1"),
        "{body}"
    );

    // The daemon disconnects clients that do not send their headers in time.
    for stream in &mut idle {
        stream.set_read_timeout(Some(SECS_10)).unwrap();
        let mut rest = Vec::new();
        // End of file, or a reset: either way the daemon let go of it.
        let _ = stream.read_to_end(&mut rest);
        assert!(rest.is_empty() || String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 408"));
    }

    // Fresh idle clients at shutdown do not hold the daemon up.
    let _idle: Vec<_> = (0..10)
        .map(|_| std::net::TcpStream::connect(&address).expect("connect"))
        .collect();
    let status = daemon.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status}\n{}", daemon.log_text());
}
