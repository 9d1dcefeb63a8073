//! The caches of the state store, shared by every clone of it.
//!
//! A state group's state never changes once written, so the group caches
//! (their state, delta, chain length and room) are filled after a commit or a
//! read, and forgotten only where a group's shape is rewritten (compression:
//! its delta and every chain length) or the group is deleted (a purge: all of
//! it). The event-to-group and current-state caches are
//! different: the current state of a room changes, and its cache is invalidated
//! after every commit that changes it (and, on replicas, from the replication
//! stream).

use crate::types::{StateGroup, StateKey, StateMap};
use std::mem::size_of;
use std::sync::Arc;
use storage_core::cache::{map_bytes, DictionaryCache, HeapSize, LruCache};
use storage_core::StoreConfig;

/// A group's delta against its prev group, or `None` for a snapshot.
pub type Delta = Option<(StateGroup, Arc<StateMap>)>;

#[derive(Debug)]
pub struct StateCaches {
    /// `m.room.member` state per group (Synapse: 500,000 keys).
    pub(crate) members: DictionaryCache<StateGroup, StateKey, Arc<str>>,
    /// All other state per group (Synapse: 50,000 keys).
    pub(crate) non_members: DictionaryCache<StateGroup, StateKey, Arc<str>>,
    /// The whole state of groups lately read in full: the union of their two
    /// dictionary entries, kept so that a warm full read hands it out instead of
    /// rebuilding it (a union copies every node path it changes: 2 ms for the
    /// 195 non-member slots of the HQ room). Shares all but those paths with the
    /// members entry.
    pub(crate) full_states: LruCache<StateGroup, StateMap>,
    pub(crate) deltas: LruCache<StateGroup, Delta>,
    /// How many groups each group's chain holds (itself included).
    pub(crate) chain_lengths: LruCache<StateGroup, usize>,
    pub(crate) event_groups: LruCache<String, StateGroup>,
    /// The room of each group: every read of the state after an event checks it.
    pub(crate) group_rooms: LruCache<StateGroup, String>,
    /// The row (room, event it was written for) of each group whose caches a
    /// process that is not told of purges filled
    /// ([`StateStore::reread_event_state_group`](crate::StateStore::reread_event_state_group)):
    /// a group found with another row is another group under a reused id.
    pub(crate) group_origins: LruCache<StateGroup, (String, String)>,
    pub(crate) current_state: LruCache<String, Arc<StateMap>>,
}

impl StateCaches {
    pub fn new(config: &StoreConfig) -> Self {
        StateCaches {
            members: DictionaryCache::new("state_group_members_cache", config.cache_size(500_000)),
            non_members: DictionaryCache::new("state_group_cache", config.cache_size(50_000)),
            full_states: LruCache::<StateGroup, StateMap>::with_sizer(
                "state_group_full_state_cache",
                config.cache_size(500_000),
                |s| s.len().max(1),
            )
            // Its strings and most nodes are the members entry's: counted there.
            .counting_bytes(|_, s| s.len() * size_of::<(StateKey, Arc<str>)>()),
            deltas: LruCache::<StateGroup, Delta>::with_sizer(
                "state_group_delta_cache",
                config.cache_size(100_000),
                |d| d.as_ref().map_or(1, |(_, delta)| delta.len().max(1)),
            )
            .counting_bytes(|_, d| d.as_ref().map_or(0, |(_, delta)| map_bytes(delta))),
            chain_lengths: LruCache::<StateGroup, usize>::new(
                "state_group_chain_length_cache",
                config.cache_size(100_000),
            )
            .counting_bytes(|_, _| 2 * size_of::<usize>()),
            event_groups: LruCache::<String, StateGroup>::new(
                "event_to_state_group_cache",
                config.cache_size(100_000),
            )
            .counting_bytes(|e, _| size_of::<(String, StateGroup)>() + e.heap_size()),
            group_rooms: LruCache::<StateGroup, String>::new(
                "state_group_room_cache",
                config.cache_size(100_000),
            )
            .counting_bytes(|_, r| size_of::<(StateGroup, String)>() + r.heap_size()),
            group_origins: LruCache::<StateGroup, (String, String)>::new(
                "state_group_origin_cache",
                config.cache_size(100_000),
            )
            .counting_bytes(|_, (r, e)| {
                size_of::<(StateGroup, (String, String))>() + r.heap_size() + e.heap_size()
            }),
            current_state: LruCache::<String, Arc<StateMap>>::with_sizer(
                "current_state_ids_cache",
                config.cache_size(500_000),
                |s| s.len().max(1),
            )
            .counting_bytes(|r, s| r.heap_size() + map_bytes(s)),
        }
    }

    /// Forgets everything cached about `group`: its state, delta, chain length,
    /// room and row. Groups never change, so nothing calls this on the read or
    /// write path; it is for whoever deletes stored groups (a purge), or finds
    /// one deleted and its id reused.
    pub fn invalidate_group(&self, group: StateGroup) {
        self.members.invalidate(&group);
        self.non_members.invalidate(&group);
        self.full_states.invalidate(&group);
        self.deltas.invalidate(&group);
        self.chain_lengths.invalidate(&group);
        self.group_rooms.invalidate(&group);
        self.group_origins.invalidate(&group);
    }

    /// What the state-group caches hold, in bytes (see `/metrics`).
    pub fn group_state_bytes(&self) -> usize {
        self.members.bytes() + self.non_members.bytes() + self.full_states.bytes()
    }

    /// Cache statistics, for tests and reports.
    pub fn members(&self) -> &DictionaryCache<StateGroup, StateKey, Arc<str>> {
        &self.members
    }

    pub fn non_members(&self) -> &DictionaryCache<StateGroup, StateKey, Arc<str>> {
        &self.non_members
    }
}
