//! Long delta chains, snapshots every 100 hops, id allocation. Each test runs on
//! SQLite and PostgreSQL.

mod common;

use common::*;
use std::collections::HashSet;
use storage_core::testing::TestDb;
use storage_core::{with_conn, StoreConfig};
use storage_state::{
    NewStateGroup, StateFilter, StateGroupAccess, StateMap, StateStore, MAX_STATE_DELTA_HOPS,
};

storage_core::engine_tests!(
    chain_of_150_groups_with_full_state,
    chain_of_150_groups_from_deltas_only,
    sequence_behind_existing_groups_is_repaired_at_start,
    concurrent_writers_never_share_an_id,
);

/// Builds a chain of `n` groups, each a delta of two slots against the one
/// before; returns the groups and the model state after each.
fn build_chain(store: &StateStore, n: usize, give_full_state: bool) -> Vec<(i64, StateMap)> {
    let mut model = state(&[(CREATE, "", "$create")]);
    for u in 0..20 {
        model.insert(
            storage_state::key(MEMBER, &format!("@u{u}:test")),
            format!("$join{u}").into(),
        );
    }
    let first = store
        .store_state_group(&NewStateGroup::snapshot("$create", ROOM, &model))
        .unwrap();
    let mut out = vec![(first, model.clone())];
    for i in 1..n {
        let event = format!("$ev{i}");
        let delta = state(&[
            ("m.test", &format!("k{}", i % 7), &event),
            (MEMBER, &format!("@u{}:test", i % 20), &format!("{event}-m")),
        ]);
        model.extend(delta.clone());
        let prev = out.last().unwrap().0;
        let full = give_full_state.then_some(&model);
        let g = store
            .store_state_group(&NewStateGroup {
                event_id: &event,
                room_id: ROOM,
                prev_group: Some(prev),
                delta_ids: Some(&delta),
                current_state_ids: full,
            })
            .unwrap();
        assert!(g > prev);
        out.push((g, model.clone()));
    }
    out
}

fn check_chain(store: &StateStore, chain: &[(i64, StateMap)]) {
    // Where the chain would pass 100 groups, a snapshot starts a new one.
    for (i, (g, _)) in chain.iter().enumerate() {
        let delta = store.get_state_group_delta(*g).unwrap();
        if i % MAX_STATE_DELTA_HOPS == 0 {
            assert!(delta.is_none(), "group #{i} should be a snapshot");
        } else {
            assert_eq!(delta.map(|(p, _)| p), Some(chain[i - 1].0), "group #{i}");
        }
    }
    // Every group's state, from a cold store, one by one and in one batch.
    let reader = cold(store);
    for (g, expected) in chain.iter().rev() {
        let got = reader
            .get_state_for_groups(&[*g], &StateFilter::all())
            .unwrap();
        assert_eq!(&got[g], expected, "group {g}");
    }
    let batch = cold(store);
    let groups: Vec<i64> = chain.iter().map(|(g, _)| *g).collect();
    let all = batch
        .get_state_for_groups(&groups, &StateFilter::all())
        .unwrap();
    for (g, expected) in chain {
        assert_eq!(&all[g], expected, "batched group {g}");
    }
    // Narrow filters (the per-hop walk, where the engine prefers it).
    let narrow = cold(store);
    for (g, expected) in chain.iter().step_by(7) {
        let filter = StateFilter::from_types([
            (MEMBER, Some("@u3:test")),
            ("m.test", Some("k5")),
            (NAME, Some("")),
        ]);
        let got = narrow.get_state_for_groups(&[*g], &filter).unwrap();
        assert_eq!(got[g], filter.filter_state(expected), "narrow read of {g}");
    }
    // Lazy-loaded members (named members plus all other state): a few members
    // (an arm of the walk per member), and more than a handful (one IN list),
    // some of them never in the room.
    for wanted in [3, 40] {
        let users: Vec<String> = (0..wanted).map(|u| format!("@u{}:test", u * 3)).collect();
        let filter = StateFilter::from_lazy_load_member_list(users.iter().map(String::as_str));
        let lazy = cold(store);
        for (g, expected) in chain.iter().step_by(11) {
            let got = lazy.get_state_for_groups(&[*g], &filter).unwrap();
            assert_eq!(
                got[g],
                filter.filter_state(expected),
                "lazy read of {wanted} members at {g}"
            );
        }
    }
}

fn chain_of_150_groups_with_full_state(t: &TestDb) {
    let store = store(t);
    let chain = build_chain(&store, 150, true);
    check_chain(&store, &chain);
}

/// Without the full state at hand, the group at hop 100 computes it from its
/// prev group and delta before writing the snapshot.
fn chain_of_150_groups_from_deltas_only(t: &TestDb) {
    let store = store(t);
    let chain = build_chain(&store, 150, false);
    check_chain(&store, &chain);
    // The writer's caches knew the first group whole, and derived each new group
    // from its prev group and delta: with the rows gone, they still answer.
    t.raw_connection()
        .batch_execute("DELETE FROM state_groups_state")
        .unwrap();
    let groups: Vec<i64> = chain.iter().map(|(g, _)| *g).collect();
    let got = store
        .get_state_for_groups(&groups, &StateFilter::all())
        .unwrap();
    for (g, expected) in &chain {
        assert_eq!(&got[g], expected, "derived cache entry of group {g}");
    }
}

/// A database holding groups up to 500 whose sequence was left at 1 (a port or a
/// restore): the writer's start-up check moves it, the next group is 501.
fn sequence_behind_existing_groups_is_repaired_at_start(t: &TestDb) {
    drop(store(t));
    let mut raw = t.raw_connection();
    raw.batch_execute(&format!(
        "INSERT INTO state_groups (id, room_id, event_id) VALUES (3, '{ROOM}', '$a'), (500, '{ROOM}', '$b')"
    ))
    .unwrap();
    if t.engine() == "postgres" {
        raw.batch_execute("SELECT setval('state_group_id_seq', 1)")
            .unwrap();
    }
    let store = store(t);
    let g = store
        .store_state_group(&NewStateGroup::snapshot("$new", ROOM, &StateMap::new()))
        .unwrap();
    assert_eq!(g, 501);
}

/// Several writers at once. Where the engine allows several processes, each
/// writer is a store of its own (its own pool, as a worker process would have).
fn concurrent_writers_never_share_an_id(t: &TestDb) {
    let first = store(t);
    let multi = first.database().engine().supports_multiple_processes();
    let threads: Vec<_> = (0..4)
        .map(|w| {
            let s = if multi {
                StateStore::new(t.open(), &StoreConfig::default()).unwrap()
            } else {
                first.clone()
            };
            std::thread::spawn(move || {
                (0..20)
                    .map(|i| {
                        let e = format!("$w{w}-{i}");
                        s.store_state_group(&NewStateGroup::snapshot(
                            &e,
                            ROOM,
                            &state(&[(CREATE, "", &e)]),
                        ))
                        .unwrap()
                    })
                    .collect::<Vec<i64>>()
            })
        })
        .collect();
    let ids: Vec<i64> = threads
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let unique: HashSet<i64> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len());
    let mut raw = t.raw_connection();
    use diesel::prelude::*;
    use storage_state::schema::state_groups as sg;
    let n: i64 = with_conn!(&mut raw, |c| sg::table.count().get_result(c)).unwrap();
    assert_eq!(n, 80);
}
