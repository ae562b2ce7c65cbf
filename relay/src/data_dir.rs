//! The relay's data directory: the database, and a lock file that makes one
//! relay its owner and tells others where that relay's API is.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The database file, inside the data directory.
pub const DATABASE_FILE: &str = "ferry.db";
/// The lock file; while a relay holds it, it contains that relay's API URL.
pub const LOCK_FILE: &str = "relay.lock";

/// Why a data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// It could not be created or written.
    #[error("the data directory {path} is not writable ({source}): pass --data-dir with a directory this user may write")]
    NotWritable {
        /// The directory.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// Another relay holds it.
    #[error("another relay already uses the data directory {path}{}: stop it, or pass another --data-dir", running.as_deref().map(|url| format!(" (its API is at {url})")).unwrap_or_default())]
    InUse {
        /// The directory.
        path: PathBuf,
        /// The API URL the other relay announced, if any.
        running: Option<String>,
    },
}

impl From<DataDirError> for std::io::Error {
    fn from(err: DataDirError) -> Self {
        let kind = match &err {
            DataDirError::NotWritable { source, .. } => source.kind(),
            DataDirError::InUse { .. } => std::io::ErrorKind::AddrInUse,
        };
        std::io::Error::new(kind, err)
    }
}

/// A data directory this relay owns until it is dropped.
#[derive(Debug)]
pub struct DataDir {
    /// Where it is.
    path: PathBuf,
    /// The held lock; the operating system releases it when the process
    /// ends, however it ends.
    lock: File,
}

impl DataDir {
    /// Creates `path` if needed and takes its lock.
    pub fn open(path: &Path) -> Result<Self, DataDirError> {
        let not_writable = |source| DataDirError::NotWritable {
            path: path.to_owned(),
            source,
        };
        if !path.exists() {
            // The log holds what callers sent, secrets included: only this
            // user may read it. A directory the operator made keeps its mode.
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            builder.create(path).map_err(not_writable)?;
        }
        let lock = private_file()
            .read(true)
            .truncate(false)
            .open(path.join(LOCK_FILE))
            .map_err(not_writable)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(DataDirError::InUse {
                    path: path.to_owned(),
                    running: running_relay(path),
                })
            }
            Err(std::fs::TryLockError::Error(err)) => return Err(not_writable(err)),
        }
        // A directory that takes the lock file may still refuse new files
        // (a read-only mount keeps an old one); find out now, not at the
        // first capture.
        let probe = path.join(".write-check");
        File::create(&probe)
            .and_then(|mut f| f.write_all(b"ok"))
            .map_err(not_writable)?;
        let _ = std::fs::remove_file(&probe);
        // SQLite gives its journal files the database's mode: made here
        // first, the database is private and so are they.
        private_file()
            .truncate(false)
            .open(path.join(DATABASE_FILE))
            .map_err(not_writable)?;
        Ok(Self {
            path: path.to_owned(),
            lock,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The database file.
    pub fn database(&self) -> PathBuf {
        self.path.join(DATABASE_FILE)
    }

    /// Writes the relay's API URL into the lock file for other programs.
    pub fn announce(&mut self, api_url: &str) -> std::io::Result<()> {
        self.lock.set_len(0)?;
        self.lock.rewind()?;
        self.lock.write_all(api_url.as_bytes())?;
        self.lock.flush()
    }
}

/// Options that create a file only this user may read and write.
fn private_file() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.write(true).create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}

/// The API URL of the relay that holds `path`, if one does.
pub fn running_relay(path: &Path) -> Option<String> {
    let mut file = File::open(path.join(LOCK_FILE)).ok()?;
    match file.try_lock_shared() {
        // Nobody holds it: no relay is running there.
        Ok(()) => None,
        Err(_) => {
            let mut url = String::new();
            file.read_to_string(&mut url).ok()?;
            let url = url.trim();
            (!url.is_empty()).then(|| url.to_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{running_relay, DataDir, DataDirError};

    #[test]
    fn one_relay_owns_a_data_directory_and_announces_its_api() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut first = DataDir::open(dir.path()).expect("first owner");
        assert_eq!(running_relay(dir.path()), None, "nothing announced yet");
        first.announce("http://127.0.0.1:9").expect("announce");
        assert_eq!(
            running_relay(dir.path()).as_deref(),
            Some("http://127.0.0.1:9")
        );
        match DataDir::open(dir.path()) {
            Err(DataDirError::InUse { running, .. }) => {
                assert_eq!(running.as_deref(), Some("http://127.0.0.1:9"))
            }
            other => panic!("a second owner must be refused, got {other:?}"),
        }
        drop(first);
        assert_eq!(running_relay(dir.path()), None);
        DataDir::open(dir.path()).expect("free again once the owner is gone");
    }

    #[cfg(unix)]
    #[test]
    fn a_new_data_directory_and_its_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let parent = tempfile::tempdir().expect("temp dir");
        let path = parent.path().join("data");
        let dir = DataDir::open(&path).expect("data dir");
        let mode = |p: &std::path::Path| {
            std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
        };
        assert_eq!(mode(&path), 0o700);
        assert_eq!(mode(&dir.database()), 0o600);
        assert_eq!(mode(&path.join(super::LOCK_FILE)), 0o600);
    }

    #[test]
    fn an_unwritable_directory_is_a_clear_error() {
        let err =
            DataDir::open(std::path::Path::new("/proc/ferry-data")).expect_err("not writable");
        assert!(err.to_string().contains("--data-dir"), "{err}");
    }
}
