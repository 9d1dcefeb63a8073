//! Writing a state group: a delta against a prev group, or a full snapshot.

use crate::caches::StateCaches;
use crate::filter::StateFilter;
use crate::read;
use crate::schema::state_groups;
use crate::sql;
use crate::types::{StateGroup, StateMap, MAX_STATE_DELTA_HOPS, MEMBER};
use diesel::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;
use storage_core::{with_conn, Column, Error, Result, RowsWrite, Sequence, TableRows, Transaction};

/// Where state group ids come from.
pub const STATE_GROUP_SEQUENCE: Sequence = Sequence {
    name: "state_group_id_seq",
    table: "state_groups",
    column: "id",
};

/// What to store: the argument of `store_state_group` (and of its `_txn` and
/// `prepare_` forms). [`snapshot`](Self::snapshot) and [`delta`](Self::delta)
/// build the two usual shapes; a delta that also knows the full state sets
/// `current_state_ids` too, which lets the store write a snapshot instead when the
/// prev group's chain is already long.
#[derive(Debug, Clone, Copy)]
pub struct NewStateGroup<'a> {
    /// The event whose state computation created the group.
    pub event_id: &'a str,
    pub room_id: &'a str,
    /// The group this one is a delta against, if any; `delta_ids` is then required.
    pub prev_group: Option<StateGroup>,
    pub delta_ids: Option<&'a StateMap>,
    /// The full state; required without a prev group.
    pub current_state_ids: Option<&'a StateMap>,
}

impl<'a> NewStateGroup<'a> {
    /// A group holding `state` in full, with no prev group.
    pub fn snapshot(event_id: &'a str, room_id: &'a str, state: &'a StateMap) -> Self {
        NewStateGroup {
            event_id,
            room_id,
            prev_group: None,
            delta_ids: None,
            current_state_ids: Some(state),
        }
    }

    /// A group that is `prev_group`'s state with `delta` applied.
    pub fn delta(
        event_id: &'a str,
        room_id: &'a str,
        prev_group: StateGroup,
        delta: &'a StateMap,
    ) -> Self {
        NewStateGroup {
            event_id,
            room_id,
            prev_group: Some(prev_group),
            delta_ids: Some(delta),
            current_state_ids: None,
        }
    }

    /// Rejects argument combinations that cannot describe a state group.
    pub fn validate(&self) -> Result<()> {
        let what = || {
            format!(
                "storing state for event {} in {}",
                self.event_id, self.room_id
            )
        };
        let bad = |msg: &str| Err(Error::invalid_argument(msg.to_owned()).context(what()));
        if self.event_id.is_empty() || self.room_id.is_empty() {
            return bad("event_id and room_id must not be empty");
        }
        match (self.prev_group, self.delta_ids, self.current_state_ids) {
            (Some(_), None, _) => return bad("a prev_group needs delta_ids"),
            (None, Some(_), _) => return bad("delta_ids were given without a prev_group"),
            (None, None, None) => {
                return bad("current_state_ids cannot be None without a prev_group")
            }
            _ => {}
        }
        if let (Some(delta), Some(current)) = (self.delta_ids, self.current_state_ids) {
            if let Some(((t, k), e)) = delta.iter().find(|(key, e)| current.get(*key) != Some(*e)) {
                return bad(&format!(
                    "delta_ids has ({t}, {k}) -> {e} but current_state_ids has {:?}",
                    current.get(&(t.clone(), k.clone()))
                ));
            }
        }
        Ok(())
    }
}

/// One row of `state_groups_state`.
pub(crate) struct StateRow<'a> {
    pub(crate) state_group: i64,
    pub(crate) room_id: &'a str,
    pub(crate) type_: &'a str,
    pub(crate) state_key: &'a str,
    pub(crate) event_id: &'a str,
}

/// What a transaction that stores several groups knows of those it stored:
/// their rooms and chain lengths, so that a group whose prev group is one of
/// them asks the database for neither.
#[derive(Debug, Default)]
pub(crate) struct StoredInTxn {
    groups: HashMap<StateGroup, (String, usize)>,
}

/// The rows of groups stored in a transaction and not inserted yet: a batch's
/// groups are inserted together (on PostgreSQL in one statement), after the
/// lookups storing them needs.
#[derive(Default)]
pub(crate) struct GroupRows<'a> {
    groups: Vec<GroupRow<'a>>,
    edges: Vec<EdgeRow>,
    state: Vec<StateRow<'a>>,
}

struct GroupRow<'a> {
    id: i64,
    room_id: &'a str,
    event_id: &'a str,
}

struct EdgeRow {
    state_group: i64,
    prev_state_group: i64,
}

impl<'a> GroupRows<'a> {
    /// Inserts the rows gathered so far ([`Transaction::insert_columns`]).
    pub(crate) fn flush(&mut self, txn: &mut Transaction<'_>) -> Result<()> {
        if self.groups.is_empty() && self.edges.is_empty() && self.state.is_empty() {
            return Ok(());
        }
        txn.insert_columns(&self.columns())?;
        self.groups.clear();
        self.edges.clear();
        self.state.clear();
        Ok(())
    }

    /// The same rows, column by column.
    pub(crate) fn columns(&self) -> Vec<TableRows<'a>> {
        let (groups, edges, state) = (&self.groups, &self.edges, &self.state);
        vec![
            TableRows {
                table: "state_groups",
                columns: vec![
                    ("id", Column::BigInt(groups.iter().map(|g| g.id).collect())),
                    (
                        "room_id",
                        Column::Text(groups.iter().map(|g| g.room_id).collect()),
                    ),
                    (
                        "event_id",
                        Column::Text(groups.iter().map(|g| g.event_id).collect()),
                    ),
                ],
                write: RowsWrite::Insert,
            },
            TableRows {
                table: "state_group_edges",
                columns: vec![
                    (
                        "state_group",
                        Column::BigInt(edges.iter().map(|e| e.state_group).collect()),
                    ),
                    (
                        "prev_state_group",
                        Column::BigInt(edges.iter().map(|e| e.prev_state_group).collect()),
                    ),
                ],
                write: RowsWrite::Insert,
            },
            state_rows(state),
        ]
    }

    /// Adds the rows of `state` as `group`'s, in the order of the
    /// `(state_group, type, state_key)` index (see [`in_index_order`]).
    fn add_state(&mut self, group: StateGroup, room_id: &'a str, state: &'a StateMap) {
        let start = self.state.len();
        self.state.extend(state.iter().map(|((t, k), e)| StateRow {
            state_group: group,
            room_id,
            type_: t,
            state_key: k,
            event_id: e,
        }));
        in_index_order(&mut self.state[start..]);
    }
}

/// Stores `new` inside `txn` as group `group` (an id taken from
/// [`STATE_GROUP_SEQUENCE`]): its rows go to `rows`, for the caller to flush
/// (rows of a snapshot the store had to compute are inserted at once). Prefills
/// the caches after the commit. `known_state` is the group's full state when
/// the caller holds it (a prepared group's): a delta whose chain is too long
/// then becomes a snapshot of it, rather than of a read of the prev group's
/// whole state inside the transaction (up to ~100 ms on PostgreSQL for a
/// 5,000-member room, while the batch holds the events lock).
pub(crate) fn store_txn<'a>(
    txn: &mut Transaction<'_>,
    caches: &Arc<StateCaches>,
    new: &NewStateGroup<'a>,
    known_state: Option<&'a StateMap>,
    group: StateGroup,
    stored: &mut StoredInTxn,
    rows: &mut GroupRows<'a>,
) -> Result<StateGroup> {
    new.validate()?;
    let seq_members = caches.members.sequence();
    let seq_non_members = caches.non_members.sequence();
    // Taken before the prev group's chain length is read: a rewrite of the
    // chain (compression) committed meanwhile forgets every chain length
    // after its commit, and this group's, derived from the old one, is then
    // not remembered either.
    let seq_chain_lengths = caches.chain_lengths.sequence();

    // With a usable prev group: a delta. Otherwise (none, or the chain is too
    // long): a snapshot, computing the full state if the caller gave only a delta.
    let delta_base = match (new.prev_group, new.delta_ids) {
        (Some(prev), Some(delta)) => {
            let prev_len = match stored.groups.get(&prev) {
                Some((room, len)) if room == new.room_id => *len,
                _ => prev_chain_length(txn, caches, prev, new.room_id)?,
            };
            (prev_len < MAX_STATE_DELTA_HOPS).then_some((prev, delta, prev_len))
        }
        _ => None,
    };
    let full_state: Option<StateMap> = match (delta_base, new.current_state_ids) {
        (_, Some(current)) => Some(current.clone()),
        (Some(_), None) => None,
        (None, None) if known_state.is_some() => known_state.cloned(),
        (None, None) => {
            // The chain is too long and the caller gave only a delta: compute the
            // full state (validate() guarantees prev_group and delta_ids here).
            let (Some(prev), Some(delta)) = (new.prev_group, new.delta_ids) else {
                return Err(Error::invalid_argument(
                    "current_state_ids cannot be None without a prev_group",
                ));
            };
            // The prev group may be among the rows not inserted yet.
            rows.flush(txn)?;
            let mut state = read::fetch(txn, &[prev], &StateFilter::all())?
                .remove(&prev)
                .unwrap_or_default();
            state.extend(delta.iter().map(|(k, v)| (k.clone(), v.clone())));
            Some(state)
        }
    };

    rows.groups.push(GroupRow {
        id: group,
        room_id: new.room_id,
        event_id: new.event_id,
    });
    let chain_len = match (delta_base, new.current_state_ids) {
        (Some((prev, delta, prev_len)), _) => {
            rows.edges.push(EdgeRow {
                state_group: group,
                prev_state_group: prev,
            });
            rows.add_state(group, new.room_id, delta);
            prev_len + 1
        }
        (None, Some(current)) => {
            rows.add_state(group, new.room_id, current);
            1
        }
        (None, None) if known_state.is_some() => {
            let known = known_state.expect("checked just above");
            rows.add_state(group, new.room_id, known);
            1
        }
        (None, None) => {
            // Computed here, so not borrowable for later: inserted now.
            rows.flush(txn)?;
            let state = full_state.as_ref().expect("a snapshot has its full state");
            insert_state_rows(txn, group, new.room_id, state)?;
            1
        }
    };
    stored
        .groups
        .insert(group, (new.room_id.to_owned(), chain_len));

    let caches = caches.clone();
    let room_id = new.room_id.to_owned();
    let delta_entry = delta_base.map(|(prev, delta, _)| (prev, Arc::new(delta.clone())));
    // A snapshot cut from a chain is still its prev group's state with its
    // delta applied: the caches derive it from the prev group's entries
    // when they hold those, rather than split the room's whole state anew.
    let derived_from = match (&delta_entry, new.prev_group, new.delta_ids) {
        (Some(entry), _, _) => Some(entry.clone()),
        (None, Some(prev), Some(delta)) => Some((prev, Arc::new(delta.clone()))),
        _ => None,
    };
    txn.call_after(move || {
        let seqs = (seq_members, seq_non_members);
        let derived_from = derived_from.clone();
        prefill(&caches, seqs, group, room_id, full_state, derived_from);
        caches.deltas.insert(group, delta_entry);
        caches
            .chain_lengths
            .insert_at(seq_chain_lengths, group, chain_len);
    });
    Ok(group)
}

/// Fills the caches of a group just committed with what its writer knows of
/// it: its room, and its state, derived from its prev group's entries when
/// `derived_from` (prev group, delta) is given and the caches hold that group in
/// full, else from `full_state` when given. `seqs` are the members' and
/// non-members' cache sequences taken before the commit.
pub(crate) fn prefill(
    caches: &StateCaches,
    seqs: (u64, u64),
    group: StateGroup,
    room_id: String,
    full_state: Option<StateMap>,
    derived_from: Option<(StateGroup, Arc<StateMap>)>,
) {
    let (seq_members, seq_non_members) = seqs;
    // A delta on a group the caches hold in full shares that group's maps;
    // splitting a full state the caller gave would copy the whole room into
    // new maps (31k entries for the HQ room's resolved state: 6% of a
    // resolution's time).
    let prev_known = derived_from.as_ref().is_some_and(|(prev, _)| {
        caches.members.holds_full(prev) && caches.non_members.holds_full(prev)
    });
    let full_state = full_state.filter(|_| !prev_known);
    if let Some(state) = full_state {
        let (members, non_members): (StateMap, StateMap) =
            state.into_iter().partition(|((t, _), _)| &**t == MEMBER);
        caches.members.update(seq_members, group, members, None);
        caches
            .non_members
            .update(seq_non_members, group, non_members, None);
    } else if let Some((prev, delta)) = &derived_from {
        // The new group is its prev group plus the delta: whatever the caches
        // know of the prev group, they now know of the new one.
        let (members, non_members): (StateMap, StateMap) = delta
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .partition(|((t, _), _)| &**t == MEMBER);
        caches.members.derive(seq_members, prev, group, members);
        caches
            .non_members
            .derive(seq_non_members, prev, group, non_members);
    }
    caches.group_rooms.insert(group, room_id);
}

/// The chain length of `prev` (itself included), after checking that it exists
/// and belongs to `room_id`: read, unless the caches know its room (they
/// hold only groups that exist: filled once a group's write committed, or
/// from reads of stored groups; a purge makes the purging store forget the
/// groups it deleted, and only the main process purges or writes).
fn prev_chain_length(
    txn: &mut Transaction<'_>,
    caches: &StateCaches,
    prev: StateGroup,
    room_id: &str,
) -> Result<usize> {
    let prev_room: Option<String> = match caches.group_rooms.get(&prev) {
        Some(room) => Some(room),
        None => with_conn!(txn.conn(), |c| state_groups::table
            .select(state_groups::room_id)
            .find(prev)
            .first::<String>(c)
            .optional())?,
    };
    match prev_room {
        None => {
            return Err(Error::invalid_argument(format!(
                "Trying to persist state with unpersisted prev_group: {prev}"
            )))
        }
        Some(r) if r != room_id => {
            return Err(Error::invalid_argument(format!(
                "prev_group {prev} belongs to room {r}, not {room_id}"
            )))
        }
        Some(_) => {}
    }
    if let Some(len) = caches.chain_lengths.get(&prev) {
        return Ok(len);
    }
    sql::chain_length(txn.conn(), prev, MAX_STATE_DELTA_HOPS)
}

fn insert_state_rows(
    txn: &mut Transaction<'_>,
    group: StateGroup,
    room_id: &str,
    state: &StateMap,
) -> Result<()> {
    let mut rows: Vec<StateRow<'_>> = state
        .iter()
        .map(|((t, k), e)| StateRow {
            state_group: group,
            room_id,
            type_: t,
            state_key: k,
            event_id: e,
        })
        .collect();
    in_index_order(&mut rows);
    insert_rows(txn, &rows)
}

/// Sorts one group's rows by `(type, state_key)`, the order of the index
/// on `(state_group, type, state_key)`, rather than a map's hash order: each
/// row then goes at the index's end (on SQLite an append to its last leaf
/// page, split by the quick path), not between rows of the same group
/// already there (a cell array moved aside in the page, a page split in the
/// middle) . The rows stored are the same; a snapshot's 5,000 rows a
/// snapshot are sorted in well under a millisecond.
fn in_index_order(rows: &mut [StateRow<'_>]) {
    rows.sort_unstable_by(|a, b| (a.type_, a.state_key).cmp(&(b.type_, b.state_key)));
}

/// `rows` as `state_groups_state`'s, column by column.
fn state_rows<'a>(rows: &[StateRow<'a>]) -> TableRows<'a> {
    TableRows {
        table: "state_groups_state",
        columns: vec![
            (
                "state_group",
                Column::BigInt(rows.iter().map(|r| r.state_group).collect()),
            ),
            (
                "room_id",
                Column::Text(rows.iter().map(|r| r.room_id).collect()),
            ),
            ("type", Column::Text(rows.iter().map(|r| r.type_).collect())),
            (
                "state_key",
                Column::Text(rows.iter().map(|r| r.state_key).collect()),
            ),
            (
                "event_id",
                Column::Text(rows.iter().map(|r| r.event_id).collect()),
            ),
        ],
        write: RowsWrite::Insert,
    }
}

/// Inserts `rows` into `state_groups_state` ([`Transaction::insert_columns`]).
pub(crate) fn insert_rows(txn: &mut Transaction<'_>, rows: &[StateRow<'_>]) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    txn.insert_columns(&[state_rows(rows)])
}
