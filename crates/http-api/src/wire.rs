//! The wire types of writes, shared by the main process and workers: what a
//! write answers, and an event with the context a worker computed for it.

use event_context::ruma::RoomVersionId;
use event_context::{EventContext, Pdu};
use std::collections::BTreeMap;
use storage_core::{Error, Result};
use storage_events::PersistedBatch;

/// What a write of events answers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WriteOutcome {
    pub event_ids: Vec<String>,
    pub stream_ordering: i64,
    /// Events stored as rejected, with the reason.
    pub rejected: BTreeMap<String, String>,
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
            // The worker wrote its groups itself.
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
