//! Writes through the main process's pipeline (contexts, then the room's
//! persister) that fail, or seem to, at a point other than inside the
//! batch's own statement: nothing prepared for them stays in memory, what the
//! writer remembers agrees with the database, and the room's next write and
//! a retry are right.

use e2e_tests::{id_of, message, PgProxy, Room, ALICE, ROOM as POSTED};
use event_context::contexts_for;
use persistence::Pipeline;
use std::time::{Duration, Instant};
use storage_core::testing::TestDb;
use storage_core::{Database, DatabaseConfig, OpenMode, StoreConfig};
use storage_events::testing::assert_invariants;
use storage_events::{EventReads, EventsStore};
use storage_state::StateGroupAccess;

storage_core::engine_tests!(
    a_write_whose_read_before_its_batch_fails_keeps_no_prepared_group,
    an_event_naming_an_id_with_a_nul_is_refused_on_both_engines,
    a_rejection_reason_naming_a_nul_is_stored_on_both_engines,
);

const ROOM: &str = "!failures:bench.test";

fn execute(t: &TestDb, sql: &str) {
    let mut conn = t.raw_connection();
    storage_core::with_conn!(&mut conn, |c| {
        diesel::connection::SimpleConnection::batch_execute(c, sql)
    })
    .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// A process started over a stored room reads the room's forward extremities
/// when it first writes there, after the event's context was computed (a
/// join: its state group prepared, kept in memory until its batch writes it).
/// That read fails (the table gone for a while, as any failing read): the
/// write fails, and the prepared group is dropped, not held for ever.
fn a_write_whose_read_before_its_batch_fails_keeps_no_prepared_group(t: &TestDb) {
    // 4 founding events and a message, then a join.
    let lines = main_process::bench_room::linear_room(ROOM, 6, 3);
    {
        let pipeline = Pipeline::open(t.open(), &StoreConfig::default()).unwrap();
        let founding = contexts_for(&pipeline.builder, ROOM, &lines[..5]).unwrap();
        pipeline.persist(ROOM, &founding).unwrap();
    }
    let pipeline = Pipeline::open(t.open(), &StoreConfig::default()).unwrap();
    let state = pipeline.builder.state();
    let join = contexts_for(&pipeline.builder, ROOM, &lines[5..]).unwrap();
    assert_eq!(state.prepared_groups_waiting(), 1);
    execute(
        t,
        "ALTER TABLE event_forward_extremities RENAME TO hidden_extremities",
    );
    let error = pipeline.persist(ROOM, &join).unwrap_err();
    eprintln!("the write was told: {error}");
    execute(
        t,
        "ALTER TABLE hidden_extremities RENAME TO event_forward_extremities",
    );
    assert_eq!(
        state.prepared_groups_waiting(),
        0,
        "the group prepared for the failed write was dropped"
    );
    let id = join[0].0.event_id.to_string();
    assert!(pipeline
        .builder
        .events()
        .have_events(&[&id])
        .unwrap()
        .is_empty());
    // Sent again, it is written.
    let join = contexts_for(&pipeline.builder, ROOM, &lines[5..]).unwrap();
    pipeline.persist(ROOM, &join).unwrap();
    assert_eq!(
        pipeline
            .builder
            .events()
            .get_forward_extremities(ROOM)
            .unwrap(),
        vec![id]
    );
    assert_eq!(state.prepared_groups_waiting(), 0);
    assert_invariants(&t.open());
}

/// A store that remembers nothing yet: what it reads is what is stored.
fn fresh(t: &TestDb) -> EventsStore {
    EventsStore::new(t.open(), &StoreConfig::default()).unwrap()
}

/// PostgreSQL: the answer to a batch's statement lost after the statement
/// committed (its connection cut while the writer waited, as a network cut
/// or a server restart would). The writer is told the database is
/// unavailable, and what it remembers of the room is read afresh: the
/// client's retry of the event is found stored and answered at a stream
/// position that covers it, and the room's next event follows it.
#[test]
fn postgres_a_write_whose_answer_is_lost_after_its_commit() {
    let Some(t) = TestDb::postgres() else { return };
    t.open();
    let proxy = PgProxy::start(&t);
    let db =
        Database::open(DatabaseConfig::parse(&proxy.url(&t), OpenMode::Writer).unwrap()).unwrap();
    let pipeline = Pipeline::open(db, &StoreConfig::default()).unwrap();
    let write = |events: &[serde_json::Value]| {
        let texts: Vec<String> = events.iter().map(|e| e.to_string()).collect();
        let contexts = contexts_for(&pipeline.builder, POSTED, &texts)?;
        pipeline.persist(POSTED, &contexts)
    };
    let mut room = Room::default();
    write(&room.founding("")).unwrap();
    // A topic: a state event, its group prepared and written with it.
    let lost = message(&mut room, "lost");
    let id = id_of(&lost);
    proxy.hold_answers_after(&id);
    let error = std::thread::scope(|s| {
        let writing = s.spawn(|| write(std::slice::from_ref(&lost)));
        // Committed: another session sees it.
        let deadline = Instant::now() + Duration::from_secs(60);
        while fresh(&t).have_events(&[&id]).unwrap().is_empty() {
            assert!(Instant::now() < deadline, "the write never committed");
            std::thread::sleep(Duration::from_millis(10));
        }
        proxy.cut_held();
        writing.join().unwrap().unwrap_err()
    });
    eprintln!("the writer was told: {error}");
    let stored = fresh(&t);
    let stored_at = stored.get_events(&[&id]).unwrap()[&id].stream_ordering;
    let events = pipeline.builder.events();
    assert_eq!(
        events.forward_extremities_for_write(POSTED).unwrap(),
        vec![id.clone()]
    );
    assert_eq!(
        events.state().get_current_state_ids(POSTED).unwrap(),
        stored.state().get_current_state_ids(POSTED).unwrap()
    );
    // The client sends it again.
    let again = write(std::slice::from_ref(&lost)).unwrap();
    assert_eq!(again.skipped, vec![id.clone()]);
    assert!(
        again.max_stream_ordering >= stored_at,
        "the retry was answered at position {}, before the event's {stored_at}",
        again.max_stream_ordering
    );
    assert!(events.max_stream_ordering() >= stored_at);
    // The room goes on after it.
    let after = message(&mut room, "after");
    write(std::slice::from_ref(&after)).unwrap();
    let expected = vec![id_of(&after)];
    assert_eq!(fresh(&t).get_forward_extremities(POSTED).unwrap(), expected);
    assert_eq!(
        events.forward_extremities_for_write(POSTED).unwrap(),
        expected
    );
    let current = fresh(&t).state().get_current_state_ids(POSTED).unwrap();
    assert_eq!(
        current
            .get(&storage_state::key("m.room.topic", ""))
            .map(|e| e.to_string()),
        Some(id_of(&after))
    );
    assert_eq!(
        events.state().get_current_state_ids(POSTED).unwrap(),
        current
    );
    assert_eq!(events.state().prepared_groups_waiting(), 0);
    assert_invariants(events.database());
}

/// An event naming an auth event whose id holds a NUL character (no event
/// has such an id: it is missing, so the event would be stored rejected, its
/// `event_auth` row naming that id). PostgreSQL cannot store a NUL in text,
/// so the same request was stored on SQLite and failed on PostgreSQL as a
/// database error, failing with it the events of any other request written
/// in the same batch. It is refused before anything is prepared or queued, on
/// both engines, and the room goes on.
fn an_event_naming_an_id_with_a_nul_is_refused_on_both_engines(t: &TestDb) {
    let pipeline = Pipeline::open(t.open(), &StoreConfig::default()).unwrap();
    let write = |events: &[serde_json::Value]| {
        let texts: Vec<String> = events.iter().map(|e| e.to_string()).collect();
        let contexts = contexts_for(&pipeline.builder, POSTED, &texts)?;
        pipeline.persist(POSTED, &contexts)
    };
    let mut room = Room::default();
    write(&room.founding("")).unwrap();
    let before = room.clone();
    for field in ["auth_events", "prev_events"] {
        let mut room = before.clone();
        let mut bad = message(&mut room, "nul");
        bad[field]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!(["$missing\u{0}:example.com", {"sha256": "aGFzaA"}]));
        let error = write(std::slice::from_ref(&bad)).unwrap_err();
        assert!(
            matches!(error.kind(), storage_core::ErrorKind::InvalidArgument(_)),
            "{field}: {error}"
        );
        assert!(error.to_string().contains("NUL"), "{field}: {error}");
        let id = id_of(&bad);
        let events = pipeline.builder.events();
        assert!(events.have_events(&[&id]).unwrap().is_empty(), "{field}");
        assert_eq!(events.state().prepared_groups_waiting(), 0);
    }
    let mut room = before;
    let next = message(&mut room, "next");
    write(std::slice::from_ref(&next)).unwrap();
    assert_eq!(
        fresh(t).get_forward_extremities(POSTED).unwrap(),
        vec![id_of(&next)]
    );
    assert_invariants(&t.open());
}

/// A power levels event refused by the auth rules for raising an event type
/// whose name holds a NUL character: it is stored rejected, with the rules'
/// reason, which names that type. PostgreSQL cannot store a NUL in text: the
/// batch failed there as a database error (with every event written with it,
/// other requests' too), where SQLite stored it. The reason is stored with the
/// NUL replaced, on both engines, and the other event of the same request is
/// written too.
fn a_rejection_reason_naming_a_nul_is_stored_on_both_engines(t: &TestDb) {
    let pipeline = Pipeline::open(t.open(), &StoreConfig::default()).unwrap();
    let write = |events: &[serde_json::Value]| {
        let texts: Vec<String> = events.iter().map(|e| e.to_string()).collect();
        let contexts = contexts_for(&pipeline.builder, POSTED, &texts)?;
        pipeline.persist(POSTED, &contexts)
    };
    let mut room = Room::default();
    write(&room.founding("")).unwrap();
    // Above Alice's own 100: refused (and so neither the room's power levels
    // nor an extremity: the next event follows the same one).
    let raise = room.clone().event(
        "raise",
        "m.room.power_levels",
        ALICE,
        Some(""),
        serde_json::json!({"users": {ALICE: 100}, "events": {"org.example\u{0}type": 101}}),
    );
    let next = message(&mut room, "next");
    write(&[raise.clone(), next.clone()]).unwrap();
    let stored = fresh(t);
    let raise = id_of(&raise);
    let rejected = stored.get_events(&[&raise]).unwrap()[&raise]
        .rejected
        .clone();
    let reason = rejected.expect("stored as rejected");
    assert!(reason.contains("org.example\u{FFFD}type"), "{reason}");
    assert_eq!(
        stored.get_forward_extremities(POSTED).unwrap(),
        vec![id_of(&next)]
    );
    assert_invariants(&t.open());
}
