//! Events posted again once stored, through the main process's pipeline
//! (contexts, then the room's persister), as `POST .../events` and a
//! worker's forwarded writes reach it: what is stored stays, but for an
//! outlier that the new copy gives its place in the room's graph (Synapse's
//! `_update_outliers_txn`); nothing is written for the copy that no event
//! names; a forwarded request delivered twice gets the first one's answer.

use e2e_tests::{id_of, message, Room, ALICE, ROOM};
use event_context::contexts_for;
use http_api::wire::{adopt_contexted, ContextedEvent, WriteOutcome};
use persistence::Pipeline;
use std::sync::Arc;
use storage_core::testing::TestDb;
use storage_core::StoreConfig;
use storage_events::testing::assert_invariants;
use storage_events::{EventReads, EventsStore, PersistedBatch};
use storage_state::{key, StateFilter, StateGroupAccess};

storage_core::engine_tests!(
    an_outlier_posted_with_its_place_is_an_outlier_no_longer,
    an_outlier_and_an_event_after_it_posted_together,
    an_outlier_posted_again_and_rejected_stays_an_outlier,
    an_outlier_imported_with_its_place_is_an_outlier_no_longer,
    a_stored_event_posted_again_writes_no_state_group,
    a_forwarded_request_delivered_twice_gets_the_same_answer,
    a_second_delivery_during_the_first_gets_the_same_answer,
    a_second_delivery_during_a_first_that_fails_writes_the_events,
);

fn pipeline(t: &TestDb) -> Pipeline {
    Pipeline::open(t.open(), &StoreConfig::default()).unwrap()
}

/// `events` posted in one request to `ROOM`: their contexts, then their batch.
fn post(
    pipeline: &Pipeline,
    events: &[serde_json::Value],
) -> storage_core::Result<Arc<PersistedBatch>> {
    let texts: Vec<String> = events.iter().map(|e| e.to_string()).collect();
    let contexts = contexts_for(&pipeline.builder, ROOM, &texts)?;
    pipeline.persist(ROOM, &contexts)
}

/// A worker's request, as the main process's writer takes it (adopt the
/// groups, check the contexts, persist).
fn write_forwarded(
    pipeline: &Pipeline,
    events: Vec<ContextedEvent>,
) -> storage_core::Result<WriteOutcome> {
    main_process::serve_cmd::write_contexted(pipeline, ROOM, events)
}

/// `event` stored as an outlier, as a worker forwards one (an auth event
/// fetched for another, with no state of its own), accepted or rejected as
/// `rejected` says.
fn store_outlier(pipeline: &Pipeline, event: &serde_json::Value, rejected: Option<&str>) {
    let outlier = ContextedEvent {
        room_version: "2".to_owned(),
        pdu: event.to_string(),
        event_id: None,
        outlier: true,
        state_group_before: None,
        state_group_after: None,
        rejected: rejected.map(str::to_owned),
        new_state_groups: Vec::new(),
    };
    write_forwarded(pipeline, vec![outlier]).unwrap();
    let id = id_of(event);
    assert!(fresh(pipeline).get_events(&[&id]).unwrap()[&id].outlier);
}

/// A store over the same database that remembers nothing yet.
fn fresh(pipeline: &Pipeline) -> EventsStore {
    EventsStore::new(
        pipeline.builder.events().database().clone(),
        &StoreConfig::default(),
    )
    .unwrap()
}

/// The room's topic after `event_id`, read from storage (`None`: the event
/// has no state group).
fn topic_after(pipeline: &Pipeline, event_id: &str) -> Option<String> {
    let stored = fresh(pipeline);
    let state = stored.state();
    let group = *state
        .get_state_group_for_events(&[event_id])
        .unwrap()
        .get(event_id)?;
    let mut states = state
        .get_state_for_groups(&[group], &StateFilter::all())
        .unwrap();
    let state = states.remove(&group).unwrap();
    Some(
        state
            .get(&key("m.room.topic", ""))
            .map(|e| e.to_string())
            .unwrap_or_default(),
    )
}

/// The room's forward extremities, stored and as the writer remembers them
/// (which must agree), and its current topic, stored and remembered (which
/// must agree too).
fn room_now(pipeline: &Pipeline) -> (Vec<String>, Option<String>) {
    let stored = fresh(pipeline);
    let extremities = stored.get_forward_extremities(ROOM).unwrap();
    let events = pipeline.builder.events();
    assert_eq!(
        events.forward_extremities_for_write(ROOM).unwrap(),
        extremities,
        "the writer remembers other extremities than are stored"
    );
    let current = stored.state().get_current_state_ids(ROOM).unwrap();
    assert_eq!(
        events.state().get_current_state_ids(ROOM).unwrap(),
        current,
        "the writer remembers another current state than is stored"
    );
    let topic = current.get(&key("m.room.topic", "")).map(|e| e.to_string());
    (extremities, topic)
}

fn state_group_rows(t: &TestDb) -> i64 {
    e2e_tests::try_count(t.url(), "SELECT count(*) AS n FROM state_groups").unwrap()
}

/// A topic stored as an outlier (its place in the graph after the room's
/// tip unknown to the writer), then posted as a timeline event: it is one
/// no longer. Its row keeps its stream position, and it gets its state group
/// (the state after it holds it), its edge to its prev event, and (where
/// workers follow the stream) a new stream position, which the answer gives. It becomes the room's forward
/// extremity and its topic the current one, and an event naming it as its
/// prev event is accepted (before, it was refused: "unknown or an
/// outlier"). Posted once more, it is skipped.
fn an_outlier_posted_with_its_place_is_an_outlier_no_longer(t: &TestDb) {
    let pipeline = pipeline(t);
    let mut room = Room::default();
    post(&pipeline, &room.founding("")).unwrap();
    let founded = room_now(&pipeline);
    let aside = message(&mut room, "aside");
    let id = id_of(&aside);
    store_outlier(&pipeline, &aside, None);
    assert_eq!(room_now(&pipeline), founded);
    let stored_at = fresh(&pipeline).get_events(&[&id]).unwrap()[&id].stream_ordering;

    let again = post(&pipeline, std::slice::from_ref(&aside)).unwrap();
    assert_eq!(again.skipped, Vec::<String>::new());
    let position = again.positions[&id];
    if t.open().engine().supports_multiple_processes() {
        // Workers learn of it at a position of its own.
        assert!(position > stored_at, "{again:?}");
    } else {
        assert_eq!(position, stored_at, "{again:?}");
    }
    assert_eq!(again.max_stream_ordering, position);
    let stored = fresh(&pipeline).get_events(&[&id]).unwrap()[&id].clone();
    assert!(!stored.outlier, "still an outlier: {stored:?}");
    assert_eq!(stored.stream_ordering, stored_at);
    // The writer's own cache of the event agrees.
    assert!(!pipeline.builder.events().get_events(&[&id]).unwrap()[&id].outlier);
    assert_eq!(topic_after(&pipeline, &id), Some(id.clone()));
    assert_eq!(room_now(&pipeline), (vec![id.clone()], Some(id.clone())));
    assert_eq!(pipeline.builder.events().max_stream_ordering(), position);
    assert_invariants(&t.open());

    // The room goes on after it.
    let child = message(&mut room, "child");
    let written = post(&pipeline, std::slice::from_ref(&child)).unwrap();
    assert!(written.positions.contains_key(&id_of(&child)));
    assert_eq!(topic_after(&pipeline, &id_of(&child)), Some(id_of(&child)));
    assert_eq!(
        room_now(&pipeline),
        (vec![id_of(&child)], Some(id_of(&child)))
    );
    // Once more: stored, and no outlier, so skipped.
    let once_more = post(&pipeline, std::slice::from_ref(&aside)).unwrap();
    assert_eq!(once_more.skipped, vec![id.clone()]);
    assert_eq!(
        room_now(&pipeline),
        (vec![id_of(&child)], Some(id_of(&child)))
    );
    assert_eq!(pipeline.builder.state().prepared_groups_waiting(), 0);
    assert_invariants(&t.open());
}

/// A stored outlier and an event after it, posted in one request: the event
/// after it is worked out from the request's context of it (it is in the
/// graph now), not refused for following an outlier.
fn an_outlier_and_an_event_after_it_posted_together(t: &TestDb) {
    let pipeline = pipeline(t);
    let mut room = Room::default();
    post(&pipeline, &room.founding("")).unwrap();
    let aside = message(&mut room, "aside");
    store_outlier(&pipeline, &aside, None);
    let child = room.event(
        "child",
        "m.room.message",
        ALICE,
        None,
        serde_json::json!({"body": "after the outlier", "msgtype": "m.text"}),
    );
    let written = post(&pipeline, &[aside.clone(), child.clone()]).unwrap();
    assert_eq!(written.skipped, Vec::<String>::new());
    assert_eq!(written.positions.len(), 2);
    let (aside, child) = (id_of(&aside), id_of(&child));
    assert!(!fresh(&pipeline).get_events(&[&aside]).unwrap()[&aside].outlier);
    assert_eq!(topic_after(&pipeline, &child), Some(aside.clone()));
    assert_eq!(room_now(&pipeline), (vec![child], Some(aside)));
    assert_eq!(pipeline.builder.state().prepared_groups_waiting(), 0);
    assert_invariants(&t.open());
}

/// Synapse leaves an outlier as it is when the new copy is rejected ("what
/// we have is at least as good"), and so do we: a topic by someone who
/// never joined, stored as an outlier (a worker may store one its auth
/// events accept), posted as a timeline event, is rejected by the room's
/// state and stays an outlier, with no state group, no extremity and no
/// change of state. So does an outlier stored rejected, posted again with
/// an accepted copy: a stored rejection stands.
fn an_outlier_posted_again_and_rejected_stays_an_outlier(t: &TestDb) {
    let pipeline = pipeline(t);
    let mut room = Room::default();
    post(&pipeline, &room.founding("")).unwrap();
    let founded = room_now(&pipeline);
    let intruder = room.clone().event(
        "intruder",
        "m.room.topic",
        "@mallory:example.com",
        Some(""),
        serde_json::json!({"topic": "mine"}),
    );
    let rejected = message(&mut room.clone(), "rejected");
    store_outlier(&pipeline, &intruder, None);
    store_outlier(&pipeline, &rejected, Some("a test's reason"));
    let groups = state_group_rows(t);
    for event in [&intruder, &rejected] {
        let id = id_of(event);
        let again = post(&pipeline, std::slice::from_ref(event)).unwrap();
        assert_eq!(again.skipped, vec![id.clone()]);
        let stored = fresh(&pipeline).get_events(&[&id]).unwrap()[&id].clone();
        assert!(stored.outlier, "{stored:?}");
        assert_eq!(topic_after(&pipeline, &id), None);
        assert_eq!(room_now(&pipeline), founded);
    }
    assert_eq!(state_group_rows(t), groups);
    assert_eq!(pipeline.builder.state().prepared_groups_waiting(), 0);
    // The room goes on from where it was.
    let next = message(&mut room, "next");
    post(&pipeline, std::slice::from_ref(&next)).unwrap();
    assert_eq!(room_now(&pipeline).0, vec![id_of(&next)]);
    assert_invariants(&t.open());
}

/// `hs-main import` of a file holding a stored outlier, with its place in
/// the room, and an event after it: the outlier is one no longer (it was
/// skipped as stored, and the event after it refused).
fn an_outlier_imported_with_its_place_is_an_outlier_no_longer(t: &TestDb) {
    let mut room = Room::default();
    let founding = room.founding("");
    let aside = message(&mut room, "aside");
    let child = message(&mut room, "child");
    {
        let pipeline = pipeline(t);
        post(&pipeline, &founding).unwrap();
        store_outlier(&pipeline, &aside, None);
    }
    let dir = e2e_tests::TempDir(e2e_tests::tempdir("outlier-import"));
    let file = dir.0.join("room.jsonl");
    let lines: Vec<String> = [&aside, &child].iter().map(|e| e.to_string()).collect();
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let (status, out, err) = e2e_tests::hs_main(t, &["import", file.to_str().unwrap()]);
    assert_eq!(status, 0, "{out}\n{err}");
    assert!(out.contains("imported 2 events"), "{out}");
    let pipeline = pipeline(t);
    let (aside, child) = (id_of(&aside), id_of(&child));
    assert!(!fresh(&pipeline).get_events(&[&aside]).unwrap()[&aside].outlier);
    assert_eq!(topic_after(&pipeline, &aside), Some(aside.clone()));
    assert_eq!(room_now(&pipeline), (vec![child.clone()], Some(child)));
    assert_invariants(&t.open());
}

/// A state event posted again once stored (a client's retry): its new
/// context prepares a new state group, which the write, skipping the event,
/// used to write all the same, with no event naming it. Neither a single
/// event nor one among new ones leaves such a group, and nothing prepared
/// stays in memory.
fn a_stored_event_posted_again_writes_no_state_group(t: &TestDb) {
    let pipeline = pipeline(t);
    let mut room = Room::default();
    post(&pipeline, &room.founding("")).unwrap();
    let topic = message(&mut room, "topic");
    post(&pipeline, std::slice::from_ref(&topic)).unwrap();
    let groups = state_group_rows(t);
    let again = post(&pipeline, std::slice::from_ref(&topic)).unwrap();
    assert_eq!(again.skipped, vec![id_of(&topic)]);
    assert_eq!(
        state_group_rows(t),
        groups,
        "a state group was written for the skipped event"
    );
    // With a new state event after it: its group alone is written.
    let next = message(&mut room, "next");
    let written = post(&pipeline, &[topic.clone(), next.clone()]).unwrap();
    assert_eq!(written.skipped, vec![id_of(&topic)]);
    assert_eq!(state_group_rows(t), groups + 1);
    assert_eq!(pipeline.builder.state().prepared_groups_waiting(), 0);
    assert_eq!(
        room_now(&pipeline),
        (vec![id_of(&next)], Some(id_of(&next)))
    );
    assert_invariants(&t.open());
}

/// A worker's request delivered twice to the main process (a retry by the
/// worker or a proxy after a lost answer): the same events with the same
/// prepared state groups. The second used to fail on the groups' ids, stored
/// by the first; it gets the first's answer (its events named as skipped),
/// and the room goes on.
/// A founded room, and a worker's request of a topic (a state group
/// prepared for it) and a message after it.
fn forwarded_request(pipeline: &Pipeline) -> (Room, Vec<ContextedEvent>) {
    let mut room = Room::default();
    post(pipeline, &room.founding("")).unwrap();
    let topic = message(&mut room, "topic");
    let message_after = room.event(
        "said",
        "m.room.message",
        ALICE,
        None,
        serde_json::json!({"body": "hello", "msgtype": "m.text"}),
    );
    // Contexts computed as a worker does: groups prepared, not written.
    let texts = [topic.to_string(), message_after.to_string()];
    let contexts = contexts_for(&pipeline.builder, ROOM, &texts).unwrap();
    let request: Vec<ContextedEvent> = contexts
        .iter()
        .map(|(p, c)| ContextedEvent::new(p, c))
        .collect();
    assert_eq!(request[0].new_state_groups.len(), 1);
    // They are the worker's: the main process adopts them from the request.
    pipeline
        .builder
        .state()
        .forget_prepared_groups(contexts.iter().flat_map(|(_, c)| &c.new_state_groups));
    (room, request)
}

fn a_forwarded_request_delivered_twice_gets_the_same_answer(t: &TestDb) {
    let pipeline = pipeline(t);
    let (mut room, request) = forwarded_request(&pipeline);
    let first = write_forwarded(&pipeline, request.clone()).unwrap();
    let groups = state_group_rows(t);
    let second = write_forwarded(&pipeline, request).unwrap();
    assert_eq!(second.event_ids, first.event_ids);
    assert_eq!(second.rejected, first.rejected);
    assert!(second.stream_ordering >= first.stream_ordering);
    assert_eq!(second.skipped, first.event_ids);
    assert_eq!(state_group_rows(t), groups);
    assert_eq!(pipeline.builder.state().prepared_groups_waiting(), 0);
    let next = message(&mut room, "next");
    post(&pipeline, std::slice::from_ref(&next)).unwrap();
    assert_eq!(
        room_now(&pipeline),
        (vec![id_of(&next)], Some(id_of(&next)))
    );
    assert_invariants(&t.open());
}

/// Runs a second delivery of `request` on a thread of its own while the
/// first one, whose groups `first` adopted, is not written yet, and lets
/// `finish_first` go on with the first once the second waits for it (or,
/// before the fix, once the second has answered). The second's answer.
fn second_delivery_during_the_first<T>(
    pipeline: &Pipeline,
    request: Vec<ContextedEvent>,
    finish_first: impl FnOnce() -> T,
) -> (T, storage_core::Result<WriteOutcome>) {
    let state = pipeline.builder.state();
    std::thread::scope(|s| {
        let second = s.spawn(|| write_forwarded(pipeline, request));
        // An ordering the store shows, not a time: the second delivery is
        // waiting for the groups the first one holds.
        while state.prepared_group_waiters() == 0 && !second.is_finished() {
            std::thread::yield_now();
        }
        let first = finish_first();
        (first, second.join().unwrap())
    })
}

/// A worker's request delivered again while its first delivery is still
/// being written (a retry after a timeout, a proxy's second delivery): the
/// second waits for the first one's outcome and answers as a delivery after
/// it does, the same events, named as skipped. It answered 400 "state group
/// N is already prepared here: its id was given twice".
fn a_second_delivery_during_the_first_gets_the_same_answer(t: &TestDb) {
    let pipeline = pipeline(t);
    let (mut room, request) = forwarded_request(&pipeline);
    let state = pipeline.builder.state();
    // The first delivery: its groups adopted, its batch not written yet.
    let first_events = adopt_contexted(state, request.clone()).unwrap();
    let groups = state_group_rows(t);
    let (first, second) = second_delivery_during_the_first(&pipeline, request, || {
        event_context::check_contexts(state, ROOM, &first_events).unwrap();
        let batch = pipeline.persist(ROOM, &first_events).unwrap();
        WriteOutcome::new(&first_events, &batch)
    });
    let second = second.unwrap();
    assert_eq!(second.event_ids, first.event_ids);
    assert_eq!(second.rejected, first.rejected);
    assert!(second.stream_ordering >= first.stream_ordering);
    assert!(first.skipped.is_empty(), "{first:?}");
    assert_eq!(second.skipped, first.event_ids);
    assert_eq!(state_group_rows(t), groups + 1, "the topic's group, once");
    assert_eq!(state.prepared_groups_waiting(), 0);
    assert_eq!(state.prepared_group_waiters(), 0);
    let next = message(&mut room, "next");
    post(&pipeline, std::slice::from_ref(&next)).unwrap();
    assert_eq!(
        room_now(&pipeline),
        (vec![id_of(&next)], Some(id_of(&next)))
    );
    assert_invariants(&t.open());
}

/// As above, but the first delivery fails before its batch (its groups
/// dropped, as when its contexts are refused): the second, which waited,
/// then writes the events itself.
fn a_second_delivery_during_a_first_that_fails_writes_the_events(t: &TestDb) {
    let pipeline = pipeline(t);
    let (mut room, request) = forwarded_request(&pipeline);
    let state = pipeline.builder.state();
    let first_events = adopt_contexted(state, request.clone()).unwrap();
    let ((), second) = second_delivery_during_the_first(&pipeline, request, || {
        state.forget_prepared_groups(first_events.iter().flat_map(|(_, c)| &c.new_state_groups));
    });
    let second = second.unwrap();
    let ids: Vec<String> = first_events
        .iter()
        .map(|(p, _)| p.event_id.to_string())
        .collect();
    assert_eq!(second.event_ids, ids);
    assert!(second.skipped.is_empty(), "{second:?}");
    assert_eq!(state.prepared_groups_waiting(), 0);
    let next = message(&mut room, "next");
    post(&pipeline, std::slice::from_ref(&next)).unwrap();
    assert_eq!(
        room_now(&pipeline),
        (vec![id_of(&next)], Some(id_of(&next)))
    );
    assert_invariants(&t.open());
}
