//! Walks of the auth DAG (events linked by `auth_events`) that state resolution needs.
//!
//! ruma's `resolve` takes the full auth chain of every state set (to compute the auth
//! difference), and from room version 12 on asks for the conflicted state subgraph; it
//! computes neither itself. Both are computed here from events fetched one by one, which
//! suits small rooms and tests; a store that keeps auth chains indexed can pass its own to
//! [`resolve_state_with_auth_chains`](crate::resolve_state_with_auth_chains).

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use ruma::{state_res::utils::event_id_set::EventIdSet, EventId, OwnedEventId};

use crate::Pdu;

/// The auth chain of a set of events: every event reachable from them through
/// `auth_events` (the events themselves only when another one reaches them),
/// in the set ruma's resolution takes.
///
/// An id is copied (onto the stack, into the set) only the first time it is
/// reached: the events of a large conflict name the same few auth events (the
/// create event, the power levels, the join rules) thousands of times.
///
/// Events that `fetch_event` cannot find are left out (and logged): they have no
/// `auth_events` to follow.
pub fn auth_chain<'a>(
    event_ids: impl IntoIterator<Item = &'a EventId>,
    fetch_event: impl Fn(&EventId) -> Option<Arc<Pdu>>,
) -> EventIdSet<OwnedEventId> {
    // Only whole-state resolutions (small rooms, tests) take ruma's set; the
    // resolution of large conflicts walks with `auth_chain_set` directly.
    auth_chain_set(event_ids, fetch_event).into_iter().collect()
}

/// [`auth_chain`] in a set hashed with foldhash under a per-process random
/// seed (event ids are chosen by remote servers), for a resolution's own
/// bookkeeping: ruma's [`EventIdSet`] hashes with SipHash.
pub(crate) fn auth_chain_set<'a>(
    event_ids: impl IntoIterator<Item = &'a EventId>,
    fetch_event: impl Fn(&EventId) -> Option<Arc<Pdu>>,
) -> IdSet {
    let mut chain = IdSet::default();
    let mut todo: Vec<OwnedEventId> = Vec::new();
    let mut reach_from = |id: &EventId, todo: &mut Vec<OwnedEventId>| match fetch_event(id) {
        Some(pdu) => {
            for auth in &pdu.auth_events {
                if !chain.contains(auth) {
                    chain.insert(auth.clone());
                    todo.push(auth.clone());
                }
            }
        }
        None => log::warn!("auth chain: event {id} not found, not following its auth events"),
    };
    for id in event_ids {
        reach_from(id, &mut todo);
    }
    while let Some(id) = todo.pop() {
        reach_from(&id, &mut todo);
    }
    chain
}

/// Event ids hashed with foldhash under a per-process random seed.
pub(crate) type IdSet = HashSet<OwnedEventId, foldhash::fast::RandomState>;

/// The conflicted state subgraph (room version 12, MSC4297): the events that are both
/// ancestors and descendants, through `auth_events`, of events in the conflicted state set.
/// The conflicted events themselves are included; ruma adds them to the full conflicted set
/// anyway.
pub(crate) fn conflicted_state_subgraph(
    conflicted: impl IntoIterator<Item = OwnedEventId>,
    fetch_event: impl Fn(&EventId) -> Option<Arc<Pdu>>,
) -> EventIdSet<OwnedEventId> {
    let conflicted: HashSet<OwnedEventId> = conflicted.into_iter().collect();
    // For each event reachable from a conflicted event: does it reach a conflicted event
    // (itself included)? `None` while it is being visited.
    let mut reaches: HashMap<OwnedEventId, Option<bool>> = HashMap::new();
    // Depth-first, post-order: (event, its auth events once fetched).
    let mut stack: Vec<(OwnedEventId, Option<Vec<OwnedEventId>>)> =
        conflicted.iter().map(|id| (id.clone(), None)).collect();

    while let Some((id, parents)) = stack.pop() {
        match parents {
            None => {
                if reaches.contains_key(&id) {
                    continue;
                }
                reaches.insert(id.clone(), None);
                let parents = fetch_event(&id)
                    .map(|pdu| pdu.auth_events.clone())
                    .unwrap_or_default();
                let unvisited: Vec<_> = parents
                    .iter()
                    .filter(|p| !reaches.contains_key(*p))
                    .cloned()
                    .collect();
                stack.push((id, Some(parents)));
                stack.extend(unvisited.into_iter().map(|p| (p, None)));
            }
            Some(parents) => {
                let reached = conflicted.contains(&id)
                    || parents
                        .iter()
                        .any(|p| matches!(reaches.get(p), Some(Some(true))));
                reaches.insert(id, Some(reached));
            }
        }
    }

    reaches
        .into_iter()
        .filter(|(_, reached)| *reached == Some(true))
        .map(|(id, _)| id)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use ruma::RoomVersionId;

    use super::*;

    /// Member events of a version 2 room whose auth events are given by name.
    fn dag(edges: &[(&str, &[&str])]) -> HashMap<OwnedEventId, Arc<Pdu>> {
        edges
            .iter()
            .map(|(name, auth)| {
                let auth: Vec<String> = auth.iter().map(|a| format!("${a}:x")).collect();
                let json = serde_json::json!({
                    "event_id": format!("${name}:x"), "room_id": "!r:x", "sender": "@a:x",
                    "type": "m.room.member", "state_key": "@a:x",
                    "content": { "membership": "join" }, "prev_events": [],
                    "auth_events": auth, "depth": 1, "origin_server_ts": 1,
                });
                let pdu = Pdu::from_json(&json.to_string(), Some(&RoomVersionId::V2)).unwrap();
                (pdu.event_id.clone(), Arc::new(pdu))
            })
            .collect()
    }

    fn ids(names: &[&str]) -> HashSet<OwnedEventId> {
        names
            .iter()
            .map(|n| OwnedEventId::try_from(format!("${n}:x")).unwrap())
            .collect()
    }

    #[test]
    fn auth_chain_and_conflicted_subgraph() {
        // A <- B <- C <- D, and E <- A: E's chain is {A}.
        let events = dag(&[
            ("A", &[]),
            ("B", &["A"]),
            ("C", &["B"]),
            ("D", &["C"]),
            ("E", &["A"]),
        ]);
        let fetch = |id: &EventId| events.get(id).cloned();

        let d = ids(&["D"]);
        let chain: HashSet<OwnedEventId> = auth_chain(d.iter().map(|id| &**id), fetch)
            .into_iter()
            .collect();
        assert_eq!(chain, ids(&["A", "B", "C"]));

        // Between the conflicted B and D lies C; A is only an ancestor, E only unrelated.
        let subgraph = conflicted_state_subgraph(ids(&["B", "D", "E"]), fetch);
        let subgraph: HashSet<OwnedEventId> = subgraph.into_iter().collect();
        assert_eq!(subgraph, ids(&["B", "C", "D", "E"]));
    }
}
