//! `cargo xtask bench persist`: import of a generated room (50,000 events,
//! 5,000 members, a state event in every five) into SQLite and PostgreSQL,
//! events per second, next to the floor: the same rows written by plain batched
//! INSERTs (1,000 rows a transaction) in the same run; and the peak memory of
//! the importing process: its peak resident size (VmHWM, which counts the
//! database file pages SQLite maps) and its anonymous peak (RssAnon, sampled:
//! the process's own memory). Each engine runs in a child process of its own, so
//! that its peak memory is its own.

use main_process::bench_room::{
    bench_room, timed_import, write_room_file, AnonPeak, BENCH_EVENTS as EVENTS,
    BENCH_MEMBERS as MEMBERS,
};
use main_process::port::tables::*;
use std::process::Command;
use std::time::{Duration, Instant};
use storage_core::testing::TestDb;
use storage_core::{Database, DatabaseConfig, OpenMode, Result};

/// Writes table `T`'s rows from `src` into `dst` with plain batched INSERTs;
/// only the writing is timed.
fn floor<T: PortTable>(src: &Database, dst: &Database) -> Result<(usize, Duration)> {
    let rows = src.with_connection(|_, c| match T::next_keys(c, None, i64::MAX)?.last() {
        Some(last) => T::load(c, None, last),
        None => Ok(Vec::new()),
    })?;
    let start = Instant::now();
    for chunk in rows.chunks(1_000) {
        dst.run_interaction("floor_insert", |txn| T::insert(txn.conn(), chunk))?;
    }
    Ok((rows.len(), start.elapsed()))
}

fn child(import_url: &str, floor_url: &str, file: &str) -> Result<()> {
    storage_core::logging::init();
    let anon = AnonPeak::start();
    let (import_secs, peak) = timed_import(import_url, &[file.into()])?;
    let anon_peak = anon.stop();
    let src = Database::open(DatabaseConfig::parse(import_url, OpenMode::ReadOnly)?)?;
    let dst = Database::open(DatabaseConfig::parse(floor_url, OpenMode::Writer)?)?;
    let mut rows = 0;
    let mut secs = 0.0;
    for (n, d) in [
        floor::<Rooms>(&src, &dst)?,
        floor::<Events>(&src, &dst)?,
        floor::<EventJson>(&src, &dst)?,
        floor::<EventEdges>(&src, &dst)?,
        floor::<EventAuth>(&src, &dst)?,
        floor::<ForwardExtremities>(&src, &dst)?,
        floor::<StateGroups>(&src, &dst)?,
        floor::<StateGroupEdges>(&src, &dst)?,
        floor::<StateGroupsState>(&src, &dst)?,
        floor::<EventToStateGroups>(&src, &dst)?,
        floor::<CurrentStateEvents>(&src, &dst)?,
    ] {
        rows += n;
        secs += d.as_secs_f64();
    }
    println!("RESULT {import_secs} {rows} {secs} {peak} {anon_peak}");
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--child") {
        if let Err(e) = child(&args[i + 1], &args[i + 2], &args[i + 3]) {
            eprintln!("bench child failed: {e:?}");
            std::process::exit(1);
        }
        return;
    }
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!("hs-bench-persist-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("room.jsonl");
    write_room_file(&file, &bench_room());
    println!(
        "persist: {EVENTS} events ({} state), {MEMBERS} members, room version 10, generated in {:.1} s",
        EVENTS / 5 + 3,
        started.elapsed().as_secs_f64()
    );
    println!("engine    import events/s   floor events/s (batched INSERT of the same rows)   import/floor   peak memory (VmHWM)   anonymous peak (RssAnon)");
    for import_db in &TestDb::for_bench("persist") {
        let floor_db = import_db.fresh();
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--child",
                import_db.url(),
                floor_db.url(),
                file.to_str().unwrap(),
            ])
            .output()
            .expect("running the bench child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let Some(result) = stdout.lines().find(|l| l.starts_with("RESULT ")) else {
            panic!(
                "{} child failed:\n{stdout}\n{}",
                import_db.engine(),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let summary = stdout
            .lines()
            .find(|l| l.starts_with("imported"))
            .unwrap_or("");
        let v: Vec<f64> = result
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap())
            .collect();
        let (import_secs, rows, floor_secs, peak_kb, anon_kb) = (v[0], v[1], v[2], v[3], v[4]);
        let import_eps = EVENTS as f64 / import_secs;
        let floor_eps = EVENTS as f64 / floor_secs;
        println!(
            "{:<9} {:>15.0}   {:>15.0} ({rows:.0} rows in {floor_secs:.1} s)                 {:>8.2}x   {:>7.0} MiB           {:>7.0} MiB",
            import_db.engine(),
            import_eps,
            floor_eps,
            import_eps / floor_eps,
            peak_kb / 1024.0,
            anon_kb / 1024.0
        );
        println!("          hs-main import said: {summary}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let logged: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.contains("applied migration"))
            .collect();
        if !logged.is_empty() {
            println!("          {} log lines, e.g. {}", logged.len(), logged[0]);
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}
