//! Consumers: the callers of gateway routes, with their API keys and scopes. Stored as JSON under
//! `consumers/`; API keys are kept only as SHA-256 digests (`sha256:<hex>`), so a stored
//! consumer never reveals its keys.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::validate::{self, ValidationError};

pub const MAX_API_KEYS: usize = 16;
pub const MAX_SCOPES: usize = 64;
/// Shorter keys are guessable; generate them (e.g. `openssl rand -hex 24`).
pub const MIN_API_KEY_LEN: usize = 16;
const DIGEST_PREFIX: &str = "sha256:";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsumerSpec {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Plain keys on input (hashed before they are stored) or `sha256:<hex>` digests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
}

/// The stored form of an API key.
pub fn api_key_digest(key: &str) -> String {
    let d = Sha256::digest(key.as_bytes());
    let mut s = String::with_capacity(DIGEST_PREFIX.len() + 64);
    s.push_str(DIGEST_PREFIX);
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn is_digest(k: &str) -> bool {
    k.strip_prefix(DIGEST_PREFIX).is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

impl ConsumerSpec {
    pub fn validate(&self, name: &str) -> Result<(), ValidationError> {
        validate::name("consumer", name)?;
        validate::text("description", &self.description)?;
        if self.api_keys.len() > MAX_API_KEYS {
            return Err(ValidationError::new("api_keys", format!("at most {MAX_API_KEYS} keys")));
        }
        for (i, k) in self.api_keys.iter().enumerate() {
            if !is_digest(k) && (k.len() < MIN_API_KEY_LEN || k.len() > 512 || k.bytes().any(|b| b <= 0x20 || b >= 0x7f)) {
                return Err(ValidationError::new(format!("api_keys[{i}]"), format!("must be {MIN_API_KEY_LEN}..=512 printable ASCII characters")));
            }
        }
        if self.scopes.len() > MAX_SCOPES {
            return Err(ValidationError::new("scopes", format!("at most {MAX_SCOPES} scopes")));
        }
        for (i, s) in self.scopes.iter().enumerate() {
            validate::scope(&format!("scopes[{i}]"), s)?;
        }
        Ok(())
    }

    /// The form to store: every plain key replaced by its digest.
    pub fn hashed(mut self) -> Self {
        for k in &mut self.api_keys {
            if !is_digest(k) {
                *k = api_key_digest(k);
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stored_as_digests_and_digests_are_kept() {
        let c = ConsumerSpec { api_keys: vec!["0123456789abcdef-secret".into()], ..Default::default() };
        c.validate("alice").unwrap();
        let h = c.hashed();
        assert!(is_digest(&h.api_keys[0]), "{:?}", h.api_keys);
        assert_eq!(h.api_keys[0], api_key_digest("0123456789abcdef-secret"));
        // Storing what a GET returned changes nothing.
        assert_eq!(h.clone().hashed(), h);
        h.validate("alice").unwrap();
    }

    #[test]
    fn bad_consumers_name_the_field() {
        for (c, field) in [
            (ConsumerSpec { api_keys: vec!["short".into()], ..Default::default() }, "api_keys[0]"),
            (ConsumerSpec { scopes: vec!["a b".into()], ..Default::default() }, "scopes[0]"),
        ] {
            assert_eq!(c.validate("c").unwrap_err().field, field);
        }
        assert_eq!(ConsumerSpec::default().validate("bad name").unwrap_err().field, "consumer");
    }
}
