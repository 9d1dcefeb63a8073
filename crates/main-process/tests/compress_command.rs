//! `hs-main compress` end to end, on SQLite and PostgreSQL: the state after
//! every event is the same before and after (Synapse's fixture rooms, the
//! generated linear and spam-join rooms), dry runs and `--sql` write nothing,
//! a database claimed by another main process is refused, and a run killed in
//! the middle is finished by the next.

use e2e_tests::{cold_state_store, hs_main_at, hs_main_ok, tempdir, TempDir};
use event_context::ruma::RoomVersionId;
use event_context::Pdu;
use main_process::bench_room::{linear_room, spam_join_room, write_room_file};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use storage_core::testing::TestDb;
use storage_core::{DatabaseConfig, MainProcessClaim, OpenMode};
use storage_state::{StateFilter, StateGroupAccess, StateMap};

storage_core::engine_tests!(
    synapse_fixture_rooms_keep_every_state,
    generated_rooms_keep_every_state,
    a_dry_run_writes_nothing_and_sql_is_written,
    a_claimed_database_is_refused,
    a_killed_run_is_finished_by_the_next,
);

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/synapse");

fn import(t: &TestDb, file: &Path) {
    hs_main_ok(t.url(), &["import", file.to_str().unwrap()]);
}

/// Imports one room's PDUs (room version 10) as `hs-main import` of a file;
/// returns their event ids.
fn import_room(t: &TestDb, lines: &[String]) -> Vec<String> {
    let dir = TempDir(tempdir(&format!("compress-{}", t.engine())));
    let file = dir.0.join("room.jsonl");
    write_room_file(&file, lines);
    import(t, &file);
    event_ids(lines)
}

/// The ids of the events in a file of room version 10 PDUs.
fn event_ids(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|l| {
            Pdu::from_json(l, Some(&RoomVersionId::V10))
                .unwrap()
                .event_id
                .to_string()
        })
        .collect()
}

/// The state after each event, read through a store with empty caches.
fn states_after(t: &TestDb, events: &[String]) -> HashMap<String, StateMap> {
    let store = cold_state_store(t);
    events
        .iter()
        .map(|e| {
            let state = store
                .get_state_for_event(e, &StateFilter::all())
                .unwrap_or_else(|err| panic!("{}: state after {e}: {err}", t.engine()));
            (e.clone(), state)
        })
        .collect()
}

fn state_rows(t: &TestDb) -> u64 {
    let out = hs_main_ok(t.url(), &["inspect", "--json", "--exact"]);
    let report: Value = serde_json::from_str(&out).unwrap();
    report["state_groups_state_rows"].as_u64().unwrap()
}

/// Rows of `state_groups_state`, counted directly (while a run writes).
fn rows_of(db: &storage_core::Database) -> u64 {
    storage_state::compress::rooms_by_state_rows(db)
        .unwrap()
        .iter()
        .map(|(_, n)| *n as u64)
        .sum()
}

fn compress_json(t: &TestDb, extra: &[&str]) -> Value {
    let mut args = vec!["compress", "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&hs_main_ok(t.url(), &args)).unwrap()
}

fn synapse_fixture_rooms_keep_every_state(t: &TestDb) {
    import(t, Path::new(&format!("{FIXTURE}/pdus.jsonl")));
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{FIXTURE}/expected.json")).unwrap())
            .unwrap();
    let events: Vec<String> = expected["event_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().to_owned())
        .collect();
    let before = states_after(t, &events);
    let summary = compress_json(t, &[]);
    assert_eq!(summary["total"]["rooms"], 3, "{summary:#}");
    assert!(
        summary["total"]["rows_after"].as_u64() <= summary["total"]["rows_before"].as_u64(),
        "{summary:#}"
    );
    assert_eq!(states_after(t, &events), before, "{}", t.engine());
}

fn generated_rooms_keep_every_state(t: &TestDb) {
    let mut events = import_room(t, &linear_room("!linear:bench.test", 2_500, 300));
    events.extend(import_room(t, &spam_join_room("!spam:bench.test", 300)));
    let before = states_after(t, &events);
    let rows_before = state_rows(t);

    let summary = compress_json(t, &[]);
    let rooms = summary["rooms"].as_array().unwrap();
    assert_eq!(rooms.len(), 2);
    // Largest first.
    assert!(rooms[0]["rows_before"].as_u64() >= rooms[1]["rows_before"].as_u64());
    for room in rooms {
        assert_eq!(room["outcome"], "compressed", "{summary:#}");
        assert!(
            room["rows_after"].as_u64() < room["rows_before"].as_u64(),
            "{room:#}"
        );
    }
    let rows_after = state_rows(t);
    assert_eq!(summary["total"]["rows_before"].as_u64(), Some(rows_before));
    assert_eq!(summary["total"]["rows_after"].as_u64(), Some(rows_after));
    assert!(
        rows_after * 5 < rows_before * 3,
        "{rows_before} -> {rows_after}"
    );
    assert_eq!(states_after(t, &events), before, "{}", t.engine());

    let again = compress_json(t, &["--room", "!linear:bench.test"]);
    assert_eq!(again["rooms"][0]["outcome"], "already_compact", "{again:#}");
    assert_eq!(again["total"]["groups_rewritten"], 0);
}

fn a_dry_run_writes_nothing_and_sql_is_written(t: &TestDb) {
    import_room(t, &linear_room("!l:bench.test", 1_500, 200));
    let rows = state_rows(t);
    let dir = TempDir(tempdir(&format!("compress-sql-{}", t.engine())));
    let sql = dir.0.join("rewrite.sql");
    let text = hs_main_ok(
        t.url(),
        &["compress", "--dry-run", "--sql", sql.to_str().unwrap()],
    );
    assert!(
        text.starts_with("!l:bench.test: would compress: "),
        "{text}"
    );
    assert!(text.contains("would compress 1 rooms"), "{text}");
    assert_eq!(state_rows(t), rows, "a dry run writes nothing");
    let sql = std::fs::read_to_string(&sql).unwrap();
    assert!(sql.starts_with("BEGIN;\n"), "{sql}");
    assert!(sql.contains("INSERT INTO state_groups_state"));

    let unknown = hs_main_at(t.url(), &["compress", "--room", "!nowhere:test"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("!nowhere:test"));
}

fn a_claimed_database_is_refused(t: &TestDb) {
    import_room(t, &linear_room("!l:bench.test", 1_500, 200));
    let rows = state_rows(t);
    let config = DatabaseConfig::parse(t.url(), OpenMode::Writer).unwrap();
    let claim = MainProcessClaim::acquire(&config, std::time::Duration::ZERO).unwrap();
    let out = hs_main_at(t.url(), &["compress"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("claimed by another main process"),
        "{stderr}"
    );
    assert_eq!(state_rows(t), rows);
    drop(claim);
    hs_main_ok(t.url(), &["compress"]);
    assert!(state_rows(t) < rows);
}

fn a_killed_run_is_finished_by_the_next(t: &TestDb) {
    let events = import_room(t, &linear_room("!l:bench.test", 2_500, 300));
    let before = states_after(t, &events);
    let rows = state_rows(t);
    // Paced to about 8 s, killed once the first transactions committed.
    let mut child = e2e_tests::hs_main_command()
        .args(["--database", t.url(), "compress", "--max-rows-per-second"])
        .arg((rows / 8).to_string())
        .spawn()
        .unwrap();
    // A plain open, which follows the writer's commits (a read-only SQLite
    // open of a file without a WAL reads it as immutable).
    let db = t.open();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while rows_of(&db) == rows {
        assert!(
            std::time::Instant::now() < deadline,
            "no progress in 2 minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let partly = state_rows(t);
    assert!(
        partly < rows,
        "the first chunks committed: {rows} -> {partly}"
    );
    assert_eq!(states_after(t, &events), before, "{}", t.engine());

    let resumed = compress_json(t, &[]);
    assert_eq!(resumed["total"]["rows_before"].as_u64(), Some(partly));
    assert!(
        resumed["total"]["groups_rewritten"].as_u64() > Some(0),
        "{resumed:#}"
    );
    assert!(state_rows(t) < partly, "{resumed:#}");
    assert_eq!(states_after(t, &events), before, "{}", t.engine());
    let done = compress_json(t, &[]);
    assert_eq!(done["total"]["groups_rewritten"], 0, "{done:#}");
}
