//! A chain of batches whose first one fails (as an import's batches of a room
//! are chained): nothing of the chain is written, and the state groups
//! prepared for its later batches do not stay in memory.

use storage_core::testing::TestDb;
use storage_core::StoreConfig;

storage_core::engine_tests!(groups_of_batches_after_a_failed_one_are_dropped);

const ROOM: &str = "!chained:bench.test";

fn groups_of_batches_after_a_failed_one_are_dropped(t: &TestDb) {
    // 4 founding events, then 250 in two batches of 125 (more than the
    // queue's batch together, so they stay two items of the chain).
    let lines = main_process::bench_room::linear_room(ROOM, 254, 50);
    let pipeline = persistence::Pipeline::open(t.open(), &StoreConfig::default()).unwrap();
    let founding = event_context::contexts_for(&pipeline.builder, ROOM, &lines[..4]).unwrap();
    pipeline.persist(ROOM, &founding).unwrap();
    let events = event_context::contexts_for(&pipeline.builder, ROOM, &lines[4..]).unwrap();
    let (first, second) = events.split_at(125);
    let prepared = |part: &[(event_context::Pdu, event_context::EventContext)]| {
        part.iter()
            .map(|(_, c)| c.new_state_groups.len())
            .sum::<usize>()
    };
    assert!(prepared(first) > 0 && prepared(second) > 0);
    let state = pipeline.builder.state();
    assert_eq!(
        state.prepared_groups_waiting(),
        prepared(first) + prepared(second)
    );
    t.fail_inserts("events", "event_id", first[60].0.event_id.as_str());
    let chain = pipeline.queue.chain();
    let rows = |part: &[(event_context::Pdu, event_context::EventContext)]| {
        part.iter()
            .map(|(p, c)| event_context::ContextBuilder::to_persist(p, c))
            .collect()
    };
    let a = pipeline.queue.enqueue_chained(ROOM, rows(first), chain);
    let b = pipeline.queue.enqueue_chained(ROOM, rows(second), chain);
    let a = a.wait().unwrap_err();
    assert!(a.to_string().contains("injected failure"), "{a}");
    let b = b.wait().unwrap_err();
    assert!(b.to_string().contains("an earlier batch"), "{b}");
    assert_eq!(
        state.prepared_groups_waiting(),
        0,
        "the groups of both batches were dropped"
    );
    storage_events::testing::assert_invariants(&t.open());
}
