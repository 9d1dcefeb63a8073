//! Reading a [`Pdu`] out of federation JSON: field by field, with errors that name the field.
//!
//! The room version decides how the event id is obtained (the `event_id` member for
//! versions 1 and 2, the reference hash from 3 on), how `prev_events`/`auth_events` are
//! written (`[id, {hashes}]` pairs up to version 2, plain ids after; both are accepted), where
//! `redacts` lives (top level, or `content.redacts` from version 11), and whether a create
//! event may lack `room_id` (version 12).

use ruma::{
    canonical_json::try_from_json_map, events::TimelineEventType, CanonicalJsonValue, OwnedEventId,
    OwnedRoomId, OwnedUserId, RoomVersionId,
};
use serde_json::{Map, Value as JsonValue};

use crate::{
    event_id::{event_id_in_json, reference_event_id, room_id_from_create_event_id},
    room_version::parse_room_version,
    Pdu, PduError,
};

type JsonObject = Map<String, JsonValue>;

pub(crate) fn parse_pdu(json: &str, room_version: Option<&RoomVersionId>) -> Result<Pdu, PduError> {
    parse(json, room_version, None)
}

/// [`parse_pdu`] of an event its caller has already read as the tree `value`.
pub(crate) fn parse_pdu_tree(
    value: JsonValue,
    room_version: Option<&RoomVersionId>,
) -> Result<Pdu, PduError> {
    parse_tree(value, room_version, None)
}

/// [`parse_pdu`] for an event read back from storage under `event_id`: the id
/// is taken as stored and the JSON kept as it is, neither hashed nor
/// canonicalised again.
pub(crate) fn parse_stored_pdu(
    json: &str,
    room_version: &RoomVersionId,
    event_id: &str,
) -> Result<Pdu, PduError> {
    match parse_stored_fields(json, room_version, event_id) {
        Some(pdu) => Ok(pdu),
        None => parse(json, Some(room_version), Some(event_id)),
    }
}

/// The fields of a stored event that a [`Pdu`] keeps, read straight out of
/// its JSON: no tree of every value built (hashes, signatures, `unsigned`
/// are skipped), `content` borrowed as the text it is. State resolution
/// reads thousands of stored events (3,392 per merge of the HQ forks), and
/// building the tree was most of the cost of reading one.
#[derive(serde::Deserialize)]
struct StoredFields<'a> {
    #[serde(rename = "type", borrow)]
    event_type: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    state_key: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    sender: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    content: &'a serde_json::value::RawValue,
    prev_events: Vec<EventRef>,
    auth_events: Vec<EventRef>,
    depth: i64,
    origin_server_ts: i64,
    #[serde(default)]
    redacts: Option<OwnedEventId>,
    #[serde(default, borrow)]
    room_id: Option<std::borrow::Cow<'a, str>>,
}

/// One entry of `prev_events` or `auth_events`: an id, or an `[id, {hashes}]`
/// pair (room versions 1 and 2).
struct EventRef(OwnedEventId);

impl<'de> serde::Deserialize<'de> for EventRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = EventRef;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an event id or an [id, hashes] pair")
            }

            fn visit_str<E: serde::de::Error>(self, id: &str) -> Result<EventRef, E> {
                OwnedEventId::try_from(id).map(EventRef).map_err(E::custom)
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<EventRef, A::Error> {
                let id: std::borrow::Cow<'de, str> = seq
                    .next_element()?
                    .ok_or_else(|| serde::de::Error::custom("an empty event reference"))?;
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                self.visit_str(&id)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// [`parse_stored_pdu`] without the tree of values, for the events it can
/// read so (`None` for the others, which [`parse`] reads): neither a create
/// event (its version is in its content) nor a redaction (whose `redacts` may
/// be in its content), nor JSON that does not read as such.
fn parse_stored_fields(json: &str, room_version: &RoomVersionId, event_id: &str) -> Option<Pdu> {
    let fields: StoredFields<'_> = serde_json::from_str(json).ok()?;
    if fields.event_type == "m.room.create" || fields.event_type == "m.room.redaction" {
        return None;
    }
    let rules = crate::room_version::room_version_rules(room_version)?;
    let event_id = OwnedEventId::try_from(event_id).ok()?;
    let room_id = OwnedRoomId::try_from(&*fields.room_id?).ok()?;
    if fields.origin_server_ts < 0 {
        return None;
    }
    let event_type = fields.event_type.into_owned();
    Some(Pdu {
        event_id,
        room_id,
        room_version: room_version.clone(),
        sender: OwnedUserId::try_from(&*fields.sender).ok()?,
        kind: TimelineEventType::from(event_type.as_str()),
        event_type,
        state_key: fields.state_key.map(std::borrow::Cow::into_owned),
        content: fields.content.to_owned(),
        prev_events: fields.prev_events.into_iter().map(|r| r.0).collect(),
        auth_events: fields.auth_events.into_iter().map(|r| r.0).collect(),
        depth: fields.depth,
        origin_server_ts: fields.origin_server_ts,
        redacts: fields.redacts,
        json: json.to_owned(),
        rejected: false,
        room_id_in_json: true,
        rules,
    })
}

fn parse(
    json: &str,
    room_version: Option<&RoomVersionId>,
    stored_id: Option<&str>,
) -> Result<Pdu, PduError> {
    let value: JsonValue = serde_json::from_str(json).map_err(|e| PduError::from_json_error(&e))?;
    parse_tree(value, room_version, stored_id.map(|id| (id, json)))
}

/// [`parse`] of the tree `value`; `stored` is the id and text of an event
/// read back from storage.
fn parse_tree(
    value: JsonValue,
    room_version: Option<&RoomVersionId>,
    stored: Option<(&str, &str)>,
) -> Result<Pdu, PduError> {
    let JsonValue::Object(mut object) = value else {
        return Err(PduError::NotAnObject(json_kind(&value)));
    };

    let event_type = required_str(&object, "type")?.to_owned();
    let state_key = optional_str(&object, "state_key")?.map(str::to_owned);
    let is_create = event_type == "m.room.create" && state_key.as_deref() == Some("");
    let (room_version, rules) = room_version_of(&object, is_create, &event_type, room_version)?;

    let sender = OwnedUserId::try_from(required_str(&object, "sender")?)
        .map_err(|e| PduError::invalid("sender", e))?;
    let content = match object.get("content") {
        Some(content @ JsonValue::Object(_)) => {
            serde_json::value::to_raw_value(content).map_err(|e| PduError::invalid("content", e))?
        }
        Some(other) => return Err(not_a("content", "an object", other)),
        None => return Err(PduError::MissingField("content")),
    };
    let prev_events = event_refs(&object, "prev_events")?;
    let auth_events = event_refs(&object, "auth_events")?;
    let depth = required_i64(&object, "depth")?;
    let origin_server_ts = required_i64(&object, "origin_server_ts")?;
    if origin_server_ts < 0 {
        return Err(PduError::invalid("origin_server_ts", "negative timestamp"));
    }
    let redacts = redacts(&object, rules.redaction.content_field_redacts)?;
    let room_id = match optional_str(&object, "room_id")? {
        Some(id) => Some(OwnedRoomId::try_from(id).map_err(|e| PduError::invalid("room_id", e))?),
        None => None,
    };

    let (event_id, json) = if let Some((id, json)) = stored {
        let id = OwnedEventId::try_from(id).map_err(|e| PduError::invalid("event_id", e))?;
        (id, json.to_owned())
    } else if event_id_in_json(&rules) {
        let id = OwnedEventId::try_from(required_str(&object, "event_id")?)
            .map_err(|e| PduError::invalid("event_id", e))?;
        // Old rooms may hold values canonical JSON cannot represent (floats); their id does
        // not depend on a hash, so keep such events as serde_json writes them.
        let json = match CanonicalJsonValue::try_from(JsonValue::Object(object.clone())) {
            Ok(canonical) => serde_json::to_string(&canonical),
            Err(_) => serde_json::to_string(&object),
        }
        .map_err(|e| PduError::invalid("event", e))?;
        (id, json)
    } else {
        let given = object.remove("event_id");
        let canonical =
            try_from_json_map(object).map_err(|e| PduError::NotCanonicalJson(e.to_string()))?;
        let id = reference_event_id(&canonical, &rules)?;
        if let Some(given) = given {
            if given.as_str() != Some(id.as_str()) {
                return Err(PduError::EventIdMismatch {
                    room_version: room_version.to_string(),
                    given: given
                        .as_str()
                        .map_or_else(|| given.to_string(), str::to_owned),
                    computed: id,
                });
            }
        }
        let json = serde_json::to_string(&canonical).map_err(|e| PduError::invalid("event", e))?;
        (id, json)
    };

    let room_id_in_json = room_id.is_some();
    let room_id = match room_id {
        Some(id) => id,
        None if is_create && rules.authorization.room_create_event_id_as_room_id => {
            room_id_from_create_event_id(&event_id).map_err(|e| PduError::invalid("room_id", e))?
        }
        None => return Err(PduError::MissingField("room_id")),
    };

    Ok(Pdu {
        event_id,
        room_id,
        room_version,
        sender,
        kind: TimelineEventType::from(event_type.as_str()),
        event_type,
        state_key,
        content,
        prev_events,
        auth_events,
        depth,
        origin_server_ts,
        redacts,
        json,
        rejected: false,
        room_id_in_json,
        rules,
    })
}

/// The room version and its rules: from a create event's content, else from the caller.
fn room_version_of(
    object: &JsonObject,
    is_create: bool,
    event_type: &str,
    given: Option<&RoomVersionId>,
) -> Result<(RoomVersionId, ruma::room_version_rules::RoomVersionRules), PduError> {
    let version = if is_create {
        let in_content = match object.get("content").and_then(|c| c.get("room_version")) {
            None => "1",
            Some(JsonValue::String(version)) => version.as_str(),
            Some(other) => return Err(not_a("content.room_version", "a string", other)),
        };
        if let Some(given) = given {
            if given.as_str() != in_content {
                return Err(PduError::RoomVersionMismatch {
                    given: given.to_string(),
                    in_content: in_content.to_owned(),
                });
            }
        }
        in_content.to_owned()
    } else {
        let given = given.ok_or_else(|| PduError::MissingRoomVersion {
            event_type: event_type.to_owned(),
        })?;
        given.to_string()
    };
    parse_room_version(&version).ok_or(PduError::UnsupportedRoomVersion(version))
}

/// `prev_events` or `auth_events`: ids, or `[id, {hashes}]` pairs (room versions 1 and 2).
fn event_refs(object: &JsonObject, field: &'static str) -> Result<Vec<OwnedEventId>, PduError> {
    let items = match object.get(field) {
        Some(JsonValue::Array(items)) => items,
        Some(other) => return Err(not_a(field, "an array", other)),
        None => return Err(PduError::MissingField(field)),
    };
    items
        .iter()
        .map(|item| {
            let id = match item {
                JsonValue::String(id) => id,
                JsonValue::Array(pair) => match pair.first() {
                    Some(JsonValue::String(id)) => id,
                    _ => return Err(not_a(field, "a list of event ids", item)),
                },
                _ => return Err(not_a(field, "a list of event ids", item)),
            };
            OwnedEventId::try_from(id.as_str()).map_err(|e| PduError::invalid(field, e))
        })
        .collect()
}

/// The event a redaction redacts: top-level `redacts`, then (room version 11 and later)
/// `content.redacts`.
fn redacts(object: &JsonObject, in_content: bool) -> Result<Option<OwnedEventId>, PduError> {
    let (field, value) = match object.get("redacts") {
        Some(value) => ("redacts", value),
        None => match object.get("content").and_then(|c| c.get("redacts")) {
            Some(value) if in_content => ("content.redacts", value),
            _ => return Ok(None),
        },
    };
    let JsonValue::String(id) = value else {
        return Err(not_a(field, "a string", value));
    };
    OwnedEventId::try_from(id.as_str())
        .map(Some)
        .map_err(|e| PduError::invalid(field, e))
}

fn required_str<'a>(object: &'a JsonObject, field: &'static str) -> Result<&'a str, PduError> {
    optional_str(object, field)?.ok_or(PduError::MissingField(field))
}

fn optional_str<'a>(
    object: &'a JsonObject,
    field: &'static str,
) -> Result<Option<&'a str>, PduError> {
    match object.get(field) {
        None => Ok(None),
        Some(JsonValue::String(value)) => Ok(Some(value)),
        Some(other) => Err(not_a(field, "a string", other)),
    }
}

fn required_i64(object: &JsonObject, field: &'static str) -> Result<i64, PduError> {
    match object.get(field) {
        None => Err(PduError::MissingField(field)),
        Some(JsonValue::Number(n)) => n
            .as_i64()
            .ok_or_else(|| PduError::invalid(field, format!("{n} is not an integer"))),
        Some(other) => Err(not_a(field, "an integer", other)),
    }
}

fn not_a(field: &'static str, expected: &str, got: &JsonValue) -> PduError {
    PduError::invalid(
        field,
        format!("expected {expected}, got {}", json_kind(got)),
    )
}

fn json_kind(value: &JsonValue) -> &'static str {
    match value {
        JsonValue::Null => "null",
        JsonValue::Bool(_) => "a boolean",
        JsonValue::Number(_) => "a number",
        JsonValue::String(_) => "a string",
        JsonValue::Array(_) => "an array",
        JsonValue::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_events_other_than_create_and_redaction_are_read_by_their_fields() {
        let json = r#"{"auth_events":["$a"],"content":{"body":"x","msgtype":"m.text"},"depth":3,"hashes":{"sha256":"aGFzaA"},"origin_server_ts":5,"prev_events":["$p"],"room_id":"!r:x","sender":"@s:x","signatures":{"x":{"ed25519:1":"c2ln"}},"type":"m.room.message","unsigned":{"age":1}}"#;
        let pdu = parse_stored_fields(json, &RoomVersionId::V10, "$e").expect("read by its fields");
        assert_eq!(pdu.content.get(), r#"{"body":"x","msgtype":"m.text"}"#);
        assert_eq!(pdu.prev_events[0].as_str(), "$p");
        let create = json.replace("m.room.message", "m.room.create");
        assert!(parse_stored_fields(&create, &RoomVersionId::V10, "$e").is_none());
    }
}
