//! The state store ([`StateStore`]) and its capability trait
//! ([`StateGroupAccess`]), implemented once, that the main process and replica
//! workers both use.

use crate::caches::{Delta, StateCaches};
use crate::differences::{self, SnapshotOrigins, StateDifferences};
use crate::filter::StateFilter;
use crate::read;
use crate::schema::{
    current_state_events, event_to_state_groups, state_group_edges, state_groups,
    state_groups_state,
};
use crate::types::{StateGroup, StateKey, StateMap};
use crate::unwritten::{PreparedStateGroup, UnwrittenGroups, UnwrittenState};
use crate::write::{self, GroupRows, NewStateGroup, StoredInTxn, STATE_GROUP_SEQUENCE};
use diesel::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use storage_core::{
    with_conn, Column, Database, Error, InternedText, OpenMode, Result, RowsWrite, SharedText,
    StoreConfig, TableRows, Transaction,
};

/// Event ids per lookup statement.
const EVENT_BATCH: usize = 500;

/// The capability to read state groups and to store new ones, implemented once,
/// by [`StateStore`], which the main process and replica workers both build.
/// `store_state_group` is here, beside the reads, for a context builder that
/// writes each group at once (one without deferred writes, tests); the write
/// path prepares groups instead
/// ([`StateStore::prepare_state_group`]) and writes them in the batch's
/// transaction, a replica worker's too: it takes the id from the engine's shared
/// generator and the main process adopts the group
/// ([`StateStore::adopt_prepared_group`]).
pub trait StateGroupAccess {
    /// Stores a state group and returns its id: a delta with an edge to
    /// `prev_group` when given and its chain is shorter than
    /// [`MAX_STATE_DELTA_HOPS`](crate::MAX_STATE_DELTA_HOPS), otherwise a full
    /// snapshot. The new group's caches are prefilled once committed.
    fn store_state_group(&self, new: &NewStateGroup<'_>) -> Result<StateGroup>;

    /// The group's prev group and its delta against it; `None` for a snapshot.
    fn get_state_group_delta(&self, group: StateGroup) -> Result<Delta>;

    /// The state of each group under `filter`. Unknown groups are an error.
    fn get_state_for_groups(
        &self,
        groups: &[StateGroup],
        filter: &StateFilter,
    ) -> Result<HashMap<StateGroup, StateMap>>;

    /// The group holding the state after each event; events without one (unknown,
    /// or outliers) are absent from the answer.
    fn get_state_group_for_events(&self, event_ids: &[&str])
        -> Result<HashMap<String, StateGroup>>;

    /// The state after `event_id` under `filter`. An unknown or outlier event is
    /// a not-found error.
    fn get_state_for_event(&self, event_id: &str, filter: &StateFilter) -> Result<StateMap>;

    /// The room's current state (`current_state_events`).
    fn get_current_state_ids(&self, room_id: &str) -> Result<Arc<StateMap>>;

    /// The room a state group belongs to, if the group exists.
    fn get_state_group_room(&self, group: StateGroup) -> Result<Option<String>>;

    /// Whether any state group of the room exists.
    fn room_has_state(&self, room_id: &str) -> Result<bool>;
}

/// The two dictionary caches of group state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    /// `m.room.member` state.
    Members,
    /// Everything else.
    NonMembers,
}

/// The one implementation of [`StateGroupAccess`], cheap to clone.
#[derive(Debug, Clone)]
pub struct StateStore {
    db: Database,
    caches: Arc<StateCaches>,
    /// Groups prepared for a batch not yet written (see [`crate::unwritten`]).
    unwritten: Arc<UnwrittenGroups>,
}

impl StateStore {
    /// Whether some event references `group`: then no purge ever deletes it
    /// (see [`crate::purge`]). Read from the database, never a cache.
    pub fn is_group_referenced(&self, group: StateGroup) -> Result<bool> {
        self.db.run_read("is_state_group_referenced", |txn| {
            Ok(with_conn!(txn.conn(), |c| diesel::select(
                diesel::dsl::exists(
                    event_to_state_groups::table
                        .filter(event_to_state_groups::state_group.eq(group))
                )
            )
            .get_result::<bool>(c))?)
        })
    }

    /// The room's current state on `slots` alone: from the cached current
    /// state when there is one, else those rows of `current_state_events`
    /// (a statement per event type), not the room's whole state. What a
    /// writer moving the room along one line compares its delta with.
    pub fn get_current_state_for_slots<'a>(
        &self,
        room_id: &str,
        slots: impl IntoIterator<Item = &'a StateKey>,
    ) -> Result<StateMap> {
        let slots: Vec<&StateKey> = slots.into_iter().collect();
        if let Some(state) = self.caches.current_state.get(&room_id.to_owned()) {
            return Ok(slots
                .iter()
                .filter_map(|k| state.get_key_value(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect());
        }
        let mut by_type: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
        for (t, k) in &slots {
            by_type.entry(&**t).or_default().push(&**k);
        }
        self.db.run_read("get_current_state_for_slots", |txn| {
            let mut state = StateMap::new();
            for (t, keys) in &by_type {
                for chunk in keys.chunks(EVENT_BATCH) {
                    let rows: Vec<(InternedText, SharedText, SharedText)> =
                        with_conn!(txn.conn(), |c| current_state_events::table
                            .select((
                                current_state_events::type_,
                                current_state_events::state_key,
                                current_state_events::event_id,
                            ))
                            .filter(current_state_events::room_id.eq(room_id))
                            .filter(current_state_events::type_.eq(*t))
                            .filter(current_state_events::state_key.eq_any(chunk))
                            .load(c))?;
                    state.extend(rows.into_iter().map(|(t, k, e)| ((t.0, k.0), e.0)));
                }
            }
            Ok(state)
        })
    }

    /// The event `group` was written for (`state_groups.event_id`), `None`
    /// for an unknown group. What a snapshot's origin is found from (see
    /// [`SnapshotOrigins`]).
    pub fn get_state_group_event(&self, group: StateGroup) -> Result<Option<String>> {
        self.db.run_read("get_state_group_event", |txn| {
            Ok(with_conn!(txn.conn(), |c| state_groups::table
                .select(state_groups::event_id)
                .find(group)
                .first::<String>(c)
                .optional())?)
        })
    }

    /// Built from the same parameters as every store. A writer first moves
    /// `state_group_id_seq` past the highest group if it is behind.
    pub fn new(db: Database, config: &StoreConfig) -> Result<Self> {
        if db.mode() == OpenMode::Writer {
            db.sync_sequence(&STATE_GROUP_SEQUENCE)?;
        }
        Ok(StateStore {
            db,
            caches: Arc::new(StateCaches::new(config)),
            unwritten: Arc::default(),
        })
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    pub fn caches(&self) -> &StateCaches {
        &self.caches
    }

    /// [`StateGroupAccess::store_state_group`] inside a caller's transaction, so that
    /// a batch of events stores its groups and the events together.
    pub fn store_state_group_txn(
        &self,
        txn: &mut Transaction<'_>,
        new: &NewStateGroup<'_>,
    ) -> Result<StateGroup> {
        new.validate()?;
        let group = txn.next_id(&STATE_GROUP_SEQUENCE)?;
        let mut rows = GroupRows::default();
        write::store_txn(
            txn,
            &self.caches,
            new,
            None,
            group,
            &mut StoredInTxn::default(),
            &mut rows,
        )?;
        rows.flush(txn)?;
        Ok(group)
    }

    /// Takes an id for `new` and keeps it readable (by this store's reads) until
    /// [`Self::store_prepared_groups_txn`] writes it in the transaction of its
    /// event's batch, or [`Self::forget_prepared_groups`] drops it. One
    /// statement (the sequence), no transaction.
    pub fn prepare_state_group(&self, new: &NewStateGroup<'_>) -> Result<Arc<PreparedStateGroup>> {
        new.validate()?;
        let state = self.full_state_of(new);
        // Often the first statement of a write (everything before it is
        // served from memory): a session the server ended shows here first.
        let group = self
            .db
            .next_ids(&STATE_GROUP_SEQUENCE, 1)?
            .into_iter()
            .next()
            .ok_or_else(|| Error::other("the state group sequence gave no id"))?;
        let prepared = Arc::new(PreparedStateGroup::new(group, new, state));
        self.unwritten.insert(prepared.clone());
        Ok(prepared)
    }

    /// Like [`Self::prepare_state_group`] for a group another process (a
    /// replica worker) prepared under `group`, an id it took from the shared
    /// sequence: kept readable here until the batch carrying it writes it.
    /// Reads nothing when the prev group is prepared or cached in full.
    /// `None`, adopting nothing, when a group of that id is prepared here
    /// already (by an earlier delivery of the same request, say: see
    /// [`Self::wait_for_prepared_groups`]).
    pub fn adopt_prepared_group(
        &self,
        group: StateGroup,
        new: &NewStateGroup<'_>,
    ) -> Result<Option<Arc<PreparedStateGroup>>> {
        new.validate()?;
        let state = self.full_state_of(new);
        let prepared = Arc::new(PreparedStateGroup::new(group, new, state));
        Ok(self
            .unwritten
            .insert_new(prepared.clone())
            .then_some(prepared))
    }

    /// Waits until none of `groups` is prepared here (each written by its
    /// batch, or dropped), at most until `deadline`: whether none is.
    pub fn wait_for_prepared_groups(&self, groups: &[StateGroup], deadline: Instant) -> bool {
        self.unwritten.wait_until_none_of(groups, deadline)
    }

    /// How many callers wait in [`Self::wait_for_prepared_groups`] now.
    pub fn prepared_group_waiters(&self) -> usize {
        self.unwritten.waiting()
    }

    /// The full state of the group `new` describes when it costs no read:
    /// given, or its prev group's with the delta applied, where the prepared
    /// deltas below it end in a group held whole (prepared, or by the
    /// caches). `None` otherwise: reads of the prepared group then take the
    /// slots they ask for from its delta and its prev group.
    fn full_state_of(&self, new: &NewStateGroup<'_>) -> Option<StateMap> {
        match (new.current_state_ids, new.prev_group, new.delta_ids) {
            (Some(current), _, _) => Some(current.clone()),
            (None, Some(prev), Some(delta)) => {
                let mut state = match self.unwritten.state(prev, &StateFilter::all()) {
                    Some(UnwrittenState::Known(state)) => state,
                    Some(UnwrittenState::Over { set, below, .. }) => {
                        let mut state = read::cached_full_state(&self.caches, below)?;
                        state.extend(set);
                        state
                    }
                    None => read::cached_full_state(&self.caches, prev)?,
                };
                state.extend(delta.iter().map(|(k, v)| (k.clone(), v.clone())));
                Some(state)
            }
            _ => unreachable!("validate() refuses a group with neither state nor a delta"),
        }
    }

    /// Prepared groups that another process (the main process, for a worker)
    /// has committed: their caches are filled with what is known of them
    /// (room and state; not their shape, which the writer chose) and they are
    /// read from the database from now on. In order: a group may have an
    /// earlier one as its prev group.
    pub fn prepared_groups_written_elsewhere(&self, groups: &[Arc<PreparedStateGroup>]) {
        for g in groups {
            let seqs = (
                self.caches.members.sequence(),
                self.caches.non_members.sequence(),
            );
            let derived_from = g
                .prev_group
                .zip(g.delta_ids.clone())
                .map(|(prev, delta)| (prev, Arc::new(delta)));
            write::prefill(
                &self.caches,
                seqs,
                g.group,
                g.room_id.clone(),
                g.full_state(),
                derived_from,
            );
        }
        self.unwritten.remove(groups.iter().map(|g| g.group));
    }

    /// The state group after each event of `mappings`, committed by another
    /// process (the main process, for a worker): cached as if read.
    pub fn remember_event_state_groups(&self, mappings: &[(&str, StateGroup)]) {
        let seq = self.caches.event_groups.sequence();
        for (e, g) in mappings {
            self.caches.event_groups.insert_at(seq, (*e).to_owned(), *g);
        }
    }

    /// Writes prepared groups inside a caller's transaction, in order (a group
    /// may have an earlier one as its prev group). Once committed, their caches
    /// are prefilled and they are read from the database.
    pub fn store_prepared_groups_txn(
        &self,
        txn: &mut Transaction<'_>,
        groups: &[Arc<PreparedStateGroup>],
    ) -> Result<()> {
        self.store_prepared_groups_then(txn, groups, |_, _| Ok(()))
    }

    /// [`Self::store_prepared_groups_txn`], handing the groups' rows not
    /// inserted yet to `then`, for its own statement: when it inserts them
    /// with its rows ([`PendingGroupRows::columns`]), `then` says so
    /// ([`PendingGroupRows::written`]); any it did not write are inserted
    /// after it.
    pub fn store_prepared_groups_then<R>(
        &self,
        txn: &mut Transaction<'_>,
        groups: &[Arc<PreparedStateGroup>],
        then: impl FnOnce(&mut Transaction<'_>, &mut PendingGroupRows<'_>) -> Result<R>,
    ) -> Result<R> {
        if groups.is_empty() {
            return then(txn, &mut PendingGroupRows(GroupRows::default()));
        }
        let mut stored = StoredInTxn::default();
        let news: Vec<NewStateGroup<'_>> = groups.iter().map(|g| g.as_new()).collect();
        let mut rows = GroupRows::default();
        for (g, new) in groups.iter().zip(&news) {
            let known = g.known_state();
            write::store_txn(
                txn,
                &self.caches,
                new,
                known,
                g.group,
                &mut stored,
                &mut rows,
            )?;
        }
        let mut pending = PendingGroupRows(rows);
        let out = then(txn, &mut pending)?;
        pending.0.flush(txn)?;
        let unwritten = self.unwritten.clone();
        let ids: Vec<StateGroup> = groups.iter().map(|g| g.group).collect();
        txn.call_after(move || unwritten.remove(ids));
        Ok(out)
    }

    /// How many prepared groups are held in memory, waiting for their batch
    /// (what a writer that drops its failed batches' groups keeps near zero).
    pub fn prepared_groups_waiting(&self) -> usize {
        self.unwritten.len()
    }

    /// Drops prepared groups that will not be written (their batch failed, or
    /// their events were refused before being queued).
    pub fn forget_prepared_groups<'a>(
        &self,
        groups: impl IntoIterator<Item = &'a Arc<PreparedStateGroup>>,
    ) {
        self.unwritten.remove(groups.into_iter().map(|g| g.group));
    }

    /// What the states of `groups` disagree on: per slot where some differ,
    /// each group's value, in the order of `groups` (see
    /// [`crate::differences`]). Compared in memory when every group's whole
    /// state is held here (prepared, or cached whole); otherwise read as
    /// such, no group's whole state built, through the `origins` of the
    /// snapshots the groups' chains end in where they do not meet.
    /// Unknown groups are an error.
    pub fn get_state_differences(
        &self,
        groups: &[StateGroup],
        origins: &dyn SnapshotOrigins,
    ) -> Result<StateDifferences> {
        let held: Option<Vec<StateMap>> = groups
            .iter()
            .map(|g| {
                self.unwritten
                    .full_state(*g)
                    .or_else(|| self.caches.full_states.get(g))
            })
            .collect();
        let states = match held {
            Some(states) => states,
            // A prepared group's state is in memory only.
            None if groups.iter().any(|g| self.unwritten.contains(*g)) => {
                let mut read = self.get_state_for_groups(groups, &StateFilter::all())?;
                groups
                    .iter()
                    .map(|g| read.remove(g).unwrap_or_default())
                    .collect()
            }
            None => return differences::read(&self.caches, &self.db, groups, origins),
        };
        Ok(differences::of_states(&states.iter().collect::<Vec<_>>()))
    }

    /// [`StateGroupAccess::get_state_for_groups`] for groups some of which are
    /// prepared and not written yet.
    fn state_with_unwritten(
        &self,
        groups: &[StateGroup],
        filter: &StateFilter,
    ) -> Result<HashMap<StateGroup, StateMap>> {
        let mut result = HashMap::with_capacity(groups.len());
        let mut written = Vec::new();
        for &g in groups {
            match self.unwritten.state(g, filter) {
                Some(UnwrittenState::Known(state)) => {
                    result.insert(g, state);
                }
                Some(UnwrittenState::Over { set, below, rest }) => {
                    let mut state = if rest.is_empty() {
                        StateMap::new()
                    } else {
                        read::state_for_groups(&self.caches, &self.db, &[below], &rest)?
                            .remove(&below)
                            .unwrap_or_default()
                    };
                    state.extend(set);
                    result.insert(g, state);
                }
                None => written.push(g),
            }
        }
        if !written.is_empty() {
            result.extend(read::state_for_groups(
                &self.caches,
                &self.db,
                &written,
                filter,
            )?);
        }
        Ok(result)
    }

    /// Records the state group after each event (`event_to_state_groups`) inside a
    /// caller's transaction; the mappings are cached once committed.
    pub fn store_event_state_groups_txn(
        &self,
        txn: &mut Transaction<'_>,
        mappings: &[(&str, StateGroup)],
    ) -> Result<()> {
        txn.insert_columns(&[Self::event_state_group_rows(mappings)])?;
        self.cache_event_state_groups_after_commit(txn, mappings);
        Ok(())
    }

    /// The rows of [`Self::store_event_state_groups_txn`], for a caller that
    /// inserts them in a statement of its own
    /// ([`Transaction::insert_columns`]), then calls
    /// [`Self::cache_event_state_groups_after_commit`].
    pub fn event_state_group_rows<'a>(mappings: &[(&'a str, StateGroup)]) -> TableRows<'a> {
        TableRows {
            table: "event_to_state_groups",
            columns: vec![
                (
                    "event_id",
                    Column::Text(mappings.iter().map(|(e, _)| *e).collect()),
                ),
                (
                    "state_group",
                    Column::BigInt(mappings.iter().map(|(_, g)| *g).collect()),
                ),
            ],
            write: RowsWrite::Insert,
        }
    }

    /// Caches the mappings once `txn` has committed them.
    pub fn cache_event_state_groups_after_commit(
        &self,
        txn: &mut Transaction<'_>,
        mappings: &[(&str, StateGroup)],
    ) {
        let caches = self.caches.clone();
        let seq = caches.event_groups.sequence();
        let owned: Vec<(String, StateGroup)> = mappings
            .iter()
            .map(|(e, g)| ((*e).to_owned(), *g))
            .collect();
        txn.call_after(move || {
            for (e, g) in owned {
                caches.event_groups.insert_at(seq, e, g);
            }
        });
    }

    /// A change of a room's `current_state_events` as rows for
    /// [`Transaction::insert_columns`]: the `removed` slots deleted, the
    /// `added` ones inserted or their row's event (and, for members, its
    /// membership) replaced. Once the statement ran, the caller
    /// calls [`Self::current_state_written_txn`].
    pub fn current_state_rows<'a>(
        room_id: &'a str,
        removed: &'a [StateKey],
        added: &'a [(StateKey, String, Option<String>)],
    ) -> Vec<TableRows<'a>> {
        // A slot both removed and added is only added (replaced): the two
        // parts of one statement must touch different rows.
        let added_keys: std::collections::HashSet<&StateKey> =
            added.iter().map(|(k, _, _)| k).collect();
        let removed: Vec<&StateKey> = removed.iter().filter(|k| !added_keys.contains(k)).collect();
        vec![
            TableRows {
                table: "current_state_events",
                columns: vec![
                    (
                        "room_id",
                        Column::Text(removed.iter().map(|_| room_id).collect()),
                    ),
                    (
                        "type",
                        Column::Text(removed.iter().map(|(t, _)| &**t).collect()),
                    ),
                    (
                        "state_key",
                        Column::Text(removed.iter().map(|(_, k)| &**k).collect()),
                    ),
                ],
                write: RowsWrite::Delete,
            },
            TableRows {
                table: "current_state_events",
                columns: vec![
                    (
                        "event_id",
                        Column::Text(added.iter().map(|(_, e, _)| e.as_str()).collect()),
                    ),
                    (
                        "room_id",
                        Column::Text(added.iter().map(|_| room_id).collect()),
                    ),
                    (
                        "type",
                        Column::Text(added.iter().map(|((t, _), _, _)| &**t).collect()),
                    ),
                    (
                        "state_key",
                        Column::Text(added.iter().map(|((_, k), _, _)| &**k).collect()),
                    ),
                    (
                        "membership",
                        Column::OptText(added.iter().map(|(_, _, m)| m.as_deref()).collect()),
                    ),
                ],
                write: RowsWrite::Upsert {
                    key: &["room_id", "type", "state_key"],
                },
            },
        ]
    }

    /// After the rows of [`Self::current_state_rows`] were written in `txn`:
    /// once committed, the room's cached current state (if any) is replaced
    /// by the changed one.
    pub fn current_state_written_txn(
        &self,
        txn: &mut Transaction<'_>,
        room_id: &str,
        removed: &[StateKey],
        added: &[(StateKey, String, Option<String>)],
    ) {
        // The room's next write reads its current state: when it is cached,
        // the cache gets the new state, so that read stays in memory. Only
        // this process writes the room, one batch at a time, so the cached
        // state is the one this change applies to.
        let room = room_id.to_owned();
        let updated = self.caches.current_state.peek(&room).map(|old| {
            let mut state = StateMap::clone(&old);
            for key in removed {
                state.remove(key);
            }
            for (key, event_id, _) in added {
                state.insert(key.clone(), event_id.as_str().into());
            }
            Arc::new(state)
        });
        let caches = self.caches.clone();
        txn.call_after(move || {
            // Invalidated first: a read that began before the commit cannot
            // put the old state back.
            caches.current_state.invalidate(&room);
            if let Some(state) = updated {
                caches.current_state.insert(room, state);
            }
        });
    }

    /// What one of the two state caches alone can answer for `group` under
    /// `filter`, and whether that is all the filter asks for (no database access).
    pub fn state_from_cache(
        &self,
        cache: CacheKind,
        group: StateGroup,
        filter: &StateFilter,
    ) -> (StateMap, bool) {
        let cache = match cache {
            CacheKind::Members => &self.caches.members,
            CacheKind::NonMembers => &self.caches.non_members,
        };
        read::from_cache(cache, group, filter)
    }

    /// Forgets the cached current state of `room_id`; writers call it (through
    /// `call_after`) when a commit changed it.
    pub fn invalidate_current_state(&self, room_id: &str) {
        self.caches.current_state.invalidate(&room_id.to_owned());
    }

    /// Forgets what is cached of how `groups` are stored (prev group, delta) and
    /// every cached chain length: compression rewrote them. Their states are
    /// unchanged, so the state caches keep them.
    pub fn forget_state_group_shapes(&self, groups: &[StateGroup]) {
        for g in groups {
            self.caches.deltas.invalidate(g);
        }
        self.caches.chain_lengths.invalidate_all();
    }

    /// Forgets everything cached of `groups`, deleted (purged): their states,
    /// shapes, chain lengths and rooms.
    pub fn forget_state_groups(&self, groups: &[StateGroup]) {
        for g in groups {
            self.caches.invalidate_group(*g);
        }
    }

    /// The group holding the state after `event_id` (`None`: an unknown event,
    /// or an outlier), read from the database, never the cache: for a process
    /// that reads a database another process writes and purges without
    /// telling it (`serve --read-only`). The writer may have deleted the
    /// group, and Synapse on SQLite hands the ids of deleted groups out again
    /// after a restart (it starts from the highest id left). So when the
    /// group's row (its room, the event it was written for) is not the one its
    /// caches were filled under, everything cached of the group is forgotten
    /// first. One indexed read (the event's mapping with its group's row).
    pub fn reread_event_state_group(&self, event_id: &str) -> Result<Option<StateGroup>> {
        let row: Option<(i64, Option<String>, Option<String>)> =
            self.db.run_read("reread_event_state_group", |txn| {
                Ok(with_conn!(txn.conn(), |c| event_to_state_groups::table
                    .left_join(
                        state_groups::table
                            .on(state_groups::id.eq(event_to_state_groups::state_group)),
                    )
                    .select((
                        event_to_state_groups::state_group,
                        state_groups::room_id.nullable(),
                        state_groups::event_id.nullable(),
                    ))
                    .filter(event_to_state_groups::event_id.eq(event_id))
                    .first(c)
                    .optional())?)
            })?;
        let Some((group, room, origin)) = row else {
            self.caches.event_groups.invalidate(&event_id.to_owned());
            return Ok(None);
        };
        let row = room.zip(origin);
        let cached = self.caches.group_origins.get(&group);
        if row.is_none() || cached != row {
            if cached.is_some() {
                log::info!(
                    "state group {group} (after {event_id}) is not the group cached under its id \
                     (deleted, its id used again): forgetting what was cached of it"
                );
            }
            self.caches.invalidate_group(group);
            if let Some(row) = row {
                self.caches.group_origins.insert(group, row);
            }
        }
        self.caches.event_groups.insert(event_id.to_owned(), group);
        Ok(Some(group))
    }

    /// Forgets every cached prev group, delta and chain length: for a replica
    /// that may have missed rewrites.
    pub fn forget_all_state_group_shapes(&self) {
        self.caches.deltas.invalidate_all();
        self.caches.chain_lengths.invalidate_all();
    }

    /// Forgets the cached current state of every room: for a replica that may
    /// have missed invalidations (its position fell behind what the stream
    /// still holds).
    pub fn invalidate_all_current_state(&self) {
        self.caches.current_state.invalidate_all();
    }
}

impl StateGroupAccess for StateStore {
    fn store_state_group(&self, new: &NewStateGroup<'_>) -> Result<StateGroup> {
        new.validate()?;
        self.db.run_interaction("store_state_group", |txn| {
            self.store_state_group_txn(txn, new)
        })
    }

    fn get_state_group_delta(&self, group: StateGroup) -> Result<Delta> {
        if let Some(delta) = self.caches.deltas.get(&group) {
            return Ok(delta);
        }
        let seq = self.caches.deltas.sequence();
        let delta = self.db.run_read("get_state_group_delta", |txn| {
            let prev: Option<i64> = with_conn!(txn.conn(), |c| state_group_edges::table
                .select(state_group_edges::prev_state_group)
                .filter(state_group_edges::state_group.eq(group))
                .first::<i64>(c)
                .optional())?;
            let Some(prev) = prev else {
                return Ok(None);
            };
            let rows: Vec<(InternedText, SharedText, SharedText)> =
                with_conn!(txn.conn(), |c| state_groups_state::table
                    .select((
                        state_groups_state::type_,
                        state_groups_state::state_key,
                        state_groups_state::event_id,
                    ))
                    .filter(state_groups_state::state_group.eq(group))
                    .load(c))?;
            let delta: StateMap = rows
                .into_iter()
                .map(|(t, k, e)| ((t.0, k.0), e.0))
                .collect();
            Ok(Some((prev, Arc::new(delta))))
        })?;
        self.caches.deltas.insert_at(seq, group, delta.clone());
        Ok(delta)
    }

    fn get_state_for_groups(
        &self,
        groups: &[StateGroup],
        filter: &StateFilter,
    ) -> Result<HashMap<StateGroup, StateMap>> {
        if self.unwritten.is_empty() {
            return read::state_for_groups(&self.caches, &self.db, groups, filter);
        }
        self.state_with_unwritten(groups, filter)
    }

    fn get_state_group_for_events(
        &self,
        event_ids: &[&str],
    ) -> Result<HashMap<String, StateGroup>> {
        let mut found = HashMap::with_capacity(event_ids.len());
        let mut missing = Vec::new();
        for &e in event_ids {
            match self.caches.event_groups.get(&e.to_owned()) {
                Some(g) => {
                    found.insert(e.to_owned(), g);
                }
                None => missing.push(e),
            }
        }
        if missing.is_empty() {
            return Ok(found);
        }
        let seq = self.caches.event_groups.sequence();
        let rows = self.db.run_read("get_state_group_for_events", |txn| {
            let mut rows = Vec::with_capacity(missing.len());
            for chunk in missing.chunks(EVENT_BATCH) {
                rows.extend(with_conn!(txn.conn(), |c| event_to_state_groups::table
                    .select((
                        event_to_state_groups::event_id,
                        event_to_state_groups::state_group
                    ))
                    .filter(event_to_state_groups::event_id.eq_any(chunk))
                    .load::<(String, i64)>(c))?);
            }
            Ok(rows)
        })?;
        for (event_id, group) in rows {
            self.caches
                .event_groups
                .insert_at(seq, event_id.clone(), group);
            found.insert(event_id, group);
        }
        Ok(found)
    }

    fn get_state_for_event(&self, event_id: &str, filter: &StateFilter) -> Result<StateMap> {
        let group = self
            .get_state_group_for_events(&[event_id])?
            .remove(event_id)
            .ok_or_else(|| {
                Error::not_found(format!(
                    "no state group for unknown or outlier event {event_id}"
                ))
            })?;
        let mut states = self
            .get_state_for_groups(&[group], filter)
            .map_err(|e| e.context(format!("the state after event {event_id}, group {group}")))?;
        Ok(states.remove(&group).unwrap_or_default())
    }

    fn get_current_state_ids(&self, room_id: &str) -> Result<Arc<StateMap>> {
        let key = room_id.to_owned();
        if let Some(state) = self.caches.current_state.get(&key) {
            return Ok(state);
        }
        let seq = self.caches.current_state.sequence();
        let rows: Vec<(InternedText, SharedText, SharedText)> =
            self.db.run_read("get_current_state_ids", |txn| {
                Ok(with_conn!(txn.conn(), |c| current_state_events::table
                    .select((
                        current_state_events::type_,
                        current_state_events::state_key,
                        current_state_events::event_id,
                    ))
                    .filter(current_state_events::room_id.eq(room_id))
                    .load(c))?)
            })?;
        let state: Arc<StateMap> = Arc::new(
            rows.into_iter()
                .map(|(t, k, e)| ((t.0, k.0), e.0))
                .collect(),
        );
        self.caches.current_state.insert_at(seq, key, state.clone());
        Ok(state)
    }

    fn get_state_group_room(&self, group: StateGroup) -> Result<Option<String>> {
        if let Some(room) = self.caches.group_rooms.get(&group) {
            return Ok(Some(room));
        }
        let room = self.db.run_read("get_state_group_room", |txn| {
            Ok(with_conn!(txn.conn(), |c| state_groups::table
                .select(state_groups::room_id)
                .find(group)
                .first::<String>(c)
                .optional())?)
        })?;
        // Only a group that exists is remembered: one not found may be being
        // written by another process right now.
        if let Some(room) = &room {
            self.caches.group_rooms.insert(group, room.clone());
        }
        Ok(room)
    }

    fn room_has_state(&self, room_id: &str) -> Result<bool> {
        // A group that no event references (left by a refused write) does not
        // make a room known.
        self.db.run_read("room_has_state", |txn| {
            let referenced = event_to_state_groups::table
                .select(event_to_state_groups::state_group)
                .filter(event_to_state_groups::state_group.eq(state_groups::id));
            Ok(with_conn!(txn.conn(), |c| diesel::select(
                diesel::dsl::exists(
                    state_groups::table
                        .filter(state_groups::room_id.eq(room_id))
                        .filter(diesel::dsl::exists(referenced))
                )
            )
            .get_result::<bool>(c))?)
        })
    }
}

/// The rows of a transaction's new groups not inserted yet
/// ([`StateStore::store_prepared_groups_then`]).
pub struct PendingGroupRows<'a>(GroupRows<'a>);

impl std::fmt::Debug for PendingGroupRows<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingGroupRows").finish_non_exhaustive()
    }
}

impl<'a> PendingGroupRows<'a> {
    /// The rows, column by column, for a statement that inserts several
    /// tables' ([`Transaction::insert_columns`]).
    pub fn columns(&self) -> Vec<TableRows<'a>> {
        self.0.columns()
    }

    /// The statement given [`Self::columns`] inserted them.
    pub fn written(&mut self) {
        self.0 = GroupRows::default();
    }
}
