//! Prepared groups (an id taken, rows written later by their event's batch)
//! are readable as written groups are, without their prev group's whole
//! state read to prepare them: a delta on a group the caches do not hold
//! whole keeps only its delta, and a read takes the slots it asks for from
//! the prepared deltas and the written group below them. Each test runs on
//! SQLite and PostgreSQL.

mod common;

use common::*;
use std::sync::Arc;
use storage_core::testing::TestDb;
use storage_core::Transaction;
use storage_state::{
    key, NewStateGroup, PreparedStateGroup, StateFilter, StateGroup, StateGroupAccess, StateMap,
    StateStore,
};

storage_core::engine_tests!(a_delta_on_a_cold_group_is_prepared_without_reading_its_state);

fn room(members: usize) -> StateMap {
    let mut s = state(&[(CREATE, "", "$create"), (NAME, "", "$name0")]);
    for u in 0..members {
        s.insert(
            key(MEMBER, &format!("@u{u}:test")),
            format!("$join{u}").into(),
        );
    }
    s
}

fn prepare(
    store: &StateStore,
    event: &str,
    prev: StateGroup,
    pairs: &[(&str, &str, &str)],
) -> Arc<PreparedStateGroup> {
    store
        .prepare_state_group(&NewStateGroup::delta(event, ROOM, prev, &state(pairs)))
        .unwrap()
}

/// Every read a context or the persister makes of `group`, against `want`.
fn check_reads(store: &StateStore, group: StateGroup, want: &StateMap, what: &str) {
    let filters = [
        StateFilter::from_types([
            (NAME, Some("")),
            (MEMBER, Some("@u1:test")),
            (MEMBER, Some("@u2:test")),
            (MEMBER, Some("@nobody:test")),
            ("m.topic", Some("")),
        ]),
        StateFilter::from_lazy_load_member_list(["@u1:test", "@u3:test"]),
        StateFilter::from_types([(MEMBER, None)]),
        StateFilter::all(),
    ];
    for filter in &filters {
        let got = store
            .get_state_for_groups(&[group], filter)
            .unwrap()
            .remove(&group)
            .unwrap();
        assert_eq!(got, filter.filter_state(want), "{what}, {filter:?}");
    }
}

fn a_delta_on_a_cold_group_is_prepared_without_reading_its_state(t: &TestDb) {
    let writer = store(t);
    let base = room(300);
    let snapshot = writer
        .store_state_group(&NewStateGroup::snapshot("$root", ROOM, &base))
        .unwrap();
    let store = cold(&writer);
    let g1 = prepare(
        &store,
        "$leave1",
        snapshot,
        &[(MEMBER, "@u1:test", "$leave1")],
    );
    let g2 = prepare(
        &store,
        "$name1",
        g1.group,
        &[(NAME, "", "$name1"), ("m.topic", "", "$topic")],
    );
    let g3 = prepare(
        &store,
        "$leave1b",
        g2.group,
        &[(MEMBER, "@u1:test", "$ban1")],
    );
    for (cache, what) in [
        (store.caches().members(), "members"),
        (store.caches().non_members(), "other state"),
    ] {
        assert!(
            !cache.holds_full(&snapshot),
            "preparing deltas read the prev group's whole {what}"
        );
    }
    let mut want2 = base.clone();
    want2.insert(key(MEMBER, "@u1:test"), "$leave1".into());
    want2.insert(key(NAME, ""), "$name1".into());
    want2.insert(key("m.topic", ""), "$topic".into());
    let mut want3 = want2.clone();
    want3.insert(key(MEMBER, "@u1:test"), "$ban1".into());
    check_reads(&store, g2.group, &want2, "prepared over a cold group");
    check_reads(&store, g3.group, &want3, "prepared over a prepared group");

    // Once the group below them is held whole, a delta above prepared
    // deltas is derived from it.
    let g4 = prepare(
        &store,
        "$join2",
        g3.group,
        &[(MEMBER, "@u2:test", "$rejoin2")],
    );
    let mut want4 = want3.clone();
    want4.insert(key(MEMBER, "@u2:test"), "$rejoin2".into());
    check_reads(&store, g4.group, &want4, "prepared over a group held whole");

    // Written by their batch, they read the same from the database.
    let prepared = [g1, g2, g3, g4];
    store
        .database()
        .run_interaction("store_prepared", |txn: &mut Transaction<'_>| {
            store.store_prepared_groups_txn(txn, &prepared)
        })
        .unwrap();
    assert_eq!(store.prepared_groups_waiting(), 0);
    let fresh = cold(&store);
    check_reads(&fresh, prepared[2].group, &want3, "written");
    check_reads(&fresh, prepared[3].group, &want4, "written");
}
