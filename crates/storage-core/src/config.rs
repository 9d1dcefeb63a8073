//! Where the database is and how to open it.

use crate::error::{Error, ErrorKind, Result};
use std::path::PathBuf;

/// The default database when none is given: an SQLite file under `./data/`.
pub const DEFAULT_SQLITE_PATH: &str = "data/homeserver.db";

/// A parsed database location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// `sqlite:PATH` (also `sqlite://PATH`), or a bare path.
    Sqlite(PathBuf),
    /// A libpq connection URI, `postgres://...` or `postgresql://...`, passed
    /// to libpq as it is. A libpq keyword string is turned into one (see
    /// [`DatabaseUrl::parse`]), so that everything below handles one form.
    Postgres(String),
}

impl DatabaseUrl {
    /// Reads the three forms an operator has at hand:
    ///
    /// - a URL: `sqlite:PATH`, `sqlite://PATH`, `postgres://...`, `postgresql://...`;
    /// - a libpq keyword string, as psql and rust-synapse-compress-state take it:
    ///   `host=/run/postgresql dbname=synapse user=synapse` (values may be
    ///   single-quoted, `\'` and `\\` escaped inside);
    /// - a bare SQLite path: `homeserver.db`, `/var/lib/synapse/homeserver.db`.
    ///
    /// Anything that starts like another scheme (`mysql://x`, `file:x`) is
    /// refused rather than taken for a file name.
    pub fn parse(url: &str) -> Result<Self> {
        if let Some(rest) = url.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(invalid(url, "no file path after `sqlite:`"));
            }
            Ok(DatabaseUrl::Sqlite(PathBuf::from(path)))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(DatabaseUrl::Postgres(url.to_owned()))
        } else if looks_like_keywords(url) {
            let pairs = parse_keywords(url).map_err(|reason| invalid(url, &reason))?;
            Ok(DatabaseUrl::Postgres(postgres_url_from_keywords(&pairs)))
        } else if url.trim().is_empty() {
            Err(invalid(
                url,
                "empty; expected `sqlite:PATH`, `postgres://...`, a libpq keyword string or a file path",
            ))
        } else if let Some(scheme) = scheme_of(url) {
            Err(invalid(
                url,
                &format!(
                    "unknown scheme `{scheme}:`; expected `sqlite:PATH`, `postgres://...` \
                     (or `postgresql://`), libpq keywords (`host=... dbname=...`) or a file \
                     path (write `sqlite:{url}` for a file whose name has a colon)"
                ),
            ))
        } else {
            Ok(DatabaseUrl::Sqlite(PathBuf::from(url)))
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

/// A PostgreSQL URL that libpq reads exactly as the keyword string made of
/// `pairs`: every keyword as a query parameter (libpq accepts them all there),
/// values percent-encoded.
pub fn postgres_url_from_keywords<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> String {
    let query: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                percent_encode(k.as_ref()),
                percent_encode(v.as_ref())
            )
        })
        .collect();
    format!("postgresql://?{}", query.join("&"))
}

/// What percent-encoding leaves as it is in a URL part: RFC 3986's unreserved
/// characters (letters, digits, `-`, `_`, `.`, `~`).
const URL_UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// `s` percent-encoded as one URL part (a libpq URL's keyword or value, a
/// request path's segment such as a room id, or a query value).
pub fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, URL_UNRESERVED).to_string()
}

/// `host=...`: a keyword, optional spaces, then `=`.
fn looks_like_keywords(s: &str) -> bool {
    let s = s.trim_start();
    let name_len = s
        .bytes()
        .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
        .count();
    name_len > 0 && s[name_len..].trim_start().starts_with('=')
}

/// The scheme of `s` if it starts like a URL (`name:`), for refusing it.
fn scheme_of(s: &str) -> Option<&str> {
    let (scheme, _) = s.split_once(':')?;
    let mut bytes = scheme.bytes();
    let first = bytes.next()?;
    (first.is_ascii_alphabetic()
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')))
    .then_some(scheme)
}

/// libpq's keyword/value connection string: `key = value` pairs separated by
/// spaces; a value in single quotes may hold spaces, `\'` and `\\`.
fn parse_keywords(s: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| c.is_ascii_alphanumeric() || *c == '_') {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if key.is_empty() || chars.next() != Some('=') {
            return Err(format!(
                "libpq keyword string: expected `keyword=value` after {:?}",
                pairs
                    .last()
                    .map_or("the start", |(k, _): &(String, String)| k.as_str())
            ));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => {
                            return Err(format!(
                                "libpq keyword string: `{key}`'s value ends in a backslash"
                            ))
                        }
                    },
                    Some(c) => value.push(c),
                    None => {
                        return Err(format!(
                            "libpq keyword string: `{key}`'s quoted value is not closed"
                        ))
                    }
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

fn invalid(url: &str, reason: &str) -> Error {
    Error::new(ErrorKind::InvalidUrl {
        url: redact_password(url),
        reason: reason.to_owned(),
    })
}

/// `scheme://user:password@host` -> `scheme://user:***@host`, and the value
/// of a `password` query parameter or keyword -> `***`.
fn redact_password(url: &str) -> String {
    let url = redact_password_parameter(url);
    let Some(scheme_end) = url.find("://") else {
        return url;
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
        _ => url,
    }
}

/// `...password=SECRET...` -> `...password=***...`, in a query string
/// (ended by `&`) or a keyword string (ended by a space, or quoted).
fn redact_password_parameter(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    let mut rest = url;
    while let Some(at) = rest.find("password") {
        let before_ok = at == 0 || matches!(rest.as_bytes()[at - 1], b'?' | b'&' | b' ' | b'\t');
        out.push_str(&rest[..at + "password".len()]);
        rest = &rest[at + "password".len()..];
        let after = rest.trim_start();
        if !before_ok || !after.starts_with('=') {
            continue;
        }
        let value = after[1..].trim_start();
        out.push_str("=***");
        let end = if let Some(quoted) = value.strip_prefix('\'') {
            let mut escaped = false;
            let close = quoted
                .char_indices()
                .find(|&(_, c)| {
                    let close = c == '\'' && !escaped;
                    escaped = c == '\\' && !escaped;
                    close
                })
                .map_or(quoted.len(), |(i, _)| i + 1);
            1 + close
        } else {
            value.find(['&', ' ', '\t']).unwrap_or(value.len())
        };
        rest = &value[end.min(value.len())..];
    }
    out.push_str(rest);
    out
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

/// When an SQLite commit reaches the disk (SQLite's `synchronous` setting of
/// a writing connection). Either way a write is acknowledged only once its
/// transaction committed, and a crash of the process loses nothing
/// acknowledged. PostgreSQL's equivalent is the server's own
/// `synchronous_commit`, not ours to set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SqliteSync {
    /// Commits append to the write-ahead log, which is synced by the next
    /// checkpoint (at most about 100 ms later: the writer's checkpoint thread): a
    /// power loss or an operating-system crash may take back the commits of
    /// that time (the database stays consistent). SQLite's advice for a
    /// write-ahead log, and what a single-event write's speed is measured with.
    #[default]
    Normal,
    /// Every commit also syncs the log before it is acknowledged: an
    /// acknowledged write survives a power loss, at the price of the disk's
    /// sync on every commit (on a virtual disk 0.5-2.5 ms more a
    /// single-event write: 30-70% of its rate, by how busy the disk is).
    Full,
}

impl SqliteSync {
    /// The value of `PRAGMA synchronous` (and of the configuration key).
    pub fn as_str(self) -> &'static str {
        match self {
            SqliteSync::Normal => "normal",
            SqliteSync::Full => "full",
        }
    }
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
    /// When a commit on SQLite is on disk; ignored on PostgreSQL.
    pub sqlite_sync: SqliteSync,
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
            sqlite_sync: SqliteSync::default(),
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

    pub fn with_sqlite_sync(mut self, sync: SqliteSync) -> Self {
        self.sqlite_sync = sync;
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
        assert!(err.to_string().contains("unknown scheme `mysql:`"), "{err}");
        assert!(DatabaseUrl::parse("sqlite:").is_err());
        assert!(DatabaseUrl::parse("  ").is_err());
    }

    #[test]
    fn bare_paths_are_sqlite_files() {
        assert_eq!(
            DatabaseUrl::parse("homeserver.db").unwrap(),
            DatabaseUrl::Sqlite("homeserver.db".into())
        );
        assert_eq!(
            DatabaseUrl::parse("/var/lib/synapse/homeserver.db").unwrap(),
            DatabaseUrl::Sqlite("/var/lib/synapse/homeserver.db".into())
        );
        assert!(DatabaseUrl::parse("file:x.db").is_err());
    }

    #[test]
    fn libpq_keyword_strings_become_urls() {
        assert_eq!(
            DatabaseUrl::parse("host=/run/postgresql dbname=synapse user=synapse").unwrap(),
            DatabaseUrl::Postgres(
                "postgresql://?host=%2Frun%2Fpostgresql&dbname=synapse&user=synapse".into()
            )
        );
        assert_eq!(
            DatabaseUrl::parse(r"host = db  password='it\'s a secret' port=5433").unwrap(),
            DatabaseUrl::Postgres(
                "postgresql://?host=db&password=it%27s%20a%20secret&port=5433".into()
            )
        );
        let err = DatabaseUrl::parse("host=db password='open").unwrap_err();
        assert!(err.to_string().contains("not closed"), "{err}");
        assert!(
            !err.to_string().contains("open"),
            "the password leaked: {err}"
        );
        let err = DatabaseUrl::parse("host=db dbname").unwrap_err();
        assert!(err.to_string().contains("keyword=value"), "{err}");
    }

    #[test]
    fn redacts_passwords() {
        let url = DatabaseUrl::parse("postgres://alice:s3cret@db:5432/hs").unwrap();
        assert_eq!(url.redacted(), "postgres://alice:***@db:5432/hs");
        let url = DatabaseUrl::parse("postgres://alice@db/hs").unwrap();
        assert_eq!(url.redacted(), "postgres://alice@db/hs");
        let url =
            DatabaseUrl::parse("postgres://alice@db/hs?password=s3cret&sslmode=require").unwrap();
        assert_eq!(
            url.redacted(),
            "postgres://alice@db/hs?password=***&sslmode=require"
        );
        let url = DatabaseUrl::parse("host=db user=alice password=s3cret").unwrap();
        assert_eq!(
            url.redacted(),
            "postgresql://?host=db&user=alice&password=***"
        );
    }
}
