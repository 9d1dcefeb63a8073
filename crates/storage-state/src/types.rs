//! The vocabulary of room state shared by every state API.

/// The id of a state group.
pub type StateGroup = i64;

/// `(event type, state key)`: one slot of room state.
pub type StateKey = (String, String);

/// Room state: which event fills each slot. A persistent map, so that the state
/// of a group derived from another (and a copy out of a cache) shares storage
/// with it instead of copying the room; hashed with foldhash under a per-process
/// random seed (see [`PersistentMap`](storage_core::cache::PersistentMap)).
pub type StateMap<V = String> = storage_core::cache::PersistentMap<StateKey, V>;

/// The event type whose state lives in the member cache.
pub const MEMBER: &str = "m.room.member";

/// The longest delta chain a new group may extend: a prev group whose chain
/// (itself included) already holds this many groups gets a snapshot instead.
pub const MAX_STATE_DELTA_HOPS: usize = 100;

/// Makes a [`StateKey`] from borrowed parts.
pub fn key(event_type: &str, state_key: &str) -> StateKey {
    (event_type.to_owned(), state_key.to_owned())
}
