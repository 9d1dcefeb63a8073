//! A database that Synapse wrote, made by Synapse's own schema (see
//! tests/fixtures/synapse/schema.py) and filled the way Synapse fills it:
//! `state`, `inspect` and `serve --read-only` answer from it without changing
//! it; `serve`, `migrate`, `import` and `port --to` refuse it before writing
//! anything (same bytes on SQLite; no new relation, no changed setting on
//! PostgreSQL); `port --from` copies its rooms and state into a database of
//! ours. On SQLite and PostgreSQL.

use e2e_tests::hs_main;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};
use storage_core::testing::TestDb;

storage_core::engine_tests!(
    answers_from_a_synapse_database,
    refuses_unknown_rooms_and_events,
    inspect_reports_a_synapse_database,
    writers_refuse_a_synapse_database,
    port_copies_the_state_of_a_synapse_database,
    serve_read_only_answers_from_a_synapse_database,
);

const ROOM: &str = "!room:test";

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

/// Synapse's empty database, as Synapse 1.163 creates it on this engine.
fn synapse_schema(t: &TestDb) -> String {
    let file = format!("{FIXTURES}/synapse/schema.{}.sql", t.engine());
    std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{file}: {e}"))
}

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

/// Synapse's schema and the rows above. On SQLite the file is left in WAL
/// mode, as Synapse leaves it, and closed, so that nothing but the file remains.
fn fill(t: &TestDb) {
    let mut raw = t.raw_connection();
    let mut sql = synapse_schema(t);
    sql += &format!(
        "INSERT INTO rooms (room_id, is_public, creator, room_version, has_auth_chain_index) \
         VALUES ('{ROOM}', false, '@alice:test', '10', true);"
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
    sql += &format!(
        "INSERT INTO state_groups (id, room_id, event_id) VALUES (1, '{ROOM}', '$create'), \
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
    if t.engine() == "postgres" {
        // Left behind the table, as a restore without sequences leaves it.
        sql += "SELECT setval('state_group_id_seq', 3);";
    }
    raw.batch_execute(&sql)
        .expect("building the Synapse database");
}

/// The tables of Synapse's that an operator could see change (see
/// [`e2e_tests::database_snapshot`]).
const TABLES: [&str; 6] = [
    "state_groups",
    "state_groups_state",
    "state_group_edges",
    "event_to_state_groups",
    "events",
    "rooms",
];

/// Everything an operator could see change, with the state group sequence.
fn snapshot(t: &TestDb) -> Vec<String> {
    let mut seen = e2e_tests::database_snapshot(t, &TABLES);
    if t.engine() == "postgres" {
        seen.extend(e2e_tests::query_lines(
            t,
            "SELECT 'seq ' || last_value || ' ' || is_called AS line FROM state_group_id_seq",
        ));
    }
    seen
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

fn answers_from_a_synapse_database(t: &TestDb) {
    fill(t);
    let before = snapshot(t);
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
    // Nothing was migrated, created or changed.
    assert_eq!(snapshot(t), before);
}

fn refuses_unknown_rooms_and_events(t: &TestDb) {
    fill(t);
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
    fill(t);
    let before = snapshot(t);

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
    assert_eq!(snapshot(t), before, "inspect wrote nothing");

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
    let mut raw = t.raw_connection();
    raw.batch_execute(&format!(
        "INSERT INTO state_groups (id, room_id, event_id) VALUES (8, '{ROOM}', '$x'), \
         (9, '{ROOM}', '$y'), (10, '{ROOM}', '$z');
         INSERT INTO state_group_edges (state_group, prev_state_group) VALUES (8, 6), (10, 9);
         INSERT INTO event_to_state_groups (event_id, state_group) VALUES ('$z', 10);"
    ))
    .expect("adding unreferenced groups");
    assert_eq!(unreferenced(t), (2, 1));
}

/// What Synapse's database says to a writer: one line naming it and what to do.
fn assert_refused(what: &str, code: i32, stderr: &str) {
    assert_eq!(code, 1, "{what}: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "{what}: one line: {stderr}"
    );
    assert!(
        stderr.contains("is a Synapse database (schema version 94)"),
        "{what}: {stderr}"
    );
    assert!(stderr.contains("hs-main port --from"), "{what}: {stderr}");
    assert!(
        !stderr.to_lowercase().contains("migrat"),
        "{what}: {stderr}"
    );
}

fn writers_refuse_a_synapse_database(t: &TestDb) {
    fill(t);
    let before = snapshot(t);
    let events = format!("{FIXTURES}/example-room.jsonl");
    let ours = TestDb::sqlite();
    for args in [
        vec!["migrate"],
        vec!["import", &events],
        vec!["serve", "--listen", "127.0.0.1:0"],
    ] {
        let (code, _, stderr) = hs_main(t, &args);
        assert_refused(args[0], code, &stderr);
        assert_eq!(snapshot(t), before, "{args:?} changed the Synapse database");
    }
    // As the target of a port, from a database of ours.
    let (code, _, stderr) = hs_main(&ours, &["migrate"]);
    assert_eq!(code, 0, "{stderr}");
    let out = e2e_tests::hs_main_command()
        .args(["--database", ours.url(), "port", "--to", t.url()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("is a Synapse database"), "{stderr}");
    assert_eq!(
        snapshot(t),
        before,
        "port --to changed the Synapse database"
    );
}

fn port_copies_the_state_of_a_synapse_database(t: &TestDb) {
    fill(t);
    let before = snapshot(t);
    let target = match t.engine() {
        "sqlite" => TestDb::sqlite(),
        _ => TestDb::postgres().unwrap(),
    };
    let out = e2e_tests::hs_main_command()
        .args(["port", "--from", t.url(), "--to", target.url()])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(!stderr.to_lowercase().contains("migrate it"), "{stderr}");
    assert!(
        stdout.contains("checked: row counts equal in 6 tables"),
        "{stdout}"
    );
    assert_eq!(snapshot(t), before, "the Synapse database is unchanged");
    // The copy answers like the original, and is a database of ours.
    for (i, (event_id, _, _, group)) in EVENTS.iter().enumerate() {
        if group.is_none() {
            continue;
        }
        let (code, stdout, stderr) = hs_main(&target, &["state", ROOM, "--at", event_id]);
        assert_eq!(code, 0, "state --at {event_id}: {stderr}");
        let got: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(got, expected_after(i), "state after {event_id}");
    }
    let (code, _, stderr) = hs_main(&target, &["migrate"]);
    assert_eq!(code, 0, "{stderr}");
}

fn serve_read_only_answers_from_a_synapse_database(t: &TestDb) {
    fill(t);
    let before = snapshot(t);
    let mut child = e2e_tests::hs_main_command()
        .args([
            "--database",
            t.url(),
            "serve",
            "--read-only",
            "--listen",
            "127.0.0.1:0",
        ])
        .env_remove("HS_DATABASE")
        .env_remove("HS_API_TOKEN")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    let base = loop {
        assert!(Instant::now() < deadline, "serve --read-only did not start");
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            panic!("serve --read-only exited: {:?}", child.wait());
        }
        if let Some((_, addr)) = line.trim_end().split_once("listening on ") {
            break addr.to_owned();
        }
    };
    // Keep reading its log so that it never blocks on a full pipe.
    std::thread::spawn(move || for _ in stderr.lines() {});
    let call = |method: &str, path: &str| {
        let request = ureq::request(method, &format!("{base}{path}"));
        let result = if method == "POST" {
            request.send_string(r#"{"events": []}"#)
        } else {
            request.call()
        };
        match result {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("{method} {path}: {e}"),
        }
    };
    let (code, text) = call("GET", "/_hs/v1/health");
    assert_eq!(code, 200, "{text}");
    let health: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (health["ok"].clone(), health["database"].clone()),
        (true.into(), "ok".into())
    );
    let room = ROOM.replace('!', "%21").replace(':', "%3A");
    let (code, text) = call("GET", &format!("/_hs/v1/rooms/{room}/state"));
    assert_eq!(code, 200, "{text}");
    let got: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(got, expected_after(EVENTS.len() - 2));
    let (code, text) = call("GET", &format!("/_hs/v1/rooms/{room}/state?at=%24power"));
    assert_eq!(code, 200, "{text}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&text).unwrap(),
        expected_after(2)
    );
    for path in [
        format!("/_hs/v1/rooms/{room}/events"),
        format!("/_hs/v1/internal/rooms/{room}/events"),
    ] {
        let (code, text) = call("POST", &path);
        assert_eq!(code, 405, "{path}: {text}");
        let error: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(error["errcode"], "M_UNRECOGNIZED", "{text}");
        assert!(
            error["error"].as_str().unwrap().contains("read-only"),
            "{text}"
        );
    }
    let (code, text) = call("GET", "/_hs/v1/stream/position");
    assert_eq!((code, text.as_str()), (200, r#"{"events":9}"#));
    let (code, text) = call("GET", "/metrics");
    assert_eq!(code, 200, "{text}");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        snapshot(t),
        before,
        "serve --read-only changed the Synapse database"
    );
}

/// Synapse on SQLite takes state group ids from the highest one stored when
/// it starts: after a purge of the room holding the highest groups and a
/// restart, it hands those ids out again, to other groups. A read-only server
/// beside it that cached the old groups must answer the new ones. (On
/// PostgreSQL Synapse takes them from a sequence, which never goes back.)
#[test]
fn sqlite_serve_read_only_beside_a_synapse_that_reuses_purged_group_ids() {
    let t = TestDb::sqlite();
    fill(&t);
    // Synapse running: its connection keeps the write-ahead log beside the
    // file, so the server reads the file as one that changes.
    let mut synapse = t.raw_connection();
    synapse
        .batch_execute("UPDATE rooms SET is_public = false")
        .unwrap();
    let path = t.url().strip_prefix("sqlite:").unwrap().to_owned();
    assert!(std::path::Path::new(&format!("{path}-wal")).exists());
    let server = e2e_tests::read_only_server(t.url());
    let state_at = |room: &str, event: &str| {
        e2e_tests::get(
            &server.url,
            &format!(
                "/_hs/v1/rooms/{}/state?at={}",
                e2e_tests::encode(room),
                e2e_tests::encode(event)
            ),
        )
    };
    let other = "!other:test";
    let created = serde_json::json!({"m.room.create": {"": "$other"}});
    assert_eq!(state_at(other, "$other"), created);
    assert_eq!(state_at(ROOM, "$bob_leave"), expected_after(6));

    // The room of group 7, the highest, is purged; Synapse restarts and the
    // room is joined again: its new group takes id 7 again.
    let purge = |room: &str| {
        format!(
            "DELETE FROM state_groups_state WHERE room_id = '{room}';
             DELETE FROM event_to_state_groups WHERE state_group IN
               (SELECT id FROM state_groups WHERE room_id = '{room}');
             DELETE FROM state_groups WHERE room_id = '{room}';"
        )
    };
    synapse
        .batch_execute(&format!(
            "{}
             INSERT INTO state_groups (id, room_id, event_id) VALUES (7, '{other}', '$carol_join');
             INSERT INTO state_groups_state (state_group, room_id, type, state_key, event_id) VALUES
               (7, '{other}', 'm.room.create', '', '$other'),
               (7, '{other}', 'm.room.member', '@carol:test', '$carol_join');
             INSERT INTO event_to_state_groups (event_id, state_group) VALUES ('$carol_join', 7);",
            purge(other)
        ))
        .unwrap();
    let rejoined = serde_json::json!({
        "m.room.create": {"": "$other"},
        "m.room.member": {"@carol:test": "$carol_join"},
    });
    assert_eq!(state_at(other, "$carol_join"), rejoined);
    let purged = ureq::get(&format!(
        "{}/_hs/v1/rooms/{}/state?at=%24other",
        server.url,
        e2e_tests::encode(other)
    ))
    .set("Authorization", &format!("Bearer {}", e2e_tests::TOKEN))
    .call();
    assert!(
        matches!(purged, Err(ureq::Error::Status(404, _))),
        "$other was purged: {purged:?}"
    );

    // Purged again, and id 7 goes to a new room's group.
    synapse
        .batch_execute(&format!(
            "{}
             INSERT INTO state_groups (id, room_id, event_id) VALUES (7, '!new:test', '$new');
             INSERT INTO state_groups_state (state_group, room_id, type, state_key, event_id) VALUES
               (7, '!new:test', 'm.room.create', '', '$new');
             INSERT INTO event_to_state_groups (event_id, state_group) VALUES ('$new', 7);",
            purge(other)
        ))
        .unwrap();
    assert_eq!(
        state_at("!new:test", "$new"),
        serde_json::json!({"m.room.create": {"": "$new"}})
    );
    // What was not purged answers as before.
    assert_eq!(state_at(ROOM, "$bob_leave"), expected_after(6));
    drop(server);
}
