//! Migrations and open modes, on SQLite and PostgreSQL.

use diesel::sql_types::{BigInt, Text};
use diesel::{QueryableByName, RunQueryDsl};
use storage_core::testing::TestDb;
use storage_core::{with_conn, ErrorKind, OpenMode};

storage_core::engine_tests!(
    migrations_apply_to_empty_database_then_are_a_no_op,
    newer_schema_is_refused,
    replica_refuses_unmigrated_database,
    read_only_open_runs_no_migration,
);

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn count(db: &storage_core::Database, sql: &str) -> i64 {
    db.run_read("count", |txn| {
        Ok(with_conn!(txn.conn(), |c| diesel::sql_query(sql)
            .get_result::<Count>(c))?
        .n)
    })
    .unwrap()
}

fn migrations_apply_to_empty_database_then_are_a_no_op(t: &TestDb) {
    let db = t.open();
    let applied = count(&db, "SELECT COUNT(*) AS n FROM __diesel_schema_migrations");
    assert!(applied >= 1);
    // Every table of the state layer is there, empty.
    for table in [
        "state_groups",
        "state_groups_state",
        "state_group_edges",
        "event_to_state_groups",
        "current_state_events",
    ] {
        assert_eq!(
            count(&db, &format!("SELECT COUNT(*) AS n FROM {table}")),
            0,
            "{table}"
        );
    }
    // On PostgreSQL no function of ours is left: the statements prove the
    // claim and take stream positions in plain SQL, and a function nothing
    // calls is dropped, not left to drift.
    if t.engine() == "postgres" {
        #[derive(QueryableByName)]
        struct Function {
            #[diesel(sql_type = Text)]
            proname: String,
        }
        let functions: Vec<String> = db
            .run_read("functions", |txn| {
                Ok(with_conn!(txn.conn(), |c| diesel::sql_query(
                    "SELECT proname::text AS proname FROM pg_proc \
                     WHERE pronamespace = 'public'::regnamespace ORDER BY proname"
                )
                .load::<Function>(c))?)
            })
            .unwrap()
            .into_iter()
            .map(|f| f.proname)
            .collect();
        assert_eq!(functions, Vec::<String>::new());
    }
    // Running them again applies nothing, and reopening neither.
    let again = db.with_connection(|e, c| e.migrate(c)).unwrap();
    assert_eq!(again, Vec::<String>::new());
    drop(db);
    let db = t.open();
    assert_eq!(
        count(&db, "SELECT COUNT(*) AS n FROM __diesel_schema_migrations"),
        applied
    );
}

fn newer_schema_is_refused(t: &TestDb) {
    let db = t.open();
    db.run_interaction("pretend_a_newer_binary_migrated", |txn| {
        with_conn!(txn.conn(), |c| diesel::sql_query(
            "INSERT INTO __diesel_schema_migrations (version) VALUES ($1)"
        )
        .bind::<Text, _>("29991231000000")
        .execute(c))?;
        Ok(())
    })
    .unwrap();
    drop(db);
    for mode in [OpenMode::Writer, OpenMode::Replica] {
        let err = t.try_open(mode).unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::SchemaTooNew { unknown } if unknown == &["29991231000000"]),
            "{err}"
        );
        assert!(err.to_string().contains("newer than this binary"), "{err}");
    }
}

fn replica_refuses_unmigrated_database(t: &TestDb) {
    // A replica never migrates: on a database the main process has not set up,
    // it stops with an error that says what to do.
    let err = t.try_open(OpenMode::Replica).unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::SchemaTooOld { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("start the main process"), "{err}");
    // Once migrated, it opens.
    drop(t.open());
    t.try_open(OpenMode::Replica)
        .expect("a replica opens a migrated database");
}

fn read_only_open_runs_no_migration(t: &TestDb) {
    if t.engine() == "sqlite" {
        // No file: nothing is created.
        let err = t.try_open(OpenMode::ReadOnly).unwrap_err();
        assert!(
            err.is_not_found() || err.to_string().contains("no SQLite database"),
            "{err}"
        );
        let path = t.url().trim_start_matches("sqlite:");
        assert!(!std::path::Path::new(path).exists());
    }
    // A database someone else made, without our migrations table.
    t.raw_connection()
        .batch_execute("CREATE TABLE foreign_table (x INTEGER)")
        .unwrap();
    let db = t.open_mode(OpenMode::ReadOnly);
    assert_eq!(count(&db, "SELECT COUNT(*) AS n FROM foreign_table"), 0);
    // Writes are refused.
    let err = db
        .run_interaction("write_through_read_only", |txn| {
            txn.conn()
                .batch_execute("INSERT INTO foreign_table (x) VALUES (1)")
        })
        .unwrap_err();
    assert!(err.database_error().is_some(), "{err}");
    // And no migrations table appeared.
    let mut raw = t.raw_connection();
    let err = raw.batch_execute("SELECT 1 FROM __diesel_schema_migrations");
    assert!(
        err.is_err(),
        "a read-only open created the migrations table"
    );
}
