//! The authorization rules, from ruma's `state_res`, applied to [`Pdu`]s.
//!
//! ruma splits the rules in two: the state-independent ones (the create event's own rules,
//! and whether an event's `auth_events` are the right ones) and the state-dependent ones
//! (membership, power levels...), to be run against the auth events, the state before the
//! event and the current state. The `Err` of every check here is the human-readable reason
//! ruma gives, which is what Synapse stores in `rejections.reason`.

use std::sync::Arc;

use ruma::{
    events::{StateEventType, TimelineEventType},
    state_res::{self, check_state_dependent_auth_rules, check_state_independent_auth_rules},
    EventId, RoomVersionId, UserId,
};
use serde_json::value::RawValue as RawJsonValue;

use crate::{
    event_id::create_event_id_from_room_id, room_version::room_version_rules,
    state_map::key_from_ruma, Pdu, StateKey, StateMap,
};

/// The state keys whose current events must be an event's `auth_events` (the spec's "auth
/// events selection"), for an event not built yet. Empty for a create event; from room
/// version 12 on the create event is not among them.
///
/// `Err` when the room version is unknown or `content` is malformed for the event type (a
/// member event whose `membership` is missing, for example).
pub fn auth_types_for_event(
    room_version: &RoomVersionId,
    event_type: &str,
    sender: &UserId,
    state_key: Option<&str>,
    content: &RawJsonValue,
) -> Result<Vec<StateKey>, String> {
    let rules = room_version_rules(room_version)
        .ok_or_else(|| format!("unsupported room version {room_version}"))?;
    let types = state_res::auth_types_for_event(
        &TimelineEventType::from(event_type),
        sender,
        state_key,
        content,
        &rules.authorization,
    )?;
    Ok(types.into_iter().map(key_from_ruma).collect())
}

/// [`auth_types_for_event`] for an event already read.
pub fn auth_types_for_pdu(pdu: &Pdu) -> Result<Vec<StateKey>, String> {
    Ok(ruma_auth_types_for_pdu(pdu)?
        .into_iter()
        .map(key_from_ruma)
        .collect())
}

/// [`auth_types_for_pdu`] as ruma names them, with the rules and the event
/// type the event was read with (not looked up again for each event).
pub(crate) fn ruma_auth_types_for_pdu(pdu: &Pdu) -> Result<Vec<(StateEventType, String)>, String> {
    state_res::auth_types_for_event(
        &pdu.kind,
        &pdu.sender,
        pdu.state_key.as_deref(),
        &pdu.content,
        &pdu.rules.authorization,
    )
}

/// Checks `pdu` against the state-dependent auth rules of its room version, with the state
/// that `fetch_state` answers (the state before the event, or the current state).
///
/// From room version 12 on, `fetch_state` must also answer `m.room.create`, which is part of
/// the room state although it is no longer among the events' `auth_events`.
pub fn check_auth(
    pdu: &Pdu,
    fetch_state: impl Fn(&StateEventType, &str) -> Option<Arc<Pdu>>,
) -> Result<(), String> {
    check_state_dependent_auth_rules(&pdu.rules.authorization, pdu, fetch_state)
}

/// [`check_auth`] against a state map, fetching its events with `fetch_event`.
pub fn check_auth_against_state(
    pdu: &Pdu,
    state: &StateMap,
    fetch_event: impl Fn(&EventId) -> Option<Arc<Pdu>>,
) -> Result<(), String> {
    check_auth(pdu, |event_type, state_key| {
        let id = state.get(&storage_state::Slot(&event_type.to_string(), state_key))?;
        fetch_event(id)
    })
}

/// Checks `pdu` against its own `auth_events`, as on receipt of a PDU: the
/// state-independent rules (create event rules; the auth events exist, are in the room, are
/// not rejected, are not duplicated and are the expected types), then the state-dependent
/// rules with the auth events as the state (plus the create event from room version 12 on).
pub fn check_auth_events(
    pdu: &Pdu,
    fetch_event: impl Fn(&EventId) -> Option<Arc<Pdu>>,
) -> Result<(), String> {
    let rules = &pdu.rules.authorization;
    check_state_independent_auth_rules(rules, pdu, &fetch_event)?;
    if pdu.event_type == "m.room.create" {
        return Ok(());
    }

    let mut auth_state: Vec<Arc<Pdu>> = Vec::with_capacity(pdu.auth_events.len() + 1);
    for id in &pdu.auth_events {
        // The state-independent rules above made sure every auth event can be fetched.
        auth_state.extend(fetch_event(id));
    }
    if rules.room_create_event_id_as_room_id {
        let create_id = create_event_id_from_room_id(&pdu.room_id)
            .map_err(|e| format!("could not derive the `m.room.create` event id: {e}"))?;
        auth_state.extend(fetch_event(&create_id));
    }
    check_auth(pdu, |event_type, state_key| {
        auth_state
            .iter()
            .find(|e| {
                e.state_key.as_deref() == Some(state_key) && e.event_type == event_type.to_string()
            })
            .cloned()
    })
}
