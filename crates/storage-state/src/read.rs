//! Reading the state of groups: from the dictionary caches when they know
//! enough, otherwise from the database, filling the caches on the way.

use crate::caches::StateCaches;
use crate::filter::StateFilter;
use crate::schema::state_groups;
use crate::sql;
use crate::types::{StateGroup, StateKey, StateMap, MEMBER};
use diesel::prelude::*;
use std::collections::{BTreeSet, HashMap, HashSet};
use storage_core::cache::DictionaryCache;
use storage_core::{with_conn, Conn, Error, Result, Transaction};

/// Groups per recursive query.
const GROUP_BATCH: usize = 100;

/// Hops the per-hop walk takes before handing the rest of the chain to the
/// recursive query. Measured (`cargo xtask bench state`, SQLite): a hop costs
/// about 15 us, the recursive query over a 99-hop chain about 0.5 ms, so a walk
/// that finds its slots in the newest few groups wins by far, and one that must
/// go to the snapshot loses little.
const PER_HOP_LIMIT: usize = 8;

/// What `cache` knows of `group` under `filter`, and whether that is everything the
/// filter asks for.
pub(crate) fn from_cache(
    cache: &DictionaryCache<StateGroup, StateKey, String>,
    group: StateGroup,
    filter: &StateFilter,
) -> (StateMap, bool) {
    let entry = cache.get(&group);
    let state = select(filter, &entry.value);
    if entry.full || filter.is_full() {
        return (state, entry.full);
    }
    let complete =
        !filter.has_wildcards() && filter.concrete_types().iter().all(|k| entry.knows(k));
    (state, complete)
}

/// The part of a cached dictionary that `filter` asks for: looked up key by key
/// when the filter names its keys (an auth check asks for a handful of a room's
/// thousands of entries), otherwise by a pass over the entries.
fn select(filter: &StateFilter, value: &StateMap) -> StateMap {
    if filter.is_full() {
        // Shares the cached map: no copy.
        return value.clone();
    }
    if !filter.include_others() && !filter.has_wildcards() {
        return filter
            .concrete_types()
            .into_iter()
            .filter_map(|k| value.get(&k).map(|v| (k, v.clone())))
            .collect();
    }
    value
        .iter()
        .filter(|((t, k), _)| filter.includes(t, k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The state of `groups` under `filter`, cache first.
pub(crate) fn state_for_groups(
    caches: &StateCaches,
    db: &storage_core::Database,
    groups: &[StateGroup],
    filter: &StateFilter,
) -> Result<HashMap<StateGroup, StateMap>> {
    let (member_filter, non_member_filter) = filter.get_member_split();
    let mut result = HashMap::new();
    let mut incomplete = BTreeSet::new();
    for &group in groups {
        if result.contains_key(&group) || incomplete.contains(&group) {
            continue;
        }
        let (non_members, nm_complete) = from_cache(&caches.non_members, group, &non_member_filter);
        let (members, m_complete) = from_cache(&caches.members, group, &member_filter);
        if nm_complete && m_complete {
            // The two never share a key; `union` adds the smaller to the larger.
            result.insert(group, members.union(non_members));
        } else {
            incomplete.insert(group);
        }
    }
    if incomplete.is_empty() {
        return Ok(result);
    }

    // Taken before the read: a fill based on it is dropped if anything was
    // invalidated meanwhile.
    let seq_members = caches.members.sequence();
    let seq_non_members = caches.non_members.sequence();
    // Fetch a little more than asked, so that the caches get whole dictionaries.
    let db_filter = filter.return_expanded();
    let incomplete: Vec<StateGroup> = incomplete.into_iter().collect();
    let fetched = db.run_read("get_state_for_groups", |txn| {
        fetch(txn, &incomplete, &db_filter)
    })?;

    let (db_members, db_non_members) = db_filter.get_member_split();
    let member_keys = (!db_members.is_full()).then(|| db_members.concrete_types());
    let non_member_keys = (!db_non_members.is_full()).then(|| db_non_members.concrete_types());
    for (group, state) in fetched {
        let (members, non_members): (StateMap, StateMap) = state
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .partition(|((t, _), _)| t == MEMBER);
        caches
            .members
            .update(seq_members, group, members, member_keys.as_deref());
        caches.non_members.update(
            seq_non_members,
            group,
            non_members,
            non_member_keys.as_deref(),
        );
        result.insert(group, filter.filter_state_owned(state));
    }
    Ok(result)
}

/// Reads the state of `groups` from the database, inside `txn`. Fails naming
/// any group that does not exist.
pub(crate) fn fetch(
    txn: &mut Transaction<'_>,
    groups: &[StateGroup],
    filter: &StateFilter,
) -> Result<HashMap<StateGroup, StateMap>> {
    // A client-side walk pays one statement per hop; it wins only where statements
    // are cheap and a filter without wildcards lets it stop early.
    let per_hop = txn.engine().round_trips_are_cheap() && !filter.has_wildcards();
    let mut result: HashMap<StateGroup, StateMap> = HashMap::with_capacity(groups.len());
    if per_hop {
        for &group in groups {
            result.insert(group, walk_per_hop(txn.conn(), group, filter)?);
        }
    } else {
        for batch in groups.chunks(GROUP_BATCH) {
            walk_recursive(txn.conn(), batch, filter, &mut result)?;
        }
    }
    let empty: Vec<StateGroup> = groups
        .iter()
        .copied()
        .filter(|g| result.get(g).is_none_or(|s| s.is_empty()))
        .collect();
    if !empty.is_empty() {
        // No rows: a group whose (filtered) state is empty, or no group at all.
        let known: HashSet<StateGroup> = with_conn!(txn.conn(), |c| state_groups::table
            .select(state_groups::id)
            .filter(state_groups::id.eq_any(&empty))
            .load::<i64>(c))?
        .into_iter()
        .collect();
        let unknown: Vec<StateGroup> = empty.into_iter().filter(|g| !known.contains(g)).collect();
        if !unknown.is_empty() {
            return Err(Error::not_found(format!(
                "unknown state group(s) {unknown:?}"
            )));
        }
    }
    for &group in groups {
        result.entry(group).or_default();
    }
    Ok(result)
}

fn walk_recursive(
    conn: &mut Conn,
    groups: &[StateGroup],
    filter: &StateFilter,
    result: &mut HashMap<StateGroup, StateMap>,
) -> Result<()> {
    // Per (root, slot), the row from the highest group on the chain wins.
    let mut best: HashMap<StateGroup, HashMap<StateKey, (StateGroup, String)>> = HashMap::new();
    for row in sql::chain_rows(conn, groups, filter)? {
        let slots = best.entry(row.root).or_default();
        match slots.get_mut(&(row.event_type.clone(), row.state_key.clone())) {
            Some(existing) if existing.0 >= row.state_group => {}
            Some(existing) => *existing = (row.state_group, row.event_id),
            None => {
                slots.insert(
                    (row.event_type, row.state_key),
                    (row.state_group, row.event_id),
                );
            }
        }
    }
    for (root, slots) in best {
        result.insert(root, slots.into_iter().map(|(k, (_, e))| (k, e)).collect());
    }
    Ok(())
}

/// Walks from `group` down its edges one statement per hop, asking each hop only
/// for the slots still missing, and stops as soon as none is. After
/// [`PER_HOP_LIMIT`] hops the rest of the chain goes to the recursive query.
fn walk_per_hop(conn: &mut Conn, group: StateGroup, filter: &StateFilter) -> Result<StateMap> {
    use crate::schema::state_group_edges as edges;
    let mut state = StateMap::new();
    let mut remaining: HashSet<StateKey> = filter.concrete_types().into_iter().collect();
    let mut current = group;
    for _ in 0..PER_HOP_LIMIT {
        for row in sql::group_rows(conn, current, &slots_filter(&remaining))? {
            let slot = (row.event_type, row.state_key);
            remaining.remove(&slot);
            state.entry(slot).or_insert(row.event_id);
        }
        if remaining.is_empty() {
            return Ok(state);
        }
        let prev: Option<i64> = with_conn!(conn, |c| edges::table
            .select(edges::prev_state_group)
            .filter(edges::state_group.eq(current))
            .first::<i64>(c)
            .optional())?;
        match prev {
            // Only downwards: corrupt data cannot make the walk loop.
            Some(p) if p < current => current = p,
            _ => return Ok(state),
        }
    }
    let mut rest = HashMap::new();
    walk_recursive(conn, &[current], &slots_filter(&remaining), &mut rest)?;
    state.extend(rest.remove(&current).unwrap_or_default());
    Ok(state)
}

fn slots_filter(slots: &HashSet<StateKey>) -> StateFilter {
    StateFilter::from_types(slots.iter().map(|(t, k)| (t.as_str(), Some(k.as_str()))))
}
