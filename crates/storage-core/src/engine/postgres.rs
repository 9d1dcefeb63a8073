//! PostgreSQL, for scale and for replica workers.

use super::{
    Engine, Isolation, Sequence, SequenceHealth, SequenceRepair, TableRows, TxnOptions, WriterGuard,
};
use crate::claim::ClaimState;
use crate::config::{DatabaseConfig, DatabaseUrl, OpenMode};
use crate::conn::Conn;
use crate::error::{Result, ResultExt};
use crate::migrations;
use diesel::connection::SimpleConnection;
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::{BigInt, Bool, Text, Untyped};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use std::sync::Arc;

/// Key of the advisory lock that serialises migrations between processes that
/// start at the same time.
const MIGRATION_LOCK_KEY: i64 = 0x6873_6d69_6772; // "hsmigr"

/// Key of the transaction-level advisory lock under which stream positions
/// are taken ([`super::Engine::stream_positions`]): held from the ids'
/// `nextval` to COMMIT, so that positions become visible in the order they
/// were taken. An advisory lock rather than a table's: a plain statement
/// can take it (the batch's statement does, without calling a function of
/// ours), and it writes nothing.
pub const STREAM_POSITIONS_LOCK_KEY: i64 = 0x6873_7374_726d; // "hsstrm"

#[derive(Debug)]
pub struct PostgresEngine {
    config: DatabaseConfig,
    url: String,
}

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

/// `n` new ids from a sequence: `SELECT nextval($1::regclass) AS id FROM
/// generate_series(1, $2)`, a query of its own rather than `sql_query`, which
/// diesel never keeps prepared: every new state group takes its id this
/// way, and parsing and planning it each time cost the server more than
/// running it (0.05 of 0.06 ms, measured with log_min_duration_statement=0).
struct NextIds<'a> {
    sequence: &'a str,
    n: i64,
}

impl QueryId for NextIds<'_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for NextIds<'_> {
    type SqlType = Untyped;
}

impl QueryFragment<Pg> for NextIds<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> diesel::QueryResult<()> {
        out.push_sql("SELECT nextval(");
        out.push_bind_param::<Text, _>(self.sequence)?;
        out.push_sql("::regclass) AS id FROM generate_series(1, ");
        out.push_bind_param::<BigInt, _>(&self.n)?;
        out.push_sql(")");
        Ok(())
    }
}

impl RunQueryDsl<PgConnection> for NextIds<'_> {}

#[derive(QueryableByName)]
struct Access {
    #[diesel(sql_type = Text)]
    access: String,
}

#[derive(QueryableByName)]
struct SequenceState {
    #[diesel(sql_type = BigInt)]
    last_value: i64,
    #[diesel(sql_type = Bool)]
    is_called: bool,
}

impl PostgresEngine {
    pub fn new(config: DatabaseConfig) -> Self {
        let url = match &config.url {
            DatabaseUrl::Postgres(u) => libpq_url(u, |name| std::env::var_os(name).is_some()),
            DatabaseUrl::Sqlite(_) => unreachable!("PostgresEngine built for an SQLite URL"),
        };
        PostgresEngine { config, url }
    }
}

/// libpq settings whose defaults we change, each with the environment variable
/// that, like a URL parameter, says the operator chose for themselves.
///
/// - `gssencmode=disable`: by default libpq first tries GSSAPI encryption over
///   TCP, which loads Kerberos and its thread-local state into every connection
///   attempt. A process that exits while a pool thread is inside that code
///   aborts in Kerberos's own assertions (`krb5int_getspecific`), with no output.
///   Homeservers authenticate with passwords or TLS; whoever uses Kerberos sets
///   `gssencmode` (or `PGGSSENCMODE`) and gets it back.
/// - `connect_timeout=10`: libpq waits for an unreachable host without limit;
///   a request or a command should fail and say so instead.
const LIBPQ_DEFAULTS: &[(&str, &str, &str)] = &[
    ("gssencmode", "disable", "PGGSSENCMODE"),
    ("connect_timeout", "10", "PGCONNECT_TIMEOUT"),
];

/// `url` with [`LIBPQ_DEFAULTS`] added where neither the URL's parameters nor
/// the environment (`env_set`) set them.
fn libpq_url(url: &str, env_set: impl Fn(&str) -> bool) -> String {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    let given: Vec<&str> = query
        .split('&')
        .filter_map(|pair| pair.split('=').next())
        .collect();
    let mut out = url.to_owned();
    for (name, value, env) in LIBPQ_DEFAULTS {
        if given.contains(name) || env_set(env) {
            continue;
        }
        out.push(if out.contains('?') { '&' } else { '?' });
        out.push_str(&format!("{name}={value}"));
    }
    out
}

/// Locks `table` against other writers (readers go on) until the
/// transaction ends.
fn lock_statement(table: &str) -> String {
    format!("LOCK TABLE {table} IN EXCLUSIVE MODE")
}

impl Engine for PostgresEngine {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn url(&self) -> &DatabaseUrl {
        &self.config.url
    }

    fn supports_multiple_processes(&self) -> bool {
        true
    }

    fn round_trips_are_cheap(&self) -> bool {
        false
    }

    fn seeks_each_value_of_in_lists(&self) -> bool {
        false
    }

    fn joins_value_lists(&self) -> bool {
        false
    }

    fn seeking_each_of(&self, column: &str, values: &str) -> String {
        format!("{column} = ANY(ARRAY({values}))")
    }

    fn json_texts(&self, param: &str, column: &str) -> String {
        format!("SELECT j.value AS {column} FROM json_array_elements_text({param}::json) j")
    }

    fn json_text_pairs(
        &self,
        param: &str,
        first: &str,
        second: &str,
        pairs: &[(&str, &str)],
    ) -> (String, String) {
        (
            format!(
                "SELECT j.value ->> 0 AS {first}, j.value ->> 1 AS {second} \
                 FROM json_array_elements({param}::json) j"
            ),
            super::json_pairs_as_arrays(pairs),
        )
    }

    fn insertion_row_id(&self, _alias: &str) -> Option<String> {
        None
    }

    fn connect(&self) -> Result<Conn> {
        let mut c = PgConnection::establish(&self.url)
            .with_context(|| format!("connecting to {}", self.config.url.redacted()))?;
        if self.config.mode == OpenMode::ReadOnly {
            c.batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
                .context("making the session read-only")?;
        }
        Ok(Conn::Postgres(c))
    }

    fn begin<'e>(
        &'e self,
        conn: &mut Conn,
        options: &TxnOptions,
        claimed: bool,
    ) -> diesel::QueryResult<WriterGuard<'e>> {
        let isolation = match options.isolation {
            Isolation::ReadCommitted => "READ COMMITTED",
            Isolation::RepeatableRead => "REPEATABLE READ",
            Isolation::Serializable => "SERIALIZABLE",
        };
        let access = if options.read_only { " READ ONLY" } else { "" };
        let mut begin = format!("BEGIN ISOLATION LEVEL {isolation}{access}");
        // One simple-query message, one round trip. LOCK takes no snapshot,
        // so the transaction's first read comes after the lock; the claim's
        // row is that first read.
        let mut more = false;
        if let Some(table) = options.lock {
            begin.push_str(&format!("; {}", lock_statement(table)));
            more = true;
        }
        if claimed && !options.read_only {
            begin.push_str(&format!("; {}", super::postgres_claim::LOCK_ROW));
            more = true;
        }
        if let Err(e) = conn.begin_with(&begin) {
            // The BEGIN may have run and what followed it failed (a
            // serialization failure on the claim's row): diesel does not count
            // the transaction as open, so end it here, or the connection's
            // next BEGIN would find it aborted.
            if more {
                let _ = conn.batch_execute("ROLLBACK");
            }
            return Err(e);
        }
        Ok(None)
    }

    /// `plan_cache_mode` is read whenever a prepared statement runs: its
    /// generic plan, made on the first run (under these settings), serves
    /// every later one. Read-only as a session of [`OpenMode::ReadOnly`] is.
    fn seeking_session(&self) -> Option<&'static str> {
        Some(
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY; \
             SET enable_seqscan = off; SET plan_cache_mode = force_generic_plan",
        )
    }

    fn is_retryable(&self, error: &DieselError) -> bool {
        // 40001 has its own diesel kind. 40P01 (deadlock_detected) arrives as Unknown;
        // its message is recognised in English, the language our clusters run in.
        match error {
            DieselError::DatabaseError(DatabaseErrorKind::SerializationFailure, _) => true,
            DieselError::DatabaseError(_, info) => info.message().contains("deadlock detected"),
            _ => false,
        }
    }

    fn is_disconnect(&self, error: &DieselError) -> bool {
        // libpq's and the server's own wording (SQLSTATE classes 08 and 57P
        // reach diesel as Unknown, with only the message to tell them apart).
        const GONE: [&str; 6] = [
            "terminating connection",
            "server closed the connection",
            "no connection to the server",
            "the database system is shutting down",
            "the database system is starting up",
            "could not receive data from server",
        ];
        match error {
            DieselError::DatabaseError(DatabaseErrorKind::ClosedConnection, _) => true,
            DieselError::DatabaseError(DatabaseErrorKind::UnableToSendCommand, _) => true,
            DieselError::DatabaseError(_, info) => GONE.iter().any(|m| info.message().contains(m)),
            _ => false,
        }
    }

    fn is_out_of_space(&self, error: &DieselError) -> bool {
        // SQLSTATE 53100 (disk_full) reaches diesel as Unknown. The server
        // raises it for a file it could not extend or write ("could not
        // extend file ...: No space left on device", hinting "Check free
        // disk space."); both recognised in English, as above.
        matches!(error, DieselError::DatabaseError(_, info)
            if info.message().contains("No space left on device")
                || info.hint().is_some_and(|h| h.contains("Check free disk space")))
    }

    fn next_ids(&self, conn: &mut Conn, sequence: &Sequence, n: usize) -> Result<Vec<i64>> {
        let rows: Vec<Id> = NextIds {
            sequence: sequence.name,
            n: n as i64,
        }
        .load(conn.postgres()?)
        .with_context(|| format!("allocating {n} ids from {}", sequence.name))?;
        let mut ids: Vec<i64> = rows.into_iter().map(|r| r.id).collect();
        ids.sort_unstable();
        Ok(ids)
    }

    fn stream_positions(&self, conn: &mut Conn, sequence: &Sequence, n: usize) -> Result<Vec<i64>> {
        // The batch statement's positions with no table to write: the same
        // lock, then the ids, in one place.
        let take = super::columns::TakePositions {
            sequence: sequence.name,
            count: n as i64,
            claimed: None,
        };
        let taken =
            super::columns::insert_with_unnest(conn.postgres()?, &[], Some(take), None, false)
                .with_context(|| format!("taking {n} stream positions from {}", sequence.name))?;
        Ok(taken.positions)
    }

    fn inspect_sequence(&self, conn: &mut Conn, sequence: &Sequence) -> Result<SequenceHealth> {
        let c = conn.postgres()?;
        let max: Id = diesel::sql_query(format!(
            "SELECT COALESCE(MAX({}), 0) AS id FROM {}",
            sequence.column, sequence.table
        ))
        .get_result(c)
        .with_context(|| format!("reading the highest id of {}", sequence.table))?;
        // Asked first: a refused read would abort the caller's transaction. A
        // role that may read tables but not sequences (a reporting role) still
        // gets the rest of its report.
        let access: Access = diesel::sql_query(
            "SELECT CASE WHEN to_regclass($1) IS NULL THEN 'missing' \
             WHEN has_sequence_privilege($1, 'SELECT') THEN 'ok' ELSE 'denied' END AS access",
        )
        .bind::<Text, _>(sequence.name)
        .get_result(c)
        .with_context(|| format!("checking access to sequence {}", sequence.name))?;
        let unreadable = match access.access.as_str() {
            "ok" => None,
            "missing" => Some("the sequence does not exist"),
            _ => Some("this role may not read the sequence (no SELECT on it)"),
        };
        if let Some(reason) = unreadable {
            return Ok(SequenceHealth {
                sequence: sequence.name,
                handed_out: None,
                max_id: max.id,
                unreadable: Some(reason),
            });
        }
        let state: SequenceState = diesel::sql_query(format!(
            "SELECT last_value, is_called FROM {}",
            sequence.name
        ))
        .get_result(c)
        .with_context(|| format!("reading sequence {}", sequence.name))?;
        // Before the first nextval, last_value is the value the next call returns.
        let handed_out = if state.is_called {
            state.last_value
        } else {
            state.last_value - 1
        };
        Ok(SequenceHealth {
            sequence: sequence.name,
            handed_out: Some(handed_out),
            max_id: max.id,
            unreadable: None,
        })
    }

    fn sync_sequence(
        &self,
        conn: &mut Conn,
        sequence: &Sequence,
    ) -> Result<Option<SequenceRepair>> {
        let health = self.inspect_sequence(conn, sequence)?;
        if let Some(reason) = health.unreadable {
            return Err(crate::Error::other(format!(
                "sequence {}: {reason}",
                sequence.name
            )));
        }
        let handed_out = health.handed_out.unwrap_or_default();
        if health.max_id <= handed_out {
            return Ok(None);
        }
        // GREATEST: another process may have advanced it since we read it.
        diesel::sql_query(format!(
            "SELECT setval($1::regclass, GREATEST((SELECT last_value FROM {}), $2)) AS id",
            sequence.name
        ))
        .bind::<Text, _>(sequence.name)
        .bind::<BigInt, _>(health.max_id)
        .get_result::<Id>(conn.postgres()?)
        .with_context(|| format!("moving sequence {} forward", sequence.name))?;
        Ok(Some(SequenceRepair {
            sequence: sequence.name,
            was: handed_out,
            max_id: health.max_id,
        }))
    }

    fn lock_table(&self, conn: &mut Conn, table: &str) -> Result<()> {
        conn.postgres()?
            .batch_execute(&lock_statement(table))
            .with_context(|| format!("locking table {table}"))
    }

    fn refresh_statistics(&self, conn: &mut Conn, tables: &[&str]) -> Result<()> {
        // ANALYZE samples at most 300 x default_statistics_target rows a
        // table, so its cost does not grow with the table. It invalidates the
        // cached plans of the statements that read these tables.
        conn.postgres()?
            .batch_execute(&format!("ANALYZE {}", tables.join(", ")))
            .with_context(|| format!("analyzing {}", tables.join(", ")))
    }

    fn insert_columns<'a>(
        &self,
        conn: &mut Conn,
        tables: &[TableRows<'a>],
        positions: Option<(&Sequence, usize)>,
        notify: Option<(&str, &str)>,
        claim: Option<&ClaimState>,
        alone: bool,
    ) -> Result<Vec<i64>> {
        if alone {
            // Lost already: not even sent.
            claim.map_or(Ok(()), ClaimState::check)?;
        }
        let take = positions.map(|(sequence, n)| super::columns::TakePositions {
            sequence: sequence.name,
            count: n as i64,
            claimed: alone.then(|| claim.and_then(ClaimState::epoch)),
        });
        let inserted = super::columns::insert_with_unnest(
            conn.postgres()?,
            tables,
            take,
            notify,
            claim.is_some(),
        );
        // A claim another process raised makes the statement write nothing
        // and answer the row it found: refused below.
        let inserted = inserted.with_context(|| {
            let names: Vec<&str> = tables.iter().map(|t| t.table).collect();
            match positions {
                Some((sequence, n)) => format!(
                    "inserting rows into {}, taking {n} stream positions from {}",
                    names.join(", "),
                    sequence.name
                ),
                None => format!("inserting rows into {}", names.join(", ")),
            }
        })?;
        if let Some(claim) = claim {
            super::postgres_claim::expect_row(claim, inserted.claim)?;
        }
        Ok(inserted.positions)
    }

    fn commits_batch_statement_alone(&self) -> bool {
        true
    }

    fn notify(&self, conn: &mut Conn, channel: &str, payload: &str) -> Result<()> {
        diesel::sql_query("SELECT pg_notify($1, $2)")
            .bind::<Text, _>(channel)
            .bind::<Text, _>(payload)
            .execute(conn.postgres()?)
            .with_context(|| format!("notifying {channel}"))?;
        Ok(())
    }

    fn migrate(&self, conn: &mut Conn) -> Result<Vec<String>> {
        let c = conn.postgres()?;
        diesel::sql_query("SELECT pg_advisory_lock($1)")
            .bind::<BigInt, _>(MIGRATION_LOCK_KEY)
            .execute(c)
            .context("taking the migration lock")?;
        let result = migrations::run(c, migrations::POSTGRES);
        let unlock = diesel::sql_query("SELECT pg_advisory_unlock($1)")
            .bind::<BigInt, _>(MIGRATION_LOCK_KEY)
            .execute(c)
            .context("releasing the migration lock");
        let applied = result?;
        unlock?;
        Ok(applied)
    }

    fn check_schema(&self, conn: &mut Conn) -> Result<()> {
        migrations::check(conn.postgres()?, migrations::POSTGRES)
    }

    fn table_statistics(
        &self,
        conn: &mut Conn,
        tables: &[&str],
    ) -> Result<Vec<super::TableStatistics>> {
        super::postgres_statistics::table_statistics(conn.postgres()?, tables)
    }

    fn most_common_values(
        &self,
        conn: &mut Conn,
        table: &str,
        column: &str,
    ) -> Result<Vec<(String, f64)>> {
        super::postgres_statistics::most_common_values(conn.postgres()?, table, column)
    }

    fn listen(&self, channel: &str, application_name: &str) -> Result<Box<dyn super::Listener>> {
        let conn = match self.connect()? {
            Conn::Postgres(c) => c,
            Conn::Sqlite(_) => unreachable!("the PostgreSQL engine connects to PostgreSQL"),
        };
        Ok(Box::new(super::listen::PgListener::start(
            conn,
            channel,
            application_name,
        )?))
    }

    fn table_names(&self, conn: &mut Conn) -> Result<std::collections::BTreeSet<String>> {
        diesel::sql_query(
            "SELECT c.relname AS name FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND pg_catalog.pg_table_is_visible(c.oid) \
             AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
             AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d \
                 WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid \
                 AND d.deptype = 'e')",
        )
        .load::<super::TableName>(conn.postgres()?)
        .map(super::table_set)
        .context("listing the tables")
    }

    fn try_claim_main_process(
        &self,
        claim: &Arc<ClaimState>,
    ) -> Result<Option<super::ClaimHandle>> {
        super::postgres_claim::try_claim(&self.url, &self.config.url.redacted(), claim)
    }

    fn proves_claim_before_commit(&self) -> bool {
        true
    }

    fn prove_claim(&self, conn: &mut Conn, claim: &ClaimState) -> Result<()> {
        super::postgres_claim::prove(conn, claim)
    }

    fn confirm_claim_after_commit(&self, _claim: &ClaimState) -> Result<()> {
        // A commit went to the database the claim was proven in: the row lock
        // taken by the proof held any newcomer off until it was done.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::libpq_url;

    #[test]
    fn libpq_defaults_are_added_unless_chosen() {
        let none = |_: &str| false;
        assert_eq!(
            libpq_url("postgres://u@h/db", none),
            "postgres://u@h/db?gssencmode=disable&connect_timeout=10"
        );
        assert_eq!(
            libpq_url("postgres://u@/db?host=/tmp/x", none),
            "postgres://u@/db?host=/tmp/x&gssencmode=disable&connect_timeout=10"
        );
        assert_eq!(
            libpq_url(
                "postgres://u@h/db?gssencmode=require&connect_timeout=3",
                none
            ),
            "postgres://u@h/db?gssencmode=require&connect_timeout=3"
        );
        assert_eq!(
            libpq_url("postgres://u@h/db", |v| v == "PGGSSENCMODE"),
            "postgres://u@h/db?connect_timeout=10"
        );
    }
}
