//! `hs-main migrate`: open the database as the main process does at start-up
//! (creating an SQLite file and its folder if needed, applying pending
//! migrations, moving lagging id sequences forward) and report.

use crate::cli::{print_line, Failure};
use storage_core::StoreConfig;
use storage_events::{EventReads, EventsStore};

pub fn run(database: &str) -> Result<(), Failure> {
    let (_claim, db) = crate::open::open_as_main(database)?;
    let config = StoreConfig::default();
    let events = EventsStore::new(db.clone(), &config)?;
    print_line(format_args!(
        "database {} ({}) is migrated and ready; stream position {}",
        db.url(),
        db.engine().name(),
        events.max_stream_ordering()
    ))?;
    Ok(())
}
