//! The vocabulary of room state shared by every state API.

use std::sync::Arc;

/// The id of a state group.
pub type StateGroup = i64;

/// `(event type, state key)`: one slot of room state. Shared strings: a map
/// entry is copied whenever a persistent map copies part of itself, and a cache
/// and the answers read from it hold the same strings, so a copy bumps
/// reference counts instead of allocating. Event types are interned per
/// process ([`storage_core::intern`]).
pub type StateKey = (Arc<str>, Arc<str>);

/// Room state: which event fills each slot (by default its event id, shared
/// like the key's strings). A persistent map, so that the state of a group
/// derived from another (and a copy out of a cache) shares storage with it
/// instead of copying the room; hashed with foldhash under a per-process
/// random seed (see [`PersistentMap`](storage_core::cache::PersistentMap)).
pub type StateMap<V = Arc<str>> = storage_core::cache::PersistentMap<StateKey, V>;

/// The event type whose state lives in the member cache.
pub const MEMBER: &str = "m.room.member";

/// The longest delta chain a new group may extend: a prev group whose chain
/// (itself included) already holds this many groups gets a snapshot instead.
pub const MAX_STATE_DELTA_HOPS: usize = 100;

/// Makes a [`StateKey`] from borrowed parts (the event type interned).
pub fn key(event_type: &str, state_key: &str) -> StateKey {
    (storage_core::intern(event_type), Arc::from(state_key))
}

/// A slot by borrowed parts, for looking it up in a [`StateMap`] without
/// building a [`StateKey`] (no allocation): it hashes as the key does (a tuple
/// hashes its fields in order; `Arc<str>` hashes as its `str`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Slot<'a>(pub &'a str, pub &'a str);

impl equivalent::Equivalent<StateKey> for Slot<'_> {
    fn equivalent(&self, key: &StateKey) -> bool {
        *self.0 == *key.0 && *self.1 == *key.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_borrowed_slot_finds_its_key() {
        let state: StateMap = (0..1_000)
            .map(|i| (key(MEMBER, &format!("@u{i}:x")), format!("$e{i}").into()))
            .collect();
        for i in 0..1_000 {
            let user = format!("@u{i}:x");
            assert_eq!(
                state.get(&Slot(MEMBER, &user)).map(|e| &**e),
                Some(format!("$e{i}").as_str())
            );
        }
        assert!(state.get(&Slot(MEMBER, "@nobody:x")).is_none());
        assert!(state.get(&Slot("m.room.name", "@u1:x")).is_none());
        // The event type is one shared string for every key.
        let types: Vec<&StateKey> = state.keys().collect();
        assert!(types.iter().all(|k| Arc::ptr_eq(&k.0, &types[0].0)));
    }
}
