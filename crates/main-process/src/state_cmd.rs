//! `hs-main state ROOM [--at EVENT]`: the state of a room as JSON.
//!
//! Opens the database read-only and uses only the state tables, so it answers
//! from a database Synapse wrote as well as from ours, and never changes either.

use crate::cli::Failure;
use serde::{Serialize, Serializer};
use std::io::{BufWriter, Write};
use storage_core::{Database, DatabaseConfig, Error, OpenMode, StoreConfig};
use storage_state::{StateFilter, StateGroupStore, StateMap, StateStore};

pub fn run(database: &str, room_id: &str, at: Option<&str>) -> Result<(), Failure> {
    let db = Database::open(DatabaseConfig::parse(database, OpenMode::ReadOnly)?)?;
    let store = StateStore::new(db, &StoreConfig::default())?;
    let state = read_state(&store, room_id, at)?;
    // Straight from the map's strings to stdout, in 64 KiB writes.
    let mut out = BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    write_json(&state, &mut out)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
        .map_err(|e| Failure::Error(Error::from(e).context("writing the state to stdout")))
}

/// The state of `room_id` (current, or after `at`) as the JSON object of the
/// CLI and HTTP contracts, as text.
pub fn state_json(store: &StateStore, room_id: &str, at: Option<&str>) -> Result<String, Failure> {
    Ok(to_json(&read_state(store, room_id, at)?))
}

fn read_state(store: &StateStore, room_id: &str, at: Option<&str>) -> Result<StateMap, Failure> {
    match at {
        Some(event_id) => state_after(store, room_id, event_id),
        None => {
            let state = store.get_current_state_ids(room_id)?;
            if state.is_empty() && !store.room_has_state(room_id)? {
                return Err(Failure::NotFound(format!("unknown room {room_id}")));
            }
            // A persistent map: the clone shares the cached one.
            Ok((*state).clone())
        }
    }
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

/// `{"<type>": {"<state key>": "<event id>"}}`, keys sorted, as JSON text.
pub fn to_json(state: &StateMap) -> String {
    let mut text = Vec::with_capacity(state.len() * 96);
    write_json(state, &mut text).expect("writing to memory");
    String::from_utf8(text).expect("serde_json writes UTF-8")
}

/// [`to_json`] written to `out`. Serialized straight from the state map's
/// strings, only sorted on the way: no intermediate tree is built.
pub fn write_json(state: &StateMap, out: impl Write) -> std::io::Result<()> {
    let mut slots: Vec<(&str, &str, &str)> = state
        .iter()
        .map(|((t, k), e)| (t.as_str(), k.as_str(), e.as_str()))
        .collect();
    slots.sort_unstable();
    serde_json::to_writer(out, &ByType(&slots)).map_err(std::io::Error::from)
}

/// Sorted slots, as an object of types.
struct ByType<'a>(&'a [(&'a str, &'a str, &'a str)]);

/// The slots of one type, as an object of state keys.
struct OfType<'a>(&'a [(&'a str, &'a str, &'a str)]);

impl Serialize for ByType<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(
            self.0
                .chunk_by(|a, b| a.0 == b.0)
                .map(|slots| (slots[0].0, OfType(slots))),
        )
    }
}

impl Serialize for OfType<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(_, k, e)| (k, e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use storage_state::key;

    #[test]
    fn json_is_sorted_nested_and_escaped() {
        let state: StateMap = [
            (key("m.room.member", "@b:x"), "$2"),
            (key("m.room.create", ""), "$1"),
            (key("m.room.member", "@a:x"), "$3"),
            (key("weird \"type\"", "k\\ey\u{e9}"), "$4\n"),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_owned()))
        .collect();
        let mut expected: BTreeMap<&str, BTreeMap<&str, &str>> = BTreeMap::new();
        for ((t, k), e) in &state {
            expected.entry(t).or_default().insert(k, e);
        }
        let text = to_json(&state);
        assert_eq!(text, serde_json::to_string(&expected).unwrap());
        assert!(text.starts_with(r#"{"m.room.create":{"":"$1"},"m.room.member":{"@a:x""#));
        assert_eq!(to_json(&StateMap::new()), "{}");
    }
}
