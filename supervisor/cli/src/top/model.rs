//! What `top` shows, computed from two readings of the daemon: rows with
//! rates over the interval between them, sorting and filtering. Pure
//! functions of the readings, so they are tested without a daemon.

use super::prom::{self, CallTotals};
use plugvisor_proto as pb;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// One reading: the daemon's `List` and its metrics, taken at `at`.
#[derive(Debug, Clone)]
pub struct Reading {
    pub at: Instant,
    pub plugins: Vec<pb::PluginStatus>,
    pub calls: HashMap<String, CallTotals>,
}

/// One plugin's line, with rates over the last interval. Rates are `None`
/// until there are two readings (or, for latency, no calls in between).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    pub name: String,
    pub state: String,
    pub pid: u32,
    pub uptime_secs: u64,
    pub restarts: u32,
    pub cpu_percent: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub calls_per_sec: Option<f64>,
    pub errors_per_sec: Option<f64>,
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
    pub in_flight: Option<f64>,
    pub queued: Option<f64>,
    /// It restarted during the last interval (its count went up).
    pub just_restarted: bool,
    pub replicas: Vec<pb::ReplicaStatus>,
}

/// The columns, in display order; each can be sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    Name,
    State,
    Pid,
    Uptime,
    Restarts,
    Cpu,
    Memory,
    Calls,
    Errors,
    P50,
    P99,
    InFlight,
    Queued,
}

impl Column {
    pub const ALL: [Column; 13] = [
        Column::Name,
        Column::State,
        Column::Pid,
        Column::Uptime,
        Column::Restarts,
        Column::Cpu,
        Column::Memory,
        Column::Calls,
        Column::Errors,
        Column::P50,
        Column::P99,
        Column::InFlight,
        Column::Queued,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Column::Name => "NAME",
            Column::State => "STATE",
            Column::Pid => "PID",
            Column::Uptime => "UPTIME",
            Column::Restarts => "RESTARTS",
            Column::Cpu => "CPU%",
            Column::Memory => "MEM",
            Column::Calls => "CALLS/S",
            Column::Errors => "ERR/S",
            Column::P50 => "P50",
            Column::P99 => "P99",
            Column::InFlight => "INFLIGHT",
            Column::Queued => "QUEUED",
        }
    }

    /// Parses a `--sort` value: the title, any case, `%` and `/S` optional.
    pub fn parse(s: &str) -> Option<Column> {
        let want = s.to_ascii_uppercase();
        let norm = |t: &str| t.trim_end_matches("/S").trim_end_matches('%').to_string();
        Column::ALL
            .into_iter()
            .find(|c| c.title() == want || norm(c.title()) == norm(&want))
    }

    /// Numeric columns sort largest first by default; text ones A to Z.
    pub fn descending_by_default(self) -> bool {
        !matches!(self, Column::Name | Column::State)
    }
}

/// Builds the rows of `now`, with rates against `before` when there is one.
pub fn rows(before: Option<&Reading>, now: &Reading) -> Vec<Row> {
    let empty = CallTotals::default();
    now.plugins
        .iter()
        .map(|p| {
            let prev = before.and_then(|b| b.plugins.iter().find(|q| q.name == p.name));
            let usage = p.isolation.as_ref().and_then(|i| i.usage);
            let calls = now.calls.get(&p.name).unwrap_or(&empty);
            let mut row = Row {
                name: p.name.clone(),
                state: p.state.clone(),
                pid: p.pid,
                uptime_secs: p.uptime_secs,
                restarts: p.restarts,
                memory_bytes: usage.as_ref().and_then(|u| u.memory_bytes),
                in_flight: calls.in_flight,
                queued: calls.queued,
                just_restarted: prev.is_some_and(|q| p.restarts > q.restarts),
                replicas: p.replicas.clone(),
                ..Row::default()
            };
            let Some(before) = before else {
                return row;
            };
            let secs = now.at.saturating_duration_since(before.at).as_secs_f64();
            if secs <= 0.0 {
                return row;
            }
            let cpu_before = prev
                .and_then(|q| q.isolation.as_ref())
                .and_then(|i| i.usage.as_ref())
                .and_then(|u| u.cpu_usec);
            if let (Some(a), Some(b)) = (cpu_before, usage.as_ref().and_then(|u| u.cpu_usec)) {
                let used = prom::increase(a as f64, b as f64) / 1e6;
                row.cpu_percent = Some(100.0 * used / secs);
            }
            let old = before.calls.get(&p.name).unwrap_or(&empty);
            row.calls_per_sec = Some(prom::increase(old.calls, calls.calls) / secs);
            row.errors_per_sec = Some(prom::increase(old.errors, calls.errors) / secs);
            let q = |q| prom::quantile(q, &old.buckets, &calls.buckets);
            row.p50 = q(0.5).map(Duration::from_secs_f64);
            row.p99 = q(0.99).map(Duration::from_secs_f64);
            row
        })
        .collect()
}

/// Keeps the rows whose name contains `filter`, or whose state is it
/// (`failed`, `ready`, ...); an empty filter keeps all.
pub fn matches(row: &Row, filter: &str) -> bool {
    let filter = filter.trim();
    filter.is_empty()
        || row.name.contains(filter)
        || row.state.eq_ignore_ascii_case(filter)
        || row.replicas.iter().any(|r| r.state == filter)
}

/// Sorts by `column`, ties by name; unknown values (`-`) go last.
pub fn sort(rows: &mut [Row], column: Column, descending: bool) {
    fn opt<T: PartialOrd>(a: Option<T>, b: Option<T>) -> Ordering {
        match (a, b) {
            (Some(a), Some(b)) => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
            (Some(_), None) => Ordering::Greater,
            (None, Some(_)) => Ordering::Less,
            (None, None) => Ordering::Equal,
        }
    }
    rows.sort_by(|a, b| {
        let by = match column {
            Column::Name => a.name.cmp(&b.name),
            Column::State => a.state.cmp(&b.state),
            Column::Pid => a.pid.cmp(&b.pid),
            Column::Uptime => a.uptime_secs.cmp(&b.uptime_secs),
            Column::Restarts => a.restarts.cmp(&b.restarts),
            Column::Cpu => opt(a.cpu_percent, b.cpu_percent),
            Column::Memory => opt(a.memory_bytes, b.memory_bytes),
            Column::Calls => opt(a.calls_per_sec, b.calls_per_sec),
            Column::Errors => opt(a.errors_per_sec, b.errors_per_sec),
            Column::P50 => opt(a.p50, b.p50),
            Column::P99 => opt(a.p99, b.p99),
            Column::InFlight => opt(a.in_flight, b.in_flight),
            Column::Queued => opt(a.queued, b.queued),
        };
        let by = if descending { by.reverse() } else { by };
        by.then_with(|| a.name.cmp(&b.name))
    });
}

/// The cells of a row, as both the screen and `--once` print them.
pub fn cells(row: &Row) -> Vec<String> {
    let rate = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let count = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    vec![
        row.name.clone(),
        row.state.clone(),
        if row.pid == 0 {
            "-".into()
        } else {
            row.pid.to_string()
        },
        uptime(row.uptime_secs),
        row.restarts.to_string(),
        rate(row.cpu_percent),
        row.memory_bytes.map_or("-".into(), bytes),
        rate(row.calls_per_sec),
        rate(row.errors_per_sec),
        row.p50.map_or("-".into(), latency),
        row.p99.map_or("-".into(), latency),
        count(row.in_flight),
        count(row.queued),
    ]
}

/// The cells of a replica line under its plugin.
pub fn replica_cells(r: &pb::ReplicaStatus) -> Vec<String> {
    let mut cells = vec![
        format!("  {}", r.instance),
        r.state.clone(),
        if r.pid == 0 {
            "-".into()
        } else {
            r.pid.to_string()
        },
        uptime(r.uptime_secs),
        r.restarts.to_string(),
    ];
    cells.resize(Column::ALL.len(), String::new());
    cells
}

pub fn uptime(secs: u64) -> String {
    match secs {
        0 => "-".into(),
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1}{}", UNITS[unit])
}

pub fn latency(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0}µs")
    } else if us < 1e6 {
        format!("{:.1}ms", us / 1e3)
    } else {
        format!("{:.2}s", us / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(name: &str, state: &str, restarts: u32, cpu_usec: u64) -> pb::PluginStatus {
        pb::PluginStatus {
            name: name.into(),
            state: state.into(),
            restarts,
            pid: 42,
            isolation: Some(pb::Isolation {
                usage: Some(pb::Usage {
                    cpu_usec: Some(cpu_usec),
                    memory_bytes: Some(3 << 20),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn reading(at: Instant, plugins: Vec<pb::PluginStatus>, calls: f64) -> Reading {
        let totals = CallTotals {
            calls,
            errors: calls / 10.0,
            buckets: vec![(0.001, calls), (f64::INFINITY, calls)],
            ..Default::default()
        };
        Reading {
            at,
            plugins,
            calls: [("echo".to_string(), totals)].into(),
        }
    }

    #[test]
    fn rates_are_over_the_interval_between_readings() {
        let t0 = Instant::now();
        let a = reading(t0, vec![status("echo", "ready", 0, 1_000_000)], 100.0);
        let b = reading(
            t0 + Duration::from_secs(2),
            vec![status("echo", "ready", 1, 1_500_000)],
            300.0,
        );
        let first = &rows(None, &a)[0];
        assert_eq!(first.calls_per_sec, None, "one reading has no rate");
        assert_eq!(first.memory_bytes, Some(3 << 20));
        let row = &rows(Some(&a), &b)[0];
        assert_eq!(row.calls_per_sec, Some(100.0));
        assert_eq!(row.errors_per_sec, Some(10.0));
        assert_eq!(row.cpu_percent, Some(25.0));
        assert!(row.just_restarted);
        assert!(row.p50.is_some_and(|d| d <= Duration::from_millis(1)));
    }

    #[test]
    fn filters_by_name_or_state_and_sorts_unknowns_last() {
        let mut rows = vec![
            Row {
                name: "b".into(),
                state: "failed".into(),
                ..Row::default()
            },
            Row {
                name: "a".into(),
                state: "ready".into(),
                calls_per_sec: Some(5.0),
                ..Row::default()
            },
            Row {
                name: "c".into(),
                state: "ready".into(),
                calls_per_sec: Some(9.0),
                ..Row::default()
            },
        ];
        sort(&mut rows, Column::Calls, true);
        let names: Vec<_> = rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["c", "a", "b"]);
        sort(&mut rows, Column::Name, false);
        assert_eq!(rows[0].name, "a");
        assert!(matches(&rows[1], "failed"));
        assert!(!matches(&rows[0], "failed"));
        assert!(matches(&rows[2], "c"));
    }

    #[test]
    fn parses_sort_columns_loosely() {
        assert_eq!(Column::parse("cpu"), Some(Column::Cpu));
        assert_eq!(Column::parse("calls"), Some(Column::Calls));
        assert_eq!(Column::parse("P99"), Some(Column::P99));
        assert_eq!(Column::parse("nope"), None);
    }

    #[test]
    fn formats_units_for_people() {
        assert_eq!(bytes(512), "512B");
        assert_eq!(bytes(3 << 20), "3.0MiB");
        assert_eq!(uptime(75), "1m15s");
        assert_eq!(latency(Duration::from_micros(250)), "250µs");
        assert_eq!(latency(Duration::from_millis(12)), "12.0ms");
    }
}
