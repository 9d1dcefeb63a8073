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
    an_event_stored_rejected_and_posted_again_stays_out_of_the_room_state,
    an_event_stored_as_an_outlier_and_posted_again_is_no_extremity,
    an_event_after_one_stored_rejected_gets_the_stored_state,
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
/// `events` posted in one request to the room `POSTED`, as `POST .../events`
/// writes them: their contexts, then their batch.
fn post(
    pipeline: &Pipeline,
    events: &[serde_json::Value],
) -> storage_core::Result<std::sync::Arc<storage_events::PersistedBatch>> {
    let texts: Vec<String> = events.iter().map(|e| e.to_string()).collect();
    let contexts = contexts_for(&pipeline.builder, POSTED, &texts)?;
    pipeline.persist(POSTED, &contexts)
}

fn fresh(t: &TestDb) -> EventsStore {
    EventsStore::new(t.open(), &StoreConfig::default()).unwrap()
}

/// PostgreSQL: the answer to a batch's statement lost after the statement
/// committed (its connection cut while the writer waited, as a network cut
/// or a server restart would). The writer is told the database is
/// unavailable, and what it remembers of the room is read afresh, its
/// stream position too (before, it stayed behind the event until the next
/// write): the client's retry of the event is found stored and answered at a
/// stream position that covers it, and the room's next event follows it.
#[test]
fn postgres_a_write_whose_answer_is_lost_after_its_commit() {
    let Some(t) = TestDb::postgres() else { return };
    t.open();
    let proxy = PgProxy::start(&t);
    let db =
        Database::open(DatabaseConfig::parse(&proxy.url(&t), OpenMode::Writer).unwrap()).unwrap();
    let pipeline = Pipeline::open(db, &StoreConfig::default()).unwrap();
    let write = |events: &[serde_json::Value]| post(&pipeline, events);
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
    // What `/stream/position` answers: the event is committed (and read in
    // the room's state), so the position covers it, before any retry.
    assert!(
        events.max_stream_ordering() >= stored_at,
        "the writer's position {} stays behind the committed event's {stored_at}",
        events.max_stream_ordering()
    );
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
    let write = |events: &[serde_json::Value]| post(&pipeline, events);
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
    let write = |events: &[serde_json::Value]| post(&pipeline, events);
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

/// An event stored rejected (an auth event it names was missing), posted
/// again with a new event once that auth event is stored: its new context
/// accepts it, but what is stored of it stays (it is skipped). The room's
/// forward extremities and current state follow what is stored: the rejected
/// event is neither an extremity nor in the current state.
fn an_event_stored_rejected_and_posted_again_stays_out_of_the_room_state(t: &TestDb) {
    let pipeline = Pipeline::open(t.open(), &StoreConfig::default()).unwrap();
    let write = |events: &[serde_json::Value]| post(&pipeline, events);
    let mut room = Room::default();
    write(&room.founding("")).unwrap();
    let founded = fresh(t).get_forward_extremities(POSTED).unwrap();
    // Alice names herself anew, and sets a topic after the founding events
    // that cites that member event as its auth event before it is stored.
    let mut renamed_room = room.clone();
    let mut renamed = renamed_room.event(
        "renamed",
        "m.room.member",
        ALICE,
        Some(ALICE),
        serde_json::json!({"membership": "join", "displayname": "Alice"}),
    );
    // A join (membership again) is authorised by the join rules too.
    renamed["auth_events"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!(["$rules:example.com", {"sha256": "aGFzaA"}]));
    let mut topic = room.clone().event(
        "topic",
        "m.room.topic",
        ALICE,
        Some(""),
        serde_json::json!({"topic": "early"}),
    );
    let auth = topic["auth_events"].as_array_mut().unwrap();
    let join = auth
        .iter_mut()
        .find(|a| a[0] == "$alice:example.com")
        .expect("the topic cites Alice's join");
    join[0] = renamed["event_id"].clone();
    let first = write(std::slice::from_ref(&topic)).unwrap();
    assert!(first.positions.contains_key(&id_of(&topic)));
    let stored = fresh(t);
    let id = id_of(&topic);
    assert!(stored.get_events(&[&id]).unwrap()[&id].rejected.is_some());
    assert_eq!(stored.get_forward_extremities(POSTED).unwrap(), founded);
    write(std::slice::from_ref(&renamed)).unwrap();
    // Now every auth event of the topic is stored: its context accepts it.
    // Sent again, with the next event after the room's tip.
    let next = message(&mut renamed_room, "next");
    let again = write(&[topic.clone(), next.clone()]).unwrap();
    assert_eq!(again.skipped, vec![id.clone()]);
    let stored = fresh(t);
    assert!(stored.get_events(&[&id]).unwrap()[&id].rejected.is_some());
    let expected = vec![id_of(&next)];
    assert_eq!(stored.get_forward_extremities(POSTED).unwrap(), expected);
    let events = pipeline.builder.events();
    assert_eq!(
        events.forward_extremities_for_write(POSTED).unwrap(),
        expected
    );
    let current = stored.state().get_current_state_ids(POSTED).unwrap();
    assert!(
        !current.values().any(|e| **e == *id),
        "the rejected topic is in the current state: {current:?}"
    );
    assert_eq!(
        events.state().get_current_state_ids(POSTED).unwrap(),
        current
    );
    assert_invariants(&t.open());
}

/// An event stored as an outlier (as a worker may forward one: an auth event
/// fetched for another, with no state of its own) that the auth rules
/// rejected, posted again as a timeline event with a new event after the
/// room's tip: it stays an outlier (skipped; a stored rejection stands), and
/// so it is no forward extremity. (An accepted outlier posted so is one no
/// longer: `posted_again.rs`.)
fn an_event_stored_as_an_outlier_and_posted_again_is_no_extremity(t: &TestDb) {
    let pipeline = Pipeline::open(t.open(), &StoreConfig::default()).unwrap();
    let write = |events: &[serde_json::Value]| post(&pipeline, events);
    let mut room = Room::default();
    write(&room.founding("")).unwrap();
    let aside = message(&mut room.clone(), "aside");
    let outlier = http_api::wire::ContextedEvent {
        room_version: "2".to_owned(),
        pdu: aside.to_string(),
        event_id: None,
        outlier: true,
        state_group_before: None,
        state_group_after: None,
        rejected: Some("its auth events were not at hand".to_owned()),
        new_state_groups: Vec::new(),
    };
    let state = pipeline.builder.state();
    let outlier = http_api::wire::adopt_contexted(state, vec![outlier]).unwrap();
    event_context::check_contexts(state, POSTED, &outlier).unwrap();
    pipeline.persist(POSTED, &outlier).unwrap();
    let next = message(&mut room, "next");
    let again = write(&[aside.clone(), next.clone()]).unwrap();
    assert_eq!(again.skipped, vec![id_of(&aside)]);
    let expected = vec![id_of(&next)];
    assert_eq!(fresh(t).get_forward_extremities(POSTED).unwrap(), expected);
    assert_eq!(
        pipeline
            .builder
            .events()
            .forward_extremities_for_write(POSTED)
            .unwrap(),
        expected
    );
    assert_invariants(&t.open());
}

/// An event stored rejected (an auth event it names was missing), posted
/// again followed by an event that names it as its prev event, once that auth
/// event is stored: the request's context of it accepts it, but it is stored
/// rejected and skipped. The event after it gets the state after it as
/// stored (a rejected event changes no state), not as this request's context
/// has it, and the room's current state holds no rejected event.
fn an_event_after_one_stored_rejected_gets_the_stored_state(t: &TestDb) {
    let pipeline = Pipeline::open(t.open(), &StoreConfig::default()).unwrap();
    let write = |events: &[serde_json::Value]| post(&pipeline, events);
    let mut room = Room::default();
    write(&room.founding("")).unwrap();
    let mut renamed = room.clone().event(
        "renamed",
        "m.room.member",
        ALICE,
        Some(ALICE),
        serde_json::json!({"membership": "join", "displayname": "Alice"}),
    );
    renamed["auth_events"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!(["$rules:example.com", {"sha256": "aGFzaA"}]));
    // The topic and a message after it.
    let mut topic = room.event(
        "topic",
        "m.room.topic",
        ALICE,
        Some(""),
        serde_json::json!({"topic": "early"}),
    );
    let after = room.event(
        "after",
        "m.room.message",
        ALICE,
        None,
        serde_json::json!({"body": "after", "msgtype": "m.text"}),
    );
    let auth = topic["auth_events"].as_array_mut().unwrap();
    let join = auth
        .iter_mut()
        .find(|a| a[0] == "$alice:example.com")
        .expect("the topic cites Alice's join");
    join[0] = renamed["event_id"].clone();
    write(std::slice::from_ref(&topic)).unwrap();
    let id = id_of(&topic);
    assert!(fresh(t).get_events(&[&id]).unwrap()[&id].rejected.is_some());
    write(std::slice::from_ref(&renamed)).unwrap();
    let again = write(&[topic.clone(), after.clone()]).unwrap();
    assert_eq!(again.skipped, vec![id.clone()]);
    let stored = fresh(t);
    let after = id_of(&after);
    let group = stored
        .state()
        .get_state_group_for_events(&[&after])
        .unwrap()[&after];
    let state = stored
        .state()
        .get_state_for_groups(&[group], &storage_state::StateFilter::all())
        .unwrap()
        .remove(&group)
        .unwrap();
    assert!(
        !state.values().any(|e| **e == *id),
        "the state after the message holds the rejected topic: {state:?}"
    );
    let current = stored.state().get_current_state_ids(POSTED).unwrap();
    assert!(
        !current.values().any(|e| **e == *id),
        "the rejected topic is in the current state: {current:?}"
    );
    assert_invariants(&t.open());
}
