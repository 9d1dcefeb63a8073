//! `hs-main`: the main process. Its commands and exit statuses: `docs/cli.md`.

use std::process::ExitCode;

fn main() -> ExitCode {
    storage_core::logging::init();
    main_process::open::exit_when_claim_lost();
    main_process::cli::run()
}
