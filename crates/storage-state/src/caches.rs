//! The caches of the state store, shared by every clone of it.
//!
//! State groups never change once written, so the group caches (their state,
//! delta, chain length and room) are only ever filled (after a commit, or after
//! a read), never invalidated. The event-to-group and current-state caches are
//! different: the current state of a room changes, and its cache is invalidated
//! after every commit that changes it (and, on replicas, from the replication
//! stream).

use crate::types::{StateGroup, StateKey, StateMap};
use std::sync::Arc;
use storage_core::cache::{DictionaryCache, LruCache};
use storage_core::StoreConfig;

/// A group's delta against its prev group, or `None` for a snapshot.
pub type Delta = Option<(StateGroup, Arc<StateMap>)>;

#[derive(Debug)]
pub struct StateCaches {
    /// `m.room.member` state per group (Synapse: 500,000 keys).
    pub(crate) members: DictionaryCache<StateGroup, StateKey, String>,
    /// All other state per group (Synapse: 50,000 keys).
    pub(crate) non_members: DictionaryCache<StateGroup, StateKey, String>,
    pub(crate) deltas: LruCache<StateGroup, Delta>,
    /// How many groups each group's chain holds (itself included).
    pub(crate) chain_lengths: LruCache<StateGroup, usize>,
    pub(crate) event_groups: LruCache<String, StateGroup>,
    /// The room of each group: every read of the state after an event checks it.
    pub(crate) group_rooms: LruCache<StateGroup, String>,
    pub(crate) current_state: LruCache<String, Arc<StateMap>>,
}

impl StateCaches {
    pub fn new(config: &StoreConfig) -> Self {
        StateCaches {
            members: DictionaryCache::new("state_group_members_cache", config.cache_size(500_000)),
            non_members: DictionaryCache::new("state_group_cache", config.cache_size(50_000)),
            deltas: LruCache::with_sizer(
                "state_group_delta_cache",
                config.cache_size(100_000),
                |d| d.as_ref().map_or(1, |(_, delta)| delta.len().max(1)),
            ),
            chain_lengths: LruCache::new(
                "state_group_chain_length_cache",
                config.cache_size(100_000),
            ),
            event_groups: LruCache::new("event_to_state_group_cache", config.cache_size(100_000)),
            group_rooms: LruCache::new("state_group_room_cache", config.cache_size(100_000)),
            current_state: LruCache::with_sizer(
                "current_state_ids_cache",
                config.cache_size(500_000),
                |s| s.len().max(1),
            ),
        }
    }

    /// Cache statistics, for tests and reports.
    pub fn members(&self) -> &DictionaryCache<StateGroup, StateKey, String> {
        &self.members
    }

    pub fn non_members(&self) -> &DictionaryCache<StateGroup, StateKey, String> {
        &self.non_members
    }
}
