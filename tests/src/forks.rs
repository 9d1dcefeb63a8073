//! Rooms that fork and merge: a generator of valid but adversarial room DAGs
//! for the write-path tests.
//!
//! Each room starts like any other (create, the creator's join, power levels,
//! public join rules, two more joins), then grows by random steps on random
//! branches: forks, merges of two branches (so state resolution runs, often
//! over power-level changes made on one side and state set on the other, which
//! resets state), messages, state events by members who may lack the power to
//! send them (rejected), joins, leaves, bans, and state sent by strangers
//! (rejected). Rooms are interleaved line by line, each in an order where every
//! prev and auth event comes first. Room version 2 keeps event ids in the JSON,
//! so events can name each other without computing reference hashes.
//!
//! Deterministic for a seed, so a failure can be replayed.

use serde_json::{json, Value};
use std::collections::BTreeMap;

/// splitmix64: a seedable, deterministic source of choices (tests only need
/// repeatability, not quality).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
}

type Slot = (String, String);

/// One line of development of a room: the events it ends in and the state it
/// believes it has (the latest event per slot seen on the way; after a merge,
/// the union, later events winning: close to what resolution gives, and the
/// auth events chosen from it are valid events either way).
#[derive(Debug, Clone)]
struct Branch {
    tips: Vec<String>,
    depth: i64,
    state: BTreeMap<Slot, (usize, String)>,
}

#[derive(Debug)]
struct RoomGen {
    room_id: String,
    tag: String,
    creator: String,
    next: usize,
    branches: Vec<Branch>,
    events: Vec<Value>,
}

const SERVER: &str = "example.com";

impl RoomGen {
    fn new(index: usize) -> Self {
        let tag = format!("r{index}");
        RoomGen {
            room_id: format!("!{tag}:{SERVER}"),
            creator: format!("@alice:{SERVER}"),
            tag,
            next: 0,
            branches: vec![Branch {
                tips: vec![],
                depth: 0,
                state: BTreeMap::new(),
            }],
            events: vec![],
        }
    }

    /// Adds an event on branch `b` (after all its tips) and moves the branch on.
    fn add(&mut self, b: usize, kind: &str, sender: &str, state_key: Option<&str>, content: Value) {
        self.next += 1;
        let id = format!("${}-{}:{SERVER}", self.tag, self.next);
        let branch = &self.branches[b];
        let get = |t: &str, k: &str| {
            branch
                .state
                .get(&(t.to_owned(), k.to_owned()))
                .map(|(_, id)| id.clone())
        };
        let mut auth: Vec<String> = Vec::new();
        if kind != "m.room.create" {
            auth.extend(get("m.room.create", ""));
            auth.extend(get("m.room.power_levels", ""));
            auth.extend(get("m.room.member", sender));
            if kind == "m.room.member" {
                if let Some(target) = state_key {
                    if target != sender {
                        auth.extend(get("m.room.member", target));
                    }
                }
                if content["membership"] == "join" {
                    auth.extend(get("m.room.join_rules", ""));
                }
            }
        }
        auth.dedup();
        let refs = |ids: &[String]| -> Vec<Value> {
            ids.iter()
                .map(|i| json!([i, {"sha256": "aGFzaA"}]))
                .collect()
        };
        let depth = branch.depth + 1;
        let mut event = json!({
            "event_id": id, "room_id": self.room_id, "sender": sender, "type": kind,
            "content": content, "prev_events": refs(&branch.tips), "auth_events": refs(&auth),
            "depth": depth, "origin_server_ts": 1_700_000_000_000i64 + self.next as i64,
            "origin": SERVER, "hashes": {"sha256": "aGFzaA"}, "signatures": {},
        });
        if let Some(k) = state_key {
            event["state_key"] = json!(k);
        }
        let n = self.next;
        let branch = &mut self.branches[b];
        branch.tips = vec![id.clone()];
        branch.depth = depth;
        if let Some(k) = state_key {
            branch
                .state
                .insert((kind.to_owned(), k.to_owned()), (n, id));
        }
        self.events.push(event);
    }

    fn members(&self, b: usize) -> Vec<String> {
        self.branches[b]
            .state
            .iter()
            .filter(|((t, _), _)| t == "m.room.member")
            .map(|((_, k), _)| k.clone())
            .collect()
    }

    fn preamble(&mut self) {
        let alice = self.creator.clone();
        self.add(
            0,
            "m.room.create",
            &alice,
            Some(""),
            json!({"creator": alice, "room_version": "2"}),
        );
        self.add(
            0,
            "m.room.member",
            &alice,
            Some(&alice),
            json!({"membership": "join"}),
        );
        self.add(
            0,
            "m.room.power_levels",
            &alice,
            Some(""),
            json!({"users": {alice.clone(): 100}, "users_default": 0, "state_default": 50,
                   "events_default": 0, "ban": 50, "kick": 50}),
        );
        self.add(
            0,
            "m.room.join_rules",
            &alice,
            Some(""),
            json!({"join_rule": "public"}),
        );
        for name in ["bob", "carol"] {
            let user = format!("@{name}:{SERVER}");
            self.add(
                0,
                "m.room.member",
                &user,
                Some(&user),
                json!({"membership": "join"}),
            );
        }
    }

    fn step(&mut self, rng: &mut Rng) {
        let b = rng.below(self.branches.len());
        let members = self.members(b);
        let anyone = members[rng.below(members.len())].clone();
        let alice = self.creator.clone();
        match rng.below(100) {
            // Fork: a second branch from the same point.
            0..=14 if self.branches.len() < 4 => {
                let copy = self.branches[b].clone();
                self.branches.push(copy);
            }
            // Merge two branches with the next event (a message or a state event).
            15..=29 if self.branches.len() > 1 => {
                let other = (b + 1 + rng.below(self.branches.len() - 1)) % self.branches.len();
                let gone = self.branches.remove(other.max(b));
                let keep = other.min(b);
                let branch = &mut self.branches[keep];
                for tip in gone.tips {
                    if !branch.tips.contains(&tip) {
                        branch.tips.push(tip);
                    }
                }
                branch.depth = branch.depth.max(gone.depth);
                for (slot, (n, id)) in gone.state {
                    let mine = branch.state.entry(slot).or_insert((n, id.clone()));
                    if n > mine.0 {
                        *mine = (n, id);
                    }
                }
                if rng.chance(50) {
                    self.add(
                        keep,
                        "m.room.message",
                        &alice,
                        None,
                        json!({"body": "merge"}),
                    );
                } else {
                    let n = self.next;
                    self.add(
                        keep,
                        "m.room.topic",
                        &alice,
                        Some(""),
                        json!({"topic": format!("merge {n}")}),
                    );
                }
            }
            // State that needs power 50: members without it are rejected.
            30..=49 => {
                let n = self.next;
                let kind = if rng.chance(50) {
                    "m.room.topic"
                } else {
                    "m.room.name"
                };
                let field = if kind == "m.room.topic" {
                    "topic"
                } else {
                    "name"
                };
                self.add(
                    b,
                    kind,
                    &anyone,
                    Some(""),
                    json!({ field: format!("{anyone} {n}") }),
                );
            }
            // Power changes on one branch: resolution against the other resets state.
            50..=59 => {
                let target = members[rng.below(members.len())].clone();
                let level = [0, 50, 100][rng.below(3)];
                let mut users = serde_json::Map::new();
                users.insert(alice.clone(), json!(100));
                if target != alice {
                    users.insert(target, json!(level));
                }
                self.add(
                    b,
                    "m.room.power_levels",
                    &alice,
                    Some(""),
                    json!({"users": users, "users_default": 0, "state_default": 50,
                           "events_default": 0, "ban": 50, "kick": 50}),
                );
            }
            // Someone new joins.
            60..=69 => {
                let n = self.next;
                let user = format!("@u{n}-{}:{SERVER}", self.tag);
                self.add(
                    b,
                    "m.room.member",
                    &user,
                    Some(&user),
                    json!({"membership": "join"}),
                );
            }
            // A member leaves, or is banned by someone who may or may not have the power.
            70..=77 if members.len() > 2 => {
                let target = members[rng.below(members.len())].clone();
                if target == alice {
                    self.add(b, "m.room.message", &alice, None, json!({"body": "stay"}));
                } else if rng.chance(50) {
                    self.add(
                        b,
                        "m.room.member",
                        &target,
                        Some(&target),
                        json!({"membership": "leave"}),
                    );
                } else {
                    self.add(
                        b,
                        "m.room.member",
                        &anyone,
                        Some(&target),
                        json!({"membership": "ban"}),
                    );
                }
            }
            // A stranger sends state: rejected.
            78..=81 => {
                let stranger = format!("@stranger:{SERVER}");
                self.add(
                    b,
                    "m.room.name",
                    &stranger,
                    Some(""),
                    json!({"name": "spam"}),
                );
            }
            _ => {
                let n = self.next;
                self.add(
                    b,
                    "m.room.message",
                    &anyone,
                    None,
                    json!({"body": format!("m{n}")}),
                );
            }
        }
    }
}

/// `rooms` rooms of `events_per_room` events each (at least the preamble),
/// interleaved at random, every event after the events it names.
pub fn fork_heavy_rooms(seed: u64, rooms: usize, events_per_room: usize) -> Vec<Value> {
    let mut rng = Rng::new(seed);
    let mut gens: Vec<RoomGen> = (0..rooms).map(RoomGen::new).collect();
    for g in &mut gens {
        g.preamble();
        while g.events.len() < events_per_room {
            g.step(&mut rng);
        }
    }
    let mut queues: Vec<std::collections::VecDeque<Value>> =
        gens.into_iter().map(|g| g.events.into()).collect();
    let mut out = Vec::new();
    while queues.iter().any(|q| !q.is_empty()) {
        let live: Vec<usize> = (0..queues.len())
            .filter(|i| !queues[*i].is_empty())
            .collect();
        let pick = live[rng.below(live.len())];
        // A few events of the same room at a time, so batches hold runs of a room.
        for _ in 0..=rng.below(4) {
            if let Some(e) = queues[pick].pop_front() {
                out.push(e);
            }
        }
    }
    out
}

/// The room id of a generated event.
pub fn room_of(event: &Value) -> &str {
    event["room_id"]
        .as_str()
        .expect("generated events have a room")
}
