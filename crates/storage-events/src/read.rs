//! Reads of the events tables, with their caches: what event contexts, the
//! persistence loop and the HTTP API ask of stored events.

use crate::schema::{event_auth, event_edges, event_forward_extremities, events, rooms};
use crate::store::{EventsStore, CHUNK};
use crate::types::Existing;
use diesel::prelude::*;
use diesel::row::Row;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use storage_core::{with_conn, RawBackend, RawRow, Result, RowVisitor, Transaction};

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

/// A stored event's row as [`EventsStore::visit_events`] hands it over:
/// [`StoredEvent`]'s fields, the texts borrowed from the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredEventRow<'r> {
    pub event_id: &'r str,
    pub room_id: &'r str,
    pub json: &'r str,
    pub format_version: Option<i32>,
    pub outlier: bool,
    pub rejected: Option<&'r str>,
    pub stream_ordering: i64,
}

impl StoredEventRow<'_> {
    pub fn to_owned(&self) -> StoredEvent {
        StoredEvent {
            event_id: self.event_id.to_owned(),
            room_id: self.room_id.to_owned(),
            json: self.json.to_owned(),
            format_version: self.format_version,
            outlier: self.outlier,
            rejected: self.rejected.map(str::to_owned),
            stream_ordering: self.stream_ordering,
        }
    }
}

/// The capability to read stored events: implemented once, by [`EventsStore`],
/// which the main process and replica workers both build (a worker's replica
/// store wraps the same struct). Named for what it does, so that it does not
/// read like the struct's own name.
pub trait EventReads {
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

impl EventReads for EventsStore {
    fn have_events(&self, event_ids: &[&str]) -> Result<HashSet<String>> {
        self.db
            .run_read("have_events", |txn| load_existing(txn, event_ids))
            .map(|found| found.into_keys().collect())
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
        self.visit_events(&missing, |row| {
            let e = Arc::new(row.to_owned());
            self.caches.events.insert(e.event_id.clone(), e.clone());
            found.insert(e.event_id.clone(), e);
            Ok(())
        })?;
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
            referenced_as_prev(txn, event_ids)
        })
    }

    fn max_stream_ordering(&self) -> i64 {
        self.position.load(Ordering::SeqCst)
    }
}

/// Hands each row of the events statement to a closure, its texts borrowed.
struct EventRows<F>(F);

impl<F: FnMut(StoredEventRow<'_>) -> Result<()>> RowVisitor for EventRows<F> {
    fn visit<'a, DB: RawBackend, R: Row<'a, DB>>(&mut self, row: RawRow<'_, DB, R>) -> Result<()> {
        let format_version = match row.int_or_null(3)? {
            Some(v) => Some(i32::try_from(v).map_err(|_| {
                storage_core::Error::corrupt(format!(
                    "an event's format version {v} is out of range"
                ))
            })?),
            None => None,
        };
        let (outlier, stream_ordering) = (row.boolean(4)?, row.int(6)?);
        row.text(0, |event_id| {
            row.text(1, |room_id| {
                row.text(2, |json| {
                    row.text_or_null(5, |rejected| {
                        (self.0)(StoredEventRow {
                            event_id,
                            room_id,
                            json,
                            format_version,
                            outlier,
                            rejected,
                            stream_ordering,
                        })
                    })?
                })?
            })?
        })?
    }
}

impl EventsStore {
    /// The stored events among `event_ids`, each handed to `f` as its row
    /// comes, texts borrowed from the row: nothing is allocated for an event,
    /// and no cache is read or filled ([`EventReads::get_events`] is this,
    /// with the events cache). For a reader that keeps something else than
    /// the row: state resolution parses thousands of events straight from
    /// their rows. A read retried (a busy SQLite) hands its rows again.
    pub fn visit_events(
        &self,
        event_ids: &[&str],
        f: impl FnMut(StoredEventRow<'_>) -> Result<()>,
    ) -> Result<()> {
        if event_ids.is_empty() {
            return Ok(());
        }
        // The ids as one bound JSON array ([`Engine::json_texts`]): one
        // statement text, kept prepared, where `eq_any` on SQLite is an `IN`
        // list of a bind per id, a new statement for each length, parsed
        // again every time (HQ-sized state resolution, callgrind: 3
        // statements of 500 binds per level). Where the engine joins such a
        // list ([`Engine::joins_value_lists`]: SQLite), the array drives the
        // join, each id sought in both tables; elsewhere the rows are those
        // of `events.event_id = ANY(..)`. Each id is asked once: a join,
        // unlike `IN`, returns a row per id asked.
        //
        // [`Engine::json_texts`]: storage_core::Engine::json_texts
        // [`Engine::joins_value_lists`]: storage_core::Engine::joins_value_lists
        let mut asked: Vec<&str> = event_ids.to_vec();
        asked.sort_unstable();
        asked.dedup();
        let ids = storage_core::json_texts(asked.iter().copied());
        let engine = self.db.engine();
        let list = engine.json_texts("$1", "event_id");
        let columns = "events.event_id, events.room_id, event_json.json, \
             event_json.format_version, events.outlier, events.rejection_reason, \
             events.stream_ordering";
        let sql = if engine.joins_value_lists() {
            format!(
                "SELECT {columns} FROM ({list}) ids \
                 JOIN events ON events.event_id = ids.event_id \
                 JOIN event_json ON event_json.event_id = ids.event_id"
            )
        } else {
            format!(
                "SELECT {columns} FROM events \
                 JOIN event_json ON event_json.event_id = events.event_id WHERE {}",
                engine.seeking_each_of("events.event_id", &list)
            )
        };
        let mut rows = EventRows(f);
        self.db.run_read("get_events", |txn| {
            let query = diesel::sql_query(&sql).bind::<diesel::sql_types::Text, _>(&ids);
            storage_core::visit_rows(txn.conn(), query, &mut rows)
        })
    }

    /// The auth event ids of each of `event_ids` that has any, from the
    /// `event_auth` rows stored with them: what an auth chain walk needs,
    /// without reading and parsing the events. Not cached: a walk asks for each
    /// event once.
    pub fn get_auth_event_ids(&self, event_ids: &[&str]) -> Result<HashMap<String, Vec<String>>> {
        self.db.run_read("get_auth_event_ids", |txn| {
            let mut auth: HashMap<String, Vec<String>> = HashMap::new();
            for chunk in event_ids.chunks(CHUNK) {
                let rows = with_conn!(txn.conn(), |c| event_auth::table
                    .select((event_auth::event_id, event_auth::auth_id))
                    .filter(event_auth::event_id.eq_any(chunk))
                    .load::<(String, String)>(c))?;
                for (event, auth_id) in rows {
                    auth.entry(event).or_default().push(auth_id);
                }
            }
            Ok(auth)
        })
    }

    /// What is stored of each of `event_ids` that is stored (one read): what
    /// a writer asks to know which events a new copy leaves as they are
    /// (those not [`Existing::may_be_placed`]).
    pub fn stored_events(&self, event_ids: &[&str]) -> Result<HashMap<String, Existing>> {
        self.db
            .run_read("stored_events", |txn| load_existing(txn, event_ids))
    }

    /// [`Self::stored_events`] and [`EventReads::events_referenced_as_prev`]
    /// of `event_ids`, in one read transaction.
    pub fn stored_and_referenced_as_prev(
        &self,
        event_ids: &[&str],
    ) -> Result<(HashMap<String, Existing>, HashSet<String>)> {
        self.db.run_read("stored_and_referenced_as_prev", |txn| {
            Ok((
                load_existing(txn, event_ids)?,
                referenced_as_prev(txn, event_ids)?,
            ))
        })
    }

    /// The forward extremities of `room_id` for the process that writes it:
    /// from memory once read or written, since only that process's batches
    /// change them (each committed batch leaves its new extremities here, a
    /// failed one drops the room's entry). A replica reads them with
    /// [`EventReads::get_forward_extremities`], which always asks the database.
    pub fn forward_extremities_for_write(&self, room_id: &str) -> Result<Vec<String>> {
        let key = room_id.to_owned();
        if let Some(ids) = self.caches.extremities.get(&key) {
            return Ok(ids.as_ref().clone());
        }
        let seq = self.caches.extremities.sequence();
        let ids = self.get_forward_extremities(room_id)?;
        self.caches
            .extremities
            .insert_at(seq, key, Arc::new(ids.clone()));
        Ok(ids)
    }
}

/// Which of `event_ids` some stored, accepted event names as a prev event.
fn referenced_as_prev(txn: &mut Transaction<'_>, event_ids: &[&str]) -> Result<HashSet<String>> {
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
}

/// Which of `ids` are stored, with their stream positions and whether they
/// are outliers and rejected.
pub(crate) fn load_existing(
    txn: &mut Transaction<'_>,
    ids: &[&str],
) -> Result<HashMap<String, Existing>> {
    let mut found = HashMap::new();
    for chunk in ids.chunks(CHUNK) {
        let rows = with_conn!(txn.conn(), |c| events::table
            .select((
                events::event_id,
                events::stream_ordering,
                events::outlier,
                events::rejection_reason.is_not_null(),
            ))
            .filter(events::event_id.eq_any(chunk))
            .load::<(String, i64, bool, bool)>(c))?;
        found.extend(
            rows.into_iter()
                .map(|(id, stream_ordering, outlier, rejected)| {
                    (
                        id,
                        Existing {
                            stream_ordering,
                            outlier,
                            rejected,
                        },
                    )
                }),
        );
    }
    Ok(found)
}
