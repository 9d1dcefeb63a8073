//! The short command path against PostgreSQL over TCP, repeated: every run
//! must end normally. A process that exits while one of its connection pool's
//! threads is still opening a connection aborted now and then inside libpq's
//! Kerberos code (GSSAPI encryption, which libpq tries first over TCP), with
//! no output. Two defences, each tested here: connections without GSSAPI
//! unless asked (the `hs-main state` runs), and a database that, when let go,
//! waits for the attempts under way (the children that exit mid-connect).

use e2e_tests::{hs_main_command, PgProxy};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};
use storage_core::testing::TestDb;

/// Runs in all. The abort was seen about once in 600 runs of a release build;
/// a debug build exits later after its pool's attempts and never showed it
/// (0 in 3,000 runs of the build before the fix), so this test checks the
/// command's output under repetition, and the test below checks the race.
const RUNS: usize = 500;
const THREADS: usize = 2;

#[test]
fn state_over_tcp_never_aborts() {
    let Some(db) = TestDb::postgres() else {
        return;
    };
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/example-room.jsonl");
    let import = hs_main_command()
        .args(["--database", db.url(), "import", fixture])
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
        hs_main_command()
            .args(["--database", &url, "state", "!example:example.org"])
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
    let failures = failures_in(RUNS, run, |out| out.stdout == first.stdout);
    assert!(
        failures.is_empty(),
        "{} of {RUNS} runs failed, first: {}",
        failures.len(),
        failures[0]
    );
}

/// Set in the child processes of the test below: the database URL to open.
const EXIT_RACE_CHILD: &str = "HS_TEST_EXIT_RACE_URL";
/// Without the gate's wait about one child in 600 aborted (5 of 3,000), so
/// 3,000 children find a regression 99 times in 100.
const EXIT_RACE_RUNS: usize = 3000;

/// The mechanism behind the abort, on its own: a process that lets go of its
/// database while the pool's threads are still opening connections, then
/// exits. libpq's GSSAPI encryption is left on (`gssencmode=prefer`, libpq's
/// default) so only the connect gate stands between the exit and Kerberos:
/// with `ConnectGate::close` not waiting for attempts under way, children died
/// with `krb5int_getspecific: Assertion ... failed`.
#[test]
fn a_process_exiting_while_its_pool_connects_never_aborts() {
    if let Ok(url) = std::env::var(EXIT_RACE_CHILD) {
        let mut config =
            storage_core::DatabaseConfig::parse(&url, storage_core::OpenMode::ReadOnly).unwrap();
        // Sixteen connections opened by the pool's threads, none waited for.
        config.pool_size = 16;
        config.min_idle = 16;
        let db = storage_core::Database::open(config).unwrap();
        // Let go somewhere between before the first pool connection and
        // after the last: where it falls decides which attempts are under way.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        std::thread::sleep(std::time::Duration::from_micros(u64::from(nanos % 8_000)));
        drop(db);
        return;
    }
    let Some(db) = TestDb::postgres() else {
        return;
    };
    let proxy = PgProxy::start(&db);
    let url = format!("{}?gssencmode=prefer", proxy.url(&db));
    let run = || {
        Command::new(std::env::current_exe().unwrap())
            .args([
                "a_process_exiting_while_its_pool_connects_never_aborts",
                "--exact",
                "--quiet",
                "--test-threads=1",
            ])
            .env(EXIT_RACE_CHILD, &url)
            .env_remove("PGGSSENCMODE")
            .output()
            .unwrap()
    };
    let failures = failures_in(EXIT_RACE_RUNS, run, |_| true);
    assert!(
        failures.is_empty(),
        "{} of {EXIT_RACE_RUNS} children failed, first: {}",
        failures.len(),
        failures[0]
    );
}

/// Runs `run` `runs` times on [`THREADS`] threads and describes every run that
/// did not exit 0 or whose output `good` refuses.
fn failures_in(
    runs: usize,
    run: impl Fn() -> Output + Sync,
    good: impl Fn(&Output) -> bool + Sync,
) -> Vec<String> {
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(|| {
                    (0..runs / THREADS)
                        .map(|_| run())
                        .filter(|out| !out.status.success() || !good(out))
                        .map(|out| {
                            format!(
                                "status {:?} (signal {:?}): {}",
                                out.status.code(),
                                out.status.signal(),
                                String::from_utf8_lossy(&out.stderr)
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    })
}
