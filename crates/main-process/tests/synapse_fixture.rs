//! Reproducing Synapse: PDUs exported from a Synapse (1.163) that built rooms of
//! versions 10, 11 and 12 through its client API (joins, leaves, kicks, bans,
//! power levels, topics, names, custom state, messages), imported into a fresh
//! database of ours, must give the state Synapse computed after every event, and
//! the same current state. See tests/fixtures/synapse/. On SQLite and PostgreSQL.

use serde_json::Value;
use std::collections::BTreeMap;
use storage_core::testing::TestDb;
use storage_core::OpenMode;
use storage_state::{StateFilter, StateGroupAccess, StateMap};

storage_core::engine_tests!(import_reproduces_synapse_state);

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/synapse");

fn as_json(state: &StateMap) -> Value {
    let mut by_type: BTreeMap<&str, BTreeMap<&str, &str>> = BTreeMap::new();
    for ((t, k), e) in state {
        by_type.entry(t).or_default().insert(k, e);
    }
    serde_json::to_value(by_type).unwrap()
}

fn import_reproduces_synapse_state(t: &TestDb) {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{FIXTURE}/expected.json")).unwrap())
            .unwrap();
    let stdout = e2e_tests::hs_main_ok(t.url(), &["import", &format!("{FIXTURE}/pdus.jsonl")]);
    let events = expected["event_ids"].as_array().unwrap();
    assert!(
        stdout.starts_with(&format!(
            "imported {} events (0 already stored, 0 rejected) in 3 rooms",
            events.len()
        )),
        "{stdout}"
    );

    let store = e2e_tests::cold_state_store(t);
    let mut checked = 0;
    for id in events {
        let id = id.as_str().unwrap();
        let want = &expected["state_after"][id];
        let got = store
            .get_state_for_event(id, &StateFilter::all())
            .unwrap_or_else(|e| panic!("{}: state after {id}: {e}", t.engine()));
        assert_eq!(&as_json(&got), want, "{}: state after {id}", t.engine());
        checked += 1;
    }
    assert_eq!(checked, 141);
    for (room, info) in expected["rooms"].as_object().unwrap() {
        let current = store.get_current_state_ids(room).unwrap();
        assert_eq!(
            &as_json(&current),
            &info["current_state"],
            "{}: current state of {room} (v{})",
            t.engine(),
            info["room_version"]
        );
    }
    storage_events::testing::assert_invariants(&t.open_mode(OpenMode::ReadOnly));
}
