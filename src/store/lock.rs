//! One `serve` per SQLite file. The dispatcher's caps (quota, in-flight,
//! per-chat order) live in one process's memory, so a second process on
//! the same file would double them. The first process holds an advisory
//! lock (`flock`, through `std::fs::File::try_lock`) on a separate file
//! beside the database, `<db>.lock`, for its whole life; the kernel drops
//! it when the process ends in any way, SIGKILL included, so a restart
//! never finds a stale lock. It is not a lock on the database file itself:
//! SQLite releases POSIX locks on a file whenever it closes any descriptor
//! of it, and not a pid file, which outlives a killed process.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

use super::{StoreError, StoreResult};

/// Held while it lives; dropping it (or the process ending) releases the lock.
#[derive(Debug)]
pub struct ServeLock {
    _file: File,
    path: PathBuf,
}

impl ServeLock {
    /// Takes the lock of the database at `db`, or says who holds it.
    pub fn acquire(db: &Path) -> StoreResult<Self> {
        if let Some(parent) = db.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Database(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        let mut name = db.file_name().unwrap_or_default().to_os_string();
        name.push(".lock");
        let path = db.with_file_name(name);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| {
                StoreError::Database(format!("cannot open the lock file {}: {e}", path.display()))
            })?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file, path }),
            // Conflict: the caller words what to do (serve and copy differ).
            Err(TryLockError::WouldBlock) => Err(StoreError::Conflict(format!(
                "another chatbridge is serving {} (it holds {}); stop it first, or give this one \
                 another database (storage.url). Several processes on one SQLite file would \
                 double the Market quota and break per-chat order",
                db.display(),
                path.display()
            ))),
            Err(TryLockError::Error(e)) => Err(StoreError::Database(format!(
                "cannot lock {}: {e}",
                path.display()
            ))),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
