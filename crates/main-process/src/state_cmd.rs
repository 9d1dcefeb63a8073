//! `hs-main state ROOM [--at EVENT]`: the state of a room as JSON.
//!
//! Opens the database read-only and uses only the state tables, so it answers
//! from a database Synapse wrote as well as from ours, and never changes either.

use crate::cli::Failure;
use std::collections::BTreeMap;
use storage_core::{Database, DatabaseConfig, OpenMode, StoreConfig};
use storage_state::{StateFilter, StateGroupStore, StateMap, StateStore};

pub fn run(database: &str, room_id: &str, at: Option<&str>) -> Result<(), Failure> {
    let db = Database::open(DatabaseConfig::parse(database, OpenMode::ReadOnly)?)?;
    let store = StateStore::new(db, &StoreConfig::default())?;
    println!("{}", state_json(&store, room_id, at)?);
    Ok(())
}

/// The state of `room_id` (current, or after `at`) as the JSON object of the
/// CLI and HTTP contracts.
pub fn state_json(
    store: &StateStore,
    room_id: &str,
    at: Option<&str>,
) -> Result<serde_json::Value, Failure> {
    let state = match at {
        Some(event_id) => state_after(store, room_id, event_id)?,
        None => {
            let state = store.get_current_state_ids(room_id)?;
            if state.is_empty() && !store.room_has_state(room_id)? {
                return Err(Failure::NotFound(format!("unknown room {room_id}")));
            }
            (*state).clone()
        }
    };
    Ok(to_json(&state))
}

fn state_after(store: &StateStore, room_id: &str, event_id: &str) -> Result<StateMap, Failure> {
    let group = store
        .get_state_group_for_events(&[event_id])?
        .remove(event_id)
        .ok_or_else(|| {
            Failure::NotFound(format!(
                "unknown event {event_id} (or an outlier, which has no state)"
            ))
        })?;
    match store.get_state_group_room(group)? {
        Some(r) if r == room_id => {}
        Some(r) => {
            return Err(Failure::NotFound(format!(
                "event {event_id} is in room {r}, not in {room_id}"
            )))
        }
        None => {
            return Err(Failure::Error(storage_core::Error::corrupt(format!(
                "event {event_id} maps to state group {group}, which does not exist"
            ))))
        }
    }
    let mut states = store.get_state_for_groups(&[group], &StateFilter::all())?;
    Ok(states.remove(&group).unwrap_or_default())
}

/// `{"<type>": {"<state key>": "<event id>"}}`, keys sorted.
pub fn to_json(state: &StateMap) -> serde_json::Value {
    let mut by_type: BTreeMap<&str, BTreeMap<&str, &str>> = BTreeMap::new();
    for ((t, k), e) in state {
        by_type.entry(t).or_default().insert(k, e);
    }
    serde_json::to_value(by_type).expect("a map of strings is JSON")
}
