//! The errors of this crate: why a PDU could not be read ([`PduError`]) and why state
//! resolution could not run ([`ResolveError`]).
//!
//! They are enums so that callers can tell a malformed event (drop it) from a room version
//! this build does not know (keep the event, report the version); their messages name the
//! field or value that was wrong, because they end up in logs and API errors.

use ruma::OwnedEventId;

/// Why [`Pdu::from_json`](crate::Pdu::from_json) refused an event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PduError {
    /// The text is not JSON at all.
    #[error("not valid JSON at line {line} column {column}: {reason}")]
    InvalidJson {
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// What serde_json found wrong there.
        reason: String,
    },

    /// The JSON is valid but not an object.
    #[error("a PDU must be a JSON object, got {0}")]
    NotAnObject(&'static str),

    /// A required top-level field is absent.
    #[error("missing field `{0}`")]
    MissingField(&'static str),

    /// A field is present but has the wrong type or an invalid value.
    #[error("invalid field `{field}`: {reason}")]
    InvalidField {
        /// The (possibly dotted) field name, e.g. `content.room_version`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// The event is not a room's create event and the caller gave no room version.
    #[error(
        "the room version is needed to read a `{event_type}` event (only an `m.room.create` \
         event with an empty state key carries its own)"
    )]
    MissingRoomVersion {
        /// The event's `type`.
        event_type: String,
    },

    /// The room version is not one that ruma knows the rules of.
    #[error("unsupported room version {0}")]
    UnsupportedRoomVersion(String),

    /// The caller's room version and the create event's `content.room_version` disagree.
    #[error(
        "room version {given} was given for an `m.room.create` event whose content says \
         room version {in_content}"
    )]
    RoomVersionMismatch {
        /// The version the caller passed.
        given: String,
        /// The version in the create event's content.
        in_content: String,
    },

    /// The event holds a value that canonical JSON cannot represent (a float, an integer
    /// beyond 2^53), so its reference hash, hence its id, cannot be computed.
    #[error("not canonical JSON, so no reference hash can be computed: {0}")]
    NotCanonicalJson(String),

    /// ruma could not compute the reference hash (for example the event is over 64 KiB).
    #[error("could not compute the reference hash: {0}")]
    ReferenceHash(String),

    /// For room versions 3 and later the JSON carried an `event_id` that is not the one
    /// computed from its reference hash.
    #[error(
        "event id {given} given for room version {room_version} does not match the id \
         {computed} computed from the reference hash"
    )]
    EventIdMismatch {
        /// The room version of the event.
        room_version: String,
        /// The id found in the JSON.
        given: String,
        /// The id computed from the reference hash.
        computed: OwnedEventId,
    },

    /// The event breaks one of the limits the Matrix specification sets on PDUs (size,
    /// length of ids and state keys, number of references) or holds a NUL character
    /// where storage keeps it in a column of its own (PostgreSQL cannot store NUL in
    /// text).
    #[error("{field}: {reason}")]
    OverLimit {
        /// The field that is over the limit, or `event` for the whole PDU.
        field: &'static str,
        /// The limit and the value found.
        reason: String,
    },
}

impl PduError {
    /// Wraps a serde_json parse error, keeping its position apart from its reason.
    pub(crate) fn from_json_error(error: &serde_json::Error) -> Self {
        let text = error.to_string();
        let position = format!(" at line {} column {}", error.line(), error.column());
        let reason = text.strip_suffix(&position).unwrap_or(&text).to_owned();
        PduError::InvalidJson {
            line: error.line(),
            column: error.column(),
            reason,
        }
    }

    pub(crate) fn invalid(field: &'static str, reason: impl std::fmt::Display) -> Self {
        PduError::InvalidField {
            field,
            reason: reason.to_string(),
        }
    }
}

/// Why [`resolve_state`](crate::resolve_state) could not produce a state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// The room version is not one that ruma knows the rules of.
    #[error("unsupported room version {0}")]
    UnsupportedRoomVersion(String),

    /// ruma's state resolution failed, typically because an event it needed could not be
    /// fetched.
    #[error("state resolution failed: {0}")]
    StateRes(#[from] ruma::state_res::Error),
}
