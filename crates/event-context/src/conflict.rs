//! State resolution over what the states disagree on, rather than over the
//! whole room.
//!
//! ruma's resolution takes whole states and the full auth chain of each. At
//! Matrix HQ's size that meant loading and parsing the room's ~32,000 state
//! events to settle a conflict of 1,696 (about 10 s, issue 14). Most of that
//! input cannot change the answer:
//!
//! - With `U` the unconflicted events and `Ci` the conflicted events of state
//!   `i`, the full auth chain of state `i` is `chain(U) ∪ chain(Ci)`, so the auth
//!   difference (∪ chains − ∩ chains) is the part of `∪ chain(Ci)` that is
//!   neither in every `chain(Ci)` nor in `chain(U)`. When every event of that
//!   part is itself conflicted, `chain(U)` does not matter (a conflicted event
//!   is in the full conflicted set anyway), and the conflicted events' chains
//!   give ruma the same auth difference as the full chains. Otherwise the
//!   caller resolves over the whole states, as before.
//! - ruma's iterative auth checks look up, in the state, only the auth types of
//!   the events of the full conflicted set, and the mainline starts from the
//!   power levels; every other slot of the result is its unconflicted value.
//!
//! So ruma gets the states restricted to those slots (and the conflicted
//! events' chains); its answer there, laid over the first state, is the answer
//! it gives for the whole states. `crates/main-process/tests/resolution.rs` checks that on
//! fork-heavy rooms against the resolution over whole states.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use ruma::{EventId, OwnedEventId, RoomVersionId};
use storage_core::{Error, Result};

use crate::auth_chain::{auth_chain, conflicted_state_subgraph};
use crate::room_version::{room_version_rules, state_res_rules};
use crate::{auth_types_for_pdu, resolve_state_with_auth_chains, Pdu, StateKey, StateMap};

/// Events loaded for a resolution: `None` for one known to be missing.
pub(crate) type Loaded = HashMap<OwnedEventId, Option<Arc<Pdu>>>;

/// The slots on which `states` disagree: a value that differs, or a slot that
/// some of them lack.
pub(crate) fn conflicted_slots(states: &[&storage_state::StateMap]) -> BTreeSet<StateKey> {
    let mut slots = BTreeSet::new();
    let Some((first, rest)) = states.split_first() else {
        return slots;
    };
    for (slot, event) in first.iter() {
        if rest.iter().any(|s| s.get(slot) != Some(event)) {
            slots.insert(slot.clone());
        }
    }
    for state in rest {
        for slot in state.keys() {
            if !first.contains_key(slot) {
                slots.insert(slot.clone());
            }
        }
    }
    slots
}

pub(crate) fn parse_event_id(id: &str) -> Result<OwnedEventId> {
    OwnedEventId::try_from(id).map_err(|e| {
        Error::corrupt(format!(
            "stored state names a malformed event id {id:?}: {e}"
        ))
    })
}

/// Resolves `states` (two or more) from their conflict alone, with the slots
/// outside which the result equals every one of `states`; `None` when an
/// event in the auth chains of the conflicted events is not conflicted itself
/// and not in all of those chains (then only the chains of the whole states
/// say whether it is in the auth difference). `load` loads events with their
/// auth chains into a [`Loaded`]; `fallback` finds any event it left out.
/// `what` names the resolution in errors.
pub(crate) fn resolve_by_conflict(
    room_version: &RoomVersionId,
    states: &[&storage_state::StateMap],
    mut load: impl FnMut(Vec<OwnedEventId>, &mut Loaded) -> Result<()>,
    fallback: impl Fn(&EventId) -> Option<Arc<Pdu>>,
    what: &str,
) -> Result<Option<(storage_state::StateMap, BTreeSet<StateKey>)>> {
    let rules = room_version_rules(room_version)
        .ok_or_else(|| Error::other(format!("{what}: unsupported room version {room_version}")))?;
    let Some(first) = states.first() else {
        return Ok(None);
    };
    let conflicted = conflicted_slots(states);
    if conflicted.is_empty() {
        return Ok(Some(((*first).clone(), conflicted)));
    }
    let per_state: Vec<Vec<OwnedEventId>> = states
        .iter()
        .map(|s| {
            conflicted
                .iter()
                .filter_map(|slot| s.get(slot))
                .map(|id| parse_event_id(id))
                .collect()
        })
        .collect::<Result<_>>()?;
    let conflicted_events: HashSet<OwnedEventId> = per_state.iter().flatten().cloned().collect();

    let mut loaded = Loaded::new();
    load(conflicted_events.iter().cloned().collect(), &mut loaded)?;
    let (chains, slots) = {
        let fetch = |id: &EventId| match loaded.get(id) {
            Some(pdu) => pdu.clone(),
            None => fallback(id),
        };
        let chains: Vec<HashSet<OwnedEventId>> = per_state
            .iter()
            .map(|events| auth_chain(events.iter().map(|id| &**id), fetch))
            .collect();
        let undecided = chains
            .iter()
            .flatten()
            .any(|id| !conflicted_events.contains(id) && !chains.iter().all(|c| c.contains(id)));
        if undecided {
            return Ok(None);
        }
        // The full conflicted set: the conflicted events ruma can fetch, and
        // from room version 12 their conflicted state subgraph.
        let mut full_conflicted: HashSet<OwnedEventId> = conflicted_events.clone();
        if state_res_rules(&rules).consider_conflicted_state_subgraph {
            full_conflicted.extend(conflicted_state_subgraph(
                conflicted_events.iter().cloned(),
                fetch,
            ));
        }
        // The slots ruma's checks may read, and those the checks may fill.
        let mut slots = conflicted;
        slots.insert(storage_state::key("m.room.power_levels", ""));
        slots.insert(storage_state::key("m.room.create", ""));
        for pdu in full_conflicted.iter().filter_map(|id| fetch(id)) {
            slots.extend(pdu.state_map_key());
            if let Ok(types) = auth_types_for_pdu(&pdu) {
                slots.extend(types);
            }
        }
        (chains, slots)
    };

    let reduced: Vec<StateMap> = states
        .iter()
        .map(|s| {
            slots
                .iter()
                .filter_map(|slot| {
                    s.get(slot)
                        .map(|id| Ok((slot.clone(), parse_event_id(id)?)))
                })
                .collect()
        })
        .collect::<Result<_>>()?;
    let more: Vec<OwnedEventId> = reduced
        .iter()
        .flat_map(|s| s.values())
        .filter(|id| !loaded.contains_key(*id))
        .cloned()
        .collect();
    load(more, &mut loaded)?;
    let fetch = |id: &EventId| match loaded.get(id) {
        Some(pdu) => pdu.clone(),
        None => fallback(id),
    };
    let resolved = resolve_state_with_auth_chains(room_version, &reduced, chains, fetch)
        .map_err(|e| Error::other(format!("{what}: {e}")))?;
    // Only the slots that change: an insert into a map sharing its nodes with
    // the group's copies the node path down to the slot.
    let mut state = (*first).clone();
    for slot in &slots {
        match resolved.get(slot) {
            Some(id) if first.get(slot).map(|e| &**e) != Some(id.as_str()) => {
                state.insert(slot.clone(), Arc::from(id.as_str()));
            }
            None if first.contains_key(slot) => {
                state.remove(slot);
            }
            _ => {}
        }
    }
    Ok(Some((state, slots)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::tests::state;

    #[test]
    fn slots_conflict_when_values_differ_or_some_state_lacks_them() {
        let a = state(&[("same", "1"), ("differs", "2"), ("only_a", "3")]);
        let b = state(&[("same", "1"), ("differs", "4"), ("only_b", "5")]);
        let slots: Vec<String> = conflicted_slots(&[&a, &b])
            .into_iter()
            .map(|(t, _)| t.to_string())
            .collect();
        assert_eq!(slots, ["differs", "only_a", "only_b"]);
        assert!(conflicted_slots(&[&a, &a.clone()]).is_empty());
        assert!(conflicted_slots(&[]).is_empty());
    }
}
