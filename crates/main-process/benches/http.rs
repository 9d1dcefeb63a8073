//! `cargo xtask bench http`: events per second written through `POST
//! /_hs/v1/rooms/{room}/events` of a real `hs-main serve` (the release binary,
//! on loopback), on SQLite and PostgreSQL, with p50 and p99 of the requests'
//! latency:
//!
//! - one room, 1 event a request, one client (each request waits for the last);
//! - 8 rooms at once, 1 event a request, a client per room;
//! - one room, 100 events a request;
//! - one room, 1 event a request through `hs-worker` (which computes contexts
//!   itself and forwards them to the main process), PostgreSQL only: SQLite
//!   serves one process;
//! - on SQLite, the single-room case again with `sqlite.synchronous: full`
//!   (every commit synced before its answer): what that costs.
//!
//! Every room is `main_process::bench_room::linear_room` (room version 10,
//! every fifth event a state event: members joining, then admin state), each
//! case a fresh room so that nothing is already stored. The client shares this
//! machine's cores with the servers.
//!
//! `HS_BENCH_PROFILE=worker`: only PostgreSQL's single-room case and its
//! via-worker case, and their ratio (for alternated A/B runs and profiles of
//! the worker's path). `HS_BENCH_PROFILE=worker-interleaved`: the same two
//! cases with their requests taken in turn (one to the main process, one
//! through the worker, ...), each rate from its own requests' latencies, so
//! that a loaded machine's swings fall on both sides of the ratio alike.
//! `HS_BENCH_PROFILE=floors`: a single-event write against the floors below
//! it, with what each request costs the server, PostgreSQL and the client
//! (`floors`).

#[path = "http/floors.rs"]
mod floors;

use e2e_tests::{encode, free_port, main_process, main_process_with, worker, TOKEN};
use serde_json::Value;
use std::time::{Duration, Instant};
use storage_core::testing::TestDb;

/// Events posted one a request in the single-room cases.
const SINGLE: usize = 2_000;
/// Rooms (and clients) of the concurrent case, and events each posts.
const ROOMS: usize = 8;
const PER_ROOM: usize = 500;
/// Events of the batched case, and events a request.
const BATCHED: usize = 10_000;
const PER_REQUEST: usize = 100;
const MEMBERS: usize = 200;

/// Events per second and every request's latency.
struct Run {
    events: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    fn line(&mut self, what: &str) -> String {
        self.latencies.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let n = self.latencies.len();
        format!(
            "{what:<34} {:>7.0} events/s   p50 {:>6.2} ms   p99 {:>6.2} ms   ({} requests)",
            self.rate(),
            ms(self.latencies[n / 2]),
            ms(self.latencies[(n * 99 / 100).min(n - 1)]),
            n
        )
    }
}

/// A room's events as JSON values, in order: the founding events first.
fn room(name: &str, events: usize) -> (String, Vec<Value>) {
    let room_id = format!("!{name}:bench.test");
    let lines = main_process::bench_room::linear_room(&room_id, events, MEMBERS);
    let values = lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("a generated event"))
        .collect();
    (room_id, values)
}

/// A client posting to one room, each request after the answer to the last.
struct Poster {
    agent: ureq::Agent,
    target: String,
    auth: String,
}

impl Poster {
    fn new(url: &str, room: &str) -> Self {
        Poster {
            agent: ureq::Agent::new(),
            target: format!("{url}/_hs/v1/rooms/{}/events", encode(room)),
            auth: format!("Bearer {TOKEN}"),
        }
    }

    /// Posts `chunk`; returns the request's latency.
    fn post(&self, chunk: &[Value]) -> Duration {
        let start = Instant::now();
        let answer = self
            .agent
            .post(&self.target)
            .set("Authorization", &self.auth)
            .send_json(serde_json::json!({ "events": chunk }));
        match answer {
            Ok(a) => {
                a.into_string().expect("an answer body");
            }
            Err(ureq::Error::Status(code, a)) => {
                panic!("{code}: {}", a.into_string().unwrap_or_default())
            }
            Err(e) => panic!("posting to {}: {e}", self.target),
        }
        start.elapsed()
    }
}

/// Posts `events` to `room` on `url`, `per_request` at a time, each request
/// after the answer to the last; returns every request's latency.
fn post_all(url: &str, room: &str, events: &[Value], per_request: usize) -> Vec<Duration> {
    let poster = Poster::new(url, room);
    events
        .chunks(per_request)
        .map(|chunk| poster.post(chunk))
        .collect()
}

/// [`case`] with 1 event a request on each of `urls` at once, the requests
/// taken in turn; each run's rate is its events over the sum of its
/// requests' latencies.
fn interleaved(urls: &[&str], names: &[String], events: usize) -> Vec<Run> {
    let sides: Vec<(Poster, Vec<Value>)> = urls
        .iter()
        .zip(names)
        .map(|(url, name)| {
            let (room, values) = room(name, events + 4);
            let poster = Poster::new(url, &room);
            poster.post(&values[..4]);
            (poster, values)
        })
        .collect();
    let mut latencies = vec![Vec::with_capacity(events); sides.len()];
    for i in 4..events + 4 {
        for (side, (poster, values)) in sides.iter().enumerate() {
            latencies[side].push(poster.post(&values[i..=i]));
        }
    }
    latencies
        .into_iter()
        .map(|latencies| Run {
            events,
            elapsed: latencies.iter().sum(),
            latencies,
        })
        .collect()
}

/// Founds `room` (its first events, one request) then times posting the rest.
fn case(url: &str, name: &str, events: usize, per_request: usize) -> Run {
    let (room, values) = room(name, events + 4);
    post_all(url, &room, &values[..4], 4);
    let start = Instant::now();
    let latencies = post_all(url, &room, &values[4..], per_request);
    Run {
        events,
        elapsed: start.elapsed(),
        latencies,
    }
}

fn concurrent(url: &str, engine: &str) -> Run {
    let rooms: Vec<(String, Vec<Value>)> = (0..ROOMS)
        .map(|i| room(&format!("{engine}-many{i}"), PER_ROOM + 4))
        .collect();
    for (room, values) in &rooms {
        post_all(url, room, &values[..4], 4);
    }
    let start = Instant::now();
    let threads: Vec<_> = rooms
        .into_iter()
        .map(|(room, values)| {
            let url = url.to_owned();
            std::thread::spawn(move || post_all(&url, &room, &values[4..], 1))
        })
        .collect();
    let latencies = threads
        .into_iter()
        .flat_map(|t| t.join().expect("a client"))
        .collect();
    Run {
        events: ROOMS * PER_ROOM,
        elapsed: start.elapsed(),
        latencies,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    println!(
        "http: POST events to hs-main serve on loopback; rooms of room version 10, a state event in every five"
    );
    let profile = std::env::var("HS_BENCH_PROFILE").unwrap_or_default();
    let worker_only = profile.starts_with("worker");
    let dbs = match TestDb::for_bench("http") {
        dbs if worker_only => dbs
            .into_iter()
            .filter(|db| db.engine() == "postgres")
            .collect(),
        dbs => dbs,
    };
    for db in &dbs {
        if profile == "floors" {
            floors::run(db);
            continue;
        }
        let engine = db.engine();
        let main = main_process(db, free_port());
        if profile == "worker-interleaved" {
            let w = worker(db, &main.url, free_port(), "bench");
            let names = [format!("{engine}-one"), format!("{engine}-worker")];
            let mut runs = interleaved(&[&main.url, &w.url], &names, SINGLE);
            println!(
                "{}",
                runs[0].line(&format!("{engine} 1 event a request, 1 room"))
            );
            println!(
                "{}",
                runs[1].line(&format!("{engine} 1 event a request, via worker"))
            );
            println!(
                "{engine} worker / main (1 event a request, interleaved): {:.2}x",
                runs[1].rate() / runs[0].rate()
            );
            continue;
        }
        let mut single = case(&main.url, &format!("{engine}-one"), SINGLE, 1);
        println!(
            "{}",
            single.line(&format!("{engine} 1 event a request, 1 room"))
        );
        if !worker_only {
            other_cases(&main.url, engine);
        }
        // Opened read-only just to ask: a worker needs a database that more
        // than one process can use.
        let shared = db
            .open_mode(storage_core::OpenMode::ReadOnly)
            .engine()
            .supports_multiple_processes();
        if shared {
            let w = worker(db, &main.url, free_port(), "bench");
            let mut through = case(&w.url, &format!("{engine}-worker"), SINGLE, 1);
            println!(
                "{}",
                through.line(&format!("{engine} 1 event a request, via worker"))
            );
            println!(
                "{engine} worker / main (1 event a request): {:.2}x",
                through.rate() / single.rate()
            );
        } else {
            println!("{engine} via worker: skipped (a worker needs PostgreSQL)");
            if !worker_only {
                drop(main);
                synced(db, engine);
            }
        }
    }
}

/// SQLite's single-room case on a main process configured with
/// `sqlite.synchronous: full` (see docs/operations.md).
fn synced(db: &TestDb, engine: &str) {
    let Ok(storage_core::DatabaseUrl::Sqlite(path)) = storage_core::DatabaseUrl::parse(db.url())
    else {
        return;
    };
    let config = path.with_extension("full.yaml");
    std::fs::write(&config, "sqlite:\n  synchronous: full\n").expect("writing a config file");
    let main = main_process_with(
        db,
        free_port(),
        &["--config", config.to_str().expect("a UTF-8 path")],
    );
    let mut run = case(&main.url, &format!("{engine}-full"), SINGLE, 1);
    println!(
        "{}",
        run.line(&format!("{engine} 1 event a request, synchronous=full"))
    );
}

/// The concurrent and the batched case.
fn other_cases(url: &str, engine: &str) {
    let mut many = concurrent(url, engine);
    println!(
        "{}",
        many.line(&format!("{engine} 1 event a request, {ROOMS} rooms"))
    );
    let mut batched = case(url, &format!("{engine}-batched"), BATCHED, PER_REQUEST);
    println!(
        "{}",
        batched.line(&format!("{engine} {PER_REQUEST} events a request"))
    );
}
