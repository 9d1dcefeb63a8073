//! `hs-main inspect [--json]`: a read-only report on a database, ours or
//! Synapse's. Opens it read-only and writes nothing.

use crate::cli::Failure;
use serde_json::json;
use storage_core::{Database, DatabaseConfig, OpenMode, StoreConfig};
use storage_events::EventsStore;
use storage_state::state_report;

pub fn run(database: &str, as_json: bool, top: usize, check: bool) -> Result<(), Failure> {
    let db = Database::open(DatabaseConfig::parse(database, OpenMode::ReadOnly)?)?;
    report(&db, as_json, top)?;
    if check {
        check_invariants(&db, as_json)?;
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
        println!("{}", json!({ "violations": list }));
    } else if violations.is_empty() {
        println!("invariants       all hold");
    } else {
        for v in &violations {
            println!("VIOLATED         {v}");
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

fn report(db: &Database, as_json: bool, top: usize) -> Result<(), Failure> {
    let config = StoreConfig::default();
    let events = EventsStore::new(db.clone(), &config)?;
    let (rooms, event_count) = events.totals()?;
    let state = state_report(db, top)?;
    let seq = &state.sequence;
    if as_json {
        let report = json!({
            "database": db.url().redacted(),
            "engine": db.engine().name(),
            "rooms": rooms,
            "events": event_count,
            "state_groups": state.state_groups,
            "snapshot_groups": state.snapshot_groups,
            "delta_groups": state.delta_groups,
            "state_groups_state_rows": state.state_rows,
            "longest_delta_chain": state.longest_chain,
            "average_delta_chain": state.average_chain,
            "rooms_by_state_rows": state.rooms_by_state_rows.iter()
                .map(|(room, rows)| json!({"room_id": room, "rows": rows}))
                .collect::<Vec<_>>(),
            "sequence": {
                "name": seq.sequence,
                "last_value": seq.handed_out,
                "max_state_group": seq.max_id,
                "behind": seq.is_behind(),
            },
        });
        println!("{report:#}");
        return Ok(());
    }
    println!("database         {} ({})", db.url(), db.engine().name());
    println!("rooms            {rooms}");
    println!("events           {event_count}");
    println!(
        "state groups     {} ({} snapshots, {} deltas)",
        state.state_groups, state.snapshot_groups, state.delta_groups
    );
    println!(
        "state rows       {} in state_groups_state",
        state.state_rows
    );
    println!(
        "delta chains     longest {} groups, average {:.1}",
        state.longest_chain, state.average_chain
    );
    println!("rooms using the most state rows:");
    for (room, rows) in &state.rooms_by_state_rows {
        println!("  {rows:>10}  {room}");
    }
    match seq.handed_out {
        None => println!(
            "sequence         none on this engine: ids count on from the highest ({})",
            seq.max_id
        ),
        Some(last) if seq.is_behind() => println!(
            "sequence         {} is BEHIND: last value {last}, highest state group {}; \
             the main process moves it forward at start-up",
            seq.sequence, seq.max_id
        ),
        Some(last) => println!(
            "sequence         {} ok: last value {last}, highest state group {}",
            seq.sequence, seq.max_id
        ),
    }
    Ok(())
}
