//! `hs-main import`: state computed through contexts and the queue, rejected
//! events recorded and changing nothing, re-runs skipping stored events, and a
//! malformed line stopping the import after committing what came before. On
//! SQLite and PostgreSQL.

use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use storage_core::testing::TestDb;
use storage_core::with_conn;

storage_core::engine_tests!(
    import_computes_state_and_records_rejections,
    malformed_line_stops_after_committing_what_came_before,
    outliers_get_no_state,
    readme_example_imports,
);

const ROOM: &str = "!r:example.com";
const ALICE: &str = "@alice:example.com";
const BOB: &str = "@bob:example.com";

/// A room version 2 event (ids in the JSON). One argument per PDU field reads
/// best in the table of events below.
#[allow(clippy::too_many_arguments)]
fn ev(
    id: &str,
    kind: &str,
    sender: &str,
    state_key: Option<&str>,
    content: Value,
    prevs: &[&str],
    auths: &[&str],
    depth: i64,
) -> String {
    let refs = |ids: &[&str]| -> Value {
        ids.iter()
            .map(|i| json!([format!("${i}:example.com"), {"sha256": "aGFzaA"}]))
            .collect()
    };
    let mut e = json!({
        "event_id": format!("${id}:example.com"),
        "room_id": ROOM,
        "sender": sender,
        "type": kind,
        "content": content,
        "prev_events": refs(prevs),
        "auth_events": refs(auths),
        "depth": depth,
        "origin_server_ts": 1_000 + depth,
        "origin": "example.com",
        "hashes": {"sha256": "aGFzaA"},
        "signatures": {},
    });
    if let Some(k) = state_key {
        e["state_key"] = json!(k);
    }
    e.to_string()
}

/// create, alice joins, power levels (alice 100), public join rules, bob joins,
/// bob talks, bob renames the room (rejected: state needs power 50), alice sets
/// a topic on a fork, alice's message merges the fork.
fn room_lines() -> Vec<String> {
    vec![
        ev(
            "create",
            "m.room.create",
            ALICE,
            Some(""),
            json!({"creator": ALICE, "room_version": "2"}),
            &[],
            &[],
            1,
        ),
        ev(
            "ja",
            "m.room.member",
            ALICE,
            Some(ALICE),
            json!({"membership": "join"}),
            &["create"],
            &["create"],
            2,
        ),
        ev(
            "pl",
            "m.room.power_levels",
            ALICE,
            Some(""),
            json!({"users": {ALICE: 100}}),
            &["ja"],
            &["create", "ja"],
            3,
        ),
        ev(
            "jr",
            "m.room.join_rules",
            ALICE,
            Some(""),
            json!({"join_rule": "public"}),
            &["pl"],
            &["create", "ja", "pl"],
            4,
        ),
        ev(
            "jb",
            "m.room.member",
            BOB,
            Some(BOB),
            json!({"membership": "join"}),
            &["jr"],
            &["create", "pl", "jr"],
            5,
        ),
        ev(
            "m1",
            "m.room.message",
            BOB,
            None,
            json!({"body": "hi"}),
            &["jb"],
            &["create", "pl", "jb"],
            6,
        ),
        ev(
            "name",
            "m.room.name",
            BOB,
            Some(""),
            json!({"name": "mine"}),
            &["m1"],
            &["create", "pl", "jb"],
            7,
        ),
        ev(
            "topic",
            "m.room.topic",
            ALICE,
            Some(""),
            json!({"topic": "t"}),
            &["m1"],
            &["create", "pl", "ja"],
            7,
        ),
        ev(
            "m2",
            "m.room.message",
            ALICE,
            None,
            json!({"body": "merge"}),
            &["name", "topic"],
            &["create", "pl", "ja"],
            8,
        ),
    ]
}

fn write(dir: &Path, name: &str, lines: &[String]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path.display().to_string()
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

fn state_at(t: &TestDb, event: &str) -> Value {
    let (code, stdout, stderr) = hs_main(
        t,
        &["state", ROOM, "--at", &format!("${event}:example.com")],
    );
    assert_eq!(code, 0, "state --at {event}: {stderr}");
    serde_json::from_str(&stdout).unwrap()
}

fn id(e: &str) -> String {
    format!("${e}:example.com")
}

fn import_computes_state_and_records_rejections(t: &TestDb) {
    let dir = tempdir();
    let file = write(&dir, "room.jsonl", &room_lines());
    let (code, stdout, stderr) = hs_main(t, &["import", &file]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.lines().count(), 1, "one summary line: {stdout}");
    assert!(
        stdout.starts_with("imported 9 events (0 already stored) in 1 rooms"),
        "{stdout}"
    );
    assert!(stdout.contains("events/s"), "{stdout}");

    let base = json!({
        "m.room.create": {"": id("create")},
        "m.room.member": {ALICE: id("ja"), BOB: id("jb")},
        "m.room.power_levels": {"": id("pl")},
        "m.room.join_rules": {"": id("jr")},
    });
    assert_eq!(state_at(t, "m1"), base);
    // The rejected rename changes nothing.
    assert_eq!(state_at(t, "name"), base);
    let mut merged = base.clone();
    merged["m.room.topic"] = json!({"": id("topic")});
    assert_eq!(state_at(t, "m2"), merged);
    let (_, current, _) = hs_main(t, &["state", ROOM]);
    assert_eq!(serde_json::from_str::<Value>(&current).unwrap(), merged);

    let reasons: Vec<(String, String)> = {
        use diesel::prelude::*;
        use storage_events::schema::rejections as r;
        with_conn!(&mut t.raw_connection(), |c| r::table
            .select((r::event_id, r::reason))
            .load(c))
        .unwrap()
    };
    assert_eq!(reasons.len(), 1);
    assert_eq!(reasons[0].0, id("name"));
    assert!(!reasons[0].1.is_empty());

    // Running it again stores nothing twice.
    let (code, stdout, stderr) = hs_main(t, &["import", &file]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with("imported 0 events (9 already stored)"),
        "{stdout}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

fn malformed_line_stops_after_committing_what_came_before(t: &TestDb) {
    let dir = tempdir();
    let lines = room_lines();
    let first = write(&dir, "first.jsonl", &lines[..5]);
    let mut second_lines = lines[5..7].to_vec();
    second_lines.push("{\"type\": \"m.room.message\", \"room_id\": ".to_owned());
    second_lines.extend(lines[7..].iter().cloned());
    let second = write(&dir, "second.jsonl", &second_lines);
    let (code, stdout, stderr) = hs_main(t, &["import", &first, &second]);
    assert_ne!(code, 0);
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains(&format!("{second}:3")),
        "names file and line: {stderr}"
    );
    assert!(stderr.contains("malformed event"), "{stderr}");
    // Everything before the bad line is there; nothing after it.
    state_at(t, "name");
    let (code, _, _) = hs_main(t, &["state", ROOM, "--at", &id("topic")]);
    assert_eq!(code, 2);
    // With the line fixed, a second run finishes the job.
    let fixed = write(&dir, "second.jsonl", &lines[5..]);
    let (code, stdout, stderr) = hs_main(t, &["import", &first, &fixed]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with("imported 2 events (7 already stored)"),
        "{stdout}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

fn tempdir() -> std::path::PathBuf {
    // Unique per test: the SQLite and PostgreSQL halves run at the same time.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("hs-import-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
/// An outlier is checked against its own auth events only and gets no state
/// group, before or after.
fn outliers_get_no_state(t: &TestDb) {
    use event_context::{ruma::RoomVersionId, Pdu, PendingEvents};
    use std::sync::Arc;
    let pipeline =
        main_process::import_cmd::Pipeline::open(t.open(), &storage_core::StoreConfig::default())
            .unwrap();
    let lines = room_lines();
    let v2 = RoomVersionId::V2;
    let pdus: Vec<Pdu> = lines
        .iter()
        .map(|l| Pdu::from_json(l, Some(&v2)).unwrap())
        .collect();
    let mut pending = PendingEvents::default();
    // Bob's join, alone: its auth events are unknown, so it is rejected.
    let alone = pipeline
        .builder
        .compute_event_context(&pdus[4], true, &pending)
        .unwrap();
    assert!(alone.outlier && alone.rejected.is_some(), "{alone:?}");
    assert_eq!(
        (alone.state_group_before, alone.state_group_after),
        (None, None)
    );
    // With its auth events known, it passes, and still has no state.
    for pdu in &pdus[..4] {
        pending.insert_pdu(Arc::new(pdu.clone()));
    }
    let known = pipeline
        .builder
        .compute_event_context(&pdus[4], true, &pending)
        .unwrap();
    assert_eq!(known.rejected, None);
    assert_eq!(
        (known.state_group_before, known.state_group_after),
        (None, None)
    );
    assert_eq!(pipeline.builder.groups_stored(), 0);
}

/// The README's main-job command imports this file; keep it working.
fn readme_example_imports(t: &TestDb) {
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/example-room.jsonl"
    );
    let (code, stdout, stderr) = hs_main(t, &["import", file]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with("imported 9 events (0 already stored) in 1 rooms"),
        "{stdout}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_hs-main"))
        .args(["--database", t.url(), "state", "!example:example.org"])
        .output()
        .unwrap();
    let state: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(state["m.room.topic"][""], "$topic:example.org");
    assert!(
        state.get("m.room.name").is_none(),
        "bob may not rename the room"
    );
}
