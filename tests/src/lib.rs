//! Helpers for the end-to-end tests and benchmarks: the workspace binaries run
//! as processes, an HTTP client for their API, and a builder of room events.

pub mod forks;
mod pg_proxy;

pub use pg_proxy::PgProxy;

use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use storage_core::testing::TestDb;

pub const TOKEN: &str = "e2e-secret";
pub const ROOM: &str = "!e2e:example.com";
pub const ALICE: &str = "@alice:example.com";

pub fn binary(name: &str) -> PathBuf {
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

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running binary; killed when dropped. Its log goes to a file that is shown
/// when the test fails, and removed.
#[derive(Debug)]
pub struct Process {
    pub child: Child,
    pub url: String,
    log: PathBuf,
}

impl Process {
    /// What the process has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- last lines logged by the process on {} ---", self.url);
            for line in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{line}");
            }
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

pub fn start(program: &str, args: &[String], port: u16) -> Process {
    let log = std::env::temp_dir().join(format!(
        "hs-e2e-{}-{program}-{port}.log",
        std::process::id()
    ));
    let child = Command::new(binary(program))
        .args(args)
        .env("HS_API_TOKEN", TOKEN)
        .env_remove("HS_DATABASE")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
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
    Process { child, url, log }
}

pub fn main_process(db: &TestDb, port: u16) -> Process {
    let args = vec![
        "--database".into(),
        db.url().into(),
        "serve".into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
    ];
    start("hs-main", &args, port)
}

pub fn worker(db: &TestDb, main: &str, port: u16, name: &str) -> Process {
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

pub fn encode(s: &str) -> String {
    s.replace('!', "%21")
        .replace(':', "%3A")
        .replace('$', "%24")
        .replace('@', "%40")
}

/// Posts events; an error answer reads "<status>: <body>".
pub fn post(url: &str, events: Vec<Value>) -> Result<Value, String> {
    ureq::post(&format!("{url}/_hs/v1/rooms/{}/events", encode(ROOM)))
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .send_json(json!({ "events": events }))
        .map_err(|e| match e {
            ureq::Error::Status(code, answer) => {
                format!("{code}: {}", answer.into_string().unwrap_or_default())
            }
            e => e.to_string(),
        })?
        .into_json()
        .map_err(|e| e.to_string())
}

pub fn get(url: &str, path: &str) -> Value {
    ureq::get(&format!("{url}{path}"))
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .call()
        .unwrap_or_else(|e| panic!("GET {url}{path}: {e}"))
        .into_json()
        .unwrap()
}

/// Room version 2 events (ids in the JSON): easy to chain from a test.
#[derive(Debug, Default, Clone)]
pub struct Room {
    depth: i64,
    last: Option<String>,
    create: String,
    power: String,
    rules: String,
    joins: std::collections::HashMap<String, String>,
}

impl Room {
    pub fn event(
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

impl Room {
    /// The room's first events: its create event (room version 2), Alice's
    /// join, power levels giving her 100, public join rules; ids
    /// `$<prefix>create`, `$<prefix>alice`, `$<prefix>power`, `$<prefix>rules`.
    pub fn founding(&mut self, prefix: &str) -> Vec<Value> {
        vec![
            self.event(
                &format!("{prefix}create"),
                "m.room.create",
                ALICE,
                Some(""),
                json!({"creator": ALICE, "room_version": "2"}),
            ),
            self.event(
                &format!("{prefix}alice"),
                "m.room.member",
                ALICE,
                Some(ALICE),
                json!({"membership": "join"}),
            ),
            self.event(
                &format!("{prefix}power"),
                "m.room.power_levels",
                ALICE,
                Some(""),
                json!({"users": {ALICE: 100}}),
            ),
            self.event(
                &format!("{prefix}rules"),
                "m.room.join_rules",
                ALICE,
                Some(""),
                json!({"join_rule": "public"}),
            ),
        ]
    }
}

pub fn wait_for_position(process: &Process, target: i64) {
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

/// Posts events to `room`; an error answer reads "<status>: <body>".
pub fn post_to(url: &str, room: &str, events: Vec<Value>) -> Result<Value, String> {
    ureq::post(&format!("{url}/_hs/v1/rooms/{}/events", encode(room)))
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .send_json(json!({ "events": events }))
        .map_err(|e| match e {
            ureq::Error::Status(code, answer) => {
                format!("{code}: {}", answer.into_string().unwrap_or_default())
            }
            e => e.to_string(),
        })?
        .into_json()
        .map_err(|e| e.to_string())
}

/// Runs `hs-main --database <db> ARGS...` to completion: (status, stdout, stderr).
pub fn hs_main(db: &TestDb, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary("hs-main"))
        .arg("--database")
        .arg(db.url())
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

/// What a database says of each event: the state after it (sorted), and
/// whether it was rejected. Read through the library, in one pass.
pub type EventStates = std::collections::BTreeMap<
    String,
    (std::collections::BTreeMap<(String, String), String>, bool),
>;

/// [`EventStates`] of `event_ids`, plus each room's current state under the
/// key `current <room>`.
pub fn event_states(db: &TestDb, event_ids: &[&str], rooms: &[&str]) -> EventStates {
    use storage_state::{StateFilter, StateGroupStore, StateStore};
    let database = db.open_mode(storage_core::OpenMode::ReadOnly);
    let store = StateStore::new(database.clone(), &storage_core::StoreConfig::default()).unwrap();
    let groups = store.get_state_group_for_events(event_ids).unwrap();
    let distinct: Vec<i64> = {
        let mut g: Vec<i64> = groups.values().copied().collect();
        g.sort();
        g.dedup();
        g
    };
    let states = store
        .get_state_for_groups(&distinct, &StateFilter::all())
        .unwrap();
    let rejected: std::collections::HashSet<String> = {
        use diesel::prelude::*;
        use storage_events::schema::rejections as r;
        storage_core::with_conn!(&mut db.raw_connection(), |c| r::table
            .select(r::event_id)
            .load::<String>(c))
        .unwrap()
        .into_iter()
        .collect()
    };
    let sorted =
        |m: &storage_state::StateMap| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let mut out: EventStates = event_ids
        .iter()
        .map(|id| {
            let state = groups
                .get(*id)
                .map(|g| sorted(&states[g]))
                .unwrap_or_default();
            (id.to_string(), (state, rejected.contains(*id)))
        })
        .collect();
    for room in rooms {
        let current = store.get_current_state_ids(room).unwrap();
        out.insert(format!("current {room}"), (sorted(&current), false));
    }
    out
}
