//! `hs-main`: the main process. See `shared/design/CLI.md` for the contract.

mod cli;
mod state_cmd;

use std::process::ExitCode;

fn main() -> ExitCode {
    storage_core::logging::init();
    cli::run()
}
