//! Reading a room's groups as they are stored now, a window at a time, and
//! their full states; and the states the planner asks for again later.

use super::packed::{rebase, Interner, Packed, Rows};
use super::plan::StateSource;
use crate::filter::StateFilter;
use crate::read;
use crate::schema::{state_group_edges, state_groups, state_groups_state};
use crate::types::StateGroup;
use diesel::prelude::*;
use std::collections::HashMap;
use storage_core::{with_conn, Database, Error, Result, Transaction};

/// Groups per statement reading edges and rows.
const GROUPS_PER_QUERY: usize = 200;

/// A group as stored now.
#[derive(Debug, Clone)]
pub(crate) struct OldGroup {
    pub(crate) id: StateGroup,
    pub(crate) prev: Option<StateGroup>,
    /// Its rows (the delta, or the full state), slot order.
    pub(crate) rows: Rows,
}

/// The ids of `room_id`'s groups in `(after, bound]`, oldest first, at most `limit`.
pub(crate) fn group_ids(
    txn: &mut Transaction<'_>,
    room_id: &str,
    after: StateGroup,
    bound: StateGroup,
    limit: usize,
) -> Result<Vec<StateGroup>> {
    Ok(with_conn!(txn.conn(), |c| state_groups::table
        .select(state_groups::id)
        .filter(state_groups::room_id.eq(room_id))
        .filter(state_groups::id.gt(after))
        .filter(state_groups::id.le(bound))
        .order(state_groups::id)
        .limit(limit as i64)
        .load::<i64>(c))?)
}

/// The prev group of each of `groups` that has one. More than one edge, or an
/// edge that does not point to an older group, is corruption the compressor
/// will not build on.
pub(crate) fn edges(
    txn: &mut Transaction<'_>,
    groups: &[StateGroup],
) -> Result<HashMap<StateGroup, StateGroup>> {
    let mut prevs = HashMap::new();
    for chunk in groups.chunks(GROUPS_PER_QUERY) {
        let rows: Vec<(i64, i64)> = with_conn!(txn.conn(), |c| state_group_edges::table
            .select((
                state_group_edges::state_group,
                state_group_edges::prev_state_group
            ))
            .filter(state_group_edges::state_group.eq_any(chunk))
            .load(c))?;
        for (g, p) in rows {
            if p >= g {
                return Err(Error::corrupt(format!(
                    "state group {g} has prev group {p}, which is not older"
                )));
            }
            if let Some(other) = prevs.insert(g, p) {
                return Err(Error::corrupt(format!(
                    "state group {g} has two prev groups, {other} and {p}"
                )));
            }
        }
    }
    Ok(prevs)
}

/// The rows of each of `groups` (absent: no rows), interned. Two rows for one
/// slot of a group make its state ambiguous: an error naming them.
pub(crate) fn rows(
    txn: &mut Transaction<'_>,
    interner: &mut Interner,
    groups: &[StateGroup],
) -> Result<HashMap<StateGroup, Rows>> {
    let mut out: HashMap<StateGroup, Rows> = HashMap::new();
    for chunk in groups.chunks(GROUPS_PER_QUERY) {
        let rows: Vec<(i64, String, String, String)> =
            with_conn!(txn.conn(), |c| state_groups_state::table
                .select((
                    state_groups_state::state_group,
                    state_groups_state::type_,
                    state_groups_state::state_key,
                    state_groups_state::event_id,
                ))
                .filter(state_groups_state::state_group.eq_any(chunk))
                .load(c))?;
        for (g, t, k, e) in rows {
            let slot = interner.slot(&t, &k);
            let event = interner.event(e);
            out.entry(g).or_default().push((slot, event));
        }
    }
    for (g, rows) in &mut out {
        rows.sort_unstable();
        if let Some(w) = rows.windows(2).find(|w| w[0].0 == w[1].0) {
            let (t, k) = interner.slot_name(w[0].0);
            return Err(Error::corrupt(format!(
                "state group {g} has two rows for ({t}, {k}); its state is ambiguous"
            )));
        }
    }
    Ok(out)
}

/// The groups of one window, oldest first.
pub(crate) fn window(
    txn: &mut Transaction<'_>,
    interner: &mut Interner,
    room_id: &str,
    after: StateGroup,
    bound: StateGroup,
    limit: usize,
) -> Result<Vec<OldGroup>> {
    let ids = group_ids(txn, room_id, after, bound, limit)?;
    let prevs = edges(txn, &ids)?;
    let mut rows = rows(txn, interner, &ids)?;
    Ok(ids
        .into_iter()
        .map(|id| OldGroup {
            id,
            prev: prevs.get(&id).copied(),
            rows: rows.remove(&id).unwrap_or_default(),
        })
        .collect())
}

/// The states of a room's groups: those of the current window and those the
/// planner still needs in memory, any other read again from the database.
#[derive(Debug)]
pub(crate) struct RoomStates {
    db: Database,
    pub(crate) interner: Interner,
    states: HashMap<StateGroup, Packed>,
    /// The state most recently added, which states read whole are rebuilt on.
    last: Packed,
    /// States read again from the database (a measure of the window's fit).
    pub(crate) refetched: usize,
}

impl RoomStates {
    pub(crate) fn new(db: Database) -> Self {
        RoomStates {
            db,
            interner: Interner::default(),
            states: HashMap::new(),
            last: Packed::new(),
            refetched: 0,
        }
    }

    /// Computes and keeps the state of each group of `window` (oldest first).
    pub(crate) fn add_window(&mut self, window: &[OldGroup]) -> Result<()> {
        for group in window {
            let state = match group.prev {
                Some(prev) => {
                    let mut state = self.state(prev).map_err(|e| {
                        e.context(format!(
                            "reading prev group {prev} of state group {}",
                            group.id
                        ))
                    })?;
                    state.extend(group.rows.iter().copied());
                    state
                }
                None => rebase(&self.last, group.rows.iter().copied().collect()),
            };
            self.last = state.clone();
            self.states.insert(group.id, state);
        }
        Ok(())
    }

    /// Forgets every state but those of `keep`.
    pub(crate) fn retain(&mut self, keep: &[StateGroup]) {
        let keep: std::collections::HashSet<&StateGroup> = keep.iter().collect();
        self.states.retain(|g, _| keep.contains(g));
    }

    /// A state already known, without reading anything.
    pub(crate) fn known(&self, group: StateGroup) -> Option<&Packed> {
        self.states.get(&group)
    }
}

impl StateSource for RoomStates {
    fn state(&mut self, group: StateGroup) -> Result<Packed> {
        if let Some(s) = self.states.get(&group) {
            return Ok(s.clone());
        }
        let fetched = self
            .db
            .run_read("compress_read_state", |txn| {
                read::fetch(txn, &[group], &StateFilter::all())
            })?
            .remove(&group)
            .unwrap_or_default();
        let state = rebase(&self.last, self.interner.pack(&fetched));
        self.refetched += 1;
        self.states.insert(group, state.clone());
        Ok(state)
    }
}
