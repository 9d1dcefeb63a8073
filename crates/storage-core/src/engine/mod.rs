//! Behaviour that differs between SQLite and PostgreSQL, behind one trait.
//!
//! Everything above storage-core asks the engine (through [`crate::Transaction`] or
//! [`crate::Database`]) rather than checking which engine it runs on: connection
//! settings, how a transaction begins, which errors are worth a retry, id
//! generation for sequences, table locks, migrations. Each engine has one
//! implementation, named after it.

mod columns;
mod listen;
mod postgres;
mod postgres_claim;
mod postgres_statistics;
mod sqlite;
mod sqlite_claim;
mod sqlite_columns;
mod sqlite_statistics;
mod statement_slots;

pub use columns::{Column, RowsWrite, TableRows};
pub use listen::Listener;
pub use postgres::{PostgresEngine, STREAM_POSITIONS_LOCK_KEY};
pub use postgres_claim::MAIN_PROCESS_LOCK_KEY;
pub use sqlite::SqliteEngine;

use crate::claim::ClaimState;
use crate::config::{DatabaseConfig, DatabaseUrl};
use crate::conn::Conn;
use crate::error::Result;
use std::sync::{Arc, MutexGuard};

/// The JSON text [`Engine::json_texts`] reads: an array of `texts`.
pub fn json_texts<'a>(texts: impl IntoIterator<Item = &'a str>) -> String {
    let texts: Vec<&str> = texts.into_iter().collect();
    serde_json::to_string(&texts).expect("texts always serialize")
}

/// A JSON object whose members are the distinct first texts of `pairs`,
/// each holding the array of the second texts paired with it (SQLite's
/// [`Engine::json_text_pairs`]).
fn json_pairs_by_first(pairs: &[(&str, &str)]) -> String {
    let mut by_first: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for (first, second) in pairs {
        by_first.entry(first).or_default().push(second);
    }
    serde_json::to_string(&by_first).expect("texts always serialize")
}

/// A JSON array of `pairs`, each an array of its two texts (PostgreSQL's
/// [`Engine::json_text_pairs`]).
fn json_pairs_as_arrays(pairs: &[(&str, &str)]) -> String {
    let pairs: Vec<[&str; 2]> = pairs.iter().map(|(a, b)| [*a, *b]).collect();
    serde_json::to_string(&pairs).expect("texts always serialize")
}

/// Transaction isolation on PostgreSQL. SQLite transactions are always serializable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isolation {
    ReadCommitted,
    /// Synapse's default, and ours: a consistent snapshot; conflicting writes fail
    /// with a serialization error and are retried.
    #[default]
    RepeatableRead,
    Serializable,
}

/// How a transaction is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TxnOptions {
    /// Reads only: on SQLite it does not take the writer lock, so it runs beside a
    /// writer; on PostgreSQL the server refuses writes.
    pub read_only: bool,
    pub isolation: Isolation,
    /// A table locked against other writers from the transaction's start, as
    /// [`Engine::lock_table`] does, before it reads anything (so its snapshot
    /// comes after the lock), and in the same round trip as BEGIN where the
    /// engine has round trips to save. For a write transaction only.
    pub lock: Option<&'static str>,
    /// A write transaction that may end up a single statement, the batch's
    /// statement taking stream positions
    /// ([`Transaction::insert_columns_taking_positions`](crate::Transaction::insert_columns_taking_positions)):
    /// where the engine [commits such a statement on its
    /// own](Engine::commits_batch_statement_alone), BEGIN is sent only if
    /// another statement comes first, and otherwise that statement is the
    /// whole transaction, with no BEGIN and no COMMIT.
    pub batch: bool,
    /// A read whose statements find every row through an index, a few
    /// seeks each (the slots of one group's chain), and need no snapshot in
    /// common: where the engine plans statements for the tables' statistics
    /// (PostgreSQL), it runs on a session of its own
    /// ([`Engine::seeking_session`]) that plans them without sequential scans
    /// and runs a kept prepared statement on its one generic plan instead of
    /// planning it anew for its values, each statement alone, with no BEGIN
    /// and no COMMIT (two round trips saved). On a table of a few hundred
    /// rows (a server of one big room, or the benchmark's) PostgreSQL
    /// otherwise walked a 99-hop chain of `state_group_edges` by a hash of
    /// the whole table per hop, and planned a statement it ran in less time
    /// than planning took. Elsewhere (SQLite) an ordinary read-only
    /// transaction.
    pub seeks_only: bool,
}

impl TxnOptions {
    pub fn read_only() -> Self {
        TxnOptions {
            read_only: true,
            ..Default::default()
        }
    }

    /// A read of rows found by index seeks only ([`Self::seeks_only`]).
    pub fn read_seeking() -> Self {
        TxnOptions {
            read_only: true,
            seeks_only: true,
            ..Default::default()
        }
    }

    /// A write transaction that locks `table` from its start ([`Self::lock`]).
    pub fn locking(table: &'static str) -> Self {
        TxnOptions {
            lock: Some(table),
            ..Default::default()
        }
    }

    /// A write transaction that may be its batch's statement alone ([`Self::batch`]).
    pub fn batch() -> Self {
        TxnOptions {
            batch: true,
            ..Default::default()
        }
    }

    pub fn serializable() -> Self {
        TxnOptions {
            isolation: Isolation::Serializable,
            ..Default::default()
        }
    }
}

/// A source of unique ids: a PostgreSQL sequence, or on SQLite an in-process counter
/// seeded from the highest id in the table it numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sequence {
    /// The PostgreSQL sequence's name.
    pub name: &'static str,
    /// The table whose ids it hands out, and the id column.
    pub table: &'static str,
    pub column: &'static str,
}

/// A sequence found behind its table's highest id, and moved past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceRepair {
    pub sequence: &'static str,
    /// The last value the sequence had handed out.
    pub was: i64,
    /// The table's highest id, which the sequence now continues after.
    pub max_id: i64,
}

/// A sequence next to the highest id of its table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceHealth {
    pub sequence: &'static str,
    /// The last value handed out; `None` where the engine has no sequence (SQLite
    /// counts from the table itself and cannot fall behind).
    pub handed_out: Option<i64>,
    pub max_id: i64,
    /// Why the sequence could not be read (it is missing, or this role may not
    /// read it); `handed_out` is `None` then too.
    pub unreadable: Option<&'static str>,
}

impl SequenceHealth {
    /// Whether the next id could collide with an existing one.
    pub fn is_behind(&self) -> bool {
        self.handed_out.is_some_and(|h| h < self.max_id)
    }
}

/// What the engine's own bookkeeping says about a table, read without scanning
/// it: what `hs-main inspect` shows by default on databases of any size.
#[derive(Debug, Clone, PartialEq)]
pub struct TableStatistics {
    pub table: String,
    /// Rows, estimated unless `exact`; `None` when the engine keeps no estimate
    /// yet (a PostgreSQL table never analyzed that is too big to count cheaply).
    pub rows: Option<i64>,
    /// Whether `rows` was counted (a small table, where counting costs little).
    pub exact: bool,
    /// Bytes on disk, indexes included; `None` where finding out is not cheap.
    pub bytes: Option<i64>,
}

/// Tables up to this many bytes (or, where the size is unknown, estimated rows)
/// are counted exactly by [`Engine::table_statistics`]: a count over them takes
/// milliseconds.
pub const EXACT_COUNT_LIMIT: i64 = 16 << 20;

/// Held for the length of a transaction where the engine serialises writers.
pub type WriterGuard<'e> = Option<MutexGuard<'e, ()>>;

/// One implementation per database engine.
pub trait Engine: Send + Sync + std::fmt::Debug {
    /// "sqlite" or "postgres", for logs and metrics.
    fn name(&self) -> &'static str;

    fn url(&self) -> &DatabaseUrl;

    /// Whether several processes may write to one database (replica workers need it).
    fn supports_multiple_processes(&self) -> bool;

    /// Whether a statement costs little more than a function call (an in-process
    /// database), so that a client-side loop of small queries can beat one big
    /// query when it can stop early.
    fn round_trips_are_cheap(&self) -> bool;

    /// Whether `col IN (a, b, ...)` on the last column of an index is answered
    /// by a seek per value (SQLite always does), so that one such condition
    /// costs what one condition per value would. PostgreSQL's planner may
    /// instead seek on the columns before it and filter the rest (measured on
    /// the HQ room: 64 ms against 8 ms).
    fn seeks_each_value_of_in_lists(&self) -> bool;

    /// Whether rows named by a list of values read from a subquery
    /// ([`Self::json_texts`]) are best found by joining the list to the
    /// table, each value sought in turn, rather than through
    /// [`Self::seeking_each_of`]. SQLite: yes, its `IN (subquery)` first
    /// copies the values into a B-tree of their own and seeks each row's
    /// value there again (~7,000 of ~20,000 instructions an event read by
    /// state resolution, callgrind). PostgreSQL: no, its `= ANY(ARRAY(..))`
    /// reads the index once for the whole list into a bitmap, where a
    /// nested loop seeks each value (3,392 event ids of the HQ room, EXPLAIN
    /// ANALYZE, medians of 5 under load: 62 ms against 75 ms).
    fn joins_value_lists(&self) -> bool;

    /// A condition that `column` is one of the values `values` (a subquery)
    /// returns, which the engine answers by one seek per value in the order of
    /// an index that leads with `column`: with `ORDER BY column DESC LIMIT 1`
    /// it stops at the first value that has a row. SQLite does so for
    /// `IN (subquery)`; PostgreSQL only for an array (`= ANY(ARRAY(..))`, an
    /// index condition): its `IN (subquery)` is a join that reads the rows of
    /// every value and sorts them.
    fn seeking_each_of(&self, column: &str, values: &str) -> String;

    /// A subquery of one row per text of a JSON array of texts bound as one
    /// text at `param` (`$n`; build it with [`crate::json_texts`]), the text
    /// as `column`. One statement text for any number of rows, so the
    /// connection keeps it prepared, where a `VALUES` list or an `IN (..)`
    /// list is a new statement for each length, parsed and planned again
    /// (SQLite: ~0.7M instructions per statement of a thousand binds,
    /// callgrind): SQLite's `json_each`, PostgreSQL's
    /// `json_array_elements_text`.
    fn json_texts(&self, param: &str, column: &str) -> String;

    /// [`Self::json_texts`] for `pairs` of texts, as columns `first` and
    /// `second`: the SQL, and the JSON text to bind at `param`. SQLite reads
    /// an object of each distinct first text's array of second texts, the
    /// members and then each one's array, so that no row has to be taken
    /// apart (`->>` on each row's own array parsed it again, ~1,800
    /// instructions a row, callgrind) and pairs sharing their first text (the
    /// member type of state slots) send it once. PostgreSQL reads an array of
    /// two-text arrays: for a function of a function's rows its planner
    /// guesses 10,000 rows and reads every row of the table side into a hash
    /// (a whole snapshot of the HQ room for 1,696 slots), where for one
    /// function's 100 it seeks each row through the index.
    fn json_text_pairs(
        &self,
        param: &str,
        first: &str,
        second: &str,
        pairs: &[(&str, &str)],
    ) -> (String, String);

    /// An expression for the id under which the engine keeps the row `alias`
    /// of a table without a primary key, in insertion order, so that rows
    /// inserted together (a state group's, by one statement) lie in one range
    /// of ids that a scan of the table reads in order: SQLite's `rowid`. Read
    /// by that range, such rows cost no seek each through an index that does
    /// not hold every column read (Synapse's on `state_groups_state` lacks
    /// `event_id`). `None` where rows have no such id: a PostgreSQL heap is
    /// not ordered by insertion.
    fn insertion_row_id(&self, alias: &str) -> Option<String>;

    /// Opens a new connection with this engine's per-connection settings applied.
    fn connect(&self) -> Result<Conn>;

    /// [`Self::connect`], with what the connection assumes of the database
    /// that may stop being true while it stays open (a pooled connection):
    /// on SQLite, that nobody writes the file, when it was opened as an
    /// unchanging file (read-only, no writer then), stamped as it was then.
    /// `None`: nothing assumed. See [`Self::still_as_stamped`].
    fn connect_stamped(&self) -> Result<(Conn, Option<FileStamp>)> {
        Ok((self.connect()?, None))
    }

    /// Whether a connection opened on `stamp` ([`Self::connect_stamped`]) may
    /// still read: the file is as it was and nobody writes it. A pool hands
    /// out no connection for which this is false.
    fn still_as_stamped(&self, _stamp: &FileStamp) -> bool {
        true
    }

    /// What makes a new connection a session for reads of
    /// [`TxnOptions::seeks_only`], kept in a pool of their own: statements
    /// that set it read-only and planned for index seeks, so that such a read
    /// needs no transaction to carry them and is its statements alone.
    /// `None` where such reads run in a transaction as any other (SQLite,
    /// whose BEGIN and COMMIT are no round trips and whose plans ignore
    /// statistics).
    fn seeking_session(&self) -> Option<&'static str> {
        None
    }

    /// Whether committed writes wait in a write-ahead log of this process's
    /// that a background thread of the writer moves into the database
    /// ([`checkpoint`](Self::checkpoint), see `checkpoint.rs`), rather than the
    /// commit that filled it.
    fn checkpoints_in_background(&self) -> bool {
        false
    }

    /// Moves what the write-ahead log holds into the database as far as open
    /// readers allow, waiting for nobody; on a connection of its own.
    fn checkpoint(&self, _conn: &mut Conn) -> Result<()> {
        Ok(())
    }

    /// Begins a transaction, with the lock of [`TxnOptions::lock`] taken. The
    /// guard, if any, must be held until it has ended. With `claimed`, the
    /// transaction will prove the main-process claim: an engine that
    /// [proves it before COMMIT](Self::proves_claim_before_commit) locks the
    /// claim's row here, in the same round trip.
    fn begin<'e>(
        &'e self,
        conn: &mut Conn,
        options: &TxnOptions,
        claimed: bool,
    ) -> diesel::QueryResult<WriterGuard<'e>>;

    /// Whether a write transaction of a claimed database proves the claim
    /// just before COMMIT (or in its batch's statement,
    /// [`insert_columns`](Self::insert_columns)) rather than first: where
    /// [`begin`](Self::begin) already locked the claim's row, so that a
    /// newcomer's raise waits for the transaction from its start all the same
    /// (PostgreSQL: the proof's round trip is saved). `false`: the proof is
    /// the transaction's first statement (SQLite, where it costs no round trip).
    fn proves_claim_before_commit(&self) -> bool {
        false
    }

    /// Whether the batch statement of a transaction of [`TxnOptions::batch`]
    /// that sent nothing before it is sent outside any transaction, and
    /// commits on its own ([`Self::insert_columns`] with `alone`): BEGIN
    /// and COMMIT are round trips saved (PostgreSQL). The statement then
    /// proves the claim inside the server, failing before anything is
    /// written when it is lost. `false` where a transaction's bounds cost
    /// nothing (SQLite).
    fn commits_batch_statement_alone(&self) -> bool {
        false
    }

    /// Whether running the transaction again may succeed: a serialization failure
    /// or deadlock on PostgreSQL, a busy or locked database on SQLite.
    fn is_retryable(&self, error: &diesel::result::Error) -> bool;

    /// Whether `error` says the database server went away (stopped, restarting,
    /// the connection cut) rather than anything about the statement: the
    /// request may succeed later, so it is reported as unavailable.
    fn is_disconnect(&self, error: &diesel::result::Error) -> bool;

    /// Whether `error` says the database has no room left to write (its disk
    /// or volume is full): reported as [`crate::ErrorKind::OutOfSpace`].
    fn is_out_of_space(&self, error: &diesel::result::Error) -> bool;

    /// `n` new ids from `sequence`, ascending, inside the caller's transaction.
    fn next_ids(&self, conn: &mut Conn, sequence: &Sequence, n: usize) -> Result<Vec<i64>>;

    /// `n` new ids from `sequence`, ascending, as stream positions: taken
    /// under the stream positions lock, held until the transaction ends, so
    /// that positions become visible in the order they were taken (no reader
    /// sees a position while a lower one may still commit). Taken as late
    /// as the transaction can: other writers wait for it from then until its
    /// COMMIT. PostgreSQL: a transaction-level advisory lock
    /// ([`STREAM_POSITIONS_LOCK_KEY`]), then `nextval`; SQLite:
    /// [`Self::next_ids`], a write transaction holding the whole database
    /// already.
    fn stream_positions(&self, conn: &mut Conn, sequence: &Sequence, n: usize) -> Result<Vec<i64>>;

    /// Reads `sequence` and the highest id of its table, changing nothing.
    fn inspect_sequence(&self, conn: &mut Conn, sequence: &Sequence) -> Result<SequenceHealth>;

    /// Moves `sequence` past the highest id in its table if it is behind, and says
    /// so; `None` when it was in order (or the engine has no sequences to fall behind).
    fn sync_sequence(&self, conn: &mut Conn, sequence: &Sequence)
        -> Result<Option<SequenceRepair>>;

    /// Locks `table` against other writers until the transaction ends.
    fn lock_table(&self, conn: &mut Conn, table: &str) -> Result<()>;

    /// Brings the query planner's statistics of `tables` up to date, outside
    /// any transaction. For a bulk load into tables that were small when the
    /// planner last looked: PostgreSQL's autovacuum analyzes them on its own
    /// schedule, not when the load needs it, and a plan made for an empty table (a sequential scan) stays
    /// in every connection's prepared statements until statistics change.
    fn refresh_statistics(&self, conn: &mut Conn, tables: &[&str]) -> Result<()>;

    /// Inserts (deletes, upserts) the rows of several tables: on PostgreSQL
    /// in one statement, each statement being a round trip (a
    /// data-modifying CTE per table over `unnest` of bound arrays, see
    /// [`columns`]); on SQLite, where a statement costs no round trip, table
    /// after table in multi-row statements kept prepared
    /// ([`sqlite_columns`]). With `positions` (a
    /// sequence, how many), it first takes that many stream positions as
    /// [`Self::stream_positions`] does, fills the tables' columns of
    /// positions ([`Column::Position`], [`Column::HighestPosition`]) with
    /// them and answers them (none otherwise). With `notify` (channel,
    /// payload), it also does what [`Self::notify`] does, the payload after
    /// the highest position taken when it takes some; with `claim`, it also
    /// proves the claim as [`Self::prove_claim`] does (an error if it is
    /// lost). With `alone` (only with positions, where
    /// [`Self::commits_batch_statement_alone`]), no transaction is open: the
    /// statement is one, committed when it answers, and the claim is proven
    /// inside it before anything is written.
    fn insert_columns<'a>(
        &self,
        conn: &mut Conn,
        tables: &[TableRows<'a>],
        positions: Option<(&Sequence, usize)>,
        notify: Option<(&str, &str)>,
        claim: Option<&ClaimState>,
        alone: bool,
    ) -> Result<Vec<i64>>;

    /// Wakes the processes listening on `channel` once the transaction commits
    /// (PostgreSQL NOTIFY); nothing where one process is all there is.
    fn notify(&self, conn: &mut Conn, channel: &str, payload: &str) -> Result<()>;

    /// A new connection of its own listening on `channel`, named
    /// `application_name` (PostgreSQL LISTEN); an error where one process is
    /// all there is (SQLite), since nobody else would ever notify.
    fn listen(&self, channel: &str, application_name: &str) -> Result<Box<dyn Listener>>;

    /// Applies pending migrations; returns the versions applied. Refuses a schema
    /// newer than this binary.
    fn migrate(&self, conn: &mut Conn) -> Result<Vec<String>>;

    /// Checks, without changing anything, that the schema is exactly this binary's.
    fn check_schema(&self, conn: &mut Conn) -> Result<()>;

    /// Rows and sizes of `tables` (which exist) from the statistics the engine keeps
    /// (PostgreSQL: `pg_class.reltuples`, `pg_total_relation_size`; SQLite:
    /// `sqlite_stat1` when ANALYZE ran, else the highest rowid, and `dbstat` page
    /// sizes), small tables counted exactly. Never scans a big table.
    fn table_statistics(&self, conn: &mut Conn, tables: &[&str]) -> Result<Vec<TableStatistics>>;

    /// The most common values of `table.column`, with the share of the table's rows
    /// holding each, most common first, as the engine's statistics estimate them;
    /// empty where it keeps no such statistics.
    fn most_common_values(
        &self,
        conn: &mut Conn,
        table: &str,
        column: &str,
    ) -> Result<Vec<(String, f64)>>;

    /// The names of the tables this connection sees (on PostgreSQL, those on
    /// its search path), changing nothing: the database's own, not the
    /// engine's (SQLite's `sqlite_*`, PostgreSQL's catalogs, the tables of
    /// extensions).
    fn table_names(&self, conn: &mut Conn) -> Result<std::collections::BTreeSet<String>>;

    /// Tries to claim the database for this process as its one main process:
    /// what keeps the claim (a session-level advisory lock on its own
    /// PostgreSQL connection, watched by a thread that reports a loss to
    /// `claim`; an exclusive lock on a file beside the SQLite file's canonical
    /// path, whose identity it records in `claim`) until it is dropped or the
    /// process dies; `None` when another process holds it.
    fn try_claim_main_process(&self, claim: &Arc<ClaimState>) -> Result<Option<ClaimHandle>>;

    /// Part of every write transaction of a claimed database, before it
    /// commits: proves that this process still holds its claim (the epoch it
    /// raised is still the database's), so that it never commits beside a
    /// newer main process; fails with [`crate::ErrorKind::ClaimLost`]
    /// otherwise. The first statement, unless the engine
    /// [proves it before COMMIT](Self::proves_claim_before_commit). On
    /// PostgreSQL the row is held `FOR SHARE` from BEGIN, so a newcomer's
    /// raise waits for the transactions that will prove the old epoch; SQLite
    /// also checks that the file at the path is still the file claimed.
    fn prove_claim(&self, conn: &mut Conn, claim: &ClaimState) -> Result<()>;

    /// After a write transaction of a claimed database committed: whether what
    /// it committed is where the claim says (SQLite: the file at the path is
    /// still the one claimed, not deleted or replaced meanwhile). An error means
    /// the commit must not be acknowledged.
    fn confirm_claim_after_commit(&self, claim: &ClaimState) -> Result<()>;
}

/// One table name, as [`Engine::table_names`] reads it.
#[derive(diesel::QueryableByName)]
struct TableName {
    #[diesel(sql_type = diesel::sql_types::Text)]
    name: String,
}

fn table_set(rows: Vec<TableName>) -> std::collections::BTreeSet<String> {
    rows.into_iter().map(|r| r.name).collect()
}

/// What keeps a main-process claim alive; dropping it lets go.
pub type ClaimHandle = Box<dyn std::any::Any + Send>;

/// A database file as a connection that took it for unchanging found it: its
/// identity, size and times of change. Another stamp of the same file differs
/// once anything wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    device: u64,
    inode: u64,
    len: u64,
    modified: (i64, i64),
    changed: (i64, i64),
}

impl FileStamp {
    /// The stamp of the file at `path` now.
    pub fn of(path: &std::path::Path) -> std::io::Result<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(FileStamp {
            device: m.dev(),
            inode: m.ino(),
            len: m.size(),
            modified: (m.mtime(), m.mtime_nsec()),
            changed: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// The engine for a configuration.
pub fn for_config(config: &DatabaseConfig) -> Box<dyn Engine> {
    match &config.url {
        DatabaseUrl::Sqlite(_) => Box::new(SqliteEngine::new(config.clone())),
        DatabaseUrl::Postgres(_) => Box::new(PostgresEngine::new(config.clone())),
    }
}
