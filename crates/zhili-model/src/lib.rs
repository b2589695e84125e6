//! Zhili's domain and wire types: namespaces, services, instances, checks, ACL rules.
//! Everything here is plain data plus validation; no IO, no async, so every level may use it.

pub mod acl;
pub mod consumer;
pub mod duration;
pub mod event;
pub mod metadata;
pub mod plan;
pub mod registry;
pub mod report;
pub mod route;
pub mod subscription;
pub mod validate;

pub use duration::{format_duration, parse_duration};
pub use metadata::Metadata;
pub use registry::*;
pub use validate::ValidationError;

/// Lowercase hexadecimal of `bytes` (digests, random ids).
pub fn hex(bytes: &[u8]) -> String {
    let digit = |n: u8| char::from_digit(u32::from(n), 16).unwrap_or('0');
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(digit(b >> 4));
        out.push(digit(b & 0x0f));
    }
    out
}

/// An error with its chain of sources, "outer: inner: innermost", for outputs and messages.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_is_lowercase_two_digits_per_byte() {
        assert_eq!(super::hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(super::hex(&[]), "");
    }
}
