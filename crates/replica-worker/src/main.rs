//! `hs-worker --database URL --main URL [--listen ADDR] [--name NAME]`: a replica
//! worker. It serves the same read API as the main process from its slaved
//! stores, follows the replication stream to keep their caches right, and for
//! posted events computes the contexts itself (state resolution, new state
//! groups prepared with ids from the shared sequence) and hands events,
//! contexts and prepared groups to the main process, which writes them in the
//! events' batch without recomputing.

use clap::{ArgAction, Parser};
use event_context::{ContextBuilder, EventContext, Pdu};
use http_api::settings::{LogFormat, Overrides, Settings};
use http_api::wire::{ContextedEvent, WriteOutcome};
use http_api::{self as http, ApiState, EventWriter};
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use storage_core::{Database, Error, ErrorKind, LogContext, OpenMode};
use storage_slaved::SlavedStore;

#[derive(Debug, Parser)]
#[command(
    name = "hs-worker",
    version,
    about = "Matrix room-state storage engine: replica worker",
    long_about = "Matrix room-state storage engine: replica worker. Serves the same \
                  read API as `hs-main serve` from the main process's PostgreSQL \
                  database, follows its replication stream, and forwards writes \
                  (with their contexts computed here) to the main process.",
    after_help = "HTTP API: docs/http.md. Configuration file: docs/configuration.md \
                  (the `worker:` section). Running workers: docs/operator-guide.md."
)]
struct Cli {
    /// A configuration file (YAML; see docs/configuration.md; relative paths
    /// in it are relative to its folder), or a Synapse homeserver.yaml, of
    /// which only the database (`database:`, else `database_path`) is read.
    /// Flags and environment variables win over it.
    #[arg(long, env = "HS_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// The main process's PostgreSQL database: `postgres://...` or libpq
    /// keywords (`host=/run/postgresql dbname=hs user=hs`). Required here or
    /// in the configuration file.
    #[arg(long, env = "HS_DATABASE", hide_env_values = true)]
    database: Option<String>,
    /// The main process's HTTP API, e.g. http://127.0.0.1:8008 (config
    /// `worker.main`). Required here or in the configuration file.
    #[arg(long, value_name = "URL")]
    main: Option<String>,
    /// Address to listen on (config `worker.listen`; default 127.0.0.1:8009).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// This worker's name, in logs and metrics (config `worker.name`; default
    /// `worker`).
    #[arg(long)]
    name: Option<String>,
    /// Log more: -v for debug, -vv for trace (over RUST_LOG and log.filter).
    #[arg(short, long, action = ArgAction::Count)]
    verbose: u8,
    /// Log less: -q for warnings and errors only, -qq for errors only.
    #[arg(short, long, action = ArgAction::Count, conflicts_with = "verbose")]
    quiet: u8,
    /// Log lines as text, or as one JSON object a line (for log shippers).
    /// Default: the configuration's `log.format`, else text.
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
}

/// Computes contexts here, persists through the main process.
struct ForwardingWriter {
    builder: ContextBuilder,
    main: String,
    token: Option<String>,
    /// Keeps connections to the main process alive between requests (ureq's
    /// pool): a forwarded write then costs no TCP handshake.
    agent: ureq::Agent,
    /// Told of each write being forwarded and of its commit, so that its
    /// notification is looked for at once and not taken for another
    /// process's.
    replication: SlavedStore,
}

impl EventWriter for ForwardingWriter {
    fn write(&self, room_id: &str, pdus: Vec<String>) -> Result<WriteOutcome, Error> {
        let events = event_context::contexts_for(&self.builder, room_id, &pdus)?;
        let forwarding = self.replication.forwarding();
        let outcome = self.forward(room_id, &events);
        match &outcome {
            Ok(outcome) => {
                let position = outcome.stream_ordering;
                // Answered once applied here, so that the client reads its write
                // back from this worker: by this thread when nothing below it is
                // missing (then the wait returns at once), else by the following
                // thread, in order. A worker that cannot follow the stream for
                // that long is unhealthy, and the write is committed anyway.
                let applied_here = outcome
                    .replication
                    .as_ref()
                    .is_some_and(|r| self.replication.apply_own_commit(r.first, &r.notification));
                if applied_here {
                    forwarding.applied_here(position);
                } else {
                    forwarding.committed_at(position);
                }
                if !self
                    .replication
                    .wait_until_applied(position, storage_slaved::STALE_AFTER)
                {
                    log::warn!(
                        "answering a write committed at stream position {position} before this \
                         worker applied it (still at {} after {:?}): a read here may not show it yet",
                        self.replication.position(),
                        storage_slaved::STALE_AFTER
                    );
                }
                let skipped = outcome.skipped.iter().map(String::as_str).collect();
                self.builder.remember_written_elsewhere(&events, &skipped);
            }
            // Not written, or not known to be: the groups prepared for them are
            // read from the database if they were.
            Err(_) => self
                .builder
                .state()
                .forget_prepared_groups(events.iter().flat_map(|(_, c)| &c.new_state_groups)),
        }
        outcome
    }
}

impl ForwardingWriter {
    /// Hands `events` with their contexts to the main process and waits for
    /// its answer (given once they are committed).
    fn forward(
        &self,
        room_id: &str,
        events: &[(Pdu, EventContext)],
    ) -> Result<WriteOutcome, Error> {
        /// The request's body, serialized straight to its text (a `json!`
        /// value would first build a tree of every field).
        #[derive(serde::Serialize)]
        struct Body {
            events: Vec<ContextedEvent>,
        }
        let body = Body {
            events: events
                .iter()
                .map(|(p, c)| ContextedEvent::new(p, c))
                .collect(),
        };
        let url = format!(
            "{}/_hs/v1/internal/rooms/{}/events",
            self.main.trim_end_matches('/'),
            storage_core::config::percent_encode(room_id)
        );
        let mut request = self.agent.post(&url);
        if let Some(t) = &self.token {
            request = request.set("Authorization", &format!("Bearer {t}"));
        }
        match request.send_json(body) {
            Ok(response) => read_answer(response),
            Err(ureq::Error::Status(code, response)) => {
                // The main process's verdict on the request keeps its kind, so the
                // client sees the same 4xx it would have seen from the main process.
                let text = response.into_string().unwrap_or_default();
                let message = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(str::to_owned))
                    .unwrap_or(text);
                let message = format!("the main process answered {code}: {message}");
                Err(match code {
                    404 => Error::not_found(message),
                    400..=499 => Error::invalid_argument(message),
                    503 => Error::unavailable(message),
                    507 => Error::new(ErrorKind::OutOfSpace(message)),
                    _ => Error::other(message),
                })
            }
            // Not connected, or the connection dropped before an answer: the
            // events may or may not have been committed. Either way a retry is
            // safe, since events already stored are skipped.
            Err(e) => Err(Error::unavailable(format!(
                "reaching the main process at {url}: {e}; retry the request (stored events are skipped)"
            ))),
        }
    }
}

/// The main process's answer to a forwarded write, read whole and then parsed
/// in memory: parsed from the stream (ureq's `into_json`), every byte went
/// through ureq's readers one call at a time.
fn read_answer(response: ureq::Response) -> Result<WriteOutcome, Error> {
    let unreadable = |e: String| Error::other(format!("reading the main process's answer: {e}"));
    let mut answer = Vec::new();
    response
        .into_reader()
        .read_to_end(&mut answer)
        .map_err(|e| unreadable(e.to_string()))?;
    serde_json::from_slice(&answer).map_err(|e| unreadable(e.to_string()))
}

/// `--main` must be a plain-HTTP URL (the main process's API, on loopback or
/// a private network); whether it answers yet is only worth a warning, since
/// the main process may start after its workers.
fn check_main(main: &str) -> Result<(), Error> {
    if !main.starts_with("http://") {
        return Err(Error::invalid_argument(format!(
            "--main {main:?}: give the main process's API as an http:// URL, e.g. http://127.0.0.1:8008"
        )));
    }
    let health = format!("{}/_hs/v1/health", main.trim_end_matches('/'));
    if let Err(e) = ureq::get(&health).call() {
        log::warn!(
            "the main process does not answer at {health} ({e}); writes answer 503 until it does"
        );
    }
    Ok(())
}

fn run(settings: &Settings) -> Result<(), Error> {
    let worker = &settings.worker;
    let Some(main) = worker.main.clone() else {
        return Err(Error::invalid_argument(
            "no main process given: pass --main http://HOST:PORT or set worker.main in the configuration",
        ));
    };
    let token = settings.token.clone();
    http::check_listen(&worker.listen, token.as_deref())?;
    check_main(&main)?;
    let config = settings.store_config(&worker.name);
    let db = Database::open(
        settings
            .database_config(OpenMode::Replica)?
            .with_pool_wait(http::DATABASE_WAIT)
            .with_min_idle(1),
    )?;
    let slaved = SlavedStore::new(db.clone(), &config)?;
    let _follower = slaved.follow();
    // New groups travel with their events, for the main process to write in
    // their batch.
    let builder = ContextBuilder::new(slaved.events().clone(), &config).deferring_group_writes();
    let position = slaved.clone();
    let replication = slaved.clone();
    let health = vec![
        ApiState::database_check(db),
        (
            "replication",
            Arc::new(move || replication.replication_health()) as http::HealthCheck,
        ),
    ];
    let state = ApiState {
        state: slaved.state().clone(),
        position: Arc::new(move || position.position()),
        writer: Arc::new(ForwardingWriter {
            builder,
            main,
            token: token.clone(),
            agent: ureq::AgentBuilder::new()
                .max_idle_connections_per_host(16)
                .build(),
            replication: slaved.clone(),
        }),
        token,
        health,
        read_only: false,
    };
    let mut limits = http::Limits::default();
    if let Some(n) = settings.max_connections {
        limits.max_connections = n;
    }
    limits.header_read_timeout = std::time::Duration::from_secs_f64(settings.header_timeout);
    http::serve(worker.listen, http::router(state), limits)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = Overrides {
        database: cli.database.clone(),
        log_format: cli.log_format,
        worker_main: cli.main.clone(),
        worker_name: cli.name.clone(),
        worker_listen: cli.listen,
        ..Overrides::default()
    };
    let Some(settings) = Settings::start(
        "hs-worker",
        cli.config.as_deref(),
        &overrides,
        cli.verbose,
        cli.quiet,
    ) else {
        return ExitCode::FAILURE;
    };
    if cli.database.is_none() && settings.file.is_none() {
        eprintln!(
            "hs-worker: no database given: pass --database (or HS_DATABASE) with the main \
             process's PostgreSQL database, or --config"
        );
        return ExitCode::FAILURE;
    }
    let name = settings.worker.name.clone();
    match LogContext::new(&name).scope(|| run(&settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hs-worker: {e}");
            log::debug!("{e:?}");
            ExitCode::FAILURE
        }
    }
}
