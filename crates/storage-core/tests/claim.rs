//! The main-process claim as fencing: every write transaction of a claimed
//! database proves the claim's epoch; a newcomer's claim stops the old holder
//! before it commits anything more, and waits for what it had already proven;
//! SQLite claims find one lock whatever the spelling of the path or the name of
//! the file (a hard link, in this process or another), and a database file
//! deleted or replaced under the holder stops it; a PostgreSQL
//! claim whose session ends is taken again when nobody else took it, and lost
//! when somebody did.

use diesel::sql_types::{BigInt, Integer};
use diesel::{QueryableByName, RunQueryDsl};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use storage_core::testing::TestDb;
use storage_core::{
    with_conn, Column, Conn, Database, DatabaseConfig, Error, ErrorKind, MainProcessClaim,
    OpenMode, Sequence, TableRows, TxnOptions,
};

storage_core::engine_tests!(
    writes_prove_the_claim_and_reads_do_not,
    a_write_that_proved_the_old_epoch_commits_before_the_newcomer_reads,
    a_batch_statement_committed_alone_proves_the_claim_in_the_server,
    a_batch_statement_writes_its_rows_without_positions_before_taking_the_lock,
);

fn claimed(url: &str) -> (MainProcessClaim, Database) {
    let config = DatabaseConfig::parse(url, OpenMode::Writer).unwrap();
    let claim = MainProcessClaim::acquire(&config, Duration::ZERO).unwrap();
    let db = Database::open_claimed(config, &claim).unwrap();
    (claim, db)
}

fn insert_group(db: &Database, id: i64) -> storage_core::Result<()> {
    db.run_interaction("insert_group", |txn| {
        with_conn!(txn.conn(), |c| diesel::sql_query(
            "INSERT INTO state_groups (id, room_id, event_id) VALUES ($1, '!r:test', '$e')"
        )
        .bind::<BigInt, _>(id)
        .execute(c))?;
        Ok(())
    })
}

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn query_n(conn: &mut Conn, sql: &str) -> i64 {
    with_conn!(conn, |c| diesel::sql_query(sql).get_result::<N>(c))
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .n
}

fn groups(db: &Database) -> i64 {
    db.run_read("count_groups", |txn| {
        Ok(with_conn!(txn.conn(), |c| diesel::sql_query(
            "SELECT COUNT(*) AS n FROM state_groups"
        )
        .get_result::<N>(c))?
        .n)
    })
    .unwrap()
}

const STREAM: Sequence = Sequence {
    name: "events_stream_seq",
    table: "events",
    column: "stream_ordering",
};

/// A batch's transaction ([`TxnOptions::batch`]) whose one statement takes a
/// stream position for a `cache_invalidations` row keyed `key` (written with
/// the batch's highest position, as a persisted batch writes its row): on
/// PostgreSQL that statement is sent alone and commits on its own; SQLite
/// runs it in its transaction.
fn batch_write(db: &Database, key: &str) -> storage_core::Result<()> {
    db.run_interaction_with("batch_write", TxnOptions::batch(), |txn| {
        let tables = || {
            vec![TableRows::insert(
                "cache_invalidations",
                vec![
                    ("stream_ordering", Column::HighestPosition),
                    ("cache_name", Column::Text(vec!["batch"])),
                    ("cache_key", Column::Text(vec![key])),
                ],
            )]
        };
        txn.insert_columns_taking_positions(&STREAM, 1, &tables(), "hs_test", "")?;
        Ok(())
    })
}

fn batch_rows(db: &Database) -> i64 {
    db.run_read("count_batch_rows", |txn| {
        Ok(with_conn!(txn.conn(), |c| diesel::sql_query(
            "SELECT COUNT(*) AS n FROM cache_invalidations WHERE cache_name = 'batch'"
        )
        .get_result::<N>(c))?
        .n)
    })
    .unwrap()
}

/// A batch's statement sent with no BEGIN and no COMMIT (PostgreSQL) proves
/// the claim all the same, inside the server, before it writes: once a
/// newcomer raised the epoch it fails with ClaimLost naming both epochs and
/// commits nothing; and one sent while the newcomer's raise is in flight
/// waits for it (the claim's row held FOR SHARE by the statement), then is
/// fenced. On SQLite the same writes go through its writer's own proof.
fn a_batch_statement_committed_alone_proves_the_claim_in_the_server(t: &TestDb) {
    let (claim, db) = claimed(t.url());
    let ours = claim.epoch().unwrap();
    batch_write(&db, "a").unwrap();
    batch_write(&db, "b").unwrap();
    assert_eq!(batch_rows(&db), 2);
    if t.engine() == "postgres" {
        let mut raw = t.raw_connection();
        raw.batch_execute("BEGIN").unwrap();
        raw.batch_execute(NEWCOMER_RAISES).unwrap();
        let writer = {
            let db = db.clone();
            std::thread::spawn(move || batch_write(&db, "waited"))
        };
        let pid = waiting_backend(t);
        wait_until_blocked(t.url(), pid);
        raw.batch_execute("COMMIT").unwrap();
        let err = assert_claim_lost(writer.join().unwrap(), "test newcomer");
        assert!(
            err.to_string().contains(&format!(
                "claim epoch {}, this process held {ours}",
                ours + 1
            )),
            "{err}"
        );
    } else {
        t.raw_connection().batch_execute(NEWCOMER_RAISES).unwrap();
        assert_claim_lost(batch_write(&db, "after"), "test newcomer");
    }
    assert_eq!(batch_rows(&db), 2, "the fenced write committed nothing");
    assert_claim_lost(batch_write(&db, "later"), "test newcomer");
    assert_eq!(batch_rows(&db), 2);
}

/// A batch's statement (a state group, which needs no position, and a
/// `cache_invalidations` row, which does) proves the claim before it writes
/// anything, then writes its rows that need no position, and only then takes
/// the stream positions lock: held by another transaction, it finds the
/// statement waiting for that advisory lock with its group's row already written
/// (another insert of that id has to wait for it), while one waiting for
/// the claim's row has written nothing yet (the same insert goes through).
/// On SQLite, which writes one batch at a time, both rows are written.
fn a_batch_statement_writes_its_rows_without_positions_before_taking_the_lock(t: &TestDb) {
    let (_claim, db) = claimed(t.url());
    let write = |db: &Database, group: i64, key: &'static str| {
        db.run_interaction_with("batch_write_group", TxnOptions::batch(), |txn| {
            let tables = || {
                vec![
                    TableRows::insert(
                        "state_groups",
                        vec![
                            ("id", Column::BigInt(vec![group])),
                            ("room_id", Column::Text(vec!["!r:test"])),
                            ("event_id", Column::Text(vec!["$e"])),
                        ],
                    ),
                    TableRows::insert(
                        "cache_invalidations",
                        vec![
                            ("stream_ordering", Column::Position),
                            ("cache_name", Column::Text(vec!["batch"])),
                            ("cache_key", Column::Text(vec![key])),
                        ],
                    ),
                ]
            };
            txn.insert_columns_taking_positions(&STREAM, 1, &tables(), "hs_test", "")?;
            Ok(())
        })
    };
    if t.engine() != "postgres" {
        write(&db, 1, "a").unwrap();
        assert_eq!((groups(&db), batch_rows(&db)), (1, 1));
        return;
    }
    // Waiting for the claim's row: nothing written yet.
    let mut holder = t.raw_connection();
    holder
        .batch_execute("BEGIN; SELECT 1 FROM main_process_claim WHERE id = 1 FOR UPDATE")
        .unwrap();
    let writer = {
        let db = db.clone();
        std::thread::spawn(move || write(&db, 1, "a"))
    };
    let pid = waiting_backend(t);
    wait_until_blocked(t.url(), pid);
    let waits = waits_for(t, pid);
    assert!(matches!(&*waits, "transactionid" | "tuple"), "{waits}");
    assert!(
        !group_row_is_written(t, 1),
        "written before the claim was proven"
    );
    holder.batch_execute("ROLLBACK").unwrap();
    writer.join().unwrap().unwrap();
    assert_eq!((groups(&db), batch_rows(&db)), (1, 1));
    // Waiting for the stream positions lock: its group is already written.
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock({})",
            storage_core::engine::STREAM_POSITIONS_LOCK_KEY
        ))
        .unwrap();
    let writer = {
        let db = db.clone();
        std::thread::spawn(move || write(&db, 2, "b"))
    };
    let pid = waiting_backend(t);
    wait_until_blocked(t.url(), pid);
    assert_eq!(waits_for(t, pid), "advisory");
    assert!(
        group_row_is_written(t, 2),
        "the lock was taken before the group's row"
    );
    holder.batch_execute("COMMIT").unwrap();
    writer.join().unwrap().unwrap();
    assert_eq!((groups(&db), batch_rows(&db)), (2, 2));
}

/// What backend `pid` waits for (pg_stat_activity's `wait_event`).
fn waits_for(t: &TestDb, pid: i64) -> String {
    #[derive(QueryableByName)]
    struct Event {
        #[diesel(sql_type = diesel::sql_types::Text)]
        wait_event: String,
    }
    with_conn!(&mut t.raw_connection(), |c| diesel::sql_query(
        "SELECT coalesce(wait_event, '') AS wait_event FROM pg_stat_activity WHERE pid = $1"
    )
    .bind::<Integer, _>(pid as i32)
    .get_result::<Event>(c))
    .unwrap()
    .wait_event
}

/// Whether an uncommitted insert of state group `id` exists: another insert
/// of that id waits for it (given up after 50 ms, as only a writer still
/// running holds it up) rather than going through (and rolled back).
fn group_row_is_written(t: &TestDb, id: i64) -> bool {
    let mut other = t.raw_connection();
    other
        .batch_execute("BEGIN; SET LOCAL lock_timeout = '50ms'")
        .unwrap();
    let inserted = with_conn!(&mut other, |c| diesel::sql_query(
        "INSERT INTO state_groups (id, room_id, event_id) VALUES ($1, '!other:test', '$o')"
    )
    .bind::<BigInt, _>(id)
    .execute(c));
    other.batch_execute("ROLLBACK").unwrap();
    match inserted {
        Ok(_) => false,
        Err(e) => {
            assert!(format!("{e:?}").contains("lock timeout"), "{e:?}");
            true
        }
    }
}

/// What a newcomer does once it holds the lock and has migrated.
const NEWCOMER_RAISES: &str =
    "UPDATE main_process_claim SET epoch = epoch + 1, holder = 'test newcomer', claimed_at = 0";

fn assert_claim_lost(result: storage_core::Result<()>, says: &str) -> Error {
    let err = result.expect_err("the write should have been fenced");
    assert!(err.is_claim_lost(), "{err}");
    let text = err.to_string();
    assert!(text.contains(says), "{text}");
    err
}

/// Writes prove the epoch: once another main process raised it, every write
/// fails with ClaimLost naming the newcomer and both epochs, commits nothing,
/// and reads still answer.
fn writes_prove_the_claim_and_reads_do_not(t: &TestDb) {
    let (claim, db) = claimed(t.url());
    let ours = claim
        .epoch()
        .expect("the epoch is raised when the database opens");
    assert!(ours >= 1);
    insert_group(&db, 1).unwrap();
    // Reopening raises it again: a newer main process's epoch is always higher.
    drop(db);
    drop(claim);
    let (claim, db) = claimed(t.url());
    let ours = claim.epoch().unwrap();
    insert_group(&db, 2).unwrap();

    t.raw_connection().batch_execute(NEWCOMER_RAISES).unwrap();
    let err = assert_claim_lost(insert_group(&db, 3), "test newcomer");
    let text = err.to_string();
    assert!(
        text.contains(&format!(
            "claim epoch {}, this process held {ours}",
            ours + 1
        )),
        "{text}"
    );
    assert_eq!(groups(&db), 2, "the fenced write committed nothing");
    // Every later write fails too; reads go on.
    assert_claim_lost(insert_group(&db, 4), "test newcomer");
    assert_eq!(groups(&db), 2);
}

/// The newcomer's raise waits for a write transaction that proved the old
/// epoch, so that nothing the old holder proved commits after the raise: on
/// PostgreSQL the proof holds the row FOR SHARE (the raise is seen waiting on
/// it), on SQLite the transaction holds the one write lock (the raise, begun
/// while the old write is in flight, reads what it committed).
fn a_write_that_proved_the_old_epoch_commits_before_the_newcomer_reads(t: &TestDb) {
    let (_claim, db) = claimed(t.url());
    let url = t.url().to_owned();
    let engine = t.engine();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let mut newcomer = None;
    db.run_interaction("old_holder_write", |txn| {
        with_conn!(txn.conn(), |c| diesel::sql_query(
            "INSERT INTO state_groups (id, room_id, event_id) VALUES (7, '!r:test', '$e')"
        )
        .execute(c))?;
        if newcomer.is_some() {
            return Ok(());
        }
        let started_tx = started_tx.clone();
        let newcomer_url = url.clone();
        newcomer = Some(std::thread::spawn(move || {
            let mut raw = raw_connection(&newcomer_url);
            started_tx.send(backend_pid(&mut raw, engine)).unwrap();
            let (begin, seen) = if engine == "sqlite" {
                ("BEGIN IMMEDIATE", "SELECT COUNT(*) AS n FROM state_groups")
            } else {
                // Under REPEATABLE READ the raise's snapshot is older than the
                // commit it waited for; the newcomer's later transactions see it.
                (
                    "BEGIN ISOLATION LEVEL REPEATABLE READ",
                    "SELECT 1::bigint AS n",
                )
            };
            raw.batch_execute(begin).unwrap();
            raw.batch_execute(NEWCOMER_RAISES).unwrap();
            let seen = query_n(&mut raw, seen);
            raw.batch_execute("COMMIT").unwrap();
            seen
        }));
        let pid = started_rx.recv().unwrap();
        if engine == "postgres" {
            wait_until_blocked(&url, pid);
        } else {
            // SQLite's BEGIN IMMEDIATE waits on the write lock where nothing
            // outside can see it: give it time to be waiting.
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    })
    .unwrap();
    let seen = newcomer.unwrap().join().unwrap();
    assert_eq!(seen, 1, "the newcomer read what the old holder committed");
    assert_eq!(groups(&db), 1);
    assert_claim_lost(insert_group(&db, 8), "test newcomer");
}

fn raw_connection(url: &str) -> Conn {
    let config = DatabaseConfig::parse(url, OpenMode::Writer).unwrap();
    storage_core::engine::for_config(&config).connect().unwrap()
}

fn backend_pid(conn: &mut Conn, engine: &str) -> i64 {
    if engine == "postgres" {
        query_n(conn, "SELECT pg_backend_pid()::bigint AS n")
    } else {
        0
    }
}

#[derive(QueryableByName)]
struct Waiting {
    #[diesel(sql_type = Integer)]
    waiting: i32,
}

/// Waits until the PostgreSQL backend `pid` is waiting for a lock.
fn wait_until_blocked(url: &str, pid: i64) {
    let mut watcher = raw_connection(url);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let row: Waiting = with_conn!(&mut watcher, |c| diesel::sql_query(
            "SELECT COUNT(*)::int AS waiting FROM pg_stat_activity \
             WHERE pid = $1 AND wait_event_type = 'Lock'"
        )
        .bind::<Integer, _>(pid as i32)
        .get_result(c))
        .unwrap();
        if row.waiting == 1 {
            return;
        }
        assert!(Instant::now() < deadline, "backend {pid} never waited");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A write that began while a newcomer's raise was in flight waits for it,
/// then (a serialization failure under REPEATABLE READ, retried) is fenced.
#[test]
fn postgres_a_write_waiting_on_a_newcomers_raise_is_fenced() {
    let Some(t) = TestDb::postgres() else { return };
    let (_claim, db) = claimed(t.url());
    let mut raw = t.raw_connection();
    raw.batch_execute("BEGIN").unwrap();
    raw.batch_execute(NEWCOMER_RAISES).unwrap();
    let writer = {
        let db = db.clone();
        std::thread::spawn(move || insert_group(&db, 1))
    };
    let pid = waiting_backend(&t);
    wait_until_blocked(t.url(), pid);
    raw.batch_execute("COMMIT").unwrap();
    assert_claim_lost(writer.join().unwrap(), "test newcomer");
    assert_eq!(groups(&db), 0);
}

/// The pid of the one backend of the test database waiting for a lock.
fn waiting_backend(t: &TestDb) -> i64 {
    let mut conn = t.raw_connection();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows: Vec<N> = with_conn!(&mut conn, |c| diesel::sql_query(
            "SELECT pid::bigint AS n FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        .load(c))
        .unwrap();
        if let Some(r) = rows.first() {
            return r.n;
        }
        assert!(Instant::now() < deadline, "no backend waited for a lock");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn sqlite_path(t: &TestDb) -> PathBuf {
    PathBuf::from(t.url().strip_prefix("sqlite:").unwrap())
}

fn sqlite_url(path: &Path) -> String {
    format!("sqlite:{}", path.display())
}

fn refused(url: &str) {
    let config = DatabaseConfig::parse(url, OpenMode::Writer).unwrap();
    let err = MainProcessClaim::acquire(&config, Duration::ZERO).unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::InUse(_)), "{url}: {err}");
}

/// A symlink to the database file, a symlink to its folder, and other spellings
/// of the path all find the claim already taken; so does the real path once the
/// claim was taken through a symlink.
#[test]
fn sqlite_claim_is_one_whatever_the_path_says() {
    let t = TestDb::sqlite();
    let path = sqlite_path(&t);
    let dir = path.parent().unwrap().to_owned();
    let links = dir.join("links");
    std::fs::create_dir_all(&links).unwrap();
    let file_link = links.join("via-link.db");
    std::os::unix::fs::symlink(&path, &file_link).unwrap();
    let dir_link = links.join("folder");
    std::os::unix::fs::symlink(&dir, &dir_link).unwrap();

    let (claim, _db) = claimed(t.url());
    refused(&sqlite_url(&file_link));
    refused(&sqlite_url(&dir_link.join("test.db")));
    refused(&sqlite_url(&dir.join(".").join("test.db")));
    refused(&sqlite_url(&links.join("..").join("test.db")));
    drop((claim, _db));

    let (_claim, _db) = claimed(&sqlite_url(&file_link));
    refused(t.url());
}

/// A hard link is another name for the file that no path resolution finds: a
/// second claim through it is refused all the same, by the lock on the file
/// itself, and the first holder writes on. (The two-process case is
/// [`sqlite_a_claim_through_a_hard_link_in_another_process_is_refused`].)
#[test]
fn sqlite_a_second_claim_through_a_hard_link_is_refused() {
    let t = TestDb::sqlite();
    let (first_claim, first) = claimed(t.url());
    insert_group(&first, 1).unwrap();
    let path = sqlite_path(&t);
    let link = path.with_file_name("hard-link.db");
    std::fs::hard_link(&path, &link).unwrap();
    refused(&sqlite_url(&link));
    insert_group(&first, 2).unwrap();
    assert_eq!(groups(&first), 2);
    // Let go, the file can be claimed through the link (and then not through
    // its first name).
    drop((first_claim, first));
    let (_second_claim, second) = claimed(&sqlite_url(&link));
    refused(t.url());
    insert_group(&second, 3).unwrap();
    assert_eq!(groups(&second), 3);
}

/// Set in the child process of
/// [`sqlite_a_claim_through_a_hard_link_in_another_process_is_refused`]: the
/// hard link it claims through.
const CHILD_LINK_VAR: &str = "HS_TEST_CLAIM_THROUGH_LINK";

/// A second main process reaching the database through a hard link in another
/// folder is refused while the first holds its claim. SQLite keeps WAL state
/// per name across processes (`test.db-wal` and `hard-link.db-wal`), so the two
/// would not see each other's commits, nor the epoch raised by the other: only a
/// lock on the file itself keeps the second one out. The second process is this
/// test's own executable, run again for this test alone.
#[test]
fn sqlite_a_claim_through_a_hard_link_in_another_process_is_refused() {
    if let Some(link) = std::env::var_os(CHILD_LINK_VAR) {
        return claim_through_link_in_this_process(Path::new(&link));
    }
    let t = TestDb::sqlite();
    let (_claim, db) = claimed(t.url());
    insert_group(&db, 1).unwrap();
    let path = sqlite_path(&t);
    let elsewhere = path.parent().unwrap().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let link = elsewhere.join("hard-link.db");
    std::fs::hard_link(&path, &link).unwrap();

    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "sqlite_a_claim_through_a_hard_link_in_another_process_is_refused",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_LINK_VAR, &link)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&child.stdout),
        String::from_utf8_lossy(&child.stderr)
    );
    assert!(child.status.success(), "the second process failed: {said}");
    assert!(
        said.contains("second main process: refused: in use"),
        "the second main process was not refused: {said}"
    );
    assert!(
        !elsewhere.join("hard-link.db-wal").exists(),
        "the second process opened the database through the link"
    );
    // The first holder writes on, alone.
    insert_group(&db, 2).unwrap();
    assert_eq!(groups(&db), 2);
}

/// The second process: claims the database through `link`, and if it gets
/// the claim, opens it and writes (what a second `hs-main` would do).
fn claim_through_link_in_this_process(link: &Path) {
    let config = DatabaseConfig::parse(&sqlite_url(link), OpenMode::Writer).unwrap();
    match MainProcessClaim::acquire(&config, Duration::ZERO) {
        Err(e) => println!("second main process: refused: {e}"),
        Ok(claim) => {
            let db = Database::open_claimed(config, &claim).unwrap();
            insert_group(&db, 100).unwrap();
            println!(
                "second main process: claimed and wrote through {}",
                link.display()
            );
        }
    }
}

/// The database file deleted under the holder: the next write fails naming the
/// file, and so does a write during which it was deleted, although it committed
/// (to the deleted file): it is not acknowledged. The pool's new connections do
/// not recreate the file.
#[test]
fn sqlite_a_deleted_database_file_stops_the_holder() {
    let t = TestDb::sqlite();
    let path = sqlite_path(&t);
    let (_claim, db) = claimed(t.url());
    insert_group(&db, 1).unwrap();
    let during = db.run_interaction("write_while_deleted", |txn| {
        with_conn!(txn.conn(), |c| diesel::sql_query(
            "INSERT INTO state_groups (id, room_id, event_id) VALUES (2, '!r:test', '$e')"
        )
        .execute(c))?;
        std::fs::remove_file(&path)?;
        Ok(())
    });
    assert_claim_lost(during, "was deleted");
    assert_claim_lost(insert_group(&db, 3), "was deleted");
    // A new connection of the process does not bring the file back empty.
    let err = db.engine().connect().unwrap_err();
    assert!(err.to_string().contains("unable to open"), "{err}");
    assert!(!path.exists());
}

/// The database file replaced (a copy renamed over it) under the holder: the
/// next write fails, naming the file and both identities.
#[test]
fn sqlite_a_replaced_database_file_stops_the_holder() {
    let t = TestDb::sqlite();
    let path = sqlite_path(&t);
    let (_claim, db) = claimed(t.url());
    insert_group(&db, 1).unwrap();
    let copy = path.with_file_name("copy.db");
    std::fs::copy(&path, &copy).unwrap();
    std::fs::rename(&copy, &path).unwrap();
    let err = assert_claim_lost(insert_group(&db, 2), "was replaced");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

/// The claim's session killed with nobody else waiting: the watcher takes the
/// claim again on a new session, writes go on, and a second claimant is
/// still refused.
#[test]
fn postgres_a_claim_session_killed_with_nobody_waiting_is_taken_again() {
    let Some(t) = TestDb::postgres() else { return };
    let (_claim, db) = claimed(t.url());
    insert_group(&db, 1).unwrap();
    let holders = t.claim_sessions();
    assert_eq!(holders.len(), 1, "{holders:?}");
    t.terminate_session(holders[0]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = t.claim_sessions();
        if now.len() == 1 && now[0] != holders[0] {
            break;
        }
        assert!(Instant::now() < deadline, "the claim was not taken again");
        std::thread::sleep(Duration::from_millis(50));
    }
    insert_group(&db, 2).unwrap();
    refused(t.url());
    insert_group(&db, 3).unwrap();
    assert_eq!(groups(&db), 3);
}

/// A server restart seen first by the claim's keeper: every session of the
/// process ended (its pool's idle ones and the claim's), and the keeper took
/// the claim again before any statement of the pool met a dead session. The
/// next write is a batch's statement sent alone, which cannot be sent twice;
/// it still goes through, because the keeper told the pool to check its
/// connections. (Before: "batch_write: unavailable: the database cannot be
/// reached (inserting rows into cache_invalidations, taking 1 stream positions
/// from events_stream_seq: database error: terminating connection due to
/// administrator command)".)
#[test]
fn postgres_a_write_after_a_restart_the_claim_keeper_saw_meets_no_dead_session() {
    let Some(t) = TestDb::postgres() else { return };
    let (_claim, db) = claimed(t.url());
    batch_write(&db, "before").unwrap();
    let claim_before = t.claim_sessions();
    let ended = t.session_pids();
    assert!(ended.len() >= 2, "the pool's and the claim's: {ended:?}");
    for pid in &ended {
        t.terminate_session(*pid);
    }
    // Until every ended session is gone and the keeper holds the claim on a
    // new one, the only session of the database besides ours.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = t.session_pids();
        let claim = t.claim_sessions();
        if claim.len() == 1 && now == claim && !ended.contains(&claim[0]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the claim was not taken again alone: sessions {now:?}, claim {claim:?}, \
             before {claim_before:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    batch_write(&db, "after").unwrap_or_else(|e| panic!("the write after the restart: {e}"));
    assert_eq!(batch_rows(&db), 2);
}

/// The claim's session killed while another session waits for the lock (a
/// newcomer): the newcomer gets it, and the old holder gives up once its grace
/// has passed, without the newcomer raising anything. Its writes meanwhile
/// either commit (the epoch is unchanged, nobody else wrote) or are fenced.
#[test]
fn postgres_a_claim_session_killed_while_another_takes_the_lock_is_lost() {
    let Some(t) = TestDb::postgres() else { return };
    let (_claim, db) = claimed(t.url());
    let mut admin = t.raw_connection();
    let holder = t.claim_sessions()[0];
    let url = t.url().to_owned();
    let (got_tx, got_rx) = std::sync::mpsc::channel();
    let newcomer = std::thread::spawn(move || {
        let mut conn = raw_connection(&url);
        with_conn!(&mut conn, |c| diesel::sql_query(
            "SELECT pg_advisory_lock($1)"
        )
        .bind::<BigInt, _>(storage_core::engine::MAIN_PROCESS_LOCK_KEY)
        .execute(c))
        .unwrap();
        got_tx.send(()).unwrap();
        // Hold the lock (and the session) until the test ends.
        std::thread::sleep(Duration::from_secs(60));
        drop(conn);
    });
    wait_until_blocked(t.url(), i64::from(waiting_pid(&mut admin)));
    t.terminate_session(holder);
    got_rx.recv().unwrap();
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut id = 0;
    let err = loop {
        id += 1;
        match insert_group(&db, id) {
            Ok(()) => {}
            Err(e) => break e,
        }
        assert!(Instant::now() < deadline, "the old holder never gave up");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(err.is_claim_lost(), "{err}");
    assert!(
        err.to_string().contains("has held the claim since"),
        "{err}"
    );
    assert_eq!(groups(&db), id - 1, "the fenced write committed nothing");
    drop(newcomer);
}

#[derive(QueryableByName)]
struct Pid {
    #[diesel(sql_type = Integer)]
    pid: i32,
}

fn waiting_pid(conn: &mut Conn) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows: Vec<Pid> = with_conn!(conn, |c| diesel::sql_query(
            "SELECT pid FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event = 'advisory'"
        )
        .load(c))
        .unwrap();
        if let Some(r) = rows.first() {
            return r.pid;
        }
        assert!(Instant::now() < deadline, "nobody waited for the lock");
        std::thread::sleep(Duration::from_millis(10));
    }
}
