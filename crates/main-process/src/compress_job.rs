//! The online compression job of `hs-main serve` (off unless
//! `--compress-state-every` is given): every so often, the rooms that have new
//! state groups since its last pass are compressed through the server's own
//! stores, paced, on a thread of its own under the log context
//! "state compression". The server holds the database's claim, so this is the
//! one compressor that may run beside it; its caches learn of each rewrite
//! after commit and workers through the replication stream, as with
//! `hs-main compress`.

use crate::compress_cmd::{compress_rooms, describe};
use std::collections::HashMap;
use std::time::Duration;
use storage_core::{log_context, Result};
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

/// Starts the job for the life of the process.
pub fn spawn(events: EventsStore, job: CompressJob) {
    log_context::spawn("state compression", move || {
        log::info!(
            "compressing state groups every {} s, at most {} rows a second",
            job.every.as_secs(),
            job.max_rows_per_second
        );
        let mut done: HashMap<String, StateGroup> = HashMap::new();
        std::thread::sleep(job.every.min(FIRST_PASS_AFTER));
        loop {
            if let Err(e) = pass(&events, &job, &mut done) {
                log::warn!("state compression pass failed (the next pass goes on): {e}");
            }
            std::thread::sleep(job.every);
        }
    });
}

/// One pass over the rooms with groups newer than the last pass saw.
/// `done`: the highest group of each room a pass has covered.
pub fn pass(
    events: &EventsStore,
    job: &CompressJob,
    done: &mut HashMap<String, StateGroup>,
) -> Result<()> {
    let db = events.database();
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
        return Ok(());
    }
    let options = CompressOptions {
        max_rows_per_second: Some(job.max_rows_per_second),
        ..Default::default()
    };
    let reports = compress_rooms(events.state(), Some(events), &rooms, &options, None, None)?;
    for (report, top) in reports.iter().zip(highest) {
        if report.groups_rewritten > 0 {
            log::info!("{}", describe(report, false));
        }
        done.insert(report.room_id.clone(), top);
    }
    Ok(())
}
