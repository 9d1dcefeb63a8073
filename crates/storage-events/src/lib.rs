//! Events: the PDUs themselves, their place in the room DAG (edges, forward
//! extremities), their place in the stream (`stream_ordering`), rejections, and
//! the one-transaction write of a persistence batch.
//!
//! Everything is computed before it reaches this crate (state groups by
//! event-context, extremities and current-state changes by the persistence
//! loop); a batch transaction only writes.

mod extremities;
mod invariants;
mod read;
mod replication;
pub mod schema;
mod statistics;
mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod types;
mod write;

pub use extremities::new_forward_extremities;
pub use invariants::{check_invariants, Violation};
pub use read::{EventReads, StoredEvent, StoredEventRow};
pub use replication::{
    report_stream_position, Announced, Invalidations, Notification, ReplicationBatch, ALL_CACHES,
    CURRENT_STATE_CACHE, EVENT_CACHE, REPLICATION_CHANNEL, STATE_GROUP_SHAPE_CACHE,
};
pub use statistics::{RefreshSchedule, TABLES_A_BATCH_GROWS};
pub use store::{EventsStore, EVENTS_STREAM_SEQUENCE};
pub use types::{CurrentStateDelta, EventToPersist, Existing, PersistedBatch, RoomBatch, WriteAs};
pub use write::NewEventsWrite;
