//! Writes through the main process's pipeline (contexts, then the room's
//! persister) that fail at a point other than the batch's own statement:
//! nothing is written, nothing prepared for them stays in memory, and the
//! room's next write is right.

use event_context::contexts_for;
use persistence::Pipeline;
use storage_core::testing::TestDb;
use storage_core::StoreConfig;
use storage_events::testing::assert_invariants;
use storage_events::EventReads;

storage_core::engine_tests!(a_write_whose_read_before_its_batch_fails_keeps_no_prepared_group);

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
