//! Synapse's `database:` section (`name: psycopg2` or `name: sqlite3`, with
//! `args`), as found in a `homeserver.yaml`, turned into a database string of
//! ours. psycopg2 hands its args to libpq as connection keywords, so they
//! become the same keywords here (`database` is psycopg2's spelling of
//! `dbname`); `cp_min`/`cp_max` are Synapse's pool bounds, and `cp_max`
//! sizes our pool when the configuration does not.

use serde::Deserialize;
use std::collections::BTreeMap;

/// The `database:` section of a Synapse configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct SynapseDatabase {
    /// `psycopg2` (PostgreSQL) or `sqlite3` (Synapse's default when absent).
    #[serde(default = "default_name")]
    pub name: String,
    /// psycopg2: libpq keywords plus `cp_min`/`cp_max`; sqlite3: `database`.
    #[serde(default)]
    pub args: BTreeMap<String, serde_yaml_ng::Value>,
    // Synapse's own settings of the section (`txn_limit`, `allow_unsafe_locale`,
    // ...) do not apply here and are ignored, so a homeserver.yaml reads as it is.
}

/// What a Synapse database section stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translated {
    /// A database string [`storage_core::DatabaseUrl::parse`] reads.
    pub database: String,
    /// Synapse's `cp_max`, when given.
    pub pool_size: Option<u32>,
}

fn default_name() -> String {
    "sqlite3".to_owned()
}

impl SynapseDatabase {
    /// The section Synapse makes of a `database_path`: an SQLite file.
    pub fn from_database_path(path: &str) -> SynapseDatabase {
        SynapseDatabase {
            name: default_name(),
            args: [("database".to_owned(), path.into())].into(),
        }
    }

    /// The database string, or why the section cannot be used.
    pub fn translate(&self) -> Result<Translated, String> {
        match self.name.as_str() {
            "psycopg2" => self.psycopg2(),
            "sqlite3" => self.sqlite3(),
            other => Err(format!(
                "database.name: `{other}` is not a Synapse database driver; expected `psycopg2` or `sqlite3`"
            )),
        }
    }

    fn psycopg2(&self) -> Result<Translated, String> {
        let mut pool_size = None;
        let mut pairs = Vec::new();
        for (key, value) in &self.args {
            let value = scalar(key, value)?;
            match key.as_str() {
                "cp_min" => {}
                "cp_max" => {
                    pool_size = Some(value.parse().map_err(|_| {
                        format!("database.args.cp_max: `{value}` is not a number of connections")
                    })?)
                }
                "database" => pairs.push(("dbname".to_owned(), value)),
                _ => pairs.push((key.clone(), value)),
            }
        }
        Ok(Translated {
            database: storage_core::config::postgres_url_from_keywords(&pairs),
            pool_size,
        })
    }

    fn sqlite3(&self) -> Result<Translated, String> {
        let path = match self.args.get("database") {
            Some(value) => scalar("database", value)?,
            None => return Err("database.args.database: missing (the SQLite file's path)".into()),
        };
        if path == ":memory:" {
            return Err(
                "database.args.database: `:memory:` is not a database that lasts; give a file path"
                    .into(),
            );
        }
        Ok(Translated {
            database: format!("sqlite:{path}"),
            pool_size: None,
        })
    }
}

/// A string, number or boolean argument as libpq would read it.
fn scalar(key: &str, value: &serde_yaml_ng::Value) -> Result<String, String> {
    use serde_yaml_ng::Value;
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(if *b { "1" } else { "0" }.to_owned()),
        _ => Err(format!(
            "database.args.{key}: expected a string or a number, found {value:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(yaml: &str) -> SynapseDatabase {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn psycopg2_args_become_libpq_keywords() {
        let db = section(
            "name: psycopg2\ntxn_limit: 10000\nargs:\n  user: synapse\n  password: 's3 cret'\n  \
             database: synapse\n  host: /run/postgresql\n  port: 5432\n  cp_min: 5\n  cp_max: 10\n",
        );
        let t = db.translate().unwrap();
        assert_eq!(
            t.database,
            "postgresql://?dbname=synapse&host=%2Frun%2Fpostgresql&password=s3%20cret&port=5432&user=synapse"
        );
        assert_eq!(t.pool_size, Some(10));
    }

    #[test]
    fn sqlite3_names_the_file() {
        let t = section("name: sqlite3\nargs:\n  database: /data/homeserver.db\n")
            .translate()
            .unwrap();
        assert_eq!(t.database, "sqlite:/data/homeserver.db");
        let err = section("name: mysql\n").translate().unwrap_err();
        assert!(err.contains("`mysql`"), "{err}");
        let err = section("name: sqlite3\n").translate().unwrap_err();
        assert!(err.contains("database.args.database"), "{err}");
    }
}
