//! `hs-main migrate` creates and migrates a database once, then finds nothing to do.

use storage_core::testing::TestDb;

storage_core::engine_tests!(migrates_once);

fn migrate(t: &TestDb) -> (bool, String, String) {
    let out = e2e_tests::hs_main_command()
        .args(["--database", t.url(), "migrate"])
        .env("RUST_LOG", "info")
        .output()
        .expect("running hs-main");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn migrates_once(t: &TestDb) {
    let (ok, stdout, stderr) = migrate(t);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("is migrated and ready"), "{stdout}");
    assert!(
        stderr.contains("[migrate]") && stderr.contains("applied migration"),
        "{stderr}"
    );
    let (ok, _, stderr) = migrate(t);
    assert!(ok, "{stderr}");
    assert!(
        !stderr.contains("applied migration"),
        "second run applies nothing: {stderr}"
    );
    // The schema is really there.
    t.open_mode(storage_core::OpenMode::Replica);
}
