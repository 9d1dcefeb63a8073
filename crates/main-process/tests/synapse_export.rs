//! docs/synapse-export.md's query, run against a Synapse-layout database
//! (Synapse's own schema, tests/fixtures/synapse/) holding the rooms of the
//! Synapse fixture, gives JSON lines that `hs-main import` takes whole and
//! that reproduce the current state Synapse computed. The rows are inserted
//! in reverse, so the order comes from the query, not the table. On SQLite
//! and PostgreSQL.

use diesel::sql_types::Text;
use diesel::{QueryableByName, RunQueryDsl};
use serde_json::Value;
use storage_core::testing::TestDb;
use storage_core::with_conn;

storage_core::engine_tests!(the_documented_export_imports_every_room);

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/synapse");
const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/synapse-export.md");

/// The first ```sql block after the `export-sql` marker of the document.
fn documented_query() -> String {
    let doc = std::fs::read_to_string(DOC).unwrap();
    let after = doc
        .split("export-sql")
        .nth(1)
        .expect("the export-sql marker");
    let block = after.split("```sql").nth(1).unwrap();
    block
        .split("```")
        .next()
        .unwrap()
        .trim()
        .trim_end_matches(';')
        .to_owned()
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Synapse's schema with the fixture's events in `events` and `event_json`,
/// as Synapse stores them, inserted newest first.
fn synapse_database(t: &TestDb) -> Vec<Value> {
    let schema = std::fs::read_to_string(format!("{FIXTURES}/schema.{}.sql", t.engine())).unwrap();
    let lines = std::fs::read_to_string(format!("{FIXTURES}/pdus.jsonl")).unwrap();
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{FIXTURES}/expected.json")).unwrap(),
    )
    .unwrap();
    let ids = expected["event_ids"].as_array().unwrap();
    let mut sql = schema;
    let rows: Vec<(usize, &str)> = lines.lines().enumerate().collect();
    for (i, line) in rows.into_iter().rev() {
        let pdu: Value = serde_json::from_str(line).unwrap();
        let id = ids[i].as_str().unwrap();
        let state_key = pdu["state_key"].as_str().map_or("NULL".to_owned(), quote);
        // A version 12 create event has no room_id: the room's id is its own.
        let room_id = pdu["room_id"]
            .as_str()
            .map_or_else(|| id.replacen('$', "!", 1), str::to_owned);
        sql += &format!(
            "INSERT INTO events (stream_ordering, topological_ordering, event_id, type, room_id, \
             processed, outlier, depth, origin_server_ts, received_ts, sender, contains_url, \
             instance_name, state_key) VALUES ({n}, {depth}, {id}, {ty}, {room}, true, false, \
             {depth}, {ts}, {ts}, {sender}, false, 'master', {state_key});\n\
             INSERT INTO event_json (event_id, room_id, internal_metadata, json, format_version) \
             VALUES ({id}, {room}, '{{}}', {json}, 3);\n",
            n = i + 1,
            depth = pdu["depth"].as_i64().unwrap(),
            id = quote(id),
            ty = quote(pdu["type"].as_str().unwrap()),
            room = quote(&room_id),
            ts = pdu["origin_server_ts"].as_i64().unwrap(),
            sender = quote(pdu["sender"].as_str().unwrap()),
            json = quote(line),
        );
    }
    t.raw_connection()
        .batch_execute(&sql)
        .expect("building the Synapse database");
    expected["rooms"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(room, v)| serde_json::json!({"room": room, "current_state": v["current_state"]}))
        .collect()
}

#[derive(QueryableByName)]
struct JsonRow {
    #[diesel(sql_type = Text)]
    json: String,
}

fn the_documented_export_imports_every_room(t: &TestDb) {
    let rooms = synapse_database(t);
    assert_eq!(rooms.len(), 3);
    let target = TestDb::sqlite();
    let dir = std::env::temp_dir().join(format!("hs-export-{}-{}", t.engine(), std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for room in &rooms {
        let room_id = room["room"].as_str().unwrap();
        let query = documented_query().replace("'!room:example.org'", &quote(room_id));
        let mut raw = t.raw_connection();
        let exported: Vec<JsonRow> =
            with_conn!(&mut raw, |c| diesel::sql_query(&query).load(c)).unwrap();
        assert_eq!(exported.len(), 47, "{room_id}");
        let file = dir.join("room.jsonl");
        let text: String = exported.iter().map(|r| format!("{}\n", r.json)).collect();
        std::fs::write(&file, text).unwrap();
        let run = |args: &[&str]| {
            let out = e2e_tests::hs_main_at(target.url(), args);
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(out.status.success(), "{args:?}: {stderr}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let summary = run(&["import", file.to_str().unwrap()]);
        assert!(
            summary.starts_with("imported 47 events (0 already stored, 0 rejected)"),
            "{summary}"
        );
        let state: Value = serde_json::from_str(&run(&["state", room_id])).unwrap();
        assert_eq!(state, room["current_state"], "{room_id}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
