//! Event contexts: where an event stands in its room's state.
//!
//! For each event the context says which state group holds the state before it
//! and which holds the state after it, and whether the auth rules rejected it.
//! Outliers get no state. Otherwise the state before comes from the prev events'
//! groups: one distinct group is used as it is; several are resolved (ruma's state
//! resolution for the room version, cached per set of groups) and the result is
//! stored as a group of its own. A state event that passes its auth rules gets a
//! new group: a delta of one entry, itself, on the group before it.

use crate::auth_chain::IdSet;
use crate::conflict::{parse_event_id, ByConflict, ConflictSource, Loaded, WholeStates};
use crate::{
    auth_types_for_pdu, check_auth_against_state, check_auth_events, resolve_state, Pdu, StateKey,
    StateMap,
};
use ruma::{EventId, OwnedEventId, RoomVersionId};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use storage_core::cache::LruCache;
use storage_core::{Error, Result, StoreConfig};
use storage_events::{EventReads, EventToPersist, EventsStore, StoredEvent};
use storage_state::{
    NewStateGroup, PreparedStateGroup, StateDifferences, StateFilter, StateGroup, StateGroupAccess,
    StateStore, StoredOrigins,
};

/// Where an event stands in its room's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventContext {
    pub outlier: bool,
    /// The group holding the state before the event; `None` for outliers and for
    /// a create event (the state before it is empty).
    pub state_group_before: Option<StateGroup>,
    /// The group holding the state after it: the state before plus the event for
    /// an accepted state event, the state before otherwise. `None` for outliers.
    pub state_group_after: Option<StateGroup>,
    /// Why the auth rules rejected the event, if they did.
    pub rejected: Option<String>,
    /// The groups computed for this event and not written yet (a builder that
    /// defers group writes, see [`ContextBuilder::deferring_group_writes`]): the
    /// event's batch writes them. Empty when they were written at once.
    pub new_state_groups: Vec<Arc<PreparedStateGroup>>,
}

/// Events known to a caller but perhaps not stored yet (the earlier lines of an
/// import, the earlier events of a request), with their contexts.
#[derive(Debug, Default)]
pub struct PendingEvents {
    events: HashMap<String, (Arc<Pdu>, Option<EventContext>)>,
    /// Rooms whose create event was accepted among these events.
    created: HashSet<String>,
}

impl PendingEvents {
    pub fn insert(&mut self, mut pdu: Arc<Pdu>, context: EventContext) {
        // Read back by later events' auth checks, which must see that it was
        // rejected, as they would once it is stored.
        if context.rejected.is_some() && !pdu.rejected {
            Arc::make_mut(&mut pdu).rejected = true;
        }
        if pdu.is_create() && context.rejected.is_none() {
            self.created.insert(pdu.room_id.to_string());
        }
        self.events
            .insert(pdu.event_id.to_string(), (pdu, Some(context)));
    }

    /// An event whose context is not at hand (its state group is read from
    /// storage when asked for).
    pub fn insert_pdu(&mut self, pdu: Arc<Pdu>) {
        self.events.insert(pdu.event_id.to_string(), (pdu, None));
    }

    pub fn contains(&self, event_id: &str) -> bool {
        self.events.contains_key(event_id)
    }

    /// Forgets events now readable from storage, handing back those it held
    /// (marked rejected as they read back).
    pub fn forget<'a>(&mut self, event_ids: impl IntoIterator<Item = &'a str>) -> Vec<Arc<Pdu>> {
        event_ids
            .into_iter()
            .filter_map(|id| self.events.remove(id))
            .map(|(pdu, _)| pdu)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    fn get(&self, event_id: &str) -> Option<&(Arc<Pdu>, Option<EventContext>)> {
        self.events.get(event_id)
    }
}

/// Computes event contexts over the state and events stores. Cheap to clone.
#[derive(Clone)]
pub struct ContextBuilder {
    state: StateStore,
    events: EventsStore,
    pdus: Arc<LruCache<String, Arc<Pdu>>>,
    /// Per set of groups, the group holding their resolved state and the event
    /// it was stored for.
    resolutions: Arc<LruCache<Vec<StateGroup>, (StateGroup, String)>>,
    groups_stored: Arc<AtomicU64>,
    /// Queries for events made through `EventsStore::get_events`.
    event_reads: Arc<AtomicU64>,
    /// Resolutions settled from the groups' conflict alone.
    resolved_by_conflict: Arc<AtomicU64>,
    /// Of those, the resolutions whose auth difference needed the unconflicted
    /// events' auth chain.
    asked_unconflicted_chain: Arc<AtomicU64>,
    /// The snapshots' origins comparisons of groups go through, found from
    /// the stored events and counted ([`storage_state::StoredOrigins`]).
    snapshot_origins: Arc<StoredOrigins>,
    /// Whether new groups are prepared for the event's batch to write rather
    /// than written at once.
    defer_group_writes: bool,
}

impl std::fmt::Debug for ContextBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextBuilder").finish_non_exhaustive()
    }
}

fn to_storage(state: &StateMap) -> storage_state::StateMap {
    state
        .iter()
        .map(|(k, v)| (k.clone(), Arc::from(v.as_str())))
        .collect()
}

fn from_storage(state: &storage_state::StateMap) -> Result<StateMap> {
    state
        .iter()
        .map(|(k, v)| Ok((k.clone(), parse_event_id(v)?)))
        .collect()
}

impl ContextBuilder {
    /// Works through `events` and the state store it composes.
    pub fn new(events: EventsStore, config: &StoreConfig) -> Self {
        ContextBuilder {
            state: events.state().clone(),
            events,
            pdus: Arc::new(LruCache::new("pdu_cache", config.cache_size(50_000))),
            resolutions: Arc::new(LruCache::new(
                "state_resolution_cache",
                config.cache_size(10_000),
            )),
            groups_stored: Arc::new(AtomicU64::new(0)),
            event_reads: Arc::new(AtomicU64::new(0)),
            resolved_by_conflict: Arc::new(AtomicU64::new(0)),
            asked_unconflicted_chain: Arc::new(AtomicU64::new(0)),
            snapshot_origins: Arc::new(StoredOrigins::default()),
            defer_group_writes: false,
        }
    }

    /// This builder, preparing new state groups (an id each, readable through
    /// the state store) for the transaction of their event's batch to write,
    /// instead of writing each in a transaction of its own. For the main
    /// process, whose batches it computes contexts for, and for a worker, which
    /// sends the groups with their events for the main process to write.
    pub fn deferring_group_writes(mut self) -> Self {
        self.defer_group_writes = true;
        self
    }

    /// A new group for `new`: written now, or prepared and added to `prepared`.
    fn new_group(
        &self,
        new: NewStateGroup<'_>,
        prepared: &mut Vec<Arc<PreparedStateGroup>>,
    ) -> Result<StateGroup> {
        let group = if self.defer_group_writes {
            let p = self.state.prepare_state_group(&new)?;
            let g = p.group;
            prepared.push(p);
            g
        } else {
            self.state.store_state_group(&new)?
        };
        self.groups_stored.fetch_add(1, Ordering::Relaxed);
        Ok(group)
    }

    /// Events whose contexts this builder computed and that another process
    /// (the main process, for a worker) has committed as they were: their
    /// prepared groups are read from storage from now on, with their caches
    /// filled, and the events and the groups after them are cached, as the
    /// room's next events name them as prev events (so a worker's next write
    /// to the room reads neither). `skipped` are those found already stored:
    /// what is stored for them may differ, so only their groups are kept.
    pub fn remember_written_elsewhere(
        &self,
        events: &[(Pdu, EventContext)],
        skipped: &HashSet<&str>,
    ) {
        let groups: Vec<Arc<PreparedStateGroup>> = events
            .iter()
            .flat_map(|(_, c)| c.new_state_groups.iter().cloned())
            .collect();
        self.state.prepared_groups_written_elsewhere(&groups);
        let mappings: Vec<(&str, StateGroup)> = events
            .iter()
            .filter(|(p, _)| !skipped.contains(p.event_id.as_str()))
            .filter_map(
                |(pdu, context)| match (context.outlier, context.state_group_after) {
                    (false, Some(group)) => Some((pdu.event_id.as_str(), group)),
                    _ => None,
                },
            )
            .collect();
        self.remember_committed(events, skipped);
        self.state.remember_event_state_groups(&mappings);
    }

    /// Events committed as they were (not those of `skipped`, found already
    /// stored: what is stored for them may differ), cached as they read back:
    /// the room's next events name them as prev or auth events, and would
    /// otherwise read and parse each of them again.
    pub fn remember_committed(&self, events: &[(Pdu, EventContext)], skipped: &HashSet<&str>) {
        let written = events
            .iter()
            .filter(|(p, _)| !skipped.contains(p.event_id.as_str()));
        for (pdu, context) in written {
            let mut pdu = pdu.clone();
            // As a stored event reads back (see `parse_stored`).
            pdu.rejected = context.rejected.is_some();
            self.remember_committed_pdu(Arc::new(pdu));
        }
    }

    /// [`Self::remember_committed`] for one event already marked rejected as
    /// it reads back (as [`PendingEvents`] hands them back).
    pub fn remember_committed_pdu(&self, pdu: Arc<Pdu>) {
        self.pdus.insert(pdu.event_id.to_string(), pdu);
    }

    pub fn state(&self) -> &StateStore {
        &self.state
    }

    pub fn events(&self) -> &EventsStore {
        &self.events
    }

    /// State groups this builder has stored.
    pub fn groups_stored(&self) -> u64 {
        self.groups_stored.load(Ordering::Relaxed)
    }

    /// Times this builder asked storage for events (each ask is one
    /// `get_events`, a query per chunk of ids): resolution is meant to ask a few
    /// times, not once per event.
    pub fn event_reads(&self) -> u64 {
        self.event_reads.load(Ordering::Relaxed)
    }

    /// Resolutions this builder settled from what the groups disagree on,
    /// without loading their whole states' events (see [`crate::conflict`]).
    pub fn resolutions_by_conflict(&self) -> u64 {
        self.resolved_by_conflict.load(Ordering::Relaxed)
    }

    /// Resolutions by the conflict that walked the unconflicted events' auth
    /// chain (stored ids) to settle their auth difference.
    pub fn resolutions_asking_unconflicted_chain(&self) -> u64 {
        self.asked_unconflicted_chain.load(Ordering::Relaxed)
    }

    /// Snapshots that comparisons of groups went through by their origin (the
    /// prev group of their event) rather than by their rows.
    pub fn snapshot_origins_followed(&self) -> u64 {
        self.snapshot_origins.followed()
    }

    /// `get_events`, counted.
    fn read_events(&self, ids: &[&str]) -> Result<HashMap<String, Arc<StoredEvent>>> {
        self.event_reads.fetch_add(1, Ordering::Relaxed);
        self.events.get_events(ids)
    }

    /// The event `event_id`, from `pending` or from storage (parsed with its
    /// room's version, marked rejected if it was).
    pub fn fetch_pdu(&self, event_id: &str, pending: &PendingEvents) -> Result<Option<Arc<Pdu>>> {
        if let Some((pdu, _)) = pending.get(event_id) {
            return Ok(Some(pdu.clone()));
        }
        if let Some(pdu) = self.pdus.get(&event_id.to_owned()) {
            return Ok(Some(pdu));
        }
        let Some(stored) = self.read_events(&[event_id])?.remove(event_id) else {
            return Ok(None);
        };
        let version = crate::incoming::stored_room_version(&self.events, &stored.room_id)?
            .ok_or_else(|| no_version(event_id, &stored.room_id))?;
        Ok(Some(self.parse_stored(&stored, &version)?))
    }

    /// Parses a stored event with its room's version, marks it rejected if it
    /// was, and caches it.
    fn parse_stored(&self, stored: &StoredEvent, version: &RoomVersionId) -> Result<Arc<Pdu>> {
        self.parse_stored_row(
            &stored.event_id,
            &stored.json,
            stored.rejected.is_some(),
            version,
        )
    }

    /// [`Self::parse_stored`] of an event's id, JSON and whether it was
    /// rejected, as its row holds them.
    fn parse_stored_row(
        &self,
        event_id: &str,
        json: &str,
        rejected: bool,
        version: &RoomVersionId,
    ) -> Result<Arc<Pdu>> {
        let mut pdu = Pdu::from_stored_json(json, version, event_id)
            .map_err(|e| Error::corrupt(format!("stored event {event_id} does not parse: {e}")))?;
        pdu.rejected = rejected;
        let pdu = Arc::new(pdu);
        self.pdus.insert(event_id.to_owned(), pdu.clone());
        Ok(pdu)
    }

    /// Loads `start` and every event of their auth chains into `loaded`,
    /// level by level (one `get_events` per level of the auth DAG, not one
    /// query per event), skipping what `loaded` already holds.
    ///
    /// `loaded` says `None` for an event known to be in neither `pending` nor
    /// storage. An event that cannot be read (it does not parse, its room has
    /// no version) is left out, so that the fetcher asks [`Self::fetch_pdu`]
    /// for it and logs why, as it does for any event fetched alone.
    fn load_with_auth_chains(
        &self,
        room_id: &str,
        start: Vec<OwnedEventId>,
        pending: &PendingEvents,
        loaded: &mut Loaded,
    ) -> Result<()> {
        // The room's version known beforehand, so that its events parse as
        // their rows come.
        let mut versions: HashMap<String, Option<RoomVersionId>> = HashMap::from([(
            room_id.to_owned(),
            crate::incoming::stored_room_version(&self.events, room_id)
                .ok()
                .flatten(),
        )]);
        // Every event asked for so far, so that none is asked for twice.
        let mut asked: HashSet<OwnedEventId, foldhash::fast::RandomState> = HashSet::default();
        let mut level: Vec<OwnedEventId> = start
            .into_iter()
            .filter(|id| !loaded.contains_key(id) && asked.insert(id.clone()))
            .collect();
        while !level.is_empty() {
            let mut from_storage: Vec<&OwnedEventId> = Vec::new();
            let mut found = Vec::new();
            for id in &level {
                if let Some((pdu, _)) = pending.get(id.as_str()) {
                    found.push((id.clone(), pdu.clone()));
                } else if let Some(pdu) = self.pdus.get(&id.to_string()) {
                    found.push((id.clone(), pdu));
                } else {
                    from_storage.push(id);
                }
            }
            // Parsed straight from their rows (nothing copied out of a row
            // but what the parsed event keeps), except those of a room whose
            // version is not known yet, read after the statement.
            let query: Vec<&str> = from_storage.iter().map(|id| id.as_str()).collect();
            let mut returned: HashSet<String> = HashSet::new();
            let mut later: Vec<StoredEvent> = Vec::new();
            let mut parsed: Vec<Arc<Pdu>> = Vec::with_capacity(query.len());
            if !query.is_empty() {
                self.event_reads.fetch_add(1, Ordering::Relaxed);
                self.events.visit_events(&query, |row| {
                    match versions.get(row.room_id) {
                        Some(Some(v)) => {
                            match self.parse_stored_row(
                                row.event_id,
                                row.json,
                                row.rejected.is_some(),
                                v,
                            ) {
                                Ok(pdu) => parsed.push(pdu),
                                Err(_) => {
                                    returned.insert(row.event_id.to_owned());
                                }
                            }
                        }
                        Some(None) => {
                            returned.insert(row.event_id.to_owned());
                        }
                        None => later.push(row.to_owned()),
                    }
                    Ok(())
                })?;
            }
            for event in later {
                returned.insert(event.event_id.clone());
                let version = match versions.get(&event.room_id) {
                    Some(v) => v.clone(),
                    None => {
                        let v = crate::incoming::stored_room_version(&self.events, &event.room_id)
                            .ok()
                            .flatten();
                        versions.insert(event.room_id.clone(), v.clone());
                        v
                    }
                };
                if let Some(pdu) = version.and_then(|v| self.parse_stored(&event, &v).ok()) {
                    parsed.push(pdu);
                }
            }
            // Events stored but unreadable are left out; those not stored
            // are known to be missing.
            let read: HashSet<&str, foldhash::fast::RandomState> = parsed
                .iter()
                .map(|pdu| pdu.event_id.as_str())
                .chain(returned.iter().map(String::as_str))
                .collect();
            for id in from_storage {
                if !read.contains(id.as_str()) {
                    loaded.insert(id.clone(), None);
                }
            }
            found.extend(parsed.iter().map(|pdu| (pdu.event_id.clone(), pdu.clone())));
            level = Vec::new();
            for (id, pdu) in found {
                for auth in &pdu.auth_events {
                    if !loaded.contains_key(auth) && asked.insert(auth.clone()) {
                        level.push(auth.clone());
                    }
                }
                loaded.insert(id, Some(pdu));
            }
        }
        Ok(())
    }

    /// Which of `targets` the auth chain of `start` holds (the events reachable
    /// from them through `auth_events`, themselves only when reached), walked
    /// level by level over event ids: `pending`'s and cached events' own
    /// `auth_events`, the stored `event_auth` rows of the others (a query per
    /// level and chunk, no event parsed). An event with no rows (a create
    /// event, or one stored without them) is read as a PDU. Stops once every
    /// target is found.
    fn auth_chain_holds(
        &self,
        start: Vec<&str>,
        targets: &IdSet,
        pending: &PendingEvents,
    ) -> Result<IdSet> {
        let by_name: HashMap<&str, &OwnedEventId> =
            targets.iter().map(|t| (t.as_str(), t)).collect();
        let mut found = IdSet::default();
        let mut seen: HashSet<String> = HashSet::new();
        let mut level: Vec<String> = start
            .into_iter()
            .filter(|id| seen.insert((*id).to_owned()))
            .map(str::to_owned)
            .collect();
        while !level.is_empty() && found.len() < targets.len() {
            let mut auth: Vec<String> = Vec::new();
            let mut from_storage: Vec<&str> = Vec::new();
            for id in &level {
                let known = match pending.get(id) {
                    Some((pdu, _)) => Some(pdu.clone()),
                    None => self.pdus.get(id),
                };
                match known {
                    Some(pdu) => auth.extend(pdu.auth_events.iter().map(|a| a.to_string())),
                    None => from_storage.push(id),
                }
            }
            let mut stored = self.events.get_auth_event_ids(&from_storage)?;
            for id in from_storage {
                match stored.remove(id) {
                    Some(ids) => auth.extend(ids),
                    None => {
                        if let Some(pdu) = self.fetch_pdu(id, pending)? {
                            auth.extend(pdu.auth_events.iter().map(|a| a.to_string()));
                        }
                    }
                }
            }
            level = Vec::new();
            for id in auth {
                if !seen.insert(id.clone()) {
                    continue;
                }
                if let Some(target) = by_name.get(id.as_str()) {
                    found.insert((*target).clone());
                }
                level.push(id);
            }
        }
        Ok(found)
    }

    /// A fetcher in the shape ruma wants; storage errors read as "not found",
    /// which ruma treats as an event it cannot use.
    fn fetcher<'a>(
        &'a self,
        pending: &'a PendingEvents,
    ) -> impl Fn(&EventId) -> Option<Arc<Pdu>> + 'a {
        move |id: &EventId| match self.fetch_pdu(id.as_str(), pending) {
            Ok(pdu) => pdu,
            Err(e) => {
                log::warn!("fetching {id} for the auth rules or state resolution: {e}");
                None
            }
        }
    }

    /// The state group after `event_id`, from `pending` or storage.
    fn group_after(&self, event_id: &str, pending: &PendingEvents) -> Result<Option<StateGroup>> {
        if let Some((_, Some(ctx))) = pending.get(event_id) {
            return Ok(ctx.state_group_after);
        }
        Ok(self
            .state
            .get_state_group_for_events(&[event_id])?
            .remove(event_id))
    }

    /// Computes the context of `pdu`, storing the state groups it needs.
    pub fn compute_event_context(
        &self,
        pdu: &Pdu,
        outlier: bool,
        pending: &PendingEvents,
    ) -> Result<EventContext> {
        let fetch = self.fetcher(pending);
        if outlier {
            let rejected = check_auth_events(pdu, &fetch).err();
            return Ok(EventContext {
                outlier: true,
                state_group_before: None,
                state_group_after: None,
                rejected,
                new_state_groups: Vec::new(),
            });
        }
        let event_id = pdu.event_id.as_str();
        let room_id = pdu.room_id.as_str();
        let mut prepared = Vec::new();

        let mut prev_groups = BTreeSet::new();
        for prev in &pdu.prev_events {
            // An event of another room would give this one that room's state.
            if let Some(other) = self.fetch_pdu(prev.as_str(), pending)? {
                if other.room_id != pdu.room_id {
                    return Err(Error::invalid_argument(format!(
                        "event {event_id}: its prev event {prev} is in room {}, not {room_id}",
                        other.room_id
                    )));
                }
            }
            let group = self.group_after(prev.as_str(), pending)?.ok_or_else(|| {
                Error::invalid_argument(format!(
                    "event {event_id}: its prev event {prev} is unknown or an outlier, so the state before it is unknown"
                ))
            })?;
            prev_groups.insert(group);
        }
        let before = match prev_groups.len() {
            0 if pdu.event_type == "m.room.create" => None,
            0 => {
                return Err(Error::invalid_argument(format!(
                    "event {event_id} has no prev events but is not a create event"
                )))
            }
            1 => prev_groups.first().copied(),
            _ => {
                let groups: Vec<StateGroup> = prev_groups.into_iter().collect();
                Some(self.resolve_groups_preparing(
                    room_id,
                    &pdu.room_version,
                    event_id,
                    &groups,
                    pending,
                    &mut prepared,
                )?)
            }
        };

        // The auth rules, against the event's own auth events and the state before it.
        // A room has one create event: a second one never changes it.
        let second_create = pdu.is_create()
            && (pending.created.contains(room_id)
                || (self.events.get_room_version(room_id)?.is_some()
                    && self.events.have_events(&[event_id])?.is_empty()));
        let rejected = match check_auth_events(pdu, &fetch) {
            _ if second_create => {
                Some(format!("room {room_id} already has an m.room.create event"))
            }
            Err(reason) => Some(reason),
            Ok(()) => {
                let state_before = self.auth_state(pdu, before)?;
                check_auth_against_state(pdu, &state_before, &fetch).err()
            }
        };

        let after = match (&rejected, pdu.state_map_key()) {
            (None, Some(slot)) => {
                let delta = storage_state::StateMap::from_iter([(slot, event_id.into())]);
                let new = match before {
                    Some(b) => NewStateGroup::delta(event_id, room_id, b, &delta),
                    None => NewStateGroup::snapshot(event_id, room_id, &delta),
                };
                Some(self.new_group(new, &mut prepared)?)
            }
            _ => match before {
                Some(b) => Some(b),
                // A rejected create event, or a non-state event with no prevs: the
                // state is empty, and stored as such so the event still has a group.
                None => {
                    let empty = storage_state::StateMap::default();
                    let new = NewStateGroup::snapshot(event_id, room_id, &empty);
                    Some(self.new_group(new, &mut prepared)?)
                }
            },
        };
        Ok(EventContext {
            outlier: false,
            state_group_before: before,
            state_group_after: after,
            rejected,
            new_state_groups: prepared,
        })
    }

    /// The part of the state in `group` that the auth rules look at for `pdu`.
    fn auth_state(&self, pdu: &Pdu, group: Option<StateGroup>) -> Result<StateMap> {
        let Some(group) = group else {
            return Ok(StateMap::new());
        };
        let mut slots = auth_types_for_pdu(pdu).unwrap_or_default();
        // From room version 12 the create event is not an auth event, but the
        // rules still read it from the state.
        slots.push(storage_state::key("m.room.create", ""));
        let filter = StateFilter::from_types(slots.iter().map(|(t, k)| (&**t, Some(&**k))));
        let mut states = self.state.get_state_for_groups(&[group], &filter)?;
        from_storage(&states.remove(&group).unwrap_or_default())
    }

    /// Resolves the state of several groups of `room_id` (ruma's state resolution
    /// for the room's version), without storing anything: from what the groups
    /// disagree on when that is enough (see [`crate::conflict`]), otherwise
    /// over their whole states. Returns the resolved state and each group's.
    pub fn resolve_state_of_groups(
        &self,
        room_id: &str,
        room_version: &RoomVersionId,
        groups: &[StateGroup],
        pending: &PendingEvents,
    ) -> Result<(
        storage_state::StateMap,
        HashMap<StateGroup, storage_state::StateMap>,
    )> {
        self.resolve_with_slots(room_id, room_version, groups, pending)
    }

    /// [`Self::resolve_state_of_groups`].
    #[allow(clippy::type_complexity)]
    fn resolve_with_slots(
        &self,
        room_id: &str,
        room_version: &RoomVersionId,
        groups: &[StateGroup],
        pending: &PendingEvents,
    ) -> Result<(
        storage_state::StateMap,
        HashMap<StateGroup, storage_state::StateMap>,
    )> {
        let stored = self
            .state
            .get_state_for_groups(groups, &StateFilter::all())?;
        let states: Vec<&storage_state::StateMap> = groups.iter().map(|g| &stored[g]).collect();
        let what = format!("resolving the state of {room_id} over groups {groups:?}");
        let by_conflict = if states.len() < 2 {
            None
        } else {
            self.resolve_from(
                room_id,
                room_version,
                &WholeStates::new(&states),
                pending,
                &what,
            )?
        };
        let resolved = match by_conflict {
            Some(r) => r.over(states[0]),
            None => self.resolve_whole_states(room_id, room_version, &states, pending, &what)?,
        };
        Ok((resolved, stored))
    }

    /// Resolves the states of `source` from their conflict (see
    /// [`crate::conflict`]), counted.
    fn resolve_from(
        &self,
        room_id: &str,
        room_version: &RoomVersionId,
        source: &dyn ConflictSource,
        pending: &PendingEvents,
        what: &str,
    ) -> Result<Option<ByConflict>> {
        let r = crate::conflict::resolve_by_conflict(
            room_version,
            source,
            |start, loaded| self.load_with_auth_chains(room_id, start, pending, loaded),
            self.fetcher(pending),
            |unconflicted, undecided| self.auth_chain_holds(unconflicted, undecided, pending),
            what,
        )?;
        if let Some(r) = &r {
            self.resolved_by_conflict.fetch_add(1, Ordering::Relaxed);
            if r.asked_unconflicted_chain {
                self.asked_unconflicted_chain
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(r)
    }

    /// Resolves `groups` (two or more, written or prepared) from what their
    /// states disagree on, read as such ([`StateStore::get_state_differences`]):
    /// no group's whole state is read unless the auth difference needs the
    /// unconflicted events, or no input can be the base of a delta. Says which
    /// input equals the result, else the result as a delta on an input.
    fn resolve_by_differences(
        &self,
        room_id: &str,
        room_version: &RoomVersionId,
        groups: &[StateGroup],
        pending: &PendingEvents,
    ) -> Result<Resolution> {
        let what = format!("resolving the state of {room_id} over groups {groups:?}");
        let source = GroupStates {
            store: &self.state,
            first: *groups
                .first()
                .ok_or_else(|| Error::other(format!("{what}: no groups")))?,
            len: groups.len(),
            differences: self
                .state
                .get_state_differences(groups, &*self.snapshot_origins)?,
        };
        let r = self
            .resolve_from(room_id, room_version, &source, pending, &what)?
            .ok_or_else(|| Error::other(format!("{what}: no groups")))?;
        // Outside `slots` the result and every input agree: only those slots
        // are compared (a few thousand, not the whole room).
        let same =
            |s: &storage_state::StateMap| r.slots.iter().all(|k| s.get(k) == r.resolved.get(k));
        if let Some((g, _)) = groups.iter().zip(&r.inputs).find(|(_, s)| same(s)) {
            return Ok(Resolution::Input(*g));
        }
        let inputs = groups.iter().copied().zip(&r.inputs);
        Ok(match delta_base_within(&r.resolved, inputs, &r.slots) {
            Some((prev, delta)) => Resolution::Delta(prev, delta),
            None => {
                // Every input holds a slot the result lacks: the whole state.
                let first = self.whole_state(source.first)?;
                Resolution::Whole(r.over(&first))
            }
        })
    }

    /// [`Self::resolve_by_differences`]'s result as a whole state, for tests
    /// that check it against the resolution over whole states.
    #[doc(hidden)]
    pub fn resolve_state_of_groups_by_differences(
        &self,
        room_id: &str,
        room_version: &RoomVersionId,
        groups: &[StateGroup],
        pending: &PendingEvents,
    ) -> Result<storage_state::StateMap> {
        Ok(
            match self.resolve_by_differences(room_id, room_version, groups, pending)? {
                Resolution::Input(g) => self.whole_state(g)?,
                Resolution::Delta(prev, delta) => {
                    let mut state = self.whole_state(prev)?;
                    state.extend(delta);
                    state
                }
                Resolution::Whole(state) => state,
            },
        )
    }

    /// Resolves `states` with ruma over the whole states and the full auth
    /// chains of all their events, every one of them loaded.
    fn resolve_whole_states(
        &self,
        room_id: &str,
        room_version: &RoomVersionId,
        states: &[&storage_state::StateMap],
        pending: &PendingEvents,
        what: &str,
    ) -> Result<storage_state::StateMap> {
        let sets: Vec<StateMap> = states
            .iter()
            .map(|s| from_storage(s))
            .collect::<Result<_>>()?;
        // ruma asks for events one at a time, for every event of the sets and
        // their auth chains: loaded beforehand, a few queries in all.
        let mut loaded = Loaded::default();
        let start: HashSet<&OwnedEventId> = sets.iter().flat_map(|s| s.values()).collect();
        self.load_with_auth_chains(
            room_id,
            start.into_iter().cloned().collect(),
            pending,
            &mut loaded,
        )?;
        let fallback = self.fetcher(pending);
        let fetch = |id: &EventId| match loaded.get(id) {
            Some(pdu) => pdu.clone(),
            None => fallback(id),
        };
        let resolved = resolve_state(room_version, &sets, fetch)
            .map_err(|e| Error::other(format!("{what}: {e}")))?;
        Ok(to_storage(&resolved))
    }

    /// [`Self::resolve_state_of_groups`] always over the whole states, for tests
    /// that check the two ways agree.
    #[doc(hidden)]
    pub fn resolve_whole_states_of_groups(
        &self,
        room_id: &str,
        room_version: &RoomVersionId,
        groups: &[StateGroup],
        pending: &PendingEvents,
    ) -> Result<storage_state::StateMap> {
        let stored = self
            .state
            .get_state_for_groups(groups, &StateFilter::all())?;
        let states: Vec<&storage_state::StateMap> = groups.iter().map(|g| &stored[g]).collect();
        let what = format!("resolving the state of {room_id} over groups {groups:?}");
        self.resolve_whole_states(room_id, room_version, &states, pending, &what)
    }

    /// Resolves the state of several groups of `room_id` and returns a group
    /// holding the result (an input group when it equals one, else a new group:
    /// a delta on the closest input that can serve as a base, or a snapshot) and
    /// the state. Cached per set of groups.
    pub fn resolve_groups(
        &self,
        room_id: &str,
        room_version: &RoomVersionId,
        for_event: &str,
        groups: &[StateGroup],
        pending: &PendingEvents,
    ) -> Result<(StateGroup, storage_state::StateMap)> {
        let mut prepared = Vec::new();
        let group = self.resolve_groups_preparing(
            room_id,
            room_version,
            for_event,
            groups,
            pending,
            &mut prepared,
        )?;
        if !prepared.is_empty() {
            // Nobody would write it: only a builder that writes at once may be
            // asked from outside a context.
            self.state.forget_prepared_groups(&prepared);
            return Err(Error::other(
                "resolve_groups on a builder that defers group writes",
            ));
        }
        Ok((group, self.whole_state(group)?))
    }

    /// The whole state of `group`, read through the store (its caches first).
    fn whole_state(&self, group: StateGroup) -> Result<storage_state::StateMap> {
        Ok(self
            .state
            .get_state_for_groups(&[group], &StateFilter::all())?
            .remove(&group)
            .unwrap_or_default())
    }

    /// [`Self::resolve_groups`], a new group prepared into `prepared` when
    /// this builder defers group writes; the group only.
    fn resolve_groups_preparing(
        &self,
        room_id: &str,
        room_version: &RoomVersionId,
        for_event: &str,
        groups: &[StateGroup],
        pending: &PendingEvents,
        prepared: &mut Vec<Arc<PreparedStateGroup>>,
    ) -> Result<StateGroup> {
        let key: Vec<StateGroup> = groups.to_vec();
        // A cached group is reused only while it is sure to stay: its event is
        // still being written by this caller, or an event references it. A
        // group whose event was refused is unreferenced, and a purge may have
        // deleted it (or may, before this event commits).
        if let Some((g, creator)) = self.resolutions.get(&key) {
            if pending.contains(&creator) || self.state.is_group_referenced(g)? {
                return Ok(g);
            }
        }
        let group = match self.resolve_by_differences(room_id, room_version, groups, pending)? {
            Resolution::Input(g) => g,
            Resolution::Delta(prev, delta) => self.new_group(
                NewStateGroup::delta(for_event, room_id, prev, &delta),
                prepared,
            )?,
            Resolution::Whole(state) => self.new_group(
                NewStateGroup::snapshot(for_event, room_id, &state),
                prepared,
            )?,
        };
        self.resolutions.insert(key, (group, for_event.to_owned()));
        Ok(group)
    }

    /// The row to store for `pdu` with its context.
    pub fn to_persist(pdu: &Pdu, context: &EventContext) -> EventToPersist {
        let membership = pdu.membership();
        EventToPersist {
            event_id: pdu.event_id.to_string(),
            room_id: pdu.room_id.to_string(),
            event_type: pdu.event_type.clone(),
            state_key: pdu.state_key.clone(),
            sender: pdu.sender.to_string(),
            depth: pdu.depth,
            origin_server_ts: pdu.origin_server_ts,
            prev_events: pdu.prev_events.iter().map(|e| e.to_string()).collect(),
            auth_events: pdu.auth_events.iter().map(|e| e.to_string()).collect(),
            json: pdu.json.clone(),
            format_version: format_version(&pdu.room_version),
            room_version: pdu.is_create().then(|| pdu.room_version.to_string()),
            outlier: context.outlier,
            // A column of its own, where PostgreSQL keeps no NUL: the auth
            // rules' reasons may quote the event (the event types of a power
            // levels event's content).
            rejected: context
                .rejected
                .as_deref()
                .map(|r| r.replace('\0', "\u{FFFD}")),
            state_group: context.state_group_after,
            membership,
            new_state_groups: context.new_state_groups.clone(),
        }
    }
}

/// What a resolution of groups settles on ([`ContextBuilder::resolve_by_differences`]).
enum Resolution {
    /// This input group's state.
    Input(StateGroup),
    /// This input group's state with the delta applied.
    Delta(StateGroup, storage_state::StateMap),
    /// A state no input can be the base of.
    Whole(storage_state::StateMap),
}

/// Groups' states as a [`ConflictSource`]: what they disagree on, read as
/// such; any other slot the resolution asks for read from the first group
/// (they all hold the same there).
struct GroupStates<'a> {
    store: &'a StateStore,
    first: StateGroup,
    len: usize,
    differences: StateDifferences,
}

impl GroupStates<'_> {
    fn first_state(&self, filter: &StateFilter) -> Result<storage_state::StateMap> {
        Ok(self
            .store
            .get_state_for_groups(&[self.first], filter)?
            .remove(&self.first)
            .unwrap_or_default())
    }
}

impl ConflictSource for GroupStates<'_> {
    fn len(&self) -> usize {
        self.len
    }

    fn differences(&self) -> &StateDifferences {
        &self.differences
    }

    fn agreed(&self, slots: &BTreeSet<StateKey>) -> Result<storage_state::StateMap> {
        if slots.is_empty() {
            return Ok(Default::default());
        }
        self.first_state(&StateFilter::from_types(
            slots.iter().map(|(t, k)| (&**t, Some(&**k))),
        ))
    }

    fn unconflicted(&self) -> Result<Vec<Arc<str>>> {
        // The auth difference needs the unconflicted events' chain: the one
        // case that reads a whole state.
        Ok(self
            .first_state(&StateFilter::all())?
            .iter()
            .filter(|(slot, _)| !self.differences.contains_key(*slot))
            .map(|(_, id)| id.clone())
            .collect())
    }
}

fn no_version(event_id: &str, room_id: &str) -> Error {
    Error::corrupt(format!(
        "event {event_id} is in room {room_id}, which has no version"
    ))
}

/// The input group to store `resolved` as a delta against, and that delta: the
/// one needing the smallest delta among the groups whose slots `resolved` all
/// keeps (a delta can add or replace slots, never remove one; Synapse #13278).
/// `None` when no input can serve.
pub fn choose_delta_base<'a>(
    resolved: &storage_state::StateMap,
    inputs: impl IntoIterator<Item = (StateGroup, &'a storage_state::StateMap)>,
) -> Option<(StateGroup, storage_state::StateMap)> {
    delta_base(resolved, inputs, None)
}

/// [`choose_delta_base`] for a `resolved` that equals every input outside
/// `slots`: only those slots are looked at.
fn delta_base_within<'a>(
    resolved: &storage_state::StateMap,
    inputs: impl IntoIterator<Item = (StateGroup, &'a storage_state::StateMap)>,
    slots: &BTreeSet<StateKey>,
) -> Option<(StateGroup, storage_state::StateMap)> {
    delta_base(resolved, inputs, Some(slots))
}

fn delta_base<'a>(
    resolved: &storage_state::StateMap,
    inputs: impl IntoIterator<Item = (StateGroup, &'a storage_state::StateMap)>,
    slots: Option<&BTreeSet<StateKey>>,
) -> Option<(StateGroup, storage_state::StateMap)> {
    let keeps_every_slot = |s: &storage_state::StateMap| match slots {
        Some(slots) => slots
            .iter()
            .all(|k| !s.contains_key(k) || resolved.contains_key(k)),
        None => s.keys().all(|k| resolved.contains_key(k)),
    };
    let delta_from = |s: &storage_state::StateMap| -> storage_state::StateMap {
        match slots {
            Some(slots) => slots
                .iter()
                .filter_map(|k| resolved.get(k).map(|v| (k, v)))
                .filter(|(k, v)| s.get(*k) != Some(*v))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            None => resolved
                .iter()
                .filter(|(k, v)| s.get(*k) != Some(*v))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    };
    inputs
        .into_iter()
        .filter(|(_, s)| keeps_every_slot(s))
        .map(|(g, s)| (g, delta_from(s)))
        .min_by_key(|(g, d)| (d.len(), *g))
}

/// Synapse's event format version for a room version: 1 for v1 and v2 (event id
/// in the event), 2 for v3 (reference hash, standard base64), 3 from v4 on.
fn format_version(room_version: &RoomVersionId) -> i32 {
    match room_version.as_str() {
        "1" | "2" => 1,
        "3" => 2,
        _ => 3,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A state of one-letter slots (empty state keys), for the tests here and
    /// in `conflict`.
    pub(crate) fn state(pairs: &[(&str, &str)]) -> storage_state::StateMap {
        pairs
            .iter()
            .map(|(k, v)| (storage_state::key(k, ""), (*v).into()))
            .collect()
    }

    /// Synapse's test_make_state_cache_entry (regression for #13278): group 1
    /// differs in one value but has an extra slot, so only group 2 can be the base.
    #[test]
    fn delta_base_never_has_extra_slots() {
        let new = state(&[("a", "E"), ("b", "E"), ("c", "E"), ("d", "E")]);
        let g1 = state(&[("a", "F"), ("b", "E"), ("c", "E"), ("d", "E"), ("e", "E")]);
        let g2 = state(&[("a", "F"), ("b", "E"), ("c", "F"), ("d", "F")]);
        let (base, delta) = choose_delta_base(&new, [(1, &g1), (2, &g2)]).unwrap();
        assert_eq!(base, 2);
        assert_eq!(delta, state(&[("a", "E"), ("c", "E"), ("d", "E")]));
        assert_eq!(choose_delta_base(&new, [(1, &g1)]), None);
    }

    /// Given the slots outside which the result equals every input, the base
    /// and delta are those found by looking at every slot.
    #[test]
    fn delta_base_within_slots_is_the_delta_base() {
        let base = state(&[("x", "0"), ("y", "0"), ("z", "0")]);
        let with = |pairs: &[(&str, &str)]| {
            let mut s = base.clone();
            for (k, v) in pairs {
                if v.is_empty() {
                    s.remove(&storage_state::key(k, ""));
                } else {
                    s.insert(storage_state::key(k, ""), (*v).into());
                }
            }
            s
        };
        let g1 = with(&[("a", "1"), ("b", "1")]);
        let g2 = with(&[("a", "2"), ("c", "2")]);
        let slots: BTreeSet<StateKey> = ["a", "b", "c"]
            .iter()
            .map(|k| storage_state::key(k, ""))
            .collect();
        for resolved in [
            with(&[("a", "2"), ("b", "1"), ("c", "2")]),
            with(&[("a", "1"), ("b", "1")]),
            with(&[("a", "1")]),
            with(&[("c", "2"), ("b", "3")]),
        ] {
            let inputs = [(1, &g1), (2, &g2)];
            assert_eq!(
                delta_base_within(&resolved, inputs, &slots),
                choose_delta_base(&resolved, inputs),
                "{resolved:?}"
            );
        }
    }

    #[test]
    fn delta_base_prefers_the_smallest_delta() {
        let new = state(&[("a", "1"), ("b", "2")]);
        let far = state(&[("a", "0")]);
        let near = state(&[("a", "1")]);
        assert_eq!(
            choose_delta_base(&new, [(7, &far), (9, &near)]).unwrap().0,
            9
        );
    }
}
