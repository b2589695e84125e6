//! Zhili's domain and wire types: namespaces, services, instances, checks, ACL rules.
//! Everything here is plain data plus validation; no IO, no async, so every level may use it.

pub mod acl;
pub mod consumer;
pub mod duration;
pub mod event;
pub mod plan;
pub mod registry;
pub mod report;
pub mod route;
pub mod subscription;
pub mod validate;

pub use duration::{format_duration, parse_duration};
pub use registry::*;
pub use validate::ValidationError;

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
