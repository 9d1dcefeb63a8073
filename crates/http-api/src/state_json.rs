//! The state JSON of the CLI and HTTP contracts:
//! `{"<event type>": {"<state key>": "<event id>"}}`, and the state lookup
//! behind it, whose "does not exist" errors answer 404.

use serde::{Serialize, Serializer};
use std::collections::HashMap;
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
/// strings, only sorted on the way: no intermediate tree is built. The slots
/// are grouped by type first (a room has a few types, their strings shared
/// by every slot of the type: matched by address before their text), then
/// each type's slots sorted by state key alone: sorting the HQ room's 37,939
/// slots as (type, state key, event) pairs compared the type's text first
/// each time (memcmp was 16% of `hs-main state`'s CPU, perf).
pub fn write_json(state: &StateMap, out: impl Write) -> std::io::Result<()> {
    let mut types: Vec<(&str, Vec<(&str, &str)>)> = Vec::new();
    // Every group's index by its type: asked only past the first few groups,
    // so that a room of many types (event types are chosen by its members)
    // costs a lookup a slot, not a scan of every group.
    let mut index: HashMap<&str, usize> = HashMap::new();
    for ((t, k), e) in state.iter() {
        let t: &str = t;
        let at = match types
            .iter()
            .take(FEW_TYPES)
            .position(|(u, _)| std::ptr::eq(*u, t) || *u == t)
        {
            Some(at) => at,
            None => *index.entry(t).or_insert_with(|| {
                types.push((t, Vec::new()));
                types.len() - 1
            }),
        };
        types[at].1.push((k, e));
    }
    types.sort_unstable_by(|a, b| a.0.cmp(b.0));
    for (_, slots) in &mut types {
        slots.sort_unstable_by(|a, b| a.0.cmp(b.0));
    }
    serde_json::to_writer(out, &ByType(&types)).map_err(std::io::Error::from)
}

/// The groups [`write_json`] scans for a slot's type before it looks the
/// type up by its text (the types of most rooms' state are fewer).
const FEW_TYPES: usize = 8;

/// Slots grouped by type, each group sorted, as an object of types.
struct ByType<'a>(&'a [(&'a str, Vec<(&'a str, &'a str)>)]);

/// The slots of one type, as an object of state keys.
struct OfType<'a>(&'a [(&'a str, &'a str)]);

impl Serialize for ByType<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(t, slots)| (t, OfType(slots))))
    }
}

impl Serialize for OfType<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, e)| (k, e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use storage_state::key;

    #[test]
    fn json_is_sorted_nested_and_escaped() {
        let state: StateMap = [
            (key("m.room.member", "@b:x"), "$2"),
            (key("m.room.create", ""), "$1"),
            (key("m.room.member", "@a:x"), "$3"),
            (key("weird \"type\"", "k\\ey\u{e9}"), "$4\n"),
            // The same type in a string of its own (not interned): one group.
            ((Arc::from("m.room.member"), Arc::from("@c:x")), "$5"),
            ((Arc::from("m.room.member"), Arc::from("@0:x")), "$6"),
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
        assert!(
            text.starts_with(r#"{"m.room.create":{"":"$1"},"m.room.member":{"@0:x":"$6","@a:x""#)
        );
        assert_eq!(to_json(&StateMap::new()), "{}");
    }

    #[test]
    fn many_types_group_as_few_do() {
        // More types than `FEW_TYPES`, each with slots in strings of their own.
        let state: StateMap = (0..40)
            .flat_map(|i| {
                (0..3).map(move |j| {
                    let t: Arc<str> = Arc::from(format!("org.example.t{i}"));
                    let k: Arc<str> = Arc::from(format!("k{j}"));
                    ((t, k), format!("${i}.{j}"))
                })
            })
            .map(|(k, v)| (k, v.into()))
            .collect();
        let mut expected: BTreeMap<&str, BTreeMap<&str, &str>> = BTreeMap::new();
        for ((t, k), e) in &state {
            expected.entry(t).or_default().insert(k, e);
        }
        assert_eq!(expected.len(), 40);
        assert_eq!(to_json(&state), serde_json::to_string(&expected).unwrap());
    }
}
