//! One main process per database, enforced twice: a lock keeps a second main
//! process out, and a fencing epoch in the database stops a first one that lost
//! its lock without noticing.
//!
//! The main process is the only writer of events: its persistence loops read a
//! room's forward extremities and current state before the transaction that
//! writes the batch, which is safe only while nobody else writes that room.
//! Two `hs-main serve` (or a `serve` and an `import`) on one database would
//! silently corrupt both. Every command that writes events therefore claims
//! the database first, through the engine ([`Engine::try_claim_main_process`](crate::Engine::try_claim_main_process)),
//! and holds the claim until it exits; replica workers never claim.
//!
//! A lock alone is not enough: a PostgreSQL session ends under a running
//! process (server restart, `pg_terminate_backend`, a pooler's idle timeout)
//! and the lock with it, and an SQLite file can be deleted and replaced while a
//! process writes to the file it opened. So the claim is also proven inside the
//! database: once it holds the lock and has migrated, the process raises the
//! epoch in the one-row table `main_process_claim`
//! ([`Database::open_claimed`](crate::Database::open_claimed)),
//! and every write transaction it runs afterwards checks, before it commits,
//! that the epoch is still its own ([`Engine::prove_claim`](crate::Engine::prove_claim)):
//! SQLite first thing; PostgreSQL holds the row `FOR SHARE` from its BEGIN
//! message and reads the epoch in the batch's own statement (or just before
//! COMMIT), which costs no round trip of its own. A newcomer's raise waits
//! for the transactions that hold the old epoch (PostgreSQL: the row lock;
//! SQLite: one writer at a time), so the two processes' writes never
//! interleave. The process that lost fails that
//! transaction with [`ErrorKind::ClaimLost`], logs why, and calls the hook the
//! binary installed ([`on_claim_lost`]), which ends it.
//!
//! The epoch cannot stop a second process that reaches an SQLite file under
//! another name (a hard link): SQLite keeps its WAL state beside each name, so
//! the two would not see each other's commits, the epoch included. The SQLite
//! lock is therefore taken on the file itself as well as beside its path, and
//! keeps such a process out (`engine/sqlite_claim.rs`).

use crate::config::DatabaseConfig;
use crate::conn::{Conn, ConnectGate};
use crate::engine::{self, ClaimHandle};
use crate::error::{Error, ErrorKind, Result, ResultExt};
use diesel::prelude::*;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a new main process waits for a previous one to let go: a process
/// killed a moment ago may still hold its claim until the server notices.
pub const CLAIM_WAIT: Duration = Duration::from_secs(3);

diesel::table! {
    /// The fencing epoch of the main-process claim: one row, `id` 1.
    main_process_claim (id) {
        id -> Integer,
        epoch -> BigInt,
        holder -> Text,
        claimed_at -> BigInt,
    }
}

/// The claim row as a write transaction reads it.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = main_process_claim)]
pub struct ClaimRow {
    pub epoch: i64,
    /// Who raised the epoch last: command, pid and host.
    pub holder: String,
    /// When, in ms since the Unix epoch.
    pub claimed_at: i64,
}

/// The database file a claim was taken on, where the engine has one: the path
/// as configured (what a new connection would open) and the identity of the
/// file it named when the claim was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseFile {
    pub path: PathBuf,
    pub device: u64,
    pub inode: u64,
}

/// What a claimed [`Database`](crate::Database) and the engine's claim keeper
/// (PostgreSQL's session watcher) share: the epoch this process raised, and
/// whether and why the claim was lost.
#[derive(Debug)]
pub struct ClaimState {
    /// The database, as logs and errors name it (password redacted).
    url: String,
    epoch: OnceLock<i64>,
    lost: OnceLock<String>,
    /// Set by engines that claim a file (SQLite).
    pub(crate) file: OnceLock<DatabaseFile>,
    /// The pool of the database opened under this claim. Told when the
    /// claim's keeper finds the claim's own session ended: what ended it (a
    /// server restart) ended the pool's idle sessions too, and a write whose
    /// one statement meets a dead session cannot be sent again.
    pub(crate) pool: OnceLock<Arc<ConnectGate>>,
}

/// Called once, on whichever thread finds out first, when this process has lost
/// its claim; see [`on_claim_lost`].
static CLAIM_LOST_HOOK: OnceLock<fn(&Error)> = OnceLock::new();

/// Installs what the process does once it has lost its main-process claim
/// (`hs-main` exits). The first hook installed stays. Without one (tests), the
/// failing transaction's error is all that happens.
pub fn on_claim_lost(hook: fn(&Error)) {
    let _ = CLAIM_LOST_HOOK.set(hook);
}

impl ClaimState {
    fn new(url: String) -> Self {
        ClaimState {
            url,
            epoch: OnceLock::new(),
            lost: OnceLock::new(),
            file: OnceLock::new(),
            pool: OnceLock::new(),
        }
    }

    /// The database, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The epoch this process raised; `None` until it has.
    pub fn epoch(&self) -> Option<i64> {
        self.epoch.get().copied()
    }

    /// Notes, for the pool of the claimed database, that the server ended a
    /// session: its connections opened before now are checked before their
    /// next use ([`ConnectGate::note_server_lost`]).
    pub(crate) fn note_server_lost(&self) {
        if let Some(pool) = self.pool.get() {
            pool.note_server_lost();
        }
    }

    /// The error every write gets once the claim is lost, `Ok` before.
    pub fn check(&self) -> Result<()> {
        match self.lost.get() {
            Some(why) => Err(Error::new(ErrorKind::ClaimLost(why.clone()))),
            None => Ok(()),
        }
    }

    /// Records that the claim is lost and why (the first reason stays), logs
    /// it once, runs the process's hook, and returns the error for the caller.
    pub fn lose(&self, why: String) -> Error {
        let mut first = false;
        self.lost.get_or_init(|| {
            first = true;
            why
        });
        let error = self.check().expect_err("the claim was just marked lost");
        if first {
            log::error!("{error}");
            if let Some(hook) = CLAIM_LOST_HOOK.get() {
                hook(&error);
            }
        }
        error
    }

    /// Compares the row a write transaction read with the epoch this process
    /// raised: another epoch means another main process claimed the database.
    pub fn expect_epoch(&self, row: &ClaimRow) -> Result<()> {
        self.check()?;
        let Some(ours) = self.epoch() else {
            return Ok(());
        };
        if row.epoch == ours {
            return Ok(());
        }
        let ago = now_ms().saturating_sub(row.claimed_at) / 1000;
        Err(self.lose(format!(
            "another main process ({}, {ago} s ago) claimed {} after this one (claim epoch {}, \
             this process held {ours}): this process stopped writing before committing \
             anything more. One main process writes a database: stop the other one before \
             restarting this one",
            row.holder, self.url, row.epoch
        )))
    }

    /// Checks that the database file at the configured path is still the one
    /// claimed: a file deleted or replaced under a running process would take
    /// its writes where nobody will ever read them.
    pub fn expect_same_file(&self) -> Result<()> {
        let Some(file) = self.file.get() else {
            return Ok(());
        };
        let path = file.path.display();
        let why = match std::fs::metadata(&file.path) {
            Ok(m) if file_identity(&m) == (file.device, file.inode) => return Ok(()),
            Ok(m) => format!(
                "the database file {path} was replaced while this process was writing to it \
                 (now device {} inode {}, claimed as device {} inode {})",
                file_identity(&m).0,
                file_identity(&m).1,
                file.device,
                file.inode
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                format!("the database file {path} was deleted while this process was writing to it")
            }
            Err(e) => format!("the database file {path} can no longer be examined ({e})"),
        };
        Err(self.lose(format!(
            "{why}: this process stopped writing before acknowledging anything more. Writes \
             since the change went to a file nobody will open again; restore the file (or \
             start afresh) and restart"
        )))
    }
}

/// Device and inode, the identity of a file whatever the path to it.
pub(crate) fn file_identity(m: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Who this process is, for the claim row and for another process's error
/// message: its command (the log context it claims under), pid and host.
fn holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "an unknown host".to_owned());
    format!(
        "{} pid {} on {host}",
        crate::log_context::current_name(),
        std::process::id()
    )
}

/// Raises the epoch inside the caller's transaction and returns it: this
/// process is the main process from this commit on.
pub(crate) fn raise_epoch(conn: &mut Conn) -> Result<i64> {
    use main_process_claim as t;
    let me = holder();
    let now = now_ms();
    crate::with_conn!(conn, |c| {
        diesel::update(t::table.filter(t::id.eq(1)))
            .set((
                t::epoch.eq(t::epoch + 1),
                t::holder.eq(&me),
                t::claimed_at.eq(now),
            ))
            .execute(c)?;
        t::table
            .filter(t::id.eq(1))
            .select(t::epoch)
            .first::<i64>(c)
    })
    .context("raising the main-process claim's epoch")
}

/// This process's claim on a database as its main process; let go when dropped.
pub struct MainProcessClaim {
    state: Arc<ClaimState>,
    _held: ClaimHandle,
}

impl std::fmt::Debug for MainProcessClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MainProcessClaim")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl MainProcessClaim {
    /// Claims the database of `config`, waiting up to `wait` for another main
    /// process to let go; then fails with [`ErrorKind::InUse`].
    pub fn acquire(config: &DatabaseConfig, wait: Duration) -> Result<Self> {
        let engine = engine::for_config(config);
        let url = config.url.redacted();
        let state = Arc::new(ClaimState::new(url.clone()));
        let deadline = Instant::now() + wait;
        let mut logged = false;
        loop {
            if let Some(held) = engine.try_claim_main_process(&state)? {
                return Ok(MainProcessClaim { state, _held: held });
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

    /// What the claimed database shares with this claim.
    pub(crate) fn state(&self) -> &Arc<ClaimState> {
        &self.state
    }

    /// The epoch raised by the database opened with this claim, if any.
    pub fn epoch(&self) -> Option<i64> {
        self.state.epoch()
    }

    /// Records the epoch this process raised; once per claim.
    pub(crate) fn set_epoch(&self, epoch: i64) -> Result<()> {
        self.state.epoch.set(epoch).map_err(|_| {
            Error::other(format!(
                "internal: a second database was opened with one claim on {}",
                self.state.url
            ))
        })
    }
}
