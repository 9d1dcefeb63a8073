//! The replication stream: what the main process announces in each batch
//! transaction (a `cache_invalidations` row per changed room at the batch's
//! highest position, and a NOTIFY), what workers read to catch up, and the
//! pruning of old invalidations.

use crate::schema::{cache_invalidations, events};
use crate::store::EventsStore;
use diesel::prelude::*;
use storage_core::{with_conn, Database, Result, ResultExt, Transaction};

/// The channel on which the main process announces committed stream positions.
pub const REPLICATION_CHANNEL: &str = "hs_replication";

/// The cache name under which current-state invalidations travel.
pub const CURRENT_STATE_CACHE: &str = "current_state_ids";

/// The cache name under which an event stored as an outlier and an outlier
/// no longer travels (Synapse's `ex_outlier_stream`); the key is its id.
pub const EVENT_CACHE: &str = "event";

/// The cache name under which state groups rewritten by compression travel
/// (their prev groups and deltas changed, never their states); the key is the
/// group ids, separated by spaces.
pub const STATE_GROUP_SHAPE_CACHE: &str = "state_group_shape";

/// The cache name of the row that stands for pruned invalidations: every
/// position up to it may have invalidated anything, so a replica that had not
/// reached it must drop all its mutable caches.
pub const ALL_CACHES: &str = "*";

/// A notification on [`REPLICATION_CHANNEL`]: `"<position> <ms since the
/// epoch> <what was invalidated>"`, the committed position, when it was
/// committed (workers measure their lag from it), and the transaction's cache
/// invalidations (see [`Invalidations`]). A worker that followed every
/// notification since its position applies one that carries its invalidations
/// (or has none) without reading anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub position: i64,
    pub committed_ms: i64,
    pub invalidations: Invalidations,
}

/// What a notification says of the cache invalidations written at its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidations {
    /// None (a batch of messages): `0`.
    None,
    /// The current state of this one room, the only invalidation a batch of
    /// events writes: `c <room id>`. Carried so that every worker need not
    /// read it back for every state event; the `cache_invalidations` row is
    /// written all the same, for a worker that catches up.
    CurrentState(String),
    /// Some, to be read from `cache_invalidations`: `1`, and what a payload
    /// says that this process does not know.
    Read,
}

/// A batch's commit as the replication stream tells it: the stream positions
/// it took, `first` up to its notification's, all of them this one commit's
/// (they are taken under a lock held to COMMIT), and that notification. A
/// worker that forwarded the batch's request, and has applied every position
/// below `first`, applies it from the main process's answer
/// (`SlavedStore::apply_own_commit`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announced {
    pub first: i64,
    pub notification: Notification,
}

/// PostgreSQL refuses a NOTIFY payload of 8,000 bytes or more; a room id
/// longer than this (the spec allows 255) travels as [`Invalidations::Read`].
const MAX_CARRIED_ROOM_ID: usize = 1_000;

impl Notification {
    pub fn new(position: i64, invalidations: Invalidations) -> Self {
        let invalidations = match invalidations {
            Invalidations::CurrentState(room) if room.len() > MAX_CARRIED_ROOM_ID => {
                Invalidations::Read
            }
            other => other,
        };
        Notification {
            position,
            committed_ms: now_ms(),
            invalidations,
        }
    }

    pub fn payload(&self) -> String {
        format!("{}{}", self.position, self.payload_after_position())
    }

    /// What follows the position in [`Self::payload`]: for a statement that
    /// takes the position itself and puts it in front.
    pub fn payload_after_position(&self) -> String {
        let ms = self.committed_ms;
        match &self.invalidations {
            Invalidations::None => format!(" {ms} 0"),
            Invalidations::CurrentState(room) => format!(" {ms} c {room}"),
            Invalidations::Read => format!(" {ms} 1"),
        }
    }

    /// `None` for a payload that is not a notification.
    pub fn parse(payload: &str) -> Option<Notification> {
        // A room id is the rest of the payload, whatever it holds.
        let mut parts = payload.splitn(4, ' ');
        let position = parts.next()?.parse().ok()?;
        let committed_ms = parts.next()?.parse().ok()?;
        let invalidations = match (parts.next(), parts.next()) {
            (Some("0"), None) => Invalidations::None,
            (Some("c"), Some(room)) if !room.is_empty() => {
                Invalidations::CurrentState(room.to_owned())
            }
            _ => Invalidations::Read,
        };
        Some(Notification {
            position,
            committed_ms,
            invalidations,
        })
    }
}

/// Publishes the highest event stream position this process has applied (the
/// main process: committed; a worker: replicated) as the
/// `hs_replication_position` gauge, one name on every process so that a
/// dashboard can compare them.
pub fn report_stream_position(position: i64) {
    storage_core::metrics::global().set_gauge(
        "hs_replication_position",
        "Highest event stream position committed (main process) or applied (worker) here",
        position as f64,
    );
}

/// What replica workers must apply, from one position to the next.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicationBatch {
    /// `(position, cache, key)`, in position order.
    pub invalidations: Vec<(i64, String, String)>,
    /// The highest committed position.
    pub position: i64,
}

impl EventsStore {
    /// What happened after position `after`: the invalidations to apply and the
    /// committed position they lead to.
    pub fn replication_since(&self, after: i64) -> Result<ReplicationBatch> {
        self.db.run_read("replication_since", |txn| {
            let position = max_stream_ordering_txn(txn)?
                .max(max_invalidation_txn(txn)?)
                .max(after);
            let invalidations: Vec<(i64, String, String)> =
                with_conn!(txn.conn(), |c| cache_invalidations::table
                    .select((
                        cache_invalidations::stream_ordering,
                        cache_invalidations::cache_name,
                        cache_invalidations::cache_key,
                    ))
                    .filter(cache_invalidations::stream_ordering.gt(after))
                    .filter(cache_invalidations::stream_ordering.le(position))
                    .order(cache_invalidations::stream_ordering)
                    .load(c))?;
            Ok(ReplicationBatch {
                invalidations,
                position,
            })
        })
    }

    /// Puts the rewrite of `groups` (compression) on the replication stream
    /// inside the rewriting transaction, at a stream position of its own, so
    /// that workers forget what they cached of how those groups are stored.
    /// Nothing where one process is all there is (SQLite).
    pub fn record_state_group_rewrite_txn(
        &self,
        txn: &mut Transaction<'_>,
        groups: &[i64],
    ) -> Result<()> {
        if groups.is_empty() || !txn.engine().supports_multiple_processes() {
            return Ok(());
        }
        // Last, as a batch of events takes its positions: the lock is held
        // from here to COMMIT.
        let position = txn.stream_positions(&crate::store::EVENTS_STREAM_SEQUENCE, 1)?[0];
        let key = groups
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(" ");
        with_conn!(txn.conn(), |c| diesel::insert_into(
            cache_invalidations::table
        )
        .values((
            cache_invalidations::stream_ordering.eq(position),
            cache_invalidations::cache_name.eq(STATE_GROUP_SHAPE_CACHE),
            cache_invalidations::cache_key.eq(&key),
        ))
        .execute(c))?;
        txn.notify(
            REPLICATION_CHANNEL,
            &Notification::new(position, Invalidations::Read).payload(),
        )?;
        let reported = self.position.clone();
        txn.call_after(move || {
            let previous = reported.fetch_max(position, std::sync::atomic::Ordering::SeqCst);
            report_stream_position(previous.max(position));
        });
        Ok(())
    }

    /// Deletes the cache invalidations more than `keep` positions behind the
    /// newest, leaving in their place one [`ALL_CACHES`] row at the highest
    /// position deleted, so that a replica still behind it drops all its
    /// mutable caches instead of missing what was deleted. Does nothing when
    /// only such a row is old enough. Returns how many invalidations went.
    pub fn prune_cache_invalidations(&self, keep: i64) -> Result<usize> {
        self.db
            .run_interaction("prune_cache_invalidations", |txn| {
                let horizon = max_stream_ordering_txn(txn)? - keep.max(0);
                let old = cache_invalidations::table
                    .filter(cache_invalidations::stream_ordering.le(horizon));
                let pruned: Vec<i64> = with_conn!(txn.conn(), |c| old
                    .select(cache_invalidations::stream_ordering)
                    .filter(cache_invalidations::cache_name.ne(ALL_CACHES))
                    .load(c))?;
                let Some(&upto) = pruned.iter().max() else {
                    return Ok(0);
                };
                with_conn!(txn.conn(), |c| diesel::delete(old).execute(c))?;
                with_conn!(txn.conn(), |c| diesel::insert_into(
                    cache_invalidations::table
                )
                .values((
                    cache_invalidations::stream_ordering.eq(upto),
                    cache_invalidations::cache_name.eq(ALL_CACHES),
                    cache_invalidations::cache_key.eq(""),
                ))
                .execute(c))?;
                Ok(pruned.len())
            })
            .with_context(|| format!("pruning cache invalidations, keeping {keep} positions"))
    }
}

pub(crate) fn read_max_stream_ordering(db: &Database) -> Result<i64> {
    db.run_read("max_stream_ordering", max_stream_ordering_txn)
}

/// The highest committed stream position as `txn` sees it (0 for no events).
pub(crate) fn max_stream_ordering_txn(txn: &mut Transaction<'_>) -> Result<i64> {
    let max: Option<i64> = with_conn!(txn.conn(), |c| events::table
        .select(diesel::dsl::max(events::stream_ordering))
        .first(c))?;
    Ok(max.unwrap_or(0))
}

/// The highest position of a cache invalidation as `txn` sees it: above every
/// event's when a compression's rewrite took a position of its own.
fn max_invalidation_txn(txn: &mut Transaction<'_>) -> Result<i64> {
    let max: Option<i64> = with_conn!(txn.conn(), |c| cache_invalidations::table
        .select(diesel::dsl::max(cache_invalidations::stream_ordering))
        .first(c))?;
    Ok(max.unwrap_or(0))
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::{Invalidations, Notification, MAX_CARRIED_ROOM_ID};

    #[test]
    fn payloads_read_back_as_written() {
        for invalidations in [
            Invalidations::None,
            Invalidations::Read,
            Invalidations::CurrentState("!a:example.org".to_owned()),
            // Whatever a room id holds after its prefix travels whole.
            Invalidations::CurrentState("!with space c 1:example.org".to_owned()),
        ] {
            let n = Notification::new(42, invalidations);
            assert_eq!(Notification::parse(&n.payload()), Some(n));
        }
    }

    #[test]
    fn what_cannot_be_carried_is_read() {
        let long = format!("!{}:example.org", "x".repeat(MAX_CARRIED_ROOM_ID));
        let n = Notification::new(7, Invalidations::CurrentState(long));
        assert_eq!(n.invalidations, Invalidations::Read);
        assert!(n.payload().len() < 8_000);
        // An older main process's payload, or one this process does not know.
        for payload in [
            "7 1700000000000",
            "7 1700000000000 1",
            "7 1700000000000 c",
            "7 1700000000000 x y",
        ] {
            let n = Notification::parse(payload).unwrap();
            assert_eq!(
                (n.position, n.invalidations),
                (7, Invalidations::Read),
                "{payload}"
            );
        }
        assert_eq!(
            Notification::parse("7 1700000000000 0")
                .unwrap()
                .invalidations,
            Invalidations::None
        );
        assert_eq!(Notification::parse("garbage"), None);
    }
}
