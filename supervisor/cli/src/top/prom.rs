//! Reads the daemon's Prometheus text (the same series `/metrics` serves and
//! dashboards query) into per-plugin call totals, and turns two readings
//! into rates and latency quantiles the way PromQL's `rate()` and
//! `histogram_quantile()` would.

use std::collections::HashMap;

/// One plugin's call series at one scrape, summed over methods and codes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallTotals {
    /// `plugvisor_calls_total`.
    pub calls: f64,
    /// `plugvisor_call_errors_total`.
    pub errors: f64,
    /// `plugvisor_call_duration_seconds_bucket`: (upper bound, cumulative
    /// count), sorted by bound; the last bound is +Inf.
    pub buckets: Vec<(f64, f64)>,
    /// `plugvisor_calls_in_flight`; `None` when the daemon does not export it.
    pub in_flight: Option<f64>,
    /// `plugvisor_calls_queued`; `None` when the daemon does not export it.
    pub queued: Option<f64>,
}

/// Parses the text exposition into per-plugin totals. Lines it does not
/// understand are skipped: this is a view, not a validator.
pub fn parse(text: &str) -> HashMap<String, CallTotals> {
    let mut out: HashMap<String, CallTotals> = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((name, labels, value)) = sample(line) else {
            continue;
        };
        let Some(plugin) = label(&labels, "plugin") else {
            continue;
        };
        let totals = out.entry(plugin.to_string()).or_default();
        match name {
            "plugvisor_calls_total" => totals.calls += value,
            "plugvisor_call_errors_total" => totals.errors += value,
            "plugvisor_calls_in_flight" => *totals.in_flight.get_or_insert(0.0) += value,
            "plugvisor_calls_queued" => *totals.queued.get_or_insert(0.0) += value,
            "plugvisor_call_duration_seconds_bucket" => {
                let Some(le) = label(&labels, "le").and_then(parse_float) else {
                    continue;
                };
                match totals.buckets.iter_mut().find(|(b, _)| *b == le) {
                    Some((_, n)) => *n += value,
                    None => totals.buckets.push((le, value)),
                }
            }
            _ => {}
        }
    }
    for totals in out.values_mut() {
        totals.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

fn parse_float(s: &str) -> Option<f64> {
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok(),
    }
}

fn label<'a>(labels: &'a Labels, name: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A sample line's label pairs, in order.
type Labels = Vec<(String, String)>;

/// `name{k="v",...} value`, with `\"`, `\\` and `\n` unescaped in values.
fn sample(line: &str) -> Option<(&str, Labels, f64)> {
    let (head, value) = line.trim_end().rsplit_once(' ')?;
    let value = parse_float(value)?;
    let Some((name, rest)) = head.split_once('{') else {
        return Some((head, Vec::new(), value));
    };
    let mut labels = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() || chars.next() != Some('"') {
            break;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.push((key.trim_start_matches(',').to_string(), value));
        if chars.peek() == Some(&',') {
            chars.next();
        }
        if chars.peek() == Some(&'}') {
            break;
        }
    }
    Some((name, labels, value))
}

/// `rate()` over one interval: a counter that went down was reset (its
/// plugin restarted its series), so all of its new value is the increase.
pub fn increase(before: f64, after: f64) -> f64 {
    if after < before {
        after
    } else {
        after - before
    }
}

/// The `q` quantile (0..1) of the calls observed between two readings of a
/// histogram, interpolated linearly inside the bucket it falls in, as
/// `histogram_quantile()` does. `None` without calls in between. A quantile
/// in the +Inf bucket answers the highest finite bound.
pub fn quantile(q: f64, before: &[(f64, f64)], after: &[(f64, f64)]) -> Option<f64> {
    let count_before = |le: f64| {
        before
            .iter()
            .find(|(b, _)| *b == le)
            .map_or(0.0, |(_, n)| *n)
    };
    let deltas: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, n)| (le, increase(count_before(le), n)))
        .collect();
    let total = deltas.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, n) in &deltas {
        if n >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let in_bucket = n - lower.1;
            if in_bucket <= 0.0 {
                return Some(le);
            }
            return Some(lower.0 + (le - lower.0) * (rank - lower.1) / in_bucket);
        }
        lower = (le, n);
    }
    Some(lower.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP plugvisor_calls Calls to plugins, by method and status code.
# TYPE plugvisor_calls counter
plugvisor_calls_total{plugin="echo",method="upper",code="Ok"} 8
plugvisor_calls_total{plugin="echo",method="upper",code="NotFound"} 2
plugvisor_calls_total{plugin="echo",method="lower",code="Ok"} 10
plugvisor_calls_total{plugin="odd",method="a \"quoted\", method",code="Ok"} 1
plugvisor_call_errors_total{plugin="echo",method="upper"} 2
plugvisor_call_duration_seconds_bucket{le="0.001",plugin="echo",method="upper"} 5
plugvisor_call_duration_seconds_bucket{le="0.001",plugin="echo",method="lower"} 5
plugvisor_call_duration_seconds_bucket{plugin="echo",method="upper",le="0.002"} 10
plugvisor_call_duration_seconds_bucket{plugin="echo",method="lower",le="0.002"} 10
plugvisor_call_duration_seconds_bucket{plugin="echo",method="upper",le="+Inf"} 10
plugvisor_call_duration_seconds_bucket{plugin="echo",method="lower",le="+Inf"} 10
plugvisor_calls_in_flight{plugin="echo"} 3
plugvisor_plugin_up{plugin="echo"} 1
# EOF
"#;

    #[test]
    fn sums_each_plugins_calls_over_methods_and_codes() {
        let totals = parse(TEXT);
        let echo = &totals["echo"];
        assert_eq!(echo.calls, 20.0);
        assert_eq!(echo.errors, 2.0);
        assert_eq!(
            echo.buckets,
            vec![(0.001, 10.0), (0.002, 20.0), (f64::INFINITY, 20.0)]
        );
        assert_eq!(echo.in_flight, Some(3.0));
        assert_eq!(echo.queued, None);
        assert_eq!(totals["odd"].calls, 1.0, "quoted label values parse");
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket_of_the_interval() {
        let before = [(0.001, 10.0), (0.002, 20.0), (f64::INFINITY, 20.0)];
        // 100 new calls: 50 under 1 ms, 50 between 1 and 2 ms.
        let after = [(0.001, 60.0), (0.002, 120.0), (f64::INFINITY, 120.0)];
        assert_eq!(quantile(0.5, &before, &after), Some(0.001));
        let p99 = quantile(0.99, &before, &after).unwrap();
        assert!((p99 - 0.00198).abs() < 1e-9, "{p99}");
        assert_eq!(quantile(0.5, &after, &after), None, "no calls, no latency");
    }

    #[test]
    fn a_quantile_beyond_the_last_bound_answers_that_bound() {
        let after = [(0.001, 1.0), (f64::INFINITY, 10.0)];
        assert_eq!(quantile(0.99, &[], &after), Some(0.001));
    }

    #[test]
    fn a_counter_that_went_down_was_reset() {
        assert_eq!(increase(10.0, 15.0), 5.0);
        assert_eq!(increase(10.0, 3.0), 3.0);
    }
}
