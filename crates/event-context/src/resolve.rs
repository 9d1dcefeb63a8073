//! State resolution: merging the states of several forks of a room into one, with ruma's
//! `state_res::resolve`.
//!
//! ruma implements state resolution v2 (room versions 2 to 11) and v2.1 (room version 12,
//! MSC4297: iterative auth checks start from an empty state and the conflicted state
//! subgraph joins the full conflicted set). It does not implement v1, so rooms of version 1
//! are resolved with v2.0 here, where Synapse uses v1 (see
//! [`state_res_rules`](crate::state_res_rules)).

use std::sync::Arc;

use ruma::{
    state_res::{self, utils::event_id_set::EventIdSet},
    EventId, OwnedEventId, RoomVersionId,
};

use crate::{
    auth_chain::{auth_chain, conflicted_state_subgraph},
    room_version::{room_version_rules, state_res_rules},
    state_map::{from_ruma, to_ruma},
    Pdu, ResolveError, StateMap,
};

/// Resolves `state_sets` (the states at the forks being merged) into one state.
///
/// `fetch_event` must find every event of the state sets and of their auth chains (events it
/// cannot find drop out of the resolution, as ruma does not "honour events it cannot
/// verify"). The auth chains are computed by walking `auth_events` through `fetch_event`;
/// use [`resolve_state_with_auth_chains`] to supply them instead.
pub fn resolve_state(
    room_version: &RoomVersionId,
    state_sets: &[StateMap],
    fetch_event: impl Fn(&EventId) -> Option<Arc<Pdu>>,
) -> Result<StateMap, ResolveError> {
    let auth_chains = state_sets
        .iter()
        .map(|set| auth_chain(set.values().map(|id| &**id), &fetch_event))
        .collect();
    resolve_state_with_auth_chains(room_version, state_sets, auth_chains, fetch_event)
}

/// [`resolve_state`] with the full auth chain of each state set given by the caller
/// (`auth_chains[i]` = every event reachable through `auth_events` from the events of
/// `state_sets[i]`).
pub fn resolve_state_with_auth_chains(
    room_version: &RoomVersionId,
    state_sets: &[StateMap],
    auth_chains: Vec<EventIdSet<OwnedEventId>>,
    fetch_event: impl Fn(&EventId) -> Option<Arc<Pdu>>,
) -> Result<StateMap, ResolveError> {
    let rules = room_version_rules(room_version)
        .ok_or_else(|| ResolveError::UnsupportedRoomVersion(room_version.to_string()))?;
    match state_sets {
        [] => return Ok(StateMap::new()),
        [single] => return Ok(single.clone()),
        _ => {}
    }

    let ruma_sets: Vec<_> = state_sets.iter().map(to_ruma).collect();
    let resolved = state_res::resolve(
        &rules.authorization,
        &state_res_rules(&rules),
        &ruma_sets,
        auth_chains,
        &fetch_event,
        |conflicted| {
            let ids = conflicted.values().flatten().cloned();
            Some(conflicted_state_subgraph(ids, &fetch_event))
        },
    )?;
    Ok(from_ruma(resolved))
}
