//! Reading the state of groups: from the dictionary caches when they know
//! enough, otherwise from the database, filling the caches on the way.

use crate::caches::StateCaches;
use crate::filter::{MemberHalf, StateFilter};
use crate::schema::state_groups;
use crate::sql;
use crate::types::{Slot, StateGroup, StateKey, StateMap, MEMBER};
use diesel::prelude::*;
use diesel::row::Row;
use hashbrown::HashTable;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use storage_core::cache::{flat_hash, DictionaryCache};
use storage_core::{
    intern, with_conn, Conn, Engine, Error, RawBackend, RawRow, Result, RowVisitor, Transaction,
    TxnOptions,
};

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
    cache: &DictionaryCache<StateGroup, StateKey, Arc<str>>,
    group: StateGroup,
    filter: &StateFilter,
) -> (StateMap, bool) {
    let (part, complete) = cached_part(cache, group, filter);
    (part.into_map(), complete)
}

/// One cache's part of a group's state.
enum Part {
    Map(StateMap),
    /// The entries of slots a filter named one by one (a few, typically).
    Entries(Vec<(StateKey, Arc<str>)>),
}

impl Part {
    fn into_map(self) -> StateMap {
        match self {
            Part::Map(map) => map,
            Part::Entries(entries) => entries.into_iter().collect(),
        }
    }

    /// The two caches' parts of one group's state (they never share a key)
    /// as one map. A few named entries beside a map (lazy-loaded members
    /// beside the other state) go straight into the map's overlay, without
    /// first becoming a map of their own, nor being looked up there.
    fn join(self, other: Part) -> StateMap {
        match (self, other) {
            // `union` adds the smaller to the larger.
            (Part::Map(a), Part::Map(b)) => a.union(b),
            (Part::Map(mut map), Part::Entries(entries))
            | (Part::Entries(entries), Part::Map(mut map)) => {
                map.extend_absent(entries);
                map
            }
            (Part::Entries(mut a), Part::Entries(b)) => {
                a.extend(b);
                a.into_iter().collect()
            }
        }
    }
}

fn cached_part(
    cache: &DictionaryCache<StateGroup, StateKey, Arc<str>>,
    group: StateGroup,
    filter: &StateFilter,
) -> (Part, bool) {
    let entry = cache.get(&group);
    if filter.is_full() {
        return whole(&entry);
    }
    if !filter.include_others() && !filter.has_wildcards() {
        return named(&entry, filter.concrete_slots());
    }
    matching(&entry, filter)
}

type Entry = storage_core::cache::DictionaryEntry<StateKey, Arc<str>>;

/// All that `entry` holds: the cached map shared, no copy.
fn whole(entry: &Entry) -> (Part, bool) {
    (Part::Map(entry.value.clone()), entry.full)
}

/// The entries of `slots`, named one by one (an auth check, lazy-loaded
/// members): looked up key by key rather than by a pass over thousands of
/// entries. Borrowed slots: no key is built; the answer shares the cache's.
fn named<'a>(entry: &Entry, slots: impl Iterator<Item = Slot<'a>>) -> (Part, bool) {
    let mut complete = true;
    let mut found = Vec::new();
    for slot in slots {
        match entry.value.get_key_value(&slot) {
            Some((k, v)) => found.push((k.clone(), v.clone())),
            None => complete &= entry.full || entry.known_absent.contains(&slot),
        }
    }
    (Part::Entries(found), complete)
}

/// The entries of `entry` that `filter` includes; wildcards can only be
/// answered by a whole dictionary.
fn matching(entry: &Entry, filter: &StateFilter) -> (Part, bool) {
    let state = entry
        .value
        .iter()
        .filter(|((t, k), _)| filter.includes(t, k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    (Part::Map(state), entry.full)
}

/// [`cached_part`] of each cache under its half of `filter`
/// ([`StateFilter::get_member_split`]), members first, without building
/// the halves: a warm lazy-loading read copied its 20 member keys into a
/// filter of their own on every read.
fn cached_parts(
    caches: &StateCaches,
    group: StateGroup,
    filter: &StateFilter,
) -> ((Part, bool), (Part, bool)) {
    let members = caches.members.get(&group);
    let members = match filter.member_half() {
        MemberHalf::All => whole(&members),
        MemberHalf::Keys(keys) => named(&members, keys.iter().map(|k| Slot(MEMBER, k))),
        MemberHalf::Nothing => named(&members, std::iter::empty()),
    };
    let others = caches.non_members.get(&group);
    let other_types = || filter.types().iter().filter(|(t, _)| t.as_str() != MEMBER);
    let others = if filter.include_others() && other_types().next().is_none() {
        whole(&others)
    } else if !filter.include_others() && other_types().all(|(_, keys)| keys.is_some()) {
        let slots = filter.concrete_slots().filter(|Slot(t, _)| *t != MEMBER);
        named(&others, slots)
    } else {
        // For every type but the member type, `filter` includes what its
        // half does.
        matching(&others, filter)
    };
    (members, others)
}

/// The whole state of `group` if the caches hold it (an O(1) copy), else
/// `None`; reads nothing.
pub(crate) fn cached_full_state(caches: &StateCaches, group: StateGroup) -> Option<StateMap> {
    if let Some(state) = caches.full_states.get(&group) {
        return Some(state);
    }
    let all = StateFilter::all();
    let (members, m_complete) = cached_part(&caches.members, group, &all);
    if !m_complete {
        return None;
    }
    let (non_members, nm_complete) = cached_part(&caches.non_members, group, &all);
    nm_complete.then(|| members.join(non_members))
}

/// The state of `groups` under `filter`, cache first.
pub(crate) fn state_for_groups(
    caches: &StateCaches,
    db: &storage_core::Database,
    groups: &[StateGroup],
    filter: &StateFilter,
) -> Result<HashMap<StateGroup, StateMap>> {
    let full = filter.is_full();
    let mut result = HashMap::new();
    let mut incomplete = BTreeSet::new();
    for &group in groups {
        if result.contains_key(&group) || incomplete.contains(&group) {
            continue;
        }
        if full {
            if let Some(state) = caches.full_states.get(&group) {
                result.insert(group, state);
                continue;
            }
        }
        let ((members, m_complete), (non_members, nm_complete)) =
            cached_parts(caches, group, filter);
        if nm_complete && m_complete {
            let state = members.join(non_members);
            if full {
                caches.full_states.insert(group, state.clone());
            }
            result.insert(group, state);
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
    // A read of named slots seeks each through the index: planned so, and
    // (PostgreSQL) its statement alone, without BEGIN and COMMIT: one
    // statement per group ([`reads_per_slot`]), and the check for unknown
    // groups after it needs no snapshot in common with it (groups are only
    // ever deleted whole).
    let options = if reads_per_slot(db.engine(), &incomplete, &db_filter) {
        TxnOptions::read_seeking()
    } else {
        TxnOptions::read_only()
    };
    let fetched = db.run_interaction_with("get_state_for_groups", options, |txn| {
        fetch_split(txn, &incomplete, &db_filter)
    })?;

    let (db_members, db_non_members) = db_filter.get_member_split();
    let member_keys = (!db_members.is_full()).then(|| db_members.concrete_types());
    let non_member_keys = (!db_non_members.is_full()).then(|| db_non_members.concrete_types());
    for (group, split) in fetched {
        // The caches and the answer share the maps: cloning one is O(1).
        caches.members.update(
            seq_members,
            group,
            split.members.clone(),
            member_keys.as_deref(),
        );
        caches.non_members.update(
            seq_non_members,
            group,
            split.others.clone(),
            non_member_keys.as_deref(),
        );
        let state = filter.filter_state_owned(split.into_state());
        if full {
            caches.full_states.insert(group, state.clone());
        }
        result.insert(group, state);
    }
    Ok(result)
}

/// The state of one group as read from the database, split the way the two
/// caches hold it.
#[derive(Debug, Default)]
pub(crate) struct SplitState {
    pub(crate) members: StateMap,
    pub(crate) others: StateMap,
}

impl SplitState {
    fn is_empty(&self) -> bool {
        self.members.is_empty() && self.others.is_empty()
    }

    pub(crate) fn into_state(self) -> StateMap {
        // The two never share a key; `union` adds the smaller to the larger.
        self.members.union(self.others)
    }
}

/// Reads the state of `groups` from the database, inside `txn`. Fails naming
/// any group that does not exist.
pub(crate) fn fetch(
    txn: &mut Transaction<'_>,
    groups: &[StateGroup],
    filter: &StateFilter,
) -> Result<HashMap<StateGroup, StateMap>> {
    Ok(fetch_split(txn, groups, filter)?
        .into_iter()
        .map(|(g, s)| (g, s.into_state()))
        .collect())
}

/// [`fetch`], each group's state split into members and the rest.
fn fetch_split(
    txn: &mut Transaction<'_>,
    groups: &[StateGroup],
    filter: &StateFilter,
) -> Result<HashMap<StateGroup, SplitState>> {
    let engine = txn.engine();
    let per_hop = reads_per_hop(engine, filter);
    let per_slot = reads_per_slot(engine, groups, filter);
    let key_arms = sql::key_arms(engine);
    let in_chain = sql::InChain::new(engine);
    let row_ids = sql::RowIds::new(engine);
    let mut result: HashMap<StateGroup, SplitState> = HashMap::with_capacity(groups.len());
    if per_hop {
        for &group in groups {
            result.insert(
                group,
                split(walk_per_hop(txn.conn(), group, filter, key_arms)?),
            );
        }
    } else if per_slot {
        for &group in groups {
            let mut newest = NewestRows::new(&[group]);
            sql::newest_slot_rows(
                txn.conn(),
                engine,
                &in_chain,
                group,
                filter,
                key_arms,
                &mut newest,
            )?;
            newest.finish(&mut result);
        }
    } else {
        for batch in groups.chunks(GROUP_BATCH) {
            walk_recursive(txn.conn(), batch, filter, key_arms, &row_ids, &mut result)?;
        }
    }
    let empty: Vec<StateGroup> = groups
        .iter()
        .copied()
        .filter(|g| result.get(g).is_none_or(SplitState::is_empty))
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
            return Err(unknown_groups(txn.conn(), &unknown)?);
        }
    }
    for &group in groups {
        result.entry(group).or_default();
    }
    Ok(result)
}

/// Whether [`fetch_split`] walks the chain one statement per hop: a
/// client-side walk pays a statement per hop, and wins only where statements
/// are cheap and a filter without wildcards lets it stop early.
fn reads_per_hop(engine: &dyn Engine, filter: &StateFilter) -> bool {
    engine.round_trips_are_cheap() && !filter.has_wildcards()
}

/// Whether [`fetch_split`] seeks the slots `filter` names one by one, each
/// from the top of the chain down to the first group holding it
/// ([`sql::newest_slot_rows`], a statement per group: so for one group, or
/// where statements are cheap), where the per-hop walk does not.
fn reads_per_slot(engine: &dyn Engine, groups: &[StateGroup], filter: &StateFilter) -> bool {
    !reads_per_hop(engine, filter)
        && filter.has_concrete_slots()
        && (groups.len() == 1 || engine.round_trips_are_cheap())
}

/// The error for `unknown`, groups asked for that are not stored: not
/// found, unless an event maps to one of them. That is damage (the event's
/// state is gone; a caller that took the group from the event, such as the
/// context of a new event over it, has nothing wrong with its request):
/// inconsistent data, naming the first few such events.
pub(crate) fn unknown_groups(conn: &mut Conn, unknown: &[StateGroup]) -> Result<Error> {
    use crate::schema::event_to_state_groups as etsg;
    let mapped: Vec<(String, i64)> = with_conn!(conn, |c| etsg::table
        .select((etsg::event_id, etsg::state_group))
        .filter(etsg::state_group.eq_any(unknown))
        .order((etsg::state_group, etsg::event_id))
        .limit(3)
        .load(c))?;
    if mapped.is_empty() {
        return Ok(Error::not_found(format!(
            "unknown state group(s) {unknown:?}"
        )));
    }
    let events: Vec<String> = mapped
        .iter()
        .map(|(event, group)| format!("{event} to {group}"))
        .collect();
    Ok(Error::corrupt(format!(
        "state group(s) {unknown:?} do not exist, though events map to them: {}",
        events.join(", ")
    )))
}

fn split(state: StateMap) -> SplitState {
    let (members, others) = state.into_iter().partition(|((t, _), _)| &**t == MEMBER);
    SplitState { members, others }
}

/// Per slot, the row of the highest group on the chain seen so far, filed
/// under the slot's [`flat_hash`]: looked up by the row's borrowed text (no
/// key built for a slot already seen), and the maps built from these hashes
/// without hashing any key again.
type Newest = HashTable<NewestRow>;

struct NewestRow {
    hash: u64,
    key: StateKey,
    group: StateGroup,
    event_id: Arc<str>,
}

fn walk_recursive(
    conn: &mut Conn,
    groups: &[StateGroup],
    filter: &StateFilter,
    key_arms: usize,
    row_ids: &sql::RowIds,
    result: &mut HashMap<StateGroup, SplitState>,
) -> Result<()> {
    let mut newest = NewestRows::new(groups);
    sql::chain_rows_for(conn, groups, filter, key_arms, row_ids, &mut newest)?;
    newest.finish(result);
    Ok(())
}

/// Rows from the chains below some groups, kept per group and slot from the
/// highest group on the chain: a [`RowVisitor`] of the rows of
/// [`sql::chain_rows`] and its kin, columns `(root, state_group, type,
/// state_key, event_id)`, the type `NULL` for the member type.
///
/// The chain is walked from the top, so a slot's newest row mostly comes
/// first: a row whose slot already holds a higher group is dropped having
/// read only its group and slot, borrowed from the row; its event id is never
/// read, and nothing is allocated for it (on the HQ room, 50,330 of the
/// 88,269 rows). Rows in any other order are still kept right: a row of a
/// higher group replaces the one held.
struct NewestRows {
    newest: HashMap<StateGroup, Newest>,
    /// Rows arrive root by root: the root's map between rows.
    current: Option<(StateGroup, Newest)>,
    /// The root of every row where one group's chain is read: its column is
    /// not read.
    only_root: Option<StateGroup>,
}

impl NewestRows {
    /// For the rows of the chains of `groups`.
    fn new(groups: &[StateGroup]) -> Self {
        NewestRows {
            newest: HashMap::new(),
            current: None,
            only_root: match groups {
                [group] => Some(*group),
                _ => None,
            },
        }
    }

    fn finish(mut self, result: &mut HashMap<StateGroup, SplitState>) {
        if let Some((root, slots)) = self.current.take() {
            self.newest.insert(root, slots);
        }
        for (root, slots) in self.newest {
            // Built whole, not inserted one by one: each map is sorted into
            // its array once, from the hashes already taken. The members
            // (most of a room's state) sized once, not grown by doubling.
            let n = slots.len();
            let mut members = (Vec::with_capacity(n), Vec::with_capacity(n));
            let mut others = (Vec::new(), Vec::new());
            for NewestRow {
                hash,
                key,
                event_id,
                ..
            } in slots
            {
                let part = if &*key.0 == MEMBER {
                    &mut members
                } else {
                    &mut others
                };
                part.0.push(hash);
                part.1.push((key, event_id));
            }
            let state = SplitState {
                members: StateMap::from_hashed(members.0, members.1),
                others: StateMap::from_hashed(others.0, others.1),
            };
            result.insert(root, state);
        }
    }
}

impl RowVisitor for NewestRows {
    fn visit<'a, DB: RawBackend, R: Row<'a, DB>>(&mut self, row: RawRow<'_, DB, R>) -> Result<()> {
        let root = match self.only_root {
            Some(root) => root,
            None => row.int(0)?,
        };
        let group = row.int(1)?;
        if self.current.as_ref().is_none_or(|(r, _)| *r != root) {
            if let Some((r, slots)) = self.current.take() {
                self.newest.insert(r, slots);
            }
            let slots = self.newest.remove(&root).unwrap_or_default();
            self.current = Some((root, slots));
        }
        let Some((_, slots)) = self.current.as_mut() else {
            return Ok(());
        };
        let event_type = row.text_or_null(2, |t| t.map_or_else(sql::member_type, intern))?;
        row.text(3, |state_key| {
            let hash = flat_hash(&Slot(&event_type, state_key));
            let same = |e: &NewestRow| {
                (Arc::ptr_eq(&e.key.0, &event_type) || *e.key.0 == *event_type)
                    && *e.key.1 == *state_key
            };
            if let Some(held) = slots.find_mut(hash, same) {
                if held.group < group {
                    held.group = group;
                    held.event_id = row.text(4, |e| Arc::<str>::from(e))?;
                } else if held.group == group {
                    // Two rows for one slot in one group (Synapse's table has
                    // no unique key): the smaller event id, whichever way
                    // the rows were read ([`keep_row`]).
                    row.text(4, |e| {
                        if keep_row(e, &held.event_id) {
                            held.event_id = Arc::from(e);
                        }
                    })?;
                }
                return Ok(());
            }
            let event_id = row.text(4, |e| Arc::<str>::from(e))?;
            slots.insert_unique(
                hash,
                NewestRow {
                    hash,
                    key: (event_type.clone(), Arc::from(state_key)),
                    group,
                    event_id,
                },
                |e| e.hash,
            );
            Ok(())
        })?
    }
}

/// Walks from `group` down its edges one statement per hop, asking each hop only
/// for the slots still missing, and stops as soon as none is. After
/// [`PER_HOP_LIMIT`] hops the rest of the chain goes to the recursive query.
fn walk_per_hop(
    conn: &mut Conn,
    group: StateGroup,
    filter: &StateFilter,
    key_arms: usize,
) -> Result<StateMap> {
    use crate::schema::state_group_edges as edges;
    let mut state = StateMap::new();
    let mut remaining: HashSet<StateKey> = filter.concrete_types().into_iter().collect();
    let mut current = group;
    for _ in 0..PER_HOP_LIMIT {
        for row in sql::group_rows(conn, current, &slots_filter(&remaining), key_arms)? {
            let slot = (row.event_type.0, row.state_key.0);
            // Only slots still missing are asked for: one already in `state`
            // is this group's own (a second row for it).
            let held: Option<&Arc<str>> = state.get(&slot);
            if held.is_some_and(|held| !keep_row(&row.event_id.0, held)) {
                continue;
            }
            remaining.remove(&slot);
            state.insert(slot, row.event_id.0);
        }
        if remaining.is_empty() {
            return Ok(state);
        }
        let prev: Vec<i64> = with_conn!(conn, |c| edges::table
            .select(edges::prev_state_group)
            .filter(edges::state_group.eq(current))
            .limit(2)
            .load::<i64>(c))?;
        match prev[..] {
            // Only downwards, as the recursive query: corrupt data cannot
            // make the walk loop.
            [p] if p < current => current = p,
            [_] | [] => return Ok(state),
            // Two prev groups (Synapse's table allows it): a slot's newest
            // row is the highest group's of both chains, which the recursive
            // query keeps; the rows found so far are of higher groups.
            _ => break,
        }
    }
    let mut rest = HashMap::new();
    walk_recursive(
        conn,
        &[current],
        &slots_filter(&remaining),
        key_arms,
        &sql::RowIds::none(),
        &mut rest,
    )?;
    if let Some(rest) = rest.remove(&current) {
        state.extend(rest.into_state());
    }
    Ok(state)
}

/// Of two rows one group holds for one slot (Synapse's `state_groups_state`
/// has no unique key, and old databases hold such pairs), whether `candidate`
/// replaces `held`: the smaller event id is kept, so that every read of the
/// group (full, filtered, per hop or per slot, on either engine, in whatever
/// order the rows come) answers the same event. Synapse itself answers
/// whichever row its query meets first, which differs between its engines.
pub(crate) fn keep_row(candidate: &str, held: &str) -> bool {
    candidate < held
}

fn slots_filter(slots: &HashSet<StateKey>) -> StateFilter {
    StateFilter::from_types(slots.iter().map(|(t, k)| (&**t, Some(&**k))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::key;
    use std::collections::{BTreeMap, BTreeSet};
    use storage_core::StoreConfig;

    fn map(entries: &[(&str, &str, &str)]) -> StateMap {
        entries
            .iter()
            .map(|(t, k, e)| (key(t, k), Arc::from(*e)))
            .collect()
    }

    fn filter(types: &[(&str, Option<&[&str]>)], others: bool) -> StateFilter {
        let types: BTreeMap<String, Option<BTreeSet<String>>> = types
            .iter()
            .map(|(t, keys)| {
                let keys = keys.map(|ks| ks.iter().map(|k| k.to_string()).collect());
                (t.to_string(), keys)
            })
            .collect();
        StateFilter::new(types, others)
    }

    /// The parts read without building the filter's halves are the parts
    /// read under its halves, whatever the caches know of a group.
    #[test]
    fn cached_parts_are_the_parts_of_the_member_split() {
        let caches = StateCaches::new(&StoreConfig::default());
        let members = map(&[(MEMBER, "@a", "$a"), (MEMBER, "@b", "$b")]);
        let others = map(&[("m.room.name", "", "$n"), ("m.room.topic", "", "$t")]);
        // Group 1: members fetched for two keys (one absent), others whole.
        let fetched = [key(MEMBER, "@a"), key(MEMBER, "@z")];
        caches.members.update(
            caches.members.sequence(),
            1,
            members.clone(),
            Some(&fetched),
        );
        caches
            .non_members
            .update(caches.non_members.sequence(), 1, others.clone(), None);
        // Group 2: members whole, others fetched for one slot.
        caches
            .members
            .update(caches.members.sequence(), 2, members.clone(), None);
        let fetched = [key("m.room.name", "")];
        caches.non_members.update(
            caches.non_members.sequence(),
            2,
            map(&[("m.room.name", "", "$n")]),
            Some(&fetched),
        );
        // Group 3: nothing known.
        let filters = [
            StateFilter::all(),
            StateFilter::none(),
            StateFilter::from_lazy_load_member_list(["@a", "@z"]),
            StateFilter::from_lazy_load_member_list(["@b"]),
            filter(&[(MEMBER, None)], false),
            filter(
                &[(MEMBER, Some(&["@a"])), ("m.room.name", Some(&[""]))],
                false,
            ),
            filter(&[("m.room.name", None)], false),
            filter(&[("m.room.name", None), (MEMBER, Some(&["@b"]))], false),
            filter(&[("m.room.name", Some(&[]))], true),
            filter(
                &[(MEMBER, Some(&["@a"])), ("m.room.topic", Some(&[""]))],
                true,
            ),
            filter(&[(MEMBER, Some(&[]))], true),
        ];
        for group in 1..=3 {
            for f in &filters {
                let (member_half, other_half) = f.get_member_split();
                let halves = (
                    cached_part(&caches.members, group, &member_half),
                    cached_part(&caches.non_members, group, &other_half),
                );
                let parts = cached_parts(&caches, group, f);
                let open = |((m, mc), (o, oc)): ((Part, bool), (Part, bool))| {
                    (m.into_map(), mc, o.into_map(), oc)
                };
                assert_eq!(open(parts), open(halves), "group {group}, {f:?}");
            }
        }
    }
}
