//! Removing state groups that no event's state needs: groups stored for events
//! that were then refused (a failed batch, a crash between storing a group and
//! persisting its event, a duplicate POST), and the groups only they needed.
//! Synapse leaves them forever (its issue 3364); here `hs-main purge-state-groups`
//! and a periodic job of `hs-main serve` delete them.
//!
//! Safe while events are being written:
//! - only groups up to a bound are considered, which the online job takes from
//!   its previous run (minutes ago), so a group computed for a write still in
//!   flight is never a candidate;
//! - a group is needed when an event references it or the chain of a needed
//!   group passes through it; each chunk is checked again inside the deleting
//!   transaction, which holds the `state_group_edges` lock and reads committed
//!   rows, so an edge or reference added meanwhile keeps its group;
//! - children have higher ids than their prev groups, so candidates go highest
//!   first: by the time a prev group is looked at, its unneeded children are gone.
//!
//! A group once referenced by an event stays referenced (events are never
//! deleted here), so what a cache holds of a needed group stays true; the
//! context builder checks a cached resolution's group is still needed before
//! reusing it. The purging store forgets each deleted group after its
//! transaction commits: its writes take a cached group's room as proof that
//! the group exists, and would otherwise accept a deleted group as a prev
//! group, whose rows a delta on it would then lack.

use crate::schema::{event_to_state_groups, state_group_edges, state_groups, state_groups_state};
use crate::sql;
use crate::store::StateStore;
use crate::types::StateGroup;
use diesel::prelude::*;
use std::collections::HashSet;
use storage_core::{with_conn, Database, Isolation, Result, TxnOptions};

/// Groups deleted per transaction.
const CHUNK: usize = 500;

/// What a purge found or removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgeReport {
    /// Groups no event's state needed (up to the bound).
    pub candidates: u64,
    /// Groups deleted (0 for a dry run).
    pub groups: u64,
    /// Their rows of `state_groups_state`.
    pub rows: u64,
}

/// The highest state group id now: the bound a later run may purge up to.
pub fn highest_state_group(db: &Database) -> Result<StateGroup> {
    db.run_read("highest_state_group", |txn| {
        let max: Option<i64> = with_conn!(txn.conn(), |c| state_groups::table
            .select(diesel::dsl::max(state_groups::id))
            .first(c))?;
        Ok(max.unwrap_or(0))
    })
}

/// Deletes the state groups up to `up_to` that no event's state needs (or,
/// with `dry_run`, only counts them), through `store`, whose caches forget
/// each deleted group once its deletion committed.
pub fn purge_unneeded_groups(
    store: &StateStore,
    up_to: StateGroup,
    dry_run: bool,
) -> Result<PurgeReport> {
    let db = store.database();
    let candidates = db.run_read("find_unneeded_state_groups", |txn| {
        sql::unneeded_groups(txn.conn(), up_to)
    })?;
    let mut report = PurgeReport {
        candidates: candidates.len() as u64,
        ..PurgeReport::default()
    };
    if dry_run {
        return Ok(report);
    }
    let options = TxnOptions {
        isolation: Isolation::ReadCommitted,
        ..TxnOptions::default()
    };
    for chunk in candidates.chunks(CHUNK) {
        let (groups, rows) = db.run_interaction_with("purge_state_groups", options, |txn| {
            txn.lock_table("state_group_edges")?;
            let deletable = still_unneeded(txn.conn(), chunk)?;
            if deletable.is_empty() {
                return Ok((0, 0));
            }
            let rows = with_conn!(txn.conn(), |c| diesel::delete(
                state_groups_state::table
                    .filter(state_groups_state::state_group.eq_any(&deletable))
            )
            .execute(c))?;
            with_conn!(txn.conn(), |c| diesel::delete(
                state_group_edges::table.filter(state_group_edges::state_group.eq_any(&deletable))
            )
            .execute(c))?;
            let groups = with_conn!(txn.conn(), |c| diesel::delete(
                state_groups::table.filter(state_groups::id.eq_any(&deletable))
            )
            .execute(c))?;
            let store = store.clone();
            txn.call_after(move || store.forget_state_groups(&deletable));
            Ok((groups as u64, rows as u64))
        })?;
        report.groups += groups;
        report.rows += rows;
    }
    Ok(report)
}

/// Of `chunk`, the groups no event references and no remaining group names as
/// its prev group, except groups of the chunk that go with them.
fn still_unneeded(conn: &mut storage_core::Conn, chunk: &[StateGroup]) -> Result<Vec<StateGroup>> {
    let referenced: HashSet<StateGroup> = with_conn!(conn, |c| event_to_state_groups::table
        .select(event_to_state_groups::state_group)
        .filter(event_to_state_groups::state_group.eq_any(chunk))
        .load::<StateGroup>(c))?
    .into_iter()
    .collect();
    let edges: Vec<(StateGroup, StateGroup)> = with_conn!(conn, |c| state_group_edges::table
        .select((
            state_group_edges::state_group,
            state_group_edges::prev_state_group
        ))
        .filter(state_group_edges::prev_state_group.eq_any(chunk))
        .load(c))?;
    let mut deletable: HashSet<StateGroup> = chunk
        .iter()
        .copied()
        .filter(|g| !referenced.contains(g))
        .collect();
    // A group whose child stays, stays; repeat until nothing changes.
    loop {
        let keep: Vec<StateGroup> = edges
            .iter()
            .filter(|(child, prev)| deletable.contains(prev) && !deletable.contains(child))
            .map(|(_, prev)| *prev)
            .collect();
        if keep.is_empty() {
            break;
        }
        for g in keep {
            deletable.remove(&g);
        }
    }
    let mut out: Vec<StateGroup> = deletable.into_iter().collect();
    out.sort_unstable();
    Ok(out)
}
