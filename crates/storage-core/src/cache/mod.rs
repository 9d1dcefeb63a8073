//! In-memory caches in front of the database, each counting hits and misses.
//!
//! Both caches carry a *sequence* that every invalidation bumps. A reader takes the
//! sequence before it queries the database and passes it when it fills the cache;
//! a fill whose sequence is stale is dropped, so a read that raced with a write
//! can never put the old value back after the write invalidated it.

mod dictionary;
mod flat_map;
mod heap_size;
mod lru;

pub use dictionary::{DictionaryCache, DictionaryEntry};
pub use flat_map::{flat_hash, FlatMap};
pub use heap_size::{map_bytes, HeapSize};
pub use lru::LruCache;

/// The persistent map the caches keep dictionaries in ([`FlatMap`]: a copy
/// shares its array), hashed with foldhash under a seed drawn at random per
/// process: several times faster than SipHash on short strings, and the keys
/// (state keys are user ids that remote servers choose) cannot be picked to
/// collide without knowing the seed.
pub type PersistentMap<K, V> = FlatMap<K, V>;

/// The set the caches keep known-absent keys in (imbl's HAMT).
pub type PersistentSet<K> =
    imbl::GenericHashSet<K, foldhash::fast::RandomState, imbl::shared_ptr::DefaultSharedPtr>;
