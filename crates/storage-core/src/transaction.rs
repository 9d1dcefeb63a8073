//! The transaction handed to the closure of [`crate::Database::run_interaction`].

use crate::claim::ClaimState;
use crate::conn::Conn;
use crate::engine::{Engine, Sequence, TxnOptions};
use crate::error::{Error, Result};

type Callback = Box<dyn FnOnce() + 'static>;

/// Where a transaction stands with its BEGIN.
pub(crate) enum Begun {
    /// Sent (every transaction but those of [`TxnOptions::batch`]).
    Yes,
    /// Not yet ([`TxnOptions::batch`]): sent before the first statement,
    /// unless that is the batch's statement, which then commits on its own.
    Deferred(TxnOptions, bool),
    /// The batch's statement committed on its own: nothing may follow it.
    Committed,
    /// Never: each statement stands alone (a seeking read on a session of
    /// its own, [`TxnOptions::seeks_only`]).
    Alone,
    /// A deferred BEGIN failed (or a statement followed the one that
    /// committed): the attempt fails with this error, and meanwhile the
    /// connection is in a read-only transaction, so whatever its caller
    /// sends writes nothing. `wrote_nothing`: the failed BEGIN came first, so
    /// the attempt changed nothing and may run again.
    Failed { error: Error, wrote_nothing: bool },
}

/// One attempt at a transaction: its connection, and the callbacks it registered.
///
/// Callbacks belong to the attempt that registered them. When the attempt commits,
/// its `call_after` callbacks run (in registration order) and its exception
/// callbacks are dropped. When it rolls back, its exception callbacks run and its
/// after-callbacks are dropped, whether or not the transaction is retried: a
/// prefill computed by an attempt that rolled back may describe rows that never
/// existed, while an exception callback undoes an in-memory effect of that very
/// attempt (a reserved position, say) that must not leak into the retry.
pub struct Transaction<'a> {
    conn: &'a mut Conn,
    engine: &'a dyn crate::engine::Engine,
    desc: &'a str,
    attempt: u32,
    /// The table the engine locked when the transaction began
    /// ([`crate::TxnOptions::lock`]).
    locked: Option<&'static str>,
    /// The main-process claim while it is still to be proven before COMMIT
    /// ([`Engine::proves_claim_before_commit`]): taken by the first batch
    /// statement that proves it on the way.
    claim: Option<&'a ClaimState>,
    begun: Begun,
    after: Vec<Callback>,
    on_exception: Vec<Callback>,
}

impl std::fmt::Debug for Transaction<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transaction")
            .field("desc", &self.desc)
            .field("attempt", &self.attempt)
            .field("engine", &self.engine.name())
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
pub(crate) struct Callbacks {
    pub(crate) after: Vec<Callback>,
    pub(crate) on_exception: Vec<Callback>,
    /// Whether the claim still has to be proven before COMMIT.
    pub(crate) claim_unproven: bool,
    pub(crate) begun: Option<Begun>,
}

impl<'a> Transaction<'a> {
    pub(crate) fn new(
        conn: &'a mut Conn,
        engine: &'a dyn Engine,
        desc: &'a str,
        attempt: u32,
        locked: Option<&'static str>,
        claim: Option<&'a ClaimState>,
        begun: Begun,
    ) -> Self {
        Transaction {
            conn,
            engine,
            desc,
            attempt,
            locked,
            claim,
            begun,
            after: Vec::new(),
            on_exception: Vec::new(),
        }
    }

    pub(crate) fn into_callbacks(self) -> Callbacks {
        Callbacks {
            after: self.after,
            on_exception: self.on_exception,
            claim_unproven: self.claim.is_some(),
            begun: Some(self.begun),
        }
    }

    /// The connection, for queries: `with_conn!(txn.conn(), |c| ...)`.
    pub fn conn(&mut self) -> &mut Conn {
        self.begin_if_deferred();
        self.conn
    }

    /// Sends a deferred BEGIN ([`Begun::Deferred`]) before a statement.
    fn begin_if_deferred(&mut self) {
        let (error, wrote_nothing) = match std::mem::replace(&mut self.begun, Begun::Yes) {
            Begun::Yes => return,
            Begun::Alone => {
                self.begun = Begun::Alone;
                return;
            }
            Begun::Deferred(options, claimed) => {
                match self.engine.begin(self.conn, &options, claimed) {
                    // Only an engine that holds no guard defers its BEGIN.
                    Ok(_) => return,
                    Err(e) => (Error::from(e).context("beginning the transaction"), true),
                }
            }
            Begun::Committed => (
                Error::other(format!(
                    "internal: {}: a statement after the one that committed the transaction",
                    self.desc
                )),
                false,
            ),
            failed @ Begun::Failed { .. } => {
                self.begun = failed;
                return;
            }
        };
        // What the caller sends next must write nothing: the error is the
        // attempt's outcome whatever it does.
        let _ = self.conn.begin_with("BEGIN READ ONLY");
        self.begun = Begun::Failed {
            error,
            wrote_nothing,
        };
    }

    pub fn engine(&self) -> &'a dyn Engine {
        self.engine
    }

    /// The description given to `run_interaction` (used in logs and metrics).
    pub fn desc(&self) -> &str {
        self.desc
    }

    /// 1 for the first attempt, 2 for the first retry, ...
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Runs `f` once this attempt has committed. Never runs otherwise.
    pub fn call_after(&mut self, f: impl FnOnce() + 'static) {
        self.after.push(Box::new(f));
    }

    /// Runs `f` once this attempt has rolled back or failed. Never runs on commit.
    pub fn call_on_exception(&mut self, f: impl FnOnce() + 'static) {
        self.on_exception.push(Box::new(f));
    }

    /// `n` new ids from `sequence`, ascending.
    pub fn next_ids(&mut self, sequence: &Sequence, n: usize) -> Result<Vec<i64>> {
        self.begin_if_deferred();
        self.engine.next_ids(self.conn, sequence, n)
    }

    /// `n` new ids from `sequence` as stream positions, under the stream
    /// positions lock held until this transaction ends
    /// ([`Engine::stream_positions`]): take them as late as the transaction
    /// can.
    pub fn stream_positions(&mut self, sequence: &Sequence, n: usize) -> Result<Vec<i64>> {
        self.begin_if_deferred();
        self.engine.stream_positions(self.conn, sequence, n)
    }

    /// One new id from `sequence`.
    pub fn next_id(&mut self, sequence: &Sequence) -> Result<i64> {
        let ids = self.next_ids(sequence, 1)?;
        Ok(ids[0])
    }

    /// `sequence` next to the highest id of its table, changing nothing.
    pub fn inspect_sequence(
        &mut self,
        sequence: &Sequence,
    ) -> Result<crate::engine::SequenceHealth> {
        self.begin_if_deferred();
        self.engine.inspect_sequence(self.conn, sequence)
    }

    /// What the engine's statistics say about `tables` ([`Engine::table_statistics`]).
    pub fn table_statistics(
        &mut self,
        tables: &[&str],
    ) -> Result<Vec<crate::engine::TableStatistics>> {
        self.begin_if_deferred();
        self.engine.table_statistics(self.conn, tables)
    }

    /// [`Engine::most_common_values`] of `table.column`.
    pub fn most_common_values(&mut self, table: &str, column: &str) -> Result<Vec<(String, f64)>> {
        self.begin_if_deferred();
        self.engine.most_common_values(self.conn, table, column)
    }

    /// Wakes listeners on `channel` once this transaction commits.
    pub fn notify(&mut self, channel: &str, payload: &str) -> Result<()> {
        self.begin_if_deferred();
        self.engine.notify(self.conn, channel, payload)
    }

    /// Inserts several tables' rows ([`Engine::insert_columns`]: one
    /// statement on PostgreSQL).
    pub fn insert_columns(&mut self, tables: &[crate::TableRows<'_>]) -> Result<()> {
        self.insert_columns_proving(tables, None, None)?;
        Ok(())
    }

    /// [`Self::insert_columns`], also taking `n` stream positions from
    /// `sequence` ([`Self::stream_positions`]: the last thing the
    /// transaction should do before COMMIT), filling the tables' columns of
    /// positions, and doing what [`Self::notify`] does with the highest
    /// position followed by `payload`, in the same statement on PostgreSQL.
    /// Answers the positions.
    pub fn insert_columns_taking_positions(
        &mut self,
        sequence: &Sequence,
        n: usize,
        tables: &[crate::TableRows<'_>],
        channel: &str,
        payload: &str,
    ) -> Result<Vec<i64>> {
        self.insert_columns_proving(tables, Some((sequence, n)), Some((channel, payload)))
    }

    /// Where the claim is still to be proven, the statement proves it too.
    /// The batch's statement of a transaction whose BEGIN was deferred
    /// ([`TxnOptions::batch`]) and that sent nothing yet is the whole
    /// transaction: sent alone, it commits on its own.
    fn insert_columns_proving(
        &mut self,
        tables: &[crate::TableRows<'_>],
        positions: Option<(&Sequence, usize)>,
        notify: Option<(&str, &str)>,
    ) -> Result<Vec<i64>> {
        let alone = positions.is_some() && matches!(self.begun, Begun::Deferred(..));
        if !alone {
            self.begin_if_deferred();
        }
        if alone {
            // Sent alone, it may commit whatever its answer says: nothing may
            // follow it, even after a failure (which then is no BEGIN that
            // failed having written nothing).
            self.begun = Begun::Committed;
        }
        let inserted = self
            .engine
            .insert_columns(self.conn, tables, positions, notify, self.claim, alone)?;
        self.claim = None;
        Ok(inserted)
    }

    /// Locks `table` against other writers until this transaction ends;
    /// nothing more where the transaction began with that lock
    /// ([`crate::TxnOptions::lock`]).
    pub fn lock_table(&mut self, table: &str) -> Result<()> {
        if self.locked == Some(table) {
            return Ok(());
        }
        self.begin_if_deferred();
        self.engine.lock_table(self.conn, table)
    }
}
