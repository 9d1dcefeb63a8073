//! One main process and two workers as separate OS processes on a real
//! PostgreSQL: events posted alternately to all three; afterwards every process
//! answers the same state for every event, and each worker's stream position
//! reaches the main's. A worker killed and restarted catches up; the main
//! process killed mid-stream loses no acknowledged event.
//!
//! The binaries are the workspace's `hs-main` and `hs-worker` next to this test
//! executable (`cargo xtask test` builds them first).

use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use storage_core::testing::TestDb;

const TOKEN: &str = "e2e-secret";
const ROOM: &str = "!e2e:example.com";
const ALICE: &str = "@alice:example.com";

fn binary(name: &str) -> PathBuf {
    let dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (cargo build --bins)",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Process {
    child: Child,
    url: String,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(program: &str, args: &[String], port: u16) -> Process {
    let child = Command::new(binary(program))
        .args(args)
        .env("HS_API_TOKEN", TOKEN)
        .env_remove("HS_DATABASE")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while ureq::get(&format!("{url}/_hs/v1/health")).call().is_err() {
        assert!(
            Instant::now() < deadline,
            "{program} did not come up on {url}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Process { child, url }
}

fn main_process(db: &TestDb, port: u16) -> Process {
    let args = vec![
        "--database".into(),
        db.url().into(),
        "serve".into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
    ];
    start("hs-main", &args, port)
}

fn worker(db: &TestDb, main: &str, port: u16, name: &str) -> Process {
    let args = vec![
        "--database".into(),
        db.url().into(),
        "--main".into(),
        main.into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--name".into(),
        name.into(),
    ];
    start("hs-worker", &args, port)
}

fn encode(s: &str) -> String {
    s.replace('!', "%21")
        .replace(':', "%3A")
        .replace('$', "%24")
        .replace('@', "%40")
}

fn post(url: &str, events: Vec<Value>) -> Result<Value, String> {
    ureq::post(&format!("{url}/_hs/v1/rooms/{}/events", encode(ROOM)))
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .send_json(json!({ "events": events }))
        .map_err(|e| e.to_string())?
        .into_json()
        .map_err(|e| e.to_string())
}

fn get(url: &str, path: &str) -> Value {
    ureq::get(&format!("{url}{path}"))
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .call()
        .unwrap_or_else(|e| panic!("GET {url}{path}: {e}"))
        .into_json()
        .unwrap()
}

/// Room version 2 events (ids in the JSON): easy to chain from a test.
struct Room {
    depth: i64,
    last: Option<String>,
    create: String,
    power: String,
    rules: String,
    joins: std::collections::HashMap<String, String>,
}

impl Room {
    fn event(
        &mut self,
        id: &str,
        kind: &str,
        sender: &str,
        state_key: Option<&str>,
        content: Value,
    ) -> Value {
        let id = format!("${id}:example.com");
        let mut auth = vec![];
        if kind != "m.room.create" {
            auth.push(self.create.clone());
            if !self.power.is_empty() {
                auth.push(self.power.clone());
            }
            if let Some(j) = self.joins.get(sender) {
                auth.push(j.clone());
            } else if kind == "m.room.member" && !self.rules.is_empty() {
                auth.push(self.rules.clone());
            }
        }
        self.depth += 1;
        let r = |i: &String| json!([i, {"sha256": "aGFzaA"}]);
        let mut e = json!({
            "event_id": id, "room_id": ROOM, "sender": sender, "type": kind, "content": content,
            "prev_events": self.last.iter().map(r).collect::<Vec<_>>(),
            "auth_events": auth.iter().map(r).collect::<Vec<_>>(),
            "depth": self.depth, "origin_server_ts": 1_000 + self.depth, "origin": "example.com",
            "hashes": {"sha256": "aGFzaA"}, "signatures": {},
        });
        if let Some(k) = state_key {
            e["state_key"] = json!(k);
        }
        match kind {
            "m.room.create" => self.create = id.clone(),
            "m.room.power_levels" => self.power = id.clone(),
            "m.room.join_rules" => self.rules = id.clone(),
            "m.room.member" => {
                self.joins.insert(sender.to_owned(), id.clone());
            }
            _ => {}
        }
        self.last = Some(id);
        e
    }
}

fn wait_for_position(process: &Process, target: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let p = get(&process.url, "/_hs/v1/stream/position")["events"]
            .as_i64()
            .unwrap();
        if p >= target {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} stuck at position {p}, main at {target}",
            process.url
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn main_and_two_workers_agree() {
    let Some(db) = TestDb::postgres() else { return };
    let main_port = free_port();
    let main = main_process(&db, main_port);
    let w1 = worker(&db, &main.url, free_port(), "w1");
    let w2_port = free_port();
    let mut w2 = worker(&db, &main.url, w2_port, "w2");

    let mut room = Room {
        depth: 0,
        last: None,
        create: String::new(),
        power: String::new(),
        rules: String::new(),
        joins: Default::default(),
    };
    let mut ids = vec![];
    let mut script = vec![
        room.event(
            "create",
            "m.room.create",
            ALICE,
            Some(""),
            json!({"creator": ALICE, "room_version": "2"}),
        ),
        room.event(
            "alice",
            "m.room.member",
            ALICE,
            Some(ALICE),
            json!({"membership": "join"}),
        ),
        room.event(
            "power",
            "m.room.power_levels",
            ALICE,
            Some(""),
            json!({"users": {ALICE: 100}}),
        ),
        room.event(
            "rules",
            "m.room.join_rules",
            ALICE,
            Some(""),
            json!({"join_rule": "public"}),
        ),
    ];
    for i in 0..12 {
        let user = format!("@u{i}:example.com");
        script.push(room.event(
            &format!("join{i}"),
            "m.room.member",
            &user,
            Some(&user),
            json!({"membership": "join"}),
        ));
        script.push(room.event(
            &format!("msg{i}"),
            "m.room.message",
            &user,
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

    // A worker killed and restarted catches up.
    drop(w2);
    for i in 0..4 {
        let e = room.event(
            &format!("late{i}"),
            "m.room.topic",
            ALICE,
            Some(""),
            json!({"topic": format!("late{i}")}),
        );
        last_position = post(if i % 2 == 0 { &main.url } else { &w1.url }, vec![e]).unwrap()
            ["stream_ordering"]
            .as_i64()
            .unwrap();
    }
    w2 = worker(&db, &main.url, w2_port, "w2");
    wait_for_position(&w2, last_position);
    let want = get(&main.url, &current);
    assert_eq!(want["m.room.topic"][""], "$late3:example.com");
    assert_eq!(get(&w2.url, &current), want);
    assert_eq!(get(&w1.url, &current), want);
    drop(w2);
    drop(w1);

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
                    Err(_) => return,
                }
            }
        })
    };
    while acknowledged.lock().unwrap().len() < 20 {
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut main = main;
    main.child.kill().unwrap();
    main.child.wait().unwrap();
    poster.join().unwrap();
    drop(main);
    let main = main_process(&db, main_port);
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
}

/// The HTTP contract's rules: the token, the error format, health and metrics
/// without a token, and no start on a non-loopback address without a token.
#[test]
fn http_contract() {
    let db = TestDb::sqlite();
    let port = free_port();
    let main = main_process(&db, port);
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
    assert_eq!(
        call("GET", "/_hs/v1/health", None, None),
        (200, r#"{"ok":true}"#.to_owned())
    );
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
    let (code, text) = call("GET", "/_hs/v1/stream/position", Some(TOKEN), None);
    assert_eq!((code, text), (200, r#"{"events":0}"#.to_owned()));

    // No token, not loopback: refused before listening. A worker refuses SQLite.
    let out = Command::new(binary("hs-main"))
        .args(["--database", db.url(), "serve", "--listen", "0.0.0.0:0"])
        .env_remove("HS_API_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("HS_API_TOKEN"));
    let out = Command::new(binary("hs-worker"))
        .args(["--database", db.url(), "--main", &main.url])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs PostgreSQL"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
