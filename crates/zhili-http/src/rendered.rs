//! Rendered answers cached per service index: the hot discovery reads of compatibility clients
//! (Consul's health query, Nacos's instance list) are served as stored bytes while the service
//! has not changed, instead of copying its instances and rendering JSON on every call. The
//! index covers every field an answer shows, so an entry is valid exactly while it matches.

use std::collections::HashMap;
use std::hash::Hash;

use bytes::Bytes;

/// Entries kept at most; past this the cache starts over (services come and go).
pub const RENDERED_MAX: usize = 4096;

/// Answers by key (what the query asked), each with the service index it was rendered at.
pub struct RenderCache<K> {
    entries: std::sync::Mutex<HashMap<K, (u64, Bytes)>>,
}

impl<K> Default for RenderCache<K> {
    fn default() -> Self {
        Self { entries: std::sync::Mutex::default() }
    }
}

impl<K: Hash + Eq> RenderCache<K> {
    /// The answer for `key` if it was rendered at `index`.
    pub fn get<Q: Hash + Eq + ?Sized>(&self, key: &Q, index: u64) -> Option<Bytes>
    where
        K: std::borrow::Borrow<Q>,
    {
        let m = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        m.get(key).filter(|(i, _)| *i == index).map(|(_, b)| b.clone())
    }

    pub fn put(&self, key: K, index: u64, body: Bytes) {
        let mut m = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= RENDERED_MAX && !m.contains_key(&key) {
            m.clear();
        }
        m.insert(key, (index, body));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_answers_only_at_its_index_and_the_cache_stays_bounded() {
        let c = RenderCache::default();
        c.put("a", 3, Bytes::from_static(b"x"));
        assert_eq!(c.get(&"a", 3), Some(Bytes::from_static(b"x")));
        assert_eq!(c.get(&"a", 4), None);
        assert_eq!(c.get(&"b", 3), None);
        let c = RenderCache::default();
        for i in 0..=RENDERED_MAX {
            c.put(i, 1, Bytes::new());
        }
        assert!(c.entries.lock().unwrap().len() <= RENDERED_MAX);
        assert_eq!(c.get(&RENDERED_MAX, 1), Some(Bytes::new()));
    }
}
