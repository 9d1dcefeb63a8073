//! The online compression job of `hs-main serve`, with a worker answering state
//! reads all through it (PostgreSQL: workers need it): every answer is the state
//! the event had before, the rows shrink, and the job logs under its own context.

use e2e_tests::*;
use serde_json::{json, Value};
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
            let user = format!("@u{i}:example.com");
            events.push(room.event(
                &format!("join{i}"),
                "m.room.member",
                &user,
                Some(&user),
                json!({"membership": "join"}),
            ));
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

    let port = free_port();
    let main = start(
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
            "150".into(),
        ],
        port,
    );
    let worker = worker(&db, &main.url, free_port(), "reader");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    loop {
        let rows = state_rows(&db);
        let done = main.log_text().contains(": compressed: ");
        for id in ids.iter().rev().step_by(7) {
            let path = format!("/_hs/v1/rooms/{}/state?at={}", encode(ROOM), encode(id));
            assert_eq!(
                get(&worker.url, &path),
                as_answer(&expected[id].0),
                "state after {id}"
            );
        }
        seen.push(rows);
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
