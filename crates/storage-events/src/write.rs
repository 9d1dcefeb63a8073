//! The batch write: one room's events, their JSON, edges, auth edges,
//! rejections, new state groups and event-to-group rows, the new forward
//! extremities and the change of current state, in one transaction.

use crate::read::{load_existing, StoredEvent};
use crate::replication::{
    now_ms, read_max_stream_ordering, report_stream_position, Announced, Invalidations,
    Notification, CURRENT_STATE_CACHE, EVENT_CACHE, REPLICATION_CHANNEL,
};
use crate::schema::{events, rooms};
use crate::store::{EventsStore, EVENTS_STREAM_SEQUENCE};
use crate::types::{EventToPersist, Existing, PersistedBatch, RoomBatch, WriteAs};
use diesel::prelude::*;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use storage_core::{with_conn, Column, Result, RowsWrite, TableRows, Transaction, TxnOptions};
use storage_state::{PendingGroupRows, PreparedStateGroup, StateGroup, StateStore};

impl EventsStore {
    /// Writes one room's batch in one transaction; see [`persist_batch_txn`](Self::persist_batch_txn).
    /// When it fails, the batch's prepared state groups are dropped: they will
    /// never be written.
    pub fn persist_batch(&self, batch: &RoomBatch) -> Result<PersistedBatch> {
        Ok(self.write_batch(batch, Stored::ToRead)?.written())
    }

    /// Like [`persist_batch`](Self::persist_batch), for a batch whose
    /// extremities were worked out assuming that none of its events is stored
    /// yet, and so that no stored event names one of them as a prev event
    /// (a stored event's prev events are all stored: the invariants). Writes
    /// nothing and answers which are stored when some are after all; the
    /// caller works the extremities out again knowing which stored events
    /// name them (its prepared groups are kept for that) and writes it with
    /// [`persist_batch_knowing`](Self::persist_batch_knowing).
    pub fn persist_batch_of_new_events(&self, batch: &RoomBatch) -> Result<NewEventsWrite> {
        self.write_batch(batch, Stored::AssumedNone)
    }

    /// [`persist_batch`](Self::persist_batch) of a batch whose caller, the
    /// room's writer, read which of its events are stored (`stored`: from
    /// [`stored_events`](Self::stored_events), or
    /// [`NewEventsWrite::SomeStored`]): the transaction does not read it
    /// again, and on PostgreSQL it is then the batch's one statement.
    pub fn persist_batch_knowing(
        &self,
        batch: &RoomBatch,
        stored: &HashMap<String, Existing>,
    ) -> Result<PersistedBatch> {
        Ok(self.write_batch(batch, Stored::Known(stored))?.written())
    }

    fn write_batch(&self, batch: &RoomBatch, stored: Stored<'_>) -> Result<NewEventsWrite> {
        // On PostgreSQL a batch that reads nothing first is its one
        // statement, committed on its own: no BEGIN, no COMMIT.
        let result = self
            .db
            .run_interaction_with("persist_events", TxnOptions::batch(), |txn| {
                self.write_batch_txn(txn, batch, stored)
            });
        if let Err(e) = &result {
            if let Some(found) = self.stored_after_all(e, batch, stored)? {
                // Nothing was written; the caller works the batch out again
                // with its prepared groups.
                return Ok(NewEventsWrite::SomeStored(found));
            }
        }
        if result.is_err() {
            self.state
                .forget_prepared_groups(batch.events.iter().flat_map(|e| &e.new_state_groups));
            // The commit may have happened all the same (a connection lost
            // while it was answered): what is remembered of the room is read
            // afresh, and so is the highest committed position, which would
            // otherwise stay behind the batch's until the next write. Every
            // position below it is committed or never will be: positions are
            // taken under a lock held to COMMIT.
            self.caches.extremities.invalidate(&batch.room_id);
            self.state.invalidate_current_state(&batch.room_id);
            match read_max_stream_ordering(&self.db) {
                Ok(max) => {
                    report_stream_position(self.position.fetch_max(max, Ordering::SeqCst).max(max))
                }
                Err(e) => log::warn!(
                    "after the failed write of a batch of room {}, the highest committed \
                     stream position could not be read either: {e}",
                    batch.room_id
                ),
            }
        }
        result.map(NewEventsWrite::Written)
    }

    /// Writes a batch: the state groups prepared for its events, events, their
    /// JSON, edges, auth edges, rejections, the state group after each non-outlier, the new forward
    /// extremities and the change of current state. Events already stored are skipped. Stream
    /// positions are taken last, under the stream positions lock held to
    /// COMMIT ([`Transaction::stream_positions`]), so that they increase in
    /// commit order while batches of other rooms do the rest meanwhile.
    pub fn persist_batch_txn(
        &self,
        txn: &mut Transaction<'_>,
        batch: &RoomBatch,
    ) -> Result<PersistedBatch> {
        self.write_batch_txn(txn, batch, Stored::ToRead)
    }

    fn write_batch_txn(
        &self,
        txn: &mut Transaction<'_>,
        batch: &RoomBatch,
        stored: Stored<'_>,
    ) -> Result<PersistedBatch> {
        // A batch assumed new reads nothing: should one of its events be
        // stored after all, inserting it again breaks the uniqueness of
        // event ids and the transaction fails (see `stored_after_all`).
        // Otherwise which are stored is read (or was, by the caller), with
        // no lock held: only this process writes events, one batch of a
        // room at a time, and an event is of one room.
        let stored = match stored {
            Stored::AssumedNone => Cow::Owned(HashMap::new()),
            Stored::Known(stored) => Cow::Borrowed(stored),
            Stored::ToRead => {
                let ids: Vec<&str> = batch.events.iter().map(|e| e.event_id.as_str()).collect();
                Cow::Owned(load_existing(txn, &ids)?)
            }
        };
        let sorted = Sorted::of(batch, &stored);
        // The groups the written events need; a group prepared for an event
        // that is not written (stored already) is dropped once this
        // commits, not written with no event naming it.
        let (groups, unneeded) = sorted.groups_needed(batch);
        if !unneeded.is_empty() {
            let state = self.state.clone();
            txn.call_after(move || state.forget_prepared_groups(&unneeded));
        }
        // Their rows go in the events' statement.
        self.state
            .store_prepared_groups_then(txn, &groups, |txn, group_rows| {
                self.write_events_txn(txn, batch, &sorted, group_rows)
            })
    }

    /// The batch's events as `sorted`, and what goes with them.
    fn write_events_txn(
        &self,
        txn: &mut Transaction<'_>,
        batch: &RoomBatch,
        sorted: &Sorted<'_>,
        group_rows: &mut PendingGroupRows<'_>,
    ) -> Result<PersistedBatch> {
        let Sorted {
            new,
            placed,
            skipped,
            stored_max,
        } = sorted;
        if new.is_empty() && placed.is_empty() {
            // The answer covers the events found stored: one may have been
            // committed by an attempt whose answer was lost (its connection
            // cut after the commit), which moved no position here.
            self.advance_position_after_commit(txn, *stored_max);
            return Ok(PersistedBatch {
                positions: HashMap::new(),
                skipped: skipped.clone(),
                max_stream_ordering: self.position.load(Ordering::SeqCst).max(*stored_max),
                announced: None,
            });
        }
        insert_rooms(txn, new)?;
        if !placed.is_empty() {
            // Outliers no longer (a statement of this path alone).
            let ids: Vec<&str> = placed.iter().map(|(e, _)| e.event_id.as_str()).collect();
            with_conn!(txn.conn(), |c| diesel::update(
                events::table.filter(events::event_id.eq_any(&ids))
            )
            .set(events::outlier.eq(false))
            .execute(c))?;
        }
        let written: Vec<&EventToPersist> = new
            .iter()
            .copied()
            .chain(placed.iter().map(|(e, _)| *e))
            .collect();
        let mappings: Vec<(&str, i64)> = written
            .iter()
            .filter(|e| !e.outlier)
            .filter_map(|e| e.state_group.map(|g| (e.event_id.as_str(), g)))
            .collect();
        // Events that were outliers take a position each where other
        // processes follow the stream (as Synapse's `ex_outlier_stream`
        // does), at which workers are told to forget what they cached of
        // them. A process alone (SQLite) has no one to tell: a position of
        // a cache invalidation alone would be handed out again after a
        // restart, its counter seeded from the events.
        let placed_events: Vec<&EventToPersist> = placed.iter().map(|(e, _)| *e).collect();
        let announced = if txn.engine().supports_multiple_processes() {
            placed_events.len()
        } else {
            0
        };
        let taking = new.len() + announced;
        // Workers apply the position and the room's current-state
        // invalidation it carries, and measure their lag from the time. Its
        // position is the batch's highest, taken last. Events that were
        // outliers are told as rows to read.
        let invalidated = !batch.current_state.is_empty();
        let notification = Notification::new(
            0,
            if announced > 0 {
                Invalidations::Read
            } else if invalidated {
                Invalidations::CurrentState(batch.room_id.clone())
            } else {
                Invalidations::None
            },
        );
        // The room's extremities become the new ones, with the events (in
        // one statement on PostgreSQL): the old ones no longer among them
        // deleted, the new ones not among the old inserted.
        let (gone, added) = extremity_change(batch);
        let mut with_events = group_rows.columns();
        with_events.push(StateStore::event_state_group_rows(&mappings));
        with_events.extend(extremity_rows(&batch.room_id, &gone, &added));
        if invalidated {
            if taking > 0 {
                with_events.push(invalidation_rows(&batch.room_id));
            }
            with_events.extend(StateStore::current_state_rows(
                &batch.room_id,
                &batch.current_state.removed,
                &batch.current_state.added,
            ));
        }
        if announced > 0 {
            with_events.push(no_longer_outlier_rows(&placed_events));
        }
        let positions = insert_events(
            txn,
            new,
            &placed_events,
            taking,
            &self.instance_name,
            with_events,
            &notification.payload_after_position(),
        )?;
        // The NOTIFY names the highest position taken.
        let told = positions.iter().min().map(|first| Announced {
            first: *first,
            notification: Notification {
                position: positions.iter().copied().max().unwrap_or(*first),
                ..notification
            },
        });
        // Without a position of their own, events that were outliers are
        // answered with their rows'.
        let positions: Vec<i64> = positions
            .iter()
            .copied()
            .chain(placed.iter().skip(announced).map(|(_, p)| *p))
            .collect();
        let max = positions
            .iter()
            .copied()
            .max()
            .expect("at least one event written");
        group_rows.written();
        self.state
            .cache_event_state_groups_after_commit(txn, &mappings);
        if invalidated {
            let current = &batch.current_state;
            self.state.current_state_written_txn(
                txn,
                &batch.room_id,
                &current.removed,
                &current.added,
            );
        }
        self.advance_position_after_commit(txn, max);
        self.remember_after_commit(txn, batch, sorted, &positions);
        Ok(PersistedBatch {
            positions: written
                .iter()
                .zip(&positions)
                .map(|(e, p)| (e.event_id.clone(), *p))
                .collect(),
            skipped: skipped.clone(),
            max_stream_ordering: max,
            announced: told,
        })
    }
}

/// What a batch's transaction knows of which of its events are stored.
#[derive(Clone, Copy)]
enum Stored<'a> {
    /// None, assumed: the uniqueness of event ids checks it.
    AssumedNone,
    /// Read by the transaction.
    ToRead,
    /// Read by the caller, the room's writer, before.
    Known(&'a HashMap<String, Existing>),
}

/// What a write of a batch assumed new did.
#[derive(Debug)]
pub enum NewEventsWrite {
    Written(PersistedBatch),
    /// Nothing: these of its events are stored after all.
    SomeStored(HashMap<String, Existing>),
}

impl NewEventsWrite {
    fn written(self) -> PersistedBatch {
        match self {
            NewEventsWrite::Written(written) => written,
            NewEventsWrite::SomeStored(_) => {
                unreachable!("only a batch assumed new finds events stored after all")
            }
        }
    }
}

/// A batch's events by what its write does with them
/// ([`EventToPersist::write_as`]), each event once.
struct Sorted<'b> {
    new: Vec<&'b EventToPersist>,
    /// Outliers no longer, with their rows' stream positions.
    placed: Vec<(&'b EventToPersist, i64)>,
    skipped: Vec<String>,
    /// The highest stream position of the events found stored.
    stored_max: i64,
}

impl<'b> Sorted<'b> {
    fn of(batch: &'b RoomBatch, stored: &HashMap<String, Existing>) -> Self {
        let mut seen = HashSet::new();
        let mut sorted = Sorted {
            new: Vec::new(),
            placed: Vec::new(),
            skipped: Vec::new(),
            stored_max: stored
                .values()
                .map(|s| s.stream_ordering)
                .max()
                .unwrap_or(0),
        };
        for e in &batch.events {
            let found = stored.get(&e.event_id);
            match e.write_as(found) {
                // A second copy in the batch is written once.
                _ if !seen.insert(e.event_id.as_str()) => {}
                WriteAs::New => sorted.new.push(e),
                WriteAs::NoLongerOutlier => sorted
                    .placed
                    .push((e, found.map_or(0, |s| s.stream_ordering))),
                WriteAs::Skipped => sorted.skipped.push(e.event_id.clone()),
            }
        }
        sorted
    }

    /// The batch's prepared groups that the events written need, in batch
    /// order (a group's prev group first), and the others: the group after
    /// each event written and, down their prev groups, the prepared groups
    /// those are deltas on. All of them when every event is written once
    /// (as a batch assumed new is), with nothing worked out.
    fn groups_needed(
        &self,
        batch: &RoomBatch,
    ) -> (Vec<Arc<PreparedStateGroup>>, Vec<Arc<PreparedStateGroup>>) {
        let all = batch
            .events
            .iter()
            .flat_map(|e| e.new_state_groups.iter().cloned());
        if self.placed.is_empty() && self.new.len() == batch.events.len() {
            return (all.collect(), Vec::new());
        }
        let prepared: HashMap<StateGroup, &PreparedStateGroup> = batch
            .events
            .iter()
            .flat_map(|e| e.new_state_groups.iter())
            .map(|g| (g.group, g.as_ref()))
            .collect();
        let mut needed = HashSet::new();
        let written = self
            .new
            .iter()
            .copied()
            .chain(self.placed.iter().map(|(e, _)| *e));
        for e in written.filter(|e| !e.outlier) {
            let mut at = e.state_group;
            while let Some(g) = at {
                if !needed.insert(g) {
                    break;
                }
                at = prepared.get(&g).and_then(|p| p.prev_group);
            }
        }
        all.partition(|g| needed.contains(&g.group))
    }
}

impl EventsStore {
    /// Whether the failure `error` of a batch assumed new came of some of its
    /// events being stored after all (a retried or replayed event): an event
    /// id that is not unique, and stored events among the batch's, read
    /// afresh, which it answers.
    fn stored_after_all(
        &self,
        error: &storage_core::Error,
        batch: &RoomBatch,
        stored: Stored<'_>,
    ) -> Result<Option<HashMap<String, Existing>>> {
        if !matches!(stored, Stored::AssumedNone) {
            return Ok(None);
        }
        use diesel::result::{DatabaseErrorKind, Error as DieselError};
        let unique = matches!(
            error.database_error(),
            Some(DieselError::DatabaseError(
                DatabaseErrorKind::UniqueViolation,
                _
            ))
        );
        if !unique {
            return Ok(None);
        }
        let ids: Vec<&str> = batch.events.iter().map(|e| e.event_id.as_str()).collect();
        let stored = self.db.run_read("persist_events.stored_after_all", |txn| {
            load_existing(txn, &ids)
        })?;
        Ok((!stored.is_empty()).then_some(stored))
    }

    /// Once committed, the highest position committed is at least `max`.
    fn advance_position_after_commit(&self, txn: &mut Transaction<'_>, max: i64) {
        let position = self.position.clone();
        txn.call_after(move || {
            report_stream_position(position.fetch_max(max, Ordering::SeqCst).max(max));
        });
    }

    /// Once committed, the room's new forward extremities and those of the
    /// batch's events among them are kept in memory: the room's next batch
    /// starts from those extremities, and its events name those events as
    /// their prev events, so neither costs a read. What was kept of events
    /// that were outliers is dropped first.
    fn remember_after_commit(
        &self,
        txn: &mut Transaction<'_>,
        batch: &RoomBatch,
        sorted: &Sorted<'_>,
        positions: &[i64],
    ) {
        let stored_at = sorted
            .new
            .iter()
            .zip(positions)
            .map(|(e, p)| (*e, *p))
            .chain(sorted.placed.iter().copied());
        let tips: Vec<Arc<StoredEvent>> = stored_at
            .filter(|(e, _)| batch.new_extremities.contains(&e.event_id))
            .map(|(e, p)| {
                Arc::new(StoredEvent {
                    event_id: e.event_id.clone(),
                    room_id: e.room_id.clone(),
                    json: e.json.clone(),
                    format_version: Some(e.format_version),
                    outlier: e.outlier,
                    rejected: e.rejected.clone(),
                    stream_ordering: p,
                })
            })
            .collect();
        let placed: Vec<String> = sorted
            .placed
            .iter()
            .map(|(e, _)| e.event_id.clone())
            .collect();
        let caches = self.caches.clone();
        let room = batch.room_id.clone();
        let extremities = Arc::new(batch.new_extremities.clone());
        txn.call_after(move || {
            // Invalidated first: a read that began before the commit cannot
            // put the old extremities back.
            caches.extremities.invalidate(&room);
            caches.extremities.insert(room, extremities);
            for id in &placed {
                caches.events.invalidate(id);
            }
            for e in tips {
                caches.events.insert(e.event_id.clone(), e);
            }
        });
    }

    /// Forgets what is cached of the event `event_id` (a worker told that
    /// it is an outlier no longer).
    pub fn forget_cached_event(&self, event_id: &str) {
        self.caches.events.invalidate(&event_id.to_owned());
    }
}

fn insert_rooms(txn: &mut Transaction<'_>, new: &[&EventToPersist]) -> Result<()> {
    for e in new.iter().filter(|e| e.room_version.is_some()) {
        with_conn!(txn.conn(), |c| diesel::insert_into(rooms::table)
            .values((
                rooms::room_id.eq(&e.room_id),
                rooms::is_public.eq(false),
                rooms::creator.eq(&e.sender),
                rooms::room_version.eq(e.room_version.as_deref()),
                rooms::has_auth_chain_index.eq(false),
            ))
            .on_conflict_do_nothing()
            .execute(c))?;
    }
    Ok(())
}

/// An event's row but its stream position, which the statement fills
/// ([`Column::Position`]).
struct EventRow<'a> {
    topological_ordering: i64,
    event_id: &'a str,
    type_: &'a str,
    room_id: &'a str,
    processed: bool,
    outlier: bool,
    depth: i64,
    origin_server_ts: Option<i64>,
    received_ts: Option<i64>,
    sender: Option<&'a str>,
    contains_url: Option<bool>,
    instance_name: Option<&'a str>,
    state_key: Option<&'a str>,
    rejection_reason: Option<&'a str>,
}

struct JsonRow<'a> {
    event_id: &'a str,
    room_id: &'a str,
    internal_metadata: &'a str,
    json: &'a str,
    format_version: Option<i32>,
}

/// Takes the events' stream positions and inserts their rows (events,
/// JSON, edges, auth edges, rejections) and `with_events`' with them
/// ([`Transaction::insert_columns_taking_positions`]: one statement on
/// PostgreSQL, which also sends the replication notification, the highest
/// position then `after_position`). Answers the positions, in the order of
/// `new`, then the rest of the `taking` it took (for events that were
/// outliers). The edges of `placed` (outliers no longer) are inserted too.
fn insert_events<'a>(
    txn: &mut Transaction<'_>,
    new: &[&'a EventToPersist],
    placed: &[&'a EventToPersist],
    taking: usize,
    instance_name: &'a str,
    with_events: Vec<TableRows<'a>>,
    after_position: &str,
) -> Result<Vec<i64>> {
    let received = now_ms();
    let json_rows: Vec<JsonRow<'_>> = new
        .iter()
        .map(|e| JsonRow {
            event_id: &e.event_id,
            room_id: &e.room_id,
            internal_metadata: if e.outlier {
                r#"{"outlier":true}"#
            } else {
                "{}"
            },
            json: &e.json,
            format_version: Some(e.format_version),
        })
        .collect();
    // (event, prev event, room) of every non-outlier's prev events.
    let edges: Vec<(&str, &str, &str)> = new
        .iter()
        .filter(|e| !e.outlier)
        .chain(placed)
        .flat_map(|e| {
            e.prev_events
                .iter()
                .map(move |p| (e.event_id.as_str(), p.as_str(), e.room_id.as_str()))
        })
        .collect();
    // (event, auth event, room).
    let auth: Vec<(&str, &str, &str)> = new
        .iter()
        .flat_map(|e| {
            e.auth_events
                .iter()
                .map(move |a| (e.event_id.as_str(), a.as_str(), e.room_id.as_str()))
        })
        .collect();
    let now = received.to_string();
    // (event, reason) of the rejected ones.
    let rejected: Vec<(&str, &str)> = new
        .iter()
        .filter_map(|e| e.rejected.as_deref().map(|r| (e.event_id.as_str(), r)))
        .collect();
    let event_rows: Vec<EventRow<'a>> = new
        .iter()
        .map(|e| EventRow {
            topological_ordering: e.depth,
            event_id: &e.event_id,
            type_: &e.event_type,
            room_id: &e.room_id,
            processed: true,
            outlier: e.outlier,
            depth: e.depth,
            origin_server_ts: Some(e.origin_server_ts),
            received_ts: Some(received),
            sender: Some(&e.sender),
            contains_url: Some(false),
            instance_name: Some(instance_name),
            state_key: e.state_key.as_deref(),
            rejection_reason: e.rejected.as_deref(),
        })
        .collect();
    let mut tables = columns_of(&event_rows, &json_rows, &edges, &auth, &rejected, &now);
    tables.extend(with_events);
    txn.insert_columns_taking_positions(
        &EVENTS_STREAM_SEQUENCE,
        taking,
        &tables,
        REPLICATION_CHANNEL,
        after_position,
    )
}

/// The events' rows, column by column ([`Transaction::insert_columns`]).
fn columns_of<'a>(
    events: &[EventRow<'a>],
    json: &[JsonRow<'a>],
    edges: &[(&'a str, &'a str, &'a str)],
    auth: &[(&'a str, &'a str, &'a str)],
    rejected: &[(&'a str, &'a str)],
    now: &'a str,
) -> Vec<TableRows<'a>> {
    fn col<T, V>(rows: &[T], f: impl Fn(&T) -> V) -> Vec<V> {
        rows.iter().map(f).collect()
    }
    vec![
        TableRows {
            table: "events",
            columns: vec![
                ("stream_ordering", Column::Position),
                (
                    "topological_ordering",
                    Column::BigInt(col(events, |r| r.topological_ordering)),
                ),
                ("event_id", Column::Text(col(events, |r| r.event_id))),
                ("type", Column::Text(col(events, |r| r.type_))),
                ("room_id", Column::Text(col(events, |r| r.room_id))),
                ("processed", Column::Bool(col(events, |r| r.processed))),
                ("outlier", Column::Bool(col(events, |r| r.outlier))),
                ("depth", Column::BigInt(col(events, |r| r.depth))),
                (
                    "origin_server_ts",
                    Column::OptBigInt(col(events, |r| r.origin_server_ts)),
                ),
                (
                    "received_ts",
                    Column::OptBigInt(col(events, |r| r.received_ts)),
                ),
                ("sender", Column::OptText(col(events, |r| r.sender))),
                (
                    "contains_url",
                    Column::OptBool(col(events, |r| r.contains_url)),
                ),
                (
                    "instance_name",
                    Column::OptText(col(events, |r| r.instance_name)),
                ),
                ("state_key", Column::OptText(col(events, |r| r.state_key))),
                (
                    "rejection_reason",
                    Column::OptText(col(events, |r| r.rejection_reason)),
                ),
            ],
            write: RowsWrite::Insert,
        },
        TableRows {
            table: "event_json",
            columns: vec![
                ("event_id", Column::Text(col(json, |r| r.event_id))),
                ("room_id", Column::Text(col(json, |r| r.room_id))),
                (
                    "internal_metadata",
                    Column::Text(col(json, |r| r.internal_metadata)),
                ),
                ("json", Column::Text(col(json, |r| r.json))),
                (
                    "format_version",
                    Column::OptInt(col(json, |r| r.format_version)),
                ),
            ],
            write: RowsWrite::Insert,
        },
        TableRows {
            table: "event_edges",
            columns: vec![
                ("event_id", Column::Text(col(edges, |r| r.0))),
                ("prev_event_id", Column::Text(col(edges, |r| r.1))),
                ("room_id", Column::OptText(col(edges, |r| Some(r.2)))),
                ("is_state", Column::Bool(col(edges, |_| false))),
            ],
            write: RowsWrite::InsertSkippingConflicts,
        },
        TableRows {
            table: "event_auth",
            columns: vec![
                ("event_id", Column::Text(col(auth, |r| r.0))),
                ("auth_id", Column::Text(col(auth, |r| r.1))),
                ("room_id", Column::Text(col(auth, |r| r.2))),
            ],
            write: RowsWrite::Insert,
        },
        TableRows {
            table: "rejections",
            columns: vec![
                ("event_id", Column::Text(col(rejected, |r| r.0))),
                ("reason", Column::Text(col(rejected, |r| r.1))),
                ("last_check", Column::Text(col(rejected, |_| now))),
            ],
            write: RowsWrite::Insert,
        },
    ]
}

/// The batch's change of the room's extremities: (the old ones that are no
/// longer, the new ones that were not).
fn extremity_change(batch: &RoomBatch) -> (Vec<&str>, Vec<&str>) {
    fn not_in<'a>(these: &'a [String], those: &[String]) -> Vec<&'a str> {
        let those: HashSet<&str> = those.iter().map(String::as_str).collect();
        these
            .iter()
            .map(String::as_str)
            .filter(|e| !those.contains(e))
            .collect()
    }
    (
        not_in(&batch.old_extremities, &batch.new_extremities),
        not_in(&batch.new_extremities, &batch.old_extremities),
    )
}

/// The extremity rows of `gone` deleted and those of `added` inserted, for
/// the events' statement. Deleted by their event: an event is of one room
/// (`events.event_id` is unique, and a room's extremities are its own
/// events), and PostgreSQL finds it through the unique index on (event,
/// room), which leads with it: a DELETE of the room's rows went through the room's
/// index, as a bitmap scan that walked every entry the room's earlier
/// batches left dead (4 to 88 us over 2,000 writes, until autovacuum), and
/// with both columns given the planner still takes that index.
fn extremity_rows<'a>(room_id: &'a str, gone: &[&'a str], added: &[&'a str]) -> [TableRows<'a>; 2] {
    [
        TableRows {
            table: "event_forward_extremities",
            columns: vec![("event_id", Column::Text(gone.to_vec()))],
            write: RowsWrite::Delete,
        },
        TableRows::insert(
            "event_forward_extremities",
            vec![
                ("event_id", Column::Text(added.to_vec())),
                (
                    "room_id",
                    Column::Text(added.iter().map(|_| room_id).collect()),
                ),
            ],
        ),
    ]
}

/// The `cache_invalidations` rows telling workers to forget what they cached
/// of `placed`, outliers no longer, at the batch's highest position (where
/// Synapse writes an `ex_outlier_stream` row), for the events' statement.
fn no_longer_outlier_rows<'a>(placed: &[&'a EventToPersist]) -> TableRows<'a> {
    TableRows::insert(
        "cache_invalidations",
        vec![
            ("stream_ordering", Column::HighestPosition),
            (
                "cache_name",
                Column::Text(placed.iter().map(|_| EVENT_CACHE).collect()),
            ),
            (
                "cache_key",
                Column::Text(placed.iter().map(|e| e.event_id.as_str()).collect()),
            ),
        ],
    )
}

/// The `cache_invalidations` row telling workers that the room's current
/// state changed at the batch's highest position, for the events' statement.
fn invalidation_rows(room_id: &str) -> TableRows<'_> {
    TableRows::insert(
        "cache_invalidations",
        vec![
            ("stream_ordering", Column::HighestPosition),
            ("cache_name", Column::Text(vec![CURRENT_STATE_CACHE])),
            ("cache_key", Column::Text(vec![room_id])),
        ],
    )
}
