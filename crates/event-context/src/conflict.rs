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
//!
//! Nor are the whole states needed to find the conflict: a context reads the
//! groups' differences as such (`StateStore::get_state_differences`), the
//! other slots above one by one ([`ConflictSource`]), and stores the result
//! as a delta on an input. Only a resolution that needs `chain(U)` reads a
//! whole state (the first group's, for `U`).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use ruma::events::StateEventType;
use ruma::state_res::utils::event_id_set::EventIdSet;
use ruma::{EventId, OwnedEventId, RoomVersionId};
use storage_core::{Error, Result};
use storage_state::StateDifferences;

use crate::auth::ruma_auth_types_for_pdu;
use crate::auth_chain::{auth_chain, conflicted_state_subgraph};
use crate::room_version::{room_version_rules, state_res_rules};
use crate::state_map::key_from_ruma;
use crate::{resolve_state_with_auth_chains, Pdu, StateKey, StateMap};

/// Events loaded for a resolution: `None` for one known to be missing.
/// Hashed with foldhash under a per-process random seed rather than SipHash:
/// ruma looks every event up here, again and again (137,385 lookups per three
/// merges of the state resolution benchmark). Event ids are chosen by remote
/// servers, so the seed stays random.
pub(crate) type Loaded = HashMap<OwnedEventId, Option<Arc<Pdu>>, foldhash::fast::RandomState>;

/// The slots on which `states` disagree: a value that differs, or a slot that
/// some of them lack.
#[cfg(test)]
pub(crate) fn conflicted_slots(states: &[&storage_state::StateMap]) -> BTreeSet<StateKey> {
    storage_state::differences_of_states(states)
        .into_keys()
        .collect()
}

/// The states a resolution merges, as [`resolve_by_conflict`] reads them:
/// what they disagree on, and only the few other slots it asks for.
pub(crate) trait ConflictSource {
    /// How many states.
    fn len(&self) -> usize;
    /// Per slot on which they disagree, each state's value.
    fn differences(&self) -> &StateDifferences;
    /// The value every state holds on each of `slots` (none of them
    /// conflicted) that they hold.
    fn agreed(&self, slots: &BTreeSet<StateKey>) -> Result<storage_state::StateMap>;
    /// The events of every slot they agree on.
    fn unconflicted(&self) -> Result<Vec<Arc<str>>>;
}

/// Whole states held in memory, as a [`ConflictSource`].
pub(crate) struct WholeStates<'a> {
    states: &'a [&'a storage_state::StateMap],
    differences: StateDifferences,
}

impl<'a> WholeStates<'a> {
    pub(crate) fn new(states: &'a [&'a storage_state::StateMap]) -> Self {
        WholeStates {
            states,
            differences: storage_state::differences_of_states(states),
        }
    }
}

impl ConflictSource for WholeStates<'_> {
    fn len(&self) -> usize {
        self.states.len()
    }

    fn differences(&self) -> &StateDifferences {
        &self.differences
    }

    fn agreed(&self, slots: &BTreeSet<StateKey>) -> Result<storage_state::StateMap> {
        let Some(first) = self.states.first() else {
            return Ok(Default::default());
        };
        Ok(slots
            .iter()
            .filter_map(|slot| first.get_key_value(slot))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn unconflicted(&self) -> Result<Vec<Arc<str>>> {
        let Some(first) = self.states.first() else {
            return Ok(Vec::new());
        };
        Ok(first
            .iter()
            .filter(|(slot, _)| !self.differences.contains_key(*slot))
            .map(|(_, id)| id.clone())
            .collect())
    }
}

/// A resolution from the states' conflict: the resolved state and each input
/// state on `slots`, outside which the result equals every input, and whether
/// the auth difference needed the unconflicted events' auth chain.
#[derive(Debug)]
pub(crate) struct ByConflict {
    pub(crate) resolved: storage_state::StateMap,
    pub(crate) inputs: Vec<storage_state::StateMap>,
    pub(crate) slots: BTreeSet<StateKey>,
    pub(crate) asked_unconflicted_chain: bool,
}

impl ByConflict {
    /// The whole resolved state, given the first input's whole state: only
    /// the slots that change (an insert into a map sharing its nodes with the
    /// group's copies the node path down to the slot).
    pub(crate) fn over(&self, first: &storage_state::StateMap) -> storage_state::StateMap {
        let mut state = first.clone();
        for slot in &self.slots {
            match self.resolved.get(slot) {
                Some(id) if first.get(slot) != Some(id) => {
                    state.insert(slot.clone(), id.clone());
                }
                None if first.contains_key(slot) => {
                    state.remove(slot);
                }
                _ => {}
            }
        }
        state
    }
}

pub(crate) fn parse_event_id(id: &str) -> Result<OwnedEventId> {
    OwnedEventId::try_from(id).map_err(|e| {
        Error::corrupt(format!(
            "stored state names a malformed event id {id:?}: {e}"
        ))
    })
}

/// Resolves the states of `source` (two or more) from their conflict, on the
/// slots outside which the result equals every one of them; `None` for no
/// states. `load` loads events with their auth chains into a [`Loaded`];
/// `fallback` finds any event it left out. An event in the auth chains of the
/// conflicted events that is neither conflicted itself nor in all of those
/// chains is in the auth difference unless the unconflicted events' auth chain
/// holds it: `in_unconflicted_chain(unconflicted, undecided)` says which of
/// `undecided` that chain holds (asked only when some are undecided). `what`
/// names the resolution in errors.
pub(crate) fn resolve_by_conflict(
    room_version: &RoomVersionId,
    source: &dyn ConflictSource,
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
    let n = source.len();
    if n == 0 {
        return Ok(None);
    }
    let differences = source.differences();
    if differences.is_empty() {
        return Ok(Some(ByConflict {
            resolved: Default::default(),
            inputs: vec![Default::default(); n],
            slots: BTreeSet::new(),
            asked_unconflicted_chain: false,
        }));
    }
    let per_state: Vec<Vec<OwnedEventId>> = (0..n)
        .map(|i| {
            differences
                .values()
                .filter_map(|values| values[i].as_deref())
                .map(parse_event_id)
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
        let mut chains: Vec<EventIdSet<OwnedEventId>> = per_state
            .iter()
            .map(|events| auth_chain(events.iter().map(|id| &**id), fetch))
            .collect();
        let undecided: HashSet<OwnedEventId> = chains
            .iter()
            .flatten()
            .filter(|id| !conflicted_events.contains(*id) && !chains.iter().all(|c| c.contains(id)))
            .cloned()
            .collect();
        // The full conflicted set: the conflicted events ruma can fetch, the
        // undecided events outside the unconflicted events' chain (in the auth
        // difference), and from room version 12 the conflicted state subgraph.
        let mut full_conflicted: HashSet<OwnedEventId> = conflicted_events.clone();
        asked_unconflicted_chain = !undecided.is_empty();
        if asked_unconflicted_chain {
            let unconflicted = source.unconflicted()?;
            // In every state's full chain: given to every chain, so that ruma's
            // auth difference leaves them out as the full chains would.
            let in_u =
                in_unconflicted_chain(unconflicted.iter().map(|id| &**id).collect(), &undecided)?;
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
        // The slots ruma's checks may read, and those the checks may fill:
        // gathered in hash sets as the events and ruma name them, then made
        // slots and ordered. Thousands of events name the same few slots (the
        // create event, the power levels, each member's own): each insert
        // into the ordered set compared slots a dozen times (HQ forks: 20,000
        // inserts for 1,700 slots, 50M of 1,406M instructions per three
        // merges, callgrind), and making each named slot a `StateKey` before
        // the set dropped it again cost 18M of 1,271M.
        let pdus: Vec<Arc<Pdu>> = full_conflicted.iter().filter_map(|id| fetch(id)).collect();
        let mut own: HashSet<(&str, &str), foldhash::fast::RandomState> = HashSet::default();
        let mut named: HashSet<(StateEventType, String), foldhash::fast::RandomState> =
            HashSet::default();
        named.insert((StateEventType::RoomPowerLevels, String::new()));
        named.insert((StateEventType::RoomCreate, String::new()));
        for pdu in &pdus {
            if let Some(state_key) = &pdu.state_key {
                own.insert((&pdu.event_type, state_key));
            }
            if let Ok(types) = ruma_auth_types_for_pdu(pdu) {
                named.extend(types);
            }
        }
        let mut slots: BTreeSet<StateKey> = differences.keys().cloned().collect();
        slots.extend(own.into_iter().map(|(t, k)| storage_state::key(t, k)));
        slots.extend(named.into_iter().map(key_from_ruma));
        (chains, slots)
    };

    let outside: BTreeSet<StateKey> = slots
        .iter()
        .filter(|slot| !differences.contains_key(*slot))
        .cloned()
        .collect();
    let agreed = source.agreed(&outside)?;
    let inputs: Vec<storage_state::StateMap> = (0..n)
        .map(|i| {
            slots
                .iter()
                .filter_map(|slot| {
                    let value = match differences.get(slot) {
                        Some(values) => values[i].clone(),
                        None => agreed.get(slot).cloned(),
                    };
                    value.map(|id| (slot.clone(), id))
                })
                .collect()
        })
        .collect();
    let reduced: Vec<StateMap> = inputs
        .iter()
        .map(|s| {
            s.iter()
                .map(|(slot, id)| Ok((slot.clone(), parse_event_id(id)?)))
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
    let by_ruma = resolve_state_with_auth_chains(room_version, &reduced, chains, fetch)
        .map_err(|e| Error::other(format!("{what}: {e}")))?;
    // The inputs' strings where they hold the same event: shared, not copied.
    let resolved = slots
        .iter()
        .filter_map(|slot| {
            let id = by_ruma.get(slot)?;
            let shared = inputs
                .iter()
                .filter_map(|s| s.get(slot))
                .find(|e| ***e == *id.as_str())
                .cloned();
            Some((
                slot.clone(),
                shared.unwrap_or_else(|| Arc::from(id.as_str())),
            ))
        })
        .collect();
    Ok(Some(ByConflict {
        resolved,
        inputs,
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
