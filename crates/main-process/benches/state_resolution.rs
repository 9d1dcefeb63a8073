//! Part of `cargo xtask bench state`: state resolution at Matrix HQ's size.
//!
//! A room of 30,661 joined members (room version 10) forks at its last join;
//! each fork makes 848 members leave (different ones), so the two forks disagree
//! on 1,696 state events (Synapse took ~400 ms over such a conflict, its issue
//! 2910). Everything is imported through `hs-main import`'s code; then an event
//! whose prev events are the two fork tips gets its context from
//! `ContextBuilder::compute_event_context` with fresh (cold) caches: what the
//! two groups disagree on read from the database (each fork's tip sits on a
//! snapshot of its own: the forks are compared from where they meet, through
//! the snapshots' origins), resolved with ruma, the result stored as a delta
//! on one tip. On SQLite and (with
//! `HS_TEST_POSTGRES_URL`) PostgreSQL.
//!
//! For profiling on SQLite: `HS_BENCH_DB=FILE` keeps the imported room in FILE
//! (copied there on the first run, reused by later ones), and with
//! `HS_BENCH_PROFILE=merge` the run only computes the contexts of the three
//! merges, `HS_BENCH_ITERATIONS` times over (default once), nothing else.
//! Each merge stores its resolved group in FILE, so FILE is not the same
//! database after a run: give each binary compared its own copy of a fresh
//! FILE, or their counts differ for that reason alone (by up to half, seen).

use diesel::RunQueryDsl;
use event_context::ruma::RoomVersionId;
use event_context::{ContextBuilder, Pdu, PendingEvents};
use main_process::bench_room::{forked_room, write_room_file, ForkedRoom};
use std::time::{Duration, Instant};
use storage_core::testing::TestDb;
use storage_core::{Conn, Database, DatabaseConfig, OpenMode, StoreConfig};
use storage_events::EventsStore;
use storage_state::{NoOrigins, StateFilter, StateGroupAccess, StateStore, StoredOrigins};

/// Matrix HQ's joined members; `HS_BENCH_RESOLUTION_MEMBERS` shrinks the room
/// (and the forks, to a tenth of it at most) for quicker runs while working.
/// The figures to report are those of the full size.
const HQ_MEMBERS: usize = 30_661;
const HQ_LEAVES_PER_FORK: usize = 848;
/// Leaves on each of two short forks from the same point, whose groups share
/// the chain below it: a fork as a live server mostly sees.
const SHORT_LEAVES_PER_FORK: usize = 20;

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

/// Imports the room into `t`, or with `HS_BENCH_DB=FILE` (SQLite) opens the
/// copy an earlier run kept in FILE (and keeps one there when there is none).
fn imported(t: &TestDb, file: &std::path::Path, room: &ForkedRoom) -> Database {
    let e = t.engine();
    let kept = std::env::var("HS_BENCH_DB").ok().filter(|_| e == "sqlite");
    let url = match &kept {
        Some(kept) if std::path::Path::new(kept).exists() => format!("sqlite:{kept}"),
        _ => {
            let started = Instant::now();
            main_process::import_cmd::run(t.url(), &[file.to_path_buf()]).expect("import");
            println!(
                "{e:<9} imported {} events in {:.1} s",
                room.lines.len(),
                started.elapsed().as_secs_f64()
            );
            if let (Some(kept), Conn::Sqlite(c)) = (&kept, &mut t.raw_connection()) {
                diesel::sql_query(format!("VACUUM INTO '{kept}'"))
                    .execute(c)
                    .expect("keeping the imported room");
            }
            t.url().to_owned()
        }
    };
    Database::open(DatabaseConfig::parse(&url, OpenMode::Writer).expect("url")).expect("open")
}

fn run(t: &TestDb, file: &std::path::Path, room: &ForkedRoom, members: usize) {
    let e = t.engine();
    let db = imported(t, file, room);
    let config = StoreConfig::default();
    let profiling = std::env::var("HS_BENCH_PROFILE").is_ok_and(|p| p == "merge");
    let runs: usize = match std::env::var("HS_BENCH_ITERATIONS") {
        Ok(n) if profiling => n.parse().expect("HS_BENCH_ITERATIONS: a count"),
        _ => 1,
    };
    let mut samples: Vec<Duration> = Vec::new();
    let mut by_conflict = 0;
    for line in std::iter::repeat_n(&room.merges, runs).flatten() {
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
        by_conflict += builder.resolutions_by_conflict();
        let before = context.state_group_before.expect("a resolved group");
        let state = builder
            .state()
            .get_state_for_groups(&[before], &StateFilter::all())
            .expect("resolved state");
        assert!(
            state[&before].len() >= members + 2,
            "the resolved state holds the room"
        );
    }
    samples.sort();
    println!(
        "{e:<9} compute_event_context over the two forks ({} conflicted), cold caches: \
         median {:8.1} ms, min {:8.1} ms ({} runs, {by_conflict} resolved by the conflict)",
        room.leaves.len(),
        samples[samples.len() / 2].as_secs_f64() * 1e3,
        samples[0].as_secs_f64() * 1e3,
        samples.len()
    );
    if profiling {
        return;
    }
    alternated(&db, &room.merges, room.leaves.len(), "long forks");
    alternated(
        &db,
        &room.short_merges,
        room.short_leaves.len(),
        "short forks",
    );
    differences_by_origins(&db, &room.merges);

    // The same two groups resolved over their whole states, every event of
    // both loaded (what a resolution whose conflict is not enough falls back
    // to, and what every resolution did before): once, from cold caches.
    let pdu = Pdu::from_json(&room.merges[0], Some(&RoomVersionId::V10)).expect("merge event");
    let builder = ContextBuilder::new(
        EventsStore::new(db.clone(), &config).expect("store"),
        &config,
    );
    let groups = tip_groups(&builder, &pdu);
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

/// The groups of the merge event's prev events (the forks' tips), in order.
fn tip_groups(builder: &ContextBuilder, merge: &Pdu) -> Vec<i64> {
    let tips: Vec<&str> = merge.prev_events.iter().map(|id| id.as_str()).collect();
    let mut groups: Vec<i64> = builder
        .state()
        .get_state_group_for_events(&tips)
        .expect("the tips' groups")
        .into_values()
        .collect();
    groups.sort();
    groups
}

/// The groups on the chain of `group`, itself included.
fn chain(builder: &ContextBuilder, group: i64) -> Vec<i64> {
    let mut out = vec![group];
    while let Some((prev, _)) = builder
        .state()
        .get_state_group_delta(*out.last().expect("a group"))
        .expect("a group's delta")
    {
        out.push(prev);
    }
    out
}

/// The merges in `merges`: each context from cold caches (what the groups
/// disagree on read as such), against the resolution that reads both whole
/// states first (what a context did before; nothing stored), alternately.
/// `what` names the forks; says whether the tips' groups share a chain.
fn alternated(db: &Database, merges: &[String], conflicted: usize, what: &str) {
    let config = StoreConfig::default();
    let fresh = || {
        ContextBuilder::new(
            EventsStore::new(db.clone(), &config).expect("store"),
            &config,
        )
    };
    let e = db.engine().name();
    let (mut by_differences, mut whole_states) = (Vec::new(), Vec::new());
    let mut shared = true;
    for line in merges {
        let pdu = Pdu::from_json(line, Some(&RoomVersionId::V10)).expect("merge event");
        let builder = fresh();
        let groups = tip_groups(&builder, &pdu);
        let below: std::collections::HashSet<i64> =
            chain(&builder, groups[0]).into_iter().collect();
        shared &= chain(&builder, groups[1]).iter().any(|g| below.contains(g));

        let builder = fresh();
        let start = Instant::now();
        builder
            .resolve_state_of_groups(
                ROOM,
                &RoomVersionId::V10,
                &groups,
                &PendingEvents::default(),
            )
            .expect("resolution over the whole states read");
        whole_states.push(start.elapsed());

        let builder = fresh();
        let start = Instant::now();
        builder
            .compute_event_context(&pdu, false, &PendingEvents::default())
            .expect("context of the merge");
        by_differences.push(start.elapsed());
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e3
    };
    println!(
        "{e:<9} {what} ({conflicted} conflicted, tips sharing a chain: {shared}), cold caches: \
         compute_event_context median {:8.1} ms; resolving over both whole states read \
         (no group stored) median {:8.1} ms ({} runs each, alternated)",
        median(&mut by_differences),
        median(&mut whole_states),
        merges.len()
    );
}

/// What the HQ forks' tips disagree on, read from cold caches through the
/// snapshots' origins (what a context reads: one statement per snapshot
/// crossed, [`StoredOrigins`]) against comparing the snapshots the tips'
/// chains end in by their rows ([`NoOrigins`]: on PostgreSQL the server
/// compares them), alternately, twice per merge; both must agree.
fn differences_by_origins(db: &Database, merges: &[String]) {
    let config = StoreConfig::default();
    let fresh = || StateStore::new(db.clone(), &config).expect("store");
    let e = db.engine().name();
    let (mut by_origins, mut by_rows) = (Vec::new(), Vec::new());
    let mut followed = 0;
    for line in merges.iter().chain(merges) {
        let pdu = Pdu::from_json(line, Some(&RoomVersionId::V10)).expect("merge event");
        let builder = ContextBuilder::new(
            EventsStore::new(db.clone(), &config).expect("store"),
            &config,
        );
        let groups = tip_groups(&builder, &pdu);
        let origins = StoredOrigins::default();
        let start = Instant::now();
        let through = fresh()
            .get_state_differences(&groups, &origins)
            .expect("differences through the origins");
        by_origins.push(start.elapsed());
        followed = origins.followed();
        let start = Instant::now();
        let compared = fresh()
            .get_state_differences(&groups, &NoOrigins)
            .expect("differences of the snapshots' rows");
        by_rows.push(start.elapsed());
        assert!(through == compared, "both ways find the same differences");
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e3
    };
    println!(
        "{e:<9} what the long forks' tips disagree on, cold caches: through {followed} \
         snapshots' origins median {:8.1} ms; the snapshots compared by their rows median \
         {:8.1} ms ({} runs each, alternated)",
        median(&mut by_origins),
        median(&mut by_rows),
        by_rows.len()
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let (members, leaves) = size();
    let short = SHORT_LEAVES_PER_FORK.min(members / 20);
    let room = forked_room(ROOM, members, (leaves, short), 3);
    let dir = std::env::temp_dir().join(format!("hs-bench-resolution-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary folder");
    let file = dir.join("room.jsonl");
    write_room_file(&file, &room.lines);
    println!(
        "state resolution: {members} members, two forks of {leaves} leaves each, \
         merged by one event; two short forks of {short} leaves each, merged too"
    );
    for db in &TestDb::for_bench("state") {
        run(db, &file, &room, members);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
