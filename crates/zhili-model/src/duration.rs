//! Go-style durations ("250ms", "15s", "1m30s", "2h"), the form Consul users already write.

use std::time::Duration;

use crate::ValidationError;

/// The longest duration we accept anywhere; keeps arithmetic on deadlines far from overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Parses a Go-style duration. A bare number is taken as seconds (Nacos and many users write "30").
pub fn parse_duration(field: &str, input: &str) -> Result<Duration, ValidationError> {
    let s = input.trim();
    let err = |m: &str| ValidationError::new(field, format!("{input:?} is not a duration: {m} (e.g. \"500ms\", \"15s\", \"1m30s\")"));
    if s.is_empty() {
        return Err(err("empty"));
    }
    if s.len() > 64 {
        return Err(err("too long"));
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = s.parse().map_err(|_| err("number too large"))?;
        return bounded(Duration::from_secs(secs)).ok_or_else(|| err("longer than 7 days"));
    }
    let mut total: u128 = 0; // nanoseconds
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(|| err("missing unit"))?;
        if digits == 0 {
            return Err(err("expected a number"));
        }
        let (num, tail) = rest.split_at(digits);
        let unit_len = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let nanos_per: u128 = match unit {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "d" => 86_400_000_000_000,
            _ => return Err(err("unknown unit")),
        };
        let (int_part, frac_part) = match num.split_once('.') {
            Some((i, f)) => (i, f),
            None => (num, ""),
        };
        if frac_part.contains('.') || (int_part.is_empty() && frac_part.is_empty()) {
            return Err(err("malformed number"));
        }
        let int: u128 = if int_part.is_empty() { 0 } else { int_part.parse().map_err(|_| err("number too large"))? };
        let mut value = int.checked_mul(nanos_per).ok_or_else(|| err("number too large"))?;
        if !frac_part.is_empty() {
            let frac_digits = &frac_part[..frac_part.len().min(18)];
            let frac: u128 = frac_digits.parse().map_err(|_| err("malformed fraction"))?;
            value += frac * nanos_per / 10u128.pow(frac_digits.len() as u32);
        }
        total = total.checked_add(value).ok_or_else(|| err("number too large"))?;
        if total > MAX_DURATION.as_nanos() {
            return Err(err("longer than 7 days"));
        }
        rest = next;
    }
    Ok(Duration::from_nanos(total as u64))
}

fn bounded(d: Duration) -> Option<Duration> {
    (d <= MAX_DURATION).then_some(d)
}

/// Formats a duration in the shortest Go-style form that parses back to the same value (ms precision).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return if d.is_zero() { "0s".into() } else { format!("{}us", d.as_micros()) };
    }
    if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// A duration as it travels in JSON, for schemas (the OpenAPI document): a Go-style string.
pub struct DurationText;

impl schemars::JsonSchema for DurationText {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A Go-style duration such as \"500ms\", \"15s\" or \"1m30s\" (a bare number is seconds), at most 7 days",
            "pattern": "^([0-9]{1,6}|([0-9]{1,6}(ns|us|ms|s|m|h|d)){1,4})$",
            "maxLength": 64,
            "examples": ["15s"],
        })
    }
}

/// Serde adapter: durations travel as Go-style strings.
pub mod serde_str {
    use super::*;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration("duration", &s).map_err(|e| serde::de::Error::custom(e.message))
    }
}

/// Serde adapter for optional durations.
pub mod serde_opt {
    use super::*;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format_duration(*d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        s.map(|s| parse_duration("duration", &s).map_err(|e| serde::de::Error::custom(e.message))).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_go_forms() {
        assert_eq!(parse_duration("d", "15s").unwrap(), Duration::from_secs(15));
        assert_eq!(parse_duration("d", "1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("d", "250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("d", "1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("d", "30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("d", "2h").unwrap(), Duration::from_secs(7200));
    }

    #[test]
    fn rejects_garbage_naming_the_field() {
        for bad in ["", "s", "10x", "1..5s", "-1s", "8d", "99999999999999999999999s", ".s"] {
            let e = parse_duration("interval", bad).unwrap_err();
            assert_eq!(e.field, "interval", "{bad}");
        }
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,80}") {
            let _ = parse_duration("d", &s);
        }

        #[test]
        fn format_round_trips(ms in 0u64..(7 * 24 * 3600 * 1000)) {
            let d = Duration::from_millis(ms);
            prop_assert_eq!(parse_duration("d", &format_duration(d)).unwrap(), d);
        }
    }
}
