//! The steps every writer of events shares (import, the HTTP API of the main
//! process and of workers): read PDUs with their room's version, compute their
//! contexts, and hand them to the persistence queue.

use crate::queue::PersistenceQueue;
use event_context::ruma::RoomVersionId;
use event_context::{ContextBuilder, EventContext, Pdu, PendingEvents};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use storage_core::{Error, Result};
use storage_events::{EventStore, EventsStore};
use storage_state::{StateGroupStore, StateStore};

/// The version of `room_id`, from rooms created earlier in the same input or
/// from storage.
pub fn room_version(
    events: &EventsStore,
    known: &HashMap<String, RoomVersionId>,
    room_id: &str,
) -> Result<Option<RoomVersionId>> {
    if let Some(v) = known.get(room_id) {
        return Ok(Some(v.clone()));
    }
    events
        .get_room_version(room_id)?
        .map(|v| {
            RoomVersionId::try_from(v.as_str())
                .map_err(|e| Error::corrupt(format!("room {room_id} has a bad version {v:?}: {e}")))
        })
        .transpose()
}

/// Reads one PDU (federation JSON text) as an event of its room's version: a
/// create event's own `content.room_version`, otherwise the room's.
pub fn parse_pdu(
    events: &EventsStore,
    known: &HashMap<String, RoomVersionId>,
    text: &str,
) -> Result<Pdu> {
    let head: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Error::invalid_argument(format!("malformed event: not valid JSON: {e}")))?;
    let is_create = head.get("type").and_then(|t| t.as_str()) == Some("m.room.create")
        && head.get("state_key").and_then(|k| k.as_str()) == Some("");
    let version = if is_create {
        None
    } else {
        let room_id = head
            .get("room_id")
            .and_then(|r| r.as_str())
            .ok_or_else(|| Error::invalid_argument("malformed event: missing field `room_id`"))?;
        Some(room_version(events, known, room_id)?.ok_or_else(|| {
            Error::not_found(format!(
                "event for unknown room {room_id}: its m.room.create event must come first"
            ))
        })?)
    };
    let pdu = Pdu::from_json(text, version.as_ref())
        .map_err(|e| Error::invalid_argument(format!("malformed event: {e}")))?;
    pdu.check_limits()
        .map_err(|e| Error::invalid_argument(format!("event {} refused: {e}", pdu.event_id)))?;
    Ok(pdu)
}

/// What a write of events answers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WriteOutcome {
    pub event_ids: Vec<String>,
    pub stream_ordering: i64,
    /// Events stored as rejected, with the reason.
    pub rejected: BTreeMap<String, String>,
}

/// An event with its context, as a worker hands it to the main process.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ContextedEvent {
    pub room_version: String,
    pub pdu: String,
    pub outlier: bool,
    pub state_group_before: Option<i64>,
    pub state_group_after: Option<i64>,
    pub rejected: Option<String>,
}

impl ContextedEvent {
    pub fn new(pdu: &Pdu, context: &EventContext) -> Self {
        ContextedEvent {
            room_version: pdu.room_version.to_string(),
            pdu: pdu.json.clone(),
            outlier: context.outlier,
            state_group_before: context.state_group_before,
            state_group_after: context.state_group_after,
            rejected: context.rejected.clone(),
        }
    }

    pub fn into_parts(self) -> Result<(Pdu, EventContext)> {
        let version = RoomVersionId::try_from(self.room_version.as_str()).map_err(|e| {
            Error::invalid_argument(format!("bad room version {:?}: {e}", self.room_version))
        })?;
        let pdu = Pdu::from_json(&self.pdu, Some(&version))
            .map_err(|e| Error::invalid_argument(format!("malformed event: {e}")))?;
        let context = EventContext {
            outlier: self.outlier,
            state_group_before: self.state_group_before,
            state_group_after: self.state_group_after,
            rejected: self.rejected,
        };
        Ok((pdu, context))
    }
}

/// Checks contexts that another process computed before they are persisted as
/// they are: every event is in `room_id`; an outlier has no state groups and
/// any other event has a group after it; and every group named exists and
/// belongs to `room_id`. A worker with a bug (or a stale binary) is refused
/// with the event and group named, instead of mapping events to state that is
/// not theirs.
pub fn check_contexts(
    state: &StateStore,
    room_id: &str,
    events: &[(Pdu, EventContext)],
) -> Result<()> {
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

/// Parses `pdus` (all of `room_id`, in order) and computes their contexts.
pub fn contexts_for(
    builder: &ContextBuilder,
    room_id: &str,
    pdus: &[String],
) -> Result<Vec<(Pdu, EventContext)>> {
    let mut known = HashMap::new();
    let mut pending = PendingEvents::default();
    let mut out = Vec::with_capacity(pdus.len());
    for (i, text) in pdus.iter().enumerate() {
        let pdu = parse_pdu(builder.events(), &known, text)
            .map_err(|e| e.context(format!("event #{i}")))?;
        if pdu.room_id.as_str() != room_id {
            return Err(Error::invalid_argument(format!(
                "event #{i} ({}) is in room {}, not {room_id}",
                pdu.event_id, pdu.room_id
            )));
        }
        if pdu.is_create() && room_version(builder.events(), &known, room_id)?.is_none() {
            // The room's first create event sets its version; a later one is
            // rejected and changes nothing.
            known.insert(room_id.to_owned(), pdu.room_version.clone());
        }
        let context = builder
            .compute_event_context(&pdu, false, &pending)
            .map_err(|e| e.context(format!("event {}", pdu.event_id)))?;
        pending.insert(Arc::new(pdu.clone()), context.clone());
        out.push((pdu, context));
    }
    Ok(out)
}

/// Queues events with their contexts and waits until they are committed.
pub fn persist(
    queue: &PersistenceQueue,
    room_id: &str,
    events: &[(Pdu, EventContext)],
) -> Result<WriteOutcome> {
    let rows = events
        .iter()
        .map(|(p, c)| ContextBuilder::to_persist(p, c))
        .collect();
    let batch = queue.enqueue(room_id, rows).wait().map_err(|e| {
        log::debug!("{e:?}");
        Error::other(e.to_string())
    })?;
    Ok(WriteOutcome {
        event_ids: events.iter().map(|(p, _)| p.event_id.to_string()).collect(),
        stream_ordering: batch.max_stream_ordering,
        rejected: events
            .iter()
            .filter_map(|(p, c)| {
                c.rejected
                    .as_ref()
                    .map(|r| (p.event_id.to_string(), r.clone()))
            })
            .collect(),
    })
}
