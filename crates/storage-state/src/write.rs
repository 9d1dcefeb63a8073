//! Writing a state group: a delta against a prev group, or a full snapshot.

use crate::caches::StateCaches;
use crate::filter::StateFilter;
use crate::read;
use crate::schema::{state_group_edges, state_groups, state_groups_state};
use crate::sql;
use crate::types::{StateGroup, StateMap, MAX_STATE_DELTA_HOPS, MEMBER};
use diesel::prelude::*;
use std::sync::Arc;
use storage_core::{with_conn, Error, Result, Sequence, Transaction};

/// Where state group ids come from.
pub const STATE_GROUP_SEQUENCE: Sequence = Sequence {
    name: "state_group_id_seq",
    table: "state_groups",
    column: "id",
};

/// Rows per INSERT statement (5 parameters each, well under SQLite's limit).
const INSERT_CHUNK: usize = 1_000;

/// What to store: the arguments of `store_state_group`.
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

impl NewStateGroup<'_> {
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

/// One row of `state_groups_state`, for batch inserts.
#[derive(Insertable)]
#[diesel(table_name = state_groups_state)]
#[diesel(treat_none_as_default_value = false)]
pub(crate) struct StateRow<'a> {
    pub(crate) state_group: i64,
    pub(crate) room_id: &'a str,
    pub(crate) type_: &'a str,
    pub(crate) state_key: &'a str,
    pub(crate) event_id: &'a str,
}

/// Stores `new` inside `txn`; returns the new group. Prefills the caches after
/// the commit.
pub(crate) fn store_txn(
    txn: &mut Transaction<'_>,
    caches: &Arc<StateCaches>,
    new: &NewStateGroup<'_>,
) -> Result<StateGroup> {
    new.validate()?;
    let group = txn.next_id(&crate::write::STATE_GROUP_SEQUENCE)?;
    let seq_members = caches.members.sequence();
    let seq_non_members = caches.non_members.sequence();

    // With a usable prev group: a delta. Otherwise (none, or the chain is too
    // long): a snapshot, computing the full state if the caller gave only a delta.
    let delta_base = match (new.prev_group, new.delta_ids) {
        (Some(prev), Some(delta)) => {
            let prev_len = prev_chain_length(txn, caches, prev, new.room_id)?;
            (prev_len < MAX_STATE_DELTA_HOPS).then_some((prev, delta, prev_len))
        }
        _ => None,
    };
    let full_state: Option<StateMap> = match (delta_base, new.current_state_ids) {
        (_, Some(current)) => Some(current.clone()),
        (Some(_), None) => None,
        (None, None) => {
            // The chain is too long and the caller gave only a delta: compute the
            // full state (validate() guarantees prev_group and delta_ids here).
            let (Some(prev), Some(delta)) = (new.prev_group, new.delta_ids) else {
                return Err(Error::invalid_argument(
                    "current_state_ids cannot be None without a prev_group",
                ));
            };
            let mut state = read::fetch(txn, &[prev], &StateFilter::all())?
                .remove(&prev)
                .unwrap_or_default();
            state.extend(delta.iter().map(|(k, v)| (k.clone(), v.clone())));
            Some(state)
        }
    };

    insert_group_row(txn, group, new)?;
    let (rows_of, chain_len): (&StateMap, usize) = match delta_base {
        Some((prev, delta, prev_len)) => {
            with_conn!(txn.conn(), |c| diesel::insert_into(
                state_group_edges::table
            )
            .values((
                state_group_edges::state_group.eq(group),
                state_group_edges::prev_state_group.eq(prev),
            ))
            .execute(c))?;
            (delta, prev_len + 1)
        }
        None => (
            full_state.as_ref().expect("a snapshot has its full state"),
            1,
        ),
    };
    insert_state_rows(txn, group, new.room_id, rows_of)?;

    let caches = caches.clone();
    let room_id = new.room_id.to_owned();
    let delta_entry = delta_base.map(|(prev, delta, _)| (prev, Arc::new(delta.clone())));
    txn.call_after(move || {
        if let Some(state) = full_state {
            let (members, non_members): (StateMap, StateMap) =
                state.into_iter().partition(|((t, _), _)| t == MEMBER);
            caches.members.update(seq_members, group, members, None);
            caches
                .non_members
                .update(seq_non_members, group, non_members, None);
        } else if let Some((prev, delta)) = &delta_entry {
            // The new group is its prev group plus the delta: whatever the caches
            // know of the prev group, they now know of the new one.
            let (members, non_members): (StateMap, StateMap) = delta
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .partition(|((t, _), _)| t == MEMBER);
            caches.members.derive(seq_members, prev, group, members);
            caches
                .non_members
                .derive(seq_non_members, prev, group, non_members);
        }
        caches.deltas.insert(group, delta_entry);
        caches.chain_lengths.insert(group, chain_len);
        caches.group_rooms.insert(group, room_id);
    });
    Ok(group)
}

/// The chain length of `prev` (itself included), after checking that it exists
/// and belongs to `room_id`.
fn prev_chain_length(
    txn: &mut Transaction<'_>,
    caches: &StateCaches,
    prev: StateGroup,
    room_id: &str,
) -> Result<usize> {
    let prev_room: Option<String> = with_conn!(txn.conn(), |c| state_groups::table
        .select(state_groups::room_id)
        .find(prev)
        .first::<String>(c)
        .optional())?;
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

fn insert_group_row(
    txn: &mut Transaction<'_>,
    group: StateGroup,
    new: &NewStateGroup<'_>,
) -> Result<()> {
    with_conn!(txn.conn(), |c| diesel::insert_into(state_groups::table)
        .values((
            state_groups::id.eq(group),
            state_groups::room_id.eq(new.room_id),
            state_groups::event_id.eq(new.event_id),
        ))
        .execute(c))?;
    Ok(())
}

fn insert_state_rows(
    txn: &mut Transaction<'_>,
    group: StateGroup,
    room_id: &str,
    state: &StateMap,
) -> Result<()> {
    let rows: Vec<StateRow<'_>> = state
        .iter()
        .map(|((t, k), e)| StateRow {
            state_group: group,
            room_id,
            type_: t,
            state_key: k,
            event_id: e,
        })
        .collect();
    insert_rows(txn, &rows)
}

/// Inserts `rows` into `state_groups_state`, [`INSERT_CHUNK`] a statement.
pub(crate) fn insert_rows(txn: &mut Transaction<'_>, rows: &[StateRow<'_>]) -> Result<()> {
    for chunk in rows.chunks(INSERT_CHUNK) {
        with_conn!(txn.conn(), |c| diesel::insert_into(
            state_groups_state::table
        )
        .values(chunk)
        .execute(c))?;
    }
    Ok(())
}
