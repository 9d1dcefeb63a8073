//! `hs-worker --database URL --main URL [--listen ADDR] [--name NAME]`: a replica
//! worker. It serves the same read API as the main process from its slaved
//! stores, follows the replication stream to keep their caches right, and for
//! posted events computes the contexts itself (state resolution,
//! store_state_group with ids from the shared sequence) and hands events and
//! contexts to the main process, which persists them without recomputing.

use clap::Parser;
use event_context::ContextBuilder;
use http_api::wire::{ContextedEvent, WriteOutcome};
use http_api::{self as http, ApiState, EventWriter};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use storage_core::{Database, DatabaseConfig, Error, LogContext, OpenMode, StoreConfig};
use storage_slaved::SlavedStore;

#[derive(Debug, Parser)]
#[command(
    name = "hs-worker",
    version,
    about = "Matrix room-state storage engine: replica worker"
)]
struct Cli {
    /// The main process's PostgreSQL database (`postgres://...`).
    #[arg(long, env = "HS_DATABASE", hide_env_values = true)]
    database: String,
    /// The main process's HTTP API, e.g. http://127.0.0.1:8008.
    #[arg(long)]
    main: String,
    #[arg(long, default_value = "127.0.0.1:8009")]
    listen: SocketAddr,
    /// This worker's name, in logs and metrics.
    #[arg(long, default_value = "worker")]
    name: String,
}

/// Computes contexts here, persists through the main process.
struct ForwardingWriter {
    builder: ContextBuilder,
    main: String,
    token: Option<String>,
}

impl EventWriter for ForwardingWriter {
    fn write(&self, room_id: &str, pdus: Vec<String>) -> Result<WriteOutcome, Error> {
        let events = event_context::contexts_for(&self.builder, room_id, &pdus)?;
        let body = serde_json::json!({
            "events": events.iter().map(|(p, c)| ContextedEvent::new(p, c)).collect::<Vec<_>>(),
        });
        let url = format!(
            "{}/_hs/v1/internal/rooms/{}/events",
            self.main.trim_end_matches('/'),
            encode(room_id)
        );
        let mut request = ureq::post(&url);
        if let Some(t) = &self.token {
            request = request.set("Authorization", &format!("Bearer {t}"));
        }
        match request.send_json(body) {
            Ok(response) => response
                .into_json::<WriteOutcome>()
                .map_err(|e| Error::other(format!("reading the main process's answer: {e}"))),
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

/// Percent-encodes a path segment (room ids hold `!` and `:`).
fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
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

fn run(cli: Cli) -> Result<(), Error> {
    let token = std::env::var("HS_API_TOKEN").ok().filter(|t| !t.is_empty());
    http::check_listen(&cli.listen, token.as_deref())?;
    check_main(&cli.main)?;
    let config = StoreConfig {
        instance_name: cli.name.clone(),
        ..StoreConfig::default()
    };
    let db = Database::open(
        DatabaseConfig::parse(&cli.database, OpenMode::Replica)?
            .with_pool_wait(http::DATABASE_WAIT)
            .with_min_idle(1),
    )?;
    let slaved = SlavedStore::new(db.clone(), &config)?;
    let _follower = slaved.follow();
    let builder = ContextBuilder::new(slaved.events().clone(), &config);
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
            main: cli.main.clone(),
            token: token.clone(),
        }),
        token,
        health,
        read_only: false,
    };
    http::serve(cli.listen, http::router(state), http::Limits::default())
}

fn main() -> ExitCode {
    storage_core::logging::init();
    let cli = Cli::parse();
    let name = cli.name.clone();
    match LogContext::new(&name).scope(|| run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hs-worker: {e}");
            log::debug!("{e:?}");
            ExitCode::FAILURE
        }
    }
}
