//! Compression on both engines: every group keeps its state (read back through
//! a store with empty caches), rows shrink and never grow, chains stay within
//! the bound, a second run finds nothing to do, an interrupted run is resumed,
//! a concurrent writer is undisturbed, and the writing process's caches learn
//! of the rewrites.

mod common;

use common::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use storage_core::testing::TestDb;
use storage_core::{Error, Result, Transaction};
use storage_state::compress::{
    self, CompressHooks, CompressOptions, NoHooks, Outcome, RoomReport, MAX_COMPRESSED_CHAIN,
};
use storage_state::{
    key, NewStateGroup, StateFilter, StateGroup, StateGroupAccess, StateMap, StateStore,
};

storage_core::engine_tests!(
    every_group_keeps_its_state_and_rows_shrink,
    forks_keep_their_state_and_never_grow,
    a_pure_delta_room_is_left_alone,
    a_dry_run_writes_nothing,
    an_interrupted_run_is_resumed,
    a_concurrent_writer_is_undisturbed,
    the_writing_process_forgets_rewritten_shapes,
);

/// Stores a linear room of `n` groups: a create, then members joining, every
/// third group a topic change instead. Returns the groups and their states.
fn linear(store: &StateStore, room: &str, n: usize) -> Vec<(StateGroup, StateMap)> {
    let mut out = Vec::with_capacity(n);
    let mut state = StateMap::new();
    let mut prev = None;
    for i in 0..n {
        let (slot, event) = match i {
            0 => (key(CREATE, ""), "$create".to_owned()),
            i if i % 3 == 0 => (key("m.room.topic", ""), format!("$topic{i}")),
            i => (key(MEMBER, &format!("@u{i}:test")), format!("$join{i}")),
        };
        let delta = StateMap::from_iter([(slot.clone(), event.as_str().into())]);
        state.insert(slot, event.as_str().into());
        let g = match prev {
            None => store.store_state_group(&NewStateGroup::snapshot(&event, room, &state)),
            Some(p) => store.store_state_group(&NewStateGroup::delta(&event, room, p, &delta)),
        }
        .unwrap();
        prev = Some(g);
        out.push((g, state.clone()));
    }
    out
}

/// Every group's full state, read through a store with empty caches.
fn states_of(store: &StateStore, groups: &[StateGroup]) -> HashMap<StateGroup, StateMap> {
    cold(store)
        .get_state_for_groups(groups, &StateFilter::all())
        .unwrap()
}

fn rows(store: &StateStore, room: &str) -> u64 {
    compress::rooms_by_state_rows(store.database())
        .unwrap()
        .into_iter()
        .find(|(r, _)| r == room)
        .map_or(0, |(_, n)| n as u64)
}

/// Small transactions, so that a room of a few hundred groups takes several.
fn options() -> CompressOptions {
    CompressOptions {
        chunk_rows: 500,
        ..Default::default()
    }
}

fn run(store: &StateStore, room: &str, hooks: &mut dyn CompressHooks) -> Result<RoomReport> {
    let bound = compress::highest_state_group(store.database())?;
    compress::compress_room(store, room, bound, &options(), hooks)
}

fn assert_states(store: &StateStore, expected: &[(StateGroup, StateMap)]) {
    let groups: Vec<StateGroup> = expected.iter().map(|(g, _)| *g).collect();
    let got = states_of(store, &groups);
    for (g, state) in expected {
        assert_eq!(&got[g], state, "state of group {g}");
    }
}

fn every_group_keeps_its_state_and_rows_shrink(t: &TestDb) {
    let store = store(t);
    let room = linear(&store, ROOM, 700);
    let other = linear(&store, "!other:test", 150);
    let before = rows(&store, ROOM);
    let other_before = rows(&store, "!other:test");

    let report = run(&store, ROOM, &mut NoHooks).unwrap();
    assert_eq!(report.outcome, Outcome::Compressed);
    assert_eq!(report.groups, 700);
    assert_eq!(report.rows_before, before);
    assert_eq!(report.rows_after, rows(&store, ROOM));
    // 7 snapshots of up to 467 slots and 693 one-row deltas before.
    assert!(report.rows_after * 3 < before * 2, "{report:?}");
    assert!(report.longest_chain <= MAX_COMPRESSED_CHAIN);
    assert_states(&store, &room);
    assert_states(&store, &other);
    assert_eq!(
        rows(&store, "!other:test"),
        other_before,
        "another room untouched"
    );

    // The plan is already there: nothing to write.
    let again = run(&store, ROOM, &mut NoHooks).unwrap();
    assert_eq!(again.outcome, Outcome::AlreadyCompact, "{again:?}");
    assert_eq!(again.groups_rewritten, 0);
    assert_eq!(again.rows_after, report.rows_after);
}

/// Two branches from one group, interleaved in id order, merged every few
/// groups by a group holding both (as state resolution would make it).
fn forked(store: &StateStore, room: &str, rounds: usize) -> Vec<(StateGroup, StateMap)> {
    let mut out = Vec::new();
    let create = StateMap::from_iter([(key(CREATE, ""), "$create".into())]);
    let mut tip = store
        .store_state_group(&NewStateGroup::snapshot("$create", room, &create))
        .unwrap();
    let mut tip_state = create;
    out.push((tip, tip_state.clone()));
    for r in 0..rounds {
        let (mut a, mut b) = ((tip, tip_state.clone()), (tip, tip_state.clone()));
        for i in 0..3 {
            for (side, (g, s)) in [("a", &mut a), ("b", &mut b)] {
                let slot = key(MEMBER, &format!("@{side}{r}_{i}:test"));
                let event = format!("${side}{r}_{i}");
                let delta = StateMap::from_iter([(slot.clone(), event.as_str().into())]);
                *g = store
                    .store_state_group(&NewStateGroup::delta(&event, room, *g, &delta))
                    .unwrap();
                s.insert(slot, event.into());
                out.push((*g, s.clone()));
            }
        }
        let merged: StateMap = a.1.clone().union(b.1.clone());
        let delta: StateMap =
            b.1.iter()
                .filter(|(k, v)| a.1.get(*k) != Some(*v))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
        tip = store
            .store_state_group(&NewStateGroup::delta(
                &format!("$merge{r}"),
                room,
                a.0,
                &delta,
            ))
            .unwrap();
        tip_state = merged;
        out.push((tip, tip_state.clone()));
    }
    out
}

fn forks_keep_their_state_and_never_grow(t: &TestDb) {
    let store = store(t);
    let room = forked(&store, ROOM, 60);
    let before = rows(&store, ROOM);
    let report = run(&store, ROOM, &mut NoHooks).unwrap();
    assert!(report.rows_after <= before, "{report:?}");
    assert_eq!(rows(&store, ROOM), report.rows_after);
    assert!(report.longest_chain <= MAX_COMPRESSED_CHAIN);
    assert_states(&store, &room);
}

fn a_pure_delta_room_is_left_alone(t: &TestDb) {
    let store = store(t);
    let room = linear(&store, ROOM, 60);
    let before = rows(&store, ROOM);
    let report = run(&store, ROOM, &mut NoHooks).unwrap();
    assert_eq!(report.outcome, Outcome::AlreadyCompact, "{report:?}");
    assert_eq!((report.rows_before, report.rows_after), (before, before));
    assert_eq!(rows(&store, ROOM), before);
    assert_states(&store, &room);
}

#[derive(Default)]
struct Sql(String);

impl CompressHooks for Sql {
    fn on_sql(&mut self, sql: &str) -> Result<()> {
        self.0.push_str(sql);
        Ok(())
    }
}

fn a_dry_run_writes_nothing(t: &TestDb) {
    let store = store(t);
    let room = linear(&store, ROOM, 400);
    let before = rows(&store, ROOM);
    let bound = compress::highest_state_group(store.database()).unwrap();
    let options = CompressOptions {
        dry_run: true,
        ..options()
    };
    let mut sql = Sql::default();
    let report = compress::compress_room(&store, ROOM, bound, &options, &mut sql).unwrap();
    assert_eq!(report.outcome, Outcome::Compressed);
    assert!(report.rows_after < before);
    assert_eq!(rows(&store, ROOM), before, "nothing written");
    assert!(sql
        .0
        .starts_with("BEGIN;\nDELETE FROM state_group_edges WHERE state_group IN ("));
    assert!(sql.0.contains("INSERT INTO state_groups_state"));
    assert!(sql.0.trim_end().ends_with("COMMIT;"));
    assert_states(&store, &room);
    // What the dry run said is what a real run does.
    let real = run(&store, ROOM, &mut NoHooks).unwrap();
    assert_eq!(real.rows_after, report.rows_after);
}

/// Fails the rewrite transaction of the `n`th chunk, as a kill would leave it:
/// the chunks before committed, that one not at all.
struct FailAt(usize);

impl CompressHooks for FailAt {
    fn on_rewrite(&mut self, _: &mut Transaction<'_>, _: &str, _: &[StateGroup]) -> Result<()> {
        self.0 -= 1;
        if self.0 == 0 {
            return Err(Error::other("interrupted"));
        }
        Ok(())
    }
}

fn an_interrupted_run_is_resumed(t: &TestDb) {
    let store = store(t);
    let room = linear(&store, ROOM, 700);
    let before = rows(&store, ROOM);
    let err = run(&store, ROOM, &mut FailAt(2)).unwrap_err();
    assert!(err.to_string().contains("interrupted"), "{err}");
    let partly = rows(&store, ROOM);
    assert!(partly < before, "the first chunk committed");
    assert_states(&store, &room);

    let resumed = run(&store, ROOM, &mut NoHooks).unwrap();
    assert_eq!(resumed.outcome, Outcome::Compressed);
    assert_eq!(resumed.rows_before, partly);
    assert_states(&store, &room);
    let done = run(&store, ROOM, &mut NoHooks).unwrap();
    assert_eq!(done.outcome, Outcome::AlreadyCompact, "{done:?}");
    assert_eq!(done.rows_after, resumed.rows_after);
}

fn a_concurrent_writer_is_undisturbed(t: &TestDb) {
    let store = store(t);
    let mut room = linear(&store, ROOM, 900);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (store, stop) = (store.clone(), stop.clone());
        let (mut prev, mut state) = room.last().cloned().unwrap();
        std::thread::spawn(move || {
            let mut written = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) || i < 20 {
                let slot = key(MEMBER, &format!("@late{i}:test"));
                let event = format!("$late{i}");
                let delta = StateMap::from_iter([(slot.clone(), event.as_str().into())]);
                prev = store
                    .store_state_group(&NewStateGroup::delta(&event, ROOM, prev, &delta))
                    .unwrap();
                state.insert(slot, event.into());
                written.push((prev, state.clone()));
                i += 1;
            }
            written
        })
    };
    let report = run(&store, ROOM, &mut NoHooks).unwrap();
    stop.store(true, Ordering::SeqCst);
    room.extend(writer.join().unwrap());
    assert_eq!(report.outcome, Outcome::Compressed);
    assert_states(&store, &room);
    // Groups written during the run are the next run's.
    let next = run(&store, ROOM, &mut NoHooks).unwrap();
    assert!(next.rows_after <= next.rows_before);
    assert_states(&store, &room);
}

fn the_writing_process_forgets_rewritten_shapes(t: &TestDb) {
    let store = store(t);
    let room = linear(&store, ROOM, 400);
    let groups: Vec<StateGroup> = room.iter().map(|(g, _)| *g).collect();
    for g in &groups {
        store.get_state_group_delta(*g).unwrap();
    }
    run(&store, ROOM, &mut NoHooks).unwrap();
    let fresh = cold(&store);
    let mut changed = 0;
    for g in &groups {
        let cached = store.get_state_group_delta(*g).unwrap();
        assert_eq!(
            cached,
            fresh.get_state_group_delta(*g).unwrap(),
            "group {g}"
        );
        changed += usize::from(cached.is_some_and(|(p, _)| p != g - 1));
    }
    assert!(changed > 0, "some prev groups changed");
}
