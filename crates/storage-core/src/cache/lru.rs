//! A size-bounded LRU cache with explicit invalidation.

use crate::metrics::{self, CacheStats};
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

struct Inner<K: Hash + Eq, V> {
    /// Each value with its size and its bytes.
    entries: ::lru::LruCache<K, (V, usize, usize)>,
    size: usize,
    bytes: usize,
    sequence: u64,
}

/// LRU cache of cloneable values, bounded by the sum of the entries' sizes (1 per
/// entry unless a sizer is given). Thread-safe.
pub struct LruCache<K: Hash + Eq, V> {
    name: String,
    max_size: usize,
    sizer: fn(&V) -> usize,
    /// What an entry costs in bytes, for `/metrics`; nothing unless given.
    bytes_of: Option<fn(&K, &V) -> usize>,
    inner: Mutex<Inner<K, V>>,
    stats: Arc<CacheStats>,
}

impl<K: Hash + Eq, V> std::fmt::Debug for LruCache<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LruCache")
            .field("name", &self.name)
            .field("max_size", &self.max_size)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone, V: Clone> LruCache<K, V> {
    /// A cache of at most `max_entries` entries, registered in the metrics as `name`.
    pub fn new(name: &str, max_entries: usize) -> Self {
        Self::with_sizer(name, max_entries, |_| 1)
    }

    /// A cache bounded by the total of `sizer` over its values.
    pub fn with_sizer(name: &str, max_size: usize, sizer: fn(&V) -> usize) -> Self {
        log::debug!("cache {name}: at most {max_size}");
        LruCache {
            name: name.to_owned(),
            max_size,
            sizer,
            bytes_of: None,
            inner: Mutex::new(Inner {
                entries: ::lru::LruCache::unbounded(),
                size: 0,
                bytes: 0,
                sequence: 0,
            }),
            stats: {
                let stats = metrics::global().cache(name);
                stats.set_max_size(max_size);
                stats
            },
        }
    }

    /// Counts the bytes of each entry with `bytes_of`, shown as the cache's size
    /// in bytes in `/metrics`.
    pub fn counting_bytes(mut self, bytes_of: fn(&K, &V) -> usize) -> Self {
        self.bytes_of = Some(bytes_of);
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner<K, V>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// The value for `key`, marking it most recently used. Counts a hit or a miss.
    pub fn get(&self, key: &K) -> Option<V> {
        let found = self.lock().entries.get(key).map(|(v, _, _)| v.clone());
        match found {
            Some(_) => self.stats.hit(),
            None => self.stats.miss(),
        }
        found
    }

    /// Like [`get`](Self::get) but counts nothing and leaves the LRU order alone.
    pub fn peek(&self, key: &K) -> Option<V> {
        self.lock().entries.peek(key).map(|(v, _, _)| v.clone())
    }

    /// The current sequence; pass it to [`insert_at`](Self::insert_at).
    pub fn sequence(&self) -> u64 {
        self.lock().sequence
    }

    /// Inserts (a prefill, or a value just read), evicting the least recently used
    /// entries beyond the size bound.
    pub fn insert(&self, key: K, value: V) {
        let mut inner = self.lock();
        self.insert_locked(&mut inner, key, value);
    }

    /// Inserts only if no invalidation happened since `sequence` was read.
    pub fn insert_at(&self, sequence: u64, key: K, value: V) -> bool {
        let mut inner = self.lock();
        if inner.sequence != sequence {
            return false;
        }
        self.insert_locked(&mut inner, key, value);
        true
    }

    fn insert_locked(&self, inner: &mut Inner<K, V>, key: K, value: V) {
        let size = (self.sizer)(&value);
        let bytes = self.bytes_of.map_or(0, |f| f(&key, &value));
        if let Some((_, old, old_bytes)) = inner.entries.put(key, (value, size, bytes)) {
            inner.size -= old;
            inner.bytes -= old_bytes;
        }
        inner.size += size;
        inner.bytes += bytes;
        let mut evicted = 0;
        while inner.size > self.max_size {
            match inner.entries.pop_lru() {
                Some((_, (_, s, b))) => {
                    inner.size -= s;
                    inner.bytes -= b;
                    evicted += 1;
                }
                None => break,
            }
        }
        if evicted > 0 {
            self.stats.evicted(evicted);
        }
        self.stats.set_size(inner.entries.len(), inner.bytes);
    }

    /// Removes `key` and bumps the sequence.
    pub fn invalidate(&self, key: &K) {
        let mut inner = self.lock();
        if let Some((_, s, b)) = inner.entries.pop(key) {
            inner.size -= s;
            inner.bytes -= b;
        }
        inner.sequence += 1;
        self.stats.invalidated();
        self.stats.set_size(inner.entries.len(), inner.bytes);
    }

    /// Removes every entry and bumps the sequence.
    pub fn invalidate_all(&self) {
        let mut inner = self.lock();
        inner.entries.clear();
        inner.size = 0;
        inner.bytes = 0;
        inner.sequence += 1;
        self.stats.invalidated();
        self.stats.set_size(0, 0);
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The sum of the entries' sizes.
    pub fn size(&self) -> usize {
        self.lock().size
    }

    /// The sum of the entries' bytes (0 unless [`counting_bytes`](Self::counting_bytes)).
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_hit_and_invalidate() {
        let c: LruCache<&str, i32> = LruCache::new("test_lru_basic", 10);
        assert_eq!(c.get(&"foo"), None);
        c.insert("foo", 123);
        assert_eq!(c.get(&"foo"), Some(123));
        c.invalidate(&"foo");
        assert_eq!(c.get(&"foo"), None);
        assert_eq!((c.stats().hits(), c.stats().misses()), (1, 2));
        // Invalidating a key never cached is fine.
        c.invalidate(&"what");
    }

    #[test]
    fn evicts_oldest_then_least_recently_used() {
        let c: LruCache<i32, i32> = LruCache::new("test_lru_evict", 2);
        c.insert(1, 1);
        c.insert(2, 2);
        c.insert(3, 3);
        assert_eq!((c.get(&1), c.get(&2), c.get(&3)), (None, Some(2), Some(3)));

        let c: LruCache<i32, i32> = LruCache::new("test_lru_evict_lru", 2);
        c.insert(1, 1);
        c.insert(2, 2);
        assert_eq!(c.get(&1), Some(1));
        c.insert(3, 3);
        assert_eq!((c.get(&1), c.get(&2), c.get(&3)), (Some(1), None, Some(3)));
        assert_eq!(c.stats().evictions(), 1);
    }

    #[test]
    fn sized_eviction() {
        let c: LruCache<&str, Vec<i32>> = LruCache::with_sizer("test_lru_sized", 5, Vec::len);
        c.insert("key1", vec![0]);
        c.insert("key2", vec![1, 2]);
        c.insert("key3", vec![3]);
        c.insert("key4", vec![4]);
        assert_eq!(c.size(), 5);
        c.insert("key5", vec![5, 6]);
        assert_eq!(c.size(), 4);
        assert_eq!(c.peek(&"key1"), None);
        assert_eq!(c.peek(&"key2"), None);
        assert!(c.peek(&"key3").is_some() && c.peek(&"key4").is_some());
        assert!(c.peek(&"key5").is_some());
    }

    #[test]
    fn stale_fill_is_dropped() {
        let c: LruCache<&str, i32> = LruCache::new("test_lru_seq", 10);
        let seq = c.sequence();
        c.invalidate(&"k"); // a writer changed the row while we were reading it
        assert!(!c.insert_at(seq, "k", 1));
        assert_eq!(c.get(&"k"), None);
        assert!(c.insert_at(c.sequence(), "k", 2));
        assert_eq!(c.get(&"k"), Some(2));
    }

    #[test]
    fn invalidate_all_clears() {
        let c: LruCache<i32, i32> = LruCache::new("test_lru_clear", 10);
        c.insert(1, 1);
        c.insert(2, 2);
        c.invalidate_all();
        assert!(c.is_empty());
        assert_eq!(c.size(), 0);
    }

    #[test]
    fn counts_bytes_through_eviction_and_invalidation() {
        let c: LruCache<i32, String> =
            LruCache::new("test_lru_bytes", 2).counting_bytes(|_, s| s.len());
        c.insert(1, "aaaa".into());
        c.insert(2, "bb".into());
        assert_eq!(c.bytes(), 6);
        c.insert(2, "bbb".into()); // replaced
        assert_eq!(c.bytes(), 7);
        c.insert(3, "c".into()); // evicts 1
        assert_eq!(c.bytes(), 4);
        assert_eq!(c.stats().bytes(), 4);
        assert!(metrics::global()
            .render_prometheus()
            .contains("hs_cache_bytes{cache=\"test_lru_bytes\"} 4\n"));
        c.invalidate(&2);
        assert_eq!(c.bytes(), 1);
        c.invalidate_all();
        assert_eq!((c.bytes(), c.stats().bytes()), (0, 0));
    }
}
