//! The persistent map the state caches keep: a flat array shared by its
//! copies, with a small persistent map of changes on top.
//!
//! A whole room state is read once and then mostly copied (into a cache, out
//! to callers, as the base of the groups derived from it) and looked up. imbl's
//! HAMT made every entry cost about five times its own size in node slots
//! (15.8 MB for the HQ room's 37,939 entries, 4.7 times their strings), and
//! built a node path per insert. Here the entries sit in one array sorted by
//! their hash (under a seed drawn at random per process, so that remote
//! servers cannot pick colliding state keys), looked up by binary search; a
//! copy shares the array, and changes to a copy go into an overlay (an imbl
//! map, so that copies of copies share it too) until it outgrows the array,
//! when the two are merged into a new array.

use equivalent::Equivalent;
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::sync::{Arc, OnceLock};

type Overlay<K, V> = imbl::GenericHashMap<
    K,
    Option<V>,
    foldhash::fast::RandomState,
    imbl::shared_ptr::DefaultSharedPtr,
>;

/// The hasher of every flat array in this process: one seed, so that arrays
/// built apart hash alike.
fn hasher() -> &'static foldhash::fast::RandomState {
    static STATE: OnceLock<foldhash::fast::RandomState> = OnceLock::new();
    STATE.get_or_init(foldhash::fast::RandomState::default)
}

fn hash_of<Q: Hash + ?Sized>(key: &Q) -> u64 {
    hasher().hash_one(key)
}

/// The hash a [`FlatMap`] files `key` under: for a caller that needs a hash
/// of its own keys anyway (a map of the newest rows on a cold read) and hands
/// the map its entries with their hashes ([`FlatMap::from_hashed`]) instead of
/// hashing every key twice.
pub fn flat_hash<Q: Hash + ?Sized>(key: &Q) -> u64 {
    hash_of(key)
}

/// The array: each entry's hash, ascending, beside the entries in the same
/// order (apart, so that a binary search reads only the hashes).
struct Flat<K, V> {
    hashes: Box<[u64]>,
    entries: Box<[(K, V)]>,
}

impl<K: Hash + Eq, V> Flat<K, V> {
    /// From `items`, a later entry winning over an earlier one with its key
    /// (as inserts would). Sorts (hash, position) pairs rather than the
    /// entries themselves, which are four times their size: at a cold read's
    /// 31k entries, moving the entries made the sort most of the build.
    fn build(items: Vec<(K, V)>) -> Self {
        let hashes: Vec<u64> = items.iter().map(|(k, _)| hash_of(k)).collect();
        Self::build_hashed(hashes, items)
    }

    /// [`build`](Self::build) with each item's hash given (`hashes[i]` is
    /// [`flat_hash`] of `items[i]`'s key).
    fn build_hashed(hashes: Vec<u64>, items: Vec<(K, V)>) -> Self {
        debug_assert_eq!(hashes.len(), items.len());
        let order = by_hash(&hashes);
        let mut items: Vec<Option<(K, V)>> = items.into_iter().map(Some).collect();
        let mut hashes = Vec::with_capacity(order.len());
        let mut entries = Vec::with_capacity(order.len());
        let mut run = 0;
        while run < order.len() {
            let hash = order[run].0;
            let end = run + order[run..].iter().take_while(|(h, _)| *h == hash).count();
            // One hash, positions ascending: keep each key's last entry.
            for a in run..end {
                let superseded =
                    (a + 1..end).any(|b| match (&items[order[a].1], &items[order[b].1]) {
                        (Some((x, _)), Some((y, _))) => x == y,
                        _ => false,
                    });
                if let Some(entry) = items[order[a].1].take().filter(|_| !superseded) {
                    hashes.push(hash);
                    entries.push(entry);
                }
            }
            run = end;
        }
        Flat {
            hashes: hashes.into_boxed_slice(),
            entries: entries.into_boxed_slice(),
        }
    }

    fn find<Q: Hash + Equivalent<K> + ?Sized>(&self, key: &Q) -> Option<usize> {
        if self.hashes.is_empty() {
            return None;
        }
        let h = hash_of(key);
        let start = self.hashes.partition_point(|x| *x < h);
        (start..self.hashes.len())
            .take_while(|i| self.hashes[*i] == h)
            .find(|i| key.equivalent(&self.entries[*i].0))
    }
}

/// `(hashes[i], i)` for every `i`, sorted. The hashes are near uniform (a
/// seeded hash), so each is first put straight into one of about half as
/// many buckets as there are hashes by its leading bits, and only each
/// bucket's few sorted: a comparison sort of the HQ room's 37,939 pairs took
/// 10.0M of the 15.2M instructions of building its array (callgrind, a cold
/// full read). Keys chosen to collide only fill one bucket, which is then
/// sorted as a whole: never worse than sorting everything.
fn by_hash(hashes: &[u64]) -> Vec<(u64, usize)> {
    let n = hashes.len();
    if n < 64 || n > u32::MAX as usize {
        let mut order: Vec<(u64, usize)> = hashes.iter().copied().zip(0..).collect();
        order.sort_unstable();
        return order;
    }
    // 2^bits >= n / 2 buckets, by the hash's leading bits.
    let bits = usize::BITS - (n / 2 - 1).leading_zeros();
    let bucket = |h: u64| (h >> (u64::BITS - bits)) as usize;
    // Each bucket's size, then where it starts, then (its pairs placed)
    // where it ends: one array of 4-byte counts, allocated on every build.
    let mut at = vec![0u32; 1 << bits];
    for &h in hashes {
        at[bucket(h)] += 1;
    }
    let mut sum = 0;
    for a in &mut at {
        (*a, sum) = (sum, sum + *a);
    }
    let mut order = vec![(0, 0); n];
    for (i, &h) in hashes.iter().enumerate() {
        let a = &mut at[bucket(h)];
        order[*a as usize] = (h, i);
        *a += 1;
    }
    let mut start = 0;
    for &end in &at {
        let end = end as usize;
        if end - start > 1 {
            order[start..end].sort_unstable();
        }
        start = end;
    }
    order
}

/// A persistent map: cheap to copy (the array is shared), compact (an entry
/// of the array costs its own size and a hash), changed through an overlay.
pub struct FlatMap<K, V> {
    flat: Arc<Flat<K, V>>,
    /// Changes to `flat`: `Some` adds or replaces, `None` removes.
    overlay: Overlay<K, V>,
    len: usize,
}

impl<K, V> Clone for FlatMap<K, V>
where
    K: Clone,
    V: Clone,
{
    fn clone(&self) -> Self {
        FlatMap {
            flat: self.flat.clone(),
            overlay: self.overlay.clone(),
            len: self.len,
        }
    }
}

impl<K, V> Default for FlatMap<K, V>
where
    K: Hash + Eq + Clone,
    V: Clone,
{
    fn default() -> Self {
        FlatMap {
            flat: Arc::new(Flat {
                hashes: Box::new([]),
                entries: Box::new([]),
            }),
            overlay: Overlay::default(),
            len: 0,
        }
    }
}

impl<K, V> FlatMap<K, V>
where
    K: Hash + Eq + Clone,
    V: Clone,
{
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get_key_value<Q>(&self, key: &Q) -> Option<(&K, &V)>
    where
        Q: Hash + Equivalent<K> + ?Sized,
    {
        if !self.overlay.is_empty() {
            if let Some((k, v)) = self.overlay.get_key_value(key) {
                return v.as_ref().map(|v| (k, v));
            }
        }
        self.flat.find(key).map(|i| {
            let (k, v) = &self.flat.entries[i];
            (k, v)
        })
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        Q: Hash + Equivalent<K> + ?Sized,
    {
        self.get_key_value(key).map(|(_, v)| v)
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        Q: Hash + Equivalent<K> + ?Sized,
    {
        self.get_key_value(key).is_some()
    }

    /// Sets `key` to `value`; the value it had, if any.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let old = self.get(&key).cloned();
        if old.is_none() {
            self.len += 1;
        }
        self.overlay.insert(key, Some(value));
        self.merge_if_large();
        old
    }

    /// Adds `entries`, whose keys the map does not hold (the two parts of a
    /// state that never share a key): each goes into the overlay without
    /// first being looked up, as [`insert`](Self::insert) must to count it.
    pub fn extend_absent(&mut self, entries: impl IntoIterator<Item = (K, V)>) {
        for (key, value) in entries {
            debug_assert!(!self.contains_key(&key), "extend_absent: a key held");
            self.len += 1;
            self.overlay.insert(key, Some(value));
            self.merge_if_large();
        }
    }

    /// Removes `key`; the value it had, if any.
    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        Q: Hash + Equivalent<K> + ?Sized,
    {
        let (k, v) = self
            .get_key_value(key)
            .map(|(k, v)| (k.clone(), v.clone()))?;
        self.len -= 1;
        if self.flat.find(key).is_some() {
            self.overlay.insert(k, None);
        } else {
            self.overlay.remove(key);
        }
        Some(v)
    }

    /// The entries, in no particular order.
    pub fn iter(&self) -> Iter<'_, K, V> {
        Iter {
            map: self,
            flat: 0,
            overlay: self.overlay.iter(),
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }

    /// The union of both maps, keeping `self`'s value where both have a key.
    pub fn union(self, other: Self) -> Self {
        let (mut big, small, big_wins) = if self.len >= other.len {
            (self, other, true)
        } else {
            (other, self, false)
        };
        for (k, v) in small.iter() {
            if big_wins && big.contains_key(k) {
                continue;
            }
            big.insert(k.clone(), v.clone());
        }
        big
    }

    /// The keys on which `self` and `other` differ: a different value, or a
    /// key one of them lacks. Each once, in no particular order.
    ///
    /// Two maps whose arrays were built apart (two groups' states read cold)
    /// have their entries in the same order, by hash under the process's one
    /// seed: the arrays are walked side by side, comparing the entries of
    /// equal hashes, with no key hashed and no search. A key either overlay
    /// holds is settled by looking it up in both maps instead. Measured on the
    /// state resolution benchmark (two 30,664-entry states): a lookup per
    /// entry of one map in the other cost 14 ms of a 189 ms resolution.
    pub fn differing_keys<'a>(&'a self, other: &'a Self) -> Vec<&'a K>
    where
        V: PartialEq,
    {
        let mut out = Vec::new();
        let overlaid = |k: &K| {
            (!self.overlay.is_empty() && self.overlay.contains_key(k))
                || (!other.overlay.is_empty() && other.overlay.contains_key(k))
        };
        for (k, _) in self.overlay.iter() {
            if self.get(k) != other.get(k) {
                out.push(k);
            }
        }
        for (k, _) in other.overlay.iter() {
            if !self.overlay.contains_key(k) && self.get(k) != other.get(k) {
                out.push(k);
            }
        }
        let (a, b) = (&*self.flat, &*other.flat);
        if std::ptr::eq(a, b) {
            return out;
        }
        let (mut i, mut j) = (0, 0);
        while i < a.hashes.len() || j < b.hashes.len() {
            let ha = a.hashes.get(i).copied().unwrap_or(u64::MAX);
            let hb = b.hashes.get(j).copied().unwrap_or(u64::MAX);
            // An array walked to its end yields to the other.
            let a_first = j >= b.hashes.len() || (i < a.hashes.len() && ha < hb);
            let b_first = i >= a.hashes.len() || (j < b.hashes.len() && hb < ha);
            if a_first {
                let k = &a.entries[i].0;
                if !overlaid(k) {
                    out.push(k);
                }
                i += 1;
            } else if b_first {
                let k = &b.entries[j].0;
                if !overlaid(k) {
                    out.push(k);
                }
                j += 1;
            } else {
                // One hash in both: compare the runs' entries by key.
                let ie = i + a.hashes[i..].iter().take_while(|h| **h == ha).count();
                let je = j + b.hashes[j..].iter().take_while(|h| **h == ha).count();
                let (ra, rb) = (&a.entries[i..ie], &b.entries[j..je]);
                for (k, v) in ra {
                    let same = rb.iter().any(|(k2, v2)| k == k2 && v == v2);
                    if !same && !overlaid(k) {
                        out.push(k);
                    }
                }
                for (k, _) in rb {
                    if !ra.iter().any(|(k2, _)| k == k2) && !overlaid(k) {
                        out.push(k);
                    }
                }
                (i, j) = (ie, je);
            }
        }
        out
    }

    /// What the map holds in bytes: the array's entries and hashes, and the
    /// overlay's entries at `overlay_entry` each (see
    /// [`map_bytes`](super::map_bytes)), each entry's heap data through `heap`.
    pub(crate) fn bytes_with(&self, overlay_entry: usize, heap: impl Fn(&K, &V) -> usize) -> usize {
        let flat = self.flat.entries.len() * (std::mem::size_of::<(K, V)>() + 8);
        let overlay = self.overlay.len() * overlay_entry;
        flat + overlay + self.iter().map(|(k, v)| heap(k, v)).sum::<usize>()
    }

    /// Merges the overlay into a new array once it holds more entries than
    /// the array: amortised, each entry is copied a constant number of times,
    /// while copies that change a few slots keep sharing the array.
    fn merge_if_large(&mut self) {
        if self.overlay.len() > self.flat.entries.len().max(32) {
            let entries: Vec<(K, V)> = self.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            *self = FlatMap {
                len: entries.len(),
                flat: Arc::new(Flat::build(entries)),
                overlay: Overlay::default(),
            };
        }
    }
}

impl<K, V, Q> std::ops::Index<&Q> for FlatMap<K, V>
where
    K: Hash + Eq + Clone,
    V: Clone,
    Q: Hash + Equivalent<K> + ?Sized,
{
    type Output = V;

    /// The value of `key`; panics when the map lacks it.
    fn index(&self, key: &Q) -> &V {
        self.get(key).expect("no entry found for key")
    }
}

/// The entries of a [`FlatMap`]: the array's that the overlay does not
/// shadow, then the overlay's.
#[allow(missing_debug_implementations)]
pub struct Iter<'a, K, V> {
    map: &'a FlatMap<K, V>,
    flat: usize,
    overlay: imbl::hashmap::Iter<'a, K, Option<V>, imbl::shared_ptr::DefaultSharedPtr>,
}

impl<'a, K, V> Iterator for Iter<'a, K, V>
where
    K: Hash + Eq + Clone,
    V: Clone,
{
    type Item = (&'a K, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        let entries = &self.map.flat.entries;
        while self.flat < entries.len() {
            let (k, v) = &entries[self.flat];
            self.flat += 1;
            if self.map.overlay.is_empty() || !self.map.overlay.contains_key(k) {
                return Some((k, v));
            }
        }
        for (k, v) in self.overlay.by_ref() {
            if let Some(v) = v {
                return Some((k, v));
            }
        }
        None
    }
}

impl<'a, K, V> IntoIterator for &'a FlatMap<K, V>
where
    K: Hash + Eq + Clone,
    V: Clone,
{
    type Item = (&'a K, &'a V);
    type IntoIter = Iter<'a, K, V>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<K, V> IntoIterator for FlatMap<K, V>
where
    K: Hash + Eq + Clone,
    V: Clone,
{
    type Item = (K, V);
    type IntoIter = std::vec::IntoIter<(K, V)>;

    fn into_iter(self) -> Self::IntoIter {
        let entries: Vec<(K, V)> = self.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        entries.into_iter()
    }
}

impl<K, V> FromIterator<(K, V)> for FlatMap<K, V>
where
    K: Hash + Eq + Clone,
    V: Clone,
{
    /// Later entries win over earlier ones with the same key, as inserts would.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let flat = Flat::build(iter.into_iter().collect());
        FlatMap {
            len: flat.entries.len(),
            flat: Arc::new(flat),
            overlay: Overlay::default(),
        }
    }
}

impl<K, V> FlatMap<K, V>
where
    K: Hash + Eq + Clone,
    V: Clone,
{
    /// Like collecting `items`, each key's hash given beside it (`hashes[i]`
    /// must be [`flat_hash`] of `items[i]`'s key, or lookups miss).
    pub fn from_hashed(hashes: Vec<u64>, items: Vec<(K, V)>) -> Self {
        let flat = Flat::build_hashed(hashes, items);
        FlatMap {
            len: flat.entries.len(),
            flat: Arc::new(flat),
            overlay: Overlay::default(),
        }
    }
}

impl<K, V> Extend<(K, V)> for FlatMap<K, V>
where
    K: Hash + Eq + Clone,
    V: Clone,
{
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.insert(k, v);
        }
    }
}

impl<K, V> PartialEq for FlatMap<K, V>
where
    K: Hash + Eq + Clone,
    V: Clone + PartialEq,
{
    fn eq(&self, other: &Self) -> bool {
        if self.len != other.len {
            return false;
        }
        if Arc::ptr_eq(&self.flat, &other.flat) && self.overlay == other.overlay {
            return true;
        }
        self.iter().all(|(k, v)| other.get(k) == Some(v))
    }
}

impl<K, V> Eq for FlatMap<K, V>
where
    K: Hash + Eq + Clone,
    V: Clone + Eq,
{
}

impl<K, V> fmt::Debug for FlatMap<K, V>
where
    K: Hash + Eq + Clone + fmt::Debug,
    V: Clone + fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A reproducible stream of pseudo-random numbers from `seed`.
    fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        }
    }

    /// `differing_keys` against comparing every key, on maps built apart
    /// (arrays only), changed through their overlays, and copies sharing an
    /// array.
    #[test]
    fn differing_keys_are_the_keys_whose_values_differ() {
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15_u64);
        let brute = |a: &FlatMap<u64, u64>, b: &FlatMap<u64, u64>| {
            let mut keys: Vec<u64> = a
                .keys()
                .chain(b.keys())
                .copied()
                .filter(|k| a.get(k) != b.get(k))
                .collect();
            keys.sort_unstable();
            keys.dedup();
            keys
        };
        let fast = |a: &FlatMap<u64, u64>, b: &FlatMap<u64, u64>| {
            let mut keys: Vec<u64> = a.differing_keys(b).into_iter().copied().collect();
            keys.sort_unstable();
            let n = keys.len();
            keys.dedup();
            assert_eq!(n, keys.len(), "a key given twice");
            keys
        };
        for round in 0..200 {
            let n = 1 + (next() % 300) as usize;
            let a: FlatMap<u64, u64> = (0..n).map(|_| (next() % 400, next() % 3)).collect();
            let b: FlatMap<u64, u64> = (0..n).map(|_| (next() % 400, next() % 3)).collect();
            assert_eq!(fast(&a, &b), brute(&a, &b), "round {round}, built apart");
            assert_eq!(fast(&b, &a), brute(&b, &a), "round {round}, swapped");
            let (mut a2, mut b2) = (a.clone(), b.clone());
            for _ in 0..(next() % 20) {
                let k = next() % 400;
                match next() % 3 {
                    0 => drop(a2.remove(&k)),
                    1 => drop(a2.insert(k, next() % 3)),
                    _ => drop(b2.insert(k, next() % 3)),
                }
            }
            assert_eq!(fast(&a2, &b2), brute(&a2, &b2), "round {round}, overlaid");
            assert_eq!(fast(&a2, &a), brute(&a2, &a), "round {round}, one array");
            assert!(fast(&a, &a.clone()).is_empty());
        }
        // Overlapping ranges of keys, some values equal, some not.
        let one: FlatMap<u64, u64> = (0..50).map(|k| (k, k)).collect();
        let other: FlatMap<u64, u64> = (25..75).map(|k| (k, if k < 40 { k } else { 0 })).collect();
        assert_eq!(fast(&one, &other), brute(&one, &other));
    }

    /// Random inserts and removes on copies of copies, against std's map.
    #[test]
    fn behaves_like_a_hash_map() {
        let mut next = xorshift(0x2545_f491_4f6c_dd1d_u64);
        let base: Vec<(u64, u64)> = (0..500).map(|i| (next() % 700, i)).collect();
        let mut flat: FlatMap<u64, u64> = base.iter().copied().collect();
        let mut std: HashMap<u64, u64> = base.iter().copied().collect();
        let mut copies = Vec::new();
        for round in 0..3_000 {
            let k = next() % 900;
            if next().is_multiple_of(3) {
                assert_eq!(flat.remove(&k), std.remove(&k), "remove {k}");
            } else {
                assert_eq!(flat.insert(k, round), std.insert(k, round), "insert {k}");
            }
            if round % 250 == 0 {
                copies.push((flat.clone(), std.clone()));
            }
            assert_eq!(flat.len(), std.len());
        }
        copies.push((flat, std));
        for (flat, std) in copies {
            assert_eq!(flat.len(), std.len());
            let seen: HashMap<u64, u64> = flat.iter().map(|(k, v)| (*k, *v)).collect();
            assert_eq!(seen, std, "iteration gives each entry once");
            for k in 0..900 {
                assert_eq!(flat.get(&k), std.get(&k));
            }
            let rebuilt: FlatMap<u64, u64> = std.iter().map(|(k, v)| (*k, *v)).collect();
            // Both ways: equality walks the left map's entries.
            assert!(rebuilt == flat, "rebuilt == flat");
            assert!(flat.eq(&rebuilt), "flat == rebuilt");
        }
    }

    #[test]
    fn extend_absent_is_extending() {
        let base: FlatMap<String, u32> = (0..100).map(|i| (format!("@u{i}:x"), i)).collect();
        // Past the array's size too, so that the overlay is merged on the way.
        let more: Vec<(String, u32)> = (100..300).map(|i| (format!("@u{i}:x"), i)).collect();
        let mut absent = base.clone();
        absent.extend_absent(more.clone());
        let mut extended = base.clone();
        extended.extend(more);
        assert_eq!(absent.len(), 300);
        assert!(absent == extended, "absent == extended");
        assert!(extended.eq(&absent), "extended == absent");
        assert_eq!(absent.get("@u250:x"), Some(&250));
        assert_eq!(base.len(), 100, "the copy it came from unchanged");
    }

    /// The bucketed sort against a comparison sort: random hashes, hashes
    /// sharing their leading bits (one bucket), repeated hashes.
    #[test]
    fn by_hash_is_sorting() {
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        for n in [0, 1, 63, 64, 65, 100, 1_000, 4_097] {
            let random: Vec<u64> = (0..n).map(|_| next()).collect();
            let one_bucket: Vec<u64> = (0..n).map(|_| next() >> 20).collect();
            let repeated: Vec<u64> = (0..n).map(|_| (next() % 7) << 61).collect();
            for hashes in [random, one_bucket, repeated] {
                let mut sorted: Vec<(u64, usize)> = hashes.iter().copied().zip(0..).collect();
                sorted.sort_unstable();
                assert_eq!(by_hash(&hashes), sorted, "{n} hashes");
            }
        }
    }

    #[test]
    fn from_hashed_is_collecting() {
        let items: Vec<(String, u32)> = (0..300).map(|i| (format!("@u{}:x", i % 170), i)).collect();
        let hashes = items.iter().map(|(k, _)| flat_hash(k)).collect();
        let given = FlatMap::from_hashed(hashes, items.clone());
        let collected: FlatMap<String, u32> = items.into_iter().collect();
        assert_eq!(given.len(), 170);
        // Both ways: equality walks the left map's entries.
        assert!(given == collected, "given == collected");
        assert!(collected.eq(&given), "collected == given");
        assert_eq!(given.get("@u5:x"), Some(&175));
    }

    #[test]
    fn later_entries_win_when_collected_and_union_keeps_its_own() {
        let m: FlatMap<&str, i32> = [("a", 1), ("b", 2), ("a", 3)].into_iter().collect();
        assert_eq!(m.len(), 2);
        assert_eq!(m.get("a"), Some(&3));
        let other: FlatMap<&str, i32> = [("a", 9), ("c", 4)].into_iter().collect();
        let u = m.clone().union(other.clone());
        assert_eq!((u.len(), u.get("a"), u.get("c")), (3, Some(&3), Some(&4)));
        let u = other.union(m);
        assert_eq!(u.get("a"), Some(&9));
    }
}
