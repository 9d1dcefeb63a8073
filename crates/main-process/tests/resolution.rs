//! State resolution from what the groups disagree on (`ContextBuilder::
//! resolve_state_of_groups`, issue 14) gives what resolution over the whole
//! states gives: on the fork-heavy rooms of `e2e_tests::forks` (rejected
//! events, state resets, forks across memberships and power levels), every
//! merge of two groups or more is resolved both ways from cold caches. Most of
//! those merges need the unconflicted events' auth chain (walked over stored
//! `event_auth` ids) to settle their auth difference. Forks long enough to
//! cross snapshots of their own are compared through the snapshots' origins
//! (the prev group of the event each was written for). On SQLite and
//! PostgreSQL.

use e2e_tests::forks::{fork_heavy_rooms, room_of};
use event_context::ruma::RoomVersionId;
use event_context::{ContextBuilder, PendingEvents};
use storage_core::testing::TestDb;
use storage_core::StoreConfig;
use storage_events::{EventReads, EventsStore};
use storage_state::StateGroupAccess;

storage_core::engine_tests!(
    resolving_by_the_conflict_agrees_with_resolving_whole_states,
    forks_across_snapshots_resolve_through_their_origins,
);

/// The distinct groups after `events`, in order: what a merge of them resolves.
fn groups_after(builder: &ContextBuilder, events: &[&str]) -> Vec<i64> {
    let mut groups: Vec<i64> = builder
        .state()
        .get_state_group_for_events(events)
        .unwrap()
        .into_values()
        .collect();
    groups.sort();
    groups.dedup();
    groups
}

fn resolving_by_the_conflict_agrees_with_resolving_whole_states(t: &TestDb) {
    let events = fork_heavy_rooms(2026, 3, 110);
    let dir = std::env::temp_dir().join(format!(
        "hs-resolution-{}-{}",
        std::process::id(),
        t.engine()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("rooms.jsonl");
    let text: String = events.iter().map(|e| e.to_string() + "\n").collect();
    std::fs::write(&file, text).unwrap();
    main_process::import_cmd::run(t.url(), std::slice::from_ref(&file)).expect("import");

    let config = StoreConfig::default();
    let db = t.open();
    let (mut compared, mut by_conflict, mut asked_chain) = (0, 0, 0);
    for event in &events {
        let prevs: Vec<&str> = event["prev_events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[0].as_str().unwrap())
            .collect();
        if prevs.len() < 2 {
            continue;
        }
        // A builder of its own for each merge: every cache cold.
        let builder = ContextBuilder::new(EventsStore::new(db.clone(), &config).unwrap(), &config);
        let groups = groups_after(&builder, &prevs);
        if groups.len() < 2 {
            continue;
        }
        let room = room_of(event);
        let version = builder.events().get_room_version(room).unwrap().unwrap();
        let version = RoomVersionId::try_from(version).unwrap();
        let pending = PendingEvents::default();
        // What a merge's context stores, from cold caches: read as the
        // groups' differences, the result as a delta on one of them.
        let by_differences = builder
            .resolve_state_of_groups_by_differences(room, &version, &groups, &pending)
            .unwrap();
        let builder = ContextBuilder::new(EventsStore::new(db.clone(), &config).unwrap(), &config);
        let (resolved, _) = builder
            .resolve_state_of_groups(room, &version, &groups, &pending)
            .unwrap();
        let whole = builder
            .resolve_whole_states_of_groups(room, &version, &groups, &pending)
            .unwrap();
        assert!(
            resolved == whole,
            "{room}, merge {} of groups {groups:?}: by the conflict {resolved:?}, \
             over whole states {whole:?}",
            event["event_id"]
        );
        assert!(
            by_differences == whole,
            "{room}, merge {} of groups {groups:?}: by the differences {by_differences:?}, \
             over whole states {whole:?}",
            event["event_id"]
        );
        compared += 1;
        by_conflict += builder.resolutions_by_conflict();
        asked_chain += builder.resolutions_asking_unconflicted_chain();
    }
    eprintln!(
        "{compared} resolutions compared, {by_conflict} settled by the conflict, \
         {asked_chain} of them with the unconflicted events' auth chain"
    );
    assert!(compared >= 10, "only {compared} merges of several groups");
    assert_eq!(
        by_conflict, compared,
        "every resolution of several groups is settled by the conflict"
    );
    // Both kinds of resolution by the conflict must really have been taken
    // for the comparison to mean anything.
    assert!(
        asked_chain >= 5,
        "only {asked_chain} resolutions needed the unconflicted chain"
    );
    assert!(
        asked_chain < compared,
        "every resolution needed the unconflicted chain"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Two forks of 150 leaves each from a room of 400 members: each crosses a
/// snapshot of its own (a chain holds at most 100 groups), as do the joins
/// below the fork point. Resolved from what the groups disagree on, read
/// through the snapshots' origins down to where the forks meet, it must be
/// the resolution over the whole states; so must two short forks'.
fn forks_across_snapshots_resolve_through_their_origins(t: &TestDb) {
    const ROOM: &str = "!snapshots:server0.example.org";
    let room = main_process::bench_room::forked_room(ROOM, 400, (150, 5), 1);
    let dir = std::env::temp_dir().join(format!(
        "hs-resolution-origins-{}-{}",
        std::process::id(),
        t.engine()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("room.jsonl");
    main_process::bench_room::write_room_file(&file, &room.lines);
    main_process::import_cmd::run(t.url(), std::slice::from_ref(&file)).expect("import");

    let config = StoreConfig::default();
    let db = t.open();
    for (merge, expect_origins) in [(&room.merges[0], true), (&room.short_merges[0], false)] {
        let merge: serde_json::Value = serde_json::from_str(merge).unwrap();
        let prevs: Vec<&str> = merge["prev_events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        let builder = ContextBuilder::new(EventsStore::new(db.clone(), &config).unwrap(), &config);
        let groups = groups_after(&builder, &prevs);
        assert_eq!(groups.len(), 2, "two tips, two groups: {groups:?}");
        let pending = PendingEvents::default();
        let by_differences = builder
            .resolve_state_of_groups_by_differences(ROOM, &RoomVersionId::V10, &groups, &pending)
            .unwrap();
        let followed = builder.snapshot_origins_followed();
        let whole = ContextBuilder::new(EventsStore::new(db.clone(), &config).unwrap(), &config)
            .resolve_whole_states_of_groups(ROOM, &RoomVersionId::V10, &groups, &pending)
            .unwrap();
        assert!(
            by_differences == whole,
            "merge of groups {groups:?}: by the differences {} slots, over whole states {}",
            by_differences.len(),
            whole.len()
        );
        assert!(whole.len() > 300, "the resolved state holds the room");
        // On both engines (one statement per snapshot crossed).
        if expect_origins {
            assert!(
                followed >= 2,
                "each fork's snapshot was gone through by its origin: {followed} followed"
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
