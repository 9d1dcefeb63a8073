//! `hs-main import`: state computed through contexts and the queue, rejected
//! events recorded and changing nothing, re-runs skipping stored events, and a
//! malformed line stopping the import after committing what came before. On
//! SQLite and PostgreSQL.

use e2e_tests::hs_main;
use serde_json::{json, Value};
use std::path::Path;
use storage_core::testing::TestDb;
use storage_core::with_conn;

storage_core::engine_tests!(
    import_computes_state_and_records_rejections,
    malformed_line_stops_after_committing_what_came_before,
    outliers_get_no_state,
    readme_example_imports,
    first_batch_ending_in_a_fork_persists,
    first_batch_with_a_rejected_event_and_a_fork_persists,
    a_failed_batch_stops_its_room_and_only_its_room,
    prev_events_in_another_room_are_refused,
    a_second_create_event_changes_nothing,
    events_over_the_limits_are_refused_naming_their_line,
    gzip_and_standard_input_are_read,
    a_refused_room_is_unknown_and_leaves_no_groups,
    a_purged_resolution_is_never_reused,
    imported_tables_match_the_recorded_dump,
    an_import_leaves_the_planner_statistics_of_what_it_wrote,
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
        stdout.starts_with("imported 9 events (0 already stored, 1 rejected) in 1 rooms"),
        "{stdout}"
    );
    assert!(stdout.contains("events/s"), "{stdout}");
    assert!(
        stderr.contains(&format!("rejected {}: ", id("name"))),
        "names the rejected event: {stderr}"
    );

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
        stdout.starts_with("imported 0 events (9 already stored, 0 rejected)"),
        "{stdout}"
    );
    storage_events::testing::assert_invariants(&t.open());
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
    assert!(
        stderr.contains("the 7 events read before this line are committed"),
        "says exactly what was committed: {stderr}"
    );
    // Everything before the bad line is there; nothing after it.
    state_at(t, "name");
    let (code, _, _) = hs_main(t, &["state", ROOM, "--at", &id("topic")]);
    assert_eq!(code, 2);
    // With the line fixed, a second run finishes the job.
    let fixed = write(&dir, "second.jsonl", &lines[5..]);
    let (code, stdout, stderr) = hs_main(t, &["import", &first, &fixed]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with("imported 2 events (7 already stored, 0 rejected)"),
        "{stdout}"
    );
    storage_events::testing::assert_invariants(&t.open());
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
        persistence::Pipeline::open(t.open(), &storage_core::StoreConfig::default()).unwrap();
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
        stdout.starts_with("imported 9 events (0 already stored, 1 rejected) in 1 rooms"),
        "{stdout}"
    );
    let out = e2e_tests::hs_main_command()
        .args(["--database", t.url(), "state", "!example:example.org"])
        .output()
        .unwrap();
    let state: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(state["m.room.topic"][""], "$topic:example.org");
    assert!(
        state.get("m.room.name").is_none(),
        "bob may not rename the room"
    );
    storage_events::testing::assert_invariants(&t.open());
}

/// The README's example room, as JSON values.
fn example_room() -> Vec<Value> {
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/example-room.jsonl"
    );
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A state event by alice in the example room, following `prev`.
fn alice_sets(id: &str, kind: &str, content: Value, prev: &str) -> Value {
    let r = |i: &str| json!([format!("${i}:example.org"), {"sha256": "aGFzaA"}]);
    json!({
        "auth_events": [r("create"), r("power"), r("alice_join")],
        "content": content, "depth": 7, "event_id": format!("${id}:example.org"),
        "hashes": {"sha256": "aGFzaA"}, "origin": "example.org",
        "origin_server_ts": 1_764_000_000_100i64, "prev_events": [r(prev)],
        "room_id": "!example:example.org", "sender": "@alice:example.org",
        "signatures": {}, "state_key": "", "type": kind,
    })
}

fn lines_of(events: &[Value]) -> Vec<String> {
    events.iter().map(Value::to_string).collect()
}

fn current_state(t: &TestDb, room: &str) -> Value {
    let (code, stdout, stderr) = hs_main(t, &["state", room]);
    assert_eq!(code, 0, "{stderr}");
    serde_json::from_str(&stdout).unwrap()
}

/// The example room's first `prefix` events, then two state events of alice
/// that both follow its message: a fork at the end of the room's first batch.
fn example_room_ending_in_a_fork(prefix: usize) -> Vec<Value> {
    let mut events = example_room()[..prefix].to_vec();
    events.push(alice_sets(
        "topic2",
        "m.room.topic",
        json!({"topic": "t"}),
        "hello",
    ));
    events.push(alice_sets(
        "name2",
        "m.room.name",
        json!({"name": "n"}),
        "hello",
    ));
    events
}

/// Imports the example room's first `prefix` events ending in a fork as a new
/// room: it persists, the summary starts with `summary`, and the current state
/// holds both sides of the fork.
fn import_a_fork_as_a_new_room(t: &TestDb, prefix: usize, summary: &str) {
    let dir = tempdir();
    let events = example_room_ending_in_a_fork(prefix);
    let file = write(&dir, "fork.jsonl", &lines_of(&events));
    let (code, stdout, stderr) = hs_main(t, &["import", &file]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with(summary), "{stdout}");
    let state = current_state(t, "!example:example.org");
    assert_eq!(state["m.room.topic"][""], "$topic2:example.org", "{state}");
    assert_eq!(state["m.room.name"][""], "$name2:example.org", "{state}");
    storage_events::testing::assert_invariants(&t.open());
    std::fs::remove_dir_all(dir).unwrap();
}

/// A new room whose first (and only) batch ends in a fork: two state events of
/// alice after the same message. The room's version comes from its create
/// event in the batch, not from the `rooms` row the batch itself writes.
fn first_batch_ending_in_a_fork_persists(t: &TestDb) {
    import_a_fork_as_a_new_room(t, 6, "imported 8 events");
}

/// The same with bob's rejected rename in the batch too.
fn first_batch_with_a_rejected_event_and_a_fork_persists(t: &TestDb) {
    import_a_fork_as_a_new_room(t, 7, "imported 9 events (0 already stored, 1 rejected)");
}

/// A batch of one room fails to persist (an injected failure on one of its
/// events): that room keeps exactly the batches before it, with no hole, the
/// other room is imported whole, and the import names the room and the line
/// where the failed batch began.
fn a_failed_batch_stops_its_room_and_only_its_room(t: &TestDb) {
    let dir = tempdir();
    // An import writes a room in batches of `batch_size` events: r0's second
    // batch fails.
    let batch = main_process::import_cmd::batch_size(t.open().engine());
    let events = e2e_rooms(batch * 5 / 2, 60);
    let a: Vec<&Value> = events
        .iter()
        .filter(|e| e["room_id"] == "!r0:example.com")
        .collect();
    let b_count = events.len() - a.len();
    let doomed = a[batch * 3 / 2]["event_id"].as_str().unwrap().to_owned();
    let batch_start = a[batch]["event_id"].as_str().unwrap().to_owned();
    let start_line = 1 + events
        .iter()
        .position(|e| e["event_id"] == batch_start.as_str())
        .unwrap();
    drop(t.open());
    t.fail_inserts("events", "event_id", &doomed);
    let file = write(&dir, "rooms.jsonl", &lines_of(&events));
    let (code, stdout, stderr) = hs_main(t, &["import", &file]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!(
            "room !r0:example.com stopped at {file}:{start_line}"
        )),
        "names the room and the line of the failed batch: {stderr}"
    );
    assert!(stderr.contains("injected failure"), "{stderr}");
    assert!(
        stdout.starts_with(&format!("imported {} events", batch + b_count)),
        "the first batch of r0 and all of r1: {stdout}"
    );
    let stored: Vec<String> = {
        use diesel::prelude::*;
        use storage_events::schema::events as e;
        with_conn!(&mut t.raw_connection(), |c| e::table
            .select(e::event_id)
            .filter(e::room_id.eq("!r0:example.com"))
            .load(c))
        .unwrap()
    };
    let mut expected: Vec<String> = a[..batch]
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect();
    let mut stored = stored;
    stored.sort();
    expected.sort();
    assert_eq!(stored, expected, "r0 holds exactly its first batch");
    storage_events::testing::assert_invariants(&t.open());
    std::fs::remove_dir_all(dir).unwrap();
}

/// Two generated rooms of about `a` and `b` events (fork-heavy, interleaved).
fn e2e_rooms(a: usize, b: usize) -> Vec<Value> {
    let mut first = e2e_tests::forks::fork_heavy_rooms(11, 1, a);
    let second: Vec<Value> = e2e_tests::forks::fork_heavy_rooms(12, 2, b)
        .into_iter()
        .filter(|e| e["room_id"] == "!r1:example.com")
        .collect();
    // Interleave the second room's events into the first's, in order.
    let step = first.len() / second.len().max(1);
    for (i, e) in second.into_iter().enumerate() {
        first.insert((i * (step + 1)).min(first.len()), e);
    }
    first
}

/// An event whose prev event is in another room is refused with the reason,
/// and nothing of it is stored.
fn prev_events_in_another_room_are_refused(t: &TestDb) {
    let dir = tempdir();
    let mut lines = lines_of(&example_room());
    let mut other = room_lines();
    // Bob's message in room !r names the example room's message as its prev.
    let mut intruder: Value = serde_json::from_str(&other[5]).unwrap();
    intruder["prev_events"] = json!([["$hello:example.org", {"sha256": "aGFzaA"}]]);
    other[5] = intruder.to_string();
    lines.extend(other[..6].iter().cloned());
    let file = write(&dir, "rooms.jsonl", &lines);
    let (code, _, stderr) = hs_main(t, &["import", &file]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("{file}:15")),
        "names the line: {stderr}"
    );
    assert!(
        stderr.contains("its prev event $hello:example.org is in room !example:example.org"),
        "{stderr}"
    );
    let (code, _, _) = hs_main(t, &["state", ROOM, "--at", &id("m1")]);
    assert_eq!(code, 2, "the intruder is not stored");
    storage_events::testing::assert_invariants(&t.open());
    std::fs::remove_dir_all(dir).unwrap();
}

/// A second create event for a room (here claiming another room version) is
/// stored as rejected and changes neither the room's version nor its state,
/// and the events after it are read with the room's real version.
fn a_second_create_event_changes_nothing(t: &TestDb) {
    let dir = tempdir();
    let mut events = example_room();
    let mut second = events[0].clone();
    second["event_id"] = json!("$create2:example.org");
    second["content"]["room_version"] = json!("1");
    events.insert(6, second);
    let file = write(&dir, "room.jsonl", &lines_of(&events));
    let (code, stdout, stderr) = hs_main(t, &["import", &file]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with("imported 10 events (0 already stored, 2 rejected)"),
        "{stdout}"
    );
    assert!(stderr.contains("rejected $create2:example.org: room !example:example.org already has an m.room.create event"), "{stderr}");
    let version: Option<String> = {
        use diesel::prelude::*;
        use storage_events::schema::rooms as r;
        with_conn!(&mut t.raw_connection(), |c| r::table
            .select(r::room_version)
            .filter(r::room_id.eq("!example:example.org"))
            .first(c))
        .unwrap()
    };
    assert_eq!(version.as_deref(), Some("2"));
    let state = current_state(t, "!example:example.org");
    assert_eq!(state["m.room.create"][""], "$create:example.org");
    storage_events::testing::assert_invariants(&t.open());
    std::fs::remove_dir_all(dir).unwrap();
}

/// The limits on a PDU hold the same on both engines and are checked before
/// anything of the event is stored: a state key over 255 bytes, a NUL in a
/// state key, a line over the line limit (read without holding it), invalid
/// UTF-8. Each names its file and line and says how many events before it
/// were committed.
fn events_over_the_limits_are_refused_naming_their_line(t: &TestDb) {
    let dir = tempdir();
    let room = lines_of(&example_room());
    let long_key = alice_sets("long", "m.room.topic", json!({"topic": "t"}), "hello");
    let mut long_key = long_key;
    long_key["state_key"] = json!("k".repeat(256));
    let mut nul_key = alice_sets("nul", "m.room.topic", json!({"topic": "t"}), "hello");
    nul_key["state_key"] = json!("a\u{0}b");
    let mut huge = alice_sets("huge", "m.room.topic", json!({"topic": "t"}), "hello");
    huge["content"]["topic"] = json!("x".repeat(300_000));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "long",
            long_key.to_string().into_bytes(),
            "state_key: 256 bytes, over the limit of 255",
        ),
        (
            "nul",
            nul_key.to_string().into_bytes(),
            "state_key: contains a NUL character",
        ),
        (
            "huge",
            huge.to_string().into_bytes(),
            "the line is longer than",
        ),
        ("utf8", b"{\"type\": \"\xff\"}".to_vec(), "not valid UTF-8"),
    ];
    for (i, (name, bad, reason)) in cases.into_iter().enumerate() {
        let mut bytes = room[..6].join("\n").into_bytes();
        bytes.extend(b"\n");
        bytes.extend(bad);
        bytes.extend(b"\n");
        bytes.extend(room[6..].join("\n").into_bytes());
        let path = dir.join(format!("{name}.jsonl"));
        std::fs::write(&path, bytes).unwrap();
        let file = path.display().to_string();
        let (code, stdout, stderr) = hs_main(t, &["import", &file]);
        assert_eq!(code, 1, "{name}: {stdout}{stderr}");
        assert!(
            stderr.contains(&format!("{file}:7")),
            "{name} names its line: {stderr}"
        );
        assert!(stderr.contains(reason), "{name}: {stderr}");
        let committed = if i == 0 { 6 } else { 0 };
        assert!(
            stderr.contains(&format!(
                "the {committed} events read before this line are committed"
            )),
            "{name}: {stderr}"
        );
    }
    let (code, _, _) = hs_main(
        t,
        &[
            "state",
            "!example:example.org",
            "--at",
            "$hello:example.org",
        ],
    );
    assert_eq!(code, 0);
    storage_events::testing::assert_invariants(&t.open());
    std::fs::remove_dir_all(dir).unwrap();
}

/// `-` reads standard input, and a `.gz` file is decompressed.
fn gzip_and_standard_input_are_read(t: &TestDb) {
    use std::io::Write;
    let dir = tempdir();
    let lines = lines_of(&example_room());
    let gz_path = dir.join("first.jsonl.gz");
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz_path).unwrap(),
        flate2::Compression::fast(),
    );
    gz.write_all((lines[..5].join("\n") + "\n").as_bytes())
        .unwrap();
    gz.finish().unwrap();
    let (code, stdout, stderr) = hs_main(t, &["import", gz_path.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("imported 5 events"), "{stdout}");
    let mut child = e2e_tests::hs_main_command()
        .args(["--database", t.url(), "import", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all((lines.join("\n") + "\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        stdout.starts_with("imported 4 events (5 already stored, 1 rejected)"),
        "{stdout}"
    );
    storage_events::testing::assert_invariants(&t.open());
    std::fs::remove_dir_all(dir).unwrap();
}

fn groups_of(t: &TestDb, room: &str) -> i64 {
    use diesel::prelude::*;
    use storage_state::schema::state_groups as g;
    with_conn!(&mut t.raw_connection(), |c| g::table
        .filter(g::room_id.eq(room))
        .count()
        .get_result(c))
    .unwrap()
}

/// A room whose only batch failed leaves no state group behind: its groups
/// were to be written by the batch itself. The room is still unknown (`state`
/// exits 2), and `purge-state-groups` finds nothing to delete.
fn a_refused_room_is_unknown_and_leaves_no_groups(t: &TestDb) {
    let dir = tempdir();
    let room = "!example:example.org";
    drop(t.open());
    t.fail_inserts("events", "event_id", "$hello:example.org");
    let file = write(&dir, "room.jsonl", &lines_of(&example_room()));
    let (code, _, stderr) = hs_main(t, &["import", &file]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(groups_of(t, room), 0, "the refused batch wrote no group");
    let (code, _, stderr) = hs_main(t, &["state", room]);
    assert_eq!(code, 2, "a room with no stored event is unknown: {stderr}");
    let (code, stdout, stderr) = hs_main(t, &["purge-state-groups", "--dry-run"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with("0 state groups are needed by no event"),
        "{stdout}"
    );
    storage_events::testing::assert_invariants(&t.open());
    std::fs::remove_dir_all(dir).unwrap();
}

/// A merge's resolved state is stored as a group and cached per set of prev
/// groups. When the merge event is refused, a purge deletes that group; the
/// next event merging the same groups must get a group that exists, not the
/// cached one. (A builder that writes groups at once, as a worker's does; the
/// main process's writes them with their events.)
fn a_purged_resolution_is_never_reused(t: &TestDb) {
    use event_context::{contexts_for, PduReader, PendingEvents};
    use storage_state::StateGroupAccess;
    let pipeline =
        persistence::Pipeline::open(t.open(), &storage_core::StoreConfig::default()).unwrap();
    let room = "!example:example.org";
    let events = example_room_ending_in_a_fork(6);
    let prefix = contexts_for(&pipeline.builder, room, &lines_of(&events)).unwrap();
    pipeline.persist(room, &prefix).unwrap();
    let writing_at_once = event_context::ContextBuilder::new(
        pipeline.builder.events().clone(),
        &storage_core::StoreConfig::default(),
    );

    let merge = |id: &str| {
        let mut m = alice_sets(id, "m.room.message", json!({"body": id}), "topic2");
        m.as_object_mut().unwrap().remove("state_key");
        m["prev_events"] = json!([
            ["$topic2:example.org", {"sha256": "aGFzaA"}],
            ["$name2:example.org", {"sha256": "aGFzaA"}]
        ]);
        let mut reader = PduReader::new(pipeline.builder.events().clone());
        let pdu = reader.read(&m.to_string()).unwrap();
        writing_at_once
            .compute_event_context(&pdu, false, &PendingEvents::default())
            .unwrap()
    };
    let first = merge("merge1");
    let resolved = first.state_group_before.unwrap();
    let state = pipeline.builder.state();
    assert_eq!(
        state.get_state_group_room(resolved).unwrap().as_deref(),
        Some(room)
    );
    // merge1 is never persisted: its resolved group is unneeded and goes.
    let up_to = storage_state::highest_state_group(state.database()).unwrap();
    let report = storage_state::purge_unneeded_groups(state, up_to, false).unwrap();
    assert!(report.groups >= 1, "{report:?}");

    let second = merge("merge2");
    let before = second.state_group_before.unwrap();
    assert_ne!(before, resolved, "the purged group is not reused");
    let exists: i64 = {
        use diesel::prelude::*;
        use storage_state::schema::state_groups as g;
        with_conn!(&mut t.raw_connection(), |c| g::table
            .filter(g::id.eq(before))
            .count()
            .get_result(c))
        .unwrap()
    };
    assert_eq!(exists, 1);
    storage_events::testing::assert_invariants(&t.open());
}

/// Every row an import writes, one line per row (sorted within its table), with
/// the two columns that hold the time of writing blanked.
fn dump(t: &TestDb) -> String {
    use main_process::port::tables::*;
    use storage_core::{Conn, Database, DatabaseConfig, OpenMode};
    fn table<T: PortTable>(c: &mut Conn, out: &mut String) -> storage_core::Result<()>
    where
        T::Row: std::fmt::Debug,
    {
        let mut rows: Vec<String> = match T::next_keys(c, None, i64::MAX)?.last() {
            Some(last) => T::load(c, None, last)?
                .iter()
                .map(|r| {
                    blank(
                        "last_check: \"",
                        '"',
                        &blank("received_ts: Some(", ')', &format!("{r:?}")),
                    )
                })
                .collect(),
            None => Vec::new(),
        };
        rows.sort();
        out.push_str(&format!("{} {}\n", T::NAME, rows.len()));
        for r in rows {
            out.push_str(&r);
            out.push('\n');
        }
        Ok(())
    }
    /// `text` with what follows `field` up to `end` replaced by `_`.
    fn blank(field: &str, end: char, text: &str) -> String {
        match text.find(field) {
            Some(i) => {
                let start = i + field.len();
                let stop = start + text[start..].find(end).expect("a closed field");
                format!("{}_{}", &text[..start], &text[stop..])
            }
            None => text.to_owned(),
        }
    }
    let db = Database::open(DatabaseConfig::parse(t.url(), OpenMode::ReadOnly).unwrap()).unwrap();
    db.with_connection(|_, c| {
        let mut out = String::new();
        table::<Rooms>(c, &mut out)?;
        table::<Events>(c, &mut out)?;
        table::<EventJson>(c, &mut out)?;
        table::<EventEdges>(c, &mut out)?;
        table::<EventAuth>(c, &mut out)?;
        table::<ForwardExtremities>(c, &mut out)?;
        table::<Rejections>(c, &mut out)?;
        table::<StateGroups>(c, &mut out)?;
        table::<StateGroupEdges>(c, &mut out)?;
        table::<StateGroupsState>(c, &mut out)?;
        table::<EventToStateGroups>(c, &mut out)?;
        table::<CurrentStateEvents>(c, &mut out)?;
        Ok(out)
    })
    .unwrap()
}

/// The digest of [`dump`] after importing the rooms of
/// `imported_tables_match_the_recorded_dump`, as the import wrote them before
/// the write path was batched (recorded with the one-transaction-per-group
/// import; the same on both engines). Any change to what an import stores
/// (a row, a state group id, a stream position) changes it.
const RECORDED_DUMP_SHA256: &str = include_str!("fixtures/import_dump.sha256");

/// The tables after importing three rooms (one with a rejected event and a
/// fork, a linear room of members and messages past the delta-chain limit,
/// one whose forks state resolution merges), one import each so that stream
/// positions do not depend on how two rooms' loops interleave, are row for row
/// what the import stored before its write path was batched.
fn imported_tables_match_the_recorded_dump(t: &TestDb) {
    use sha2::Digest;
    let dir = tempdir();
    let rooms = [
        room_lines(),
        main_process::bench_room::linear_room("!linear:bench.test", 700, 60),
        main_process::bench_room::spam_join_room("!spam:bench.test", 40),
    ];
    for (i, lines) in rooms.iter().enumerate() {
        let file = write(&dir, &format!("room{i}.jsonl"), lines);
        main_process::import_cmd::run(t.url(), &[file.into()]).expect("the import succeeds");
    }
    let dump = dump(t);
    let digest: String = sha2::Sha256::digest(dump.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let kept = dir.join("dump.txt");
    std::fs::write(&kept, &dump).unwrap();
    assert_eq!(
        digest,
        RECORDED_DUMP_SHA256.trim(),
        "the imported tables differ from the recorded ones; this run's rows are in {}",
        kept.display()
    );
    storage_events::testing::assert_invariants(&t.open());
    std::fs::remove_dir_all(dir).unwrap();
}

#[derive(diesel::QueryableByName)]
struct Estimate {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    rows: i64,
}

/// An import past its first thousand events refreshes the planner's
/// statistics of the tables it fills (on PostgreSQL; autovacuum cannot analyze
/// `events` while the writer holds it locked, and plans made for an empty
/// table scan it whole), and leaves SQLite's planner without statistics.
fn an_import_leaves_the_planner_statistics_of_what_it_wrote(t: &TestDb) {
    use diesel::RunQueryDsl;
    let dir = tempdir();
    let lines = main_process::bench_room::linear_room("!big:bench.test", 1_100, 20);
    let file = write(&dir, "big.jsonl", &lines);
    main_process::import_cmd::run(t.url(), &[file.into()]).expect("the import succeeds");
    let estimate = |sql: &str| {
        with_conn!(&mut t.raw_connection(), |c| diesel::sql_query(sql)
            .get_result::<Estimate>(c))
        .unwrap()
        .rows
    };
    if t.engine() == "postgres" {
        // -1 until something analyzes the table, then the rows it had: the
        // refresh came after the first batch, 1,000 events.
        for (table, at_least) in [
            ("events", 1_000),
            ("event_json", 1_000),
            ("state_groups", 1),
            ("state_groups_state", 1),
        ] {
            let rows = estimate(&format!(
                "SELECT reltuples::bigint AS rows FROM pg_class WHERE oid = '{table}'::regclass"
            ));
            assert!(
                rows >= at_least,
                "{table}: the planner estimates {rows} rows"
            );
        }
    } else {
        let tables =
            estimate("SELECT count(*) AS rows FROM sqlite_master WHERE name = 'sqlite_stat1'");
        assert_eq!(tables, 0, "SQLite was analyzed");
    }
    storage_events::testing::assert_invariants(&t.open());
    std::fs::remove_dir_all(dir).unwrap();
}
