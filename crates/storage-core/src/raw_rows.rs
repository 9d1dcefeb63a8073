//! Rows visited field by field, each value read in place only when wanted.
//!
//! diesel's `load`/`load_iter` build each row into a `Queryable` first: every
//! value of every row decoded, every text allocated. A reader that keeps only
//! some rows (the cold state read keeps, per slot, the row of the highest group
//! and drops the 50,330 superseded rows of the HQ room's 88,269) pays that for
//! nothing. [`visit_rows`] hands each row to a [`RowVisitor`] instead, which
//! reads the fields it needs ([`RawRow`]), text borrowed from the row.

use crate::{Conn, Result};
use diesel::backend::Backend;
use diesel::connection::{DefaultLoadingMode, LoadConnection};
use diesel::deserialize::FromSql;
use diesel::expression::QueryMetadata;
use diesel::pg::{Pg, PgValue};
use diesel::query_builder::{Query, QueryFragment, QueryId};
use diesel::row::{Field, Row};
use diesel::sql_types::{BigInt, Bool, Integer, SmallInt};
use diesel::sqlite::{Sqlite, SqliteValue};
use std::marker::PhantomData;

/// A backend whose values [`RawRow`] reads.
pub trait RawBackend: Backend + Sized {
    /// Hands `f` a text value, borrowed from the row, checked to be UTF-8.
    fn with_str<T>(
        value: Self::RawValue<'_>,
        f: impl FnOnce(&str) -> T,
    ) -> diesel::deserialize::Result<T>;

    /// An integer value (of any integer column: `BIGINT`, `INTEGER`, `SMALLINT`).
    fn int(value: Self::RawValue<'_>) -> diesel::deserialize::Result<i64>;

    /// A boolean value.
    fn boolean(value: Self::RawValue<'_>) -> diesel::deserialize::Result<bool>;
}

impl RawBackend for Sqlite {
    fn with_str<T>(
        mut value: SqliteValue<'_, '_, '_>,
        f: impl FnOnce(&str) -> T,
    ) -> diesel::deserialize::Result<T> {
        // Checked by diesel (invalid UTF-8 replaced, as for its `String`).
        // A `CAST(.. AS BLOB)` read with one check of ours instead measured
        // the same (callgrind, the HQ room's cold read: 347.9M against
        // 347.8M instructions): SQLite's cast costs what the check saves.
        Ok(f(value.read_text()))
    }

    fn int(value: SqliteValue<'_, '_, '_>) -> diesel::deserialize::Result<i64> {
        <i64 as FromSql<BigInt, Sqlite>>::from_sql(value)
    }

    fn boolean(value: SqliteValue<'_, '_, '_>) -> diesel::deserialize::Result<bool> {
        <bool as FromSql<Bool, Sqlite>>::from_sql(value)
    }
}

impl RawBackend for Pg {
    fn with_str<T>(
        value: PgValue<'_>,
        f: impl FnOnce(&str) -> T,
    ) -> diesel::deserialize::Result<T> {
        Ok(f(std::str::from_utf8(value.as_bytes())?))
    }

    fn int(value: PgValue<'_>) -> diesel::deserialize::Result<i64> {
        // Binary integers are as wide as their column's type.
        match value.as_bytes().len() {
            4 => <i32 as FromSql<Integer, Pg>>::from_sql(value).map(i64::from),
            2 => <i16 as FromSql<SmallInt, Pg>>::from_sql(value).map(i64::from),
            _ => <i64 as FromSql<BigInt, Pg>>::from_sql(value),
        }
    }

    fn boolean(value: PgValue<'_>) -> diesel::deserialize::Result<bool> {
        <bool as FromSql<Bool, Pg>>::from_sql(value)
    }
}

/// One row of a statement, its fields read by position on demand.
pub struct RawRow<'r, DB, R> {
    row: &'r R,
    backend: PhantomData<DB>,
}

impl<DB, R> std::fmt::Debug for RawRow<'_, DB, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawRow")
    }
}

impl<'r, 'a, DB: RawBackend, R: Row<'a, DB>> RawRow<'r, DB, R> {
    /// The integer in column `idx`; an error if it is NULL or missing.
    pub fn int(&self, idx: usize) -> Result<i64> {
        let field = self.field(idx)?;
        let value = field.value().ok_or_else(|| null(idx))?;
        Ok(DB::int(value).map_err(diesel::result::Error::DeserializationError)?)
    }

    /// The integer in column `idx`, `None` for NULL.
    pub fn int_or_null(&self, idx: usize) -> Result<Option<i64>> {
        let field = self.field(idx)?;
        let value = field
            .value()
            .map(DB::int)
            .transpose()
            .map_err(diesel::result::Error::DeserializationError)?;
        Ok(value)
    }

    /// The boolean in column `idx`; an error if it is NULL or missing.
    pub fn boolean(&self, idx: usize) -> Result<bool> {
        let field = self.field(idx)?;
        let value = field.value().ok_or_else(|| null(idx))?;
        Ok(DB::boolean(value).map_err(diesel::result::Error::DeserializationError)?)
    }

    /// Hands `f` the text in column `idx`, borrowed from the row and checked
    /// to be UTF-8 (`None` for NULL); an error if it is not UTF-8.
    pub fn text_or_null<T>(&self, idx: usize, f: impl FnOnce(Option<&str>) -> T) -> Result<T> {
        let field = self.field(idx)?;
        let out = match field.value() {
            Some(value) => DB::with_str(value, |t| f(Some(t)))
                .map_err(diesel::result::Error::DeserializationError)?,
            None => f(None),
        };
        Ok(out)
    }

    /// Hands `f` the text in column `idx`, borrowed from the row and checked
    /// to be UTF-8; an error if it is NULL or not UTF-8.
    pub fn text<T>(&self, idx: usize, f: impl FnOnce(&str) -> T) -> Result<T> {
        let field = self.field(idx)?;
        let value = field.value().ok_or_else(|| null(idx))?;
        Ok(DB::with_str(value, f).map_err(diesel::result::Error::DeserializationError)?)
    }

    fn field(&self, idx: usize) -> Result<R::Field<'_>> {
        self.row
            .get(idx)
            .ok_or_else(|| crate::Error::other(format!("internal: a row without column {idx}")))
    }
}

fn null(idx: usize) -> crate::Error {
    diesel::result::Error::DeserializationError(format!("unexpected NULL in column {idx}").into())
        .into()
}

/// What [`visit_rows`] hands each row to.
pub trait RowVisitor {
    /// One row, in the statement's order; an error stops the statement.
    fn visit<'a, DB: RawBackend, R: Row<'a, DB>>(&mut self, row: RawRow<'_, DB, R>) -> Result<()>;
}

/// Runs `query` and hands each of its rows to `visitor` as it comes, nothing
/// decoded beforehand (see the module's documentation).
pub fn visit_rows<Q>(conn: &mut Conn, query: Q, visitor: &mut impl RowVisitor) -> Result<()>
where
    Q: Query + QueryFragment<Sqlite> + QueryFragment<Pg> + QueryId,
    Sqlite: QueryMetadata<Q::SqlType>,
    Pg: QueryMetadata<Q::SqlType>,
{
    match conn {
        Conn::Sqlite(c) => {
            for row in LoadConnection::<DefaultLoadingMode>::load(c, query)? {
                visitor.visit(RawRow {
                    row: &row?,
                    backend: PhantomData,
                })?;
            }
        }
        Conn::Postgres(c) => {
            for row in LoadConnection::<DefaultLoadingMode>::load(c, query)? {
                visitor.visit(RawRow {
                    row: &row?,
                    backend: PhantomData,
                })?;
            }
        }
    }
    Ok(())
}
