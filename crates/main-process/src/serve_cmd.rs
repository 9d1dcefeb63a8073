//! `hs-main serve [--listen ADDR]`: the main process's HTTP API. Persists events
//! posted to it, and events whose contexts workers computed, through the
//! persistence queue.

use crate::cli::Failure;
use crate::http::{self, ApiState, EventWriter};
use crate::write_path::{ContextedEvent, WriteOutcome};
use persistence::Pipeline;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use storage_core::log_context;
use storage_core::{Error, StoreConfig};
use storage_events::{EventStore, EventsStore};

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
        let events = events
            .into_iter()
            .map(ContextedEvent::into_parts)
            .collect::<Result<Vec<_>, _>>()?;
        event_context::check_contexts(self.pipeline.builder.state(), room_id, &events)?;
        let batch = self.pipeline.persist(room_id, &events)?;
        Ok(WriteOutcome::new(&events, &batch))
    }
}

/// How many stream positions of cache invalidations the main process keeps
/// for workers that fall behind (a worker further behind drops all its
/// current-state caches), and how often it deletes older ones.
const KEEP_INVALIDATIONS: i64 = 100_000;
const PRUNE_EVERY: Duration = Duration::from_secs(300);

/// Prunes the replication stream's invalidations now and every [`PRUNE_EVERY`],
/// on a thread of its own for the life of the process.
fn spawn_pruning(events: EventsStore) {
    log_context::spawn("replication pruning", move || loop {
        match events.prune_cache_invalidations(KEEP_INVALIDATIONS) {
            Ok(0) => {}
            Ok(n) => log::info!(
                "pruned {n} cache invalidations older than the newest {KEEP_INVALIDATIONS} positions"
            ),
            Err(e) => log::warn!("{e}"),
        }
        std::thread::sleep(PRUNE_EVERY);
    });
}

pub fn run(database: &str, listen: SocketAddr) -> Result<(), Failure> {
    let token = std::env::var("HS_API_TOKEN").ok().filter(|t| !t.is_empty());
    http::check_listen(&listen, token.as_deref())?;
    let (_claim, db) = crate::open::open_as_main(database)?;
    let pipeline = Pipeline::open(db, &StoreConfig::default())?;
    let events = pipeline.builder.events().clone();
    spawn_pruning(events.clone());
    crate::purge_cmd::spawn_purging(events.database().clone());
    let state = ApiState {
        state: pipeline.builder.state().clone(),
        position: Arc::new(move || events.max_stream_ordering()),
        writer: Arc::new(MainWriter { pipeline }),
        token,
    };
    http::serve(listen, http::router(state))?;
    Ok(())
}
