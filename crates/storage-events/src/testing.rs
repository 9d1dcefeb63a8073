//! Events for tests and tools that only care about the room DAG: one builder,
//! so that a new field of [`EventToPersist`] is filled in one place.

use crate::EventToPersist;
use storage_state::StateGroup;

/// A message event in `room_id` after `prev_events`, with the state group after
/// it; set other fields with struct update syntax.
pub fn event(
    room_id: &str,
    event_id: &str,
    prev_events: &[&str],
    state_group: Option<StateGroup>,
) -> EventToPersist {
    EventToPersist {
        event_id: event_id.into(),
        room_id: room_id.into(),
        event_type: "m.room.message".into(),
        state_key: None,
        sender: "@alice:test".into(),
        depth: prev_events.len() as i64 + 1,
        origin_server_ts: 1_700_000_000_000,
        prev_events: prev_events.iter().map(|p| p.to_string()).collect(),
        auth_events: vec![],
        json: format!(r#"{{"event_id":"{event_id}"}}"#),
        format_version: 3,
        room_version: None,
        outlier: false,
        rejected: None,
        state_group,
        membership: None,
        new_state_groups: Vec::new(),
    }
}

/// A state event filling `(event_type, state_key)`; a create event also names the
/// room version ("10").
pub fn state_event(
    room_id: &str,
    event_id: &str,
    prev_events: &[&str],
    (event_type, state_key): (&str, &str),
    state_group: Option<StateGroup>,
) -> EventToPersist {
    EventToPersist {
        event_type: event_type.into(),
        state_key: Some(state_key.into()),
        room_version: (event_type == "m.room.create").then(|| "10".to_owned()),
        membership: (event_type == "m.room.member").then(|| "join".to_owned()),
        new_state_groups: Vec::new(),
        ..event(room_id, event_id, prev_events, state_group)
    }
}

/// Panics naming every invariant of the database that does not hold (see
/// [`crate::check_invariants`]); the last step of every write-path test.
pub fn assert_invariants(db: &storage_core::Database) {
    let violations = crate::check_invariants(db).expect("checking the invariants");
    assert!(
        violations.is_empty(),
        "the database breaks its invariants:\n{}",
        violations
            .iter()
            .map(|v| format!("  {v}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
