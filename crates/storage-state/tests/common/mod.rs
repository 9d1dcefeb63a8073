//! Helpers shared by the state-store tests.
#![allow(dead_code)]

use storage_core::testing::TestDb;
use storage_core::{StoreConfig, Transaction};
use storage_state::{key, StateGroup, StateMap, StateStore};

pub const ROOM: &str = "!abc123:test";
pub const CREATE: &str = "m.room.create";
pub const NAME: &str = "m.room.name";
pub const MEMBER: &str = "m.room.member";

pub fn store(t: &TestDb) -> StateStore {
    StateStore::new(t.open(), &StoreConfig::default()).expect("state store")
}

/// A second store on the same database with empty caches: reads go to the database.
pub fn cold(store: &StateStore) -> StateStore {
    StateStore::new(store.database().clone(), &StoreConfig::default()).expect("cold store")
}

pub fn state(pairs: &[(&str, &str, &str)]) -> StateMap {
    pairs
        .iter()
        .map(|(t, k, e)| (key(t, k), (*e).into()))
        .collect()
}

pub fn map_events(store: &StateStore, mappings: &[(&str, StateGroup)]) {
    store
        .database()
        .run_interaction("map_events", |txn: &mut Transaction<'_>| {
            store.store_event_state_groups_txn(txn, mappings)
        })
        .expect("storing event mappings");
}
