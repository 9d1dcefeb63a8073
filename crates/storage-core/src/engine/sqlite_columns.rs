//! [`TableRows`] on SQLite ([`super::Engine::insert_columns`]): each table's
//! rows in multi-row statements of a power-of-two number of rows (or of
//! fewer than [`EXACT_BELOW`], as many as there are), so that a connection
//! keeps a handful of prepared statements per table (each shape under a slot
//! of its own, [`statement_slots`]) and a batch of any size reuses them.
//!
//! Statements cost no round trip here; what a statement per row costs is
//! diesel's work to find the kept statement (its SQL rebuilt and hashed) and
//! SQLite's to start and end it: a third of the import writer's instructions
//! (callgrind). The inserts are `OR FAIL`: a multi-row INSERT that may fail
//! halfway with `ABORT`, SQLite's default, first copies every page it
//! changes to a statement journal so as to undo its own rows; with `FAIL` the
//! rows before the failing one stay, and the error rolls the whole
//! transaction back anyway (no caller goes on after a failed statement, as
//! none can on PostgreSQL).

use super::columns::{Column, RowsWrite, TableRows};
use super::statement_slots::{self, InSlot, Slots, Slotted};
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::sql_types::{BigInt, Bool, Integer, Nullable, Text};
use diesel::sqlite::Sqlite;
use diesel::{QueryResult, RunQueryDsl, SqliteConnection};

/// The most rows in one statement. Past a few hundred rows the statement's
/// own start and end cost nothing a row, while its prepared program grows
/// with it; kept under SQLite's 32,766 parameters for the widest table.
const MAX_ROWS: usize = 256;

/// Fewer rows than this go in one statement of as many rows: a message's
/// three auth events in one INSERT, not two (2 rows, then 1). A statement's
/// start and end cost more than a few more kept statements per table.
const EXACT_BELOW: usize = 8;

/// The most parameters SQLite binds in one statement
/// (`SQLITE_MAX_VARIABLE_NUMBER`'s default since 3.32).
const MAX_PARAMETERS: usize = 32_766;

/// Inserts (or deletes, upserts) every table's rows, table after table, the
/// columns of positions filled from `positions` (row `i` the `i`-th, the
/// highest for [`Column::HighestPosition`]).
pub(crate) fn write_tables(
    conn: &mut SqliteConnection,
    tables: &[TableRows<'_>],
    positions: &[i64],
) -> QueryResult<()> {
    let highest = positions.iter().copied().max().unwrap_or(0);
    for table in tables {
        let width = table.columns.len().max(1);
        let most = MAX_ROWS.min(MAX_PARAMETERS / width).max(1);
        let mut start = 0;
        let len = table.len();
        while start < len {
            // What is left when it is only a few rows, else the largest
            // power of two that fits it.
            let left = (len - start).min(most);
            let rows = if left < EXACT_BELOW {
                left
            } else {
                1 << (usize::BITS - 1 - left.leading_zeros())
            };
            let statement = RowsStatement {
                table,
                rows: start..start + rows,
                positions,
                highest,
            };
            let shape = RowsShape {
                table: table.table,
                columns: table.columns.iter().map(|(name, _)| *name).collect(),
                write: table.write.clone(),
                rows,
            };
            let sql = || statement_slots::sql_of(&statement, &Sqlite);
            SLOTS.run(
                shape,
                sql,
                RunRows {
                    conn,
                    statement: statement.clone(),
                },
            )?;
            start += rows;
        }
    }
    Ok(())
}

/// Rows `rows` of one table: `INSERT OR FAIL INTO t (..) VALUES (..), ..`
/// (with `ON CONFLICT` for [`RowsWrite::InsertSkippingConflicts`] and
/// [`RowsWrite::Upsert`]), or `DELETE FROM t WHERE (..) IN (VALUES ..)`.
#[derive(Clone)]
struct RowsStatement<'q, 'a> {
    table: &'q TableRows<'a>,
    rows: std::ops::Range<usize>,
    positions: &'q [i64],
    highest: i64,
}

/// What a [`RowsStatement`]'s SQL depends on: its slot's key
/// ([`super::statement_slots`]).
#[derive(PartialEq, Eq, Hash)]
struct RowsShape {
    table: &'static str,
    columns: Vec<&'static str>,
    write: RowsWrite,
    rows: usize,
}

/// The kind of the slots of [`RowsStatement`]s.
struct Rows;

static SLOTS: Slots<Rows, RowsShape> = Slots::new();

/// A [`RowsStatement`] to run on `conn`.
struct RunRows<'c, 'q, 'a> {
    conn: &'c mut SqliteConnection,
    statement: RowsStatement<'q, 'a>,
}

impl InSlot<Rows> for RunRows<'_, '_, '_> {
    type Output = QueryResult<usize>;

    fn run<const N: usize>(self) -> QueryResult<usize> {
        Slotted::<Rows, _, N>::new(self.statement).execute(self.conn)
    }
}

impl QueryId for RowsStatement<'_, '_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl QueryFragment<Sqlite> for RowsStatement<'_, '_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Sqlite>) -> QueryResult<()> {
        // Written in pieces, nothing allocated: diesel walks it to bind its
        // values on every execution (and to build its SQL only when it
        // prepares it, the statement kept under its slot).
        let t = self.table;
        // One row is deleted by `(..) = (..)`: `IN (VALUES ..)` would have
        // SQLite build (and throw away) a temporary table of that one row
        // (a forward extremity replaced by a message, in every write).
        let one_deleted = t.write == RowsWrite::Delete && self.rows.len() == 1;
        if t.write == RowsWrite::Delete {
            out.push_sql("DELETE FROM ");
            out.push_sql(t.table);
            out.push_sql(" WHERE (");
            t.write_column_names(&mut |s| out.push_sql(s));
            out.push_sql(if one_deleted { ") = " } else { ") IN (VALUES " });
        } else {
            out.push_sql("INSERT OR FAIL INTO ");
            out.push_sql(t.table);
            out.push_sql(" (");
            t.write_column_names(&mut |s| out.push_sql(s));
            out.push_sql(") VALUES ");
        }
        for i in self.rows.clone() {
            out.push_sql(if i == self.rows.start { "(" } else { ", (" });
            for (j, (_, column)) in t.columns.iter().enumerate() {
                if j > 0 {
                    out.push_sql(", ");
                }
                self.push_value(column, i, &mut out)?;
            }
            out.push_sql(")");
        }
        if t.write != RowsWrite::Delete {
            t.write_on_conflict(&mut |s| out.push_sql(s));
        } else if !one_deleted {
            out.push_sql(")");
        }
        Ok(())
    }

    /// Always: its values are all bound. Said here so that diesel does not
    /// walk it once more to find out.
    fn is_safe_to_cache_prepared(&self, _backend: &Sqlite) -> QueryResult<bool> {
        Ok(true)
    }
}

impl RowsStatement<'_, '_> {
    fn push_value<'b>(
        &'b self,
        column: &'b Column<'_>,
        i: usize,
        out: &mut AstPass<'_, 'b, Sqlite>,
    ) -> QueryResult<()> {
        match column {
            Column::Text(v) => out.push_bind_param::<Text, _>(&v[i]),
            Column::OptText(v) => out.push_bind_param::<Nullable<Text>, _>(&v[i]),
            Column::BigInt(v) => out.push_bind_param::<BigInt, _>(&v[i]),
            Column::OptBigInt(v) => out.push_bind_param::<Nullable<BigInt>, _>(&v[i]),
            Column::Bool(v) => out.push_bind_param::<Bool, _>(&v[i]),
            Column::OptBool(v) => out.push_bind_param::<Nullable<Bool>, _>(&v[i]),
            Column::OptInt(v) => out.push_bind_param::<Nullable<Integer>, _>(&v[i]),
            Column::Position => out.push_bind_param::<BigInt, _>(&self.positions[i]),
            Column::HighestPosition => out.push_bind_param::<BigInt, _>(&self.highest),
        }
    }
}
