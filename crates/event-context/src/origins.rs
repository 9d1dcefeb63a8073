//! Where a snapshot came from, as the event it was written for shows
//! ([`storage_state::SnapshotOrigin`]): the state tables cannot say (a
//! snapshot has no edge), the events can.
//!
//! The state after an accepted state event is the state before it with the
//! event's slot set to it, and the state before an event with one prev event
//! is the state after that prev event. So a group written for such an event,
//! and still the event's group, is the prev event's group with one slot set,
//! whatever rows it was stored as: a snapshot, when the prev group's chain
//! was already [`MAX_STATE_DELTA_HOPS`](storage_state::MAX_STATE_DELTA_HOPS)
//! long. That lets two forks that each crossed snapshots of their own be
//! compared from where they meet (1,696 slots at Matrix HQ's size) instead of
//! comparing two snapshots of the whole room (~31,000 rows each, issue 14).
//! An event rejected, not a state event, with several prev events (its state
//! before is a resolution), or no longer mapped to the group vouches for
//! nothing.

use crate::{ContextBuilder, PendingEvents};
use std::sync::atomic::Ordering;
use storage_core::Result;
use storage_state::{SnapshotOrigin, SnapshotOrigins, StateGroup, StateGroupAccess};

/// A builder's events (stored, or pending in a batch) as [`SnapshotOrigins`].
pub(crate) struct EventOrigins<'a> {
    pub(crate) builder: &'a ContextBuilder,
    pub(crate) pending: &'a PendingEvents,
}

impl SnapshotOrigins for EventOrigins<'_> {
    fn snapshot_origin(&self, group: StateGroup) -> Result<Option<SnapshotOrigin>> {
        let state = self.builder.state();
        let Some(event_id) = state.get_state_group_event(group)? else {
            return Ok(None);
        };
        let Some(pdu) = self.builder.fetch_pdu(&event_id, self.pending)? else {
            return Ok(None);
        };
        let (Some(slot), [prev], false) = (pdu.state_map_key(), &pdu.prev_events[..], pdu.rejected)
        else {
            return Ok(None);
        };
        let groups = state.get_state_group_for_events(&[event_id.as_str(), prev.as_str()])?;
        if groups.get(event_id.as_str()) != Some(&group) {
            return Ok(None);
        }
        let Some(&prev) = groups.get(prev.as_str()) else {
            return Ok(None);
        };
        self.builder
            .snapshot_origins
            .fetch_add(1, Ordering::Relaxed);
        Ok(Some(SnapshotOrigin {
            prev,
            slot,
            event_id: event_id.as_str().into(),
        }))
    }
}
