//! The foundation of the storage layer: a [`Database`] over diesel and r2d2 on
//! SQLite (embedded default) or PostgreSQL, transactions whose `call_after` hooks
//! fire only on commit, retries, per-engine behaviour ([`engine`]), migrations,
//! caches ([`cache`]), metrics and log context.
//!
//! Nothing here knows about rooms or events; the crates above own their tables
//! and queries and reach the database only through [`Database::run_interaction`].

pub mod cache;
mod checkpoint;
mod claim;
pub mod config;
mod conn;
mod database;
pub mod engine;
mod error;
mod layout;
pub mod log_context;
pub mod logging;
pub mod metrics;
mod migrations;
mod raw_rows;
mod shared_text;
#[doc(hidden)]
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod transaction;

pub use claim::{on_claim_lost, ClaimRow, ClaimState, DatabaseFile, MainProcessClaim, CLAIM_WAIT};
pub use config::{DatabaseConfig, DatabaseUrl, OpenMode, SqliteSync, StoreConfig};
pub use conn::Conn;
pub use database::{Database, MAX_RETRIES};
pub use engine::{
    json_texts, Column, Engine, Isolation, Listener, RowsWrite, Sequence, SequenceHealth,
    SequenceRepair, TableRows, TableStatistics, TxnOptions,
};
pub use error::{Error, ErrorKind, Result, ResultExt};
pub use layout::{
    detect_layout, refuse_foreign_database, refuse_unreadable_database, require_synapse_database,
    Layout,
};
pub use log_context::LogContext;
pub use raw_rows::{visit_rows, RawBackend, RawRow, RowVisitor};
pub use shared_text::{intern, InternedText, SharedText};
pub use transaction::Transaction;

/// Re-exported so that crates above write queries against the same diesel.
pub use diesel;
