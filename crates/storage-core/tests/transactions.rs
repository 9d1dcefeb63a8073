//! run_interaction: commit hooks, exception hooks, retries. Each test runs on
//! SQLite and on PostgreSQL.

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::{BigInt, Text};
use diesel::{QueryableByName, RunQueryDsl};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use storage_core::cache::LruCache;
use storage_core::testing::TestDb;
use storage_core::{
    with_conn, Column, Conn, Database, DatabaseConfig, Error, OpenMode, Sequence, TableRows,
    Transaction, TxnOptions,
};

storage_core::engine_tests!(
    call_after_runs_only_after_commit,
    call_after_sees_committed_data_from_another_connection,
    call_on_exception_runs_on_failure_only,
    retried_attempt_callbacks_never_run,
    persistent_retryable_failure_gives_up_with_context,
    non_retryable_error_is_not_retried,
    concurrent_serializable_conflict_retries_once,
    a_batch_transaction_with_a_statement_before_its_batch_is_one_transaction,
    a_seeking_read_plans_for_seeks_on_its_own_sessions_only,
);

#[derive(QueryableByName)]
struct Value {
    #[diesel(sql_type = BigInt)]
    v: i64,
}

fn setup(t: &TestDb) -> Database {
    let db = t.open();
    db.run_interaction("create_test_table", |txn| {
        txn.conn()
            .batch_execute("CREATE TABLE core_test_kv (k TEXT PRIMARY KEY, v BIGINT NOT NULL)")
    })
    .expect("creating the test table");
    db
}

fn insert(txn: &mut Transaction<'_>, k: &str, v: i64) -> storage_core::Result<()> {
    with_conn!(txn.conn(), |c| diesel::sql_query(
        "INSERT INTO core_test_kv (k, v) VALUES ($1, $2)"
    )
    .bind::<Text, _>(k)
    .bind::<BigInt, _>(v)
    .execute(c))?;
    Ok(())
}

fn read_on(conn: &mut Conn, k: &str) -> Option<i64> {
    fetch(conn, k).expect("reading the test table")
}

fn fetch(conn: &mut Conn, k: &str) -> storage_core::Result<Option<i64>> {
    let rows: Vec<Value> = with_conn!(conn, |c| diesel::sql_query(
        "SELECT v FROM core_test_kv WHERE k = $1"
    )
    .bind::<Text, _>(k)
    .load(c))?;
    Ok(rows.first().map(|r| r.v))
}

fn read(db: &Database, k: &str) -> Option<i64> {
    db.run_read("read_test_table", |txn| Ok(read_on(txn.conn(), k)))
        .unwrap()
}

/// An error as the database reports a serialization failure (SQLSTATE 40001).
fn serialization_failure() -> Error {
    DieselError::DatabaseError(
        DatabaseErrorKind::SerializationFailure,
        Box::new("could not serialize access (injected)".to_string()),
    )
    .into()
}

fn call_after_runs_only_after_commit(t: &TestDb) {
    let db = setup(t);
    let cache: Arc<LruCache<String, i64>> = Arc::new(LruCache::new("test_prefill", 10));

    // A transaction that fails after registering a prefill: the prefill never lands.
    let result: storage_core::Result<()> = db.run_interaction("failing_prefill", |txn| {
        insert(txn, "k1", 1)?;
        let c = cache.clone();
        txn.call_after(move || c.insert("k1".into(), 1));
        Err(Error::other("the caller changed its mind"))
    });
    assert!(result.is_err());
    assert_eq!(cache.peek(&"k1".to_string()), None);
    assert_eq!(
        read(&db, "k1"),
        None,
        "the failed transaction's row is gone"
    );

    // The same prefill in a transaction that commits lands after the commit, not
    // while the transaction is still open.
    db.run_interaction("committing_prefill", |txn| {
        insert(txn, "k2", 2)?;
        let c = cache.clone();
        txn.call_after(move || c.insert("k2".into(), 2));
        assert_eq!(cache.peek(&"k2".to_string()), None, "not before commit");
        Ok(())
    })
    .unwrap();
    assert_eq!(cache.peek(&"k2".to_string()), Some(2));
}

fn call_after_sees_committed_data_from_another_connection(t: &TestDb) {
    let db = setup(t);
    let seen = Arc::new(Mutex::new(Vec::new()));
    // The callback runs on this thread; a second connection outside the pool stands
    // for another process looking at the database.
    let other = Arc::new(Mutex::new(t.raw_connection()));
    db.run_interaction("visible_to_others", |txn| {
        insert(txn, "k", 42)?;
        let (seen, other) = (seen.clone(), other.clone());
        txn.call_after(move || {
            let v = read_on(&mut other.lock().unwrap(), "k");
            seen.lock().unwrap().push(v);
        });
        Ok(())
    })
    .unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![Some(42)]);
}

fn call_on_exception_runs_on_failure_only(t: &TestDb) {
    let db = setup(t);
    let after = Arc::new(AtomicU32::new(0));
    let exception = Arc::new(AtomicU32::new(0));
    let register = |txn: &mut Transaction<'_>| {
        let (a, e) = (after.clone(), exception.clone());
        txn.call_after(move || {
            a.fetch_add(1, Ordering::SeqCst);
        });
        txn.call_on_exception(move || {
            e.fetch_add(1, Ordering::SeqCst);
        });
    };

    db.run_interaction("succeeds", |txn| {
        register(txn);
        insert(txn, "ok", 1)
    })
    .unwrap();
    assert_eq!(after.load(Ordering::SeqCst), 1);
    assert_eq!(exception.load(Ordering::SeqCst), 0);

    let err = db
        .run_interaction("fails", |txn| {
            register(txn);
            insert(txn, "ok", 2) // duplicate key: not retryable
        })
        .unwrap_err();
    assert!(err.to_string().starts_with("fails: "), "{err}");
    assert_eq!(after.load(Ordering::SeqCst), 1);
    assert_eq!(exception.load(Ordering::SeqCst), 1);
}

fn retried_attempt_callbacks_never_run(t: &TestDb) {
    let db = setup(t);
    let ran = Arc::new(Mutex::new(Vec::new()));
    let exceptions = Arc::new(Mutex::new(Vec::new()));
    let value = db
        .run_interaction("retry_once", |txn| {
            let attempt = txn.attempt();
            insert(txn, &format!("attempt-{attempt}"), i64::from(attempt))?;
            let r = ran.clone();
            txn.call_after(move || r.lock().unwrap().push(attempt));
            let e = exceptions.clone();
            txn.call_on_exception(move || e.lock().unwrap().push(attempt));
            if attempt == 1 {
                return Err(serialization_failure());
            }
            Ok(attempt)
        })
        .unwrap();
    assert_eq!(value, 2);
    assert_eq!(
        *ran.lock().unwrap(),
        vec![2],
        "only the committed attempt's callback"
    );
    assert_eq!(
        *exceptions.lock().unwrap(),
        vec![1],
        "the rolled-back attempt cleans up"
    );
    assert_eq!(read(&db, "attempt-1"), None, "attempt 1 was rolled back");
    assert_eq!(read(&db, "attempt-2"), Some(2));
}

fn persistent_retryable_failure_gives_up_with_context(t: &TestDb) {
    let db = setup(t);
    let attempts = AtomicU32::new(0);
    let after = Arc::new(AtomicU32::new(0));
    let err = db
        .run_interaction("always_conflicts", |txn| {
            attempts.fetch_add(1, Ordering::SeqCst);
            let a = after.clone();
            txn.call_after(move || {
                a.fetch_add(1, Ordering::SeqCst);
            });
            Err::<(), _>(serialization_failure())
        })
        .unwrap_err();
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        1 + storage_core::MAX_RETRIES
    );
    assert_eq!(after.load(Ordering::SeqCst), 0);
    let text = err.to_string();
    assert!(
        text.contains("always_conflicts (after 6 attempts)"),
        "{text}"
    );
    assert!(text.contains("could not serialize access"), "{text}");
    // The backtrace points into this test, where the error was made.
    let backtrace = err.backtrace().to_string();
    assert!(backtrace.contains("serialization_failure"), "{backtrace}");
}

fn non_retryable_error_is_not_retried(t: &TestDb) {
    let db = setup(t);
    let attempts = AtomicU32::new(0);
    db.run_interaction("seed", |txn| insert(txn, "dup", 1))
        .unwrap();
    let err = db
        .run_interaction("duplicate_insert", |txn| {
            attempts.fetch_add(1, Ordering::SeqCst);
            insert(txn, "dup", 2)
        })
        .unwrap_err();
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
    assert!(matches!(
        err.database_error(),
        Some(DieselError::DatabaseError(
            DatabaseErrorKind::UniqueViolation,
            _
        ))
    ));
    assert_eq!(read(&db, "dup"), Some(1));
}

/// Two transactions that each read what the other writes. On PostgreSQL both run
/// SERIALIZABLE and the server aborts one with 40001 for real; on SQLite the
/// writer lock serialises them, so the conflict is injected into the first
/// attempt of one of them. Either way: the conflicting attempt's callbacks never
/// run, each transaction's committed attempt runs its callbacks exactly once.
fn concurrent_serializable_conflict_retries_once(t: &TestDb) {
    let db = setup(t);
    let log = Arc::new(Mutex::new(Vec::new()));
    let postgres = t.engine() == "postgres";
    let barrier = Arc::new(Barrier::new(2));
    let threads: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|who| {
            let (db, log, barrier) = (db.clone(), log.clone(), barrier.clone());
            std::thread::spawn(move || {
                db.run_interaction_with("write_skew", TxnOptions::serializable(), |txn| {
                    let attempt = txn.attempt();
                    let count: Value = with_conn!(txn.conn(), |c| diesel::sql_query(
                        "SELECT COUNT(*) AS v FROM core_test_kv"
                    )
                    .get_result(c))?;
                    if postgres && attempt == 1 {
                        // Both have read before either writes.
                        barrier.wait();
                    }
                    insert(txn, &format!("{who}-{}", count.v), count.v)?;
                    if !postgres && who == "a" && attempt == 1 {
                        return Err(serialization_failure());
                    }
                    let log = log.clone();
                    txn.call_after(move || log.lock().unwrap().push((who, attempt)));
                    Ok(attempt)
                })
            })
        })
        .collect();
    let attempts: Vec<u32> = threads
        .into_iter()
        .map(|h| {
            h.join()
                .unwrap()
                .expect("both transactions commit eventually")
        })
        .collect();
    assert_eq!(
        attempts.iter().filter(|a| **a == 1).count(),
        1,
        "{attempts:?}"
    );
    assert_eq!(
        attempts.iter().filter(|a| **a == 2).count(),
        1,
        "{attempts:?}"
    );
    let mut log = log.lock().unwrap().clone();
    log.sort();
    let expected: Vec<(&str, u32)> = vec![("a", attempts[0]), ("b", attempts[1])];
    assert_eq!(
        log, expected,
        "one callback per transaction, from its committed attempt"
    );
    // The loser saw the winner's row when it retried.
    let rows: Value = db
        .run_read("count", |txn| {
            Ok(with_conn!(txn.conn(), |c| diesel::sql_query(
                "SELECT COUNT(*) AS v FROM core_test_kv WHERE k IN ('a-0', 'b-0', 'a-1', 'b-1')"
            )
            .get_result(c))?)
        })
        .unwrap();
    assert_eq!(rows.v, 2);
}

/// A batch's transaction ([`TxnOptions::batch`], whose BEGIN PostgreSQL
/// defers in case its batch statement is all it sends) that sends a
/// statement before that statement begins there: both commit together, or,
/// when the transaction fails after them, neither does.
fn a_batch_transaction_with_a_statement_before_its_batch_is_one_transaction(t: &TestDb) {
    const STREAM: Sequence = Sequence {
        name: "events_stream_seq",
        table: "events",
        column: "stream_ordering",
    };
    let db = setup(t);
    let positions = |db: &Database| {
        db.run_read("count_positions", |txn| {
            Ok(with_conn!(txn.conn(), |c| diesel::sql_query(
                "SELECT COUNT(*) AS v FROM cache_invalidations WHERE cache_name = 'kv'"
            )
            .get_result::<Value>(c))?
            .v)
        })
        .unwrap()
    };
    let write = |k: &'static str, fail: bool| {
        db.run_interaction_with("batch_after_a_statement", TxnOptions::batch(), |txn| {
            insert(txn, k, 1)?;
            let tables = || {
                vec![TableRows::insert(
                    "cache_invalidations",
                    vec![
                        ("stream_ordering", Column::Position),
                        ("cache_name", Column::Text(vec!["kv"])),
                        ("cache_key", Column::Text(vec![k])),
                    ],
                )]
            };
            txn.insert_columns_taking_positions(&STREAM, 1, &tables(), "hs_test", "")?;
            if fail {
                return Err(Error::other("failing after the batch's statement"));
            }
            Ok(())
        })
    };
    write("kept", false).unwrap();
    assert_eq!(read(&db, "kept"), Some(1));
    assert_eq!(positions(&db), 1);
    write("dropped", true).unwrap_err();
    assert_eq!(read(&db, "dropped"), None, "rolled back with the batch");
    assert_eq!(positions(&db), 1, "the batch's rows rolled back too");
}

#[derive(QueryableByName)]
struct PlannerSettings {
    #[diesel(sql_type = Text)]
    seqscan: String,
    #[diesel(sql_type = Text)]
    plan_cache: String,
}

/// PostgreSQL's planner settings where the transaction runs, `None` on SQLite
/// (no planner settings: a seeking read there is a read like any other).
fn planner_settings(txn: &mut Transaction<'_>) -> storage_core::Result<Option<(String, String)>> {
    match txn.conn() {
        Conn::Postgres(c) => {
            let s = diesel::sql_query(
                "SELECT current_setting('enable_seqscan') AS seqscan, \
                     current_setting('plan_cache_mode') AS plan_cache",
            )
            .get_result::<PlannerSettings>(c)?;
            Ok(Some((s.seqscan, s.plan_cache)))
        }
        Conn::Sqlite(_) => Ok(None),
    }
}

fn a_seeking_read_plans_for_seeks_on_its_own_sessions_only(t: &TestDb) {
    let db = setup(t);
    db.run_interaction("seed", |txn| insert(txn, "a", 1))
        .unwrap();
    let postgres = t.engine() == "postgres";
    let defaults = || {
        db.run_read("plain_read", planner_settings)
            .unwrap()
            .map(|(seqscan, plan_cache)| {
                assert_eq!(seqscan, "on", "sequential scans allowed outside");
                assert_eq!(plan_cache, "auto");
            })
    };
    assert_eq!(defaults().is_some(), postgres);
    let (settings, v) = db
        .run_interaction_with("seeking_read", TxnOptions::read_seeking(), |txn| {
            Ok((planner_settings(txn)?, read_on(txn.conn(), "a")))
        })
        .unwrap();
    assert_eq!(v, Some(1), "the seeking read reads");
    if postgres {
        assert_eq!(
            settings,
            Some(("off".to_owned(), "force_generic_plan".to_owned()))
        );
        let written =
            db.run_interaction_with("seeking_read_writes", TxnOptions::read_seeking(), |txn| {
                insert(txn, "b", 2)
            });
        assert!(
            written.is_err(),
            "the server refuses a seeking read's writes"
        );
    }
    // Where the engine has sessions of its own for seeking reads
    // (PostgreSQL), such a read sends no BEGIN: each of its statements sees
    // what was committed before it, here a write committed between two of
    // them. Elsewhere the read is a transaction with one snapshot.
    let (before, after) = db
        .run_interaction_with("seeking_read_alone", TxnOptions::read_seeking(), |txn| {
            let before = read_on(txn.conn(), "c");
            db.run_interaction("between", |w| insert(w, "c", 3))?;
            Ok((before, read_on(txn.conn(), "c")))
        })
        .unwrap();
    assert_eq!(before, None);
    assert_eq!(
        after,
        postgres.then_some(3),
        "a seeking read's statements stand alone on PostgreSQL only"
    );
    // Settings for those sessions only: every connection of the pool has its
    // defaults (the pool's connections taken one after another).
    for _ in 0..4 {
        defaults();
    }
}

/// What a PostgreSQL restart does to an open pool: every pooled session is
/// ended by the server, and neither the pool nor diesel knows until a
/// statement fails on one. A read, a seeking read and a write each still
/// succeed: the failed read runs again, and so does the write, whose BEGIN was
/// all it sent; the other connections opened before the loss are checked
/// before use. The pool holds more of them than a transaction has retries.
/// (Before: "get_test: unavailable: the database cannot be reached
/// (beginning the transaction: ... server closed the connection unexpectedly".
/// A batch's transaction, whose BEGIN waits for its first statement, failed
/// so until a failed deferred BEGIN counted as sending nothing: "pool of 10,
/// round 4: batch: batch_test: unavailable: the database cannot be reached
/// (beginning the transaction: ...".)
#[test]
fn a_restarted_server_fails_no_transaction() {
    let Some(t) = TestDb::postgres() else {
        return;
    };
    restarts_under_a_pool_of(&t, storage_core::MAX_RETRIES + 5);
    // A pool of one: the dead connection is given back before another is taken.
    // (Before, after 30 s: "pool of 1, round 0: write: write_test: connection
    // pool: timed out waiting for connection".)
    restarts_under_a_pool_of(&t.fresh(), 1);
}

fn restarts_under_a_pool_of(t: &TestDb, pool: u32) {
    let mut config = DatabaseConfig::parse(t.url(), OpenMode::Writer).unwrap();
    config.pool_size = pool;
    config.min_idle = pool;
    let db = Database::open(config).unwrap();
    db.run_interaction("create_test_table", |txn| {
        txn.conn()
            .batch_execute("CREATE TABLE core_test_kv (k TEXT PRIMARY KEY, v BIGINT NOT NULL)")
    })
    .unwrap();
    let seeking_read = |k: &str| {
        db.run_interaction_with("seeking_read", TxnOptions::read_seeking(), |txn| {
            fetch(txn.conn(), k)
        })
    };
    for round in 0..5i64 {
        // Every connection of the pool open and idle (the pool reopens those
        // it discarded), so that each is ended.
        t.wait_for_sessions("the pool's connections opening", |n| n >= pool as usize);
        t.end_every_session();
        // Each in turn is the first to meet a dead session: the write, a read,
        // a seeking read, the health check, a batch's write whose deferred
        // BEGIN is all it sent.
        let read = |k: &str| db.run_read("read_test", |txn| fetch(txn.conn(), k));
        match round {
            0 => {}
            1 => assert_eq!(read("k0").unwrap(), Some(0), "round {round}: read"),
            2 => assert_eq!(seeking_read("k0").unwrap(), Some(0), "round {round}: seek"),
            3 => db
                .check_reachable(std::time::Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("pool of {pool}, round {round}: health: {e}")),
            _ => {
                db.run_interaction_with("batch_test", TxnOptions::batch(), |txn| {
                    insert(txn, "batch", round)
                })
                .unwrap_or_else(|e| panic!("pool of {pool}, round {round}: batch: {e}"));
                assert_eq!(read("batch").unwrap(), Some(round), "round {round}: batch");
            }
        }
        let key = format!("k{round}");
        db.run_interaction("write_test", |txn| insert(txn, &key, round))
            .unwrap_or_else(|e| panic!("pool of {pool}, round {round}: write: {e}"));
        assert_eq!(read(&key).unwrap(), Some(round), "round {round}: read back");
        assert_eq!(
            seeking_read(&key).unwrap(),
            Some(round),
            "round {round}: seek back"
        );
    }
}

/// What may run again after the server ended the session, and what may not:
/// a write whose session ended after its BEGIN may have committed (here it
/// did not), so it runs once and its caller hears that the database could not
/// be reached; a read runs again.
#[test]
fn a_write_cut_after_its_begin_runs_once_and_a_read_again() {
    let Some(t) = TestDb::postgres() else {
        return;
    };
    let db = setup(&t);
    let end_own_session = |txn: &mut Transaction<'_>| -> storage_core::Result<()> {
        with_conn!(txn.conn(), |c| diesel::sql_query(
            "SELECT pg_terminate_backend(pg_backend_pid())"
        )
        .execute(c))?;
        Ok(())
    };
    let writes = AtomicU32::new(0);
    let err = db
        .run_interaction("cut_write", |txn| {
            writes.fetch_add(1, Ordering::SeqCst);
            insert(txn, "cut", 1)?;
            end_own_session(txn)
        })
        .unwrap_err();
    assert_eq!(
        writes.load(Ordering::SeqCst),
        1,
        "the write ran again: {err}"
    );
    assert!(
        matches!(err.kind(), storage_core::ErrorKind::Unavailable(_)),
        "{err}"
    );
    assert_eq!(read(&db, "cut"), None, "nothing of the write stayed");
    let reads = AtomicU32::new(0);
    let v = db
        .run_read("cut_read", |txn| {
            if reads.fetch_add(1, Ordering::SeqCst) == 0 {
                end_own_session(txn)?;
            }
            fetch(txn.conn(), "cut")
        })
        .unwrap();
    assert_eq!(
        (reads.load(Ordering::SeqCst), v),
        (2, None),
        "the read ran again"
    );
}

/// A database that turns read-only under a writer (a failover to a standby,
/// or an operator's `default_transaction_read_only`): a write transaction and
/// the taking of ids both fail as unavailable, saying that the database takes
/// no writes and what to do, and keep nothing; reads go on. A connection that
/// was refused a write is replaced: a database setting reaches only sessions
/// started after it, so once the database takes writes again, the write after
/// the one that met the last read-only session goes through. (Before:
/// "write_test (after 2 attempts): database error: cannot execute INSERT in a
/// read-only transaction", an error of no kind, answered 500.)
#[test]
fn a_database_turned_read_only_refuses_writes_as_unavailable() {
    let Some(t) = TestDb::postgres() else {
        return;
    };
    // One connection, so which session each statement meets is known.
    let mut config = DatabaseConfig::parse(t.url(), OpenMode::Writer).unwrap();
    config.pool_size = 1;
    config.min_idle = 1;
    let db = Database::open(config).unwrap();
    db.run_interaction("create_test_table", |txn| {
        txn.conn()
            .batch_execute("CREATE TABLE core_test_kv (k TEXT PRIMARY KEY, v BIGINT NOT NULL)")
    })
    .unwrap();
    db.run_interaction("write_test", |txn| insert(txn, "before", 1))
        .unwrap();
    let set_read_only = |on: &str| {
        let mut admin = t.raw_connection();
        // Apart: one query string would be one transaction, begun read-only.
        admin
            .batch_execute("SET default_transaction_read_only = off")
            .unwrap();
        admin
            .batch_execute(&format!(
                "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET \
                 default_transaction_read_only = {on}', current_database()); END $$"
            ))
            .unwrap();
    };
    set_read_only("on");
    // As a failover does: the sessions end, and new ones start read-only.
    t.end_every_session();
    let sequence = Sequence {
        name: "state_group_id_seq",
        table: "state_groups",
        column: "id",
    };
    let write = |k: &str, v: i64| db.run_interaction("write_test", |txn| insert(txn, k, v));
    let assert_refused = |result: storage_core::Result<()>, what: &str| {
        let err = result.expect_err(what);
        assert!(
            matches!(err.kind(), storage_core::ErrorKind::Unavailable(_)),
            "{what}: {err}"
        );
        assert!(
            err.to_string().contains("takes no writes: it is read-only"),
            "{what}: {err}"
        );
    };
    assert_refused(write("during", 2), "a write");
    assert_refused(db.next_ids(&sequence, 1).map(drop), "taking ids");
    assert_eq!(read(&db, "before"), Some(1), "reads go on");
    assert_eq!(read(&db, "during"), None, "nothing of the write was kept");
    // Writable again; the pool's one session started read-only.
    set_read_only("off");
    assert_refused(write("after", 3), "the last read-only session");
    write("after", 3).unwrap();
    assert_eq!(read(&db, "after"), Some(3));
}
