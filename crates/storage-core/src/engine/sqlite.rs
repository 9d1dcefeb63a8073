//! The embedded default: one SQLite file, WAL, one writer at a time.

use super::{
    Engine, FileStamp, Sequence, SequenceHealth, SequenceRepair, TableRows, TxnOptions, WriterGuard,
};
use crate::claim::ClaimState;
use crate::config::{DatabaseConfig, DatabaseUrl, OpenMode};
use crate::conn::Conn;
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::migrations;
use diesel::connection::SimpleConnection;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::BigInt;
use diesel::{Connection, QueryableByName, RunQueryDsl, SqliteConnection};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// How much of the database file each connection reads through a memory map
/// rather than `read()` calls (address space, not memory: the pages are the
/// kernel's page cache, shared by every connection). A cold read of a large
/// room's state goes through thousands of pages more than SQLite's own page
/// cache holds; with `read()` half its time was system calls (the sqlite3
/// shell, a 30,664-row snapshot of the HQ-shaped room: 26 ms, 15-19 of them
/// system time, against 14 ms mapped).
const MMAP_BYTES: u64 = 1 << 30;

/// SQLite through the bundled library.
///
/// Writers are serialised inside the process by a lock held for the whole
/// transaction, and the transaction begins IMMEDIATE so that it holds SQLite's write
/// lock from the start: two writers never discover each other halfway through, which
/// SQLite reports as "database is locked" without waiting. Readers use deferred
/// transactions and run beside the writer thanks to WAL.
#[derive(Debug)]
pub struct SqliteEngine {
    config: DatabaseConfig,
    path: PathBuf,
    writer: Mutex<()>,
    /// Next-id counters per sequence, seeded from `max(id)` on first use.
    counters: Mutex<HashMap<&'static str, i64>>,
    /// Set once a connection of this engine opened the database: later ones (the
    /// pool's) must find the file where it was and never create an empty one in
    /// its place, so that a file deleted under a running process does not
    /// quietly come back empty (the claim's proof reports it deleted).
    opened: AtomicBool,
}

/// The write-ahead log's size (in pages) past which a COMMIT checkpoints it
/// itself: only when the writer's checkpoint thread (`checkpoint.rs`), which
/// keeps it far smaller, falls behind. SQLite's default is 1,000.
const WAL_BACKSTOP_PAGES: u32 = 10_000;

#[derive(QueryableByName)]
struct MaxId {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

impl SqliteEngine {
    pub fn new(config: DatabaseConfig) -> Self {
        let path = match &config.url {
            DatabaseUrl::Sqlite(p) => p.clone(),
            DatabaseUrl::Postgres(_) => unreachable!("SqliteEngine built for a PostgreSQL URL"),
        };
        SqliteEngine {
            config,
            path,
            writer: Mutex::new(()),
            counters: Mutex::new(HashMap::new()),
            opened: AtomicBool::new(false),
        }
    }

    fn read_only(&self) -> bool {
        self.config.mode == OpenMode::ReadOnly
    }

    /// The string handed to sqlite3_open_v2: the plain path for a writer's first
    /// connection (created if missing, with its folder), a `file:` URI with
    /// `mode=rw` for its later ones; for read-only opens a `file:` URI that
    /// creates nothing, beside the file or anywhere else (see [`read_only_uri`]),
    /// with the file's stamp when it is opened as unchanging.
    fn open_target(&self) -> Result<(String, Option<FileStamp>)> {
        let path = &self.path;
        let display = path.display();
        if self.read_only() {
            if !path.exists() {
                return Err(Error::not_found(format!("no SQLite database at {display}")));
            }
            return read_only_uri(path);
        }
        if self.opened.load(Ordering::SeqCst) {
            return Ok((format!("file:{}?mode=rw", uri_escape(path)), None));
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating the folder of {display}"))?;
        }
        let s = path
            .to_str()
            .ok_or_else(|| Error::invalid_argument(format!("path {display} is not UTF-8")))?;
        if s.starts_with("file:") {
            // Would be read as a URI; make it an unambiguous relative path.
            return Ok((format!("./{s}"), None));
        }
        Ok((s.to_owned(), None))
    }
}

/// A read-only URI for the database at `path` that writes nothing anywhere.
///
/// A database in WAL mode needs its `-wal` and `-shm` files even to be read,
/// and SQLite creates them when they are missing: as root beside the file
/// (leaving files an operator did not expect), as anyone else not at all in a
/// read-only folder ("attempt to write a readonly database"). When no `-wal`
/// file exists, nobody has the database open for writing and everything is in
/// the main file: it is opened `immutable=1` (and `mode=ro`), which reads the
/// file alone and locks nothing. When a `-wal` file exists, a writer may be running and the
/// file alone is not the whole database: `mode=ro` reads through the existing
/// `-wal`/`-shm` as any reader does. A database in rollback-journal mode is
/// opened `mode=ro`, which creates nothing either.
///
/// An immutable open reads the file as it is, without locks and without
/// looking for changes, and keeps what it read: once a writer comes (the
/// file's `hs-main`, Synapse), it would answer from pages of the file as it
/// was mixed with pages as it is, stale or "malformed". So it comes with the
/// file's stamp, taken before the `-wal` file was looked for, and a pool
/// hands the connection out only while the file still matches it and no
/// `-wal` file is there ([`Engine::still_as_stamped`]); otherwise it is
/// opened again, `mode=ro` beside the writer or immutable on what the writer
/// left.
fn read_only_uri(path: &Path) -> Result<(String, Option<FileStamp>)> {
    let stamp = FileStamp::of(path)
        .with_context(|| format!("reading the metadata of SQLite database {}", path.display()))?;
    let mut header = [0u8; 20];
    let in_wal_mode = {
        use std::io::Read;
        let mut file = std::fs::File::open(path)
            .with_context(|| format!("opening SQLite database {}", path.display()))?;
        // Bytes 18 and 19 of the header: the read and write format versions,
        // 2 for WAL. A file shorter than the header is no WAL database.
        file.read_exact(&mut header).is_ok() && header[18] == 2 && header[19] == 2
    };
    let (mode, stamp) = if in_wal_mode && !wal_path(path).exists() {
        ("mode=ro&immutable=1", Some(stamp))
    } else {
        ("mode=ro", None)
    };
    Ok((format!("file:{}?{mode}", uri_escape(path)), stamp))
}

/// The write-ahead log beside the database at `path`.
fn wal_path(path: &Path) -> PathBuf {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    PathBuf::from(wal)
}

fn uri_escape(path: &Path) -> String {
    let mut out = String::new();
    for ch in path.to_string_lossy().chars() {
        match ch {
            '%' => out.push_str("%25"),
            '?' => out.push_str("%3f"),
            '#' => out.push_str("%23"),
            c => out.push(c),
        }
    }
    out
}

impl Engine for SqliteEngine {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn url(&self) -> &DatabaseUrl {
        &self.config.url
    }

    fn supports_multiple_processes(&self) -> bool {
        false
    }

    fn round_trips_are_cheap(&self) -> bool {
        true
    }

    fn seeks_each_value_of_in_lists(&self) -> bool {
        true
    }

    fn joins_value_lists(&self) -> bool {
        true
    }

    fn seeking_each_of(&self, column: &str, values: &str) -> String {
        format!("{column} IN ({values})")
    }

    fn json_texts(&self, param: &str, column: &str) -> String {
        format!("SELECT j.value AS {column} FROM json_each({param}) j")
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
                "SELECT f.key AS {first}, s.value AS {second} \
                 FROM json_each({param}) f, json_each(f.value) s"
            ),
            super::json_pairs_by_first(pairs),
        )
    }

    fn insertion_row_id(&self, alias: &str) -> Option<String> {
        Some(format!("{alias}.rowid"))
    }

    fn connect(&self) -> Result<Conn> {
        Ok(self.connect_stamped()?.0)
    }

    fn connect_stamped(&self) -> Result<(Conn, Option<FileStamp>)> {
        let (target, stamp) = self.open_target()?;
        let mut c = SqliteConnection::establish(&target)
            .with_context(|| format!("opening SQLite database {}", self.path.display()))?;
        let mut pragmas = format!(
            "PRAGMA busy_timeout = {}; PRAGMA foreign_keys = ON; PRAGMA mmap_size = {MMAP_BYTES};",
            self.config.busy_timeout_ms
        );
        if !self.read_only() {
            pragmas.push_str(&format!(
                " PRAGMA journal_mode = WAL; PRAGMA synchronous = {}; \
                 PRAGMA wal_autocheckpoint = {WAL_BACKSTOP_PAGES};",
                self.config.sqlite_sync.as_str()
            ));
        }
        c.batch_execute(&pragmas)
            .with_context(|| format!("configuring SQLite database {}", self.path.display()))?;
        self.opened.store(true, Ordering::SeqCst);
        Ok((Conn::Sqlite(c), stamp))
    }

    fn still_as_stamped(&self, stamp: &FileStamp) -> bool {
        // The log first: a writer that came and went left the file changed.
        !wal_path(&self.path).exists() && FileStamp::of(&self.path).is_ok_and(|now| &now == stamp)
    }

    fn checkpoints_in_background(&self) -> bool {
        !self.read_only()
    }

    fn checkpoint(&self, conn: &mut Conn) -> Result<()> {
        conn.batch_execute("PRAGMA wal_checkpoint(PASSIVE)")
            .with_context(|| format!("checkpointing {}", self.path.display()))
    }

    fn begin<'e>(
        &'e self,
        conn: &mut Conn,
        options: &TxnOptions,
        _claimed: bool,
    ) -> diesel::QueryResult<WriterGuard<'e>> {
        if options.read_only {
            conn.begin_with("BEGIN DEFERRED")?;
            return Ok(None);
        }
        // A poisoned lock only means another writer panicked; the database itself
        // rolled that transaction back, so the lock is still good to take.
        let guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        conn.begin_with("BEGIN IMMEDIATE")?;
        Ok(Some(guard))
    }

    fn is_retryable(&self, error: &DieselError) -> bool {
        // diesel reports SQLITE_BUSY and SQLITE_LOCKED as Unknown; their messages are
        // fixed strings in SQLite itself ("database is locked", "database table is
        // locked"), not localised.
        match error {
            DieselError::DatabaseError(DatabaseErrorKind::SerializationFailure, _) => true,
            DieselError::DatabaseError(_, info) => info.message().contains("is locked"),
            _ => false,
        }
    }

    fn is_disconnect(&self, _error: &DieselError) -> bool {
        // In-process: there is no server to lose.
        false
    }

    fn is_out_of_space(&self, error: &DieselError) -> bool {
        // SQLITE_FULL reaches diesel as Unknown; its message is a fixed
        // string in SQLite itself.
        matches!(error, DieselError::DatabaseError(_, info)
            if info.message().contains("database or disk is full"))
    }

    fn next_ids(&self, conn: &mut Conn, sequence: &Sequence, n: usize) -> Result<Vec<i64>> {
        let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let last = match counters.get(sequence.name) {
            Some(last) => *last,
            None => {
                let sql = format!(
                    "SELECT COALESCE(MAX({}), 0) AS id FROM {}",
                    sequence.column, sequence.table
                );
                let row: MaxId = diesel::sql_query(sql)
                    .get_result(conn.sqlite()?)
                    .with_context(|| format!("seeding the id counter for {}", sequence.table))?;
                row.id
            }
        };
        let ids: Vec<i64> = (last + 1..=last + n as i64).collect();
        counters.insert(sequence.name, last + n as i64);
        Ok(ids)
    }

    fn stream_positions(&self, conn: &mut Conn, sequence: &Sequence, n: usize) -> Result<Vec<i64>> {
        // A write transaction holds the whole database (BEGIN IMMEDIATE)
        // until it ends: it is the lock.
        self.next_ids(conn, sequence, n)
    }

    fn inspect_sequence(&self, conn: &mut Conn, sequence: &Sequence) -> Result<SequenceHealth> {
        let sql = format!(
            "SELECT COALESCE(MAX({}), 0) AS id FROM {}",
            sequence.column, sequence.table
        );
        let row: MaxId = diesel::sql_query(sql)
            .get_result(conn.sqlite()?)
            .with_context(|| format!("reading the highest id of {}", sequence.table))?;
        Ok(SequenceHealth {
            sequence: sequence.name,
            handed_out: None,
            max_id: row.id,
            unreadable: None,
        })
    }

    fn sync_sequence(
        &self,
        _conn: &mut Conn,
        _sequence: &Sequence,
    ) -> Result<Option<SequenceRepair>> {
        // The counter is seeded from max(id) on first use: it cannot fall behind.
        Ok(None)
    }

    fn lock_table(&self, _conn: &mut Conn, _table: &str) -> Result<()> {
        // A write transaction already holds the whole database (BEGIN IMMEDIATE).
        Ok(())
    }

    fn refresh_statistics(&self, _conn: &mut Conn, _tables: &[&str]) -> Result<()> {
        // Without statistics (no sqlite_stat1) SQLite's planner takes an index
        // for every equality it can, which is what our reads need; ANALYZE
        // could only move it off them.
        Ok(())
    }

    fn insert_columns<'a>(
        &self,
        conn: &mut Conn,
        tables: &[TableRows<'a>],
        positions: Option<(&Sequence, usize)>,
        _notify: Option<(&str, &str)>,
        claim: Option<&ClaimState>,
        _alone: bool,
    ) -> Result<Vec<i64>> {
        // Nobody else to notify; the claim and the positions as their own
        // calls do them (in-process, no round trip to save).
        if let Some(claim) = claim {
            self.prove_claim(conn, claim)?;
        }
        let taken = match positions {
            Some((sequence, n)) => self.stream_positions(conn, sequence, n)?,
            None => Vec::new(),
        };
        super::sqlite_columns::write_tables(conn.sqlite()?, tables, &taken).with_context(|| {
            let names: Vec<&str> = tables.iter().map(|t| t.table).collect();
            format!("inserting rows into {}", names.join(", "))
        })?;
        Ok(taken)
    }

    fn notify(&self, _conn: &mut Conn, _channel: &str, _payload: &str) -> Result<()> {
        // SQLite is single-process: nobody else to wake.
        Ok(())
    }

    fn migrate(&self, conn: &mut Conn) -> Result<Vec<String>> {
        if self.read_only() {
            return Err(Error::new(ErrorKind::Migration(
                "a read-only database is never migrated".into(),
            )));
        }
        migrations::run(conn.sqlite()?, migrations::SQLITE)
    }

    fn check_schema(&self, conn: &mut Conn) -> Result<()> {
        migrations::check(conn.sqlite()?, migrations::SQLITE)
    }

    fn table_statistics(
        &self,
        conn: &mut Conn,
        tables: &[&str],
    ) -> Result<Vec<super::TableStatistics>> {
        super::sqlite_statistics::table_statistics(conn.sqlite()?, tables)
    }

    fn most_common_values(
        &self,
        _conn: &mut Conn,
        _table: &str,
        _column: &str,
    ) -> Result<Vec<(String, f64)>> {
        // sqlite_stat4 keeps sampled index keys, not a frequency per value.
        Ok(Vec::new())
    }

    fn listen(&self, channel: &str, _application_name: &str) -> Result<Box<dyn super::Listener>> {
        Err(crate::Error::invalid_argument(format!(
            "cannot listen on {channel}: SQLite serves one process, so nothing notifies it; \
             replicas need PostgreSQL"
        )))
    }

    fn table_names(&self, conn: &mut Conn) -> Result<std::collections::BTreeSet<String>> {
        diesel::sql_query(
            "SELECT name FROM sqlite_master WHERE type = 'table' \
             AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'",
        )
        .load::<super::TableName>(conn.sqlite()?)
        .map(super::table_set)
        .context("listing the tables")
    }

    fn try_claim_main_process(
        &self,
        claim: &Arc<ClaimState>,
    ) -> Result<Option<super::ClaimHandle>> {
        self.open_target()?; // creates the folder, as the database's first open does
        super::sqlite_claim::try_claim(&self.path, claim)
    }

    fn prove_claim(&self, conn: &mut Conn, claim: &ClaimState) -> Result<()> {
        super::sqlite_claim::prove(conn, claim)
    }

    fn confirm_claim_after_commit(&self, claim: &ClaimState) -> Result<()> {
        claim.expect_same_file()
    }
}
