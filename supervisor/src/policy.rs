//! Restart policy as plain functions of time: what to do when a child exits,
//! and how long to wait first. No clocks are read here; the caller passes
//! `now`, so every rule is tested directly without sleeping.

use crate::manifest::{RestartMode, RestartSpec};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What the supervisor does after a child exits.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Start it again after `delay`; `attempt` counts restarts since the last
    /// reset (1 for the first).
    Restart { delay: Duration, attempt: u32 },
    /// The restart policy says this exit ends it (e.g. `on-failure` and a clean
    /// exit, or `never`).
    Stop { reason: String },
    /// Too many restarts in the window: the plugin is `failed` until an
    /// operator restarts it.
    GiveUp { reason: String },
}

/// The delay before restart number `attempt` (1-based), before jitter:
/// `initial_backoff * multiplier^(attempt-1)`, capped at `max_backoff`.
pub fn base_delay(spec: &RestartSpec, attempt: u32) -> Duration {
    let initial = spec.initial_backoff.0.as_secs_f64();
    let exp = attempt.saturating_sub(1).min(1000) as i32;
    let secs = initial * spec.multiplier.powi(exp);
    let max = spec.max_backoff.0;
    if !secs.is_finite() || secs >= max.as_secs_f64() {
        max
    } else {
        Duration::from_secs_f64(secs)
    }
}

/// Applies jitter: `sample` in [-1, 1] moves the delay by up to
/// `jitter * delay` either way; the result never exceeds `max_backoff`.
pub fn jittered(spec: &RestartSpec, delay: Duration, sample: f64) -> Duration {
    let sample = sample.clamp(-1.0, 1.0);
    let factor = 1.0 + spec.jitter * sample;
    delay.mul_f64(factor.max(0.0)).min(spec.max_backoff.0)
}

/// Restart bookkeeping for one plugin (or one replica).
#[derive(Debug, Clone)]
pub struct RestartTracker {
    spec: RestartSpec,
    /// Restarts since the last reset; drives the exponential curve.
    attempt: u32,
    /// When each recent restart was decided, for the give-up window.
    recent: VecDeque<Instant>,
}

impl RestartTracker {
    pub fn new(spec: RestartSpec) -> Self {
        RestartTracker {
            spec,
            attempt: 0,
            recent: VecDeque::new(),
        }
    }

    /// Restarts since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// What a hand-over carries: the attempt count and how long ago each
    /// recent restart was decided (an `Instant` does not survive an exec).
    pub fn export(&self, now: Instant) -> (u32, Vec<Duration>) {
        let ages = self
            .recent
            .iter()
            .map(|t| now.saturating_duration_since(*t))
            .collect();
        (self.attempt, ages)
    }

    /// A tracker with the history [`Self::export`] gave, as of `now`.
    pub fn restore(spec: RestartSpec, attempt: u32, ages: &[Duration], now: Instant) -> Self {
        RestartTracker {
            spec,
            attempt,
            recent: ages.iter().filter_map(|a| now.checked_sub(*a)).collect(),
        }
    }

    /// Forgets all history: after an operator's `restart`, or a config change.
    pub fn clear(&mut self) {
        self.attempt = 0;
        self.recent.clear();
    }

    /// Decides what follows an exit at `now`.
    ///
    /// - `clean`: the child exited with code 0 on its own.
    /// - `ready_since`: when the child became ready, if it did; a run of at
    ///   least `reset_after` resets the backoff curve.
    /// - `sample`: a random number in [-1, 1] for jitter.
    pub fn on_exit(
        &mut self,
        now: Instant,
        clean: bool,
        ready_since: Option<Instant>,
        sample: f64,
    ) -> Decision {
        match self.spec.policy {
            RestartMode::Never => {
                return Decision::Stop {
                    reason: "restart policy is `never`".into(),
                };
            }
            RestartMode::OnFailure if clean => {
                return Decision::Stop {
                    reason: "exited cleanly and restart policy is `on-failure`".into(),
                };
            }
            _ => {}
        }
        if ready_since.is_some_and(|t| now.saturating_duration_since(t) >= self.spec.reset_after.0)
        {
            self.attempt = 0;
        }
        let window = self.spec.window.0;
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= window)
        {
            self.recent.pop_front();
        }
        if self.recent.len() as u64 >= u64::from(self.spec.max_restarts) {
            return Decision::GiveUp {
                reason: format!(
                    "more than {} restarts within {}",
                    self.spec.max_restarts,
                    crate::units::format_duration(window)
                ),
            };
        }
        self.recent.push_back(now);
        self.attempt = self.attempt.saturating_add(1);
        let delay = jittered(&self.spec, base_delay(&self.spec, self.attempt), sample);
        Decision::Restart {
            delay,
            attempt: self.attempt,
        }
    }
}

/// A small xorshift generator for jitter: not for anything secret.
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    pub fn from_seed(seed: u64) -> Self {
        Jitter(seed | 1)
    }

    /// Seeds from the clock and the process id.
    pub fn from_entropy() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Jitter::from_seed(nanos ^ (u64::from(std::process::id()) << 32))
    }

    /// A number in [-1, 1].
    pub fn sample(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::HumanDuration;

    fn spec(policy: RestartMode) -> RestartSpec {
        RestartSpec {
            policy,
            initial_backoff: HumanDuration(Duration::from_millis(100)),
            max_backoff: HumanDuration(Duration::from_secs(1)),
            multiplier: 2.0,
            jitter: 0.0,
            reset_after: HumanDuration(Duration::from_secs(60)),
            max_restarts: 5,
            window: HumanDuration(Duration::from_secs(60)),
            prestart: true,
        }
    }

    fn delay(d: Decision) -> Duration {
        match d {
            Decision::Restart { delay, .. } => delay,
            other => panic!("expected a restart, got {other:?}"),
        }
    }

    #[test]
    fn crash_sequence_follows_exponential_curve_with_cap() {
        let mut t = RestartTracker::new(RestartSpec {
            max_restarts: 100,
            ..spec(RestartMode::OnFailure)
        });
        let start = Instant::now();
        let delays: Vec<u128> = (0..6)
            .map(|i| {
                delay(t.on_exit(start + Duration::from_millis(i), false, None, 0.0)).as_millis()
            })
            .collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn backoff_resets_after_a_stable_run() {
        let mut t = RestartTracker::new(spec(RestartMode::Always));
        let t0 = Instant::now();
        assert_eq!(
            delay(t.on_exit(t0, false, None, 0.0)),
            Duration::from_millis(100)
        );
        assert_eq!(
            delay(t.on_exit(t0, false, Some(t0), 0.0)),
            Duration::from_millis(200)
        );
        // Ready for 59s: not long enough.
        let ready = t0 + Duration::from_secs(1);
        assert_eq!(
            delay(t.on_exit(ready + Duration::from_secs(59), false, Some(ready), 0.0)),
            Duration::from_millis(400)
        );
        // Ready for the full reset_after: back to the first step.
        let ready = t0 + Duration::from_secs(100);
        assert_eq!(
            delay(t.on_exit(ready + Duration::from_secs(60), false, Some(ready), 0.0)),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn gives_up_after_max_restarts_in_window_and_forgets_old_ones() {
        let mut t = RestartTracker::new(spec(RestartMode::Always));
        let t0 = Instant::now();
        for i in 0..5 {
            delay(t.on_exit(t0 + Duration::from_secs(i), false, None, 0.0));
        }
        let d = t.on_exit(t0 + Duration::from_secs(5), false, None, 0.0);
        assert!(
            matches!(&d, Decision::GiveUp { reason } if reason.contains("more than 5 restarts within 60s")),
            "{d:?}"
        );
        // Once the first restarts leave the window there is room again.
        let mut t = RestartTracker::new(spec(RestartMode::Always));
        for i in 0..5 {
            delay(t.on_exit(t0 + Duration::from_secs(i * 20), false, None, 0.0));
        }
        delay(t.on_exit(t0 + Duration::from_secs(100), false, None, 0.0));
    }

    #[test]
    fn clear_starts_over() {
        let mut t = RestartTracker::new(spec(RestartMode::Always));
        let t0 = Instant::now();
        for _ in 0..5 {
            delay(t.on_exit(t0, false, None, 0.0));
        }
        t.clear();
        assert_eq!(
            delay(t.on_exit(t0, false, None, 0.0)),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn policy_decides_which_exits_restart() {
        let now = Instant::now();
        let mut never = RestartTracker::new(spec(RestartMode::Never));
        assert!(matches!(
            never.on_exit(now, false, None, 0.0),
            Decision::Stop { .. }
        ));
        let mut on_failure = RestartTracker::new(spec(RestartMode::OnFailure));
        assert!(matches!(
            on_failure.on_exit(now, true, None, 0.0),
            Decision::Stop { .. }
        ));
        assert!(matches!(
            on_failure.on_exit(now, false, None, 0.0),
            Decision::Restart { .. }
        ));
        let mut always = RestartTracker::new(spec(RestartMode::Always));
        assert!(matches!(
            always.on_exit(now, true, None, 0.0),
            Decision::Restart { .. }
        ));
    }

    #[test]
    fn jitter_stays_within_bounds_and_under_the_cap() {
        let s = RestartSpec {
            jitter: 0.2,
            ..spec(RestartMode::Always)
        };
        let d = Duration::from_millis(500);
        assert_eq!(jittered(&s, d, 1.0), Duration::from_millis(600));
        assert_eq!(jittered(&s, d, -1.0), Duration::from_millis(400));
        assert_eq!(
            jittered(&s, Duration::from_secs(1), 1.0),
            Duration::from_secs(1)
        );
        let mut rng = Jitter::from_seed(42);
        for _ in 0..1000 {
            let x = rng.sample();
            assert!((-1.0..=1.0).contains(&x), "{x}");
        }
    }
}
