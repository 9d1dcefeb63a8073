//! The state store against Synapse's own storage tests for state
//! (tests/storage/test_state.py), and more. Each test runs on SQLite and PostgreSQL.

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use storage_core::testing::TestDb;
use storage_core::{with_conn, ErrorKind};
use storage_state::{
    CacheKind, NewStateGroup, StateFilter, StateGroupAccess, StateMap, StateStore,
};

storage_core::engine_tests!(
    state_after_an_event_includes_the_event,
    filters_on_state_for_event,
    per_cache_lookups_full_then_partial,
    partially_filled_cache_serves_member_and_non_member_requests,
    unknown_group_and_event_are_errors,
    empty_snapshot_reads_as_empty,
    two_groups_sharing_a_prev_group,
    named_slots_read_the_newest_row_on_their_own_chain,
    batch_of_groups_in_one_transaction,
    prefill_only_after_commit,
    invalid_arguments_are_rejected,
    current_state_of_a_room,
    room_of_a_group,
);

/// The linear DAG of Synapse's test_get_state_for_event: create, name, alice
/// joins, bob joins, bob leaves; each state event gets a group that is a delta
/// against the previous one, as event persistence stores them.
fn linear_room(store: &StateStore) -> Vec<i64> {
    let events = [
        ("$e1", CREATE, ""),
        ("$e2", NAME, ""),
        ("$e3", MEMBER, "@alice:test"),
        ("$e4", MEMBER, "@bob:test"),
        ("$e5", MEMBER, "@bob:test"),
    ];
    let mut groups = Vec::new();
    let mut current = StateMap::new();
    for (event_id, t, k) in events {
        let delta = state(&[(t, k, event_id)]);
        current.extend(delta.clone());
        let group = store
            .store_state_group(&NewStateGroup {
                event_id,
                room_id: ROOM,
                prev_group: groups.last().copied(),
                delta_ids: groups.last().map(|_| &delta),
                current_state_ids: Some(&current),
            })
            .unwrap();
        groups.push(group);
        map_events(store, &[(event_id, group)]);
    }
    groups
}

/// test_get_state_groups_ids: the group after e2 holds e1 and e2 itself.
fn state_after_an_event_includes_the_event(t: &TestDb) {
    let store = store(t);
    linear_room(&store);
    for s in [&store, &cold(&store)] {
        let groups = s.get_state_group_for_events(&["$e2"]).unwrap();
        assert_eq!(groups.len(), 1);
        let g = groups["$e2"];
        let got = s.get_state_for_groups(&[g], &StateFilter::all()).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[&g], state(&[(CREATE, "", "$e1"), (NAME, "", "$e2")]));
    }
}

/// test_get_state_for_event with every filter of the upstream test, from warm
/// caches, from a cold store, and from a cold store asking the narrow filter first.
fn filters_on_state_for_event(t: &TestDb) {
    let store = store(t);
    linear_room(&store);
    let set = |keys: &[&str]| Some(keys.iter().map(|k| k.to_string()).collect::<BTreeSet<_>>());
    let cases: Vec<(StateFilter, StateMap)> = vec![
        (
            StateFilter::all(),
            state(&[
                (CREATE, "", "$e1"),
                (NAME, "", "$e2"),
                (MEMBER, "@alice:test", "$e3"),
                (MEMBER, "@bob:test", "$e5"),
            ]),
        ),
        (
            StateFilter::from_types([(NAME, Some(""))]),
            state(&[(NAME, "", "$e2")]),
        ),
        (
            StateFilter::from_types([(NAME, None)]),
            state(&[(NAME, "", "$e2")]),
        ),
        (
            StateFilter::from_types([(MEMBER, None)]),
            state(&[(MEMBER, "@alice:test", "$e3"), (MEMBER, "@bob:test", "$e5")]),
        ),
        (
            StateFilter::new(
                BTreeMap::from([(MEMBER.to_owned(), set(&["@alice:test"]))]),
                true,
            ),
            state(&[
                (CREATE, "", "$e1"),
                (NAME, "", "$e2"),
                (MEMBER, "@alice:test", "$e3"),
            ]),
        ),
        (
            StateFilter::new(BTreeMap::from([(MEMBER.to_owned(), set(&[]))]), true),
            state(&[(CREATE, "", "$e1"), (NAME, "", "$e2")]),
        ),
        (
            StateFilter::from_types([(MEMBER, Some("@nobody:test"))]),
            state(&[]),
        ),
        (StateFilter::none(), state(&[])),
    ];
    for (filter, expected) in &cases {
        assert_eq!(
            &store.get_state_for_event("$e5", filter).unwrap(),
            expected,
            "warm {filter:?}"
        );
        let c = cold(&store);
        assert_eq!(
            &c.get_state_for_event("$e5", filter).unwrap(),
            expected,
            "cold {filter:?}"
        );
        // The same cold store, after the read above filled its caches in part.
        for (other, other_expected) in &cases {
            assert_eq!(
                &c.get_state_for_event("$e5", other).unwrap(),
                other_expected,
                "after {filter:?}: {other:?}"
            );
        }
    }
}

/// The per-cache lookup tables of test_get_state_for_event (F1-F7 against full
/// caches, P1-P8 after the non-member entry is made partial).
fn per_cache_lookups_full_then_partial(t: &TestDb) {
    let store = cold(&store(t));
    let groups = linear_room(&store);
    let store = cold(&store);
    let group = groups[4];
    // Warms both caches with the full state.
    store
        .get_state_for_groups(&[group], &StateFilter::all())
        .unwrap();

    let set = |keys: &[&str]| Some(keys.iter().map(|k| k.to_string()).collect::<BTreeSet<_>>());
    let f = |members: Option<BTreeSet<String>>, others: bool| {
        StateFilter::new(BTreeMap::from([(MEMBER.to_owned(), members)]), others)
    };
    let (nm, m) = (CacheKind::NonMembers, CacheKind::Members);
    let non_members = state(&[(CREATE, "", "$e1"), (NAME, "", "$e2")]);
    let members = state(&[(MEMBER, "@alice:test", "$e3"), (MEMBER, "@bob:test", "$e5")]);
    let bob = state(&[(MEMBER, "@bob:test", "$e5")]);
    let full_cases = [
        ("F1", nm, f(set(&[]), true), non_members.clone(), true),
        ("F2", m, f(set(&[]), true), state(&[]), true),
        ("F3", nm, f(None, true), non_members.clone(), true),
        ("F4", m, f(None, true), members.clone(), true),
        (
            "F5",
            nm,
            f(set(&["@bob:test"]), true),
            non_members.clone(),
            true,
        ),
        ("F6", m, f(set(&["@bob:test"]), true), bob.clone(), true),
        ("F7", m, f(set(&["@bob:test"]), false), bob.clone(), true),
    ];
    for (name, cache, filter, expected, complete) in full_cases {
        assert_eq!(
            store.state_from_cache(cache, group, &filter),
            (expected, complete),
            "{name}"
        );
    }

    // Make the non-member entry partial: only the create event, fetched on its own.
    let cache = store.caches().non_members();
    let entry = cache.get(&group);
    assert!(entry.full && entry.known_absent.is_empty());
    assert_eq!(StateMap::from_iter(entry.value.clone()), non_members);
    cache.invalidate(&group);
    let create_only = state(&[(CREATE, "", "$e1")]);
    cache.update(
        cache.sequence(),
        group,
        create_only.clone(),
        Some(&[storage_state::key(CREATE, "")]),
    );
    let entry = cache.get(&group);
    assert!(!entry.full);
    assert_eq!(StateMap::from_iter(entry.value.clone()), create_only);

    let partial_cases = [
        ("P1", nm, f(set(&[]), true), create_only.clone(), false),
        ("P2", m, f(set(&[]), true), state(&[]), true),
        ("P3", nm, f(None, true), create_only.clone(), false),
        ("P4", m, f(None, true), members.clone(), true),
        (
            "P5",
            nm,
            f(set(&["@bob:test"]), true),
            create_only.clone(),
            false,
        ),
        ("P6", m, f(set(&["@bob:test"]), true), bob.clone(), true),
        ("P7", nm, f(set(&["@bob:test"]), false), state(&[]), false),
        ("P8", m, f(set(&["@bob:test"]), false), bob.clone(), true),
    ];
    for (name, cache, filter, expected, complete) in partial_cases {
        assert_eq!(
            store.state_from_cache(cache, group, &filter),
            (expected, complete),
            "{name}"
        );
    }
    // And the store still answers everything right, going to the database where
    // the partial entry is not enough.
    assert_eq!(
        store
            .get_state_for_groups(&[group], &StateFilter::all())
            .unwrap()[&group],
        state(&[
            (CREATE, "", "$e1"),
            (NAME, "", "$e2"),
            (MEMBER, "@alice:test", "$e3"),
            (MEMBER, "@bob:test", "$e5")
        ])
    );
}

/// A member-only read fills the member cache; a non-member-only read fills the
/// other. Afterwards the rows are deleted from the database: requests the caches
/// can answer still get the right state, proving they never reached the database,
/// and a request they cannot answer sees the (now empty) database.
fn partially_filled_cache_serves_member_and_non_member_requests(t: &TestDb) {
    let writer = store(t);
    let groups = linear_room(&writer);
    let group = groups[4];
    let store = cold(&writer);
    let bob_only = StateFilter::from_types([(MEMBER, Some("@bob:test"))]);
    let names = StateFilter::from_types([(NAME, None)]);
    assert_eq!(
        store.get_state_for_groups(&[group], &bob_only).unwrap()[&group],
        state(&[(MEMBER, "@bob:test", "$e5")])
    );
    assert_eq!(
        store.get_state_for_groups(&[group], &names).unwrap()[&group],
        state(&[(NAME, "", "$e2")])
    );

    let mut raw = t.raw_connection();
    raw.batch_execute("DELETE FROM state_groups_state").unwrap();

    assert_eq!(
        store.get_state_for_groups(&[group], &bob_only).unwrap()[&group],
        state(&[(MEMBER, "@bob:test", "$e5")])
    );
    // A wildcard on a non-member type fetched all non-member state: the create
    // event is cached too.
    assert_eq!(
        store
            .get_state_for_groups(&[group], &StateFilter::from_types([(CREATE, Some(""))]))
            .unwrap()[&group],
        state(&[(CREATE, "", "$e1")])
    );
    // Alice's membership was never fetched: the database (empty now) answers.
    let alice = StateFilter::from_types([(MEMBER, Some("@alice:test"))]);
    assert_eq!(
        store.get_state_for_groups(&[group], &alice).unwrap()[&group],
        state(&[])
    );
}

fn unknown_group_and_event_are_errors(t: &TestDb) {
    let store = store(t);
    let groups = linear_room(&store);
    let err = store
        .get_state_for_groups(&[groups[0], 987_654], &StateFilter::all())
        .unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::NotFound(_)), "{err}");
    assert!(err.to_string().contains("987654"), "{err}");
    let err = store
        .get_state_for_event("$nope", &StateFilter::all())
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(err.to_string().contains("$nope"), "{err}");
    // Events without a mapping (unknown, outliers) are left out, not errors.
    let found = store
        .get_state_group_for_events(&["$e1", "$outlier"])
        .unwrap();
    assert_eq!(found.keys().collect::<Vec<_>>(), vec!["$e1"]);
    assert!(store.get_state_group_delta(987_654).unwrap().is_none());
}

fn empty_snapshot_reads_as_empty(t: &TestDb) {
    let store = store(t);
    let g = store
        .store_state_group(&NewStateGroup::snapshot("$create", ROOM, &StateMap::new()))
        .unwrap();
    for s in [&store, &cold(&store)] {
        assert_eq!(
            s.get_state_for_groups(&[g], &StateFilter::all()).unwrap()[&g],
            StateMap::new()
        );
        assert_eq!(
            s.get_state_for_groups(&[g], &StateFilter::from_types([(NAME, Some(""))]))
                .unwrap()[&g],
            StateMap::new()
        );
    }
}

fn two_groups_sharing_a_prev_group(t: &TestDb) {
    let store = store(t);
    let base = state(&[(CREATE, "", "$c"), (MEMBER, "@a:test", "$ja")]);
    let g1 = store
        .store_state_group(&NewStateGroup::snapshot("$c", ROOM, &base))
        .unwrap();
    let d2 = state(&[(NAME, "", "$n2")]);
    let d3 = state(&[(MEMBER, "@a:test", "$leave"), (MEMBER, "@b:test", "$jb")]);
    let g2 = store
        .store_state_group(&NewStateGroup::delta("$n2", ROOM, g1, &d2))
        .unwrap();
    let g3 = store
        .store_state_group(&NewStateGroup::delta("$jb", ROOM, g1, &d3))
        .unwrap();
    assert!(g1 < g2 && g2 < g3);
    let mut s2 = base.clone();
    s2.extend(d2.clone());
    let mut s3 = base.clone();
    s3.extend(d3.clone());
    for s in [&store, &cold(&store)] {
        let got = s
            .get_state_for_groups(&[g2, g3, g1], &StateFilter::all())
            .unwrap();
        assert_eq!(
            (got[&g1].clone(), got[&g2].clone(), got[&g3].clone()),
            (base.clone(), s2.clone(), s3.clone())
        );
        let members = s
            .get_state_for_groups(&[g2, g3], &StateFilter::from_types([(MEMBER, None)]))
            .unwrap();
        assert_eq!(members[&g2], state(&[(MEMBER, "@a:test", "$ja")]));
        assert_eq!(
            members[&g3],
            state(&[(MEMBER, "@a:test", "$leave"), (MEMBER, "@b:test", "$jb")])
        );
        assert_eq!(
            s.get_state_group_delta(g2)
                .unwrap()
                .map(|(p, d)| (p, (*d).clone())),
            Some((g1, d2.clone()))
        );
        assert_eq!(
            s.get_state_group_delta(g3)
                .unwrap()
                .map(|(p, d)| (p, (*d).clone())),
            Some((g1, d3.clone()))
        );
        assert!(s.get_state_group_delta(g1).unwrap().is_none());
    }
}

/// Slots named one by one (lazy-loaded members, an auth check) are each read
/// from the highest group on the group's own chain that holds them: a slot set
/// low on the chain and changed higher up reads the newer event, a sibling
/// fork's rows never leak in, a member never in the room reads as absent, and
/// the rest of the filter (other types, a wildcard type) comes beside them.
/// One group at a time and in a batch, from cold caches, then again from what
/// the cold reads left in the caches.
fn named_slots_read_the_newest_row_on_their_own_chain(t: &TestDb) {
    let store = store(t);
    let base = state(&[
        (CREATE, "", "$c"),
        (NAME, "", "$n1"),
        ("m.room.topic", "", "$t1"),
        (MEMBER, "@a:test", "$ja"),
        (MEMBER, "@b:test", "$jb"),
        (MEMBER, "@c:test", "$jc"),
    ]);
    let g1 = store
        .store_state_group(&NewStateGroup::snapshot("$c", ROOM, &base))
        .unwrap();
    // The main line: @a changes twice, @b once, the name once.
    let mut line = vec![(g1, base.clone())];
    for delta in [
        state(&[(MEMBER, "@a:test", "$a2")]),
        state(&[(NAME, "", "$n2"), (MEMBER, "@b:test", "$b2")]),
        state(&[(MEMBER, "@a:test", "$a3")]),
        state(&[(MEMBER, "@d:test", "$jd")]),
    ] {
        let (prev, mut full) = line.last().unwrap().clone();
        full.extend(delta.clone());
        let event = delta.values().next().unwrap().to_string();
        let g = store
            .store_state_group(&NewStateGroup::delta(&event, ROOM, prev, &delta))
            .unwrap();
        line.push((g, full));
    }
    // A fork off the second group that changes @a, @c and the topic.
    let fork_delta = state(&[
        (MEMBER, "@a:test", "$fork_a"),
        (MEMBER, "@c:test", "$fork_c"),
        ("m.room.topic", "", "$fork_t"),
    ]);
    let fork = store
        .store_state_group(&NewStateGroup::delta(
            "$fork_a",
            ROOM,
            line[1].0,
            &fork_delta,
        ))
        .unwrap();
    let mut fork_state = line[1].1.clone();
    fork_state.extend(fork_delta);
    let mut all = line.clone();
    all.push((fork, fork_state));

    let lazy = StateFilter::from_lazy_load_member_list(["@a:test", "@c:test", "@zz:test"]);
    let auth = StateFilter::from_types([
        (CREATE, Some("")),
        (NAME, Some("")),
        (MEMBER, Some("@b:test")),
        (MEMBER, Some("@zz:test")),
    ]);
    let mixed = StateFilter::from_types([
        (NAME, Some("")),
        (MEMBER, Some("@a:test")),
        ("m.room.topic", None),
    ]);
    for filter in [&lazy, &auth, &mixed] {
        let one = cold(&store);
        for (g, expected) in &all {
            let got = one.get_state_for_groups(&[*g], filter).unwrap();
            assert_eq!(
                got[g],
                filter.filter_state(expected),
                "group {g} alone, {filter:?}"
            );
        }
        let groups: Vec<i64> = all.iter().map(|(g, _)| *g).collect();
        let got = cold(&store).get_state_for_groups(&groups, filter).unwrap();
        for (g, expected) in &all {
            assert_eq!(
                got[g],
                filter.filter_state(expected),
                "group {g} in a batch, {filter:?}"
            );
        }
        // Answered again from what the cold read put in the caches, the
        // absent member included.
        for (g, expected) in &all {
            let again = one.get_state_for_groups(&[*g], filter).unwrap();
            assert_eq!(again[g], filter.filter_state(expected), "cached {g}");
        }
    }
    // The newest rows really are the newest: spelled out for the top group.
    let (top, _) = *line.last().unwrap();
    let got = cold(&store).get_state_for_groups(&[top], &lazy).unwrap();
    assert_eq!(
        got[&top]
            .get(&storage_state::key(MEMBER, "@a:test"))
            .map(|e| &**e),
        Some("$a3")
    );
    assert_eq!(
        got[&top]
            .get(&storage_state::key(MEMBER, "@c:test"))
            .map(|e| &**e),
        Some("$jc")
    );
    assert!(got[&top]
        .get(&storage_state::key(MEMBER, "@zz:test"))
        .is_none());
    assert!(!got.contains_key(&fork), "only the group asked for");
}

/// test_batched_state_group_storing: several state events stored in one
/// transaction, each a one-entry delta on the group before it; a message gets no
/// group of its own.
fn batch_of_groups_in_one_transaction(t: &TestDb) {
    let store = store(t);
    let before = store
        .store_state_group(&NewStateGroup::snapshot(
            "$create",
            ROOM,
            &state(&[(CREATE, "", "$create")]),
        ))
        .unwrap();
    let events = [
        ("$1", Some((NAME, ""))),
        ("$2", Some(("m.room.join_rules", ""))),
        ("$3", None),
        ("$4", Some(("m.room.join_rules", ""))),
    ];
    let stored: Vec<(String, i64, i64)> = store
        .database()
        .run_interaction("store_state_deltas_for_batched", |txn| {
            let mut prev = before;
            let mut out = Vec::new();
            for (event_id, slot) in events {
                if let Some((t, k)) = slot {
                    let delta = state(&[(t, k, event_id)]);
                    let new = NewStateGroup::delta(event_id, ROOM, prev, &delta);
                    let g = store.store_state_group_txn(txn, &new)?;
                    out.push((event_id.to_owned(), prev, g));
                    prev = g;
                }
            }
            Ok(out)
        })
        .unwrap();
    assert_eq!(stored.len(), 3);
    let mut raw = t.raw_connection();
    use diesel::prelude::*;
    use storage_state::schema::{
        state_group_edges as edges, state_groups as sg, state_groups_state as sgs,
    };
    let creators: Vec<String> =
        with_conn!(&mut raw, |c| sg::table.select(sg::event_id).load(c)).unwrap();
    assert!(!creators.contains(&"$3".to_owned()));
    for (event_id, before, after) in &stored {
        assert!(creators.contains(event_id));
        let rows: Vec<(String, String, String)> = with_conn!(&mut raw, |c| sgs::table
            .select((sgs::type_, sgs::state_key, sgs::event_id))
            .filter(sgs::state_group.eq(after))
            .load(c))
        .unwrap();
        assert_eq!(rows.len(), 1, "a one-entry delta for {event_id}");
        assert_eq!(&rows[0].2, event_id);
        let prev: i64 = with_conn!(&mut raw, |c| edges::table
            .select(edges::prev_state_group)
            .filter(edges::state_group.eq(after))
            .first(c))
        .unwrap();
        assert_eq!(prev, *before);
    }
    let last = stored.last().unwrap().2;
    assert_eq!(
        cold(&store)
            .get_state_for_groups(&[last], &StateFilter::all())
            .unwrap()[&last],
        state(&[
            (CREATE, "", "$create"),
            (NAME, "", "$1"),
            ("m.room.join_rules", "", "$4")
        ])
    );
}

/// The caches of a new group are filled after its transaction commits, and not
/// at all when it rolls back.
fn prefill_only_after_commit(t: &TestDb) {
    let store = store(t);
    let full = state(&[(CREATE, "", "$c"), (MEMBER, "@a:test", "$j")]);
    let result: storage_core::Result<i64> =
        store.database().run_interaction("store_then_fail", |txn| {
            let new = NewStateGroup::snapshot("$c", ROOM, &full);
            let g = store.store_state_group_txn(txn, &new)?;
            assert!(
                !store.caches().members().get(&g).full,
                "not prefilled before commit"
            );
            Err(storage_core::Error::other(format!("abandoning group {g}")))
        });
    let err = result.unwrap_err().to_string();
    let abandoned: i64 = err.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(!store.caches().members().get(&abandoned).full);
    assert!(!store.caches().non_members().get(&abandoned).full);
    assert!(
        store
            .get_state_for_groups(&[abandoned], &StateFilter::all())
            .is_err(),
        "the group was rolled back"
    );

    let g = store
        .store_state_group(&NewStateGroup::snapshot("$c", ROOM, &full))
        .unwrap();
    assert!(store.caches().members().get(&g).full);
    assert!(store.caches().non_members().get(&g).full);
    // Served from the prefilled caches: the database rows are gone.
    t.raw_connection()
        .batch_execute("DELETE FROM state_groups_state")
        .unwrap();
    assert_eq!(
        store
            .get_state_for_groups(&[g], &StateFilter::all())
            .unwrap()[&g],
        full
    );
}

fn invalid_arguments_are_rejected(t: &TestDb) {
    let store = store(t);
    let s = state(&[(CREATE, "", "$c")]);
    let g = store
        .store_state_group(&NewStateGroup::snapshot("$c", ROOM, &s))
        .unwrap();
    let cases: Vec<(storage_core::Result<i64>, &str)> = vec![
        (
            store.store_state_group(&NewStateGroup {
                event_id: "$x",
                room_id: ROOM,
                prev_group: Some(g),
                delta_ids: None,
                current_state_ids: Some(&s),
            }),
            "needs delta_ids",
        ),
        (
            store.store_state_group(&NewStateGroup {
                event_id: "$x",
                room_id: ROOM,
                prev_group: None,
                delta_ids: Some(&s),
                current_state_ids: Some(&s),
            }),
            "without a prev_group",
        ),
        (
            store.store_state_group(&NewStateGroup {
                event_id: "$x",
                room_id: ROOM,
                prev_group: None,
                delta_ids: None,
                current_state_ids: None,
            }),
            "current_state_ids cannot be None",
        ),
        (
            store.store_state_group(&NewStateGroup::delta("$x", ROOM, 424_242, &s)),
            "unpersisted prev_group: 424242",
        ),
        (
            store.store_state_group(&NewStateGroup::delta("$x", "!other:test", g, &s)),
            "belongs to room",
        ),
        (
            store.store_state_group(&NewStateGroup {
                event_id: "$x",
                room_id: ROOM,
                prev_group: Some(g),
                delta_ids: Some(&state(&[(NAME, "", "$n")])),
                current_state_ids: Some(&s),
            }),
            "delta_ids has",
        ),
        (
            store.store_state_group(&NewStateGroup::snapshot("", ROOM, &s)),
            "must not be empty",
        ),
    ];
    for (result, expected) in cases {
        let err = result.expect_err(expected);
        assert!(matches!(err.kind(), ErrorKind::InvalidArgument(_)), "{err}");
        assert!(
            err.to_string().contains(expected),
            "{err} should say {expected}"
        );
    }
    // Nothing was written by the failed calls.
    let mut raw = t.raw_connection();
    use diesel::prelude::*;
    use storage_state::schema::state_groups as sg;
    let n: i64 = with_conn!(&mut raw, |c| sg::table.count().get_result(c)).unwrap();
    assert_eq!(n, 1);
}

fn current_state_of_a_room(t: &TestDb) {
    let store = store(t);
    assert!(store.get_current_state_ids(ROOM).unwrap().is_empty());
    t.raw_connection()
        .batch_execute(&format!(
            "INSERT INTO current_state_events (event_id, room_id, type, state_key, membership) VALUES \
             ('$c', '{ROOM}', 'm.room.create', '', NULL), ('$j', '{ROOM}', 'm.room.member', '@a:test', 'join'), \
             ('$o', '!other:test', 'm.room.create', '', NULL)"
        ))
        .unwrap();
    // Cached until invalidated, as writers do after a commit that changes it.
    assert!(store.get_current_state_ids(ROOM).unwrap().is_empty());
    store.invalidate_current_state(ROOM);
    assert_eq!(
        *store.get_current_state_ids(ROOM).unwrap(),
        state(&[(CREATE, "", "$c"), (MEMBER, "@a:test", "$j")])
    );
    // A few slots: from the cache, and from the rows by a store without it.
    let slots = [
        storage_state::key(MEMBER, "@a:test"),
        storage_state::key(MEMBER, "@nobody:test"),
        storage_state::key(NAME, ""),
    ];
    let want = state(&[(MEMBER, "@a:test", "$j")]);
    assert_eq!(
        store.get_current_state_for_slots(ROOM, &slots).unwrap(),
        want
    );
    let fresh = cold(&store);
    assert_eq!(
        fresh.get_current_state_for_slots(ROOM, &slots).unwrap(),
        want
    );
    assert_eq!(
        fresh
            .get_current_state_for_slots(ROOM, &[storage_state::key(CREATE, "")])
            .unwrap(),
        state(&[(CREATE, "", "$c")])
    );
}

/// Every read of the state after an event checks its group's room: after a
/// store it is known without a query, and a group not found is not remembered.
fn room_of_a_group(t: &TestDb) {
    let store = store(t);
    let groups = linear_room(&store);
    assert_eq!(store.get_state_group_room(987_654).unwrap(), None);
    let cold = cold(&store);
    t.raw_connection()
        .batch_execute("DELETE FROM state_groups")
        .unwrap();
    // Prefilled when the group was stored.
    for g in &groups {
        assert_eq!(
            store.get_state_group_room(*g).unwrap().as_deref(),
            Some(ROOM)
        );
    }
    // A store that never saw the groups asks the database.
    assert_eq!(cold.get_state_group_room(groups[0]).unwrap(), None);
    t.raw_connection()
        .batch_execute(&format!(
            "INSERT INTO state_groups (id, room_id, event_id) VALUES (987654, '{ROOM}', '$late')"
        ))
        .unwrap();
    assert_eq!(
        store.get_state_group_room(987_654).unwrap().as_deref(),
        Some(ROOM)
    );
}
