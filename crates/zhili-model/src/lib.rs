//! Zhili's domain and wire types: namespaces, services, instances, checks, ACL rules.
//! Everything here is plain data plus validation; no IO, no async, so every level may use it.

pub mod acl;
pub mod duration;
pub mod registry;
pub mod validate;

pub use duration::{format_duration, parse_duration};
pub use registry::*;
pub use validate::ValidationError;
