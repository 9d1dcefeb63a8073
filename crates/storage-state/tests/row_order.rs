//! Full-state reads do not depend on where a group's rows lie in the table.
//!
//! On SQLite a group's rows are read by their range of rowids when that range
//! is dense (they were inserted together), and through the index otherwise
//! (`storage_state::sql::chain_rows_by_range`). Here the rows are written by
//! hand in orders the store never writes: two groups' rows interleaved one by
//! one (a range half of whose rows belong to the other group: still read by
//! range, the other group's rows filtered out), and a group whose rows are
//! spread among three others' (read through the index), with deltas that
//! override their prev group's slots. Groups whose rows were inserted in index
//! order (as the store writes them) are read through the index: one so
//! written, a delta on it, a group of one row, and one whose ends alone are in
//! index order (the probe that tells the orders apart looks only at the ends:
//! misjudged, it must still read right). A delta whose rows are read by range
//! on a prev group read through the index comes to the reader after its prev
//! group's rows (the reader keeps each slot's row of the highest group in
//! whatever order rows arrive). Each group's full state, read cold,
//! must be exactly what its rows say, one group at a time and all at once.
//! Each test runs on SQLite and PostgreSQL.

mod common;

use common::*;
use std::collections::BTreeMap;
use storage_core::testing::TestDb;
use storage_state::{StateFilter, StateGroupAccess};

storage_core::engine_tests!(full_state_reads_agree_wherever_the_rows_lie);

/// One state row: group, type, state key, event id.
type Row = (i64, String, String, String);

fn member_rows(group: i64, users: std::ops::Range<usize>, tag: &str) -> Vec<Row> {
    users
        .map(|u| {
            (
                group,
                MEMBER.to_owned(),
                format!("@u{u}:test"),
                format!("${tag}-{u}"),
            )
        })
        .collect()
}

fn insert(t: &TestDb, rows: &[Row]) {
    let values: Vec<String> = rows
        .iter()
        .map(|(g, ty, k, e)| format!("({g}, '{ROOM}', '{ty}', '{k}', '{e}')"))
        .collect();
    t.raw_connection()
        .batch_execute(&format!(
            "INSERT INTO state_groups_state (state_group, room_id, type, state_key, event_id) \
             VALUES {}",
            values.join(", ")
        ))
        .expect("inserting state rows");
}

/// `rows` in the order of the index on `(state_group, type, state_key)`.
fn in_index_order(mut rows: Vec<Row>) -> Vec<Row> {
    rows.sort();
    rows
}

/// Every second row from `a`, the others from `b`, while both last.
fn interleave(a: Vec<Row>, b: Vec<Row>) -> Vec<Row> {
    let mut out = Vec::new();
    let (mut a, mut b) = (a.into_iter(), b.into_iter());
    loop {
        match (a.next(), b.next()) {
            (None, None) => return out,
            (x, y) => out.extend(x.into_iter().chain(y)),
        }
    }
}

fn full_state_reads_agree_wherever_the_rows_lie(t: &TestDb) {
    let store = store(t);
    let mut raw = t.raw_connection();
    // 1: a snapshot; 2 and 3: deltas on 1; 4: a snapshot; 5, 6, 7: snapshots
    // whose rows surround 4's; 8: a delta on 4; 9: a snapshot in index order,
    // 10: a delta on 9 in index order; 11: one row; 12: only its ends in
    // index order; 13: a snapshot in index order, 14: a delta on 13 whose
    // rows are interleaved with 15's, a snapshot.
    raw.batch_execute(&format!(
        "INSERT INTO state_groups (id, room_id, event_id) VALUES \
         (1, '{ROOM}', '$g1'), (2, '{ROOM}', '$g2'), (3, '{ROOM}', '$g3'), \
         (4, '{ROOM}', '$g4'), (5, '{ROOM}', '$g5'), (6, '{ROOM}', '$g6'), \
         (7, '{ROOM}', '$g7'), (8, '{ROOM}', '$g8'), (9, '{ROOM}', '$g9'), \
         (10, '{ROOM}', '$g10'), (11, '{ROOM}', '$g11'), (12, '{ROOM}', '$g12'), \
         (13, '{ROOM}', '$g13'), (14, '{ROOM}', '$g14'), (15, '{ROOM}', '$g15'); \
         INSERT INTO state_group_edges (state_group, prev_state_group) VALUES \
         (2, 1), (3, 1), (8, 4), (10, 9), (14, 13)"
    ))
    .expect("inserting groups");
    drop(raw);

    let mut rows: Vec<Row> = member_rows(1, 0..40, "one");
    rows.push((1, CREATE.to_owned(), String::new(), "$create".to_owned()));
    insert(t, &rows);
    // 2 overrides members 0..30 and adds 40..50; 3 overrides 10..40.
    let two = member_rows(2, 0..30, "two")
        .into_iter()
        .chain(member_rows(2, 40..50, "two"))
        .collect();
    let three = member_rows(3, 10..40, "three");
    let both = interleave(two, three);
    insert(t, &both);
    // 4's rows one in four, between rows of 5, 6 and 7.
    let mut spread = Vec::new();
    for u in 0..30 {
        for g in [5, 6, 7, 4] {
            spread.extend(member_rows(g, u..u + 1, &format!("g{g}")));
        }
    }
    spread.push((4, NAME.to_owned(), String::new(), "$name".to_owned()));
    insert(t, &spread);
    // 8: part of its rows in one statement, the rest after other groups'.
    insert(t, &member_rows(8, 0..5, "eight"));
    insert(t, &member_rows(5, 100..120, "late"));
    insert(t, &member_rows(8, 25..35, "eight"));

    // 9 and 10 in index order, each in one statement: 9 holds the create and
    // name events (its first and last rows) beside 40 members; 10 overrides
    // 9's name and members 0..10 and adds 50..60.
    let mut nine = member_rows(9, 0..40, "nine");
    nine.push((9, CREATE.to_owned(), String::new(), "$create9".to_owned()));
    nine.push((9, NAME.to_owned(), String::new(), "$name9".to_owned()));
    let nine = in_index_order(nine);
    insert(t, &nine);
    let ten = in_index_order(
        member_rows(10, 0..10, "ten")
            .into_iter()
            .chain(member_rows(10, 50..60, "ten"))
            .chain([(10, NAME.to_owned(), String::new(), "$name10".to_owned())])
            .collect(),
    );
    insert(t, &ten);
    let eleven = vec![(11, CREATE.to_owned(), String::new(), "$create11".to_owned())];
    insert(t, &eleven);
    // 12: its first two and last two rows in index order, the rest reversed.
    let mut twelve = in_index_order(member_rows(12, 0..20, "twelve"));
    twelve[2..18].reverse();
    insert(t, &twelve);
    // 13 in index order; 14 (overriding 13's name and members 0..10, adding
    // 30..35) interleaved with 15.
    let mut thirteen = member_rows(13, 0..30, "thirteen");
    thirteen.push((13, NAME.to_owned(), String::new(), "$name13".to_owned()));
    let thirteen = in_index_order(thirteen);
    insert(t, &thirteen);
    let mut fourteen = member_rows(14, 0..10, "fourteen");
    fourteen.extend(member_rows(14, 30..35, "fourteen"));
    fourteen.push((14, NAME.to_owned(), String::new(), "$name14".to_owned()));
    let fourteen_and_fifteen = interleave(fourteen, member_rows(15, 0..16, "fifteen"));
    insert(t, &fourteen_and_fifteen);

    // What each group's state must be, from the rows and the edges.
    let mut own: BTreeMap<i64, BTreeMap<(String, String), String>> = BTreeMap::new();
    let all_rows = rows
        .iter()
        .chain(&both)
        .chain(&spread)
        .cloned()
        .chain(member_rows(8, 0..5, "eight"))
        .chain(member_rows(5, 100..120, "late"))
        .chain(member_rows(8, 25..35, "eight"))
        .chain(nine)
        .chain(ten)
        .chain(eleven)
        .chain(twelve)
        .chain(thirteen)
        .chain(fourteen_and_fifteen);
    for (g, ty, k, e) in all_rows {
        own.entry(g).or_default().insert((ty, k), e);
    }
    let prev = BTreeMap::from([(2, 1), (3, 1), (8, 4), (10, 9), (14, 13)]);
    let expected = |g: i64| {
        let mut state = prev.get(&g).map(|p| own[p].clone()).unwrap_or_default();
        state.extend(own[&g].clone());
        state
    };
    let as_map = |state: &storage_state::StateMap| -> BTreeMap<(String, String), String> {
        state
            .iter()
            .map(|((ty, k), e)| ((ty.to_string(), k.to_string()), e.to_string()))
            .collect()
    };

    let groups: Vec<i64> = (1..=15).collect();
    for &g in &groups {
        let read = cold(&store)
            .get_state_for_groups(&[g], &StateFilter::all())
            .unwrap();
        assert_eq!(as_map(&read[&g]), expected(g), "group {g} read alone");
    }
    let read = cold(&store)
        .get_state_for_groups(&groups, &StateFilter::all())
        .unwrap();
    for &g in &groups {
        assert_eq!(
            as_map(&read[&g]),
            expected(g),
            "group {g} read with the others"
        );
    }
    // The overrides took: not merely every row of the chain.
    assert_eq!(
        expected(2)[&(MEMBER.to_owned(), "@u5:test".to_owned())],
        "$two-5"
    );
    assert_eq!(
        expected(3)[&(MEMBER.to_owned(), "@u5:test".to_owned())],
        "$one-5"
    );
    assert_eq!(expected(8).len(), 31 + 5);
    assert_eq!(
        expected(10)[&(MEMBER.to_owned(), "@u0:test".to_owned())],
        "$ten-0"
    );
    assert_eq!(expected(10).len(), 2 + 50);
    assert_eq!(
        expected(14)[&(MEMBER.to_owned(), "@u3:test".to_owned())],
        "$fourteen-3"
    );
    assert_eq!(expected(14)[&(NAME.to_owned(), String::new())], "$name14");
    assert_eq!(expected(14).len(), 1 + 35);
}
