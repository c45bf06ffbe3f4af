//! Socket paths a server owns: bound without taking the path from a live
//! server, and removed at exit only while they are still this server's.
//!
//! A socket file outlives the process that bound it. At start, a file no
//! process listens on any more (connecting is refused) is stale and
//! replaced. A file a live process accepts on is left alone and binding
//! fails with [`BindError::InUse`]: deleting it would cut that process off
//! from its clients without either side noticing (a second agent started by
//! mistake, or the new pod of a rolling update). At exit,
//! [`OwnedSocket::remove`] deletes the path only if it is still the file
//! this process created (same device, inode and change time: an inode
//! number alone is reused once a file is deleted) and no process listens
//! on it, never a newer server's.
//!
//! Checking and replacing are two steps; binders in credlet take an
//! exclusive `flock` on the socket's directory around them, so that two
//! starting at once cannot both find a stale file and one delete the
//! other's fresh socket.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

/// Why a socket path could not be bound.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// A live process accepts connections on the path.
    #[error(
        "{} is served by another running process; stop it first or choose another path",
        path.display()
    )]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Something other than a socket has the name.
    #[error("{} exists and is not a socket; refusing to replace it", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A file system or socket call failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl BindError {
    fn io(action: &'static str, path: &Path, source: io::Error) -> Self {
        Self::Io {
            action,
            path: path.to_owned(),
            source,
        }
    }
}

/// What a connection attempt says about a socket file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// A process accepts on it (or its accept queue is full).
    Live,
    /// Nobody listens: the file is left over.
    Stale,
    /// The path does not exist (any more).
    Absent,
}

/// Connects to `path` without blocking: a server whose accept queue is
/// full answers `EAGAIN` instead of making the caller wait.
pub fn probe(path: &Path) -> io::Result<Liveness> {
    use rustix::io::Errno;
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let address = SocketAddrUnix::new(path)?;
    let socket = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    match rustix::net::connect(&socket, &address) {
        Ok(()) | Err(Errno::AGAIN) | Err(Errno::INPROGRESS) => Ok(Liveness::Live),
        Err(Errno::CONNREFUSED) => Ok(Liveness::Stale),
        Err(Errno::NOENT) => Ok(Liveness::Absent),
        Err(errno) => Err(errno.into()),
    }
}

/// A socket path this process bound: its identity on disk, to remove it at
/// exit only while it is still this one.
#[derive(Debug, Clone)]
pub struct OwnedSocket {
    path: PathBuf,
    identity: Identity,
}

/// What tells one file from a later one under the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    ctime: (i64, i64),
}

impl Identity {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

impl OwnedSocket {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the path still names the socket this process bound (not
    /// removed, not replaced by another process's).
    pub fn is_current(&self) -> bool {
        std::fs::symlink_metadata(&self.path).is_ok_and(|meta| Identity::of(&meta) == self.identity)
    }

    /// Removes the path if it is still this process's socket, once this
    /// process no longer listens on it (call it after the listener is
    /// closed): a socket someone listens on then is a newer server's and
    /// stays. Returns whether it was removed.
    pub fn remove(&self) -> io::Result<bool> {
        let _lock = lock_parent(&self.path)?;
        if !self.is_current() || probe(&self.path)? == Liveness::Live {
            return Ok(false);
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(true),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(error) => Err(error),
        }
    }
}

/// Binds a Unix stream socket at `path` with permissions `mode`, creating
/// the parent directory. A stale socket file is replaced; a live one, or
/// anything that is not a socket, is an error.
pub fn bind(path: &Path, mode: u32) -> Result<(UnixListener, OwnedSocket), BindError> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent)
        .map_err(|e| BindError::io("create socket directory", parent, e))?;
    let _lock = lock_parent(path).map_err(|e| BindError::io("lock socket directory", parent, e))?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match probe(path).map_err(|e| BindError::io("connect to existing socket", path, e))? {
                Liveness::Live => {
                    return Err(BindError::InUse {
                        path: path.to_owned(),
                    });
                }
                Liveness::Stale => match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(BindError::io("remove stale socket", path, e)),
                },
                Liveness::Absent => {}
            }
        }
        Ok(_) => {
            return Err(BindError::NotASocket {
                path: path.to_owned(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(BindError::io("stat", path, e)),
    }
    let listener = UnixListener::bind(path).map_err(|e| {
        // Another binder outside credlet's lock got there first.
        if e.kind() == io::ErrorKind::AddrInUse {
            BindError::InUse {
                path: path.to_owned(),
            }
        } else {
            BindError::io("bind", path, e)
        }
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| BindError::io("chmod socket", path, e))?;
    // After the chmod, which changes the change time.
    let meta =
        std::fs::symlink_metadata(path).map_err(|e| BindError::io("stat socket", path, e))?;
    Ok((
        listener,
        OwnedSocket {
            path: path.to_owned(),
            identity: Identity::of(&meta),
        },
    ))
}

/// An exclusive lock on the socket's directory, released when dropped.
fn lock_parent(path: &Path) -> io::Result<OwnedFd> {
    use rustix::fs::{FlockOperation, Mode, OFlags};
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let dir = rustix::fs::open(
        parent,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    rustix::fs::flock(&dir, FlockOperation::LockExclusive)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn binds_and_replaces_only_stale_sockets() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sub/test.sock");
        let (listener, owned) = bind(&path, 0o600).expect("bind a fresh path");
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(probe(&path).expect("probe"), Liveness::Live);
        assert!(owned.is_current());

        // Live: refused, and the first socket still answers.
        let error = bind(&path, 0o600).expect_err("live socket");
        assert!(matches!(error, BindError::InUse { .. }), "{error}");
        assert!(owned.is_current());
        assert_eq!(probe(&path).expect("probe"), Liveness::Live);

        // Stale (the listener is gone, the file stays): replaced.
        drop(listener);
        assert_eq!(probe(&path).expect("probe"), Liveness::Stale);
        let (listener, newer) = bind(&path, 0o600).expect("replace a stale socket");
        assert!(newer.is_current());

        // The first owner's exit leaves the newer, live socket in place
        // (even where the file system gave it the old one's inode).
        assert!(!owned.remove().expect("remove"));
        assert!(newer.is_current());
        assert_eq!(probe(&path).expect("probe"), Liveness::Live);
        // Its own owner removes it once it stopped listening.
        drop(listener);
        assert!(newer.remove().expect("remove"));
        assert!(!path.exists());
        assert_eq!(probe(&path).expect("probe"), Liveness::Absent);
    }

    #[tokio::test]
    async fn a_later_file_under_the_name_is_not_the_owned_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("test.sock");
        let (listener, owned) = bind(&path, 0o600).expect("bind");
        drop(listener);
        // Moved away, not deleted: its inode stays taken.
        std::fs::rename(&path, dir.path().join("old.sock")).expect("rename");
        let (listener, _newer) = bind(&path, 0o600).expect("bind anew");
        drop(listener);
        // Stale as well, yet not the owned file.
        assert!(!owned.is_current());
        assert!(!owned.remove().expect("remove"));
        assert!(path.exists());
    }

    #[tokio::test]
    async fn other_files_are_never_replaced() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("not-a-socket");
        std::fs::write(&path, "data").expect("write");
        let error = bind(&path, 0o600).expect_err("a regular file");
        assert!(matches!(error, BindError::NotASocket { .. }), "{error}");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "data");
    }
}
