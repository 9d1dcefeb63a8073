//! A database of another application (a wrong `--database`): every command
//! refuses it with one line saying so, before writing anything (same bytes on
//! SQLite, nothing created beside the file; no new relation, row or setting on
//! PostgreSQL), those that read too (there is nothing of ours or Synapse's to
//! read). On SQLite and PostgreSQL.

use e2e_tests::{database_snapshot, hs_main};
use storage_core::testing::TestDb;

storage_core::engine_tests!(writers_refuse_a_database_of_another_application);

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

/// A calendar's tables: one of them shares a name with one of ours.
const TABLES: [&str; 2] = ["events", "users"];

fn fill(t: &TestDb) {
    t.raw_connection()
        .batch_execute(
            "CREATE TABLE events (id BIGINT PRIMARY KEY, title TEXT NOT NULL);
             CREATE TABLE users (id BIGINT PRIMARY KEY, name TEXT NOT NULL);
             INSERT INTO events (id, title) VALUES (1, 'stand-up');
             INSERT INTO users (id, name) VALUES (1, 'ann');",
        )
        .expect("building another application's database");
}

fn assert_refused(what: &str, code: i32, stderr: &str) {
    assert_eq!(code, 1, "{what}: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "{what}: one line: {stderr}"
    );
    assert!(
        stderr.contains("holds tables of another application (events, users)"),
        "{what}: {stderr}"
    );
}

fn writers_refuse_a_database_of_another_application(t: &TestDb) {
    fill(t);
    let before = database_snapshot(t, &TABLES);
    let events = format!("{FIXTURES}/example-room.jsonl");
    for args in [
        vec!["migrate"],
        vec!["import", &events],
        vec!["serve", "--listen", "127.0.0.1:0"],
        vec!["purge-state-groups", "--dry-run"],
        vec!["compress", "--dry-run"],
    ] {
        let (code, _, stderr) = hs_main(t, &args);
        assert_refused(args[0], code, &stderr);
        assert_eq!(
            database_snapshot(t, &TABLES),
            before,
            "{args:?} changed the database of another application"
        );
    }
    // As a port's target, from a database of ours, and as its source.
    let ours = TestDb::sqlite();
    let (code, _, stderr) = hs_main(&ours, &["migrate"]);
    assert_eq!(code, 0, "{stderr}");
    for (from, to) in [(ours.url(), t.url()), (t.url(), ours.url())] {
        let out = e2e_tests::hs_main_command()
            .args(["port", "--from", from, "--to", to])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_refused(
            &format!("port --from {from}"),
            out.status.code().unwrap(),
            &stderr,
        );
        assert_eq!(
            database_snapshot(t, &TABLES),
            before,
            "port --from {from} --to {to} changed the database of another application"
        );
    }
    // The commands that read refuse it the same way, changing nothing.
    for args in [
        vec!["state", "!r:example.org"],
        vec!["state", "!r:example.org", "--at", "$e"],
        vec!["inspect"],
        vec!["serve", "--read-only", "--listen", "127.0.0.1:0"],
    ] {
        let (code, _, stderr) = hs_main(t, &args);
        assert_refused(&format!("{args:?}"), code, &stderr);
        assert!(
            stderr.contains("nothing here to read"),
            "{args:?}: {stderr}"
        );
        assert_eq!(
            database_snapshot(t, &TABLES),
            before,
            "{args:?} changed the database of another application"
        );
    }
}
