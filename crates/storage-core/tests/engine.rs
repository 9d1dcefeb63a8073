//! Per-engine behaviour seen from outside: id generation, sequence repair, the
//! SQLite writer lock under contention from another connection, the claim of
//! the one main process.

use diesel::sql_types::BigInt;
use diesel::RunQueryDsl;
use std::sync::mpsc;
use std::time::Duration;
use storage_core::testing::TestDb;
use storage_core::{
    with_conn, Column, Conn, DatabaseConfig, ErrorKind, MainProcessClaim, OpenMode, RowsWrite,
    Sequence, TableRows, TxnOptions,
};

storage_core::engine_tests!(
    ids_are_unique_and_ascending,
    stream_positions_are_taken_under_a_lock_held_to_the_end,
    sequence_behind_table_is_moved_forward,
    one_main_process_claim_at_a_time,
    rows_given_by_column_are_inserted_conflicts_skipped_where_asked,
    a_transaction_begun_with_a_lock_holds_it_to_its_end,
    upserted_and_deleted_rows_change_only_their_rows,
);

const SEQ: Sequence = Sequence {
    name: "state_group_id_seq",
    table: "state_groups",
    column: "id",
};

fn insert_group(conn: &mut Conn, id: i64) {
    with_conn!(conn, |c| diesel::sql_query(
        "INSERT INTO state_groups (id, room_id, event_id) VALUES ($1, '!r:test', '$e')"
    )
    .bind::<BigInt, _>(id)
    .execute(c))
    .unwrap();
}

fn ids_are_unique_and_ascending(t: &TestDb) {
    let db = t.open();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let db = db.clone();
            std::thread::spawn(move || {
                let mut all = Vec::new();
                for _ in 0..25 {
                    let ids = db
                        .run_interaction("alloc", |txn| txn.next_ids(&SEQ, 3))
                        .unwrap();
                    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
                    all.extend(ids);
                }
                all
            })
        })
        .collect();
    let mut all: Vec<i64> = threads
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), n, "duplicate ids handed out");
    assert_eq!(n, 300);
}

/// The events' stream, as the migrations define it.
const STREAM: Sequence = Sequence {
    name: "events_stream_seq",
    table: "events",
    column: "stream_ordering",
};

#[derive(diesel::QueryableByName, Debug, PartialEq)]
struct Invalidation {
    #[diesel(sql_type = BigInt)]
    stream_ordering: i64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    cache_key: String,
}

/// Another connection's attempt at the stream positions lock while a
/// transaction holds it: `true` when it had to give up waiting.
fn stream_lock_is_held(t: &TestDb) -> bool {
    let mut other = t.raw_connection();
    other
        .batch_execute("BEGIN; SET LOCAL lock_timeout = '50ms'")
        .unwrap();
    let waited = other.batch_execute(&format!(
        "SELECT pg_advisory_xact_lock({})",
        storage_core::engine::STREAM_POSITIONS_LOCK_KEY
    ));
    other.batch_execute("ROLLBACK").unwrap();
    match waited {
        Ok(()) => false,
        Err(e) => {
            assert!(format!("{e:?}").contains("lock timeout"), "{e:?}");
            true
        }
    }
}

/// Stream positions, ascending and after those taken before, taken with the
/// stream positions lock that is held until the transaction ends: alone
/// (`stream_positions`), or by the statement inserting the rows they number
/// (`insert_columns_taking_positions`, PostgreSQL: each row of a column of
/// positions its own, in row order, the highest in a column of the highest,
/// and in the NOTIFY's payload; SQLite answers that the caller does it).
fn stream_positions_are_taken_under_a_lock_held_to_the_end(t: &TestDb) {
    let db = t.open();
    let postgres = t.engine() == "postgres";
    let before = db
        .run_interaction("positions", |txn| {
            let taken = txn.stream_positions(&STREAM, 2)?;
            if postgres {
                assert!(stream_lock_is_held(t));
            }
            Ok(taken)
        })
        .unwrap();
    assert_eq!(before.len(), 2);
    assert!(before[0] < before[1], "{before:?}");
    if postgres {
        assert!(!stream_lock_is_held(t), "released at the end");
    }
    let mut listener = postgres.then(|| db.engine().listen("hs_test", "test").unwrap());
    let tables = || {
        vec![
            TableRows::insert(
                "cache_invalidations",
                vec![
                    ("stream_ordering", Column::Position),
                    ("cache_name", Column::Text(vec!["each", "each", "each"])),
                    ("cache_key", Column::Text(vec!["a", "b", "c"])),
                ],
            ),
            TableRows::insert(
                "cache_invalidations",
                vec![
                    ("cache_name", Column::Text(vec!["highest"])),
                    ("stream_ordering", Column::HighestPosition),
                    ("cache_key", Column::Text(vec!["h"])),
                ],
            ),
        ]
    };
    let taken = db
        .run_interaction("insert_taking_positions", |txn| {
            let taken =
                txn.insert_columns_taking_positions(&STREAM, 3, &tables(), "hs_test", " rest")?;
            if postgres {
                assert!(stream_lock_is_held(t));
            }
            Ok(taken)
        })
        .unwrap();
    assert_eq!(taken.len(), 3);
    assert!(taken.windows(2).all(|w| w[0] < w[1]), "{taken:?}");
    assert!(taken[0] > before[1], "{taken:?} after {before:?}");
    if postgres {
        assert!(!stream_lock_is_held(t), "released at the end");
    }
    let rows = db
        .with_connection(|_, c| {
            Ok(with_conn!(c, |c| diesel::sql_query(
                "SELECT stream_ordering, cache_key FROM cache_invalidations ORDER BY cache_key"
            )
            .load::<Invalidation>(c))?)
        })
        .unwrap();
    let row = |p: i64, k: &str| Invalidation {
        stream_ordering: p,
        cache_key: k.into(),
    };
    assert_eq!(
        rows,
        vec![
            row(taken[0], "a"),
            row(taken[1], "b"),
            row(taken[2], "c"),
            row(taken[2], "h")
        ]
    );
    let Some(listener) = listener.as_mut() else {
        return; // SQLite: one process, nobody to notify
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let payload = loop {
        listener.ping().unwrap();
        if let Some(p) = listener.drain().unwrap().pop() {
            break p;
        }
        assert!(std::time::Instant::now() < deadline, "no notification");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(payload, format!("{} rest", taken[2]));
}

/// A database holding groups up to 500 whose sequence says 1 (a port or restore
/// that forgot it): the check at start-up moves it forward, and the next id is 501.
fn sequence_behind_table_is_moved_forward(t: &TestDb) {
    let db = t.open();
    let mut raw = t.raw_connection();
    for id in [1, 17, 500] {
        insert_group(&mut raw, id);
    }
    if t.engine() == "postgres" {
        raw.batch_execute("SELECT setval('state_group_id_seq', 1)")
            .unwrap();
    }
    let repair = db.sync_sequence(&SEQ).unwrap();
    if t.engine() == "postgres" {
        let r = repair.expect("the lagging sequence was repaired");
        assert_eq!((r.was, r.max_id), (1, 500));
    } else {
        assert_eq!(repair, None, "SQLite's counter is seeded from the table");
    }
    let next = db
        .run_interaction("alloc", |txn| txn.next_id(&SEQ))
        .unwrap();
    assert_eq!(next, 501);
    // A second check finds nothing to do.
    assert_eq!(db.sync_sequence(&SEQ).unwrap(), None);
}

/// Another connection holds SQLite's write lock for longer than the busy timeout:
/// the first attempt fails with "database is locked", a retry gets through.
#[test]
fn sqlite_busy_database_is_retried() {
    let t = TestDb::sqlite();
    drop(t.open());
    let mut config = DatabaseConfig::parse(t.url(), OpenMode::Writer).unwrap();
    config.busy_timeout_ms = 100;
    let db = storage_core::Database::open(config).unwrap();

    let (locked_tx, locked_rx) = mpsc::channel();
    let mut other = t.raw_connection();
    let holder = std::thread::spawn(move || {
        other.batch_execute("BEGIN IMMEDIATE").unwrap();
        locked_tx.send(()).unwrap();
        std::thread::sleep(Duration::from_millis(250));
        other.batch_execute("COMMIT").unwrap();
    });
    locked_rx.recv().unwrap();
    let desc = "write_while_locked_by_another_process";
    db.run_interaction(desc, |txn| {
        txn.conn().batch_execute(
            "INSERT INTO state_groups (id, room_id, event_id) VALUES (1, '!r', '$e')",
        )
    })
    .expect("a retry succeeds once the other writer commits");
    holder.join().unwrap();
    let stats = storage_core::metrics::global().txn_stats(desc);
    assert_eq!(stats.committed, 1);
    assert!(stats.retries >= 1, "{stats:?}");
}

/// The bundled SQLite is built for connections used by one thread at a
/// time, as the pool hands them out (`.cargo/config.toml`): no mutex taken
/// around each call into a connection, and no global lock around each
/// allocation to keep memory statistics.
#[test]
fn sqlite_is_built_without_per_call_locks() {
    #[derive(diesel::QueryableByName)]
    struct CompileOption {
        #[diesel(sql_type = diesel::sql_types::Text)]
        compile_options: String,
    }
    let t = TestDb::sqlite();
    let db = t.open();
    let options: Vec<String> = db
        .with_connection(|_, conn| {
            Ok(with_conn!(conn, |c| diesel::sql_query(
                "SELECT compile_options FROM pragma_compile_options"
            )
            .load::<CompileOption>(c))?)
        })
        .unwrap()
        .into_iter()
        .map(|o| o.compile_options)
        .collect();
    for wanted in ["THREADSAFE=2", "DEFAULT_MEMSTATUS=0"] {
        assert!(
            options.iter().any(|o| o == wanted),
            "SQLite was built without {wanted}: {options:?}"
        );
    }
}

/// A writer's SQLite connections leave the sync of the write-ahead log to
/// the checkpoints (`synchronous = NORMAL`, 1) unless configured
/// `SqliteSync::Full` (2: every commit syncs it, so an acknowledged write
/// survives a power loss).
#[test]
fn sqlite_commits_are_synced_when_configured_full() {
    #[derive(diesel::QueryableByName)]
    struct Synchronous {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        synchronous: i32,
    }
    let synchronous = |db: &storage_core::Database| -> i32 {
        db.with_connection(|_, conn| {
            Ok(with_conn!(conn, |c| diesel::sql_query(
                "PRAGMA synchronous"
            )
            .get_result::<Synchronous>(c))?)
        })
        .unwrap()
        .synchronous
    };
    let t = TestDb::sqlite();
    let db = t.open();
    assert_eq!(synchronous(&db), 1, "NORMAL by default");
    drop(db);
    let config = DatabaseConfig::parse(t.url(), OpenMode::Writer)
        .unwrap()
        .with_sqlite_sync(storage_core::SqliteSync::Full);
    let db = storage_core::Database::open(config).unwrap();
    assert_eq!(synchronous(&db), 2, "FULL when configured");
}

/// On SQLite, what write transactions commit reaches the database file
/// through the writer's checkpoint thread shortly after, while the
/// write-ahead log is far smaller than the size at which SQLite would
/// checkpoint inside a COMMIT (1,000 pages by default): commits only append
/// to the log.
#[test]
fn sqlite_commits_are_checkpointed_in_the_background() {
    let t = TestDb::sqlite();
    let db = t.open();
    let storage_core::DatabaseUrl::Sqlite(path) = db.url().clone() else {
        unreachable!("an SQLite test database")
    };
    let before = std::fs::metadata(&path).unwrap().len();
    // About 200 pages of rows, in 20 commits.
    let long_id = "e".repeat(400);
    for tx in 0..20 {
        db.run_interaction("write_rows", |txn| {
            for i in 0..100 {
                txn.conn().batch_execute(&format!(
                    "INSERT INTO state_groups (id, room_id, event_id) \
                     VALUES ({}, '!r:test', '${long_id}')",
                    tx * 100 + i + 1
                ))?;
            }
            Ok(())
        })
        .unwrap();
    }
    let grown = || std::fs::metadata(&path).unwrap().len() >= before + 600 * 1024;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !grown() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        grown(),
        "the database file is still {} bytes ({before} before the writes)",
        std::fs::metadata(&path).unwrap().len()
    );
}

/// A second claim fails (after its wait) with an error naming the database and
/// what to do; once the first is dropped, a new claim succeeds. The claims here
/// are in one process, on separate connections or file handles, as two
/// processes' would be.
fn one_main_process_claim_at_a_time(t: &TestDb) {
    let config = DatabaseConfig::parse(t.url(), OpenMode::Writer).unwrap();
    let first = MainProcessClaim::acquire(&config, Duration::ZERO).unwrap();
    let started = std::time::Instant::now();
    let err = MainProcessClaim::acquire(&config, Duration::from_millis(300)).unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(matches!(err.kind(), ErrorKind::InUse(_)), "{err}");
    let text = err.to_string();
    assert!(text.contains("another main process"), "{text}");
    assert!(text.contains("hs-worker"), "{text}");
    drop(first);
    let again = MainProcessClaim::acquire(&config, Duration::ZERO).unwrap();
    // A claim taken while another waits is handed over once released.
    let waiter = {
        let config = config.clone();
        std::thread::spawn(move || MainProcessClaim::acquire(&config, Duration::from_secs(20)))
    };
    std::thread::sleep(Duration::from_millis(200));
    drop(again);
    waiter.join().unwrap().unwrap();
}

/// `insert_columns`: several tables' rows (on PostgreSQL in one statement),
/// NULLs and all, a conflicting row skipped where asked; in a transaction that
/// rolls back, nothing.
fn rows_given_by_column_are_inserted_conflicts_skipped_where_asked(t: &TestDb) {
    #[derive(diesel::QueryableByName, Debug, PartialEq)]
    struct Edge {
        #[diesel(sql_type = diesel::sql_types::Text)]
        event_id: String,
        #[diesel(sql_type = diesel::sql_types::Text)]
        prev_event_id: String,
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
        room_id: Option<String>,
    }
    let tables = || {
        vec![
            TableRows {
                table: "event_edges",
                columns: vec![
                    ("event_id", Column::Text(vec!["$b", "$b", "$c"])),
                    ("prev_event_id", Column::Text(vec!["$a", "$a", "$b"])),
                    (
                        "room_id",
                        Column::OptText(vec![Some("!r"), Some("!r"), None]),
                    ),
                    ("is_state", Column::Bool(vec![false, false, false])),
                ],
                write: RowsWrite::InsertSkippingConflicts,
            },
            TableRows {
                table: "state_groups",
                columns: vec![
                    ("id", Column::BigInt(vec![7])),
                    ("room_id", Column::Text(vec!["!r"])),
                    ("event_id", Column::Text(vec!["$b"])),
                ],
                write: RowsWrite::Insert,
            },
            // No rows: no part of the statement.
            TableRows {
                table: "event_auth",
                columns: vec![
                    ("event_id", Column::Text(vec![])),
                    ("auth_id", Column::Text(vec![])),
                    ("room_id", Column::Text(vec![])),
                ],
                write: RowsWrite::Insert,
            },
        ]
    };
    let db = t.open();
    let edges = || {
        db.with_connection(|_, c| {
            Ok(with_conn!(c, |c| diesel::sql_query(
                "SELECT event_id, prev_event_id, room_id FROM event_edges ORDER BY event_id"
            )
            .load::<Edge>(c))?)
        })
        .unwrap()
    };
    let failed = db.run_interaction("insert_columns_then_fail", |txn| {
        txn.insert_columns(&tables())?;
        Err::<(), _>(storage_core::Error::other("rolled back"))
    });
    assert!(failed.is_err());
    assert!(edges().is_empty());
    db.run_interaction("insert_columns", |txn| txn.insert_columns(&tables()))
        .unwrap();
    let edge = |e: &str, p: &str, r: Option<&str>| Edge {
        event_id: e.into(),
        prev_event_id: p.into(),
        room_id: r.map(Into::into),
    };
    assert_eq!(
        edges(),
        vec![edge("$b", "$a", Some("!r")), edge("$c", "$b", None)]
    );
    // The table that asked for no skipping fails the statement on a conflict.
    let again = db.run_interaction("insert_columns_again", |txn| txn.insert_columns(&tables()));
    assert!(again.is_err(), "{again:?}");
}

/// `TxnOptions::locking`: the table is locked from BEGIN until the
/// transaction ends (on PostgreSQL another transaction's LOCK of it waits;
/// on SQLite every write transaction excludes the others anyway), and
/// `lock_table` of the same table inside it costs nothing more.
fn a_transaction_begun_with_a_lock_holds_it_to_its_end(t: &TestDb) {
    let db = t.open();
    db.run_interaction_with("locked", TxnOptions::locking("events"), |txn| {
        txn.lock_table("events")?;
        if t.engine() != "postgres" {
            return Ok(());
        }
        let mut other = t.raw_connection();
        other.batch_execute("BEGIN; SET LOCAL lock_timeout = '50ms'")?;
        let waited = other.batch_execute("LOCK TABLE events IN EXCLUSIVE MODE");
        let text = format!("{:?}", waited);
        assert!(text.contains("lock timeout"), "{text}");
        other.batch_execute("ROLLBACK")?;
        Ok(())
    })
    .unwrap();
    // Released at the end: taken at once now.
    if t.engine() == "postgres" {
        let mut other = t.raw_connection();
        other
            .batch_execute("BEGIN; SET LOCAL lock_timeout = '1s'; LOCK TABLE events IN EXCLUSIVE MODE; ROLLBACK")
            .unwrap();
    }
}

#[derive(diesel::QueryableByName, Debug, PartialEq)]
struct Slot {
    #[diesel(sql_type = diesel::sql_types::Text)]
    state_key: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    event_id: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    membership: Option<String>,
}

/// `RowsWrite::Upsert` and `RowsWrite::Delete` in one statement (a room's
/// current state changing): a deleted slot goes, an existing slot gets the
/// new event and membership, a new slot is inserted, the rest stays; then
/// two slots deleted at once.
fn upserted_and_deleted_rows_change_only_their_rows(t: &TestDb) {
    let db = t.open();
    let slots = || -> Vec<(String, String, Option<String>)> {
        db.with_connection(|_, c| {
            Ok(with_conn!(c, |c| diesel::sql_query(
                "SELECT state_key, event_id, membership FROM current_state_events \
                 ORDER BY state_key"
            )
            .load::<Slot>(c))?)
        })
        .unwrap()
        .into_iter()
        .map(|s| (s.state_key, s.event_id, s.membership))
        .collect()
    };
    let member = |k: &str, e: &str, m: &str| (k.to_owned(), e.to_owned(), Some(m.to_owned()));
    let write = |deleted: Vec<&'static str>,
                 upserted: Vec<(&'static str, &'static str, &'static str)>| {
        db.run_interaction("change_current_state", move |txn| {
            txn.insert_columns(&[
                TableRows {
                    table: "current_state_events",
                    columns: vec![
                        (
                            "room_id",
                            Column::Text(deleted.iter().map(|_| "!r").collect()),
                        ),
                        (
                            "type",
                            Column::Text(deleted.iter().map(|_| "m.room.member").collect()),
                        ),
                        ("state_key", Column::Text(deleted.clone())),
                    ],
                    write: RowsWrite::Delete,
                },
                TableRows {
                    table: "current_state_events",
                    columns: vec![
                        (
                            "event_id",
                            Column::Text(upserted.iter().map(|u| u.1).collect()),
                        ),
                        (
                            "room_id",
                            Column::Text(upserted.iter().map(|_| "!r").collect()),
                        ),
                        (
                            "type",
                            Column::Text(upserted.iter().map(|_| "m.room.member").collect()),
                        ),
                        (
                            "state_key",
                            Column::Text(upserted.iter().map(|u| u.0).collect()),
                        ),
                        (
                            "membership",
                            Column::OptText(upserted.iter().map(|u| Some(u.2)).collect()),
                        ),
                    ],
                    write: RowsWrite::Upsert {
                        key: &["room_id", "type", "state_key"],
                    },
                },
            ])
        })
        .unwrap()
    };
    write(
        vec![],
        vec![
            ("@a", "$a1", "join"),
            ("@b", "$b1", "join"),
            ("@c", "$c1", "join"),
        ],
    );
    assert_eq!(
        slots(),
        vec![
            member("@a", "$a1", "join"),
            member("@b", "$b1", "join"),
            member("@c", "$c1", "join")
        ]
    );
    write(
        vec!["@a"],
        vec![("@b", "$b2", "leave"), ("@d", "$d1", "invite")],
    );
    assert_eq!(
        slots(),
        vec![
            member("@b", "$b2", "leave"),
            member("@c", "$c1", "join"),
            member("@d", "$d1", "invite")
        ]
    );
    // Several rows deleted in one statement (on SQLite one row has its own
    // shape of statement).
    write(vec!["@b", "@d"], vec![]);
    assert_eq!(slots(), vec![member("@c", "$c1", "join")]);
}
