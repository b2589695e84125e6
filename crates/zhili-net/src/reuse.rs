//! Per-thread pools of what every request on the HTTP/1.1 path needs and drops again: write
//! buffers and header maps. A connection holds neither between requests (a long-polling client
//! costs no buffer), and a worker thread serving one request after another allocates none of
//! them per request: they go back cleared, with their capacity, and the next request takes them.
//! Oversized ones are not kept, and each pool is capped, so a burst leaves no lasting memory.

use std::cell::RefCell;

use http::HeaderMap;

/// Write buffers kept per thread, and the largest kept.
const BUFFERS: usize = 64;
const BUFFER_MAX: usize = 256 * 1024;
/// A new buffer's capacity: a typical answer head and body, or a request head.
const BUFFER_FIRST: usize = 4096;
/// Header maps kept per thread, and the most entries one may have room for to be kept.
const MAPS: usize = 32;
const MAP_MAX: usize = 128;

thread_local! {
    static SPARE_BUFFERS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    static SPARE_MAPS: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer: a spare one, or a new one of [`BUFFER_FIRST`] bytes.
pub fn buffer() -> Vec<u8> {
    SPARE_BUFFERS.try_with(|s| s.borrow_mut().pop()).ok().flatten().unwrap_or_else(|| Vec::with_capacity(BUFFER_FIRST))
}

/// Keeps `b` for the next [`buffer`] on this thread, unless it is large or enough are kept.
pub fn give_back_buffer(mut b: Vec<u8>) {
    if b.capacity() > BUFFER_MAX || b.capacity() == 0 {
        return;
    }
    b.clear();
    keep(&SPARE_BUFFERS, b, BUFFERS);
}

/// A buffer from this thread's pool that goes back to it when dropped.
pub struct Pooled(Vec<u8>);

impl Pooled {
    pub fn new() -> Self {
        Pooled(buffer())
    }
}

impl Default for Pooled {
    fn default() -> Self {
        Self::new()
    }
}

impl std::ops::Deref for Pooled {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        give_back_buffer(std::mem::take(&mut self.0));
    }
}

/// An empty header map with room for at least `entries`: a spare one that has the room, or a new
/// one (growing a smaller spare would cost more than making one to size).
pub fn header_map(entries: usize) -> HeaderMap {
    let spare = SPARE_MAPS.try_with(|s| {
        let mut s = s.borrow_mut();
        let fits = s.iter().rposition(|m| m.capacity() >= entries)?;
        Some(s.swap_remove(fits))
    });
    spare.ok().flatten().unwrap_or_else(|| HeaderMap::with_capacity(entries))
}

/// Keeps `m`, cleared, for the next [`header_map`] on this thread, unless it has room for many
/// entries or enough are kept.
pub fn give_back_map(mut m: HeaderMap) {
    if m.capacity() == 0 || m.capacity() > MAP_MAX {
        return;
    }
    m.clear();
    keep(&SPARE_MAPS, m, MAPS);
}

/// Puts `spare` in `pool` unless `most` are kept already (or the thread is ending).
fn keep<T: 'static>(pool: &'static std::thread::LocalKey<RefCell<Vec<T>>>, spare: T, most: usize) {
    let _ = pool.try_with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < most {
            s.push(spare);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn what_goes_back_comes_back_empty_with_its_room() {
        let mut m = header_map(8);
        assert!(m.capacity() >= 8);
        m.insert("a", HeaderValue::from_static("1"));
        let room = m.capacity();
        give_back_map(m);
        assert!(header_map(room + 1).capacity() > room, "a spare too small is not taken");
        let again = header_map(4);
        assert!(again.is_empty(), "a map comes back cleared");
        assert_eq!(again.capacity(), room, "and keeps its room");

        let mut b = buffer();
        b.extend_from_slice(b"answer");
        let room = b.capacity();
        give_back_buffer(b);
        let b = buffer();
        assert!(b.is_empty());
        assert_eq!(b.capacity(), room);

        let mut p = Pooled::new();
        p.extend_from_slice(b"request");
        let (at, room) = (p.as_ptr(), p.capacity());
        drop(p);
        let again = Pooled::new();
        assert!(again.is_empty() && again.capacity() == room && again.as_ptr() == at, "a dropped pooled buffer is the next one taken");
    }

    #[test]
    fn large_ones_and_a_surplus_are_not_kept() {
        let mut big = HeaderMap::with_capacity(4 * MAP_MAX);
        big.insert("a", HeaderValue::from_static("1"));
        give_back_map(big);
        assert!(header_map(0).capacity() <= MAP_MAX, "an oversized map was kept");
        give_back_buffer(Vec::with_capacity(2 * BUFFER_MAX));
        assert!(buffer().capacity() <= BUFFER_MAX, "an oversized buffer was kept");

        for _ in 0..3 * MAPS {
            give_back_map(HeaderMap::with_capacity(4));
        }
        assert_eq!(SPARE_MAPS.with(|s| s.borrow().len()), MAPS);
        for _ in 0..3 * BUFFERS {
            give_back_buffer(Vec::with_capacity(16));
        }
        assert_eq!(SPARE_BUFFERS.with(|s| s.borrow().len()), BUFFERS);
    }
}
