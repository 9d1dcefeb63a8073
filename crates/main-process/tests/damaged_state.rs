//! A new event over a damaged database: its prev event maps to a state group
//! that is not stored. Nothing is wrong with the request but the database, so
//! the write fails as inconsistent data (HTTP 500, logged as an error) naming
//! the prev event and the group; it was "not found" (HTTP 404, the answer to
//! an unknown room or event) naming the group alone. Nothing is written.
//! Each test runs on SQLite and PostgreSQL.

use e2e_tests::{message, Room};
use event_context::contexts_for;
use persistence::Pipeline;
use storage_core::testing::TestDb;
use storage_core::{with_conn, ErrorKind, StoreConfig};
use storage_events::check_invariants;

storage_core::engine_tests!(a_prev_event_mapped_to_a_missing_group_is_inconsistent_data);

fn a_prev_event_mapped_to_a_missing_group_is_inconsistent_data(t: &TestDb) {
    let mut room = Room::default();
    {
        let pipeline = Pipeline::open(t.open(), &StoreConfig::default()).unwrap();
        let texts: Vec<String> = room.founding("").iter().map(|e| e.to_string()).collect();
        let contexts = contexts_for(&pipeline.builder, e2e_tests::ROOM, &texts).unwrap();
        pipeline.persist(e2e_tests::ROOM, &contexts).unwrap();
    }
    {
        use diesel::prelude::*;
        use storage_state::schema::event_to_state_groups as etsg;
        with_conn!(&mut t.raw_connection(), |c| diesel::update(
            etsg::table.filter(etsg::event_id.eq("$rules:example.com"))
        )
        .set(etsg::state_group.eq(4242))
        .execute(c))
        .unwrap();
    }
    // A new process: nothing cached from before the damage.
    let pipeline = Pipeline::open(t.open(), &StoreConfig::default()).unwrap();
    let topic = message(&mut room, "topic").to_string();
    let err = contexts_for(&pipeline.builder, e2e_tests::ROOM, &[topic]).unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::Corrupt(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("$rules:example.com") && text.contains("4242"),
        "{text}"
    );
    // Only the damage itself breaks an invariant: nothing was written.
    let violations = check_invariants(&t.open()).unwrap();
    assert_eq!(
        violations.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
        vec![format!(
            "every event that is not an outlier has a state group of its room: \
             {} $rules:example.com",
            e2e_tests::ROOM
        )]
    );
}
