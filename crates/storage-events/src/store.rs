//! The events store: writing batches of events in one transaction, and the
//! reads that event contexts and the persistence loop need.

use crate::schema::{
    cache_invalidations, event_auth, event_edges, event_forward_extremities, event_json, events,
    rejections, rooms,
};
use crate::types::{EventToPersist, PersistedBatch, RoomBatch};
use diesel::prelude::*;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use storage_core::cache::LruCache;
use storage_core::{
    with_conn, Database, OpenMode, Result, ResultExt, Sequence, StoreConfig, Transaction,
};
use storage_state::StateStore;

/// Where stream positions come from.
pub const EVENTS_STREAM_SEQUENCE: Sequence = Sequence {
    name: "events_stream_seq",
    table: "events",
    column: "stream_ordering",
};

/// The channel on which the main process announces committed stream positions.
pub const REPLICATION_CHANNEL: &str = "hs_replication";

/// The cache name under which current-state invalidations travel.
pub const CURRENT_STATE_CACHE: &str = "current_state_ids";

/// The cache name of the row that stands for pruned invalidations: every
/// position up to it may have invalidated anything, so a replica that had not
/// reached it must drop all its mutable caches.
pub const ALL_CACHES: &str = "*";

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

/// Rows per statement.
const CHUNK: usize = 500;

/// An event as stored: its PDU and what we know of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub event_id: String,
    pub room_id: String,
    pub json: String,
    pub format_version: Option<i32>,
    pub outlier: bool,
    pub rejected: Option<String>,
    pub stream_ordering: i64,
}

/// Reads of the events tables, implemented once and shared by the main process
/// and replica workers.
pub trait EventStore {
    /// Which of `event_ids` are stored.
    fn have_events(&self, event_ids: &[&str]) -> Result<HashSet<String>>;
    /// The stored events among `event_ids`.
    fn get_events(&self, event_ids: &[&str]) -> Result<HashMap<String, Arc<StoredEvent>>>;
    /// The room's version, if the room is known.
    fn get_room_version(&self, room_id: &str) -> Result<Option<String>>;
    fn get_forward_extremities(&self, room_id: &str) -> Result<Vec<String>>;
    /// Which of `event_ids` some stored event names as a prev event.
    fn events_referenced_as_prev(&self, event_ids: &[&str]) -> Result<HashSet<String>>;
    /// The highest stream position this process knows to be committed.
    fn max_stream_ordering(&self) -> i64;
}

#[derive(Debug)]
struct Caches {
    events: LruCache<String, Arc<StoredEvent>>,
    room_versions: LruCache<String, String>,
}

/// The one implementation of [`EventStore`], and the writer of event batches.
#[derive(Debug, Clone)]
pub struct EventsStore {
    db: Database,
    state: StateStore,
    caches: Arc<Caches>,
    position: Arc<AtomicI64>,
    /// This process's name (`StoreConfig::instance_name`), stored with every
    /// event it writes (`events.instance_name`, as Synapse does).
    instance_name: Arc<str>,
}

impl EventsStore {
    /// Built, like every store, from the database and the configuration; it
    /// composes the [`StateStore`] its batches write through (reach it with
    /// [`state`](Self::state), so that both share one set of caches).
    pub fn new(db: Database, config: &StoreConfig) -> Result<Self> {
        let state = StateStore::new(db.clone(), config)?;
        if db.mode() == OpenMode::Writer {
            db.sync_sequence(&EVENTS_STREAM_SEQUENCE)?;
        }
        let max = read_max_stream_ordering(&db)?;
        Ok(EventsStore {
            db,
            state,
            caches: Arc::new(Caches {
                events: LruCache::new("get_event_cache", config.cache_size(50_000)),
                room_versions: LruCache::new("room_version_cache", config.cache_size(10_000)),
            }),
            position: Arc::new(AtomicI64::new(max)),
            instance_name: config.instance_name.as_str().into(),
        })
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    pub fn state(&self) -> &StateStore {
        &self.state
    }

    /// How many rooms and events are stored.
    pub fn totals(&self) -> Result<(i64, i64)> {
        self.db.run_read("event_totals", |txn| {
            let rooms: i64 = with_conn!(txn.conn(), |c| rooms::table.count().get_result(c))?;
            let events: i64 = with_conn!(txn.conn(), |c| events::table.count().get_result(c))?;
            Ok((rooms, events))
        })
    }

    /// What happened after position `after`: the invalidations to apply and the
    /// committed position they lead to.
    pub fn replication_since(&self, after: i64) -> Result<ReplicationBatch> {
        self.db.run_read("replication_since", |txn| {
            let position = max_stream_ordering_txn(txn)?.max(after);
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

    /// Writes one room's batch in one transaction; see [`persist_batch_txn`](Self::persist_batch_txn).
    pub fn persist_batch(&self, batch: &RoomBatch) -> Result<PersistedBatch> {
        self.db
            .run_interaction("persist_events", |txn| self.persist_batch_txn(txn, batch))
    }

    /// Writes a batch: events, their JSON, edges, auth edges, rejections, the
    /// state group after each non-outlier, the new forward extremities and the
    /// change of current state. Events already stored are skipped. Stream
    /// positions are taken while the events table is locked, so that they
    /// increase in commit order.
    pub fn persist_batch_txn(
        &self,
        txn: &mut Transaction<'_>,
        batch: &RoomBatch,
    ) -> Result<PersistedBatch> {
        txn.lock_table("events")?;
        let ids: Vec<&str> = batch.events.iter().map(|e| e.event_id.as_str()).collect();
        let stored: HashSet<String> = load_existing(txn, &ids)?;
        let mut seen = HashSet::new();
        let new: Vec<&EventToPersist> = batch
            .events
            .iter()
            .filter(|e| !stored.contains(&e.event_id) && seen.insert(e.event_id.as_str()))
            .collect();
        let skipped: Vec<String> = batch
            .events
            .iter()
            .filter(|e| stored.contains(&e.event_id))
            .map(|e| e.event_id.clone())
            .collect();
        if new.is_empty() {
            return Ok(PersistedBatch {
                positions: HashMap::new(),
                skipped,
                max_stream_ordering: self.position.load(Ordering::SeqCst),
            });
        }
        let positions = txn.next_ids(&EVENTS_STREAM_SEQUENCE, new.len())?;
        insert_rooms(txn, &new)?;
        insert_events(txn, &new, &positions, &self.instance_name)?;
        let mappings: Vec<(&str, i64)> = new
            .iter()
            .filter(|e| !e.outlier)
            .filter_map(|e| e.state_group.map(|g| (e.event_id.as_str(), g)))
            .collect();
        self.state.store_event_state_groups_txn(txn, &mappings)?;
        replace_extremities(txn, &batch.room_id, &batch.new_extremities)?;
        if !batch.current_state.is_empty() {
            self.state.update_current_state_txn(
                txn,
                &batch.room_id,
                &batch.current_state.removed,
                &batch.current_state.added,
            )?;
        }
        let max = *positions.iter().max().expect("at least one new event");
        if !batch.current_state.is_empty() {
            with_conn!(txn.conn(), |c| diesel::insert_into(
                cache_invalidations::table
            )
            .values((
                cache_invalidations::stream_ordering.eq(max),
                cache_invalidations::cache_name.eq(CURRENT_STATE_CACHE),
                cache_invalidations::cache_key.eq(&batch.room_id),
            ))
            .execute(c))?;
        }
        // "<position> <ms since the epoch>": workers apply the position and measure
        // their lag from the time.
        txn.notify(REPLICATION_CHANNEL, &format!("{max} {}", now_ms()))?;
        let position = self.position.clone();
        txn.call_after(move || {
            report_stream_position(position.fetch_max(max, Ordering::SeqCst).max(max));
        });
        Ok(PersistedBatch {
            positions: new
                .iter()
                .zip(&positions)
                .map(|(e, p)| (e.event_id.clone(), *p))
                .collect(),
            skipped,
            max_stream_ordering: max,
        })
    }
}

fn read_max_stream_ordering(db: &Database) -> Result<i64> {
    db.run_read("max_stream_ordering", max_stream_ordering_txn)
}

/// The highest committed stream position as `txn` sees it (0 for no events).
fn max_stream_ordering_txn(txn: &mut Transaction<'_>) -> Result<i64> {
    let max: Option<i64> = with_conn!(txn.conn(), |c| events::table
        .select(diesel::dsl::max(events::stream_ordering))
        .first(c))?;
    Ok(max.unwrap_or(0))
}

fn load_existing(txn: &mut Transaction<'_>, ids: &[&str]) -> Result<HashSet<String>> {
    let mut found = HashSet::new();
    for chunk in ids.chunks(CHUNK) {
        found.extend(with_conn!(txn.conn(), |c| events::table
            .select(events::event_id)
            .filter(events::event_id.eq_any(chunk))
            .load::<String>(c))?);
    }
    Ok(found)
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

#[derive(Insertable)]
#[diesel(table_name = events)]
#[diesel(treat_none_as_default_value = false)]
struct EventRow<'a> {
    stream_ordering: i64,
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

#[derive(Insertable)]
#[diesel(table_name = event_json)]
#[diesel(treat_none_as_default_value = false)]
struct JsonRow<'a> {
    event_id: &'a str,
    room_id: &'a str,
    internal_metadata: &'a str,
    json: &'a str,
    format_version: Option<i32>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn insert_events(
    txn: &mut Transaction<'_>,
    new: &[&EventToPersist],
    positions: &[i64],
    instance_name: &str,
) -> Result<()> {
    let received = now_ms();
    let event_rows: Vec<EventRow<'_>> = new
        .iter()
        .zip(positions)
        .map(|(e, p)| EventRow {
            stream_ordering: *p,
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
    for chunk in event_rows.chunks(CHUNK) {
        with_conn!(txn.conn(), |c| diesel::insert_into(events::table)
            .values(chunk)
            .execute(c))?;
    }
    for chunk in json_rows.chunks(CHUNK) {
        with_conn!(txn.conn(), |c| diesel::insert_into(event_json::table)
            .values(chunk)
            .execute(c))?;
    }
    let edges: Vec<_> = new
        .iter()
        .filter(|e| !e.outlier)
        .flat_map(|e| {
            e.prev_events.iter().map(move |p| {
                (
                    event_edges::event_id.eq(e.event_id.as_str()),
                    event_edges::prev_event_id.eq(p.as_str()),
                    event_edges::room_id.eq(Some(e.room_id.as_str())),
                    event_edges::is_state.eq(false),
                )
            })
        })
        .collect();
    for chunk in edges.chunks(CHUNK) {
        with_conn!(txn.conn(), |c| diesel::insert_into(event_edges::table)
            .values(chunk)
            .on_conflict_do_nothing()
            .execute(c))?;
    }
    let auth: Vec<_> = new
        .iter()
        .flat_map(|e| {
            e.auth_events.iter().map(move |a| {
                (
                    event_auth::event_id.eq(e.event_id.as_str()),
                    event_auth::auth_id.eq(a.as_str()),
                    event_auth::room_id.eq(e.room_id.as_str()),
                )
            })
        })
        .collect();
    for chunk in auth.chunks(CHUNK) {
        with_conn!(txn.conn(), |c| diesel::insert_into(event_auth::table)
            .values(chunk)
            .execute(c))?;
    }
    let now = received.to_string();
    let rejected: Vec<_> = new
        .iter()
        .filter_map(|e| {
            e.rejected.as_deref().map(|reason| {
                (
                    rejections::event_id.eq(e.event_id.as_str()),
                    rejections::reason.eq(reason),
                    rejections::last_check.eq(now.as_str()),
                )
            })
        })
        .collect();
    for chunk in rejected.chunks(CHUNK) {
        with_conn!(txn.conn(), |c| diesel::insert_into(rejections::table)
            .values(chunk)
            .execute(c))?;
    }
    Ok(())
}

fn replace_extremities(
    txn: &mut Transaction<'_>,
    room_id: &str,
    extremities: &[String],
) -> Result<()> {
    with_conn!(txn.conn(), |c| diesel::delete(
        event_forward_extremities::table.filter(event_forward_extremities::room_id.eq(room_id))
    )
    .execute(c))?;
    let rows: Vec<_> = extremities
        .iter()
        .map(|e| {
            (
                event_forward_extremities::event_id.eq(e.as_str()),
                event_forward_extremities::room_id.eq(room_id),
            )
        })
        .collect();
    for chunk in rows.chunks(CHUNK) {
        with_conn!(txn.conn(), |c| diesel::insert_into(
            event_forward_extremities::table
        )
        .values(chunk)
        .execute(c))?;
    }
    Ok(())
}

impl EventStore for EventsStore {
    fn have_events(&self, event_ids: &[&str]) -> Result<HashSet<String>> {
        self.db
            .run_read("have_events", |txn| load_existing(txn, event_ids))
    }

    fn get_events(&self, event_ids: &[&str]) -> Result<HashMap<String, Arc<StoredEvent>>> {
        let mut found = HashMap::with_capacity(event_ids.len());
        let mut missing = Vec::new();
        for &id in event_ids {
            match self.caches.events.get(&id.to_owned()) {
                Some(e) => {
                    found.insert(id.to_owned(), e);
                }
                None => missing.push(id),
            }
        }
        if missing.is_empty() {
            return Ok(found);
        }
        type Row = (
            String,
            String,
            String,
            Option<i32>,
            bool,
            Option<String>,
            i64,
        );
        let rows: Vec<Row> = self.db.run_read("get_events", |txn| {
            let mut rows = Vec::new();
            for chunk in missing.chunks(CHUNK) {
                rows.extend(with_conn!(txn.conn(), |c| events::table
                    .inner_join(event_json::table.on(event_json::event_id.eq(events::event_id)))
                    .select((
                        events::event_id,
                        events::room_id,
                        event_json::json,
                        event_json::format_version,
                        events::outlier,
                        events::rejection_reason,
                        events::stream_ordering,
                    ))
                    .filter(events::event_id.eq_any(chunk))
                    .load::<Row>(c))?);
            }
            Ok(rows)
        })?;
        for (event_id, room_id, json, format_version, outlier, rejected, stream_ordering) in rows {
            let e = Arc::new(StoredEvent {
                event_id: event_id.clone(),
                room_id,
                json,
                format_version,
                outlier,
                rejected,
                stream_ordering,
            });
            self.caches.events.insert(event_id.clone(), e.clone());
            found.insert(event_id, e);
        }
        Ok(found)
    }

    fn get_room_version(&self, room_id: &str) -> Result<Option<String>> {
        if let Some(v) = self.caches.room_versions.get(&room_id.to_owned()) {
            return Ok(Some(v));
        }
        let version: Option<Option<String>> = self.db.run_read("get_room_version", |txn| {
            Ok(with_conn!(txn.conn(), |c| rooms::table
                .select(rooms::room_version)
                .filter(rooms::room_id.eq(room_id))
                .first::<Option<String>>(c)
                .optional())?)
        })?;
        let version = version.flatten();
        if let Some(v) = &version {
            self.caches
                .room_versions
                .insert(room_id.to_owned(), v.clone());
        }
        Ok(version)
    }

    fn get_forward_extremities(&self, room_id: &str) -> Result<Vec<String>> {
        self.db.run_read("get_forward_extremities", |txn| {
            let mut ids: Vec<String> =
                with_conn!(txn.conn(), |c| event_forward_extremities::table
                    .select(event_forward_extremities::event_id)
                    .filter(event_forward_extremities::room_id.eq(room_id))
                    .load(c))?;
            ids.sort();
            Ok(ids)
        })
    }

    fn events_referenced_as_prev(&self, event_ids: &[&str]) -> Result<HashSet<String>> {
        self.db.run_read("events_referenced_as_prev", |txn| {
            // (child, prev) edges naming the events; then which children count:
            // only accepted ones (neither outliers nor rejected), as in Synapse's
            // `_get_events_which_are_prevs`.
            let mut edges: Vec<(String, String)> = Vec::new();
            for chunk in event_ids.chunks(CHUNK) {
                edges.extend(with_conn!(txn.conn(), |c| event_edges::table
                    .select((event_edges::event_id, event_edges::prev_event_id))
                    .filter(event_edges::prev_event_id.eq_any(chunk))
                    .load::<(String, String)>(c))?);
            }
            if edges.is_empty() {
                return Ok(HashSet::new());
            }
            let children: Vec<&str> = edges.iter().map(|(c, _)| c.as_str()).collect();
            let mut accepted = HashSet::new();
            for chunk in children.chunks(CHUNK) {
                accepted.extend(with_conn!(txn.conn(), |c| events::table
                    .select(events::event_id)
                    .filter(events::event_id.eq_any(chunk))
                    .filter(events::outlier.eq(false))
                    .filter(events::rejection_reason.is_null())
                    .load::<String>(c))?);
            }
            Ok(edges
                .into_iter()
                .filter(|(child, _)| accepted.contains(child))
                .map(|(_, prev)| prev)
                .collect())
        })
    }

    fn max_stream_ordering(&self) -> i64 {
        self.position.load(Ordering::SeqCst)
    }
}
