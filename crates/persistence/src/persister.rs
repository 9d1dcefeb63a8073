//! What a room's persistence loop does with a batch: work out the room's new
//! forward extremities and the change of its current state, then write it all
//! in one transaction.
//!
//! Only the main process persists, and only one loop per room runs at a time,
//! so reading the extremities and current state before the transaction races
//! with no other writer of that room.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use storage_core::Result;
use storage_events::{
    new_forward_extremities, CurrentStateDelta, EventReads, EventToPersist, EventsStore,
    NewEventsWrite, PersistedBatch, RoomBatch, WriteAs,
};
use storage_state::{
    PreparedStateGroup, StateFilter, StateGroup, StateGroupAccess, StateKey, StateMap, MEMBER,
};

/// Resolves the state of a room whose forward extremities have different state.
pub trait ExtremityResolver: Send + Sync {
    /// The state resolved from `groups` (two or more) of `room_id`; `batch` is
    /// being written and not readable from storage yet.
    fn resolve_groups(
        &self,
        room_id: &str,
        groups: &[StateGroup],
        batch: &[EventToPersist],
    ) -> Result<StateMap>;
}

/// Persists batches for the queue.
#[derive(Clone)]
pub struct RoomPersister {
    events: EventsStore,
    resolver: Arc<dyn ExtremityResolver>,
}

impl std::fmt::Debug for RoomPersister {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomPersister").finish_non_exhaustive()
    }
}

#[derive(serde::Deserialize)]
struct MemberContent {
    content: Membership,
}

#[derive(serde::Deserialize)]
struct Membership {
    membership: Option<String>,
}

impl RoomPersister {
    pub fn new(events: EventsStore, resolver: Arc<dyn ExtremityResolver>) -> Self {
        RoomPersister { events, resolver }
    }

    /// Writes `batch` (events of `room_id`) with the extremities and current
    /// state it leads to.
    ///
    /// The room's extremities come from memory (this process wrote them).
    /// When the batch leaves a single one, they are first worked out assuming
    /// no event of the batch is stored yet, which needs no read of the
    /// batch's edges; the write transaction checks that assumption and writes
    /// nothing when it is wrong (a retried or replayed event), and the batch
    /// is worked out again from what stored events name as their prev events,
    /// without the events found stored (they are skipped, kept as stored).
    /// When it fails before its write, the groups prepared for the batch are
    /// left to the caller (the queue discards a failed item's).
    pub fn persist(&self, room_id: &str, batch: &[EventToPersist]) -> Result<PersistedBatch> {
        let current = self.events.forward_extremities_for_write(room_id)?;
        let ids = || -> Vec<&str> { batch.iter().map(|e| e.event_id.as_str()).collect() };
        // Which of the batch's events are stored, and which stored events
        // name them as prev events, read once each (the write reads neither
        // again).
        // Only when that leaves a single extremity: with several, working out
        // the current state resolves them, too dear to risk on a guess.
        let (stored, referenced) =
            if new_forward_extremities(&current, batch, &HashSet::new()).len() <= 1 {
                let planned = self.plan(room_id, batch, batch, &current, &HashSet::new())?;
                match self.events.persist_batch_of_new_events(&planned)? {
                    NewEventsWrite::Written(written) => return Ok(written),
                    // Read once the guess failed.
                    NewEventsWrite::SomeStored(stored) => {
                        (stored, self.events.events_referenced_as_prev(&ids())?)
                    }
                }
            } else {
                self.events.stored_and_referenced_as_prev(&ids())?
            };
        // The write skips the events stored already, whatever their context
        // says now (one stored rejected may be accepted once its missing auth
        // event is stored), but for an outlier the auth rules accepted that
        // this batch gives its place in the graph: the room's extremities
        // and state are worked out from the events written, those and the
        // new ones ([`EventToPersist::write_as`]).
        let unstored: Vec<EventToPersist> = batch
            .iter()
            .filter(|e| e.write_as(stored.get(&e.event_id)) != WriteAs::Skipped)
            .cloned()
            .collect();
        let planned = self.plan(room_id, batch, &unstored, &current, &referenced)?;
        self.events.persist_batch_knowing(&planned, &stored)
    }

    /// `batch` with the extremities its events `new` (those not stored yet)
    /// lead to from `current`, and the change of current state they make.
    fn plan(
        &self,
        room_id: &str,
        batch: &[EventToPersist],
        new: &[EventToPersist],
        current: &[String],
        referenced: &HashSet<String>,
    ) -> Result<RoomBatch> {
        let new_extremities = new_forward_extremities(current, new, referenced);
        let current_state = if new_extremities == current {
            CurrentStateDelta::default()
        } else {
            self.current_state_delta(room_id, new, current, &new_extremities)?
        };
        Ok(RoomBatch {
            room_id: room_id.to_owned(),
            events: batch.to_vec(),
            old_extremities: current.to_vec(),
            new_extremities,
            current_state,
        })
    }

    /// The state groups after `extremities`: from the batch, else stored.
    fn groups_of(
        &self,
        in_batch: &HashMap<&str, &EventToPersist>,
        extremities: &[String],
    ) -> Result<Vec<StateGroup>> {
        let stored_ids: Vec<&str> = extremities
            .iter()
            .map(String::as_str)
            .filter(|e| !in_batch.contains_key(e))
            .collect();
        let stored_groups = self
            .events
            .state()
            .get_state_group_for_events(&stored_ids)?;
        let groups: BTreeSet<StateGroup> = extremities
            .iter()
            .filter_map(|e| match in_batch.get(e.as_str()) {
                Some(ev) => ev.state_group,
                None => stored_groups.get(e).copied(),
            })
            .collect();
        Ok(groups.into_iter().collect())
    }

    /// The change of current state from the state after `old_extremities`
    /// (what `current_state_events` holds: every batch that moved the
    /// extremities wrote it) to the state after `extremities`.
    fn current_state_delta(
        &self,
        room_id: &str,
        batch: &[EventToPersist],
        old_extremities: &[String],
        extremities: &[String],
    ) -> Result<CurrentStateDelta> {
        let in_batch: HashMap<&str, &EventToPersist> =
            batch.iter().map(|e| (e.event_id.as_str(), e)).collect();
        let groups = self.groups_of(&in_batch, extremities)?;
        if let [group] = groups.as_slice() {
            // As Synapse does: a room moving along one line needs neither
            // state read in full nor compared slot by slot.
            if let [old] = self.groups_of(&in_batch, old_extremities)?.as_slice() {
                if old == group {
                    // Messages: the state did not change.
                    return Ok(CurrentStateDelta::default());
                }
                if let Some(delta) = delta_within_batch(batch, *old, *group) {
                    // Only the delta's slots: no whole state read for a
                    // state event in a large room.
                    let old_state = self
                        .events
                        .state()
                        .get_current_state_for_slots(room_id, delta.keys())?;
                    let changed: Vec<(&StateKey, &Arc<str>)> = delta
                        .iter()
                        .filter(|(k, v)| old_state.get(*k) != Some(*v))
                        .collect();
                    return self.delta_of(&in_batch, Vec::new(), &changed);
                }
            }
        }
        let new_state = match groups.as_slice() {
            [] => return Ok(CurrentStateDelta::default()),
            [group] => self
                .events
                .state()
                .get_state_for_groups(&[*group], &StateFilter::all())?
                .remove(group)
                .unwrap_or_default(),
            several => self.resolver.resolve_groups(room_id, several, batch)?,
        };
        let old_state = self.events.state().get_current_state_ids(room_id)?;
        let removed = old_state
            .keys()
            .filter(|k| !new_state.contains_key(*k))
            .cloned()
            .collect();
        let changed: Vec<(&StateKey, &Arc<str>)> = new_state
            .iter()
            .filter(|(k, v)| old_state.get(*k) != Some(*v))
            .collect();
        self.delta_of(&in_batch, removed, &changed)
    }

    /// The delta removing `removed` and setting `changed` (with the
    /// membership of member events).
    fn delta_of(
        &self,
        in_batch: &HashMap<&str, &EventToPersist>,
        removed: Vec<StateKey>,
        changed: &[(&StateKey, &Arc<str>)],
    ) -> Result<CurrentStateDelta> {
        let memberships = self.memberships(in_batch, changed)?;
        let added = changed
            .iter()
            .map(|(k, e)| ((*k).clone(), e.to_string(), memberships.get(&***e).cloned()))
            .collect();
        Ok(CurrentStateDelta { removed, added })
    }

    /// `content.membership` of the member events among `changed`.
    fn memberships<'a>(
        &self,
        in_batch: &HashMap<&str, &EventToPersist>,
        changed: &[(&StateKey, &'a Arc<str>)],
    ) -> Result<HashMap<&'a str, String>> {
        let mut found = HashMap::new();
        let mut to_load = Vec::new();
        for &((t, _), e) in changed {
            if &**t != MEMBER {
                continue;
            }
            let e: &'a str = e;
            match in_batch.get(e) {
                Some(ev) => {
                    if let Some(m) = &ev.membership {
                        found.insert(e, m.clone());
                    }
                }
                None => to_load.push(e),
            }
        }
        if !to_load.is_empty() {
            let stored = self.events.get_events(&to_load)?;
            for id in to_load {
                let membership = stored
                    .get(id)
                    .and_then(|s| serde_json::from_str::<MemberContent>(&s.json).ok())
                    .and_then(|m| m.content.membership);
                if let Some(m) = membership {
                    found.insert(id, m);
                }
            }
        }
        Ok(found)
    }
}

/// The slots that change from group `old` to group `new` when `new` was
/// prepared for this batch as `old` plus deltas, one group after another (the
/// batch moved the room along one line): those deltas, later ones winning.
/// `None` when `new` is not reached that way from `old`.
fn delta_within_batch(
    batch: &[EventToPersist],
    old: StateGroup,
    new: StateGroup,
) -> Option<StateMap> {
    let prepared: HashMap<StateGroup, &PreparedStateGroup> = batch
        .iter()
        .flat_map(|e| e.new_state_groups.iter())
        .map(|g| (g.group, g.as_ref()))
        .collect();
    let mut deltas = Vec::new();
    let mut at = new;
    while at != old {
        // Each step is a prepared group of the batch, so this ends.
        let group = prepared.get(&at)?;
        deltas.push(group.delta_ids.as_ref()?);
        at = group.prev_group?;
        if deltas.len() > prepared.len() {
            return None;
        }
    }
    let mut delta = StateMap::new();
    for d in deltas.into_iter().rev() {
        delta.extend(d.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    Some(delta)
}
