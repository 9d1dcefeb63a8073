//! Rows of several tables given column by column, for an engine that inserts
//! them all in one statement ([`super::Engine::insert_columns`]): on
//! PostgreSQL, where each statement is a round trip (~85 us here), a
//! data-modifying CTE per table over `unnest` of one bound array per column.
//! Values are always bound, never written into the SQL; table and column
//! names are the callers' constants.

use super::statement_slots::{self, InSlot, Slots, Slotted};
use crate::claim::ClaimRow;
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::serialize::{self, IsNull, Output, ToSql};
use diesel::sql_types::HasSqlType;
use diesel::sql_types::{Array, BigInt, Bool, Integer, Nullable, Text};
use diesel::{OptionalExtension, QueryResult, RunQueryDsl};
use std::io::Write;

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
    /// Each row the next of the stream positions the statement takes
    /// ([`super::Engine::insert_columns`] with positions), in row order: the
    /// first row the lowest. Holds no values; the table's other columns say
    /// how many rows it has.
    Position,
    /// Every row the highest of the stream positions the statement takes.
    HighestPosition,
}

impl Column<'_> {
    /// Which of the kinds it is, as a number: what a statement's shape
    /// keeps of it.
    fn kind(&self) -> u8 {
        match self {
            Column::Text(_) => 0,
            Column::OptText(_) => 1,
            Column::BigInt(_) => 2,
            Column::OptBigInt(_) => 3,
            Column::Bool(_) => 4,
            Column::OptBool(_) => 5,
            Column::OptInt(_) => 6,
            Column::Position => 7,
            Column::HighestPosition => 8,
        }
    }

    /// How many values it holds; `None` for a column of positions, which
    /// the statement fills.
    fn len(&self) -> Option<usize> {
        Some(match self {
            Column::Text(v) => v.len(),
            Column::OptText(v) => v.len(),
            Column::BigInt(v) => v.len(),
            Column::OptBigInt(v) => v.len(),
            Column::Bool(v) => v.len(),
            Column::OptBool(v) => v.len(),
            Column::OptInt(v) => v.len(),
            Column::Position | Column::HighestPosition => return None,
        })
    }

    /// The array type PostgreSQL reads the bound values as.
    fn pg_array(&self) -> &'static str {
        match self {
            Column::Text(_) | Column::OptText(_) => "text[]",
            Column::BigInt(_) | Column::OptBigInt(_) => "bigint[]",
            Column::Bool(_) | Column::OptBool(_) => "boolean[]",
            Column::OptInt(_) => "integer[]",
            Column::Position | Column::HighestPosition => {
                unreachable!("a column of positions binds no values")
            }
        }
    }

    /// What fills a column of positions (the rows joined with theirs);
    /// `None` for a column of values.
    fn position_sql(&self) -> Option<&'static str> {
        match self {
            Column::Position => Some("positions.id"),
            Column::HighestPosition => Some("(SELECT max(id) FROM positions)"),
            _ => None,
        }
    }

    fn push_bind<'b>(&'b self, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        // Each bound by `ToSql` below, as the array type it is read as.
        match self {
            Column::Text(_) => out.push_bind_param::<Array<Text>, _>(self),
            Column::OptText(_) => out.push_bind_param::<Array<Nullable<Text>>, _>(self),
            Column::BigInt(_) => out.push_bind_param::<Array<BigInt>, _>(self),
            Column::OptBigInt(_) => out.push_bind_param::<Array<Nullable<BigInt>>, _>(self),
            Column::Bool(_) => out.push_bind_param::<Array<Bool>, _>(self),
            Column::OptBool(_) => out.push_bind_param::<Array<Nullable<Bool>>, _>(self),
            Column::OptInt(_) => out.push_bind_param::<Array<Nullable<Integer>>, _>(self),
            Column::Position | Column::HighestPosition => {
                unreachable!("a column of positions binds no values")
            }
        }
    }

    /// The values as a PostgreSQL array in its binary format, byte for byte
    /// what diesel's own `Vec<T>` binds send, but written in one pass into
    /// one buffer of the right size, then into the bind's: diesel's writes
    /// every element into a buffer of its own and grows the bind's a few
    /// bytes at a time, which cost ~64,000 instructions of a message's
    /// statement (~25 arrays, most of one element).
    fn write_array(&self, out: &mut Output<'_, '_, Pg>) -> serialize::Result {
        match self {
            Column::Text(v) => {
                let oid = <Pg as HasSqlType<Text>>::metadata(out.metadata_lookup()).oid()?;
                write_array(out, oid, v, |s| Some(s.as_bytes()))
            }
            Column::OptText(v) => {
                let oid = <Pg as HasSqlType<Text>>::metadata(out.metadata_lookup()).oid()?;
                write_array(out, oid, v, |s| s.map(str::as_bytes))
            }
            Column::BigInt(v) => {
                let oid = <Pg as HasSqlType<BigInt>>::metadata(out.metadata_lookup()).oid()?;
                write_array(out, oid, v, |n| Some(n.to_be_bytes()))
            }
            Column::OptBigInt(v) => {
                let oid = <Pg as HasSqlType<BigInt>>::metadata(out.metadata_lookup()).oid()?;
                write_array(out, oid, v, |n| n.map(i64::to_be_bytes))
            }
            Column::Bool(v) => {
                let oid = <Pg as HasSqlType<Bool>>::metadata(out.metadata_lookup()).oid()?;
                write_array(out, oid, v, |b| Some([u8::from(*b)]))
            }
            Column::OptBool(v) => {
                let oid = <Pg as HasSqlType<Bool>>::metadata(out.metadata_lookup()).oid()?;
                write_array(out, oid, v, |b| b.map(|b| [u8::from(b)]))
            }
            Column::OptInt(v) => {
                let oid = <Pg as HasSqlType<Integer>>::metadata(out.metadata_lookup()).oid()?;
                write_array(out, oid, v, |n| n.map(i32::to_be_bytes))
            }
            Column::Position | Column::HighestPosition => {
                unreachable!("a column of positions binds no values")
            }
        }
    }
}

/// A one-dimensional PostgreSQL array of `values` whose elements are of
/// type `oid`, each element's bytes given by `bytes` (`None`: NULL), into
/// `out` in one write.
fn write_array<T, B: AsRef<[u8]>>(
    out: &mut Output<'_, '_, Pg>,
    oid: u32,
    values: &[T],
    bytes: impl Fn(&T) -> Option<B>,
) -> serialize::Result {
    let size = values
        .iter()
        .map(|v| 4 + bytes(v).map_or(0, |b| b.as_ref().len()))
        .sum::<usize>();
    let mut buf = Vec::with_capacity(20 + size);
    // Dimensions, flags (0, as diesel sends them), element type, length,
    // lower bound.
    buf.extend_from_slice(&1i32.to_be_bytes());
    buf.extend_from_slice(&0i32.to_be_bytes());
    buf.extend_from_slice(&oid.to_be_bytes());
    buf.extend_from_slice(&i32::try_from(values.len())?.to_be_bytes());
    buf.extend_from_slice(&1i32.to_be_bytes());
    for v in values {
        match bytes(v) {
            Some(b) => {
                let b = b.as_ref();
                buf.extend_from_slice(&i32::try_from(b.len())?.to_be_bytes());
                buf.extend_from_slice(b);
            }
            None => buf.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    out.write_all(&buf)?;
    Ok(IsNull::No)
}

/// A column binds as the array type [`Column::push_bind`] names for it.
macro_rules! column_to_sql {
    ($($sql:ty),*) => {$(
        impl ToSql<$sql, Pg> for Column<'_> {
            fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
                self.write_array(out)
            }
        }
    )*};
}

column_to_sql!(
    Array<Text>,
    Array<Nullable<Text>>,
    Array<BigInt>,
    Array<Nullable<BigInt>>,
    Array<Bool>,
    Array<Nullable<Bool>>,
    Array<Nullable<Integer>>
);

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
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
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

    /// How many rows it holds: as many as its first column of values (0
    /// with none).
    pub fn len(&self) -> usize {
        self.columns.iter().find_map(|(_, c)| c.len()).unwrap_or(0)
    }

    /// Whether a column is filled with the statement's stream positions.
    fn takes_positions(&self) -> bool {
        self.columns.iter().any(|(_, c)| c.len().is_none())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The columns' names, comma-separated, as an INSERT or a row value
    /// names them, handed to `push` piece by piece.
    pub(super) fn write_column_names(&self, push: &mut dyn FnMut(&str)) {
        for (i, (name, _)) in self.columns.iter().enumerate() {
            if i > 0 {
                push(", ");
            }
            push(name);
        }
    }

    /// What follows an INSERT of these rows, the same on both engines:
    /// ` ON CONFLICT DO NOTHING` where conflicting rows are skipped, ` ON
    /// CONFLICT (key) DO UPDATE SET ..` (the other columns) for an upsert,
    /// nothing otherwise; handed to `push` piece by piece.
    pub(super) fn write_on_conflict(&self, push: &mut dyn FnMut(&str)) {
        match &self.write {
            RowsWrite::Insert | RowsWrite::Delete => {}
            RowsWrite::InsertSkippingConflicts => push(" ON CONFLICT DO NOTHING"),
            RowsWrite::Upsert { key } => {
                push(" ON CONFLICT (");
                for (i, name) in key.iter().enumerate() {
                    if i > 0 {
                        push(", ");
                    }
                    push(name);
                }
                push(") DO UPDATE SET ");
                let set = self.columns.iter().map(|(n, _)| *n);
                for (i, name) in set.filter(|n| !key.contains(n)).enumerate() {
                    if i > 0 {
                        push(", ");
                    }
                    push(name);
                    push(" = excluded.");
                    push(name);
                }
            }
        }
    }
}

/// The stream positions a statement takes ([`super::Engine::insert_columns`]):
/// `count` new ids of `sequence` (a sequence's name), under the stream
/// positions lock. With `claimed`, the statement commits on its own (it is
/// sent outside a transaction) and proves the main-process claim first,
/// before anything is written: it holds the claim's row and writes nothing
/// unless its epoch is the one given (`None` checks nothing).
#[derive(Debug, Clone, Copy)]
pub(crate) struct TakePositions<'q> {
    pub(crate) sequence: &'q str,
    pub(crate) count: i64,
    pub(crate) claimed: Option<Option<i64>>,
}

/// `WITH t0 AS (INSERT INTO .. SELECT * FROM unnest($1::bigint[], ..)), ..
/// SELECT 1`: every table's rows in one statement; `SELECT pg_notify($n,
/// $m)` at the end instead when it also notifies. With positions to take,
/// the tables that need none first, each answering 1 a row it wrote
/// (`RETURNING 1`), then `locked AS (SELECT pg_advisory_xact_lock(..) FROM
/// (SELECT count(*) FROM (SELECT 1 FROM t0 UNION ALL ..)))` (the stream
/// positions lock: [`super::postgres::STREAM_POSITIONS_LOCK_KEY`]), which
/// PostgreSQL cannot take before those rows are all written (a
/// data-modifying CTE runs when first read, and otherwise only after the
/// main query, which reads the positions first), and `positions AS (SELECT
/// g.n, nextval(..) FROM generate_series(1, $k + 0 * (SELECT count(*) FROM
/// locked)))`, whose ids come after the lock: the lock is held for the rows
/// that need positions and the commit only. Then the tables with columns of
/// positions fill them from it, the NOTIFY's payload follows the highest,
/// and the statement answers them first, as an array in row order. A
/// statement that commits on its own begins with `claim AS (SELECT epoch =
/// .. AS proven, .. FROM main_process_claim .. FOR SHARE)`, which every
/// table's rows, the lock, the positions and the NOTIFY wait for, and
/// answers that row. Plain SQL throughout: no function of ours is called
/// (PL/pgSQL's calls cost the server ~80 us a message). `ST` is the SQL type
/// of what it answers.
struct UnnestInsert<'q, 'a, ST> {
    tables: &'q [&'q TableRows<'a>],
    positions: Option<TakePositions<'q>>,
    notify: Option<(&'q str, &'q str)>,
    /// Whether it ends reading the main-process claim's row (the claim
    /// proven in the same round trip), rather than with nothing to read.
    read_claim: bool,
    answer: std::marker::PhantomData<ST>,
}

impl<ST> Query for UnnestInsert<'_, '_, ST> {
    type SqlType = ST;
}

impl<ST> QueryId for UnnestInsert<'_, '_, ST> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

/// What an [`UnnestInsert`]'s SQL and the types of its binds depend on: its
/// slot's key ([`super::statement_slots`]). The values (the sequence's name,
/// the claim's epoch, the channel and payload) are binds.
#[derive(PartialEq, Eq, Hash)]
struct UnnestShape {
    /// Each table's name, columns and write, in order.
    tables: Vec<(&'static str, ColumnShapes, RowsWrite)>,
    /// Whether it takes positions, and if so whether it commits on its own.
    positions: Option<bool>,
    notify: bool,
    read_claim: bool,
}

/// A table's columns: each one's name and [`Column::kind`].
type ColumnShapes = Vec<(&'static str, u8)>;

/// The kind of the slots of [`UnnestInsert`]s.
struct Unnest;

static SLOTS: Slots<Unnest, UnnestShape> = Slots::new();

impl<ST> QueryFragment<Pg> for UnnestInsert<'_, '_, ST> {
    /// Always: its values are all bound. Said here so that diesel does not
    /// walk it once more to find out.
    fn is_safe_to_cache_prepared(&self, _backend: &Pg) -> QueryResult<bool> {
        Ok(true)
    }

    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        // Cached as a prepared statement per shape (which tables have rows:
        // a handful), kept under its shape's slot (`insert_with_unnest`):
        // parsing and planning it afresh cost the server 0.23 ms of a
        // message's write (measured with log_min_duration_statement=0),
        // more than a round trip.
        //
        // diesel walks this on every execution to collect its binds (and
        // to build its SQL when it prepares it), so it is written straight
        // in pieces, nothing allocated: built with `format!` on every walk
        // it cost 155,000 of the 745,000 instructions hs-main spent on a
        // message posted over HTTP.
        let claimed = self.positions.as_ref().and_then(|p| p.claimed.as_ref());
        let (claim_columns, claim_from) = super::postgres_claim::CLAIM_ROW;
        let mut first = true;
        if let Some(epoch) = claimed {
            // Proven before anything is written: every part below reads it.
            // Its row is held FOR SHARE until the statement commits (a
            // newcomer's raise of the epoch waits for it; one that committed
            // since the statement began is the row read), and `proven` is
            // false, which writes nothing, when the epoch is another's (a
            // `None` epoch checks nothing). No error is raised: the statement
            // answers the row and the caller refuses it (`expect_row`).
            out.push_sql("WITH claim AS (SELECT epoch = coalesce(");
            out.push_bind_param::<Nullable<BigInt>, _>(epoch)?;
            out.push_sql("::bigint, epoch) AS proven, ");
            out.push_sql(claim_columns);
            out.push_sql(" FROM ");
            out.push_sql(claim_from);
            out.push_sql(" FOR SHARE)");
            first = false;
        }
        // The rows that need no position first, then the lock and the
        // positions, which read them all (so PostgreSQL writes them before
        // it takes the lock), then the rows that need them.
        let free = || {
            self.tables
                .iter()
                .enumerate()
                .filter(|(_, t)| !t.takes_positions())
        };
        for (i, t) in free() {
            out.push_sql(if first { "WITH " } else { ", " });
            first = false;
            push_table(i, t, &mut out, claimed.is_some(), self.positions.is_some())?;
        }
        if let Some(positions) = &self.positions {
            out.push_sql(if first { "WITH " } else { ", " });
            first = false;
            out.push_sql("locked AS (SELECT pg_advisory_xact_lock(");
            out.push_bind_param::<BigInt, _>(&super::postgres::STREAM_POSITIONS_LOCK_KEY)?;
            out.push_sql("::bigint)");
            if free().next().is_some() {
                // Read once every row above is written (each answers 1 a
                // row), so the lock is held for the rows that need positions
                // and the commit only.
                out.push_sql(" FROM (SELECT count(*) FROM (");
                for (k, (i, _)) in free().enumerate() {
                    if k > 0 {
                        out.push_sql(" UNION ALL ");
                    }
                    out.push_sql("SELECT 1 FROM t");
                    push_number(&mut out, i);
                }
                out.push_sql(") AS w) AS written");
            }
            if claimed.is_some() {
                out.push_sql(" WHERE (SELECT proven FROM claim)");
            }
            // The positions' ids, taken once the lock is held: the
            // function's argument reads `locked` before the first row.
            out.push_sql("), positions AS (SELECT g.n, nextval(");
            out.push_bind_param::<Text, _>(positions.sequence)?;
            out.push_sql("::regclass) AS id FROM generate_series(1, ");
            out.push_bind_param::<BigInt, _>(&positions.count)?;
            out.push_sql("::bigint + 0 * (SELECT count(*) FROM locked)) AS g(n)");
            if claimed.is_some() {
                out.push_sql(" WHERE (SELECT proven FROM claim)");
            }
            out.push_sql(")");
        }
        let positioned = self
            .tables
            .iter()
            .enumerate()
            .filter(|(_, t)| t.takes_positions());
        for (i, t) in positioned {
            out.push_sql(if first { "WITH " } else { ", " });
            first = false;
            // Gated too: a column of the highest position would otherwise
            // be written NULL by a statement that took none.
            push_table(i, t, &mut out, claimed.is_some(), false)?;
        }
        out.push_sql(" SELECT ");
        let mut selected = false;
        if self.positions.is_some() {
            out.push_sql("ARRAY(SELECT id FROM positions ORDER BY n)");
            selected = true;
        }
        if self.read_claim {
            if selected {
                out.push_sql(", ");
            }
            out.push_sql(claim_columns);
            selected = true;
        }
        match &self.notify {
            Some((channel, payload)) => {
                if selected {
                    out.push_sql(", ");
                }
                // Not when the claim is another's: nothing was written.
                out.push_sql(if claimed.is_some() {
                    "CASE WHEN proven THEN pg_notify("
                } else {
                    "pg_notify("
                });
                out.push_bind_param::<Text, _>(*channel)?;
                out.push_sql(", ");
                if self.positions.is_some() {
                    out.push_sql("(SELECT max(id) FROM positions) || ");
                }
                out.push_bind_param::<Text, _>(*payload)?;
                out.push_sql(if claimed.is_some() { ") END" } else { ")" });
            }
            None if !selected => out.push_sql("1"),
            None => {}
        }
        if claimed.is_some() {
            // The row as the statement locked it.
            out.push_sql(" FROM claim");
        } else if self.read_claim {
            out.push_sql(" FROM ");
            out.push_sql(claim_from);
        }
        Ok(())
    }
}

/// `n` in decimal, pushed with nothing allocated.
fn push_number(out: &mut AstPass<'_, '_, Pg>, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push_sql(std::str::from_utf8(&digits[at..]).expect("ASCII digits"));
}

/// One table's part of an [`UnnestInsert`]: `t{i} AS (INSERT INTO ..)` (or
/// `DELETE`). With `gated`, it writes nothing until the claim is proven (the
/// statement's `claim`); with `returning`, it answers 1 for each row it
/// wrote, for the positions to read.
fn push_table<'b>(
    i: usize,
    t: &'b TableRows<'_>,
    out: &mut AstPass<'_, 'b, Pg>,
    gated: bool,
    returning: bool,
) -> QueryResult<()> {
    let gate = if gated {
        " AND (SELECT proven FROM claim)"
    } else {
        ""
    };
    let returning = if returning { " RETURNING 1" } else { "" };
    out.push_sql("t");
    push_number(out, i);
    if t.write == RowsWrite::Delete {
        out.push_sql(" AS (DELETE FROM ");
        out.push_sql(t.table);
        out.push_sql(" WHERE (");
        t.write_column_names(&mut |s| out.push_sql(s));
        out.push_sql(") IN (SELECT * FROM ");
        push_unnest(t, out)?;
        out.push_sql(")");
        out.push_sql(gate);
        out.push_sql(returning);
        out.push_sql(")");
        return Ok(());
    }
    out.push_sql(" AS (INSERT INTO ");
    out.push_sql(t.table);
    out.push_sql(" (");
    t.write_column_names(&mut |s| out.push_sql(s));
    out.push_sql(") SELECT ");
    if t.takes_positions() {
        // The values' columns named u0, u1, .. and the row's number
        // after them, which is the number of its position.
        let mut values = 0;
        for (k, (_, column)) in t.columns.iter().enumerate() {
            if k > 0 {
                out.push_sql(", ");
            }
            match column.position_sql() {
                Some(sql) => out.push_sql(sql),
                None => {
                    out.push_sql("r");
                    push_number(out, i);
                    out.push_sql(".u");
                    push_number(out, values);
                    values += 1;
                }
            }
        }
        out.push_sql(" FROM ");
        push_unnest(t, out)?;
        out.push_sql(" WITH ORDINALITY AS r");
        push_number(out, i);
        out.push_sql("(");
        for j in 0..values {
            out.push_sql("u");
            push_number(out, j);
            out.push_sql(", ");
        }
        out.push_sql("ord)");
        if t.columns.iter().any(|(_, c)| *c == Column::Position) {
            out.push_sql(" JOIN positions ON positions.n = r");
            push_number(out, i);
            out.push_sql(".ord");
        }
    } else {
        out.push_sql("* FROM ");
        push_unnest(t, out)?;
    }
    if gated {
        out.push_sql(" WHERE (SELECT proven FROM claim)");
    }
    t.write_on_conflict(&mut |s| out.push_sql(s));
    out.push_sql(returning);
    out.push_sql(")");
    Ok(())
}

/// `unnest($1::bigint[], $2::text[], ..)`: one bound array per column of
/// values.
fn push_unnest<'b>(t: &'b TableRows<'_>, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()> {
    out.push_sql("unnest(");
    let values = t.columns.iter().filter(|(_, c)| c.len().is_some());
    for (j, (_, column)) in values.enumerate() {
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

impl<ST> RunQueryDsl<diesel::PgConnection> for UnnestInsert<'_, '_, ST> {}

/// What [`insert_with_unnest`] read: the positions it took (none unless
/// asked), and the claim's row when asked to read it (`None` if it is gone).
pub(crate) struct Inserted {
    pub(crate) positions: Vec<i64>,
    pub(crate) claim: Option<ClaimRow>,
}

/// Inserts every table's rows in one statement, which also takes
/// `positions` and sends `notify` (channel, payload) when given, and with
/// `read_claim` answers the claim's row.
pub(crate) fn insert_with_unnest(
    conn: &mut diesel::PgConnection,
    tables: &[TableRows<'_>],
    positions: Option<TakePositions<'_>>,
    notify: Option<(&str, &str)>,
    read_claim: bool,
) -> QueryResult<Inserted> {
    let tables: Vec<&TableRows<'_>> = tables.iter().filter(|t| !t.is_empty()).collect();
    let nothing = Inserted {
        positions: Vec::new(),
        claim: None,
    };
    if tables.is_empty() && positions.is_none() && notify.is_none() && !read_claim {
        return Ok(nothing);
    }
    let shape = UnnestShape {
        tables: tables
            .iter()
            .map(|t| {
                let columns = t.columns.iter().map(|(n, c)| (*n, c.kind())).collect();
                (t.table, columns, t.write.clone())
            })
            .collect(),
        positions: positions.map(|p| p.claimed.is_some()),
        notify: notify.is_some(),
        read_claim,
    };
    let sql = || {
        let statement = statement::<()>(&tables, positions, notify, read_claim);
        statement_slots::sql_of(&statement, &Pg)
    };
    let run = RunUnnest {
        conn,
        tables: &tables,
        positions,
        notify,
        read_claim,
    };
    SLOTS.run(shape, sql, run)
}

/// [`insert_with_unnest`]'s statement, to run on `conn` with its answer
/// read.
struct RunUnnest<'c, 'q, 'a> {
    conn: &'c mut diesel::PgConnection,
    tables: &'q [&'q TableRows<'a>],
    positions: Option<TakePositions<'q>>,
    notify: Option<(&'q str, &'q str)>,
    read_claim: bool,
}

impl InSlot<Unnest> for RunUnnest<'_, '_, '_> {
    type Output = QueryResult<Inserted>;

    fn run<const N: usize>(self) -> QueryResult<Inserted> {
        let RunUnnest {
            conn,
            tables,
            positions,
            notify,
            read_claim,
        } = self;
        let nothing = Inserted {
            positions: Vec::new(),
            claim: None,
        };
        fn slotted<'q, 'a, ST, const N: usize>(
            tables: &'q [&'q TableRows<'a>],
            positions: Option<TakePositions<'q>>,
            notify: Option<(&'q str, &'q str)>,
            read_claim: bool,
        ) -> Slotted<Unnest, UnnestInsert<'q, 'a, ST>, N> {
            Slotted::new(statement(tables, positions, notify, read_claim))
        }
        type ClaimColumns = (BigInt, Text, BigInt);
        match (positions.is_some(), read_claim) {
            (false, false) => slotted::<(), N>(tables, positions, notify, read_claim)
                .execute(conn)
                .map(|_| nothing),
            (false, true) => Ok(Inserted {
                positions: Vec::new(),
                claim: slotted::<ClaimColumns, N>(tables, positions, notify, read_claim)
                    .get_result::<ClaimRow>(conn)
                    .optional()?,
            }),
            (true, false) => Ok(Inserted {
                positions: slotted::<Array<BigInt>, N>(tables, positions, notify, read_claim)
                    .get_result::<Vec<i64>>(conn)?,
                claim: None,
            }),
            (true, true) => {
                let row = slotted::<(Array<BigInt>, BigInt, Text, BigInt), N>(
                    tables, positions, notify, read_claim,
                )
                .get_result::<(Vec<i64>, i64, String, i64)>(conn)
                .optional()?;
                Ok(match row {
                    Some((positions, epoch, holder, claimed_at)) => Inserted {
                        positions,
                        claim: Some(ClaimRow {
                            epoch,
                            holder,
                            claimed_at,
                        }),
                    },
                    None => nothing,
                })
            }
        }
    }
}

fn statement<'q, 'a, ST>(
    tables: &'q [&'q TableRows<'a>],
    positions: Option<TakePositions<'q>>,
    notify: Option<(&'q str, &'q str)>,
    read_claim: bool,
) -> UnnestInsert<'q, 'a, ST> {
    UnnestInsert {
        tables,
        positions,
        notify,
        read_claim,
        answer: std::marker::PhantomData,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes a column binds are diesel's own for the same values as a
    /// `Vec`, for every kind of column, NULLs, empty strings, several rows
    /// and none.
    #[test]
    fn columns_bind_as_diesel_binds_their_values() {
        use diesel::pg::{PgMetadataLookup, PgTypeMetadata};
        use diesel::query_builder::bind_collector::RawBytesBindCollector;
        use diesel::query_builder::BindCollector;
        /// Built-in types never look theirs up.
        struct NoLookup;
        impl PgMetadataLookup for NoLookup {
            fn lookup_type(&mut self, name: &str, _: Option<&str>) -> PgTypeMetadata {
                unreachable!("looked up {name}")
            }
        }
        fn binds<ST, A, B>(ours: &A, diesels: &B) -> (Vec<u8>, Vec<u8>)
        where
            Pg: HasSqlType<ST>,
            A: ToSql<ST, Pg>,
            B: ToSql<ST, Pg>,
        {
            let mut collector = RawBytesBindCollector::<Pg>::new();
            collector
                .push_bound_value::<ST, A>(ours, &mut NoLookup)
                .unwrap();
            collector
                .push_bound_value::<ST, B>(diesels, &mut NoLookup)
                .unwrap();
            let mut b = collector.binds.into_iter().map(Option::unwrap);
            (b.next().unwrap(), b.next().unwrap())
        }
        let texts = vec!["$a", "", "{\"json\": \"\u{e9}\"}"];
        let opt_texts = vec![Some("x"), None, Some("")];
        let bigints = vec![0, -1, i64::MAX, 1 << 40];
        let opt_bigints = vec![None, Some(7), Some(i64::MIN)];
        let bools = vec![true, false];
        let opt_bools = vec![Some(false), None, Some(true)];
        let opt_ints = vec![Some(3), None, Some(-2)];
        let cases = [
            binds::<Array<Text>, _, _>(&Column::Text(texts.clone()), &texts),
            binds::<Array<Text>, _, _>(&Column::Text(vec![]), &Vec::<&str>::new()),
            binds::<Array<Nullable<Text>>, _, _>(&Column::OptText(opt_texts.clone()), &opt_texts),
            binds::<Array<BigInt>, _, _>(&Column::BigInt(bigints.clone()), &bigints),
            binds::<Array<Nullable<BigInt>>, _, _>(
                &Column::OptBigInt(opt_bigints.clone()),
                &opt_bigints,
            ),
            binds::<Array<Bool>, _, _>(&Column::Bool(bools.clone()), &bools),
            binds::<Array<Nullable<Bool>>, _, _>(&Column::OptBool(opt_bools.clone()), &opt_bools),
            binds::<Array<Nullable<Integer>>, _, _>(&Column::OptInt(opt_ints.clone()), &opt_ints),
        ];
        for (i, (ours, diesels)) in cases.iter().enumerate() {
            assert_eq!(ours, diesels, "case {i}");
        }
    }

    /// The statement's text for every kind of part at once, as the server
    /// gets it (its prepared statement is cached under this text): the
    /// same, byte for byte, as when it was built with `format!`.
    #[test]
    fn unnest_insert_text() {
        let tables = [
            TableRows::insert(
                "event_json",
                vec![
                    ("event_id", Column::Text(vec!["$a", "$b"])),
                    ("json", Column::Text(vec!["{}", "{}"])),
                ],
            ),
            TableRows {
                table: "current_state_events",
                columns: vec![
                    ("room_id", Column::Text(vec!["!r"])),
                    ("type", Column::Text(vec!["m.room.topic"])),
                ],
                write: RowsWrite::Delete,
            },
            TableRows {
                table: "current_state_events",
                columns: vec![
                    ("room_id", Column::Text(vec!["!r"])),
                    ("type", Column::Text(vec!["m.room.name"])),
                    ("event_id", Column::Text(vec!["$b"])),
                    ("membership", Column::OptText(vec![None])),
                ],
                write: RowsWrite::Upsert {
                    key: &["room_id", "type"],
                },
            },
            TableRows::insert(
                "events",
                vec![
                    ("stream_ordering", Column::Position),
                    ("event_id", Column::Text(vec!["$a", "$b"])),
                    ("depth", Column::BigInt(vec![1, 2])),
                ],
            ),
            TableRows {
                table: "stream_marks",
                columns: vec![
                    ("room_id", Column::Text(vec!["!r"])),
                    ("stream_ordering", Column::HighestPosition),
                ],
                write: RowsWrite::InsertSkippingConflicts,
            },
        ];
        let all: Vec<&TableRows<'_>> = tables.iter().collect();
        let statement = UnnestInsert::<()> {
            tables: &all,
            positions: Some(TakePositions {
                sequence: "events_stream_seq",
                count: 2,
                claimed: Some(Some(7)),
            }),
            notify: Some(("replication", " 0")),
            read_claim: true,
            answer: std::marker::PhantomData,
        };
        let text = diesel::debug_query::<Pg, _>(&statement).to_string();
        let sql = text.split(" -- binds").next().unwrap();
        assert_eq!(
            sql,
            concat!(
                "WITH claim AS (SELECT epoch = coalesce($1::bigint, epoch) AS proven, epoch, holder, claimed_at FROM main_process_claim WHERE id = 1 FOR SHARE)",
                ", t0 AS (INSERT INTO event_json (event_id, json) SELECT * FROM unnest($2::text[], $3::text[]) WHERE (SELECT proven FROM claim) RETURNING 1)",
                ", t1 AS (DELETE FROM current_state_events WHERE (room_id, type) IN (SELECT * FROM unnest($4::text[], $5::text[])) AND (SELECT proven FROM claim) RETURNING 1)",
                ", t2 AS (INSERT INTO current_state_events (room_id, type, event_id, membership) SELECT * FROM unnest($6::text[], $7::text[], $8::text[], $9::text[]) WHERE (SELECT proven FROM claim) ON CONFLICT (room_id, type) DO UPDATE SET event_id = excluded.event_id, membership = excluded.membership RETURNING 1)",
                ", locked AS (SELECT pg_advisory_xact_lock($10::bigint) FROM (SELECT count(*) FROM (SELECT 1 FROM t0 UNION ALL SELECT 1 FROM t1 UNION ALL SELECT 1 FROM t2) AS w) AS written WHERE (SELECT proven FROM claim))",
                ", positions AS (SELECT g.n, nextval($11::regclass) AS id FROM generate_series(1, $12::bigint + 0 * (SELECT count(*) FROM locked)) AS g(n) WHERE (SELECT proven FROM claim))",
                ", t3 AS (INSERT INTO events (stream_ordering, event_id, depth) SELECT positions.id, r3.u0, r3.u1 FROM unnest($13::text[], $14::bigint[]) WITH ORDINALITY AS r3(u0, u1, ord) JOIN positions ON positions.n = r3.ord WHERE (SELECT proven FROM claim))",
                ", t4 AS (INSERT INTO stream_marks (room_id, stream_ordering) SELECT r4.u0, (SELECT max(id) FROM positions) FROM unnest($15::text[]) WITH ORDINALITY AS r4(u0, ord) WHERE (SELECT proven FROM claim) ON CONFLICT DO NOTHING)",
                " SELECT ARRAY(SELECT id FROM positions ORDER BY n), epoch, holder, claimed_at, CASE WHEN proven THEN pg_notify($16, (SELECT max(id) FROM positions) || $17) END FROM claim",
            )
        );
        // Rows alone: nothing to answer.
        let statement = UnnestInsert::<()> {
            tables: &all[..1],
            positions: None,
            notify: None,
            read_claim: false,
            answer: std::marker::PhantomData,
        };
        let text = diesel::debug_query::<Pg, _>(&statement).to_string();
        assert_eq!(
            text.split(" -- binds").next().unwrap(),
            "WITH t0 AS (INSERT INTO event_json (event_id, json) SELECT * FROM unnest($1::text[], $2::text[])) SELECT 1"
        );
    }
}
