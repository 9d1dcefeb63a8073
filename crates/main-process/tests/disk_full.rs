//! A database whose disk fills up while the main process writes: SQLite's
//! file, or PostgreSQL's tables and indexes (a tablespace), on a small tmpfs,
//! a real file system that runs out of room, filled by a ballast file and
//! given room again by removing it.
//!
//! Through `hs-main serve`, the main process's pipeline and `hs-main import`:
//! the write that finds no room is told so (out of space, answered 507
//! `M_RESOURCE_LIMIT_EXCEEDED` and logged once), nothing acknowledged before
//! is lost, nothing of the failed write is left on disk or in the writer's
//! memory (prepared groups, forward extremities, current state, stream
//! position), and the same write works once there is room, without a restart.
//!
//! Mounting needs root: where it is refused the tests say so and skip, but
//! not under CI, which runs as root.

use diesel::connection::SimpleConnection;
use e2e_tests::{id_of, post, start, Process, Room, ALICE, ROOM};
use event_context::contexts_for;
use persistence::Pipeline;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use storage_core::testing::{TestDb, POSTGRES_URL_VAR};
use storage_core::{Database, DatabaseConfig, OpenMode, StoreConfig};
use storage_events::testing::assert_invariants;
use storage_events::{EventReads, EventsStore};
use storage_state::StateGroupAccess;

/// What every out-of-space error says (docs/http.md).
const OUT_OF_SPACE: &str = "no room left to write";

/// A tmpfs mounted on a new folder; unmounted, and the folder removed, when
/// dropped, whatever happened in between.
struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    /// A tmpfs of `size` (as `mount -o size=` takes it), or `None` where this
    /// process may not mount one (said on stderr; under CI, a failure).
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = e2e_tests::tempdir("small-disk");
        let mounted = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(&dir)
            .output();
        match mounted {
            Ok(out) if out.status.success() => Some(SmallDisk { dir }),
            failed => {
                let _ = std::fs::remove_dir(&dir);
                let why = match failed {
                    Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                    Err(e) => format!("running mount: {e}"),
                };
                assert!(
                    std::env::var_os("CI").is_none(),
                    "CI runs as root and must run this test, but mounting a tmpfs failed: {why}"
                );
                eprintln!("skipped: this process may not mount a tmpfs (not root?): {why}");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        &self.dir
    }

    fn ballast(&self) -> PathBuf {
        self.dir.join("ballast")
    }

    /// Takes every byte left with a ballast file.
    fn fill(&self) {
        let mut file = std::fs::File::create(self.ballast()).unwrap();
        let chunk = vec![0u8; 64 << 10];
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling {}: {e}", self.dir.display()),
            }
        }
    }

    /// Takes every byte left but `room`.
    fn fill_but(&self, room: u64) {
        self.fill();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(self.ballast())
            .unwrap();
        let len = file.metadata().unwrap().len();
        file.set_len(len.saturating_sub(room)).unwrap();
    }

    /// Gives the room back.
    fn free(&self) {
        std::fs::remove_file(self.ballast()).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A PostgreSQL test database whose tables and indexes were moved to a
/// tablespace on a [`SmallDisk`]; the database and then the tablespace are
/// dropped when this is.
struct OnSmallDisk {
    db: Option<TestDb>,
    tablespace: String,
}

impl OnSmallDisk {
    fn new(db: TestDb, disk: &SmallDisk) -> OnSmallDisk {
        drop(db.open()); // migrated: its tables exist
                         // The server's files are its user's: so must the tablespace's folder be.
        let data_directory = text_of(
            &db,
            "SELECT setting AS text FROM pg_settings WHERE name = 'data_directory'",
        );
        let owner = std::fs::metadata(&data_directory).unwrap();
        use std::os::unix::fs::MetadataExt;
        std::os::unix::fs::chown(disk.path(), Some(owner.uid()), Some(owner.gid())).unwrap();
        let tablespace = format!("hs_small_{}", std::process::id());
        let on = OnSmallDisk {
            db: Some(db),
            tablespace,
        };
        let db = on.db.as_ref().unwrap();
        // One statement at a time: CREATE TABLESPACE refuses a transaction.
        for sql in [
            format!(
                "CREATE TABLESPACE {} LOCATION '{}'",
                on.tablespace,
                disk.path().display()
            ),
            format!(
                "ALTER TABLE ALL IN TABLESPACE pg_default SET TABLESPACE {}",
                on.tablespace
            ),
            format!(
                "ALTER INDEX ALL IN TABLESPACE pg_default SET TABLESPACE {}",
                on.tablespace
            ),
        ] {
            execute(db, &sql);
        }
        on
    }

    fn url(&self) -> &str {
        self.db.as_ref().unwrap().url()
    }
}

impl Drop for OnSmallDisk {
    fn drop(&mut self) {
        drop(self.db.take());
        let admin_url = std::env::var(POSTGRES_URL_VAR).unwrap();
        let config = DatabaseConfig::parse(&admin_url, OpenMode::Writer).unwrap();
        if let Ok(mut conn) = storage_core::engine::for_config(&config).connect() {
            let sql = format!("DROP TABLESPACE IF EXISTS {}", self.tablespace);
            let _ = storage_core::with_conn!(&mut conn, |c| c.batch_execute(&sql));
        }
    }
}

fn execute(db: &TestDb, sql: &str) {
    let mut conn = db.raw_connection();
    storage_core::with_conn!(&mut conn, |c| c.batch_execute(sql))
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

fn text_of(db: &TestDb, sql: &str) -> String {
    #[derive(diesel::QueryableByName)]
    struct Text {
        #[diesel(sql_type = diesel::sql_types::Text)]
        text: String,
    }
    use diesel::RunQueryDsl;
    let mut conn = db.raw_connection();
    let row: Text = storage_core::with_conn!(&mut conn, |c| diesel::sql_query(sql).get_result(c))
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    row.text
}

/// 32 KiB of text that no compression shrinks (PostgreSQL compresses a
/// long value that it can): a few hundred events of it fill a megabyte.
fn incompressible(name: &str) -> String {
    use sha2::{Digest, Sha256};
    (0..512)
        .flat_map(|i| Sha256::digest(format!("{name}/{i}")))
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn big_message(room: &mut Room, name: &str) -> serde_json::Value {
    room.event(
        name,
        "m.room.message",
        ALICE,
        None,
        serde_json::json!({"body": incompressible(name), "msgtype": "m.text"}),
    )
}

/// Posts big messages one by one until one is refused, moving `room` past
/// the accepted ones and listing them in `acknowledged`: the refused event,
/// the error, and the room as it is once the refused event is stored.
fn post_until_refused<E>(
    room: &mut Room,
    acknowledged: &mut Vec<String>,
    prefix: &str,
    mut post: impl FnMut(&serde_json::Value) -> Result<(), E>,
) -> (serde_json::Value, E, Room) {
    for i in 0..2_000 {
        let mut next = room.clone();
        let event = big_message(&mut next, &format!("{prefix}{i}"));
        match post(&event) {
            Ok(()) => {
                acknowledged.push(id_of(&event));
                *room = next;
            }
            Err(e) => {
                eprintln!("{prefix}: refused after {i} messages");
                return (event, e, next);
            }
        }
    }
    panic!("{prefix}: the disk never filled up");
}

/// `events` posted in one request to `ROOM`: their contexts, then their batch.
fn persist(pipeline: &Pipeline, events: &[serde_json::Value]) -> storage_core::Result<()> {
    let texts: Vec<String> = events.iter().map(|e| e.to_string()).collect();
    let contexts = contexts_for(&pipeline.builder, ROOM, &texts)?;
    pipeline.persist(ROOM, &contexts).map(drop)
}

/// What the writer remembers of the room agrees with what is stored, and
/// nothing prepared is left waiting.
fn assert_memory_right(pipeline: &Pipeline, db: &Database) {
    let stored = EventsStore::new(db.clone(), &StoreConfig::default()).unwrap();
    let events = pipeline.builder.events();
    assert_eq!(
        events.forward_extremities_for_write(ROOM).unwrap(),
        stored.get_forward_extremities(ROOM).unwrap(),
        "forward extremities"
    );
    assert_eq!(
        events.state().get_current_state_ids(ROOM).unwrap(),
        stored.state().get_current_state_ids(ROOM).unwrap(),
        "current state"
    );
    assert_eq!(
        events.max_stream_ordering(),
        stored.max_stream_ordering(),
        "stream position"
    );
    assert_eq!(
        events.state().prepared_groups_waiting(),
        0,
        "prepared groups"
    );
}

fn assert_stored(db: &Database, acknowledged: &[String], not: &[String]) {
    let stored = EventsStore::new(db.clone(), &StoreConfig::default()).unwrap();
    let ids: Vec<&str> = acknowledged.iter().map(String::as_str).collect();
    assert_eq!(
        stored.have_events(&ids).unwrap().len(),
        acknowledged.len(),
        "every acknowledged event is stored"
    );
    let ids: Vec<&str> = not.iter().map(String::as_str).collect();
    assert!(
        stored.have_events(&ids).unwrap().is_empty(),
        "{not:?} stored"
    );
}

fn serve(url: &str) -> Process {
    let port = e2e_tests::free_port();
    let args: Vec<String> = ["--database", url, "serve", "--listen"]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("127.0.0.1:{port}")])
        .collect();
    start("hs-main", &args, port)
}

/// `worker_db`: the database (PostgreSQL) a worker can follow, to post the
/// refused event through it too.
fn a_full_disk_refuses_writes_keeps_what_was_acknowledged_and_recovers(
    url: &str,
    disk: &SmallDisk,
    worker_db: Option<&TestDb>,
) {
    let open = || Database::open(DatabaseConfig::parse(url, OpenMode::Writer).unwrap()).unwrap();
    let mut room = Room::default();
    let mut acknowledged = Vec::new();

    // `hs-main serve`: 507, logged once, and the same request again once
    // there is room.
    let server = serve(url);
    for e in room.founding("") {
        post(&server.url, vec![e.clone()]).unwrap();
        acknowledged.push(id_of(&e));
    }
    disk.fill();
    let (refused, answer, after) =
        post_until_refused(&mut room, &mut acknowledged, "served", |e| {
            post(&server.url, vec![e.clone()]).map(drop)
        });
    assert!(answer.starts_with("507: "), "{answer}");
    let error: serde_json::Value = serde_json::from_str(&answer["507: ".len()..]).unwrap();
    assert_eq!(error["errcode"], "M_RESOURCE_LIMIT_EXCEEDED", "{answer}");
    assert!(
        error["error"].as_str().unwrap().contains(OUT_OF_SPACE),
        "{answer}"
    );
    // A worker forwarding the write gives the client the same answer.
    if let Some(db) = worker_db {
        let worker = e2e_tests::worker(db, &server.url, e2e_tests::free_port(), "w1");
        let answer = post(&worker.url, vec![refused.clone()]).unwrap_err();
        assert!(answer.starts_with("507: "), "from the worker: {answer}");
        assert!(answer.contains("M_RESOURCE_LIMIT_EXCEEDED"), "{answer}");
        assert!(answer.contains(OUT_OF_SPACE), "{answer}");
    }
    assert_eq!(
        server
            .log_text()
            .lines()
            .filter(|l| l.contains(OUT_OF_SPACE))
            .count(),
        1 + usize::from(worker_db.is_some()),
        "logged once a request:\n{}",
        server.log_text()
    );
    disk.free();
    post(&server.url, vec![refused.clone()]).unwrap();
    acknowledged.push(id_of(&refused));
    room = after;
    drop(server);

    // The pipeline: what it remembers stays right.
    {
        let db = open();
        let pipeline = Pipeline::open(db.clone(), &StoreConfig::default()).unwrap();
        disk.fill();
        let (refused, error, after) =
            post_until_refused(&mut room, &mut acknowledged, "piped", |e| {
                persist(&pipeline, std::slice::from_ref(e))
            });
        assert!(
            error.is_out_of_space(),
            "not told the disk is full: {error:?}"
        );
        assert!(error.to_string().contains(OUT_OF_SPACE), "{error}");
        assert_stored(&db, &acknowledged, &[id_of(&refused)]);
        assert_memory_right(&pipeline, &db);
        // A state event (a group prepared for it) is refused the same way.
        let topic = room.clone().event(
            "topic",
            "m.room.topic",
            ALICE,
            Some(""),
            serde_json::json!({"topic": incompressible("topic")}),
        );
        let error = persist(&pipeline, std::slice::from_ref(&topic)).unwrap_err();
        assert!(error.is_out_of_space(), "{error:?}");
        assert_memory_right(&pipeline, &db);
        assert_invariants(&db);
        disk.free();
        persist(&pipeline, std::slice::from_ref(&refused)).unwrap();
        acknowledged.push(id_of(&refused));
        room = after;
        assert_memory_right(&pipeline, &db);
    }

    // `hs-main import`: stops naming why; run again with room, completes.
    let mut more = room.clone();
    let lines: Vec<String> = (0..16)
        .map(|i| big_message(&mut more, &format!("imported{i}")).to_string())
        .collect();
    let folder = e2e_tests::TempDir(e2e_tests::tempdir("disk-full-import"));
    let lines_file = folder.0.join("room.jsonl");
    std::fs::write(&lines_file, lines.join("\n") + "\n").unwrap();
    let import = || {
        e2e_tests::status_and_text(e2e_tests::hs_main_at(
            url,
            &["import", lines_file.to_str().unwrap()],
        ))
    };
    // Room to open the database (SQLite's shared-memory file, the claim),
    // not for the batch.
    disk.fill_but(128 << 10);
    let (status, stdout, stderr) = import();
    assert_ne!(status, 0, "{stdout}\n{stderr}");
    assert!(stderr.contains(OUT_OF_SPACE), "{stderr}");
    disk.free();
    let (status, stdout, stderr) = import();
    assert_eq!(status, 0, "{stdout}\n{stderr}");
    let last: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    acknowledged.extend(
        lines
            .iter()
            .map(|l| id_of(&serde_json::from_str(l).unwrap())),
    );

    let db = open();
    assert_stored(&db, &acknowledged, &[]);
    let stored = EventsStore::new(db.clone(), &StoreConfig::default()).unwrap();
    assert_eq!(
        stored.get_forward_extremities(ROOM).unwrap(),
        vec![id_of(&last)]
    );
    assert_invariants(&db);
}

#[test]
fn sqlite_a_full_disk_refuses_writes_keeps_what_was_acknowledged_and_recovers() {
    let Some(disk) = SmallDisk::mount("8m") else {
        return;
    };
    let url = format!("sqlite:{}", disk.path().join("hs.db").display());
    a_full_disk_refuses_writes_keeps_what_was_acknowledged_and_recovers(&url, &disk, None);
}

#[test]
fn postgres_a_full_disk_refuses_writes_keeps_what_was_acknowledged_and_recovers() {
    let Some(db) = TestDb::postgres() else {
        return;
    };
    let Some(disk) = SmallDisk::mount("32m") else {
        return;
    };
    let on = OnSmallDisk::new(db, &disk);
    a_full_disk_refuses_writes_keeps_what_was_acknowledged_and_recovers(
        on.url(),
        &disk,
        on.db.as_ref(),
    );
}
