//! `hs-main serve [--listen ADDR] [--read-only]`: the main process's HTTP API,
//! set up from the [`Settings`] (docs/configuration.md).
//! Persists events posted to it, and events whose contexts workers computed,
//! through the persistence queue. With `--read-only`, only the read half, over
//! any database (Synapse's included), claiming and writing nothing.

use crate::background::BackgroundJobs;
use crate::cli::Failure;
use http_api::settings::Settings;
use http_api::wire::{ContextedEvent, WriteOutcome};
use http_api::{self as http, ApiState, EventWriter, HealthCheck, Limits, DATABASE_WAIT};
use persistence::Pipeline;
use std::sync::Arc;
use std::time::Duration;
use storage_core::{Database, Error, OpenMode};
use storage_events::{EventReads, EventsStore};

struct MainWriter {
    pipeline: Pipeline,
}

impl EventWriter for MainWriter {
    fn write(&self, room_id: &str, pdus: Vec<String>) -> Result<WriteOutcome, Error> {
        let events = event_context::contexts_for(&self.pipeline.builder, room_id, &pdus)?;
        let batch = self.pipeline.persist(room_id, &events)?;
        Ok(WriteOutcome::new(&events, &batch))
    }

    fn write_contexted(
        &self,
        room_id: &str,
        events: Vec<ContextedEvent>,
    ) -> Result<WriteOutcome, Error> {
        write_contexted(&self.pipeline, room_id, events)
    }
}

/// Persists a worker's request: its groups adopted (a second delivery of a
/// request waits for the first one's outcome there), its contexts checked,
/// then its batch.
pub fn write_contexted(
    pipeline: &Pipeline,
    room_id: &str,
    events: Vec<ContextedEvent>,
) -> Result<WriteOutcome, Error> {
    let state = pipeline.builder.state();
    let events = http_api::wire::adopt_contexted(state, events)?;
    if let Err(e) = event_context::check_contexts(state, room_id, &events) {
        state.forget_prepared_groups(events.iter().flat_map(|(_, c)| &c.new_state_groups));
        return Err(e);
    }
    let batch = pipeline.persist(room_id, &events)?;
    Ok(WriteOutcome::forwarded(&events, &batch))
}

/// Prunes the replication stream's invalidations now and every `every`,
/// keeping the newest `keep` stream positions of them for workers that fall
/// behind (a worker further behind drops all its current-state caches), on a
/// thread of its own until the server stops.
fn spawn_pruning(jobs: &mut BackgroundJobs, events: EventsStore, keep: i64, every: Duration) {
    jobs.spawn("replication pruning", move |stop| loop {
        match events.prune_cache_invalidations(keep) {
            Ok(0) => {}
            Ok(n) => {
                log::info!("pruned {n} cache invalidations older than the newest {keep} positions")
            }
            Err(e) => log::warn!("{e}"),
        }
        if stop.wait(every) {
            break;
        }
    });
}

/// The HTTP limits the settings ask for.
fn limits(settings: &Settings) -> Limits {
    let mut limits = Limits::default();
    if let Some(n) = settings.max_connections {
        limits.max_connections = n.max(1);
    }
    limits.header_read_timeout = Duration::from_secs_f64(settings.header_timeout);
    limits
}

/// `hs-main serve`: claims and migrates the database, starts the background
/// jobs the settings ask for, and serves until Ctrl-C or SIGTERM. Then, with
/// the requests in flight answered, stops the jobs and closes the database
/// before it returns (on SQLite, the last connection closed checkpoints the
/// write-ahead log and removes it and the shared-memory file).
pub fn run(settings: &Settings) -> Result<(), Failure> {
    let token = settings.token.clone();
    let listen = settings.listen;
    http::check_listen(&listen, token.as_deref())?;
    let config = settings
        .database_config(OpenMode::Writer)?
        .with_pool_wait(DATABASE_WAIT)
        .with_min_idle(1);
    let (_claim, db) = crate::open::open_config_as_main(config)?;
    let health = vec![ApiState::database_check(db.clone())];
    let pipeline = Pipeline::open(db, &settings.store_config("main"))?;
    let events = pipeline.builder.events().clone();
    // Dropped before the claim and the database, whichever way this returns.
    let mut jobs = BackgroundJobs::default();
    spawn_pruning(
        &mut jobs,
        events.clone(),
        settings.cache_invalidations_keep,
        Duration::from_secs(settings.cache_invalidations_every),
    );
    crate::purge_cmd::spawn_purging(
        &mut jobs,
        events.state().clone(),
        Duration::from_secs(settings.purge_state_groups_every),
    );
    if let Some(secs) = settings.compress_every {
        let job = crate::compress_job::CompressJob {
            every: Duration::from_secs(secs),
            max_rows_per_second: settings.compress_max_rows_per_second,
        };
        crate::compress_job::spawn(&mut jobs, events.clone(), job);
    }
    drop(events);
    let served = http::serve(
        listen,
        http::router(main_api(pipeline, token, health)),
        limits(settings),
    );
    jobs.stop();
    log::info!("background jobs stopped; closing the database");
    served?;
    Ok(())
}

/// The API of a main process that writes through `pipeline`: what `run`
/// serves, and what a test serves over a database it opened itself (a tiny
/// pool, a short pool wait).
pub fn main_api(
    pipeline: Pipeline,
    token: Option<String>,
    health: Vec<(&'static str, HealthCheck)>,
) -> ApiState {
    let events = pipeline.builder.events().clone();
    ApiState {
        state: pipeline.builder.state().clone(),
        position: Arc::new(move || events.max_stream_ordering()),
        writer: Arc::new(MainWriter { pipeline }),
        token,
        health,
        read_only: false,
    }
}

/// Refuses every write: a read-only server has no writer (the router answers
/// 405 before this is reached).
struct NoWriter;

impl EventWriter for NoWriter {
    fn write(&self, _room_id: &str, _pdus: Vec<String>) -> Result<WriteOutcome, Error> {
        Err(Error::invalid_argument("this server is read-only"))
    }
}

/// `serve --read-only`: health, metrics, state and the stream position from a
/// read-only open (no claim, no migration, nothing written, no pruning).
pub fn run_read_only(settings: &Settings) -> Result<(), Failure> {
    let token = settings.token.clone();
    let listen = settings.listen;
    http::check_listen(&listen, token.as_deref())?;
    let config = settings
        .database_config(OpenMode::ReadOnly)?
        .with_pool_wait(DATABASE_WAIT)
        .with_min_idle(1);
    let db = crate::open::open_to_read(config)?;
    let events = EventsStore::new(db.clone(), &settings.store_config("main"))?;
    log::info!(
        "serving {} read-only: nothing is claimed, migrated or written",
        db.url()
    );
    // Others may write the database meanwhile: read the position each time.
    let position_db = db.clone();
    let state = ApiState {
        state: events.state().clone(),
        position: Arc::new(move || {
            read_stream_position(&position_db).unwrap_or_else(|e| {
                log::warn!("{e}");
                0
            })
        }),
        writer: Arc::new(NoWriter),
        token,
        health: vec![ApiState::database_check(db)],
        read_only: true,
    };
    http::serve(listen, http::router(state), limits(settings))?;
    Ok(())
}

/// The highest stream position in the database now.
fn read_stream_position(db: &Database) -> Result<i64, Error> {
    use diesel::prelude::*;
    use storage_events::schema::events;
    db.run_read("read_only_stream_position", |txn| {
        let max: Option<i64> = storage_core::with_conn!(txn.conn(), |c| events::table
            .select(diesel::dsl::max(events::stream_ordering))
            .first(c))?;
        Ok(max.unwrap_or(0))
    })
}
