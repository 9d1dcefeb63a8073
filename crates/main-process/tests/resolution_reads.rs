//! State resolution reads its events in a few queries, not one per event: a
//! room of 40 joined members forks, each fork makes 5 members leave, and the
//! context of an event merging the forks (fresh caches) must resolve to both
//! forks' leaves over everyone else's joins, asking storage for events a
//! handful of times (one per level of the auth DAG, plus the prev events),
//! where fetching them one at a time asks over 40 times. And events this
//! process wrote are not asked for again when later events name them. On
//! SQLite and PostgreSQL.

use event_context::ruma::RoomVersionId;
use event_context::{ContextBuilder, Pdu, PendingEvents};
use main_process::bench_room::{forked_room, linear_room, write_room_file};
use storage_core::testing::TestDb;
use storage_core::StoreConfig;
use storage_events::EventsStore;
use storage_state::{StateFilter, StateGroupAccess};

storage_core::engine_tests!(
    resolution_reads_events_in_a_few_queries,
    events_written_are_not_read_back,
);

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

/// Events written one request each, as `POST .../events` writes them: once
/// the room's members have joined, every later event names only events this
/// process wrote (its prev event, the sender's join, the create and power
/// levels events), so none is read from storage again (not even from the
/// events cache, which would mean parsing its JSON again).
fn events_written_are_not_read_back(t: &TestDb) {
    let room = "!written:bench.test";
    let members = 8;
    // Every fifth event from the fifth on is a join, up to `members`; the
    // others are messages by members already joined.
    let lines = linear_room(room, 80, members);
    let counted_from = 5 * members + 10;
    let pipeline = persistence::Pipeline::open(t.open(), &StoreConfig::default()).unwrap();
    let mut reads_before = 0;
    for (n, line) in lines.iter().enumerate() {
        if n == counted_from {
            reads_before = pipeline.builder.event_reads();
        }
        let events =
            event_context::contexts_for(&pipeline.builder, room, std::slice::from_ref(line))
                .unwrap_or_else(|e| panic!("{}: line {n}: {e}", t.engine()));
        assert!(
            events[0].1.rejected.is_none(),
            "{}: line {n} rejected",
            t.engine()
        );
        pipeline.persist(room, &events).unwrap();
    }
    let reads = pipeline.builder.event_reads() - reads_before;
    assert_eq!(
        reads,
        0,
        "{}: {} events written one request each read events from storage {reads} times",
        t.engine(),
        lines.len() - counted_from
    );
    storage_events::testing::assert_invariants(&t.open());
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
