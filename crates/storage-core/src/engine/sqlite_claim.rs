//! SQLite's main-process claim: an exclusive lock on a file beside the
//! database's canonical path, the database file's identity, and the proof a
//! write transaction gives.
//!
//! The lock file is keyed on the canonical path, so that a symlink or another
//! spelling of the path (`./x.db`, `dir/../x.db`) finds the same lock. A hard
//! link is a second name the canonical path cannot see; the fencing epoch
//! stops the first process as soon as a second one claims through it. The
//! identity (device and inode) of the file claimed is checked in every write
//! transaction and after its commit: a file deleted or replaced under a running
//! process stops it before it acknowledges a write that went to a file nobody
//! will open again.

use super::ClaimHandle;
use crate::claim::{file_identity, main_process_claim, ClaimRow, ClaimState, DatabaseFile};
use crate::conn::Conn;
use crate::error::{Error, Result, ResultExt};
use diesel::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Takes the lock beside the canonical path of `path` (created empty if
/// missing: SQLite reads an empty file as an empty database); `None` when
/// another process holds it.
pub(super) fn try_claim(path: &Path, claim: &Arc<ClaimState>) -> Result<Option<ClaimHandle>> {
    let display = path.display();
    // create_new never opens an existing database file: closing a descriptor of
    // a file drops every POSIX lock this process holds on it, SQLite's included.
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::from(e).context(format!("creating {display}"))),
    }
    let canonical = std::fs::canonicalize(path)
        .with_context(|| format!("resolving {display} to the file it names"))?;
    let lock_path = lock_path(&canonical);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening the lock file {}", lock_path.display()))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(Error::from(e).context(format!("locking {}", lock_path.display())))
        }
    }
    // The identity of the file claimed, read once the lock is held.
    let (device, inode) = file_identity(
        &std::fs::metadata(&canonical)
            .with_context(|| format!("examining {}", canonical.display()))?,
    );
    let file = DatabaseFile {
        path: path.to_owned(),
        device,
        inode,
    };
    if claim.file.set(file).is_err() {
        return Err(Error::other(format!(
            "internal: {display} was claimed twice with one claim"
        )));
    }
    Ok(Some(Box::new(lock)))
}

/// `<canonical path>.main-lock`.
fn lock_path(canonical: &Path) -> PathBuf {
    let mut name = canonical.as_os_str().to_owned();
    name.push(".main-lock");
    PathBuf::from(name)
}

/// Inside `BEGIN IMMEDIATE`: the file is still the one claimed, and the epoch
/// still this process's. One indexed read and one `stat`.
pub(super) fn prove(conn: &mut Conn, claim: &ClaimState) -> Result<()> {
    claim.check()?;
    claim.expect_same_file()?;
    let row = main_process_claim::table
        .filter(main_process_claim::id.eq(1))
        .select(ClaimRow::as_select())
        .first(conn.sqlite()?)
        .context("reading the main-process claim")?;
    claim.expect_epoch(&row)
}
