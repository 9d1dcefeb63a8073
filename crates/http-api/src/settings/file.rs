//! Reading a configuration file: ours (every key known, see
//! docs/configuration.md), or a Synapse `homeserver.yaml`, recognised by its
//! `server_name`, of which only the `database:` section is read.
//!
//! Ours is strict: a key this version does not know, or a value of the wrong
//! type, is an error naming the file, the line and the key, so that a typo
//! never silently leaves a setting at its default.

use super::synapse::SynapseDatabase;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// What kind of file was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A configuration file of ours.
    Ours,
    /// A Synapse `homeserver.yaml`: only its `database:` section was read.
    SynapseHomeserver,
}

/// The file's settings, each `None` when the file does not set it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// A database string, or Synapse's `{name, args}` section.
    pub database: Option<DatabaseSetting>,
    /// Connections in the database pool of `serve` and `hs-worker`.
    pub pool_size: Option<u32>,
    /// Where `hs-main serve` listens.
    pub listen: Option<SocketAddr>,
    /// A file holding the API token (its first line); `HS_API_TOKEN` wins.
    pub api_token_file: Option<PathBuf>,
    #[serde(default)]
    pub caches: Caches,
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub http: Http,
    #[serde(default)]
    pub pruning: Pruning,
    #[serde(default)]
    pub compression: Compression,
    #[serde(default)]
    pub worker: Worker,
    #[serde(default)]
    pub sqlite: Sqlite,
}

/// `caches:`
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Caches {
    /// Multiplies every cache's default size (Synapse's `caches.global_factor`).
    pub global_factor: Option<f64>,
}

/// `log:`
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Log {
    /// Directives as `RUST_LOG` takes them; `RUST_LOG` wins.
    pub filter: Option<String>,
    /// `text` or `json`.
    pub format: Option<LogFormat>,
}

/// How log lines are written (`log.format`, or `--log-format`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `http:`
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Http {
    pub max_connections: Option<usize>,
    /// Seconds.
    pub header_timeout: Option<f64>,
}

/// `pruning:`
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Pruning {
    /// Seconds between purges of unneeded state groups.
    pub state_groups_every: Option<u64>,
    /// Seconds between prunings of the replication stream's invalidations.
    pub cache_invalidations_every: Option<u64>,
    /// Stream positions of invalidations kept for workers that fall behind.
    pub cache_invalidations_keep: Option<i64>,
}

/// `compression:`
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Compression {
    /// Seconds between passes of the online job; off when absent.
    pub every: Option<u64>,
    pub max_rows_per_second: Option<u64>,
}

/// `worker:` (read by `hs-worker` only)
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Worker {
    /// The main process's HTTP API.
    pub main: Option<String>,
    pub name: Option<String>,
    pub listen: Option<SocketAddr>,
}

/// `sqlite:` (an SQLite database only)
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Sqlite {
    /// `full` or `normal`: whether a commit is on disk before it is acknowledged.
    pub synchronous: Option<storage_core::SqliteSync>,
}

/// `database:` either as a string of ours or as Synapse's section.
#[derive(Debug, Clone, PartialEq)]
pub enum DatabaseSetting {
    Url(String),
    Synapse(SynapseDatabase),
}

// By hand rather than `#[serde(untagged)]`, which would replace the error of
// a malformed Synapse section (and its line) by "did not match any variant".
impl<'de> Deserialize<'de> for DatabaseSetting {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DatabaseVisitor;
        impl<'de> Visitor<'de> for DatabaseVisitor {
            type Value = DatabaseSetting;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a database string, or a Synapse section with `name` and `args`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DatabaseSetting, E> {
                Ok(DatabaseSetting::Url(v.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<DatabaseSetting, A::Error> {
                SynapseDatabase::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(DatabaseSetting::Synapse)
            }
        }
        deserializer.deserialize_any(DatabaseVisitor)
    }
}

/// The part of a `homeserver.yaml` we read; everything else in it is Synapse's.
#[derive(Debug, Deserialize)]
struct SynapseHomeserver {
    database: Option<SynapseDatabase>,
    /// An SQLite file, used (by Synapse, and so here) only when there is no
    /// `database:` section.
    database_path: Option<String>,
    /// Synapse's experimental several-databases form.
    databases: Option<serde_yaml_ng::Value>,
}

impl SynapseHomeserver {
    /// The database Synapse itself would open, following its `DatabaseConfig`
    /// (synapse/config/database.py): the `database:` section; else
    /// `database_path` as an SQLite file; else none (Synapse refuses to start:
    /// "No database config provided").
    fn database(self) -> Result<SynapseDatabase, String> {
        if self.databases.is_some() {
            return Err(if self.database.is_some() {
                "a Synapse homeserver.yaml with both `database:` and `databases:` \
                 (Synapse refuses it too)"
                    .to_owned()
            } else {
                "a Synapse homeserver.yaml with `databases:` (Synapse's experimental \
                 several-databases form) is not read: give the database holding the state \
                 tables with --database"
                    .to_owned()
            });
        }
        // With a section, Synapse ignores `database_path` (it warns).
        if let Some(database) = self.database {
            return Ok(database);
        }
        match self.database_path {
            Some(path) => Ok(SynapseDatabase::from_database_path(&path)),
            None => Err(
                "a Synapse homeserver.yaml (it has `server_name`) with neither a `database:` \
                 section nor `database_path`: Synapse itself refuses to start so (\"No database \
                 config provided\"); give the database with --database"
                    .to_owned(),
            ),
        }
    }
}

impl ConfigFile {
    /// Reads `path`. Errors name the file, and for a bad key its line and path.
    pub fn load(path: &Path) -> Result<(ConfigFile, FileKind), String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading the configuration file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("configuration file {}: {e}", path.display()))
    }

    /// Reads a configuration from its text.
    pub fn parse(text: &str) -> Result<(ConfigFile, FileKind), String> {
        if text.trim().is_empty() {
            return Ok((ConfigFile::default(), FileKind::Ours));
        }
        let value: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text).map_err(|e| describe(&e))?;
        let is_synapse = value
            .as_mapping()
            .is_some_and(|m| m.contains_key("server_name"));
        if is_synapse {
            let homeserver: SynapseHomeserver = strict(text)?;
            let database = homeserver.database()?;
            let file = ConfigFile {
                database: Some(DatabaseSetting::Synapse(database)),
                ..ConfigFile::default()
            };
            return Ok((file, FileKind::SynapseHomeserver));
        }
        if !value.is_mapping() {
            return Err(
                "expected a mapping of settings (`key: value` lines) at the top".to_owned(),
            );
        }
        Ok((strict(text)?, FileKind::Ours))
    }
}

/// Deserializes `text`; serde_yaml_ng's errors name the section of the key
/// that failed (`log: unknown field `colour``, `caches.global_factor:
/// invalid type`) and its place.
fn strict<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T, String> {
    serde_yaml_ng::from_str(text).map_err(|e| describe(&e))
}

/// `line 3, column 5: log: unknown field `colour`, expected ...`.
fn describe(e: &serde_yaml_ng::Error) -> String {
    let mut message = e.to_string();
    // serde_yaml_ng appends " at line L column C"; we put the place first.
    if let Some(cut) = message.find(" at line ") {
        message.truncate(cut);
    }
    match e.location() {
        Some(l) => format!("line {}, column {}: {message}", l.line(), l.column()),
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_section() {
        let (file, kind) = ConfigFile::parse(
            "database: sqlite:/srv/hs.db\npool_size: 8\nlisten: 127.0.0.1:8018\n\
             api_token_file: /etc/hs/token\ncaches:\n  global_factor: 2.5\n\
             log:\n  filter: debug\n  format: json\nhttp:\n  max_connections: 50\n  header_timeout: 2.5\n\
             pruning:\n  state_groups_every: 60\n  cache_invalidations_every: 30\n  cache_invalidations_keep: 10\n\
             compression:\n  every: 3600\n  max_rows_per_second: 100\n\
             worker:\n  main: http://127.0.0.1:8008\n  name: w1\n  listen: 127.0.0.1:8019\n",
        )
        .unwrap();
        assert_eq!(kind, FileKind::Ours);
        assert_eq!(
            file.database,
            Some(DatabaseSetting::Url("sqlite:/srv/hs.db".into()))
        );
        assert_eq!(file.caches.global_factor, Some(2.5));
        assert_eq!(file.log.format, Some(LogFormat::Json));
        assert_eq!(file.pruning.cache_invalidations_keep, Some(10));
        assert_eq!(file.worker.name.as_deref(), Some("w1"));
    }

    #[test]
    fn an_unknown_key_is_named_with_its_line() {
        let err =
            ConfigFile::parse("pool_size: 4\nlog:\n  filter: info\n  colour: true\n").unwrap_err();
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("colour"), "{err}");
        let err = ConfigFile::parse("listen: 127.0.0.1:8008\ndatabse: x\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("databse"), "{err}");
    }

    #[test]
    fn an_ill_typed_value_is_named_with_its_key_and_line() {
        let err = ConfigFile::parse("caches:\n  global_factor: lots\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("caches.global_factor"), "{err}");
        let err = ConfigFile::parse("database: sqlite:x\nlisten: not-an-address\n").unwrap_err();
        assert!(err.contains("line 2") && err.contains("listen"), "{err}");
    }

    #[test]
    fn a_homeserver_yaml_gives_its_database_section_only() {
        let (file, kind) = ConfigFile::parse(
            "server_name: example.org\nlisteners:\n  - port: 8008\n\
             database:\n  name: sqlite3\n  args:\n    database: /data/homeserver.db\n",
        )
        .unwrap();
        assert_eq!(kind, FileKind::SynapseHomeserver);
        assert!(matches!(file.database, Some(DatabaseSetting::Synapse(_))));
    }

    /// What Synapse's `DatabaseConfig` does without a `database:` section.
    #[test]
    fn a_homeserver_yaml_without_database_section_uses_database_path() {
        let database = |yaml: &str| match ConfigFile::parse(yaml)?.0.database {
            Some(DatabaseSetting::Synapse(section)) => section.translate().map(|t| t.database),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            database("server_name: example.org\ndatabase_path: /data/homeserver.db\n").unwrap(),
            "sqlite:/data/homeserver.db"
        );
        // A section wins over `database_path`, which Synapse then ignores.
        assert_eq!(
            database(
                "server_name: example.org\ndatabase_path: /data/ignored.db\n\
                 database:\n  name: sqlite3\n  args:\n    database: /data/used.db\n"
            )
            .unwrap(),
            "sqlite:/data/used.db"
        );
        // A section without `name` is sqlite3, as in Synapse.
        assert_eq!(
            database("server_name: x\ndatabase:\n  args:\n    database: a.db\n").unwrap(),
            "sqlite:a.db"
        );
        let err = ConfigFile::parse("server_name: example.org\n").unwrap_err();
        assert!(
            err.contains("database_path") && err.contains("No database config provided"),
            "{err}"
        );
        let err = database("server_name: x\ndatabases:\n  main:\n    name: sqlite3\n").unwrap_err();
        assert!(err.contains("`databases:`"), "{err}");
    }
}
