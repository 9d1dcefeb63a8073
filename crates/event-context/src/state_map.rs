//! Room state as this crate speaks it, and its conversion to ruma's.
//!
//! There is one state map type, storage-state's [`storage_state::StateMap`],
//! generic over what fills a slot: storage keeps event ids as strings, this
//! crate as parsed [`OwnedEventId`]s, and both share one [`StateKey`]. ruma's
//! state resolution wants `StateEventType` keys in a std `HashMap`; only this
//! module converts between the two.

use ruma::{events::StateEventType, state_res, OwnedEventId};

/// A state key: `(event type, state key)`, e.g. `("m.room.member", "@alice:example.com")`.
pub use storage_state::StateKey;

/// A room state: the event id holding each state key.
pub type StateMap = storage_state::StateMap<OwnedEventId>;

pub(crate) fn to_ruma(state: &StateMap) -> state_res::StateMap<OwnedEventId> {
    state
        .iter()
        .map(|((event_type, state_key), id)| {
            (
                (StateEventType::from(&**event_type), state_key.to_string()),
                id.clone(),
            )
        })
        .collect()
}

pub(crate) fn from_ruma(state: state_res::StateMap<OwnedEventId>) -> StateMap {
    state
        .into_iter()
        .map(|((event_type, state_key), id)| (key_from_ruma((event_type, state_key)), id))
        .collect()
}

pub(crate) fn key_from_ruma((event_type, state_key): (StateEventType, String)) -> StateKey {
    storage_state::key(&event_type.to_string(), &state_key)
}
