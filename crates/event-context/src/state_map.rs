//! The plain state-map types shared with the storage layer, and their conversion to ruma's.
//!
//! Storage reads and writes state as `(type, state_key) -> event_id` rows of strings, so the
//! public API speaks [`StateMap`]; ruma's state resolution wants `StateEventType` keys, and
//! only this module converts between the two.

use std::collections::HashMap;

use ruma::{events::StateEventType, state_res, OwnedEventId};

/// A state key: `(event type, state key)`, e.g. `("m.room.member", "@alice:example.com")`.
pub type StateKey = (String, String);

/// A room state: the event id holding each state key.
pub type StateMap = HashMap<StateKey, OwnedEventId>;

pub(crate) fn to_ruma(state: &StateMap) -> state_res::StateMap<OwnedEventId> {
    state
        .iter()
        .map(|((event_type, state_key), id)| {
            (
                (StateEventType::from(event_type.as_str()), state_key.clone()),
                id.clone(),
            )
        })
        .collect()
}

pub(crate) fn from_ruma(state: state_res::StateMap<OwnedEventId>) -> StateMap {
    state
        .into_iter()
        .map(|((event_type, state_key), id)| ((event_type.to_string(), state_key), id))
        .collect()
}

pub(crate) fn key_from_ruma((event_type, state_key): (StateEventType, String)) -> StateKey {
    (event_type.to_string(), state_key)
}
