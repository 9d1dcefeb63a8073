//! Opening a database as its main process: refuse a database that is not ours
//! (Synapse's), claim it (one main process per database, see
//! `storage_core::MainProcessClaim`), then open it under that claim, which
//! migrates it and raises the claim's epoch; from then on every write
//! transaction proves the claim. Every command that writes events opens
//! through here.

use http_api::settings::Settings;
use storage_core::{
    refuse_foreign_database, refuse_unreadable_database, Database, DatabaseConfig,
    MainProcessClaim, OpenMode, Result, CLAIM_WAIT,
};

/// Exit status of `hs-main` when it stopped because it lost its claim on the
/// database (another main process took it over, or the SQLite file was
/// deleted or replaced): distinct from 1, so that a supervisor can tell "do
/// not simply restart me" from an ordinary failure.
pub const EXIT_CLAIM_LOST: i32 = 3;

/// The settings' database (with their pool size) and this process's claim on
/// it; keep the claim for as long as the database is written.
pub fn open_as_main(settings: &Settings) -> Result<(MainProcessClaim, Database)> {
    open_config_as_main(settings.database_config(OpenMode::Writer)?)
}

/// [`open_as_main`] with settings of the caller's (a server's shorter wait
/// for connections).
pub fn open_config_as_main(config: DatabaseConfig) -> Result<(MainProcessClaim, Database)> {
    // Before the claim, which already leaves a lock file beside an SQLite file.
    refuse_foreign_database(&config)?;
    let claim = MainProcessClaim::acquire(&config, CLAIM_WAIT)?;
    let db = Database::open_claimed(config, &claim)?;
    Ok((claim, db))
}

/// Opens the database read-only for a command that only reads it (`state`,
/// `inspect`, `serve --read-only`), once [`refuse_unreadable_database`] let it.
pub fn open_to_read(config: DatabaseConfig) -> Result<Database> {
    refuse_unreadable_database(&config)?;
    Database::open(config)
}

/// Makes the process exit with [`EXIT_CLAIM_LOST`] as soon as it finds it has
/// lost its claim, on whichever thread finds out, before that thread (or any
/// other) acknowledges anything more: the write that found out fails, and
/// storage-core has logged why. Installed once by the binary; tests, which
/// call the library, see the failing write's error instead.
pub fn exit_when_claim_lost() {
    storage_core::on_claim_lost(|_| std::process::exit(EXIT_CLAIM_LOST));
}
