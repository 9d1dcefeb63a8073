//! `hs-main serve [--listen ADDR]`: the main process's HTTP API. Persists events
//! posted to it, and events whose contexts workers computed, through the
//! persistence queue.

use crate::cli::Failure;
use crate::http::{self, ApiState, EventWriter};
use crate::import_cmd::Pipeline;
use crate::write_path::{self, ContextedEvent, WriteOutcome};
use std::net::SocketAddr;
use std::sync::Arc;
use storage_core::{Error, StoreConfig};
use storage_events::EventStore;

struct MainWriter {
    pipeline: Pipeline,
}

impl EventWriter for MainWriter {
    fn write(&self, room_id: &str, pdus: Vec<String>) -> Result<WriteOutcome, Error> {
        let events = write_path::contexts_for(&self.pipeline.builder, room_id, &pdus)?;
        write_path::persist(&self.pipeline.queue, room_id, &events)
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
        write_path::check_contexts(self.pipeline.builder.state(), room_id, &events)?;
        write_path::persist(&self.pipeline.queue, room_id, &events)
    }
}

pub fn run(database: &str, listen: SocketAddr) -> Result<(), Failure> {
    let token = std::env::var("HS_API_TOKEN").ok().filter(|t| !t.is_empty());
    http::check_listen(&listen, token.as_deref())?;
    let (_claim, db) = crate::open::open_as_main(database)?;
    let pipeline = Pipeline::open(db, &StoreConfig::default())?;
    let events = pipeline.builder.events().clone();
    let state = ApiState {
        state: pipeline.builder.state().clone(),
        position: Arc::new(move || events.max_stream_ordering()),
        writer: Arc::new(MainWriter { pipeline }),
        token,
    };
    http::serve(listen, http::router(state))?;
    Ok(())
}
