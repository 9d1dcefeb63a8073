//! Rewriting one chunk of a room's groups in one transaction, and checking,
//! before it commits, that every group still has exactly the state it had.
//!
//! The transaction:
//! 1. reads the chunk's edges and row counts and refuses to go on if they are
//!    not what the plan was made from (another compressor got there first);
//! 2. finds every group outside the chunk whose prev group is in it (its
//!    children: later groups, and groups written since the run began) and
//!    reads, through the state read path, the state of those the plan does not
//!    know (the ones written since);
//! 3. deletes the chunk's edges and rows and inserts the new ones;
//! 4. reads the new edges and rows back and rebuilds each rewritten group's
//!    state from them, on its new prev group's state: it must equal the state
//!    the group had;
//! 5. rebuilds the known children's states the same way from their stored
//!    rows, and reads the others' and the newest rewritten group's again
//!    through the read path: all must equal what they were.
//!
//! Any difference is an error and the transaction rolls back. Steps 4 and 5
//! cover every rewritten group and every group whose chain leaves the chunk;
//! a group further down such a chain has its own rows untouched on a prev
//! group whose state is unchanged, so its state is unchanged too.

use super::load::{self, OldGroup};
use super::packed::{Interner, Packed, Rows};
use super::plan::Shape;
use crate::filter::StateFilter;
use crate::read;
use crate::schema::{state_group_edges, state_groups, state_groups_state};
use crate::store::StateStore;
use crate::types::StateGroup;
use crate::write::{insert_rows, StateRow};
use diesel::dsl::count_star;
use diesel::prelude::*;
use std::collections::{HashMap, HashSet};
use storage_core::{with_conn, Error, Result, Transaction};

/// Statement size for id lists.
const IDS_PER_QUERY: usize = 500;

/// One group to rewrite: how it is stored now, and how it will be.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    pub(crate) old: OldGroup,
    pub(crate) new: Shape,
}

impl Change {
    /// Rows deleted plus rows inserted.
    pub(crate) fn rows_touched(&self) -> usize {
        self.old.rows.len() + self.new.rows.len()
    }
}

/// Everything the check needs to know without reading: the state of each
/// rewritten group and of each prev group (old or new) outside the chunk.
pub(crate) type Expected = HashMap<StateGroup, Packed>;

/// Rewrites `chunk` (groups of `room_id`, oldest first) inside `txn`.
pub(crate) fn rewrite_chunk(
    txn: &mut Transaction<'_>,
    store: &StateStore,
    interner: &mut Interner,
    room_id: &str,
    chunk: &[Change],
    expected: &Expected,
) -> Result<()> {
    // The lock the purge of unneeded groups takes: a group this chunk makes a
    // prev group is not deleted under it, and one deleted before is seen gone.
    txn.lock_table("state_group_edges")?;
    let ids: Vec<StateGroup> = chunk.iter().map(|c| c.old.id).collect();
    check_unchanged(txn, chunk, &ids)?;
    let children = children_outside(txn, &ids)?;
    // Children whose state the plan knows are checked from their rows; any
    // other (written since the run began) through the read path, before and after.
    let unknown: Vec<StateGroup> = children
        .iter()
        .copied()
        .filter(|g| !expected.contains_key(g))
        .collect();
    let before = read_states(txn, &unknown)?;

    for part in ids.chunks(IDS_PER_QUERY) {
        with_conn!(txn.conn(), |c| diesel::delete(
            state_group_edges::table.filter(state_group_edges::state_group.eq_any(part))
        )
        .execute(c))?;
        with_conn!(txn.conn(), |c| diesel::delete(
            state_groups_state::table.filter(state_groups_state::state_group.eq_any(part))
        )
        .execute(c))?;
    }
    let edges: Vec<_> = chunk
        .iter()
        .filter_map(|c| {
            c.new.prev.map(|p| {
                (
                    state_group_edges::state_group.eq(c.old.id),
                    state_group_edges::prev_state_group.eq(p),
                )
            })
        })
        .collect();
    for part in edges.chunks(IDS_PER_QUERY) {
        with_conn!(txn.conn(), |c| diesel::insert_into(
            state_group_edges::table
        )
        .values(part)
        .execute(c))?;
    }
    let rows: Vec<StateRow<'_>> = chunk
        .iter()
        .flat_map(|c| {
            c.new.rows.iter().map(|&(slot, event)| {
                let (t, k) = interner.slot_name(slot);
                StateRow {
                    state_group: c.old.id,
                    room_id,
                    type_: t,
                    state_key: k,
                    event_id: interner.event_name(event),
                }
            })
        })
        .collect();
    insert_rows(txn, &rows)?;
    drop(rows);

    let mut rebuilt = check_rebuilt(txn, interner, &ids, &HashMap::new(), expected)?;
    let known: Vec<StateGroup> = children
        .iter()
        .copied()
        .filter(|g| expected.contains_key(g))
        .collect();
    rebuilt.extend(check_rebuilt(txn, interner, &known, &rebuilt, expected)?);
    let newest = *ids.last().expect("a chunk is never empty");
    let mut again = unknown.clone();
    again.push(newest);
    let after = read_states(txn, &again)?;
    for g in &unknown {
        if before.get(g) != after.get(g) {
            return Err(Error::corrupt(format!(
                "state group {g}, whose chain passes through the rewritten groups, would change \
                 state; nothing was written"
            )));
        }
    }
    if Some(&interner.pack(&after[&newest])) != expected.get(&newest) {
        return Err(Error::corrupt(format!(
            "state group {newest} read back through the state read path differs from its \
             state before; nothing was written"
        )));
    }

    // A group's state never changes, so only its prev group and delta, and the
    // length of every chain through it, are forgotten.
    let store = store.clone();
    txn.call_after(move || store.forget_state_group_shapes(&ids));
    Ok(())
}

/// Step 1: the chunk's edges and row counts are what the plan was made from,
/// and the prev groups it names outside the chunk still exist.
fn check_unchanged(txn: &mut Transaction<'_>, chunk: &[Change], ids: &[StateGroup]) -> Result<()> {
    let inside: HashSet<&StateGroup> = ids.iter().collect();
    let outside: Vec<StateGroup> = chunk
        .iter()
        .flat_map(|c| [c.old.prev, c.new.prev])
        .flatten()
        .filter(|p| !inside.contains(p))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let existing: HashSet<StateGroup> = with_conn!(txn.conn(), |c| state_groups::table
        .select(state_groups::id)
        .filter(state_groups::id.eq_any(&outside))
        .load::<i64>(c))?
    .into_iter()
    .collect();
    if let Some(gone) = outside.iter().find(|p| !existing.contains(p)) {
        return Err(Error::other(format!(
            "state group {gone} was deleted since the compressor read it (purged as unneeded?); \
             run it again"
        )));
    }
    let prevs = load::edges(txn, ids)?;
    let mut counts: HashMap<StateGroup, i64> = HashMap::new();
    for part in ids.chunks(IDS_PER_QUERY) {
        let rows: Vec<(i64, i64)> = with_conn!(txn.conn(), |c| state_groups_state::table
            .group_by(state_groups_state::state_group)
            .select((state_groups_state::state_group, count_star()))
            .filter(state_groups_state::state_group.eq_any(part))
            .load(c))?;
        counts.extend(rows);
    }
    for c in chunk {
        let g = c.old.id;
        let rows = counts.get(&g).copied().unwrap_or(0) as usize;
        if prevs.get(&g).copied() != c.old.prev || rows != c.old.rows.len() {
            return Err(Error::other(format!(
                "state group {g} changed since the compressor read it (another compressor \
                 running?); run it again"
            )));
        }
    }
    Ok(())
}

/// Groups outside the chunk whose prev group is in it.
fn children_outside(txn: &mut Transaction<'_>, ids: &[StateGroup]) -> Result<Vec<StateGroup>> {
    let inside: HashSet<&StateGroup> = ids.iter().collect();
    let mut out = Vec::new();
    for part in ids.chunks(IDS_PER_QUERY) {
        let found: Vec<i64> = with_conn!(txn.conn(), |c| state_group_edges::table
            .select(state_group_edges::state_group)
            .filter(state_group_edges::prev_state_group.eq_any(part))
            .load(c))?;
        out.extend(found.into_iter().filter(|g| !inside.contains(g)));
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn read_states(
    txn: &mut Transaction<'_>,
    groups: &[StateGroup],
) -> Result<HashMap<StateGroup, crate::types::StateMap>> {
    if groups.is_empty() {
        return Ok(HashMap::new());
    }
    read::fetch(txn, groups, &StateFilter::all())
}

/// Steps 4 and 5: the edges and rows now stored for `groups` (oldest first)
/// rebuild the state each had, on the state of its prev group (rebuilt here or
/// earlier, or as expected). Returns the rebuilt states.
fn check_rebuilt(
    txn: &mut Transaction<'_>,
    interner: &mut Interner,
    groups: &[StateGroup],
    earlier: &HashMap<StateGroup, Packed>,
    expected: &Expected,
) -> Result<HashMap<StateGroup, Packed>> {
    let prevs = load::edges(txn, groups)?;
    let mut rows: HashMap<StateGroup, Rows> = load::rows(txn, interner, groups)?;
    let mut rebuilt: HashMap<StateGroup, Packed> = HashMap::with_capacity(groups.len());
    for &g in groups {
        let mut state = match prevs.get(&g) {
            Some(p) => rebuilt
                .get(p)
                .or_else(|| earlier.get(p))
                .or_else(|| expected.get(p))
                .cloned()
                .ok_or_else(|| {
                    Error::other(format!(
                        "internal: the state of {p}, prev group of {g}, was not prepared"
                    ))
                })?,
            None => Packed::new(),
        };
        state.extend(rows.remove(&g).unwrap_or_default());
        if expected.get(&g) != Some(&state) {
            return Err(Error::corrupt(format!(
                "the rows now stored for state group {g} (prev group {:?}) do not give its \
                 state; nothing was written",
                prevs.get(&g)
            )));
        }
        rebuilt.insert(g, state);
    }
    Ok(rebuilt)
}

/// Fault injection: a chunk whose new rows would give a group another state is
/// caught by the check inside its transaction, which rolls back and leaves the
/// old edges and rows as they were; the same chunk with the right rows commits.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::load::RoomStates;
    use crate::compress::plan::StateSource;
    use crate::store::StateGroupAccess;
    use crate::types::{key, StateMap};
    use crate::write::NewStateGroup;
    use storage_core::testing::TestDb;
    use storage_core::{Database, ErrorKind, StoreConfig};

    const ROOM: &str = "!fault:example.com";

    storage_core::engine_tests!(a_rewrite_that_changes_a_state_is_rolled_back);

    /// Three groups: a snapshot of the create event and Alice's join; a delta
    /// adding Bob's join; a delta on that setting a topic.
    fn three_groups(store: &StateStore) -> [StateGroup; 3] {
        let snapshot = StateMap::from_iter([
            (key("m.room.create", ""), "$create".into()),
            (key("m.room.member", "@alice:x"), "$alice".into()),
        ]);
        let g1 = store
            .store_state_group(&NewStateGroup::snapshot("$alice", ROOM, &snapshot))
            .unwrap();
        let bob = StateMap::from_iter([(key("m.room.member", "@bob:x"), "$bob".into())]);
        let g2 = store
            .store_state_group(&NewStateGroup::delta("$bob", ROOM, g1, &bob))
            .unwrap();
        let topic = StateMap::from_iter([(key("m.room.topic", ""), "$topic".into())]);
        let g3 = store
            .store_state_group(&NewStateGroup::delta("$topic", ROOM, g2, &topic))
            .unwrap();
        [g1, g2, g3]
    }

    /// Every edge and row of the room, sorted.
    type Stored = (Vec<(i64, i64)>, Vec<(i64, String, String, String)>);

    fn stored(db: &Database) -> Stored {
        db.run_read("test_stored", |txn| {
            let mut edges: Vec<(i64, i64)> = with_conn!(txn.conn(), |c| state_group_edges::table
                .select((
                    state_group_edges::state_group,
                    state_group_edges::prev_state_group
                ))
                .load(c))?;
            let mut rows: Vec<(i64, String, String, String)> =
                with_conn!(txn.conn(), |c| state_groups_state::table
                    .select((
                        state_groups_state::state_group,
                        state_groups_state::type_,
                        state_groups_state::state_key,
                        state_groups_state::event_id,
                    ))
                    .load(c))?;
            edges.sort();
            rows.sort();
            Ok((edges, rows))
        })
        .unwrap()
    }

    /// Rewrites `group` into `prev` + `rows` (names, interned here) in one
    /// checked transaction, as a compress run would.
    fn rewrite(
        store: &StateStore,
        group: StateGroup,
        prev: Option<StateGroup>,
        rows: &[(&str, &str, &str)],
    ) -> Result<()> {
        let db = store.database();
        let mut states = RoomStates::new(db.clone());
        let window = db.run_read("test_window", |txn| {
            load::window(txn, &mut states.interner, ROOM, 0, i64::MAX, 100)
        })?;
        states.add_window(&window)?;
        let old = window.iter().find(|g| g.id == group).unwrap().clone();
        let mut new_rows: Rows = rows
            .iter()
            .map(|(t, k, e)| {
                let slot = states.interner.slot(t, k);
                (slot, states.interner.event((*e).to_owned()))
            })
            .collect();
        new_rows.sort_unstable();
        let chunk = [Change {
            old,
            new: Shape {
                prev,
                rows: new_rows,
                depth: 0,
            },
        }];
        // What the run would expect: the states of every group of the room.
        let mut expected = Expected::new();
        for g in &window {
            expected.insert(g.id, states.state(g.id)?);
        }
        let interner = &mut states.interner;
        db.run_interaction("test_rewrite", |txn| {
            rewrite_chunk(txn, store, interner, ROOM, &chunk, &expected)
        })
    }

    fn store_of(t: &TestDb) -> StateStore {
        StateStore::new(t.open(), &StoreConfig::default()).unwrap()
    }

    fn all_states(t: &TestDb, groups: &[StateGroup]) -> HashMap<StateGroup, StateMap> {
        // A store with empty caches: what is stored, not what was cached.
        store_of(t)
            .get_state_for_groups(groups, &StateFilter::all())
            .unwrap()
    }

    fn a_rewrite_that_changes_a_state_is_rolled_back(t: &TestDb) {
        let store = store_of(t);
        let groups = three_groups(&store);
        let [g1, _, g3] = groups;
        let (before, states) = (stored(store.database()), all_states(t, &groups));

        // The topic group as a delta on the snapshot, forgetting Bob's join.
        let e = rewrite(&store, g3, Some(g1), &[("m.room.topic", "", "$topic")]).unwrap_err();
        assert!(matches!(e.kind(), ErrorKind::Corrupt(_)), "{e}");
        assert!(e.to_string().contains(&format!("state group {g3}")), "{e}");
        assert_eq!(stored(store.database()), before, "nothing was written");
        assert_eq!(all_states(t, &groups), states);

        // A wrong event in the slot it keeps.
        let e = rewrite(
            &store,
            g3,
            Some(g1),
            &[
                ("m.room.topic", "", "$other"),
                ("m.room.member", "@bob:x", "$bob"),
            ],
        )
        .unwrap_err();
        assert!(matches!(e.kind(), ErrorKind::Corrupt(_)), "{e}");
        assert_eq!(stored(store.database()), before, "nothing was written");

        // Bob's group as a snapshot that also holds a topic it never had: the
        // topic group, whose chain passes through it, would not change, but
        // Bob's would.
        let e = rewrite(
            &store,
            groups[1],
            None,
            &[
                ("m.room.create", "", "$create"),
                ("m.room.member", "@alice:x", "$alice"),
                ("m.room.member", "@bob:x", "$bob"),
                ("m.room.topic", "", "$early"),
            ],
        )
        .unwrap_err();
        assert!(matches!(e.kind(), ErrorKind::Corrupt(_)), "{e}");
        assert_eq!(stored(store.database()), before, "nothing was written");
        assert_eq!(all_states(t, &groups), states);

        // The same rewrite with the right rows commits: the check, not the
        // harness, refused the others.
        rewrite(
            &store,
            g3,
            Some(g1),
            &[
                ("m.room.topic", "", "$topic"),
                ("m.room.member", "@bob:x", "$bob"),
            ],
        )
        .unwrap();
        assert_ne!(stored(store.database()), before);
        assert_eq!(all_states(t, &groups), states);
    }
}
