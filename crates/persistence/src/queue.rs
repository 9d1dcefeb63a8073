//! The persistence queue: events for a room wait here until that room's loop
//! writes them in a batch.
//!
//! Per room, at most one loop runs at a time, under its own log context (never
//! the context of the request that happened to start it); rooms proceed in
//! parallel. The loop runs on a thread of its own, except that a caller of
//! [`PersistenceQueue::write`] who finds no loop running for the room writes
//! its own item on its own thread (it would only wait meanwhile), and hands
//! whatever arrived meanwhile to a loop thread: a lone writer pays no thread
//! start and no hand-off between threads per request. A call to [`PersistenceQueue::enqueue`] that
//! finds the room's last waiting item with room to spare joins it, so that
//! callers arriving while a batch is being written share the next one. Every
//! caller of an item gets the same outcome: the batch's stream positions, or
//! its error (shared, with the backtrace of where it happened). An error that
//! reached no caller is logged as unhandled; one that reached a caller is theirs.
//!
//! Items may belong to a [`Chain`]: a writer (an import) whose later events
//! were computed on the assumption that its earlier events of the room commit.
//! Once an item of a chain fails, every later item of that chain fails without
//! being written, so a room is never left with a hole (events stored without the
//! events they follow). Items outside a chain are independent of each other.

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use crossbeam_utils::sync::WaitGroup;
use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use storage_core::log_context::{self, LogContext};
use storage_core::{metrics, Error};
use storage_events::{EventToPersist, PersistedBatch};

/// What every caller of a batch receives.
pub type BatchOutcome = Result<Arc<PersistedBatch>, Arc<Error>>;

/// Writes one room's batch; the queue calls it from the room's loop.
pub type PersistFn =
    dyn Fn(&str, &[EventToPersist]) -> storage_core::Result<PersistedBatch> + Send + Sync;

/// Told of the events of every item the queue did not write (its
/// [`PersistFn`] failed or panicked, or an earlier item of its chain failed),
/// so that what was prepared for them can be dropped.
pub type DiscardFn = dyn Fn(&[EventToPersist]) + Send + Sync;

/// A caller's claim on the outcome of the batch its events went into.
#[derive(Debug)]
pub struct Handle {
    rx: Receiver<BatchOutcome>,
}

impl Handle {
    /// Waits for the batch to be written (or to fail).
    pub fn wait(self) -> BatchOutcome {
        self.rx
            .recv()
            .unwrap_or_else(|_| Err(Arc::new(loop_gone())))
    }

    /// Waits at most `timeout`; `None` if the batch is still pending.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<BatchOutcome> {
        match self.rx.recv_timeout(timeout) {
            Ok(outcome) => Some(outcome),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => Some(Err(Arc::new(loop_gone()))),
        }
    }
}

fn loop_gone() -> Error {
    Error::other("the persistence loop stopped without an outcome for this batch")
}

struct Item {
    events: Vec<EventToPersist>,
    waiters: Vec<Sender<BatchOutcome>>,
    chain: Option<u64>,
}

/// A sequence of one writer's items whose later items depend on the earlier
/// ones (see the module documentation). Get one from [`PersistenceQueue::chain`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Chain(u64);

struct Inner {
    /// Waiting items per room; a room is present exactly while its loop runs.
    rooms: Mutex<HashMap<String, VecDeque<Item>>>,
    persist: Box<PersistFn>,
    discard: Box<DiscardFn>,
    max_batch: usize,
    depth: AtomicUsize,
    next_chain: AtomicU64,
    /// The first failure of each chain that had one.
    failed_chains: Mutex<HashMap<u64, Arc<Error>>>,
}

/// See the module documentation. Cheap to clone. Dropping the last handle
/// waits for the room loops still running (their items are written): they
/// hold the persister, and with it the database, which must be closed before
/// the process exits (an SQLite connection left open leaves its `-wal` and
/// `-shm` files behind).
#[derive(Clone)]
pub struct PersistenceQueue {
    inner: Arc<Inner>,
    last: Arc<LastHandle>,
}

/// Shared by the handles only: dropped with the last one, it waits until
/// every room loop has dropped its clone of the wait group, which a loop
/// holds until it has let go of the queue's [`Inner`].
struct LastHandle(WaitGroup);

impl Drop for LastHandle {
    fn drop(&mut self) {
        // `wait` takes the group by value: a fresh one is left in its place.
        std::mem::replace(&mut self.0, WaitGroup::new()).wait();
    }
}

impl std::fmt::Debug for PersistenceQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersistenceQueue")
            .field("max_batch", &self.inner.max_batch)
            .field("depth", &self.depth())
            .finish()
    }
}

impl PersistenceQueue {
    /// A queue that writes batches of at most `max_batch` events (a single
    /// caller's events are never split) with `persist`.
    pub fn new(max_batch: usize, persist: Box<PersistFn>) -> Self {
        Self::discarding(max_batch, persist, Box::new(|_| {}))
    }

    /// Like [`new`](Self::new), and hands `discard` the events of every item
    /// not written: its persister failed or panicked, or an earlier item of
    /// its chain failed.
    pub fn discarding(max_batch: usize, persist: Box<PersistFn>, discard: Box<DiscardFn>) -> Self {
        PersistenceQueue {
            last: Arc::new(LastHandle(WaitGroup::new())),
            inner: Arc::new(Inner {
                rooms: Mutex::new(HashMap::new()),
                persist,
                discard,
                max_batch: max_batch.max(1),
                depth: AtomicUsize::new(0),
                next_chain: AtomicU64::new(0),
                failed_chains: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Events waiting to be written, over all rooms.
    pub fn depth(&self) -> usize {
        self.inner.depth.load(Ordering::SeqCst)
    }

    /// Rooms being written now (by a loop or by a lone caller of
    /// [`write`](Self::write)): a room leaves once its last queued item is
    /// written, which is after that item's callers got their answer.
    pub fn rooms_writing(&self) -> usize {
        lock(&self.inner.rooms).len()
    }

    /// A new chain, for a writer whose items depend on its earlier ones.
    pub fn chain(&self) -> Chain {
        Chain(self.inner.next_chain.fetch_add(1, Ordering::SeqCst))
    }

    /// Why an item of `chain` failed, if one did: its later items will not be
    /// written, so a writer can stop producing them.
    pub fn chain_failure(&self, chain: Chain) -> Option<Arc<Error>> {
        lock(&self.inner.failed_chains).get(&chain.0).cloned()
    }

    /// Queues `events` (all of one room), independent of any other item, and
    /// returns the handle to wait on.
    pub fn enqueue(&self, room_id: &str, events: Vec<EventToPersist>) -> Handle {
        self.enqueue_item(room_id, events, None)
    }

    /// Queues `events` as the next item of `chain`: written only if every
    /// earlier item of the chain was.
    pub fn enqueue_chained(
        &self,
        room_id: &str,
        events: Vec<EventToPersist>,
        chain: Chain,
    ) -> Handle {
        self.enqueue_item(room_id, events, Some(chain.0))
    }

    /// Queues `events` (all of one room, independent of any other item) and
    /// waits for the outcome of the batch they went into, like
    /// `enqueue(..).wait()`. When no loop runs for the room, this thread writes
    /// the item itself and then starts a loop only if more items arrived.
    pub fn write(&self, room_id: &str, events: Vec<EventToPersist>) -> BatchOutcome {
        let (handle, start_loop) = self.push(room_id, events, None);
        if start_loop {
            let more = LogContext::new(loop_name(room_id)).scope(|| {
                if let Some(item) = next_item(&self.inner, room_id) {
                    write_item(&self.inner, room_id, item);
                }
                keep_loop(&self.inner, room_id)
            });
            if more {
                self.spawn_loop(room_id);
            }
        }
        handle.wait()
    }

    fn enqueue_item(
        &self,
        room_id: &str,
        events: Vec<EventToPersist>,
        chain: Option<u64>,
    ) -> Handle {
        let (handle, start_loop) = self.push(room_id, events, chain);
        if start_loop {
            self.spawn_loop(room_id);
        }
        handle
    }

    /// Adds the events to the room's queue; whether no loop ran for the room
    /// (the caller must see that one does).
    fn push(
        &self,
        room_id: &str,
        events: Vec<EventToPersist>,
        chain: Option<u64>,
    ) -> (Handle, bool) {
        let (tx, rx) = bounded(1);
        let n = events.len();
        let start_loop = {
            let mut rooms = self.inner.rooms.lock().unwrap_or_else(|p| p.into_inner());
            let start_loop = !rooms.contains_key(room_id);
            let queue = rooms.entry(room_id.to_owned()).or_default();
            match queue.back_mut() {
                Some(last)
                    if last.chain == chain && last.events.len() + n <= self.inner.max_batch =>
                {
                    last.events.extend(events);
                    last.waiters.push(tx);
                }
                _ => queue.push_back(Item {
                    events,
                    waiters: vec![tx],
                    chain,
                }),
            }
            start_loop
        };
        self.inner.depth.fetch_add(n, Ordering::SeqCst);
        publish_depth(&self.inner);
        (Handle { rx }, start_loop)
    }

    /// Starts the room's loop on a thread of its own.
    fn spawn_loop(&self, room_id: &str) {
        let inner = self.inner.clone();
        let running = self.last.0.clone();
        let room = room_id.to_owned();
        log_context::spawn(loop_name(room_id), move || {
            // Locals drop in reverse order, on unwinding too: `inner` first.
            let _running = running;
            let inner = inner;
            while let Some(item) = next_item(&inner, &room) {
                write_item(&inner, &room, item);
            }
        });
    }
}

/// Shows the queue's depth in the metrics (`hs_persistence_queue_depth`).
fn publish_depth(inner: &Inner) {
    metrics::global().set_gauge(
        "hs_persistence_queue_depth",
        "Events waiting in the persistence queue",
        inner.depth.load(Ordering::SeqCst) as f64,
    );
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn loop_name(room_id: &str) -> String {
    format!("persistence loop {room_id}")
}

/// The room's next item; none once its queue is empty, and then the room's
/// loop has ended (under the same lock as `push`: a later caller starts a new
/// one).
fn next_item(inner: &Inner, room_id: &str) -> Option<Item> {
    let mut rooms = lock(&inner.rooms);
    let next = rooms.get_mut(room_id).and_then(VecDeque::pop_front);
    if next.is_none() {
        rooms.remove(room_id);
    }
    next
}

/// Whether items wait in the room's queue; if none does, the room's loop
/// ends here (as in [`next_item`]).
fn keep_loop(inner: &Inner, room_id: &str) -> bool {
    let mut rooms = lock(&inner.rooms);
    let waiting = rooms.get(room_id).is_some_and(|q| !q.is_empty());
    if !waiting {
        rooms.remove(room_id);
    }
    waiting
}

/// Writes one item (unless its chain failed earlier) and hands every caller
/// of it the outcome.
fn write_item(inner: &Inner, room_id: &str, item: Item) {
    let Item {
        events,
        waiters,
        chain,
    } = item;
    let earlier_failure = chain.and_then(|c| lock(&inner.failed_chains).get(&c).cloned());
    let outcome: BatchOutcome = match earlier_failure {
        Some(e) => {
            (inner.discard)(&events);
            Err(Arc::new(Error::other(format!(
                "{} events in {room_id} not written: an earlier batch they follow failed ({e})",
                events.len()
            ))))
        }
        None => {
            match std::panic::catch_unwind(AssertUnwindSafe(|| (inner.persist)(room_id, &events))) {
                Ok(Ok(batch)) => {
                    metrics::global().record_persisted_batch(events.len());
                    Ok(Arc::new(batch))
                }
                Ok(Err(e)) => {
                    (inner.discard)(&events);
                    Err(Arc::new(e.context(format!(
                        "persisting {} events in {room_id}",
                        events.len()
                    ))))
                }
                Err(_) => {
                    (inner.discard)(&events);
                    Err(Arc::new(Error::other(format!(
                        "persisting {} events in {room_id}: the persister panicked",
                        events.len()
                    ))))
                }
            }
        }
    };
    if let (Some(c), Err(e)) = (chain, &outcome) {
        lock(&inner.failed_chains)
            .entry(c)
            .or_insert_with(|| e.clone());
    }
    inner.depth.fetch_sub(events.len(), Ordering::SeqCst);
    publish_depth(inner);
    let delivered = waiters
        .iter()
        .filter(|w| w.send(outcome.clone()).is_ok())
        .count();
    match &outcome {
        Ok(batch) => log::debug!(
            "persisted {} events in {room_id} (up to stream position {})",
            batch.positions.len(),
            batch.max_stream_ordering
        ),
        Err(e) if delivered == 0 => {
            log::error!("unhandled persistence failure, no caller was waiting: {e:?}")
        }
        Err(e) => log::debug!("persistence failure delivered to {delivered} callers: {e}"),
    }
}
