//! What the caches count as the bytes of an entry, for `/metrics`.

use std::mem::size_of;
use std::sync::Arc;

/// The bytes a value owns on the heap, beyond its own `size_of`.
pub trait HeapSize {
    fn heap_size(&self) -> usize;
}

impl HeapSize for String {
    fn heap_size(&self) -> usize {
        self.capacity()
    }
}

impl HeapSize for Arc<str> {
    /// The string and the two reference counts. Shared by every holder: counted
    /// in full by each, so totals over several holders are an upper bound.
    fn heap_size(&self) -> usize {
        self.len() + 2 * size_of::<usize>()
    }
}

impl HeapSize for i64 {
    fn heap_size(&self) -> usize {
        0
    }
}

impl HeapSize for usize {
    fn heap_size(&self) -> usize {
        0
    }
}

impl HeapSize for () {
    fn heap_size(&self) -> usize {
        0
    }
}

impl HeapSize for &str {
    fn heap_size(&self) -> usize {
        0
    }
}

impl<A: HeapSize, B: HeapSize> HeapSize for (A, B) {
    fn heap_size(&self) -> usize {
        self.0.heap_size() + self.1.heap_size()
    }
}

/// The bytes of a whole [`PersistentMap`](super::PersistentMap): its array's
/// entries and hashes, its overlay's entries as [`map_entry_bytes`] counts
/// them, and what every entry owns on the heap.
pub fn map_bytes<K, V>(map: &super::PersistentMap<K, V>) -> usize
where
    K: HeapSize + std::hash::Hash + Eq + Clone,
    V: HeapSize + Clone,
{
    map.bytes_with(5 * size_of::<(K, V)>(), |k, v| {
        k.heap_size() + v.heap_size()
    })
}

/// The bytes one entry added to a [`PersistentMap`](super::PersistentMap)'s
/// overlay costs: its own size in a node slot, what it owns on the heap, and
/// the nodes' share. imbl's HAMT allocates whole fixed-width slot arrays per
/// node; measured with a counting allocator (`cargo xtask bench state`, 37,939
/// state entries) the nodes come to about five times the entries' own size.
pub(crate) fn map_entry_bytes<K: HeapSize, V: HeapSize>(key: &K, value: &V) -> usize {
    5 * size_of::<(K, V)>() + key.heap_size() + value.heap_size()
}
