//! What the states of several groups disagree on, read as such: the slots on
//! which they differ and each group's value there, without building any
//! group's whole state.
//!
//! State resolution needs only that (and a few more slots, read one by one):
//! at Matrix HQ's size two forks disagree on 1,696 of ~31,000 slots, and
//! reading both whole states only to compare them was half of a resolution's
//! time (issue 14). A group's state is its chain's rows, newest per slot, so
//! two chains can differ only on the slots of the rows above the highest
//! group both chains pass through (on a live server forks are short, and
//! that is a few rows).
//!
//! A fork longer than a chain may be crosses snapshots of its own, and
//! there the chains share no group. A snapshot's rows are the whole room,
//! but the event it was written for says what it is: the state of its prev
//! event's group with one slot set ([`SnapshotOrigin`], found by the caller's
//! [`SnapshotOrigins`], in practice [`StoredOrigins`] from the events tables).
//! So each way down goes on through its lowest snapshot's origin (the way
//! whose lowest group is the higher first) until the two meet, standing the
//! snapshot's rows for that one row, and the forks are compared from where
//! they meet, as forks on a shared chain are: one statement per snapshot
//! crossed, in one read transaction, on both engines. Where an origin is
//! missing (a snapshot written for a rejected event, or one with several
//! prev events), the two lowest snapshots are compared: PostgreSQL compares
//! them itself ([`sql::differing_rows`]) and sends only the differing rows;
//! SQLite, whose rows cost little to hand over and whose comparison costs
//! more than reading both, has both snapshots read whole (and cached).
//!
//! A candidate slot's value on a side is its newest row above that side's base
//! (the shared group or the snapshot), else the base's value: from the
//! snapshots' comparison, or, where the bases agree, the one base's state read
//! for those slots alone (through the caches for a few; for many, the rows of
//! the base's deltas and a seek per slot in its snapshot).
//!
//! Measured (`cargo xtask bench state`, state_resolution): two short forks
//! of the HQ room sharing a chain (40 conflicted) resolve from cold caches in
//! ~5 ms against ~55 ms reading both whole states; see the commit that added
//! the origins for the HQ forks (9 snapshots each, 1,696 conflicted).

use crate::caches::StateCaches;
use crate::filter::StateFilter;
use crate::read;
use crate::sql;
use crate::types::{StateGroup, StateKey, StateMap};
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use storage_core::{Conn, Database, Result};

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

/// Hashed with foldhash under a per-process random seed rather than SipHash
/// (state keys are chosen by remote servers, so the seed stays random): a
/// comparison of the HQ forks hashes each of thousands of slots several times.
type Hasher = foldhash::fast::RandomState;

/// Two groups' values on each slot where they differ.
type PairDifferences = HashMap<StateKey, Both, Hasher>;

/// Per slot, the newest row seen: its group and its event.
type Newest = HashMap<StateKey, (StateGroup, Arc<str>), Hasher>;

/// Keeps the row of `group` for `slot` unless a row of a higher group (a
/// newer one on the chain) is already kept; of two rows of one group for
/// the slot (Synapse's table has no unique key), the smaller event id, as
/// every read of the group keeps it ([`read::keep_row`]), whichever comes
/// first.
fn keep_newest(newest: &mut Newest, slot: &StateKey, group: StateGroup, event: &Arc<str>) {
    match newest.get_mut(slot) {
        Some((g, _)) if *g > group => {}
        Some((g, held)) if *g == group => {
            if read::keep_row(event, held) {
                *held = event.clone();
            }
        }
        _ => {
            newest.insert(slot.clone(), (group, event.clone()));
        }
    }
}

/// What a snapshot was made from, as the event it was written for shows:
/// the state of `prev` (a group with the smaller id) with `slot` set to
/// `event_id`. A snapshot with an origin stands, in a comparison, for that
/// one row over `prev`'s chain, so that two forks whose chains each crossed
/// snapshots of their own (a fork longer than
/// [`MAX_STATE_DELTA_HOPS`](crate::MAX_STATE_DELTA_HOPS)) are compared from
/// the group where they meet, as forks on a shared chain are, instead of
/// comparing two snapshots of the whole room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotOrigin {
    pub prev: StateGroup,
    pub slot: StateKey,
    pub event_id: Arc<str>,
}

/// Finds [`SnapshotOrigin`]s, within the read transaction of the comparison
/// that walks through them (`conn`). The state tables cannot say (a snapshot
/// has no edge); the events tables can ([`StoredOrigins`]); [`NoOrigins`]
/// where none is known.
pub trait SnapshotOrigins {
    /// The origin of `group`, `None` when its event does not vouch for one.
    fn snapshot_origin(&self, conn: &mut Conn, group: StateGroup)
        -> Result<Option<SnapshotOrigin>>;

    /// The origin of `group` and the chain of its prev group (ids highest
    /// first, the prev group itself included; none: it does not exist). By
    /// default [`Self::snapshot_origin`] and then a walk of the chain: two
    /// statements.
    fn origin_and_chain(
        &self,
        conn: &mut Conn,
        group: StateGroup,
    ) -> Result<Option<(SnapshotOrigin, Vec<StateGroup>)>> {
        let Some(origin) = self.snapshot_origin(conn, group)? else {
            return Ok(None);
        };
        let chain = highest_first(
            sql::chain_groups(conn, &[origin.prev])?
                .into_iter()
                .map(|(_, g)| g)
                .collect(),
        );
        Ok(Some((origin, chain)))
    }
}

/// No snapshot's origin known: snapshots are compared by their rows.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoOrigins;

impl SnapshotOrigins for NoOrigins {
    fn snapshot_origin(&self, _: &mut Conn, _: StateGroup) -> Result<Option<SnapshotOrigin>> {
        Ok(None)
    }
}

/// Snapshot origins as the stored events show them, counted.
///
/// The state after an accepted state event is the state before it with the
/// event's slot set to it, and the state before an event with one prev event
/// is the state after that prev event. So a group written for such an event,
/// and still the event's group, is the prev event's group with one slot set,
/// whatever rows it was stored as: a snapshot, when the prev group's chain
/// was already [`MAX_STATE_DELTA_HOPS`](crate::MAX_STATE_DELTA_HOPS) long.
/// An event rejected, not a state event, with several prev events (its state
/// before is a resolution), or no longer mapped to the group vouches for
/// nothing. Each hop is one statement ([`sql::origin_chain`]): the origin and
/// the next chain together.
#[derive(Debug, Default)]
pub struct StoredOrigins {
    followed: AtomicU64,
}

impl StoredOrigins {
    /// Snapshots whose origin was found so far.
    pub fn followed(&self) -> u64 {
        self.followed.load(Ordering::Relaxed)
    }
}

impl SnapshotOrigins for StoredOrigins {
    fn snapshot_origin(
        &self,
        conn: &mut Conn,
        group: StateGroup,
    ) -> Result<Option<SnapshotOrigin>> {
        Ok(self
            .origin_and_chain(conn, group)?
            .map(|(origin, _)| origin))
    }

    fn origin_and_chain(
        &self,
        conn: &mut Conn,
        group: StateGroup,
    ) -> Result<Option<(SnapshotOrigin, Vec<StateGroup>)>> {
        let mut origin = None;
        let mut chain = Vec::new();
        sql::origin_chain(conn, group, |row| {
            if let (Some(t), Some(k), Some(e)) = (row.event_type, row.state_key, row.event_id) {
                origin = Some(SnapshotOrigin {
                    prev: row.state_group,
                    slot: (t.0, k.0),
                    event_id: e.0,
                });
            }
            chain.push(row.state_group);
        })?;
        let Some(origin) = origin else {
            return Ok(None);
        };
        self.followed.fetch_add(1, Ordering::Relaxed);
        Ok(Some((origin, highest_first(chain))))
    }
}

/// Snapshot origins followed per comparison of two groups, at most: each is a
/// statement and a chain of up to [`MAX_STATE_DELTA_HOPS`] groups whose rows
/// are then read, so a fork crossing more snapshots than this is
/// compared by its snapshots' rows instead. The HQ forks of the state
/// resolution benchmark (848 leaves each) cross 9 each.
///
/// [`MAX_STATE_DELTA_HOPS`]: crate::MAX_STATE_DELTA_HOPS
const ORIGIN_HOPS: usize = 32;

/// Slots whose value a comparison takes from the base group from which a
/// filtered read of the base ([`read::state_for_groups`], a statement per
/// hop and the rest of the chain sought slot by slot) costs more than reading
/// the rows of the base's deltas and seeking the rest in its snapshot
/// ([`base_values`]).
const FEW_BASE_SLOTS: usize = 64;

/// The chain of each of `groups` that exists, its ids highest first (each
/// group's prev group has the smaller id); an unknown group has none.
fn chains_of(db: &Database, groups: &[StateGroup]) -> Result<HashMap<StateGroup, Vec<StateGroup>>> {
    let mut chains: HashMap<StateGroup, Vec<StateGroup>> = HashMap::new();
    db.run_read("get_state_chains", |txn| {
        chains.clear();
        for (root, group) in sql::chain_groups(txn.conn(), groups)? {
            chains.entry(root).or_default().push(group);
        }
        Ok(())
    })?;
    Ok(chains
        .into_iter()
        .map(|(root, chain)| (root, highest_first(chain)))
        .collect())
}

/// A chain's groups once each, highest first: each group's prev group has
/// the smaller id, so this is the order down the chain.
fn highest_first(mut chain: Vec<StateGroup>) -> Vec<StateGroup> {
    chain.sort_unstable_by(|a, b| b.cmp(a));
    chain.dedup();
    chain
}

/// [`StateDifferences`] of `groups`, all written, read from the database
/// (see the module comment), following the snapshots' `origins`. Unknown
/// groups are an error.
pub(crate) fn read(
    caches: &StateCaches,
    db: &Database,
    groups: &[StateGroup],
    origins: &dyn SnapshotOrigins,
) -> Result<StateDifferences> {
    let Some((&first, rest)) = groups.split_first() else {
        return Ok(StateDifferences::new());
    };
    let chains = chains_of(db, groups)?;
    let unknown: Vec<StateGroup> = groups
        .iter()
        .copied()
        .filter(|g| !chains.contains_key(g))
        .collect();
    if !unknown.is_empty() {
        return Err(db.run_read("unknown_state_groups", |txn| {
            read::unknown_groups(txn.conn(), &unknown)
        })?);
    }
    let pairs: Vec<PairDifferences> = rest
        .iter()
        .map(|&other| {
            pair(
                caches,
                db,
                origins,
                Side::new(first, chains[&first].clone()),
                Side::new(other, chains[&other].clone()),
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

/// One group's way down to where a comparison starts: its chain, highest
/// first, then through each lowest snapshot's origin the chain of the
/// origin's prev group. Ids fall all the way down (a prev group and an
/// origin's prev have smaller ids), so the group of a row tells which row is
/// newer, as on one chain.
#[derive(Debug, Clone)]
struct Side {
    group: StateGroup,
    groups: Vec<StateGroup>,
    /// The snapshots on `groups` that stand for their origin's one row.
    by_origin: HashMap<StateGroup, (StateKey, Arc<str>)>,
}

impl Side {
    fn new(group: StateGroup, chain: Vec<StateGroup>) -> Self {
        Side {
            group,
            groups: chain,
            by_origin: HashMap::new(),
        }
    }

    fn lowest(&self) -> StateGroup {
        *self.groups.last().expect("a chain holds its group")
    }

    /// Goes on below the lowest group through its origin; false when it has
    /// none (or one that would not lead down).
    fn extend(&mut self, conn: &mut Conn, origins: &dyn SnapshotOrigins) -> Result<bool> {
        let lowest = self.lowest();
        let Some((origin, chain)) = origins.origin_and_chain(conn, lowest)? else {
            return Ok(false);
        };
        if origin.prev >= lowest || chain.is_empty() {
            return Ok(false);
        }
        self.by_origin
            .insert(lowest, (origin.slot, origin.event_id));
        self.groups.extend(chain);
        Ok(true)
    }

    /// The groups above `base` whose own rows count (not the snapshots
    /// standing for their origins).
    fn rows_above(&self, base: StateGroup) -> impl Iterator<Item = StateGroup> + '_ {
        self.groups
            .iter()
            .copied()
            .filter(move |g| *g > base && !self.by_origin.contains_key(g))
    }

    /// The chain of `group` (on this side) as the database holds it: from
    /// it down to the first group that is a snapshot standing for its
    /// origin, or to the lowest.
    fn real_chain(&self, group: StateGroup) -> &[StateGroup] {
        let Some(at) = self.groups.iter().position(|g| *g == group) else {
            return &[];
        };
        let rest = &self.groups[at..];
        let end = rest
            .iter()
            .position(|g| self.by_origin.contains_key(g))
            .map_or(rest.len(), |i| i + 1);
        &rest[..end]
    }
}

/// The highest group on both ways down, if any. Both hold their groups
/// highest first (ids fall all the way down a way, through origins too), so
/// one walk down both finds it, with no set built per call (the HQ forks'
/// comparisons ask 18 times a merge, over ways of hundreds of groups).
fn shared_group(a: &Side, b: &Side) -> Option<StateGroup> {
    let (mut i, mut j) = (0, 0);
    while let (Some(&x), Some(&y)) = (a.groups.get(i), b.groups.get(j)) {
        match x.cmp(&y) {
            std::cmp::Ordering::Equal => return Some(x),
            std::cmp::Ordering::Greater => i += 1,
            std::cmp::Ordering::Less => j += 1,
        }
    }
    None
}

/// Where groups `a` and `b` (with their chains, highest first) differ.
fn pair(
    caches: &StateCaches,
    db: &Database,
    origins: &dyn SnapshotOrigins,
    mut side_a: Side,
    mut side_b: Side,
) -> Result<PairDifferences> {
    if side_a.group == side_b.group {
        return Ok(PairDifferences::default());
    }
    // The highest group on both ways down, else each way's lowest group (its
    // snapshot): the bases below which nothing is read row by row. Where the
    // chains do not meet, the side whose lowest group is the higher goes on
    // through its snapshot's origin (the other cannot reach any group below
    // that side's) until they meet, or an origin is missing: one statement
    // per snapshot crossed, all in one read transaction (on PostgreSQL each
    // statement is a round trip; the HQ forks cross 18 snapshots).
    let (base_a, base_b) = match shared_group(&side_a, &side_b) {
        Some(shared) => (shared, shared),
        None => {
            let (start_a, start_b) = (side_a.clone(), side_b.clone());
            db.run_read("get_state_differences.walk", |txn| {
                side_a.clone_from(&start_a);
                side_b.clone_from(&start_b);
                for _ in 0..ORIGIN_HOPS {
                    let higher = if side_a.lowest() > side_b.lowest() {
                        &mut side_a
                    } else {
                        &mut side_b
                    };
                    if !higher.extend(txn.conn(), origins)? {
                        break;
                    }
                    if let Some(shared) = shared_group(&side_a, &side_b) {
                        return Ok((shared, shared));
                    }
                }
                Ok((side_a.lowest(), side_b.lowest()))
            })?
        }
    };
    let above_a: HashSet<StateGroup, Hasher> = side_a.rows_above(base_a).collect();
    let above_b: HashSet<StateGroup, Hasher> = side_b.rows_above(base_b).collect();
    let mut above: Vec<StateGroup> = above_a.iter().chain(&above_b).copied().collect();
    above.sort_unstable();
    above.dedup();

    // Per side, the newest row above its base for each slot: the origins'
    // rows first, then the rows read.
    let origin_rows = |side: &Side, base: StateGroup| {
        let mut newest = Newest::default();
        for (&g, (slot, event)) in &side.by_origin {
            if g <= base {
                continue;
            }
            keep_newest(&mut newest, slot, g, event);
        }
        newest
    };
    let (origin_a, origin_b) = (origin_rows(&side_a, base_a), origin_rows(&side_b, base_b));
    let mut newest_a = origin_a.clone();
    let mut newest_b = origin_b.clone();
    let mut bases: PairDifferences = PairDifferences::default();
    let compared_by_server = base_a != base_b && !db.engine().round_trips_are_cheap();
    db.run_read("get_state_differences", |txn| {
        newest_a.clone_from(&origin_a);
        newest_b.clone_from(&origin_b);
        bases.clear();
        sql::rows_of_groups(txn.conn(), db.engine(), &above, |row| {
            let slot: StateKey = (row.event_type.0, row.state_key.0);
            for (side, newest) in [(&above_a, &mut newest_a), (&above_b, &mut newest_b)] {
                if !side.contains(&row.state_group) {
                    continue;
                }
                keep_newest(newest, &slot, row.state_group, &row.event_id.0);
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
    } else if from_base.len() <= FEW_BASE_SLOTS {
        let filter = StateFilter::from_types(from_base.iter().map(|(t, k)| (&**t, Some(&**k))));
        read::state_for_groups(caches, db, &[base_a], &filter)?
            .remove(&base_a)
            .unwrap_or_default()
    } else {
        base_values(db, side_a.real_chain(base_a), &from_base)?
    };
    let value = |newest: &Newest,
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
    // Unordered: what differs goes into a hash map.
    let candidates: HashSet<&StateKey, Hasher> = newest_a
        .keys()
        .chain(newest_b.keys())
        .chain(bases.keys())
        .collect();
    let mut out = PairDifferences::default();
    for slot in candidates {
        let va = value(&newest_a, slot, |b| &b.0);
        let vb = value(&newest_b, slot, |b| &b.1);
        if va != vb {
            out.insert(slot.clone(), (va, vb));
        }
    }
    Ok(out)
}

/// The values on `slots` of the group heading `chain` (its chain as stored,
/// highest first, down to its snapshot): the newest rows of its deltas, and
/// for the slots none of them holds, the snapshot's rows, sought slot by
/// slot. For many slots (the 1,696 leaves of the HQ forks) this is one pass
/// over the deltas' rows (a few per group on a live room) and a seek per
/// slot, where a filtered read seeks each slot in every group of the chain.
fn base_values(
    db: &Database,
    chain: &[StateGroup],
    slots: &BTreeSet<&StateKey>,
) -> Result<StateMap> {
    let Some((&snapshot, deltas)) = chain.split_last() else {
        return Ok(StateMap::new());
    };
    let mut newest = Newest::default();
    // Per slot the snapshot's smaller event id where it holds two rows.
    let mut in_snapshot: HashMap<StateKey, Arc<str>, Hasher> = HashMap::default();
    db.run_read("get_state_differences.base_values", |txn| {
        newest.clear();
        in_snapshot.clear();
        sql::rows_of_groups(txn.conn(), db.engine(), deltas, |row| {
            let slot: StateKey = (row.event_type.0, row.state_key.0);
            if !slots.contains(&slot) {
                return;
            }
            keep_newest(&mut newest, &slot, row.state_group, &row.event_id.0);
        })?;
        let rest: Vec<&StateKey> = slots
            .iter()
            .copied()
            .filter(|s| !newest.contains_key(*s))
            .collect();
        sql::rows_of_slots(txn.conn(), db.engine(), snapshot, &rest, |row| {
            let event = row.event_id.0;
            match in_snapshot.entry((row.event_type.0, row.state_key.0)) {
                Entry::Occupied(mut held) => {
                    if read::keep_row(&event, held.get()) {
                        held.insert(event);
                    }
                }
                Entry::Vacant(slot) => {
                    slot.insert(event);
                }
            }
        })?;
        Ok(())
    })?;
    let mut out: StateMap = in_snapshot.drain().collect();
    out.extend(newest.into_iter().map(|(slot, (_, event))| (slot, event)));
    Ok(out)
}
