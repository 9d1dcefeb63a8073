//! How `hs-main` behaves as a command: a closed pipe ends it quietly with
//! status 0, `--help` never shows what the environment holds and says where
//! the default database is, and creating a database says where, once.

use e2e_tests::hs_main_command;
use std::process::Stdio;
use storage_core::testing::TestDb;

storage_core::engine_tests!(a_closed_pipe_ends_a_command_quietly);

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/example-room.jsonl"
);

/// `hs-main inspect | head -0`, made certain: the reader has gone before
/// the command writes its first line, so every write meets a closed pipe.
fn a_closed_pipe_ends_a_command_quietly(t: &TestDb) {
    let import = hs_main_command()
        .args(["--database", t.url(), "import", FIXTURE])
        .output()
        .unwrap();
    assert!(import.status.success());
    for args in [
        vec!["inspect"],
        vec!["inspect", "--json"],
        vec!["state", "!example:example.org"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = hs_main_command()
            .args(["--database", t.url()])
            .args(&args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(!stderr.contains("Broken pipe"), "{args:?}: {stderr}");
    }
}

#[test]
fn help_hides_the_environment_and_names_the_default_database() {
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["state", "--help"],
    ] {
        let out = hs_main_command()
            .args(&args)
            .env("HS_DATABASE", "postgres://alice:s3cret-pw@db/hs")
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{help}");
        assert!(help.contains("HS_DATABASE"), "{args:?}: {help}");
        assert!(!help.contains("s3cret-pw"), "{args:?}: {help}");
        assert!(!help.contains("alice"), "{args:?}: {help}");
    }
    let out = hs_main_command().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("sqlite:data/homeserver.db"), "{help}");
    assert!(help.contains("relative to the folder"), "{help}");
}

#[test]
fn a_new_default_database_is_announced_with_its_full_path() {
    let dir = std::env::temp_dir().join(format!("hs-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let migrate = || {
        hs_main_command()
            .arg("migrate")
            .current_dir(&dir)
            .env("RUST_LOG", "info")
            .output()
            .unwrap()
    };
    let out = migrate();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let path = dir.join("data/homeserver.db");
    let line = format!("created a new SQLite database at {}", path.display());
    assert_eq!(stderr.matches(&line).count(), 1, "{stderr}");
    assert!(path.exists());
    // The second time, the database exists: nothing is announced.
    let again = migrate();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert!(!stderr.contains("created a new"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
