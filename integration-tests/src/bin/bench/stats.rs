//! Sample statistics and the printed table of `plugvisor-bench`.

use std::collections::BTreeMap;
use std::time::Duration;

/// Percentiles of a set of timings.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub p50: Duration,
    pub p99: Duration,
    pub mean: Duration,
}

impl Stats {
    /// Nearest-rank percentiles of `samples`.
    pub fn of(mut samples: Vec<Duration>) -> Result<Stats, super::BoxError> {
        if samples.is_empty() {
            return Err("no samples were taken".into());
        }
        samples.sort_unstable();
        let rank = |p: f64| {
            let i = ((p / 100.0) * samples.len() as f64).ceil() as usize;
            samples[i.clamp(1, samples.len()) - 1]
        };
        let sum: Duration = samples.iter().sum();
        Ok(Stats {
            p50: rank(50.0),
            p99: rank(99.0),
            mean: sum / samples.len() as u32,
        })
    }

    pub fn p50_us(&self) -> f64 {
        self.p50.as_secs_f64() * 1e6
    }

    pub fn p99_us(&self) -> f64 {
        self.p99.as_secs_f64() * 1e6
    }

    /// `p50 12.3 µs / p99 20.1 µs`
    pub fn p50_p99(&self) -> String {
        format!("p50 {} / p99 {}", fmt_us(self.p50), fmt_us(self.p99))
    }

    /// `p50 1.23 ms / p99 2.01 ms`
    pub fn p50_p99_ms(&self) -> String {
        format!("p50 {} / p99 {}", fmt_ms(self.p50), fmt_ms(self.p99))
    }
}

pub fn fmt_us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

pub fn fmt_ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// How a figure compares with its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Miss,
    Info,
    Error,
}

impl Verdict {
    pub fn at_most(value: f64, target: f64) -> Verdict {
        if value <= target {
            Verdict::Pass
        } else {
            Verdict::Miss
        }
    }

    pub fn at_least(value: f64, target: f64) -> Verdict {
        if value >= target {
            Verdict::Pass
        } else {
            Verdict::Miss
        }
    }

    fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "ok",
            Verdict::Miss => "MISS",
            Verdict::Info => "",
            Verdict::Error => "ERROR",
        }
    }
}

/// One line of the table. A label starting with a digit opens a figure's
/// group; indented labels continue the group above.
pub struct Row {
    figure: String,
    measured: String,
    target: String,
    verdict: Verdict,
    /// How the CPUs were kept while this figure was measured (`spin`,
    /// `idle`); empty when it does not matter (not a latency figure).
    cpus: &'static str,
}

impl Row {
    pub fn new(
        figure: impl Into<String>,
        measured: impl Into<String>,
        target: impl Into<String>,
        verdict: Verdict,
    ) -> Row {
        Row {
            figure: figure.into(),
            measured: measured.into(),
            target: target.into(),
            verdict,
            cpus: "",
        }
    }

    /// Marks the row as measured with the CPUs in `mode`.
    pub fn cpus(mut self, mode: &'static str) -> Row {
        self.cpus = mode;
        self
    }
}

/// The figures of one run, printed in SPEC order whatever order they were
/// measured in.
#[derive(Default)]
pub struct Table {
    rows: Vec<(u32, Row)>,
    errors: Vec<String>,
    json: BTreeMap<String, f64>,
}

impl Table {
    pub fn push(&mut self, row: Row) {
        let opens = !row.figure.starts_with(char::is_whitespace);
        let group = opens
            .then(|| row.figure.split_whitespace().next()?.parse::<u32>().ok())
            .flatten()
            .or_else(|| self.rows.last().map(|(g, _)| *g))
            .unwrap_or(99);
        self.rows.push((group, row));
    }

    /// A section that could not be measured.
    pub fn error(&mut self, figure: &str, error: &dyn std::fmt::Display) {
        self.errors.push(format!("{}: {error}", figure.trim()));
        self.push(Row::new(
            figure,
            format!("not measured (error #{})", self.errors.len()),
            "-",
            Verdict::Error,
        ));
    }

    pub fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }

    pub fn json(&mut self, key: &str, value: f64) {
        self.json.insert(key.to_string(), value);
    }

    pub fn sort(&mut self) {
        self.rows.sort_by_key(|(g, _)| *g);
    }

    pub fn print(&self) {
        let header = Row::new("figure", "measured", "SPEC §8 target", Verdict::Info).cpus("cpus");
        let width = |f: fn(&Row) -> &str| {
            self.rows
                .iter()
                .map(|(_, r)| f(r).chars().count())
                .chain([f(&header).chars().count()])
                .max()
                .unwrap_or(0)
        };
        let w1 = width(|r| &r.figure);
        let w2 = width(|r| &r.measured);
        let w3 = width(|r| &r.target);
        let line = |r: &Row, verdict: &str| {
            let text = format!(
                "{}  {}  {}  {}  {verdict}",
                pad(&r.figure, w1),
                pad(&r.measured, w2),
                pad(&r.target, w3),
                pad(r.cpus, 4)
            );
            println!("{}", text.trim_end());
        };
        line(&header, "verdict");
        println!("{}", "-".repeat(w1 + w2 + w3 + 4 + 8 + 7));
        let mut last = None;
        for (group, row) in &self.rows {
            if last.is_some_and(|g| g != *group) {
                println!();
            }
            last = Some(*group);
            line(row, row.verdict.label());
        }
        let misses = self
            .rows
            .iter()
            .filter(|(_, r)| r.verdict == Verdict::Miss)
            .count();
        let passes = self
            .rows
            .iter()
            .filter(|(_, r)| r.verdict == Verdict::Pass)
            .count();
        println!();
        println!(
            "{passes} target(s) met, {misses} missed, {} section(s) not measured",
            self.errors.len()
        );
        for (i, e) in self.errors.iter().enumerate() {
            println!("error #{}: {e}", i + 1);
        }
    }

    pub fn json_text(&self) -> String {
        let map: serde_json::Map<String, serde_json::Value> = self
            .json
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::json!((v * 1000.0).round() / 1000.0)))
            .collect();
        serde_json::Value::Object(map).to_string()
    }
}

fn pad(text: &str, width: usize) -> String {
    let n = text.chars().count();
    format!("{text}{}", " ".repeat(width.saturating_sub(n)))
}
