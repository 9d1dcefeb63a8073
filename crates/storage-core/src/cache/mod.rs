//! In-memory caches in front of the database, each counting hits and misses.
//!
//! Both caches carry a *sequence* that every invalidation bumps. A reader takes the
//! sequence before it queries the database and passes it when it fills the cache;
//! a fill whose sequence is stale is dropped, so a read that raced with a write
//! can never put the old value back after the write invalidated it.

mod dictionary;
mod lru;

pub use dictionary::{DictionaryCache, DictionaryEntry};
pub use lru::LruCache;
