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
//!
//! A prepared delta holds its full state only when that costs nothing (its
//! prev group is prepared with one, or held whole by the caches): preparing a
//! state event's group on a cold 38,000-member room otherwise read the prev
//! group's whole state (~90 ms) only to keep it. Without it, a read of the
//! group takes what the prepared deltas set and asks the written group below
//! them for the rest ([`UnwrittenState::Over`]), for the slots asked alone.

use crate::filter::StateFilter;
use crate::types::{Slot, StateGroup, StateMap};
use crate::write::NewStateGroup;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

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
    /// The full state, when given or derived without a read (a persistent
    /// map: it shares all but the changed slots with its prev group's);
    /// `None` for a delta whose prev group's state is not held.
    state: Option<StateMap>,
}

impl PreparedStateGroup {
    /// `state` is the group's full state if known; without it the group must
    /// be a delta.
    pub(crate) fn new(group: StateGroup, new: &NewStateGroup<'_>, state: Option<StateMap>) -> Self {
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

    /// Its full state if held (an O(1) copy).
    pub(crate) fn full_state(&self) -> Option<StateMap> {
        self.state.clone()
    }

    /// Its full state if held, borrowed: what its store writes when the
    /// group must be a snapshot.
    pub(crate) fn known_state(&self) -> Option<&StateMap> {
        self.state.as_ref()
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
    /// Told of removals, for whoever waits for a group to go
    /// ([`Self::wait_until_none_of`]).
    removed: Condvar,
    /// How many wait: a removal with nobody waiting tells nobody (no system
    /// call on the write path).
    waiting: AtomicUsize,
}

impl UnwrittenGroups {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<StateGroup, Arc<PreparedStateGroup>>> {
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn insert(&self, group: Arc<PreparedStateGroup>) {
        self.lock().insert(group.group, group);
    }

    /// Inserts `group` unless a group of its id is held: whether it did.
    pub(crate) fn insert_new(&self, group: Arc<PreparedStateGroup>) -> bool {
        match self.lock().entry(group.group) {
            Entry::Occupied(_) => false,
            Entry::Vacant(slot) => {
                slot.insert(group);
                true
            }
        }
    }

    pub(crate) fn remove(&self, groups: impl IntoIterator<Item = StateGroup>) {
        let mut map = self.lock();
        for g in groups {
            map.remove(&g);
        }
        // Read under the lock a waiter counts itself under.
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.removed.notify_all();
        }
    }

    /// Waits until none of `groups` is held here, or `deadline` passes:
    /// whether none is.
    pub(crate) fn wait_until_none_of(&self, groups: &[StateGroup], deadline: Instant) -> bool {
        let map = self.lock();
        // Counted under the lock a removal reads the count under.
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let (_map, timeout) = self
            .removed
            .wait_timeout_while(
                map,
                deadline.saturating_duration_since(Instant::now()),
                |map| groups.iter().any(|g| map.contains_key(g)),
            )
            .unwrap_or_else(|p| p.into_inner());
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        !timeout.timed_out()
    }

    /// How many wait in [`Self::wait_until_none_of`] now.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether `group` is an unwritten group.
    pub(crate) fn contains(&self, group: StateGroup) -> bool {
        self.lock().contains_key(&group)
    }

    /// The full state of `group` if it is an unwritten group holding it (an
    /// O(1) copy).
    pub(crate) fn full_state(&self, group: StateGroup) -> Option<StateMap> {
        self.lock().get(&group).and_then(|g| g.state.clone())
    }

    /// The state of `group` under `filter`, or `None` when `group` is not an
    /// unwritten group: whole, or what the unwritten deltas down to a written
    /// group set and what to read of that group.
    pub(crate) fn state(&self, group: StateGroup, filter: &StateFilter) -> Option<UnwrittenState> {
        let groups = self.lock();
        let mut at = groups.get(&group)?;
        // Newest first: a slot once set is not set again from lower down.
        let mut set = StateMap::new();
        let by_slot = !filter.include_others() && !filter.has_wildcards();
        loop {
            if let Some(state) = &at.state {
                let mut below = filtered(state, filter, by_slot);
                below.extend(set);
                return Some(UnwrittenState::Known(below));
            }
            let (Some(delta), Some(prev)) = (&at.delta_ids, at.prev_group) else {
                // Unreachable: a group without its state is a delta.
                return Some(UnwrittenState::Known(set));
            };
            for (k, v) in filtered(delta, filter, by_slot).iter() {
                if !set.contains_key(k) {
                    set.insert(k.clone(), v.clone());
                }
            }
            match groups.get(&prev) {
                Some(p) => at = p,
                None => {
                    let rest = if by_slot {
                        StateFilter::from_types(
                            filter
                                .concrete_slots()
                                .filter(|slot| set.get(slot).is_none())
                                .map(|Slot(t, k)| (t, Some(k))),
                        )
                    } else {
                        filter.clone()
                    };
                    return Some(UnwrittenState::Over {
                        set,
                        below: prev,
                        rest,
                    });
                }
            }
        }
    }
}

/// The state of an unwritten group under a filter ([`UnwrittenGroups::state`]).
#[derive(Debug)]
pub(crate) enum UnwrittenState {
    /// All of it.
    Known(StateMap),
    /// `set` over the state of `below`, a written group, under `rest`.
    Over {
        set: StateMap,
        below: StateGroup,
        rest: StateFilter,
    },
}

/// The part of `state` that `filter` wants; looked up slot by slot when the
/// filter names its slots (an auth check), not by a pass over the room.
fn filtered(state: &StateMap, filter: &StateFilter, by_slot: bool) -> StateMap {
    if filter.is_full() {
        return state.clone();
    }
    if by_slot {
        return filter
            .concrete_slots()
            .filter_map(|slot| state.get_key_value(&slot))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
    }
    filter.filter_state(state)
}
