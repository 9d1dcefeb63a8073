//! Test helpers: events written as federation JSON for any room version, and a room that
//! grows one event at a time with auth events chosen from its current state.
#![allow(dead_code)]

use std::{collections::HashMap, sync::Arc};

use event_context::{
    auth_types_for_event,
    ruma::{EventId, OwnedEventId, RoomVersionId, UserId},
    Pdu, StateKey, StateMap,
};
use serde_json::{json, Value};

pub const ALICE: &str = "@alice:example.com";
pub const BOB: &str = "@bob:example.com";
pub const CHARLIE: &str = "@charlie:example.com";
pub const EVELYN: &str = "@evelyn:example.com";
pub const ZARA: &str = "@zara:example.com";
pub const ROOM_ID: &str = "!test:example.com";

/// An event before it is placed in a DAG: what Synapse's tests call a `FakeEvent`.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Name of the node; the event id for room versions 1 and 2 is `$<node>:example.com`.
    pub node: String,
    pub sender: String,
    pub kind: String,
    pub state_key: Option<String>,
    pub content: Value,
}

pub fn spec(node: &str, sender: &str, kind: &str, state_key: Option<&str>, content: Value) -> Spec {
    Spec {
        node: node.to_owned(),
        sender: sender.to_owned(),
        kind: kind.to_owned(),
        state_key: state_key.map(str::to_owned),
        content,
    }
}

pub fn create(node: &str, sender: &str, version: &RoomVersionId) -> Spec {
    let mut content = json!({ "room_version": version.as_str() });
    if version
        .rules()
        .unwrap()
        .authorization
        .use_room_create_sender
    {
        // Room versions 11 and later take the creator from the sender.
    } else {
        content["creator"] = json!(sender);
    }
    spec(node, sender, "m.room.create", Some(""), content)
}

pub fn member(node: &str, sender: &str, target: &str, membership: &str) -> Spec {
    spec(
        node,
        sender,
        "m.room.member",
        Some(target),
        json!({ "membership": membership }),
    )
}

/// Where an event goes: room, parents, auth events, depth and timestamp.
#[derive(Debug, Clone)]
pub struct Place<'a> {
    pub version: &'a RoomVersionId,
    /// `None` only for a version 12 create event.
    pub room_id: Option<&'a str>,
    pub prev: &'a [OwnedEventId],
    pub auth: &'a [OwnedEventId],
    pub depth: i64,
    pub ts: i64,
}

impl Spec {
    /// The event's federation JSON, in the format of `place.version`.
    pub fn to_json(&self, place: &Place<'_>) -> String {
        let old_format = matches!(place.version, RoomVersionId::V1 | RoomVersionId::V2);
        let refs = |ids: &[OwnedEventId]| -> Value {
            if old_format {
                ids.iter()
                    .map(|id| json!([id, { "sha256": "aGFzaA" }]))
                    .collect()
            } else {
                ids.iter().map(|id| json!(id)).collect()
            }
        };
        let mut event = json!({
            "sender": self.sender,
            "type": self.kind,
            "content": self.content,
            "prev_events": refs(place.prev),
            "auth_events": refs(place.auth),
            "depth": place.depth,
            "origin_server_ts": place.ts,
            "origin": "example.com",
            "hashes": { "sha256": "aGFzaA" },
            "signatures": { "example.com": { "ed25519:1": "c2ln" } },
        });
        if let Some(room_id) = place.room_id {
            event["room_id"] = json!(room_id);
        }
        if let Some(state_key) = &self.state_key {
            event["state_key"] = json!(state_key);
        }
        if old_format {
            event["event_id"] = json!(format!("${}:example.com", self.node));
        }
        event.to_string()
    }

    pub fn to_pdu(&self, place: &Place<'_>) -> Pdu {
        Pdu::from_json(&self.to_json(place), Some(place.version))
            .unwrap_or_else(|e| panic!("event {} does not parse: {e}", self.node))
    }

    /// The state keys of the auth events of this event.
    pub fn auth_types(&self, version: &RoomVersionId) -> Vec<StateKey> {
        let content = serde_json::value::to_raw_value(&self.content).unwrap();
        let sender = <&UserId>::try_from(self.sender.as_str()).unwrap();
        auth_types_for_event(
            version,
            &self.kind,
            sender,
            self.state_key.as_deref(),
            &content,
        )
        .unwrap()
    }
}

/// A room that grows linearly: each event follows the previous one, its auth events taken
/// from the current state.
#[derive(Debug)]
pub struct Room {
    pub version: RoomVersionId,
    pub room_id: Option<String>,
    pub events: HashMap<OwnedEventId, Arc<Pdu>>,
    pub by_node: HashMap<String, Arc<Pdu>>,
    pub state: StateMap,
    pub last: Option<OwnedEventId>,
    pub ts: i64,
}

impl Room {
    /// A room with its create event sent by `creator`.
    pub fn new(version: RoomVersionId, creator: &str) -> Room {
        let mut room = Room {
            room_id: Some(ROOM_ID.to_owned()),
            version,
            events: HashMap::new(),
            by_node: HashMap::new(),
            state: StateMap::new(),
            last: None,
            ts: 0,
        };
        if room
            .version
            .rules()
            .unwrap()
            .authorization
            .room_create_event_id_as_room_id
        {
            room.room_id = None;
        }
        let create = create("CREATE", creator, &room.version.clone());
        let pdu = room.add(&create);
        room.room_id = Some(pdu.room_id.to_string());
        room
    }

    /// The event `spec` would be if sent now, without adding it to the room.
    pub fn build(&mut self, spec: &Spec) -> Pdu {
        let auth: Vec<OwnedEventId> = spec
            .auth_types(&self.version)
            .iter()
            .filter_map(|k| self.state.get(k).cloned())
            .collect();
        let prev: Vec<OwnedEventId> = self.last.iter().cloned().collect();
        let depth = prev
            .iter()
            .map(|id| self.events[id].depth)
            .max()
            .unwrap_or(0)
            + 1;
        self.ts += 1;
        spec.to_pdu(&Place {
            version: &self.version,
            room_id: self.room_id.as_deref(),
            prev: &prev,
            auth: &auth,
            depth,
            ts: self.ts,
        })
    }

    /// Builds the event and adds it to the room and its state.
    pub fn add(&mut self, spec: &Spec) -> Arc<Pdu> {
        let pdu = Arc::new(self.build(spec));
        if let Some(key) = pdu.state_map_key() {
            self.state.insert(key, pdu.event_id.clone());
        }
        self.last = Some(pdu.event_id.clone());
        self.events.insert(pdu.event_id.clone(), pdu.clone());
        self.by_node.insert(spec.node.clone(), pdu.clone());
        pdu
    }

    pub fn id(&self, node: &str) -> OwnedEventId {
        self.by_node[node].event_id.clone()
    }

    pub fn fetch(&self) -> impl Fn(&EventId) -> Option<Arc<Pdu>> + '_ {
        |id| self.events.get(id).cloned()
    }
}
