//! The request target as routing sees it and as the upstream receives it: one normalized
//! authority and one normalized path, so that what a route matched is exactly what is forwarded.
//!
//! Authority: absolute-form (`GET http://host/x`) or HTTP/2 `:authority` wins over `Host`; a
//! missing, duplicate or malformed `Host`, userinfo (`x@host`), and an `:authority` that disagrees
//! with `host` are refused. Lower-cased, a trailing dot removed, the port kept.
//!
//! Path (RFC 3986): escapes of unreserved characters decoded (`%61` → `a`), other escapes kept
//! with upper-case hex, empty segments merged (`//` → `/`), dot-segments resolved (`/a/../b` →
//! `/b`). Encoded slashes or backslashes (`%2F`, `%5C`), encoded dot-segments (`%2e%2e`) and
//! dot-segments with parameters (`..;`) are refused unless a route asks for raw paths. Matching is
//! case-sensitive, as paths are.

use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Uri, Version};

/// The normalized authority: `host` for routing (no port), `authority` for the upstream's Host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    pub host: String,
    pub authority: String,
    /// `authority` as a header value (the upstream's Host and X-Forwarded-Host); None when empty.
    pub value: Option<HeaderValue>,
}

impl Authority {
    fn new(host: String, authority: String) -> Self {
        let value = Some(&authority).filter(|a| !a.is_empty()).and_then(|a| HeaderValue::from_str(a).ok());
        Self { host, authority, value }
    }
}

/// Host headers normalized lately on this thread (a gateway worker), with what they gave: a
/// keep-alive client sends the same Host on every request, so each is normalized once rather
/// than per request (lower-casing, checks and two Strings were 2 % of a proxied GET).
const RECENT_HOSTS: usize = 16;

/// The next slot to replace, and the hosts with their authorities.
type Recent = (usize, Vec<(HeaderValue, Arc<Authority>)>);

thread_local! {
    static RECENT: RefCell<Recent> = const { RefCell::new((0, Vec::new())) };
}

/// [`normalize`] of a `Host` header, through this thread's [`RECENT`] hosts. Refusals are not
/// kept (a stream of bad hosts costs what it did before, and evicts nothing).
fn normalize_host(h: &HeaderValue) -> Result<Arc<Authority>, Refusal> {
    if let Some(a) = RECENT.with(|r| r.borrow().1.iter().find(|(v, _)| v == h).map(|(_, a)| a.clone())) {
        return Ok(a);
    }
    let a = Arc::new(normalize(h.to_str().map_err(|_| "the Host header is not text")?)?);
    RECENT.with(|r| {
        let (next, hosts) = &mut *r.borrow_mut();
        // A copy: the request's value shares its whole read buffer.
        let Ok(key) = HeaderValue::from_bytes(h.as_bytes()) else { return };
        let entry = (key, a.clone());
        match hosts.get_mut(*next) {
            Some(slot) => *slot = entry,
            None => hosts.push(entry),
        }
        *next = (*next + 1) % RECENT_HOSTS;
    });
    Ok(a)
}

/// Why a request target is refused (answered 400).
pub type Refusal = &'static str;

/// The authority of a request, normalized; see the module doc.
pub fn authority(version: Version, uri: &Uri, headers: &HeaderMap) -> Result<Arc<Authority>, Refusal> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host_header = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    if let Some(a) = uri.authority() {
        // HTTP/2 `:authority` (or an absolute-form target) must agree with a `host` header.
        let a = normalize(a.as_str())?;
        if let Some(h) = host_header {
            if version == Version::HTTP_2 && *normalize_host(h)? != a {
                return Err(":authority and host disagree");
            }
        }
        return Ok(Arc::new(a));
    }
    match host_header {
        Some(h) => normalize_host(h),
        None if version == Version::HTTP_10 => Ok(Arc::new(Authority::new(String::new(), String::new()))),
        None => Err("the Host header is missing"),
    }
}

fn normalize(raw: &str) -> Result<Authority, Refusal> {
    if raw.contains('@') {
        return Err("userinfo is not allowed in the authority");
    }
    let raw = raw.trim();
    let (host, port) = if let Some(rest) = raw.strip_prefix('[') {
        let (ip, after) = rest.split_once(']').ok_or("a malformed IPv6 authority")?;
        if ip.is_empty() || !ip.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.') {
            return Err("a malformed IPv6 authority");
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("a malformed authority")?),
        };
        (format!("[{}]", ip.to_ascii_lowercase()), port)
    } else {
        let (h, p) = match raw.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (raw, None),
        };
        let h = h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase();
        if h.is_empty() || h.len() > 253 || !h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_') || h.contains("..") {
            return Err("a malformed Host");
        }
        (h, p)
    };
    let authority = match port {
        None => host.clone(),
        Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok() => format!("{host}:{p}"),
        Some(_) => return Err("a malformed port in the Host"),
    };
    Ok(Authority::new(host, authority))
}

/// The normalized path of `raw` (see the module doc): `raw` itself when it is already normal.
/// `raw_ok`: encoded slashes and dot-segments are data, not refused (routes for upstreams that
/// need raw paths).
pub fn path(raw: &str, raw_ok: bool) -> Result<Cow<'_, str>, Refusal> {
    if raw.is_empty() || raw == "*" {
        return Ok(Cow::Borrowed("/"));
    }
    if !raw.starts_with('/') {
        return Err("the path must start with '/'");
    }
    // The common case, checked without allocating per segment: no escapes, no empty segments,
    // no dot-segments (with or without parameters): already normal.
    if !raw.contains(['%', ';']) && !raw.contains("//") && !raw.split('/').any(|s| s == "." || s == "..") {
        return Ok(Cow::Borrowed(raw));
    }
    let mut out: Vec<String> = Vec::new();
    let segments: Vec<&str> = raw.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        let decoded = decode_unreserved(seg)?;
        let bare = decoded.split(';').next().unwrap_or("");
        let encoded_dot = decoded != *seg && (bare == "." || bare == "..");
        if !raw_ok {
            let lower = decoded.to_ascii_lowercase();
            if lower.contains("%2f") || lower.contains("%5c") {
                return Err("an encoded slash in the path");
            }
            if encoded_dot {
                return Err("an encoded dot-segment in the path");
            }
            if decoded.contains(';') && (bare == "." || bare == "..") {
                return Err("a dot-segment with parameters in the path");
            }
        }
        match decoded.as_str() {
            "" => trailing_slash = i == last,
            "." => trailing_slash = i == last,
            ".." => {
                out.pop();
                trailing_slash = i == last;
            }
            _ => {
                out.push(decoded);
                trailing_slash = false;
            }
        }
    }
    let mut p = String::with_capacity(raw.len());
    for s in &out {
        p.push('/');
        p.push_str(s);
    }
    if p.is_empty() || trailing_slash {
        p.push('/');
    }
    Ok(Cow::Owned(p))
}

/// Decodes `%XX` of unreserved characters (ALPHA DIGIT - . _ ~); keeps other escapes with
/// upper-case hex; refuses a malformed escape.
fn decode_unreserved(seg: &str) -> Result<String, Refusal> {
    let b = seg.as_bytes();
    let mut out = String::with_capacity(seg.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c != b'%' {
            out.push(char::from(c));
            i += 1;
            continue;
        }
        let hex = |j: usize| b.get(j).and_then(|h| char::from(*h).to_digit(16));
        let (Some(h), Some(l)) = (hex(i + 1), hex(i + 2)) else { return Err("a malformed percent-escape in the path") };
        let v = (h * 16 + l) as u8;
        if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(v));
        } else {
            out.push_str(&format!("%{v:02X}"));
        }
        i += 3;
    }
    Ok(out)
}

/// Whether the request is a WebSocket upgrade, the only upgrade forwarded (an `h2c` upgrade would
/// turn the connection into a tunnel past routing).
pub fn websocket_upgrade(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::GET && headers.get(header::UPGRADE).is_some_and(|u| u.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

/// A query string's pairs, decoded.
pub(crate) fn form_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').map_or_else(|| (percent_decode(p), String::new()), |(k, v)| (percent_decode(k), percent_decode(v))))
        .collect()
}

/// Minimal `application/x-www-form-urlencoded` decoding of a query string.
/// `%XX` and `+` decoded (invalid escapes kept as they are).
pub(crate) fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'+' => out.push(b' '),
            b'%' => match (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn auth(version: Version, uri: &str, hosts: &[&str]) -> Result<Arc<Authority>, Refusal> {
        let mut h = HeaderMap::new();
        for v in hosts {
            h.append(header::HOST, HeaderValue::from_str(v).unwrap());
        }
        authority(version, &uri.parse().unwrap(), &h)
    }

    #[test]
    fn authorities() {
        let a = auth(Version::HTTP_11, "/x", &["Admin.Internal."]).unwrap();
        assert_eq!((a.host.as_str(), a.authority.as_str()), ("admin.internal", "admin.internal"));
        let a = auth(Version::HTTP_11, "http://public.example/x", &["admin.internal"]).unwrap();
        assert_eq!(a.host, "public.example", "absolute-form wins, and is what goes upstream");
        assert_eq!(auth(Version::HTTP_11, "/x", &["h:8080"]).unwrap().authority, "h:8080");
        assert_eq!(auth(Version::HTTP_11, "/x", &["[::1]:80"]).unwrap().host, "[::1]");
        for bad in [&["x@admin.internal"][..], &["a", "b"], &[], &["h:99999"], &["h:"], &["bad host"], &["a..b"]] {
            assert!(auth(Version::HTTP_11, "/x", bad).is_err(), "{bad:?}");
        }
        assert!(auth(Version::HTTP_2, "http://a.example/x", &["b.example"]).is_err(), ":authority vs host");
        assert!(auth(Version::HTTP_2, "http://a.example/x", &["A.example."]).is_ok());
    }

    /// Hosts come from this thread's recent ones when seen before: the same answers as
    /// normalizing afresh, for more hosts than are kept, and refusals stay refusals.
    #[test]
    fn recent_hosts_answer_as_normalizing_does() {
        let hosts: Vec<String> = (0..RECENT_HOSTS * 2 + 3).map(|i| format!("Svc-{i}.Example.:80{}", i % 10)).collect();
        for _ in 0..3 {
            for h in &hosts {
                let a = auth(Version::HTTP_11, "/x", &[h]).unwrap();
                assert_eq!(*a, normalize(h).unwrap());
                assert_eq!(a.value.as_ref().map(|v| v.as_bytes()), Some(a.authority.as_bytes()));
            }
            assert!(auth(Version::HTTP_11, "/x", &["bad host"]).is_err());
        }
        let first = auth(Version::HTTP_11, "/x", &["again.example"]).unwrap();
        assert!(Arc::ptr_eq(&first, &auth(Version::HTTP_11, "/x", &["again.example"]).unwrap()), "a recent host is not normalized again");
    }

    #[test]
    fn paths() {
        for (raw, want) in [
            ("/pub/../admin/secret", "/admin/secret"),
            ("/./admin/x", "/admin/x"),
            ("/%61dmin/x", "/admin/x"),
            ("//admin/secret", "/admin/secret"),
            ("/a/b/", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/../..", "/"),
            ("/a%20b", "/a%20b"),
            ("/a%7e", "/a~"),
            ("/a%3f", "/a%3F"),
            ("", "/"),
        ] {
            assert_eq!(path(raw, false).as_deref(), Ok(want), "{raw}");
        }
        for raw in ["/admin%2fsecret", "/pub/%2e%2e/admin/secret", "/pub/..%2fadmin/secret", "/pub/..;/admin/secret", "/a%zz", "x", "/a%5Cb", "/%2E/x"] {
            assert!(path(raw, false).is_err(), "{raw}");
        }
        assert_eq!(path("/a%2Fb", true).as_deref(), Ok("/a%2Fb"), "raw paths keep encoded slashes");
    }

    proptest::proptest! {
        /// A normalized path has no dot-segments or empty segments, and normalizing it again
        /// changes nothing (so what routing matched is what the upstream resolves).
        #[test]
        fn normalization_is_idempotent(raw in "/[a-z./%0-9A-F;]{0,40}") {
            if let Ok(p) = path(&raw, false) {
                proptest::prop_assert!(p.starts_with('/'));
                proptest::prop_assert!(!p.contains("//"));
                proptest::prop_assert!(!p.split('/').any(|s| s == "." || s == ".."), "{}", p);
                proptest::prop_assert_eq!(path(&p, false), Ok(p.clone()));
                if !p.contains(['%', ';']) {
                    proptest::prop_assert!(matches!(path(&p, false), Ok(Cow::Borrowed(_))), "a plain normal path is taken as it is, not copied");
                }
            }
        }
    }
}
