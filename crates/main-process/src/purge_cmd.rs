//! `hs-main purge-state-groups [--dry-run]`, and the same as a periodic job of
//! `hs-main serve`: delete the state groups that no event's state needs (see
//! `storage_state::purge`).

use crate::background::BackgroundJobs;
use crate::cli::Failure;
use http_api::settings::Settings;
use std::time::Duration;
use storage_core::{refuse_foreign_database, Database, OpenMode};
use storage_state::{highest_state_group, purge_unneeded_groups, StateStore};

/// The command: this process holds the database's claim, so no main process
/// is writing, and every unneeded group may go. A dry run only reads: it
/// opens the database read-only, claiming, migrating and moving nothing, so
/// it also answers beside a running `hs-main serve`.
pub fn run(settings: &Settings, dry_run: bool) -> Result<(), Failure> {
    if dry_run {
        let config = settings.database_config(OpenMode::ReadOnly)?;
        refuse_foreign_database(&config)?;
        let db = Database::open(config)?;
        let up_to = highest_state_group(&db)?;
        let store = StateStore::new(db, &settings.store_config("main"))?;
        let report = purge_unneeded_groups(&store, up_to, true)?;
        println!(
            "{} state groups are needed by no event's state (nothing deleted: --dry-run)",
            report.candidates
        );
        return Ok(());
    }
    let (_claim, db) = crate::open::open_as_main(settings)?;
    let up_to = highest_state_group(&db)?;
    let store = StateStore::new(db, &settings.store_config("main"))?;
    let report = purge_unneeded_groups(&store, up_to, false)?;
    println!(
        "deleted {} state groups ({} rows of state_groups_state) that no event's state needed",
        report.groups, report.rows
    );
    Ok(())
}

/// Purges every `every` (config `pruning.state_groups_every`, default 10
/// minutes), each time up to the highest group of the run before: a group
/// younger than one interval is never a candidate, so a write in flight keeps
/// the groups computed for it. On a thread of its own (log context "state
/// group purge") until the server stops. Through the server's own state
/// store, whose caches forget the deleted groups.
pub fn spawn_purging(jobs: &mut BackgroundJobs, store: StateStore, every: Duration) {
    jobs.spawn("state group purge", move |stop| {
        let mut bound = None;
        loop {
            if let Some(up_to) = bound {
                match purge_unneeded_groups(&store, up_to, false) {
                    Ok(r) if r.groups > 0 => log::info!(
                        "deleted {} state groups ({} rows) that no event's state needed, up to group {up_to}",
                        r.groups,
                        r.rows
                    ),
                    Ok(_) => {}
                    Err(e) => log::warn!("{e}"),
                }
            }
            match highest_state_group(store.database()) {
                Ok(highest) => bound = Some(highest),
                Err(e) => log::warn!("{e}"),
            }
            if stop.wait(every) {
                break;
            }
        }
    });
}
