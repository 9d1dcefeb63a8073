//! Event ids and room ids computed from reference hashes.
//!
//! Room versions 1 and 2 carry the event id in the event (`$local:server`). From version 3
//! on the id is `$` + the unpadded base64 of the event's reference hash (the SHA-256 of the
//! redacted event without `signatures` and `unsigned`): standard alphabet in version 3,
//! URL-safe from version 4. From version 12 (MSC4291) the room id is `!` + the reference
//! hash of the room's `m.room.create` event, which has no `room_id` of its own. ruma does
//! the hashing (`ruma::signatures::reference_hash`, which picks the alphabet from the room
//! version's rules); this module only strips what must not be hashed and adds the sigils.

use ruma::{
    room_version_rules::{EventIdFormatVersion, RoomVersionRules},
    signatures::reference_hash,
    CanonicalJsonObject, EventId, IdParseError, OwnedEventId, OwnedRoomId, RoomId,
};

use crate::PduError;

/// Whether events of rooms with these rules carry their id in their JSON (versions 1 and 2)
/// rather than having it computed from their reference hash.
pub fn event_id_in_json(rules: &RoomVersionRules) -> bool {
    matches!(rules.event_id_format, EventIdFormatVersion::V1)
}

/// The event id of an event of a room version 3 or later: `$` + its reference hash.
///
/// An `event_id` member in `object` is not part of the federation format of these versions
/// and is ignored.
pub fn reference_event_id(
    object: &CanonicalJsonObject,
    rules: &RoomVersionRules,
) -> Result<OwnedEventId, PduError> {
    let hash = if object.contains_key("event_id") {
        let mut without_id = object.clone();
        without_id.remove("event_id");
        reference_hash(&without_id, rules)
    } else {
        reference_hash(object, rules)
    }
    .map_err(|e| PduError::ReferenceHash(e.to_string()))?;
    EventId::new_v2_or_v3(&hash).map_err(|e| PduError::ReferenceHash(e.to_string()))
}

/// The room id of a room version 12 room whose `m.room.create` event has `create_event_id`:
/// the same hash behind a `!` sigil.
pub fn room_id_from_create_event_id(
    create_event_id: &EventId,
) -> Result<OwnedRoomId, IdParseError> {
    RoomId::new_v2(create_event_id.as_str().trim_start_matches('$'))
}

/// The id of the `m.room.create` event of a room version 12 room: the room id's hash behind
/// a `$` sigil. Meaningless for room ids of earlier versions (`!local:server`).
pub fn create_event_id_from_room_id(room_id: &RoomId) -> Result<OwnedEventId, IdParseError> {
    EventId::new_v2_or_v3(room_id.strip_sigil())
}
