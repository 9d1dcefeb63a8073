//! Room versions and the ruma rules that go with them.
//!
//! Everything version-dependent (event id format, auth rules, state resolution variant) is
//! looked up here once, from ruma's `RoomVersionRules`, so the rest of the crate never
//! matches on version numbers itself.

use ruma::{
    room_version_rules::{RoomVersionRules, StateResolutionV2Rules},
    RoomVersionId,
};

/// The ruma rules of `room_version`, or `None` for a version ruma does not know.
///
/// ruma 0.17.2 knows versions 1 to 12 (12 being MSC4291 room ids and state resolution
/// v2.1).
pub fn room_version_rules(room_version: &RoomVersionId) -> Option<RoomVersionRules> {
    room_version.rules()
}

/// Parses a room version string (e.g. from `content.room_version` or a `rooms` row) and
/// returns it with its rules, or `None` when the version is unknown.
pub fn parse_room_version(version: &str) -> Option<(RoomVersionId, RoomVersionRules)> {
    let id = RoomVersionId::try_from(version).ok()?;
    let rules = id.rules()?;
    Some((id, rules))
}

/// The state resolution v2 rules to use for a room.
///
/// Room version 1 uses the original state resolution algorithm (v1), which ruma does not
/// implement; such rooms are resolved with v2.0 instead. Synapse still resolves them with v1,
/// so the result can differ from Synapse's for a v1 room whose forks conflict; every other
/// version resolves as Synapse does (v2.0 for 2 to 11, v2.1 for 12).
pub fn state_res_rules(rules: &RoomVersionRules) -> StateResolutionV2Rules {
    rules
        .state_res
        .v2_rules()
        .copied()
        .unwrap_or(StateResolutionV2Rules::V2_0)
}
