//! Rows of several tables given column by column, for an engine that inserts
//! them all in one statement ([`super::Engine::insert_columns`]): on
//! PostgreSQL, where each statement is a round trip (~85 us here), a
//! data-modifying CTE per table over `unnest` of one bound array per column.
//! Values are always bound, never written into the SQL; table and column
//! names are the callers' constants.

use crate::claim::ClaimRow;
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{Array, BigInt, Bool, Integer, Nullable, Text};
use diesel::{OptionalExtension, QueryResult, RunQueryDsl};

/// One column's values, one a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Column<'a> {
    Text(Vec<&'a str>),
    OptText(Vec<Option<&'a str>>),
    BigInt(Vec<i64>),
    OptBigInt(Vec<Option<i64>>),
    Bool(Vec<bool>),
    OptBool(Vec<Option<bool>>),
    OptInt(Vec<Option<i32>>),
}

impl Column<'_> {
    fn len(&self) -> usize {
        match self {
            Column::Text(v) => v.len(),
            Column::OptText(v) => v.len(),
            Column::BigInt(v) => v.len(),
            Column::OptBigInt(v) => v.len(),
            Column::Bool(v) => v.len(),
            Column::OptBool(v) => v.len(),
            Column::OptInt(v) => v.len(),
        }
    }

    /// The array type PostgreSQL reads the bound values as.
    fn pg_array(&self) -> &'static str {
        match self {
            Column::Text(_) | Column::OptText(_) => "text[]",
            Column::BigInt(_) | Column::OptBigInt(_) => "bigint[]",
            Column::Bool(_) | Column::OptBool(_) => "boolean[]",
            Column::OptInt(_) => "integer[]",
        }
    }

    fn push_bind<'b>(&'b self, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        match self {
            Column::Text(v) => out.push_bind_param::<Array<Text>, _>(v),
            Column::OptText(v) => out.push_bind_param::<Array<Nullable<Text>>, _>(v),
            Column::BigInt(v) => out.push_bind_param::<Array<BigInt>, _>(v),
            Column::OptBigInt(v) => out.push_bind_param::<Array<Nullable<BigInt>>, _>(v),
            Column::Bool(v) => out.push_bind_param::<Array<Bool>, _>(v),
            Column::OptBool(v) => out.push_bind_param::<Array<Nullable<Bool>>, _>(v),
            Column::OptInt(v) => out.push_bind_param::<Array<Nullable<Integer>>, _>(v),
        }
    }
}

/// One table's rows, every column the same length, and what to do with them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRows<'a> {
    pub table: &'static str,
    pub columns: Vec<(&'static str, Column<'a>)>,
    pub write: RowsWrite,
}

/// What [`TableRows`] do to their table. Every part of one statement sees the
/// table as it was before the statement, in no set order: two parts on one
/// table must touch different rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowsWrite {
    /// Inserted; one that breaks a unique constraint fails the statement.
    Insert,
    /// Inserted, those that would break a unique constraint left out, as
    /// `ON CONFLICT DO NOTHING` does.
    InsertSkippingConflicts,
    /// Inserted, or where a row with the same values in the `key` columns
    /// (a unique constraint's) exists, its other columns set to these (`ON
    /// CONFLICT (key) DO UPDATE`): a room's current state.
    Upsert { key: &'static [&'static str] },
    /// The rows equal to these on every column given are deleted.
    Delete,
}

impl<'a> TableRows<'a> {
    /// Rows inserted as they are ([`RowsWrite::Insert`]).
    pub fn insert(table: &'static str, columns: Vec<(&'static str, Column<'a>)>) -> Self {
        TableRows {
            table,
            columns,
            write: RowsWrite::Insert,
        }
    }

    /// How many rows it holds (0 with no columns).
    pub fn len(&self) -> usize {
        self.columns.first().map_or(0, |(_, c)| c.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `WITH t0 AS (INSERT INTO .. SELECT * FROM unnest($1::bigint[], ..)), ..
/// SELECT 1`: every table's rows in one statement; `SELECT pg_notify($n,
/// $m)` at the end instead when it also notifies.
struct UnnestInsert<'q, 'a> {
    tables: Vec<&'q TableRows<'a>>,
    notify: Option<(&'q str, &'q str)>,
    /// Whether it ends reading the main-process claim's row (the claim
    /// proven in the same round trip), rather than with nothing to read.
    read_claim: bool,
}

/// What it reads when it reads the claim's row: that row's columns first (a
/// NOTIFY's void value may follow, unread).
impl Query for UnnestInsert<'_, '_> {
    type SqlType = (BigInt, Text, BigInt);
}

impl QueryId for UnnestInsert<'_, '_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl QueryFragment<Pg> for UnnestInsert<'_, '_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        // Cached as a prepared statement per shape (which tables have rows:
        // a handful), keyed by its SQL: parsing and planning it afresh cost
        // the server 0.23 ms of a message's write (measured with
        // log_min_duration_statement=0), more than a round trip.
        for (i, t) in self.tables.iter().enumerate() {
            out.push_sql(if i == 0 { "WITH " } else { ", " });
            let names = t
                .columns
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ");
            let table = t.table;
            if t.write == RowsWrite::Delete {
                out.push_sql(&format!(
                    "t{i} AS (DELETE FROM {table} WHERE ({names}) IN (SELECT * FROM "
                ));
                push_unnest(t, &mut out)?;
                out.push_sql("))");
                continue;
            }
            out.push_sql(&format!(
                "t{i} AS (INSERT INTO {table} ({names}) SELECT * FROM "
            ));
            push_unnest(t, &mut out)?;
            match &t.write {
                RowsWrite::Insert | RowsWrite::Delete => {}
                RowsWrite::InsertSkippingConflicts => out.push_sql(" ON CONFLICT DO NOTHING"),
                RowsWrite::Upsert { key } => {
                    let set: Vec<String> = t
                        .columns
                        .iter()
                        .map(|(n, _)| *n)
                        .filter(|n| !key.contains(n))
                        .map(|n| format!("{n} = EXCLUDED.{n}"))
                        .collect();
                    out.push_sql(&format!(
                        " ON CONFLICT ({}) DO UPDATE SET {}",
                        key.join(", "),
                        set.join(", ")
                    ));
                }
            }
            out.push_sql(")");
        }
        let (claim_columns, claim_from) = super::postgres_claim::CLAIM_ROW;
        out.push_sql(" SELECT ");
        if self.read_claim {
            out.push_sql(claim_columns);
            if self.notify.is_some() {
                out.push_sql(", ");
            }
        }
        match &self.notify {
            Some((channel, payload)) => {
                out.push_sql("pg_notify(");
                out.push_bind_param::<Text, _>(*channel)?;
                out.push_sql(", ");
                out.push_bind_param::<Text, _>(*payload)?;
                out.push_sql(")");
            }
            None if !self.read_claim => out.push_sql("1"),
            None => {}
        }
        if self.read_claim {
            out.push_sql(" FROM ");
            out.push_sql(claim_from);
        }
        Ok(())
    }
}

/// `unnest($1::bigint[], $2::text[], ..)`: one bound array per column.
fn push_unnest<'b>(t: &'b TableRows<'_>, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()> {
    out.push_sql("unnest(");
    for (j, (_, column)) in t.columns.iter().enumerate() {
        if j > 0 {
            out.push_sql(", ");
        }
        column.push_bind(out)?;
        out.push_sql("::");
        out.push_sql(column.pg_array());
    }
    out.push_sql(")");
    Ok(())
}

impl RunQueryDsl<diesel::PgConnection> for UnnestInsert<'_, '_> {}

/// Inserts every table's rows in one statement, which also sends `notify`
/// (channel, payload) when given, and with `read_claim` answers the claim's
/// row (none at all when there is nothing to do).
pub(crate) fn insert_with_unnest(
    conn: &mut diesel::PgConnection,
    tables: &[TableRows<'_>],
    notify: Option<(&str, &str)>,
    read_claim: bool,
) -> QueryResult<Option<ClaimRow>> {
    let tables: Vec<&TableRows<'_>> = tables.iter().filter(|t| !t.is_empty()).collect();
    if tables.is_empty() && notify.is_none() && !read_claim {
        return Ok(None);
    }
    let statement = UnnestInsert {
        tables,
        notify,
        read_claim,
    };
    if read_claim {
        statement.get_result::<ClaimRow>(conn).optional()
    } else {
        statement.execute(conn).map(|_| None)
    }
}
