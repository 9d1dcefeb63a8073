//! `hs-main state ROOM [--at EVENT]`: the state of a room as JSON.
//!
//! Opens the database read-only and uses only the state tables, so it answers
//! from a database Synapse wrote as well as from ours, and never changes either.

use crate::cli::Failure;
use http_api::settings::Settings;
use http_api::state_json::write_json;
use std::io::{BufWriter, Write};
use storage_core::{Error, OpenMode};
use storage_state::{room_state, StateStore};

pub fn run(settings: &Settings, room_id: &str, at: Option<&str>) -> Result<(), Failure> {
    let db = crate::open::open_to_read(settings.database_config(OpenMode::ReadOnly)?)?;
    let store = StateStore::new(db, &settings.store_config("main"))?;
    let state = room_state(&store, room_id, at)?;
    // Straight from the map's strings to stdout, in 64 KiB writes.
    let mut out = BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    write_json(&state, &mut out)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
        .map_err(|e| Failure::Error(Error::from(e).context("writing the state to stdout")))
}
