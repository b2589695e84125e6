//! Nacos config over the KV store: `/nacos/v1/cs/configs` (+ the long-poll listener) and
//! `/nacos/v2/cs/config`. Shared with the gRPC config requests.

use std::collections::HashSet;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::broadcast;
use zhili_model::acl::{Access, Resource};

use super::{bad, config_key, header_str, md5_hex, text, v2_ok, NResult, NacosError, Params};
use crate::NacosState;
use zhili_http::auth::Caller;
use zhili_http::error::ApiError;

/// `Long-Pulling-Timeout` is capped so a client cannot park a request for ever.
const MAX_LONG_POLL: Duration = Duration::from_secs(120);
const DEFAULT_LONG_POLL: Duration = Duration::from_secs(30);
/// Configs one long-poll may watch.
const MAX_LISTENING: usize = 3000;
const CONTENT_MD5: HeaderName = HeaderName::from_static("content-md5");
const WORD: char = '\u{2}';
const LINE: char = '\u{1}';

pub(super) fn routes() -> Router<NacosState> {
    Router::new()
        .route("/nacos/v1/cs/configs", get(get_v1).post(publish_v1).delete(delete_v1))
        .route("/nacos/v1/cs/configs/listener", post(listener))
        .route("/nacos/v2/cs/config", get(get_v2).post(publish_v2).delete(delete_v2))
}

pub(super) struct ConfigItem {
    /// The content as stored (written through Nacos it is UTF-8; through the KV API, any bytes).
    pub value: Bytes,
    /// The content's md5 in lowercase hex.
    pub md5: Bytes,
    pub last_modified: u64,
}

impl ConfigItem {
    pub fn content(&self) -> String {
        String::from_utf8_lossy(&self.value).into_owned()
    }

    pub fn md5(&self) -> &str {
        std::str::from_utf8(&self.md5).unwrap_or_default()
    }
}

/// A config as the caller may read it. The md5 is computed once per stored version (the
/// cache is keyed by the key's modify index, so a changed config is never answered with an
/// old md5).
pub(super) fn read(s: &NacosState, caller: &Caller, key: &str) -> Result<Option<ConfigItem>, ApiError> {
    caller.require(Resource::Kv, key, Access::Read)?;
    let Some((value, index)) = s.kv.get_value(key)? else { return Ok(None) };
    let md5 = s.config_md5s.get(key, index).unwrap_or_else(|| {
        let md5 = Bytes::from(md5_hex(&value));
        s.config_md5s.put(key.to_string(), index, md5.clone());
        md5
    });
    Ok(Some(ConfigItem { value, md5, last_modified: index }))
}

/// Publishes a config; with `cas_md5`, only when the current content still has that md5.
pub(super) async fn publish(s: &NacosState, caller: &Caller, key: &str, content: &str, cas_md5: Option<&str>) -> Result<bool, ApiError> {
    caller.require(Resource::Kv, key, Access::Write)?;
    if content.is_empty() {
        return Err(ApiError::BadRequest("Param 'content' is required".into()));
    }
    let cas = match cas_md5 {
        None => None,
        Some(want) => match s.kv.get(key)? {
            Some(e) if md5_hex(&e.value) == want => Some(e.modify_index),
            _ => return Ok(false),
        },
    };
    let (applied, _) = s.kv.put(key, Bytes::copy_from_slice(content.as_bytes()), 0, cas, None, None).await?;
    Ok(applied)
}

pub(super) async fn remove(s: &NacosState, caller: &Caller, key: &str) -> Result<(), ApiError> {
    caller.require(Resource::Kv, key, Access::Write)?;
    s.kv.delete(key, false, None).await?;
    Ok(())
}

fn key_of(p: &Params) -> NResult<String> {
    let tenant = p.get("tenant").or_else(|| p.get("namespaceId")).unwrap_or("");
    config_key(tenant, p.get("group").unwrap_or(""), p.required("dataId")?)
}

async fn get_v1(State(s): State<NacosState>, caller: Caller, p: Params) -> NResult<Response> {
    match read(&s, &caller, &key_of(&p)?)? {
        Some(c) => Ok((
            [
                (header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8")),
                (CONTENT_MD5, HeaderValue::from_maybe_shared(c.md5).map_err(|e| bad("md5", e))?),
            ],
            c.value,
        )
            .into_response()),
        None => Ok((axum::http::StatusCode::NOT_FOUND, "config data not exist").into_response()),
    }
}

async fn publish_v1(State(s): State<NacosState>, caller: Caller, p: Params) -> NResult<Response> {
    let key = key_of(&p)?;
    let ok = publish(&s, &caller, &key, p.get("content").unwrap_or(""), p.get("casMd5")).await?;
    Ok(text(ok.to_string()))
}

async fn delete_v1(State(s): State<NacosState>, caller: Caller, p: Params) -> NResult<Response> {
    remove(&s, &caller, &key_of(&p)?).await?;
    Ok(text("true"))
}

fn v2<T>(r: NResult<T>) -> NResult<T> {
    r.map_err(|e| NacosError { v2: true, ..e })
}

async fn get_v2(State(s): State<NacosState>, caller: Caller, p: Params) -> NResult<Response> {
    let key = v2(key_of(&p))?;
    match v2(read(&s, &caller, &key).map_err(NacosError::v1))? {
        Some(c) => Ok(v2_ok(Value::String(c.content()))),
        None => Err(NacosError { err: ApiError::NotFound("config data not exist".into()), v2: true }),
    }
}

async fn publish_v2(State(s): State<NacosState>, caller: Caller, p: Params) -> NResult<Response> {
    let key = v2(key_of(&p))?;
    let ok = v2(publish(&s, &caller, &key, p.get("content").unwrap_or(""), p.get("casMd5")).await.map_err(NacosError::v1))?;
    Ok(v2_ok(json!(ok)))
}

async fn delete_v2(State(s): State<NacosState>, caller: Caller, p: Params) -> NResult<Response> {
    let key = v2(key_of(&p))?;
    v2(remove(&s, &caller, &key).await.map_err(NacosError::v1))?;
    Ok(v2_ok(json!(true)))
}

/// One entry of `Listening-Configs`: `dataId ^2 group ^2 md5 [^2 tenant] ^1`.
struct Listening {
    key: String,
    data_id: String,
    group: String,
    tenant: String,
    md5: String,
}

fn parse_listening(spec: &str, default_tenant: &str) -> NResult<Vec<Listening>> {
    let mut out = vec![];
    for line in spec.split(LINE).filter(|l| !l.trim().is_empty()) {
        let parts: Vec<&str> = line.split(WORD).collect();
        let (&[data_id, group, md5] | &[data_id, group, md5, _]) = parts.as_slice() else {
            return Err(super::bad("Listening-Configs", format!("entry {line:?} is not dataId^2group^2md5[^2tenant]")));
        };
        let tenant = parts.get(3).copied().filter(|t| !t.is_empty()).unwrap_or(default_tenant);
        let key = config_key(tenant, group, data_id)?;
        out.push(Listening { key, data_id: data_id.into(), group: group.into(), tenant: tenant.into(), md5: md5.into() });
        if out.len() > MAX_LISTENING {
            return Err(super::bad("Listening-Configs", format!("at most {MAX_LISTENING} configs per request")));
        }
    }
    Ok(out)
}

/// Java's `URLEncoder`: what Nacos clients decode the listener answer with.
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => out.push(b as char),
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn changed(s: &NacosState, caller: &Caller, list: &[Listening]) -> NResult<Vec<usize>> {
    let mut out = vec![];
    for (n, l) in list.iter().enumerate() {
        let current = read(s, caller, &l.key)?;
        if current.as_ref().map_or("", ConfigItem::md5) != l.md5 {
            out.push(n);
        }
    }
    Ok(out)
}

/// `POST /nacos/v1/cs/configs/listener`: answers at once when a config differs from the client's
/// md5, else holds the request until one changes or `Long-Pulling-Timeout` runs out.
async fn listener(State(s): State<NacosState>, caller: Caller, headers: HeaderMap, p: Params) -> NResult<Response> {
    let list = parse_listening(p.required("Listening-Configs")?, p.get("tenant").unwrap_or(""))?;
    let timeout = match header_str(&headers, "long-pulling-timeout") {
        None => DEFAULT_LONG_POLL,
        Some(v) => Duration::from_millis(v.trim().parse::<u64>().map_err(|_| super::bad("Long-Pulling-Timeout", format!("{v:?} is not milliseconds")))?),
    }
    .min(MAX_LONG_POLL);
    let no_hangup = header_str(&headers, "long-pulling-timeout-no-hangup") == Some("true");
    // Subscribe before the first comparison so a change in between is not missed.
    let mut changes = s.nacos.config_changes();
    let mut found = changed(&s, &caller, &list)?;
    if found.is_empty() && !no_hangup {
        let keys: HashSet<&str> = list.iter().map(|l| l.key.as_str()).collect();
        // Answer a little before the client's own timeout, as Nacos does.
        let deadline = tokio::time::Instant::now() + timeout.saturating_sub(Duration::from_millis(500));
        loop {
            tokio::select! {
                ev = changes.recv() => match ev {
                    Ok(k) if !keys.contains(&*k) => continue,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        found = changed(&s, &caller, &list)?;
                        if !found.is_empty() {
                            break;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
    }
    let mut body = String::new();
    for l in found.into_iter().filter_map(|n| list.get(n)) {
        body.push_str(&l.data_id);
        body.push(WORD);
        body.push_str(&l.group);
        if !l.tenant.is_empty() {
            body.push(WORD);
            body.push_str(&l.tenant);
        }
        body.push(LINE);
    }
    Ok(text(url_encode(&body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// `Listening-Configs` in any shape (fields split by \u{2}, entries by \u{1}) parses or
        /// names the field; never a panic.
        #[test]
        fn arbitrary_listening_configs_never_panic(spec in "[a-zA-Z0-9./_\u{1}\u{2}-]{0,80}|\\PC{0,40}") {
            if let Err(e) = parse_listening(&spec, "") {
                proptest::prop_assert!(!e.err.detail().is_empty());
            }
        }
    }

    #[test]
    fn listening_configs_parse() {
        let l = parse_listening("a.yaml\u{2}G\u{2}abc\u{2}\u{1}b\u{2}DEFAULT_GROUP\u{2}\u{2}ns1\u{1}", "").unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!((l[0].key.as_str(), l[0].md5.as_str()), ("config/public/G/a.yaml", "abc"));
        assert_eq!(l[1].key, "config/ns1/DEFAULT_GROUP/b");
        assert!(parse_listening("only-one-field\u{1}", "").is_err());
        assert!(parse_listening("a\u{2}g/x\u{2}m\u{1}", "").is_err());
    }

    #[test]
    fn url_encoding_matches_java() {
        assert_eq!(url_encode("a.yaml\u{2}G\u{1}"), "a.yaml%02G%01");
        assert_eq!(url_encode("a b:c"), "a+b%3Ac");
    }
}
