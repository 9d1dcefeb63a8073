//! Generated rooms for benchmarks and tests, as JSON lines of PDUs (room
//! version 10, ids from reference hashes) that `hs-main import` accepts.
//!
//! - [`linear_room`]: the benchmark room: a linear DAG, every fifth event a
//!   state event (members joining while there are members left, then state
//!   set by the admin), messages in between.
//! - [`spam_join_room`]: thousands of distinct users joining and leaving on
//!   concurrent branches that a message then merges, so that state resolution
//!   makes a group from the two: the shape that makes compressors grow rooms.

use event_context::ruma::RoomVersionId;
use event_context::Pdu;
use serde_json::{json, Value};
use std::collections::HashMap;

/// Builds one room's events, keeping what later events cite.
#[derive(Debug)]
struct Builder {
    room_id: String,
    lines: Vec<String>,
    depths: HashMap<String, u64>,
    members: HashMap<String, String>,
    create: String,
    power_levels: String,
    join_rules: String,
    admin: String,
    ts: u64,
}

fn user(i: usize) -> String {
    format!("@u{i}:bench.test")
}

impl Builder {
    /// The room's create event, the admin's join, power levels and public join
    /// rules; returns the builder and the last event.
    fn new(room_id: &str) -> (Builder, String) {
        let admin = user(0);
        let mut b = Builder {
            room_id: room_id.to_owned(),
            lines: Vec::new(),
            depths: HashMap::new(),
            members: HashMap::new(),
            create: String::new(),
            power_levels: String::new(),
            join_rules: String::new(),
            admin: admin.clone(),
            ts: 1_700_000_000_000,
        };
        let create = b.event(
            "m.room.create",
            &admin,
            Some(""),
            json!({"creator": admin, "room_version": "10"}),
            &[],
            vec![],
        );
        b.create = create.clone();
        let join = b.event(
            "m.room.member",
            &admin,
            Some(&admin),
            json!({"membership": "join"}),
            std::slice::from_ref(&create),
            vec![create.clone()],
        );
        b.members.insert(admin.clone(), join.clone());
        let pl = b.event(
            "m.room.power_levels",
            &admin,
            Some(""),
            json!({"users": {&admin: 100}}),
            std::slice::from_ref(&join),
            vec![create.clone(), join.clone()],
        );
        b.power_levels = pl.clone();
        let jr = b.event(
            "m.room.join_rules",
            &admin,
            Some(""),
            json!({"join_rule": "public"}),
            std::slice::from_ref(&pl),
            vec![create.clone(), pl.clone(), join.clone()],
        );
        b.join_rules = jr.clone();
        (b, jr)
    }

    /// Adds an event after `prev`; returns its id.
    fn event(
        &mut self,
        kind: &str,
        sender: &str,
        state_key: Option<&str>,
        content: Value,
        prev: &[String],
        auth: Vec<String>,
    ) -> String {
        let depth = prev.iter().map(|p| self.depths[p]).max().unwrap_or(0) + 1;
        self.ts += 1;
        let mut event = json!({
            "room_id": self.room_id,
            "sender": sender,
            "type": kind,
            "content": content,
            "prev_events": prev,
            "auth_events": auth,
            "depth": depth,
            "origin_server_ts": self.ts,
            "origin": "bench.test",
            "hashes": {"sha256": "aGFzaA"},
            "signatures": {"bench.test": {"ed25519:1": "c2ln"}},
        });
        if let Some(k) = state_key {
            event["state_key"] = json!(k);
        }
        let line = event.to_string();
        let id = Pdu::from_json(&line, Some(&RoomVersionId::V10))
            .expect("generated events parse")
            .event_id
            .to_string();
        self.depths.insert(id.clone(), depth);
        self.lines.push(line);
        id
    }

    /// `u` joins (a public room) after `prev`.
    fn join(&mut self, u: &str, prev: &str) -> String {
        let auth = vec![
            self.create.clone(),
            self.power_levels.clone(),
            self.join_rules.clone(),
        ];
        let id = self.event(
            "m.room.member",
            u,
            Some(u),
            json!({"membership": "join"}),
            &[prev.to_owned()],
            auth,
        );
        self.members.insert(u.to_owned(), id.clone());
        id
    }

    /// `u`, a member, leaves after `prev`.
    fn leave(&mut self, u: &str, prev: &str) -> String {
        let auth = vec![
            self.create.clone(),
            self.power_levels.clone(),
            self.members[u].clone(),
        ];
        let id = self.event(
            "m.room.member",
            u,
            Some(u),
            json!({"membership": "leave"}),
            &[prev.to_owned()],
            auth,
        );
        self.members.insert(u.to_owned(), id.clone());
        id
    }

    /// A message from member `u` after `prev` (one or several events).
    fn message(&mut self, u: &str, body: String, prev: &[String]) -> String {
        let auth = vec![
            self.create.clone(),
            self.power_levels.clone(),
            self.members[u].clone(),
        ];
        self.event(
            "m.room.message",
            u,
            None,
            json!({"body": body, "msgtype": "m.text"}),
            prev,
            auth,
        )
    }
}

/// `events` events, `members` of whom join (every fifth event is a state
/// event: the next member's join while there are members left, then one of 20
/// keys of state set by the admin), messages from members in between.
pub fn linear_room(room_id: &str, events: usize, members: usize) -> Vec<String> {
    let (mut b, mut prev) = Builder::new(room_id);
    let mut joined = vec![b.admin.clone()];
    for n in 4..events {
        prev = if n % 5 == 0 && joined.len() < members {
            let u = user(joined.len());
            joined.push(u.clone());
            b.join(&u, &prev)
        } else if n % 5 == 0 {
            let auth = vec![
                b.create.clone(),
                b.power_levels.clone(),
                b.members[&b.admin].clone(),
            ];
            let admin = b.admin.clone();
            b.event(
                "org.example.bench",
                &admin,
                Some(&format!("k{}", n % 100)),
                json!({"n": n}),
                &[prev],
                auth,
            )
        } else {
            let u = joined[n * 7919 % joined.len()].clone();
            b.message(&u, format!("message {n}"), &[prev])
        };
    }
    b.lines
}

/// `users` distinct users each joining and then leaving, two at a time on two
/// concurrent branches from one event; a message from the admin merges the two
/// branches, so every round ends in a state group made by state resolution.
pub fn spam_join_room(room_id: &str, users: usize) -> Vec<String> {
    let (mut b, mut prev) = Builder::new(room_id);
    let admin = b.admin.clone();
    for round in 0..users / 2 {
        let (a, c) = (user(1 + 2 * round), user(2 + 2 * round));
        let left = b.join(&a, &prev);
        let left = b.leave(&a, &left);
        let right = b.join(&c, &prev);
        let right = b.leave(&c, &right);
        prev = b.message(&admin, format!("round {round}"), &[left, right]);
    }
    b.lines
}
