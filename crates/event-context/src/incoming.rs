//! Events as they arrive, before anything of them is stored: read each PDU
//! with its room's version and check it against the limits every new event
//! keeps, compute the contexts of a batch, and check contexts that another
//! process (a replica worker) computed. Import and the HTTP API of both
//! processes go through here, so they read and refuse events the same way.

use crate::{ContextBuilder, EventContext, Pdu, PendingEvents};
use ruma::RoomVersionId;
use std::collections::HashMap;
use std::sync::Arc;
use storage_core::{Error, Result};
use storage_events::{EventReads, EventsStore};
use storage_state::StateGroupAccess;

/// The version of `room_id` as stored (its `rooms` row), parsed.
pub fn stored_room_version(events: &EventsStore, room_id: &str) -> Result<Option<RoomVersionId>> {
    events
        .get_room_version(room_id)?
        .map(|v| {
            RoomVersionId::try_from(v.as_str())
                .map_err(|e| Error::corrupt(format!("room {room_id} has a bad version {v:?}: {e}")))
        })
        .transpose()
}

/// Reads PDUs in the order they arrive, each with its room's version: that of
/// the room's first create event earlier in the same input, else the stored
/// one. A later create event of a room never changes its version (the context
/// rejects it).
#[derive(Debug, Clone)]
pub struct PduReader {
    events: EventsStore,
    known: HashMap<String, RoomVersionId>,
}

impl PduReader {
    pub fn new(events: EventsStore) -> Self {
        PduReader {
            events,
            known: HashMap::new(),
        }
    }

    /// The version of `room_id`, from the input so far or from storage.
    pub fn room_version(&self, room_id: &str) -> Result<Option<RoomVersionId>> {
        match self.known.get(room_id) {
            Some(v) => Ok(Some(v.clone())),
            None => stored_room_version(&self.events, room_id),
        }
    }

    /// Reads one PDU (federation JSON text) and checks it against the limits of
    /// [`Pdu::check_limits`]. An event of a room with no create event yet is a
    /// not-found error naming the room.
    pub fn read(&mut self, text: &str) -> Result<Pdu> {
        self.read_checked(text, None)
    }

    /// [`Self::read`] of an event posted to `room_id`: one whose `room_id`
    /// names another room is refused as such (invalid, not "unknown room")
    /// before its room is looked up, as Synapse refuses a body whose room
    /// differs from the request path's before it looks the room up.
    pub fn read_in_room(&mut self, text: &str, room_id: &str) -> Result<Pdu> {
        self.read_checked(text, Some(room_id))
    }

    fn read_checked(&mut self, text: &str, posted_to: Option<&str>) -> Result<Pdu> {
        // Read once: what decides the version here, the event from the same
        // tree next.
        let tree: serde_json::Value = serde_json::from_str(text).map_err(|e| {
            Error::invalid_argument(format!("malformed event: not valid JSON: {e}"))
        })?;
        let field = |name: &str| tree.get(name).and_then(|v| v.as_str());
        if let (Some(posted_to), Some(room_id)) = (posted_to, field("room_id")) {
            if room_id != posted_to {
                return Err(Error::invalid_argument(format!(
                    "the event is in room {room_id}, not {posted_to}"
                )));
            }
        }
        let is_create = field("type") == Some("m.room.create") && field("state_key") == Some("");
        let version = if is_create {
            // A create event carries its own version.
            None
        } else {
            let room_id = field("room_id").ok_or_else(|| {
                Error::invalid_argument("malformed event: missing field `room_id`")
            })?;
            Some(self.room_version(room_id)?.ok_or_else(|| {
                Error::not_found(format!(
                    "event for unknown room {room_id}: its m.room.create event must come first"
                ))
            })?)
        };
        let pdu = Pdu::from_json_value(tree, version.as_ref())
            .map_err(|e| Error::invalid_argument(format!("malformed event: {e}")))?;
        pdu.check_limits()
            .map_err(|e| Error::invalid_argument(format!("event {} refused: {e}", pdu.event_id)))?;
        if pdu.is_create() && !self.known.contains_key(pdu.room_id.as_str()) {
            let version = match stored_room_version(&self.events, pdu.room_id.as_str())? {
                Some(stored) => stored,
                None => pdu.room_version.clone(),
            };
            self.known.insert(pdu.room_id.to_string(), version);
        }
        Ok(pdu)
    }
}

/// Reads `pdus` (all of `room_id`, in order) and computes their contexts, each
/// seeing the ones before it. When one fails, the groups prepared for the
/// others are dropped: none of them will be written.
pub fn contexts_for(
    builder: &ContextBuilder,
    room_id: &str,
    pdus: &[String],
) -> Result<Vec<(Pdu, EventContext)>> {
    let mut out = Vec::with_capacity(pdus.len());
    let result = compute_contexts(builder, room_id, pdus, &mut out);
    if result.is_err() {
        builder
            .state()
            .forget_prepared_groups(out.iter().flat_map(|(_, c)| &c.new_state_groups));
    }
    result.map(|()| out)
}

fn compute_contexts(
    builder: &ContextBuilder,
    room_id: &str,
    pdus: &[String],
    out: &mut Vec<(Pdu, EventContext)>,
) -> Result<()> {
    let mut reader = PduReader::new(builder.events().clone());
    let mut read = Vec::with_capacity(pdus.len());
    for (i, text) in pdus.iter().enumerate() {
        let pdu = reader
            .read_in_room(text, room_id)
            .map_err(|e| e.context(format!("event #{i}")))?;
        debug_assert_eq!(pdu.room_id.as_str(), room_id, "read_in_room checked it");
        read.push(pdu);
    }
    // An event stored already is skipped by the write and kept as stored
    // (rejected, say, where this request's context of it would accept it):
    // the events after it are worked out from what is stored of it, not from
    // that context. But for an outlier the auth rules accepted, which an
    // accepted context gives its place in the room's graph: the write does
    // (see `EventToPersist::write_as`). One read, for a request of several
    // events only.
    let stored = if read.len() > 1 {
        let ids: Vec<&str> = read.iter().map(|p| p.event_id.as_str()).collect();
        builder.events().stored_events(&ids)?
    } else {
        Default::default()
    };
    let mut pending = PendingEvents::default();
    for pdu in read {
        let context = builder
            .compute_event_context(&pdu, false, &pending)
            .map_err(|e| e.context(format!("event {}", pdu.event_id)))?;
        let kept_as_stored = stored
            .get(pdu.event_id.as_str())
            .is_some_and(|s| !(s.may_be_placed() && context.rejected.is_none()));
        if !kept_as_stored {
            pending.insert(Arc::new(pdu.clone()), context.clone());
        }
        out.push((pdu, context));
    }
    Ok(())
}

/// Checks contexts that another process computed before they are persisted as
/// they are: every event is in `room_id`; an outlier has no state groups and
/// any other event has a group after it; every group prepared for the batch
/// belongs to `room_id`; and every group named is one of those, or exists and
/// belongs to `room_id`. A worker with a bug (or a stale binary) is refused
/// with the event and group named, instead of mapping events to state that is
/// not theirs.
pub fn check_contexts(
    state: &storage_state::StateStore,
    room_id: &str,
    events: &[(Pdu, EventContext)],
) -> Result<()> {
    let mut prepared = std::collections::HashSet::new();
    for (pdu, context) in events {
        for group in &context.new_state_groups {
            if group.room_id != room_id {
                return Err(Error::invalid_argument(format!(
                    "event {}: the state group {} prepared for it belongs to room {}, not {room_id}",
                    pdu.event_id, group.group, group.room_id
                )));
            }
            prepared.insert(group.group);
        }
    }
    for (pdu, context) in events {
        let event_id = &pdu.event_id;
        if pdu.room_id.as_str() != room_id {
            return Err(Error::invalid_argument(format!(
                "event {event_id} is not in room {room_id}"
            )));
        }
        let groups = [context.state_group_before, context.state_group_after];
        match (context.outlier, context.state_group_after) {
            (true, _) if groups.iter().any(Option::is_some) => {
                return Err(Error::invalid_argument(format!(
                    "event {event_id} is an outlier but its context names state groups"
                )))
            }
            (false, None) => {
                return Err(Error::invalid_argument(format!(
                    "event {event_id} is not an outlier but its context has no state group after it"
                )))
            }
            _ => {}
        }
        for group in groups.into_iter().flatten() {
            if prepared.contains(&group) {
                continue;
            }
            // The store caches each group's room, so a batch naming one group
            // many times asks the database once.
            match state.get_state_group_room(group)? {
                None => {
                    return Err(Error::invalid_argument(format!(
                        "event {event_id}: its context names state group {group}, which does not exist"
                    )))
                }
                Some(r) if r != room_id => {
                    return Err(Error::invalid_argument(format!(
                        "event {event_id}: its context names state group {group}, which belongs to room {r}, not {room_id}"
                    )))
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}
