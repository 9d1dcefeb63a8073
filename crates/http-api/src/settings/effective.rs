//! The settings in force: flags and environment variables (as clap read them)
//! over the configuration file over the defaults, checked, and shown by
//! `hs-main config check` with secrets hidden.

use super::file::{ConfigFile, DatabaseSetting, FileKind, LogFormat};
use std::fmt::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use storage_core::config::DEFAULT_SQLITE_PATH;
use storage_core::{DatabaseConfig, DatabaseUrl, OpenMode, SqliteSync};

/// What the command line (flags, or the environment variables clap reads for
/// them) says; `None` leaves the setting to the file or the default.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub database: Option<String>,
    pub listen: Option<SocketAddr>,
    pub log_format: Option<LogFormat>,
    pub max_connections: Option<usize>,
    pub header_timeout: Option<f64>,
    pub compress_every: Option<u64>,
    pub compress_max_rows_per_second: Option<u64>,
    pub worker_main: Option<String>,
    pub worker_name: Option<String>,
    pub worker_listen: Option<SocketAddr>,
}

/// Where the API token came from (its value is never shown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// No token: the API listens on loopback addresses only.
    None,
    /// The `HS_API_TOKEN` environment variable.
    Environment,
    /// The first line of this file (`api_token_file`).
    File(PathBuf),
}

/// `hs-worker`'s own settings.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// The main process's HTTP API, if given.
    pub main: Option<String>,
    pub name: String,
    pub listen: SocketAddr,
}

/// Every setting, resolved.
#[derive(Clone)]
pub struct Settings {
    /// The file read, and what it was.
    pub file: Option<(PathBuf, FileKind)>,
    /// A database string `DatabaseUrl::parse` accepts (checked).
    pub database: String,
    /// Connections in the pool of `serve` and `hs-worker`; `None`: the engine's default.
    pub pool_size: Option<u32>,
    /// Where `hs-main serve` listens.
    pub listen: SocketAddr,
    pub token: Option<String>,
    pub token_source: TokenSource,
    pub cache_factor: f64,
    /// `log.filter` of the file (`RUST_LOG` and `-v`/`-q` go over it).
    pub log_filter: Option<String>,
    pub log_format: LogFormat,
    /// `None`: 10,000 or what the open-files limit allows.
    pub max_connections: Option<usize>,
    pub header_timeout: f64,
    pub purge_state_groups_every: u64,
    pub cache_invalidations_every: u64,
    pub cache_invalidations_keep: i64,
    /// Seconds between online compression passes; `None`: off.
    pub compress_every: Option<u64>,
    pub compress_max_rows_per_second: u64,
    pub worker: WorkerSettings,
    /// When an SQLite commit is on disk (`sqlite.synchronous`).
    pub sqlite_sync: SqliteSync,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render())
    }
}

/// The defaults, in one place (docs/configuration.md lists them too).
pub mod defaults {
    pub const LISTEN: &str = "127.0.0.1:8008";
    pub const WORKER_LISTEN: &str = "127.0.0.1:8009";
    pub const WORKER_NAME: &str = "worker";
    pub const CACHE_FACTOR: f64 = 1.0;
    pub const HEADER_TIMEOUT: f64 = 10.0;
    pub const PURGE_STATE_GROUPS_EVERY: u64 = 600;
    pub const CACHE_INVALIDATIONS_EVERY: u64 = 300;
    pub const CACHE_INVALIDATIONS_KEEP: i64 = 100_000;
    pub const COMPRESS_MAX_ROWS_PER_SECOND: u64 = 20_000;
}

impl Settings {
    /// Reads `config` (if any) and layers `overrides` over it. `token_env` is
    /// `HS_API_TOKEN`'s value, passed in so that tests need not set the
    /// process's environment.
    pub fn load(
        config: Option<&Path>,
        overrides: &Overrides,
        token_env: Option<String>,
    ) -> Result<Settings, String> {
        let (file, kind) = match config {
            Some(path) => {
                let (file, kind) = ConfigFile::load(path)?;
                (file, Some((path.to_owned(), kind)))
            }
            None => (ConfigFile::default(), None),
        };
        Self::resolve(file, kind, overrides, token_env)
    }

    /// [`Settings::load`] for a file already read.
    pub fn resolve(
        file: ConfigFile,
        kind: Option<(PathBuf, FileKind)>,
        o: &Overrides,
        token_env: Option<String>,
    ) -> Result<Settings, String> {
        let origin = match &kind {
            Some((path, _)) => format!("in {}", path.display()),
            None => String::new(),
        };
        // Relative paths in a file of ours are relative to its folder, so that
        // the file means the same whatever folder the command runs in. Synapse
        // opens the paths of its homeserver.yaml relative to the folder it runs
        // in (`sqlite3.connect`, `os.path.abspath`): so do we for that file.
        let base = match &kind {
            Some((path, FileKind::Ours)) => path.parent().map(Path::to_path_buf),
            _ => None,
        };
        let (file_database, synapse_pool) = match &file.database {
            None => (None, None),
            Some(DatabaseSetting::Url(url)) => (Some(url.clone()), None),
            Some(DatabaseSetting::Synapse(section)) => {
                let t = section.translate().map_err(|e| format!("{e} {origin}"))?;
                (Some(t.database), t.pool_size)
            }
        };
        let file_database = match (file_database, &base) {
            (Some(database), Some(base)) => Some(relative_to(base, database)),
            (database, _) => database,
        };
        let database = o
            .database
            .clone()
            .or(file_database)
            .unwrap_or_else(|| format!("sqlite:{DEFAULT_SQLITE_PATH}"));
        DatabaseUrl::parse(&database).map_err(|e| e.to_string())?;
        let (token, token_source) = match token_env.filter(|t| !t.is_empty()) {
            Some(t) => (Some(t), TokenSource::Environment),
            None => match &file.api_token_file {
                Some(path) => {
                    let path = match &base {
                        Some(base) => base.join(path),
                        None => path.clone(),
                    };
                    (Some(read_token(&path)?), TokenSource::File(path))
                }
                None => (None, TokenSource::None),
            },
        };
        let cache_factor = file.caches.global_factor.unwrap_or(defaults::CACHE_FACTOR);
        if !(cache_factor.is_finite() && cache_factor > 0.0) {
            return Err(format!(
                "caches.global_factor {origin}: {cache_factor} is not a positive number"
            ));
        }
        let header_timeout = o
            .header_timeout
            .or(file.http.header_timeout)
            .unwrap_or(defaults::HEADER_TIMEOUT);
        if !(0.1..=3600.0).contains(&header_timeout) {
            return Err(format!(
                "http.header_timeout: {header_timeout} s is outside 0.1 to 3600"
            ));
        }
        Ok(Settings {
            file: kind,
            database,
            pool_size: file.pool_size.or(synapse_pool).map(|n| n.max(1)),
            listen: o
                .listen
                .or(file.listen)
                .unwrap_or_else(|| defaults::LISTEN.parse().expect("a valid default")),
            token,
            token_source,
            cache_factor,
            log_filter: file.log.filter.clone(),
            log_format: o.log_format.or(file.log.format).unwrap_or_default(),
            max_connections: o
                .max_connections
                .or(file.http.max_connections)
                .map(|n| n.max(1)),
            header_timeout,
            purge_state_groups_every: file
                .pruning
                .state_groups_every
                .unwrap_or(defaults::PURGE_STATE_GROUPS_EVERY)
                .max(1),
            cache_invalidations_every: file
                .pruning
                .cache_invalidations_every
                .unwrap_or(defaults::CACHE_INVALIDATIONS_EVERY)
                .max(1),
            cache_invalidations_keep: file
                .pruning
                .cache_invalidations_keep
                .unwrap_or(defaults::CACHE_INVALIDATIONS_KEEP)
                .max(0),
            compress_every: o
                .compress_every
                .or(file.compression.every)
                .map(|s| s.max(1)),
            compress_max_rows_per_second: o
                .compress_max_rows_per_second
                .or(file.compression.max_rows_per_second)
                .unwrap_or(defaults::COMPRESS_MAX_ROWS_PER_SECOND),
            worker: WorkerSettings {
                main: o.worker_main.clone().or(file.worker.main.clone()),
                name: o
                    .worker_name
                    .clone()
                    .or(file.worker.name.clone())
                    .unwrap_or_else(|| defaults::WORKER_NAME.to_owned()),
                listen: o
                    .worker_listen
                    .or(file.worker.listen)
                    .unwrap_or_else(|| defaults::WORKER_LISTEN.parse().expect("a valid default")),
            },
            sqlite_sync: file.sqlite.synchronous.unwrap_or_default(),
        })
    }

    /// What both binaries do first: reads the settings (`program: ` and the
    /// error on stderr when they are wrong) and installs the logger as they
    /// and `-v`/`-q` (counted) say.
    pub fn start(
        program: &str,
        config: Option<&Path>,
        overrides: &Overrides,
        verbose: u8,
        quiet: u8,
    ) -> Option<Settings> {
        let token_env = std::env::var("HS_API_TOKEN").ok();
        let settings = match Settings::load(config, overrides, token_env) {
            Ok(settings) => settings,
            Err(e) => {
                eprintln!("{program}: {e}");
                return None;
            }
        };
        storage_core::metrics::global()
            .set_build_info(env!("CARGO_PKG_VERSION"), crate::BUILD_REVISION);
        storage_core::logging::init_with(&storage_core::logging::LogOptions {
            filter: settings.log_filter.clone(),
            verbosity: verbose.min(10) as i8 - quiet.min(10) as i8,
            json: settings.log_format == LogFormat::Json,
        });
        Some(settings)
    }

    /// The defaults, with `database` as the database: what a test or a
    /// benchmark that calls a command's function directly runs it with.
    pub fn for_database(database: &str) -> Result<Settings, String> {
        let overrides = Overrides {
            database: Some(database.to_owned()),
            ..Overrides::default()
        };
        Self::resolve(ConfigFile::default(), None, &overrides, None)
    }

    /// The database to open with `mode`, with the configured pool size.
    pub fn database_config(&self, mode: OpenMode) -> storage_core::Result<DatabaseConfig> {
        self.database_config_of(&self.database, mode)
    }

    /// Another database (`port`'s source and target) opened as the settings
    /// say: with the configured pool size.
    pub fn database_config_of(
        &self,
        database: &str,
        mode: OpenMode,
    ) -> storage_core::Result<DatabaseConfig> {
        let config = DatabaseConfig::parse(database, mode)?.with_sqlite_sync(self.sqlite_sync);
        Ok(match self.pool_size {
            Some(n) => config.with_pool_size(n),
            None => config,
        })
    }

    /// What the stores are built with.
    pub fn store_config(&self, instance_name: &str) -> storage_core::StoreConfig {
        storage_core::StoreConfig {
            cache_factor: self.cache_factor,
            instance_name: instance_name.to_owned(),
        }
    }

    /// The settings as a configuration file of ours (YAML), secrets hidden:
    /// the database's password as `***`, the token only by where it came from.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = match &self.file {
            Some((path, FileKind::Ours)) => writeln!(
                out,
                "# Settings in force: flags and environment over {} over the defaults.",
                path.display()
            ),
            Some((path, FileKind::SynapseHomeserver)) => writeln!(
                out,
                "# Settings in force: flags and environment over the database section of the \
                 Synapse configuration {} over the defaults.",
                path.display()
            ),
            None => writeln!(
                out,
                "# Settings in force: flags and environment over the defaults (no --config)."
            ),
        };
        let url = DatabaseUrl::parse(&self.database)
            .map(|u| u.redacted())
            .unwrap_or_else(|_| "(invalid)".to_owned());
        let _ = writeln!(out, "database: {}", quote(&url));
        let pool = match self.pool_size {
            Some(n) => n,
            None => DatabaseConfig::parse(&self.database, OpenMode::Writer)
                .map(|c| c.pool_size)
                .unwrap_or_default(),
        };
        let _ = writeln!(out, "pool_size: {pool}");
        let _ = writeln!(out, "listen: {}", quote(&self.listen.to_string()));
        let _ = match &self.token_source {
            TokenSource::None => writeln!(
                out,
                "# api token: none (the API listens on loopback addresses only)"
            ),
            TokenSource::Environment => writeln!(out, "# api token: from HS_API_TOKEN (hidden)"),
            TokenSource::File(path) => writeln!(
                out,
                "api_token_file: {}  # token hidden",
                quote(&path.display().to_string())
            ),
        };
        let _ = writeln!(out, "caches:\n  global_factor: {}", self.cache_factor);
        let _ = writeln!(out, "log:");
        if let Some(filter) = &self.log_filter {
            let _ = writeln!(out, "  filter: {}", quote(filter));
        }
        let _ = writeln!(
            out,
            "  format: {}",
            match self.log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            }
        );
        let _ = writeln!(out, "http:");
        let _ = match self.max_connections {
            Some(n) => writeln!(out, "  max_connections: {n}"),
            None => writeln!(
                out,
                "  # max_connections: 10000, or fewer under the open-files limit"
            ),
        };
        let _ = writeln!(out, "  header_timeout: {}", self.header_timeout);
        let _ = writeln!(
            out,
            "pruning:\n  state_groups_every: {}\n  cache_invalidations_every: {}\n  cache_invalidations_keep: {}",
            self.purge_state_groups_every, self.cache_invalidations_every, self.cache_invalidations_keep
        );
        let _ = writeln!(out, "compression:");
        let _ = match self.compress_every {
            Some(s) => writeln!(out, "  every: {s}"),
            None => writeln!(out, "  # every: off"),
        };
        let _ = writeln!(
            out,
            "  max_rows_per_second: {}",
            self.compress_max_rows_per_second
        );
        let _ = writeln!(out, "worker:");
        if let Some(main) = &self.worker.main {
            let _ = writeln!(out, "  main: {}", quote(main));
        }
        let _ = writeln!(out, "  name: {}", quote(&self.worker.name));
        let _ = writeln!(out, "  listen: {}", quote(&self.worker.listen.to_string()));
        let _ = writeln!(out, "sqlite:\n  synchronous: {}", self.sqlite_sync.as_str());
        out
    }
}

/// A YAML double-quoted string.
fn quote(s: &str) -> String {
    format!("{s:?}")
}

/// `database` with a relative SQLite path made relative to `base` instead
/// (any other database string as it is).
fn relative_to(base: &Path, database: String) -> String {
    match DatabaseUrl::parse(&database) {
        Ok(DatabaseUrl::Sqlite(path)) if path.is_relative() => {
            format!("sqlite:{}", base.join(path).display())
        }
        _ => database,
    }
}

/// The token in `path`: its first line, trimmed, not empty.
fn read_token(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("api_token_file {}: {e}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.is_empty() {
        return Err(format!(
            "api_token_file {}: the file is empty (the token is its first line)",
            path.display()
        ));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(yaml: &str, o: &Overrides) -> Result<Settings, String> {
        let (file, kind) = ConfigFile::parse(yaml)?;
        Settings::resolve(file, Some(("test.yaml".into(), kind)), o, None)
    }

    #[test]
    fn flags_win_over_the_file_which_wins_over_defaults() {
        let yaml =
            "database: sqlite:/srv/file.db\nlisten: 127.0.0.1:9000\nhttp:\n  header_timeout: 3\n";
        let s = resolve(yaml, &Overrides::default()).unwrap();
        assert_eq!(s.database, "sqlite:/srv/file.db");
        assert_eq!(s.listen.port(), 9000);
        assert_eq!(s.header_timeout, 3.0);
        assert_eq!(
            s.purge_state_groups_every,
            defaults::PURGE_STATE_GROUPS_EVERY
        );
        let o = Overrides {
            database: Some("sqlite:/srv/flag.db".into()),
            listen: Some("127.0.0.1:9001".parse().unwrap()),
            ..Overrides::default()
        };
        let s = resolve(yaml, &o).unwrap();
        assert_eq!(s.database, "sqlite:/srv/flag.db");
        assert_eq!(s.listen.port(), 9001);
        let s = resolve("", &Overrides::default()).unwrap();
        assert_eq!(s.database, format!("sqlite:{DEFAULT_SQLITE_PATH}"));
        assert_eq!(s.listen.to_string(), defaults::LISTEN);
    }

    #[test]
    fn render_hides_secrets() {
        let o = Overrides {
            database: Some("postgres://alice:s3cret@db/hs".into()),
            ..Overrides::default()
        };
        let (file, kind) = ConfigFile::parse("").unwrap();
        let s = Settings::resolve(
            file,
            Some(("x.yaml".into(), kind)),
            &o,
            Some("tok-123".into()),
        )
        .unwrap();
        let text = s.render();
        assert!(
            !text.contains("s3cret") && !text.contains("tok-123"),
            "{text}"
        );
        assert!(text.contains("postgres://alice:***@db/hs"), "{text}");
        assert!(text.contains("HS_API_TOKEN"), "{text}");
        // What it prints reads back as a configuration file.
        ConfigFile::parse(&text).unwrap();
    }

    /// SQLite commits leave the log's sync to checkpoints by default;
    /// `sqlite.synchronous: full` reaches the database config, reads back
    /// from what `config check` prints, and a wrong value names the key.
    #[test]
    fn sqlite_commits_are_synced_when_the_file_says_full() {
        let mode = OpenMode::Writer;
        let s = resolve("", &Overrides::default()).unwrap();
        assert_eq!(s.sqlite_sync, SqliteSync::Normal);
        assert_eq!(
            s.database_config(mode).unwrap().sqlite_sync,
            SqliteSync::Normal
        );
        let s = resolve("sqlite:\n  synchronous: full\n", &Overrides::default()).unwrap();
        assert_eq!(
            s.database_config(mode).unwrap().sqlite_sync,
            SqliteSync::Full
        );
        let back = resolve(&s.render(), &Overrides::default()).unwrap();
        assert_eq!(back.sqlite_sync, SqliteSync::Full);
        let err = resolve("sqlite:\n  synchronous: off\n", &Overrides::default()).unwrap_err();
        assert!(
            err.contains("sqlite.synchronous") && err.contains("line 2"),
            "{err}"
        );
    }

    /// In a file of ours relative paths are relative to its folder; in a
    /// Synapse homeserver.yaml, to the folder the command runs in (as Synapse).
    #[test]
    fn relative_paths_resolve_against_the_folder_of_a_file_of_ours() {
        let at = |yaml: &str, path: &str| {
            let (file, kind) = ConfigFile::parse(yaml).unwrap();
            Settings::resolve(file, Some((path.into(), kind)), &Overrides::default(), None)
                .unwrap()
                .database
        };
        assert_eq!(
            at("database: sqlite:data/hs.db\n", "/etc/hs/hs.yaml"),
            "sqlite:/etc/hs/data/hs.db"
        );
        assert_eq!(
            at("database: hs.db\n", "/etc/hs/hs.yaml"),
            "sqlite:/etc/hs/hs.db"
        );
        assert_eq!(
            at("database: sqlite:/srv/hs.db\n", "/etc/hs/hs.yaml"),
            "sqlite:/srv/hs.db"
        );
        assert_eq!(
            at("database: postgres://h/db\n", "/etc/hs/hs.yaml"),
            "postgres://h/db"
        );
        assert_eq!(
            at(
                "database:\n  name: sqlite3\n  args:\n    database: hs.db\n",
                "/etc/hs/hs.yaml"
            ),
            "sqlite:/etc/hs/hs.db"
        );
        let synapse = "server_name: x\ndatabase:\n  name: sqlite3\n  args:\n    database: hs.db\n";
        assert_eq!(at(synapse, "/etc/synapse/homeserver.yaml"), "sqlite:hs.db");
        // The token file too; a flag's database stays relative to the folder
        // the command runs in.
        let dir = std::env::temp_dir().join(format!("hs-settings-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("conf")).unwrap();
        std::fs::write(dir.join("conf/token"), "tok\n").unwrap();
        let (file, kind) = ConfigFile::parse("api_token_file: token\n").unwrap();
        let o = Overrides {
            database: Some("sqlite:flag.db".into()),
            ..Overrides::default()
        };
        let s = Settings::resolve(file, Some((dir.join("conf/hs.yaml"), kind)), &o, None);
        let _ = std::fs::remove_dir_all(&dir);
        let s = s.unwrap();
        assert_eq!(s.token.as_deref(), Some("tok"));
        assert_eq!(s.token_source, TokenSource::File(dir.join("conf/token")));
        assert_eq!(s.database, "sqlite:flag.db");
    }

    #[test]
    fn a_bad_database_string_is_refused() {
        let err = resolve("database: mysql://x\n", &Overrides::default()).unwrap_err();
        assert!(err.contains("mysql"), "{err}");
    }
}
