//! Authentication and authorization per route: JWT (static keys and JWKS with caching and
//! rotation), consumers' API keys, client certificates; then allowed consumers and scopes. A
//! request that fails gets 401 (no or bad credentials) or 403 (known caller, not allowed) and
//! never reaches the upstream.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Uri;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use zhili_model::consumer::{api_key_digest, ConsumerSpec};
use zhili_model::route::{AuthSpec, JwtAlg, JwtSpec};
use zhili_model::ValidationError;

/// How often a token naming an unknown `kid` may make the gateway fetch the JWKS again.
pub const JWKS_MIN_REFETCH: Duration = Duration::from_secs(1);
pub const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
pub const JWKS_MAX_BYTES: usize = 1024 * 1024;
/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Header carrying the authenticated consumer upstream (a client-sent one is always removed).
pub static CONSUMER_HEADER: HeaderName = HeaderName::from_static("x-consumer");

/// The consumers the gateway knows, by API key digest and by name.
#[derive(Default)]
pub struct Consumers {
    by_key: HashMap<String, Arc<Consumer>>,
    by_name: HashMap<String, Arc<Consumer>>,
}

pub struct Consumer {
    pub name: String,
    pub scopes: Vec<String>,
}

impl Consumers {
    pub fn new(list: Vec<(String, ConsumerSpec)>) -> Self {
        let mut out = Self::default();
        for (name, spec) in list {
            let c = Arc::new(Consumer { name: name.clone(), scopes: spec.scopes.clone() });
            for k in spec.hashed().api_keys {
                out.by_key.insert(k, c.clone());
            }
            out.by_name.insert(name, c);
        }
        out
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// Who a request comes from, once authenticated.
#[derive(Debug, Default)]
pub struct Identity {
    pub consumer: Option<String>,
    pub scopes: Vec<String>,
    /// Claims forwarded as headers.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    /// 401: no credentials, or ones that do not check out.
    Unauthorized(String),
    /// 403: authenticated, but not allowed on this route.
    Forbidden(String),
}

/// A route's compiled auth policy.
#[derive(Debug)]
pub struct Auth {
    pub jwt: Option<Jwt>,
    api_key: Option<(HeaderName, Option<String>)>,
    mtls: bool,
    consumers: HashSet<String>,
    scopes: Vec<String>,
    pub hide_credentials: bool,
}

/// A verification key and the one algorithm it may be used with.
pub(crate) struct Key {
    kid: Option<String>,
    alg: JwtAlg,
    key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key").field("kid", &self.kid).field("alg", &self.alg).finish()
    }
}

fn algorithm(a: JwtAlg) -> Algorithm {
    match a {
        JwtAlg::HS256 => Algorithm::HS256,
        JwtAlg::RS256 => Algorithm::RS256,
        JwtAlg::ES256 => Algorithm::ES256,
    }
}

#[derive(Debug)]
pub struct Jwt {
    keys: Vec<Key>,
    pub jwks_url: Option<String>,
    pub jwks_refresh: Duration,
    /// Shared by every route naming the same URL; attached when the table is staged.
    pub jwks: OnceLock<Arc<Jwks>>,
    validations: [(JwtAlg, Validation); 3],
    claims_to_headers: Vec<(String, HeaderName)>,
    consumer_claim: String,
    query: Option<String>,
    cookie: Option<String>,
    leeway: u64,
    /// Claims the route requires, checked for presence and type on top of the library's checks.
    issuer: Option<String>,
    audiences: Vec<String>,
    /// Tokens verified lately, so a client sending the same token again costs a map lookup.
    cache: parking_lot::Mutex<HashMap<Box<str>, Verified>>,
}

/// Tokens kept verified per route; the map is emptied when full.
const TOKEN_CACHE: usize = 10_000;

#[derive(Debug)]
struct Verified {
    identity: Arc<Identity>,
    exp: u64,
    nbf: u64,
    /// The JWKS generation the token was verified against (a key change re-verifies).
    generation: u64,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn compile_jwt(spec: &JwtSpec) -> Result<Jwt, ValidationError> {
    let mut keys = vec![];
    for (i, k) in spec.keys.iter().enumerate() {
        let key = match (k.alg, &k.secret, &k.public_key) {
            (JwtAlg::HS256, Some(s), _) => DecodingKey::from_secret(s.as_bytes()),
            (JwtAlg::RS256, _, Some(p)) => DecodingKey::from_rsa_pem(p.as_bytes())
                .map_err(|e| ValidationError::new(format!("auth.jwt.keys[{i}].public_key"), format!("not an RSA public key in PEM: {e}")))?,
            (JwtAlg::ES256, _, Some(p)) => DecodingKey::from_ec_pem(p.as_bytes())
                .map_err(|e| ValidationError::new(format!("auth.jwt.keys[{i}].public_key"), format!("not an EC P-256 public key in PEM: {e}")))?,
            _ => return Err(ValidationError::new(format!("auth.jwt.keys[{i}]"), "key material does not fit the algorithm")),
        };
        keys.push(Key { kid: k.kid.clone(), alg: k.alg, key });
    }
    let leeway = spec.leeway()?;
    let validation = |alg: JwtAlg| {
        let mut v = Validation::new(algorithm(alg));
        v.leeway = leeway.as_secs();
        v.validate_nbf = true;
        if let Some(iss) = &spec.issuer {
            v.set_issuer(&[iss]);
        }
        if spec.audiences.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&spec.audiences);
        }
        (alg, v)
    };
    let mut claims_to_headers = vec![];
    for (claim, h) in &spec.claims_to_headers {
        let name =
            HeaderName::from_bytes(h.as_bytes()).map_err(|_| ValidationError::new(format!("auth.jwt.claims_to_headers.{claim}"), "not a header name"))?;
        claims_to_headers.push((claim.clone(), name));
    }
    Ok(Jwt {
        keys,
        jwks_url: spec.jwks_url.clone(),
        jwks_refresh: spec.jwks_refresh(),
        jwks: OnceLock::new(),
        validations: [validation(JwtAlg::HS256), validation(JwtAlg::RS256), validation(JwtAlg::ES256)],
        claims_to_headers,
        consumer_claim: spec.consumer_claim.clone().unwrap_or_else(|| "sub".into()),
        query: spec.query.clone(),
        cookie: spec.cookie.clone(),
        leeway: leeway.as_secs(),
        issuer: spec.issuer.clone(),
        audiences: spec.audiences.clone(),
        cache: Default::default(),
    })
}

/// RFC 7515 4.1.11: a recipient must refuse a token whose `crit` header names extensions it does
/// not understand; this verifier understands none.
fn refuse_critical_extensions(token: &str) -> Result<(), String> {
    use base64::Engine;
    let header = token.split('.').next().unwrap_or_default();
    let bytes =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header.trim_end_matches('=')).map_err(|_| "the token's header is not base64url".to_string())?;
    let head: Map<String, Value> = serde_json::from_slice(&bytes).map_err(|_| "the token's header is not a JSON object".to_string())?;
    if head.contains_key("crit") {
        return Err("the token names critical header extensions (crit) this gateway does not understand".into());
    }
    Ok(())
}

/// Compiles a route's auth (validated with the route by `RouteSpec::validate`).
pub fn compile(spec: &AuthSpec) -> Result<Auth, ValidationError> {
    let api_key = match &spec.api_key {
        None => None,
        Some(k) => {
            let h = k.header.as_deref().unwrap_or("x-api-key");
            let name = HeaderName::from_bytes(h.as_bytes()).map_err(|_| ValidationError::new("auth.api_key.header", "not a header name"))?;
            Some((name, k.query.clone()))
        }
    };
    Ok(Auth {
        jwt: spec.jwt.as_ref().map(compile_jwt).transpose()?,
        api_key,
        mtls: spec.mtls,
        consumers: spec.consumers.iter().cloned().collect(),
        scopes: spec.scopes.clone(),
        hide_credentials: spec.hide_credentials,
    })
}

/// A query parameter's value, percent-decoded.
fn query_param(uri: &Uri, name: &str) -> Option<String> {
    crate::target::form_pairs(uri.query()?).into_iter().find_map(|(k, v)| (k == name).then_some(v))
}

/// The value of cookie `name`.
pub(crate) fn cookie<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// What the request carries: the request parts auth looks at.
pub struct Presented<'a> {
    pub headers: &'a HeaderMap,
    pub uri: &'a Uri,
    /// The verified client certificate's subject common name.
    pub client_cn: Option<&'a str>,
}

impl Auth {
    /// Whether a JWT is one of the accepted credentials (401s then carry `WWW-Authenticate`).
    pub fn bearer(&self) -> bool {
        self.jwt.is_some()
    }

    /// The header names whose client-sent values must not reach the upstream.
    pub fn identity_headers(&self) -> impl Iterator<Item = &HeaderName> {
        std::iter::once(&CONSUMER_HEADER).chain(self.jwt.iter().flat_map(|j| j.claims_to_headers.iter().map(|(_, h)| h)))
    }

    pub fn credential_headers(&self) -> impl Iterator<Item = &HeaderName> {
        self.jwt.as_ref().map(|_| &header::AUTHORIZATION).into_iter().chain(self.api_key.as_ref().map(|(h, _)| h))
    }

    /// The query parameters and cookies that may carry a credential.
    fn credential_params(&self) -> (Vec<&str>, Option<&str>) {
        let params = self.api_key.as_ref().and_then(|(_, q)| q.as_deref()).into_iter().chain(self.jwt.as_ref().and_then(|j| j.query.as_deref())).collect();
        (params, self.jwt.as_ref().and_then(|j| j.cookie.as_deref()))
    }

    /// With `hide_credentials`: `query` without the credential parameters, and `headers` without
    /// the credential headers and cookie.
    pub fn hide(&self, query: Option<&str>, headers: &mut HeaderMap) -> Option<String> {
        for h in self.credential_headers() {
            headers.remove(h);
        }
        let (params, cookie_name) = self.credential_params();
        if let Some(name) = cookie_name {
            let kept: Vec<String> = headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .map(str::trim)
                .filter(|kv| !kv.is_empty() && kv.split_once('=').is_none_or(|(k, _)| k != name))
                .map(str::to_string)
                .collect();
            headers.remove(header::COOKIE);
            if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
                if !kept.is_empty() {
                    headers.insert(header::COOKIE, v);
                }
            }
        }
        let q = query?;
        // Names compared decoded, as `query_param` reads them.
        let kept: Vec<&str> =
            q.split('&').filter(|kv| !params.contains(&crate::target::percent_decode(kv.split_once('=').map_or(*kv, |(k, _)| k)).as_str())).collect();
        Some(kept.join("&"))
    }

    pub async fn check(&self, p: &Presented<'_>, consumers: &Consumers) -> Result<Arc<Identity>, Denied> {
        let id = self.authenticate(p, consumers).await?;
        if !self.consumers.is_empty() && !id.consumer.as_ref().is_some_and(|c| self.consumers.contains(c)) {
            let who = id.consumer.as_deref().unwrap_or("an anonymous caller");
            return Err(Denied::Forbidden(format!("consumer {who:?} is not allowed on this route")));
        }
        // The consumer's stored scopes count too (looked up now: they may have changed since a
        // cached token was verified).
        let stored = id.consumer.as_ref().and_then(|c| consumers.by_name.get(c));
        if let Some(missing) = self.scopes.iter().find(|s| !id.scopes.contains(s) && !stored.is_some_and(|c| c.scopes.contains(s))) {
            return Err(Denied::Forbidden(format!("scope {missing:?} is required")));
        }
        Ok(id)
    }

    async fn authenticate(&self, p: &Presented<'_>, consumers: &Consumers) -> Result<Arc<Identity>, Denied> {
        let mut failure = None;
        if self.mtls {
            if let Some(cn) = p.client_cn {
                return Ok(Arc::new(Identity { consumer: Some(cn.to_string()), scopes: vec![], headers: vec![] }));
            }
        }
        if let Some((h, q)) = &self.api_key {
            let presented =
                p.headers.get(h).and_then(|v| v.to_str().ok()).map(Cow::Borrowed).or_else(|| q.as_deref().and_then(|q| query_param(p.uri, q)).map(Cow::Owned));
            if let Some(key) = presented {
                match consumers.by_key.get(&api_key_digest(&key)) {
                    Some(c) => return Ok(Arc::new(Identity { consumer: Some(c.name.clone()), scopes: vec![], headers: vec![] })),
                    None => failure = Some("the API key is not known".to_string()),
                }
            }
        }
        if let Some(jwt) = &self.jwt {
            if let Some(token) = jwt.token(p) {
                if let Some(id) = jwt.cached(&token) {
                    return Ok(id);
                }
                match jwt.verify(&token).await {
                    Ok(claims) => return Ok(jwt.remember(&token, &claims)),
                    Err(e) => failure = Some(e),
                }
            }
        }
        Err(Denied::Unauthorized(failure.unwrap_or_else(|| {
            let mut ways = vec![];
            if self.jwt.is_some() {
                ways.push("a bearer token".to_string());
            }
            if let Some((h, _)) = &self.api_key {
                ways.push(format!("an API key in {h}"));
            }
            if self.mtls {
                ways.push("a client certificate".to_string());
            }
            format!("credentials required: {}", ways.join(" or "))
        })))
    }
}

fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => "the token has expired".into(),
        K::ImmatureSignature => "the token is not valid yet (nbf)".into(),
        K::InvalidIssuer => "the token's issuer is not accepted".into(),
        K::InvalidAudience => "the token's audience is not accepted".into(),
        K::InvalidSignature => "the token's signature does not verify".into(),
        K::MissingRequiredClaim(c) => format!("the token has no {c:?} claim"),
        K::InvalidAlgorithm => "the token's algorithm does not match its key".into(),
        _ => format!("the token is malformed: {e}"),
    }
}

impl Jwt {
    fn token<'a>(&self, p: &Presented<'a>) -> Option<Cow<'a, str>> {
        let from_header = p.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| {
            let (scheme, t) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| t.trim())
        });
        from_header
            .map(Cow::Borrowed)
            .or_else(|| self.query.as_deref().and_then(|q| query_param(p.uri, q)).map(Cow::Owned))
            .or_else(|| self.cookie.as_deref().and_then(|c| cookie(p.headers, c)).map(Cow::Borrowed))
    }

    fn generation(&self) -> Option<u64> {
        match self.jwks.get() {
            None => Some(0),
            // A JWKS due for its refresh is checked again (by verifying).
            Some(j) => (!j.stale(self.jwks_refresh)).then(|| j.generation.load(std::sync::atomic::Ordering::Acquire)),
        }
    }

    /// The identity of a token verified before, while it is still inside its time window and
    /// the keys it was verified with are unchanged.
    fn cached(&self, token: &str) -> Option<Arc<Identity>> {
        let generation = self.generation()?;
        let now = unix_now();
        let cache = self.cache.lock();
        let v = cache.get(token)?;
        (v.generation == generation && now < v.exp.saturating_add(self.leeway) && now.saturating_add(self.leeway) >= v.nbf).then(|| v.identity.clone())
    }

    fn remember(&self, token: &str, claims: &Map<String, Value>) -> Arc<Identity> {
        let identity = Arc::new(self.identity(claims));
        let (Some(exp), Some(generation)) = (claims.get("exp").and_then(Value::as_u64), self.generation()) else { return identity };
        let nbf = claims.get("nbf").and_then(Value::as_u64).unwrap_or(0);
        let mut cache = self.cache.lock();
        if cache.len() >= TOKEN_CACHE {
            cache.clear();
        }
        cache.insert(token.into(), Verified { identity: identity.clone(), exp, nbf, generation });
        identity
    }

    /// The token's claims when its signature, algorithm, time window, issuer and audience check out.
    pub async fn verify(&self, token: &str) -> Result<Map<String, Value>, String> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(format!("the token is over {MAX_TOKEN_LEN} bytes"));
        }
        let head = jsonwebtoken::decode_header(token).map_err(|e| describe(&e))?;
        refuse_critical_extensions(token)?;
        let alg = match head.alg {
            Algorithm::HS256 => JwtAlg::HS256,
            Algorithm::RS256 => JwtAlg::RS256,
            Algorithm::ES256 => JwtAlg::ES256,
            other => return Err(format!("the algorithm {other:?} is not accepted")),
        };
        let validation = &self.validations.iter().find(|(a, _)| *a == alg).expect("one validation per algorithm").1;
        let fits = |k: &Key| k.alg == alg && (head.kid.is_none() || k.kid.is_none() || k.kid == head.kid);
        let mut tried = false;
        let attempt = |keys: &mut dyn Iterator<Item = &Key>, tried: &mut bool| -> Option<Result<Map<String, Value>, String>> {
            let mut last = None;
            for k in keys.filter(|k| fits(k)) {
                *tried = true;
                match jsonwebtoken::decode::<Map<String, Value>>(token, &k.key, validation) {
                    Ok(data) => return Some(self.required_claims(&data.claims).map(|()| data.claims)),
                    Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::InvalidSignature) => last = Some(describe(&e)),
                    Err(e) => return Some(Err(describe(&e))),
                }
            }
            last.map(Err)
        };
        if let Some(r) = attempt(&mut self.keys.iter(), &mut tried) {
            if r.is_ok() || self.jwks.get().is_none() {
                return r;
            }
        }
        if let Some(jwks) = self.jwks.get() {
            let keys = jwks.current(self.jwks_refresh).await;
            let known = head.kid.as_ref().is_none_or(|kid| keys.iter().any(|k| k.kid.as_ref() == Some(kid)));
            let keys = if known { keys } else { jwks.refetch().await };
            if let Some(r) = attempt(&mut keys.iter(), &mut tried) {
                return r;
            }
        }
        Err(if tried {
            "the token's signature does not verify".into()
        } else {
            match &head.kid {
                Some(kid) => format!("no {alg:?} key with kid {kid:?} is known"),
                None => format!("no {alg:?} key is known"),
            }
        })
    }

    /// A configured issuer or audience must be present and of the right type: `iss` a string,
    /// `aud` a string or a list of strings (a missing or null claim is not a pass).
    fn required_claims(&self, claims: &Map<String, Value>) -> Result<(), String> {
        if let Some(iss) = &self.issuer {
            match claims.get("iss") {
                Some(Value::String(s)) if s == iss => {}
                Some(Value::String(_)) => return Err("the token's issuer is not accepted".into()),
                Some(_) => return Err("the token's issuer (iss) is not a string".into()),
                None => return Err("the token has no issuer (iss)".into()),
            }
        }
        if !self.audiences.is_empty() {
            let ok = match claims.get("aud") {
                Some(Value::String(a)) => self.audiences.contains(a),
                Some(Value::Array(list)) => {
                    if !list.iter().all(Value::is_string) {
                        return Err("the token's audience (aud) is not a list of strings".into());
                    }
                    list.iter().filter_map(Value::as_str).any(|a| self.audiences.iter().any(|x| x == a))
                }
                None | Some(Value::Null) => return Err("the token has no audience (aud)".into()),
                Some(_) => return Err("the token's audience (aud) is not a string".into()),
            };
            if !ok {
                return Err("the token's audience is not accepted".into());
            }
        }
        Ok(())
    }

    fn identity(&self, claims: &Map<String, Value>) -> Identity {
        let consumer = claims.get(&self.consumer_claim).and_then(Value::as_str).map(str::to_string);
        // OAuth: `scope` is a space-separated string, `scp` often a list.
        let scopes: Vec<String> = match claims.get("scope").or_else(|| claims.get("scp")) {
            Some(Value::String(s)) => s.split(' ').filter(|s| !s.is_empty()).map(str::to_string).collect(),
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_string).collect(),
            _ => vec![],
        };
        let headers = self
            .claims_to_headers
            .iter()
            .filter_map(|(claim, h)| {
                let v = match claims.get(claim)? {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => return None,
                };
                Some((h.clone(), HeaderValue::from_str(&v).ok()?))
            })
            .collect();
        Identity { consumer, scopes, headers }
    }
}

/// A JWKS document, fetched on first use, refreshed when older than the route's refresh period
/// (one request fetches, the others keep using the keys they have) and when a token names a
/// `kid` it does not hold (at most once per [`JWKS_MIN_REFETCH`]). A failed fetch keeps the last
/// good keys.
#[derive(Debug)]
pub struct Jwks {
    pub url: String,
    keys: ArcSwap<Vec<Key>>,
    fetched: parking_lot::Mutex<Option<Instant>>,
    fetching: tokio::sync::Mutex<()>,
    pub fetches: std::sync::atomic::AtomicU64,
    /// Bumped whenever a fetch brings keys (cached verifications of older generations lapse).
    generation: std::sync::atomic::AtomicU64,
}

impl Jwks {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_string(),
            keys: ArcSwap::from_pointee(vec![]),
            fetched: parking_lot::Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
            fetches: Default::default(),
            generation: Default::default(),
        }
    }

    fn stale(&self, refresh: Duration) -> bool {
        self.fetched.lock().is_none_or(|t| t.elapsed() >= refresh)
    }

    async fn current(&self, refresh: Duration) -> Arc<Vec<Key>> {
        let last = *self.fetched.lock();
        match last {
            None => self.fetch_single(None).await,
            Some(t) if t.elapsed() >= refresh => match self.fetching.try_lock() {
                Ok(_g) => self.fetch_now().await,
                Err(_) => self.keys.load_full(),
            },
            Some(_) => self.keys.load_full(),
        }
    }

    async fn refetch(&self) -> Arc<Vec<Key>> {
        self.fetch_single(Some(JWKS_MIN_REFETCH)).await
    }

    /// Fetches unless another caller just did (or is doing it); either way returns the newest keys.
    async fn fetch_single(&self, min_age: Option<Duration>) -> Arc<Vec<Key>> {
        let before = *self.fetched.lock();
        let _g = self.fetching.lock().await;
        let now = *self.fetched.lock();
        let fresh_enough = match (now, min_age) {
            (Some(t), Some(min)) => t.elapsed() < min,
            _ => false,
        };
        if now != before || fresh_enough {
            return self.keys.load_full();
        }
        self.fetch_now().await
    }

    async fn fetch_now(&self) -> Arc<Vec<Key>> {
        self.fetches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Boxed: the HTTP client's state is large, and inline it would be part of every JWT
        // route's request future, though a fetch is rare.
        let result = tokio::time::timeout(JWKS_FETCH_TIMEOUT, Box::pin(zhili_net::client::get(&self.url, JWKS_MAX_BYTES))).await;
        *self.fetched.lock() = Some(Instant::now());
        match result.map_err(|_| format!("no answer within {JWKS_FETCH_TIMEOUT:?}")).and_then(|r| r).and_then(|b| parse_jwks(&b)) {
            Ok(keys) => {
                tracing::info!(url = %self.url, keys = keys.len(), "JWKS loaded");
                self.keys.store(Arc::new(keys));
                self.generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            }
            Err(e) => tracing::warn!(url = %self.url, error = %e, "JWKS fetch failed; keeping the last keys"),
        }
        self.keys.load_full()
    }
}

/// The usable keys of a JWKS document (RSA and P-256 signing keys; others are skipped).
fn parse_jwks(body: &Bytes) -> Result<Vec<Key>, String> {
    use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
    // Parsed leniently key by key: one key of an unknown type must not hide the others.
    let doc: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let list = doc.get("keys").and_then(Value::as_array).ok_or("no \"keys\" array")?;
    let mut out = vec![];
    for raw in list {
        let Ok(set) = serde_json::from_value::<JwkSet>(serde_json::json!({"keys": [raw]})) else { continue };
        let Some(jwk) = set.keys.into_iter().next() else { continue };
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
            (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => JwtAlg::RS256,
            (AlgorithmParameters::EllipticCurve(p), None | Some(KeyAlgorithm::ES256)) if p.curve == EllipticCurve::P256 => JwtAlg::ES256,
            _ => continue,
        };
        match DecodingKey::from_jwk(&jwk) {
            Ok(key) => out.push(Key { kid: jwk.common.key_id.clone(), alg, key }),
            Err(e) => tracing::warn!(kid = ?jwk.common.key_id, error = %e, "JWKS key skipped"),
        }
    }
    Ok(out)
}

/// The subject common name of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    use simple_asn1::{oid, ASN1Block};
    let blocks = simple_asn1::from_der(der).ok()?;
    let ASN1Block::Sequence(_, cert) = blocks.first()? else { return None };
    let ASN1Block::Sequence(_, tbs) = cert.first()? else { return None };
    // tbsCertificate: [0] version (optional), serial, signature, issuer, validity, subject, ...
    let skip = usize::from(matches!(tbs.first()?, ASN1Block::Explicit(..) | ASN1Block::Unknown(..)));
    let ASN1Block::Sequence(_, subject) = tbs.get(skip + 4)? else { return None };
    let cn = oid!(2, 5, 4, 3);
    // Every CN attribute of the subject: a subject with two is ambiguous and names nobody.
    let mut names = subject.iter().flat_map(|rdn| match rdn {
        ASN1Block::Set(_, attrs) => attrs.iter().collect::<Vec<_>>(),
        _ => Vec::new(),
    });
    let mut found = None;
    for a in names.by_ref() {
        let ASN1Block::Sequence(_, kv) = a else { continue };
        let (Some(ASN1Block::ObjectIdentifier(_, o)), Some(value)) = (kv.first(), kv.get(1)) else { continue };
        if *o != cn {
            continue;
        }
        let (ASN1Block::UTF8String(_, s) | ASN1Block::PrintableString(_, s) | ASN1Block::IA5String(_, s)) = value else { return None };
        if found.is_some() {
            return None;
        }
        found = Some(s.clone());
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs_auth(extra: &str) -> Auth {
        let spec: AuthSpec = serde_json::from_str(&format!(
            r#"{{"jwt": {{"keys": [{{"alg": "HS256", "secret": "0123456789abcdef0123456789abcdef"}}], "issuer": "me", "audiences": ["api"],
                "claims_to_headers": {{"sub": "x-user"}}}}{extra}}}"#
        ))
        .unwrap();
        compile(&spec).unwrap()
    }

    #[tokio::test]
    async fn unknown_critical_header_extensions_are_refused() {
        let a = hs_auth("");
        let claims = serde_json::json!({"sub": "a", "iss": "me", "aud": "api", "exp": now() + 60});
        // jsonwebtoken's Header has no `crit`; build the header by hand and sign it.
        use base64::Engine;
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let head = b64(br#"{"alg":"HS256","crit":["exp-ext"],"exp-ext":1}"#);
        let body = b64(claims.to_string().as_bytes());
        let signing = format!("{head}.{body}");
        let sig =
            jsonwebtoken::crypto::sign(signing.as_bytes(), &jsonwebtoken::EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"), Algorithm::HS256)
                .unwrap();
        match check(&a, &format!("{signing}.{sig}")).await {
            Err(Denied::Unauthorized(m)) => assert!(m.contains("crit"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    fn token(claims: Value, secret: &str) -> String {
        jsonwebtoken::encode(&jsonwebtoken::Header::new(Algorithm::HS256), &claims, &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes())).unwrap()
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    async fn check(a: &Auth, bearer: &str) -> Result<Arc<Identity>, Denied> {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {bearer}")).unwrap());
        let uri: Uri = "/x".parse().unwrap();
        a.check(&Presented { headers: &h, uri: &uri, client_cn: None }, &Consumers::default()).await
    }

    #[tokio::test]
    async fn hs256_tokens_are_checked_claim_by_claim() {
        let a = hs_auth("");
        let good = serde_json::json!({"sub": "alice", "iss": "me", "aud": "api", "exp": now() + 60});
        let id = check(&a, &token(good.clone(), "0123456789abcdef0123456789abcdef")).await.unwrap();
        assert_eq!(id.consumer.as_deref(), Some("alice"));
        assert_eq!(id.headers[0].1, "alice");
        // Verified once, then served from the cache; a token differing in one byte is not.
        assert_eq!(a.jwt.as_ref().unwrap().cache.lock().len(), 1);
        let again = check(&a, &token(good.clone(), "0123456789abcdef0123456789abcdef")).await.unwrap();
        assert!(Arc::ptr_eq(&id, &again));
        let mut forged = token(good.clone(), "0123456789abcdef0123456789abcdef");
        forged.push('A');
        assert!(matches!(check(&a, &forged).await, Err(Denied::Unauthorized(_))));
        for (claims, secret, want) in [
            (serde_json::json!({"sub": "a", "iss": "me", "aud": "api", "exp": now() - 120}), "0123456789abcdef0123456789abcdef", "expired"),
            (serde_json::json!({"sub": "a", "iss": "you", "aud": "api", "exp": now() + 60}), "0123456789abcdef0123456789abcdef", "issuer"),
            (serde_json::json!({"sub": "a", "iss": "me", "aud": "web", "exp": now() + 60}), "0123456789abcdef0123456789abcdef", "audience"),
            (
                serde_json::json!({"sub": "a", "iss": "me", "aud": "api", "exp": now() + 600, "nbf": now() + 300}),
                "0123456789abcdef0123456789abcdef",
                "not valid yet",
            ),
            (serde_json::json!({"sub": "a", "iss": "me", "aud": "api"}), "0123456789abcdef0123456789abcdef", "exp"),
            (serde_json::json!({"sub": "a", "iss": "me", "exp": now() + 60}), "0123456789abcdef0123456789abcdef", "no audience"),
            (serde_json::json!({"sub": "a", "iss": "me", "aud": null, "exp": now() + 60}), "0123456789abcdef0123456789abcdef", "audience"),
            (serde_json::json!({"sub": "a", "aud": "api", "exp": now() + 60}), "0123456789abcdef0123456789abcdef", "no issuer"),
            (serde_json::json!({"sub": "a", "iss": ["me"], "aud": "api", "exp": now() + 60}), "0123456789abcdef0123456789abcdef", "issuer"),
            (serde_json::json!({"sub": "a", "iss": "me", "aud": ["web", 5], "exp": now() + 60}), "0123456789abcdef0123456789abcdef", "audience"),
            (good.clone(), "another-secret-another-secret-xx", "signature"),
        ] {
            match check(&a, &token(claims, secret)).await {
                Err(Denied::Unauthorized(m)) => assert!(m.contains(want), "{m} should say {want}"),
                other => panic!("{other:?}"),
            }
        }
        match check(&a, "not.a.token").await {
            Err(Denied::Unauthorized(m)) => assert!(m.contains("malformed"), "{m}"),
            other => panic!("{other:?}"),
        }
        // alg "none" is never accepted.
        let none = format!("{}.{}.", "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0", "eyJzdWIiOiJhIn0");
        assert!(matches!(check(&a, &none).await, Err(Denied::Unauthorized(_))));
    }

    #[tokio::test]
    async fn scopes_and_consumers_answer_403() {
        let a = hs_auth(r#", "consumers": ["alice"], "scopes": ["orders:read"]"#);
        let claims = |sub: &str, scope: &str| serde_json::json!({"sub": sub, "iss": "me", "aud": "api", "exp": now() + 60, "scope": scope});
        let s = "0123456789abcdef0123456789abcdef";
        assert!(check(&a, &token(claims("alice", "orders:read orders:write"), s)).await.is_ok());
        assert!(matches!(check(&a, &token(claims("bob", "orders:read"), s)).await, Err(Denied::Forbidden(m)) if m.contains("bob")));
        assert!(matches!(check(&a, &token(claims("alice", "orders:write"), s)).await, Err(Denied::Forbidden(m)) if m.contains("orders:read")));
    }

    #[test]
    fn hidden_credentials_leave_nothing_behind() {
        let spec: AuthSpec = serde_json::from_str(
            r#"{"api_key": {"query": "apikey"}, "jwt": {"keys": [{"alg": "HS256", "secret": "0123456789abcdef0123456789abcdef"}],
                "query": "token", "cookie": "jwt"}, "hide_credentials": true}"#,
        )
        .unwrap();
        let a = compile(&spec).unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        h.insert("x-api-key", HeaderValue::from_static("k"));
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; jwt=secret; b=2"));
        let q = a.hide(Some("x=1&apikey=k&token=t&api%6Bey=k2&y=2"), &mut h);
        assert_eq!(q.as_deref(), Some("x=1&y=2"));
        assert!(!h.contains_key(header::AUTHORIZATION) && !h.contains_key("x-api-key"));
        assert_eq!(h.get(header::COOKIE).unwrap(), "a=1; b=2");
        assert_eq!(crate::target::percent_decode("a%2Bb+c%zz%4"), "a+b c%zz%4");
    }

    #[test]
    fn common_name_of_a_certificate() {
        // openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/O=Zhili/CN=svc-a" -days 3650
        let pem = "-----BEGIN CERTIFICATE-----
MIIBlTCCATugAwIBAgIUP/FLSukEFPmQFIBt1/a7GEQ9hvEwCgYIKoZIzj0EAwIw
IDEOMAwGA1UECgwFWmhpbGkxDjAMBgNVBAMMBXN2Yy1hMB4XDTI2MTEyMzExMzc0
OVoXDTM2MTEyMDExMzc0OVowIDEOMAwGA1UECgwFWmhpbGkxDjAMBgNVBAMMBXN2
Yy1hMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEdyLCo7z9rvWKSQYYvnqK+Cmz
4BLccY6zQWRhqoJ5QGMXntUNtzNzBb9KwPIZdKC4WxKTeGLrqyCCW+/YBnbzDqNT
MFEwHQYDVR0OBBYEFOnQMIm2YzfQ+uWmTm0x1UN6+cVqMB8GA1UdIwQYMBaAFOnQ
MIm2YzfQ+uWmTm0x1UN6+cVqMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwID
SAAwRQIhAKv7GVpSLunepOnjAs6gQeVUup9zuv2tHerBvlipJbbxAiB83gpRda+y
FAwN5nQWlekgBpD2pt54KE7+dlR4NFqxAQ==
-----END CERTIFICATE-----";
        let der = rustls_pemfile::certs(&mut pem.as_bytes()).next().unwrap().unwrap();
        assert_eq!(common_name(&der).as_deref(), Some("svc-a"));
    }
}
