//! One main process per database.
//!
//! The main process is the only writer of events: its persistence loops read a
//! room's forward extremities and current state before the transaction that
//! writes the batch, which is safe only while nobody else writes that room.
//! Two `hs-main serve` (or a `serve` and an `import`) on one database would
//! silently corrupt both. Every command that writes events therefore claims
//! the database first, through the engine ([`Engine::try_claim_main_process`]),
//! and holds the claim until it exits; replica workers never claim.

use crate::config::DatabaseConfig;
use crate::engine::{self, ClaimHandle};
use crate::error::{Error, ErrorKind, Result};
use std::time::{Duration, Instant};

/// How long a new main process waits for a previous one to let go: a process
/// killed a moment ago may still hold its claim until the server notices.
pub const CLAIM_WAIT: Duration = Duration::from_secs(3);

/// This process's claim on a database as its main process; let go when dropped.
pub struct MainProcessClaim {
    _held: ClaimHandle,
}

impl std::fmt::Debug for MainProcessClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MainProcessClaim")
    }
}

impl MainProcessClaim {
    /// Claims the database of `config`, waiting up to `wait` for another main
    /// process to let go; then fails with [`ErrorKind::InUse`].
    pub fn acquire(config: &DatabaseConfig, wait: Duration) -> Result<Self> {
        let engine = engine::for_config(config);
        let url = config.url.redacted();
        let deadline = Instant::now() + wait;
        let mut logged = false;
        loop {
            if let Some(held) = engine.try_claim_main_process()? {
                return Ok(MainProcessClaim { _held: held });
            }
            if Instant::now() >= deadline {
                return Err(Error::new(ErrorKind::InUse(format!(
                    "{url} is claimed by another main process (hs-main serve, import, migrate \
                     or port); stop it first. One main process writes a database: add replica \
                     workers (hs-worker) for more processes"
                ))));
            }
            if !logged {
                log::info!(
                    "{url} is claimed by another main process; waiting up to {} s for it to let go",
                    wait.as_secs_f32()
                );
                logged = true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
