//! Helpers for the end-to-end tests and benchmarks: the workspace binaries run
//! as processes, an HTTP client for their API, and a builder of room events.

pub mod forks;
mod pg_proxy;

pub use pg_proxy::PgProxy;

use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use storage_core::testing::TestDb;
use storage_core::{with_conn, Database, DatabaseConfig, OpenMode};

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
    main_process_with(db, port, &[])
}

/// [`main_process`] with `global` arguments before the command
/// (`--log-format json`, `-v`, `--config FILE`).
pub fn main_process_with(db: &TestDb, port: u16, global: &[&str]) -> Process {
    let mut args: Vec<String> = global.iter().map(|s| s.to_string()).collect();
    args.extend([
        "--database".into(),
        db.url().into(),
        "serve".into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
    ]);
    start("hs-main", &args, port)
}

/// `hs-main serve --read-only` on the database at `url`, on a free port.
pub fn read_only_server(url: &str) -> Process {
    let port = free_port();
    let args = [
        "--database".into(),
        url.into(),
        "serve".into(),
        "--read-only".into(),
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

/// A room or event id percent-encoded for a request path or query, as
/// hs-worker encodes it.
pub fn encode(s: &str) -> String {
    storage_core::config::percent_encode(s)
}

/// Posts events to [`ROOM`]; an error answer reads "<status>: <body>".
pub fn post(url: &str, events: Vec<Value>) -> Result<Value, String> {
    post_to(url, ROOM, events)
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

/// The `i`th member of the rooms tests build: `@u<i>:example.com`.
pub fn member(i: usize) -> String {
    format!("@u{i}:example.com")
}

impl Room {
    /// [`member`] `i` joins (the room's join rules must let them); the event's
    /// id is `$join<i>:example.com`.
    pub fn join(&mut self, i: usize) -> Value {
        let user = member(i);
        self.event(
            &format!("join{i}"),
            "m.room.member",
            &user,
            Some(&user),
            json!({"membership": "join"}),
        )
    }

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

/// The workspace's `hs-main`, with none of the environment that would point it
/// elsewhere than its arguments say (`HS_DATABASE`, `HS_CONFIG`,
/// `HS_API_TOKEN`): the one way every test runs it. Add arguments and run.
pub fn hs_main_command() -> Command {
    let mut command = Command::new(binary("hs-main"));
    command
        .env_remove("HS_DATABASE")
        .env_remove("HS_CONFIG")
        .env_remove("HS_API_TOKEN");
    command
}

/// Runs `hs-main ARGS...` to completion.
pub fn hs_main_output(args: &[&str]) -> std::process::Output {
    hs_main_command()
        .args(args)
        .output()
        .expect("running hs-main")
}

/// Runs `hs-main --database <url> ARGS...` to completion.
pub fn hs_main_at(url: &str, args: &[&str]) -> std::process::Output {
    hs_main_command()
        .args(["--database", url])
        .args(args)
        .output()
        .expect("running hs-main")
}

/// Runs `hs-main --database <url> ARGS...` to completion and returns its
/// stdout; panics with stdout and stderr when it fails.
pub fn hs_main_ok(url: &str, args: &[&str]) -> String {
    let out = hs_main_at(url, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "hs-main {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A state store over `db` opened read-only, with empty caches: what it reads
/// comes from the rows (and a read-only open writes nothing).
pub fn cold_state_store(db: &TestDb) -> storage_state::StateStore {
    storage_state::StateStore::new(
        db.open_mode(OpenMode::ReadOnly),
        &storage_core::StoreConfig::default(),
    )
    .expect("a read-only state store")
}

/// An output as (status, stdout, stderr); -1 for a process killed by a signal.
pub fn status_and_text(out: std::process::Output) -> (i32, String, String) {
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `hs-main --database <db> ARGS...` to completion: (status, stdout, stderr).
pub fn hs_main(db: &TestDb, args: &[&str]) -> (i32, String, String) {
    status_and_text(hs_main_at(db.url(), args))
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
    use storage_state::{StateFilter, StateGroupAccess, StateStore};
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
    let sorted = |m: &storage_state::StateMap| {
        m.iter()
            .map(|((t, k), v)| ((t.to_string(), k.to_string()), v.to_string()))
            .collect()
    };
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

/// Posts the room's founding events; returns the room and their ids.
pub fn founded_room(url: &str) -> (Room, Vec<String>) {
    let mut room = Room::default();
    let events = room.founding("");
    let mut ids = vec![];
    for e in events {
        post(url, vec![e.clone()]).unwrap();
        ids.push(id_of(&e));
    }
    (room, ids)
}

/// The `event_id` of an event's JSON.
pub fn id_of(e: &Value) -> String {
    e["event_id"].as_str().unwrap().to_owned()
}

/// A topic change named `name` by Alice: a state event, so that the room's
/// current state moves with every one.
pub fn message(room: &mut Room, name: &str) -> Value {
    room.event(
        name,
        "m.room.topic",
        ALICE,
        Some(""),
        json!({"topic": name}),
    )
}

/// A client posting one event at a time, without pause, until told to stop
/// or the server stops acknowledging.
#[derive(Debug)]
pub struct Poster {
    pub acknowledged: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(Room, Option<String>)>,
}

impl Poster {
    pub fn start(url: &str, mut room: Room, prefix: &str) -> Poster {
        let acknowledged = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (acknowledged, stop, url, prefix) = (
                acknowledged.clone(),
                stop.clone(),
                url.to_owned(),
                prefix.to_owned(),
            );
            std::thread::spawn(move || {
                for i in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        return (room, None);
                    }
                    // The room as of the last acknowledged event, handed back.
                    let before = room.clone();
                    let e = message(&mut room, &format!("{prefix}{i}"));
                    match post(&url, vec![e.clone()]) {
                        Ok(_) => acknowledged.lock().unwrap().push(id_of(&e)),
                        Err(err) => return (before, Some(err)),
                    }
                }
                unreachable!()
            })
        };
        Poster {
            acknowledged,
            stop,
            thread,
        }
    }

    pub fn wait_for(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.acknowledged.lock().unwrap().len() < n {
            assert!(
                Instant::now() < deadline,
                "fewer than {n} events acknowledged"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops (if it has not already); the room, the acknowledged ids and the
    /// error that stopped it, if any.
    pub fn finish(self) -> (Room, Vec<String>, Option<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let (room, err) = self.thread.join().unwrap();
        let acknowledged = self.acknowledged.lock().unwrap().clone();
        (room, acknowledged, err)
    }
}

/// Waits (up to 40 s) for the process to exit; its status.
pub fn wait_for_exit(p: &mut Process) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the process did not stop:\n{}",
            p.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The ids of the events stored in the database, read without claiming it.
pub fn stored_events(url: &str) -> HashSet<String> {
    try_stored_events(url).unwrap()
}

/// The same, or the error while there is no database to read yet.
pub fn try_stored_events(url: &str) -> storage_core::Result<HashSet<String>> {
    use diesel::prelude::*;
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = diesel::sql_types::Text)]
        event_id: String,
    }
    let db = Database::open(DatabaseConfig::parse(url, OpenMode::ReadOnly)?)?;
    db.run_read("stored_events", |txn| {
        let ids: Vec<Id> = with_conn!(txn.conn(), |c| diesel::sql_query(
            "SELECT event_id FROM events"
        )
        .load(c))?;
        Ok(ids.into_iter().map(|i| i.event_id).collect())
    })
}

/// Fails the test naming every id of `acknowledged` not stored at `url`.
pub fn assert_all_stored(url: &str, acknowledged: &[String]) {
    let stored = stored_events(url);
    let missing: Vec<&String> = acknowledged
        .iter()
        .filter(|id| !stored.contains(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not stored: {missing:?}"
    );
}

/// A new folder under the system's temporary one, unique to this test process.
pub fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "hs-e2e-{name}-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Removes its folder when dropped.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The number `sql` (one row, one BIGINT column `n`) reads from the database
/// at `url`, opened read-only; an error while there is no database (or table)
/// to read yet.
pub fn try_count(url: &str, sql: &str) -> storage_core::Result<i64> {
    use diesel::prelude::*;
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let db = Database::open(DatabaseConfig::parse(url, OpenMode::ReadOnly)?)?;
    db.run_read("count", |txn| {
        let row: N = with_conn!(txn.conn(), |c| diesel::sql_query(sql).get_result(c))?;
        Ok(row.n)
    })
}

/// Polls `sql` (as [`try_count`]) at `url` until it reads at least `n`, or
/// `child` exits first; whether it got there while `child` still ran. For
/// killing a process at a point of its work without sleeping.
pub fn wait_for_count(url: &str, sql: &str, n: i64, child: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if try_count(url, sql).is_ok_and(|c| c >= n) {
            return child.try_wait().unwrap().is_none();
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        assert!(Instant::now() < deadline, "{sql} never reached {n}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `hs-main --database <db> ARGS...` in the background, its output
/// discarded: a process to kill part-way.
pub fn spawn_hs_main(db: &TestDb, args: &[&str]) -> Child {
    hs_main_command()
        .arg("--database")
        .arg(db.url())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting hs-main")
}

/// kill -9, and waits for the process to be gone.
pub fn kill_9(child: &mut Child) {
    // Child::kill sends SIGKILL on Unix.
    let _ = child.kill();
    child.wait().unwrap();
}

/// A database of the other engine than `db`'s (a port's target); `None`
/// where no PostgreSQL test server is configured.
pub fn other_engine(db: &TestDb) -> Option<TestDb> {
    match db.engine() {
        "sqlite" => TestDb::postgres(),
        _ => Some(TestDb::sqlite()),
    }
}

/// Asserts the storage invariants (`storage_events::check_invariants`) of
/// the database, opened read-only.
pub fn assert_invariants(db: &TestDb) {
    storage_events::testing::assert_invariants(&db.open_mode(OpenMode::ReadOnly));
}

/// A room of `n` events (its founding four, then topic changes) as import
/// lines; the ids in order.
pub fn room_lines(n: usize) -> (Vec<String>, String) {
    let mut room = Room::default();
    let mut events = room.founding("");
    for i in events.len()..n {
        events.push(message(&mut room, &format!("topic{i}")));
    }
    (
        events.iter().map(id_of).collect(),
        events.iter().map(|e| format!("{e}\n")).collect(),
    )
}

/// Everything an operator could see change in the database of `db`: on
/// SQLite every file in its folder, byte for byte; on PostgreSQL its
/// relations, its settings and every row of `tables`. Sorted, to compare a
/// before with an after.
pub fn database_snapshot(db: &TestDb, tables: &[&str]) -> Vec<String> {
    if let Some(path) = db.url().strip_prefix("sqlite:") {
        let dir = std::path::Path::new(path).parent().unwrap();
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let bytes = std::fs::read(e.path()).unwrap();
                format!(
                    "{} {:x}",
                    e.file_name().to_string_lossy(),
                    fingerprint(&bytes)
                )
            })
            .collect();
        files.sort();
        return files;
    }
    let mut seen = query_lines(
        db,
        "SELECT c.relname || ' ' || CAST(c.relkind AS TEXT) AS line FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') \
         AND n.nspname NOT LIKE 'pg_toast%'",
    );
    seen.extend(query_lines(
        db,
        "SELECT COALESCE(array_to_string(setconfig, ','), '') AS line FROM pg_db_role_setting \
         WHERE setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())",
    ));
    for table in tables {
        seen.extend(query_lines(
            db,
            &format!("SELECT '{table} ' || CAST(t.* AS TEXT) AS line FROM {table} t"),
        ));
    }
    seen.sort();
    seen
}

fn fingerprint(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// The column `line` (text) of every row `sql` reads, through a raw
/// connection to `db`.
pub fn query_lines(db: &TestDb, sql: &str) -> Vec<String> {
    use diesel::prelude::*;
    #[derive(QueryableByName)]
    struct Line {
        #[diesel(sql_type = diesel::sql_types::Text)]
        line: String,
    }
    let mut raw = db.raw_connection();
    let rows: Vec<Line> = with_conn!(&mut raw, |c| diesel::sql_query(sql).load(c))
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.into_iter().map(|r| r.line).collect()
}
