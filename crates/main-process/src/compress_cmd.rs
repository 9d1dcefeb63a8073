//! `hs-main compress`: shrinks the state tables of the chosen rooms (default:
//! all, largest first) by rewriting their groups' prev groups and deltas; see
//! `storage_state::compress` for how, and docs/compress.md for operators.
//!
//! On a database of ours the run claims it as its main process first, so it
//! refuses one that `hs-main serve` (or an import) is serving; a server
//! compresses its own database with its online job instead (`compress_job`).
//! A database Synapse wrote is opened to write its state tables only, as they
//! are (`OpenMode::SynapseState`), with Synapse stopped.

use crate::cli::Failure;
use http_api::settings::Settings;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use storage_core::{
    detect_layout, refuse_foreign_database, Database, DatabaseUrl, Error, Layout, MainProcessClaim,
    OpenMode, Result, ResultExt, Transaction,
};
use storage_events::EventsStore;
use storage_state::compress::{self, CompressHooks, CompressOptions, Outcome, RoomReport};
use storage_state::{StateGroup, StateStore};

/// What the command was asked.
#[derive(Debug, Clone, Default)]
pub struct Args {
    /// Rooms to compress, in this order; none: every room, most rows first.
    pub rooms: Vec<String>,
    pub dry_run: bool,
    /// Where to write the SQL of every rewrite.
    pub sql: Option<PathBuf>,
    pub max_rows_per_second: Option<u64>,
    pub json: bool,
}

/// Tells workers of each rewrite, writes the SQL, moves the progress bar.
struct Hooks<'a> {
    events: Option<&'a EventsStore>,
    sql: Option<std::io::BufWriter<std::fs::File>>,
    bar: Option<&'a ProgressBar>,
    /// Groups of the rooms done before this one.
    base: u64,
}

impl CompressHooks for Hooks<'_> {
    fn on_rewrite(
        &mut self,
        txn: &mut Transaction<'_>,
        _room_id: &str,
        groups: &[StateGroup],
    ) -> Result<()> {
        match self.events {
            Some(events) => events.record_state_group_rewrite_txn(txn, groups),
            None => Ok(()),
        }
    }

    fn on_sql(&mut self, sql: &str) -> Result<()> {
        if let Some(out) = &mut self.sql {
            out.write_all(sql.as_bytes())
                .context("writing the SQL of a rewrite")?;
        }
        Ok(())
    }

    fn on_progress(&mut self, room_id: &str, groups_done: u64) {
        if let Some(bar) = self.bar {
            bar.set_message(room_id.to_owned());
            bar.set_position(self.base + groups_done);
        }
    }
}

/// Compresses `rooms` (or every room, most rows first) of the database behind
/// `state`, telling workers through `events` when given. `bar`: a progress
/// bar over the groups considered.
pub fn compress_rooms(
    state: &StateStore,
    events: Option<&EventsStore>,
    rooms: &[String],
    options: &CompressOptions,
    sql: Option<&PathBuf>,
    bar: Option<&ProgressBar>,
) -> Result<Vec<RoomReport>> {
    let db = state.database();
    let bound = compress::highest_state_group(db)?;
    let rooms: Vec<String> = if rooms.is_empty() {
        compress::rooms_by_state_rows(db)?
            .into_iter()
            .map(|(room, _)| room)
            .collect()
    } else {
        rooms.to_vec()
    };
    let mut totals = Vec::with_capacity(rooms.len());
    for room in &rooms {
        let n = compress::room_groups(db, room, bound)?;
        if n == 0 {
            return Err(Error::not_found(format!("no state groups for room {room}")));
        }
        totals.push(n);
    }
    if let Some(bar) = bar {
        bar.set_length(totals.iter().sum());
    }
    let sql = match sql {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("creating the SQL file {}", path.display()))?,
        )),
        None => None,
    };
    let mut hooks = Hooks {
        events,
        sql,
        bar,
        base: 0,
    };
    let mut reports = Vec::with_capacity(rooms.len());
    for (room, n) in rooms.iter().zip(totals) {
        let report = compress::compress_room(state, room, bound, options, &mut hooks)?;
        hooks.base += n;
        reports.push(report);
    }
    if let Some(out) = &mut hooks.sql {
        out.flush().context("writing the SQL file")?;
    }
    Ok(reports)
}

fn percent(after: u64, before: u64) -> f64 {
    if before == 0 {
        100.0
    } else {
        after as f64 * 100.0 / before as f64
    }
}

/// One line about a room.
pub fn describe(r: &RoomReport, dry_run: bool) -> String {
    let what = match (r.outcome, dry_run) {
        (Outcome::Compressed, false) => "compressed".to_owned(),
        (Outcome::Compressed, true) => "would compress".to_owned(),
        (Outcome::AlreadyCompact, _) => "already compact".to_owned(),
        (Outcome::NotSmaller, _) => "left alone: not smaller".to_owned(),
    };
    let partly = r
        .left_alone_from
        .filter(|_| r.outcome == Outcome::Compressed)
        .map(|g| format!(", left alone from group {g}: not smaller"))
        .unwrap_or_default();
    format!(
        "{}: {what}{partly}: {} groups ({} rewritten), rows {} -> {} ({:.2}%), longest new chain {}, {:.1} s",
        r.room_id,
        r.groups,
        r.groups_rewritten,
        r.rows_before,
        r.rows_after,
        percent(r.rows_after, r.rows_before),
        r.longest_chain,
        r.seconds
    )
}

fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Compressed => "compressed",
        Outcome::AlreadyCompact => "already_compact",
        Outcome::NotSmaller => "not_smaller",
    }
}

/// Bytes of the two tables compression rewrites, where the engine tells.
fn state_table_bytes(db: &Database) -> Result<Option<i64>> {
    let stats = db.run_read("compress_table_bytes", |txn| {
        txn.table_statistics(&["state_groups_state", "state_group_edges"])
    })?;
    Ok(stats.iter().map(|t| t.bytes).sum())
}

/// The summary as JSON.
pub fn summary_json(
    reports: &[RoomReport],
    dry_run: bool,
    seconds: f64,
    bytes: (Option<i64>, Option<i64>),
) -> serde_json::Value {
    let rooms: Vec<_> = reports
        .iter()
        .map(|r| {
            json!({
                "room_id": r.room_id,
                "outcome": outcome_name(r.outcome),
                "groups": r.groups,
                "groups_rewritten": r.groups_rewritten,
                "rows_before": r.rows_before,
                "rows_after": r.rows_after,
                "left_alone_from": r.left_alone_from,
                "longest_new_chain": r.longest_chain,
                "seconds": r.seconds,
            })
        })
        .collect();
    let sum = |f: fn(&RoomReport) -> u64| reports.iter().map(f).sum::<u64>();
    json!({
        "dry_run": dry_run,
        "rooms": rooms,
        "total": {
            "rooms": reports.len(),
            "groups": sum(|r| r.groups),
            "groups_rewritten": sum(|r| r.groups_rewritten),
            "rows_before": sum(|r| r.rows_before),
            "rows_after": sum(|r| r.rows_after),
            "state_table_bytes_before": bytes.0,
            "state_table_bytes_after": bytes.1,
            "seconds": seconds,
        },
    })
}

/// The stores a run writes through: ours, claimed as the main process (its
/// rewrites go on the replication stream), or Synapse's tables as they are.
/// A dry run only reads: the database opened read-only, nothing claimed,
/// migrated or moved, so it also answers beside a running `hs-main serve`.
fn open(
    settings: &Settings,
    dry_run: bool,
) -> Result<(Option<MainProcessClaim>, StateStore, Option<EventsStore>)> {
    let config = settings.store_config("main");
    let layout = detect_layout(&DatabaseUrl::parse(&settings.database)?)?;
    if dry_run {
        let db_config = settings.database_config(OpenMode::ReadOnly)?;
        if !matches!(layout, Layout::Synapse { .. }) {
            refuse_foreign_database(&db_config)?;
        }
        let db = Database::open(db_config)?;
        return Ok((None, StateStore::new(db, &config)?, None));
    }
    if let Layout::Synapse { .. } = layout {
        // No claim (nothing of ours may be left beside Synapse's files, and
        // our claim cannot see a running Synapse anyway: stop it first).
        let db = Database::open(settings.database_config(OpenMode::SynapseState)?)?;
        log::info!(
            "{} is a Synapse database: only its state tables are rewritten",
            db.url()
        );
        return Ok((None, StateStore::new(db, &config)?, None));
    }
    let (claim, db) = crate::open::open_as_main(settings)?;
    let events = EventsStore::new(db, &config)?;
    Ok((Some(claim), events.state().clone(), Some(events)))
}

pub fn run(settings: &Settings, args: &Args) -> std::result::Result<(), Failure> {
    let started = std::time::Instant::now();
    let (_claim, state, events) = open(settings, args.dry_run)?;
    let options = CompressOptions {
        dry_run: args.dry_run,
        max_rows_per_second: args.max_rows_per_second,
        ..Default::default()
    };
    let bytes_before = state_table_bytes(state.database())?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} groups ({eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let reports = compress_rooms(
        &state,
        events.as_ref(),
        &args.rooms,
        &options,
        args.sql.as_ref(),
        Some(&bar),
    )
    .map_err(|e| {
        if e.is_not_found() {
            Failure::NotFound(e.to_string())
        } else {
            Failure::Error(e)
        }
    })?;
    bar.finish_and_clear();
    let bytes = (bytes_before, state_table_bytes(state.database())?);
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        println!("{:#}", summary_json(&reports, args.dry_run, seconds, bytes));
        return Ok(());
    }
    for r in &reports {
        println!("{}", describe(r, args.dry_run));
    }
    let (before, after): (u64, u64) = reports
        .iter()
        .fold((0, 0), |(b, a), r| (b + r.rows_before, a + r.rows_after));
    println!(
        "{} {} rooms, {} groups: rows {before} -> {after} ({:.2}%) in {seconds:.1} s",
        if args.dry_run {
            "would compress"
        } else {
            "compressed"
        },
        reports.len(),
        reports.iter().map(|r| r.groups).sum::<u64>(),
        percent(after, before),
    );
    if let (Some(b), Some(a)) = bytes {
        println!(
            "state tables {} -> {} on disk (the engine reuses freed space; VACUUM returns it)",
            HumanBytes(b.max(0) as u64),
            HumanBytes(a.max(0) as u64)
        );
    }
    Ok(())
}
