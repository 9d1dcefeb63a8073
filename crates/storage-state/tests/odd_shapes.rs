//! Reads of Synapse-shaped tables in shapes our writer never makes: Synapse's
//! `state_groups_state` has no unique key, its `state_group_edges` allows two
//! prev groups for one group, and a hand-edited or corrupt database may hold
//! an edge to a higher group, a cycle, or an edge to a group that is gone.
//!
//! Every read of a group must give the same answer whichever way it is read:
//! full or filtered (the filtered reads take other statements: the per-hop
//! walk on SQLite, the per-slot seeks on PostgreSQL, the recursive query for a
//! wildcard), cold or from caches another filter filled, one group at a time
//! or all at once; and no read may loop. A chain goes down edges to lower
//! groups only (an edge up ends it: Synapse would loop on a cycle); per slot
//! the row of the highest group on it counts (as Synapse's query keeps), of
//! both chains of a group with two prev groups (each group read once, however
//! many ways lead to it), and of two rows for one slot in one group, the
//! smaller event id.
//! Each test runs on SQLite and PostgreSQL.

mod common;

use common::*;
use std::collections::BTreeMap;
use storage_core::testing::TestDb;
use storage_state::{StateFilter, StateGroupAccess, StateMap};

storage_core::engine_tests!(
    odd_shapes_read_the_same_whichever_way,
    a_long_chain_and_empty_groups_read_the_same_whichever_way,
    an_event_mapped_to_a_missing_group_names_it,
    stacked_groups_with_two_prev_groups_each_read_in_linear_time,
);

fn exec(t: &TestDb, sql: &str) {
    t.raw_connection().batch_execute(sql).expect(sql);
}

fn values<T>(items: &[T], f: impl Fn(&T) -> String) -> String {
    items.iter().map(f).collect::<Vec<_>>().join(", ")
}

/// Groups, edges `(group, prev)` and rows `(group, type, state_key, event)`,
/// written as they are given.
fn tables(t: &TestDb, groups: &[i64], edges: &[(i64, i64)], rows: &[(i64, &str, &str, &str)]) {
    exec(
        t,
        &format!(
            "INSERT INTO state_groups (id, room_id, event_id) VALUES {}; \
             INSERT INTO state_group_edges (state_group, prev_state_group) VALUES {}; \
             INSERT INTO state_groups_state (state_group, room_id, type, state_key, event_id) \
             VALUES {}",
            values(groups, |g| format!("({g}, '{ROOM}', '$g{g}')")),
            values(edges, |(g, p)| format!("({g}, {p})")),
            values(rows, |(g, ty, k, e)| format!(
                "({g}, '{ROOM}', '{ty}', '{k}', '{e}')"
            )),
        ),
    );
}

fn sorted(state: &StateMap) -> BTreeMap<(String, String), String> {
    state
        .iter()
        .map(|((t, k), e)| ((t.to_string(), k.to_string()), e.to_string()))
        .collect()
}

fn filters() -> Vec<(&'static str, StateFilter)> {
    vec![
        ("the name", StateFilter::from_types([(NAME, Some(""))])),
        (
            "lazy-loaded members",
            StateFilter::from_lazy_load_member_list(["@a:test", "@b:test"]),
        ),
        ("the members", StateFilter::from_types([(MEMBER, None)])),
        (
            "a member and the create event",
            StateFilter::from_types([(MEMBER, Some("@a:test")), (CREATE, Some(""))]),
        ),
        ("all", StateFilter::all()),
    ]
}

fn odd_shapes_read_the_same_whichever_way(t: &TestDb) {
    let store = store(t);
    // 1: a snapshot, 2: a delta on it (the shape our writer makes).
    // 10: an edge up to 20, a snapshot. 30 and 31: each the other's prev.
    // 40: an edge to 999, which does not exist. 50: two rows for each of two
    // slots, the larger event id written first for one and last for the
    // other. 60: its own prev. 70: two prev groups, 1 and 20.
    tables(
        t,
        &[1, 2, 10, 20, 30, 31, 40, 50, 60, 70],
        &[
            (2, 1),
            (10, 20),
            (30, 31),
            (31, 30),
            (40, 999),
            (60, 60),
            (70, 1),
            (70, 20),
        ],
        &[
            (1, CREATE, "", "$c1"),
            (1, NAME, "", "$n1"),
            (1, MEMBER, "@a:test", "$a1"),
            (2, MEMBER, "@b:test", "$b2"),
            (10, MEMBER, "@a:test", "$a10"),
            (20, CREATE, "", "$c20"),
            (20, NAME, "", "$n20"),
            (20, MEMBER, "@a:test", "$a20"),
            (30, NAME, "", "$n30"),
            (31, NAME, "", "$n31"),
            (31, MEMBER, "@a:test", "$a31"),
            (40, MEMBER, "@a:test", "$a40"),
            (50, NAME, "", "$n50y"),
            (50, MEMBER, "@a:test", "$a50x"),
            (50, NAME, "", "$n50x"),
            (50, MEMBER, "@a:test", "$a50y"),
            (60, NAME, "", "$n60"),
            (70, MEMBER, "@b:test", "$b70"),
        ],
    );
    let expected: Vec<(i64, StateMap)> = vec![
        (
            2,
            state(&[
                (CREATE, "", "$c1"),
                (NAME, "", "$n1"),
                (MEMBER, "@a:test", "$a1"),
                (MEMBER, "@b:test", "$b2"),
            ]),
        ),
        // Edges up are not followed: the chain ends there.
        (10, state(&[(MEMBER, "@a:test", "$a10")])),
        (30, state(&[(NAME, "", "$n30")])),
        (
            31,
            state(&[(NAME, "", "$n31"), (MEMBER, "@a:test", "$a31")]),
        ),
        (40, state(&[(MEMBER, "@a:test", "$a40")])),
        (
            50,
            state(&[(NAME, "", "$n50x"), (MEMBER, "@a:test", "$a50x")]),
        ),
        (60, state(&[(NAME, "", "$n60")])),
        (
            70,
            state(&[
                (CREATE, "", "$c20"),
                (NAME, "", "$n20"),
                (MEMBER, "@a:test", "$a20"),
                (MEMBER, "@b:test", "$b70"),
            ]),
        ),
    ];
    assert_reads(&store, &expected);
}

/// Each group's state under each of [`filters`] is its expected state
/// filtered: read cold one group at a time and all groups at once, and from
/// caches that each other filter filled first.
fn assert_reads(store: &storage_state::StateStore, expected: &[(i64, StateMap)]) {
    let ids: Vec<i64> = expected.iter().map(|(g, _)| *g).collect();
    for (name, filter) in filters() {
        let all = cold(store).get_state_for_groups(&ids, &filter).unwrap();
        let warm = cold(store);
        for (g, full) in expected {
            let want = sorted(&filter.filter_state(full));
            let got = cold(store).get_state_for_groups(&[*g], &filter).unwrap();
            assert_eq!(sorted(&got[g]), want, "group {g}, {name}, cold");
            assert_eq!(sorted(&all[g]), want, "group {g}, {name}, all at once");
            for (other, first) in filters() {
                warm.get_state_for_groups(&[*g], &first).unwrap();
                let got = warm.get_state_for_groups(&[*g], &filter).unwrap();
                assert_eq!(sorted(&got[g]), want, "group {g}, {name} after {other}");
            }
        }
    }
}

/// Synapse's chains may be longer than the 100 hops our writer allows (its
/// limit came late, and the compressor of others makes its own), and hold
/// groups without rows: a 250-hop chain whose members and name sit at
/// every depth, a delta group with no rows on it, and a snapshot of nothing.
fn a_long_chain_and_empty_groups_read_the_same_whichever_way(t: &TestDb) {
    let store = store(t);
    let top = 251;
    let mut groups: Vec<i64> = (1..=top).collect();
    groups.extend([300, 301]);
    let mut edges: Vec<(i64, i64)> = (2..=top).map(|g| (g, g - 1)).collect();
    edges.push((300, 200));
    // Group g's one row: the create event at the bottom, @a and @b joining
    // on 2 and 3 and @a again on 130, the name on every 50th from 7, and a
    // member of its own otherwise; its event id names its group.
    let row = |g: i64| -> (&'static str, String) {
        match g {
            1 => (CREATE, String::new()),
            2 | 130 => (MEMBER, "@a:test".to_owned()),
            3 => (MEMBER, "@b:test".to_owned()),
            g if g % 50 == 7 => (NAME, String::new()),
            g => (MEMBER, format!("@u{g}:test")),
        }
    };
    let owned: Vec<(i64, &str, String, String)> = (1..=top)
        .map(|g| {
            let (ty, key) = row(g);
            (g, ty, key, format!("$e{g}"))
        })
        .collect();
    let rows: Vec<(i64, &str, &str, &str)> = owned
        .iter()
        .map(|(g, ty, key, e)| (*g, *ty, key.as_str(), e.as_str()))
        .collect();
    tables(t, &groups, &edges, &rows);
    let state_at = |top: i64| -> StateMap {
        rows.iter()
            .filter(|(g, ..)| *g <= top)
            .map(|(_, ty, key, e)| (storage_state::key(ty, key), (*e).into()))
            .collect()
    };
    assert_reads(
        &store,
        &[
            (top, state_at(top)),
            (129, state_at(129)),
            (130, state_at(130)),
            (9, state_at(9)),
            (300, state_at(200)),
            (301, StateMap::new()),
        ],
    );
}

/// Sixty groups, each (from the third) with two prev groups, the two below
/// it: the chains of the top group hold 60 groups but about 10^12 paths down
/// them. A walk that follows every path (a `UNION ALL` recursion) does not
/// finish; each group must be read once. Group g holds the member `@u{g}`,
/// and every 7th group the name as well: per slot the highest group wins.
fn stacked_groups_with_two_prev_groups_each_read_in_linear_time(t: &TestDb) {
    let store = store(t);
    let top = 60;
    let groups: Vec<i64> = (1..=top).collect();
    let mut edges: Vec<(i64, i64)> = vec![(2, 1)];
    for g in 3..=top {
        edges.extend([(g, g - 1), (g, g - 2)]);
    }
    let owned: Vec<(i64, &str, String, String)> = (1..=top)
        .flat_map(|g| {
            let member = (g, MEMBER, format!("@u{g}:test"), format!("$m{g}"));
            let name = (g % 7 == 0).then(|| (g, NAME, String::new(), format!("$n{g}")));
            std::iter::once(member).chain(name)
        })
        .collect();
    let rows: Vec<(i64, &str, &str, &str)> = owned
        .iter()
        .map(|(g, ty, key, e)| (*g, *ty, key.as_str(), e.as_str()))
        .collect();
    tables(t, &groups, &edges, &rows);
    let state_at = |top: i64| -> StateMap {
        owned
            .iter()
            .filter(|(g, ..)| *g <= top)
            .map(|(_, ty, key, e)| (storage_state::key(ty, key), e.as_str().into()))
            .collect()
    };
    assert_reads(
        &store,
        &[
            (top, state_at(top)),
            (top - 1, state_at(top - 1)),
            (43, state_at(43)),
            (2, state_at(2)),
        ],
    );
}

/// The event's state is gone: inconsistent data naming the event and the
/// group, whether asked for by the event or by the group; a group no event
/// maps to is only not found.
fn an_event_mapped_to_a_missing_group_names_it(t: &TestDb) {
    let store = store(t);
    tables(t, &[1], &[(1, 1)], &[(1, CREATE, "", "$c1")]);
    map_events(&store, &[("$known", 1)]);
    exec(
        t,
        "INSERT INTO event_to_state_groups (event_id, state_group) VALUES ('$orphan', 4242)",
    );
    for filter in [
        StateFilter::all(),
        StateFilter::from_types([(NAME, Some(""))]),
    ] {
        let err = cold(&store)
            .get_state_for_event("$orphan", &filter)
            .unwrap_err();
        assert!(
            matches!(err.kind(), storage_core::ErrorKind::Corrupt(_)),
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains("4242") && text.contains("$orphan"), "{err}");
        let err = cold(&store)
            .get_state_for_groups(&[4242], &filter)
            .unwrap_err();
        assert!(
            matches!(err.kind(), storage_core::ErrorKind::Corrupt(_)),
            "{err}"
        );
        assert!(err.to_string().contains("$orphan"), "{err}");
        let err = cold(&store)
            .get_state_for_groups(&[5555], &filter)
            .unwrap_err();
        assert!(err.is_not_found(), "{err}");
        assert_eq!(
            sorted(&cold(&store).get_state_for_event("$known", &filter).unwrap()),
            sorted(&filter.filter_state(&state(&[(CREATE, "", "$c1")])))
        );
    }
}
