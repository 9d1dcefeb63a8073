//! Rooms that fork and merge, with rejected events and state resets, several
//! of them interleaved, arrive four ways: in one import, in imports of a few
//! lines each (so forks and merges straddle batch boundaries), in imports of a
//! few dozen lines each, and one event per HTTP request to `hs-main serve`.
//! Every way must give the same state after every event, the same rejections
//! and the same current state, and leave the database's invariants true. On
//! SQLite and PostgreSQL.
//!
//! The binaries are the workspace's `hs-main` next to this test executable
//! (`cargo xtask test` builds them first).

use e2e_tests::forks::{fork_heavy_rooms, room_of};
use e2e_tests::*;
use serde_json::Value;
use storage_core::testing::TestDb;

storage_core::engine_tests!(
    forked_rooms_get_the_same_state_whichever_way_they_arrive,
    a_new_room_posted_in_one_request_may_end_in_a_fork,
);

/// The rooms' seed; `HS_FORKS_SEED` tries others (a failure names its seed).
const SEED: u64 = 2026;

fn write_lines(dir: &std::path::Path, name: &str, events: &[Value]) -> String {
    let path = dir.join(name);
    let text: String = events.iter().map(|e| e.to_string() + "\n").collect();
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn import(db: &TestDb, file: &str) {
    let (code, stdout, stderr) = hs_main(db, &["import", file]);
    assert_eq!(code, 0, "import {file}: {stdout}{stderr}");
}

fn check(db: &TestDb) {
    storage_events::testing::assert_invariants(&db.open_mode(storage_core::OpenMode::ReadOnly));
}

fn forked_rooms_get_the_same_state_whichever_way_they_arrive(t: &TestDb) {
    let seed = std::env::var("HS_FORKS_SEED").map_or(SEED, |s| s.parse().expect("a number"));
    eprintln!("rooms generated from seed {seed}");
    let events = fork_heavy_rooms(seed, 3, 110);
    let ids: Vec<&str> = events
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    let mut rooms: Vec<&str> = events.iter().map(room_of).collect();
    rooms.sort();
    rooms.dedup();
    let dir = std::env::temp_dir().join(format!("hs-forks-{}-{}", std::process::id(), t.engine()));
    std::fs::create_dir_all(&dir).unwrap();

    // (a) One file, one import: the reference.
    import(t, &write_lines(&dir, "all.jsonl", &events));
    check(t);
    let reference = event_states(t, &ids, &rooms);
    // The generator must really produce what this test is about.
    let rejected = reference.values().filter(|(_, r)| *r).count();
    let merges = events
        .iter()
        .filter(|e| e["prev_events"].as_array().unwrap().len() > 1)
        .count();
    assert!(rejected >= 10, "only {rejected} rejected events");
    assert!(merges >= 10, "only {merges} merges");
    for room in &rooms {
        assert!(!reference[&format!("current {room}")].0.is_empty());
    }

    // (b) Imports of a few lines each, then of a few dozen: forks and merges
    // fall on every side of a batch boundary.
    for size in [7, 40] {
        let db = t.fresh();
        for (i, chunk) in events.chunks(size).enumerate() {
            import(
                &db,
                &write_lines(&dir, &format!("chunk-{size}-{i}.jsonl"), chunk),
            );
        }
        check(&db);
        assert_same(
            &ids,
            &reference,
            &event_states(&db, &ids, &rooms),
            &format!("chunks of {size}"),
        );
    }

    // (c) One event per HTTP request.
    let db = t.fresh();
    {
        let server = main_process(&db, free_port());
        for e in &events {
            post_to(&server.url, room_of(e), vec![e.clone()])
                .unwrap_or_else(|err| panic!("posting {}: {err}", e["event_id"]));
        }
    }
    check(&db);
    assert_same(
        &ids,
        &reference,
        &event_states(&db, &ids, &rooms),
        "one event per request",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Equal, or a panic naming the first event (in the order they were sent)
/// that differs.
fn assert_same(ids: &[&str], reference: &EventStates, got: &EventStates, how: &str) {
    for id in ids {
        assert_eq!(got.get(*id), reference.get(*id), "{how}: {id} differs");
    }
    assert_eq!(reference, got, "{how}: current state differs");
}

/// The README's example room up to bob's message, then two state events of
/// alice after that message, posted as one request: the room's first batch
/// ends in a fork (it used to answer 500, "room ... has no version").
fn a_new_room_posted_in_one_request_may_end_in_a_fork(t: &TestDb) {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/example-room.jsonl");
    let mut events: Vec<Value> = std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .take(6)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let r = |i: &str| serde_json::json!([format!("${i}:example.org"), {"sha256": "aGFzaA"}]);
    for (id, kind, content) in [
        ("topic2", "m.room.topic", serde_json::json!({"topic": "t"})),
        ("name2", "m.room.name", serde_json::json!({"name": "n"})),
    ] {
        events.push(serde_json::json!({
            "auth_events": [r("create"), r("power"), r("alice_join")], "content": content,
            "depth": 7, "event_id": format!("${id}:example.org"), "hashes": {"sha256": "aGFzaA"},
            "origin": "example.org", "origin_server_ts": 1_764_000_000_100i64,
            "prev_events": [r("hello")], "room_id": "!example:example.org",
            "sender": "@alice:example.org", "signatures": {}, "state_key": "", "type": kind,
        }));
    }
    let room = "!example:example.org";
    {
        let server = main_process(t, free_port());
        let answer = post_to(&server.url, room, events).unwrap();
        assert_eq!(answer["event_ids"].as_array().unwrap().len(), 8, "{answer}");
    }
    let states = event_states(t, &["$topic2:example.org"], &[room]);
    let current = &states[&format!("current {room}")].0;
    let slot = |t: &str| current.get(&(t.to_owned(), String::new())).cloned();
    assert_eq!(slot("m.room.topic").as_deref(), Some("$topic2:example.org"));
    assert_eq!(slot("m.room.name").as_deref(), Some("$name2:example.org"));
    check(t);
}
