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
//!   events of that part (undecided): those it holds are in every full chain,
//!   the others are the auth difference beyond the conflicted events, which
//!   is all ruma is handed of the chains (it adds the conflicted events
//!   itself, and uses the chains for nothing but their difference). Whether
//!   `chain(U)` holds them is asked of the stored `event_auth` ids (a walk of ids, no event parsed), and only when some
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
use crate::auth_chain::{auth_chain_set, conflicted_state_subgraph, IdSet};
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
    in_unconflicted_chain: impl FnOnce(Vec<&str>, &IdSet) -> Result<IdSet>,
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
    let conflicted_events: IdSet = per_state.iter().flatten().cloned().collect();

    let mut loaded = Loaded::default();
    load(conflicted_events.iter().cloned().collect(), &mut loaded)?;
    let asked_unconflicted_chain;
    let (chains, slots) = {
        let fetch = |id: &EventId| match loaded.get(id) {
            Some(pdu) => pdu.clone(),
            None => fallback(id),
        };
        let chains: Vec<IdSet> = per_state
            .iter()
            .map(|events| auth_chain_set(events.iter().map(|id| &**id), fetch))
            .collect();
        // The auth difference outside the conflicted events: the events of
        // the chains in some but not all of them, less those the
        // unconflicted events' chain holds (in every state's full chain).
        let mut beyond: IdSet = chains
            .iter()
            .flatten()
            .filter(|id| {
                !conflicted_events.contains(*id) && !chains.iter().all(|c| c.contains(*id))
            })
            .cloned()
            .collect();
        asked_unconflicted_chain = !beyond.is_empty();
        if asked_unconflicted_chain {
            let unconflicted = source.unconflicted()?;
            let in_u =
                in_unconflicted_chain(unconflicted.iter().map(|id| &**id).collect(), &beyond)?;
            beyond.retain(|id| !in_u.contains(id));
        }
        // ruma takes the auth chains only for their difference (the events
        // in some but not all of them), which it adds to the conflicted
        // events: handed that part beyond the conflicted events as the first
        // chain and nothing as the others, it computes the same full
        // conflicted set as from the full chains, without hashing every
        // event of every chain again (the conflicted events are in it
        // anyway). `crates/main-process/tests/resolution.rs` checks the
        // answer against the resolution over whole states and full chains.
        let mut chains: Vec<EventIdSet<OwnedEventId>> = vec![EventIdSet::new(); n];
        chains[0] = beyond.iter().cloned().collect();
        // The full conflicted set: the conflicted events ruma can fetch, the
        // auth difference beyond them, and from room version 12 the
        // conflicted state subgraph.
        let mut full_conflicted: IdSet = conflicted_events.clone();
        full_conflicted.extend(beyond);
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
        // Most of them are slots the states disagree on, already ordered in
        // `differences`: only the others are made slots and ordered (adding
        // the 3,400 of the HQ forks to the ordered set, each compared a dozen
        // times, cost 19M of 1,057M instructions per three merges).
        let differing: HashSet<(&str, &str), foldhash::fast::RandomState> =
            differences.keys().map(|(t, k)| (&**t, &**k)).collect();
        let mut slots: Vec<StateKey> = own
            .into_iter()
            .filter(|slot| !differing.contains(slot))
            .map(|(t, k)| storage_state::key(t, k))
            .collect();
        slots.extend(
            named
                .into_iter()
                .map(key_from_ruma)
                .filter(|(t, k)| !differing.contains(&(&**t, &**k))),
        );
        slots.extend(differences.keys().cloned());
        let slots: BTreeSet<StateKey> = slots.into_iter().collect();
        (chains, slots)
    };

    // Each slot beside its values where the states disagree there: `slots`
    // holds every slot of `differences`, and both are in slot order, so one
    // walk pairs them (a lookup per slot and state compared slots a dozen
    // times each).
    let mut differing = differences.iter().peekable();
    type Values<'a> = Option<&'a [Option<Arc<str>>]>;
    let by_slot: Vec<(&StateKey, Values)> = slots
        .iter()
        .map(|slot| match differing.next_if(|(k, _)| *k == slot) {
            Some((_, values)) => (slot, Some(values.as_slice())),
            None => (slot, None),
        })
        .collect();
    let outside: BTreeSet<StateKey> = by_slot
        .iter()
        .filter(|(_, values)| values.is_none())
        .map(|(slot, _)| (*slot).clone())
        .collect();
    let agreed = source.agreed(&outside)?;
    let inputs: Vec<storage_state::StateMap> = (0..n)
        .map(|i| {
            by_slot
                .iter()
                .filter_map(|(slot, values)| {
                    let value = match values {
                        Some(values) => values[i].clone(),
                        None => agreed.get(*slot).cloned(),
                    };
                    value.map(|id| ((*slot).clone(), id))
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

    /// Events of a version 2 room by name: (name, type, state key, content,
    /// auth events by name), sent by `@a:x` at increasing timestamps.
    fn room(events: &[(&str, &str, &str, serde_json::Value, &[&str])]) -> Loaded {
        events
            .iter()
            .enumerate()
            .map(|(i, (name, event_type, state_key, content, auth))| {
                let auth: Vec<String> = auth.iter().map(|a| format!("${a}:x")).collect();
                let json = serde_json::json!({
                    "event_id": format!("${name}:x"), "room_id": "!r:x", "sender": "@a:x",
                    "type": event_type, "state_key": state_key, "content": content,
                    "prev_events": [], "auth_events": auth, "depth": i + 1,
                    "origin_server_ts": i + 1,
                });
                let pdu = Pdu::from_json(&json.to_string(), Some(&RoomVersionId::V2)).unwrap();
                (pdu.event_id.clone(), Some(Arc::new(pdu)))
            })
            .collect()
    }

    /// The resolution from the conflict hands ruma only the part of the auth
    /// difference beyond the conflicted events (as one chain, the others
    /// empty), not the full chains: it must resolve as ruma does over the
    /// whole states with their full auth chains. Here the difference holds
    /// a power levels event no state holds (`P2`, cited by one state's topic
    /// only), which decides the order of the topics: leaving it out changes
    /// the answer.
    #[test]
    fn reduced_auth_chains_resolve_as_the_full_chains() {
        use serde_json::json;
        let events = room(&[
            (
                "C",
                "m.room.create",
                "",
                json!({"creator": "@a:x", "room_version": "2"}),
                &[],
            ),
            (
                "M",
                "m.room.member",
                "@a:x",
                json!({"membership": "join"}),
                &["C"],
            ),
            (
                "P",
                "m.room.power_levels",
                "",
                json!({"users": {"@a:x": 100}}),
                &["C", "M"],
            ),
            (
                "J",
                "m.room.join_rules",
                "",
                json!({"join_rule": "public"}),
                &["C", "M", "P"],
            ),
            (
                "P2",
                "m.room.power_levels",
                "",
                json!({"users": {"@a:x": 100}, "events_default": 50}),
                &["C", "M", "P"],
            ),
            (
                "T1",
                "m.room.topic",
                "",
                json!({"topic": "one"}),
                &["C", "M", "P2"],
            ),
            (
                "T2",
                "m.room.topic",
                "",
                json!({"topic": "two"}),
                &["C", "M", "P"],
            ),
        ]);
        let slot =
            |t: &str, k: &str, e: &str| (storage_state::key(t, k), Arc::from(format!("${e}:x")));
        let base = [
            slot("m.room.create", "", "C"),
            slot("m.room.member", "@a:x", "M"),
            slot("m.room.power_levels", "", "P"),
            slot("m.room.join_rules", "", "J"),
        ];
        let a: storage_state::StateMap = base
            .iter()
            .cloned()
            .chain([slot("m.room.topic", "", "T1")])
            .collect();
        let b: storage_state::StateMap = base
            .iter()
            .cloned()
            .chain([slot("m.room.topic", "", "T2")])
            .collect();
        let fetch = |id: &EventId| events.get(id).cloned().flatten();
        let parsed = |s: &storage_state::StateMap| -> StateMap {
            s.iter()
                .map(|(k, v)| (k.clone(), parse_event_id(v).unwrap()))
                .collect()
        };

        let full =
            crate::resolve_state(&RoomVersionId::V2, &[parsed(&a), parsed(&b)], fetch).unwrap();
        let by_conflict = resolve_by_conflict(
            &RoomVersionId::V2,
            &WholeStates::new(&[&a, &b]),
            |ids, loaded| {
                for id in ids {
                    loaded.insert(id.clone(), events.get(&id).cloned().flatten());
                }
                Ok(())
            },
            fetch,
            |unconflicted, undecided| {
                let ids: Vec<OwnedEventId> = unconflicted
                    .iter()
                    .map(|id| parse_event_id(id).unwrap())
                    .collect();
                let chain = auth_chain_set(ids.iter().map(|id| &**id), fetch);
                Ok(undecided
                    .iter()
                    .filter(|id| chain.contains(*id))
                    .cloned()
                    .collect())
            },
            "test",
        )
        .unwrap()
        .unwrap();
        assert!(by_conflict.asked_unconflicted_chain);
        let resolved = by_conflict.over(&a);
        let full: storage_state::StateMap = full
            .iter()
            .map(|(k, v)| (k.clone(), Arc::from(v.as_str())))
            .collect();
        assert_eq!(resolved, full);
        // P2, in the auth difference only, puts T1 after T2 in the mainline
        // order (without it, T1's earlier timestamp would put it first and T2
        // would win); the unconflicted P stays.
        assert_eq!(
            resolved
                .get(&storage_state::key("m.room.topic", ""))
                .map(|e| &**e),
            Some("$T1:x")
        );
        assert_eq!(
            resolved
                .get(&storage_state::key("m.room.power_levels", ""))
                .map(|e| &**e),
            Some("$P:x")
        );
    }

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
