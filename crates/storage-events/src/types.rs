//! What the persistence path hands to storage, and what it gets back.
//!
//! Plain data: the event parsed elsewhere (event-context, above this crate), its
//! state groups computed, and the current-state change worked out by the
//! persistence loop, so the transaction only writes.

use crate::replication::Announced;
use std::collections::HashMap;
use std::sync::Arc;
use storage_state::{PreparedStateGroup, StateGroup, StateKey};

/// One event ready to be written.
#[derive(Debug, Clone)]
pub struct EventToPersist {
    pub event_id: String,
    pub room_id: String,
    pub event_type: String,
    pub state_key: Option<String>,
    pub sender: String,
    pub depth: i64,
    pub origin_server_ts: i64,
    pub prev_events: Vec<String>,
    pub auth_events: Vec<String>,
    /// The PDU as received (stored in `event_json.json`).
    pub json: String,
    /// Synapse's event format version: 1 (v1/v2 rooms), 2 (v3), 3 (v4 and later).
    pub format_version: i32,
    /// Set for a create event: the room's version, stored in `rooms`.
    pub room_version: Option<String>,
    /// Known, but without a place in the room DAG: no state.
    pub outlier: bool,
    /// Why the event failed its auth rules, if it did.
    pub rejected: Option<String>,
    /// The group holding the state after the event (the state before it, for a
    /// rejected event); `None` for outliers.
    pub state_group: Option<StateGroup>,
    /// `content.membership` of a member event.
    pub membership: Option<String>,
    /// The state groups computed for the event and not written yet: the
    /// batch's transaction writes them before the events (in batch order, so
    /// a group's prev group is always written first).
    pub new_state_groups: Vec<Arc<PreparedStateGroup>>,
}

impl EventToPersist {
    pub fn is_state(&self) -> bool {
        self.state_key.is_some()
    }

    /// What a batch's write does with this event, given what is stored of
    /// it (`None`: nothing).
    pub fn write_as(&self, stored: Option<&Existing>) -> WriteAs {
        match stored {
            None => WriteAs::New,
            Some(s) if s.may_be_placed() && !self.outlier && self.rejected.is_none() => {
                WriteAs::NoLongerOutlier
            }
            Some(_) => WriteAs::Skipped,
        }
    }
}

/// What is stored of an event, as a write reads it before deciding what to
/// do with a new copy of the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Existing {
    pub stream_ordering: i64,
    pub outlier: bool,
    pub rejected: bool,
}

impl Existing {
    /// Stored as an outlier the auth rules accepted: a copy with its place
    /// in the room's graph (not an outlier, accepted) gives it that place,
    /// as Synapse's `_update_outliers_txn` does. An outlier stored rejected
    /// stays as stored, as every stored rejected event does.
    pub fn may_be_placed(&self) -> bool {
        self.outlier && !self.rejected
    }
}

/// What a batch's write does with one of its events ([`EventToPersist::write_as`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteAs {
    /// Not stored: written.
    New,
    /// Stored as an outlier the auth rules accepted, and this copy has its
    /// place in the room's graph and is accepted: the stored event is an
    /// outlier no longer. Its row stays where it is in the stream (as in
    /// Synapse); it gets its state group, its prev-event edges, and a new
    /// stream position (Synapse's `ex_outlier_stream`), at which workers are
    /// told to forget what they cached of it. It then counts for the room's
    /// forward extremities and current state as a new event does.
    NoLongerOutlier,
    /// Stored already (what is stored of it stays): skipped.
    Skipped,
}

/// A change to a room's current state, against what `current_state_events` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CurrentStateDelta {
    /// Slots that no longer have any event.
    pub removed: Vec<StateKey>,
    /// Slots added or replaced: the event id and, for members, the membership.
    pub added: Vec<(StateKey, String, Option<String>)>,
}

impl CurrentStateDelta {
    pub fn is_empty(&self) -> bool {
        self.removed.is_empty() && self.added.is_empty()
    }
}

/// One room's part of a batch.
#[derive(Debug, Clone)]
pub struct RoomBatch {
    pub room_id: String,
    pub events: Vec<EventToPersist>,
    /// The room's forward extremities before the batch, those `new_extremities`
    /// was worked out from: the batch deletes the rows of those not among the
    /// new ones by their event id, never the room's rows as a whole (which on
    /// PostgreSQL walks every row the room's earlier batches left dead).
    pub old_extremities: Vec<String>,
    /// The room's forward extremities after the batch.
    pub new_extremities: Vec<String>,
    pub current_state: CurrentStateDelta,
}

/// What a committed batch was given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PersistedBatch {
    /// Stream position of each event written by this batch (for an event
    /// that was an outlier and is one no longer, the position of that
    /// change: its row keeps its own).
    pub positions: HashMap<String, i64>,
    /// Events of the batch that were already stored, and skipped.
    pub skipped: Vec<String>,
    /// The highest committed stream position once the batch committed.
    pub max_stream_ordering: i64,
    /// What the batch's commit told workers, with the positions it took;
    /// `None` when it took none.
    pub announced: Option<Announced>,
}
