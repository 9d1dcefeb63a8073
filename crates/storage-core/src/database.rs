//! The database handle: a pool of connections to one engine, and
//! `run_interaction`, the only way storage code touches the database.

use crate::checkpoint::Checkpointer;
use crate::claim::{self, ClaimState, MainProcessClaim};
use crate::config::{DatabaseConfig, DatabaseUrl, OpenMode};
use crate::conn::{Conn, ConnManager, ConnectGate, GateCloser, Pooled};
use crate::engine::{self, Engine, Sequence, SequenceRepair, TxnOptions};
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::metrics;
use crate::transaction::{Begun, Transaction};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// How many times a transaction is retried after a retryable failure (so at most
/// `1 + MAX_RETRIES` attempts).
pub const MAX_RETRIES: u32 = 5;

/// A pool of connections to one database, cheap to clone.
#[derive(Clone, Debug)]
pub struct Database {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    engine: Arc<dyn Engine>,
    pool: r2d2::Pool<ConnManager>,
    /// Sessions for the reads of [`TxnOptions::seeks_only`], where the engine
    /// has them ([`Engine::seeking_session`]); opened when first wanted.
    seeking: Option<r2d2::Pool<ConnManager>>,
    mode: OpenMode,
    /// Set for the main process ([`Database::open_claimed`]): every write
    /// transaction proves the claim first.
    claim: OnceLock<Arc<ClaimState>>,
    /// A writer's checkpoint thread, where the engine wants one; told of every
    /// committed write transaction. Dropped (and its connection closed) before
    /// the gate waits.
    checkpointer: Option<Checkpointer>,
    /// Last: fields drop in order, and the gate waits, once the pool is gone,
    /// for the connections its threads still hold to be closed.
    gate: GateCloser,
}

impl Database {
    /// Opens the database. A [`OpenMode::Writer`] applies pending migrations
    /// (refusing a schema newer than this binary); a [`OpenMode::Replica`] checks
    /// that the schema is exactly this binary's; [`OpenMode::ReadOnly`] checks and
    /// changes nothing.
    pub fn open(config: DatabaseConfig) -> Result<Self> {
        let url = config.url.redacted();
        Self::open_inner(config).with_context(|| format!("opening database {url}"))
    }

    /// Opens the database as its main process, under `claim` (taken first, with
    /// [`MainProcessClaim::acquire`]): migrates it like [`OpenMode::Writer`],
    /// then raises the claim's epoch, after which every read-write transaction
    /// proves the claim before anything else ([`Engine::prove_claim`]) and
    /// fails with [`crate::ErrorKind::ClaimLost`] once another main process has
    /// claimed the database (or, on SQLite, its file was deleted or replaced).
    pub fn open_claimed(config: DatabaseConfig, claim: &MainProcessClaim) -> Result<Self> {
        let url = config.url.redacted();
        let open = || {
            if config.mode != OpenMode::Writer {
                return Err(Error::invalid_argument(
                    "only a writer opens a database under the main-process claim",
                ));
            }
            let db = Self::open_inner(config)?;
            // Before the claim is set on the handle, so this one proves nothing.
            let epoch = db
                .run_interaction("raise_claim_epoch", |txn| claim::raise_epoch(txn.conn()))
                .context("claiming the database in it")?;
            claim.set_epoch(epoch)?;
            let state = claim.state().clone();
            db.engine().confirm_claim_after_commit(&state)?;
            let _ = state.pool.set(db.inner.gate.0.clone());
            let _ = db.inner.claim.set(state);
            log::info!("main process of {url}, claim epoch {epoch}");
            Ok(db)
        };
        open().with_context(|| format!("opening database {url}"))
    }

    /// Opens `url` as a writer with default settings.
    pub fn open_url(url: &str) -> Result<Self> {
        Self::open(DatabaseConfig::parse(url, OpenMode::Writer)?)
    }

    fn open_inner(config: DatabaseConfig) -> Result<Self> {
        match config.mode {
            OpenMode::ReadOnly => {}
            OpenMode::SynapseState => crate::layout::require_synapse_database(&config)?,
            // Before the first connection: a writer's connection already
            // changes an SQLite file (WAL mode).
            OpenMode::Writer | OpenMode::Replica => {
                crate::layout::refuse_foreign_database(&config)?
            }
        }
        let new_file = match &config.url {
            // Missing, or empty: what the main-process claim leaves of a new file.
            DatabaseUrl::Sqlite(path)
                if config.mode == OpenMode::Writer
                    && std::fs::metadata(path).map_or(true, |m| m.len() == 0) =>
            {
                Some(path.clone())
            }
            _ => None,
        };
        let engine: Arc<dyn Engine> = engine::for_config(&config).into();
        // One connection made here, outside the pool, reports the real reason a
        // database cannot be opened; the pool would only time out.
        drop(engine.connect()?);
        log::debug!(
            "{}: a pool of {} connections ({:?})",
            config.url,
            config.pool_size,
            config.mode
        );
        let gate = Arc::new(ConnectGate::default());
        let pool = |max_size: u32, min_idle: u32, session: Option<&'static str>| {
            r2d2::Pool::builder()
                .max_size(max_size)
                .min_idle(Some(min_idle.min(max_size)))
                // Broken connections are detected on return instead (`has_broken`):
                // a test query on every checkout costs a round trip per transaction.
                // After the server was seen to end a session, each connection opened
                // before that is checked once (`Database::checkout`).
                .test_on_check_out(false)
                .connection_timeout(config.pool_wait)
                .error_handler(Box::new(PoolErrorLogger { gate: gate.clone() }))
                .build_unchecked(ConnManager {
                    engine: engine.clone(),
                    gate: gate.clone(),
                    session,
                })
        };
        // Half as many again at most, opened only when wanted: a seeking
        // read is one short statement.
        let seeking = engine
            .seeking_session()
            .map(|session| pool(config.pool_size.div_ceil(2), 0, Some(session)));
        let pool = pool(config.pool_size, config.min_idle, None);
        let checkpointer = match config.mode {
            OpenMode::ReadOnly => None,
            _ if !engine.checkpoints_in_background() => None,
            _ => Some(Checkpointer::start(engine.clone())?),
        };
        let db = Database {
            inner: Arc::new(Inner {
                engine,
                pool,
                seeking,
                mode: config.mode,
                claim: OnceLock::new(),
                checkpointer,
                gate: GateCloser(gate),
            }),
        };
        match config.mode {
            OpenMode::Writer => {
                if let Some(path) = new_file {
                    // Said once, with the full path: a command run from another
                    // folder than usual creates a new, empty default database.
                    log::info!(
                        "created a new SQLite database at {}",
                        std::path::absolute(&path).unwrap_or(path).display()
                    );
                }
                let applied = db.with_connection(|engine, conn| engine.migrate(conn))?;
                for version in &applied {
                    log::info!("applied migration {version} to {}", db.url());
                }
            }
            OpenMode::Replica => db.with_connection(|engine, conn| engine.check_schema(conn))?,
            OpenMode::ReadOnly | OpenMode::SynapseState => {}
        }
        Ok(db)
    }

    pub fn engine(&self) -> &dyn Engine {
        &*self.inner.engine
    }

    pub fn url(&self) -> &DatabaseUrl {
        self.inner.engine.url()
    }

    pub fn mode(&self) -> OpenMode {
        self.inner.mode
    }

    /// A connection of `pool` the engine may still read through: one opened on
    /// an SQLite file taken for unchanging is discarded once a writer came
    /// (see [`Engine::still_as_stamped`]), and another taken, opened afresh
    /// once the pool has no more of the kind.
    fn checkout(
        &self,
        pool: &r2d2::Pool<ConnManager>,
        desc: &str,
    ) -> Result<r2d2::PooledConnection<ConnManager>> {
        let engine = &*self.inner.engine;
        // Each idle connection at most once, then a new one.
        for _ in 0..=pool.max_size() {
            let mut conn = pool.get().with_context(|| desc.to_owned())?;
            if !conn.still_usable(engine) {
                log::info!(
                    "{}: written since this connection opened it as an unchanging file: \
                     opening it again",
                    engine.url()
                );
            } else if !conn.still_connected() {
                log::info!(
                    "{desc}: the server ended this pooled connection's session: opening another"
                );
            } else {
                return Ok(conn);
            }
            conn.mark_broken();
        }
        Err(Error::unavailable(format!(
            "{desc}: connections to {} go bad faster than they open",
            engine.url()
        )))
    }

    /// Whether `error` says that the server ended `conn`'s session (a restart,
    /// a terminated backend, a cut). Then `conn` is not handed out again, and
    /// every pooled connection opened before now is checked before its next
    /// use: a restart ended their sessions too.
    fn server_lost(&self, conn: &mut Conn, error: &Error) -> bool {
        let lost = error
            .database_error()
            .is_some_and(|d| self.inner.engine.is_disconnect(d));
        if lost {
            self.inner.gate.0.note_server_lost();
            conn.mark_broken();
        }
        lost
    }

    /// Runs `f` on a pooled connection outside any transaction managed here
    /// (migrations, checks, LISTEN). Prefer [`run_interaction`](Self::run_interaction).
    pub fn with_connection<T>(
        &self,
        f: impl FnOnce(&dyn Engine, &mut Conn) -> Result<T>,
    ) -> Result<T> {
        let mut conn = self.checkout(&self.inner.pool, "a connection")?;
        let result = f(&*self.inner.engine, &mut conn).map_err(|e| {
            if self.server_lost(&mut conn, &e) {
                cannot_be_reached(&e)
            } else {
                e
            }
        });
        if let Err(e) = &result {
            if matches!(e.kind(), ErrorKind::Unavailable(_)) {
                // diesel notices a dead connection only when a statement was
                // sent; a kept-prepared statement's first use fails in its
                // PREPARE, which it does not count, and the pool would hand
                // the dead connection out again and again.
                conn.mark_broken();
            }
        }
        result
    }

    /// Takes `n` ids from `sequence` on a pooled connection, outside any
    /// transaction. Often a write's first statement, so the first to meet a
    /// session the server ended (a restart): then it runs once more on a
    /// connection checked first. The ids the lost attempt may have taken are a
    /// gap, as a failed write's are.
    pub fn next_ids(&self, sequence: &Sequence, n: usize) -> Result<Vec<i64>> {
        let mut conn = self.checkout(&self.inner.pool, "taking ids")?;
        match self.take_ids(&mut conn, sequence, n) {
            Err(e) if self.server_lost(&mut conn, &e) => {
                log::warn!(
                    "taking ids from {}: the server ended the connection's session, taking \
                     them on another: {e}",
                    sequence.name
                );
                drop(conn);
                self.with_connection(|_, conn| self.take_ids(conn, sequence, n))
            }
            taken => taken,
        }
    }

    /// [`Engine::next_ids`], with a server's refusal as read-only told so.
    fn take_ids(&self, conn: &mut Conn, sequence: &Sequence, n: usize) -> Result<Vec<i64>> {
        self.inner
            .engine
            .next_ids(conn, sequence, n)
            .map_err(|e| self.refused_write(conn, &e).unwrap_or(e))
    }

    /// `error`, a write refused on `conn` because the server takes none
    /// ([`refused_as_read_only`]), told as such; `None` for any other error,
    /// and on a handle that opened its sessions read-only itself (refused
    /// there, a write is its caller's mistake, not the server's state).
    fn refused_write(&self, conn: &mut Conn, error: &Error) -> Option<Error> {
        let refused = matches!(self.inner.mode, OpenMode::Writer | OpenMode::Replica)
            && error.database_error().is_some_and(refused_as_read_only);
        if !refused {
            return None;
        }
        // Started read-only: a server that takes writes again does so on new
        // sessions only.
        conn.mark_broken();
        Some(Error::unavailable(format!(
            "{} takes no writes: it is read-only (a standby, or default_transaction_read_only \
             is on). Nothing of this write was kept; point this process at the primary, or make \
             the database writable, then try again ({error})",
            self.inner.engine.url()
        )))
    }

    /// Whether the database answers a trivial statement within about `wait`
    /// (a health check): an error naming why not otherwise. Cheap on a pooled
    /// connection. A connection whose session the server ended is discarded
    /// and the check asked again on another, as [`Self::checkout`] does: a
    /// server that restarted answers, and a probe must not count its pool's
    /// dead connections one by one.
    pub fn check_reachable(&self, wait: Duration) -> Result<()> {
        let pool = &self.inner.pool;
        let mut last = None;
        for _ in 0..=pool.max_size() {
            let mut conn = pool.get_timeout(wait).map_err(|e| {
                Error::unavailable(format!("no database connection within {wait:?}: {e}"))
            })?;
            if !conn.still_connected() {
                conn.mark_broken();
                continue;
            }
            match conn.batch_execute("SELECT 1") {
                Ok(()) => return Ok(()),
                Err(e) if self.server_lost(&mut conn, &e) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(Error::unavailable(match last {
            Some(e) => format!("the database cannot be reached: {e}"),
            None => "the database cannot be reached: its connections keep failing".to_owned(),
        }))
    }

    /// Runs `f` in a read-write transaction and returns its value; see
    /// [`run_interaction_with`](Self::run_interaction_with).
    pub fn run_interaction<T>(
        &self,
        desc: &str,
        f: impl FnMut(&mut Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        self.run_interaction_with(desc, TxnOptions::default(), f)
    }

    /// Runs `f` in a read-only transaction (on SQLite it runs beside the writer).
    pub fn run_read<T>(
        &self,
        desc: &str,
        f: impl FnMut(&mut Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        self.run_interaction_with(desc, TxnOptions::read_only(), f)
    }

    /// Runs `f` once on a connection inside one read-only transaction, which
    /// sees a single snapshot of the database from its first read to its end
    /// (REPEATABLE READ on PostgreSQL; on SQLite a read transaction, whose
    /// snapshot the WAL keeps): for a long reader whose work elsewhere cannot
    /// be repeated (a port writing its target), so never retried. Writers go
    /// on meanwhile; PostgreSQL keeps the row versions the snapshot may read
    /// (VACUUM waits), SQLite does not checkpoint past it.
    pub fn run_snapshot<T>(&self, desc: &str, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        let mut conn = self.checkout(&self.inner.pool, desc)?;
        let engine = &*self.inner.engine;
        let guard = engine
            .begin(&mut conn, &TxnOptions::read_only(), false)
            .map_err(|e| Error::from(e).context(format!("{desc}: beginning the snapshot")))?;
        let result = f(&mut conn);
        // It wrote nothing: ending it is all there is to do.
        rollback(&mut conn, desc);
        drop(guard);
        self.read_unchanged(&mut conn)
            .map_err(|e| e.context(desc.to_owned()))?;
        result
    }

    /// An error when `conn` read a file taken for unchanging that a writer
    /// changed meanwhile (see [`Engine::still_as_stamped`]): what it read may
    /// mix two states of the file, so whatever it answered (a value, or an
    /// error such as "database disk image is malformed") is replaced by this
    /// error, and the connection is not used again.
    fn read_unchanged(&self, conn: &mut Pooled) -> Result<()> {
        let engine = &*self.inner.engine;
        if conn.still_usable(engine) {
            return Ok(());
        }
        conn.mark_broken();
        Err(Error::unavailable(format!(
            "{} was written while this read it as an unchanging file (no writer when the \
             read began): what was read may mix two states of it; try again",
            engine.url()
        )))
    }

    /// Runs `f` inside a transaction and returns its value.
    ///
    /// A failure the engine deems retryable (serialization failure or deadlock on
    /// PostgreSQL, a busy database on SQLite) rolls the attempt back and runs `f`
    /// again, up to [`MAX_RETRIES`] times. After the commit, the committed attempt's
    /// `call_after` callbacks run in order on this thread; each attempt that rolled
    /// back runs its own `call_on_exception` callbacks. The error of the last attempt
    /// is returned with `desc` as context and the backtrace of where it arose.
    pub fn run_interaction_with<T>(
        &self,
        desc: &str,
        options: TxnOptions,
        mut f: impl FnMut(&mut Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        let waiting = Instant::now();
        // A seeking read runs on a session of its own where the engine has
        // them (and then, `run_attempt`, as its statements alone).
        let pool = match &self.inner.seeking {
            Some(seeking) if options.seeks_only => seeking,
            _ => &self.inner.pool,
        };
        let mut conn = self.checkout(pool, desc)?;
        metrics::global().record_pool_wait(waiting.elapsed());
        let start = Instant::now();
        let engine = &*self.inner.engine;
        // Reads prove nothing: they cannot corrupt, and a fenced-out process may
        // still answer them until it exits.
        let claim = self
            .inner
            .claim
            .get()
            .filter(|_| !options.read_only)
            .map(|c| &**c);
        let mut attempt = 1;
        loop {
            let mut outcome =
                run_attempt(engine, claim, &mut conn, desc, &options, attempt, &mut f);
            if options.read_only {
                if let Err(changed) = self.read_unchanged(&mut conn) {
                    // What was read is not to be trusted, nor its callbacks run.
                    let on_exception = outcome.err().map(|f| f.on_exception).unwrap_or_default();
                    outcome = Err(AttemptFailure::after_begin(changed, on_exception));
                }
            }
            match outcome {
                Ok((value, after)) => {
                    if !options.read_only {
                        if let Some(checkpointer) = &self.inner.checkpointer {
                            checkpointer.written();
                        }
                    }
                    metrics::global().record_txn(
                        desc,
                        true,
                        u64::from(attempt - 1),
                        start.elapsed(),
                    );
                    for callback in after {
                        callback();
                    }
                    return Ok(value);
                }
                Err(AttemptFailure {
                    error,
                    on_exception,
                    began,
                }) => {
                    for callback in on_exception {
                        callback();
                    }
                    let retryable = error
                        .database_error()
                        .is_some_and(|e| engine.is_retryable(e));
                    if retryable && attempt <= MAX_RETRIES {
                        log::warn!("{desc}: attempt {attempt} failed, retrying: {error}");
                        std::thread::sleep(backoff(attempt));
                        attempt += 1;
                        continue;
                    }
                    // A session the server ended (a restart ends every idle one in the
                    // pool): a read changed nothing and an attempt whose BEGIN failed
                    // sent nothing else, so either runs again on a connection that is
                    // checked first. A write that got further may have committed;
                    // its caller hears that the database could not be reached.
                    let lost = self.server_lost(&mut conn, &error);
                    if lost && (options.read_only || !began) && attempt <= MAX_RETRIES {
                        log::warn!(
                            "{desc}: the server ended the connection's session, running it \
                             again on another: {error}"
                        );
                        // Given back first: the pool may hold no other.
                        drop(conn);
                        conn = self.checkout(pool, desc)?;
                        attempt += 1;
                        continue;
                    }
                    metrics::global().record_txn(
                        desc,
                        false,
                        u64::from(attempt - 1),
                        start.elapsed(),
                    );
                    let writes = !options.read_only && !options.seeks_only;
                    let error = if lost {
                        cannot_be_reached(&error)
                    } else if let Some(refused) = writes
                        .then(|| self.refused_write(&mut conn, &error))
                        .flatten()
                    {
                        refused
                    } else {
                        match error.database_error() {
                            Some(e) if engine.is_out_of_space(e) => {
                                Error::new(ErrorKind::OutOfSpace(format!(
                                    "no room left to write in {}: nothing of this write was \
                                     kept; free space there, then try again ({error})",
                                    engine.url()
                                )))
                            }
                            _ => error,
                        }
                    };
                    let context = if attempt > 1 {
                        format!("{desc} (after {attempt} attempts)")
                    } else {
                        desc.to_owned()
                    };
                    return Err(error.context(context));
                }
            }
        }
    }

    /// Moves `sequence` past the highest id of its table if a port or a restore
    /// left it behind, logging a warning with both values. Writers call this at
    /// start-up for every sequence they allocate from.
    pub fn sync_sequence(&self, sequence: &Sequence) -> Result<Option<SequenceRepair>> {
        let repair = self.repair_sequence(sequence)?;
        if let Some(r) = &repair {
            log::warn!(
                "sequence {} was behind its table {}: it had handed out up to {} but the \
                 highest id is {}; moved it forward so new ids start at {}",
                r.sequence,
                sequence.table,
                r.was,
                r.max_id,
                r.max_id + 1
            );
        }
        Ok(repair)
    }

    /// [`sync_sequence`](Self::sync_sequence) after rows were copied in with
    /// their ids (a port): the sequence is behind by design, so moving it is
    /// an expected step, logged at info.
    pub fn sync_sequence_after_copy(&self, sequence: &Sequence) -> Result<Option<SequenceRepair>> {
        let repair = self.repair_sequence(sequence)?;
        if let Some(r) = &repair {
            log::info!(
                "sequence {}: moved past the copied ids of {}, new ids start at {}",
                r.sequence,
                sequence.table,
                r.max_id + 1
            );
        }
        Ok(repair)
    }

    /// [`Engine::refresh_statistics`] of `tables`, on a connection of the pool.
    pub fn refresh_statistics(&self, tables: &[&str]) -> Result<()> {
        self.with_connection(|engine, conn| engine.refresh_statistics(conn, tables))
    }

    fn repair_sequence(&self, sequence: &Sequence) -> Result<Option<SequenceRepair>> {
        self.with_connection(|engine, conn| engine.sync_sequence(conn, sequence))
            .with_context(|| format!("checking sequence {}", sequence.name))
    }
}

/// What a caller hears of a session the server ended: the database is
/// unavailable for now, with the driver's own words.
fn cannot_be_reached(error: &Error) -> Error {
    Error::unavailable(format!(
        "the database cannot be reached ({error}); try again later"
    ))
}

/// Whether the database refused a write because it takes none (PostgreSQL's
/// read_only_sql_transaction: a standby after a failover, or
/// `default_transaction_read_only` set by an operator).
fn refused_as_read_only(error: &diesel::result::Error) -> bool {
    matches!(
        error,
        diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::ReadOnlyTransaction,
            _
        )
    )
}

type AttemptResult<T> = std::result::Result<(T, Vec<Box<dyn FnOnce()>>), AttemptFailure>;

/// A failed attempt: its error, its `call_on_exception` callbacks, and whether
/// anything but the BEGIN was sent (an attempt whose BEGIN failed changed
/// nothing, whatever it would have written).
struct AttemptFailure {
    error: Error,
    on_exception: Vec<Box<dyn FnOnce()>>,
    began: bool,
}

impl AttemptFailure {
    fn after_begin(error: Error, on_exception: Vec<Box<dyn FnOnce()>>) -> Self {
        AttemptFailure {
            error,
            on_exception,
            began: true,
        }
    }
}

fn run_attempt<T>(
    engine: &dyn Engine,
    claim: Option<&ClaimState>,
    conn: &mut Conn,
    desc: &str,
    options: &TxnOptions,
    attempt: u32,
    f: &mut impl FnMut(&mut Transaction<'_>) -> Result<T>,
) -> AttemptResult<T> {
    // A batch's transaction whose statement may commit on its own sends its
    // BEGIN only before another statement (`Transaction::conn`); the claim
    // is then proven by that statement, inside the server.
    let deferred = options.batch
        && !options.read_only
        && options.lock.is_none()
        && engine.commits_batch_statement_alone()
        && engine.proves_claim_before_commit();
    // A seeking read on a session of its own ([`Engine::seeking_session`]),
    // `conn` being one: no transaction, each statement stands alone.
    let alone = options.seeks_only && engine.seeking_session().is_some();
    let guard = if deferred || alone {
        None
    } else {
        match engine.begin(conn, options, claim.is_some()) {
            Ok(guard) => guard,
            Err(e) => {
                return Err(AttemptFailure {
                    error: Error::from(e).context("beginning the transaction"),
                    on_exception: Vec::new(),
                    began: false,
                })
            }
        }
    };
    // The claim proven first, or (where BEGIN locked its row) before COMMIT,
    // by the transaction's batch statement if it has one.
    let (first, before_commit) = match claim {
        Some(c) if engine.proves_claim_before_commit() => (None, Some(c)),
        c => (c, None),
    };
    let proof = first.map_or(Ok(()), |c| engine.prove_claim(conn, c));
    let (outcome, callbacks) = match proof {
        Ok(()) => {
            let begun = if alone {
                Begun::Alone
            } else if deferred {
                Begun::Deferred(*options, claim.is_some())
            } else {
                Begun::Yes
            };
            let mut txn = Transaction::new(
                conn,
                engine,
                desc,
                attempt,
                options.lock,
                before_commit,
                begun,
            );
            let outcome = f(&mut txn);
            (outcome, txn.into_callbacks())
        }
        Err(e) => (Err(e), crate::transaction::Callbacks::default()),
    };
    let (outcome, open, began) = match callbacks.begun {
        // The attempt fails whatever `f` made of it.
        Some(Begun::Failed {
            error,
            wrote_nothing,
        }) => (Err(error), true, !wrote_nothing),
        // Committed by its one statement, or nothing sent at all.
        Some(Begun::Committed | Begun::Deferred(..) | Begun::Alone) => (outcome, false, true),
        Some(Begun::Yes) | None => (outcome, true, true),
    };
    let outcome = match (outcome, before_commit) {
        (Ok(value), Some(c)) if callbacks.claim_unproven && open => {
            engine.prove_claim(conn, c).map(|()| value)
        }
        (outcome, _) => outcome,
    };
    let result = match outcome {
        Ok(value) => match if open { conn.commit() } else { Ok(()) } {
            // A commit that did not land where the claim says is not acknowledged.
            Ok(()) => match claim.map_or(Ok(()), |c| engine.confirm_claim_after_commit(c)) {
                Ok(()) => Ok((value, callbacks.after)),
                Err(e) => Err(AttemptFailure::after_begin(e, callbacks.on_exception)),
            },
            Err(e) => {
                rollback(conn, desc);
                Err(AttemptFailure::after_begin(
                    Error::from(e).context("committing"),
                    callbacks.on_exception,
                ))
            }
        },
        Err(e) => {
            rollback(conn, desc);
            Err(AttemptFailure {
                error: e,
                on_exception: callbacks.on_exception,
                began,
            })
        }
    };
    drop(guard);
    result
}

fn rollback(conn: &mut Conn, desc: &str) {
    if conn.in_transaction() {
        if let Err(e) = conn.rollback() {
            log::warn!("{desc}: rollback failed (the connection will be discarded if broken): {e}");
        }
    }
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(5u64 << attempt.min(6))
}

#[derive(Debug)]
struct PoolErrorLogger {
    gate: Arc<ConnectGate>,
}

impl r2d2::HandleError<Error> for PoolErrorLogger {
    fn handle_error(&self, error: Error) {
        // Refusals after close are expected and say nothing useful.
        if !self.gate.is_closed() {
            log::error!("connection pool: {error}");
        }
    }
}
