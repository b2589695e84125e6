//! Validation of names, keys, tags and metadata at the edge, so nothing half-valid reaches state.

use std::collections::BTreeMap;

/// An input was rejected. `field` names the offending field so an API can say exactly what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

pub const MAX_NAME_LEN: usize = 128;
pub const MAX_INSTANCE_ID_LEN: usize = 256;
pub const MAX_TAGS: usize = 64;
pub const MAX_TAG_LEN: usize = 256;
pub const MAX_METADATA_KEYS: usize = 64;
pub const MAX_METADATA_KEY_LEN: usize = 128;
pub const MAX_METADATA_VALUE_LEN: usize = 512;
pub const MAX_KV_KEY_LEN: usize = 512;
/// Values in the KV store are bounded so one write cannot balloon memory or the journal.
pub const MAX_KV_VALUE_LEN: usize = 512 * 1024;
pub const MAX_TEXT_LEN: usize = 1024;

/// Names of namespaces and services: DNS-friendly plus the characters Nacos and Consul users rely on.
pub fn name(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(ValidationError::new(field, format!("must be at most {MAX_NAME_LEN} bytes")));
    }
    if !value.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric) {
        return Err(ValidationError::new(field, "must start with a letter or digit"));
    }
    if let Some(c) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))) {
        return Err(ValidationError::new(field, format!("contains invalid character {c:?} (allowed: letters, digits, '-', '_', '.', ':')")));
    }
    Ok(())
}

/// Instance and check ids: any text without control characters, as Consul accepts (HA tools
/// register `scope/name`). In native URLs a '/' travels percent-encoded (`%2F`).
pub fn instance_id(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if value.len() > MAX_INSTANCE_ID_LEN {
        return Err(ValidationError::new(field, format!("must be at most {MAX_INSTANCE_ID_LEN} bytes")));
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(ValidationError::new(field, format!("contains invalid character {c:?}")));
    }
    Ok(())
}

/// KV keys: slash-separated paths without empty, '.' or '..' segments and without control characters.
pub fn kv_key(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if value.len() > MAX_KV_KEY_LEN {
        return Err(ValidationError::new(field, format!("must be at most {MAX_KV_KEY_LEN} bytes")));
    }
    if value.chars().any(char::is_control) {
        return Err(ValidationError::new(field, "must not contain control characters"));
    }
    if value.starts_with('/') {
        return Err(ValidationError::new(field, "must not start with '/'"));
    }
    if value.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(ValidationError::new(field, "must not contain '.' or '..' segments"));
    }
    Ok(())
}

/// A KV prefix for recursive operations: like a key, but may be empty (the whole keyspace).
pub fn kv_prefix(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Ok(());
    }
    kv_key(field, value)
}

pub fn kv_value(field: &str, value: &[u8]) -> Result<(), ValidationError> {
    if value.len() > MAX_KV_VALUE_LEN {
        return Err(ValidationError::new(field, format!("is {} bytes, at most {MAX_KV_VALUE_LEN} allowed", value.len())));
    }
    Ok(())
}

pub fn tags(field: &str, tags: &[String]) -> Result<(), ValidationError> {
    if tags.len() > MAX_TAGS {
        return Err(ValidationError::new(field, format!("at most {MAX_TAGS} tags allowed, got {}", tags.len())));
    }
    for (i, t) in tags.iter().enumerate() {
        if t.is_empty() || t.len() > MAX_TAG_LEN || t.chars().any(char::is_control) {
            return Err(ValidationError::new(format!("{field}[{i}]"), format!("must be 1..={MAX_TAG_LEN} bytes without control characters")));
        }
    }
    Ok(())
}

pub fn metadata(field: &str, meta: &BTreeMap<String, String>) -> Result<(), ValidationError> {
    if meta.len() > MAX_METADATA_KEYS {
        return Err(ValidationError::new(field, format!("at most {MAX_METADATA_KEYS} keys allowed, got {}", meta.len())));
    }
    for (k, v) in meta {
        if k.is_empty() || k.len() > MAX_METADATA_KEY_LEN || !k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')) {
            return Err(ValidationError::new(
                format!("{field}.{k}"),
                format!("key must be 1..={MAX_METADATA_KEY_LEN} bytes of letters, digits, '-', '_', '.', '/'"),
            ));
        }
        if v.len() > MAX_METADATA_VALUE_LEN {
            return Err(ValidationError::new(format!("{field}.{k}"), format!("value must be at most {MAX_METADATA_VALUE_LEN} bytes")));
        }
    }
    Ok(())
}

pub fn text(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.len() > MAX_TEXT_LEN {
        return Err(ValidationError::new(field, format!("must be at most {MAX_TEXT_LEN} bytes")));
    }
    Ok(())
}

/// An address is a host name or an IP literal; we do not resolve it here.
pub fn address(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if value.len() > 253 {
        return Err(ValidationError::new(field, "must be at most 253 bytes"));
    }
    if value.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let ok = value.split('.').all(|label| {
        !label.is_empty() && label.len() <= 63 && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') && !label.starts_with('-')
    });
    if !ok {
        return Err(ValidationError::new(field, format!("{value:?} is neither an IP address nor a host name")));
    }
    Ok(())
}

pub fn port(field: &str, value: u32) -> Result<u16, ValidationError> {
    if value == 0 || value > 65535 {
        return Err(ValidationError::new(field, format!("must be 1..=65535, got {value}")));
    }
    Ok(value as u16)
}

/// An OAuth-style scope: 1..=256 characters, no spaces, control characters, quotes or backslashes.
pub fn scope(field: &str, s: &str) -> Result<(), ValidationError> {
    if s.is_empty() || s.len() > 256 || s.bytes().any(|b| b <= 0x20 || b == 0x7f || b == b'"' || b == b'\\') {
        return Err(ValidationError::new(field, format!("{s:?} is not a scope (1..=256 printable characters, no spaces)")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names() {
        assert!(name("name", "web-api_1.v2:x").is_ok());
        assert_eq!(name("name", "").unwrap_err().field, "name");
        assert!(name("name", "-x").is_err());
        assert!(name("name", "a/b").is_err());
        assert!(name("name", &"a".repeat(129)).is_err());
    }

    #[test]
    fn kv_keys() {
        assert!(kv_key("key", "config/app/db").is_ok());
        assert!(kv_key("key", "/abs").is_err());
        assert!(kv_key("key", "a/../b").is_err());
        assert!(kv_key("key", "a\nb").is_err());
        assert!(kv_prefix("key", "").is_ok());
    }

    #[test]
    fn addresses() {
        assert!(address("address", "10.0.0.1").is_ok());
        assert!(address("address", "::1").is_ok());
        assert!(address("address", "db-1.internal").is_ok());
        assert!(address("address", "bad host").is_err());
        assert!(address("address", "").is_err());
    }

    #[test]
    fn metadata_bounds() {
        let mut m = BTreeMap::new();
        for i in 0..65 {
            m.insert(format!("k{i}"), "v".into());
        }
        assert!(metadata("metadata", &m).is_err());
        let mut m = BTreeMap::new();
        m.insert("bad key".into(), "v".into());
        assert_eq!(metadata("metadata", &m).unwrap_err().field, "metadata.bad key");
    }

    proptest! {
        #[test]
        fn name_validation_never_panics_and_accepts_only_allowed(s in "\\PC{0,200}") {
            if name("n", &s).is_ok() {
                prop_assert!(!s.is_empty() && s.len() <= MAX_NAME_LEN);
                prop_assert!(s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)));
            }
        }

        #[test]
        fn kv_key_validation_never_panics(s in "\\PC{0,600}") {
            if kv_key("k", &s).is_ok() {
                prop_assert!(!s.starts_with('/') && s.len() <= MAX_KV_KEY_LEN);
            }
        }

        #[test]
        fn instance_ids_have_no_control_characters(s in "\\PC{0,300}|[a-z/\\x00-\\x1f]{0,20}") {
            if instance_id("id", &s).is_ok() {
                prop_assert!(!s.is_empty() && !s.chars().any(char::is_control) && s.len() <= MAX_INSTANCE_ID_LEN);
            }
        }
    }
}
