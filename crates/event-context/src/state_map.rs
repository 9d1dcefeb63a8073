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
    // The types the auth rules name, without formatting each through
    // `Display` into a new string (state resolution converts every
    // conflicted event's auth types: 10,176 calls per three merges of the HQ
    // forks).
    let name = match &event_type {
        StateEventType::RoomCreate => "m.room.create",
        StateEventType::RoomMember => "m.room.member",
        StateEventType::RoomPowerLevels => "m.room.power_levels",
        StateEventType::RoomJoinRules => "m.room.join_rules",
        StateEventType::RoomThirdPartyInvite => "m.room.third_party_invite",
        other => return storage_state::key(&other.to_string(), &state_key),
    };
    storage_state::key(name, &state_key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_types_are_spelled_as_ruma_spells_them() {
        for t in [
            StateEventType::RoomCreate,
            StateEventType::RoomMember,
            StateEventType::RoomPowerLevels,
            StateEventType::RoomJoinRules,
            StateEventType::RoomThirdPartyInvite,
            StateEventType::RoomName,
            StateEventType::from("org.example.custom"),
        ] {
            let (name, key) = key_from_ruma((t.clone(), "k".to_owned()));
            assert_eq!((&*name, &*key), (t.to_string().as_str(), "k"));
        }
    }
}
