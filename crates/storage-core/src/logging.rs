//! The process logger: env_logger's filtering (`RUST_LOG`, default `info`) and
//! output, with the log context of the emitting thread on every line, and an
//! in-process capture that tests use to check what was logged and under which
//! context.

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

/// The filter when `RUST_LOG` is unset: info, except ruma's state resolution,
/// which logs every auth check at info (through tracing).
pub const DEFAULT_FILTER: &str = "info,ruma_state_res=warn,tracing::span=warn";

/// Installs the logger (once; later calls do nothing). Lines look like
/// `2026-11-25T10:00:00.123Z INFO  [persistence loop] storage_events::queue: ...`.
pub fn init() {
    LOGGER.get_or_init(|| {
        let inner = env_logger::Builder::from_env(
            env_logger::Env::default().default_filter_or(DEFAULT_FILTER),
        )
        .format(|buf, record| {
            writeln!(
                buf,
                "{} {:<5} [{}] {}: {}",
                buf.timestamp_millis(),
                record.level(),
                log_context::current_name(),
                record.target(),
                record.args()
            )
        })
        .build();
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
            .parse_filters(DEFAULT_FILTER)
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
