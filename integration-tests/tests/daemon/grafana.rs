//! The Grafana dashboard in docker/grafana queries only series a live
//! daemon serves: every metric name in every panel's PromQL is scraped from
//! the real `/metrics` after the things it counts have happened.

use plugvisor_integration_tests::{Daemon, Sandbox, bin, skip, wait_until_blocking};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

const SECS_10: Duration = Duration::from_secs(10);

fn dashboard() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker/grafana/plugvisor.json");
    let text = std::fs::read_to_string(&path).expect("the dashboard JSON");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Every `expr` of every target, nested rows included.
fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// The `plugvisor_*` metric names a PromQL expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("plugvisor_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

fn scrape(address: &str) -> String {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(SECS_10)).unwrap();
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {address}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
        .split_once("\r\n\r\n")
        .expect("a response")
        .1
        .to_string()
}

/// The names of the samples in a text exposition.
fn served(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn dashboard_is_provisioning_ready() {
    let d = dashboard();
    assert_eq!(d["uid"], "plugvisor");
    let panels = d["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().expect("a numeric id")),
            "ids are unique"
        );
        assert!(p["gridPos"]["w"].as_u64().is_some_and(|w| w <= 24), "{p}");
    }
    let provider = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../docker/grafana/provisioning/dashboards/plugvisor.yaml"),
    )
    .expect("the provisioning file");
    assert!(provider.contains("type: file"), "{provider}");
}

#[test]
fn every_metric_the_dashboard_queries_is_served() {
    let mut queries = Vec::new();
    exprs(&dashboard(), &mut queries);
    assert!(queries.len() >= 15, "{queries:?}");
    let wanted: BTreeSet<String> = queries.iter().flat_map(|q| metric_names(q)).collect();
    for expected in [
        "plugvisor_plugin_state",
        "plugvisor_restarts_total",
        "plugvisor_calls_total",
        "plugvisor_call_errors_total",
        "plugvisor_call_duration_seconds_bucket",
        "plugvisor_plugin_memory_bytes",
        "plugvisor_plugin_cpu_seconds_total",
        "plugvisor_snapshot_failures_total",
        "plugvisor_health_check_failures_total",
    ] {
        assert!(wanted.contains(expected), "the dashboard shows {expected}");
    }

    let sandbox = Sandbox::new();
    sandbox.plugin(
        "tp",
        &bin("testplugin"),
        "health: {interval: 30ms, timeout: 500ms, failure_threshold: 1000}\nrestart: {initial_backoff: 10ms}",
    );
    let address = format!(
        "127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    );
    let daemon = Daemon::start(&sandbox, &["--metrics-address", &address]);
    daemon.wait_ready("tp");
    // What the panels count: calls, a failed call, a restart, failed probes.
    daemon.cli_ok(&["call", "tp", "echo", "--data", "x"]);
    assert_eq!(daemon.cli(&["call", "tp", "nope"]).status.code(), Some(1));
    let _ = daemon.cli(&["call", "tp", "crash"]);
    wait_until_blocking(SECS_10, "tp back after its crash", || {
        let row = daemon.plugin("tp");
        row["restarts"] == 1 && row["state"] == "ready"
    });
    daemon.cli_ok(&["call", "tp", "set_health", "--data", "NOT_SERVING"]);
    let mut names = BTreeSet::new();
    wait_until_blocking(SECS_10, "a failed health probe counted", || {
        let text = scrape(&address);
        names = served(&text);
        text.contains("plugvisor_health_check_failures_total{plugin=\"tp\"} ")
            && !text.contains("plugvisor_health_check_failures_total{plugin=\"tp\"} 0\n")
    });

    // Usage series exist only where the plugin runs in a cgroup.
    let mechanism = daemon.plugin("tp")["isolation"]["mechanism"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut missing: Vec<_> = wanted.difference(&names).cloned().collect();
    if !mechanism.starts_with("cgroup") {
        let usage = [
            "plugvisor_plugin_memory_bytes",
            "plugvisor_plugin_cpu_seconds_total",
            "plugvisor_plugin_pids",
        ];
        skip(format!(
            "checking {usage:?}: the plugin runs without a cgroup here ({mechanism})"
        ));
        missing.retain(|m| !usage.contains(&m.as_str()));
    }
    assert!(
        missing.is_empty(),
        "the dashboard queries series the daemon does not serve: {missing:?}\nserved: {names:?}"
    );
}
