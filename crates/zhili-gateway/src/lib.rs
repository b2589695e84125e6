//! The gateway: Zhili's data plane. Requests are matched against the route table and forwarded to
//! healthy instances of the routed service (or redirected, or answered directly). Routes and
//! endpoints come from a [`Discover`] implementation (the registry when embedded in the server,
//! a server's HTTP API when standalone); both swap atomically, so a change never drops requests
//! in flight.
//!
//! A request goes through phases, each a function of [`proxy`]: route → authenticate → limit →
//! act (answer directly, redirect, or forward); forwarding is transform (the upstream request's
//! headers) → balance (pick an endpoint) → send, with the retry loop around one send. HTTP/1.1
//! requests arrive through zhili-net's own HTTP/1.1 server side (`zhili_net::h1_server`),
//! everything else through hyper. Modules import downwards only: `serve` → `proxy` → `forward` →
//! (`transform`, `balance`, `h1`, `upstream`) → (`body`, `error`); none imports one that
//! imports it.

pub mod auth;
mod balance;
mod body;
mod breaker;
mod cors;
mod discover;
mod error;
mod forward;
mod gateway;
mod h1;
mod limit;
mod proxy;
mod serve;
mod stats;
mod table;
mod target;
pub mod tls;
mod transform;
mod upstream;
mod workers;

pub use auth::Consumers;
pub use balance::{Ejection, Endpoint, Pool, RetryBudget};
pub use body::{Body, BoxError};
pub use breaker::{CircuitBreaker, Transition};
pub use discover::{follow, Discover, DiscoverError, DISCOVERY_WAIT, NOTHING_YET_POLL, POOL_READY_WAIT};
pub use gateway::{Gateway, GatewayCollector, Observed, Options, PassiveHealth};
pub use limit::{Decision, Limiter};
pub use serve::serve;
pub use stats::{Latencies, RouteLabels, ServiceLabels, Stats, TargetTraffic};
pub use table::{compile, Route, Table, Target};
pub use workers::{bind_workers, default_workers, serve_workers};
