//! One connection type over both engines, and its r2d2 pool manager.
//!
//! Queries are written once with diesel's typed DSL and compiled for each backend by
//! [`with_conn!`]; behaviour that really differs per engine lives in
//! [`crate::engine`], never in ad-hoc checks of which variant a connection is.

use crate::engine::Engine;
use crate::error::{Error, Result};
use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::r2d2::R2D2Connection;
use diesel::{PgConnection, SqliteConnection};
use std::sync::Arc;

/// A live connection to one of the two engines.
pub enum Conn {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Conn::Sqlite(_) => "Conn::Sqlite",
            Conn::Postgres(_) => "Conn::Postgres",
        })
    }
}

/// Runs `$body` with `$c` bound to the concrete diesel connection of `$conn`
/// (a `&mut Conn`). The body is compiled once per backend, so it must be a query
/// both backends can express; anything else belongs in an [`Engine`] method.
#[macro_export]
macro_rules! with_conn {
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn {
            $crate::Conn::Sqlite($c) => $body,
            $crate::Conn::Postgres($c) => $body,
        }
    };
}

impl Conn {
    /// The SQLite connection; an error if this is not one (an engine bug).
    pub fn sqlite(&mut self) -> Result<&mut SqliteConnection> {
        match self {
            Conn::Sqlite(c) => Ok(c),
            Conn::Postgres(_) => Err(Error::other(
                "internal: the SQLite engine was handed a PostgreSQL connection",
            )),
        }
    }

    /// The PostgreSQL connection; an error if this is not one (an engine bug).
    pub fn postgres(&mut self) -> Result<&mut PgConnection> {
        match self {
            Conn::Postgres(c) => Ok(c),
            Conn::Sqlite(_) => Err(Error::other(
                "internal: the PostgreSQL engine was handed an SQLite connection",
            )),
        }
    }

    /// Runs SQL without results (DDL, pragmas, several statements).
    pub fn batch_execute(&mut self, sql: &str) -> Result<()> {
        with_conn!(self, |c| c.batch_execute(sql))?;
        Ok(())
    }

    /// Opens a transaction with an engine-specific BEGIN statement, through diesel's
    /// transaction manager so that nested diesel transactions become savepoints.
    pub(crate) fn begin_with(&mut self, begin_sql: &str) -> diesel::QueryResult<()> {
        with_conn!(self, |c| AnsiTransactionManager::begin_transaction_sql(
            c, begin_sql
        ))
    }

    pub(crate) fn commit(&mut self) -> diesel::QueryResult<()> {
        with_conn!(self, |c| AnsiTransactionManager::commit_transaction(c))
    }

    pub(crate) fn rollback(&mut self) -> diesel::QueryResult<()> {
        with_conn!(self, |c| AnsiTransactionManager::rollback_transaction(c))
    }

    pub(crate) fn in_transaction(&mut self) -> bool {
        with_conn!(self, |c| {
            AnsiTransactionManager::transaction_manager_status_mut(c)
                .transaction_depth()
                .ok()
                .flatten()
                .is_some()
        })
    }

    fn is_broken(&mut self) -> bool {
        with_conn!(self, |c| c.is_broken())
    }

    fn ping(&mut self) -> diesel::QueryResult<()> {
        with_conn!(self, |c| c.ping())
    }
}

/// Creates pool connections through the engine, which applies its per-connection
/// settings (pragmas, read-only sessions).
#[derive(Debug)]
pub(crate) struct ConnManager {
    pub(crate) engine: Arc<dyn Engine>,
    /// Set when the last handle of the database is dropped: r2d2 may still run a
    /// connection it scheduled in the background, and that must not recreate a
    /// database (an SQLite file and its folder) that its owner already removed.
    pub(crate) closed: Arc<std::sync::atomic::AtomicBool>,
}

impl r2d2::ManageConnection for ConnManager {
    type Connection = Conn;
    type Error = Error;

    fn connect(&self) -> Result<Conn> {
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::other("the database was closed"));
        }
        self.engine.connect()
    }

    fn is_valid(&self, conn: &mut Conn) -> Result<()> {
        conn.ping()?;
        Ok(())
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        conn.is_broken()
    }
}
