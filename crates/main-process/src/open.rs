//! Opening a database as its main process: claim it (one main process per
//! database, see `storage_core::MainProcessClaim`), then open it as the writer,
//! which migrates it. Every command that writes events opens through here.

use storage_core::{Database, DatabaseConfig, MainProcessClaim, OpenMode, Result, CLAIM_WAIT};

/// The database at `url` with this process's claim on it; keep the claim for
/// as long as the database is written.
pub fn open_as_main(url: &str) -> Result<(MainProcessClaim, Database)> {
    let config = DatabaseConfig::parse(url, OpenMode::Writer)?;
    let claim = MainProcessClaim::acquire(&config, CLAIM_WAIT)?;
    Ok((claim, Database::open(config)?))
}
