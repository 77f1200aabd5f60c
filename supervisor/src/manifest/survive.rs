//! `survive_supervisor:` — whether a plugin outlives a crash of its
//! supervisor, and for how long it may then run unsupervised. The same
//! grammar is the manifest's field and the supervisor config's default:
//!
//! ```yaml
//! survive_supervisor: true            # with the default bounds
//! survive_supervisor: false           # dies with the supervisor (default)
//! survive_supervisor: {max_unsupervised: 10m, max_output: 64MiB}
//! ```
//!
//! See [`crate::adopt`] for what surviving means.

use crate::units::{HumanDuration, HumanSize};
use serde::Deserialize;
use serde::de::{self, Deserializer};
use std::fmt;
use std::time::Duration;

/// Longest `max_unsupervised` accepted: a week.
pub const MAX_UNSUPERVISED_LIMIT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default bound on how long a survivor runs with no supervisor.
pub const DEFAULT_MAX_UNSUPERVISED: Duration = Duration::from_secs(600);
/// Default cap on the output a survivor keeps unread, per stream.
pub const DEFAULT_MAX_OUTPUT: u64 = 64 << 20;
/// Smallest `max_output` accepted.
pub const MIN_MAX_OUTPUT: u64 = 64 << 10;

/// What `survive_supervisor` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SurvivePolicy {
    /// `false`: the plugin dies with the supervisor (parent-death signal).
    pub enabled: bool,
    /// How long the plugin may run while no supervisor runs; after that the
    /// guard (or, if none ran, the next supervisor) kills it.
    pub max_unsupervised: Duration,
    /// Per stream (stdout, stderr): output not yet read by a supervisor
    /// beyond this many bytes is dropped, oldest first, and counted.
    pub max_output: u64,
}

impl SurvivePolicy {
    /// `survive_supervisor: false`.
    pub const OFF: SurvivePolicy = SurvivePolicy {
        enabled: false,
        max_unsupervised: DEFAULT_MAX_UNSUPERVISED,
        max_output: DEFAULT_MAX_OUTPUT,
    };
    /// `survive_supervisor: true`.
    pub const ON: SurvivePolicy = SurvivePolicy {
        enabled: true,
        ..SurvivePolicy::OFF
    };
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Bounds {
    max_unsupervised: Option<HumanDuration>,
    max_output: Option<HumanSize>,
}

impl<'de> Deserialize<'de> for SurvivePolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = SurvivePolicy;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true, false, or a mapping with max_unsupervised and max_output")
            }
            fn visit_bool<E: de::Error>(self, on: bool) -> Result<SurvivePolicy, E> {
                Ok(if on {
                    SurvivePolicy::ON
                } else {
                    SurvivePolicy::OFF
                })
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<SurvivePolicy, A::Error> {
                let b = Bounds::deserialize(de::value::MapAccessDeserializer::new(map))?;
                let policy = SurvivePolicy {
                    enabled: true,
                    max_unsupervised: b.max_unsupervised.map_or(DEFAULT_MAX_UNSUPERVISED, |d| d.0),
                    max_output: b.max_output.map_or(DEFAULT_MAX_OUTPUT, |s| s.0),
                };
                policy.check().map_err(de::Error::custom)?;
                Ok(policy)
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl SurvivePolicy {
    /// The bounds are within range.
    pub fn check(&self) -> Result<(), String> {
        if self.max_unsupervised.is_zero() || self.max_unsupervised > MAX_UNSUPERVISED_LIMIT {
            return Err(format!(
                "max_unsupervised must be between 1s and 168h (7 days; got {}ms): a survivor is always bounded",
                self.max_unsupervised.as_millis()
            ));
        }
        if self.max_output < MIN_MAX_OUTPUT {
            return Err(format!(
                "max_output must be at least 64KiB (got {} bytes)",
                self.max_output
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SurvivePolicy, String> {
        #[derive(Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        struct Doc {
            #[allow(dead_code)]
            survive_supervisor: SurvivePolicy,
        }
        serde_yaml::from_str::<Doc>(text)
            .map(|d| d.survive_supervisor)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn accepts_a_boolean_or_bounds() {
        assert_eq!(
            parse("survive_supervisor: true").unwrap(),
            SurvivePolicy::ON
        );
        assert_eq!(
            parse("survive_supervisor: false").unwrap(),
            SurvivePolicy::OFF
        );
        let p = parse("survive_supervisor: {max_unsupervised: 90s, max_output: 1MiB}").unwrap();
        assert!(p.enabled);
        assert_eq!(p.max_unsupervised, Duration::from_secs(90));
        assert_eq!(p.max_output, 1 << 20);
    }

    #[test]
    fn refuses_what_it_does_not_know_naming_the_field() {
        let e = parse("survive_supervisor: yes please").unwrap_err();
        assert!(e.contains("survive_supervisor"), "{e}");
        let e = parse("survive_supervisor: {max_unsupervised: 10m, forever: true}").unwrap_err();
        assert!(e.contains("unknown field `forever`"), "{e}");
        let e = parse("survive_supervisor: {max_unsupervised: 0s}").unwrap_err();
        assert!(e.contains("max_unsupervised"), "{e}");
        let e = parse("survive_supervisor: {max_unsupervised: 200h}").unwrap_err();
        assert!(e.contains("168h"), "{e}");
        let e = parse("survive_supervisor: {max_output: 1KiB}").unwrap_err();
        assert!(e.contains("max_output"), "{e}");
    }
}
