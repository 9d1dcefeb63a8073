//! One main process and two workers as separate OS processes on a real
//! PostgreSQL: events posted alternately to all three; afterwards every process
//! answers the same state for every event, and each worker's stream position
//! reaches the main's. A worker killed and restarted catches up; the main
//! process killed mid-stream loses no acknowledged event.
//!
//! The binaries are the workspace's `hs-main` and `hs-worker` next to this test
//! executable (`cargo xtask test` builds them first).

use e2e_tests::*;
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;
use storage_core::testing::TestDb;

#[test]
fn main_and_two_workers_agree() {
    let Some(db) = TestDb::postgres() else { return };
    let main_port = free_port();
    let main = main_process(&db, main_port);
    let w1 = worker(&db, &main.url, free_port(), "w1");
    let w2_port = free_port();
    let mut w2 = worker(&db, &main.url, w2_port, "w2");

    let mut room = Room::default();
    let mut ids = vec![];
    let mut script = room.founding("");
    for i in 0..12 {
        script.push(room.join(i));
        script.push(room.event(
            &format!("msg{i}"),
            "m.room.message",
            &member(i),
            None,
            json!({"body": i}),
        ));
        script.push(room.event(
            &format!("topic{i}"),
            "m.room.topic",
            ALICE,
            Some(""),
            json!({"topic": format!("t{i}")}),
        ));
    }
    let processes = [&main.url, &w1.url, &w2.url];
    let mut last_position = 0;
    for (i, event) in script.into_iter().enumerate() {
        let answer = post(processes[i % 3], vec![event.clone()])
            .unwrap_or_else(|e| panic!("event #{i}: {e}"));
        assert!(
            answer["rejected"].as_object().unwrap().is_empty(),
            "{answer}"
        );
        last_position = answer["stream_ordering"].as_i64().unwrap();
        ids.push(event["event_id"].as_str().unwrap().to_owned());
    }
    for w in [&w1, &w2] {
        wait_for_position(w, last_position);
    }
    let metrics = |url: &str| {
        ureq::get(&format!("{url}/metrics"))
            .call()
            .unwrap()
            .into_string()
            .unwrap()
    };
    let on_main = metrics(&main.url);
    assert!(on_main.contains("hs_persistence_queue_depth"), "{on_main}");
    assert!(
        on_main.contains(&format!("hs_replication_position {last_position}")),
        "{on_main}"
    );
    assert!(
        on_main.contains(r#"hs_transactions_total{desc="persist_events",outcome="committed"}"#),
        "{on_main}"
    );
    let on_worker = metrics(&w1.url);
    assert!(on_worker.contains("hs_replication_position"), "{on_worker}");
    assert!(
        on_worker.contains("hs_replication_lag_seconds"),
        "{on_worker}"
    );
    // Every line a process logs names its context: the process, or the request.
    for (p, name) in [(&main, "serve"), (&w1, "w1"), (&w2, "w2")] {
        let text = p.log_text();
        assert!(text.contains(&format!("INFO  [{name}] ")), "{text}");
        assert!(
            text.lines().any(
                |l| l.contains("INFO  [POST-") && l.contains("committed up to stream position")
            ),
            "{text}"
        );
        assert!(!text.contains(" [-] "), "{text}");
    }

    // Every process answers the same state after every event, and the same current state.
    for id in &ids {
        let path = format!("/_hs/v1/rooms/{}/state?at={}", encode(ROOM), encode(id));
        let want = get(&main.url, &path);
        assert_eq!(get(&w1.url, &path), want, "w1, state after {id}");
        assert_eq!(get(&w2.url, &path), want, "w2, state after {id}");
    }
    let current = format!("/_hs/v1/rooms/{}/state", encode(ROOM));
    let want = get(&main.url, &current);
    assert_eq!(want["m.room.topic"][""], "$topic11:example.com");
    assert_eq!(get(&w1.url, &current), want);
    assert_eq!(get(&w2.url, &current), want);

    // An event failing its auth rules (a topic from a member without the power)
    // is stored as rejected and reported, whether posted to the main process or
    // to a worker; it changes no state.
    for (name, url) in [("main", &main.url), ("w1", &w1.url)] {
        let before = get(&main.url, &current);
        let e = room.event(
            &format!("bad-{name}"),
            "m.room.topic",
            "@u0:example.com",
            Some(""),
            json!({"topic": "not allowed"}),
        );
        let id = e["event_id"].as_str().unwrap().to_owned();
        let answer = post(url, vec![e]).unwrap();
        assert_eq!(answer["event_ids"], json!([id]), "{answer}");
        let reason = answer["rejected"][&id].as_str().unwrap_or_default();
        assert!(reason.contains("power"), "{name}: {answer}");
        let at = format!("/_hs/v1/rooms/{}/state?at={}", encode(ROOM), encode(&id));
        for p in [&main, &w1, &w2] {
            wait_for_position(p, answer["stream_ordering"].as_i64().unwrap());
            assert_eq!(get(&p.url, &current), before, "{name} on {}", p.url);
            assert_eq!(get(&p.url, &at), before, "{name} on {}", p.url);
        }
    }

    // An event whose prev event is unknown (say, still queued on the main
    // process): a clear 400 naming it, from a worker as from the main process.
    for url in [&main.url, &w1.url] {
        let mut e = room.clone().event(
            "orphan",
            "m.room.message",
            ALICE,
            None,
            json!({"body": "?"}),
        );
        e["prev_events"] = json!([["$nope:example.com", {"sha256": "aGFzaA"}]]);
        let err = post(url, vec![e]).unwrap_err();
        assert!(err.contains("400"), "{url}: {err}");
        assert!(err.contains("$nope:example.com"), "{url}: {err}");
    }

    // An event of another room than the path's: the same 400 from a worker
    // as from the main process.
    for url in [&main.url, &w1.url] {
        room_mismatch_refused_first(url, &room);
    }

    // A worker killed and restarted catches up.
    drop(w2);
    let mut late = Vec::new();
    for i in 0..4 {
        let e = room.event(
            &format!("late{i}"),
            "m.room.topic",
            ALICE,
            Some(""),
            json!({"topic": format!("late{i}")}),
        );
        late.push(e.clone());
        last_position = post(if i % 2 == 0 { &main.url } else { &w1.url }, vec![e]).unwrap()
            ["stream_ordering"]
            .as_i64()
            .unwrap();
    }
    // An event posted again through a worker (a client retrying) is answered
    // as already stored, and the worker keeps reading the state stored for it.
    let again = post(&w1.url, vec![late[2].clone()]).unwrap();
    assert_eq!(again["skipped"], json!([late[2]["event_id"]]), "{again}");
    let at = format!(
        "/_hs/v1/rooms/{}/state?at={}",
        encode(ROOM),
        encode(late[2]["event_id"].as_str().unwrap())
    );
    assert_eq!(get(&w1.url, &at), get(&main.url, &at));
    w2 = worker(&db, &main.url, w2_port, "w2");
    wait_for_position(&w2, last_position);
    let want = get(&main.url, &current);
    assert_eq!(want["m.room.topic"][""], "$late3:example.com");
    assert_eq!(get(&w2.url, &current), want);
    assert_eq!(get(&w1.url, &current), want);
    drop(w2);

    // No two state groups share an id, though three processes allocated them.
    {
        use diesel::prelude::*;
        #[derive(QueryableByName)]
        struct Ids {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            all: i64,
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            distinct: i64,
        }
        let ids: Ids = storage_core::with_conn!(&mut db.raw_connection(), |c| diesel::sql_query(
            "SELECT COUNT(*) AS all, COUNT(DISTINCT id) AS distinct FROM state_groups"
        )
        .get_result(c))
        .unwrap();
        assert_eq!(ids.all, ids.distinct);
        assert!(ids.all > 30);
    }

    // The main process killed mid-stream loses no acknowledged event: a client
    // posts without pause while the process is killed.
    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let poster = {
        let (acknowledged, url) = (acknowledged.clone(), main.url.clone());
        std::thread::spawn(move || {
            for i in 0.. {
                // The room as of the last acknowledged event, handed back when
                // the main process stops answering.
                let before = room.clone();
                let e = room.event(
                    &format!("burst{i}"),
                    "m.room.message",
                    ALICE,
                    None,
                    json!({"body": i}),
                );
                match post(&url, vec![e.clone()]) {
                    Ok(_) => acknowledged
                        .lock()
                        .unwrap()
                        .push(e["event_id"].as_str().unwrap().to_owned()),
                    Err(_) => return before,
                }
            }
            unreachable!()
        })
    };
    while acknowledged.lock().unwrap().len() < 20 {
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut main = main;
    main.child.kill().unwrap();
    main.child.wait().unwrap();
    let mut room = poster.join().unwrap();
    drop(main);
    // Meanwhile a worker answers writes with a 503 naming the main process, not
    // a 500, and takes them again once the main process is back.
    let e = room.event(
        "while-down",
        "m.room.message",
        ALICE,
        None,
        json!({"body": "?"}),
    );
    let err = post(&w1.url, vec![e.clone()]).unwrap_err();
    assert!(err.starts_with("503"), "{err}");
    assert!(err.contains("reaching the main process"), "{err}");
    let main = main_process(&db, main_port);
    let answer = post(&w1.url, vec![e]).unwrap();
    wait_for_position(&w1, answer["stream_ordering"].as_i64().unwrap());
    let at_last = format!(
        "/_hs/v1/rooms/{}/state?at={}",
        encode(ROOM),
        encode("$while-down:example.com")
    );
    assert_eq!(get(&w1.url, &at_last), get(&main.url, &at_last));
    drop(w1);
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() >= 20);
    for id in &acknowledged {
        let path = format!("/_hs/v1/rooms/{}/state?at={}", encode(ROOM), encode(id));
        let state = get(&main.url, &path);
        assert_eq!(
            state["m.room.topic"][""], "$late3:example.com",
            "after {id}"
        );
    }
    drop(main);
    storage_events::testing::assert_invariants(&db.open_mode(storage_core::OpenMode::ReadOnly));
}

/// A client that posted through a worker reads its write back from that
/// worker at once: the worker answers only once it has applied the stream
/// position the main process committed the write at (a Synapse worker waits
/// for that position, too). Before, the worker answered as soon as the main
/// process did, and one read in a few still gave the state before the write.
#[test]
fn a_worker_answers_a_write_once_it_reads_it() {
    let Some(db) = TestDb::postgres() else { return };
    let main = main_process(&db, free_port());
    let w = worker(&db, &main.url, free_port(), "w");
    let mut room = Room::default();
    post(&w.url, room.founding("")).unwrap();
    let current = format!("/_hs/v1/rooms/{}/state", encode(ROOM));
    for i in 0..40 {
        let e = room.event(
            &format!("topic{i}"),
            "m.room.topic",
            ALICE,
            Some(""),
            json!({"topic": format!("t{i}")}),
        );
        let answer = post(&w.url, vec![e.clone()]).unwrap();
        let position = answer["stream_ordering"].as_i64().unwrap();
        let seen = get(&w.url, "/_hs/v1/stream/position")["events"]
            .as_i64()
            .unwrap();
        assert!(
            seen >= position,
            "write #{i} was answered at position {position}, the worker is at {seen}"
        );
        assert_eq!(
            get(&w.url, &current)["m.room.topic"][""],
            e["event_id"],
            "the worker's current state after write #{i}"
        );
    }
    drop(w);
    drop(main);
    storage_events::testing::assert_invariants(&db.open_mode(storage_core::OpenMode::ReadOnly));
}

storage_core::engine_tests!(http_contract);

/// An event whose `room_id` is not the path's room is refused 400 for that,
/// before anything about either room: whether the path's room or the
/// event's is known or not (Synapse: "Room ID in body does not match that in
/// request path" before it looks the room up). It answered 404 "unknown
/// room" when the event's room was unknown. `room` is [`ROOM`], founded.
fn room_mismatch_refused_first(url: &str, room: &Room) {
    let unknown = "!nowhere:example.com";
    let other_unknown = "!elsewhere:example.com";
    for (what, path_room, event_room) in [
        ("to a known room, of an unknown one", ROOM, unknown),
        ("to an unknown room, of a known one", unknown, ROOM),
        (
            "to an unknown room, of another unknown one",
            unknown,
            other_unknown,
        ),
    ] {
        let mut e = room.clone().event(
            "astray",
            "m.room.message",
            ALICE,
            None,
            json!({"body": "?"}),
        );
        e["room_id"] = json!(event_room);
        let answer = post_to(url, path_room, vec![e]).unwrap_err();
        let (code, body) = answer.split_once(": ").unwrap();
        assert_eq!(code, "400", "{url}, {what}: {answer}");
        let error: Value = serde_json::from_str(body).unwrap();
        assert_eq!(error["errcode"], "M_BAD_JSON", "{url}, {what}: {answer}");
        let text = error["error"].as_str().unwrap();
        assert!(
            text.contains(&format!("in room {event_room}, not {path_room}")),
            "{url}, {what}: {answer}"
        );
    }
}

/// The HTTP contract's rules: the token, the error format, health and metrics
/// without a token, and no start on a non-loopback address without a token.
fn http_contract(db: &TestDb) {
    let port = free_port();
    let main = main_process(db, port);
    let call = |method: &str, path: &str, token: Option<&str>, body: Option<&str>| {
        let mut r = ureq::request(method, &format!("{}{path}", main.url));
        if let Some(t) = token {
            r = r.set("Authorization", &format!("Bearer {t}"));
        }
        let result = match body {
            Some(b) => r.set("Content-Type", "application/json").send_string(b),
            None => r.call(),
        };
        match result {
            Ok(resp) => (resp.status(), resp.into_string().unwrap()),
            Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap()),
            Err(e) => panic!("{method} {path}: {e}"),
        }
    };
    let (code, text) = call("GET", "/_hs/v1/health", None, None);
    assert_eq!(code, 200, "{text}");
    let health: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(health, json!({"ok": true, "database": "ok"}));
    let (code, text) = call("GET", "/metrics", None, None);
    assert_eq!(code, 200);
    assert!(text.contains("hs_cache_hits_total"), "{text}");
    let room_path = format!("/_hs/v1/rooms/{}/state", encode(ROOM));
    assert_eq!(call("GET", &room_path, None, None).0, 401);
    assert_eq!(call("GET", &room_path, Some("wrong"), None).0, 401);
    let (code, text) = call("GET", &room_path, Some(TOKEN), None);
    assert_eq!(code, 404, "{text}");
    let error: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(error["errcode"], "M_NOT_FOUND");
    assert!(error["error"].as_str().unwrap().contains(ROOM));
    let events_path = format!("/_hs/v1/rooms/{}/events", encode(ROOM));
    // An id holding a NUL names nothing, on both engines: PostgreSQL's text
    // cannot hold one, and asking it for one answered 500.
    let nul_room = "!a\0b:example.com";
    for (what, method, path, body) in [
        (
            "a room",
            "GET",
            format!("/_hs/v1/rooms/{}/state", encode(nul_room)),
            None,
        ),
        (
            "an event",
            "GET",
            format!("{room_path}?at={}", encode("$a\0b")),
            None,
        ),
        (
            "a room written to",
            "POST",
            format!("/_hs/v1/rooms/{}/events", encode(nul_room)),
            Some(r#"{"events": []}"#),
        ),
    ] {
        let (code, text) = call(method, &path, Some(TOKEN), body);
        assert_eq!(code, 404, "{what} with a NUL: {text}");
        let error: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(error["errcode"], "M_NOT_FOUND", "{what} with a NUL: {text}");
    }
    let (code, text) = call("POST", &events_path, Some(TOKEN), Some("{not json"));
    assert_eq!(code, 400, "{text}");
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["errcode"],
        "M_BAD_JSON"
    );
    let (code, _) = call(
        "POST",
        &events_path,
        Some(TOKEN),
        Some(r#"{"events": [{"type": "m.room.message"}]}"#),
    );
    assert_eq!(code, 400);
    // Every error is in the contract's format, also those no handler makes; an
    // unknown path under /_hs/v1/ still needs the token first.
    let json_error = |(code, text): (u16, String)| {
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{code} {text:?}: {e}"));
        (
            code,
            v["errcode"].as_str().unwrap().to_owned(),
            v["error"].as_str().unwrap().to_owned(),
        )
    };
    assert_eq!(json_error(call("GET", "/_hs/v1/nope", None, None)).0, 401);
    let (code, errcode, error) = json_error(call("GET", "/_hs/v1/nope", Some(TOKEN), None));
    assert_eq!((code, errcode.as_str()), (404, "M_UNRECOGNIZED"));
    assert!(error.contains("/_hs/v1/nope"), "{error}");
    assert_eq!(
        json_error(call("GET", "/nope", None, None)).1,
        "M_UNRECOGNIZED"
    );
    let (code, errcode, _) = json_error(call("PUT", &events_path, Some(TOKEN), Some("{}")));
    assert_eq!((code, errcode.as_str()), (405, "M_UNRECOGNIZED"));
    assert_eq!(call("PUT", &events_path, None, Some("{}")).0, 401);
    // A body announced as 9 MiB is refused from its headers alone; sent by
    // hand, since the server answers (and closes) before a client could finish
    // writing such a body.
    let post_announcing = |length: usize, token: &str| {
        use std::io::{Read, Write};
        let mut stream =
            std::net::TcpStream::connect(main.url.trim_start_matches("http://")).unwrap();
        write!(
            stream,
            "POST {events_path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        let code: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
        (code, body.to_owned())
    };
    // The token rule comes first, even for a body too large.
    assert_eq!(post_announcing(9 << 20, "wrong").0, 401);
    let (code, errcode, error) = json_error(post_announcing(9 << 20, TOKEN));
    assert_eq!((code, errcode.as_str()), (413, "M_TOO_LARGE"), "{error}");
    assert!(error.contains("8 MiB"), "{error}");

    let (code, text) = call("GET", "/_hs/v1/stream/position", Some(TOKEN), None);
    assert_eq!((code, text), (200, r#"{"events":0}"#.to_owned()));

    // Contexts computed elsewhere are checked before they are persisted as they are.
    let mut room = Room::default();
    let create = room.event(
        "create",
        "m.room.create",
        ALICE,
        Some(""),
        json!({"creator": ALICE, "room_version": "2"}),
    );
    post(&main.url, vec![create]).unwrap();
    room_mismatch_refused_first(&main.url, &room);
    let group = {
        use diesel::prelude::*;
        #[derive(QueryableByName)]
        struct Id {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            id: i64,
        }
        storage_core::with_conn!(&mut db.raw_connection(), |c| diesel::sql_query(
            "SELECT MAX(id) AS id FROM state_groups"
        )
        .get_result::<Id>(c))
        .unwrap()
        .id
    };
    let message = room.event("m", "m.room.message", ALICE, None, json!({"body": "hi"}));
    let contexted = |pdu: &Value, outlier: bool, before: Option<i64>, after: Option<i64>| {
        json!({"events": [{
            "room_version": "2", "pdu": pdu.to_string(), "outlier": outlier,
            "state_group_before": before, "state_group_after": after, "rejected": null,
        }]})
        .to_string()
    };
    let internal = |room_id: &str| format!("/_hs/v1/internal/rooms/{}/events", encode(room_id));
    let mut elsewhere = message.clone();
    elsewhere["room_id"] = json!("!elsewhere:example.com");
    for (what, path, body, expected) in [
        (
            "unknown group",
            internal(ROOM),
            contexted(&message, false, Some(group), Some(group + 1000)),
            format!("state group {}, which does not exist", group + 1000),
        ),
        (
            "another room's group",
            internal("!elsewhere:example.com"),
            contexted(&elsewhere, false, Some(group), Some(group)),
            format!("state group {group}, which belongs to room {ROOM}"),
        ),
        (
            "outlier with state",
            internal(ROOM),
            contexted(&message, true, None, Some(group)),
            "is an outlier but its context names state groups".to_owned(),
        ),
        (
            "no group after",
            internal(ROOM),
            contexted(&message, false, Some(group), None),
            "has no state group after it".to_owned(),
        ),
    ] {
        let (code, text) = call("POST", &path, Some(TOKEN), Some(&body));
        assert_eq!(code, 400, "{what}: {text}");
        assert!(text.contains(&expected), "{what}: {text}");
        assert!(text.contains("$m:example.com"), "{what}: {text}");
    }
    // None of them was stored; the same event with a good context is.
    let at = format!("/_hs/v1/rooms/{}/state?at=%24m%3Aexample.com", encode(ROOM));
    assert_eq!(call("GET", &at, Some(TOKEN), None).0, 404);
    let (code, text) = call(
        "POST",
        &internal(ROOM),
        Some(TOKEN),
        Some(&contexted(&message, false, Some(group), Some(group))),
    );
    assert_eq!(code, 200, "{text}");
    assert_eq!(
        get(&main.url, &at)["m.room.create"][""],
        "$create:example.com"
    );

    // No token, not loopback: refused before listening.
    let out = hs_main_command()
        .args(["--database", db.url(), "serve", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("HS_API_TOKEN"));

    // One main process per database: an import beside the running server is
    // refused, with nothing written.
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/example-room.jsonl");
    let out = hs_main_command()
        .args(["--database", db.url(), "import"])
        .arg(&fixture)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("claimed by another main process"),
        "{stderr}"
    );
    let example = "/_hs/v1/rooms/%21example%3Aexample.org/state";
    assert_eq!(call("GET", example, Some(TOKEN), None).0, 404);

    // SIGTERM, as a service manager sends it: a clean stop with status 0.
    let main_url = main.url.clone();
    let mut main = main;
    let kill = Command::new("kill")
        .args(["-TERM", &main.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = main.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "hs-main ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "hs-main after SIGTERM: {status}");
    // Stopped, it has let go: the import runs.
    hs_main_ok(db.url(), &["import", fixture.to_str().unwrap()]);
    assert_invariants(db);

    if db.engine() != "sqlite" {
        return;
    }
    // A worker refuses SQLite, which one process writes.
    let out = Command::new(binary("hs-worker"))
        .args(["--database", db.url(), "--main", &main_url])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs PostgreSQL"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A --main that is no HTTP URL is refused before anything else.
    let out = Command::new(binary("hs-worker"))
        .args(["--database", db.url(), "--main", "127.0.0.1:8008"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--main \"127.0.0.1:8008\""), "{stderr}");
}
