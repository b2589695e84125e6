//! Calling a branch as DTM does: the payload as the body (POST, or GET without one; XA always
//! POSTs), `gid`, `trans_type`, `branch_id` and `op` in the query string, `branch_headers` as
//! headers, a per-call timeout; and reading DTM's result protocol from the answer. A URL may
//! name a registered service instead of a host (`discovery://order/api/reserve`,
//! `discovery://order.prod/api/reserve`, `http://order.service/api/reserve`): a healthy instance
//! is chosen by the [`Resolve`] the binary plugs in (the gateway's balancer).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

/// Largest branch answer read (it only carries a result).
const ANSWER_LIMIT: usize = 64 * 1024;

/// Picks a healthy instance of a registered service for discovery-aware branch URLs.
pub trait Resolve: Send + Sync + 'static {
    /// `host:port` of a serving instance of `service` in `namespace`, other than `avoid` when
    /// another one exists (a retry after a temporary failure goes elsewhere).
    fn instance(&self, namespace: &str, service: &str, avoid: Option<&str>) -> Option<String>;
}

/// No registry: discovery URLs cannot be resolved.
pub struct NoDiscovery;

impl Resolve for NoDiscovery {
    fn instance(&self, _: &str, _: &str, _: Option<&str>) -> Option<String> {
        None
    }
}

/// What a branch answered, in DTM's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 200 (without FAILURE or ONGOING in the body).
    Succeed,
    /// 409, or FAILURE in the body: a final failure, not retried.
    Failure(String),
    /// 425, or ONGOING in the body: not done yet, asked again after the retry interval.
    Ongoing,
    /// Anything else (other statuses, timeouts, connection errors): retried with backoff.
    Temporary(String),
}

/// One call to make.
pub struct Call<'a> {
    pub url: &'a str,
    pub gid: &'a str,
    pub trans_type: &'a str,
    pub branch_id: &'a str,
    pub op: &'a str,
    pub payload: &'a str,
    pub headers: &'a BTreeMap<String, String>,
    pub timeout: Duration,
    /// The instance that failed last time, to avoid when the URL names a service.
    pub avoid: Option<&'a str>,
}

/// The result, how long it took, and which instance served it (for discovery URLs).
pub struct Called {
    pub outcome: Outcome,
    pub latency: Duration,
    pub instance: Option<String>,
}

/// Where a discovery-aware URL points: (namespace, service, rest of the URL from its path).
pub fn discovery_target(url: &str) -> Option<(String, String, String)> {
    let (host, rest) = if let Some(r) = url.strip_prefix("discovery://") {
        split_host(r)
    } else if let Some(r) = url.strip_prefix("http://") {
        let (host, rest) = split_host(r);
        (host.strip_suffix(".service")?, rest)
    } else {
        return None;
    };
    let (service, namespace) = match host.split_once('.') {
        Some((s, ns)) => (s, ns),
        None => (host, "default"),
    };
    if service.is_empty() || namespace.is_empty() {
        return None;
    }
    Some((namespace.to_string(), service.to_string(), rest.to_string()))
}

fn split_host(r: &str) -> (&str, &str) {
    match r.find(['/', '?']) {
        Some(i) => (r.get(..i).unwrap_or(r), r.get(i..).unwrap_or("")),
        None => (r, ""),
    }
}

/// Percent-encodes a query value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Reads DTM's result protocol from a status and body.
pub fn outcome(status: StatusCode, body: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(body);
    if status == StatusCode::TOO_EARLY || text.contains("ONGOING") {
        Outcome::Ongoing
    } else if status == StatusCode::CONFLICT || text.contains("FAILURE") {
        Outcome::Failure(format!("{status}: {}", text.chars().take(200).collect::<String>()))
    } else if status == StatusCode::OK {
        Outcome::Succeed
    } else {
        Outcome::Temporary(format!("{status}: {}", text.chars().take(200).collect::<String>()))
    }
}

/// Makes the call. An empty URL succeeds at once (DTM's rule for absent compensations).
pub async fn call(c: &Call<'_>, resolve: &dyn Resolve, pool: &zhili_net::client::Pool) -> Called {
    let started = Instant::now();
    if c.url.is_empty() {
        return Called { outcome: Outcome::Succeed, latency: Duration::ZERO, instance: None };
    }
    let (url, instance) = match discovery_target(c.url) {
        Some((ns, service, rest)) => match resolve.instance(&ns, &service, c.avoid) {
            Some(addr) => (format!("http://{addr}{rest}"), Some(addr)),
            None => {
                let why = format!("no serving instance of {service:?} in namespace {ns:?}");
                return Called { outcome: Outcome::Temporary(why), latency: started.elapsed(), instance: None };
            }
        },
        None => (c.url.to_string(), None),
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    let url = format!("{url}{sep}gid={}&trans_type={}&branch_id={}&op={}", encode(c.gid), encode(c.trans_type), encode(c.branch_id), encode(c.op));
    let mut headers = HeaderMap::new();
    headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for (k, v) in c.headers {
        if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
            headers.insert(k, v);
        }
    }
    let method = if !c.payload.is_empty() || c.trans_type == "xa" { Method::POST } else { Method::GET };
    let body = Bytes::copy_from_slice(c.payload.as_bytes());
    let answer = tokio::time::timeout(c.timeout, pool.request(method, &url, headers, body, ANSWER_LIMIT)).await;
    let outcome = match answer {
        Ok(Ok(a)) => outcome(a.status, &a.body),
        Ok(Err(e)) => Outcome::Temporary(e),
        Err(_) => Outcome::Temporary(format!("no answer within {:?}", c.timeout)),
    };
    Called { outcome, latency: started.elapsed(), instance }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_follow_dtm() {
        assert_eq!(outcome(StatusCode::OK, b"{\"dtm_result\":\"SUCCESS\"}"), Outcome::Succeed);
        assert!(matches!(outcome(StatusCode::CONFLICT, b""), Outcome::Failure(_)));
        assert!(matches!(outcome(StatusCode::OK, b"{\"dtm_result\":\"FAILURE\"}"), Outcome::Failure(_)));
        assert_eq!(outcome(StatusCode::TOO_EARLY, b""), Outcome::Ongoing);
        assert_eq!(outcome(StatusCode::OK, b"ONGOING"), Outcome::Ongoing);
        assert!(matches!(outcome(StatusCode::INTERNAL_SERVER_ERROR, b"x"), Outcome::Temporary(_)));
        assert!(matches!(outcome(StatusCode::NOT_FOUND, b""), Outcome::Temporary(_)));
    }

    #[test]
    fn discovery_urls() {
        let t = |u: &str| discovery_target(u);
        assert_eq!(t("discovery://order/api/reserve?x=1"), Some(("default".into(), "order".into(), "/api/reserve?x=1".into())));
        assert_eq!(t("discovery://order.prod/api"), Some(("prod".into(), "order".into(), "/api".into())));
        assert_eq!(t("http://order.service/api/reserve"), Some(("default".into(), "order".into(), "/api/reserve".into())));
        assert_eq!(t("http://127.0.0.1:8080/api"), None);
        assert_eq!(t("http://order.services/api"), None);
        assert_eq!(t("discovery:///api"), None);
        assert_eq!(encode("a b&c=é"), "a%20b%26c%3D%C3%A9");
    }
}
