//! [`Pdu`]: one room event in the federation format, as Synapse stores it in
//! `event_json.json`, parsed once into the fields that storage and state resolution need.
//!
//! A `Pdu` keeps the canonical JSON it was read from (to store) next to the parsed fields
//! (to index and to reason about), and implements ruma's `state_res::Event` so that ruma's
//! auth checks and state resolution can be run on it directly (and on `Arc<Pdu>`, through
//! ruma's blanket implementation).

use ruma::{
    events::TimelineEventType,
    room_version_rules::RoomVersionRules,
    state_res::{check_pdu_format, Event},
    CanonicalJsonObject, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId,
    RoomId, RoomVersionId, UInt, UserId,
};
use serde_json::value::RawValue as RawJsonValue;

use crate::{parse, PduError, StateKey};

/// One event of a room, in the federation (PDU) format.
///
/// The public fields are the parsed view of [`json`](Pdu::json); build a `Pdu` with
/// [`Pdu::from_json`] and treat those fields as read-only, except [`rejected`](Pdu::rejected).
#[derive(Debug, Clone)]
pub struct Pdu {
    /// The event id: the `event_id` member for room versions 1 and 2, `$` + the reference
    /// hash from version 3 on.
    pub event_id: OwnedEventId,
    /// The room id; for a version 12 `m.room.create` event (which has none in its JSON) the
    /// id derived from its reference hash, `!` + hash.
    pub room_id: OwnedRoomId,
    /// The room version the event was read with.
    pub room_version: RoomVersionId,
    /// The user who sent the event.
    pub sender: OwnedUserId,
    /// The event type, e.g. `m.room.member`.
    pub event_type: String,
    /// The state key; `None` for a non-state event.
    pub state_key: Option<String>,
    /// The `content` object, as JSON text.
    pub content: Box<RawJsonValue>,
    /// The events this one follows in the room DAG.
    pub prev_events: Vec<OwnedEventId>,
    /// The events that authorise this one.
    pub auth_events: Vec<OwnedEventId>,
    /// The event's depth in the DAG.
    pub depth: i64,
    /// When the sending server says it created the event (ms since the Unix epoch).
    pub origin_server_ts: i64,
    /// For a redaction, the event it redacts (top-level `redacts`, or `content.redacts`
    /// from room version 11 on).
    pub redacts: Option<OwnedEventId>,
    /// The event as canonical JSON (sorted keys, no insignificant whitespace), the text to
    /// store in `event_json.json`. For versions 3 and later it has no `event_id` member.
    pub json: String,
    /// Whether the event was rejected by the checks on receipt of a PDU (Synapse's
    /// `rejections` table). Set by whoever loads the event; read by the auth rules and
    /// state resolution, which ignore rejected events.
    pub rejected: bool,
    pub(crate) kind: TimelineEventType,
    pub(crate) room_id_in_json: bool,
    pub(crate) rules: RoomVersionRules,
}

impl Pdu {
    /// Reads an event from its federation JSON.
    ///
    /// For an `m.room.create` event with an empty state key the room version is its
    /// `content.room_version` ("1" when absent), and `room_version`, if given, must agree.
    /// For any other event `room_version` is the room's version and is required.
    pub fn from_json(json: &str, room_version: Option<&RoomVersionId>) -> Result<Pdu, PduError> {
        parse::parse_pdu(json, room_version)
    }

    /// The ruma rules of the event's room version.
    pub fn rules(&self) -> &RoomVersionRules {
        &self.rules
    }

    /// Whether this is a state event (it has a state key, possibly empty).
    pub fn is_state(&self) -> bool {
        self.state_key.is_some()
    }

    /// The `(event type, state key)` this event sets, for a state event.
    pub fn state_map_key(&self) -> Option<StateKey> {
        self.state_key
            .as_ref()
            .map(|k| (self.event_type.clone(), k.clone()))
    }

    /// Whether `room_id` was in the event's JSON (false only for a version 12 create event).
    pub fn has_room_id_in_json(&self) -> bool {
        self.room_id_in_json
    }

    /// The `content` as a JSON value.
    pub fn content_value(&self) -> serde_json::Value {
        // The content was a JSON object when the event was read, so it reads back.
        serde_json::from_str(self.content.get()).unwrap_or_default()
    }

    /// ruma's format and size checks for a PDU received over federation (required fields,
    /// the 64 KiB limit, at most 20 `prev_events` and 10 `auth_events`...). Not run by
    /// [`Pdu::from_json`], which also reads events that older servers accepted.
    pub fn check_format(&self) -> Result<(), String> {
        let object: CanonicalJsonObject =
            serde_json::from_str(&self.json).map_err(|e| format!("not canonical JSON: {e}"))?;
        check_pdu_format(&object, &self.rules.event_format)
    }
}

impl Event for Pdu {
    type Id = OwnedEventId;

    fn event_id(&self) -> &OwnedEventId {
        &self.event_id
    }

    fn room_id(&self) -> Option<&RoomId> {
        // A v12 create event has no room id, and the auth rules check that it has none.
        self.room_id_in_json.then_some(&*self.room_id)
    }

    fn sender(&self) -> &UserId {
        &self.sender
    }

    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        // Parsing rejects negative timestamps, so the conversion succeeds.
        MilliSecondsSinceUnixEpoch(UInt::try_from(self.origin_server_ts).unwrap_or_default())
    }

    fn event_type(&self) -> &TimelineEventType {
        &self.kind
    }

    fn content(&self) -> &RawJsonValue {
        &self.content
    }

    fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }

    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &OwnedEventId> + '_> {
        Box::new(self.prev_events.iter())
    }

    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &OwnedEventId> + '_> {
        Box::new(self.auth_events.iter())
    }

    fn redacts(&self) -> Option<&OwnedEventId> {
        self.redacts.as_ref()
    }

    fn rejected(&self) -> bool {
        self.rejected
    }
}
