//! Arbitrary JSON for property tests of parsers that read untrusted bodies: any shape, nested a
//! few levels, with object keys drawn mostly from the field names the parser looks for (so the
//! generated values reach past the first "unknown field" and into the parser's corners).

use proptest::prelude::*;
use serde_json::{Map, Value};

/// Any JSON value; objects use `keys` (and some random keys) as field names.
pub fn arbitrary_json(keys: &'static [&'static str]) -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        "\\PC{0,24}".prop_map(Value::String),
        // Strings that look like what the fields hold: durations, addresses, ids, base64.
        prop::sample::select(vec!["10s", "0", "-1", "1.5h", "127.0.0.1", "10.0.0.1:80", "a/b", "", "dGVzdA==", "passing", "get-tree", "set"])
            .prop_map(|s| Value::String(s.to_string())),
    ];
    let key = prop_oneof![4 => prop::sample::select(keys.to_vec()).prop_map(str::to_string), 1 => "[a-zA-Z_]{1,8}"];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..8).prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<String, Value>>())),
        ]
    })
    .boxed()
}
