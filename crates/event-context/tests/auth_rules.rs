//! ruma's authorization rules on `Pdu`s: events from non-members and joins of banned users
//! are rejected with a reason, in a room of version 2, 10 and 12 (where the create event is
//! no longer among the auth events and the room id is its hash).

mod common;

use common::{member, spec, Room, ALICE, BOB, CHARLIE};
use event_context::{
    auth_types_for_pdu, check_auth, check_auth_against_state, check_auth_events, resolve_state,
    ruma::{events::StateEventType, RoomVersionId},
};
use serde_json::json;

const VERSIONS: [RoomVersionId; 3] = [RoomVersionId::V2, RoomVersionId::V10, RoomVersionId::V12];

/// A public room where alice (creator, power 100) has joined.
fn public_room(version: RoomVersionId) -> Room {
    let mut room = Room::new(version, ALICE);
    room.add(&member("IMA", ALICE, ALICE, "join"));
    let users = if room.version == RoomVersionId::V12 {
        json!({})
    } else {
        json!({ ALICE: 100 })
    };
    room.add(&spec(
        "IPOWER",
        ALICE,
        "m.room.power_levels",
        Some(""),
        json!({ "users": users }),
    ));
    room.add(&spec(
        "IJR",
        ALICE,
        "m.room.join_rules",
        Some(""),
        json!({ "join_rule": "public" }),
    ));
    room
}

#[test]
fn every_event_of_the_room_passes() {
    for version in VERSIONS {
        let mut room = public_room(version.clone());
        room.add(&member("IMB", BOB, BOB, "join"));
        room.add(&spec(
            "M1",
            BOB,
            "m.room.message",
            None,
            json!({ "body": "hi" }),
        ));
        for (node, pdu) in &room.by_node {
            assert_eq!(
                check_auth_events(pdu, room.fetch()),
                Ok(()),
                "{version} {node}"
            );
        }
        if version == RoomVersionId::V12 {
            let create = &room.by_node["CREATE"];
            assert_eq!(room.room_id.as_deref(), Some(create.room_id.as_str()));
            assert_eq!(
                &create.room_id.as_str()[1..],
                &create.event_id.as_str()[1..]
            );
            assert!(!room.by_node["IMA"].auth_events.contains(&create.event_id));
        }
    }
}

#[test]
fn message_from_a_non_member_is_rejected() {
    for version in VERSIONS {
        let mut room = public_room(version.clone());
        let message = room.build(&spec("M", CHARLIE, "m.room.message", None, json!({})));
        let reason = check_auth_events(&message, room.fetch()).unwrap_err();
        assert_eq!(reason, "sender's membership is not `join`", "{version}");
        let reason = check_auth_against_state(&message, &room.state, room.fetch()).unwrap_err();
        assert_eq!(reason, "sender's membership is not `join`", "{version}");

        let from_alice = room.build(&spec("M2", ALICE, "m.room.message", None, json!({})));
        assert_eq!(
            check_auth_against_state(&from_alice, &room.state, room.fetch()),
            Ok(())
        );
    }
}

#[test]
fn join_of_a_banned_user_is_rejected() {
    for version in VERSIONS {
        let mut room = public_room(version.clone());
        room.add(&member("IMB", BOB, BOB, "join"));
        room.add(&member("MB", ALICE, BOB, "ban"));
        let rejoin = room.build(&member("J", BOB, BOB, "join"));
        let ban_id = room.id("MB");
        assert!(
            rejoin.auth_events.contains(&ban_id),
            "the ban authorises the join attempt"
        );

        let reason = check_auth_events(&rejoin, room.fetch()).unwrap_err();
        assert!(reason.contains("banned"), "{version}: {reason}");
        let fetch = room.fetch();
        let reason = check_auth(&rejoin, |event_type, state_key| {
            let key = storage_state::key(&event_type.to_string(), state_key);
            room.state.get(&key).and_then(|id| fetch(id))
        })
        .unwrap_err();
        assert!(reason.contains("banned"), "{version}: {reason}");
    }
}

#[test]
fn auth_events_of_the_wrong_type_are_rejected() {
    let mut room = public_room(RoomVersionId::V10);
    // A topic's auth events must not include the join rules.
    let mut topic = room.build(&spec("T", ALICE, "m.room.topic", Some(""), json!({})));
    topic.auth_events.push(room.id("IJR"));
    let reason = check_auth_events(&topic, room.fetch()).unwrap_err();
    assert!(reason.starts_with("unexpected auth event"), "{reason}");
}

#[test]
fn auth_types_follow_the_room_version() {
    for version in VERSIONS {
        let mut room = public_room(version.clone());
        let join = room.build(&member("J", BOB, BOB, "join"));
        let types = auth_types_for_pdu(&join).unwrap();
        let has =
            |t: StateEventType, k: &str| types.contains(&storage_state::key(&t.to_string(), k));
        assert!(has(StateEventType::RoomPowerLevels, ""));
        assert!(has(StateEventType::RoomMember, BOB));
        assert!(has(StateEventType::RoomJoinRules, ""));
        assert_eq!(
            has(StateEventType::RoomCreate, ""),
            version != RoomVersionId::V12,
            "{version}"
        );
    }
}

#[test]
fn v12_concurrent_topics_resolve_with_state_res_v2_1() {
    let mut room = public_room(RoomVersionId::V12);
    let fork = room.last.clone();
    let state_at_fork = room.state.clone();
    let t1 = room.add(&spec(
        "T1",
        ALICE,
        "m.room.topic",
        Some(""),
        json!({ "topic": "one" }),
    ));
    let after_t1 = room.state.clone();
    room.last = fork;
    room.state = state_at_fork;
    let t2 = room.add(&spec(
        "T2",
        ALICE,
        "m.room.topic",
        Some(""),
        json!({ "topic": "two" }),
    ));
    let after_t2 = room.state.clone();

    let resolved = resolve_state(
        &RoomVersionId::V12,
        &[after_t1.clone(), after_t2],
        room.fetch(),
    )
    .unwrap();
    // Same mainline, so the later timestamp wins.
    let topic_key = storage_state::key("m.room.topic", "");
    assert_eq!(resolved[&topic_key], t2.event_id);
    assert_ne!(resolved[&topic_key], t1.event_id);
    let create_key = storage_state::key("m.room.create", "");
    assert_eq!(resolved[&create_key], after_t1[&create_key]);
    assert_eq!(resolved.len(), after_t1.len());
}

/// Room versions 1 to 5 take timestamps past 2^53 (canonical JSON's integer
/// range binds from version 6 on), and Synapse orders conflicting events of one
/// mainline position by the whole timestamp: the later one, past ruma's
/// largest, must still be applied last and win.
#[test]
fn a_timestamp_past_2_53_sorts_last_in_old_room_versions() {
    let mut room = public_room(RoomVersionId::V2);
    let fork = room.last.clone();
    let state_at_fork = room.state.clone();
    let ts_at_fork = room.ts;
    room.ts = (1 << 60) - 1;
    let late = room.add(&spec(
        "T1",
        ALICE,
        "m.room.topic",
        Some(""),
        json!({ "topic": "late" }),
    ));
    assert_eq!(late.origin_server_ts, 1 << 60);
    let after_late = room.state.clone();
    room.last = fork;
    room.state = state_at_fork;
    room.ts = ts_at_fork;
    let early = room.add(&spec(
        "T2",
        ALICE,
        "m.room.topic",
        Some(""),
        json!({ "topic": "early" }),
    ));
    let after_early = room.state.clone();

    let topic_key = storage_state::key("m.room.topic", "");
    for sets in [
        [after_late.clone(), after_early.clone()],
        [after_early, after_late],
    ] {
        let resolved = resolve_state(&RoomVersionId::V2, &sets, room.fetch()).unwrap();
        assert_eq!(
            resolved[&topic_key], late.event_id,
            "the topic of 2^60 ms must win over {}",
            early.event_id
        );
    }
}
