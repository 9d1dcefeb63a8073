//! State resolution reads its events in a few queries, not one per event: a
//! room of 40 joined members forks, each fork makes 5 members leave, and the
//! context of an event merging the forks (fresh caches) must resolve to both
//! forks' leaves over everyone else's joins, asking storage for events a
//! handful of times (one per level of the auth DAG, plus the prev events),
//! where fetching them one at a time asks over 40 times. On SQLite and
//! PostgreSQL.

use event_context::ruma::RoomVersionId;
use event_context::{ContextBuilder, Pdu, PendingEvents};
use main_process::bench_room::{forked_room, write_room_file};
use storage_core::testing::TestDb;
use storage_core::StoreConfig;
use storage_events::EventsStore;
use storage_state::{StateFilter, StateGroupAccess};

storage_core::engine_tests!(resolution_reads_events_in_a_few_queries);

const ROOM: &str = "!forked:server0.example.org";
const MEMBERS: usize = 40;
const LEAVES_PER_FORK: usize = 5;
/// Queries allowed: 3 are made today (the two prev events, then the states'
/// events, which hold their own auth events here), plus room for a few more
/// levels; fetched one at a time it takes over 40.
const MOST_READS: u64 = 6;

fn resolution_reads_events_in_a_few_queries(t: &TestDb) {
    let room = forked_room(ROOM, MEMBERS, (LEAVES_PER_FORK, 0), 1);
    let merge = &room.merges[0];

    let dir = tempfile_dir(t);
    let file = dir.join("room.jsonl");
    write_room_file(&file, &room.lines);
    main_process::import_cmd::run(t.url(), &[file]).expect("import");
    let _ = std::fs::remove_dir_all(&dir);

    let config = StoreConfig::default();
    let builder = ContextBuilder::new(EventsStore::new(t.open(), &config).unwrap(), &config);
    let pdu = Pdu::from_json(merge, Some(&RoomVersionId::V10)).unwrap();
    let context = builder
        .compute_event_context(&pdu, false, &PendingEvents::default())
        .unwrap();
    let before = context.state_group_before.expect("a resolved group");
    let state = builder
        .state()
        .get_state_for_groups(&[before], &StateFilter::all())
        .unwrap()
        .remove(&before)
        .unwrap();
    assert_eq!(
        state.len(),
        3 + MEMBERS,
        "{}: the resolved state",
        t.engine()
    );
    for (u, leave) in &room.leaves {
        let slot = storage_state::Slot("m.room.member", u);
        assert_eq!(
            state.get(&slot).map(|e| &**e),
            Some(leave.as_str()),
            "{}: {u}",
            t.engine()
        );
    }
    let reads = builder.event_reads();
    assert!(
        reads <= MOST_READS,
        "{}: resolving over {} state events asked storage for events {reads} times (at most {MOST_READS} wanted)",
        t.engine(),
        state.len()
    );
}

/// A fresh folder for the room file.
fn tempfile_dir(t: &TestDb) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "hs-resolution-reads-{}-{}",
        std::process::id(),
        t.engine()
    ));
    std::fs::create_dir_all(&dir).expect("temporary folder");
    dir
}
