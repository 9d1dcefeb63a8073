//! Read-only commands write nothing anywhere: on SQLite no `-wal`/`-shm` file
//! appears beside the database and a read-only folder works for a user who
//! may not write there; on PostgreSQL `inspect` works for a role that may
//! only read tables (not sequences). On SQLite and PostgreSQL.

use e2e_tests::hs_main_at;
use std::path::Path;
use std::process::{Command, Output};
use storage_core::testing::TestDb;

storage_core::engine_tests!(read_only_commands_write_nothing);

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/example-room.jsonl"
);
const ROOM: &str = "!example:example.org";

fn assert_ok(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The files in `dir` with their contents.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

fn read_only_commands_write_nothing(t: &TestDb) {
    assert_ok("import", &hs_main_at(t.url(), &["import", FIXTURE]));
    let state = hs_main_at(t.url(), &["state", ROOM]);
    assert_ok("state", &state);
    match t.url().strip_prefix("sqlite:") {
        Some(path) => sqlite_read_only(Path::new(path), &state.stdout),
        None => postgres_reader_role(t, &state.stdout),
    }
}

fn sqlite_read_only(path: &Path, expected_state: &[u8]) {
    let dir = path.parent().unwrap();
    let url = format!("sqlite:{}", path.display());
    let before = files(dir);
    let names: Vec<&str> = before.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        !names
            .iter()
            .any(|n| n.ends_with("-wal") || n.ends_with("-shm")),
        "the writer closed cleanly: {names:?}"
    );
    for args in [
        vec!["state", ROOM],
        vec!["state", ROOM, "--at", "$create:example.org"],
        vec!["inspect"],
        vec!["inspect", "--json", "--exact", "--unreferenced"],
    ] {
        assert_ok(&format!("{args:?}"), &hs_main_at(&url, &args));
        assert_eq!(files(dir), before, "{args:?} wrote beside the database");
    }
    // A folder nobody may write to, read by a user who is not its owner (as
    // root, the test runs the command as `nobody`).
    if !is_root() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    for file in std::fs::read_dir(dir).unwrap() {
        let file = file.unwrap().path();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o444)).unwrap();
    }
    let as_nobody = |args: &[&str]| {
        Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .arg(env!("CARGO_BIN_EXE_hs-main"))
            .args(["--database", &url])
            .args(args)
            .env_remove("HS_DATABASE")
            .output()
            .expect("running hs-main as nobody")
    };
    let out = as_nobody(&["state", ROOM]);
    assert_ok("state as nobody in a read-only folder", &out);
    assert_eq!(out.stdout, expected_state);
    assert_ok("inspect as nobody", &as_nobody(&["inspect"]));
    assert_eq!(files(dir), before);
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A role that may connect and read every table, and nothing else.
fn postgres_reader_role(t: &TestDb, expected_state: &[u8]) {
    let role = format!(
        "hs_reader_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let database = t
        .url()
        .split('?')
        .next()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap();
    let mut raw = t.raw_connection();
    raw.batch_execute(&format!(
        "CREATE ROLE {role} LOGIN; GRANT CONNECT ON DATABASE {database} TO {role}; \
         GRANT USAGE ON SCHEMA public TO {role}; GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role};"
    ))
    .unwrap();
    let url = t.url().replacen("postgres@", &format!("{role}@"), 1);
    let out = hs_main_at(&url, &["state", ROOM]);
    assert_ok("state as a reader", &out);
    assert_eq!(out.stdout, expected_state);
    let out = hs_main_at(&url, &["inspect", "--json", "--exact"]);
    assert_ok("inspect as a reader", &out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["events"], 9, "{report}");
    assert_eq!(report["sequence"]["last_value"], serde_json::Value::Null);
    assert!(
        report["sequence"]["unreadable"]
            .as_str()
            .is_some_and(|s| s.contains("may not read")),
        "{report}"
    );
    let out = hs_main_at(&url, &["inspect"]);
    assert_ok("inspect (text) as a reader", &out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("not checked: this role may not read"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    drop(raw);
    let mut raw = t.raw_connection();
    raw.batch_execute(&format!("DROP OWNED BY {role}; "))
        .unwrap();
    drop(raw);
    // The role outlives this database otherwise; roles belong to the server.
    let admin = std::env::var(storage_core::testing::POSTGRES_URL_VAR).unwrap();
    let config =
        storage_core::DatabaseConfig::parse(&admin, storage_core::OpenMode::Writer).unwrap();
    let mut admin = storage_core::engine::for_config(&config).connect().unwrap();
    admin.batch_execute(&format!("DROP ROLE {role}")).unwrap();
}

/// `serve --read-only` opens an SQLite database that nobody writes (no `-wal`
/// file beside it) as an unchanging file. A writer that comes later (the
/// database's `hs-main` started again, an import) changes that file; the
/// server must then answer what is committed, never from pages of the file as
/// it was mixed with pages as it is. SQLite only: PostgreSQL has no such open.
#[test]
fn sqlite_serve_read_only_started_before_a_writer() {
    let t = TestDb::sqlite();
    assert_ok("import", &hs_main_at(t.url(), &["import", FIXTURE]));
    let server = e2e_tests::read_only_server(t.url());
    let state = |room: &str| {
        e2e_tests::get(
            &server.url,
            &format!("/_hs/v1/rooms/{}/state", e2e_tests::encode(room)),
        )
    };
    let cli_state = |room: &str| -> serde_json::Value {
        let out = hs_main_at(t.url(), &["state", room]);
        assert_ok("state", &out);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert_eq!(state(ROOM), cli_state(ROOM));

    // A writer comes and goes: Synapse's fixture rooms imported, written and
    // checkpointed into the file.
    let synapse = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/synapse");
    assert_ok(
        "a second import",
        &hs_main_at(t.url(), &["import", &format!("{synapse}/pdus.jsonl")]),
    );
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{synapse}/expected.json")).unwrap())
            .unwrap();
    for room in expected["rooms"].as_object().unwrap().keys() {
        assert_eq!(state(room), cli_state(room), "{room}");
    }
    assert_eq!(state(ROOM), cli_state(ROOM));
    drop(server);
}
