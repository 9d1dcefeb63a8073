//! Generated rooms for benchmarks and tests, as JSON lines of PDUs (room
//! version 10, ids from reference hashes) that `hs-main import` accepts.
//!
//! - [`linear_room`]: the benchmark room: a linear DAG, every fifth event a
//!   state event (members joining while there are members left, then state
//!   set by the admin), messages in between.
//! - [`spam_join_room`]: thousands of distinct users joining and leaving on
//!   concurrent branches that a message then merges, so that state resolution
//!   makes a group from the two: the shape that makes compressors grow rooms.
//! - [`forked_room`]: members joining one after another, then two forks where
//!   different members leave, and events merging the forks' tips: what state
//!   resolution is measured and tested on.
//!
//! Also what the benchmarks that import share: the benchmark room
//! ([`bench_room`]), writing a room file, and a timed import with its peak
//! memory. Compiled for tests and benchmarks only (the `testing` feature).

use event_context::ruma::RoomVersionId;
use event_context::Pdu;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The room of `cargo xtask bench persist` and `bench compress`: its id, its
/// events and its members (see [`bench_room`]).
pub const BENCH_ROOM: &str = "!bench:bench.test";
pub const BENCH_EVENTS: usize = 50_000;
pub const BENCH_MEMBERS: usize = 5_000;

/// The benchmark room: [`linear_room`] of [`BENCH_EVENTS`] events and
/// [`BENCH_MEMBERS`] members.
pub fn bench_room() -> Vec<String> {
    linear_room(BENCH_ROOM, BENCH_EVENTS, BENCH_MEMBERS)
}

/// Writes `lines` to a new file at `path`, one a line: what `hs-main import`
/// reads.
pub fn write_room_file(path: &Path, lines: &[String]) {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display())),
    );
    for l in lines {
        writeln!(f, "{l}").expect("writing a room file");
    }
    f.flush().expect("writing a room file");
}

/// This process's peak resident memory so far, in KiB (`VmHWM`); 0 where
/// /proc does not tell. It counts the file pages SQLite reads through its
/// memory map (the kernel's page cache, shared and reclaimable) as well as
/// the process's own memory: see [`AnonPeak`] for the latter alone.
pub fn peak_memory_kb() -> u64 {
    status_kb("VmHWM:")
}

/// A line of /proc/self/status in KiB; 0 where /proc does not tell.
fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The peak of this process's anonymous resident memory (`RssAnon`: heap,
/// stacks, caches; not mapped file pages) from [`AnonPeak::start`] to
/// [`AnonPeak::stop`], sampled every 5 ms on a thread of its own (a spike
/// shorter than that can be missed; reading the line costs ~20 us).
#[derive(Debug)]
pub struct AnonPeak {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sampler: std::thread::JoinHandle<u64>,
}

impl AnonPeak {
    pub fn start() -> AnonPeak {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let sampler = std::thread::spawn(move || {
            let mut peak = 0;
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(status_kb("RssAnon:"));
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            peak.max(status_kb("RssAnon:"))
        });
        AnonPeak { stop, sampler }
    }

    /// The peak seen, in KiB.
    pub fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.sampler.join().unwrap_or(0)
    }
}

/// Imports `files` into the database at `url` with `hs-main import`'s code, in
/// this process: the seconds it took and the peak memory after it (KiB). A
/// benchmark runs it in a child process of its own, so that the peak is the
/// import's.
pub fn timed_import(url: &str, files: &[PathBuf]) -> storage_core::Result<(f64, u64)> {
    let start = Instant::now();
    crate::import_cmd::run(url, files).map_err(|f| storage_core::Error::other(format!("{f:?}")))?;
    Ok((start.elapsed().as_secs_f64(), peak_memory_kb()))
}

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
    /// The room's create event, `admin`'s join, power levels and public join
    /// rules; returns the builder and the last event.
    fn new(room_id: &str, admin: String) -> (Builder, String) {
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
    let (mut b, mut prev) = Builder::new(room_id, user(0));
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
    let (mut b, mut prev) = Builder::new(room_id, user(0));
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

/// A room forked for state resolution: see [`forked_room`].
#[derive(Debug)]
pub struct ForkedRoom {
    /// The room up to both forks' tips, in order.
    pub lines: Vec<String>,
    /// Events merging the two tips, not in `lines`: each one's context resolves
    /// the forks.
    pub merges: Vec<String>,
    /// Each leave of both forks: the member and the leave event's id.
    pub leaves: Vec<(String, String)>,
    /// Events merging the tips of two short forks from the same point, not
    /// in `lines`: their groups share the chain below the fork (when it
    /// crosses no snapshot), as forks on a live server mostly do.
    pub short_merges: Vec<String>,
    /// Each leave of both short forks: the member and the leave event's id.
    pub short_leaves: Vec<(String, String)>,
}

/// A member of a room whose members come from many servers, as Matrix HQ's do.
fn member(i: usize) -> String {
    format!("@user{i}:server{}.example.org", i % 1_000)
}

/// `members` members (the admin first) join one after another; the room then
/// forks at the last join into two branches on each of which `leaves_per_fork`
/// different members leave, so that the forks disagree on
/// `2 * leaves_per_fork` state events; `merges` messages from the admin each
/// have both tips as prev events. Two short forks from the same point make
/// `short_leaves_per_fork` other members leave each, and as many messages
/// merge their tips. The admin, who creates the room, is
/// `@user0:server0.example.org`, so `room_id` must be on `server0.example.org`.
pub fn forked_room(
    room_id: &str,
    members: usize,
    (leaves_per_fork, short_leaves_per_fork): (usize, usize),
    merges: usize,
) -> ForkedRoom {
    assert!(
        2 * (leaves_per_fork + short_leaves_per_fork) < members,
        "{members} members cannot leave {leaves_per_fork} and {short_leaves_per_fork} times \
         on each of two forks"
    );
    assert!(
        room_id.ends_with(":server0.example.org"),
        "{room_id}: the room's creator is on server0.example.org, so must the room be"
    );
    let (mut b, mut prev) = Builder::new(room_id, member(0));
    for i in 1..members {
        prev = b.join(&member(i), &prev);
    }
    let fork = prev;
    let mut leaves = Vec::new();
    let mut tips = Vec::new();
    for f in 0..2 {
        let mut prev = fork.clone();
        for i in 0..leaves_per_fork {
            let u = member(1 + f * leaves_per_fork + i);
            prev = b.leave(&u, &prev);
            leaves.push((u, prev.clone()));
        }
        tips.push(prev);
    }
    let mut short_leaves = Vec::new();
    let mut short_tips = Vec::new();
    for f in 0..2 {
        let mut prev = fork.clone();
        for i in 0..short_leaves_per_fork {
            let u = member(1 + 2 * leaves_per_fork + f * short_leaves_per_fork + i);
            prev = b.leave(&u, &prev);
            short_leaves.push((u, prev.clone()));
        }
        short_tips.push(prev);
    }
    let imported = b.lines.len();
    let admin = b.admin.clone();
    for n in 0..merges {
        b.message(&admin, format!("merge {n}"), &tips);
    }
    if short_leaves_per_fork > 0 {
        for n in 0..merges {
            b.message(&admin, format!("short merge {n}"), &short_tips);
        }
    }
    let mut long_merges = b.lines.split_off(imported);
    let short_merges = long_merges.split_off(merges);
    ForkedRoom {
        lines: b.lines,
        merges: long_merges,
        leaves,
        short_merges,
        short_leaves,
    }
}
