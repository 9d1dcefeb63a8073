//! `hs-main state` on a database that Synapse wrote: Synapse's own table layout
//! (with the columns and tables we do not use), filled the way Synapse fills it,
//! read without migrating or writing anything. On SQLite and PostgreSQL.

use std::process::Command;
use storage_core::testing::TestDb;

storage_core::engine_tests!(
    answers_from_a_synapse_database,
    refuses_unknown_rooms_and_events,
    inspect_reports_a_synapse_database,
);

const ROOM: &str = "!room:test";

/// The state tables as in Synapse's full schema, plus the events-side tables that
/// Synapse has next to them (which `state` does not need).
const SYNAPSE_SCHEMA: &str = "
CREATE TABLE state_groups (id BIGINT PRIMARY KEY, room_id TEXT NOT NULL, event_id TEXT NOT NULL);
CREATE INDEX state_groups_room_id_idx ON state_groups (room_id);
CREATE TABLE state_groups_state (state_group BIGINT NOT NULL, room_id TEXT NOT NULL, type TEXT NOT NULL,
    state_key TEXT NOT NULL, event_id TEXT NOT NULL);
CREATE INDEX state_groups_state_type_idx ON state_groups_state (state_group, type, state_key);
CREATE TABLE state_group_edges (state_group BIGINT NOT NULL, prev_state_group BIGINT NOT NULL);
CREATE UNIQUE INDEX state_group_edges_unique_idx ON state_group_edges (state_group, prev_state_group);
CREATE INDEX state_group_edges_prev_idx ON state_group_edges (prev_state_group);
CREATE TABLE event_to_state_groups (event_id TEXT NOT NULL, state_group BIGINT NOT NULL, UNIQUE (event_id));
CREATE INDEX event_to_state_groups_sg_index ON event_to_state_groups (state_group);
CREATE TABLE current_state_events (event_id TEXT NOT NULL, room_id TEXT NOT NULL, type TEXT NOT NULL,
    state_key TEXT NOT NULL, membership TEXT, event_stream_ordering BIGINT,
    UNIQUE (event_id), UNIQUE (room_id, type, state_key));
CREATE TABLE events (stream_ordering BIGINT PRIMARY KEY, topological_ordering BIGINT NOT NULL,
    event_id TEXT NOT NULL, type TEXT NOT NULL, room_id TEXT NOT NULL, content TEXT, unrecognized_keys TEXT,
    processed BOOL NOT NULL, outlier BOOL NOT NULL, depth BIGINT DEFAULT 0 NOT NULL, origin_server_ts BIGINT,
    received_ts BIGINT, sender TEXT, contains_url BOOLEAN, instance_name TEXT, state_key TEXT DEFAULT NULL,
    rejection_reason TEXT DEFAULT NULL, UNIQUE (event_id));
CREATE TABLE event_json (event_id TEXT NOT NULL, room_id TEXT NOT NULL, internal_metadata TEXT NOT NULL,
    json TEXT NOT NULL, format_version INTEGER, UNIQUE (event_id));
CREATE TABLE rooms (room_id TEXT NOT NULL, is_public BOOL, creator TEXT, room_version TEXT,
    has_auth_chain_index BOOLEAN, UNIQUE (room_id));
CREATE TABLE schema_version (Lock CHAR(1) NOT NULL DEFAULT 'X' UNIQUE, version INTEGER NOT NULL,
    upgraded BOOL NOT NULL, CHECK (Lock='X'));
INSERT INTO schema_version (version, upgraded) VALUES (73, false);
";

/// (event, type, state_key, group after it, how the group was written)
/// Groups: 1 snapshot; 2, 3, 4 deltas on the one before; 5 a snapshot (as Synapse
/// writes when state resolution or the hop limit asks for one); 6 a delta on 5.
/// Messages map to the group before them; the outlier has no mapping.
const EVENTS: &[(&str, &str, Option<&str>, Option<i64>)] = &[
    ("$create", "m.room.create", Some(""), Some(1)),
    ("$alice_join", "m.room.member", Some("@alice:test"), Some(2)),
    ("$power", "m.room.power_levels", Some(""), Some(3)),
    ("$msg1", "m.room.message", None, Some(3)),
    ("$bob_join", "m.room.member", Some("@bob:test"), Some(4)),
    ("$name", "m.room.name", Some(""), Some(5)),
    ("$bob_leave", "m.room.member", Some("@bob:test"), Some(6)),
    ("$msg2", "m.room.message", None, Some(6)),
    ("$outlier", "m.room.member", Some("@carol:test"), None),
];

fn fill(t: &TestDb, raw: &mut storage_core::Conn) {
    let mut sql = String::from(SYNAPSE_SCHEMA);
    if t.engine() == "postgres" {
        // Left behind the table, as a restore without sequences leaves it.
        sql += "CREATE SEQUENCE state_group_id_seq; SELECT setval('state_group_id_seq', 3);";
    }
    sql += &format!(
        "INSERT INTO rooms (room_id, is_public, creator, room_version, has_auth_chain_index) \
         VALUES ('{ROOM}', false, '@alice:test', '10', true);
         INSERT INTO state_groups (id, room_id, event_id) VALUES (1, '{ROOM}', '$create'), \
         (2, '{ROOM}', '$alice_join'), (3, '{ROOM}', '$power'), (4, '{ROOM}', '$bob_join'), \
         (5, '{ROOM}', '$name'), (6, '{ROOM}', '$bob_leave'), (7, '!other:test', '$other');
         INSERT INTO state_group_edges (state_group, prev_state_group) VALUES (2, 1), (3, 2), (4, 3), (6, 5);
         INSERT INTO state_groups_state (state_group, room_id, type, state_key, event_id) VALUES
           (1, '{ROOM}', 'm.room.create', '', '$create'),
           (2, '{ROOM}', 'm.room.member', '@alice:test', '$alice_join'),
           (3, '{ROOM}', 'm.room.power_levels', '', '$power'),
           (4, '{ROOM}', 'm.room.member', '@bob:test', '$bob_join'),
           (5, '{ROOM}', 'm.room.create', '', '$create'),
           (5, '{ROOM}', 'm.room.member', '@alice:test', '$alice_join'),
           (5, '{ROOM}', 'm.room.power_levels', '', '$power'),
           (5, '{ROOM}', 'm.room.member', '@bob:test', '$bob_join'),
           (5, '{ROOM}', 'm.room.name', '', '$name'),
           (6, '{ROOM}', 'm.room.member', '@bob:test', '$bob_leave'),
           (7, '!other:test', 'm.room.create', '', '$other');
         INSERT INTO event_to_state_groups (event_id, state_group) VALUES ('$other', 7);
         INSERT INTO current_state_events (event_id, room_id, type, state_key, membership, event_stream_ordering) VALUES
           ('$create', '{ROOM}', 'm.room.create', '', NULL, 1),
           ('$alice_join', '{ROOM}', 'm.room.member', '@alice:test', 'join', 2),
           ('$power', '{ROOM}', 'm.room.power_levels', '', NULL, 3),
           ('$name', '{ROOM}', 'm.room.name', '', NULL, 6),
           ('$bob_leave', '{ROOM}', 'm.room.member', '@bob:test', 'leave', 7);
        "
    );
    for (i, (event_id, event_type, state_key, group)) in EVENTS.iter().enumerate() {
        let outlier = group.is_none();
        let sk = state_key.map_or("NULL".to_owned(), |k| format!("'{k}'"));
        sql += &format!(
            "INSERT INTO events (stream_ordering, topological_ordering, event_id, type, room_id, processed, \
             outlier, depth, origin_server_ts, received_ts, sender, contains_url, instance_name, state_key) \
             VALUES ({n}, {n}, '{event_id}', '{event_type}', '{ROOM}', true, {outlier}, {n}, {n}000, {n}000, \
             '@alice:test', false, 'master', {sk});
             INSERT INTO event_json (event_id, room_id, internal_metadata, json, format_version) \
             VALUES ('{event_id}', '{ROOM}', '{{}}', '{{}}', 3);",
            n = i + 1
        );
        if let Some(g) = group {
            sql += &format!("INSERT INTO event_to_state_groups (event_id, state_group) VALUES ('{event_id}', {g});");
        }
    }
    raw.batch_execute(&sql)
        .expect("building the Synapse-layout database");
}

fn hs_main(t: &TestDb, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hs-main"))
        .arg("--database")
        .arg(t.url())
        .args(args)
        .env_remove("HS_DATABASE")
        .output()
        .expect("running hs-main");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn expected_after(event_index: usize) -> serde_json::Value {
    // Replay the events: a state event replaces its slot; messages change nothing.
    let mut state = serde_json::Map::new();
    for (event_id, event_type, state_key, _) in &EVENTS[..=event_index] {
        if let Some(k) = state_key {
            state
                .entry(event_type.to_string())
                .or_insert_with(|| serde_json::json!({}))
                .as_object_mut()
                .unwrap()
                .insert(k.to_string(), serde_json::json!(event_id));
        }
    }
    serde_json::Value::Object(state)
}

fn tables(t: &TestDb, raw: &mut storage_core::Conn) -> Vec<String> {
    use diesel::prelude::*;
    use diesel::sql_types::Text;
    #[derive(QueryableByName)]
    struct Name {
        #[diesel(sql_type = Text)]
        name: String,
    }
    let sql = if t.engine() == "sqlite" {
        "SELECT name FROM sqlite_master WHERE type = 'table'"
    } else {
        "SELECT table_name AS name FROM information_schema.tables WHERE table_schema = 'public'"
    };
    let rows: Vec<Name> =
        storage_core::with_conn!(raw, |c| diesel::sql_query(sql).load(c)).unwrap();
    let mut names: Vec<String> = rows.into_iter().map(|r| r.name).collect();
    names.sort();
    names
}

fn answers_from_a_synapse_database(t: &TestDb) {
    let mut raw = t.raw_connection();
    fill(t, &mut raw);
    let before = tables(t, &mut raw);
    for (i, (event_id, _, _, group)) in EVENTS.iter().enumerate() {
        if group.is_none() {
            continue;
        }
        let (code, stdout, stderr) = hs_main(t, &["state", ROOM, "--at", event_id]);
        assert_eq!(code, 0, "state --at {event_id}: {stderr}");
        let got: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
        assert_eq!(got, expected_after(i), "state after {event_id}");
    }
    let (code, stdout, stderr) = hs_main(t, &["state", ROOM]);
    assert_eq!(code, 0, "{stderr}");
    let got: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(got, expected_after(EVENTS.len() - 2));
    // Nothing was migrated or created.
    assert_eq!(tables(t, &mut raw), before);
}

fn refuses_unknown_rooms_and_events(t: &TestDb) {
    let mut raw = t.raw_connection();
    fill(t, &mut raw);
    for (args, needle) in [
        (vec!["state", "!nope:test"], "unknown room !nope:test"),
        (vec!["state", ROOM, "--at", "$nope"], "unknown event $nope"),
        (
            vec!["state", ROOM, "--at", "$outlier"],
            "unknown event $outlier",
        ),
        (
            vec!["state", ROOM, "--at", "$other"],
            "is in room !other:test",
        ),
    ] {
        let (code, stdout, stderr) = hs_main(t, &args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stdout.is_empty());
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(needle), "{stderr} should say {needle}");
    }
}

fn inspect_reports_a_synapse_database(t: &TestDb) {
    let mut raw = t.raw_connection();
    fill(t, &mut raw);
    let before = tables(t, &mut raw);

    // By default: the engine's statistics, small tables counted exactly.
    let (code, stdout, stderr) = hs_main(t, &["inspect", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(report["exact"], false);
    assert!(
        report.get("longest_delta_chain").is_none(),
        "no chain walk by default"
    );
    let table = |name: &str| {
        report["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["table"] == name)
            .unwrap_or_else(|| panic!("no table {name} in {report}"))
            .clone()
    };
    assert_eq!(table("state_groups")["rows"], 7);
    assert_eq!(table("state_groups_state")["rows"], 11);
    assert_eq!(table("events")["rows"], 9);
    assert_eq!(table("state_groups")["rows_exact"], true);
    assert!(table("state_groups_state")["bytes"].as_i64().unwrap() > 0);
    assert_eq!(report["sequence"]["max_state_group"], 7);
    let (code, text, stderr) = hs_main(t, &["inspect"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(text.contains("state_groups_state"), "{text}");

    let (code, stdout, stderr) = hs_main(t, &["inspect", "--json", "--exact"]);
    assert_eq!(code, 0, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(report["exact"], true);
    assert_eq!(report["rooms"], 1);
    assert_eq!(report["events"], 9);
    assert_eq!(report["state_groups"], 7);
    assert_eq!(report["snapshot_groups"], 3);
    assert_eq!(report["delta_groups"], 4);
    assert_eq!(report["state_groups_state_rows"], 11);
    assert_eq!(report["longest_delta_chain"], 4);
    // Chains of 1, 2, 3, 4 (groups 1-4), 1, 2 (groups 5-6) and 1 (group 7).
    assert_eq!(report["average_delta_chain"], 2.0);
    assert_eq!(report["rooms_by_state_rows"][0]["room_id"], ROOM);
    assert_eq!(report["rooms_by_state_rows"][0]["rows"], 10);
    assert_eq!(report["sequence"]["max_state_group"], 7);
    if t.engine() == "postgres" {
        assert_eq!(report["sequence"]["last_value"], 3);
        assert_eq!(report["sequence"]["behind"], true);
    } else {
        assert_eq!(report["sequence"]["behind"], false);
    }
    let (code, text, stderr) = hs_main(t, &["inspect", "--exact"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        text.contains("state groups     7 (3 snapshots, 4 deltas)"),
        "{text}"
    );
    assert_eq!(tables(t, &mut raw), before, "inspect wrote nothing");

    // Every group has an event so far.
    let unreferenced = |t: &TestDb| {
        let (code, stdout, stderr) = hs_main(t, &["inspect", "--json", "--unreferenced"]);
        assert_eq!(code, 0, "{stderr}");
        let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
        let u = &report["unreferenced_state_groups"];
        (
            u["unreferenced"].as_i64().unwrap(),
            u["unneeded"].as_i64().unwrap(),
        )
    };
    assert_eq!(unreferenced(t), (0, 0));
    // 8: a delta on 6 that no event took (a resolution left unused); 9: a
    // snapshot no event names, but 10 (which an event names) is a delta on it.
    raw.batch_execute(&format!(
        "INSERT INTO state_groups (id, room_id, event_id) VALUES (8, '{ROOM}', '$x'), \
         (9, '{ROOM}', '$y'), (10, '{ROOM}', '$z');
         INSERT INTO state_group_edges (state_group, prev_state_group) VALUES (8, 6), (10, 9);
         INSERT INTO event_to_state_groups (event_id, state_group) VALUES ('$z', 10);"
    ))
    .expect("adding unreferenced groups");
    assert_eq!(unreferenced(t), (2, 1));
}
