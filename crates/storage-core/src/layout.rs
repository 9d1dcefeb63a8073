//! What a database URL points at, read before anything is written to it: a
//! database of ours, a new or empty one, a database that Synapse wrote, or one
//! of another application.
//!
//! Our state tables have Synapse's names and columns, so a Synapse database
//! looks half like ours; migrating it would add our tables beside Synapse's,
//! fail on the first table that already exists, and leave an SQLite file
//! switched to WAL. A database of another application (a wrong `--database`)
//! would get our tables beside its own, or, where a name is shared (`events`,
//! `rooms`), our migrations' first part and a failure. Every process that
//! writes (or migrates) therefore calls [`refuse_foreign_database`] first: `Database::open` does for writers and
//! replicas, and the main process does before it claims the database.
//! Reading a Synapse database as it is stays allowed: `state`, `inspect`,
//! `serve --read-only`, `port --from`.

use crate::config::{DatabaseConfig, DatabaseUrl, OpenMode};
use crate::engine;
use crate::error::{Error, ErrorKind, Result, ResultExt};
use diesel::sql_types::BigInt;
use diesel::{QueryableByName, RunQueryDsl};

/// The table diesel_migrations keeps in every database of ours.
const OUR_MIGRATIONS_TABLE: &str = "__diesel_schema_migrations";

/// The table Synapse keeps its schema version in.
const SYNAPSE_SCHEMA_TABLE: &str = "schema_version";

/// The state tables both layouts share.
const STATE_TABLES: [&str; 4] = [
    "state_groups",
    "state_groups_state",
    "state_group_edges",
    "event_to_state_groups",
];

/// What a database holds, as far as we are concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Nothing there yet (an SQLite file that does not exist).
    Missing,
    /// No table at all (the engine's own aside: SQLite's `sqlite_*`,
    /// PostgreSQL's catalogs and extensions' tables).
    Empty,
    /// Migrated by us (our migrations table is there).
    Ours,
    /// Written by Synapse: its `schema_version` table, or the state tables
    /// without our migrations table. `schema_version` when readable.
    Synapse { schema_version: Option<i64> },
    /// Tables, but neither our migrations table nor any of Synapse's: another
    /// application's. `tables`: the first few of them, by name.
    Other { tables: Vec<String> },
}

/// How many of another application's tables a refusal names.
const NAMED_TABLES: usize = 5;

#[derive(QueryableByName)]
struct Version {
    #[diesel(sql_type = BigInt)]
    version: i64,
}

/// Reads the layout of the database at `url` through a read-only connection,
/// writing nothing (on SQLite, not even a `-wal` or `-shm` file).
pub fn detect_layout(url: &DatabaseUrl) -> Result<Layout> {
    if let DatabaseUrl::Sqlite(path) = url {
        // An empty file is what SQLite makes of a database never written.
        if std::fs::metadata(path).map_or(true, |m| m.len() == 0) {
            return Ok(Layout::Missing);
        }
    }
    let engine = engine::for_config(&DatabaseConfig::new(url.clone(), OpenMode::ReadOnly));
    let mut conn = engine.connect()?;
    let tables = engine.table_names(&mut conn)?;
    if tables.contains(SYNAPSE_SCHEMA_TABLE) {
        let schema_version = synapse_schema_version(&mut conn);
        return Ok(Layout::Synapse { schema_version });
    }
    if tables.contains(OUR_MIGRATIONS_TABLE) {
        return Ok(Layout::Ours);
    }
    if STATE_TABLES.iter().any(|t| tables.contains(*t)) {
        return Ok(Layout::Synapse {
            schema_version: None,
        });
    }
    if !tables.is_empty() {
        return Ok(Layout::Other {
            tables: tables.into_iter().take(NAMED_TABLES).collect(),
        });
    }
    Ok(Layout::Empty)
}

/// Synapse's schema version, if its table holds one we can read.
fn synapse_schema_version(conn: &mut crate::Conn) -> Option<i64> {
    let sql = "SELECT CAST(version AS BIGINT) AS version FROM schema_version";
    crate::with_conn!(conn, |c| diesel::sql_query(sql).get_result::<Version>(c))
        .ok()
        .map(|v| v.version)
}

/// Refuses, before anything is written, to write to or migrate a database
/// that is not ours: one line saying what it is and what can be done. What
/// every writer calls before it opens, claims or migrates a database.
pub fn refuse_foreign_database(config: &DatabaseConfig) -> Result<()> {
    let (url, layout) = layout_of(config)?;
    match layout {
        Layout::Synapse { schema_version } => Err(Error::new(ErrorKind::NotOurs(format!(
            "{url} is a Synapse database{}: hs-main never writes to it. Read it as it is \
             with `hs-main state`, `hs-main inspect` or `hs-main serve --read-only`, or copy \
             its state into a new database of ours with `hs-main port --from {url} --to URL`",
            schema_version.map_or(String::new(), |v| format!(" (schema version {v})"))
        )))),
        Layout::Other { tables } => Err(Error::new(ErrorKind::NotOurs(format!(
            "{url} holds tables of another application ({}), none of hs-main's or \
             Synapse's: hs-main writes only to a database of its own or an empty one. \
             Check the database URL",
            tables.join(", ")
        )))),
        Layout::Missing | Layout::Empty | Layout::Ours => Ok(()),
    }
}

/// The other way round, for the one writer allowed on Synapse's tables
/// ([`OpenMode::SynapseState`], `hs-main compress`): refuses any database that
/// Synapse did not write.
pub fn require_synapse_database(config: &DatabaseConfig) -> Result<()> {
    let (url, layout) = layout_of(config)?;
    match layout {
        Layout::Synapse { .. } => Ok(()),
        other => Err(Error::invalid_argument(format!(
            "{url} is not a Synapse database ({other:?}): open it as its main process"
        ))),
    }
}

/// For a command that only reads (`state`, `inspect`, `serve --read-only`),
/// which reads ours or Synapse's as it is: refuses a database of another
/// application with one line naming a few of its tables, rather than with the
/// first table a statement does not find.
pub fn refuse_unreadable_database(config: &DatabaseConfig) -> Result<()> {
    let (url, layout) = layout_of(config)?;
    match layout {
        Layout::Other { tables } => Err(Error::invalid_argument(format!(
            "{url} holds tables of another application ({}), none of hs-main's or \
             Synapse's: there is nothing here to read. Check the database URL",
            tables.join(", ")
        ))),
        _ => Ok(()),
    }
}

/// The database's URL as logs may show it, and its layout.
fn layout_of(config: &DatabaseConfig) -> Result<(String, Layout)> {
    let url = config.url.redacted();
    let layout =
        detect_layout(&config.url).with_context(|| format!("checking what database {url} is"))?;
    Ok((url, layout))
}
