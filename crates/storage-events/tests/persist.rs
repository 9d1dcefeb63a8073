//! Writing batches of events. Each test runs on SQLite and PostgreSQL.

use diesel::prelude::*;
use std::collections::HashSet;
use storage_core::testing::TestDb;
use storage_core::{with_conn, StoreConfig};
use storage_events::schema::{event_edges, event_forward_extremities, events, rejections};
use storage_events::{
    new_forward_extremities, testing, CurrentStateDelta, EventReads, EventToPersist, EventsStore,
    RoomBatch, ALL_CACHES, CURRENT_STATE_CACHE,
};
use storage_state::schema::event_to_state_groups as etsg;
use storage_state::{key, NewStateGroup, StateFilter, StateGroupAccess, StateMap};

storage_core::engine_tests!(
    batch_is_written_whole_with_increasing_positions,
    stored_events_are_skipped,
    outliers_get_no_state_and_rejections_are_recorded,
    failed_batch_leaves_nothing,
    old_cache_invalidations_are_pruned,
    events_name_the_instance_that_wrote_them,
    a_batch_changes_only_the_extremities_it_moves,
    many_events_are_read_by_their_ids,
);

const ROOM: &str = "!room:test";

fn stores(t: &TestDb) -> EventsStore {
    EventsStore::new(t.open(), &StoreConfig::default()).unwrap()
}

fn event(
    id: &str,
    prevs: &[&str],
    state: Option<(&str, &str)>,
    group: Option<i64>,
) -> EventToPersist {
    match state {
        Some(slot) => testing::state_event(ROOM, id, prevs, slot, group),
        None => testing::event(ROOM, id, prevs, group),
    }
}

fn batch(
    store: &EventsStore,
    events: Vec<EventToPersist>,
    added: &[(&str, &str, &str)],
) -> RoomBatch {
    let current = store.get_forward_extremities(ROOM).unwrap();
    let ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    let referenced = store.events_referenced_as_prev(&ids).unwrap();
    RoomBatch {
        room_id: ROOM.into(),
        new_extremities: new_forward_extremities(&current, &events, &referenced),
        old_extremities: current.clone(),
        events,
        current_state: CurrentStateDelta {
            removed: vec![],
            added: added
                .iter()
                .map(|(t, k, e)| (key(t, k), e.to_string(), None))
                .collect(),
        },
    }
}

fn count(t: &TestDb, table: &str) -> i64 {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut raw = t.raw_connection();
    with_conn!(&mut raw, |c| diesel::sql_query(format!(
        "SELECT COUNT(*) AS n FROM {table}"
    ))
    .get_result::<N>(c))
    .unwrap()
    .n
}

fn batch_is_written_whole_with_increasing_positions(t: &TestDb) {
    let store = stores(t);
    let create_state = StateMap::from_iter([(key("m.room.create", ""), "$create".into())]);
    let g1 = store
        .state()
        .store_state_group(&NewStateGroup::snapshot("$create", ROOM, &create_state))
        .unwrap();
    let first = store
        .persist_batch(&batch(
            &store,
            vec![event("$create", &[], Some(("m.room.create", "")), Some(g1))],
            &[("m.room.create", "", "$create")],
        ))
        .unwrap();
    assert_eq!(first.positions.len(), 1);
    assert_eq!(store.get_room_version(ROOM).unwrap().as_deref(), Some("10"));

    let g2 = store
        .state()
        .store_state_group(&NewStateGroup::delta(
            "$name",
            ROOM,
            g1,
            &StateMap::from_iter([(key("m.room.name", ""), "$name".into())]),
        ))
        .unwrap();
    let second = store
        .persist_batch(&batch(
            &store,
            vec![
                event("$msg", &["$create"], None, Some(g1)),
                event("$name", &["$msg"], Some(("m.room.name", "")), Some(g2)),
                event("$msg2", &["$name"], None, Some(g2)),
            ],
            &[("m.room.name", "", "$name")],
        ))
        .unwrap();
    let p = |id: &str| second.positions[id];
    assert!(
        first.positions["$create"] < p("$msg") && p("$msg") < p("$name") && p("$name") < p("$msg2")
    );
    assert_eq!(second.max_stream_ordering, p("$msg2"));
    assert_eq!(store.max_stream_ordering(), p("$msg2"));
    assert_eq!(
        store.get_forward_extremities(ROOM).unwrap(),
        vec!["$msg2".to_owned()]
    );
    assert_eq!(count(t, "events"), 4);
    assert_eq!(count(t, "event_json"), 4);
    assert_eq!(count(t, "event_edges"), 3);
    assert_eq!(
        *store.state().get_current_state_ids(ROOM).unwrap(),
        StateMap::from_iter([
            (key("m.room.create", ""), "$create".into()),
            (key("m.room.name", ""), "$name".into())
        ])
    );
    assert_eq!(
        store
            .state()
            .get_state_for_event("$msg2", &StateFilter::all())
            .unwrap(),
        StateMap::from_iter([
            (key("m.room.create", ""), "$create".into()),
            (key("m.room.name", ""), "$name".into())
        ])
    );
    let stored = store.get_events(&["$name"]).unwrap();
    assert_eq!(stored["$name"].json, r#"{"event_id":"$name"}"#);
    assert_eq!(stored["$name"].stream_ordering, p("$name"));
    // A fresh store reads the committed position back.
    let again = EventsStore::new(store.database().clone(), &StoreConfig::default()).unwrap();
    assert_eq!(again.max_stream_ordering(), p("$msg2"));
    testing::assert_invariants(&t.open());
}

/// `get_events` on more ids than one statement took before (500), ids
/// that JSON must escape among them, missing and repeated ones: every stored
/// one found, from cold caches, as stored.
fn many_events_are_read_by_their_ids(t: &TestDb) {
    let store = stores(t);
    let create_state = StateMap::from_iter([(key("m.room.create", ""), "$create".into())]);
    let g1 = store
        .state()
        .store_state_group(&NewStateGroup::snapshot("$create", ROOM, &create_state))
        .unwrap();
    let odd = [
        "$quote\"d",
        "$back\\slash",
        "$uni\u{e9}\u{1F600}",
        "$control\u{1}\u{1f}",
        "$comma,]}",
        "$new\nline",
    ];
    let mut ids: Vec<String> = (0..1_200).map(|i| format!("$m{i}")).collect();
    ids.extend(odd.iter().map(|id| id.to_string()));
    let mut events = vec![event("$create", &[], Some(("m.room.create", "")), Some(g1))];
    events.extend(ids.iter().map(|id| event(id, &["$create"], None, Some(g1))));
    store
        .persist_batch(&batch(&store, events, &[("m.room.create", "", "$create")]))
        .unwrap();

    let cold = EventsStore::new(store.database().clone(), &StoreConfig::default()).unwrap();
    let mut asked: Vec<&str> = ids.iter().map(String::as_str).collect();
    asked.extend(["$missing", "$m7", "$quote\"d", "$quote"]);
    let got = cold.get_events(&asked).unwrap();
    assert_eq!(got.len(), ids.len(), "every stored event, once");
    for id in &ids {
        let e = &got[id];
        assert_eq!(e.event_id, *id);
        assert_eq!(e.room_id, ROOM);
        assert_eq!(e.json, format!(r#"{{"event_id":"{id}"}}"#));
    }
    assert!(!got.contains_key("$missing") && !got.contains_key("$quote"));
    // The same read again comes from the cache, alike.
    assert_eq!(cold.get_events(&asked).unwrap(), got);
    testing::assert_invariants(&t.open());
}

fn stored_events_are_skipped(t: &TestDb) {
    let store = stores(t);
    let g1 = store
        .state()
        .store_state_group(&NewStateGroup::snapshot(
            "$create",
            ROOM,
            &StateMap::from_iter([(key("m.room.create", ""), "$create".into())]),
        ))
        .unwrap();
    let events = vec![
        event("$create", &[], Some(("m.room.create", "")), Some(g1)),
        event("$m1", &["$create"], None, Some(g1)),
    ];
    let first = store
        .persist_batch(&batch(
            &store,
            events.clone(),
            &[("m.room.create", "", "$create")],
        ))
        .unwrap();
    let mut again = events;
    again.push(event("$m2", &["$m1"], None, Some(g1)));
    let second = store.persist_batch(&batch(&store, again, &[])).unwrap();
    assert_eq!(second.skipped, vec!["$create".to_owned(), "$m1".to_owned()]);
    assert_eq!(second.positions.keys().collect::<Vec<_>>(), vec!["$m2"]);
    assert!(second.positions["$m2"] > first.max_stream_ordering);
    assert_eq!(count(t, "events"), 3);
    assert_eq!(
        store.have_events(&["$create", "$m2", "$nope"]).unwrap(),
        HashSet::from(["$create".to_owned(), "$m2".to_owned()])
    );
    testing::assert_invariants(&t.open());
}

fn outliers_get_no_state_and_rejections_are_recorded(t: &TestDb) {
    let store = stores(t);
    let g1 = store
        .state()
        .store_state_group(&NewStateGroup::snapshot(
            "$create",
            ROOM,
            &StateMap::from_iter([(key("m.room.create", ""), "$create".into())]),
        ))
        .unwrap();
    let mut outlier = event(
        "$outlier",
        &["$elsewhere"],
        Some(("m.room.member", "@x:test")),
        None,
    );
    outlier.outlier = true;
    let mut rejected = event(
        "$rejected",
        &["$create"],
        Some(("m.room.name", "")),
        Some(g1),
    );
    rejected.rejected = Some("sender is not in the room".into());
    let b = batch(
        &store,
        vec![
            event("$create", &[], Some(("m.room.create", "")), Some(g1)),
            outlier,
            rejected,
        ],
        &[("m.room.create", "", "$create")],
    );
    assert_eq!(b.new_extremities, vec!["$create".to_owned()]);
    store.persist_batch(&b).unwrap();
    let mut raw = t.raw_connection();
    let mapped: Vec<(String, i64)> = with_conn!(&mut raw, |c| etsg::table
        .select((etsg::event_id, etsg::state_group))
        .order(etsg::event_id)
        .load(c))
    .unwrap();
    // The outlier has no mapping; the rejected event maps to the state before it.
    assert_eq!(
        mapped,
        vec![("$create".to_owned(), g1), ("$rejected".to_owned(), g1)]
    );
    let reason: String = with_conn!(&mut raw, |c| rejections::table
        .select(rejections::reason)
        .first(c))
    .unwrap();
    assert_eq!(reason, "sender is not in the room");
    let flags: Vec<(String, bool, Option<String>)> = with_conn!(&mut raw, |c| events::table
        .select((events::event_id, events::outlier, events::rejection_reason))
        .order(events::stream_ordering)
        .load(c))
    .unwrap();
    assert_eq!(flags[1], ("$outlier".to_owned(), true, None));
    assert_eq!(flags[2].2.as_deref(), Some("sender is not in the room"));
    // Read back as stored, through the events cache and from the rows alike
    // (each engine's integer widths and booleans).
    let asked = ["$create", "$outlier", "$rejected", "$missing"];
    let cold = EventsStore::new(store.database().clone(), &StoreConfig::default()).unwrap();
    let got = cold.get_events(&asked).unwrap();
    assert_eq!(got.len(), 3);
    assert!(!got["$create"].outlier && got["$create"].rejected.is_none());
    assert!(got["$outlier"].outlier && got["$outlier"].rejected.is_none());
    assert_eq!(
        got["$rejected"].rejected.as_deref(),
        Some("sender is not in the room")
    );
    for e in got.values() {
        assert_eq!(e.format_version, Some(3));
        assert_eq!(e.room_id, ROOM);
        assert_eq!(e.json, format!(r#"{{"event_id":"{}"}}"#, e.event_id));
    }
    assert!(got["$create"].stream_ordering < got["$outlier"].stream_ordering);
    // An id asked twice comes back once.
    let mut rows = Vec::new();
    cold.visit_events(&[&asked[..], &["$rejected"]].concat(), |row| {
        rows.push(row.to_owned());
        Ok(())
    })
    .unwrap();
    assert_eq!(rows.len(), 3);
    for row in rows {
        assert_eq!(row, *got[&row.event_id]);
    }
    let edges: i64 = with_conn!(&mut raw, |c| event_edges::table.count().get_result(c)).unwrap();
    assert_eq!(edges, 1, "outliers have no place in the DAG");
    let extremities: Vec<String> = with_conn!(&mut raw, |c| event_forward_extremities::table
        .select(event_forward_extremities::event_id)
        .load(c))
    .unwrap();
    assert_eq!(extremities, vec!["$create".to_owned()]);
    testing::assert_invariants(&t.open());
}

/// A batch whose write fails part-way (a row that violates a constraint) leaves
/// none of its rows behind, and the stream position does not move.
fn failed_batch_leaves_nothing(t: &TestDb) {
    let store = stores(t);
    let g1 = store
        .state()
        .store_state_group(&NewStateGroup::snapshot(
            "$create",
            ROOM,
            &StateMap::from_iter([(key("m.room.create", ""), "$create".into())]),
        ))
        .unwrap();
    store
        .persist_batch(&batch(
            &store,
            vec![event("$create", &[], Some(("m.room.create", "")), Some(g1))],
            &[("m.room.create", "", "$create")],
        ))
        .unwrap();
    let before = store.max_stream_ordering();
    // The current-state change names an event id that is already the value of
    // another slot: current_state_events.event_id is unique, so the write fails
    // after the events rows went in.
    let mut b = batch(
        &store,
        vec![
            event("$m1", &["$create"], None, Some(g1)),
            event("$m2", &["$m1"], None, Some(g1)),
        ],
        &[],
    );
    b.current_state
        .added
        .push((key("m.other", ""), "$create".into(), None));
    let err = store.persist_batch(&b).unwrap_err();
    assert!(err.to_string().starts_with("persist_events"), "{err}");
    assert_eq!(count(t, "events"), 1);
    assert_eq!(count(t, "event_json"), 1);
    assert_eq!(count(t, "event_to_state_groups"), 1);
    assert_eq!(
        store.get_forward_extremities(ROOM).unwrap(),
        vec!["$create".to_owned()]
    );
    assert_eq!(
        store.max_stream_ordering(),
        before,
        "the position moves only on commit"
    );
    testing::assert_invariants(&t.open());
}

/// Each batch that changes the current state leaves an invalidation for
/// replicas; pruning keeps the newest `keep` positions and leaves one
/// "everything" row where it cut, which a replica behind it sees.
fn old_cache_invalidations_are_pruned(t: &TestDb) {
    let store = stores(t);
    let mut positions = vec![];
    let mut prev: Vec<String> = vec![];
    for i in 0..5 {
        let id = format!("$topic{i}");
        let prevs: Vec<&str> = prev.iter().map(String::as_str).collect();
        let e = event(&id, &prevs, Some(("m.room.topic", "")), None);
        let b = batch(&store, vec![e], &[("m.room.topic", "", &id)]);
        positions.push(store.persist_batch(&b).unwrap().max_stream_ordering);
        prev = vec![id];
    }
    let all = store.replication_since(0).unwrap();
    assert_eq!(all.invalidations.len(), 5);
    assert!(all
        .invalidations
        .iter()
        .all(|(_, c, k)| c == CURRENT_STATE_CACHE && k == ROOM));

    // Keep the newest two positions: the first three go.
    assert_eq!(store.prune_cache_invalidations(2).unwrap(), 3);
    let after = store.replication_since(0).unwrap();
    assert_eq!(after.position, positions[4]);
    assert_eq!(
        after.invalidations,
        vec![
            (positions[2], ALL_CACHES.to_owned(), String::new()),
            (
                positions[3],
                CURRENT_STATE_CACHE.to_owned(),
                ROOM.to_owned()
            ),
            (
                positions[4],
                CURRENT_STATE_CACHE.to_owned(),
                ROOM.to_owned()
            ),
        ]
    );
    // A replica already past the cut sees only what it has not applied.
    assert_eq!(
        store
            .replication_since(positions[2])
            .unwrap()
            .invalidations
            .len(),
        2
    );
    // Nothing but the marker is old enough: nothing changes.
    assert_eq!(store.prune_cache_invalidations(2).unwrap(), 0);
    assert_eq!(store.replication_since(0).unwrap(), after);
    // Keep nothing: one marker at the newest position remains.
    assert_eq!(store.prune_cache_invalidations(0).unwrap(), 2);
    assert_eq!(
        store.replication_since(0).unwrap().invalidations,
        vec![(positions[4], ALL_CACHES.to_owned(), String::new())]
    );
    assert_eq!(count(t, "cache_invalidations"), 1);
}

/// `events.instance_name` is the writing process's configured name, as in
/// Synapse (it was "main" whatever the configuration said).
fn events_name_the_instance_that_wrote_them(t: &TestDb) {
    let config = StoreConfig {
        instance_name: "main-7".to_owned(),
        ..StoreConfig::default()
    };
    let store = EventsStore::new(t.open(), &config).unwrap();
    let create_state = StateMap::from_iter([(key("m.room.create", ""), "$create".into())]);
    let g1 = store
        .state()
        .store_state_group(&NewStateGroup::snapshot("$create", ROOM, &create_state))
        .unwrap();
    store
        .persist_batch(&batch(
            &store,
            vec![event("$create", &[], Some(("m.room.create", "")), Some(g1))],
            &[("m.room.create", "", "$create")],
        ))
        .unwrap();
    let names: Vec<Option<String>> = with_conn!(&mut t.raw_connection(), |c| events::table
        .select(events::instance_name)
        .load(c))
    .unwrap();
    assert_eq!(names, vec![Some("main-7".to_owned())]);
    testing::assert_invariants(store.database());
}

/// A batch deletes the old extremities it replaces and inserts its new ones,
/// by event: one it keeps stays, and another room's are untouched.
fn a_batch_changes_only_the_extremities_it_moves(t: &TestDb) {
    let store = stores(t);
    const OTHER: &str = "!other:test";
    let extremities = |room: &str| {
        let mut raw = t.raw_connection();
        let mut rows = with_conn!(&mut raw, |c| event_forward_extremities::table
            .filter(event_forward_extremities::room_id.eq(room))
            .select(event_forward_extremities::event_id)
            .load::<String>(c))
        .unwrap();
        rows.sort();
        rows
    };
    let group = |room: &str, create: &str| {
        store
            .state()
            .store_state_group(&NewStateGroup::snapshot(
                create,
                room,
                &StateMap::from_iter([(key("m.room.create", ""), create.into())]),
            ))
            .unwrap()
    };
    let g = group(ROOM, "$create");
    let create = event("$create", &[], Some(("m.room.create", "")), Some(g));
    store
        .persist_batch(&batch(
            &store,
            vec![create],
            &[("m.room.create", "", "$create")],
        ))
        .unwrap();
    let write = |events: Vec<EventToPersist>| {
        store.persist_batch(&batch(&store, events, &[])).unwrap();
    };
    let og = group(OTHER, "$ocreate");
    let ocreate = testing::state_event(OTHER, "$ocreate", &[], ("m.room.create", ""), Some(og));
    store
        .persist_batch(&RoomBatch {
            room_id: OTHER.into(),
            old_extremities: vec![],
            new_extremities: vec!["$ocreate".into()],
            events: vec![ocreate],
            current_state: CurrentStateDelta {
                removed: vec![],
                added: vec![(key("m.room.create", ""), "$ocreate".into(), None)],
            },
        })
        .unwrap();
    // A fork: both stay.
    write(vec![
        event("$a", &["$create"], None, Some(g)),
        event("$b", &["$create"], None, Some(g)),
    ]);
    assert_eq!(extremities(ROOM), ["$a", "$b"]);
    // One replaced, the other kept.
    write(vec![event("$c", &["$a"], None, Some(g))]);
    assert_eq!(extremities(ROOM), ["$b", "$c"]);
    // Both merged into one.
    write(vec![event("$d", &["$b", "$c"], None, Some(g))]);
    assert_eq!(extremities(ROOM), ["$d"]);
    assert_eq!(extremities(OTHER), ["$ocreate"]);
    testing::assert_invariants(&t.open());
}
