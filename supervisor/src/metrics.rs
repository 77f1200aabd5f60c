//! Prometheus metrics. Counters and histograms are fed as things happen
//! (calls, restarts, health failures, starts); gauges (up, state, usage,
//! info) are built from the supervisor's status at each scrape, so they are
//! never stale. Served as text on `/metrics` by a small HTTP/1.1 responder.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabel {
    plugin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    plugin: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    plugin: String,
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    plugin: String,
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RateLimitLabels {
    plugin: String,
    /// The method with its own limit, or `*` for the plugin's limit.
    method: String,
    /// `method` or `plugin`: which limit refused.
    limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    plugin: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    plugin: String,
    version: String,
    sha256: String,
    enforcement: String,
    signer: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 20 µs to ~20 s.
    Histogram::new(exponential_buckets(0.00002, 2.0, 21))
}

fn start_histogram() -> Histogram {
    // 1 ms to ~16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// The event-fed series; shared by every clone of the supervisor.
#[derive(Clone)]
pub struct Metrics {
    restarts: Family<ReasonLabels, Counter>,
    oom_kills: Family<PluginLabel, Counter>,
    health_failures: Family<PluginLabel, Counter>,
    snapshot_failures: Family<PluginLabel, Counter>,
    start_duration: HistogramFamily<PluginLabel>,
    calls: Family<CallLabels, Counter>,
    call_errors: Family<MethodLabels, Counter>,
    call_duration: HistogramFamily<MethodLabels>,
    /// Calls admitted and not yet answered; fed by [`Metrics::in_flight`].
    in_flight: Family<PluginLabel, Gauge>,
    /// Calls waiting for an admission slot; fed by [`Metrics::queued`].
    queued: Family<PluginLabel, Gauge>,
    /// Calls refused by a rate limit; handles kept by each limit.
    rate_limited: Family<RateLimitLabels, Counter>,
}

/// Holds one unit of a gauge (a call in flight, a call queued) and gives it
/// back when dropped, however the call ends: a `+1` before an await and a
/// `-1` after it would leak on cancellation.
#[must_use = "the gauge goes back down when this is dropped"]
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    /// Counts one on `gauge` until dropped.
    pub fn hold(gauge: Gauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            restarts: Family::default(),
            oom_kills: Family::default(),
            health_failures: Family::default(),
            snapshot_failures: Family::default(),
            start_duration: Family::new_with_constructor(start_histogram),
            calls: Family::default(),
            call_errors: Family::default(),
            call_duration: Family::new_with_constructor(latency_histogram),
            in_flight: Family::default(),
            queued: Family::default(),
            rate_limited: Family::default(),
        }
    }
}

/// What a scrape shows of one plugin at that moment.
#[derive(Debug, Clone, Default)]
pub struct PluginSample {
    pub plugin: String,
    pub version: String,
    pub state: String,
    pub up: bool,
    pub sha256: String,
    /// What enforces its limits ("cgroup v1", "rlimits only", ...).
    pub enforcement: String,
    /// The trusted key's name that signed what runs; empty when unsigned.
    pub signer: String,
    pub memory_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub pids: Option<u64>,
}

/// Every state a plugin can be in, so a scrape shows a 0 for the others.
const STATES: [&str; 9] = [
    "starting",
    "initializing",
    "ready",
    "degraded",
    "stopping",
    "stopped",
    "backoff",
    "failed",
    "waiting",
];

impl Metrics {
    /// A child was restarted; `reason` is [`crate::ExitReason::kind`].
    pub fn restarted(&self, plugin: &str, reason: &str) {
        self.restarts
            .get_or_create(&ReasonLabels {
                plugin: plugin.to_string(),
                reason: reason.to_string(),
            })
            .inc();
        if reason == "oom" {
            self.oom_kills
                .get_or_create(&PluginLabel {
                    plugin: plugin.to_string(),
                })
                .inc();
        }
    }

    pub fn health_failed(&self, plugin: &str) {
        self.health_failures
            .get_or_create(&PluginLabel {
                plugin: plugin.to_string(),
            })
            .inc();
    }

    /// A state snapshot could not be taken or written.
    pub fn snapshot_failed(&self, plugin: &str) {
        self.snapshot_failures
            .get_or_create(&PluginLabel {
                plugin: plugin.to_string(),
            })
            .inc();
    }

    /// Spawn to ready.
    pub fn started(&self, plugin: &str, took: Duration) {
        self.start_duration
            .get_or_create(&PluginLabel {
                plugin: plugin.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// One finished call. `method` must already be bounded (a listed method
    /// or `other`), so callers cannot grow the label set without limit.
    pub fn call(&self, plugin: &str, method: &str, code: tonic::Code, took: Duration) {
        let labels = MethodLabels {
            plugin: plugin.to_string(),
            method: method.to_string(),
        };
        self.call_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        if code != tonic::Code::Ok {
            self.call_errors.get_or_create(&labels).inc();
        }
        self.calls
            .get_or_create(&CallLabels {
                plugin: labels.plugin,
                method: labels.method,
                code: format!("{code:?}"),
            })
            .inc();
    }

    /// The call series of `plugin`, for the plugin to keep: a finished
    /// call is then recorded without building label strings or looking its
    /// series up in the families.
    pub fn call_series(&self, plugin: &str) -> CallSeries {
        CallSeries {
            metrics: self.clone(),
            plugin: plugin.to_string(),
            methods: Default::default(),
        }
    }

    /// One call of `plugin` is in flight (admitted, not yet answered) until
    /// the guard is dropped.
    pub fn in_flight(&self, plugin: &str) -> GaugeGuard {
        Self::hold(&self.in_flight, plugin)
    }

    /// One call of `plugin` waits for an admission slot until the guard is
    /// dropped.
    pub fn queued(&self, plugin: &str) -> GaugeGuard {
        Self::hold(&self.queued, plugin)
    }

    fn hold(family: &Family<PluginLabel, Gauge>, plugin: &str) -> GaugeGuard {
        GaugeGuard::hold(Self::gauge(family, plugin))
    }

    fn gauge(family: &Family<PluginLabel, Gauge>, plugin: &str) -> Gauge {
        family
            .get_or_create(&PluginLabel {
                plugin: plugin.to_string(),
            })
            .clone()
    }

    /// The plugin's in-flight and queued gauges, for callers that keep the
    /// handles (no label lookup per call).
    pub fn call_gauges(&self, plugin: &str) -> (Gauge, Gauge) {
        (
            Self::gauge(&self.in_flight, plugin),
            Self::gauge(&self.queued, plugin),
        )
    }

    /// The refusal counter of one rate limit (`method` `*` for the
    /// plugin's), for the limit to keep: no label lookup per call.
    pub fn rate_limited(&self, plugin: &str, method: &str, limit: &str) -> Counter {
        self.rate_limited
            .get_or_create(&RateLimitLabels {
                plugin: plugin.to_string(),
                method: method.to_string(),
                limit: limit.to_string(),
            })
            .clone()
    }

    /// The text exposition of every series, with gauges from `samples`.
    pub fn encode(&self, samples: &[PluginSample]) -> String {
        let mut registry = Registry::with_prefix("plugvisor");
        let up = Family::<PluginLabel, Gauge>::default();
        let state = Family::<StateLabels, Gauge>::default();
        let info = Family::<InfoLabels, Gauge>::default();
        let memory = Family::<PluginLabel, Gauge>::default();
        // A counter, built afresh for each scrape with the cgroup's total:
        // CPU time only grows (a restarted instance's new cgroup starts at
        // zero again, which `rate()` reads as a counter reset).
        let cpu = Family::<PluginLabel, Counter<f64, std::sync::atomic::AtomicU64>>::default();
        let pids = Family::<PluginLabel, Gauge>::default();
        for s in samples {
            let plugin = PluginLabel {
                plugin: s.plugin.clone(),
            };
            // Per-plugin counters exist from the start at 0, so the first
            // OOM kill or failed probe is an increase `rate()` can see (and
            // the encoder leaves out families without series).
            let _ = self.oom_kills.get_or_create(&plugin);
            let _ = self.health_failures.get_or_create(&plugin);
            let _ = self.snapshot_failures.get_or_create(&plugin);
            up.get_or_create(&plugin).set(i64::from(s.up));
            for name in STATES {
                state
                    .get_or_create(&StateLabels {
                        plugin: s.plugin.clone(),
                        state: name.to_string(),
                    })
                    .set(i64::from(s.state == name));
            }
            info.get_or_create(&InfoLabels {
                plugin: s.plugin.clone(),
                version: s.version.clone(),
                sha256: s.sha256.clone(),
                enforcement: s.enforcement.clone(),
                signer: s.signer.clone(),
            })
            .set(1);
            if let Some(bytes) = s.memory_bytes {
                memory.get_or_create(&plugin).set(bytes as i64);
            }
            if let Some(seconds) = s.cpu_seconds {
                cpu.get_or_create(&plugin).inc_by(seconds);
            }
            if let Some(n) = s.pids {
                pids.get_or_create(&plugin).set(n as i64);
            }
        }
        registry.register(
            "plugin_up",
            "1 when at least one instance of the plugin is ready or degraded",
            up,
        );
        registry.register("plugin_state", "1 for the plugin's current state", state);
        registry.register(
            "plugin_info",
            "What the plugin runs: its version, the executable's sha256, who signed it, and its limit enforcement",
            info,
        );
        registry.register(
            "plugin_memory_bytes",
            "Memory in use by the plugin's cgroup",
            memory,
        );
        registry.register(
            "plugin_cpu_seconds",
            "CPU time used by the plugin's cgroup since it was made",
            cpu,
        );
        registry.register(
            "plugin_pids",
            "Processes and threads in the plugin's cgroup",
            pids,
        );
        registry.register(
            "calls_rate_limited",
            "Calls refused by a rate limit (calls.rate), by limit",
            self.rate_limited.clone(),
        );
        registry.register(
            "restarts",
            "Restarts of plugin children, by exit reason",
            self.restarts.clone(),
        );
        registry.register(
            "oom_kills",
            "Plugin children killed by the OOM killer",
            self.oom_kills.clone(),
        );
        registry.register(
            "health_check_failures",
            "Failed health probes",
            self.health_failures.clone(),
        );
        registry.register(
            "snapshot_failures",
            "State snapshots that could not be taken or written",
            self.snapshot_failures.clone(),
        );
        registry.register(
            "start_duration_seconds",
            "Spawn to ready",
            self.start_duration.clone(),
        );
        registry.register(
            "calls",
            "Calls to plugins, by method and status code",
            self.calls.clone(),
        );
        registry.register(
            "call_errors",
            "Calls that did not return OK",
            self.call_errors.clone(),
        );
        registry.register(
            "call_duration_seconds",
            "Call latency, admission to reply",
            self.call_duration.clone(),
        );
        registry.register(
            "calls_in_flight",
            "Calls admitted and not yet answered",
            self.in_flight.clone(),
        );
        registry.register(
            "calls_queued",
            "Calls waiting for one of the plugin's call slots (calls.max_in_flight)",
            self.queued.clone(),
        );
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }
}

/// The call series of one plugin (`plugvisor_calls_total`,
/// `plugvisor_call_errors_total`, `plugvisor_call_duration_seconds`), each
/// method's handles looked up once and kept. The methods are bounded (the
/// listed ones and `other`), and so is this cache.
pub struct CallSeries {
    metrics: Metrics,
    plugin: String,
    /// Read-mostly: written once per method.
    methods: std::sync::RwLock<std::collections::HashMap<String, std::sync::Arc<MethodSeries>>>,
}

impl std::fmt::Debug for CallSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallSeries")
            .field("plugin", &self.plugin)
            .finish_non_exhaustive()
    }
}

/// One method's call series; `calls_total` by code, made on first use.
pub struct MethodSeries {
    duration: Histogram,
    errors: Counter,
    by_code: [std::sync::OnceLock<Counter>; 17],
    metrics: Metrics,
    plugin: String,
    method: String,
}

impl CallSeries {
    /// The series of `method` (which must already be bounded: a listed
    /// method or `other`).
    pub fn method(&self, method: &str) -> std::sync::Arc<MethodSeries> {
        if let Some(series) = self
            .methods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(method)
        {
            return series.clone();
        }
        let labels = MethodLabels {
            plugin: self.plugin.clone(),
            method: method.to_string(),
        };
        let series = std::sync::Arc::new(MethodSeries {
            duration: self.metrics.call_duration.get_or_create(&labels).clone(),
            errors: self.metrics.call_errors.get_or_create(&labels).clone(),
            by_code: Default::default(),
            metrics: self.metrics.clone(),
            plugin: labels.plugin,
            method: labels.method,
        });
        // A single insert: a poisoned map is still consistent.
        self.methods
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(method.to_string())
            .or_insert(series)
            .clone()
    }
}

impl MethodSeries {
    /// The plugin these series are of.
    pub fn plugin(&self) -> &str {
        &self.plugin
    }

    /// One finished call; the same series as [`Metrics::call`].
    pub fn record(&self, code: tonic::Code, took: Duration) {
        self.duration.observe(took.as_secs_f64());
        if code != tonic::Code::Ok {
            self.errors.inc();
        }
        let slot = &self.by_code[(code as usize).min(16)];
        slot.get_or_init(|| {
            self.metrics
                .calls
                .get_or_create(&CallLabels {
                    plugin: self.plugin.clone(),
                    method: self.method.clone(),
                    code: format!("{code:?}"),
                })
                .clone()
        })
        .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_every_series_with_labels() {
        let m = Metrics::default();
        m.restarted("echo", "signal");
        m.restarted("echo", "oom");
        m.health_failed("echo");
        m.snapshot_failed("echo");
        m.started("echo", Duration::from_millis(3));
        m.call("echo", "upper", tonic::Code::Ok, Duration::from_micros(80));
        m.call(
            "echo",
            "upper",
            tonic::Code::NotFound,
            Duration::from_micros(90),
        );
        let text = m.encode(&[PluginSample {
            plugin: "echo".into(),
            version: "1.0.0".into(),
            state: "ready".into(),
            up: true,
            sha256: "ab".into(),
            enforcement: "cgroup v1".into(),
            signer: "release".into(),
            memory_bytes: Some(1024),
            cpu_seconds: Some(0.5),
            pids: Some(3),
        }]);
        for needle in [
            "plugvisor_plugin_up{plugin=\"echo\"} 1",
            "plugvisor_plugin_state{plugin=\"echo\",state=\"ready\"} 1",
            "plugvisor_plugin_state{plugin=\"echo\",state=\"failed\"} 0",
            "plugvisor_plugin_info{plugin=\"echo\",version=\"1.0.0\",sha256=\"ab\",enforcement=\"cgroup v1\",signer=\"release\"} 1",
            "plugvisor_plugin_memory_bytes{plugin=\"echo\"} 1024",
            "# TYPE plugvisor_plugin_cpu_seconds counter",
            "plugvisor_plugin_cpu_seconds_total{plugin=\"echo\"} 0.5",
            "plugvisor_plugin_pids{plugin=\"echo\"} 3",
            "plugvisor_restarts_total{plugin=\"echo\",reason=\"signal\"} 1",
            "plugvisor_oom_kills_total{plugin=\"echo\"} 1",
            "plugvisor_health_check_failures_total{plugin=\"echo\"} 1",
            "plugvisor_snapshot_failures_total{plugin=\"echo\"} 1",
            "plugvisor_start_duration_seconds_count{plugin=\"echo\"} 1",
            "plugvisor_calls_total{plugin=\"echo\",method=\"upper\",code=\"Ok\"} 1",
            "plugvisor_calls_total{plugin=\"echo\",method=\"upper\",code=\"NotFound\"} 1",
            "plugvisor_call_errors_total{plugin=\"echo\",method=\"upper\"} 1",
            "plugvisor_call_duration_seconds_count{plugin=\"echo\",method=\"upper\"} 2",
        ] {
            assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
        }
    }

    #[test]
    fn in_flight_and_queued_follow_their_guards() {
        let m = Metrics::default();
        let a = m.in_flight("echo");
        let b = m.in_flight("echo");
        let q = m.queued("echo");
        let text = m.encode(&[]);
        assert!(
            text.contains("plugvisor_calls_in_flight{plugin=\"echo\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("plugvisor_calls_queued{plugin=\"echo\"} 1"),
            "{text}"
        );
        drop((a, q));
        let text = m.encode(&[]);
        assert!(
            text.contains("plugvisor_calls_in_flight{plugin=\"echo\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("plugvisor_calls_queued{plugin=\"echo\"} 0"),
            "{text}"
        );
        drop(b);
        let text = m.encode(&[]);
        assert!(
            text.contains("plugvisor_calls_in_flight{plugin=\"echo\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn per_plugin_counters_start_at_zero() {
        let m = Metrics::default();
        let text = m.encode(&[PluginSample {
            plugin: "echo".into(),
            version: "1.0.0".into(),
            state: "ready".into(),
            up: true,
            sha256: String::new(),
            enforcement: "rlimits".into(),
            signer: String::new(),
            memory_bytes: None,
            cpu_seconds: None,
            pids: None,
        }]);
        for needle in [
            "plugvisor_oom_kills_total{plugin=\"echo\"} 0",
            "plugvisor_health_check_failures_total{plugin=\"echo\"} 0",
            "plugvisor_snapshot_failures_total{plugin=\"echo\"} 0",
        ] {
            assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
        }
        assert!(!text.contains("plugvisor_plugin_cpu_seconds"), "{text}");
    }

    #[test]
    fn kept_call_series_record_what_a_looked_up_call_records() {
        let looked_up = Metrics::default();
        let kept = Metrics::default();
        let series = kept.call_series("echo");
        for (code, us) in [
            (tonic::Code::Ok, 80),
            (tonic::Code::Ok, 900),
            (tonic::Code::NotFound, 40),
        ] {
            looked_up.call("echo", "upper", code, Duration::from_micros(us));
            series
                .method("upper")
                .record(code, Duration::from_micros(us));
        }
        assert!(std::sync::Arc::ptr_eq(
            &series.method("upper"),
            &series.method("upper")
        ));
        assert_eq!(series.method("upper").plugin(), "echo");
        let (a, b) = (looked_up.encode(&[]), kept.encode(&[]));
        // The same series and values (a family lists its series in no
        // particular order).
        let sorted = |text: &str| {
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            lines.sort();
            lines
        };
        assert_eq!(sorted(&a), sorted(&b));
        assert!(
            b.contains(
                "plugvisor_calls_total{plugin=\"echo\",method=\"upper\",code=\"NotFound\"} 1"
            ),
            "{b}"
        );
    }
}
