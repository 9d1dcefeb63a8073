//! `check_invariants` (the end of every write-path test, `hs-main inspect
//! --check`) on damaged state-group edges: an edge to a group that is not
//! stored, or up to a group that is not older (a cycle's edges). Reads end a
//! chain at such an edge, and a group read through it silently lacks the rows
//! below; the check names each such edge. Each test runs on SQLite and
//! PostgreSQL.

use diesel::connection::SimpleConnection;
use storage_core::testing::TestDb;
use storage_core::{with_conn, StoreConfig};
use storage_events::check_invariants;
use storage_state::{key, NewStateGroup, StateGroupAccess, StateMap, StateStore};

storage_core::engine_tests!(damaged_state_group_edges_are_named);

const ROOM: &str = "!edges:test";

fn damaged_state_group_edges_are_named(t: &TestDb) {
    let store = StateStore::new(t.open(), &StoreConfig::default()).unwrap();
    let state = StateMap::from_iter([(key("m.room.create", ""), "$create".into())]);
    let snapshot = store
        .store_state_group(&NewStateGroup::snapshot("$create", ROOM, &state))
        .unwrap();
    let topic = StateMap::from_iter([(key("m.room.topic", ""), "$topic".into())]);
    let delta = store
        .store_state_group(&NewStateGroup::delta("$topic", ROOM, snapshot, &topic))
        .unwrap();
    let other = store
        .store_state_group(&NewStateGroup::snapshot("$other", ROOM, &state))
        .unwrap();
    assert_eq!(check_invariants(store.database()).unwrap(), vec![]);

    // The snapshot gets an edge up to the delta (with the delta's own edge
    // down, a cycle), and the other snapshot an edge to a group never stored.
    let missing = other + 1000;
    let sql = format!(
        "INSERT INTO state_group_edges (state_group, prev_state_group) \
         VALUES ({snapshot}, {delta}), ({other}, {missing})"
    );
    with_conn!(&mut t.raw_connection(), |c| c.batch_execute(&sql)).unwrap();
    let violations = check_invariants(store.database()).unwrap();
    let named: Vec<(&str, Vec<String>)> = violations
        .iter()
        .map(|v| (v.invariant, v.examples.clone()))
        .collect();
    let mut expected = vec![format!("{snapshot} {delta}"), format!("{other} {missing}")];
    expected.sort();
    assert_eq!(
        named,
        vec![(
            "every state group edge names an older, stored prev group",
            expected
        )]
    );
}
