//! A read-only open of an SQLite file that nobody writes (WAL mode, no `-wal`
//! file beside it) reads it as an unchanging file, creating nothing beside
//! it. A writer that comes while such a read runs changes the file under it:
//! the read then fails, saying so, rather than answer from pages of two states
//! of the file; the next read answers what is committed. SQLite only:
//! PostgreSQL has no such open.

use diesel::sql_types::BigInt;
use diesel::{QueryableByName, RunQueryDsl};
use storage_core::testing::TestDb;
use storage_core::{with_conn, Conn, Database, OpenMode, Result};

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

const COUNT: &str = "SELECT COUNT(*) AS n FROM kv WHERE v > 0";

fn count(conn: &mut Conn) -> Result<i64> {
    Ok(with_conn!(conn, |c| diesel::sql_query(COUNT).get_result::<Count>(c))?.n)
}

/// Rewrites most of the table's pages through a writer of its own, which
/// checkpoints them into the file and removes its `-wal` when it closes.
fn a_writer_comes_and_goes(t: &TestDb) {
    let db = t.open();
    db.run_interaction("rewrite", |txn| {
        txn.conn().batch_execute(
            "DELETE FROM kv WHERE k % 3 = 0;
             INSERT INTO kv (v) SELECT v FROM kv;",
        )
    })
    .unwrap();
}

#[test]
fn a_writer_during_a_read_of_an_unchanging_file_fails_the_read() {
    let t = TestDb::sqlite();
    let db = t.open();
    db.run_interaction("fill", |txn| {
        txn.conn().batch_execute(
            "CREATE TABLE kv (k INTEGER PRIMARY KEY, v INTEGER NOT NULL);
             CREATE INDEX kv_v ON kv (v);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000)
             INSERT INTO kv (k, v) SELECT i, i FROM n;",
        )
    })
    .unwrap();
    drop(db);
    let path = t.url().strip_prefix("sqlite:").unwrap().to_owned();
    assert!(!std::path::Path::new(&format!("{path}-wal")).exists());
    let reader: Database = t.open_mode(OpenMode::ReadOnly);

    let snapshot = reader.run_snapshot("a long read", |conn| {
        let before = count(conn)?;
        a_writer_comes_and_goes(&t);
        Ok((before, count(conn)?))
    });
    let err = snapshot.expect_err("a read across a writer's checkpoint");
    assert!(err.to_string().contains("was written while"), "{err}");

    let read = reader.run_read("a short read", |txn| {
        let before = count(txn.conn())?;
        a_writer_comes_and_goes(&t);
        Ok((before, count(txn.conn())?))
    });
    let err = read.expect_err("a read across a writer's checkpoint");
    assert!(err.to_string().contains("was written while"), "{err}");

    // The next read is of the file as the writers left it.
    let now = reader.run_read("after", |txn| count(txn.conn())).unwrap();
    let fresh = t
        .open_mode(OpenMode::ReadOnly)
        .run_read("fresh", |txn| count(txn.conn()))
        .unwrap();
    assert_eq!(now, fresh);
    assert!(!std::path::Path::new(&format!("{path}-shm")).exists());
}
