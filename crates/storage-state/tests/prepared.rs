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

storage_core::engine_tests!(
    a_delta_on_a_cold_group_is_prepared_without_reading_its_state,
    a_prepared_chain_past_the_hop_limit_snapshots_the_state_it_holds,
    snapshots_of_thousands_of_rows_are_stored_by_a_few_kept_statements,
);

thread_local! {
    /// The statements this thread's connections sent while `COUNTING`.
    static STATEMENTS: std::cell::RefCell<Option<Vec<String>>> = const { std::cell::RefCell::new(None) };
    /// The statements this thread's connections prepared and kept meanwhile.
    static KEPT: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Records, on the thread that runs them, the statements of connections
/// opened after it is installed: other tests of this binary, on threads of
/// their own, never show in a recording.
struct Recorder;

impl diesel::connection::Instrumentation for Recorder {
    fn on_connection_event(&mut self, event: diesel::connection::InstrumentationEvent<'_>) {
        use diesel::connection::InstrumentationEvent as Event;
        match event {
            Event::StartQuery { query, .. } => STATEMENTS.with(|s| {
                if let Some(s) = s.borrow_mut().as_mut() {
                    s.push(query.to_string());
                }
            }),
            Event::CacheQuery { sql, .. } => STATEMENTS.with(|s| {
                if s.borrow().is_some() {
                    KEPT.with(|k| k.borrow_mut().push(sql.to_owned()));
                }
            }),
            _ => {}
        }
    }
}

fn install_recorder() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        diesel::connection::set_default_instrumentation(|| Some(Box::new(Recorder)))
            .expect("installing the statement recorder");
    });
}

/// The statements `f` sends on this thread (over connections opened after
/// [`install_recorder`]).
fn recording<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    KEPT.with(|k| k.borrow_mut().clear());
    STATEMENTS.with(|s| *s.borrow_mut() = Some(Vec::new()));
    let out = f();
    let sent = STATEMENTS
        .with(|s| s.borrow_mut().take())
        .unwrap_or_default();
    (out, sent)
}

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

/// A batch whose prepared chain passes the hop limit writes the group there
/// as a snapshot of the full state the prepared group holds: the prev group's
/// whole state is not read inside the batch's transaction (on PostgreSQL a
/// recursive read of the whole room, ~100 ms for 5,000 members, while the
/// batch holds the events lock). The rows are those a read would have given.
fn a_prepared_chain_past_the_hop_limit_snapshots_the_state_it_holds(t: &TestDb) {
    install_recorder();
    let writer = store(t);
    let mut want = room(300);
    let root = writer
        .store_state_group(&NewStateGroup::snapshot("$root", ROOM, &want))
        .unwrap();
    let mut prepared = Vec::new();
    let mut wants = Vec::new();
    let mut prev = root;
    for i in 0..storage_state::MAX_STATE_DELTA_HOPS + 20 {
        let event = format!("$leave{i}");
        let user = format!("@u{}:test", i % 300);
        let g = prepare(&writer, &event, prev, &[(MEMBER, &user, &event)]);
        want.insert(key(MEMBER, &user), event.as_str().into());
        prev = g.group;
        prepared.push(g);
        wants.push(want.clone());
    }
    let (stored, sent) = recording(|| {
        writer
            .database()
            .run_interaction("store_prepared", |txn: &mut Transaction<'_>| {
                writer.store_prepared_groups_txn(txn, &prepared)
            })
    });
    stored.unwrap();
    let reads: Vec<&String> = sent
        .iter()
        .filter(|sql| sql.contains("state_groups_state") && !sql.contains("INSERT"))
        .collect();
    assert!(
        reads.is_empty(),
        "storing prepared groups read state rows on {}:\n{reads:#?}",
        t.engine()
    );
    assert!(
        !sent.is_empty(),
        "the recorder saw none of the batch's statements"
    );
    let fresh = cold(&writer);
    // The root and 99 deltas make a chain of 100: the next group is a snapshot.
    let limit = storage_state::MAX_STATE_DELTA_HOPS - 1;
    for (i, g) in prepared.iter().enumerate() {
        let delta = fresh.get_state_group_delta(g.group).unwrap();
        assert_eq!(delta.is_none(), i == limit, "prepared group #{i}");
    }
    for i in [limit - 1, limit, limit + 1, prepared.len() - 1] {
        let got = fresh
            .get_state_for_groups(&[prepared[i].group], &StateFilter::all())
            .unwrap()
            .remove(&prepared[i].group)
            .unwrap();
        assert_eq!(got, wants[i], "prepared group #{i}, read from the database");
    }
    assert_eq!(writer.prepared_groups_waiting(), 0);
    // The writer's caches, filled at the commit (the snapshot's derived from
    // its prev group's entries), hold the same states.
    for i in [limit - 1, limit, limit + 1] {
        let group = prepared[i].group;
        let got = writer
            .get_state_for_groups(&[group], &StateFilter::all())
            .unwrap()
            .remove(&group)
            .unwrap();
        assert_eq!(
            got, wants[i],
            "prepared group #{i}, from the writer's caches"
        );
    }
    if t.engine() == "sqlite" {
        // The snapshot's rows went in in the index's order (type, state
        // key), so that each lands at the index's end: rowids say the order.
        let snapshot = prepared[limit].group;
        use diesel::prelude::*;
        use storage_state::schema::state_groups_state as sgs;
        let mut raw = t.raw_connection();
        let stored: Vec<(String, String)> = storage_core::with_conn!(&mut raw, |c| sgs::table
            .filter(sgs::state_group.eq(snapshot))
            .order(diesel::dsl::sql::<diesel::sql_types::BigInt>("rowid"))
            .select((sgs::type_, sgs::state_key))
            .load(c))
        .unwrap();
        let mut sorted = stored.clone();
        sorted.sort();
        assert_eq!(stored.len(), wants[limit].len());
        assert!(
            stored == sorted,
            "the snapshot's rows were not inserted in index order"
        );
    }
}

/// Snapshots of 2,347 and 1,502 rows stored in one transaction read back
/// whole from a cold store. On SQLite their rows go in by multi-row INSERTs
/// of a power of two rows each, at most 256 (the last few, fewer than 8,
/// in one statement of as many rows), each such statement prepared
/// once and kept however many times it runs, where diesel's own multi-row
/// INSERT would be prepared afresh for each (and never kept).
fn snapshots_of_thousands_of_rows_are_stored_by_a_few_kept_statements(t: &TestDb) {
    install_recorder();
    let writer = store(t);
    let (big, small) = (room(2_345), room(1_500));
    let (stored, sent) = recording(|| {
        writer
            .database()
            .run_interaction("two_snapshots", |txn: &mut Transaction<'_>| {
                let a = writer
                    .store_state_group_txn(txn, &NewStateGroup::snapshot("$a", ROOM, &big))?;
                let b = writer
                    .store_state_group_txn(txn, &NewStateGroup::snapshot("$b", ROOM, &small))?;
                Ok((a, b))
            })
    });
    let (a, b) = stored.unwrap();
    let fresh = cold(&writer);
    for (group, want) in [(a, &big), (b, &small)] {
        let got = fresh
            .get_state_for_groups(&[group], &StateFilter::all())
            .unwrap()
            .remove(&group)
            .unwrap();
        assert_eq!(&got, want, "snapshot {group} read from the database");
        check_reads(&fresh, group, want, "a snapshot of thousands of rows");
    }
    if t.engine() != "sqlite" {
        return;
    }
    let state_inserts = |sqls: &[String]| -> Vec<String> {
        sqls.iter()
            .filter(|sql| sql.starts_with("INSERT OR FAIL INTO state_groups_state"))
            .cloned()
            .collect()
    };
    let rows_of = |sql: &String| sql.matches("), (").count() + 1;
    let run = state_inserts(&sent);
    let rows: usize = run.iter().map(rows_of).sum();
    assert_eq!(rows, big.len() + small.len(), "every row inserted once");
    assert!(
        run.iter()
            .all(|sql| (rows_of(sql).is_power_of_two() || rows_of(sql) < 8) && rows_of(sql) <= 256),
        "statements of a power of two rows, at most 256, or of fewer than 8"
    );
    let whole = run.iter().filter(|sql| rows_of(sql) == 256).count();
    assert!(whole >= 14, "{whole} statements of 256 rows");
    let kept = state_inserts(&KEPT.with(|k| k.borrow().clone()));
    assert_eq!(
        kept.iter().filter(|sql| rows_of(sql) == 256).count(),
        1,
        "the 256-row INSERT is prepared once and kept, not once a run"
    );
    assert!(
        run.len() > kept.len(),
        "{} run, {} kept",
        run.len(),
        kept.len()
    );
}

/// Taking a new group's id is often a write's first statement (the rest is
/// served from memory). After a server restart ended every idle session of
/// the pool, it is taken again on a live session instead of failing the
/// write. (Before: "unavailable: the database cannot be reached (allocating
/// 1 ids from state_group_id_seq: ... terminating connection due to
/// administrator command)".)
#[test]
fn postgres_a_group_prepared_after_a_restart_takes_its_id_on_a_live_session() {
    let Some(t) = TestDb::postgres() else { return };
    let store = store(&t);
    let snapshot = store
        .store_state_group(&NewStateGroup::snapshot("$root", ROOM, &room(3)))
        .unwrap();
    t.end_every_session();
    let g1 = prepare(
        &store,
        "$leave1",
        snapshot,
        &[(MEMBER, "@u1:test", "$leave1")],
    );
    assert!(g1.group > snapshot, "{} after {snapshot}", g1.group);
    check_reads(
        &store,
        g1.group,
        &{
            let mut s = room(3);
            s.insert(key(MEMBER, "@u1:test"), "$leave1".into());
            s
        },
        "after the restart",
    );
}
