//! Reading PDUs: event ids per room version (from the JSON, or from the reference hash),
//! version 12 room ids, and the errors for malformed events.

use event_context::{
    ruma::{
        room_version_rules::RoomVersionRules,
        signatures::{add_content_hash_to_event, reference_hash},
        CanonicalJsonObject, RoomVersionId,
    },
    Pdu, PduError,
};
use serde_json::{json, Value};

fn message(version: &str) -> Value {
    json!({
        "room_id": "!room:example.com",
        "sender": "@alice:example.com",
        "type": "m.room.message",
        "content": { "msgtype": "m.text", "body": "hello" },
        "prev_events": ["$prev"],
        "auth_events": ["$create", "$member"],
        "depth": 7,
        "origin_server_ts": 1_700_000_000_000_i64,
        "origin": "example.com",
        "hashes": { "sha256": "aGFzaA" },
        "signatures": { "example.com": { "ed25519:1": "c2ln" } },
        "unsigned": { "age": 5 },
        "x-version": version,
    })
}

/// `event` with its `hashes.sha256` recomputed by ruma for its current content, as the
/// sending server would have done.
fn with_content_hash(event: Value) -> Value {
    let mut object: CanonicalJsonObject = serde_json::from_value(event).unwrap();
    object.remove("hashes");
    add_content_hash_to_event(&mut object).unwrap();
    serde_json::to_value(object).unwrap()
}

/// `$` + ruma's reference hash of `event`, computed without going through `Pdu`.
fn expected_id(event: &Value, rules: &RoomVersionRules) -> String {
    let object: CanonicalJsonObject = serde_json::from_value(event.clone()).unwrap();
    format!("${}", reference_hash(&object, rules).unwrap())
}

fn parse(event: &Value, version: &RoomVersionId) -> Pdu {
    Pdu::from_json(&event.to_string(), Some(version)).unwrap()
}

fn parse_err(json: &str, version: Option<&RoomVersionId>) -> String {
    let err: PduError = Pdu::from_json(json, version).unwrap_err();
    err.to_string()
}

#[test]
fn v1_event_id_is_the_event_id_member() {
    let mut event = message("1");
    event["event_id"] = json!("$abc123:example.com");
    event["prev_events"] = json!([["$prev:example.com", { "sha256": "aGFzaA" }]]);
    event["auth_events"] = json!([["$create:example.com", {}], ["$member:example.com", {}]]);
    let pdu = parse(&event, &RoomVersionId::V1);
    assert_eq!(pdu.event_id, "$abc123:example.com");
    assert_eq!(pdu.room_id, "!room:example.com");
    assert_eq!(pdu.sender, "@alice:example.com");
    assert_eq!(pdu.event_type, "m.room.message");
    assert_eq!(pdu.state_key, None);
    assert_eq!(pdu.prev_events, ["$prev:example.com"]);
    assert_eq!(
        pdu.auth_events,
        ["$create:example.com", "$member:example.com"]
    );
    assert_eq!(pdu.depth, 7);
    assert_eq!(pdu.origin_server_ts, 1_700_000_000_000);
    assert_eq!(pdu.content_value()["body"], "hello");
    // The stored JSON is canonical and keeps the id.
    let stored: Value = serde_json::from_str(&pdu.json).unwrap();
    assert_eq!(stored, event);
    assert!(pdu.json.starts_with(r#"{"auth_events":"#), "{}", pdu.json);
}

#[test]
fn v1_event_without_event_id_is_refused() {
    let err = parse_err(&message("1").to_string(), Some(&RoomVersionId::V1));
    assert_eq!(err, "missing field `event_id`");
}

#[test]
fn v3_event_id_is_the_standard_base64_reference_hash() {
    let event = message("3");
    let pdu = parse(&event, &RoomVersionId::V3);
    assert_eq!(
        pdu.event_id.as_str(),
        expected_id(&event, &RoomVersionRules::V3)
    );
    assert_eq!(
        pdu.event_id.as_str().len(),
        44,
        "$ + 43 unpadded base64 characters"
    );

    // Version 4 hashes the same bytes and writes them with the URL-safe alphabet.
    let v4 = parse(&event, &RoomVersionId::V4);
    assert_eq!(
        v4.event_id.as_str(),
        pdu.event_id.as_str().replace('+', "-").replace('/', "_")
    );
    assert!(!v4.event_id.as_str().contains(['+', '/']));
}

#[test]
fn v3_and_v4_ids_differ_by_alphabet_only() {
    // Find a content whose hash has a character that differs between the two alphabets, so
    // the alphabet choice is really exercised.
    let differing = (0..64).find_map(|i| {
        let mut event = message("3");
        event["content"]["body"] = json!(format!("hello {i}"));
        let event = with_content_hash(event);
        let v3 = parse(&event, &RoomVersionId::V3);
        v3.event_id
            .as_str()
            .contains(['+', '/'])
            .then_some((event, v3))
    });
    let (event, v3) = differing.expect("some hash among 64 has a + or /");
    let v4 = parse(&event, &RoomVersionId::V4);
    assert_ne!(v3.event_id, v4.event_id);
    assert_eq!(
        v4.event_id.as_str(),
        v3.event_id.as_str().replace('+', "-").replace('/', "_")
    );
    assert_eq!(
        v4.event_id.as_str(),
        expected_id(&event, &RoomVersionRules::V4)
    );
}

#[test]
fn v10_event_id_is_the_url_safe_reference_hash() {
    let event = message("10");
    let pdu = parse(&event, &RoomVersionId::V10);
    assert_eq!(
        pdu.event_id.as_str(),
        expected_id(&event, &RoomVersionRules::V10)
    );
    // The stored JSON has no event_id and hashes to the same id.
    let stored: Value = serde_json::from_str(&pdu.json).unwrap();
    assert!(stored.get("event_id").is_none());
    assert_eq!(
        expected_id(&stored, &RoomVersionRules::V10),
        pdu.event_id.as_str()
    );
}

#[test]
fn v10_event_id_depends_on_content_but_not_on_unsigned_or_signatures() {
    let event = with_content_hash(message("10"));
    let id = parse(&event, &RoomVersionId::V10).event_id;

    // A message's content is redacted before the reference hash is taken: the content
    // counts through the content hash in `hashes`, which the sender computes.
    let mut other_content = event.clone();
    other_content["content"]["body"] = json!("hello!");
    assert_eq!(
        parse(&other_content, &RoomVersionId::V10).event_id,
        id,
        "same content hash"
    );
    let other_content = with_content_hash(other_content);
    assert_ne!(parse(&other_content, &RoomVersionId::V10).event_id, id);

    // Content that survives redaction (a membership) changes the id directly.
    let mut join = message("10");
    join["type"] = json!("m.room.member");
    join["state_key"] = json!("@alice:example.com");
    join["content"] = json!({ "membership": "join" });
    let join_id = parse(&join, &RoomVersionId::V10).event_id;
    join["content"]["membership"] = json!("leave");
    assert_ne!(parse(&join, &RoomVersionId::V10).event_id, join_id);

    let mut other_unsigned = event.clone();
    other_unsigned["unsigned"] = json!({ "age": 99, "transaction_id": "t1" });
    assert_eq!(parse(&other_unsigned, &RoomVersionId::V10).event_id, id);

    let mut other_signatures = event.clone();
    other_signatures["signatures"] = json!({ "other.org": { "ed25519:2": "b3RoZXI" } });
    assert_eq!(parse(&other_signatures, &RoomVersionId::V10).event_id, id);

    let mut no_unsigned = event;
    no_unsigned.as_object_mut().unwrap().remove("unsigned");
    assert_eq!(parse(&no_unsigned, &RoomVersionId::V10).event_id, id);
}

#[test]
fn v10_event_id_member_must_match_the_hash() {
    let mut event = message("10");
    let id = parse(&event, &RoomVersionId::V10).event_id;

    event["event_id"] = json!(id.as_str());
    assert_eq!(parse(&event, &RoomVersionId::V10).event_id, id);

    event["event_id"] = json!("$not-the-hash");
    let err = parse_err(&event.to_string(), Some(&RoomVersionId::V10));
    assert!(
        err.starts_with("event id $not-the-hash given for room version 10 does not match"),
        "{err}"
    );
}

#[test]
fn v12_create_event_without_room_id_gives_the_room_id_from_its_hash() {
    let create = json!({
        "sender": "@alice:example.com",
        "type": "m.room.create",
        "state_key": "",
        "content": { "room_version": "12" },
        "prev_events": [],
        "auth_events": [],
        "depth": 1,
        "origin_server_ts": 1,
        "hashes": { "sha256": "aGFzaA" },
        "signatures": {},
    });
    // The room version comes from the content.
    let pdu = Pdu::from_json(&create.to_string(), None).unwrap();
    assert_eq!(pdu.room_version, RoomVersionId::V12);
    let id = expected_id(&create, &RoomVersionRules::V12);
    assert_eq!(pdu.event_id.as_str(), id);
    assert_eq!(pdu.room_id.as_str(), format!("!{}", &id[1..]));
    assert!(!pdu.has_room_id_in_json());

    // A v12 event that is not a create event needs its room_id.
    let mut message = message("12");
    message.as_object_mut().unwrap().remove("room_id");
    let err = parse_err(&message.to_string(), Some(&RoomVersionId::V12));
    assert_eq!(err, "missing field `room_id`");
}

#[test]
fn create_event_room_version_defaults_to_1() {
    let create = json!({
        "event_id": "$create:example.com",
        "room_id": "!room:example.com",
        "sender": "@alice:example.com",
        "type": "m.room.create",
        "state_key": "",
        "content": { "creator": "@alice:example.com" },
        "prev_events": [],
        "auth_events": [],
        "depth": 1,
        "origin_server_ts": 1,
    });
    let pdu = Pdu::from_json(&create.to_string(), None).unwrap();
    assert_eq!(pdu.room_version, RoomVersionId::V1);
    assert_eq!(pdu.event_id, "$create:example.com");

    let err = parse_err(&create.to_string(), Some(&RoomVersionId::V10));
    assert!(
        err.contains("room version 10 was given") && err.contains("says room version 1"),
        "{err}"
    );
}

#[test]
fn redacts_is_read_from_content_from_v11() {
    let mut redaction = message("11");
    redaction["type"] = json!("m.room.redaction");
    redaction["content"] = json!({ "redacts": "$target" });
    assert_eq!(
        parse(&redaction, &RoomVersionId::V11).redacts.unwrap(),
        "$target"
    );
    // Before v11 only the top-level field counts.
    assert_eq!(parse(&redaction, &RoomVersionId::V10).redacts, None);
    redaction["redacts"] = json!("$top");
    assert_eq!(
        parse(&redaction, &RoomVersionId::V10).redacts.unwrap(),
        "$top"
    );
}

#[test]
fn malformed_json_says_where() {
    let err = parse_err("{\"type\": }", Some(&RoomVersionId::V10));
    assert!(
        err.starts_with("not valid JSON at line 1 column 10: "),
        "{err}"
    );
    assert!(matches!(
        Pdu::from_json("{\"type\": }", None),
        Err(PduError::InvalidJson {
            line: 1,
            column: 10,
            ..
        })
    ));
    let err = parse_err("[1, 2]", Some(&RoomVersionId::V10));
    assert_eq!(err, "a PDU must be a JSON object, got an array");
}

#[test]
fn missing_and_invalid_fields_are_named() {
    let mut event = message("10");
    event.as_object_mut().unwrap().remove("sender");
    assert_eq!(
        parse_err(&event.to_string(), Some(&RoomVersionId::V10)),
        "missing field `sender`"
    );

    let mut event = message("10");
    event["sender"] = json!("alice");
    let err = parse_err(&event.to_string(), Some(&RoomVersionId::V10));
    assert!(err.starts_with("invalid field `sender`: "), "{err}");

    let mut event = message("10");
    event["depth"] = json!("7");
    let err = parse_err(&event.to_string(), Some(&RoomVersionId::V10));
    assert_eq!(
        err,
        "invalid field `depth`: expected an integer, got a string"
    );

    let mut event = message("10");
    event["content"]["amount"] = json!(1.5);
    let err = parse_err(&event.to_string(), Some(&RoomVersionId::V10));
    assert!(err.starts_with("not canonical JSON"), "{err}");
}

#[test]
fn room_version_is_required_and_must_be_known() {
    let err = parse_err(&message("10").to_string(), None);
    assert!(
        err.starts_with("the room version is needed to read a `m.room.message` event"),
        "{err}"
    );

    let create = json!({
        "sender": "@alice:example.com",
        "type": "m.room.create",
        "state_key": "",
        "content": { "room_version": "42" },
        "room_id": "!room:example.com",
        "prev_events": [],
        "auth_events": [],
        "depth": 1,
        "origin_server_ts": 1,
    });
    assert_eq!(
        parse_err(&create.to_string(), None),
        "unsupported room version 42"
    );
    let custom = RoomVersionId::try_from("org.example.custom").unwrap();
    assert_eq!(
        parse_err(&message("x").to_string(), Some(&custom)),
        "unsupported room version org.example.custom"
    );
}

#[test]
fn every_room_version_from_1_to_12_reads() {
    for v in 1..=12 {
        let version = RoomVersionId::try_from(v.to_string().as_str()).unwrap();
        let mut event = message(&v.to_string());
        if v <= 2 {
            event["event_id"] = json!("$e:example.com");
        }
        let pdu = parse(&event, &version);
        assert_eq!(pdu.room_version, version);
        if v >= 3 {
            assert_eq!(
                pdu.event_id.as_str(),
                expected_id(&event, &version.rules().unwrap())
            );
        }
    }
}

#[test]
fn stored_events_read_back_as_they_were_read() {
    // Read back from storage (by the fields alone, or as a create event or
    // a redaction through the whole tree of values), an event is what
    // reading it on arrival gave: every field, the content's text included.
    for v in 1..=12 {
        let version = RoomVersionId::try_from(v.to_string().as_str()).unwrap();
        let mut events = vec![message(&v.to_string())];
        let mut member = message(&v.to_string());
        member["type"] = json!("m.room.member");
        member["state_key"] = json!("@bob:example.com");
        member["content"] =
            json!({"membership": "join", "displayname": "B\"o\\b\n\u{e9}\u{1f600}"});
        events.push(member);
        let mut with_redacts = message(&v.to_string());
        with_redacts["redacts"] = json!("$other:example.com");
        events.push(with_redacts);
        let mut redaction = message(&v.to_string());
        redaction["type"] = json!("m.room.redaction");
        redaction["content"] = json!({"redacts": "$other:example.com"});
        redaction["redacts"] = json!("$other:example.com");
        events.push(redaction);
        let mut create = message(&v.to_string());
        create["type"] = json!("m.room.create");
        create["state_key"] = json!("");
        create["content"] = json!({"room_version": v.to_string()});
        create["prev_events"] = json!([]);
        create["auth_events"] = json!([]);
        events.push(create);
        if v <= 2 {
            for e in &mut events {
                e["event_id"] = json!("$e:example.com");
                e["prev_events"] = json!([["$prev:example.com", {"sha256": "aGFzaA"}]]);
                e["auth_events"] = json!([["$create:example.com", {"sha256": "aGFzaA"}]]);
            }
        }
        for event in &events {
            let read = Pdu::from_json(&event.to_string(), Some(&version)).unwrap();
            let stored =
                Pdu::from_stored_json(&read.json, &version, read.event_id.as_str()).unwrap();
            assert_eq!(
                format!("{stored:?}"),
                format!("{read:?}"),
                "version {v}, {}",
                event["type"]
            );
        }
    }
}
