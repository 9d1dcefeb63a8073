//! [`Engine::table_statistics`](super::Engine::table_statistics) on SQLite:
//! `sqlite_stat1` when ANALYZE has run, otherwise the highest rowid (rows are
//! appended and rarely deleted in these tables, so it is close), sizes from the
//! `dbstat` table where the table is small enough for its page walk to be cheap.

use super::{TableStatistics, EXACT_COUNT_LIMIT};
use crate::error::{Result, ResultExt};
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::{OptionalExtension, QueryableByName, RunQueryDsl, SqliteConnection};

/// Tables estimated above this many rows get no size: `dbstat` walks every page.
const DBSTAT_ROW_LIMIT: i64 = 1_000_000;

#[derive(QueryableByName)]
struct Number {
    #[diesel(sql_type = Nullable<BigInt>)]
    n: Option<i64>,
}

#[derive(QueryableByName)]
struct Stat {
    #[diesel(sql_type = Text)]
    stat: String,
}

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = Text)]
    name: String,
}

fn number(c: &mut SqliteConnection, sql: &str, bind: Option<&str>) -> diesel::QueryResult<i64> {
    let q = diesel::sql_query(sql).into_boxed();
    let q = match bind {
        Some(b) => q.bind::<Text, _>(b.to_owned()),
        None => q,
    };
    Ok(q.get_result::<Number>(c)?.n.unwrap_or(0))
}

pub(super) fn table_statistics(
    c: &mut SqliteConnection,
    tables: &[&str],
) -> Result<Vec<TableStatistics>> {
    let has_stat1 = number(
        c,
        "SELECT COUNT(*) AS n FROM sqlite_schema WHERE name = 'sqlite_stat1'",
        None,
    )
    .context("looking for sqlite_stat1")?
        > 0;
    let mut out = Vec::with_capacity(tables.len());
    for &table in tables {
        let context = || format!("reading the statistics of table {table}");
        // The first number of a stat1 row is the table's row count when ANALYZE ran.
        let analyzed: Option<i64> = if has_stat1 {
            diesel::sql_query(
                "SELECT stat FROM sqlite_stat1 WHERE tbl = $1 ORDER BY idx IS NULL DESC LIMIT 1",
            )
            .bind::<Text, _>(table)
            .get_result::<Stat>(c)
            .optional()
            .with_context(context)?
            .and_then(|s| s.stat.split(' ').next()?.parse().ok())
        } else {
            None
        };
        let estimate = match analyzed {
            Some(n) => n,
            None => number(c, &format!("SELECT MAX(rowid) AS n FROM \"{table}\""), None)
                .with_context(context)?,
        };
        let bytes = if estimate <= DBSTAT_ROW_LIMIT {
            // The table and its indexes, each an equality lookup `dbstat` serves
            // by walking only that b-tree.
            let names: Vec<Name> = diesel::sql_query(
                "SELECT name FROM sqlite_schema WHERE tbl_name = $1 AND type IN ('table', 'index')",
            )
            .bind::<Text, _>(table)
            .load(c)
            .with_context(context)?;
            let mut sum = 0;
            for Name { name } in names {
                sum += number(
                    c,
                    "SELECT SUM(pgsize) AS n FROM dbstat WHERE name = $1 AND aggregate = TRUE",
                    Some(&name),
                )
                .with_context(context)?;
            }
            Some(sum)
        } else {
            None
        };
        let small = bytes.is_some_and(|b| b <= EXACT_COUNT_LIMIT);
        let rows = if small {
            number(c, &format!("SELECT COUNT(*) AS n FROM \"{table}\""), None)
                .with_context(context)?
        } else {
            estimate
        };
        out.push(TableStatistics {
            table: table.to_owned(),
            rows: Some(rows),
            exact: small,
            bytes,
        });
    }
    Ok(out)
}
