//! Records which revision of the source a build is made from, for the
//! `revision` label of `hs_build_info` on `/metrics` (docs/metrics.md):
//! `HS_GIT_REVISION` when a packager sets it, else `git rev-parse --short
//! HEAD` in a git checkout, else `unknown` (a source archive, or no git).
//!
//! It lives in http-api, the crate both binaries share and the lowest that
//! needs it, so that a new commit rebuilds this crate and the binaries
//! rather than the whole workspace.

use std::process::Command;

/// What `git ARGS` prints in this package's folder, trimmed; `None` when git
/// is missing, fails, or prints nothing.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=HS_GIT_REVISION");
    // Build again when HEAD moves: HEAD itself (a checkout, a detached HEAD)
    // and the branch it names (a commit); in a worktree these live in
    // different folders, which `--git-path` knows.
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--path-format=absolute", "--git-path", &name]) {
            if std::path::Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
    let revision = std::env::var("HS_GIT_REVISION")
        .ok()
        .filter(|r| !r.is_empty())
        .or_else(|| git(&["rev-parse", "--short", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=HS_BUILD_REVISION={revision}");
}
