//! CORS per route: the gateway answers preflights itself and adds `Access-Control-*` headers to
//! answers for allowed origins.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use zhili_model::route::CorsSpec;

#[derive(Debug)]
pub struct Cors {
    any_origin: bool,
    origins: Vec<String>,
    methods: HeaderValue,
    headers: Option<HeaderValue>,
    expose: Option<HeaderValue>,
    max_age: HeaderValue,
    credentials: bool,
}

fn joined(list: &[String]) -> Option<HeaderValue> {
    (!list.is_empty()).then(|| HeaderValue::from_str(&list.join(", ")).ok()).flatten()
}

impl Cors {
    pub fn new(spec: &CorsSpec) -> Self {
        let methods = if spec.allow_methods.is_empty() {
            HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE")
        } else {
            joined(&spec.allow_methods).expect("validated")
        };
        Self {
            any_origin: spec.allow_origins.iter().any(|o| o == "*"),
            origins: spec.allow_origins.clone(),
            methods,
            headers: joined(&spec.allow_headers),
            expose: joined(&spec.expose_headers),
            max_age: HeaderValue::from(spec.max_age.unwrap_or(600)),
            credentials: spec.allow_credentials,
        }
    }

    fn allowed<'a>(&self, origin: &'a HeaderValue) -> Option<&'a HeaderValue> {
        let o = origin.to_str().ok()?;
        (self.any_origin || self.origins.iter().any(|a| a == o)).then_some(origin)
    }

    fn origin_headers(&self, origin: &HeaderValue, h: &mut HeaderMap) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, if self.any_origin && !self.credentials { HeaderValue::from_static("*") } else { origin.clone() });
        h.append(header::VARY, HeaderValue::from_static("Origin"));
        if self.credentials {
            h.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
        }
    }

    /// The answer to a preflight (`OPTIONS` with `Access-Control-Request-Method`), if this is one:
    /// 204 with the allowances, or 403 for an origin or method that is not allowed.
    pub fn preflight(&self, method: &Method, req: &HeaderMap) -> Option<Result<HeaderMap, (StatusCode, String)>> {
        if method != Method::OPTIONS {
            return None;
        }
        let wanted = req.get(header::ACCESS_CONTROL_REQUEST_METHOD)?;
        let origin = req.get(header::ORIGIN)?;
        let Some(origin) = self.allowed(origin) else {
            return Some(Err((StatusCode::FORBIDDEN, format!("origin {origin:?} is not allowed"))));
        };
        let method_ok = wanted.to_str().is_ok_and(|w| self.methods.to_str().is_ok_and(|all| all.split(", ").any(|m| m == w)));
        if !method_ok {
            return Some(Err((StatusCode::FORBIDDEN, format!("method {wanted:?} is not allowed cross-origin"))));
        }
        let mut h = HeaderMap::new();
        self.origin_headers(origin, &mut h);
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, self.methods.clone());
        let headers = self.headers.clone().or_else(|| req.get(header::ACCESS_CONTROL_REQUEST_HEADERS).cloned());
        if let Some(v) = headers {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
        }
        h.insert(header::ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        Some(Ok(h))
    }

    /// Headers for an ordinary answer to a request from `origin`.
    pub fn decorate(&self, origin: Option<&HeaderValue>, resp: &mut HeaderMap) {
        let Some(origin) = origin.and_then(|o| self.allowed(o)) else { return };
        self.origin_headers(origin, resp);
        if let Some(e) = &self.expose {
            resp.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, e.clone());
        }
    }
}
