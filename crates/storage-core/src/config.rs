//! Where the database is and how to open it.

use crate::error::{Error, ErrorKind, Result};
use std::path::PathBuf;

/// The default database when none is given: an SQLite file under `./data/`.
pub const DEFAULT_SQLITE_PATH: &str = "data/homeserver.db";

/// A parsed database location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// `sqlite:PATH` (also `sqlite://PATH`).
    Sqlite(PathBuf),
    /// `postgres://...` or `postgresql://...`, passed to libpq as it is.
    Postgres(String),
}

impl DatabaseUrl {
    pub fn parse(url: &str) -> Result<Self> {
        if let Some(rest) = url.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(invalid(url, "no file path after `sqlite:`"));
            }
            Ok(DatabaseUrl::Sqlite(PathBuf::from(path)))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(DatabaseUrl::Postgres(url.to_owned()))
        } else {
            Err(invalid(
                url,
                "expected `sqlite:PATH`, `postgres://...` or `postgresql://...`",
            ))
        }
    }

    /// The URL with any password replaced, for logs and error messages.
    pub fn redacted(&self) -> String {
        match self {
            DatabaseUrl::Sqlite(p) => format!("sqlite:{}", p.display()),
            DatabaseUrl::Postgres(u) => redact_password(u),
        }
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

fn invalid(url: &str, reason: &str) -> Error {
    Error::new(ErrorKind::InvalidUrl {
        url: redact_password(url),
        reason: reason.to_owned(),
    })
}

fn redact_password(url: &str) -> String {
    // scheme://user:password@host -> scheme://user:***@host
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match (authority.rfind('@'), authority.find(':')) {
        (Some(at), Some(colon)) if colon < at => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &authority[..colon],
            &url[scheme_end + 3 + at..]
        ),
        _ => url.to_owned(),
    }
}

/// What a process may do with the database it opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// The main process: applies pending migrations, checks sequences, writes.
    Writer,
    /// A replica worker: writes, but never migrates; refuses a schema it does not match.
    Replica,
    /// Reads only, runs no migration and checks nothing: works on a Synapse database.
    ReadOnly,
    /// Writes the state tables of a database Synapse wrote, as they are: no
    /// migration, no schema check, no table of ours. Only `hs-main compress`
    /// (with Synapse stopped) opens a database so, and only a Synapse one.
    SynapseState,
}

/// How to open a [`crate::Database`].
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub url: DatabaseUrl,
    pub mode: OpenMode,
    /// Connections in the pool. SQLite ignores values above a handful: it has one writer.
    pub pool_size: u32,
    /// How long SQLite waits for a lock held by another process before failing.
    pub busy_timeout_ms: u32,
    /// How long a caller waits for a pooled connection (all busy, or the
    /// database unreachable) before failing.
    pub pool_wait: std::time::Duration,
    /// Idle connections the pool keeps open. None by default: a short command
    /// opens only what it uses (and leaves no connection being opened in the
    /// background as it exits); a server keeps one warm.
    pub min_idle: u32,
}

impl DatabaseConfig {
    pub fn new(url: DatabaseUrl, mode: OpenMode) -> Self {
        let pool_size = match url {
            DatabaseUrl::Sqlite(_) => 4,
            DatabaseUrl::Postgres(_) => 10,
        };
        DatabaseConfig {
            url,
            mode,
            pool_size,
            busy_timeout_ms: 5_000,
            pool_wait: std::time::Duration::from_secs(30),
            min_idle: 0,
        }
    }

    pub fn parse(url: &str, mode: OpenMode) -> Result<Self> {
        Ok(Self::new(DatabaseUrl::parse(url)?, mode))
    }

    pub fn with_pool_size(mut self, size: u32) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// A long-running process keeps `n` connections open while idle.
    pub fn with_min_idle(mut self, n: u32) -> Self {
        self.min_idle = n;
        self
    }

    /// A server answering requests fails them early (503) rather than hold
    /// them while the database is down.
    pub fn with_pool_wait(mut self, wait: std::time::Duration) -> Self {
        self.pool_wait = wait;
        self
    }
}

/// What every store is built from besides the database handle, so that stores
/// compose the same way in the main process and in replica workers.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Multiplies every cache's default size.
    pub cache_factor: f64,
    /// The name of this process among the main process and its workers.
    pub instance_name: String,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            cache_factor: 1.0,
            instance_name: "main".to_owned(),
        }
    }
}

impl StoreConfig {
    /// A cache's size: its default scaled by the cache factor, at least 1.
    pub fn cache_size(&self, default: usize) -> usize {
        ((default as f64 * self.cache_factor) as usize).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_schemes() {
        assert_eq!(
            DatabaseUrl::parse("sqlite:data/x.db").unwrap(),
            DatabaseUrl::Sqlite("data/x.db".into())
        );
        assert_eq!(
            DatabaseUrl::parse("sqlite:///tmp/x.db").unwrap(),
            DatabaseUrl::Sqlite("/tmp/x.db".into())
        );
        assert!(matches!(
            DatabaseUrl::parse("postgresql://u@h/db").unwrap(),
            DatabaseUrl::Postgres(_)
        ));
        let err = DatabaseUrl::parse("mysql://x").unwrap_err();
        assert!(err.to_string().contains("mysql://x"), "{err}");
        assert!(DatabaseUrl::parse("sqlite:").is_err());
    }

    #[test]
    fn redacts_passwords() {
        let url = DatabaseUrl::parse("postgres://alice:s3cret@db:5432/hs").unwrap();
        assert_eq!(url.redacted(), "postgres://alice:***@db:5432/hs");
        let url = DatabaseUrl::parse("postgres://alice@db/hs").unwrap();
        assert_eq!(url.redacted(), "postgres://alice@db/hs");
    }
}
