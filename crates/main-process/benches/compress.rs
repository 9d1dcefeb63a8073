//! `cargo xtask bench compress`: `hs-main compress` on SQLite and PostgreSQL.
//!
//! - The benchmark room of `bench persist` (50,000 events, 5,000 members):
//!   rows of `state_groups_state` before and after (the goal: at most 5% of
//!   before; rust-synapse-compress-state leaves 6.3% on a room of this shape),
//!   the time against the time its import took, peak memory against the
//!   import's, and a cold full-state read of the room's newest group (fresh
//!   caches, median of 15) before and after: on a copy of the database taken
//!   before compressing and on the compressed one, in fresh processes, taking
//!   turns, so that the machine's drift falls on both alike.
//! - A room stored as pure deltas (60 groups, no snapshot): left alone.
//! - A spam-join room (2,000 users joining and leaving on forks that state
//!   resolution merges): never grows.
//!
//! Every import and every compression runs in a child process of its own, so
//! that peak memory is its own.

use main_process::bench_room::{
    bench_room, linear_room, peak_memory_kb, spam_join_room, timed_import, write_room_file,
    BENCH_EVENTS as EVENTS, BENCH_MEMBERS as MEMBERS, BENCH_ROOM as ROOM,
};
use std::process::Command;
use std::time::{Duration, Instant};
use storage_core::testing::TestDb;
use storage_core::{Database, DatabaseConfig, OpenMode, Result, StoreConfig};
use storage_events::EventsStore;
use storage_state::compress::CompressOptions;
use storage_state::{StateFilter, StateGroupAccess, StateStore};

const PURE: &str = "!pure:bench.test";
const SPAM: &str = "!spam:bench.test";
const COLD_READS: usize = 15;
/// Turns of cold reads, each on the copy from before compression and then on
/// the compressed database.
const READ_TURNS: usize = 9;

/// The newest group of `room`, and the median time of a full-state read of it
/// through a store with empty caches.
fn cold_read(db: &Database, room: &str) -> Result<(i64, Duration)> {
    let newest = storage_state::compress::highest_state_group_of_room(db, room)?;
    let mut times = Vec::with_capacity(COLD_READS);
    let mut size = 0;
    for _ in 0..COLD_READS {
        let store = StateStore::new(db.clone(), &StoreConfig::default())?;
        let start = Instant::now();
        let state = store.get_state_for_groups(&[newest], &StateFilter::all())?;
        times.push(start.elapsed());
        size = state[&newest].len();
    }
    assert!(size > 0);
    times.sort();
    Ok((newest, times[COLD_READS / 2]))
}

fn child_import(url: &str, files: &[String]) -> Result<()> {
    let files: Vec<std::path::PathBuf> = files.iter().map(Into::into).collect();
    let (secs, peak) = timed_import(url, &files)?;
    println!("RESULT {secs} {peak}");
    Ok(())
}

/// [`cold_read`] in the compressing process before the rewrite, and
/// [`read_after_rewrite`] right after it: functions of their own so that
/// `valgrind --tool=callgrind --toggle-collect='*read_before_rewrite*'
/// --toggle-collect='*read_after_rewrite*'` counts the instructions of each
/// (see docs/compress.md).
#[inline(never)]
fn read_before_rewrite(db: &Database, room: &str) -> Result<(i64, Duration)> {
    // Unlike its twin below, so that the linker does not fold the two into one.
    std::hint::black_box("before");
    cold_read(db, room)
}

#[inline(never)]
fn read_after_rewrite(db: &Database, room: &str) -> Result<(i64, Duration)> {
    std::hint::black_box("after");
    cold_read(db, room)
}

fn child_compress(url: &str, rooms: &[String]) -> Result<()> {
    let db = Database::open(DatabaseConfig::parse(url, OpenMode::Writer)?)?;
    let mut cold = Vec::new();
    for room in rooms {
        cold.push(read_before_rewrite(&db, room)?.1);
    }
    let events = EventsStore::new(db.clone(), &StoreConfig::default())?;
    let start = Instant::now();
    let reports = main_process::compress_cmd::compress_rooms(
        events.state(),
        Some(&events),
        rooms,
        &CompressOptions::default(),
        None,
        None,
    )?;
    let secs = start.elapsed().as_secs_f64();
    let peak = peak_memory_kb();
    for (room, before) in rooms.iter().zip(cold) {
        let r = reports.iter().find(|r| &r.room_id == room).unwrap();
        let (_, after) = read_after_rewrite(&db, room)?;
        println!(
            "ROOM {room} {} {} {} {} {} {:?} {} {} {}",
            r.rows_before,
            r.rows_after,
            r.groups,
            r.groups_rewritten,
            r.longest_chain,
            r.outcome,
            r.states_reread,
            before.as_secs_f64() * 1e3,
            after.as_secs_f64() * 1e3,
        );
    }
    println!("RESULT {secs} {peak}");
    Ok(())
}

/// Runs this benchmark as a child; returns its stdout lines.
fn child(args: &[&str]) -> Vec<String> {
    let out = Command::new(std::env::current_exe().unwrap())
        .arg("--child")
        .args(args)
        .output()
        .expect("running the bench child");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || !stdout.contains("RESULT ") {
        panic!(
            "child {args:?} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stdout.lines().map(str::to_owned).collect()
}

fn result(lines: &[String]) -> Vec<f64> {
    lines
        .iter()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap()
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Cold reads of `room`'s newest group on `before` and `after` in turns:
/// the medians of each side (ms) and the median of the turns' ratios.
fn cold_reads_in_turns(before: &TestDb, after: &TestDb, room: &str) -> (f64, f64, f64) {
    let (mut b, mut a, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..READ_TURNS {
        let rb = result(&child(&["read", before.url(), room]));
        let ra = result(&child(&["read", after.url(), room]));
        assert_eq!(rb[0], ra[0], "the newest group is the same on both");
        b.push(rb[1]);
        a.push(ra[1]);
        ratios.push(ra[1] / rb[1]);
    }
    (median(b), median(a), median(ratios))
}

fn rooms(lines: &[String]) -> Vec<Vec<String>> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("ROOM "))
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--child") {
        storage_core::logging::init();
        let outcome = match args[i + 1].as_str() {
            "import" => child_import(&args[i + 2], &args[i + 3..]),
            "read" => {
                Database::open(DatabaseConfig::parse(&args[i + 2], OpenMode::ReadOnly).unwrap())
                    .and_then(|db| cold_read(&db, &args[i + 3]))
                    .map(|(g, t)| println!("RESULT {g} {}", t.as_secs_f64() * 1e3))
            }
            _ => child_compress(&args[i + 2], &args[i + 3..]),
        };
        if let Err(e) = outcome {
            eprintln!("bench child failed: {e:?}");
            std::process::exit(1);
        }
        return;
    }
    let dir = std::env::temp_dir().join(format!("hs-bench-compress-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let big = dir.join("room.jsonl");
    let small = dir.join("small.jsonl");
    write_room_file(&big, &bench_room());
    let mut lines = linear_room(PURE, 300, 60);
    lines.extend(spam_join_room(SPAM, 2_000));
    write_room_file(&small, &lines);
    if std::env::var_os("HS_BENCH_ONLY_GENERATE").is_some() {
        println!("room files in {}", dir.display());
        return;
    }
    println!(
        "compress: the bench room ({EVENTS} events, {MEMBERS} members), a pure-delta room, \
         a spam-join room (2,000 users on merged forks)"
    );
    for big_db in &TestDb::for_bench("compress") {
        let small_db = big_db.fresh();
        let engine = big_db.engine();
        let import = result(&child(&["import", big_db.url(), big.to_str().unwrap()]));
        let before_db = big_db.copy();
        let out = child(&["compress", big_db.url(), ROOM]);
        let (compress, room) = (result(&out), rooms(&out).remove(0));
        let (before, after): (f64, f64) = (room[1].parse().unwrap(), room[2].parse().unwrap());
        println!(
            "{engine:<9} bench room: rows {before:.0} -> {after:.0} ({:.2}%), {} of {} groups \
             rewritten, longest new chain {}",
            after * 100.0 / before,
            room[4],
            room[3],
            room[5],
        );
        println!(
            "          time {:.1} s (import {:.1} s: {:.0}%), peak memory {:.0} MiB (import {:.0} MiB)",
            compress[0],
            import[0],
            compress[0] * 100.0 / import[0],
            compress[1] / 1024.0,
            import[1] / 1024.0,
        );
        // Both sides copied the same way, after the process that wrote them
        // has exited.
        let after_db = big_db.copy();
        let (read_before, read_after, ratio) = cold_reads_in_turns(&before_db, &after_db, ROOM);
        drop((before_db, after_db));
        println!(
            "          cold full-state read of the newest group: {read_before:.2} ms before, \
             {read_after:.2} ms after (after/before {ratio:.2}, median of {READ_TURNS} turns \
             on copies, fresh processes); in the compressing process, right before and after \
             the rewrite: {:.2} ms, {:.2} ms; states read again: {}",
            room[8].parse::<f64>().unwrap(),
            room[9].parse::<f64>().unwrap(),
            room[7]
        );
        child(&["import", small_db.url(), small.to_str().unwrap()]);
        let out = child(&["compress", small_db.url(), PURE, SPAM]);
        for room in rooms(&out) {
            let (before, after): (u64, u64) = (room[1].parse().unwrap(), room[2].parse().unwrap());
            println!(
                "          {}: rows {before} -> {after} ({:+} rows), {} groups, {}",
                room[0],
                after as i64 - before as i64,
                room[3],
                room[6]
            );
            assert!(after <= before, "{} grew", room[0]);
        }
    }
    if std::env::var_os("HS_BENCH_KEEP").is_some() {
        println!("room files kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(dir);
    }
}
