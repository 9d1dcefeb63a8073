//! Part of `cargo xtask bench state`: state resolution at Matrix HQ's size.
//!
//! A room of 30,661 joined members (room version 10) forks at its last join;
//! each fork makes 848 members leave (different ones), so the two forks disagree
//! on 1,696 state events (Synapse took ~400 ms over such a conflict, its issue
//! 2910). Everything is imported through `hs-main import`'s code; then an event
//! whose prev events are the two fork tips gets its context from
//! `ContextBuilder::compute_event_context` with fresh (cold) caches: both groups'
//! full state read, resolved with ruma, the result stored as a group. On SQLite
//! and (with `HS_TEST_POSTGRES_URL`) PostgreSQL.

use event_context::ruma::RoomVersionId;
use event_context::{ContextBuilder, Pdu, PendingEvents};
use serde_json::json;
use std::io::Write;
use std::time::{Duration, Instant};
use storage_core::testing::TestDb;
use storage_core::{Database, DatabaseConfig, OpenMode, StoreConfig};
use storage_events::EventsStore;
use storage_state::{StateFilter, StateGroupAccess};

/// Matrix HQ's joined members; `HS_BENCH_RESOLUTION_MEMBERS` shrinks the room
/// (and the forks, to a tenth of it at most) for quicker runs while working.
/// The figures to report are those of the full size.
const HQ_MEMBERS: usize = 30_661;
const HQ_LEAVES_PER_FORK: usize = 848;

/// The room's members and each fork's leaves.
fn size() -> (usize, usize) {
    let members = std::env::var("HS_BENCH_RESOLUTION_MEMBERS")
        .ok()
        .map(|v| {
            v.parse::<usize>()
                .ok()
                .filter(|n| *n >= 30)
                .unwrap_or_else(|| {
                    panic!("HS_BENCH_RESOLUTION_MEMBERS={v:?}: want a count of at least 30")
                })
        })
        .unwrap_or(HQ_MEMBERS);
    (members, HQ_LEAVES_PER_FORK.min(members / 10))
}
const ROOM: &str = "!hq:server0.example.org";

struct Room {
    lines: Vec<String>,
    /// The event merging the two forks (not imported).
    merge: Vec<String>,
    members: usize,
    /// State events the two forks disagree on.
    conflicted: usize,
}

/// One event as a JSON line, with its id (room version 10: from the reference hash).
fn event(
    kind: &str,
    sender: &str,
    state_key: Option<&str>,
    content: serde_json::Value,
    prev: &[&str],
    auth: &[&str],
    depth: usize,
) -> (String, String) {
    let mut e = json!({
        "room_id": ROOM,
        "sender": sender,
        "type": kind,
        "content": content,
        "prev_events": prev,
        "auth_events": auth,
        "depth": depth,
        "origin_server_ts": 1_700_000_000_000u64 + depth as u64,
        "origin": "bench.test",
        "hashes": {"sha256": "aGFzaA"},
        "signatures": {"bench.test": {"ed25519:1": "c2ln"}},
    });
    if let Some(k) = state_key {
        e["state_key"] = json!(k);
    }
    let line = e.to_string();
    let pdu = Pdu::from_json(&line, Some(&RoomVersionId::V10)).expect("generated events parse");
    (line, pdu.event_id.to_string())
}

fn user(i: usize) -> String {
    format!("@user{i}:server{}.example.org", i % 1_000)
}

fn generate(merges: usize, members: usize, leaves_per_fork: usize) -> Room {
    let admin = user(0);
    let mut lines = Vec::new();
    let mut depth = 1;
    let push = |lines: &mut Vec<String>, (line, id): (String, String)| {
        lines.push(line);
        id
    };
    let create = push(
        &mut lines,
        event(
            "m.room.create",
            &admin,
            Some(""),
            json!({"creator": admin, "room_version": "10"}),
            &[],
            &[],
            depth,
        ),
    );
    depth += 1;
    let admin_join = push(
        &mut lines,
        event(
            "m.room.member",
            &admin,
            Some(&admin),
            json!({"membership": "join"}),
            &[&create],
            &[&create],
            depth,
        ),
    );
    depth += 1;
    let pl = push(
        &mut lines,
        event(
            "m.room.power_levels",
            &admin,
            Some(""),
            json!({"users": {&admin: 100}}),
            &[&admin_join],
            &[&create, &admin_join],
            depth,
        ),
    );
    depth += 1;
    let jr = push(
        &mut lines,
        event(
            "m.room.join_rules",
            &admin,
            Some(""),
            json!({"join_rule": "public"}),
            &[&pl],
            &[&create, &pl, &admin_join],
            depth,
        ),
    );
    let mut prev = jr.clone();
    let mut joins = vec![admin_join.clone()];
    for i in 1..members {
        depth += 1;
        let u = user(i);
        prev = push(
            &mut lines,
            event(
                "m.room.member",
                &u,
                Some(&u),
                json!({"membership": "join"}),
                &[&prev],
                &[&create, &pl, &jr],
                depth,
            ),
        );
        joins.push(prev.clone());
    }
    let fork = prev;
    let fork_depth = depth;
    let mut tips = Vec::new();
    for f in 0..2 {
        let mut prev = fork.clone();
        let mut depth = fork_depth;
        for i in 0..leaves_per_fork {
            let m = 1 + f * leaves_per_fork + i;
            let u = user(m);
            depth += 1;
            prev = push(
                &mut lines,
                event(
                    "m.room.member",
                    &u,
                    Some(&u),
                    json!({"membership": "leave"}),
                    &[&prev],
                    &[&create, &pl, &joins[m]],
                    depth,
                ),
            );
        }
        tips.push(prev);
    }
    let merge = (0..merges)
        .map(|n| {
            event(
                "m.room.message",
                &admin,
                None,
                json!({"body": format!("merge {n}"), "msgtype": "m.text"}),
                &[&tips[0], &tips[1]],
                &[&create, &pl, &admin_join],
                fork_depth + leaves_per_fork + 1,
            )
            .0
        })
        .collect();
    Room {
        lines,
        merge,
        members,
        conflicted: 2 * leaves_per_fork,
    }
}

fn run(t: &TestDb, file: &std::path::Path, room: &Room) {
    let e = t.engine();
    let started = Instant::now();
    main_process::import_cmd::run(t.url(), &[file.to_path_buf()]).expect("import");
    println!(
        "{e:<9} imported {} events in {:.1} s",
        room.lines.len(),
        started.elapsed().as_secs_f64()
    );
    let config = StoreConfig::default();
    let db = Database::open(DatabaseConfig::parse(t.url(), OpenMode::Writer).expect("url"))
        .expect("open");
    let mut samples: Vec<Duration> = Vec::new();
    for line in &room.merge {
        let pdu = Pdu::from_json(line, Some(&RoomVersionId::V10)).expect("merge event");
        // Fresh stores: every cache cold.
        let builder = ContextBuilder::new(
            EventsStore::new(db.clone(), &config).expect("store"),
            &config,
        );
        let start = Instant::now();
        let context = builder
            .compute_event_context(&pdu, false, &PendingEvents::default())
            .expect("context of the merge");
        samples.push(start.elapsed());
        let before = context.state_group_before.expect("a resolved group");
        let state = builder
            .state()
            .get_state_for_groups(&[before], &StateFilter::all())
            .expect("resolved state");
        assert!(
            state[&before].len() >= room.members + 2,
            "the resolved state holds the room"
        );
    }
    samples.sort();
    println!(
        "{e:<9} compute_event_context over the two forks ({} conflicted), cold caches: \
         median {:8.1} ms, min {:8.1} ms ({} runs)",
        room.conflicted,
        samples[samples.len() / 2].as_secs_f64() * 1e3,
        samples[0].as_secs_f64() * 1e3,
        samples.len()
    );

    // The same two groups resolved over their whole states, every event of
    // both loaded (what a resolution whose conflict is not enough falls back
    // to, and what every resolution did before): once, from cold caches.
    let pdu = Pdu::from_json(&room.merge[0], Some(&RoomVersionId::V10)).expect("merge event");
    let builder = ContextBuilder::new(
        EventsStore::new(db.clone(), &config).expect("store"),
        &config,
    );
    let tips: Vec<&str> = pdu.prev_events.iter().map(|id| id.as_str()).collect();
    let mut groups: Vec<i64> = builder
        .state()
        .get_state_group_for_events(&tips)
        .expect("the tips' groups")
        .into_values()
        .collect();
    groups.sort();
    let start = Instant::now();
    let whole = builder
        .resolve_whole_states_of_groups(
            ROOM,
            &RoomVersionId::V10,
            &groups,
            &PendingEvents::default(),
        )
        .expect("resolution over whole states");
    let took = start.elapsed();
    let (by_conflict, _) = builder
        .resolve_state_of_groups(
            ROOM,
            &RoomVersionId::V10,
            &groups,
            &PendingEvents::default(),
        )
        .expect("resolution by the conflict");
    assert!(whole == by_conflict, "both ways resolve alike");
    println!(
        "{e:<9} the same resolution over the whole states (all {} events loaded), cold caches: \
         {:8.1} ms (1 run)",
        room.lines.len(),
        took.as_secs_f64() * 1e3
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let (members, leaves) = size();
    let room = generate(3, members, leaves);
    let dir = std::env::temp_dir().join(format!("hs-bench-resolution-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary folder");
    let file = dir.join("room.jsonl");
    let mut f = std::fs::File::create(&file).expect("room file");
    for l in &room.lines {
        writeln!(f, "{l}").expect("writing the room");
    }
    drop(f);
    println!(
        "state resolution: {members} members, two forks of {leaves} leaves each, \
         merged by one event"
    );
    run(&TestDb::sqlite(), &file, &room);
    match TestDb::postgres() {
        Some(db) => run(&db, &file, &room),
        None => println!(
            "postgres  skipped: HS_TEST_POSTGRES_URL not set (use `cargo xtask bench state`)"
        ),
    }
    let _ = std::fs::remove_dir_all(&dir);
}
