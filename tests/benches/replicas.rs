//! `cargo xtask bench replicas`: state reads per second served by the main
//! process alone and by the main process plus two workers, under the same load
//! from clients on loopback; and replication lag, from the main process
//! acknowledging a commit to a worker reporting that position, p50 and p99.
//! The client and every process share this machine's cores, so beside the rates
//! it reports the CPU each read costs the serving processes: what a core given
//! to one more worker would add.
//! Runs the release binaries as processes on the PostgreSQL of
//! `HS_TEST_POSTGRES_URL`.

use e2e_tests::*;
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage_core::testing::TestDb;

const CLIENTS: usize = 8;
const LOAD: Duration = Duration::from_secs(5);
const MEMBERS: usize = 200;

/// CPU seconds (user and system) a process has used so far, from /proc.
fn cpu_seconds(process: &Process) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", process.child.id()))
        .expect("/proc/PID/stat of a running process");
    // Fields after the command name, which is in parentheses and may hold spaces:
    // utime and stime are the 14th and 15th fields, in ticks of 1/100 s (USER_HZ).
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// Reads spread over `targets` from [`CLIENTS`] clients for [`LOAD`]: reads per
/// second, and microseconds of the serving processes' CPU per read.
fn load(processes: &[&Process], ids: &Arc<Vec<String>>) -> (f64, f64) {
    let cpu = || processes.iter().map(|p| cpu_seconds(p)).sum::<f64>();
    let cpu_before = cpu();
    let targets: Vec<String> = processes.iter().map(|p| p.url.clone()).collect();
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (targets, ids, done) = (targets.to_vec(), ids.clone(), done.clone());
            std::thread::spawn(move || {
                // One agent per client, so that connections are kept alive as a
                // real client's would be; the answer is read, not parsed, so
                // that the client costs the shared cores as little as it can.
                let agent = ureq::Agent::new();
                let auth = format!("Bearer {TOKEN}");
                let mut i = c * 7919;
                while start.elapsed() < LOAD {
                    let url = &targets[i % targets.len()];
                    let id = &ids[i * 31 % ids.len()];
                    let answer = agent
                        .get(&format!(
                            "{url}/_hs/v1/rooms/{}/state?at={}",
                            encode(ROOM),
                            encode(id)
                        ))
                        .set("Authorization", &auth)
                        .call()
                        .expect("state read");
                    let body = answer.into_string().expect("state body");
                    assert!(body.starts_with('{'), "{body}");
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let reads = done.load(Ordering::Relaxed) as f64;
    let elapsed = start.elapsed().as_secs_f64();
    ((reads / elapsed), (cpu() - cpu_before) * 1e6 / reads)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let Some(db) = TestDb::postgres() else {
        println!(
            "replicas: skipped, HS_TEST_POSTGRES_URL not set (use `cargo xtask bench replicas`)"
        );
        return;
    };
    let main = main_process(&db, free_port());
    let w1 = worker(&db, &main.url, free_port(), "w1");
    let w2 = worker(&db, &main.url, free_port(), "w2");

    // A room with MEMBERS members and as many topic changes, in batches of 50.
    let mut room = Room::default();
    let mut events = room.founding("");
    for i in 0..MEMBERS {
        events.push(room.join(i));
        events.push(room.event(
            &format!("topic{i}"),
            "m.room.topic",
            ALICE,
            Some(""),
            json!({"topic": i}),
        ));
    }
    let ids: Arc<Vec<String>> = Arc::new(
        events
            .iter()
            .map(|e| e["event_id"].as_str().unwrap().to_owned())
            .collect(),
    );
    for chunk in events.chunks(50) {
        post(&main.url, chunk.to_vec()).expect("building the room");
    }
    // Every process reads the state after every event once, so that each
    // measured phase starts from warm caches.
    for url in [&main.url, &w1.url, &w2.url] {
        for id in ids.iter() {
            get(
                url,
                &format!("/_hs/v1/rooms/{}/state?at={}", encode(ROOM), encode(id)),
            );
        }
    }
    println!(
        "replicas: {} events, {MEMBERS} members; {CLIENTS} clients on loopback for {} s each, GET state?at=",
        ids.len(),
        LOAD.as_secs()
    );
    let report = |what: &str, (rate, cpu): (f64, f64)| {
        println!(
            "{what:<20} {rate:>8.0} reads/s   {cpu:>5.0} us of server CPU a read ({:.0} reads/s per core)",
            1e6 / cpu
        );
        rate
    };
    let alone = report("main alone", load(&[&main], &ids));
    report("one worker alone", load(&[&w1], &ids));
    let spread = report("main + 2 workers", load(&[&main, &w1, &w2], &ids));
    println!(
        "spread / alone       {:.2}x (the client and all three processes share this machine's cores)",
        spread / alone
    );

    let mut lags = Vec::new();
    for i in 0..200 {
        let e = room.event(
            &format!("lag{i}"),
            "m.room.message",
            ALICE,
            None,
            json!({"body": i}),
        );
        let answer = post(&main.url, vec![e]).expect("posting");
        let acked = Instant::now();
        let position = answer["stream_ordering"].as_i64().unwrap();
        let url = if i % 2 == 0 { &w1.url } else { &w2.url };
        while get(url, "/_hs/v1/stream/position")["events"]
            .as_i64()
            .unwrap()
            < position
        {}
        lags.push(acked.elapsed());
    }
    lags.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "replication lag      p50 {:.2} ms   p99 {:.2} ms   (commit acknowledged by the main process to position reported by a worker, 200 events)",
        ms(lags[lags.len() / 2]),
        ms(lags[lags.len() * 99 / 100])
    );
}
