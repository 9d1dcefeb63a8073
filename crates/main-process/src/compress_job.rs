//! The online compression job of `hs-main serve` (off unless
//! `--compress-state-every` is given): every so often, the rooms that have new
//! state groups since its last pass are compressed through the server's own
//! stores, paced, on a thread of its own under the log context
//! "state compression". The server holds the database's claim, so this is the
//! one compressor that may run beside it; its caches learn of each rewrite
//! after commit and workers through the replication stream, as with
//! `hs-main compress`.
//!
//! How far it got (the highest group of each room a pass covered) is kept in
//! the database (`state_compress_progress`), written after each room, so that
//! a restarted server goes on with the rooms that have new groups instead of
//! going over every room again. A room whose pass was cut short is not
//! recorded: the next pass compresses it again, which carries on from what the
//! cut-short pass committed (the plan depends only on the groups' states).

use crate::background::{BackgroundJobs, StopSignal};
use crate::compress_cmd::{compress_rooms, describe};
use std::collections::HashMap;
use std::time::Duration;
use storage_core::Result;
use storage_events::EventsStore;
use storage_state::compress::{self, CompressOptions};
use storage_state::StateGroup;

/// The longest wait before the first pass: a server that was just started has
/// probably been down a while, and the work has piled up.
const FIRST_PASS_AFTER: Duration = Duration::from_secs(60);

/// How the job runs.
#[derive(Debug, Clone, Copy)]
pub struct CompressJob {
    /// Time between passes.
    pub every: Duration,
    /// Rows deleted plus inserted per second, at most.
    pub max_rows_per_second: u64,
}

/// Starts the job, until the server stops.
pub fn spawn(jobs: &mut BackgroundJobs, events: EventsStore, job: CompressJob) {
    jobs.spawn("state compression", move |stop| {
        log::info!(
            "compressing state groups every {} s, at most {} rows a second",
            job.every.as_secs(),
            job.max_rows_per_second
        );
        let mut wait = job.every.min(FIRST_PASS_AFTER);
        while !stop.wait(wait) {
            if let Err(e) = pass(&events, &job, stop) {
                log::warn!("state compression pass failed (the next pass goes on): {e}");
            }
            wait = job.every;
        }
    });
}

/// One pass over the rooms with groups newer than the recorded progress (of
/// this process's earlier passes, or of an earlier process); returns the rooms
/// it found. Stops between rooms once `stop` is raised: the rooms left are
/// not recorded, and the next server's pass goes over them.
pub fn pass(events: &EventsStore, job: &CompressJob, stop: &StopSignal) -> Result<Vec<String>> {
    let db = events.database();
    let done: HashMap<String, StateGroup> = compress::load_progress(db)?;
    let mut rooms = Vec::new();
    let mut highest = Vec::new();
    for (room, _) in compress::rooms_by_state_rows(db)? {
        let top = compress::highest_state_group_of_room(db, &room)?;
        if done.get(&room).is_none_or(|d| top > *d) {
            rooms.push(room);
            highest.push(top);
        }
    }
    if rooms.is_empty() {
        return Ok(rooms);
    }
    log::info!(
        "{} room(s) with state groups not compressed yet: {}",
        rooms.len(),
        rooms.join(", ")
    );
    let options = CompressOptions {
        max_rows_per_second: Some(job.max_rows_per_second),
        ..Default::default()
    };
    for (room, top) in rooms.iter().zip(highest) {
        if stop.is_raised() {
            break;
        }
        let reports = compress_rooms(
            events.state(),
            Some(events),
            std::slice::from_ref(room),
            &options,
            None,
            None,
        )?;
        for report in &reports {
            if report.groups_rewritten > 0 {
                log::info!("{}", describe(report, false));
            }
        }
        compress::record_progress(db, room, top)?;
    }
    Ok(rooms)
}
