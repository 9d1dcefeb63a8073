//! The schema, one migration directory per engine (`migrations/sqlite`,
//! `migrations/postgres` at the workspace root), embedded into the binary.
//!
//! Both directories hold the same versions: a change to the schema is a new version
//! in each. The writer applies pending versions at start-up; a database carrying a
//! version this binary does not know was migrated by a newer build and is refused,
//! because this build could misread or corrupt it.

use crate::error::{Error, ErrorKind, Result};
use diesel::backend::Backend;
use diesel::migration::MigrationSource;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use std::collections::BTreeSet;

pub(crate) const SQLITE: EmbeddedMigrations = embed_migrations!("../../migrations/sqlite");
pub(crate) const POSTGRES: EmbeddedMigrations = embed_migrations!("../../migrations/postgres");

fn migration_error(e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Migration(e.to_string()))
}

fn known_versions<DB: Backend>(source: &EmbeddedMigrations) -> Result<BTreeSet<String>>
where
    EmbeddedMigrations: MigrationSource<DB>,
{
    let migrations = MigrationSource::<DB>::migrations(source).map_err(migration_error)?;
    Ok(migrations
        .iter()
        .map(|m| m.name().version().to_string())
        .collect())
}

fn applied_versions<DB: Backend, C: MigrationHarness<DB>>(c: &mut C) -> Result<BTreeSet<String>> {
    let applied = c.applied_migrations().map_err(migration_error)?;
    Ok(applied.iter().map(|v| v.to_string()).collect())
}

fn refuse_newer(known: &BTreeSet<String>, applied: &BTreeSet<String>) -> Result<()> {
    let unknown: Vec<String> = applied.difference(known).cloned().collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(ErrorKind::SchemaTooNew { unknown }.into())
    }
}

/// Applies the pending migrations of `source`; returns the versions applied.
pub(crate) fn run<DB: Backend, C: MigrationHarness<DB>>(
    c: &mut C,
    source: EmbeddedMigrations,
) -> Result<Vec<String>>
where
    EmbeddedMigrations: MigrationSource<DB>,
{
    let known = known_versions::<DB>(&source)?;
    refuse_newer(&known, &applied_versions(c)?)?;
    let applied = c.run_pending_migrations(source).map_err(migration_error)?;
    Ok(applied.iter().map(|v| v.to_string()).collect())
}

/// Checks that exactly the migrations of `source` are applied.
pub(crate) fn check<DB: Backend, C: MigrationHarness<DB>>(
    c: &mut C,
    source: EmbeddedMigrations,
) -> Result<()>
where
    EmbeddedMigrations: MigrationSource<DB>,
{
    let known = known_versions::<DB>(&source)?;
    let applied = applied_versions(c)?;
    refuse_newer(&known, &applied)?;
    let missing: Vec<String> = known.difference(&applied).cloned().collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(ErrorKind::SchemaTooOld { missing }.into())
    }
}
