//! Call rate limits: `calls: {rate: 500/s, burst: 100}` per plugin and per
//! method. A call over its limit is answered RESOURCE_EXHAUSTED with a
//! retry hint before it is admitted, and counted in
//! `plugvisor_calls_rate_limited_total`.
//!
//! Each limit is a token bucket kept as one atomic "theoretical arrival
//! time" (GCRA): taking a token is one compare-and-swap, with no lock and
//! no allocation on the call path. A bucket holds `burst` tokens and refills
//! at `rate`, so over `t` seconds of hammering it lets through about
//! `burst + rate * t` calls. The decision is a pure function of the time
//! passed in, tested without sleeping.

use crate::error::Error;
use crate::manifest::CallLimits;
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Deserializer, de};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

const NANOS_PER_SECOND: f64 = 1e9;
/// The largest burst accepted: more would be no limit at all.
pub const MAX_BURST: u64 = 1_000_000_000;

/// A rate of calls, such as `500/s`, `30/m` or `1000/h`: parsed strictly.
#[derive(Clone, Copy, PartialEq)]
pub struct Rate {
    /// Calls per second.
    per_second: f64,
    /// Time between two tokens, in nanoseconds (at least 1).
    interval_ns: u64,
}

impl Rate {
    /// Parses `N/unit`: N a positive number (`500`, `0.5`), unit `s`, `m`
    /// or `h` (also `sec`, `second`, `min`, `minute`, `hour`).
    pub fn parse(text: &str) -> Result<Rate, String> {
        let text = text.trim();
        let example = "such as `500/s`, `30/m` or `1000/h`";
        let Some((number, unit)) = text.split_once('/') else {
            return Err(format!(
                "`{text}` is not a rate; write calls per unit of time, {example}"
            ));
        };
        let number = number.trim();
        if number.is_empty() || !number.chars().all(|c| c.is_ascii_digit() || c == '.') {
            return Err(format!(
                "`{text}`: `{number}` is not a positive number of calls; write {example}"
            ));
        }
        let calls: f64 = number
            .parse()
            .map_err(|_| format!("`{text}`: `{number}` is not a number; write {example}"))?;
        if !(calls.is_finite() && calls > 0.0) {
            return Err(format!(
                "`{text}`: the rate must be greater than zero (to refuse every call, stop the plugin)"
            ));
        }
        let seconds = match unit.trim() {
            "s" | "sec" | "second" => 1.0,
            "m" | "min" | "minute" => 60.0,
            "h" | "hour" => 3600.0,
            other => {
                return Err(format!(
                    "`{text}`: unknown unit `{other}`; use s, m or h ({example})"
                ));
            }
        };
        let per_second = calls / seconds;
        let interval = NANOS_PER_SECOND / per_second;
        if interval < 1.0 {
            return Err(format!(
                "`{text}` is too high a rate; the highest is 1000000000/s"
            ));
        }
        if interval >= u64::MAX as f64 {
            return Err(format!("`{text}` is too low a rate"));
        }
        Ok(Rate {
            per_second,
            interval_ns: interval.round() as u64,
        })
    }

    /// Calls per second.
    pub fn per_second(&self) -> f64 {
        self.per_second
    }

    /// The burst used when none is given: one second's worth of calls, at
    /// least 1.
    pub fn default_burst(&self) -> u64 {
        (self.per_second.ceil() as u64).clamp(1, MAX_BURST)
    }
}

impl fmt::Debug for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.per_second;
        if p >= 1.0 || p == 0.0 {
            write!(f, "{}/s", trim(p))
        } else if p * 60.0 >= 1.0 {
            write!(f, "{}/m", trim(p * 60.0))
        } else {
            write!(f, "{}/h", trim(p * 3600.0))
        }
    }
}

/// A number without a useless `.0`, at most 3 decimals.
fn trim(x: f64) -> String {
    let s = format!("{x:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

impl<'de> Deserialize<'de> for Rate {
    /// Errors start with `rate: `, so the manifest error names the field
    /// (the YAML parser only names the enclosing section).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Number(f64),
        }
        match Raw::deserialize(d) {
            Ok(Raw::Text(text)) => {
                Rate::parse(&text).map_err(|m| de::Error::custom(format!("rate: {m}")))
            }
            Ok(Raw::Number(n)) => Err(de::Error::custom(format!(
                "rate: `{n}` has no unit; write calls per unit of time, such as `{n}/s`"
            ))),
            Err(_) => Err(de::Error::custom(
                "rate: expected calls per unit of time, such as `500/s`",
            )),
        }
    }
}

/// Reads `burst:` as a whole number, with errors that name it.
pub(crate) fn de_burst<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Whole(u64),
        Negative(i64),
        Other(serde_yaml::Value),
    }
    match Raw::deserialize(d) {
        Ok(Raw::Whole(n)) => Ok(Some(n)),
        Ok(Raw::Negative(n)) => Err(de::Error::custom(format!(
            "burst: {n} is negative; expected a whole number of calls from 1 to {MAX_BURST}"
        ))),
        Ok(Raw::Other(v)) => Err(de::Error::custom(format!(
            "burst: {} is not a whole number of calls from 1 to {MAX_BURST}",
            serde_yaml::to_string(&v).unwrap_or_default().trim()
        ))),
        Err(_) => Err(de::Error::custom(format!(
            "burst: expected a whole number of calls from 1 to {MAX_BURST}"
        ))),
    }
}

/// Reads `methods:`, each entry's errors prefixed with its path
/// (`methods.resize.rate: ...`).
pub(crate) fn de_methods<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, MethodLimit>, D::Error> {
    let raw = BTreeMap::<String, serde_yaml::Value>::deserialize(d)?;
    raw.into_iter()
        .map(|(method, value)| {
            let limit = serde_yaml::from_value::<MethodLimit>(value).map_err(|e| {
                let e = e.to_string();
                if e.starts_with("rate: ") || e.starts_with("burst: ") {
                    de::Error::custom(format!("methods.{method}.{e}"))
                } else {
                    de::Error::custom(format!("methods.{method}: {e}"))
                }
            })?;
            Ok((method, limit))
        })
        .collect()
}

/// `calls.methods.<name>`: one method's own limit, on top of the plugin's.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodLimit {
    pub rate: Rate,
    /// Calls let through at once after a quiet spell; default: one
    /// second's worth of `rate` (at least 1).
    #[serde(default, deserialize_with = "de_burst")]
    pub burst: Option<u64>,
}

/// Checks the rate-limit part of `calls:`; the error names the field.
pub fn validate(calls: &CallLimits) -> Result<(), (String, String)> {
    if calls.burst.is_some() && calls.rate.is_none() {
        return Err((
            "calls.burst".into(),
            "is set without `calls.rate`; give the rate it bursts over, such as `rate: 500/s`"
                .into(),
        ));
    }
    check_burst("calls.burst", calls.rate, calls.burst)?;
    for (method, limit) in &calls.methods {
        if method.trim().is_empty() || method.trim() != method {
            return Err((
                "calls.methods".into(),
                format!("`{method}` is not a method name"),
            ));
        }
        check_burst(
            &format!("calls.methods.{method}.burst"),
            Some(limit.rate),
            limit.burst,
        )?;
    }
    Ok(())
}

fn check_burst(
    field: &str,
    rate: Option<Rate>,
    burst: Option<u64>,
) -> Result<(), (String, String)> {
    let Some(rate) = rate else { return Ok(()) };
    let burst = burst.unwrap_or_else(|| rate.default_burst());
    if burst == 0 {
        return Err((
            field.into(),
            "must be at least 1 (a call takes one token)".into(),
        ));
    }
    if burst > MAX_BURST || burst.checked_mul(rate.interval_ns).is_none() {
        return Err((
            field.into(),
            format!(
                "{burst} is too large for rate {rate}; at most {MAX_BURST}, and burst/rate must be under 500 years"
            ),
        ));
    }
    Ok(())
}

/// A call was over a limit: when to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denied {
    pub retry_after: Duration,
}

/// One token bucket, as a GCRA "theoretical arrival time".
pub(crate) struct Bucket {
    /// When the bucket would be full again, in ns since the limiter's epoch.
    tat: AtomicU64,
    /// Nanoseconds per token.
    interval: u64,
    /// `burst * interval`: how far ahead of now `tat` may run.
    depth: u64,
}

impl Bucket {
    pub fn new(rate: Rate, burst: u64) -> Self {
        Bucket {
            tat: AtomicU64::new(0),
            interval: rate.interval_ns,
            // Checked by `validate`; saturate rather than wrap regardless.
            depth: burst.saturating_mul(rate.interval_ns),
        }
    }

    /// Takes a token at `now` (ns since the epoch), or says how long until
    /// one is there.
    pub fn take(&self, now: u64) -> Result<(), Denied> {
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let next = tat.max(now).saturating_add(self.interval);
            let ahead = next - now;
            if ahead > self.depth {
                return Err(Denied {
                    retry_after: Duration::from_nanos(ahead - self.depth),
                });
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(actual) => tat = actual,
            }
        }
    }

    /// Gives back a token taken for a call that another limit refused.
    pub fn give_back(&self) {
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some(tat.saturating_sub(self.interval))
            });
    }

    /// Carries over the fill level of `old` (same epoch).
    fn inherit(&self, old: &Bucket) {
        self.tat
            .store(old.tat.load(Ordering::Acquire), Ordering::Release);
    }
}

/// One limit: its bucket, its description and its refusal counter.
struct Limit {
    bucket: Bucket,
    /// `500/s, burst 100`, for messages.
    text: String,
    /// `plugvisor_calls_rate_limited_total` for this limit.
    refused: Counter,
}

impl Limit {
    fn new(rate: Rate, burst: Option<u64>, refused: Counter) -> Self {
        let burst = burst.unwrap_or_else(|| rate.default_burst());
        Limit {
            bucket: Bucket::new(rate, burst),
            text: format!("{rate}, burst {burst}"),
            refused,
        }
    }
}

/// A plugin's rate limits, built once from its manifest: the call path only
/// looks a method up (no allocation) and takes tokens.
pub(crate) struct RateLimits {
    plugin: String,
    /// Time zero of every bucket's clock.
    epoch: Instant,
    whole: Option<Limit>,
    methods: HashMap<String, Limit>,
}

impl RateLimits {
    pub fn new(plugin: &str, calls: &CallLimits, metrics: &crate::metrics::Metrics) -> Self {
        RateLimits {
            plugin: plugin.to_string(),
            epoch: Instant::now(),
            whole: calls.rate.map(|rate| {
                Limit::new(
                    rate,
                    calls.burst,
                    metrics.rate_limited(plugin, "*", "plugin"),
                )
            }),
            methods: calls
                .methods
                .iter()
                .map(|(method, l)| {
                    let counter = metrics.rate_limited(plugin, method, "method");
                    (method.clone(), Limit::new(l.rate, l.burst, counter))
                })
                .collect(),
        }
    }

    /// The limits of a new manifest, keeping how full the buckets of
    /// unchanged limits are: an upgrade or a config change is no way around
    /// a limit.
    pub fn carried_from(mut self, old: &RateLimits) -> Self {
        self.epoch = old.epoch;
        if let (Some(new), Some(old)) = (&self.whole, &old.whole)
            && new.text == old.text
        {
            new.bucket.inherit(&old.bucket);
        }
        for (method, new) in &self.methods {
            if let Some(old) = old.methods.get(method)
                && new.text == old.text
            {
                new.bucket.inherit(&old.bucket);
            }
        }
        self
    }

    /// Whether any limit is set (else [`Self::check`] costs nothing).
    pub fn is_empty(&self) -> bool {
        self.whole.is_none() && self.methods.is_empty()
    }

    /// Takes a token for a call of `method`, from its method's bucket and
    /// the plugin's; refuses with a retry hint when either is empty.
    pub fn check(&self, method: &str) -> Result<(), Error> {
        if self.is_empty() {
            return Ok(());
        }
        let now = self.epoch.elapsed().as_nanos() as u64;
        self.check_at(method, now)
    }

    fn check_at(&self, method: &str, now: u64) -> Result<(), Error> {
        let own = self.methods.get(method);
        if let Some(limit) = own
            && let Err(denied) = limit.bucket.take(now)
        {
            return Err(self.refuse(limit, Some(method), denied));
        }
        if let Some(limit) = &self.whole
            && let Err(denied) = limit.bucket.take(now)
        {
            if let Some(own) = own {
                own.bucket.give_back();
            }
            return Err(self.refuse(limit, None, denied));
        }
        Ok(())
    }

    fn refuse(&self, limit: &Limit, method: Option<&str>, denied: Denied) -> Error {
        limit.refused.inc();
        Error::RateLimited {
            plugin: self.plugin.clone(),
            scope: match method {
                Some(m) => format!("method `{m}`"),
                None => "all methods".to_string(),
            },
            limit: limit.text.clone(),
            // Whole milliseconds, rounded up: retrying at the hint works.
            retry_after: Duration::from_millis(
                denied.retry_after.as_nanos().div_ceil(1_000_000) as u64
            ),
        }
    }

    /// `calls.rate` and each method's, for `inspect`: `(scope, limit)`.
    pub fn describe(&self) -> Vec<(String, String)> {
        let mut out: Vec<_> = self
            .whole
            .iter()
            .map(|l| ("*".to_string(), l.text.clone()))
            .collect();
        let mut methods: Vec<_> = self
            .methods
            .iter()
            .map(|(m, l)| (m.clone(), l.text.clone()))
            .collect();
        methods.sort();
        out.extend(methods);
        out
    }
}

/// The limits calls of one plugin check now: swapped whole by its
/// coordinator when a new manifest is committed, read by every call.
pub(crate) struct RateLimitSlot(RwLock<Arc<RateLimits>>);

impl RateLimitSlot {
    pub fn new(limits: RateLimits) -> Self {
        RateLimitSlot(RwLock::new(Arc::new(limits)))
    }

    /// Checks a call of `method` against the limits in force.
    pub fn check(&self, method: &str) -> Result<(), Error> {
        // Held for one token take: no await, no allocation under it.
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .check(method)
    }

    pub fn current(&self) -> Arc<RateLimits> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts `limits` in force, carrying over the fill of unchanged buckets.
    pub fn replace(&self, limits: RateLimits) {
        let mut slot = self.0.write().unwrap_or_else(|e| e.into_inner());
        *slot = Arc::new(limits.carried_from(&slot));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;

    fn calls(yaml: &str) -> CallLimits {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn parses_rates_with_units() {
        assert_eq!(Rate::parse("500/s").unwrap().interval_ns, 2 * MS);
        assert_eq!(Rate::parse("60/m").unwrap().interval_ns, S);
        assert_eq!(Rate::parse("3600/hour").unwrap().interval_ns, S);
        assert_eq!(Rate::parse("0.5/s").unwrap().interval_ns, 2 * S);
        assert_eq!(Rate::parse(" 10 / sec ").unwrap().per_second(), 10.0);
        assert_eq!(Rate::parse("500/s").unwrap().to_string(), "500/s");
        assert_eq!(Rate::parse("30/m").unwrap().to_string(), "30/m");
    }

    #[test]
    fn refuses_bad_rates_saying_why() {
        for (text, says) in [
            ("0/s", "greater than zero"),
            ("0.0/s", "greater than zero"),
            ("-5/s", "not a positive number"),
            ("1e3/s", "not a positive number"),
            ("inf/s", "not a positive number"),
            ("500", "not a rate"),
            ("500/d", "unknown unit `d`"),
            ("500/", "unknown unit ``"),
            ("/s", "not a positive number"),
            ("1.2.3/s", "not a number"),
            ("2000000000/s", "too high"),
            ("99999999999999999999999999999/s", "too high"),
        ] {
            let e = Rate::parse(text).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn a_bucket_lets_the_burst_through_then_one_call_per_interval() {
        let b = Bucket::new(Rate::parse("100/s").unwrap(), 5);
        for _ in 0..5 {
            assert!(b.take(0).is_ok());
        }
        let denied = b.take(0).unwrap_err();
        assert_eq!(denied.retry_after, Duration::from_millis(10));
        // Refills at 10ms a token.
        assert!(b.take(9 * MS).is_err());
        assert!(b.take(10 * MS).is_ok());
        assert!(b.take(10 * MS).is_err());
        // A quiet second fills it up to the burst, not beyond.
        let mut taken = 0;
        while b.take(2 * S).is_ok() {
            taken += 1;
        }
        assert_eq!(taken, 5);
    }

    #[test]
    fn hammering_for_a_while_lets_through_rate_times_time_plus_burst() {
        let b = Bucket::new(Rate::parse("500/s").unwrap(), 100);
        let mut accepted = 0u64;
        // A call every 100 µs for 3 s: 10x the rate.
        for step in 0..30_000u64 {
            if b.take(step * 100_000).is_ok() {
                accepted += 1;
            }
        }
        let expected = 500 * 3 + 100;
        assert!(accepted.abs_diff(expected) <= 1, "{accepted} vs {expected}");
    }

    #[test]
    fn a_method_limit_and_the_plugin_limit_both_hold() {
        let metrics = crate::metrics::Metrics::default();
        let limits = RateLimits::new(
            "img",
            &calls("{rate: 10/s, burst: 3, methods: {resize: {rate: 1/s, burst: 1}}}"),
            &metrics,
        );
        assert!(limits.check_at("resize", 0).is_ok());
        let e = limits.check_at("resize", 0).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        let text = e.to_string();
        assert!(
            text.contains("method `resize`") && text.contains("1/s, burst 1"),
            "{text}"
        );
        assert!(text.contains("retry in 1000ms"), "{text}");
        // The plugin's bucket had 3: resize took one, two more go.
        assert!(limits.check_at("thumb", 0).is_ok());
        assert!(limits.check_at("thumb", 0).is_ok());
        let e = limits.check_at("thumb", 0).unwrap_err().to_string();
        assert!(
            e.contains("all methods") && e.contains("10/s, burst 3"),
            "{e}"
        );
        // A resize refused by the plugin's limit gives its own token back.
        assert!(limits.check_at("resize", S).is_ok());
        let more = limits.check_at("thumb", S).is_ok() as u32;
        assert!(more <= 1);
        let text = metrics.encode(&[]);
        assert!(
            text.contains(r#"plugvisor_calls_rate_limited_total{plugin="img",method="resize",limit="method"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"plugvisor_calls_rate_limited_total{plugin="img",method="*",limit="plugin"} 1"#
            ),
            "{text}"
        );
    }

    #[test]
    fn a_refused_call_returns_the_token_its_method_bucket_gave() {
        let metrics = crate::metrics::Metrics::default();
        let limits = RateLimits::new(
            "p",
            &calls("{rate: 1/s, burst: 1, methods: {m: {rate: 1/s, burst: 1}}}"),
            &metrics,
        );
        assert!(
            limits.check_at("other", 0).is_ok(),
            "empties the plugin bucket"
        );
        assert!(
            limits.check_at("m", 0).is_err(),
            "refused by the plugin's limit"
        );
        // The method's token came back: once the plugin refills, `m` goes.
        assert!(limits.check_at("m", S).is_ok());
    }

    #[test]
    fn new_limits_carry_the_fill_of_unchanged_buckets() {
        let metrics = crate::metrics::Metrics::default();
        let slot = RateLimitSlot::new(RateLimits::new(
            "p",
            &calls("{rate: 1/m, burst: 1}"),
            &metrics,
        ));
        assert!(slot.check("x").is_ok());
        assert!(slot.check("x").is_err());
        // The same limit again (an upgrade, a config change): still empty.
        slot.replace(RateLimits::new(
            "p",
            &calls("{rate: 1/m, burst: 1}"),
            &metrics,
        ));
        assert!(
            slot.check("x").is_err(),
            "an upgrade is no way around a limit"
        );
        // A different limit starts full.
        slot.replace(RateLimits::new(
            "p",
            &calls("{rate: 2/m, burst: 2}"),
            &metrics,
        ));
        assert!(slot.check("x").is_ok());
        slot.replace(RateLimits::new("p", &calls("{}"), &metrics));
        assert!(slot.current().is_empty());
        for _ in 0..1000 {
            assert!(slot.check("x").is_ok(), "no limit, no refusal");
        }
    }

    #[test]
    fn burst_without_rate_zero_burst_and_overflow_name_the_field() {
        let (field, msg) = validate(&calls("{burst: 5}")).unwrap_err();
        assert_eq!(field, "calls.burst");
        assert!(msg.contains("without `calls.rate`"), "{msg}");
        let (field, _) = validate(&calls("{rate: 5/s, burst: 0}")).unwrap_err();
        assert_eq!(field, "calls.burst");
        let (field, msg) =
            validate(&calls("{methods: {resize: {rate: 1/h, burst: 999999999}}}")).unwrap_err();
        assert_eq!(field, "calls.methods.resize.burst");
        assert!(msg.contains("too large"), "{msg}");
        assert!(validate(&calls("{rate: 5/s}")).is_ok());
    }

    #[test]
    fn manifest_errors_name_the_file_and_the_field() {
        let path = std::path::Path::new("/plugins/img/plugin.yaml");
        let parse = |calls: &str| {
            crate::manifest::Manifest::parse(
                path,
                &format!("name: img\nversion: 1.0.0\nexec: ./img\ncalls: {calls}\n"),
            )
        };
        for (calls, field, says) in [
            ("{rate: 0/s}", "calls.rate", "greater than zero"),
            ("{rate: -3/s}", "calls.rate", "not a positive number"),
            (
                "{rate: 5/fortnight}",
                "calls.rate",
                "unknown unit `fortnight`",
            ),
            ("{rate: 500}", "calls.rate", "no unit"),
            ("{rate: 5/s, burst: -1}", "calls.burst", "-1"),
            (
                "{rate: 5/s, burst: 99999999999999999999999}",
                "calls.burst",
                "whole number",
            ),
            ("{rate: 5/s, burst: 0}", "calls.burst", "at least 1"),
            (
                "{methods: {resize: {rate: 9/x}}}",
                "calls.methods.resize.rate",
                "unknown unit `x`",
            ),
            (
                "{methods: {resize: {burst: 3}}}",
                "calls.methods.resize.rate",
                "expected calls per unit of time",
            ),
            (
                "{methods: {resize: {rate: 1/s, max_in_flight: 3}}}",
                "calls.methods.resize",
                "max_in_flight",
            ),
        ] {
            let e = parse(calls).unwrap_err();
            let text = e.to_string();
            assert!(
                text.starts_with("/plugins/img/plugin.yaml: "),
                "{calls}: {text}"
            );
            assert!(
                e.field.as_deref().is_some_and(|f| f.starts_with(field)),
                "{calls}: field {:?} in {text}",
                e.field
            );
            assert!(text.contains(says), "{calls}: {text}");
        }
        let m = parse("{rate: 500/s, burst: 100, methods: {resize: {rate: 50/s}}}").unwrap();
        assert_eq!(m.calls.rate.unwrap().per_second(), 500.0);
        assert_eq!(m.calls.burst, Some(100));
        assert_eq!(m.calls.methods["resize"].burst, None);
    }

    #[test]
    fn concurrent_takers_never_exceed_the_burst() {
        let b = Arc::new(Bucket::new(Rate::parse("1/h").unwrap(), 1000));
        let taken = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (b, taken) = (b.clone(), taken.clone());
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        if b.take(0).is_ok() {
                            taken.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(taken.load(Ordering::Relaxed), 1000);
    }
}
