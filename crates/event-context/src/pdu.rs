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

/// The largest PDU, in bytes of canonical JSON (the specification's limit).
pub const MAX_PDU_BYTES: usize = 65_536;
/// The longest event id, room id, user id, event type or state key, in bytes.
pub const MAX_ID_BYTES: usize = 255;
/// The most `prev_events` an event may name.
pub const MAX_PREV_EVENTS: usize = 20;
/// The most `auth_events` an event may name.
pub const MAX_AUTH_EVENTS: usize = 10;

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

    /// [`Pdu::from_json`] of an event whose text its caller has already read
    /// as a tree of values (`serde_json::from_str`), which is not read again.
    pub fn from_json_value(
        value: serde_json::Value,
        room_version: Option<&RoomVersionId>,
    ) -> Result<Pdu, PduError> {
        parse::parse_pdu_tree(value, room_version)
    }

    /// Reads an event back from storage, where it is stored under `event_id`
    /// as JSON that was checked when it arrived: the id is taken as stored and
    /// the JSON kept as it is, so neither the reference hash nor the canonical
    /// form is computed again (most of the cost of [`Pdu::from_json`] for
    /// room versions 3 and later). State resolution reads thousands this way.
    pub fn from_stored_json(
        json: &str,
        room_version: &RoomVersionId,
        event_id: &str,
    ) -> Result<Pdu, PduError> {
        parse::parse_stored_pdu(json, room_version, event_id)
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
            .map(|k| storage_state::key(&self.event_type, k))
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

    /// The limits every new event must keep before anything of it is stored, the same on
    /// every engine: at most [`MAX_PDU_BYTES`] of canonical JSON, ids, the event type and
    /// the state key at most [`MAX_ID_BYTES`] bytes, at most [`MAX_PREV_EVENTS`] prev and
    /// [`MAX_AUTH_EVENTS`] auth events (the specification's, as Synapse and ruma apply
    /// them), and no NUL character in a value that has a column of its own (the ids
    /// of prev and auth events too).
    ///
    /// Not part of [`Pdu::from_json`]: events already stored (possibly by an older
    /// server that allowed more) are read back without it.
    pub fn check_limits(&self) -> Result<(), PduError> {
        if self.json.len() > MAX_PDU_BYTES {
            return Err(PduError::OverLimit {
                field: "event",
                reason: format!(
                    "{} bytes of canonical JSON, over the limit of {MAX_PDU_BYTES}",
                    self.json.len()
                ),
            });
        }
        let membership = self.membership();
        let columns: [(&'static str, Option<&str>); 6] = [
            ("event_id", Some(self.event_id.as_str())),
            ("room_id", Some(self.room_id.as_str())),
            ("sender", Some(self.sender.as_str())),
            ("type", Some(&self.event_type)),
            ("state_key", self.state_key.as_deref()),
            ("content.membership", membership.as_deref()),
        ];
        for (field, value) in columns {
            let Some(value) = value else { continue };
            if value.len() > MAX_ID_BYTES {
                return Err(PduError::OverLimit {
                    field,
                    reason: format!("{} bytes, over the limit of {MAX_ID_BYTES}", value.len()),
                });
            }
            if value.contains('\0') {
                return Err(PduError::OverLimit {
                    field,
                    reason: "contains a NUL character".to_owned(),
                });
            }
        }
        for (field, ids, max) in [
            ("prev_events", &self.prev_events, MAX_PREV_EVENTS),
            ("auth_events", &self.auth_events, MAX_AUTH_EVENTS),
        ] {
            if ids.len() > max {
                return Err(PduError::OverLimit {
                    field,
                    reason: format!("{} events, over the limit of {max}", ids.len()),
                });
            }
            // Each has a row of its own (`event_edges`, `event_auth`), even
            // one naming an event that does not exist.
            if ids.iter().any(|id| id.as_str().contains('\0')) {
                return Err(PduError::OverLimit {
                    field,
                    reason: "names an event id holding a NUL character".to_owned(),
                });
            }
        }
        Ok(())
    }

    /// `content.membership` of a member event.
    pub fn membership(&self) -> Option<String> {
        if self.event_type != "m.room.member" {
            return None;
        }
        self.content_value()
            .get("membership")
            .and_then(|m| m.as_str())
            .map(str::to_owned)
    }

    /// Whether this is a room's create event (`m.room.create` with an empty state key).
    pub fn is_create(&self) -> bool {
        self.event_type == "m.room.create" && self.state_key.as_deref() == Some("")
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
        // Parsing rejects negative timestamps. Room versions 1 to 5 take integers
        // past ruma's 2^53 - 1 (canonical JSON's range binds from version 6 on),
        // and Synapse orders events by the whole number: such a timestamp sorts
        // after every other, as ruma's largest (before the fix it read as 0 and
        // sorted first, so a resolution could pick another event than Synapse).
        MilliSecondsSinceUnixEpoch(UInt::try_from(self.origin_server_ts).unwrap_or(UInt::MAX))
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
