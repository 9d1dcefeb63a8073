//! SQLite's main-process claim: two exclusive locks, one on a file beside the
//! database's canonical path and one on the database file itself, the
//! database file's identity, and the proof a write transaction gives.
//!
//! Why two locks. The lock file, keyed on the canonical path, holds the *name*:
//! a symlink or another spelling of the path (`./x.db`, `dir/../x.db`) finds
//! the same lock, and it still keeps a newcomer out of the path after the file
//! there was deleted or replaced under the holder (which stops at its next
//! write). The lock on the database file holds the *file*, whatever its name: a
//! hard link is a second name no path resolution finds, and across processes
//! the fencing epoch cannot stop a second claim through it, because SQLite keeps
//! WAL state per name (`x.db-wal`, `x.db-shm` beside each name): a process
//! writing through the link neither sees the holder's commits nor shows it its
//! own epoch, and both would write. So the file lock refuses it instead.
//!
//! The file lock is `flock` on one descriptor of the database file, kept open
//! for the life of the process ([`DATABASE_FILES`]): closing any descriptor of
//! a file drops every POSIX (`fcntl`) lock this process holds on it, SQLite's
//! included, so a descriptor of a database file SQLite may have open is never
//! closed; releasing the claim unlocks it. Within one process the registry,
//! keyed by device and inode, refuses a second claim of the same file (`flock`
//! does not conflict with itself on one descriptor).
//!
//! The identity (device and inode) of the file claimed is checked in every
//! write transaction and after its commit: a file deleted or replaced under a
//! running process stops it before it acknowledges a write that went to a file
//! nobody will open again.

use super::ClaimHandle;
use crate::claim::{file_identity, main_process_claim, ClaimRow, ClaimState, DatabaseFile};
use crate::conn::Conn;
use crate::error::{Error, Result, ResultExt};
use diesel::prelude::*;
use std::collections::btree_map::{BTreeMap, Entry};
use std::fs::File;
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Every database file this process has claimed, by (device, inode), with the
/// descriptor its claim locks. Entries are never removed and the descriptor is
/// never closed (`ManuallyDrop`): SQLite may have the file open (see the module
/// comment). That is one descriptor per file claimed, which a main process
/// does once; it also keeps the inode from being reused for another file.
static DATABASE_FILES: Mutex<BTreeMap<(u64, u64), HeldFile>> = Mutex::new(BTreeMap::new());

struct HeldFile {
    file: ManuallyDrop<File>,
    /// Whether a claim of this process holds the lock now.
    claimed: bool,
}

fn database_files() -> MutexGuard<'static, BTreeMap<(u64, u64), HeldFile>> {
    DATABASE_FILES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// The lock on the database file itself, while a claim holds it: unlocked (not
/// closed) when dropped.
struct DatabaseFileLock {
    identity: (u64, u64),
}

impl Drop for DatabaseFileLock {
    fn drop(&mut self) {
        if let Some(held) = database_files().get_mut(&self.identity) {
            if let Err(e) = held.file.unlock() {
                log::warn!(
                    "unlocking the database file (device {} inode {}) as the main-process \
                     claim ends: {e}; the process keeps the file locked until it exits",
                    self.identity.0,
                    self.identity.1
                );
            }
            held.claimed = false;
        }
    }
}

/// What a claim holds: both locks.
struct SqliteClaim {
    _path_lock: File,
    _file_lock: DatabaseFileLock,
}

/// Takes the lock beside the canonical path of `path` (the file created empty
/// if missing: SQLite reads an empty file as an empty database), then the lock
/// on the file itself; `None` when another claim, in this process or another,
/// holds either.
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
    let path_lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening the lock file {}", lock_path.display()))?;
    match path_lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(Error::from(e).context(format!("locking {}", lock_path.display())))
        }
    }
    let Some(file_lock) = lock_database_file(&canonical)? else {
        return Ok(None);
    };
    let (device, inode) = file_lock.identity;
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
    Ok(Some(Box::new(SqliteClaim {
        _path_lock: path_lock,
        _file_lock: file_lock,
    })))
}

/// Locks the database file `canonical` names, through this process's one
/// descriptor of it (opened the first time); `None` when a claim of this
/// process or another holds it.
fn lock_database_file(canonical: &Path) -> Result<Option<DatabaseFileLock>> {
    let display = canonical.display();
    let mut files = database_files();
    let identity = file_identity(
        &std::fs::metadata(canonical).with_context(|| format!("examining {display}"))?,
    );
    let held = match files.entry(identity) {
        Entry::Occupied(held) => held.into_mut(),
        Entry::Vacant(vacant) => {
            // Never closed, whatever happens next: SQLite may have it open.
            let file = ManuallyDrop::new(
                File::open(canonical).with_context(|| format!("opening {display} to lock it"))?,
            );
            let opened = file_identity(
                &file
                    .metadata()
                    .with_context(|| format!("examining {display}"))?,
            );
            if opened != identity {
                return Err(Error::other(format!(
                    "the database file {display} was replaced while this process was claiming \
                     it; try again once nothing replaces it"
                )));
            }
            vacant.insert(HeldFile {
                file,
                claimed: false,
            })
        }
    };
    if held.claimed {
        return Ok(None);
    }
    match held.file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(Error::from(e).context(format!("locking {display}")))
        }
    }
    held.claimed = true;
    Ok(Some(DatabaseFileLock { identity }))
}

/// `<canonical path>.main-lock`.
fn lock_path(canonical: &Path) -> PathBuf {
    let mut name = canonical.as_os_str().to_owned();
    name.push(".main-lock");
    PathBuf::from(name)
}

/// Inside `BEGIN IMMEDIATE`: the file is still the one claimed, and the epoch
/// still this process's. One indexed read and one `stat`.
///
/// The read has no `LIMIT` (the id is the table's key: one row at most).
/// diesel's `first` binds its `LIMIT` as a parameter, and SQLite (3.47 on)
/// plans a bound `LIMIT` as the value it held when the statement was last
/// prepared, so binding it again expires the statement: the kept statement
/// was parsed and planned again in every write transaction.
pub(super) fn prove(conn: &mut Conn, claim: &ClaimState) -> Result<()> {
    claim.check()?;
    claim.expect_same_file()?;
    let row = main_process_claim::table
        .filter(main_process_claim::id.eq(1))
        .select(ClaimRow::as_select())
        .get_result(conn.sqlite()?)
        .context("reading the main-process claim")?;
    claim.expect_epoch(&row)
}
