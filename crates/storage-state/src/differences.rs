//! What the states of several groups disagree on, read as such: the slots on
//! which they differ and each group's value there, without building any
//! group's whole state.
//!
//! State resolution needs only that (and a few more slots, read one by one):
//! at Matrix HQ's size two forks disagree on 1,696 of ~31,000 slots, and
//! reading both whole states only to compare them was half of a resolution's
//! time (issue 14). A group's state is its chain's rows, newest per slot, so
//! two chains can differ only on
//!
//! - the slots of the rows above the highest group both chains pass through
//!   (on a live server forks are short, and that is a few rows), or, when the
//!   chains share no group (each fork crossed a snapshot of its own),
//! - those of the rows above each chain's snapshot, and the slots on which
//!   the two snapshots differ: PostgreSQL compares them itself
//!   ([`sql::differing_rows`]) and sends only the differing rows; SQLite,
//!   whose rows cost little to hand over and whose comparison costs more
//!   than reading both, has both snapshots read whole (and cached).
//!
//! A candidate slot's value on a side is its newest row above that side's base
//! (the shared group or the snapshot), else the base's value: from the
//! snapshots' comparison, or, where the bases agree, the one base's state read
//! for those slots alone (through the caches).
//!
//! Measured (`cargo xtask bench state`, state_resolution): two short forks
//! of the HQ room sharing a chain (40 conflicted) resolve from cold caches in
//! ~5 ms against ~55 ms reading both whole states; the HQ forks that share no
//! group (1,696 conflicted, a snapshot each) cost what reading both whole
//! states costs on SQLite.

use crate::caches::StateCaches;
use crate::filter::StateFilter;
use crate::read;
use crate::sql;
use crate::types::{StateGroup, StateKey, StateMap};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use storage_core::{Database, Error, Result};

/// Per slot on which some of the groups asked about disagree, each group's
/// value there (`None`: the group lacks the slot), in the order the groups were
/// given. Every slot outside it holds the same value (or none) in every group.
pub type StateDifferences = BTreeMap<StateKey, Vec<Option<Arc<str>>>>;

/// [`StateDifferences`] of states held in full.
pub fn of_states(states: &[&StateMap]) -> StateDifferences {
    let mut slots = BTreeSet::new();
    if let Some((first, rest)) = states.split_first() {
        // Compared side by side in their arrays' order, not slot by slot.
        for state in rest {
            slots.extend(first.differing_keys(state).into_iter().cloned());
        }
    }
    slots
        .into_iter()
        .map(|slot| {
            let values = states.iter().map(|s| s.get(&slot).cloned()).collect();
            (slot, values)
        })
        .collect()
}

/// Two groups' values on one slot (`None`: the group lacks it).
type Both = (Option<Arc<str>>, Option<Arc<str>>);

/// Two groups' values on each slot where they differ.
type PairDifferences = HashMap<StateKey, Both>;

/// [`StateDifferences`] of `groups`, all written, read from the database
/// (see the module comment). Unknown groups are an error.
pub(crate) fn read(
    caches: &StateCaches,
    db: &Database,
    groups: &[StateGroup],
) -> Result<StateDifferences> {
    let Some((&first, rest)) = groups.split_first() else {
        return Ok(StateDifferences::new());
    };
    let mut chains: HashMap<StateGroup, Vec<StateGroup>> = HashMap::new();
    db.run_read("get_state_chains", |txn| {
        chains.clear();
        for (root, group) in sql::chain_groups(txn.conn(), groups)? {
            chains.entry(root).or_default().push(group);
        }
        Ok(())
    })?;
    let unknown: Vec<StateGroup> = groups
        .iter()
        .copied()
        .filter(|g| !chains.contains_key(g))
        .collect();
    if !unknown.is_empty() {
        return Err(Error::not_found(format!(
            "unknown state group(s) {unknown:?}"
        )));
    }
    for chain in chains.values_mut() {
        // Highest first: each group's prev group has the smaller id.
        chain.sort_unstable_by(|a, b| b.cmp(a));
        chain.dedup();
    }
    let pairs: Vec<PairDifferences> = rest
        .iter()
        .map(|&other| {
            pair(
                caches,
                db,
                (first, &chains[&first]),
                (other, &chains[&other]),
            )
        })
        .collect::<Result<_>>()?;
    let mut out = StateDifferences::new();
    for differences in &pairs {
        for (slot, (first_value, _)) in differences {
            out.entry(slot.clone()).or_insert_with(|| {
                // Where a group does not differ from the first, it holds the
                // first's value.
                let mut values = vec![first_value.clone()];
                values.extend(pairs.iter().map(|other| match other.get(slot) {
                    Some((_, v)) => v.clone(),
                    None => first_value.clone(),
                }));
                values
            });
        }
    }
    Ok(out)
}

/// Where groups `a` and `b` (with their chains, highest first) differ.
fn pair(
    caches: &StateCaches,
    db: &Database,
    (a, chain_a): (StateGroup, &[StateGroup]),
    (b, chain_b): (StateGroup, &[StateGroup]),
) -> Result<PairDifferences> {
    if a == b {
        return Ok(PairDifferences::new());
    }
    let in_b: HashSet<StateGroup> = chain_b.iter().copied().collect();
    // The highest group on both chains, else each chain's lowest group (its
    // snapshot): the bases below which nothing is read row by row.
    let (base_a, base_b) = match chain_a.iter().find(|g| in_b.contains(g)) {
        Some(&shared) => (shared, shared),
        None => (
            *chain_a.last().expect("a chain holds its group"),
            *chain_b.last().expect("a chain holds its group"),
        ),
    };
    let above_a: Vec<StateGroup> = chain_a.iter().copied().filter(|g| *g > base_a).collect();
    let above_b: Vec<StateGroup> = chain_b.iter().copied().filter(|g| *g > base_b).collect();
    let above_a_set: HashSet<StateGroup> = above_a.iter().copied().collect();
    let above_b_set: HashSet<StateGroup> = above_b.iter().copied().collect();
    let mut above: Vec<StateGroup> = above_a.iter().chain(&above_b).copied().collect();
    above.sort_unstable();
    above.dedup();

    // Per side, the newest row above its base for each slot.
    let mut newest_a: HashMap<StateKey, (StateGroup, Arc<str>)> = HashMap::new();
    let mut newest_b: HashMap<StateKey, (StateGroup, Arc<str>)> = HashMap::new();
    let mut bases: PairDifferences = PairDifferences::new();
    let compared_by_server = base_a != base_b && !db.engine().round_trips_are_cheap();
    db.run_read("get_state_differences", |txn| {
        newest_a.clear();
        newest_b.clear();
        bases.clear();
        sql::rows_of_groups(txn.conn(), &above, |row| {
            let slot: StateKey = (row.event_type.0, row.state_key.0);
            for (side, newest) in [(&above_a_set, &mut newest_a), (&above_b_set, &mut newest_b)] {
                if !side.contains(&row.state_group) {
                    continue;
                }
                match newest.get(&slot) {
                    Some((g, _)) if *g >= row.state_group => {}
                    _ => {
                        newest.insert(slot.clone(), (row.state_group, row.event_id.0.clone()));
                    }
                }
            }
        })?;
        // A server compares the bases itself and sends only what differs. An
        // in-process engine compares far less cheaply than it hands rows
        // over (seeking each slot of one base in the other cost SQLite 620M
        // instructions per HQ-sized resolution, merging the two in slot order
        // 440M, against ~400M for reading both in full; callgrind): there
        // both bases are read whole below, and kept in the caches.
        if compared_by_server {
            sql::differing_rows(txn.conn(), base_a, base_b, |row| {
                let slot = (row.event_type.0, row.state_key.0);
                bases.insert(slot, (row.first.map(|t| t.0), row.second.map(|t| t.0)));
            })?;
        }
        Ok(())
    })?;

    if base_a != base_b && !compared_by_server {
        let whole = read::state_for_groups(caches, db, &[base_a, base_b], &StateFilter::all())?;
        let (sa, sb) = (&whole[&base_a], &whole[&base_b]);
        for slot in sa.differing_keys(sb) {
            bases.insert(slot.clone(), (sa.get(slot).cloned(), sb.get(slot).cloned()));
        }
    }
    // The bases agree outside `bases`: a slot a side has no row above its base
    // for takes the base's value there, read for those slots alone.
    let from_base: BTreeSet<&StateKey> = newest_a
        .keys()
        .chain(newest_b.keys())
        .filter(|k| !bases.contains_key(*k))
        .filter(|k| !newest_a.contains_key(*k) || !newest_b.contains_key(*k))
        .collect();
    let base_state = if from_base.is_empty() {
        StateMap::new()
    } else {
        let filter = StateFilter::from_types(from_base.iter().map(|(t, k)| (&**t, Some(&**k))));
        read::state_for_groups(caches, db, &[base_a], &filter)?
            .remove(&base_a)
            .unwrap_or_default()
    };
    let value = |newest: &HashMap<StateKey, (StateGroup, Arc<str>)>,
                 slot: &StateKey,
                 from_bases: fn(&Both) -> &Option<Arc<str>>|
     -> Option<Arc<str>> {
        match newest.get(slot) {
            Some((_, e)) => Some(e.clone()),
            None => match bases.get(slot) {
                Some(both) => from_bases(both).clone(),
                None => base_state.get(slot).cloned(),
            },
        }
    };
    let candidates: BTreeSet<&StateKey> = newest_a
        .keys()
        .chain(newest_b.keys())
        .chain(bases.keys())
        .collect();
    let mut out = PairDifferences::new();
    for slot in candidates {
        let va = value(&newest_a, slot, |b| &b.0);
        let vb = value(&newest_b, slot, |b| &b.1);
        if va != vb {
            out.insert(slot.clone(), (va, vb));
        }
    }
    Ok(out)
}
