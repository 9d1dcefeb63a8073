//! Looking up the state of a room, as the CLI's `state` and the HTTP API's
//! state endpoint ask for it: the current state, or the state after an event.
//! Its error says which of the three things asked about does not exist, so
//! that the CLI can exit 2 and HTTP answer 404 for each, and anything else
//! stays a storage error.

use crate::store::{StateGroupAccess, StateStore};
use crate::types::StateMap;
use crate::StateFilter;

/// Why a state lookup found nothing, or failed.
#[derive(Debug, thiserror::Error)]
pub enum StateLookupError {
    /// No stored event of the room has state.
    #[error("unknown room {0}")]
    UnknownRoom(String),
    /// The event is not stored, or is an outlier (which has no state).
    #[error("unknown event {0} (or an outlier, which has no state)")]
    UnknownEvent(String),
    /// The event is in another room than the one asked about.
    #[error("event {event_id} is in room {actual}, not in {asked}")]
    EventInOtherRoom {
        event_id: String,
        actual: String,
        asked: String,
    },
    /// Reading storage failed.
    #[error(transparent)]
    Storage(#[from] storage_core::Error),
}

/// The state of `room_id`: its current state, or with `at` the state after
/// that event (the event included, for a state event).
pub fn room_state(
    store: &StateStore,
    room_id: &str,
    at: Option<&str>,
) -> Result<StateMap, StateLookupError> {
    let Some(event_id) = at else {
        let state = store.get_current_state_ids(room_id)?;
        if state.is_empty() && !store.room_has_state(room_id)? {
            return Err(StateLookupError::UnknownRoom(room_id.to_owned()));
        }
        return Ok((*state).clone());
    };
    let group = store
        .get_state_group_for_events(&[event_id])?
        .remove(event_id)
        .ok_or_else(|| StateLookupError::UnknownEvent(event_id.to_owned()))?;
    match store.get_state_group_room(group)? {
        Some(r) if r == room_id => {}
        Some(r) => {
            return Err(StateLookupError::EventInOtherRoom {
                event_id: event_id.to_owned(),
                actual: r,
                asked: room_id.to_owned(),
            })
        }
        None => {
            return Err(storage_core::Error::corrupt(format!(
                "event {event_id} maps to state group {group}, which does not exist"
            ))
            .into())
        }
    }
    let mut states = store.get_state_for_groups(&[group], &StateFilter::all())?;
    Ok(states.remove(&group).unwrap_or_default())
}
