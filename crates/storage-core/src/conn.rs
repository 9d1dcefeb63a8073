//! One connection type over both engines, and its r2d2 pool manager.
//!
//! Queries are written once with diesel's typed DSL and compiled for each backend by
//! [`with_conn!`]; behaviour that really differs per engine lives in
//! [`crate::engine`], never in ad-hoc checks of which variant a connection is.

use crate::engine::{Engine, FileStamp};
use crate::error::{Error, Result};
use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::r2d2::R2D2Connection;
use diesel::{PgConnection, SqliteConnection};
use std::sync::Arc;

/// A live connection to one of the two engines.
pub enum Conn {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Conn::Sqlite(_) => "Conn::Sqlite",
            Conn::Postgres(_) => "Conn::Postgres",
        })
    }
}

/// Runs `$body` with `$c` bound to the concrete diesel connection of `$conn`
/// (a `&mut Conn`). The body is compiled once per backend, so it must be a query
/// both backends can express; anything else belongs in an [`Engine`] method.
#[macro_export]
macro_rules! with_conn {
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn {
            $crate::Conn::Sqlite($c) => $body,
            $crate::Conn::Postgres($c) => $body,
        }
    };
}

impl Conn {
    /// The SQLite connection; an error if this is not one (an engine bug).
    pub fn sqlite(&mut self) -> Result<&mut SqliteConnection> {
        match self {
            Conn::Sqlite(c) => Ok(c),
            Conn::Postgres(_) => Err(Error::other(
                "internal: the SQLite engine was handed a PostgreSQL connection",
            )),
        }
    }

    /// The PostgreSQL connection; an error if this is not one (an engine bug).
    pub fn postgres(&mut self) -> Result<&mut PgConnection> {
        match self {
            Conn::Postgres(c) => Ok(c),
            Conn::Sqlite(_) => Err(Error::other(
                "internal: the PostgreSQL engine was handed an SQLite connection",
            )),
        }
    }

    /// Runs SQL without results (DDL, pragmas, several statements).
    pub fn batch_execute(&mut self, sql: &str) -> Result<()> {
        with_conn!(self, |c| c.batch_execute(sql))?;
        Ok(())
    }

    /// Opens a transaction with an engine-specific BEGIN statement, through diesel's
    /// transaction manager so that nested diesel transactions become savepoints.
    pub(crate) fn begin_with(&mut self, begin_sql: &str) -> diesel::QueryResult<()> {
        with_conn!(self, |c| AnsiTransactionManager::begin_transaction_sql(
            c, begin_sql
        ))
    }

    pub(crate) fn commit(&mut self) -> diesel::QueryResult<()> {
        with_conn!(self, |c| AnsiTransactionManager::commit_transaction(c))
    }

    pub(crate) fn rollback(&mut self) -> diesel::QueryResult<()> {
        with_conn!(self, |c| AnsiTransactionManager::rollback_transaction(c))
    }

    pub(crate) fn in_transaction(&mut self) -> bool {
        with_conn!(self, |c| {
            AnsiTransactionManager::transaction_manager_status_mut(c)
                .transaction_depth()
                .ok()
                .flatten()
                .is_some()
        })
    }

    /// Makes the pool discard this connection when it comes back: its server
    /// session is gone.
    pub(crate) fn mark_broken(&mut self) {
        with_conn!(self, |c| {
            AnsiTransactionManager::transaction_manager_status_mut(c).set_in_error()
        })
    }

    fn is_broken(&mut self) -> bool {
        with_conn!(self, |c| c.is_broken())
    }

    fn ping(&mut self) -> diesel::QueryResult<()> {
        with_conn!(self, |c| c.ping())
    }
}

/// Creates pool connections through the engine, which applies its per-connection
/// settings (pragmas, read-only sessions).
#[derive(Debug)]
pub(crate) struct ConnManager {
    pub(crate) engine: Arc<dyn Engine>,
    pub(crate) gate: Arc<ConnectGate>,
    /// Run on each new connection: the pool of seeking reads' sessions
    /// ([`Engine::seeking_session`]).
    pub(crate) session: Option<&'static str>,
}

/// Whether the pool may still open connections, how many it is opening, and
/// how many it holds open.
///
/// r2d2 opens connections on threads of its own, in the background, and the
/// last owner of its pool may be such a thread (one that was connecting when
/// the database was dropped). [`ConnectGate::close`], run when the last handle
/// of the database is gone, refuses new attempts and waits until no attempt is
/// under way and every connection is closed: a connection opened after its
/// owner let go could recreate a database (an SQLite file and its folder)
/// already removed; an SQLite connection still open when the process exits
/// leaves its `-wal` and `-shm` files behind; and a process must not exit
/// while a pool thread is inside the client library (libpq's Kerberos code
/// aborts the whole process when its library is torn down under it).
///
/// The gate also counts the times the server was seen to end a session (a
/// restart ends them all). A connection idle in the pool does not know its
/// session is gone until a statement fails on it; one opened before the last
/// such loss is checked before it is handed out ([`Pooled::still_connected`]).
#[derive(Debug, Default)]
pub(crate) struct ConnectGate {
    state: std::sync::Mutex<GateState>,
    changed: std::sync::Condvar,
    server_losses: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct GateState {
    closed: bool,
    connecting: usize,
    open: usize,
}

impl ConnectGate {
    /// How long [`close`](Self::close) waits for attempts under way and open
    /// connections: longer than a local connection takes to open or close,
    /// shorter than a hung one.
    const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Notes that the server ended a session of this pool: every connection
    /// opened before now is suspect until checked.
    pub(crate) fn note_server_lost(&self) {
        self.server_losses
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn server_losses(&self) -> u64 {
        self.server_losses
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, change: impl FnOnce(&mut GateState)) {
        change(&mut self.lock());
        self.changed.notify_all();
    }

    /// Runs `connect` unless the gate is closed, counted as under way
    /// meanwhile; the connection it opens is counted as open until dropped.
    fn attempt(
        self: &Arc<Self>,
        connect: impl FnOnce() -> Result<(Conn, Option<FileStamp>)>,
    ) -> Result<Pooled> {
        {
            let mut state = self.lock();
            if state.closed {
                return Err(Error::other("the database was closed"));
            }
            state.connecting += 1;
        }
        // Read before connecting: a loss noted meanwhile makes it suspect.
        let known_good_after = self.server_losses();
        let result = connect();
        let mut state = self.lock();
        // Closed meanwhile: nobody will use the connection. It is closed here,
        // under the lock and before the attempt stops counting, so `close`
        // returns after it.
        let result = if state.closed {
            drop(result);
            Err(Error::other("the database was closed"))
        } else {
            result
        };
        state.connecting -= 1;
        if result.is_ok() {
            state.open += 1;
        }
        drop(state);
        self.changed.notify_all();
        let (conn, stamp) = result?;
        Ok(Pooled {
            conn,
            stamp,
            known_good_after,
            ticket: OpenTicket(self.clone()),
        })
    }

    /// Refuses further connections and waits (a bounded time) until none is
    /// being opened and none is open. Runs after the pool was dropped: what is
    /// still open then belongs to a pool thread that is about to let go of it.
    pub(crate) fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        let (state, timeout) = self
            .changed
            .wait_timeout_while(state, Self::CLOSE_WAIT, |s| s.connecting + s.open > 0)
            .unwrap_or_else(|p| p.into_inner());
        if timeout.timed_out() {
            log::warn!(
                "closing the database: {} connection attempt(s) under way and {} connection(s) \
                 open after {} s",
                state.connecting,
                state.open,
                Self::CLOSE_WAIT.as_secs()
            );
        }
    }
}

/// A connection of the pool: a [`Conn`] counted by its [`ConnectGate`] until
/// it is closed.
#[derive(Debug)]
pub(crate) struct Pooled {
    // Fields drop in order: the connection is closed before the count drops.
    conn: Conn,
    /// What the connection assumed of the database when it was opened
    /// ([`Engine::connect_stamped`]).
    stamp: Option<FileStamp>,
    /// The gate's count of server losses when this connection was last known
    /// to have its session.
    known_good_after: u64,
    ticket: OpenTicket,
}

impl Pooled {
    /// Whether `engine` may still read through this connection
    /// ([`Engine::still_as_stamped`]).
    pub(crate) fn still_usable(&self, engine: &dyn Engine) -> bool {
        self.stamp
            .as_ref()
            .is_none_or(|stamp| engine.still_as_stamped(stamp))
    }

    /// Whether the server still holds this connection's session. Free while no
    /// loss of the server was noted since the connection was last known good;
    /// after one, a round trip (diesel learns that a session is gone only from a
    /// statement that failed on it, and a statement that writes may not be sent
    /// twice).
    pub(crate) fn still_connected(&mut self) -> bool {
        let losses = self.ticket.0.server_losses();
        if self.known_good_after == losses {
            return true;
        }
        if self.conn.ping().is_err() {
            return false;
        }
        self.known_good_after = losses;
        true
    }
}

impl std::ops::Deref for Pooled {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        &self.conn
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut Conn {
        &mut self.conn
    }
}

#[derive(Debug)]
struct OpenTicket(Arc<ConnectGate>);

impl Drop for OpenTicket {
    fn drop(&mut self) {
        self.0.update(|s| s.open -= 1);
    }
}

/// Closes the gate when dropped. The last field of the database's handle, so
/// that it runs after the pool was dropped.
#[derive(Debug)]
pub(crate) struct GateCloser(pub(crate) Arc<ConnectGate>);

impl Drop for GateCloser {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl r2d2::ManageConnection for ConnManager {
    type Connection = Pooled;
    type Error = Error;

    fn connect(&self) -> Result<Pooled> {
        self.gate.attempt(|| {
            let (mut conn, stamp) = self.engine.connect_stamped()?;
            if let Some(session) = self.session {
                conn.batch_execute(session)
                    .map_err(|e| e.context("setting up a session for seeking reads"))?;
            }
            Ok((conn, stamp))
        })
    }

    fn is_valid(&self, conn: &mut Pooled) -> Result<()> {
        conn.ping()?;
        Ok(())
    }

    fn has_broken(&self, conn: &mut Pooled) -> bool {
        conn.is_broken()
    }
}

#[cfg(test)]
mod tests {
    use super::ConnectGate;
    use crate::error::Error;
    use std::sync::mpsc;
    use std::sync::Arc;
    use std::time::Duration;

    /// Closes `gate` on a thread of its own; the receiver hears when `close`
    /// returned.
    fn close_on_a_thread(
        gate: &Arc<ConnectGate>,
    ) -> (std::thread::JoinHandle<()>, mpsc::Receiver<()>) {
        let (closed_tx, closed) = mpsc::channel();
        let g = gate.clone();
        let closer = std::thread::spawn(move || {
            g.close();
            closed_tx.send(()).unwrap();
        });
        (closer, closed)
    }

    /// What the process relies on at exit: once the last handle is dropped
    /// (close returned), no thread of the pool is inside the client library.
    #[test]
    fn close_waits_for_attempts_under_way_and_refuses_new_ones() {
        let gate = Arc::new(ConnectGate::default());
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let (finished_tx, finished) = mpsc::channel();
        let g = gate.clone();
        let attempt = std::thread::spawn(move || {
            let result = g.attempt(|| {
                entered_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                finished_tx.send(()).unwrap();
                Err(Error::other("connect ran"))
            });
            result.unwrap_err().to_string()
        });
        entered.recv().unwrap();
        let (closer, closed) = close_on_a_thread(&gate);
        // The attempt is still inside `connect`: close must not return yet.
        assert!(closed.recv_timeout(Duration::from_millis(200)).is_err());
        release.send(()).unwrap();
        closed.recv_timeout(Duration::from_secs(10)).unwrap();
        // It returned after the attempt left `connect`, not before.
        assert!(finished.try_recv().is_ok());
        closer.join().unwrap();
        // The attempt that was under way is refused too: nobody will use it.
        assert!(attempt.join().unwrap().contains("closed"));
        // And no new attempt starts.
        let refused = gate.attempt(|| panic!("connect after close"));
        assert!(refused.unwrap_err().to_string().contains("closed"));
        assert!(gate.is_closed());
    }

    /// A connection a pool thread still holds when the database is dropped
    /// (r2d2 hands it to the pool after `connect` returned): close returns
    /// only once it is closed, so the process cannot exit with it open (an
    /// SQLite connection left open leaves its -wal and -shm files behind).
    #[test]
    fn close_waits_for_open_connections_to_be_closed() {
        use diesel::Connection;
        let gate = Arc::new(ConnectGate::default());
        let conn = gate
            .attempt(|| {
                Ok((
                    crate::Conn::Sqlite(diesel::SqliteConnection::establish(":memory:").unwrap()),
                    None,
                ))
            })
            .unwrap();
        let (closer, closed) = close_on_a_thread(&gate);
        assert!(closed.recv_timeout(Duration::from_millis(200)).is_err());
        drop(conn);
        closed.recv_timeout(Duration::from_secs(10)).unwrap();
        closer.join().unwrap();
    }
}
