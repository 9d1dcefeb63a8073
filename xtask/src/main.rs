//! Developer workflows, in Rust rather than shell scripts:
//!
//! - `cargo xtask test [-- CARGO-TEST-ARGS]`: the crate graph and migrations
//!   checked against the architecture's layers, format check, clippy with warnings as
//!   errors, then the whole test suite on SQLite and on a throwaway PostgreSQL
//!   cluster started here and removed afterwards (also when the run fails). Built
//!   without incremental caches, to keep a fresh build's disk use down.
//! - `cargo xtask check`: only the crate-graph and migrations checks.
//! - `cargo xtask bench [NAME]`: the benchmarks (release build), on both engines.
//! - `cargo xtask postgres`: start a throwaway cluster, print its URL, keep it
//!   running until Enter is pressed (for running single tests by hand).

mod layers;
mod postgres;

use std::process::{Command, ExitCode};

/// The variable through which tests and benchmarks find the PostgreSQL server.
const POSTGRES_URL_VAR: &str = "HS_TEST_POSTGRES_URL";

/// Benchmarks: name, the package holding it, its bench target. A name may have
/// several targets (state resolution needs the crates above storage-state).
const BENCHES: &[(&str, &str, &str)] = &[
    ("state", "storage-state", "state"),
    ("state", "main-process", "state_resolution"),
    ("persist", "main-process", "persist"),
    ("compress", "main-process", "compress"),
    ("http", "main-process", "http"),
    ("replicas", "e2e-tests", "replicas"),
    ("claim", "storage-core", "claim"),
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("check") => checks(),
        Some("bench") => bench(&args[1..]),
        Some("postgres") => hold_postgres(),
        _ => {
            eprintln!(
                "usage: cargo xtask test [-- CARGO-TEST-ARGS]\n       cargo xtask check\n       \
                 cargo xtask bench [{}]\n       cargo xtask postgres",
                {
                    let mut names: Vec<&str> = BENCHES.iter().map(|b| b.0).collect();
                    names.dedup();
                    names.join("|")
                }
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T = ()> = std::result::Result<T, String>;

/// The workspace's root folder (xtask's manifest is one level below it).
fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Cargo for the whole suite. A whole run builds every crate once, so incremental
/// compilation's caches (gigabytes for our crates) would only fill the disk, which is
/// what a fresh CI build can least spare. A caller's own `CARGO_INCREMENTAL` wins.
fn suite_cargo() -> Command {
    let mut cmd = cargo();
    if std::env::var_os("CARGO_INCREMENTAL").is_none() {
        cmd.env("CARGO_INCREMENTAL", "0");
    }
    cmd
}

/// Runs a command, failing with its description when it fails.
fn run(what: &str, cmd: &mut Command) -> Result {
    eprintln!("xtask: {what}");
    let status = cmd
        .status()
        .map_err(|e| format!("{what}: could not start: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what}: failed ({status})"))
    }
}

/// The crate graph against the layers, and the two engines' migrations.
fn checks() -> Result {
    eprintln!("xtask: checking the crate graph and the migrations");
    layers::check_crate_graph(&mut cargo())?;
    layers::check_migrations(&workspace_root())
}

fn test(args: &[String]) -> Result {
    let extra: Vec<&String> = args.iter().skip_while(|a| *a == "--").collect();
    postgres::ensure_libpq()?;
    checks()?;
    run(
        "cargo fmt --check",
        suite_cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    run(
        "cargo clippy (warnings are errors)",
        suite_cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    // Build before starting the server so that it does not idle through compilation;
    // the binaries too, which the end-to-end tests run as processes.
    run(
        "building the binaries",
        suite_cargo().args(["build", "--workspace", "--bins", "--locked"]),
    )?;
    run(
        "building the tests",
        suite_cargo().args(["test", "--workspace", "--locked", "--no-run"]),
    )?;
    let cluster = postgres::Cluster::start()?;
    let mut cmd = suite_cargo();
    cmd.args(["test", "--workspace", "--locked"])
        .args(&extra)
        .env(POSTGRES_URL_VAR, cluster.url("postgres"));
    let outcome = run("cargo test (SQLite and PostgreSQL)", &mut cmd);
    drop(cluster);
    outcome
}

fn bench(args: &[String]) -> Result {
    let selected: Vec<&(&str, &str, &str)> = match args.first() {
        None => BENCHES.iter().collect(),
        Some(name) => {
            let found: Vec<_> = BENCHES.iter().filter(|b| b.0 == name).collect();
            if found.is_empty() {
                return Err(format!("unknown benchmark {name:?}; known: {}", {
                    let mut names: Vec<&str> = BENCHES.iter().map(|b| b.0).collect();
                    names.dedup();
                    names.join(", ")
                }));
            }
            found
        }
    };
    postgres::ensure_libpq()?;
    // The replicas benchmark runs the release binaries as processes.
    run(
        "building the release binaries",
        cargo().args(["build", "--release", "--workspace", "--bins", "--locked"]),
    )?;
    for (name, package, target) in &selected {
        run(
            &format!("building benchmark {name}"),
            cargo().args([
                "bench", "--locked", "-p", package, "--bench", target, "--no-run",
            ]),
        )?;
    }
    let cluster = postgres::Cluster::start()?;
    let mut outcome = Ok(());
    for (name, package, target) in selected {
        let mut cmd = cargo();
        cmd.args(["bench", "--locked", "-p", package, "--bench", target])
            .env(POSTGRES_URL_VAR, cluster.url("postgres"));
        outcome = run(&format!("benchmark {name}"), &mut cmd);
        if outcome.is_err() {
            break;
        }
    }
    drop(cluster);
    outcome
}

fn hold_postgres() -> Result {
    let cluster = postgres::Cluster::start()?;
    println!("{POSTGRES_URL_VAR}={}", cluster.url("postgres"));
    println!("press Enter to stop the cluster");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    drop(cluster);
    Ok(())
}
