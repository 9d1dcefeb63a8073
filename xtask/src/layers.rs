//! Checks that the crate graph is the one ARCHITECTURE.md draws: each crate
//! depends only on the workspace crates its layer allows (so "a worker never
//! persists" is a property of the graph, not a convention), and both engines'
//! migration folders hold the same versions.

use crate::Result;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// For each workspace crate, the workspace crates it may depend on (normal
/// dependencies; tests and benchmarks may use more).
const ALLOWED: &[(&str, &[&str])] = &[
    ("storage-core", &[]),
    ("storage-state", &["storage-core"]),
    ("storage-events", &["storage-core", "storage-state"]),
    (
        "storage-slaved",
        &["storage-core", "storage-state", "storage-events"],
    ),
    (
        "event-context",
        &["storage-core", "storage-state", "storage-events"],
    ),
    (
        "persistence",
        &[
            "storage-core",
            "storage-state",
            "storage-events",
            "event-context",
        ],
    ),
    (
        "http-api",
        &[
            "storage-core",
            "storage-state",
            "storage-events",
            "event-context",
        ],
    ),
    (
        "main-process",
        &[
            "storage-core",
            "storage-state",
            "storage-events",
            "event-context",
            "persistence",
            "http-api",
        ],
    ),
    (
        "replica-worker",
        &[
            "storage-core",
            "storage-state",
            "storage-events",
            "storage-slaved",
            "event-context",
            "http-api",
        ],
    ),
    (
        "e2e-tests",
        &["storage-core", "storage-state", "storage-events"],
    ),
    ("xtask", &[]),
];

/// Fails naming every dependency a crate's layer forbids, and any crate this
/// table does not know.
pub fn check_crate_graph(cargo: &mut Command) -> Result {
    let out = cargo
        .args(["metadata", "--format-version", "1", "--no-deps", "--locked"])
        .output()
        .map_err(|e| format!("cargo metadata: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo metadata: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("cargo metadata: {e}"))?;
    let packages = metadata["packages"].as_array().cloned().unwrap_or_default();
    let ours: BTreeSet<&str> = packages.iter().filter_map(|p| p["name"].as_str()).collect();
    let mut wrong = Vec::new();
    for package in &packages {
        let name = package["name"].as_str().unwrap_or_default();
        let Some((_, allowed)) = ALLOWED.iter().find(|(n, _)| *n == name) else {
            wrong.push(format!(
                "{name}: a crate the layer table in xtask/src/layers.rs does not know; \
                 add it with the crates it may depend on (and to ARCHITECTURE.md)"
            ));
            continue;
        };
        for dep in package["dependencies"].as_array().into_iter().flatten() {
            let dep_name = dep["name"].as_str().unwrap_or_default();
            let normal = dep["kind"].is_null();
            if normal && ours.contains(dep_name) && !allowed.contains(&dep_name) {
                wrong.push(format!(
                    "{name} depends on {dep_name}, which its layer forbids (see ARCHITECTURE.md)"
                ));
            }
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong.join("\n"))
    }
}

/// Fails unless `migrations/sqlite` and `migrations/postgres` hold the same
/// versions (folder names), each with an up.sql.
pub fn check_migrations(root: &Path) -> Result {
    let versions = |engine: &str| -> std::result::Result<BTreeSet<String>, String> {
        let dir = root.join("migrations").join(engine);
        let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut found = BTreeSet::new();
        for entry in entries {
            let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
            if entry.path().is_dir() {
                if !entry.path().join("up.sql").is_file() {
                    return Err(format!("{} has no up.sql", entry.path().display()));
                }
                found.insert(entry.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(found)
    };
    let sqlite = versions("sqlite")?;
    let postgres = versions("postgres")?;
    if sqlite == postgres {
        return Ok(());
    }
    let only = |a: &BTreeSet<String>, b: &BTreeSet<String>| -> Vec<String> {
        a.difference(b).cloned().collect()
    };
    Err(format!(
        "migrations/sqlite and migrations/postgres differ: only in sqlite {:?}, only in postgres {:?}",
        only(&sqlite, &postgres),
        only(&postgres, &sqlite)
    ))
}
