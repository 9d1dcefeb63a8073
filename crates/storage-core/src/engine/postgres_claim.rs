//! PostgreSQL's main-process claim: a session advisory lock on a connection of
//! its own, a thread that watches that session and takes the lock again when
//! the session ends under the process, and the proof a write transaction gives.
//!
//! The session can end without the process ending (a server restart,
//! `pg_terminate_backend`, a network cut, a pooler's idle timeout), and the
//! lock with it; another main process may then claim the database. Whether it
//! did is decided by the epoch, not by the lock: every write transaction reads
//! the claim row `FOR SHARE` first, so a newcomer's raise of the epoch waits
//! for the transactions that proved the old one, and every transaction after
//! it fails (under REPEATABLE READ the row updated since the snapshot is a
//! serialization failure, and the retry reads the new epoch). The watcher only
//! keeps the lock for as long as it can: regained with the epoch unchanged, the
//! process carries on; held by another session for longer than
//! [`TAKEOVER_GRACE`], or the epoch raised by another, the claim is lost.

use super::ClaimHandle;
use crate::claim::{main_process_claim, ClaimRow, ClaimState};
use crate::conn::Conn;
use crate::error::{Result, ResultExt};
use crate::log_context;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Text};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Key of the advisory lock held by the main process for as long as it runs.
pub const MAIN_PROCESS_LOCK_KEY: i64 = 0x6873_6d61_696e; // "hsmain"

/// How often the watcher checks that the claim's session is alive.
const PING_EVERY: Duration = Duration::from_secs(1);

/// How long the watcher keeps trying to take the lock again while another
/// session holds it, before it gives the claim up: a session of this very
/// process that the server has not yet found dead (after a network cut) holds
/// it until the server's keepalives notice, which the claim session sets to
/// about 10 s. A newcomer that holds it and raises the epoch meanwhile fences
/// this process at once.
const TAKEOVER_GRACE: Duration = Duration::from_secs(15);

/// How often the watcher repeats that the server is still out of reach.
const LOG_UNREACHABLE_EVERY: Duration = Duration::from_secs(30);

/// libpq settings that make the client notice a dead server within seconds
/// (TCP keepalives, a bound on unacknowledged sends, a connect timeout),
/// added to the URL unless the operator set them.
const CLIENT_SETTINGS: &[(&str, &str)] = &[
    ("keepalives", "1"),
    ("keepalives_idle", "5"),
    ("keepalives_interval", "2"),
    ("keepalives_count", "3"),
    ("tcp_user_timeout", "10000"),
    ("connect_timeout", "10"),
];

/// The same on the server's side, so that it lets go of the lock of a client
/// that vanished within seconds rather than the system's default two hours.
/// Ignored over a Unix socket.
const SESSION_SETTINGS: &str = "SET application_name = 'hs-main'; \
     SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; \
     SET tcp_keepalives_count = 3";

/// The claim connection's URL: the database's, with [`CLIENT_SETTINGS`].
fn claim_url(url: &str) -> String {
    let mut out = url.to_owned();
    for (key, value) in CLIENT_SETTINGS {
        if url.contains(&format!("{key}=")) {
            continue;
        }
        out.push(if out.contains('?') { '&' } else { '?' });
        out.push_str(&format!("{key}={value}"));
    }
    out
}

fn connect(url: &str, display: &str) -> Result<PgConnection> {
    let mut conn = PgConnection::establish(url)
        .with_context(|| format!("connecting to {display} for the main-process claim"))?;
    // Named, so that an operator can find the holder in pg_stat_activity.
    conn.batch_execute(SESSION_SETTINGS)
        .context("setting up the main-process claim's session")?;
    Ok(conn)
}

#[derive(QueryableByName)]
struct Locked {
    #[diesel(sql_type = Bool)]
    locked: bool,
}

fn try_lock(conn: &mut PgConnection) -> Result<bool> {
    Ok(
        diesel::sql_query("SELECT pg_try_advisory_lock($1) AS locked")
            .bind::<BigInt, _>(MAIN_PROCESS_LOCK_KEY)
            .get_result::<Locked>(conn)
            .context("taking the main process's advisory lock")?
            .locked,
    )
}

/// Takes the lock on a new session and starts its watcher; `None` when another
/// session holds it.
pub(super) fn try_claim(
    url: &str,
    display: &str,
    claim: &Arc<ClaimState>,
) -> Result<Option<ClaimHandle>> {
    let url = claim_url(url);
    let mut conn = connect(&url, display)?;
    if !try_lock(&mut conn)? {
        return Ok(None);
    }
    let (stop, stopped) = mpsc::channel();
    let watcher = Watcher {
        url,
        claim: claim.clone(),
        stopped,
    };
    let thread = log_context::spawn("main-process claim", move || watcher.run(conn));
    Ok(Some(Box::new(Held {
        stop: Some(stop),
        thread: Some(thread),
    })))
}

/// The claim while held: stops the watcher, which lets go of the lock, when dropped.
struct Held {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Watcher {
    url: String,
    claim: Arc<ClaimState>,
    stopped: Receiver<()>,
}

/// What one attempt to take the claim again found.
enum Retake {
    Held(PgConnection),
    /// Another session holds the lock: who.
    HeldElsewhere(String),
    /// The epoch moved on: the claim is lost (and marked so).
    Lost,
}

impl Watcher {
    /// Waits `d`; true when the claim was dropped meanwhile.
    fn stop_within(&self, d: Duration) -> bool {
        !matches!(self.stopped.recv_timeout(d), Err(RecvTimeoutError::Timeout))
    }

    fn run(self, mut conn: PgConnection) {
        loop {
            if self.stop_within(PING_EVERY) {
                // Let go now rather than when the server notices the closed socket,
                // so that the next claimant gets it at once.
                let _ = diesel::sql_query("SELECT pg_advisory_unlock($1)")
                    .bind::<BigInt, _>(MAIN_PROCESS_LOCK_KEY)
                    .execute(&mut conn);
                return;
            }
            let Err(e) = conn.batch_execute("SELECT 1") else {
                continue;
            };
            self.claim.note_server_lost();
            log::warn!(
                "lost the session holding the main-process claim on {} ({e}); taking the claim \
                 again. Writes go on meanwhile: each one proves the claim's epoch first",
                self.claim.url()
            );
            match self.retake() {
                Some(c) => conn = c,
                None => return,
            }
        }
    }

    /// Takes the claim again on a new session, for as long as the server is out
    /// of reach; `None` when the claim is lost or was dropped.
    fn retake(&self) -> Option<PgConnection> {
        let started = Instant::now();
        let mut logged: Option<Instant> = None;
        loop {
            if self.claim.check().is_err() {
                return None;
            }
            match self.attempt() {
                Ok(Retake::Held(conn)) => {
                    log::info!(
                        "took the main-process claim on {} again; claim epoch {} unchanged, \
                         carrying on",
                        self.claim.url(),
                        self.claim
                            .epoch()
                            .map_or_else(|| "not yet raised".to_owned(), |e| e.to_string())
                    );
                    return Some(conn);
                }
                Ok(Retake::Lost) => return None,
                Ok(Retake::HeldElsewhere(who)) if started.elapsed() >= TAKEOVER_GRACE => {
                    self.claim.lose(format!(
                        "the session holding this process's claim on {} ended and {who} has held \
                         the claim since: this process stopped writing. One main process writes \
                         a database: stop the other one before restarting this one",
                        self.claim.url()
                    ));
                    return None;
                }
                Ok(Retake::HeldElsewhere(_)) => {}
                Err(e) => {
                    if logged.is_none_or(|t| t.elapsed() >= LOG_UNREACHABLE_EVERY) {
                        log::warn!("cannot take the main-process claim again yet: {e}; retrying");
                        logged = Some(Instant::now());
                    }
                }
            }
            if self.stop_within(PING_EVERY) {
                return None;
            }
        }
    }

    fn attempt(&self) -> Result<Retake> {
        let mut conn = connect(&self.url, self.claim.url())?;
        if self.epoch_moved_on(&mut conn)? {
            return Ok(Retake::Lost);
        }
        if !try_lock(&mut conn)? {
            return Ok(Retake::HeldElsewhere(lock_holder(&mut conn)));
        }
        // Read again under the lock: a newcomer may have claimed, raised and
        // let go between the first read and the lock.
        if self.epoch_moved_on(&mut conn)? {
            return Ok(Retake::Lost);
        }
        Ok(Retake::Held(conn))
    }

    /// Whether another main process raised the epoch (the claim is then marked
    /// lost). Before this process raised its own there is nothing to compare.
    fn epoch_moved_on(&self, conn: &mut PgConnection) -> Result<bool> {
        if self.claim.epoch().is_none() {
            return Ok(false);
        }
        let row = main_process_claim::table
            .filter(main_process_claim::id.eq(1))
            .select(ClaimRow::as_select())
            .first(conn)
            .context("reading the main-process claim")?;
        Ok(self.claim.expect_epoch(&row).is_err())
    }
}

#[derive(QueryableByName)]
struct Holder {
    #[diesel(sql_type = Text)]
    who: String,
}

/// The session holding the advisory lock, as an operator would look it up in
/// `pg_stat_activity`.
fn lock_holder(conn: &mut PgConnection) -> String {
    // A bigint advisory key shows in pg_locks as its high and low 32 bits.
    let found = diesel::sql_query(
        "SELECT format('the session of pid %s (application %L, client %s)', a.pid, \
         a.application_name, COALESCE(host(a.client_addr), 'local')) AS who \
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.database = \
         (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND l.classid::bigint = $1 AND l.objid::bigint = $2 AND l.objsubid = 1 LIMIT 1",
    )
    .bind::<BigInt, _>(MAIN_PROCESS_LOCK_KEY >> 32)
    .bind::<BigInt, _>(MAIN_PROCESS_LOCK_KEY & 0xffff_ffff)
    .get_result::<Holder>(conn);
    found.map_or_else(|_| "another session".to_owned(), |h| h.who)
}

/// Sent with BEGIN by a write transaction of a claimed database: the claim's
/// row held `FOR SHARE` from the start (a newcomer's raise of the epoch waits
/// for the transaction), its epoch checked before COMMIT ([`prove`], or the
/// batch's statement: [`CLAIM_ROW`]).
pub(super) const LOCK_ROW: &str = "SELECT 1 FROM main_process_claim WHERE id = 1 FOR SHARE";

/// The claim's row, as the batch's statement reads it (`SELECT {columns}
/// FROM {from}`: after its inserts in a transaction, which holds the row
/// since BEGIN; first thing, `FOR SHARE`, when the statement is the whole
/// transaction): columns in [`ClaimRow`]'s order.
pub(super) const CLAIM_ROW: (&str, &str) = (
    "epoch, holder, claimed_at",
    "main_process_claim WHERE id = 1",
);

/// The claim proven by the row a statement read ([`CLAIM_ROW`]); none read
/// means the row is gone, which only another process can have done.
pub(super) fn expect_row(claim: &ClaimState, row: Option<ClaimRow>) -> Result<()> {
    match row {
        Some(row) => claim.expect_epoch(&row),
        None => Err(crate::Error::other(format!(
            "the main-process claim's row of {} is missing",
            claim.url()
        ))),
    }
}

/// Before COMMIT of a write transaction (the row is already held since
/// BEGIN: [`LOCK_ROW`]): the claim row's epoch is still ours.
pub(super) fn prove(conn: &mut Conn, claim: &ClaimState) -> Result<()> {
    claim.check()?;
    let row = main_process_claim::table
        .filter(main_process_claim::id.eq(1))
        .select(ClaimRow::as_select())
        .for_share()
        .first(conn.postgres()?)
        .context("reading the main-process claim")?;
    claim.expect_epoch(&row)
}
