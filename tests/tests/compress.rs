//! The online compression job of `hs-main serve`: with a worker answering state
//! reads all through it (PostgreSQL: workers need it), every answer is the state
//! the event had before, the rows shrink, and the job logs under its own context;
//! killed after some rooms, a restarted server goes on with the others.

use e2e_tests::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use storage_core::testing::TestDb;

/// `{"type": {"state_key": "event"}}` as the API answers it.
fn as_answer(state: &BTreeMap<(String, String), String>) -> Value {
    let mut out: BTreeMap<&str, BTreeMap<&str, &str>> = BTreeMap::new();
    for ((t, k), e) in state {
        out.entry(t).or_default().insert(k, e);
    }
    serde_json::to_value(out).unwrap()
}

fn state_rows(db: &TestDb) -> i64 {
    storage_state::compress::rooms_by_state_rows(&db.open_mode(storage_core::OpenMode::ReadOnly))
        .unwrap()
        .iter()
        .map(|(_, n)| n)
        .sum()
}

#[test]
fn a_worker_reads_through_online_compression() {
    let Some(db) = TestDb::postgres() else { return };
    // A room of 320 joins: three snapshots of up to 300 members.
    let mut room = Room::default();
    let mut ids = Vec::new();
    {
        let main = main_process(&db, free_port());
        let mut events = room.founding("");
        for i in 0..320 {
            events.push(room.join(i));
        }
        for batch in events.chunks(40) {
            ids.extend(
                batch
                    .iter()
                    .map(|e| e["event_id"].as_str().unwrap().to_owned()),
            );
            post(&main.url, batch.to_vec()).unwrap();
        }
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let expected = event_states(&db, &refs, &[ROOM]);
    let before = state_rows(&db);

    let main = compress_server(&db, free_port(), 150);
    let worker = worker(&db, &main.url, free_port(), "reader");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    loop {
        let done = main.log_text().contains(": compressed: ");
        for id in ids.iter().rev().step_by(7) {
            // The row count beside every read, not once a pass: on a loaded
            // machine a pass of reads can outlast the whole (paced) compression,
            // and the test must still see reads while the rows were going.
            seen.push(state_rows(&db));
            let path = format!("/_hs/v1/rooms/{}/state?at={}", encode(ROOM), encode(id));
            assert_eq!(
                get(&worker.url, &path),
                as_answer(&expected[id].0),
                "state after {id}"
            );
            // Counted after every read, not once a round: the pace leaves about a
            // second between chunks, and a round of reads on a loaded machine can
            // take longer than the whole rewrite.
            seen.push(state_rows(&db));
        }
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "no compression within 2 minutes");
    }
    let after = state_rows(&db);
    assert!(after < before, "{before} -> {after}");
    let during = seen.iter().filter(|r| **r < before && **r > after).count();
    assert!(during > 0, "reads while the rows were going: {seen:?}");
    assert!(main.log_text().contains("[state compression]"));
    for id in &ids {
        let path = format!("/_hs/v1/rooms/{}/state?at={}", encode(ROOM), encode(id));
        assert_eq!(
            get(&worker.url, &path),
            as_answer(&expected[id].0),
            "state after {id}"
        );
    }
}

/// Stores, through the library, a room of `joins` members joining one by one
/// (a snapshot every 100 groups: what compression shrinks); its groups.
fn joins_room(db: &TestDb, room: &str, joins: usize) -> Vec<i64> {
    use storage_state::{key, NewStateGroup, StateGroupAccess, StateMap, StateStore};
    let store = StateStore::new(db.open(), &storage_core::StoreConfig::default()).unwrap();
    let mut state = StateMap::new();
    let mut prev = None;
    let mut groups = Vec::with_capacity(joins);
    for i in 0..joins {
        let user = format!("@u{i}:example.com");
        let event = format!("$join{i}-{room}");
        let delta = StateMap::from_iter([(key("m.room.member", &user), event.as_str().into())]);
        state.extend(delta.clone());
        let g = match prev {
            None => store.store_state_group(&NewStateGroup::snapshot(&event, room, &state)),
            Some(p) => store.store_state_group(&NewStateGroup::delta(&event, room, p, &delta)),
        }
        .unwrap();
        prev = Some(g);
        groups.push(g);
    }
    groups
}

/// The state of every one of `groups`, read with empty caches.
fn group_states(
    db: &TestDb,
    groups: &[i64],
) -> std::collections::HashMap<i64, storage_state::StateMap> {
    use storage_state::{StateFilter, StateGroupAccess, StateStore};
    let database = db.open_mode(storage_core::OpenMode::ReadOnly);
    StateStore::new(database, &storage_core::StoreConfig::default())
        .unwrap()
        .get_state_for_groups(groups, &StateFilter::all())
        .unwrap()
}

/// `hs-main serve` on `port` with its compression job every second, paced at
/// `rows_per_second`.
fn compress_server(db: &TestDb, port: u16, rows_per_second: u32) -> Process {
    start(
        "hs-main",
        &[
            "--database".into(),
            db.url().into(),
            "serve".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--compress-state-every".into(),
            "1".into(),
            "--compress-max-rows-per-second".into(),
            rows_per_second.to_string(),
        ],
        port,
    )
}

const PROGRESS: &str = "SELECT COUNT(*) AS n FROM state_compress_progress";

/// The job records, after each room, how far it got; a server killed (-9)
/// after the first of two rooms compresses only the second once restarted.
fn a_restarted_server_goes_on_with_the_rooms_left(db: &TestDb) {
    // The bigger room goes first.
    let (first, second) = ("!first:example.com", "!second:example.com");
    let mut groups = joins_room(db, first, 330);
    groups.extend(joins_room(db, second, 220));
    let before = group_states(db, &groups);
    let rows_before = state_rows(db);

    let mut server = compress_server(db, free_port(), 400);
    assert!(
        wait_for_count(db.url(), PROGRESS, 1, &mut server.child),
        "the server exited before its first room was done"
    );
    kill_9(&mut server.child);
    let log = server.log_text();
    assert!(log.contains(&format!(": {first}, {second}")), "{log}");
    assert!(log.contains(&format!("{first}: compressed: ")), "{log}");

    let restarted = compress_server(db, free_port(), 400);
    let deadline = Instant::now() + Duration::from_secs(120);
    while try_count(db.url(), PROGRESS).unwrap() < 2 {
        assert!(Instant::now() < deadline, "the second room was never done");
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = restarted.log_text();
    assert!(
        log.contains(&format!(
            "1 room(s) with state groups not compressed yet: {second}\n"
        )),
        "the restarted server went over the first room again: {log}"
    );
    drop(restarted);
    assert!(state_rows(db) < rows_before);
    assert_eq!(group_states(db, &groups), before);
    assert_invariants(db);
}

storage_core::engine_tests!(a_restarted_server_goes_on_with_the_rooms_left);

/// The state after join `i` of a room that [`Room::founding`] began: the
/// founding state and the members `0..=i`.
fn after_join(founding: &BTreeMap<(String, String), String>, i: usize) -> Value {
    let mut state = founding.clone();
    for j in 0..=i {
        state.insert(
            ("m.room.member".to_owned(), member(j)),
            format!("$join{j}:example.com"),
        );
    }
    as_answer(&state)
}

/// The online compression job while the room it compresses is written, one
/// event a request, alternately through the main process and through a
/// worker (which forwards), and read through the worker meanwhile: every
/// answer, then every event's state through both processes and a fresh
/// store, is the state the joins imply, and the invariants hold.
#[test]
fn writes_and_reads_through_online_compression() {
    let Some(db) = TestDb::postgres() else { return };
    let mut room = Room::default();
    let founding = room.founding("");
    let joins: Vec<Value> = (0..300).map(|i| room.join(i)).collect();
    {
        let main = main_process(&db, free_port());
        post(&main.url, founding).unwrap();
        for batch in joins.chunks(40) {
            post(&main.url, batch.to_vec()).unwrap();
        }
    }
    let base = event_states(&db, &["$rules:example.com"], &[ROOM])["$rules:example.com"]
        .0
        .clone();
    let main = compress_server(&db, free_port(), 150);
    let worker = worker(&db, &main.url, free_port(), "writer");
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut next = 300;
    let state_at = |url: &str, i: usize| {
        let id = format!("$join{i}:example.com");
        let path = format!("/_hs/v1/rooms/{}/state?at={}", encode(ROOM), encode(&id));
        get(url, &path)
    };
    // Until a pass compressed the room, and at least 60 joins were written.
    while !(main.log_text().contains(": compressed: ") && next >= 360) {
        assert!(Instant::now() < deadline, "no compression within 3 minutes");
        let to = if next % 2 == 0 {
            &main.url
        } else {
            &worker.url
        };
        let answer = post(to, vec![room.join(next)]).unwrap();
        wait_for_position(&worker, answer["stream_ordering"].as_i64().unwrap());
        for i in [next, next / 2, next * 7 % (next + 1)] {
            assert_eq!(state_at(&worker.url, i), after_join(&base, i), "join {i}");
        }
        next += 1;
    }
    let current = get(
        &worker.url,
        &format!("/_hs/v1/rooms/{}/state", encode(ROOM)),
    );
    assert_eq!(current, after_join(&base, next - 1));
    for i in 0..next {
        let want = after_join(&base, i);
        assert_eq!(
            state_at(&worker.url, i),
            want,
            "join {i} through the worker"
        );
        assert_eq!(
            state_at(&main.url, i),
            want,
            "join {i} through the main process"
        );
    }
    drop(worker);
    drop(main);
    let ids: Vec<String> = (0..next).map(|i| format!("$join{i}:example.com")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let fresh = event_states(&db, &refs, &[ROOM]);
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            as_answer(&fresh[id].0),
            after_join(&base, i),
            "{id} read cold"
        );
    }
    assert_invariants(&db);
}
