//! Instance metadata kept compact. A registry holds one metadata map per instance, a million of
//! them on a large node, and most hold one to five entries: a `BTreeMap` spends a whole
//! 11-slot node (≈ 540 bytes) on even one entry, the largest part of an instance record. This
//! map is its sorted entries in one exactly-sized allocation, with the same JSON form (an
//! object) and the same reads (`get`, sorted iteration).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// String → string metadata: sorted by key, each key once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Metadata(Box<[(String, String)]>);

impl Metadata {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, key: &str) -> Option<&String> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(key)).ok().and_then(|i| self.0.get(i)).map(|(_, v)| v)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&String, &String)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn keys(&self) -> impl ExactSizeIterator<Item = &String> {
        self.0.iter().map(|(k, _)| k)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sets `key` (a rebuild: metadata is written rarely and read often).
    pub fn insert(&mut self, key: String, value: String) -> Option<String> {
        let mut map = self.to_map();
        let old = map.insert(key, value);
        *self = map.into();
        old
    }

    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.0.iter().cloned().collect()
    }
}

impl From<BTreeMap<String, String>> for Metadata {
    fn from(map: BTreeMap<String, String>) -> Self {
        Self(map.into_iter().collect())
    }
}

impl<const N: usize> From<[(String, String); N]> for Metadata {
    fn from(pairs: [(String, String); N]) -> Self {
        BTreeMap::from(pairs).into()
    }
}

/// The last value of a repeated key wins, as in a map.
impl FromIterator<(String, String)> for Metadata {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        iter.into_iter().collect::<BTreeMap<_, _>>().into()
    }
}

impl<'a> IntoIterator for &'a Metadata {
    type Item = (&'a String, &'a String);
    type IntoIter = std::iter::Map<std::slice::Iter<'a, (String, String)>, fn(&'a (String, String)) -> (&'a String, &'a String)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl Serialize for Metadata {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        BTreeMap::<String, String>::deserialize(d).map(Self::from)
    }
}

impl schemars::JsonSchema for Metadata {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        <BTreeMap<String, String>>::schema_name()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        <BTreeMap<String, String>>::json_schema(generator)
    }
}

#[cfg(test)]
mod tests {
    use super::Metadata;

    #[test]
    fn sorted_map_semantics_in_one_allocation() {
        let m: Metadata = [("b".to_string(), "2".to_string()), ("a".to_string(), "1".to_string()), ("b".to_string(), "3".to_string())].into_iter().collect();
        assert_eq!(m.len(), 2);
        assert_eq!(m.get("a").map(String::as_str), Some("1"));
        assert_eq!(m.get("b").map(String::as_str), Some("3"), "the last value of a key wins");
        assert_eq!(m.get("c"), None);
        assert_eq!(m.keys().map(String::as_str).collect::<Vec<_>>(), ["a", "b"]);
        let mut m2 = m.clone();
        assert_eq!(m2.insert("0".into(), "z".into()), None);
        assert_eq!(m2.insert("a".into(), "y".into()), Some("1".into()));
        assert_eq!(m2.keys().map(String::as_str).collect::<Vec<_>>(), ["0", "a", "b"]);
        assert!(Metadata::new().is_empty());
    }

    #[test]
    fn json_is_an_object() {
        let m: Metadata = serde_json::from_str(r#"{"z": "1", "a": "2"}"#).unwrap();
        assert_eq!(serde_json::to_string(&m).unwrap(), r#"{"a":"2","z":"1"}"#);
        assert!(serde_json::from_str::<Metadata>(r#"{"a": 1}"#).is_err(), "values are strings");
        assert!(serde_json::from_str::<Metadata>("[]").is_err());
    }
}
