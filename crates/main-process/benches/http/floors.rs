//! `HS_BENCH_PROFILE=floors`: where the wall clock of a single-event write
//! goes, against the floors below it, on the same client and server:
//!
//! - `GET /_hs/v1/stream/position`: answered on the HTTP thread, no storage
//!   work: the HTTP round trip alone;
//! - `GET /_hs/v1/health`: that, a hop to a blocking thread and back, and
//!   one trivial statement (`SELECT 1`, a round trip to PostgreSQL);
//! - `POST .../events`, one event: the write.
//!
//! Each kind runs in rounds taken in turn (a loaded machine's swings fall on
//! all alike). Per request, besides the latency: the server's CPU time and
//! time waiting for a CPU, its voluntary context switches (wake-ups) summed
//! over its threads (`/proc/PID/task/*/schedstat` and `status`), the same
//! for the database's PostgreSQL backends (processes titled with its name),
//! and the client thread's CPU time.

use super::{room, Poster};
use e2e_tests::{free_port, main_process};
use std::time::{Duration, Instant};
use storage_core::testing::TestDb;

const ROUNDS: usize = 4;
const PER_ROUND: usize = 250;

/// CPU time, time runnable but waiting for a CPU, voluntary and involuntary
/// context switches: summed over some threads.
#[derive(Default, Clone, Copy)]
struct Usage {
    cpu_ns: u64,
    wait_ns: u64,
    voluntary: u64,
    involuntary: u64,
}

impl Usage {
    fn add(&mut self, other: Usage) {
        self.cpu_ns += other.cpu_ns;
        self.wait_ns += other.wait_ns;
        self.voluntary += other.voluntary;
        self.involuntary += other.involuntary;
    }

    fn since(self, before: Usage) -> Usage {
        Usage {
            cpu_ns: self.cpu_ns.saturating_sub(before.cpu_ns),
            wait_ns: self.wait_ns.saturating_sub(before.wait_ns),
            voluntary: self.voluntary.saturating_sub(before.voluntary),
            involuntary: self.involuntary.saturating_sub(before.involuntary),
        }
    }

    /// One thread's, from its `/proc/.../task/TID` (or `thread-self`) folder.
    fn of_thread(dir: &std::path::Path) -> Usage {
        let mut u = Usage::default();
        if let Ok(s) = std::fs::read_to_string(dir.join("schedstat")) {
            let mut fields = s.split_whitespace().map(|f| f.parse::<u64>().unwrap_or(0));
            u.cpu_ns = fields.next().unwrap_or(0);
            u.wait_ns = fields.next().unwrap_or(0);
        }
        if let Ok(s) = std::fs::read_to_string(dir.join("status")) {
            for line in s.lines() {
                let value = |l: &str| l.split_whitespace().nth(1).and_then(|v| v.parse().ok());
                if line.starts_with("voluntary_ctxt_switches") {
                    u.voluntary = value(line).unwrap_or(0);
                } else if line.starts_with("nonvoluntary_ctxt_switches") {
                    u.involuntary = value(line).unwrap_or(0);
                }
            }
        }
        u
    }

    /// Every thread of the processes `pids`.
    fn of_processes(pids: &[u32]) -> Usage {
        Usage::by_thread_name(pids)
            .values()
            .fold(Usage::default(), |mut total, u| {
                total.add(*u);
                total
            })
    }

    /// The threads of the processes `pids`, summed by thread name.
    fn by_thread_name(pids: &[u32]) -> std::collections::BTreeMap<String, Usage> {
        let mut named = std::collections::BTreeMap::<String, Usage>::new();
        for pid in pids {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for task in tasks.flatten() {
                let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
                named
                    .entry(name.trim().to_owned())
                    .or_default()
                    .add(Usage::of_thread(&task.path()));
            }
        }
        named
    }
}

/// The PostgreSQL backends serving database `name`: the processes whose
/// title (`postgres: USER DB ...`) names it.
fn backends_of(name: &str) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| {
            let pid: u32 = p.file_name().to_str()?.parse().ok()?;
            let title = std::fs::read_to_string(p.path().join("cmdline")).ok()?;
            let mut words = title.split_whitespace();
            (words.next() == Some("postgres:") && words.nth(1) == Some(name)).then_some(pid)
        })
        .collect()
}

/// The database's name in a PostgreSQL URL (`postgres://u@h/NAME?..`).
fn database_name(url: &str) -> Option<&str> {
    let path = url.strip_prefix("postgres://")?.split('?').next()?;
    path.rsplit('/').next()
}

/// What one kind of request cost over all its rounds.
struct Kind {
    name: &'static str,
    latencies: Vec<Duration>,
    server: Usage,
    backends: Usage,
    client: Usage,
}

impl Kind {
    fn new(name: &'static str) -> Self {
        Kind {
            name,
            latencies: Vec::new(),
            server: Usage::default(),
            backends: Usage::default(),
            client: Usage::default(),
        }
    }

    fn median_ms(&mut self) -> f64 {
        self.latencies.sort();
        self.latencies[self.latencies.len() / 2].as_secs_f64() * 1e3
    }

    fn line(&mut self, engine: &str) -> String {
        let median = self.median_ms();
        let n = self.latencies.len() as f64;
        let mean = self.latencies.iter().sum::<Duration>().as_secs_f64() * 1e3 / n;
        let us = |ns: u64| ns as f64 / n / 1e3;
        let per = |c: u64| c as f64 / n;
        format!(
            "{engine} {:<8} p50 {:.3} ms mean {:.3} ms | hs-main cpu {:.0} us, runnable {:.0} us, \
             wake-ups {:.2} (+{:.2} preempted) | backends cpu {:.0} us, wake-ups {:.2} | \
             client cpu {:.0} us",
            self.name,
            median,
            mean,
            us(self.server.cpu_ns),
            us(self.server.wait_ns),
            per(self.server.voluntary),
            per(self.server.involuntary),
            us(self.backends.cpu_ns),
            per(self.backends.voluntary),
            us(self.client.cpu_ns),
        )
    }
}

/// Runs the floors profile on `db`.
pub fn run(db: &TestDb) {
    let engine = db.engine();
    let main = main_process(db, free_port());
    let server = [main.child.id()];
    let backend_db = database_name(db.url()).map(str::to_owned);
    let (room_id, events) = room(&format!("{engine}-floors"), (ROUNDS + 1) * PER_ROUND + 4);
    let poster = Poster::new(&main.url, &room_id);
    poster.post(&events[..4]);
    let agent = ureq::Agent::new();
    let get = |path: &str| {
        let url = format!("{}{path}", main.url);
        let agent = agent.clone();
        move || {
            let start = Instant::now();
            agent
                .get(&url)
                .set("Authorization", &format!("Bearer {}", e2e_tests::TOKEN))
                .call()
                .unwrap_or_else(|e| panic!("GET {url}: {e}"))
                .into_string()
                .expect("an answer body");
            start.elapsed()
        }
    };
    let position = get("/_hs/v1/stream/position");
    let health = get("/_hs/v1/health");
    let mut kinds = [
        Kind::new("position"),
        Kind::new("health"),
        Kind::new("post"),
    ];
    let mut next_event = 4;
    for _ in 0..ROUNDS {
        for kind in &mut kinds {
            let backends = backend_db.as_deref().map(backends_of).unwrap_or_default();
            let client_dir = std::path::Path::new("/proc/thread-self");
            let before = (
                Usage::of_processes(&server),
                Usage::of_processes(&backends),
                Usage::of_thread(client_dir),
            );
            for _ in 0..PER_ROUND {
                let latency = match kind.name {
                    "position" => position(),
                    "health" => health(),
                    _ => {
                        next_event += 1;
                        poster.post(&events[next_event - 1..next_event])
                    }
                };
                kind.latencies.push(latency);
            }
            kind.server
                .add(Usage::of_processes(&server).since(before.0));
            kind.backends
                .add(Usage::of_processes(&backends).since(before.1));
            kind.client
                .add(Usage::of_thread(client_dir).since(before.2));
        }
    }
    for kind in &mut kinds {
        println!("{}", kind.line(engine));
    }
    // The server's threads by name, over a last round of writes.
    let before = Usage::by_thread_name(&server);
    let n = PER_ROUND.min(events.len() - next_event);
    for i in 0..n {
        poster.post(&events[next_event + i..next_event + i + 1]);
    }
    for (name, after) in Usage::by_thread_name(&server) {
        let u = after.since(before.get(&name).copied().unwrap_or_default());
        if u.cpu_ns > 0 {
            println!(
                "{engine}   post, hs-main thread {name:<16} cpu {:.0} us, wake-ups {:.2}",
                u.cpu_ns as f64 / n as f64 / 1e3,
                u.voluntary as f64 / n as f64
            );
        }
    }
    let [position, health, post] = &mut kinds;
    let (p, h, w) = (position.median_ms(), health.median_ms(), post.median_ms());
    println!(
        "{engine} split of a write's p50 {w:.3} ms: HTTP round trip {p:.3}, + blocking hop and \
         one trivial statement {:.3}, + the write's own work {:.3}",
        h - p,
        w - h
    );
}
