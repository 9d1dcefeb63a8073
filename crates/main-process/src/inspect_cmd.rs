//! `hs-main inspect [--json] [--exact] [--unreferenced] [--check]`: a read-only report on a
//! database, ours or Synapse's. Opens it read-only and writes nothing.
//!
//! By default it reads only what the engine keeps about its tables (row
//! estimates, sizes in bytes, the most common rooms of `state_groups_state`), so
//! it answers in moments on a server of hundreds of millions of state rows, where
//! counting them takes minutes. `--exact` counts every row and measures the delta
//! chains; `--unreferenced` counts the state groups no event references;
//! `--check` checks the database's invariants after the report.

use crate::cli::{print_line, Failure};
use http_api::settings::Settings;
use indicatif::{HumanBytes, HumanCount, ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};
use std::time::Duration;
use storage_core::{Database, OpenMode, SequenceHealth, TableStatistics};
use storage_events::EventsStore;
use storage_state::{state_report, unreferenced_groups, StateReport, UnreferencedGroups};

/// The tables reported on, Synapse's names: each exists in our schema and in his.
const TABLES: &[&str] = &[
    "rooms",
    "events",
    "event_json",
    "state_groups",
    "state_groups_state",
    "state_group_edges",
    "event_to_state_groups",
    "current_state_events",
];

/// What `hs-main inspect` is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InspectOptions {
    pub json: bool,
    /// How many of the rooms with the most state rows to list.
    pub top: usize,
    /// Count every row instead of reading the engine's statistics.
    pub exact: bool,
    /// Count the state groups no event references.
    pub unreferenced: bool,
    /// Check the database's invariants after the report (status 1 if one fails).
    pub check: bool,
}

/// Everything gathered, before it is printed.
struct Report {
    tables: Vec<TableStatistics>,
    /// The rooms with the most state rows: counted with `--exact`, otherwise
    /// estimated from the engine's statistics (PostgreSQL only).
    top_rooms: Vec<(String, i64)>,
    sequence: SequenceHealth,
    exact: Option<(i64, i64, StateReport)>,
    unreferenced: Option<UnreferencedGroups>,
}

pub fn run(settings: &Settings, options: InspectOptions) -> Result<(), Failure> {
    let db = crate::open::open_to_read(settings.database_config(OpenMode::ReadOnly)?)?;
    let (tables, common_rooms, sequence) = db.run_read("inspect_statistics", |txn| {
        let tables = txn.table_statistics(TABLES)?;
        let common = txn.most_common_values("state_groups_state", "room_id")?;
        let sequence = txn.inspect_sequence(&storage_state::STATE_GROUP_SEQUENCE)?;
        Ok((tables, common, sequence))
    })?;
    let state_rows_estimate = tables
        .iter()
        .find(|t| t.table == "state_groups_state")
        .and_then(|t| t.rows)
        .unwrap_or(0);
    let mut report = Report {
        top_rooms: common_rooms
            .into_iter()
            .take(options.top)
            .map(|(room, share)| (room, (share * state_rows_estimate as f64).round() as i64))
            .collect(),
        tables,
        sequence,
        exact: None,
        unreferenced: None,
    };
    if options.exact || options.unreferenced {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("a valid template"),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        if options.exact {
            bar.set_message("counting rooms and events");
            let (rooms, events) =
                EventsStore::new(db.clone(), &settings.store_config("main"))?.totals()?;
            let state = state_report(&db, options.top, |step| bar.set_message(step.to_owned()))?;
            report.top_rooms = state.rooms_by_state_rows.clone();
            report.exact = Some((rooms, events, state));
        }
        if options.unreferenced {
            bar.set_message("finding state groups no event references");
            report.unreferenced = Some(unreferenced_groups(&db)?);
        }
        bar.finish_and_clear();
    }
    if options.json {
        print_line(format_args!("{:#}", to_json(&db, &report)))?;
    } else {
        print_text(&db, &report)?;
    }
    if options.check {
        check_invariants(&db, options.json)?;
    }
    Ok(())
}

/// Prints the invariants that do not hold; an error when one does not.
fn check_invariants(db: &Database, as_json: bool) -> Result<(), Failure> {
    let violations = storage_events::check_invariants(db)?;
    if as_json {
        let list: Vec<_> = violations
            .iter()
            .map(|v| json!({"invariant": v.invariant, "examples": v.examples}))
            .collect();
        print_line(format_args!("{}", json!({ "violations": list })))?;
    } else if violations.is_empty() {
        print_line(format_args!("invariants       all hold"))?;
    } else {
        for v in &violations {
            print_line(format_args!("VIOLATED         {v}"))?;
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(Failure::Error(storage_core::Error::corrupt(format!(
            "{} invariant(s) do not hold",
            violations.len()
        ))))
    }
}

fn to_json(db: &Database, report: &Report) -> Value {
    let seq = &report.sequence;
    let mut out = Map::new();
    out.insert("database".into(), json!(db.url().redacted()));
    out.insert("engine".into(), json!(db.engine().name()));
    out.insert("exact".into(), json!(report.exact.is_some()));
    out.insert(
        "tables".into(),
        report
            .tables
            .iter()
            .map(|t| json!({"table": t.table, "rows": t.rows, "rows_exact": t.exact, "bytes": t.bytes}))
            .collect(),
    );
    if let Some((rooms, events, state)) = &report.exact {
        for (k, v) in [
            ("rooms", json!(rooms)),
            ("events", json!(events)),
            ("state_groups", json!(state.state_groups)),
            ("snapshot_groups", json!(state.snapshot_groups)),
            ("delta_groups", json!(state.delta_groups)),
            ("state_groups_state_rows", json!(state.state_rows)),
            ("longest_delta_chain", json!(state.longest_chain)),
            ("average_delta_chain", json!(state.average_chain)),
        ] {
            out.insert(k.into(), v);
        }
    }
    out.insert(
        "rooms_by_state_rows".into(),
        report
            .top_rooms
            .iter()
            .map(|(room, rows)| json!({"room_id": room, "rows": rows}))
            .collect(),
    );
    if let Some(u) = &report.unreferenced {
        out.insert(
            "unreferenced_state_groups".into(),
            json!({"unreferenced": u.unreferenced, "unneeded": u.unneeded}),
        );
    }
    out.insert(
        "sequence".into(),
        json!({
            "name": seq.sequence,
            "last_value": seq.handed_out,
            "max_state_group": seq.max_id,
            "behind": seq.is_behind(),
            "unreadable": seq.unreadable,
        }),
    );
    Value::Object(out)
}

fn print_text(db: &Database, report: &Report) -> storage_core::Result<()> {
    print_line(format_args!(
        "database         {} ({})",
        db.url(),
        db.engine().name()
    ))?;
    if report.exact.is_none() {
        print_line(format_args!("counts           from the engine's statistics, ~ marks an estimate (--exact counts every row)"))?;
    }
    print_line(format_args!(
        "  {:<24} {:>16} {:>12}",
        "table", "rows", "size"
    ))?;
    for t in &report.tables {
        let rows = match t.rows {
            Some(n) => format!(
                "{}{}",
                if t.exact { "" } else { "~" },
                HumanCount(n.max(0) as u64)
            ),
            None => "not analyzed".to_owned(),
        };
        let size = t
            .bytes
            .map_or("?".to_owned(), |b| HumanBytes(b.max(0) as u64).to_string());
        print_line(format_args!("  {:<24} {rows:>16} {size:>12}", t.table))?;
    }
    if let Some((rooms, events, state)) = &report.exact {
        print_line(format_args!("rooms            {rooms}"))?;
        print_line(format_args!("events           {events}"))?;
        print_line(format_args!(
            "state groups     {} ({} snapshots, {} deltas)",
            state.state_groups, state.snapshot_groups, state.delta_groups
        ))?;
        print_line(format_args!(
            "state rows       {} in state_groups_state",
            state.state_rows
        ))?;
        print_line(format_args!(
            "delta chains     longest {} groups, average {:.1}",
            state.longest_chain, state.average_chain
        ))?;
    }
    if let Some(u) = &report.unreferenced {
        print_line(format_args!(
            "unreferenced     {} state groups no event references, {} of them on no referenced group's chain",
            u.unreferenced, u.unneeded
        ))?;
    }
    if !report.top_rooms.is_empty() {
        let how = if report.exact.is_some() {
            ""
        } else {
            " (estimated)"
        };
        print_line(format_args!("rooms using the most state rows{how}:"))?;
        for (room, rows) in &report.top_rooms {
            print_line(format_args!("  {rows:>10}  {room}"))?;
        }
    }
    let seq = &report.sequence;
    match seq.handed_out {
        None if seq.unreadable.is_some() => print_line(format_args!(
            "sequence         {} not checked: {}; highest state group {}",
            seq.sequence,
            seq.unreadable.unwrap_or_default(),
            seq.max_id
        ))?,
        None => print_line(format_args!(
            "sequence         none on this engine: ids count on from the highest ({})",
            seq.max_id
        ))?,
        Some(last) if seq.is_behind() => print_line(format_args!(
            "sequence         {} is BEHIND: last value {last}, highest state group {}; \
             the main process moves it forward at start-up",
            seq.sequence, seq.max_id
        ))?,
        Some(last) => print_line(format_args!(
            "sequence         {} ok: last value {last}, highest state group {}",
            seq.sequence, seq.max_id
        ))?,
    }
    Ok(())
}
