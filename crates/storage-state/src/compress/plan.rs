//! Planning the new shape of a room's groups: for each group, in id order, a
//! prev group and the delta against it, such that chains stay bounded and the
//! room needs as few rows as the shape allows.
//!
//! # The shape
//!
//! A group is placed on a *lineage*: the levels of heads left by the group it
//! is closest to (its anchor, the recent group it differs least from; in a room
//! without forks, simply the group before it). Level 1 is a chain of one-change
//! deltas; when the level-1 head sits at the depth bound, the group hangs off
//! the level-2 head instead (its delta spans the whole level-1 chain), starting
//! a fresh level-1 chain below it; level 3 likewise above level 2. Unlike fixed
//! level sizes, a level is full when its head is *deep*, not when it is *long*,
//! so the chains under early level-2 groups use all the depth they have: with
//! two levels a bound of D hops covers D(D+1)/2 groups, where sizes a + b = D
//! cover only a*b <= D^2/4. A room with few forks costs about one row per group
//! per level in use, so covering more groups with two levels is what saves rows.
//!
//! Two refinements keep the shape cheap to read and to store:
//! - *Skip back*: a group's prev is the shallowest ancestor of its level head
//!   whose delta is no larger. Where the same slots keep changing (a topic, a
//!   counter), a delta over 500 groups is no larger than over 50, so upper
//!   levels become stars instead of chains: fewer hops, and fewer rows
//!   overwritten on every read.
//! - *Never a bad base*: every head of a lineage is an ancestor of its anchor,
//!   so its slots are a subset of the group's and the delta is valid; where no
//!   recent group is a valid base (the first group, a state that lost slots),
//!   the group becomes a snapshot.
//!
//! The plan depends only on the groups' ids and states, not on how they are
//! stored now, so a second run over a compressed room plans what is already
//! there and writes nothing: that is what makes a run resumable.

use super::packed::{delta, delta_len, Packed, Rows};
use crate::types::{StateGroup, MAX_STATE_DELTA_HOPS};
use std::collections::{HashMap, VecDeque};
use storage_core::Result;

/// The longest chain the compressor leaves (groups from a rewritten group down
/// to its snapshot, itself included). Longer than the write path's 100 because
/// a read pays for rows far more than for hops: one recursive statement walks
/// 100 hops in ~0.07 ms (SQLite) / ~0.4 ms (PostgreSQL), while the rows of a
/// 5,000-member state take milliseconds, and every snapshot a longer chain
/// removes is 5,000 rows. The number is measured by `cargo xtask bench compress`.
pub const MAX_COMPRESSED_CHAIN: u32 = 150;

/// The bound for the newest groups of a room: the next group the write path
/// stores on one of them must still be a delta (it makes a snapshot when its
/// prev group's chain already holds [`MAX_STATE_DELTA_HOPS`] groups).
pub(crate) const TAIL_CHAIN: u32 = MAX_STATE_DELTA_HOPS as u32 - 1;

/// Levels of a lineage.
const LEVELS: usize = 3;

/// Recent groups tried as a group's anchor.
const ANCHOR_CANDIDATES: usize = 16;

/// Ancestors of the level head tried by skip back.
const SKIP_BACK: usize = 64;

/// Where a group was placed.
#[derive(Debug, Clone, Copy)]
struct Placed {
    /// Groups on its new chain, itself included.
    depth: u32,
    prev: Option<StateGroup>,
    /// The heads of its lineage's levels once it was placed (itself at level 1).
    heads: [StateGroup; LEVELS],
}

/// The new shape of one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Shape {
    pub(crate) prev: Option<StateGroup>,
    /// The delta against `prev`, or the full state without one; slot order.
    pub(crate) rows: Rows,
    /// Groups on its new chain, itself included.
    pub(crate) depth: u32,
}

/// Where the planner gets the state of a group placed earlier (kept in
/// memory, or read again from the database).
pub(crate) trait StateSource {
    fn state(&mut self, group: StateGroup) -> Result<Packed>;
}

/// Places a room's groups one by one, in id order.
#[derive(Debug, Default)]
pub(crate) struct Planner {
    placed: HashMap<StateGroup, Placed>,
    recent: VecDeque<StateGroup>,
}

impl Planner {
    /// The groups whose states later placements may still ask for: the recent
    /// ones, the heads of their lineages and the ancestors skip back may try.
    pub(crate) fn live_groups(&self) -> Vec<StateGroup> {
        let mut live = Vec::new();
        for g in &self.recent {
            let p = self.placed[g];
            live.push(*g);
            for head in p.heads {
                let mut at = Some(head);
                for _ in 0..=SKIP_BACK {
                    let Some(a) = at else { break };
                    live.push(a);
                    at = self.placed.get(&a).and_then(|p| p.prev);
                }
            }
        }
        live.sort_unstable();
        live.dedup();
        live
    }

    /// Places `group`, whose state is `state`, and returns its new shape.
    /// `old_prev` is its prev group as stored now, tried as an anchor when no
    /// recent group is a valid base. `bound` is the deepest it may sit.
    pub(crate) fn place(
        &mut self,
        group: StateGroup,
        state: &Packed,
        old_prev: Option<StateGroup>,
        bound: u32,
        states: &mut impl StateSource,
    ) -> Result<Shape> {
        let anchor = self.anchor(state, old_prev, states)?;
        let mut base: Option<(StateGroup, usize)> = None;
        let mut heads = [group; LEVELS];
        if let Some(anchor) = anchor {
            let lineage = self.placed[&anchor].heads;
            for (level, &head) in lineage.iter().enumerate() {
                if self.placed[&head].depth < bound {
                    let rows = delta_len(&states.state(head)?, state, usize::MAX);
                    // A head is an ancestor of the anchor, so a valid base; the
                    // check is cheap insurance against a lineage bug.
                    if let Some(rows) = rows {
                        base = Some((head, rows));
                        heads[level + 1..].copy_from_slice(&lineage[level + 1..]);
                        break;
                    }
                }
            }
        }
        if let Some((head, rows)) = base {
            base = Some(self.skip_back(head, rows, state, states)?);
        }
        let (prev, rows, depth) = match base {
            Some((prev, _)) => {
                let rows = delta(&states.state(prev)?, state)
                    .expect("a base chosen above is a valid base");
                (Some(prev), rows, self.placed[&prev].depth + 1)
            }
            None => (None, state.iter().map(|(s, e)| (*s, *e)).collect(), 1),
        };
        self.placed.insert(group, Placed { depth, prev, heads });
        self.recent.push_front(group);
        self.recent.truncate(ANCHOR_CANDIDATES);
        Ok(Shape { prev, rows, depth })
    }

    /// The placed group `state` differs least from, among the recent ones
    /// (ties: the newest), else `old_prev` if placed and a valid base.
    fn anchor(
        &self,
        state: &Packed,
        old_prev: Option<StateGroup>,
        states: &mut impl StateSource,
    ) -> Result<Option<StateGroup>> {
        let mut best: Option<(StateGroup, usize)> = None;
        for &r in &self.recent {
            let limit = best.map_or(usize::MAX, |(_, n)| n);
            if let Some(n) = delta_len(&states.state(r)?, state, limit) {
                if best.is_none_or(|(_, b)| n < b) {
                    best = Some((r, n));
                }
            }
        }
        if best.is_none() {
            if let Some(p) = old_prev.filter(|p| self.placed.contains_key(p)) {
                if delta_len(&states.state(p)?, state, 0).is_some() {
                    return Ok(Some(p));
                }
            }
        }
        Ok(best.map(|(g, _)| g))
    }

    /// The shallowest ancestor of `head` (up to [`SKIP_BACK`] hops up) whose
    /// delta to `state` has no more than `rows` rows.
    fn skip_back(
        &self,
        head: StateGroup,
        rows: usize,
        state: &Packed,
        states: &mut impl StateSource,
    ) -> Result<(StateGroup, usize)> {
        let mut best = (head, rows);
        let mut at = self.placed[&head].prev;
        for _ in 0..SKIP_BACK {
            let Some(a) = at else { break };
            match delta_len(&states.state(a)?, state, rows) {
                Some(n) if n <= rows => best = (a, n),
                _ => break,
            }
            at = self.placed[&a].prev;
        }
        Ok(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Mem(HashMap<StateGroup, Packed>);

    impl StateSource for Mem {
        fn state(&mut self, group: StateGroup) -> Result<Packed> {
            Ok(self.0[&group].clone())
        }
    }

    /// Places `states` (group i has id i + 1) and checks every shape gives the
    /// state back; returns the shapes.
    fn plan(states: &[Packed], bound: u32) -> Vec<Shape> {
        let mut mem = Mem(HashMap::new());
        let mut planner = Planner::default();
        let mut shapes: Vec<Shape> = Vec::new();
        for (i, state) in states.iter().enumerate() {
            let g = i as i64 + 1;
            mem.0.insert(g, state.clone());
            let shape = planner.place(g, state, None, bound, &mut mem).unwrap();
            let mut rebuilt = match shape.prev {
                Some(p) => {
                    assert!(p < g);
                    assert_eq!(shape.depth, shapes[p as usize - 1].depth + 1);
                    mem.0[&p].clone()
                }
                None => Packed::new(),
            };
            rebuilt.extend(shape.rows.iter().copied());
            assert_eq!(&rebuilt, state, "group {g}");
            assert!(shape.depth <= bound, "group {g} at depth {}", shape.depth);
            shapes.push(shape);
        }
        shapes
    }

    /// A room where every group adds one new slot (a member joining).
    fn joins(n: u32) -> Vec<Packed> {
        let mut state = Packed::new();
        (0..n)
            .map(|i| {
                state.insert(i, i);
                state.clone()
            })
            .collect()
    }

    #[test]
    fn a_room_of_joins_costs_two_rows_a_group_within_the_bound() {
        let states = joins(1_000);
        let shapes = plan(&states, 30);
        let rows: usize = shapes.iter().map(|s| s.rows.len()).sum();
        // Two levels cover 30 * 31 / 2 = 465 groups; the third level crosses
        // them once more: about three rows a group at most, far below the
        // 1,000 * 1,001 / 2 of snapshots alone.
        assert!(rows < 3 * 1_000, "{rows} rows");
        assert_eq!(shapes.iter().filter(|s| s.prev.is_none()).count(), 1);
        assert_eq!(shapes.iter().map(|s| s.depth).max(), Some(30));
    }

    #[test]
    fn repeated_slots_make_upper_levels_stars() {
        // One slot changing again and again: every delta is one row, and skip
        // back hangs each upper-level group on the shallowest ancestor.
        let states: Vec<Packed> = (0..500).map(|i| Packed::unit(0, i)).collect();
        let shapes = plan(&states, 10);
        assert!(shapes.iter().all(|s| s.rows.len() == 1));
        assert!(shapes.iter().filter(|s| s.prev == Some(1)).count() > 40);
    }

    #[test]
    fn a_state_that_loses_a_slot_is_a_snapshot() {
        let a: Packed = [(0u32, 0u32), (1, 1)].into_iter().collect();
        let b: Packed = [(0u32, 0u32)].into_iter().collect();
        let shapes = plan(&[a, b], 10);
        assert_eq!(shapes[1].prev, None);
        assert_eq!(shapes[1].rows, vec![(0, 0)]);
    }

    #[test]
    fn forks_follow_their_own_lineage() {
        // Two branches from one group, interleaved in id order: each group's
        // delta is one row, on its own branch.
        let mut left = Packed::unit(0, 0);
        let mut right = left.clone();
        let mut states = vec![left.clone()];
        for i in 1..200 {
            left.insert(1_000 + i, i);
            right.insert(2_000 + i, i);
            states.push(left.clone());
            states.push(right.clone());
        }
        let shapes = plan(&states, 50);
        let rows: usize = shapes.iter().skip(1).map(|s| s.rows.len()).sum();
        assert!(rows < 2 * states.len(), "{rows} rows");
    }

    #[test]
    fn replanning_gives_the_same_shapes() {
        let states = joins(300);
        assert_eq!(plan(&states, 20), plan(&states, 20));
    }
}
