//! Request extractors that turn malformed input into problem+json naming the field.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use zhili_model::{parse_duration, validate, DEFAULT_NAMESPACE};

use crate::error::ApiError;

/// Longest blocking wait a client may ask for (as Consul caps it).
pub const MAX_WAIT: Duration = Duration::from_secs(600);
/// Wait used when a client gives an index but no wait.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const MAX_QUERY_PAIRS: usize = 128;

/// A JSON body; parse errors (including unknown fields) become 400 with serde's message.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(format!("body: larger than the {} byte limit", crate::MAX_BODY))
            } else {
                ApiError::BadRequest(format!("body: {e}"))
            }
        })?;
        if bytes.is_empty() {
            return Err(ApiError::field("body", "a JSON object is required"));
        }
        // The error names the field it is about (`port: invalid type: ...`), not only a position.
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        serde_path_to_error::deserialize(de).map(JsonBody).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path.is_empty() || path == "." {
                ApiError::field("body", inner)
            } else {
                ApiError::field(&path, inner)
            }
        })
    }
}

/// The query string as ordered pairs (repeatable keys such as `tag` are kept).
#[derive(Debug, Default, Clone)]
pub struct QueryPairs(pub Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for QueryPairs {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let q = parts.uri.query().unwrap_or("");
        // Decoded leniently (a bad escape stays as it is, invalid UTF-8 becomes U+FFFD), and
        // refused as soon as there are too many pairs.
        let mut pairs = Vec::new();
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            if pairs.len() == MAX_QUERY_PAIRS {
                return Err(ApiError::field("query", format!("at most {MAX_QUERY_PAIRS} parameters")));
            }
            pairs.push((k.into_owned(), v.into_owned()));
        }
        Ok(Self(pairs))
    }
}

impl QueryPairs {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0.iter().filter(move |(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// `?flag`, `?flag=true` and `?flag=1` are true; `false`/`0` false; anything else is an error.
    pub fn flag(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some("" | "true" | "1" | "True") => Ok(Some(true)),
            Some("false" | "0" | "False") => Ok(Some(false)),
            Some(v) => Err(ApiError::field(key, format!("{v:?} is not a boolean"))),
        }
    }

    pub fn u64(&self, key: &str) -> Result<Option<u64>, ApiError> {
        self.get(key).map(|v| v.parse::<u64>().map_err(|_| ApiError::field(key, format!("{v:?} is not a non-negative integer")))).transpose()
    }

    pub fn namespace(&self) -> Result<String, ApiError> {
        let ns = self.get("namespace").unwrap_or(DEFAULT_NAMESPACE);
        validate::name("namespace", ns)?;
        Ok(ns.to_string())
    }

    /// `index` and `wait` of a blocking read. `None` when the read should not block.
    pub fn blocking(&self) -> Result<Option<(u64, Duration)>, ApiError> {
        let Some(index) = self.u64("index")? else {
            if self.get("wait").is_some() {
                // Validate anyway so a typo is not silently ignored.
                parse_duration("wait", self.get("wait").unwrap_or_default())?;
            }
            return Ok(None);
        };
        let wait = match self.get("wait") {
            Some(w) => parse_duration("wait", w)?.min(MAX_WAIT),
            None => DEFAULT_WAIT,
        };
        Ok(Some((index, wait)))
    }

    /// `meta.K=V` filters.
    pub fn metadata(&self) -> BTreeMap<String, String> {
        self.0.iter().filter_map(|(k, v)| k.strip_prefix("meta.").map(|k| (k.to_string(), v.clone()))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    async fn parse(query: &str) -> Result<QueryPairs, ApiError> {
        let (mut parts, _) = axum::http::Request::builder().uri(format!("/x?{query}")).body(()).map_err(|e| ApiError::BadRequest(e.to_string()))?.into_parts();
        QueryPairs::from_request_parts(&mut parts, &()).await
    }

    fn detail(e: ApiError) -> String {
        e.detail().to_string()
    }

    #[tokio::test]
    async fn blocking_parameters() {
        let q = parse("index=5&wait=2s&tag=a&tag=b&meta.env=prod").await.unwrap();
        assert_eq!(q.blocking().unwrap(), Some((5, Duration::from_secs(2))));
        assert_eq!(q.all("tag").collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(q.metadata().get("env").map(String::as_str), Some("prod"));
        assert_eq!(parse("index=5").await.unwrap().blocking().unwrap(), Some((5, DEFAULT_WAIT)));
        assert_eq!(parse("index=5&wait=1h").await.unwrap().blocking().unwrap(), Some((5, MAX_WAIT)), "waits are capped");
        assert_eq!(parse("").await.unwrap().blocking().unwrap(), None);
        assert!(detail(parse("index=-1").await.unwrap().blocking().unwrap_err()).starts_with("index:"));
        assert!(detail(parse("index=1&wait=x").await.unwrap().blocking().unwrap_err()).starts_with("wait:"));
        assert!(detail(parse("wait=x").await.unwrap().blocking().unwrap_err()).starts_with("wait:"), "a stray wait is still checked");
        assert!(detail(parse("namespace=a/b").await.unwrap().namespace().unwrap_err()).starts_with("namespace:"));
        assert!(detail(parse("recurse=yes").await.unwrap().flag("recurse").unwrap_err()).starts_with("recurse:"));
        assert_eq!(parse("recurse").await.unwrap().flag("recurse").unwrap(), Some(true));
        let many: String = (0..200).map(|i| format!("k{i}=v&")).collect();
        assert!(detail(parse(&many).await.unwrap_err()).starts_with("query:"));
        let at_limit: String = (0..MAX_QUERY_PAIRS).map(|i| format!("k{i}=v&")).collect();
        assert_eq!(parse(&at_limit).await.unwrap().0.len(), MAX_QUERY_PAIRS);
        assert!(parse(&format!("{at_limit}one=more")).await.is_err());
        let decoded = parse("a=%ZZ&b=x+y%21&c").await.unwrap();
        assert_eq!(decoded.0, [("a".into(), "%ZZ".into()), ("b".into(), "x y!".into()), ("c".into(), String::new())]);
    }

    proptest! {
        #[test]
        fn arbitrary_query_strings_never_panic(q in "[a-z=&%.0-9A-F+ ]{0,120}") {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                if let Ok(p) = parse(&q).await {
                    let _ = p.blocking();
                    let _ = p.namespace();
                    let _ = p.flag("healthy");
                    let _ = p.u64("cas");
                    let _ = p.metadata();
                }
            });
        }

        #[test]
        fn index_and_wait_are_accepted_or_named(index in "\\PC{0,12}", wait in "\\PC{0,12}") {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let q = QueryPairs(vec![("index".into(), index.clone()), ("wait".into(), wait.clone())]);
                match q.blocking() {
                    Ok(Some((i, w))) => {
                        prop_assert_eq!(index.parse::<u64>().ok(), Some(i));
                        prop_assert!(w <= MAX_WAIT);
                    }
                    Ok(None) => prop_assert!(false, "index was given"),
                    Err(e) => {
                        let d = detail(e);
                        prop_assert!(d.starts_with("index:") || d.starts_with("wait:"), "{}", d);
                    }
                }
                Ok(())
            })?;
        }
    }
}
