//! Rendered answers cached per service index: the hot discovery reads of compatibility clients
//! (Consul's health query, Nacos's instance list) are served as stored bytes while the service
//! has not changed, instead of copying its instances and rendering JSON on every call. The
//! index covers every field an answer shows, so an entry is valid exactly while it matches.

use std::collections::HashMap;
use std::hash::Hash;

use bytes::Bytes;

/// Entries kept at most; past this the cache starts over (services come and go).
pub const RENDERED_MAX: usize = 4096;
/// Bytes of answers kept at most. Keys carry what the query asked (clusters, tags, filters), so
/// a reader could otherwise fill thousands of entries with renderings of one large service;
/// past this the cache starts over, and an answer larger than it is not kept at all.
pub const RENDERED_MAX_BYTES: usize = 64 * 1024 * 1024;

/// Answers by key (what the query asked), each with the service index it was rendered at.
pub struct RenderCache<K> {
    entries: std::sync::Mutex<Entries<K>>,
}

struct Entries<K> {
    map: HashMap<K, (u64, Bytes)>,
    /// The sum of the answers' lengths.
    bytes: usize,
}

impl<K> Default for RenderCache<K> {
    fn default() -> Self {
        Self { entries: std::sync::Mutex::new(Entries { map: HashMap::new(), bytes: 0 }) }
    }
}

impl<K: Hash + Eq> RenderCache<K> {
    /// The answer for `key` if it was rendered at `index`.
    pub fn get<Q: Hash + Eq + ?Sized>(&self, key: &Q, index: u64) -> Option<Bytes>
    where
        K: std::borrow::Borrow<Q>,
    {
        let e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        e.map.get(key).filter(|(i, _)| *i == index).map(|(_, b)| b.clone())
    }

    pub fn put(&self, key: K, index: u64, body: Bytes) {
        if body.len() > RENDERED_MAX_BYTES {
            return;
        }
        let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, old)) = e.map.remove(&key) {
            e.bytes -= old.len();
        }
        if e.map.len() >= RENDERED_MAX || e.bytes + body.len() > RENDERED_MAX_BYTES {
            e.map.clear();
            e.bytes = 0;
        }
        e.bytes += body.len();
        e.map.insert(key, (index, body));
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
        assert!(c.entries.lock().unwrap().map.len() <= RENDERED_MAX);
        assert_eq!(c.get(&RENDERED_MAX, 1), Some(Bytes::new()));
    }

    #[test]
    fn the_cache_holds_a_bounded_number_of_bytes() {
        let c = RenderCache::default();
        let quarter = Bytes::from(vec![b'x'; RENDERED_MAX_BYTES / 4]);
        for i in 0..4 {
            c.put(i, 1, quarter.clone());
        }
        assert_eq!(c.entries.lock().unwrap().bytes, RENDERED_MAX_BYTES, "four quarters fit");
        // The same key again replaces its own bytes instead of adding to them.
        c.put(3, 2, quarter.clone());
        assert_eq!(c.get(&0, 1), Some(quarter.clone()), "a replacement starts nothing over");
        // One more does not fit: the cache starts over with it.
        c.put(4, 1, quarter.clone());
        let e = c.entries.lock().unwrap();
        assert_eq!((e.map.len(), e.bytes), (1, RENDERED_MAX_BYTES / 4));
        drop(e);
        assert_eq!(c.get(&4, 1), Some(quarter));
        // An answer larger than the whole budget is served but never kept.
        c.put(5, 1, Bytes::from(vec![b'y'; RENDERED_MAX_BYTES + 1]));
        assert_eq!(c.get(&5, 1), None);
        assert_eq!(c.get(&4, 1).map(|b| b.len()), Some(RENDERED_MAX_BYTES / 4), "and does not evict what is kept");
    }
}
