//! Replica ("slaved") stores for worker processes.
//!
//! A worker reads through the very same stores as the main process
//! ([`StateStore`], [`EventsStore`], built from the same parameters); this crate
//! adds no read query of its own. What it adds is keeping their caches right: the
//! main process writes, in the same transaction as each change, the cache
//! invalidations it implies and NOTIFYs the committed stream position; the
//! worker applies the invalidations up to that position and only then reports
//! it. It catches up from its last position at start and after a reconnect, is
//! woken by LISTEN/NOTIFY, and also polls, so a lost notification only delays it.
//! A write this process forwarded wakes it at once when the main process
//! answers ([`SlavedStore::forwarding`]): the notification of that commit is on
//! its way, and the thread need not look for it every millisecond. The writer
//! then waits until that position is applied ([`SlavedStore::wait_until_applied`])
//! before it answers, so that its client reads its write back from this worker.
//! When every position below the write's is applied already, the writer applies
//! the write's own from the main process's answer
//! ([`SlavedStore::apply_own_commit`]) and neither waits nor wakes the thread.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use storage_core::{log_context, metrics, Database, Error, Result, StoreConfig};
use storage_events::{
    report_stream_position, EventReads, EventsStore, Invalidations, Notification, ALL_CACHES,
    CURRENT_STATE_CACHE, EVENT_CACHE, REPLICATION_CHANNEL, STATE_GROUP_SHAPE_CACHE,
};
use storage_state::StateStore;

/// How often a worker catches up without being woken.
const POLL: Duration = Duration::from_millis(500);

/// How often a worker looks for notifications: while the last one of another
/// process's commit is younger than [`BUSY`], or one this process's own
/// forwarded write announced has not arrived yet; and otherwise (a forwarded
/// write wakes it early). An idle worker costs ~0.5% of a core.
const BUSY_NAP: Duration = Duration::from_millis(1);
const IDLE_NAP: Duration = Duration::from_millis(5);
const BUSY: Duration = Duration::from_secs(1);

/// How long to wait before connecting again after the connection failed.
const RECONNECT: Duration = Duration::from_secs(1);

/// How long without a successful catch-up before a worker's replication is
/// unhealthy: many times [`POLL`], so that one slow round does not count.
pub const STALE_AFTER: Duration = Duration::from_secs(10);

/// `application_name` of the listening connection.
pub const APPLICATION_NAME: &str = "hs-replication";

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A worker's stores and its replication position. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SlavedStore {
    events: EventsStore,
    position: Arc<AtomicI64>,
    /// When the last catch-up succeeded (ms since the epoch).
    caught_up_at: Arc<AtomicI64>,
    expected: Arc<Expected>,
}

/// The highest stream position that writes this process forwarded were
/// committed at, how many are still awaiting the main process's answer, the
/// wake-up of the replication thread when that position rises, and the
/// wake-up of the writers waiting for the applied position to rise.
#[derive(Debug, Default)]
struct Expected {
    forwards: Mutex<Forwards>,
    risen: Condvar,
    applied: Condvar,
}

#[derive(Debug, Default)]
struct Forwards {
    up_to: i64,
    in_flight: usize,
}

impl Expected {
    fn lock(&self) -> std::sync::MutexGuard<'_, Forwards> {
        self.forwards.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self) -> i64 {
        self.lock().up_to
    }

    fn forwarding(&self) -> Forwarding<'_> {
        self.lock().in_flight += 1;
        Forwarding { expected: self }
    }

    /// Whether a notification of a commit at `position` (`None`: one whose
    /// payload did not parse) is another process's. A forwarded write's own
    /// notification often arrives before the main process's answer does, so
    /// while one awaits its answer, none is counted as another's.
    fn is_another_process_commit(&self, position: Option<i64>) -> bool {
        let forwards = self.lock();
        forwards.in_flight == 0 && position.is_none_or(|p| p > forwards.up_to)
    }

    /// Wakes the writers waiting in [`SlavedStore::wait_until_applied`]; the
    /// applied position is stored before, so a writer that looked at it under
    /// the lock before it rose is waiting already and is woken.
    fn announce_applied(&self) {
        let _forwards = self.lock();
        self.applied.notify_all();
    }

    /// Waits `nap`, or less once the position rises above `seen`.
    fn wait(&self, seen: i64, nap: Duration) {
        let forwards = self.lock();
        if forwards.up_to <= seen {
            drop(
                self.risen
                    .wait_timeout_while(forwards, nap, |f| f.up_to <= seen)
                    .unwrap_or_else(|p| p.into_inner()),
            );
        }
    }
}

/// A write this process is forwarding to the main process
/// ([`SlavedStore::forwarding`]), until it is answered or given up.
#[derive(Debug)]
pub struct Forwarding<'a> {
    expected: &'a Expected,
}

impl Forwarding<'_> {
    /// The main process committed the write at stream position `position`:
    /// the following thread ([`SlavedStore::follow`]) looks for its
    /// notification now, instead of after its nap.
    pub fn committed_at(self, position: i64) {
        let mut forwards = self.expected.lock();
        if position > forwards.up_to {
            forwards.up_to = position;
            self.expected.risen.notify_all();
        }
    }

    /// The main process committed the write at stream position `position`,
    /// and the writer applied it itself ([`SlavedStore::apply_own_commit`]):
    /// its notification, when it comes, is this process's own, and the
    /// following thread has nothing to look for now.
    pub fn applied_here(self, position: i64) {
        let mut forwards = self.expected.lock();
        forwards.up_to = forwards.up_to.max(position);
    }
}

impl Drop for Forwarding<'_> {
    fn drop(&mut self) {
        self.expected.lock().in_flight -= 1;
    }
}

impl SlavedStore {
    /// Built from the same parameters as the main process's stores. Refuses an
    /// engine that cannot be shared between processes.
    pub fn new(db: Database, config: &StoreConfig) -> Result<Self> {
        if !db.engine().supports_multiple_processes() {
            return Err(Error::invalid_argument(format!(
                "a replica worker needs PostgreSQL: {} ({}) is written by a single process",
                db.url(),
                db.engine().name()
            )));
        }
        let events = EventsStore::new(db, config)?;
        let position = Arc::new(AtomicI64::new(events.max_stream_ordering()));
        Ok(SlavedStore {
            events,
            position,
            caught_up_at: Arc::new(AtomicI64::new(now_ms())),
            expected: Arc::default(),
        })
    }

    /// Says that a write is being forwarded to the main process; tell the
    /// returned guard the position it was committed at
    /// ([`Forwarding::committed_at`]). Meanwhile notifications are not taken
    /// for another process's commits (which make the following thread look
    /// every millisecond for a while): this write's own may come first.
    pub fn forwarding(&self) -> Forwarding<'_> {
        self.expected.forwarding()
    }

    pub fn state(&self) -> &StateStore {
        self.events.state()
    }

    pub fn events(&self) -> &EventsStore {
        &self.events
    }

    /// The highest stream position seen committed and applied to the caches.
    pub fn position(&self) -> i64 {
        self.position.load(Ordering::SeqCst)
    }

    /// Waits until the position `position` is applied, for at most `limit`;
    /// whether it was. A write forwarded from here answers only then, so that
    /// its client's next read here sees it, as a Synapse worker waits for the
    /// stream position of the events it sent to the main process.
    pub fn wait_until_applied(&self, position: i64, limit: Duration) -> bool {
        let forwards = self.expected.lock();
        let (_forwards, timeout) = self
            .expected
            .applied
            .wait_timeout_while(forwards, limit, |_| self.position() < position)
            .unwrap_or_else(|p| p.into_inner());
        !timeout.timed_out()
    }

    /// Applies the commit of a write this process forwarded, from the main
    /// process's answer: the stream positions it took, `first` up to that of
    /// `notification` (its NOTIFY's payload). Only when every position below
    /// `first` is applied already (positions follow commit order, so nothing
    /// else can come between) and the notification carries its invalidations;
    /// whether it did. Otherwise the following thread applies it in order
    /// ([`Self::wait_until_applied`]).
    pub fn apply_own_commit(&self, first: i64, notification: &str) -> bool {
        let Some(n) = Notification::parse(notification) else {
            return false;
        };
        if n.invalidations == Invalidations::Read
            || n.position < first
            || self.position() < first - 1
        {
            return false;
        }
        if let Invalidations::CurrentState(room) = &n.invalidations {
            self.state().invalidate_current_state(room);
        }
        self.applied_up_to(n.position);
        true
    }

    /// Takes `position` as applied (the caches are right up to it) if it is
    /// higher than the one taken so far.
    fn applied_up_to(&self, position: i64) {
        let previous = self.position.fetch_max(position, Ordering::SeqCst);
        report_stream_position(previous.max(position));
        self.expected.announce_applied();
    }

    /// Applies everything committed since the current position; returns the new one.
    pub fn catch_up(&self) -> Result<i64> {
        let from = self.position();
        let batch = self.events.replication_since(from)?;
        for (position, cache, key) in &batch.invalidations {
            match cache.as_str() {
                CURRENT_STATE_CACHE => self.state().invalidate_current_state(key),
                EVENT_CACHE => self.events.forget_cached_event(key),
                STATE_GROUP_SHAPE_CACHE => {
                    let groups: Vec<i64> = key.split(' ').filter_map(|g| g.parse().ok()).collect();
                    self.state().forget_state_group_shapes(&groups);
                }
                ALL_CACHES => {
                    log::warn!(
                        "this worker was at position {from}, behind the invalidations the main \
                         process pruned up to {position}: dropping every current-state cache"
                    );
                    self.state().invalidate_all_current_state();
                    self.state().forget_all_state_group_shapes();
                }
                other => log::debug!("no cache {other} here; invalidation of {key} ignored"),
            }
        }
        if batch.position > from {
            self.applied_up_to(batch.position);
        }
        self.caught_up_at.store(now_ms(), Ordering::SeqCst);
        Ok(self.position())
    }

    /// Applies the notifications drained from the listening connection, all
    /// those committed since this store's position (none missed: the
    /// connection listened throughout), and returns the new position. When
    /// each has no invalidations (a batch of messages) or carries them (a
    /// room's current state), they are applied and the highest position is
    /// taken, with nothing read; otherwise, or for a payload that does not
    /// parse, [`Self::catch_up`] reads what is new.
    pub fn apply_notifications(&self, payloads: &[String]) -> Result<i64> {
        let notifications: Option<Vec<Notification>> =
            payloads.iter().map(|p| Notification::parse(p)).collect();
        let Some(notifications) = notifications else {
            return self.catch_up();
        };
        if notifications
            .iter()
            .any(|n| n.invalidations == Invalidations::Read)
        {
            return self.catch_up();
        }
        // Those at or below the position are applied already (a forwarded
        // write's, by its writer: `apply_own_commit`).
        let applied = self.position();
        for n in notifications.iter().filter(|n| n.position > applied) {
            if let Invalidations::CurrentState(room) = &n.invalidations {
                self.state().invalidate_current_state(room);
            }
        }
        if let Some(highest) = notifications.iter().map(|n| n.position).max() {
            self.applied_up_to(highest);
        }
        self.caught_up_at.store(now_ms(), Ordering::SeqCst);
        Ok(self.position())
    }

    /// Whether this worker follows the stream: `Err` saying since when it has
    /// not caught up, once that is longer than [`STALE_AFTER`] (its database
    /// connection is lost, or the database is down).
    pub fn replication_health(&self) -> std::result::Result<(), String> {
        let age_ms = now_ms() - self.caught_up_at.load(Ordering::SeqCst);
        if age_ms > STALE_AFTER.as_millis() as i64 {
            return Err(format!(
                "not caught up with the replication stream for {:.1} s (position {})",
                age_ms as f64 / 1000.0,
                self.position()
            ));
        }
        Ok(())
    }

    /// Follows the replication stream on a thread of its own (log context
    /// "replication"), listening for notifications on a connection of its own,
    /// until the returned [`Follower`] is dropped.
    pub fn follow(&self) -> Follower {
        let store = self.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = log_context::spawn("replication", move || {
            while !stopped.load(Ordering::SeqCst) {
                if let Err(e) = store.follow_once(&stopped) {
                    log::warn!("replication connection lost, reconnecting: {e}");
                    std::thread::sleep(RECONNECT);
                }
            }
        });
        Follower {
            stop,
            thread: Some(thread),
        }
    }

    /// One connection's life: LISTEN, catch up, then catch up whenever woken or
    /// every [`POLL`]. Returns when the connection fails.
    fn follow_once(&self, stop: &AtomicBool) -> Result<()> {
        // Named, so that the connection can be told apart in pg_stat_activity.
        let mut listener = self
            .events
            .database()
            .engine()
            .listen(REPLICATION_CHANNEL, APPLICATION_NAME)?;
        self.catch_up()?;
        let mut last = Instant::now();
        let mut last_woken = Instant::now() - BUSY;
        while !stop.load(Ordering::SeqCst) {
            let expected = self.expected.get();
            let payloads = listener.drain()?;
            let woken = !payloads.is_empty();
            let announced: Option<(i64, i64)> = payloads
                .iter()
                .filter_map(|p| Notification::parse(p))
                .map(|n| (n.position, n.committed_ms))
                .max();
            if woken {
                // Only another process's commits keep it looking often: this
                // process's own forwarded writes wake it themselves.
                if self
                    .expected
                    .is_another_process_commit(announced.map(|(pos, _)| pos))
                {
                    last_woken = Instant::now();
                }
                let applied = self.apply_notifications(&payloads)?;
                if let Some((pos, ts)) = announced.filter(|(pos, _)| *pos <= applied) {
                    let lag = (now_ms() - ts).max(0) as f64 / 1000.0;
                    metrics::global().set_gauge(
                        "hs_replication_lag_seconds",
                        "From the main process committing a position to this process applying it",
                        lag,
                    );
                    log::trace!("applied position {pos}, {lag:.3} s after its commit");
                }
            } else if last.elapsed() >= POLL {
                // A query on the listening connection, so that a dead one is noticed.
                listener.ping()?;
                self.catch_up()?;
                last = Instant::now();
            } else {
                // Listener::drain never blocks (diesel does not expose the
                // socket to wait on): look often while another process's
                // commits are arriving or a forwarded write's notification
                // is due, less often otherwise; a forwarded write's answer
                // wakes it early.
                let due = expected > self.position();
                let nap = if due || last_woken.elapsed() < BUSY {
                    BUSY_NAP
                } else {
                    IDLE_NAP
                };
                self.expected.wait(expected, nap);
            }
        }
        Ok(())
    }
}

/// The thread following the replication stream; stops it and waits for it when
/// dropped.
#[derive(Debug)]
pub struct Follower {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_forwarded_commits_are_not_taken_for_another_process() {
        let expected = Expected::default();
        // Nothing forwarded: any notification is another process's.
        assert!(expected.is_another_process_commit(Some(5)));
        assert!(expected.is_another_process_commit(None));
        // A forward awaiting its answer: its commit's notification may come
        // first, whatever position it names.
        let forwarding = expected.forwarding();
        assert!(!expected.is_another_process_commit(Some(7)));
        assert!(!expected.is_another_process_commit(None));
        forwarding.committed_at(7);
        assert_eq!(expected.get(), 7);
        // Answered: up to its position the commits were this process's own.
        assert!(!expected.is_another_process_commit(Some(7)));
        assert!(expected.is_another_process_commit(Some(8)));
        // Given up without an answer: no longer awaited, position unchanged.
        drop(expected.forwarding());
        assert!(expected.is_another_process_commit(Some(8)));
        assert_eq!(expected.get(), 7);
    }
}
