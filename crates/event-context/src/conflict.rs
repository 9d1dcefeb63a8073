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
//!   neither in every `chain(Ci)` nor in `chain(U)`. A conflicted event is in
//!   the full conflicted set anyway, so `chain(U)` matters only for the other
//!   events of that part (undecided): those it holds are added to every
//!   chain given to ruma, which then computes the same auth difference as from
//!   the full chains. Whether `chain(U)` holds them is asked of the stored
//!   `event_auth` ids (a walk of ids, no event parsed), and only when some
//!   event is undecided; before, such a resolution loaded and parsed every
//!   event of the whole states (16 of the 21 merges of the fork-heavy test
//!   rooms).
//! - ruma's iterative auth checks look up, in the state, only the auth types of
//!   the events of the full conflicted set, and the mainline starts from the
//!   power levels; every other slot of the result is its unconflicted value.
//!
//! So ruma gets the states restricted to those slots (and the conflicted
//! events' chains, with the undecided events of `chain(U)`); its answer there,
//! laid over the first state, is the answer it gives for the whole states.
//! `crates/main-process/tests/resolution.rs` checks that on fork-heavy rooms
//! against the resolution over whole states.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use ruma::{EventId, OwnedEventId, RoomVersionId};
use storage_core::{Error, Result};

use crate::auth_chain::{auth_chain, conflicted_state_subgraph};
use crate::room_version::{room_version_rules, state_res_rules};
use crate::{auth_types_for_pdu, resolve_state_with_auth_chains, Pdu, StateKey, StateMap};

/// Events loaded for a resolution: `None` for one known to be missing.
/// Hashed with foldhash under a per-process random seed rather than SipHash:
/// ruma looks every event up here, again and again (137,385 lookups per three
/// merges of the state resolution benchmark). Event ids are chosen by remote
/// servers, so the seed stays random.
pub(crate) type Loaded = HashMap<OwnedEventId, Option<Arc<Pdu>>, foldhash::fast::RandomState>;

/// The slots on which `states` disagree: a value that differs, or a slot that
/// some of them lack.
pub(crate) fn conflicted_slots(states: &[&storage_state::StateMap]) -> BTreeSet<StateKey> {
    let mut slots = BTreeSet::new();
    let Some((first, rest)) = states.split_first() else {
        return slots;
    };
    // A slot some state disagrees with the first on; two cold states are
    // compared side by side in their arrays' order, not looked up slot by slot.
    for state in rest {
        slots.extend(first.differing_keys(state).into_iter().cloned());
    }
    slots
}

/// A resolution from the states' conflict: the resolved state, the slots
/// outside which it equals every input, and whether the auth difference needed
/// the unconflicted events' auth chain.
#[derive(Debug)]
pub(crate) struct ByConflict {
    pub(crate) state: storage_state::StateMap,
    pub(crate) slots: BTreeSet<StateKey>,
    pub(crate) asked_unconflicted_chain: bool,
}

pub(crate) fn parse_event_id(id: &str) -> Result<OwnedEventId> {
    OwnedEventId::try_from(id).map_err(|e| {
        Error::corrupt(format!(
            "stored state names a malformed event id {id:?}: {e}"
        ))
    })
}

/// Resolves `states` (two or more) from their conflict, with the slots
/// outside which the result equals every one of `states`; `None` for no
/// states. `load` loads events with their auth chains into a [`Loaded`];
/// `fallback` finds any event it left out. An event in the auth chains of the
/// conflicted events that is neither conflicted itself nor in all of those
/// chains is in the auth difference unless the unconflicted events' auth chain
/// holds it: `in_unconflicted_chain(unconflicted, undecided)` says which of
/// `undecided` that chain holds (asked only when some are undecided). `what`
/// names the resolution in errors.
pub(crate) fn resolve_by_conflict(
    room_version: &RoomVersionId,
    states: &[&storage_state::StateMap],
    mut load: impl FnMut(Vec<OwnedEventId>, &mut Loaded) -> Result<()>,
    fallback: impl Fn(&EventId) -> Option<Arc<Pdu>>,
    in_unconflicted_chain: impl FnOnce(
        Vec<&str>,
        &HashSet<OwnedEventId>,
    ) -> Result<HashSet<OwnedEventId>>,
    what: &str,
) -> Result<Option<ByConflict>> {
    let rules = room_version_rules(room_version)
        .ok_or_else(|| Error::other(format!("{what}: unsupported room version {room_version}")))?;
    let Some(first) = states.first() else {
        return Ok(None);
    };
    let conflicted = conflicted_slots(states);
    if conflicted.is_empty() {
        return Ok(Some(ByConflict {
            state: (*first).clone(),
            slots: conflicted,
            asked_unconflicted_chain: false,
        }));
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

    let mut loaded = Loaded::default();
    load(conflicted_events.iter().cloned().collect(), &mut loaded)?;
    let asked_unconflicted_chain;
    let (chains, slots) = {
        let fetch = |id: &EventId| match loaded.get(id) {
            Some(pdu) => pdu.clone(),
            None => fallback(id),
        };
        let mut chains: Vec<HashSet<OwnedEventId>> = per_state
            .iter()
            .map(|events| auth_chain(events.iter().map(|id| &**id), fetch))
            .collect();
        let undecided: HashSet<OwnedEventId> = chains
            .iter()
            .flatten()
            .filter(|id| {
                !conflicted_events.contains(*id) && !chains.iter().all(|c| c.contains(*id))
            })
            .cloned()
            .collect();
        // The full conflicted set: the conflicted events ruma can fetch, the
        // undecided events outside the unconflicted events' chain (in the auth
        // difference), and from room version 12 the conflicted state subgraph.
        let mut full_conflicted: HashSet<OwnedEventId> = conflicted_events.clone();
        asked_unconflicted_chain = !undecided.is_empty();
        if asked_unconflicted_chain {
            let unconflicted: Vec<&str> = first
                .iter()
                .filter(|(slot, _)| !conflicted.contains(*slot))
                .map(|(_, id)| &**id)
                .collect();
            // In every state's full chain: given to every chain, so that ruma's
            // auth difference leaves them out as the full chains would.
            let in_u = in_unconflicted_chain(unconflicted, &undecided)?;
            for chain in &mut chains {
                chain.extend(in_u.iter().cloned());
            }
            full_conflicted.extend(undecided.into_iter().filter(|id| !in_u.contains(id)));
        }
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
    Ok(Some(ByConflict {
        state,
        slots,
        asked_unconflicted_chain,
    }))
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
