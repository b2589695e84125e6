//! Event log wire rules: stream names, size bounds and CloudEvents 1.0 validation (the envelope
//! of every event). An event is kept as the structured-mode JSON object the client sent (or the
//! one its binary-mode headers make), byte for byte apart from that conversion.

use serde_json::{Map, Value};

use crate::ValidationError;

pub const MAX_STREAM_NAME: usize = 256;
/// Largest event (its structured JSON).
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;
/// Largest batch body.
pub const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
pub const MAX_BATCH_EVENTS: usize = 10_000;
/// Longest event id (it is also the idempotency key).
pub const MAX_ID: usize = 256;
/// The attributes CloudEvents 1.0 defines; anything else is an extension.
const CONTEXT: [&str; 10] = ["id", "source", "specversion", "type", "datacontenttype", "dataschema", "subject", "time", "data", "data_base64"];

/// A stream name: letters, digits and `-_.:@`, at most 256 bytes. A leading `$` marks system
/// and derived streams, which clients may read (with a grant) but not write.
pub fn stream_name(field: &str, name: &str, allow_reserved: bool) -> Result<(), ValidationError> {
    let plain = name.strip_prefix('$').filter(|_| allow_reserved).unwrap_or(name);
    if name.is_empty() || name.len() > MAX_STREAM_NAME {
        return Err(ValidationError::new(field, format!("must be 1 to {MAX_STREAM_NAME} bytes")));
    }
    if name.starts_with('$') && !allow_reserved {
        return Err(ValidationError::new(field, "names starting with '$' are reserved for system and derived streams"));
    }
    if plain.is_empty() || !plain.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b)) {
        return Err(ValidationError::new(field, "may contain only letters, digits and -_.:@"));
    }
    Ok(())
}

/// Checks a structured-mode CloudEvent; `field` names it in errors (`events[3]`). Returns its id.
pub fn cloudevent<'a>(field: &str, event: &'a Value) -> Result<&'a str, ValidationError> {
    let Some(o) = event.as_object() else { return Err(ValidationError::new(field, "a CloudEvent must be a JSON object")) };
    let at = |name: &str| format!("{field}.{name}");
    let required = |name: &str| -> Result<&'a str, ValidationError> {
        match o.get(name) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.as_str()),
            Some(_) => Err(ValidationError::new(at(name), "must be a non-empty string")),
            None => Err(ValidationError::new(at(name), "is required")),
        }
    };
    if required("specversion")? != "1.0" {
        return Err(ValidationError::new(at("specversion"), "must be \"1.0\""));
    }
    let id = required("id")?;
    if id.len() > MAX_ID {
        return Err(ValidationError::new(at("id"), format!("at most {MAX_ID} bytes")));
    }
    required("source")?;
    required("type")?;
    for name in ["subject", "datacontenttype", "dataschema"] {
        if let Some(v) = o.get(name) {
            if !v.is_string() {
                return Err(ValidationError::new(at(name), "must be a string"));
            }
        }
    }
    if let Some(t) = o.get("time") {
        if !t.as_str().is_some_and(rfc3339) {
            return Err(ValidationError::new(at("time"), "must be an RFC 3339 timestamp"));
        }
    }
    if o.contains_key("data") && o.contains_key("data_base64") {
        return Err(ValidationError::new(at("data_base64"), "data and data_base64 are exclusive"));
    }
    if let Some(b) = o.get("data_base64") {
        if !b.as_str().is_some_and(|s| s.bytes().all(|c| c.is_ascii_alphanumeric() || b"+/=\r\n".contains(&c))) {
            return Err(ValidationError::new(at("data_base64"), "must be base64 text"));
        }
    }
    for (name, v) in o.iter().filter(|(k, _)| !CONTEXT.contains(&k.as_str())) {
        if name.is_empty() || name.len() > 20 || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
            return Err(ValidationError::new(at(name), "extension attribute names are 1 to 20 lower-case letters or digits"));
        }
        if !(v.is_string() || v.is_boolean() || v.is_i64() || v.is_u64()) {
            return Err(ValidationError::new(at(name), "extension attributes are strings, booleans or integers"));
        }
    }
    Ok(id)
}

/// [`cloudevent`] on JSON text, for appends: the attributes are checked without building the
/// `data` value (only scanned as valid JSON). Returns the event's id; `Err(None)` when the text
/// is not a JSON object (the caller reports that with its own wording).
pub fn cloudevent_json(field: &str, bytes: &[u8]) -> Result<String, Option<ValidationError>> {
    let attrs: std::collections::BTreeMap<std::borrow::Cow<'_, str>, &serde_json::value::RawValue> = serde_json::from_slice(bytes).map_err(|_| None)?;
    let mut o = Map::new();
    for (name, raw) in attrs {
        // `data` only needs to exist (checked as JSON by the parse above).
        let v = if name == "data" { Value::Null } else { serde_json::from_str(raw.get()).map_err(|_| None)? };
        o.insert(name.into_owned(), v);
    }
    let event = Value::Object(o);
    cloudevent(field, &event).map(str::to_string).map_err(Some)
}

/// A structured CloudEvent from binary mode: `ce-*` headers (lower-case names, values as sent)
/// and the body with its content type. JSON bodies become `data`, text bodies a string `data`,
/// anything else `data_base64`.
pub fn from_binary(
    headers: impl IntoIterator<Item = (String, String)>,
    content_type: Option<&str>,
    body: &[u8],
    base64: impl Fn(&[u8]) -> String,
) -> Result<Value, ValidationError> {
    let mut o = Map::new();
    for (name, value) in headers {
        if let Some(attr) = name.strip_prefix("ce-") {
            o.insert(attr.to_string(), Value::String(value));
        }
    }
    if let Some(ct) = content_type {
        o.insert("datacontenttype".into(), Value::String(ct.to_string()));
    }
    if !body.is_empty() {
        let media = content_type.unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        let data = if media == "application/json" || media.ends_with("+json") {
            ("data", serde_json::from_slice(body).map_err(|e| ValidationError::new("body", format!("is not the JSON its content type says: {e}")))?)
        } else if media.starts_with("text/") {
            ("data", Value::String(String::from_utf8(body.to_vec()).map_err(|_| ValidationError::new("body", "text data must be UTF-8"))?))
        } else {
            ("data_base64", Value::String(base64(body)))
        };
        o.insert(data.0.into(), data.1);
    }
    Ok(Value::Object(o))
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`, the RFC 3339 profile CloudEvents uses.
pub fn rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    if !(digits(0..4) && b.get(4) == Some(&b'-') && digits(5..7) && b.get(7) == Some(&b'-') && digits(8..10)) {
        return false;
    }
    if !(matches!(b.get(10), Some(b'T' | b't')) && digits(11..13) && b.get(13) == Some(&b':') && digits(14..16) && b.get(16) == Some(&b':') && digits(17..19)) {
        return false;
    }
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match b.get(i) {
        Some(b'Z' | b'z') => i + 1 == b.len(),
        Some(b'+' | b'-') => digits(i + 1..i + 3) && b.get(i + 3) == Some(&b':') && digits(i + 4..i + 6) && i + 6 == b.len(),
        _ => false,
    }
}

/// An RFC 3339 time (as [`rfc3339`] accepts) as Unix milliseconds; None if it is not one, or
/// before 1970.
pub fn parse_rfc3339_ms(s: &str) -> Option<u64> {
    if !rfc3339(s) {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r).and_then(|d| d.parse::<i64>().ok());
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, m, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm), the inverse of `timestamp`.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let rest = s.get(19..)?;
    let (frac, zone) = match rest.strip_prefix('.') {
        Some(r) => r.split_at(r.find(|c: char| !c.is_ascii_digit())?),
        None => ("", rest),
    };
    let millis = frac.get(..frac.len().min(3)).map_or(0, |f| f.parse::<i64>().unwrap_or(0) * 10_i64.pow(3 - f.len() as u32));
    let offset_min = match zone.as_bytes().first() {
        Some(b'+' | b'-') => {
            let sign = if zone.starts_with('-') { -1 } else { 1 };
            sign * (zone.get(1..3)?.parse::<i64>().ok()? * 60 + zone.get(4..6)?.parse::<i64>().ok()?)
        }
        _ => 0,
    };
    let ms = ((days * 86_400 + h * 3600 + m * 60 + sec - offset_min * 60) * 1000) + millis;
    u64::try_from(ms).ok()
}

/// A structured-mode CloudEvent of Zhili's own (`$registry`, `$audit`, `$kv`, `$gateway`,
/// `$plans`, `$subscriptions`), serialized straight from borrowed parts: one envelope for all,
/// and no JSON tree per event on the paths that write one per change.
#[derive(serde::Serialize)]
pub struct CloudEvent<'a, D: serde::Serialize> {
    specversion: &'static str,
    pub id: &'a str,
    pub source: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub subject: &'a str,
    pub time: &'a str,
    datacontenttype: &'static str,
    pub data: &'a D,
}

impl<'a, D: serde::Serialize> CloudEvent<'a, D> {
    /// A version 1.0 event with JSON `data`.
    pub fn new(id: &'a str, source: &'a str, kind: &'a str, subject: &'a str, time: &'a str, data: &'a D) -> Self {
        Self { specversion: "1.0", id, source, kind, subject, time, datacontenttype: "application/json", data }
    }

    /// The event as JSON bytes (room for a typical event up front: serde_json starts at 128
    /// bytes and grows by copying, three times for a registry event).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1024);
        match serde_json::to_writer(&mut out, self) {
            Ok(()) => out,
            Err(_) => Vec::new(),
        }
    }
}

/// `unix_ms` as an RFC 3339 UTC timestamp with milliseconds (`2026-11-30T12:00:00.000Z`).
pub fn timestamp(unix_ms: u64) -> String {
    let (days, ms) = (unix_ms / 86_400_000, unix_ms % 86_400_000);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, sec, milli) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{sec:02}.{milli:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stream_names() {
        assert!(stream_name("stream", "order-17", false).is_ok());
        assert!(stream_name("stream", "a.b:c@d_e", false).is_ok());
        assert!(stream_name("stream", "$registry", false).is_err(), "reserved for writes");
        assert!(stream_name("stream", "$registry", true).is_ok());
        assert!(stream_name("stream", "$", true).is_err());
        assert!(stream_name("stream", "a/b", false).unwrap_err().to_string().starts_with("stream:"));
        assert!(stream_name("stream", &"x".repeat(257), false).is_err());
    }

    #[test]
    fn cloudevents_are_checked_naming_the_attribute() {
        let ok = json!({"specversion": "1.0", "id": "1", "source": "/orders", "type": "order.paid", "subject": "17", "time": "2026-11-30T12:00:00.5+08:00", "traceparent": "x", "sequence": 5, "data": {"a": 1}});
        assert_eq!(cloudevent("event", &ok).unwrap(), "1");
        for (patch, field) in [
            (json!({"specversion": "0.3"}), "event.specversion"),
            (json!({"id": ""}), "event.id"),
            (json!({"type": 5}), "event.type"),
            (json!({"time": "yesterday"}), "event.time"),
            (json!({"subject": 1}), "event.subject"),
            (json!({"Bad-Name": "x"}), "event.Bad-Name"),
            (json!({"ext": {"nested": true}}), "event.ext"),
            (json!({"data_base64": "AAAA"}), "event.data_base64"),
        ] {
            let mut e = ok.clone();
            for (k, v) in patch.as_object().unwrap() {
                e[k] = v.clone();
            }
            let err = cloudevent("event", &e).unwrap_err().to_string();
            assert!(err.starts_with(&format!("{field}:")), "{err}");
            // The check on JSON text says the same.
            let text = cloudevent_json("event", e.to_string().as_bytes()).unwrap_err().expect("an object").to_string();
            assert_eq!(text, err);
        }
        assert_eq!(cloudevent_json("event", ok.to_string().as_bytes()).unwrap(), "1");
        let escaped = br#"{"specversion":"1.0","id":"a\"b\u00e9","source":"/s","type":"t","data":[1,{"x":"y"}]}"#;
        assert_eq!(cloudevent_json("event", escaped).unwrap(), "a\"b\u{e9}");
        for not_an_object in [&b"[1]"[..], b"\"x\"", b"{\"id\":", b"{\"data\": [1,}"] {
            assert!(cloudevent_json("event", not_an_object).unwrap_err().is_none());
        }
        let mut missing = ok.clone();
        missing.as_object_mut().unwrap().remove("source");
        assert!(cloudevent("events[2]", &missing).unwrap_err().to_string().starts_with("events[2].source:"));
    }

    #[test]
    fn binary_mode_becomes_structured() {
        let h = |k: &str, v: &str| (k.to_string(), v.to_string());
        let headers = vec![h("ce-specversion", "1.0"), h("ce-id", "7"), h("ce-source", "/s"), h("ce-type", "t"), h("ce-traceparent", "00-1")];
        let e = from_binary(headers.clone(), Some("application/json"), br#"{"x":1}"#, |_| String::new()).unwrap();
        assert_eq!(e["data"]["x"], 1);
        assert_eq!(e["traceparent"], "00-1");
        assert_eq!(cloudevent("event", &e).unwrap(), "7");
        let bin = from_binary(headers, Some("application/octet-stream"), b"\x00\x01", |b| format!("{}bytes", b.len())).unwrap();
        assert_eq!(bin["data_base64"], "2bytes");
    }

    #[test]
    fn rfc3339_times_parse_back() {
        for ms in [0, 951_782_400_000, 1_796_041_845_123, 4_102_444_800_000] {
            assert_eq!(parse_rfc3339_ms(&timestamp(ms)), Some(ms));
        }
        assert_eq!(parse_rfc3339_ms("2026-11-30T12:30:45.1+01:00"), Some(1_796_041_845_100 - 3_600_000));
        assert_eq!(parse_rfc3339_ms("2026-11-30T12:30:45Z"), Some(1_796_041_845_000));
        for bad in ["1969-12-31T23:59:59Z", "2026-13-01T00:00:00Z", "tomorrow"] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn own_cloudevents_are_valid_structured_events() {
        let data = json!({"a": 1});
        let e = super::CloudEvent::new("id-1", "zhili://x", "io.zhili.t", "s/1", "2026-11-30T12:00:00.000Z", &data).to_vec();
        let v: Value = serde_json::from_slice(&e).unwrap();
        assert_eq!(
            v,
            json!({"specversion": "1.0", "id": "id-1", "source": "zhili://x", "type": "io.zhili.t", "subject": "s/1", "time": "2026-11-30T12:00:00.000Z", "datacontenttype": "application/json", "data": {"a": 1}})
        );
    }

    #[test]
    fn timestamps_from_unix_time() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(timestamp(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(timestamp(1_796_041_845_123), "2026-11-30T12:30:45.123Z");
        assert!(rfc3339(&timestamp(4_102_444_800_000)));
    }

    #[test]
    fn timestamps() {
        for ok in ["2026-11-30T12:00:00Z", "2026-11-30t12:00:00.123456z", "2026-11-30T12:00:00-05:30"] {
            assert!(rfc3339(ok), "{ok}");
        }
        for bad in ["2026-11-30", "2026-11-30T12:00:00", "2026-11-30T12:00:00.Z", "2026-11-30T12:00:00+0530", "x"] {
            assert!(!rfc3339(bad), "{bad}");
        }
    }
}
