//! Throwaway databases for tests, on both engines.
//!
//! SQLite tests use a real file in a fresh temporary folder. PostgreSQL tests create
//! a fresh database on the server named by `HS_TEST_POSTGRES_URL` (set by
//! `cargo xtask test`, which starts that server) and drop it afterwards. Without
//! that variable, PostgreSQL tests are skipped with a note, except under CI, where
//! a skipped engine would hide a failure and so fails the test.

use crate::config::{DatabaseConfig, OpenMode};
use crate::database::Database;
use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection, RunQueryDsl};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// The variable holding the URL of a PostgreSQL maintenance database for tests.
pub const POSTGRES_URL_VAR: &str = "HS_TEST_POSTGRES_URL";

static NEXT: AtomicU64 = AtomicU64::new(0);

fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{prefix}_{}_{}_{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Replaces the database name in a PostgreSQL URL (`scheme://auth@host/DB?params`).
pub fn postgres_url_with_database(url: &str, database: &str) -> String {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let host_part = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    format!("{host_part}/{database}{query}")
}

/// One throwaway database, removed when dropped.
#[derive(Debug)]
pub struct TestDb {
    url: String,
    engine: &'static str,
    cleanup: Cleanup,
}

#[derive(Debug)]
enum Cleanup {
    Dir(PathBuf),
    Postgres { admin_url: String, name: String },
}

impl TestDb {
    /// A new SQLite file in a new temporary folder.
    pub fn sqlite() -> TestDb {
        let dir = std::env::temp_dir().join(unique_name("hs-test"));
        std::fs::create_dir_all(&dir).expect("creating a temporary folder");
        let path = dir.join("test.db");
        TestDb {
            url: format!("sqlite:{}", path.display()),
            engine: "sqlite",
            cleanup: Cleanup::Dir(dir),
        }
    }

    /// A new, empty PostgreSQL database, or `None` when no test server is configured.
    pub fn postgres() -> Option<TestDb> {
        let Ok(admin_url) = std::env::var(POSTGRES_URL_VAR) else {
            assert!(
                std::env::var_os("CI").is_none(),
                "{POSTGRES_URL_VAR} is not set under CI: run the tests with `cargo xtask test`"
            );
            eprintln!("note: {POSTGRES_URL_VAR} not set, PostgreSQL half skipped (use `cargo xtask test`)");
            return None;
        };
        let name = unique_name("hs_test");
        let mut admin = PgConnection::establish(&admin_url)
            .unwrap_or_else(|e| panic!("connecting to the test server {admin_url}: {e}"));
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("creating test database {name}: {e}"));
        Some(TestDb {
            url: postgres_url_with_database(&admin_url, &name),
            engine: "postgres",
            cleanup: Cleanup::Postgres { admin_url, name },
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// "sqlite" or "postgres".
    pub fn engine(&self) -> &'static str {
        self.engine
    }

    /// Opens the database as a writer (applying migrations).
    pub fn open(&self) -> Database {
        self.open_mode(OpenMode::Writer)
    }

    pub fn open_mode(&self, mode: OpenMode) -> Database {
        self.try_open(mode)
            .unwrap_or_else(|e| panic!("opening {}: {e:?}", self.url))
    }

    pub fn try_open(&self, mode: OpenMode) -> crate::Result<Database> {
        Database::open(DatabaseConfig::parse(&self.url, mode)?)
    }

    /// PostgreSQL: the sessions (backend pids) holding the main-process claim's
    /// advisory lock in this database.
    pub fn claim_sessions(&self) -> Vec<i32> {
        #[derive(diesel::QueryableByName)]
        struct Pid {
            #[diesel(sql_type = diesel::sql_types::Integer)]
            pid: i32,
        }
        let key = crate::engine::MAIN_PROCESS_LOCK_KEY;
        let mut conn = self.raw_connection();
        // A bigint advisory key shows in pg_locks as its high and low 32 bits.
        let rows: Vec<Pid> = diesel::sql_query(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND classid::bigint = $1 AND objid::bigint = $2 AND objsubid = 1",
        )
        .bind::<diesel::sql_types::BigInt, _>(key >> 32)
        .bind::<diesel::sql_types::BigInt, _>(key & 0xffff_ffff)
        .load(conn.postgres().expect("a PostgreSQL test database"))
        .expect("reading pg_locks");
        rows.into_iter().map(|r| r.pid).collect()
    }

    /// PostgreSQL: ends the session `pid` from the server's side, as a server
    /// restart or a pooler's idle timeout would.
    pub fn terminate_session(&self, pid: i32) {
        let mut conn = self.raw_connection();
        diesel::sql_query("SELECT pg_terminate_backend($1)")
            .bind::<diesel::sql_types::Integer, _>(pid)
            .execute(conn.postgres().expect("a PostgreSQL test database"))
            .expect("terminating a session");
    }

    /// PostgreSQL: the sessions (backend pids) on the test database, the
    /// asking one aside.
    pub fn session_pids(&self) -> Vec<i32> {
        #[derive(diesel::QueryableByName)]
        struct Pid {
            #[diesel(sql_type = diesel::sql_types::Integer)]
            pid: i32,
        }
        let mut conn = self.raw_connection();
        let rows: Vec<Pid> = diesel::sql_query(
            "SELECT pid FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .load(conn.postgres().expect("a PostgreSQL test database"))
        .expect("listing sessions");
        rows.into_iter().map(|r| r.pid).collect()
    }

    /// PostgreSQL: waits (20 s at most) until the number of sessions on the
    /// test database, the asking one aside, is as `wanted` says; `what` names
    /// the wait in the failure.
    pub fn wait_for_sessions(&self, what: &str, mut wanted: impl FnMut(usize) -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let n = self.session_pids().len();
            if wanted(n) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: still {n} sessions"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// PostgreSQL: ends every session on the test database but the asking one,
    /// as a server restart does, until none is left: a pool may still be
    /// opening connections to keep its idle minimum, and those end too.
    pub fn end_every_session(&self) {
        self.wait_for_sessions("the sessions ending", |n| {
            n == 0 || {
                let mut conn = self.raw_connection();
                diesel::sql_query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                )
                .execute(conn.postgres().expect("a PostgreSQL test database"))
                .expect("ending sessions");
                false
            }
        });
    }

    /// The databases a benchmark runs on, one per engine: a new SQLite
    /// database, then a new PostgreSQL one when [`POSTGRES_URL_VAR`] names a
    /// server; without it a line says that PostgreSQL was skipped and that
    /// `cargo xtask bench <bench>` runs it. A case that wants a second database
    /// of the engine asks [`TestDb::fresh`].
    pub fn for_bench(bench: &str) -> Vec<TestDb> {
        let mut dbs = vec![TestDb::sqlite()];
        match TestDb::postgres() {
            Some(db) => dbs.push(db),
            None => println!(
                "postgres  skipped: {POSTGRES_URL_VAR} not set (use `cargo xtask bench {bench}`)"
            ),
        }
        dbs
    }

    /// Another new, empty database on the same engine.
    pub fn fresh(&self) -> TestDb {
        match self.engine {
            "sqlite" => TestDb::sqlite(),
            _ => TestDb::postgres().expect("a PostgreSQL test server, as for this one"),
        }
    }

    /// A new database holding what this one holds now, on the same engine:
    /// the file copied (SQLite), or a `CREATE DATABASE .. TEMPLATE` of it
    /// (PostgreSQL). Nothing may have it open meanwhile.
    pub fn copy(&self) -> TestDb {
        let copy = self.fresh();
        match (&self.cleanup, &copy.cleanup) {
            (Cleanup::Dir(from), Cleanup::Dir(to)) => {
                for suffix in ["", "-wal"] {
                    let file = from.join(format!("test.db{suffix}"));
                    if file.exists() {
                        std::fs::copy(&file, to.join(format!("test.db{suffix}")))
                            .unwrap_or_else(|e| panic!("copying {}: {e}", file.display()));
                    }
                }
            }
            (Cleanup::Postgres { name: from, .. }, Cleanup::Postgres { admin_url, name }) => {
                let mut admin = PgConnection::establish(admin_url)
                    .unwrap_or_else(|e| panic!("connecting to the test server {admin_url}: {e}"));
                for sql in [
                    format!("DROP DATABASE {name}"),
                    format!("CREATE DATABASE {name} TEMPLATE {from}"),
                ] {
                    admin
                        .batch_execute(&sql)
                        .unwrap_or_else(|e| panic!("copying test database {from}: {sql}: {e}"));
                }
            }
            _ => unreachable!("fresh() opens the same engine"),
        }
        copy
    }

    /// Makes every insert into `table` whose `column` equals `value` fail (a
    /// trigger raising "injected failure"), so that tests can make one batch
    /// fail part-way through a run. Needs the table to exist (open it first).
    pub fn fail_inserts(&self, table: &str, column: &str, value: &str) {
        let quoted = value.replace('\'', "''");
        let sql = match self.engine {
            "sqlite" => format!(
                "CREATE TRIGGER injected_failure BEFORE INSERT ON {table} \
                 WHEN NEW.{column} = '{quoted}' BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
            ),
            _ => format!(
                "CREATE FUNCTION injected_failure() RETURNS trigger LANGUAGE plpgsql AS $f$ \
                 BEGIN IF NEW.{column} = '{quoted}' THEN RAISE EXCEPTION 'injected failure'; END IF; \
                 RETURN NEW; END $f$; \
                 CREATE TRIGGER injected_failure BEFORE INSERT ON {table} \
                 FOR EACH ROW EXECUTE FUNCTION injected_failure()"
            ),
        };
        let mut conn = self.raw_connection();
        crate::with_conn!(&mut conn, |c| {
            diesel::connection::SimpleConnection::batch_execute(c, &sql)
        })
        .unwrap_or_else(|e| panic!("injecting a failure into {table}: {e}"));
    }

    /// A raw connection outside our pool, e.g. to look from "another process".
    pub fn raw_connection(&self) -> crate::Conn {
        let config = DatabaseConfig::parse(&self.url, OpenMode::Writer).expect("test URL");
        crate::engine::for_config(&config)
            .connect()
            .expect("raw test connection")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        match &self.cleanup {
            Cleanup::Dir(dir) => {
                // A connection the pool was still opening in the background when it
                // was dropped can recreate the file between the removal of the files
                // and of the folder; try again until the folder is gone.
                for _ in 0..50 {
                    let _ = std::fs::remove_dir_all(dir);
                    if !dir.exists() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
            Cleanup::Postgres { admin_url, name } => {
                if let Ok(mut admin) = PgConnection::establish(admin_url) {
                    let _ = admin
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
                }
            }
        }
    }
}

/// Declares each listed `fn name(db: &TestDb)` as two tests, `sqlite::name` and
/// `postgres::name`, so that every storage test runs on both engines.
#[macro_export]
macro_rules! engine_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[test]
                fn $name() {
                    super::$name(&$crate::testing::TestDb::sqlite());
                }
            )*
        }
        mod postgres {
            $(
                #[test]
                fn $name() {
                    if let Some(db) = $crate::testing::TestDb::postgres() {
                        super::$name(&db);
                    }
                }
            )*
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_database_names() {
        assert_eq!(
            postgres_url_with_database("postgres://postgres@/postgres?host=/tmp/x", "t1"),
            "postgres://postgres@/t1?host=/tmp/x"
        );
        assert_eq!(
            postgres_url_with_database("postgresql://u:p@127.0.0.1:5432/postgres", "t2"),
            "postgresql://u:p@127.0.0.1:5432/t2"
        );
        assert_eq!(
            postgres_url_with_database("postgres://u@host", "t3"),
            "postgres://u@host/t3"
        );
    }
}
