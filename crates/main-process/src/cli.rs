//! Command-line parsing and dispatch, and how failures become exit statuses.

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use storage_core::config::DEFAULT_SQLITE_PATH;
use storage_core::{ErrorKind, LogContext};

#[derive(Debug, Parser)]
#[command(
    name = "hs-main",
    version,
    about = "Matrix room-state storage engine: main process"
)]
struct Cli {
    /// `sqlite:PATH` or `postgres://...` (also `postgresql://`). Default:
    /// `sqlite:data/homeserver.db`, relative to the folder the command runs in
    /// (created there, with its folder, by the first command that writes).
    // A database URL in the environment may carry a password: never echo it.
    #[arg(long, env = "HS_DATABASE", global = true, hide_env_values = true)]
    database: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Import JSON lines of PDUs (the federation format, as Synapse stores them),
    /// through event contexts, state groups and the persistence queue. Events
    /// already stored are skipped.
    Import {
        #[arg(required = true)]
        files: Vec<std::path::PathBuf>,
    },
    /// Create the database if needed, apply pending migrations, check the id
    /// sequences, and print what it found. What the main process does at start-up.
    Migrate,
    /// A read-only report on a database (ours or Synapse's): rows and sizes of
    /// its tables from the engine's statistics, the rooms using the most state
    /// rows, and the health of the state group id sequence. Answers at once on
    /// databases of any size; `--exact` counts instead.
    Inspect {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// How many of the rooms with the most state rows to list.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Count every row (slow on a big server) and measure the delta chains:
        /// state groups, snapshots and deltas, chain lengths.
        #[arg(long)]
        exact: bool,
        /// Also count the state groups no event references (and those no
        /// referenced group needs); reads every group.
        #[arg(long)]
        unreferenced: bool,
        /// Also check the database's invariants (every event's room exists with
        /// a create event, current state names stored events of its room, every
        /// non-outlier event has a state group of its room, no prev event is
        /// missing, forward extremities are the childless events, sequences are
        /// ahead of their tables); exit status 1 when one does not hold.
        #[arg(long)]
        check: bool,
    },
    /// Copy every table to another database (typically SQLite to PostgreSQL),
    /// resumable, then set its sequences past the copied ids and check the copy.
    Port {
        /// The database to copy from (default: the --database one).
        #[arg(long)]
        from: Option<String>,
        /// The database to copy into, migrated to this binary's schema.
        #[arg(long)]
        to: String,
        /// Continue an interrupted port into a target that already holds data.
        #[arg(long, conflicts_with = "restart")]
        resume: bool,
        /// Delete what an earlier port copied into the target (unfinished, or
        /// finished from a source that changed since) and port from the start.
        #[arg(long)]
        restart: bool,
        /// Distinct key values copied per transaction.
        #[arg(long, default_value_t = 1000)]
        batch_size: i64,
        /// Events whose state is compared on both sides at the end.
        #[arg(long, default_value_t = 100)]
        sample: usize,
    },
    /// Delete the state groups that no event's state needs (left by writes that
    /// were refused or interrupted), and their rows. `serve` does the same every
    /// 10 minutes on its own.
    PurgeStateGroups {
        /// Only count them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Serve the HTTP API (see docs/http.md).
    Serve {
        /// Address to listen on. 8008 is also Synapse's default port: give
        /// another one to run beside a Synapse on the same machine.
        #[arg(long, default_value = "127.0.0.1:8008")]
        listen: std::net::SocketAddr,
        /// Serve only the read half of the API (health, metrics, state) from
        /// any database, Synapse's included: claims nothing, migrates nothing,
        /// writes nothing; writes answer 405.
        #[arg(long)]
        read_only: bool,
        /// Connections served at once; more wait to be accepted. Default: 10,000,
        /// or fewer where the open-files limit is lower (256 kept for the rest).
        #[arg(long)]
        max_connections: Option<usize>,
        /// Seconds a client may take to send a request's headers, and a
        /// kept-alive connection may stay idle between requests.
        #[arg(long, default_value_t = 10.0)]
        header_timeout: f64,
        /// Compress the state tables in the background, a pass every SECONDS over
        /// the rooms with new state groups (off unless given; see `compress`).
        #[arg(long, value_name = "SECONDS")]
        compress_state_every: Option<u64>,
        /// Pace of that job: rows deleted plus inserted per second, at most.
        #[arg(long, value_name = "N", default_value_t = 20_000)]
        compress_max_rows_per_second: u64,
    },
    /// Shrink the state tables: rewrite the prev groups and deltas of the rooms'
    /// state groups into a shape with far fewer rows, checking in every
    /// transaction that each group keeps its state. Resumable; refuses a
    /// database that a server is serving (its online job compresses instead).
    Compress {
        /// A room to compress (repeatable). Default: every room, most rows first.
        #[arg(long = "room", value_name = "ROOM_ID")]
        rooms: Vec<String>,
        /// Plan and report only; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also write the SQL of every rewrite to FILE (with --dry-run: instead).
        #[arg(long, value_name = "FILE")]
        sql: Option<std::path::PathBuf>,
        /// Rows deleted plus inserted per second, at most.
        #[arg(long, value_name = "N")]
        max_rows_per_second: Option<u64>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the state of a room as JSON: its current state, or the state after
    /// an event. Never writes to the database.
    State {
        room_id: String,
        /// The state after this event (including it, if it is a state event).
        #[arg(long = "at")]
        at: Option<String>,
    },
}

/// A failure with the exit status it calls for.
#[derive(Debug)]
pub enum Failure {
    /// The room or event asked about does not exist: status 2.
    NotFound(String),
    /// Anything else: status 1.
    Error(storage_core::Error),
}

/// A room or event that does not exist is exit status 2; a storage failure 1.
impl From<storage_state::StateLookupError> for Failure {
    fn from(e: storage_state::StateLookupError) -> Self {
        match e {
            storage_state::StateLookupError::Storage(e) => Failure::Error(e),
            not_found => Failure::NotFound(not_found.to_string()),
        }
    }
}

impl From<storage_core::Error> for Failure {
    fn from(e: storage_core::Error) -> Self {
        Failure::Error(e)
    }
}

/// Writes one line to stdout, as `println!` does, but returns a failure
/// instead of panicking when stdout is closed (see [`run`]).
pub fn print_line(line: impl std::fmt::Display) -> storage_core::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    Ok(())
}

fn is_closed_pipe(e: &storage_core::Error) -> bool {
    matches!(e.kind(), ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::BrokenPipe)
}

pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let database = cli
        .database
        .unwrap_or_else(|| format!("sqlite:{DEFAULT_SQLITE_PATH}"));
    let outcome = match cli.command {
        Command::Inspect {
            json,
            top,
            exact,
            unreferenced,
            check,
        } => {
            let options = crate::inspect_cmd::InspectOptions {
                json,
                top,
                exact,
                unreferenced,
                check,
            };
            LogContext::new("inspect").scope(|| crate::inspect_cmd::run(&database, options))
        }
        Command::Port {
            from,
            to,
            resume,
            restart,
            batch_size,
            sample,
        } => {
            let options = crate::port::PortOptions {
                from: from.unwrap_or_else(|| database.clone()),
                to,
                resume,
                restart,
                batch: batch_size.max(1),
                sample,
            };
            LogContext::new("port").scope(|| crate::port::run(&options))
        }
        Command::Import { files } => {
            LogContext::new("import").scope(|| crate::import_cmd::run(&database, &files))
        }
        Command::Serve {
            listen,
            read_only,
            max_connections,
            header_timeout,
            compress_state_every,
            compress_max_rows_per_second,
        } => LogContext::new("serve").scope(|| {
            let mut limits = http_api::Limits::default();
            if let Some(n) = max_connections {
                limits.max_connections = n.max(1);
            }
            limits.header_read_timeout =
                std::time::Duration::from_secs_f64(header_timeout.clamp(0.1, 3600.0));
            let compress = compress_state_every.map(|secs| crate::compress_job::CompressJob {
                every: std::time::Duration::from_secs(secs.max(1)),
                max_rows_per_second: compress_max_rows_per_second,
            });
            if read_only {
                crate::serve_cmd::run_read_only(&database, listen, limits)
            } else {
                crate::serve_cmd::run(&database, listen, limits, compress)
            }
        }),
        Command::PurgeStateGroups { dry_run } => LogContext::new("purge-state-groups")
            .scope(|| crate::purge_cmd::run(&database, dry_run)),
        Command::Compress {
            rooms,
            dry_run,
            sql,
            max_rows_per_second,
            json,
        } => {
            let args = crate::compress_cmd::Args {
                rooms,
                dry_run,
                sql,
                max_rows_per_second,
                json,
            };
            LogContext::new("compress").scope(|| crate::compress_cmd::run(&database, &args))
        }
        Command::Migrate => LogContext::new("migrate").scope(|| crate::migrate_cmd::run(&database)),
        Command::State { room_id, at } => LogContext::new("state")
            .scope(|| crate::state_cmd::run(&database, &room_id, at.as_deref())),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our output went away (`hs-main inspect | head -1`):
        // it has what it wanted; nothing failed.
        Err(Failure::Error(e)) if is_closed_pipe(&e) => ExitCode::SUCCESS,
        Err(Failure::NotFound(msg)) => {
            eprintln!("hs-main: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Error(e)) => {
            eprintln!("hs-main: {e}");
            log::debug!("{e:?}");
            ExitCode::FAILURE
        }
    }
}
