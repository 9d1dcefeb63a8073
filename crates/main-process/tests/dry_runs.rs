//! `compress --dry-run` and `purge-state-groups --dry-run` only read: they
//! claim nothing (so they answer beside a running `hs-main serve`, which holds
//! the claim) and change nothing (no migration, no id sequence moved). On
//! SQLite and PostgreSQL.

use e2e_tests::{database_snapshot, hs_main_at, query_lines};
use main_process::bench_room::{linear_room, write_room_file};
use storage_core::testing::TestDb;
use storage_core::{DatabaseConfig, MainProcessClaim, OpenMode};

storage_core::engine_tests!(dry_runs_claim_and_change_nothing);

/// The tables an operator could see a dry run change.
const TABLES: [&str; 5] = [
    "state_groups",
    "state_groups_state",
    "state_group_edges",
    "event_to_state_groups",
    "events",
];

/// Everything an operator could see change, with the state group sequence.
fn snapshot(t: &TestDb) -> Vec<String> {
    let mut seen = database_snapshot(t, &TABLES);
    if t.engine() == "postgres" {
        seen.extend(query_lines(
            t,
            "SELECT 'seq ' || last_value || ' ' || is_called AS line FROM state_group_id_seq",
        ));
    }
    seen
}

fn dry_runs_claim_and_change_nothing(t: &TestDb) {
    let dir = e2e_tests::TempDir(e2e_tests::tempdir(&format!("dry-runs-{}", t.engine())));
    let file = dir.0.join("room.jsonl");
    write_room_file(&file, &linear_room("!l:bench.test", 1_500, 200));
    e2e_tests::hs_main_ok(t.url(), &["import", file.to_str().unwrap()]);
    // One unneeded group (a resolution no event took), and on PostgreSQL a
    // sequence left behind its table, as a restore without sequences leaves
    // it: what a writer would move.
    let mut raw = t.raw_connection();
    raw.batch_execute(
        "INSERT INTO state_groups (id, room_id, event_id) VALUES (1000000, '!l:bench.test', '$x')",
    )
    .unwrap();
    if t.engine() == "postgres" {
        raw.batch_execute("SELECT setval('state_group_id_seq', 3)")
            .unwrap();
    }
    drop(raw);
    // A main process holds the database, as `hs-main serve` does.
    let config = DatabaseConfig::parse(t.url(), OpenMode::Writer).unwrap();
    let claim = MainProcessClaim::acquire(&config, std::time::Duration::ZERO).unwrap();
    let before = snapshot(t);
    for (args, said) in [
        (
            vec!["purge-state-groups", "--dry-run"],
            "1 state groups are needed by no event's state (nothing deleted: --dry-run)",
        ),
        (vec!["compress", "--dry-run"], "would compress 1 rooms"),
    ] {
        let out = hs_main_at(t.url(), &args);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{args:?}: {stdout}{stderr}");
        assert!(stdout.contains(said), "{args:?}: {stdout}");
        assert_eq!(snapshot(t), before, "{args:?} changed the database");
    }
    drop(claim);
}
