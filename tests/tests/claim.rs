//! The one-main-process claim with real processes: `hs-main serve` whose claim
//! session is killed on PostgreSQL (taken again when nobody else wants it; with
//! an import racing for it, exactly one of them writes), whose SQLite file is
//! deleted or replaced (it stops before acknowledging another event, with exit
//! status 3 and a line saying why), a second main process through another
//! path or command refused, and kill -9 followed by an immediate restart.
//! Every test that writes ends by checking that no acknowledged event is
//! missing from the database.

use e2e_tests::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};
use storage_core::testing::TestDb;
use storage_core::with_conn;

storage_core::engine_tests!(
    a_second_main_process_is_refused_while_serving,
    kill_9_then_an_immediate_restart_loses_nothing,
    import_stops_when_another_main_process_claims,
);

/// `hs-main` exits with this status when it lost its claim.
const EXIT_CLAIM_LOST: i32 = 3;

/// Runs `hs-main --database URL ARGS...` to the end: status and stderr.
fn status_and_stderr(url: &str, args: &[&str]) -> (ExitStatus, String) {
    let out = hs_main_at(url, args);
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn sqlite_path(db: &TestDb) -> PathBuf {
    PathBuf::from(db.url().strip_prefix("sqlite:").unwrap())
}

/// Posts until the server stops acknowledging, changes the SQLite file with
/// `change` meanwhile, and checks that the server then acknowledges nothing
/// and exits with the claim-lost status and a line saying `says`.
fn serve_stops_when_its_file_changes(change: impl FnOnce(&Path), says: &str) -> TestDb {
    let db = TestDb::sqlite();
    let mut main = main_process(&db, free_port());
    let (room, _) = founded_room(&main.url);
    let poster = Poster::start(&main.url, room, "before");
    poster.wait_for(5);
    change(&sqlite_path(&db));
    let status = wait_for_exit(&mut main);
    let (mut room, acknowledged, err) = poster.finish();
    let err = err.expect("the poster was stopped by the server");
    assert!(!acknowledged.is_empty(), "{err}");
    // Nothing more is acknowledged, and the process said why and stopped.
    assert!(post(&main.url, vec![message(&mut room, "after")]).is_err());
    assert_eq!(status.code(), Some(EXIT_CLAIM_LOST), "{}", main.log_text());
    let log = main.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("lost the main-process claim"))
        .unwrap_or_else(|| panic!("no claim-lost line in:\n{log}"));
    assert!(line.contains(says), "{line}");
    db
}

#[test]
fn serve_stops_when_its_sqlite_file_is_deleted() {
    let db = serve_stops_when_its_file_changes(
        |path| std::fs::remove_file(path).unwrap(),
        "was deleted",
    );
    // Nothing brought it back empty.
    assert!(!sqlite_path(&db).exists());
}

#[test]
fn serve_stops_when_its_sqlite_file_is_replaced() {
    let _ = serve_stops_when_its_file_changes(
        |path| {
            let copy = path.with_file_name("replacement.db");
            std::fs::copy(path, &copy).unwrap();
            std::fs::rename(&copy, path).unwrap();
        },
        "was replaced",
    );
}

/// While `serve` runs, `migrate` and `import` are refused (through a symlink,
/// another spelling of the path too, on SQLite), and `serve` goes on.
fn a_second_main_process_is_refused_while_serving(db: &TestDb) {
    let main = main_process(db, free_port());
    let (mut room, mut acknowledged) = founded_room(&main.url);
    let mut urls = vec![db.url().to_owned()];
    let links = (db.engine() == "sqlite").then(|| TempDir(tempdir("links")));
    if let Some(TempDir(links)) = &links {
        let path = sqlite_path(db);
        let dir = path.parent().unwrap();
        std::os::unix::fs::symlink(&path, links.join("link.db")).unwrap();
        urls.push(format!("sqlite:{}", links.join("link.db").display()));
        urls.push(format!(
            "sqlite:{}/../{}/test.db",
            dir.display(),
            dir.file_name().unwrap().to_str().unwrap()
        ));
    }
    let lines = tempdir("import");
    let file = lines.join("other.jsonl");
    std::fs::write(&file, other_room_lines()).unwrap();
    for url in &urls {
        for args in [vec!["migrate"], vec!["import", file.to_str().unwrap()]] {
            let (status, stderr) = status_and_stderr(url, &args);
            assert_eq!(status.code(), Some(1), "{url} {args:?}: {stderr}");
            assert!(
                stderr.contains("claimed by another main process"),
                "{url} {args:?}: {stderr}"
            );
        }
    }
    let e = message(&mut room, "still-serving");
    post(&main.url, vec![e.clone()]).unwrap();
    acknowledged.push(id_of(&e));
    drop(main);
    let _ = std::fs::remove_dir_all(lines);
    assert_all_stored(db.url(), &acknowledged);
    assert!(!stored_events(db.url()).contains("$o-create:example.com"));
    assert_invariants(db);
}

/// kill -9 of `serve` while a client posts, then `serve` again at once: it
/// claims the database (the claim died with the process), nothing acknowledged
/// is missing, and it takes new events.
fn kill_9_then_an_immediate_restart_loses_nothing(db: &TestDb) {
    let port = free_port();
    let mut main = main_process(db, port);
    let (room, mut acknowledged) = founded_room(&main.url);
    let poster = Poster::start(&main.url, room, "burst");
    poster.wait_for(10);
    main.child.kill().unwrap();
    main.child.wait().unwrap();
    let (mut room, burst, _) = poster.finish();
    acknowledged.extend(burst);
    drop(main);
    let main = main_process(db, port);
    let e = message(&mut room, "after-restart");
    post(&main.url, vec![e.clone()]).unwrap();
    acknowledged.push(id_of(&e));
    drop(main);
    assert_all_stored(db.url(), &acknowledged);
    assert_invariants(db);
}

/// The claim session of `serve` killed with nobody else waiting: serve takes
/// the claim again and goes on; a second main process is still refused.
#[test]
fn postgres_serve_survives_losing_its_claim_session() {
    let Some(db) = TestDb::postgres() else { return };
    let main = main_process(&db, free_port());
    let (room, mut acknowledged) = founded_room(&main.url);
    let poster = Poster::start(&main.url, room, "during");
    poster.wait_for(5);
    let sessions = db.claim_sessions();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    db.terminate_session(sessions[0]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(db.claim_sessions()[..], [s] if s != sessions[0]) {
        assert!(
            Instant::now() < deadline,
            "the claim was not taken again:\n{}",
            main.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, stderr) = status_and_stderr(db.url(), &["migrate"]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("claimed by another main process"),
        "{stderr}"
    );
    let before = poster.acknowledged.lock().unwrap().len();
    poster.wait_for(before + 5);
    let (_, during, err) = poster.finish();
    assert_eq!(err, None, "serve kept acknowledging:\n{}", main.log_text());
    acknowledged.extend(during);
    let log = main.log_text();
    assert!(
        log.contains("lost the session holding the main-process claim"),
        "{log}"
    );
    assert!(log.contains("took the main-process claim on"), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
    drop(main);
    assert_all_stored(db.url(), &acknowledged);
    assert_invariants(&db);
}

/// The claim session of `serve` killed while a client posts, and at once an
/// `import` of another room: either the import is refused and serve goes on,
/// or the import writes and serve stops with the claim-lost status, having
/// acknowledged nothing it did not store. Never both writing.
#[test]
fn postgres_claim_session_killed_under_serve_with_an_import_racing() {
    let Some(db) = TestDb::postgres() else { return };
    let mut main = main_process(&db, free_port());
    let (room, mut acknowledged) = founded_room(&main.url);
    let poster = Poster::start(&main.url, room, "race");
    poster.wait_for(5);
    let dir = tempdir("race");
    let file = dir.join("other.jsonl");
    std::fs::write(&file, other_room_lines()).unwrap();
    db.terminate_session(db.claim_sessions()[0]);
    let (status, stderr) = status_and_stderr(db.url(), &["import", file.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "the import {}",
        if status.success() {
            "won the claim"
        } else {
            "was refused"
        }
    );
    if status.success() {
        // The import claimed the database: serve must stop, not write beside it.
        let serve_status = wait_for_exit(&mut main);
        let (_, during, _) = poster.finish();
        acknowledged.extend(during);
        assert_eq!(
            serve_status.code(),
            Some(EXIT_CLAIM_LOST),
            "{}",
            main.log_text()
        );
        assert!(stored_events(db.url()).contains("$o-create:example.com"));
    } else {
        assert!(
            stderr.contains("claimed by another main process"),
            "{stderr}"
        );
        let before = poster.acknowledged.lock().unwrap().len();
        poster.wait_for(before + 3);
        let (_, during, err) = poster.finish();
        assert_eq!(err, None, "{}", main.log_text());
        acknowledged.extend(during);
        assert!(main.child.try_wait().unwrap().is_none(), "serve stopped");
    }
    drop(main);
    assert_all_stored(db.url(), &acknowledged);
    assert_invariants(&db);
}

/// Five events of another room (`!other:example.com`) as import lines.
fn other_room_lines() -> String {
    let mut room = Room::default();
    let mut lines = String::new();
    let mut events = room.founding("o-");
    events.push(room.event(
        "o-topic",
        "m.room.topic",
        ALICE,
        Some(""),
        json!({"topic": "o"}),
    ));
    for mut e in events {
        e["room_id"] = json!("!other:example.com");
        lines.push_str(&e.to_string());
        lines.push('\n');
    }
    lines
}

/// Every session of `serve` ended from the server's side at once (what a
/// server restart does to it), with nobody else waiting: writes fail for a
/// moment (not acknowledged), then go on, and the claim is taken again.
#[test]
fn postgres_serve_survives_all_its_sessions_ending() {
    let Some(db) = TestDb::postgres() else { return };
    let main = main_process(&db, free_port());
    let (mut room, mut acknowledged) = founded_room(&main.url);
    let claim_session = db.claim_sessions()[0];
    {
        use diesel::prelude::*;
        with_conn!(&mut db.raw_connection(), |c| diesel::sql_query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        .execute(c))
        .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut failures = 0;
    let mut i = 0;
    while acknowledged.len() < 13 {
        i += 1;
        let before = room.clone();
        let e = message(&mut room, &format!("after{i}"));
        match post(&main.url, vec![e.clone()]) {
            Ok(_) => acknowledged.push(id_of(&e)),
            Err(err) => {
                // The server went away under the request: unavailable, not an
                // internal error (see docs/http.md).
                assert!(err.starts_with("503"), "{err}");
                failures += 1;
                room = before;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        assert!(
            Instant::now() < deadline,
            "serve did not recover:\n{}",
            main.log_text()
        );
    }
    eprintln!("{failures} writes failed after the sessions ended");
    while !matches!(db.claim_sessions()[..], [s] if s != claim_session) {
        assert!(Instant::now() < deadline, "{}", main.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!main.log_text().contains("lost the main-process claim"));
    drop(main);
    assert_all_stored(db.url(), &acknowledged);
    assert_invariants(&db);
}

/// `import` whose claim another main process takes over mid-way (here its
/// raise of the epoch, as a newcomer makes once it holds the lock): it stops at
/// its next write with the claim-lost status and one line naming the
/// newcomer; what it committed before stays, and importing again finishes.
///
/// The import reads standard input, and the lines after the first part are
/// written only once the epoch is raised: however fast it writes, it has a
/// batch left to write after the takeover.
fn import_stops_when_another_main_process_claims(db: &TestDb) {
    use std::io::Write;
    /// More events than one batch holds on either engine (2,500 on SQLite,
    /// 1,000 on PostgreSQL), so the first part commits something.
    const FIRST_PART: usize = 2_600;
    let dir = TempDir(tempdir("import-fenced"));
    let file = dir.0.join("room.jsonl");
    let mut room = Room::default();
    let mut events = room.founding("");
    for i in 0..3000 {
        events.push(message(&mut room, &format!("topic{i}")));
    }
    let ids: Vec<String> = events.iter().map(id_of).collect();
    let lines: Vec<String> = events.iter().map(|e| format!("{e}\n")).collect();
    std::fs::write(&file, lines.concat()).unwrap();
    let log = dir.0.join("import.log");
    let mut import = hs_main_command()
        .args(["--database", db.url(), "import", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = import.stdin.take().expect("a pipe");
    stdin
        .write_all(lines[..FIRST_PART].concat().as_bytes())
        .unwrap();
    // Once it has committed something, another main process claims.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !try_stored_events(db.url()).is_ok_and(|s| !s.is_empty()) {
        assert!(Instant::now() < deadline, "the import committed nothing");
        std::thread::sleep(Duration::from_millis(10));
    }
    db.raw_connection()
        .batch_execute(
            "UPDATE main_process_claim SET epoch = epoch + 1, \
             holder = 'test newcomer', claimed_at = 0",
        )
        .unwrap();
    // It may stop reading as soon as it finds the claim lost: a broken pipe
    // here is that, not a failure.
    let _ = stdin.write_all(lines[FIRST_PART..].concat().as_bytes());
    drop(stdin);
    let status = import.wait().unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(EXIT_CLAIM_LOST), "{stderr}");
    let lost: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("lost the main-process claim"))
        .collect();
    assert_eq!(lost.len(), 1, "{stderr}");
    assert!(lost[0].contains("test newcomer"), "{stderr}");
    let stored = stored_events(db.url());
    assert!(stored.len() < ids.len(), "the import was stopped part-way");
    let (status, stderr) = status_and_stderr(db.url(), &["import", file.to_str().unwrap()]);
    assert!(status.success(), "{stderr}");
    assert_all_stored(db.url(), &ids);
    assert_invariants(db);
}
