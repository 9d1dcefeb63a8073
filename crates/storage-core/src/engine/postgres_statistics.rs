//! [`Engine::table_statistics`](super::Engine::table_statistics) and
//! [`Engine::most_common_values`](super::Engine::most_common_values) on
//! PostgreSQL: what the planner's statistics hold (`pg_class.reltuples`, kept by
//! ANALYZE and autovacuum; `pg_stats`), and `pg_total_relation_size`, the queries
//! Synapse's admin documentation uses for the same questions.

use super::{TableStatistics, EXACT_COUNT_LIMIT};
use crate::error::{Result, ResultExt};
use diesel::sql_types::{Array, BigInt, Double, Float4, Text};
use diesel::{OptionalExtension, PgConnection, QueryableByName, RunQueryDsl};

#[derive(QueryableByName)]
struct Relation {
    #[diesel(sql_type = Double)]
    reltuples: f64,
    #[diesel(sql_type = BigInt)]
    bytes: i64,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Common {
    #[diesel(sql_type = Array<Text>)]
    vals: Vec<String>,
    #[diesel(sql_type = Array<Float4>)]
    freqs: Vec<f32>,
}

pub(super) fn table_statistics(
    c: &mut PgConnection,
    tables: &[&str],
) -> Result<Vec<TableStatistics>> {
    let mut out = Vec::with_capacity(tables.len());
    for &table in tables {
        let context = || format!("reading the statistics of table {table}");
        let rel: Relation = diesel::sql_query(
            "SELECT c.reltuples::float8 AS reltuples, pg_total_relation_size(c.oid) AS bytes \
             FROM pg_class c WHERE c.oid = to_regclass($1)",
        )
        .bind::<Text, _>(table)
        .get_result(c)
        .with_context(context)?;
        // reltuples is -1 until the first ANALYZE (or VACUUM) of the table.
        let estimate = (rel.reltuples >= 0.0).then_some(rel.reltuples.round() as i64);
        let small = rel.bytes <= EXACT_COUNT_LIMIT;
        let rows = if small {
            let count: Count = diesel::sql_query(format!("SELECT COUNT(*) AS n FROM \"{table}\""))
                .get_result(c)
                .with_context(context)?;
            Some(count.n)
        } else {
            estimate
        };
        out.push(TableStatistics {
            table: table.to_owned(),
            rows,
            exact: small,
            bytes: Some(rel.bytes),
        });
    }
    Ok(out)
}

pub(super) fn most_common_values(
    c: &mut PgConnection,
    table: &str,
    column: &str,
) -> Result<Vec<(String, f64)>> {
    let common: Option<Common> = diesel::sql_query(
        "SELECT most_common_vals::text::text[] AS vals, most_common_freqs AS freqs \
         FROM pg_stats WHERE schemaname = current_schema() AND tablename = $1 AND attname = $2 \
         AND most_common_vals IS NOT NULL",
    )
    .bind::<Text, _>(table)
    .bind::<Text, _>(column)
    .get_result(c)
    .optional()
    .with_context(|| format!("reading the statistics of {table}.{column}"))?;
    Ok(common
        .map(|c| {
            c.vals
                .into_iter()
                .zip(c.freqs.into_iter().map(f64::from))
                .collect()
        })
        .unwrap_or_default())
}
