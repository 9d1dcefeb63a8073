//! The main process: the persistence queue and its loops, the command line, and
//! (later) the HTTP API. The binary `hs-main` is a thin shell over this library.

#[doc(hidden)]
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
