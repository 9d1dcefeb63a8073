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
