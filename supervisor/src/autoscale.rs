//! Autoscaling replicas: `replicas: {min, max, scale_up, scale_down, ...}`.
//!
//! Three parts, each with one job:
//!
//! - [`AutoscaleSpec`]: the manifest's policy, parsed strictly.
//! - [`Scaler`]: the policy as a pure function of a [`Sample`] and `now`
//!   (thresholds, proportional scale-up, cooldown against flapping), tested
//!   without sleeping.
//! - the policy task ([`run_policy`]): every `interval` it reads the
//!   plugin's load (calls in flight on its replicas, calls queued for a
//!   slot, CPU from the replicas' cgroups), asks the [`Scaler`], and sends
//!   the plugin's coordinator a "scale to N because ..." operation. It owns
//!   no replica: the coordinator adds replicas (seeded from the shared
//!   snapshot when `restore: shared`) and drains the ones it removes.

use crate::host::Host;
use crate::replica::Common;
use crate::units::HumanDuration;
use serde::Deserialize;
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

/// The most replicas a plugin may have, fixed or autoscaled.
pub const MAX_REPLICAS: u32 = 64;

/// Where a replica added by scaling up gets its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Restore {
    /// From the plugin's shared snapshot (replica 0's, the plain plugin
    /// name under `state_dir`), when the supervisor keeps state.
    #[default]
    Shared,
    /// Empty: the plugin's state is per replica (a cache, a connection).
    Empty,
}

impl Restore {
    pub fn as_str(&self) -> &'static str {
        match self {
            Restore::Shared => "shared",
            Restore::Empty => "empty",
        }
    }
}

/// One side's thresholds (`scale_up:` or `scale_down:`). Each is optional;
/// scaling up needs any one reached, scaling down needs every one given
/// to hold.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// Calls in flight per ready replica.
    pub in_flight_per_replica: Option<f64>,
    /// Calls waiting for a call slot (`calls.max_in_flight` reached).
    pub queue_depth: Option<u64>,
    /// CPU per ready replica, in percent of one core, from its cgroup.
    pub cpu_percent: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAutoscale {
    min: u32,
    max: u32,
    #[serde(default)]
    scale_up: Option<Thresholds>,
    #[serde(default)]
    scale_down: Option<Thresholds>,
    #[serde(default)]
    cooldown: Option<HumanDuration>,
    #[serde(default)]
    interval: Option<HumanDuration>,
    #[serde(default)]
    restore: Restore,
}

/// `replicas:` in its mapping form: the autoscaling policy.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoscaleSpec {
    pub min: u32,
    pub max: u32,
    pub scale_up: Thresholds,
    pub scale_down: Thresholds,
    /// No scale-down sooner than this after any change, and only once the
    /// load stayed at or below `scale_down` this long.
    pub cooldown: Duration,
    /// How often the load is read.
    pub interval: Duration,
    pub restore: Restore,
}

const DEFAULT_IN_FLIGHT: f64 = 4.0;
const DEFAULT_COOLDOWN: Duration = Duration::from_secs(30);
const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
const MIN_INTERVAL: Duration = Duration::from_millis(50);

/// Parses `replicas:`: a count (fixed replicas) or a mapping (autoscaled).
/// Returns the count to start with and the policy. Errors name the field
/// under `replicas` (e.g. `replicas.max`).
pub fn parse_replicas(
    value: &serde_json::Value,
) -> Result<(u32, Option<AutoscaleSpec>), (String, String)> {
    let named = |field: &str, msg: String| {
        let field = if field.is_empty() {
            "replicas".to_string()
        } else {
            format!("replicas.{field}")
        };
        (field, msg)
    };
    let err = |field: &str, msg: String| Err(named(field, msg));
    match value {
        serde_json::Value::Number(n) => match n.as_u64() {
            Some(count) if (1..=u64::from(MAX_REPLICAS)).contains(&count) => {
                Ok((count as u32, None))
            }
            _ => err(
                "",
                format!("{n} is out of range; expected 1 to {MAX_REPLICAS}"),
            ),
        },
        serde_json::Value::Object(_) => {
            let raw: RawAutoscale = serde_json::from_value(value.clone()).map_err(|e| {
                named(
                    "",
                    format!(
                        "{e}; expected a count, or {{min, max, scale_up, scale_down, cooldown, interval, restore}}"
                    ),
                )
            })?;
            let spec = validate(raw).map_err(|(f, m)| named(&f, m))?;
            Ok((spec.min, Some(spec)))
        }
        other => err(
            "",
            format!(
                "expected a count (1 to {MAX_REPLICAS}) or a mapping {{min, max, ...}}, got `{other}`"
            ),
        ),
    }
}

fn validate(raw: RawAutoscale) -> Result<AutoscaleSpec, (String, String)> {
    let e = |f: &str, m: String| Err((f.to_string(), m));
    if !(1..=MAX_REPLICAS).contains(&raw.min) {
        return e(
            "min",
            format!("{} is out of range; expected 1 to {MAX_REPLICAS}", raw.min),
        );
    }
    if !(1..=MAX_REPLICAS).contains(&raw.max) {
        return e(
            "max",
            format!("{} is out of range; expected 1 to {MAX_REPLICAS}", raw.max),
        );
    }
    if raw.max < raw.min {
        return e("max", format!("{} is below min ({})", raw.max, raw.min));
    }
    let up = raw.scale_up.unwrap_or(Thresholds {
        in_flight_per_replica: Some(DEFAULT_IN_FLIGHT),
        ..Thresholds::default()
    });
    if up == Thresholds::default() {
        return e(
            "scale_up",
            "names no threshold; give in_flight_per_replica, queue_depth or cpu_percent".into(),
        );
    }
    check_thresholds("scale_up", &up)?;
    if up.queue_depth == Some(0) {
        return e(
            "scale_up.queue_depth",
            "must be at least 1 (0 would scale up with no call waiting)".into(),
        );
    }
    // Without `scale_down`, each per-replica threshold at half its
    // scale-up value, and an empty queue.
    let down = raw.scale_down.unwrap_or(Thresholds {
        in_flight_per_replica: up.in_flight_per_replica.map(|t| t / 2.0),
        queue_depth: up.queue_depth.map(|_| 0),
        cpu_percent: up.cpu_percent.map(|t| t / 2.0),
    });
    check_thresholds("scale_down", &down)?;
    for (name, u, d) in [
        (
            "in_flight_per_replica",
            up.in_flight_per_replica,
            down.in_flight_per_replica,
        ),
        ("cpu_percent", up.cpu_percent, down.cpu_percent),
        (
            "queue_depth",
            up.queue_depth.map(|q| q as f64),
            down.queue_depth.map(|q| q as f64),
        ),
    ] {
        if let (Some(u), Some(d)) = (u, d)
            && d >= u
        {
            return e(
                &format!("scale_down.{name}"),
                format!(
                    "{d} is not below scale_up.{name} ({u}); the gap between them keeps the replicas from flapping"
                ),
            );
        }
    }
    let interval = raw.interval.map_or(DEFAULT_INTERVAL, |d| d.0);
    if interval < MIN_INTERVAL {
        return e(
            "interval",
            format!(
                "{} is too short; expected at least {}ms",
                crate::units::format_duration(interval),
                MIN_INTERVAL.as_millis()
            ),
        );
    }
    Ok(AutoscaleSpec {
        min: raw.min,
        max: raw.max,
        scale_up: up,
        scale_down: down,
        cooldown: raw.cooldown.map_or(DEFAULT_COOLDOWN, |d| d.0),
        interval,
        restore: raw.restore,
    })
}

fn check_thresholds(side: &str, t: &Thresholds) -> Result<(), (String, String)> {
    for (name, value, limit) in [
        (
            "in_flight_per_replica",
            t.in_flight_per_replica,
            1_000_000.0,
        ),
        ("cpu_percent", t.cpu_percent, 100_000.0),
    ] {
        if let Some(v) = value
            && !(v.is_finite() && (0.0..=limit).contains(&v))
        {
            return Err((
                format!("{side}.{name}"),
                format!("{v} is out of range; expected 0 to {limit}"),
            ));
        }
    }
    if side == "scale_up" {
        for (name, value) in [
            ("in_flight_per_replica", t.in_flight_per_replica),
            ("cpu_percent", t.cpu_percent),
        ] {
            if value == Some(0.0) {
                return Err((format!("{side}.{name}"), "must be greater than 0".into()));
            }
        }
    }
    Ok(())
}

impl crate::manifest::Manifest {
    /// Whether a plugin running `replicas` replicas can switch to this
    /// manifest in place (an upgrade): the same fixed count, or a count
    /// within its autoscaling bounds.
    pub fn accepts_replicas(&self, replicas: usize) -> bool {
        match &self.autoscale {
            Some(a) => (a.min as usize..=a.max as usize).contains(&replicas),
            None => self.replicas as usize == replicas,
        }
    }
}

/// The plugin's load at one moment, as the policy sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    /// Replicas the plugin has (running, starting or down).
    pub replicas: usize,
    /// Replicas ready to take calls.
    pub ready: usize,
    /// Replicas starting or restarting: capacity on its way.
    pub starting: usize,
    /// Calls in flight on the ready replicas.
    pub in_flight: usize,
    /// Calls waiting for a call slot.
    pub queued: usize,
    /// Mean CPU of the ready replicas since the last sample, in percent of
    /// one core; `None` without cgroups or before a second reading.
    pub cpu_percent: Option<f64>,
}

/// A change the policy asks for, and why, in words that quote the
/// readings and the thresholds they crossed.
#[derive(Debug, Clone, PartialEq)]
pub struct Scale {
    pub to: usize,
    pub reason: String,
}

/// The autoscaling policy's memory: when the replica count last changed,
/// and since when the load has been low enough to scale down.
#[derive(Debug, Clone)]
pub struct Scaler {
    pub spec: AutoscaleSpec,
    last_change: Option<Instant>,
    calm_since: Option<Instant>,
}

fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

impl Scaler {
    pub fn new(spec: AutoscaleSpec) -> Self {
        Scaler {
            spec,
            last_change: None,
            calm_since: None,
        }
    }

    /// Notes that the replica count changed at `now` (the cooldown starts).
    pub fn changed(&mut self, now: Instant) {
        self.last_change = Some(now);
        self.calm_since = None;
    }

    /// What to do given the load `s` at `now`: scale up at once when a
    /// `scale_up` threshold is reached (unless replicas are still starting:
    /// their capacity is on its way), scale down by one when every
    /// `scale_down` threshold has held for `cooldown` and the last change
    /// is `cooldown` old, and never leave `[min, max]`.
    pub fn decide(&mut self, now: Instant, s: &Sample) -> Option<Scale> {
        let spec = &self.spec;
        let (min, max) = (spec.min as usize, spec.max as usize);
        let current = s.replicas;
        if current < min {
            return Some(Scale {
                to: min,
                reason: format!("{current} replica(s) is below replicas.min {min}"),
            });
        }
        if current > max {
            return Some(Scale {
                to: max,
                reason: format!("{current} replica(s) is above replicas.max {max}"),
            });
        }
        if s.ready == 0 {
            // Nothing to measure (stopped, or every replica restarting).
            self.calm_since = None;
            return None;
        }
        let ready = s.ready as f64;
        let per_replica = s.in_flight as f64 / ready;
        let up = &spec.scale_up;
        let mut want = current;
        let mut why = Vec::new();
        if let Some(t) = up.in_flight_per_replica
            && per_replica >= t
        {
            want = want.max((current + 1).max((s.in_flight as f64 / t).ceil() as usize));
            why.push(format!(
                "{} call(s) in flight on {} ready replica(s) ({} per replica) reached scale_up.in_flight_per_replica {}",
                s.in_flight,
                s.ready,
                fmt_num(per_replica),
                fmt_num(t)
            ));
        }
        if let Some(t) = up.queue_depth
            && s.queued as u64 >= t
        {
            want = want.max(current + 1);
            why.push(format!(
                "{} call(s) queued for a slot reached scale_up.queue_depth {t}",
                s.queued
            ));
        }
        if let (Some(t), Some(cpu)) = (up.cpu_percent, s.cpu_percent)
            && cpu >= t
        {
            want = want.max((current + 1).max((cpu * ready / t).ceil() as usize));
            why.push(format!(
                "CPU {}% per ready replica reached scale_up.cpu_percent {}",
                fmt_num(cpu),
                fmt_num(t)
            ));
        }
        if !why.is_empty() {
            self.calm_since = None;
            let to = want.min(max);
            if to <= current || s.starting > 0 {
                // At max, or capacity already on its way.
                return None;
            }
            return Some(Scale {
                to,
                reason: why.join("; "),
            });
        }
        if current <= min {
            self.calm_since = None;
            return None;
        }
        // Scale down only if every threshold holds, and one replica fewer
        // would not be over a scale-up threshold at once (no flapping).
        let down = &spec.scale_down;
        let fewer = (s.ready.saturating_sub(1)).max(1) as f64;
        let mut calm = Vec::new();
        let mut holds = true;
        if let Some(t) = down.in_flight_per_replica {
            holds &= per_replica <= t;
            calm.push(format!(
                "{} call(s) in flight on {} ready replica(s) ({} per replica) at or below scale_down.in_flight_per_replica {}",
                s.in_flight,
                s.ready,
                fmt_num(per_replica),
                fmt_num(t)
            ));
        }
        if let Some(t) = down.queue_depth {
            holds &= s.queued as u64 <= t;
            calm.push(format!(
                "{} queued at or below scale_down.queue_depth {t}",
                s.queued
            ));
        }
        if let (Some(t), Some(cpu)) = (down.cpu_percent, s.cpu_percent) {
            holds &= cpu <= t;
            calm.push(format!(
                "CPU {}% per ready replica at or below scale_down.cpu_percent {}",
                fmt_num(cpu),
                fmt_num(t)
            ));
        }
        if let Some(t) = up.in_flight_per_replica {
            holds &= (s.in_flight as f64 / fewer) < t;
        }
        if let (Some(t), Some(cpu)) = (up.cpu_percent, s.cpu_percent) {
            holds &= cpu * ready / fewer < t;
        }
        if !holds || s.starting > 0 {
            self.calm_since = None;
            return None;
        }
        let since = *self.calm_since.get_or_insert(now);
        let calm_for = now.saturating_duration_since(since);
        let cooled = self
            .last_change
            .is_none_or(|t| now.saturating_duration_since(t) >= spec.cooldown);
        if calm_for < spec.cooldown || !cooled {
            return None;
        }
        Some(Scale {
            to: current - 1,
            reason: format!(
                "for {}: {}",
                crate::units::format_duration(calm_for),
                calm.join("; ")
            ),
        })
    }
}

/// What `ps` and `inspect` show of an autoscaled plugin.
#[derive(Debug, Clone)]
pub struct ScalingInfo {
    pub min: u32,
    pub max: u32,
    /// Replicas now.
    pub current: u32,
    /// Why the count last changed, and when.
    pub last_reason: Option<String>,
    pub last_change: Option<SystemTime>,
}

/// An autoscaled plugin whose first `min` replicas are ready and whose
/// others are ready or being added (starting) or drained (stopping) is
/// ready, not degraded: returns the reason to show, else `None`.
pub(crate) fn settling(
    manifest: &crate::manifest::Manifest,
    replicas: &[crate::status::ReplicaInfo],
) -> Option<String> {
    use crate::status::PluginState::*;
    let min = manifest.autoscale.as_ref()?.min as usize;
    let base_ready = replicas.iter().take(min).all(|r| r.state == Ready);
    let rest_settling = replicas.iter().skip(min).all(|r| {
        matches!(
            r.state,
            Ready | Starting | Initializing | Stopping | Stopped
        )
    });
    let ready = replicas.iter().filter(|r| r.state == Ready).count();
    (base_ready && rest_settling).then(|| {
        format!(
            "{ready}/{} replicas ready; autoscaling is adding or draining the others",
            replicas.len()
        )
    })
}

/// Reads a plugin's load for the policy: calls from its routes and
/// admission, CPU from its replicas' cgroups (per instance, so replicas
/// that come and go do not skew the mean).
struct Sampler {
    last_cpu: HashMap<String, Duration>,
    last_at: Option<Instant>,
}

impl Sampler {
    /// Reads the load; CPU only when `cpu` (the policy uses it), from the
    /// cgroups' files on the blocking pool.
    async fn sample(&mut self, host: &std::sync::Arc<Host>, common: &Common, cpu: bool) -> Sample {
        let load = common.routes.load();
        let cpu_now = if cpu {
            let manifest = common.board.spec().manifest.clone();
            let (host, ids) = (host.clone(), load.ready_ids.clone());
            tokio::task::spawn_blocking(move || {
                ids.into_iter()
                    .filter_map(|id| {
                        let usage = host
                            .isolation
                            .status_with(&manifest, std::iter::once(id.as_str()), true)
                            .usage?
                            .cpu?;
                        Some((id, usage))
                    })
                    .collect::<HashMap<_, _>>()
            })
            .await
            .unwrap_or_default()
        } else {
            HashMap::new()
        };
        let now = Instant::now();
        let cpu_percent = self.last_at.and_then(|at| {
            let elapsed = now.saturating_duration_since(at).as_secs_f64();
            let deltas: Vec<f64> = cpu_now
                .iter()
                .filter_map(|(id, cpu)| {
                    let before = self.last_cpu.get(id)?;
                    Some(cpu.saturating_sub(*before).as_secs_f64())
                })
                .collect();
            (elapsed > 0.0 && !deltas.is_empty())
                .then(|| deltas.iter().sum::<f64>() / deltas.len() as f64 / elapsed * 100.0)
        });
        self.last_cpu = cpu_now;
        self.last_at = Some(now);
        Sample {
            replicas: load.replicas,
            ready: load.ready_ids.len(),
            starting: load.pending,
            in_flight: load.in_flight,
            queued: common.admission.waiting(),
            cpu_percent,
        }
    }
}

/// The policy task of one autoscaled plugin: reads the load every
/// `interval` and sends its coordinator `Scale` operations. Ends when
/// `stop` fires (the coordinator's drop guard, or shutdown) or the
/// coordinator is gone.
pub(crate) async fn run_policy(
    host: std::sync::Arc<Host>,
    common: std::sync::Arc<Common>,
    ops: tokio::sync::mpsc::WeakSender<crate::plugin::Op>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut sampler = Sampler {
        last_cpu: HashMap::new(),
        last_at: None,
    };
    let mut scaler: Option<Scaler> = None;
    let mut warned_cpu = false;
    loop {
        let spec = common.board.spec().manifest.autoscale.clone();
        let Some(spec) = spec else {
            // The plugin no longer autoscales; its coordinator ends this
            // task, but do not spin meanwhile.
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(DEFAULT_INTERVAL) => continue,
            }
        };
        let interval = spec.interval;
        let scaler = match &mut scaler {
            Some(s) => {
                s.spec = spec;
                s
            }
            None => {
                let mut fresh = Scaler::new(spec);
                // Taken over from a previous supervisor image: the
                // cooldown runs from the last change it made.
                let last = common.board.lock().last_scaling.as_ref().map(|(_, at)| *at);
                if let Some(age) = last.and_then(|at| at.elapsed().ok())
                    && let Some(at) = Instant::now().checked_sub(age)
                {
                    fresh.changed(at);
                }
                scaler.insert(fresh)
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let wants_cpu = scaler.spec.scale_up.cpu_percent.is_some()
            || scaler.spec.scale_down.cpu_percent.is_some();
        let sample = tokio::select! {
            _ = stop.cancelled() => return,
            s = sampler.sample(&host, &common, wants_cpu) => s,
        };
        if wants_cpu
            && sample.ready > 0
            && sample.cpu_percent.is_none()
            && !warned_cpu
            && sampler.last_cpu.is_empty()
        {
            warned_cpu = true;
            tracing::warn!(plugin = %common.name, "replicas.scale_up/scale_down.cpu_percent cannot be read: the plugin's replicas run without cgroups; only the call thresholds apply");
        }
        let Some(decision) = scaler.decide(Instant::now(), &sample) else {
            continue;
        };
        tracing::debug!(plugin = %common.name, ?sample, "autoscaling to {}", decision.to);
        let (reply, answer) = tokio::sync::oneshot::channel();
        let op = crate::plugin::Op::Scale {
            to: decision.to,
            reason: decision.reason,
            reply,
        };
        let Some(ops) = ops.upgrade() else { return };
        tokio::select! {
            _ = stop.cancelled() => return,
            sent = ops.send(op) => if sent.is_err() { return },
        }
        drop(ops);
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = answer => r,
        };
        match result {
            Ok(Ok(())) => scaler.changed(Instant::now()),
            Ok(Err(e)) => {
                tracing::warn!(plugin = %common.name, "autoscaling did not apply: {e}");
                scaler.changed(Instant::now());
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> Result<(u32, Option<AutoscaleSpec>), (String, String)> {
        let value: serde_json::Value = serde_yaml::from_str(yaml).unwrap();
        parse_replicas(&value)
    }

    fn scaler(yaml: &str) -> Scaler {
        Scaler::new(spec(yaml).unwrap().1.unwrap())
    }

    fn load(replicas: usize, in_flight: usize) -> Sample {
        Sample {
            replicas,
            ready: replicas,
            in_flight,
            ..Sample::default()
        }
    }

    #[test]
    fn a_count_is_fixed_replicas_and_a_mapping_autoscales() {
        assert_eq!(spec("3").unwrap(), (3, None));
        let (start, policy) = spec("{min: 2, max: 8}").unwrap();
        let policy = policy.unwrap();
        assert_eq!(start, 2, "an autoscaled plugin starts at min");
        assert_eq!(policy.scale_up.in_flight_per_replica, Some(4.0));
        assert_eq!(policy.scale_down.in_flight_per_replica, Some(2.0));
        assert_eq!(policy.cooldown, Duration::from_secs(30));
        assert_eq!(policy.restore, Restore::Shared);
        let policy = spec(
            "{min: 1, max: 4, scale_up: {cpu_percent: 80, queue_depth: 2}, scale_down: {cpu_percent: 20}, cooldown: 5s, interval: 200ms, restore: empty}",
        )
        .unwrap()
        .1
        .unwrap();
        assert_eq!(policy.scale_up.cpu_percent, Some(80.0));
        assert_eq!(policy.scale_down.queue_depth, None);
        assert_eq!(policy.interval, Duration::from_millis(200));
        assert_eq!(policy.restore, Restore::Empty);
    }

    #[test]
    fn bad_policies_name_the_field() {
        for (yaml, field, says) in [
            ("0", "replicas", "out of range"),
            ("65", "replicas", "out of range"),
            ("-1", "replicas", "out of range"),
            ("fast", "replicas", "expected a count"),
            ("{min: 0, max: 2}", "replicas.min", "out of range"),
            ("{min: 3, max: 2}", "replicas.max", "below min"),
            ("{min: 1, max: 99}", "replicas.max", "out of range"),
            ("{min: 1}", "replicas", "missing field `max`"),
            (
                "{min: 1, max: 2, burst: 3}",
                "replicas",
                "unknown field `burst`",
            ),
            (
                "{min: 1, max: 2, scale_up: {in_flight: 3}}",
                "replicas",
                "unknown field `in_flight`",
            ),
            (
                "{min: 1, max: 2, scale_up: {}}",
                "replicas.scale_up",
                "no threshold",
            ),
            (
                "{min: 1, max: 2, scale_up: {in_flight_per_replica: 2}, scale_down: {in_flight_per_replica: 2}}",
                "replicas.scale_down.in_flight_per_replica",
                "not below",
            ),
            (
                "{min: 1, max: 2, scale_up: {cpu_percent: -5}}",
                "replicas.scale_up.cpu_percent",
                "out of range",
            ),
            (
                "{min: 1, max: 2, scale_up: {queue_depth: 0}}",
                "replicas.scale_up.queue_depth",
                "at least 1",
            ),
            (
                "{min: 1, max: 2, interval: 1ms}",
                "replicas.interval",
                "too short",
            ),
            ("{min: 1, max: 2, cooldown: soon}", "replicas", "soon"),
            (
                "{min: 1, max: 2, restore: maybe}",
                "replicas",
                "unknown variant",
            ),
        ] {
            let (f, m) = spec(yaml).expect_err(yaml);
            assert_eq!(f, field, "{yaml}: {m}");
            assert!(m.contains(says), "{yaml}: `{m}` should say `{says}`");
        }
    }

    #[test]
    fn a_load_step_scales_up_in_proportion_and_names_the_readings() {
        let mut s = scaler("{min: 1, max: 8, scale_up: {in_flight_per_replica: 4}}");
        let now = Instant::now();
        assert_eq!(s.decide(now, &load(1, 3)), None, "below the threshold");
        let up = s.decide(now, &load(1, 12)).expect("scales up");
        assert_eq!(up.to, 3, "12 calls at 4 per replica need 3 replicas");
        assert!(
            up.reason
                .contains("12 call(s) in flight on 1 ready replica(s)")
                && up.reason.contains("scale_up.in_flight_per_replica 4"),
            "{}",
            up.reason
        );
        // Never past max.
        assert_eq!(s.decide(now, &load(1, 400)).unwrap().to, 8);
        // At max, nothing more to do.
        assert_eq!(s.decide(now, &load(8, 400)), None);
    }

    #[test]
    fn does_not_scale_up_again_while_added_replicas_still_start() {
        let mut s = scaler("{min: 1, max: 8}");
        let now = Instant::now();
        let starting = Sample {
            replicas: 3,
            ready: 1,
            starting: 2,
            in_flight: 12,
            ..Sample::default()
        };
        assert_eq!(s.decide(now, &starting), None);
    }

    #[test]
    fn queue_depth_and_cpu_thresholds_scale_up() {
        let mut s = scaler("{min: 1, max: 8, scale_up: {queue_depth: 5, cpu_percent: 80}}");
        let now = Instant::now();
        let queued = Sample {
            queued: 5,
            ..load(2, 0)
        };
        let up = s.decide(now, &queued).unwrap();
        assert_eq!(up.to, 3);
        assert!(up.reason.contains("5 call(s) queued"), "{}", up.reason);
        let hot = Sample {
            cpu_percent: Some(160.0),
            ..load(2, 0)
        };
        let up = s.decide(now, &hot).unwrap();
        assert_eq!(up.to, 4, "2 replicas at 160% need 4 at 80%");
        assert!(
            up.reason.contains("CPU 160% per ready replica"),
            "{}",
            up.reason
        );
    }

    #[test]
    fn scales_down_one_at_a_time_only_after_the_cooldown() {
        let mut s = scaler("{min: 1, max: 8, cooldown: 30s}");
        let t0 = Instant::now();
        s.changed(t0);
        // Calm, but the cooldown since the last change has not passed.
        assert_eq!(s.decide(t0 + Duration::from_secs(1), &load(3, 0)), None);
        assert_eq!(s.decide(t0 + Duration::from_secs(20), &load(3, 0)), None);
        let down = s.decide(t0 + Duration::from_secs(31), &load(3, 0)).unwrap();
        assert_eq!(down.to, 2, "one replica at a time");
        assert!(
            down.reason.contains("for 30s")
                && down.reason.contains("scale_down.in_flight_per_replica 2"),
            "{}",
            down.reason
        );
        s.changed(t0 + Duration::from_secs(31));
        assert_eq!(s.decide(t0 + Duration::from_secs(40), &load(2, 0)), None);
        // The calm period counts from the first calm reading after it.
        assert_eq!(s.decide(t0 + Duration::from_secs(62), &load(2, 0)), None);
        assert!(
            s.decide(t0 + Duration::from_secs(71), &load(2, 0))
                .is_some()
        );
        // Never below min.
        assert_eq!(s.decide(t0 + Duration::from_secs(500), &load(1, 0)), None);
    }

    #[test]
    fn a_load_spike_restarts_the_calm_period() {
        let mut s = scaler("{min: 1, max: 8, cooldown: 10s}");
        let t0 = Instant::now();
        assert_eq!(s.decide(t0, &load(3, 0)), None);
        // Busy for a moment, below the scale-up threshold but above the
        // scale-down one: the calm period starts over.
        assert_eq!(s.decide(t0 + Duration::from_secs(9), &load(3, 9)), None);
        assert_eq!(s.decide(t0 + Duration::from_secs(11), &load(3, 0)), None);
        assert!(
            s.decide(t0 + Duration::from_secs(21), &load(3, 0))
                .is_some()
        );
    }

    #[test]
    fn does_not_scale_down_into_a_scale_up() {
        // 3 calls on 2 replicas is calm (1.5 <= 2), but 3 on one replica
        // would reach the scale-up threshold 3 at once: stay.
        let mut s = scaler(
            "{min: 1, max: 8, scale_up: {in_flight_per_replica: 3}, scale_down: {in_flight_per_replica: 2}, cooldown: 0s}",
        );
        let now = Instant::now();
        assert_eq!(s.decide(now, &load(2, 3)), None);
        assert_eq!(s.decide(now, &load(2, 2)).unwrap().to, 1);
    }

    #[test]
    fn keeps_within_bounds_after_a_policy_change() {
        let mut s = scaler("{min: 2, max: 4}");
        let now = Instant::now();
        assert_eq!(s.decide(now, &load(1, 0)).unwrap().to, 2);
        assert_eq!(s.decide(now, &load(6, 0)).unwrap().to, 4);
        // Nothing is measured while no replica is ready.
        let down = Sample {
            replicas: 3,
            ..Sample::default()
        };
        assert_eq!(s.decide(now, &down), None);
    }
}
