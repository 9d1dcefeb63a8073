//! The process logger: env_logger's filtering and output, with the log
//! context of the emitting thread on every line (as text, or as one JSON
//! object a line for log shippers), and an in-process capture that tests use
//! to check what was logged and under which context.
//!
//! The filter is built in layers, each able to override the one before for
//! the targets it names: quiet levels for chatty third-party crates
//! ([`THIRD_PARTY_FILTER`]), `info` for everything else, the configuration
//! file's `log.filter`, `RUST_LOG`, then `-v`/`-q`. So `RUST_LOG=debug` makes
//! our crates verbose without ruma's per-check lines flooding back; naming a
//! crate (`RUST_LOG=ruma_state_res=info`) brings it back.

use crate::log_context;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

/// One captured log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedLine {
    pub level: log::Level,
    pub context: String,
    pub target: String,
    pub message: String,
}

type Buffer = Arc<Mutex<Vec<CapturedLine>>>;

struct ContextLogger {
    inner: env_logger::Logger,
    captures: Mutex<Vec<Buffer>>,
}

impl log::Log for ContextLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
            || (metadata.level() <= log::Level::Info
                && !self
                    .captures
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_empty())
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.inner.matches(record) {
            self.inner.log(record);
        }
        let captures = self.captures.lock().unwrap_or_else(|p| p.into_inner());
        if captures.is_empty() {
            return;
        }
        let line = CapturedLine {
            level: record.level(),
            context: log_context::current_name(),
            target: record.target().to_owned(),
            message: record.args().to_string(),
        };
        for buffer in captures.iter() {
            buffer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(line.clone());
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

static LOGGER: OnceLock<&'static ContextLogger> = OnceLock::new();

/// Third-party crates and the level they log at unless a filter names them:
/// ruma's state resolution logs every auth check at info (through tracing),
/// the HTTP stack and the pool their internals at debug.
pub const THIRD_PARTY_FILTER: &str = "ruma=warn,ruma_state_res=warn,tracing::span=warn,\
     hyper=warn,hyper_util=warn,h2=warn,tower=warn,tower_http=warn,axum=warn,mio=warn,\
     tokio=warn,ureq=warn,rustls=warn,r2d2=warn";

/// The level of everything else when nothing says otherwise.
pub const DEFAULT_LEVEL: &str = "info";

/// How the process logs.
#[derive(Debug, Clone, Default)]
pub struct LogOptions {
    /// The configuration file's `log.filter` (`RUST_LOG` syntax).
    pub filter: Option<String>,
    /// `-v` counts up (debug, trace), `-q` down (warn, error); 0 leaves the
    /// level to the filters.
    pub verbosity: i8,
    /// One JSON object a line instead of text.
    pub json: bool,
}

/// The filter directives for `file` (the configuration's filter), `env`
/// (`RUST_LOG`) and `verbosity`, in the order env_logger applies them: a
/// later directive for the same target replaces an earlier one.
pub fn filter_spec(file: Option<&str>, env: Option<&str>, verbosity: i8) -> String {
    let mut parts = vec![THIRD_PARTY_FILTER, DEFAULT_LEVEL];
    parts.extend(file.filter(|f| !f.trim().is_empty()));
    parts.extend(env.filter(|f| !f.trim().is_empty()));
    let level = match verbosity {
        i8::MIN..=-2 => Some("error"),
        -1 => Some("warn"),
        0 => None,
        1 => Some("debug"),
        2..=i8::MAX => Some("trace"),
    };
    parts.extend(level);
    parts.join(",")
}

/// Installs the logger with the defaults and `RUST_LOG` (once; later calls,
/// of this or [`init_with`], do nothing).
pub fn init() {
    init_with(&LogOptions::default());
}

/// Installs the logger (once; later calls do nothing). Text lines look like
/// `2026-11-25T10:00:00.123Z INFO  [persistence loop] storage_events::queue: ...`;
/// JSON lines like `{"time":"...","level":"INFO","context":"persistence loop",
/// "target":"storage_events::queue","message":"..."}`.
pub fn init_with(options: &LogOptions) {
    LOGGER.get_or_init(|| {
        let env = std::env::var("RUST_LOG").ok();
        let spec = filter_spec(options.filter.as_deref(), env.as_deref(), options.verbosity);
        let mut builder = env_logger::Builder::new();
        builder.parse_filters(&spec);
        if options.json {
            builder.format(|buf, record| {
                let line = serde_json::json!({
                    "time": buf.timestamp_millis().to_string(),
                    "level": record.level().as_str(),
                    "context": log_context::current_name(),
                    "target": record.target(),
                    "message": record.args().to_string(),
                });
                writeln!(buf, "{line}")
            });
        } else {
            builder.format(|buf, record| {
                writeln!(
                    buf,
                    "{} {:<5} [{}] {}: {}",
                    buf.timestamp_millis(),
                    record.level(),
                    log_context::current_name(),
                    record.target(),
                    record.args()
                )
            });
        }
        let inner = builder.build();
        let max = inner.filter().max(log::LevelFilter::Info);
        let logger: &'static ContextLogger = Box::leak(Box::new(ContextLogger {
            inner,
            captures: Mutex::new(Vec::new()),
        }));
        if log::set_logger(logger).is_ok() {
            log::set_max_level(max);
        }
        logger
    });
}

/// Collects every line logged in this process (at info and above, or passing
/// `RUST_LOG`) while the guard lives. Installs the logger if needed.
pub fn capture() -> Capture {
    init();
    let buffer: Buffer = Arc::default();
    if let Some(logger) = LOGGER.get() {
        logger
            .captures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(buffer.clone());
    }
    Capture { buffer }
}

/// A running capture; see [`capture`].
#[derive(Debug)]
pub struct Capture {
    buffer: Buffer,
}

impl Capture {
    pub fn lines(&self) -> Vec<CapturedLine> {
        self.buffer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(logger) = LOGGER.get() {
            logger
                .captures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|b| !Arc::ptr_eq(b, &self.buffer));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log_context::LogContext;

    #[test]
    fn default_filter_quiets_ruma_but_not_us() {
        let filter = env_logger::Builder::new()
            .parse_filters(&filter_spec(None, None, 0))
            .build();
        let meta = |target: &'static str, level| {
            log::Metadata::builder().target(target).level(level).build()
        };
        assert!(!log::Log::enabled(
            &filter,
            &meta("ruma_state_res::event_auth", log::Level::Info)
        ));
        assert!(log::Log::enabled(
            &filter,
            &meta("ruma_state_res::event_auth", log::Level::Warn)
        ));
        assert!(log::Log::enabled(
            &filter,
            &meta("storage_core::database", log::Level::Info)
        ));
        assert!(!log::Log::enabled(
            &filter,
            &meta("storage_core::database", log::Level::Debug)
        ));
    }

    /// `RUST_LOG=debug` raises our crates, not ruma's; naming ruma does; `-q`
    /// lowers everything the filters left at a bare level.
    #[test]
    fn rust_log_keeps_the_third_party_defaults_unless_it_names_them() {
        let enabled = |spec: &str, target: &str, level| {
            let filter = env_logger::Builder::new().parse_filters(spec).build();
            log::Log::enabled(
                &filter,
                &log::Metadata::builder().target(target).level(level).build(),
            )
        };
        let debug = filter_spec(None, Some("debug"), 0);
        assert!(enabled(&debug, "storage_core::database", log::Level::Debug));
        assert!(!enabled(
            &debug,
            "ruma_state_res::event_auth",
            log::Level::Info
        ));
        assert!(!enabled(&debug, "hyper::proto", log::Level::Debug));
        let named = filter_spec(None, Some("debug,ruma_state_res=info"), 0);
        assert!(enabled(
            &named,
            "ruma_state_res::event_auth",
            log::Level::Info
        ));
        let file_then_env = filter_spec(Some("storage_core=trace"), Some("warn"), 0);
        assert!(enabled(
            &file_then_env,
            "storage_core::x",
            log::Level::Trace
        ));
        assert!(!enabled(
            &file_then_env,
            "persistence::queue",
            log::Level::Info
        ));
        let quiet = filter_spec(None, None, -1);
        assert!(!enabled(&quiet, "persistence::queue", log::Level::Info));
        assert!(enabled(&quiet, "persistence::queue", log::Level::Warn));
        let verbose = filter_spec(None, Some("warn"), 1);
        assert!(enabled(&verbose, "persistence::queue", log::Level::Debug));
    }

    #[test]
    fn lines_carry_their_context() {
        let capture = capture();
        LogContext::new("request-77").scope(|| log::info!("marker-lines-carry-context"));
        let line = capture
            .lines()
            .into_iter()
            .find(|l| l.message == "marker-lines-carry-context")
            .expect("the line was captured");
        assert_eq!(line.context, "request-77");
        assert_eq!(line.level, log::Level::Info);
    }
}
