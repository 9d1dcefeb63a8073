//! The state JSON of the CLI and HTTP contracts:
//! `{"<event type>": {"<state key>": "<event id>"}}`, and the state lookup
//! behind it, whose "does not exist" errors answer 404.

use serde::{Serialize, Serializer};
use std::io::Write;
use storage_state::{room_state, StateLookupError, StateMap, StateStore};

/// The state of `room_id` (current, or after `at`) as the contract's JSON text.
pub fn state_json(
    store: &StateStore,
    room_id: &str,
    at: Option<&str>,
) -> Result<String, StateLookupError> {
    Ok(to_json(&room_state(store, room_id, at)?))
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
    let mut slots: Vec<(&str, &str, &str)> =
        state.iter().map(|((t, k), e)| (&**t, &**k, &**e)).collect();
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
        .map(|(k, v)| (k, v.into()))
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
