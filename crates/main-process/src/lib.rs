//! The main process: the command line and its commands (import, state,
//! inspect, migrate, port, purge-state-groups, compress, serve with its writer
//! and background jobs). The binary `hs-main` is a thin shell over this library;
//! the persistence queue and the HTTP API live in their own crates.

pub mod background;
#[cfg(any(test, feature = "testing"))]
pub mod bench_room;
pub mod cli;
pub mod compress_cmd;
pub mod compress_job;
pub mod import_cmd;
pub mod inspect_cmd;
pub mod lines;
pub mod migrate_cmd;
pub mod open;
pub mod port;
pub mod purge_cmd;
pub mod serve_cmd;
pub mod state_cmd;
