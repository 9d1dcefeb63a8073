//! Command-line parsing and dispatch, and how failures become exit statuses.

use clap::{ArgAction, Parser, Subcommand};
use http_api::settings::{LogFormat, Overrides, Settings};
use std::path::PathBuf;
use std::process::ExitCode;
use storage_core::{ErrorKind, LogContext};

#[derive(Debug, Parser)]
#[command(
    name = "hs-main",
    version,
    about = "Matrix room-state storage engine: main process",
    after_help = "Commands and exit statuses: docs/cli.md. Configuration file: \
                  docs/configuration.md. Running it: docs/operator-guide.md."
)]
struct Cli {
    /// A configuration file (YAML; see docs/configuration.md; relative paths
    /// in it are relative to its folder), or a Synapse homeserver.yaml, of
    /// which only the database (`database:`, else `database_path`) is read.
    /// Flags and environment variables win over it.
    #[arg(long, env = "HS_CONFIG", global = true, value_name = "FILE")]
    config: Option<PathBuf>,

    /// The database: `sqlite:PATH`, `postgres://...` (also `postgresql://`),
    /// libpq keywords (`host=/run/postgresql dbname=synapse user=synapse`) or
    /// a bare SQLite file path. Default: `sqlite:data/homeserver.db`, relative
    /// to the folder the command runs in (created there, with its folder, by
    /// the first command that writes).
    // A database URL in the environment may carry a password: never echo it.
    #[arg(long, env = "HS_DATABASE", global = true, hide_env_values = true)]
    database: Option<String>,

    /// Log more: -v for debug, -vv for trace (over RUST_LOG and log.filter).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,

    /// Log less: -q for warnings and errors only, -qq for errors only.
    #[arg(short, long, action = ArgAction::Count, global = true, conflicts_with = "verbose")]
    quiet: u8,

    /// Log lines as text, or as one JSON object a line (for log shippers).
    /// Default: the configuration's `log.format`, else text.
    #[arg(long, global = true, value_name = "FORMAT")]
    log_format: Option<LogFormat>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Read the configuration (file, flags, environment), check it, and print
    /// the settings in force as a configuration file, with the database
    /// password and the API token hidden. Opens no database.
    Check,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Import JSON lines of PDUs (the federation format, as Synapse stores them),
    /// through event contexts, state groups and the persistence queue. Events
    /// already stored are skipped.
    #[command(
        after_help = "More: docs/cli.md#import; exporting from Synapse: docs/synapse-export.md."
    )]
    Import {
        /// Files of JSON lines: `-` reads standard input, a name ending in
        /// `.gz` is decompressed. See docs/cli.md and docs/synapse-export.md
        /// (getting a room out of a Synapse database).
        #[arg(required = true, value_name = "FILES")]
        files: Vec<std::path::PathBuf>,
    },
    /// Create the database if needed, apply pending migrations, check the id
    /// sequences, and print what it found. What the main process does at start-up.
    #[command(after_help = "More: docs/cli.md.")]
    Migrate,
    /// A read-only report on a database (ours or Synapse's): rows and sizes of
    /// its tables from the engine's statistics, the rooms using the most state
    /// rows, and the health of the state group id sequence. Answers at once on
    /// databases of any size; `--exact` counts instead.
    #[command(after_help = "More: docs/cli.md.")]
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
    #[command(after_help = "More: docs/cli.md#port and docs/operator-guide.md.")]
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
    #[command(after_help = "More: docs/cli.md#purge-state-groups.")]
    PurgeStateGroups {
        /// Only count them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Serve the HTTP API: health, metrics, room state, event writes (see
    /// docs/http.md and, for metrics, docs/metrics.md), with the persistence
    /// queue and the background jobs (pruning, purging, compression).
    #[command(
        after_help = "More: docs/http.md, docs/metrics.md, docs/configuration.md and docs/operator-guide.md."
    )]
    Serve {
        /// Address to listen on (config `listen`; default 127.0.0.1:8008).
        /// 8008 is also Synapse's default port: give another one to run beside
        /// a Synapse on the same machine.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
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
        /// kept-alive connection may stay idle between requests (config
        /// `http.header_timeout`; default 10).
        #[arg(long, value_name = "SECONDS")]
        header_timeout: Option<f64>,
        /// Compress the state tables in the background, a pass every SECONDS over
        /// the rooms with new state groups (config `compression.every`; off
        /// unless given; see docs/compress.md).
        #[arg(long, value_name = "SECONDS")]
        compress_state_every: Option<u64>,
        /// Pace of that job: rows deleted plus inserted per second, at most
        /// (config `compression.max_rows_per_second`; default 20000).
        #[arg(long, value_name = "N")]
        compress_max_rows_per_second: Option<u64>,
    },
    /// The configuration file and settings (see docs/configuration.md):
    /// `config check` prints the settings in force.
    #[command(after_help = "More: docs/configuration.md.")]
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Shrink the state tables: rewrite the prev groups and deltas of the rooms'
    /// state groups into a shape with far fewer rows, checking in every
    /// transaction that each group keeps its state. Resumable; refuses a
    /// database that a server is serving (its online job compresses instead).
    #[command(after_help = "More: docs/compress.md.")]
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
    #[command(after_help = "More: docs/cli.md.")]
    State {
        /// The room, e.g. `!abc:example.org`.
        #[arg(value_name = "ROOM_ID")]
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

impl Cli {
    /// What the command line says about settings the file also has.
    fn overrides(&self) -> Overrides {
        let mut o = Overrides {
            database: self.database.clone(),
            log_format: self.log_format,
            ..Overrides::default()
        };
        if let Command::Serve {
            listen,
            max_connections,
            header_timeout,
            compress_state_every,
            compress_max_rows_per_second,
            ..
        } = &self.command
        {
            o.listen = *listen;
            o.max_connections = *max_connections;
            o.header_timeout = *header_timeout;
            o.compress_every = *compress_state_every;
            o.compress_max_rows_per_second = *compress_max_rows_per_second;
        }
        o
    }
}

/// Reads the command line and the configuration, installs the logger, runs
/// the command and turns its outcome into an exit status.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let Some(settings) = Settings::start(
        "hs-main",
        cli.config.as_deref(),
        &cli.overrides(),
        cli.verbose,
        cli.quiet,
    ) else {
        return ExitCode::FAILURE;
    };
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
            LogContext::new("inspect").scope(|| crate::inspect_cmd::run(&settings, options))
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
                from: from.unwrap_or_else(|| settings.database.clone()),
                to,
                settings: settings.clone(),
                resume,
                restart,
                batch: batch_size.max(1),
                sample,
            };
            LogContext::new("port").scope(|| crate::port::run(&options))
        }
        Command::Import { files } => {
            LogContext::new("import").scope(|| crate::import_cmd::import(&settings, &files))
        }
        Command::Serve { read_only, .. } => LogContext::new("serve").scope(|| {
            if read_only {
                crate::serve_cmd::run_read_only(&settings)
            } else {
                crate::serve_cmd::run(&settings)
            }
        }),
        Command::Config {
            command: ConfigCommand::Check,
        } => print_line(settings.render().trim_end()).map_err(Failure::from),
        Command::PurgeStateGroups { dry_run } => LogContext::new("purge-state-groups")
            .scope(|| crate::purge_cmd::run(&settings, dry_run)),
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
            LogContext::new("compress").scope(|| crate::compress_cmd::run(&settings, &args))
        }
        Command::Migrate => LogContext::new("migrate").scope(|| crate::migrate_cmd::run(&settings)),
        Command::State { room_id, at } => LogContext::new("state")
            .scope(|| crate::state_cmd::run(&settings, &room_id, at.as_deref())),
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
