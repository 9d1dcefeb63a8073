//! Purging the state groups no event's state needs: unreferenced groups go,
//! with their rows and edges; groups that events reference, and the groups
//! their chains pass through, stay with their state unchanged; nothing above
//! the bound is touched; the purging store forgets what it cached of the
//! deleted groups. On SQLite and PostgreSQL.

mod common;

use common::*;
use storage_core::testing::TestDb;
use storage_core::with_conn;
use storage_state::{
    purge_unneeded_groups, NewStateGroup, StateFilter, StateGroupAccess, StateMap,
};

storage_core::engine_tests!(unneeded_groups_go_and_needed_ones_stay);

fn group_ids(t: &TestDb) -> Vec<i64> {
    use diesel::prelude::*;
    use storage_state::schema::state_groups as g;
    let mut ids: Vec<i64> =
        with_conn!(&mut t.raw_connection(), |c| g::table.select(g::id).load(c)).unwrap();
    ids.sort();
    ids
}

fn unneeded_groups_go_and_needed_ones_stay(t: &TestDb) {
    let store = store(t);
    let s1 = state(&[(CREATE, "", "$c")]);
    let g1 = store
        .store_state_group(&NewStateGroup::snapshot("$c", ROOM, &s1))
        .unwrap();
    let d2 = state(&[(NAME, "", "$n")]);
    let g2 = store
        .store_state_group(&NewStateGroup::delta("$n", ROOM, g1, &d2))
        .unwrap();
    let d3 = state(&[(MEMBER, "@a:test", "$a")]);
    let g3 = store
        .store_state_group(&NewStateGroup::delta("$a", ROOM, g2, &d3))
        .unwrap();
    // A refused write's chain: g4 on g1, g5 on g4; and a lone snapshot g6.
    let g4 = store
        .store_state_group(&NewStateGroup::delta(
            "$x",
            ROOM,
            g1,
            &state(&[(NAME, "", "$x")]),
        ))
        .unwrap();
    let g5 = store
        .store_state_group(&NewStateGroup::delta(
            "$y",
            ROOM,
            g4,
            &state(&[(NAME, "", "$y")]),
        ))
        .unwrap();
    let g6 = store
        .store_state_group(&NewStateGroup::snapshot(
            "$z",
            ROOM,
            &state(&[(CREATE, "", "$z")]),
        ))
        .unwrap();
    // Above the bound: untouched although unneeded.
    let g7 = store
        .store_state_group(&NewStateGroup::snapshot("$w", ROOM, &StateMap::new()))
        .unwrap();
    // $c and $a are stored events; g2 is needed only by g3's chain.
    map_events(&store, &[("$c", g1), ("$a", g3)]);
    let before = store
        .get_state_for_groups(&[g3], &StateFilter::all())
        .unwrap();

    let dry = purge_unneeded_groups(&store, g6, true).unwrap();
    assert_eq!((dry.candidates, dry.groups), (3, 0));
    assert_eq!(group_ids(t), vec![g1, g2, g3, g4, g5, g6, g7]);

    let report = purge_unneeded_groups(&store, g6, false).unwrap();
    assert_eq!((report.candidates, report.groups, report.rows), (3, 3, 3));
    assert_eq!(group_ids(t), vec![g1, g2, g3, g7]);
    let after = cold(&store)
        .get_state_for_groups(&[g3], &StateFilter::all())
        .unwrap();
    assert_eq!(before, after);
    assert!(!store.is_group_referenced(g2).unwrap());
    assert!(store.is_group_referenced(g3).unwrap());
    // The purging store, which wrote the deleted groups and cached them,
    // forgets them: a read of one is refused as a fresh store refuses it, and
    // so is a delta on one (its state would lack the deleted group's rows).
    for s in [&store, &cold(&store)] {
        for g in [g4, g5, g6] {
            let err = s
                .get_state_for_groups(&[g], &StateFilter::all())
                .unwrap_err();
            assert!(err.is_not_found(), "group {g}: {err}");
            let err = s
                .store_state_group(&NewStateGroup::delta(
                    "$v",
                    ROOM,
                    g,
                    &state(&[(NAME, "", "$v")]),
                ))
                .unwrap_err();
            assert!(
                err.to_string()
                    .contains(&format!("unpersisted prev_group: {g}")),
                "delta on group {g}: {err}"
            );
        }
    }
    // Nothing is left to purge up to the bound; above it, g7 goes.
    assert_eq!(purge_unneeded_groups(&store, g6, false).unwrap().groups, 0);
    assert_eq!(purge_unneeded_groups(&store, g7, false).unwrap().groups, 1);
    assert_eq!(group_ids(t), vec![g1, g2, g3]);
}
