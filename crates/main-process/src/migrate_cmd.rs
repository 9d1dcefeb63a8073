//! `hs-main migrate`: open the database as the main process does at start-up
//! (creating an SQLite file and its folder if needed, applying pending
//! migrations, moving lagging id sequences forward) and report.

use crate::cli::{print_line, Failure};
use http_api::settings::Settings;
use storage_events::{EventReads, EventsStore};

pub fn run(settings: &Settings) -> Result<(), Failure> {
    let (_claim, db) = crate::open::open_as_main(settings)?;
    let events = EventsStore::new(db.clone(), &settings.store_config("main"))?;
    print_line(format_args!(
        "database {} ({}) is migrated and ready; stream position {}",
        db.url(),
        db.engine().name(),
        events.max_stream_ordering()
    ))?;
    Ok(())
}
