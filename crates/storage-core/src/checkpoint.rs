//! The write-ahead log's checkpoints, off the commit path: a thread of the
//! writing process, with a connection of its own, moves committed pages from
//! the log into the database after write transactions commit (at most every
//! [`Checkpointer::INTERVAL`]), for engines that keep such a log in the
//! process ([`Engine::checkpoints_in_background`], SQLite).
//!
//! Left to itself, SQLite checkpoints inside the COMMIT that takes the log
//! past 1,000 pages: that transaction's caller waits for the copy and its
//! fsyncs. A commit still only appends
//! to the log, so what a commit acknowledges is as durable as before; with
//! [`crate::SqliteSync::Normal`] (the default) the log is synced by each
//! checkpoint, now within an interval of a commit rather than once 1,000
//! pages piled up (with `Full` every commit syncs it). Should the thread
//! fall behind, the engine's own automatic checkpoint still bounds the
//! log, at a larger size.

use crate::engine::Engine;
use crate::error::Result;
use crate::{log_context, metrics};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The transaction name checkpoints are counted under in the metrics.
pub(crate) const CHECKPOINT_DESC: &str = "wal_checkpoint";

/// The checkpoint thread of one database handle; stopped (and its connection
/// closed) when dropped.
#[derive(Debug)]
pub(crate) struct Checkpointer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// A write transaction committed since the last checkpoint began.
    written: bool,
    stop: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Checkpointer {
    /// The shortest time between two checkpoints: commits in between share
    /// the next one (and its fsyncs).
    pub(crate) const INTERVAL: Duration = Duration::from_millis(100);

    /// Starts the thread on a new connection of `engine`.
    pub(crate) fn start(engine: Arc<dyn Engine>) -> Result<Self> {
        let mut conn = engine.connect()?;
        let shared = Arc::new(Shared::default());
        let thread = {
            let shared = shared.clone();
            log_context::spawn("wal-checkpoint", move || {
                while wait_for_commit(&shared) {
                    let start = Instant::now();
                    let result = engine.checkpoint(&mut conn);
                    metrics::global().record_txn(
                        CHECKPOINT_DESC,
                        result.is_ok(),
                        0,
                        start.elapsed(),
                    );
                    if let Err(e) = result {
                        log::warn!("checkpointing the write-ahead log: {e}");
                    }
                    if !pause(&shared) {
                        break;
                    }
                }
            })
        };
        Ok(Checkpointer {
            shared,
            thread: Some(thread),
        })
    }

    /// Called after a write transaction committed.
    pub(crate) fn written(&self) {
        let mut state = self.shared.lock();
        if !state.written {
            state.written = true;
            self.shared.changed.notify_all();
        }
    }
}

/// Waits for a commit: true once one happened, false once stopped.
fn wait_for_commit(shared: &Shared) -> bool {
    let mut state = shared.lock();
    while !state.written && !state.stop {
        state = shared
            .changed
            .wait(state)
            .unwrap_or_else(|p| p.into_inner());
    }
    state.written = false;
    !state.stop
}

/// Waits [`Checkpointer::INTERVAL`]: false when stopped meanwhile.
fn pause(shared: &Shared) -> bool {
    let state = shared.lock();
    let (state, _) = shared
        .changed
        .wait_timeout_while(state, Checkpointer::INTERVAL, |s| !s.stop)
        .unwrap_or_else(|p| p.into_inner());
    !state.stop
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            // Joined so that its connection is closed before the database's
            // handle is gone (an SQLite connection left open at exit leaves
            // its -wal and -shm files behind).
            let _ = thread.join();
        }
    }
}
