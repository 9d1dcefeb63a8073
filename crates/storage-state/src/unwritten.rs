//! State groups whose ids are taken but whose rows are not written yet.
//!
//! The main process computes an event's state groups when it computes the
//! event's context, long before the batch holding the event is written; the
//! groups' rows are written by that batch's transaction, so that a batch
//! commits (or leaves nothing) as a whole and a state event costs no
//! transaction of its own. Until then the group is readable from here: later
//! events' contexts (auth checks, resolution) and the persister (current state)
//! read it like any other group. Once its batch commits it is readable from the
//! database and its caches (prefilled by the commit), and it is dropped from
//! here; when its batch fails it is dropped too, and the ids are a gap in the
//! sequence, as any rolled-back id is.

use crate::filter::StateFilter;
use crate::types::{StateGroup, StateMap};
use crate::write::NewStateGroup;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A state group given its id and waiting for its event's batch to write it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedStateGroup {
    pub group: StateGroup,
    /// The event whose state computation created the group.
    pub event_id: String,
    pub room_id: String,
    /// The group this one is a delta against, if any; `delta_ids` is then set.
    pub prev_group: Option<StateGroup>,
    pub delta_ids: Option<StateMap>,
    /// The full state as given by the caller; set without a prev group.
    pub current_state_ids: Option<StateMap>,
    /// The full state, whether given or derived (a persistent map: it shares
    /// all but the changed slots with its prev group's).
    state: StateMap,
}

impl PreparedStateGroup {
    /// `state` is the group's full state.
    pub(crate) fn new(group: StateGroup, new: &NewStateGroup<'_>, state: StateMap) -> Self {
        PreparedStateGroup {
            group,
            event_id: new.event_id.to_owned(),
            room_id: new.room_id.to_owned(),
            prev_group: new.prev_group,
            delta_ids: new.delta_ids.cloned(),
            current_state_ids: new.current_state_ids.cloned(),
            state,
        }
    }

    /// Its full state (an O(1) copy).
    pub(crate) fn full_state(&self) -> StateMap {
        self.state.clone()
    }

    /// The arguments that store it.
    pub fn as_new(&self) -> NewStateGroup<'_> {
        NewStateGroup {
            event_id: &self.event_id,
            room_id: &self.room_id,
            prev_group: self.prev_group,
            delta_ids: self.delta_ids.as_ref(),
            current_state_ids: self.current_state_ids.as_ref(),
        }
    }
}

/// The groups prepared and not yet written (or dropped), by id.
#[derive(Debug, Default)]
pub(crate) struct UnwrittenGroups {
    groups: Mutex<HashMap<StateGroup, Arc<PreparedStateGroup>>>,
}

impl UnwrittenGroups {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<StateGroup, Arc<PreparedStateGroup>>> {
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn insert(&self, group: Arc<PreparedStateGroup>) {
        self.lock().insert(group.group, group);
    }

    pub(crate) fn remove(&self, groups: impl IntoIterator<Item = StateGroup>) {
        let mut map = self.lock();
        for g in groups {
            map.remove(&g);
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// The full state of `group` if it is an unwritten group (an O(1) copy).
    pub(crate) fn full_state(&self, group: StateGroup) -> Option<StateMap> {
        self.lock().get(&group).map(|g| g.state.clone())
    }

    /// The state of `group` under `filter`, or `None` when `group` is not an
    /// unwritten group.
    pub(crate) fn state(&self, group: StateGroup, filter: &StateFilter) -> Option<StateMap> {
        let state = self.full_state(group)?;
        if filter.is_full() {
            return Some(state);
        }
        if !filter.include_others() && !filter.has_wildcards() {
            // A filter naming its keys (an auth check): looked up key by key.
            return Some(
                filter
                    .concrete_slots()
                    .filter_map(|slot| state.get_key_value(&slot))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            );
        }
        Some(filter.filter_state(&state))
    }
}
