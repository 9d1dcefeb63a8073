//! A cache of dictionaries that may be known only in part.
//!
//! Made for state groups: the state of a group is a map (type, state_key) ->
//! event id. A reader asking for a few keys fetches only those, and the cache
//! remembers which keys it has asked about (present or absent) without claiming
//! to hold the whole map; a reader that fetched the whole map stores it as *full*.
//! A later request is answered from the cache when the entry is full or covers
//! every key it asks for.
//!
//! Entries are persistent maps ([`FlatMap`](super::FlatMap)): an entry derived
//! from another plus a few changes ([`DictionaryCache::derive`]) shares
//! everything else with it.

use super::heap_size::{map_bytes, map_entry_bytes};
use super::{HeapSize, LruCache, PersistentMap as HashMap, PersistentSet as HashSet};
use std::hash::Hash;
use std::sync::Arc;

/// What the cache knows of one dictionary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DictionaryEntry<DK: Hash + Eq + Clone, DV: Clone> {
    /// `value` is the whole dictionary.
    pub full: bool,
    /// Keys fetched and found absent (only meaningful when not full).
    pub known_absent: HashSet<DK>,
    /// The known part of the dictionary.
    pub value: HashMap<DK, DV>,
    /// What the entry costs in memory, as [`HeapSize`] counts it; structure
    /// shared with other entries is counted in each.
    bytes: usize,
}

impl<DK: Hash + Eq + Clone, DV: Clone> DictionaryEntry<DK, DV> {
    fn empty() -> Self {
        DictionaryEntry {
            full: false,
            known_absent: HashSet::new(),
            value: HashMap::new(),
            bytes: 0,
        }
    }

    /// Whether the entry can say, for `key`, either its value or that it is absent.
    pub fn knows(&self, key: &DK) -> bool {
        self.full || self.value.contains_key(key) || self.known_absent.contains(key)
    }

    fn size(&self) -> usize {
        (self.value.len() + self.known_absent.len()).max(1)
    }

    /// The bytes this entry holds (see [`HeapSize`]).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// An LRU cache of [`DictionaryEntry`]s, bounded by the total number of dictionary
/// keys held (as Synapse sizes its state-group caches).
pub struct DictionaryCache<K: Hash + Eq, DK: Hash + Eq + Clone, DV: Clone> {
    cache: LruCache<K, Arc<DictionaryEntry<DK, DV>>>,
}

impl<K: Hash + Eq, DK: Hash + Eq + Clone, DV: Clone> std::fmt::Debug
    for DictionaryCache<K, DK, DV>
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DictionaryCache")
            .field("cache", &self.cache)
            .finish()
    }
}

impl<K, DK, DV> DictionaryCache<K, DK, DV>
where
    K: Hash + Eq + Clone,
    DK: Hash + Eq + Clone + HeapSize,
    DV: Clone + HeapSize,
{
    pub fn new(name: &str, max_keys: usize) -> Self {
        DictionaryCache {
            cache: LruCache::with_sizer(name, max_keys, |e: &Arc<DictionaryEntry<DK, DV>>| {
                e.size()
            })
            .counting_bytes(|_, e| e.bytes),
        }
    }

    /// The bytes the cache holds, as its entries count them (see [`HeapSize`]).
    pub fn bytes(&self) -> usize {
        self.cache.bytes()
    }

    pub fn stats(&self) -> &crate::metrics::CacheStats {
        self.cache.stats()
    }

    /// The current sequence; pass it to [`update`](Self::update).
    pub fn sequence(&self) -> u64 {
        self.cache.sequence()
    }

    /// What is known of `key`'s dictionary, shared (no copy); a miss is an empty,
    /// not-full entry. Counts a hit when anything is known.
    pub fn get(&self, key: &K) -> Arc<DictionaryEntry<DK, DV>> {
        self.cache
            .get(key)
            .unwrap_or_else(|| Arc::new(DictionaryEntry::empty()))
    }

    /// Whether the cache holds `key`'s whole dictionary; counts neither a hit
    /// nor a miss.
    pub fn holds_full(&self, key: &K) -> bool {
        self.cache.peek(key).is_some_and(|e| e.full)
    }

    /// What is known of `dict_keys` in `key`'s dictionary.
    pub fn get_keys(&self, key: &K, dict_keys: &[DK]) -> DictionaryEntry<DK, DV> {
        let entry = self.get(key);
        DictionaryEntry {
            full: entry.full,
            known_absent: dict_keys
                .iter()
                .filter(|k| entry.known_absent.contains(*k))
                .cloned()
                .collect(),
            value: dict_keys
                .iter()
                .filter_map(|k| entry.value.get(k).map(|v| (k.clone(), v.clone())))
                .collect(),
            bytes: 0,
        }
    }

    /// Records what a reader fetched at `sequence`: the whole dictionary when
    /// `fetched_keys` is `None`, otherwise the values found for `fetched_keys`
    /// (keys among them missing from `value` are recorded as absent). Dropped if
    /// the cache was invalidated since `sequence`.
    pub fn update(
        &self,
        sequence: u64,
        key: K,
        value: HashMap<DK, DV>,
        fetched_keys: Option<&[DK]>,
    ) {
        if self.cache.sequence() != sequence {
            return;
        }
        let entry = match fetched_keys {
            None => DictionaryEntry {
                full: true,
                known_absent: HashSet::new(),
                bytes: map_bytes(&value),
                value,
            },
            Some(fetched) => {
                let mut entry = self
                    .cache
                    .peek(&key)
                    .map_or_else(DictionaryEntry::empty, Arc::unwrap_or_clone);
                if entry.full {
                    return;
                }
                for k in fetched {
                    if !value.contains_key(k) {
                        entry.bytes += map_entry_bytes(k, &());
                        entry.known_absent.insert(k.clone());
                    }
                }
                for (k, v) in value {
                    entry.bytes += map_entry_bytes(&k, &v);
                    if let Some(old) = entry.value.insert(k, v) {
                        entry.bytes -= map_entry_bytes(&(), &old).min(entry.bytes);
                    }
                }
                entry
            }
        };
        self.cache.insert_at(sequence, key, Arc::new(entry));
    }

    /// Records, at `sequence`, that `key`'s dictionary is `base`'s with `changes`
    /// applied: whatever is known of `base` (all of it, or some keys) becomes
    /// known of `key`, plus the changed keys. Without an entry for `base`, only
    /// the changed keys are known. Shares `base`'s maps rather than copying them.
    pub fn derive(
        &self,
        sequence: u64,
        base: &K,
        key: K,
        changes: impl IntoIterator<Item = (DK, DV)>,
    ) {
        let mut entry = DictionaryEntry::clone(&self.get(base));
        for (k, v) in changes {
            entry.known_absent.remove(&k);
            entry.bytes += map_entry_bytes(&k, &v);
            entry.value.insert(k, v);
        }
        self.cache.insert_at(sequence, key, Arc::new(entry));
    }

    pub fn invalidate(&self, key: &K) {
        self.cache.invalidate(key);
    }

    pub fn invalidate_all(&self) {
        self.cache.invalidate_all();
    }

    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HashMap<&'static str, &'static str> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn derived_entries_keep_what_is_known_of_the_base() {
        let c = DictionaryCache::new("test_dict_derive", 100);
        c.update(c.sequence(), 1, map(&[("a", "1"), ("b", "2")]), None);
        c.derive(c.sequence(), &1, 2, map(&[("b", "3"), ("c", "4")]));
        let e = c.get(&2);
        assert!(e.full);
        assert_eq!(e.value, map(&[("a", "1"), ("b", "3"), ("c", "4")]));
        // The base is untouched.
        assert_eq!(c.get(&1).value, map(&[("a", "1"), ("b", "2")]));

        // A partial base: its known keys and absences carry over, minus what the
        // change filled in.
        c.update(c.sequence(), 10, map(&[("a", "1")]), Some(&["a", "x", "y"]));
        c.derive(c.sequence(), &10, 11, map(&[("x", "5")]));
        let e = c.get(&11);
        assert!(!e.full);
        assert_eq!(e.value, map(&[("a", "1"), ("x", "5")]));
        assert_eq!(e.known_absent, HashSet::from_iter(["y"]));
        assert!(!e.knows(&"z"));

        // No base entry: only the changes are known.
        c.derive(c.sequence(), &99, 100, map(&[("q", "7")]));
        let e = c.get(&100);
        assert!(!e.full && e.knows(&"q") && !e.knows(&"a"));

        // A stale sequence is ignored.
        let seq = c.sequence();
        c.invalidate(&1);
        c.derive(seq, &2, 3, map(&[]));
        assert!(!c.get(&3).full);
    }

    #[test]
    fn bytes_follow_entries() {
        let c: DictionaryCache<i32, String, String> = DictionaryCache::new("test_dict_bytes", 100);
        assert_eq!(c.bytes(), 0);
        let one: HashMap<String, String> =
            [("a".to_owned(), "x".repeat(100))].into_iter().collect();
        c.update(c.sequence(), 1, one, None);
        let first = c.bytes();
        assert!(first >= 101, "counts the strings: {first}");
        c.derive(c.sequence(), &1, 2, [("b".to_owned(), "y".repeat(50))]);
        assert!(
            c.bytes() >= 2 * first + 51,
            "a derived entry counts its own"
        );
        c.invalidate(&1);
        c.invalidate(&2);
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn miss_is_empty_and_not_full() {
        let c: DictionaryCache<&str, &str, &str> = DictionaryCache::new("test_dict_miss", 10);
        let e = c.get(&"key");
        assert!(!e.full && e.value.is_empty() && e.known_absent.is_empty());
    }

    #[test]
    fn full_update_hits_whole_and_partial() {
        let c = DictionaryCache::new("test_dict_full", 10);
        let v = map(&[("test", "a"), ("test2", "b"), ("test3", "c")]);
        c.update(c.sequence(), "key", v.clone(), None);
        let e = c.get(&"key");
        assert!(e.full);
        assert_eq!(e.value, v);
        let e = c.get_keys(&"key", &["test2"]);
        assert!(e.full);
        assert_eq!(e.value, map(&[("test2", "b")]));
        // A key the full dictionary lacks is simply not there.
        assert_eq!(c.get_keys(&"key", &["nope"]).value, map(&[]));
    }

    #[test]
    fn partial_updates_merge_and_record_absence() {
        let c = DictionaryCache::new("test_dict_multi", 10);
        c.update(c.sequence(), "key", map(&[("test", "1")]), Some(&["test"]));
        c.update(
            c.sequence(),
            "key",
            map(&[("test2", "2")]),
            Some(&["test2", "gone"]),
        );
        let e = c.get(&"key");
        assert!(!e.full);
        assert_eq!(e.value, map(&[("test", "1"), ("test2", "2")]));
        assert_eq!(e.known_absent, HashSet::from_iter(["gone"]));
        assert!(e.knows(&"gone") && e.knows(&"test") && !e.knows(&"other"));
    }

    #[test]
    fn stale_sequence_is_ignored() {
        let c = DictionaryCache::new("test_dict_seq", 10);
        let seq = c.sequence();
        c.invalidate(&"key");
        c.update(seq, "key", map(&[("a", "b")]), None);
        assert!(!c.get(&"key").full);
    }

    #[test]
    fn partial_update_does_not_degrade_a_full_entry() {
        let c = DictionaryCache::new("test_dict_keep_full", 10);
        c.update(c.sequence(), "key", map(&[("a", "1"), ("b", "2")]), None);
        c.update(c.sequence(), "key", map(&[]), Some(&["zzz"]));
        let e = c.get(&"key");
        assert!(e.full);
        assert_eq!(e.value.len(), 2);
    }

    #[test]
    fn bounded_by_number_of_keys() {
        let c = DictionaryCache::new("test_dict_bound", 4);
        c.update(
            c.sequence(),
            1,
            map(&[("a", "1"), ("b", "2"), ("c", "3")]),
            None,
        );
        c.update(c.sequence(), 2, map(&[("a", "1"), ("b", "2")]), None);
        // 5 keys > 4: the least recently used dictionary goes.
        assert!(!c.get(&1).full);
        assert!(c.get(&2).full);
    }
}
