//! The wire types of writes, shared by the main process and workers: what a
//! write answers, and an event with the context a worker computed for it.

use event_context::ruma::RoomVersionId;
use event_context::{EventContext, Pdu};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use storage_core::{Error, Result};
use storage_events::PersistedBatch;
use storage_state::{key, NewStateGroup, PreparedStateGroup, StateGroup, StateMap, StateStore};

/// What a write of events answers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WriteOutcome {
    pub event_ids: Vec<String>,
    pub stream_ordering: i64,
    /// Events stored as rejected, with the reason.
    pub rejected: BTreeMap<String, String>,
    /// Events of the request found already stored, and so not written again
    /// (what is stored for them may differ from what the request said).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
    /// Only in the main process's answer to a worker's request
    /// ([`WriteOutcome::forwarded`]): the batch's commit as the replication
    /// stream tells it, for the worker to apply at once when it has applied
    /// every position below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<Replicated>,
}

/// A batch's commit as the replication stream tells it
/// ([`storage_events::Announced`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Replicated {
    /// The lowest stream position the batch took.
    pub first: i64,
    /// The payload of its notification, which names the highest
    /// ([`storage_events::Notification::parse`]).
    pub notification: String,
}

impl WriteOutcome {
    /// The answer for `events` once `batch` committed them.
    pub fn new(events: &[(Pdu, EventContext)], batch: &PersistedBatch) -> Self {
        WriteOutcome {
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
            // The queue may have written other requests' events in the same
            // batch, several of them copies of one event (each copy after the
            // first is found stored): only this request's events are named,
            // each once, in its order.
            skipped: {
                let mut named = std::collections::HashSet::new();
                events
                    .iter()
                    .map(|(p, _)| p.event_id.as_str())
                    .filter(|id| batch.skipped.iter().any(|s| s == id) && named.insert(*id))
                    .map(str::to_owned)
                    .collect()
            },
            replication: None,
        }
    }

    /// [`WriteOutcome::new`], answering a worker's request: with the batch's
    /// commit as the replication stream tells it.
    pub fn forwarded(events: &[(Pdu, EventContext)], batch: &PersistedBatch) -> Self {
        WriteOutcome {
            replication: batch.announced.as_ref().map(|a| Replicated {
                first: a.first,
                notification: a.notification.payload(),
            }),
            ..WriteOutcome::new(events, batch)
        }
    }
}

/// An event with its context, as a worker hands it to the main process.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ContextedEvent {
    pub room_version: String,
    /// The event's canonical JSON, as the worker read it.
    pub pdu: String,
    /// The id the worker found for it (from room version 3 on, the reference
    /// hash it computed): the main process takes it as given, as it does the
    /// groups the worker names, instead of hashing the event again. Absent
    /// from an older worker's requests, whose events are then read in full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    pub outlier: bool,
    pub state_group_before: Option<i64>,
    pub state_group_after: Option<i64>,
    pub rejected: Option<String>,
    /// The groups the worker prepared for the event (ids from the shared
    /// sequence, nothing written): the main process writes them in the
    /// event's batch, so a state event costs the worker no transaction.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub new_state_groups: Vec<ForwardedGroup>,
}

/// A state group a worker prepared, as it travels to the main process: its
/// state as entries `[type, state_key, event_id]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ForwardedGroup {
    pub id: i64,
    pub event_id: String,
    pub room_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_group: Option<i64>,
    /// Required with a prev group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_ids: Option<Vec<[String; 3]>>,
    /// The full state; required without a prev group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_state_ids: Option<Vec<[String; 3]>>,
}

fn entries(state: &StateMap) -> Vec<[String; 3]> {
    state
        .iter()
        .map(|((t, k), e)| [t.to_string(), k.to_string(), e.to_string()])
        .collect()
}

fn state_map(entries: &[[String; 3]]) -> StateMap {
    entries
        .iter()
        .map(|[t, k, e]| (key(t, k), Arc::from(e.as_str())))
        .collect()
}

impl ForwardedGroup {
    pub fn new(group: &PreparedStateGroup) -> Self {
        ForwardedGroup {
            id: group.group,
            event_id: group.event_id.clone(),
            room_id: group.room_id.clone(),
            prev_group: group.prev_group,
            delta_ids: group.delta_ids.as_ref().map(entries),
            current_state_ids: group.current_state_ids.as_ref().map(entries),
        }
    }

    /// Kept readable in `state` until its batch writes it (see
    /// [`StateStore::adopt_prepared_group`]); `None` when a group of its id
    /// is prepared there already.
    fn adopt(&self, state: &StateStore) -> Result<Option<Arc<PreparedStateGroup>>> {
        let delta = self.delta_ids.as_deref().map(state_map);
        let current = self.current_state_ids.as_deref().map(state_map);
        let new = NewStateGroup {
            event_id: &self.event_id,
            room_id: &self.room_id,
            prev_group: self.prev_group,
            delta_ids: delta.as_ref(),
            current_state_ids: current.as_ref(),
        };
        state.adopt_prepared_group(self.id, &new).map_err(|e| {
            e.context(format!(
                "state group {} of event {}",
                self.id, self.event_id
            ))
        })
    }
}

/// Reads a worker's events and adopts the groups it prepared for them (see
/// [`ForwardedGroup::adopt`]), in order. When one fails, none stays adopted.
///
/// A group prepared here already was adopted by an earlier delivery of the
/// same request (ids come from the shared sequence: a worker's retry, a
/// proxy's second delivery) whose batch is not done: this delivery waits
/// for that one's outcome, holding none of its groups meanwhile, then adopts
/// them again. After a commit its events are found stored and skipped (the
/// first delivery's answer); after a failure it writes them itself. It waits
/// at most [`crate::REQUEST_TIMEOUT`], then answers 503.
pub fn adopt_contexted(
    state: &StateStore,
    events: Vec<ContextedEvent>,
) -> Result<Vec<(Pdu, EventContext)>> {
    let mut read = Vec::with_capacity(events.len());
    for mut event in events {
        let groups = std::mem::take(&mut event.new_state_groups);
        let (pdu, context) = event.into_parts()?;
        read.push((pdu, context, groups));
    }
    let mut deadline = None;
    loop {
        let busy = match adopt_all(state, &read)? {
            Adopted::All(mut adopted) => {
                return Ok(read
                    .into_iter()
                    .map(|(pdu, mut context, groups)| {
                        context.new_state_groups = adopted.drain(..groups.len()).collect();
                        (pdu, context)
                    })
                    .collect())
            }
            Adopted::Busy(group) => group,
        };
        let deadline = *deadline.get_or_insert_with(|| Instant::now() + crate::REQUEST_TIMEOUT);
        if !state.wait_for_prepared_groups(&[busy], deadline) {
            return Err(Error::unavailable(format!(
                "state group {busy} of this request is still being written by an earlier \
                 delivery of it after {} s; try again",
                crate::REQUEST_TIMEOUT.as_secs()
            )));
        }
    }
}

/// What [`adopt_all`] did.
enum Adopted {
    /// Every group, in order.
    All(Vec<Arc<PreparedStateGroup>>),
    /// None: this group is prepared here by another request.
    Busy(StateGroup),
}

/// Adopts every group of `read`, in order, or none.
fn adopt_all(
    state: &StateStore,
    read: &[(Pdu, EventContext, Vec<ForwardedGroup>)],
) -> Result<Adopted> {
    let mut adopted: Vec<Arc<PreparedStateGroup>> = Vec::new();
    for g in read.iter().flat_map(|(_, _, groups)| groups) {
        let stopped = match g.adopt(state) {
            Ok(Some(prepared)) => {
                adopted.push(prepared);
                continue;
            }
            Ok(None) if adopted.iter().any(|p| p.group == g.id) => {
                Err(Error::invalid_argument(format!(
                    "state group {} of event {}: its id is given twice in the request",
                    g.id, g.event_id
                )))
            }
            Ok(None) => Ok(Adopted::Busy(g.id)),
            Err(e) => Err(e),
        };
        state.forget_prepared_groups(&adopted);
        return stopped;
    }
    Ok(Adopted::All(adopted))
}

impl ContextedEvent {
    pub fn new(pdu: &Pdu, context: &EventContext) -> Self {
        ContextedEvent {
            room_version: pdu.room_version.to_string(),
            pdu: pdu.json.clone(),
            event_id: Some(pdu.event_id.to_string()),
            outlier: context.outlier,
            state_group_before: context.state_group_before,
            state_group_after: context.state_group_after,
            rejected: context.rejected.clone(),
            new_state_groups: context
                .new_state_groups
                .iter()
                .map(|g| ForwardedGroup::new(g))
                .collect(),
        }
    }

    pub fn into_parts(self) -> Result<(Pdu, EventContext)> {
        let version = RoomVersionId::try_from(self.room_version.as_str()).map_err(|e| {
            Error::invalid_argument(format!("bad room version {:?}: {e}", self.room_version))
        })?;
        let pdu = match &self.event_id {
            // The worker read the event as the main process reads a posted
            // one: what is left is reading it back, as storage does.
            Some(id) => Pdu::from_stored_json(&self.pdu, &version, id),
            None => Pdu::from_json(&self.pdu, Some(&version)),
        }
        .map_err(|e| Error::invalid_argument(format!("malformed event: {e}")))?;
        pdu.check_limits()
            .map_err(|e| Error::invalid_argument(format!("event {} refused: {e}", pdu.event_id)))?;
        let context = EventContext {
            outlier: self.outlier,
            state_group_before: self.state_group_before,
            state_group_after: self.state_group_after,
            rejected: self.rejected,
            // Adopted by `adopt_contexted`.
            new_state_groups: Vec::new(),
        };
        Ok((pdu, context))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESSAGE: &str = r#"{"auth_events":["$create","$power"],"content":{"body":"hi","msgtype":"m.text"},"depth":5,"hashes":{"sha256":"aGFzaA"},"origin_server_ts":1700000000000,"prev_events":["$prev"],"room_id":"!room:wire.test","sender":"@alice:wire.test","signatures":{},"type":"m.room.message"}"#;

    fn worker_read() -> (Pdu, EventContext) {
        let pdu = Pdu::from_json(MESSAGE, Some(&RoomVersionId::V10)).unwrap();
        let context = EventContext {
            outlier: false,
            state_group_before: Some(7),
            state_group_after: Some(7),
            rejected: None,
            new_state_groups: Vec::new(),
        };
        (pdu, context)
    }

    /// A batch the queue shared with other requests: the answer names only
    /// this request's events among those found stored, each once.
    #[test]
    fn an_answer_names_only_its_own_skipped_events() {
        let (pdu, context) = worker_read();
        let own = pdu.event_id.to_string();
        let batch = PersistedBatch {
            positions: Default::default(),
            // Three requests posted this event at once: the copies after the
            // first were found stored, one entry each.
            skipped: vec![
                own.clone(),
                "$another_request:wire.test".to_owned(),
                own.clone(),
                own.clone(),
            ],
            max_stream_ordering: 9,
            announced: None,
        };
        let outcome = WriteOutcome::new(&[(pdu, context)], &batch);
        assert_eq!(outcome.skipped, vec![own]);
    }

    /// Through JSON, as a worker's request carries it: the same event, id and
    /// stored JSON, and the same context.
    #[test]
    fn a_forwarded_event_reads_back_as_the_worker_read_it() {
        let (pdu, context) = worker_read();
        let sent = serde_json::to_string(&ContextedEvent::new(&pdu, &context)).unwrap();
        let received: ContextedEvent = serde_json::from_str(&sent).unwrap();
        assert_eq!(received.event_id.as_deref(), Some(pdu.event_id.as_str()));
        let (read, read_context) = received.into_parts().unwrap();
        assert_eq!(read.event_id, pdu.event_id);
        assert_eq!(read.json, pdu.json);
        assert_eq!(read.room_id, pdu.room_id);
        assert_eq!(read_context.state_group_after, Some(7));
    }

    /// The id a worker sends is the one stored: the main process does not
    /// hash the event again.
    #[test]
    fn the_main_process_takes_the_workers_event_id() {
        let (pdu, context) = worker_read();
        let mut sent = ContextedEvent::new(&pdu, &context);
        sent.event_id = Some("$given".to_owned());
        let (read, _) = sent.into_parts().unwrap();
        assert_eq!(read.event_id.as_str(), "$given");
    }

    /// A request of a worker that sends no ids: each event is read in full,
    /// its id computed.
    #[test]
    fn an_event_without_its_id_is_read_in_full() {
        let (pdu, context) = worker_read();
        let mut sent = serde_json::to_value(ContextedEvent::new(&pdu, &context)).unwrap();
        sent.as_object_mut().unwrap().remove("event_id");
        let received: ContextedEvent = serde_json::from_value(sent).unwrap();
        assert_eq!(received.event_id, None);
        let (read, _) = received.into_parts().unwrap();
        assert_eq!(read.event_id, pdu.event_id);
        assert_eq!(read.json, pdu.json);
    }
}
