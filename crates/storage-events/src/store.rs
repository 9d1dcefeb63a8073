//! The events store: one struct over the events tables, composing the state
//! store. Its jobs live beside it: reads with caches (`read.rs`), the batch
//! write (`write.rs`), the replication stream (`replication.rs`).

use crate::read::StoredEvent;
use crate::schema::{events, rooms};
use diesel::prelude::*;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use storage_core::cache::LruCache;
use storage_core::{with_conn, Database, OpenMode, Result, Sequence, StoreConfig};
use storage_state::StateStore;

/// Where stream positions come from.
pub const EVENTS_STREAM_SEQUENCE: Sequence = Sequence {
    name: "events_stream_seq",
    table: "events",
    column: "stream_ordering",
};

/// Rows per statement.
pub(crate) const CHUNK: usize = 500;

#[derive(Debug)]
pub(crate) struct Caches {
    pub(crate) events: LruCache<String, Arc<StoredEvent>>,
    pub(crate) room_versions: LruCache<String, String>,
    /// Each room's forward extremities, as the last batch this process wrote
    /// left them (filled by [`EventsStore::forward_extremities_for_write`] and
    /// by every committed batch): only the writer of a room reads it, so it
    /// never needs invalidating from elsewhere.
    pub(crate) extremities: LruCache<String, Arc<Vec<String>>>,
}

/// The one implementation of [`EventReads`], and the writer of event batches.
#[derive(Debug, Clone)]
pub struct EventsStore {
    pub(crate) db: Database,
    pub(crate) state: StateStore,
    pub(crate) caches: Arc<Caches>,
    pub(crate) position: Arc<AtomicI64>,
    /// This process's name (`StoreConfig::instance_name`), stored with every
    /// event it writes (`events.instance_name`, as Synapse does).
    pub(crate) instance_name: Arc<str>,
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
        let max = crate::replication::read_max_stream_ordering(&db)?;
        Ok(EventsStore {
            db,
            state,
            caches: Arc::new(Caches {
                events: LruCache::new("get_event_cache", config.cache_size(50_000)),
                room_versions: LruCache::new("room_version_cache", config.cache_size(10_000)),
                extremities: LruCache::new("forward_extremities_cache", config.cache_size(10_000)),
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
}
