//! A read-only summary of the state tables, for `hs-main inspect`: how much
//! state there is, how it is stored, and whether the id sequence is sound.

use crate::schema::{state_group_edges, state_groups, state_groups_state};
use crate::sql;
use crate::write::STATE_GROUP_SEQUENCE;
use diesel::dsl::count_star;
use diesel::prelude::*;
use storage_core::{with_conn, Database, Result, SequenceHealth};

#[derive(Debug, Clone, PartialEq)]
pub struct StateReport {
    pub state_groups: i64,
    /// Groups stored whole (no edge).
    pub snapshot_groups: i64,
    /// Groups stored as a delta against a prev group.
    pub delta_groups: i64,
    pub state_rows: i64,
    /// Groups on the longest chain, snapshot included.
    pub longest_chain: i64,
    /// Average chain length over all groups.
    pub average_chain: f64,
    /// The rooms with the most `state_groups_state` rows, most first.
    pub rooms_by_state_rows: Vec<(String, i64)>,
    pub sequence: SequenceHealth,
}

/// State groups that no event references (Synapse issue 3364: they pile up
/// where state is resolved and the result never used).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnreferencedGroups {
    /// Groups no row of `event_to_state_groups` names.
    pub unreferenced: i64,
    /// Of those, the groups no referenced group's delta chain passes through:
    /// what could be deleted without rewriting any other group.
    pub unneeded: i64,
}

/// Counts the state groups no event references; reads every group and mapping.
pub fn unreferenced_groups(db: &Database) -> Result<UnreferencedGroups> {
    db.run_read("unreferenced_state_groups", |txn| {
        let (unreferenced, unneeded) = sql::unreferenced_groups(txn.conn())?;
        Ok(UnreferencedGroups {
            unreferenced,
            unneeded,
        })
    })
}

/// Reads the report in one read-only transaction, counting every row; calls
/// `step` with what it is about to count (for a progress display).
pub fn state_report(
    db: &Database,
    top_rooms: usize,
    mut step: impl FnMut(&str),
) -> Result<StateReport> {
    db.run_read("state_report", |txn| {
        step("counting state groups");
        let state_groups: i64 =
            with_conn!(txn.conn(), |c| state_groups::table.count().get_result(c))?;
        let delta_groups: i64 = with_conn!(txn.conn(), |c| state_group_edges::table
            .select(diesel::dsl::count(state_group_edges::state_group).aggregate_distinct())
            .get_result(c))?;
        step("counting state rows");
        let state_rows: i64 = with_conn!(txn.conn(), |c| state_groups_state::table
            .count()
            .get_result(c))?;
        step("counting state rows per room");
        let rooms_by_state_rows: Vec<(String, i64)> =
            with_conn!(txn.conn(), |c| state_groups_state::table
                .group_by(state_groups_state::room_id)
                .select((state_groups_state::room_id, count_star()))
                .order_by(count_star().desc())
                .limit(top_rooms as i64)
                .load(c))?;
        step("measuring delta chains");
        let chains = sql::chain_stats(txn.conn())?;
        let sequence = txn.inspect_sequence(&STATE_GROUP_SEQUENCE)?;
        Ok(StateReport {
            state_groups,
            snapshot_groups: state_groups - delta_groups,
            delta_groups,
            state_rows,
            longest_chain: chains.longest,
            average_chain: chains.average,
            rooms_by_state_rows,
            sequence,
        })
    })
}
