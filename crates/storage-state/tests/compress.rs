//! Compression on both engines: every group keeps its state (read back through
//! a store with empty caches), rows shrink and never grow, chains stay within
//! the bound, a second run finds nothing to do, an interrupted run is resumed,
//! a concurrent writer is undisturbed (and a write racing a rewrite still cuts
//! its chains at 100 hops), and the writing process's caches learn of the
//! rewrites.

mod common;

use common::*;
use diesel::RunQueryDsl;
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
    a_write_racing_a_rewrite_cuts_chains_at_100_hops,
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
    // Reads of a few slots (an auth check's, lazy-loaded members) take other
    // statements (per hop on SQLite, per slot on PostgreSQL, for one group
    // at a time): over the rewritten shapes they must answer the same, from
    // the writing store's caches and cold, for a sample of the groups.
    let users: Vec<String> = expected
        .iter()
        .flat_map(|(_, s)| s.iter())
        .filter(|((t, _), _)| &**t == MEMBER)
        .map(|((_, k), _)| k.to_string())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .step_by(17)
        .chain(["@nobody:test".to_owned()])
        .collect();
    let filters = [
        StateFilter::from_types(
            [(CREATE, Some("")), ("m.room.topic", Some(""))]
                .into_iter()
                .chain(users.iter().map(|u| (MEMBER, Some(u.as_str())))),
        ),
        StateFilter::from_lazy_load_member_list(users.iter().map(String::as_str)),
    ];
    let fresh = cold(store);
    for (g, state) in expected.iter().step_by(20).chain(expected.last()) {
        for filter in &filters {
            let want = filter.filter_state(state);
            for s in [store, &fresh] {
                let got = s.get_state_for_groups(&[*g], filter).unwrap();
                assert_eq!(got[g], want, "group {g} under {filter:?}");
            }
        }
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

/// Starts, inside the (one) rewrite transaction, a write of a group on `prev`
/// on a thread of its own, and lets the rewrite commit only once that write
/// waits for the lock the rewrite holds (PostgreSQL; SQLite has one writer,
/// whose transaction could not begin meanwhile): the write took its prev
/// group's chain length before the rewrite changed it, and commits after.
struct WriteDuringRewrite {
    store: StateStore,
    /// The database's URL on PostgreSQL; `None` on SQLite.
    postgres: Option<String>,
    prev: StateGroup,
    writer: Option<std::thread::JoinHandle<StateGroup>>,
}

impl CompressHooks for WriteDuringRewrite {
    fn on_rewrite(&mut self, _: &mut Transaction<'_>, _: &str, _: &[StateGroup]) -> Result<()> {
        let (None, Some(url)) = (&self.writer, &self.postgres) else {
            return Ok(());
        };
        let url = url.clone();
        let (store, prev) = (self.store.clone(), self.prev);
        self.writer = Some(std::thread::spawn(move || {
            write_member(&store, prev, "during")
        }));
        wait_for_a_lock_wait(&url);
        Ok(())
    }
}

/// A delta on `prev` of one member `@{name}:test`.
fn write_member(store: &StateStore, prev: StateGroup, name: &str) -> StateGroup {
    let event = format!("${name}");
    let delta =
        StateMap::from_iter([(key(MEMBER, &format!("@{name}:test")), event.as_str().into())]);
    store
        .store_state_group(&NewStateGroup::delta(&event, ROOM, prev, &delta))
        .unwrap()
}

/// Waits until some session of the database at `url` waits for a lock.
fn wait_for_a_lock_wait(url: &str) {
    #[derive(diesel::QueryableByName)]
    struct Waiting {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let config =
        storage_core::DatabaseConfig::parse(url, storage_core::OpenMode::ReadOnly).unwrap();
    let db = storage_core::Database::open(config).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let waiting = db
            .run_read("lock waits", |txn| {
                Ok(storage_core::with_conn!(txn.conn(), |c| {
                    diesel::sql_query(
                        "SELECT COUNT(*) AS n FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    )
                    .get_result::<Waiting>(c)
                })?)
            })
            .unwrap();
        if waiting.n > 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the write never waited for the rewrite"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Groups from `group` down to its snapshot, read with empty caches.
fn chain_length(store: &StateStore, group: StateGroup) -> usize {
    let fresh = cold(store);
    let (mut n, mut at) = (1, group);
    while let Some((prev, _)) = fresh.get_state_group_delta(at).unwrap() {
        n += 1;
        at = prev;
    }
    n
}

/// The online job compresses a room while the server writes it: a group
/// written on the room's newest group while the rewrite changed that group's
/// chain took the chain's length from before the rewrite, and committed after
/// it. The writer must still cut its chains where they hold 100 groups, no
/// sooner and no later: a chain length remembered from before the rewrite
/// (here 50 groups where 4 remain) made it store a whole snapshot of the room
/// where a delta of one row was due.
fn a_write_racing_a_rewrite_cuts_chains_at_100_hops(t: &TestDb) {
    let store = store(t);
    let mut room = linear(&store, ROOM, 250);
    let (tip, tip_state) = room.last().cloned().unwrap();
    let before = chain_length(&store, tip);
    let mut hooks = WriteDuringRewrite {
        store: store.clone(),
        postgres: (t.engine() == "postgres").then(|| t.url().to_owned()),
        prev: tip,
        writer: None,
    };
    let bound = compress::highest_state_group(store.database()).unwrap();
    // One transaction: the write waits for the only rewrite there is.
    compress::compress_room(&store, ROOM, bound, &CompressOptions::default(), &mut hooks).unwrap();
    let after = chain_length(&store, tip);
    assert_ne!(
        before, after,
        "the rewrite changed the newest group's chain"
    );
    let mut prev = match hooks.writer.take() {
        Some(writer) => writer.join().unwrap(),
        None => write_member(&store, tip, "during"),
    };
    let mut state = tip_state;
    state.insert(key(MEMBER, "@during:test"), "$during".into());
    let mut written = vec![(prev, state.clone())];
    for i in 0..120 {
        let name = format!("after{i}");
        prev = write_member(&store, prev, &name);
        state.insert(
            key(MEMBER, &format!("@{name}:test")),
            format!("${name}").into(),
        );
        written.push((prev, state.clone()));
    }
    let mut expected = after;
    for (g, _) in &written {
        expected = if expected < 100 { expected + 1 } else { 1 };
        assert_eq!(chain_length(&store, *g), expected, "chain of group {g}");
    }
    room.extend(written);
    assert_states(&store, &room);
}
