//! The one error type of the storage layer.
//!
//! Every error records where it was created (a backtrace, captured eagerly because
//! storage errors are rare and a missing backtrace costs far more in an incident
//! than the capture costs here) and a chain of context strings, outermost first,
//! naming the operation, the room or event, and the cause.

use std::backtrace::Backtrace;
use std::fmt;

/// Result with the storage [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, without the context of where.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The database answered with an error (constraint, serialization failure, ...).
    #[error("database error: {0}")]
    Database(#[source] diesel::result::Error),
    /// A connection could not be established.
    #[error("could not connect: {0}")]
    Connection(#[source] diesel::ConnectionError),
    /// No connection could be taken from the pool.
    #[error("connection pool: {0}")]
    Pool(#[source] r2d2::Error),
    /// The URL does not name a database we can open.
    #[error("invalid database URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    /// Applying or reading migrations failed.
    #[error("migrations: {0}")]
    Migration(String),
    /// The database was migrated by a newer binary than this one.
    #[error(
        "the database schema is newer than this binary: it has migrations {unknown:?} that \
         this build does not know; run a build at least as new as the one that wrote it"
    )]
    SchemaTooNew { unknown: Vec<String> },
    /// The database was not migrated far enough for a process that does not migrate.
    #[error(
        "the database schema is older than this binary: migrations {missing:?} are not applied; \
         start the main process once to migrate it"
    )]
    SchemaTooOld { missing: Vec<String> },
    /// The database is not one this process may write (a Synapse database):
    /// the message says what it is and what can be done instead.
    #[error("{0}")]
    NotOurs(String),
    /// A caller passed arguments that cannot be right.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Something asked for does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The stored data contradicts an invariant.
    #[error("inconsistent data: {0}")]
    Corrupt(String),
    /// Another process holds what this one needs for itself (the database's
    /// main-process claim).
    #[error("in use: {0}")]
    InUse(String),
    /// This process was the database's main process and no longer is (another
    /// one claimed it, or its SQLite file was deleted or replaced): it must
    /// stop writing. The text says what happened and what to do.
    #[error("lost the main-process claim: {0}")]
    ClaimLost(String),
    /// A process this one relies on (a worker's main process) could not be
    /// reached or is stopping: the request may succeed when retried.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The database has no room left to write (SQLite's "database or disk is
    /// full", PostgreSQL's disk_full): the write was rolled back whole, and
    /// works again once there is room. The text names what the database said.
    #[error("out of space: {0}")]
    OutOfSpace(String),
    /// I/O outside the database (files, directories).
    #[error("i/o: {0}")]
    Io(#[source] std::io::Error),
    /// Anything else, described in words.
    #[error("{0}")]
    Other(String),
    /// One error delivered to several callers (the waiters of a persistence
    /// batch): [`Error::kind`] looks through it to the original's kind.
    #[error("{0}")]
    Shared(std::sync::Arc<Error>),
}

/// A storage error: its kind, the context it passed through, and where it happened.
/// Boxed, so that results stay one pointer wide on the happy path.
pub struct Error(Box<Inner>);

struct Inner {
    kind: ErrorKind,
    context: Vec<String>,
    backtrace: Backtrace,
}

impl Error {
    /// A new error of `kind`, capturing the backtrace of the caller.
    pub fn new(kind: ErrorKind) -> Self {
        Error(Box::new(Inner {
            kind,
            context: Vec::new(),
            backtrace: Backtrace::force_capture(),
        }))
    }

    pub fn invalid_argument(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument(msg.into()))
    }

    pub fn not_found(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound(msg.into()))
    }

    pub fn corrupt(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt(msg.into()))
    }

    pub fn unavailable(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable(msg.into()))
    }

    pub fn other(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Other(msg.into()))
    }

    /// Adds an outer layer of context ("while doing X").
    pub fn context(mut self, ctx: impl Into<String>) -> Self {
        self.0.context.insert(0, ctx.into());
        self
    }

    /// What went wrong; for a shared error, the original's kind.
    pub fn kind(&self) -> &ErrorKind {
        match &self.0.kind {
            ErrorKind::Shared(original) => original.kind(),
            kind => kind,
        }
    }

    /// The diesel error underneath, if the database produced this error.
    pub fn database_error(&self) -> Option<&diesel::result::Error> {
        match self.kind() {
            ErrorKind::Database(e) => Some(e),
            _ => None,
        }
    }

    /// Whether this process lost its main-process claim (and must stop writing).
    pub fn is_claim_lost(&self) -> bool {
        matches!(self.kind(), ErrorKind::ClaimLost(_))
    }

    /// Whether the database had no room left to write.
    pub fn is_out_of_space(&self) -> bool {
        matches!(self.kind(), ErrorKind::OutOfSpace(_))
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self.kind(), ErrorKind::NotFound(_))
    }

    /// Where the error was created (for a shared error, where the original was).
    pub fn backtrace(&self) -> &Backtrace {
        match &self.0.kind {
            ErrorKind::Shared(original) => original.backtrace(),
            _ => &self.0.backtrace,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for ctx in &self.0.context {
            write!(f, "{ctx}: ")?;
        }
        write!(f, "{}", self.0.kind)
    }
}

impl fmt::Debug for Error {
    /// Display plus the backtrace: what `main` returning an error prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}\n\nbacktrace:\n{}", self.backtrace())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.0.kind)
    }
}

/// A caller's own copy of an error shared by several: same kind, same text, and
/// the backtrace of where the original happened.
impl From<std::sync::Arc<Error>> for Error {
    fn from(original: std::sync::Arc<Error>) -> Self {
        Error(Box::new(Inner {
            kind: ErrorKind::Shared(original),
            context: Vec::new(),
            backtrace: Backtrace::disabled(),
        }))
    }
}

impl From<ErrorKind> for Error {
    fn from(kind: ErrorKind) -> Self {
        Error::new(kind)
    }
}

impl From<diesel::result::Error> for Error {
    fn from(e: diesel::result::Error) -> Self {
        Error::new(ErrorKind::Database(e))
    }
}

impl From<diesel::ConnectionError> for Error {
    fn from(e: diesel::ConnectionError) -> Self {
        Error::new(ErrorKind::Connection(e))
    }
}

impl From<r2d2::Error> for Error {
    fn from(e: r2d2::Error) -> Self {
        Error::new(ErrorKind::Pool(e))
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::new(ErrorKind::Io(e))
    }
}

/// `.context(...)` on results, for errors that convert into [`Error`].
pub trait ResultExt<T> {
    fn context(self, ctx: impl Into<String>) -> Result<T>;
    fn with_context<S: Into<String>>(self, ctx: impl FnOnce() -> S) -> Result<T>;
}

impl<T, E: Into<Error>> ResultExt<T> for std::result::Result<T, E> {
    fn context(self, ctx: impl Into<String>) -> Result<T> {
        self.map_err(|e| e.into().context(ctx))
    }

    fn with_context<S: Into<String>>(self, ctx: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| e.into().context(ctx()))
    }
}
