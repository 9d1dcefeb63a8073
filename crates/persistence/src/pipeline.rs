//! What every writer of events in the main process works with (import and the
//! HTTP API): the events store, a context builder over it, and the queue whose
//! room loops persist with a [`RoomPersister`].

use crate::persister::{ExtremityResolver, RoomPersister};
use crate::queue::PersistenceQueue;
use event_context::ruma::RoomVersionId;
use event_context::{stored_room_version, ContextBuilder, EventContext, Pdu, PendingEvents};
use std::sync::Arc;
use storage_core::{Database, Error, Result, StoreConfig};
use storage_events::{EventToPersist, EventsStore, PersistedBatch};
use storage_state::{StateGroup, StateMap};

/// Events a room loop writes in one transaction at most.
pub const BATCH: usize = 100;

/// Resolves current state over several forward extremities for the persister,
/// with the batch being written readable before it is stored.
struct Resolver {
    builder: ContextBuilder,
}

impl ExtremityResolver for Resolver {
    fn resolve_groups(
        &self,
        room_id: &str,
        groups: &[StateGroup],
        batch: &[EventToPersist],
    ) -> Result<StateMap> {
        let version = room_version(&self.builder, room_id, batch)?;
        let mut pending = PendingEvents::default();
        for e in batch {
            let mut pdu = Pdu::from_json(&e.json, Some(&version)).map_err(|err| {
                Error::corrupt(format!("event {} does not parse: {err}", e.event_id))
            })?;
            pdu.rejected = e.rejected.is_some();
            pending.insert_pdu(Arc::new(pdu));
        }
        Ok(self
            .builder
            .resolve_state_of_groups(room_id, &version, groups, &pending)?
            .0)
    }
}

/// The version of `room_id`: stored, or (for a room's first batch, which holds
/// its create event and writes its `rooms` row) that of its accepted create
/// event in `batch`.
fn room_version(
    builder: &ContextBuilder,
    room_id: &str,
    batch: &[EventToPersist],
) -> Result<RoomVersionId> {
    if let Some(v) = stored_room_version(builder.events(), room_id)? {
        return Ok(v);
    }
    batch
        .iter()
        .find(|e| e.rejected.is_none() && e.room_version.is_some())
        .and_then(|e| e.room_version.as_deref())
        .map(|v| {
            RoomVersionId::try_from(v)
                .map_err(|e| Error::corrupt(format!("room {room_id} has a bad version {v:?}: {e}")))
        })
        .transpose()?
        .ok_or_else(|| {
            Error::invalid_argument(format!(
                "room {room_id} is unknown: its m.room.create event must come first"
            ))
        })
}

/// The stores and queue a writer of events works with.
#[derive(Debug)]
pub struct Pipeline {
    pub builder: ContextBuilder,
    pub queue: PersistenceQueue,
}

impl Pipeline {
    pub fn open(db: Database, config: &StoreConfig) -> Result<Pipeline> {
        let events = EventsStore::new(db, config)?;
        // New groups are written by their events' batches.
        let builder = ContextBuilder::new(events.clone(), config).deferring_group_writes();
        let persister = RoomPersister::new(
            events,
            Arc::new(Resolver {
                builder: builder.clone(),
            }),
        );
        let state = builder.state().clone();
        let queue = PersistenceQueue::discarding(
            BATCH,
            Box::new(move |room, batch| persister.persist(room, batch)),
            // An item not written (its write failed or panicked, or a failed
            // one of its chain came before it): the groups prepared for it
            // would otherwise stay in memory.
            Box::new(move |events| {
                state.forget_prepared_groups(events.iter().flat_map(|e| &e.new_state_groups))
            }),
        );
        Ok(Pipeline { builder, queue })
    }

    /// Queues events whose contexts are known and waits until they are
    /// committed. A failure keeps its kind (a pool timeout stays one).
    pub fn persist(
        &self,
        room_id: &str,
        events: &[(Pdu, EventContext)],
    ) -> Result<Arc<PersistedBatch>> {
        let rows = events
            .iter()
            .map(|(p, c)| ContextBuilder::to_persist(p, c))
            .collect();
        let written = self.queue.write(room_id, rows)?;
        let skipped = written.skipped.iter().map(String::as_str).collect();
        self.builder.remember_committed(events, &skipped);
        Ok(written)
    }
}
