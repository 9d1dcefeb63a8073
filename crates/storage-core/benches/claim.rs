//! `cargo xtask bench claim`: what proving the main-process claim costs a write
//! transaction. One-row INSERT transactions into a database opened plainly
//! (no proof) and into one opened under the claim (the proof first: the claim
//! row FOR SHARE on PostgreSQL; the row and a `stat` of the file on SQLite),
//! in alternating rounds so that a machine whose speed drifts slows both
//! alike. Prints the median time per transaction of each, and the median of
//! the rounds' ratios (each claimed round against the unclaimed one just
//! before it), which a noisy machine moves least.

use diesel::sql_types::BigInt;
use diesel::RunQueryDsl;
use std::time::{Duration, Instant};
use storage_core::testing::TestDb;
use storage_core::{with_conn, Database, DatabaseConfig, MainProcessClaim, OpenMode};

const ROUNDS: usize = 25;
const TXNS: i64 = 400;

/// Runs TXNS one-row write transactions, ids from `first`; the time each took on average.
fn round(db: &Database, first: i64) -> Duration {
    let start = Instant::now();
    for id in first..first + TXNS {
        db.run_interaction("bench_insert", |txn| {
            with_conn!(txn.conn(), |c| diesel::sql_query(
                "INSERT INTO state_groups (id, room_id, event_id) VALUES ($1, '!r:bench', '$e')"
            )
            .bind::<BigInt, _>(id)
            .execute(c))?;
            Ok(())
        })
        .expect("a benchmark write");
    }
    start.elapsed() / TXNS as u32
}

fn median<T: PartialOrd + Copy>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    println!(
        "claim: {ROUNDS} alternating rounds of {TXNS} one-row write transactions, median per transaction"
    );
    println!(
        "engine    unclaimed      claimed (proof)   claimed/unclaimed (median of paired rounds)"
    );
    for plain_db in &TestDb::for_bench("claim") {
        let claimed_db = plain_db.fresh();
        let plain = plain_db.open();
        let config = DatabaseConfig::parse(claimed_db.url(), OpenMode::Writer).unwrap();
        let claim = MainProcessClaim::acquire(&config, Duration::ZERO).unwrap();
        let claimed = Database::open_claimed(config, &claim).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for r in 0..ROUNDS as i64 {
            a.push(round(&plain, 1 + r * TXNS));
            b.push(round(&claimed, 1 + r * TXNS));
        }
        let ratio = median(
            a.iter()
                .zip(&b)
                .map(|(a, b)| b.as_secs_f64() / a.as_secs_f64())
                .collect(),
        );
        let (a, b) = (median(a), median(b));
        println!(
            "{:<9} {:>9.1} us   {:>12.1} us   {ratio:.3}x (about {:+.1} us a transaction)",
            plain_db.engine(),
            a.as_secs_f64() * 1e6,
            b.as_secs_f64() * 1e6,
            (ratio - 1.0) * a.as_secs_f64() * 1e6,
        );
    }
}
