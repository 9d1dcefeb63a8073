//! The short command path, `hs-main state` against PostgreSQL over TCP, run
//! a few thousand times: every run must end normally. A process that exits
//! while one of its connection pool's threads is still opening a connection
//! aborted now and then inside libpq's Kerberos code (GSSAPI encryption,
//! which libpq tries first over TCP), with no output.

use e2e_tests::{binary, PgProxy};
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use storage_core::testing::TestDb;

/// Runs in all: the abort was seen about once in 600 runs.
const RUNS: usize = 2000;
const THREADS: usize = 2;

#[test]
fn state_over_tcp_never_aborts() {
    let Some(db) = TestDb::postgres() else {
        return;
    };
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/example-room.jsonl");
    let import = Command::new(binary("hs-main"))
        .args(["--database", db.url(), "import", fixture])
        .env_remove("HS_DATABASE")
        .output()
        .unwrap();
    assert!(
        import.status.success(),
        "{}",
        String::from_utf8_lossy(&import.stderr)
    );
    let proxy = PgProxy::start(&db);
    let url = proxy.url(&db);
    let run = || {
        Command::new(binary("hs-main"))
            .args(["--database", &url, "state", "!example:example.org"])
            .env_remove("HS_DATABASE")
            // libpq's own default, whatever the environment says.
            .env_remove("PGGSSENCMODE")
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let first = run();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let state: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(state["m.room.create"][""], "$create:example.org");
    let failures: Vec<String> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(|| {
                    let mut failures = Vec::new();
                    for _ in 0..RUNS / THREADS {
                        let out = run();
                        if !out.status.success() || out.stdout != first.stdout {
                            failures.push(format!(
                                "status {:?} (signal {:?}): {}",
                                out.status.code(),
                                out.status.signal(),
                                String::from_utf8_lossy(&out.stderr)
                            ));
                        }
                    }
                    failures
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    });
    assert!(
        failures.is_empty(),
        "{} of {RUNS} runs failed, first: {}",
        failures.len(),
        failures[0]
    );
}
