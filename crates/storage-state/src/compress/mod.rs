//! Compressing state storage: rewriting a room's groups (their prev groups and
//! deltas, never their states) into a shape with far fewer rows, online.
//!
//! A room is read a window of groups at a time ([`load`]), each group placed
//! by the [`plan`]ner, and the groups whose shape changes rewritten in small
//! transactions ([`apply`]) that check, before committing, that every group
//! keeps its state. What makes it safe to run beside a server:
//! - only groups up to a bound read when the run starts are touched; groups
//!   written meanwhile are left as they are (their chains may pass through
//!   rewritten groups, which is checked);
//! - every transaction leaves a consistent database, so a run killed at any
//!   point has written whole chunks only; a second run plans the same shape,
//!   finds the rewritten groups already in it and goes on from there;
//! - a window whose new shape would not have fewer rows is left alone, and so
//!   is the rest of its room;
//! - the writing process's caches of prev groups, deltas and chain lengths
//!   forget the rewritten groups after each commit; other processes learn
//!   through [`CompressHooks::on_rewrite`], which the main process uses to put
//!   a cache invalidation on the replication stream in the same transaction.

mod apply;
mod load;
mod packed;
mod plan;
mod progress;
mod sql_text;

pub use crate::purge::highest_state_group;
pub use plan::MAX_COMPRESSED_CHAIN;
pub use progress::{load_progress, record_progress};

use crate::schema::{state_groups, state_groups_state};
use crate::store::StateStore;
use crate::types::StateGroup;
use apply::{Change, Expected};
use diesel::dsl::count_star;
use diesel::prelude::*;
use load::{OldGroup, RoomStates};
use plan::{Planner, StateSource, TAIL_CHAIN};
use std::collections::HashSet;
use std::time::{Duration, Instant};
use storage_core::{with_conn, Database, Result, ResultExt, Transaction};

/// Groups planned together; also bounds the states held in memory.
const WINDOW_GROUPS: usize = 20_000;

/// A rewrite transaction touches (deletes plus inserts) about this many rows at
/// most, unless one group alone has more: short enough that a writer waiting
/// for it (SQLite has one) waits milliseconds, not seconds.
pub const CHUNK_ROWS: usize = 20_000;

/// And rewrites at most this many groups.
const CHUNK_GROUPS: usize = 500;

/// The newest groups of a room, which the next events will build on, are kept
/// shallow enough for the write path to store deltas on them.
const TAIL_GROUPS: usize = 16;

/// How a run behaves.
#[derive(Debug, Clone)]
pub struct CompressOptions {
    /// Plan and report, write nothing.
    pub dry_run: bool,
    /// Rows deleted plus inserted per second, at most (paced between chunks).
    pub max_rows_per_second: Option<u64>,
    /// Rows a rewrite transaction touches, about (default [`CHUNK_ROWS`]).
    pub chunk_rows: usize,
}

impl Default for CompressOptions {
    fn default() -> Self {
        CompressOptions {
            dry_run: false,
            max_rows_per_second: None,
            chunk_rows: CHUNK_ROWS,
        }
    }
}

/// What became of a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Rewritten (or, on a dry run, would have been).
    Compressed,
    /// Already in the shape the compressor would give it.
    AlreadyCompact,
    /// Its new shape would not have had fewer rows: left alone.
    NotSmaller,
}

/// What a run did to one room.
#[derive(Debug, Clone, PartialEq)]
pub struct RoomReport {
    pub room_id: String,
    /// Groups considered (those up to the run's bound).
    pub groups: u64,
    /// Groups whose prev group or delta changed (on a dry run: would have).
    pub groups_rewritten: u64,
    /// `state_groups_state` rows of those groups, before and after.
    pub rows_before: u64,
    pub rows_after: u64,
    /// Where the room was left alone from, when a window would not shrink.
    pub left_alone_from: Option<StateGroup>,
    /// The longest new chain (groups from a rewritten group to its snapshot).
    pub longest_chain: u32,
    pub outcome: Outcome,
    pub seconds: f64,
    /// States read again from the database because the window had let them go.
    pub states_reread: usize,
}

/// What the caller adds to a run.
pub trait CompressHooks {
    /// Inside each rewrite transaction, after the check, with the room's
    /// rewritten groups: where the main process tells other processes.
    fn on_rewrite(
        &mut self,
        _txn: &mut Transaction<'_>,
        _room_id: &str,
        _groups: &[StateGroup],
    ) -> Result<()> {
        Ok(())
    }

    /// The SQL of each chunk, before it is applied (or instead, on a dry run).
    fn on_sql(&mut self, _sql: &str) -> Result<()> {
        Ok(())
    }

    /// Groups of the room dealt with so far.
    fn on_progress(&mut self, _room_id: &str, _groups_done: u64) {}
}

/// Hooks that add nothing.
#[derive(Debug, Default)]
pub struct NoHooks;

impl CompressHooks for NoHooks {}

/// The highest state group of `room_id` (0 when it has none).
pub fn highest_state_group_of_room(db: &Database, room_id: &str) -> Result<StateGroup> {
    db.run_read("compress_room_bound", |txn| {
        let max: Option<i64> = with_conn!(txn.conn(), |c| state_groups::table
            .select(diesel::dsl::max(state_groups::id))
            .filter(state_groups::room_id.eq(room_id))
            .first(c))?;
        Ok(max.unwrap_or(0))
    })
}

/// Rooms with state rows and how many, most first.
pub fn rooms_by_state_rows(db: &Database) -> Result<Vec<(String, i64)>> {
    db.run_read("compress_rooms", |txn| {
        Ok(with_conn!(txn.conn(), |c| state_groups_state::table
            .group_by(state_groups_state::room_id)
            .select((state_groups_state::room_id, count_star()))
            .order_by((count_star().desc(), state_groups_state::room_id))
            .load(c))?)
    })
}

/// How many groups of `room_id` a run bounded by `bound` considers.
pub fn room_groups(db: &Database, room_id: &str, bound: StateGroup) -> Result<u64> {
    db.run_read("compress_room_groups", |txn| {
        let n: i64 = with_conn!(txn.conn(), |c| state_groups::table
            .filter(state_groups::room_id.eq(room_id))
            .filter(state_groups::id.le(bound))
            .count()
            .get_result(c))?;
        Ok(n as u64)
    })
}

/// Compresses the groups of `room_id` up to `bound` through `store` (whose
/// caches learn of every rewrite).
pub fn compress_room(
    store: &StateStore,
    room_id: &str,
    bound: StateGroup,
    options: &CompressOptions,
    hooks: &mut dyn CompressHooks,
) -> Result<RoomReport> {
    RoomRun::new(store, room_id, bound, options)
        .run(hooks)
        .with_context(|| format!("compressing the state of room {room_id}"))
}

/// One room's run.
struct RoomRun<'a> {
    store: &'a StateStore,
    room_id: &'a str,
    bound: StateGroup,
    options: &'a CompressOptions,
    states: RoomStates,
    planner: Planner,
    pace: Pace,
}

impl<'a> RoomRun<'a> {
    fn new(
        store: &'a StateStore,
        room_id: &'a str,
        bound: StateGroup,
        options: &'a CompressOptions,
    ) -> Self {
        RoomRun {
            store,
            room_id,
            bound,
            options,
            states: RoomStates::new(store.database().clone()),
            planner: Planner::default(),
            pace: Pace::new(options.max_rows_per_second),
        }
    }

    fn run(mut self, hooks: &mut dyn CompressHooks) -> Result<RoomReport> {
        let started = Instant::now();
        let db = self.store.database().clone();
        let room_id = self.room_id;
        let tail_from = self.tail_from(&db)?;
        let mut report = RoomReport {
            room_id: room_id.to_owned(),
            groups: 0,
            groups_rewritten: 0,
            rows_before: 0,
            rows_after: 0,
            left_alone_from: None,
            longest_chain: 0,
            outcome: Outcome::AlreadyCompact,
            seconds: 0.0,
            states_reread: 0,
        };
        let mut after = StateGroup::MIN;
        loop {
            let interner = &mut self.states.interner;
            let window = db.run_read("compress_load_window", |txn| {
                load::window(txn, interner, room_id, after, self.bound, WINDOW_GROUPS)
            })?;
            let Some(last) = window.last() else { break };
            after = last.id;
            self.states.add_window(&window)?;

            let (mut old_rows, mut new_rows) = (0usize, 0usize);
            let mut changes = Vec::new();
            for group in &window {
                let state = self
                    .states
                    .known(group.id)
                    .cloned()
                    .expect("the window's states were just added");
                let depth_bound = if group.id >= tail_from {
                    TAIL_CHAIN
                } else {
                    MAX_COMPRESSED_CHAIN
                };
                let shape = self.planner.place(
                    group.id,
                    &state,
                    group.prev,
                    depth_bound,
                    &mut self.states,
                )?;
                old_rows += group.rows.len();
                new_rows += shape.rows.len();
                if shape.prev != group.prev || shape.rows != group.rows {
                    report.longest_chain = report.longest_chain.max(shape.depth);
                    changes.push(Change {
                        old: group.clone(),
                        new: shape,
                    });
                }
            }
            report.groups += window.len() as u64;
            report.rows_before += old_rows as u64;
            if changes.is_empty() {
                report.rows_after += old_rows as u64;
            } else if new_rows >= old_rows {
                // Not smaller: this window and the rest of the room stay as they are.
                log::info!(
                    "room {room_id}: groups {}..={} would need {new_rows} rows instead of \
                     {old_rows}; leaving them and the rest of the room alone",
                    window[0].id,
                    after
                );
                report.left_alone_from = Some(window[0].id);
                report.rows_after += old_rows as u64;
                let rest = self.rest_rows(&db, after)?;
                report.rows_before += rest;
                report.rows_after += rest;
                break;
            } else {
                report.groups_rewritten += changes.len() as u64;
                report.rows_after += new_rows as u64;
                self.write(&db, &window, &changes, hooks)?;
            }
            hooks.on_progress(room_id, report.groups);
            let live = self.planner.live_groups();
            self.states.retain(&live);
        }
        report.outcome = if report.groups_rewritten > 0 {
            Outcome::Compressed
        } else if report.left_alone_from.is_some() {
            Outcome::NotSmaller
        } else {
            Outcome::AlreadyCompact
        };
        report.states_reread = self.states.refetched;
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// The first of the room's newest [`TAIL_GROUPS`] groups up to the bound.
    fn tail_from(&self, db: &Database) -> Result<StateGroup> {
        let (room_id, bound) = (self.room_id, self.bound);
        db.run_read("compress_room_tail", |txn| {
            let newest: Vec<i64> = with_conn!(txn.conn(), |c| state_groups::table
                .select(state_groups::id)
                .filter(state_groups::room_id.eq(room_id))
                .filter(state_groups::id.le(bound))
                .order(state_groups::id.desc())
                .limit(TAIL_GROUPS as i64)
                .load(c))?;
            Ok(newest.last().copied().unwrap_or(StateGroup::MAX))
        })
    }

    /// Rows of the room's groups in `(after, bound]`.
    fn rest_rows(&self, db: &Database, after: StateGroup) -> Result<u64> {
        let (room_id, bound) = (self.room_id, self.bound);
        db.run_read("compress_rest_rows", |txn| {
            let n: i64 = with_conn!(txn.conn(), |c| state_groups_state::table
                .filter(state_groups_state::room_id.eq(room_id))
                .filter(state_groups_state::state_group.gt(after))
                .filter(state_groups_state::state_group.le(bound))
                .count()
                .get_result(c))?;
            Ok(n as u64)
        })
    }

    /// Rewrites `changes` (oldest first) chunk by chunk.
    fn write(
        &mut self,
        db: &Database,
        window: &[OldGroup],
        changes: &[Change],
        hooks: &mut dyn CompressHooks,
    ) -> Result<()> {
        let room_id = self.room_id;
        // Paced: no transaction bigger than a second's worth of rows.
        let chunk_rows = match self.options.max_rows_per_second {
            Some(limit) if limit > 0 => self.options.chunk_rows.min(limit as usize),
            _ => self.options.chunk_rows,
        };
        for chunk in chunks(changes, chunk_rows) {
            let began = Instant::now();
            let inside: HashSet<StateGroup> = chunk.iter().map(|c| c.old.id).collect();
            let children: Vec<StateGroup> = window
                .iter()
                .filter(|g| !inside.contains(&g.id) && g.prev.is_some_and(|p| inside.contains(&p)))
                .map(|g| g.id)
                .collect();
            hooks.on_sql(&sql_text::chunk_sql(&self.states.interner, room_id, chunk))?;
            if self.options.dry_run {
                continue;
            }
            let expected = self.expected(chunk, &children)?;
            let ids: Vec<StateGroup> = chunk.iter().map(|c| c.old.id).collect();
            let interner = &mut self.states.interner;
            db.run_interaction("compress_state_groups", |txn| {
                apply::rewrite_chunk(txn, self.store, interner, room_id, chunk, &expected)?;
                hooks.on_rewrite(txn, room_id, &ids)
            })
            .with_context(|| {
                format!("rewriting state groups {}..={}", ids[0], ids[ids.len() - 1])
            })?;
            let touched: usize = chunk.iter().map(Change::rows_touched).sum();
            self.pace.after(touched, began);
        }
        Ok(())
    }

    /// The states the check of `chunk` compares against: its groups', their
    /// prev groups' (old and new), and those of the window's groups whose prev
    /// group is in the chunk (`children`).
    fn expected(&mut self, chunk: &[Change], children: &[StateGroup]) -> Result<Expected> {
        let mut expected = Expected::new();
        let groups = chunk
            .iter()
            .flat_map(|c| [Some(c.old.id), c.old.prev, c.new.prev])
            .flatten()
            .chain(children.iter().copied());
        for g in groups {
            if let std::collections::hash_map::Entry::Vacant(e) = expected.entry(g) {
                e.insert(self.states.state(g)?);
            }
        }
        Ok(expected)
    }
}

/// Consecutive runs of changes within the chunk limits.
fn chunks(changes: &[Change], max_rows: usize) -> Vec<&[Change]> {
    let mut out = Vec::new();
    let (mut start, mut rows) = (0, 0);
    for (i, c) in changes.iter().enumerate() {
        let n = c.rows_touched();
        if i > start && (rows + n > max_rows || i - start >= CHUNK_GROUPS) {
            out.push(&changes[start..i]);
            start = i;
            rows = 0;
        }
        rows += n;
    }
    if start < changes.len() {
        out.push(&changes[start..]);
    }
    out
}

/// Keeps a run at or under a number of rows per second, chunk by chunk: time
/// spent before a chunk (loading, planning a room) is not banked as credit, or a
/// slow plan would let every chunk of a room commit back to back, and the
/// writers and readers the pace protects would meet one burst after all.
#[derive(Debug)]
struct Pace {
    limit: Option<u64>,
}

impl Pace {
    fn new(limit: Option<u64>) -> Self {
        Pace {
            limit: limit.filter(|l| *l > 0),
        }
    }

    /// Sleeps until a chunk of `rows` begun at `began` has taken as long as
    /// those rows need at the limit.
    fn after(&self, rows: usize, began: Instant) {
        if let Some(limit) = self.limit {
            let due = Duration::from_secs_f64(rows as f64 / limit as f64);
            if let Some(wait) = due.checked_sub(began.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
}
