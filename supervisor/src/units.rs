//! Human-friendly durations (`100ms`, `30s`, `5m`) and sizes (`128MiB`) as
//! they appear in manifests and the supervisor config.

use serde::{Deserialize, Deserializer, de};
use std::fmt;
use std::time::Duration;

/// Parses `250ms`, `1.5s`, `30s`, `5m`, `1h`, `500us`. A bare number is an error:
/// a unit is required so `timeout: 5` is never ambiguous.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("`{text}` has no unit; write e.g. `500ms`, `10s`, `5m`"))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` does not start with a number"))?;
    let seconds = match unit.trim() {
        "us" | "µs" => value / 1_000_000.0,
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{text}`; use us, ms, s, m or h"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| {
        format!("`{text}` is too long a duration; the longest is about 584 billion years")
    })
}

/// Formats a duration the way [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        format!("{}us", d.as_micros())
    } else if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else {
        format!("{}s", ms / 1000)
    }
}

/// Parses `128MiB`, `1GiB`, `512KiB`, `100MB`, `4096` (bytes).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if number.parse::<f64>().is_err() {
        return Err(format!("`{text}` does not start with a number"));
    }
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{text}`; use B, KiB, MiB, GiB or TiB"
            ));
        }
    };
    let too_big = || {
        format!(
            "`{text}` is too large; a size is at most {}",
            format_size(u64::MAX)
        )
    };
    // Whole numbers are exact; a fraction (`1.5GiB`) goes through f64, whose
    // conversion to u64 would saturate silently, so its range is checked.
    if let Ok(whole) = number.parse::<u64>() {
        return whole.checked_mul(factor).ok_or_else(too_big);
    }
    if number.bytes().all(|b| b.is_ascii_digit()) && !number.is_empty() {
        return Err(too_big());
    }
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` does not start with a number"))?;
    let bytes = value * factor as f64;
    // 2^64 is the first f64 that does not fit; anything below it does.
    if !bytes.is_finite() || bytes >= 18_446_744_073_709_551_616.0 {
        return Err(too_big());
    }
    Ok(bytes as u64)
}

/// A [`Duration`] that deserializes from the human form.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct HumanDuration(pub Duration);

impl fmt::Debug for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text)
            .map(HumanDuration)
            .map_err(de::Error::custom)
    }
}

impl serde::Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(self.0))
    }
}

/// A size in bytes that deserializes from `128MiB`, `4096` or a bare YAML
/// integer (bytes).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct HumanSize(pub u64);

/// Formats a byte count the way [`parse_size`] reads it, in the largest
/// binary unit that divides it (`128MiB`, `1536KiB`, `100B`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (factor, unit) in UNITS {
        if bytes >= factor && bytes.is_multiple_of(factor) {
            return format!("{}{unit}", bytes / factor);
        }
    }
    format!("{bytes}B")
}

impl fmt::Debug for HumanSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_size(self.0))
    }
}

impl serde::Serialize for HumanSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for HumanSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = HumanSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as `128MiB`, `512KiB` or a number of bytes")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<HumanSize, E> {
                Ok(HumanSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<HumanSize, E> {
                u64::try_from(v)
                    .map(HumanSize)
                    .map_err(|_| E::custom(format!("`{v}` is negative; a size is at least 0")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HumanSize, E> {
                parse_size(v).map(HumanSize).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations_with_units() {
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
    }

    #[test]
    fn rejects_durations_without_a_known_unit() {
        assert!(parse_duration("5").unwrap_err().contains("no unit"));
        assert!(
            parse_duration("5 days")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn formats_durations_back() {
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_secs(30)), "30s");
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("128MiB"), Ok(128 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12 parsecs").is_err());
    }

    #[test]
    fn sizes_that_overflow_are_errors_not_unlimited() {
        for text in [
            "99999999999999999999999GiB",
            "99999999999999999999999",
            "17179869184GiB",
            "16777216TiB",
            "1e30",
            "18446744073709551616",
            "20000000000000000000.5",
        ] {
            let err = parse_size(text).expect_err(text);
            assert!(
                err.contains("too large") || err.contains("unknown"),
                "{text}: {err}"
            );
        }
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(parse_size("16777215TiB"), Ok(16_777_215 << 40));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("0.5KiB"), Ok(512));
        assert!(parse_size("-1MiB").is_err());
        assert!(parse_size("NaN").is_err());
        assert!(parse_size("inf").is_err());
        assert!(parse_size(".").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn durations_that_overflow_or_are_not_numbers_are_errors() {
        for text in [
            "99999999999999999999999h",
            "1e400s",
            "-1s",
            "NaNs",
            "infs",
            "s",
            ".s",
        ] {
            assert!(parse_duration(text).is_err(), "{text}");
        }
        assert!(
            parse_duration("99999999999999999999999h")
                .unwrap_err()
                .contains("too long")
        );
        assert_eq!(parse_duration("0.0000001us"), Ok(Duration::ZERO));
    }

    #[test]
    fn sizes_read_from_strings_and_integers_and_format_back() {
        let v: HumanSize = serde_yaml::from_str("128MiB").unwrap();
        assert_eq!(v.0, 128 << 20);
        let v: HumanSize = serde_yaml::from_str("0").unwrap();
        assert_eq!(v.0, 0);
        assert!(serde_yaml::from_str::<HumanSize>("-1").is_err());
        assert!(serde_yaml::from_str::<HumanSize>("lots").is_err());
        assert_eq!(format_size(128 << 20), "128MiB");
        assert_eq!(format_size(1536 << 10), "1536KiB");
        assert_eq!(format_size(100), "100B");
        assert_eq!(format_size(0), "0B");
    }
}
