//! `hs-main`: the main process. Its commands and exit statuses: `docs/cli.md`.
//! The logger is installed by `cli::run`, once the configuration is read.

use std::process::ExitCode;

fn main() -> ExitCode {
    main_process::open::exit_when_claim_lost();
    main_process::cli::run()
}
