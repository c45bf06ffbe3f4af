//! Filesystem work on a volume: the syscall seam ([`NodeSyscalls`]), the
//! symlink-refusing walk to a target directory ([`TargetDir`]), and the
//! kubelet's AtomicWriter pattern ([`write_atomically`]).
//!
//! Everything below the kubelet root is reached through directory file
//! descriptors and `*at` syscalls with `O_NOFOLLOW`, so a symlink planted in
//! a target path (or inside a volume) can never redirect a write.

use std::ffi::{CString, OsStr};
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};

use crate::error::Error;
use crate::paths::{TargetPath, os_bytes};

/// Source name of credlet's tmpfs mounts. It is what makes a mount
/// provably credlet's: the agent unmounts, and writes into, no other mount.
pub const TMPFS_SOURCE: &str = "credlet";
/// Name of the symlink that points at the current payload directory.
pub const DATA_DIR: &str = "..data";
const DATA_TMP: &str = "..data_tmp";

/// Options for the tmpfs mounted at a target path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TmpfsOptions {
    /// Size limit in bytes.
    pub size_bytes: u64,
    /// Group that may enter the volume root (mode 0750) or none (0755).
    pub gid: Option<u32>,
}

/// The syscalls that need privilege, behind a seam so unit tests and the
/// demo run without root. [`LinuxSyscalls`] is the real thing.
pub trait NodeSyscalls: Send + Sync + fmt::Debug + 'static {
    /// Mounts a size-limited `nodev,nosuid,noexec` tmpfs on the directory
    /// `dir` refers to.
    fn mount_tmpfs(&self, dir: BorrowedFd<'_>, options: TmpfsOptions) -> io::Result<()>;
    /// Detaches the mount whose root `dir` refers to.
    fn unmount(&self, dir: BorrowedFd<'_>) -> io::Result<()>;
    /// Changes the group of an open file (no-op for `None`).
    fn fchown(&self, fd: BorrowedFd<'_>, gid: Option<u32>) -> io::Result<()>;
    /// Sets the mode of an open file, regardless of the umask.
    fn fchmod(&self, fd: BorrowedFd<'_>, mode: u32) -> io::Result<()>;
    /// Whether volumes are real tmpfs mounts (false: plain directories).
    fn mounts(&self) -> bool;
}

/// Real mounts and ownership changes; needs `CAP_SYS_ADMIN` and
/// `CAP_CHOWN`.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxSyscalls;

fn proc_fd_path(fd: BorrowedFd<'_>) -> String {
    use std::os::fd::AsRawFd;
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

impl NodeSyscalls for LinuxSyscalls {
    fn mount_tmpfs(&self, dir: BorrowedFd<'_>, options: TmpfsOptions) -> io::Result<()> {
        use rustix::mount::{MountFlags, mount};
        let mut data = format!("size={}", options.size_bytes);
        match options.gid {
            Some(gid) => data.push_str(&format!(",mode=0750,uid=0,gid={gid}")),
            None => data.push_str(",mode=0755,uid=0,gid=0"),
        }
        let data = CString::new(data).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // Mounting through the descriptor's magic link mounts on exactly the
        // directory we opened with O_NOFOLLOW, whatever the path says now.
        mount(
            TMPFS_SOURCE,
            proc_fd_path(dir).as_str(),
            "tmpfs",
            MountFlags::NODEV | MountFlags::NOSUID | MountFlags::NOEXEC,
            data.as_c_str(),
        )?;
        Ok(())
    }

    fn unmount(&self, dir: BorrowedFd<'_>) -> io::Result<()> {
        use rustix::mount::{UnmountFlags, unmount};
        unmount(proc_fd_path(dir).as_str(), UnmountFlags::DETACH)?;
        Ok(())
    }

    fn fchown(&self, fd: BorrowedFd<'_>, gid: Option<u32>) -> io::Result<()> {
        if let Some(gid) = gid {
            rustix::fs::fchown(fd, None, Some(rustix::fs::Gid::from_raw(gid)))?;
        }
        Ok(())
    }

    fn fchmod(&self, fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
        rustix::fs::fchmod(fd, Mode::from_raw_mode(mode))?;
        Ok(())
    }

    fn mounts(&self) -> bool {
        true
    }
}

/// No mounts, no ownership changes: volumes are plain directories. For the
/// demo and for tests that run without root.
#[derive(Debug, Default, Clone, Copy)]
pub struct PlainDirectories;

impl NodeSyscalls for PlainDirectories {
    fn mount_tmpfs(&self, dir: BorrowedFd<'_>, options: TmpfsOptions) -> io::Result<()> {
        let mode = if options.gid.is_some() { 0o750 } else { 0o755 };
        rustix::fs::fchmod(dir, Mode::from_raw_mode(mode))?;
        Ok(())
    }

    fn unmount(&self, _dir: BorrowedFd<'_>) -> io::Result<()> {
        Ok(())
    }

    fn fchown(&self, _fd: BorrowedFd<'_>, _gid: Option<u32>) -> io::Result<()> {
        Ok(())
    }

    fn fchmod(&self, fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
        rustix::fs::fchmod(fd, Mode::from_raw_mode(mode))?;
        Ok(())
    }

    fn mounts(&self) -> bool {
        false
    }
}

/// Opens the kubelet root directory (absolute, already canonical).
pub fn open_root(root: &Path) -> Result<OwnedFd, Error> {
    rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io("open kubelet root", root, e.into()))
}

/// A target path's parent, reached without following symlinks, and the
/// mount point's name in it.
#[derive(Debug)]
pub struct TargetDir {
    parent: OwnedFd,
    name: Box<OsStr>,
    path: PathBuf,
}

fn is_symlink_error(e: rustix::io::Errno) -> bool {
    e == rustix::io::Errno::LOOP || e == rustix::io::Errno::NOTDIR
}

impl TargetDir {
    /// Walks from the kubelet root to the target's parent; every component
    /// must be a real directory. `Ok(None)` if the parent does not exist.
    pub fn open_parent(root: &OwnedFd, target: &TargetPath) -> Result<Option<Self>, Error> {
        let below = target.below_root();
        let (Some(name), Some(dirs)) = (below.file_name(), below.parent()) else {
            return Err(Error::UnsafeTarget {
                path: target.as_path().to_owned(),
                component: String::new(),
            });
        };
        let unsafe_target = |component: String| Error::UnsafeTarget {
            path: target.as_path().to_owned(),
            component,
        };
        // One openat2 that refuses every symlink and any escape from the
        // root; the component-by-component walk is the fallback for
        // kernels without openat2 (before 5.6).
        let relative: &[u8] = match os_bytes(dirs.as_os_str()) {
            b"" => b".",
            bytes => bytes,
        };
        let parent = match rustix::fs::openat2(
            root,
            relative,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::NO_SYMLINKS | ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
        ) {
            Ok(fd) => fd,
            Err(e) if e == rustix::io::Errno::NOENT => return Ok(None),
            Err(e) if is_symlink_error(e) || e == rustix::io::Errno::XDEV => {
                return Err(unsafe_target(
                    String::from_utf8_lossy(relative).into_owned(),
                ));
            }
            Err(e) if e == rustix::io::Errno::NOSYS => match walk(root, dirs, target)? {
                Some(fd) => fd,
                None => return Ok(None),
            },
            Err(e) => return Err(Error::io("open", target.as_path(), e.into())),
        };
        Ok(Some(Self {
            parent,
            name: name.into(),
            path: target.as_path().to_owned(),
        }))
    }

    /// The target path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the mount point directory if needed (mode 0750).
    pub fn create(&self) -> Result<(), Error> {
        match rustix::fs::mkdirat(
            &self.parent,
            os_bytes(&self.name),
            Mode::from_raw_mode(0o750),
        ) {
            Ok(()) => Ok(()),
            Err(e) if e == rustix::io::Errno::EXIST => Ok(()),
            Err(e) => Err(Error::io("create target directory", &self.path, e.into())),
        }
    }

    /// Opens the target directory for reading and `*at` writes. `Ok(None)`
    /// if it does not exist; an error if it is a symlink or not a directory.
    pub fn open(&self) -> Result<Option<OwnedFd>, Error> {
        match rustix::fs::openat(
            &self.parent,
            os_bytes(&self.name),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => Ok(Some(fd)),
            Err(e) if e == rustix::io::Errno::NOENT => Ok(None),
            Err(e) if is_symlink_error(e) => Err(Error::UnsafeTarget {
                path: self.path.clone(),
                component: self.name.to_string_lossy().into_owned(),
            }),
            Err(e) => Err(Error::io("open target directory", &self.path, e.into())),
        }
    }

    /// What is mounted on `dir` (this target, opened): nothing, credlet's
    /// tmpfs, or anything else. A mount that can not be identified (no
    /// `/proc`, a kernel without `STATX_MNT_ID`) counts as not credlet's.
    pub fn mount_state(&self, dir: &OwnedFd) -> Result<MountState, Error> {
        use rustix::fs::{StatxAttributes, StatxFlags};
        let err = |e: rustix::io::Errno| Error::io("stat target", &self.path, e.into());
        let own = rustix::fs::fstat(dir).map_err(err)?;
        let parent = rustix::fs::fstat(&self.parent).map_err(err)?;
        let statx = rustix::fs::statx(dir, "", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID);
        // A bind mount from the same filesystem keeps the device number;
        // the mount-root attribute still tells.
        let mount_root = statx.as_ref().is_ok_and(|x| {
            x.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT)
                && x.stx_attributes.contains(StatxAttributes::MOUNT_ROOT)
        });
        if own.st_dev == parent.st_dev && !mount_root {
            return Ok(MountState::NotMounted);
        }
        let unidentified = |why: String| MountState::Foreign {
            description: format!("an unidentified mount ({why})"),
        };
        // statx has the mount id since Linux 5.8; fdinfo since 3.15.
        let mount_id = match statx {
            Ok(x) if x.stx_mask & StatxFlags::MNT_ID.bits() != 0 => Some(x.stx_mnt_id),
            _ => None,
        }
        .or_else(|| fdinfo_mount_id(dir));
        let Some(mount_id) = mount_id else {
            return Ok(unidentified("no mount id from statx or fdinfo".into()));
        };
        match std::fs::read_to_string("/proc/self/mountinfo") {
            Ok(text) => Ok(classify_mount(find_mount(&text, mount_id).as_ref())),
            Err(e) => Ok(unidentified(format!("/proc/self/mountinfo: {e}"))),
        }
    }

    /// Removes the target directory if it is empty: `Ok(true)` when it is
    /// gone (or was never there), `Ok(false)` when something is still in it
    /// or mounted on it, which is left as it is.
    pub fn remove_if_empty(&self) -> Result<bool, Error> {
        match rustix::fs::unlinkat(&self.parent, os_bytes(&self.name), AtFlags::REMOVEDIR) {
            Ok(()) => Ok(true),
            Err(e) if e == rustix::io::Errno::NOENT => Ok(true),
            Err(e)
                if e == rustix::io::Errno::NOTEMPTY
                    || e == rustix::io::Errno::EXIST
                    || e == rustix::io::Errno::BUSY =>
            {
                Ok(false)
            }
            Err(e) => Err(Error::io("remove target directory", &self.path, e.into())),
        }
    }
}

/// The mount id of an open file from `/proc/self/fdinfo`.
fn fdinfo_mount_id(fd: &OwnedFd) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("mnt_id:"))
        .and_then(|id| id.trim().parse().ok())
}

/// What covers a target directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MountState {
    /// Nothing is mounted on it.
    NotMounted,
    /// A tmpfs credlet mounted (source [`TMPFS_SOURCE`]).
    Credlet,
    /// Another mount: another driver's volume, an `emptyDir`, a bind mount,
    /// or one that could not be identified. Never unmounted or written.
    Foreign {
        /// What it is, for messages.
        description: String,
    },
}

/// One line of `/proc/self/mountinfo`, as far as ownership goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountFacts {
    /// The mount id (first field).
    pub id: u64,
    /// The path inside its filesystem that is mounted (`/` for a whole
    /// filesystem; a bind mount of a subdirectory shows that directory).
    pub root: String,
    /// Filesystem type.
    pub fstype: String,
    /// Mount source.
    pub source: String,
}

/// The mount with id `mount_id` in the text of a `mountinfo` file.
pub fn find_mount(mountinfo: &str, mount_id: u64) -> Option<MountFacts> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let mut fields = before.split(' ');
        let id: u64 = fields.next()?.parse().ok()?;
        if id != mount_id {
            return None;
        }
        let root = fields.nth(2)?.to_owned();
        let mut after = after.split(' ');
        Some(MountFacts {
            id,
            root,
            fstype: after.next()?.to_owned(),
            source: after.next()?.to_owned(),
        })
    })
}

/// Whether a mount is credlet's: a whole tmpfs whose source is
/// [`TMPFS_SOURCE`]. A bind mount of part of one is not: it may show
/// another volume's files.
pub fn classify_mount(facts: Option<&MountFacts>) -> MountState {
    match facts {
        Some(m) if m.fstype == "tmpfs" && m.source == TMPFS_SOURCE && m.root == "/" => {
            MountState::Credlet
        }
        Some(m) => MountState::Foreign {
            description: format!("a {} mount of {:?}", m.fstype, m.source),
        },
        None => MountState::Foreign {
            description: "a mount missing from /proc/self/mountinfo".into(),
        },
    }
}

/// Opens `dirs` below `root` one component at a time, each with
/// `O_NOFOLLOW`.
fn walk(root: &OwnedFd, dirs: &Path, target: &TargetPath) -> Result<Option<OwnedFd>, Error> {
    let mut current: Option<OwnedFd> = None;
    for part in dirs.iter() {
        let at = current.as_ref().map_or(root.as_fd(), AsFd::as_fd);
        match rustix::fs::openat(
            at,
            os_bytes(part),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => current = Some(fd),
            Err(e) if e == rustix::io::Errno::NOENT => return Ok(None),
            Err(e) if is_symlink_error(e) => {
                return Err(Error::UnsafeTarget {
                    path: target.as_path().to_owned(),
                    component: part.to_string_lossy().into_owned(),
                });
            }
            Err(e) => return Err(Error::io("open", target.as_path(), e.into())),
        }
    }
    match current {
        Some(fd) => Ok(Some(fd)),
        None => rustix::fs::openat(
            root,
            ".",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map(Some)
        .map_err(|e| Error::io("open", target.as_path(), e.into())),
    }
}

/// Removes what the atomic writer puts into a directory and nothing else:
/// the visible `names` where they are links through `..data`, `..data`,
/// `..data_tmp`, and `..<timestamp>` payload directories. Anything else in
/// the directory was not written by credlet and stays.
pub fn remove_payload(dir: &OwnedFd, names: &[&str]) -> io::Result<()> {
    for name in names {
        let link = format!("{DATA_DIR}/{name}");
        if let Ok(current) = rustix::fs::readlinkat(dir, *name, Vec::new())
            && current.as_bytes() == link.as_bytes()
        {
            unlink_if_present(dir, name)?;
        }
    }
    for link in [DATA_DIR, DATA_TMP] {
        if rustix::fs::readlinkat(dir, link, Vec::new()).is_ok() {
            unlink_if_present(dir, link)?;
        }
    }
    for name in list(dir)? {
        let Ok(name) = name.into_string() else {
            continue;
        };
        if is_payload_dir_name(&name) {
            remove_payload_dir(dir, &name)?;
        }
    }
    Ok(())
}

fn unlink_if_present(dir: &OwnedFd, name: &str) -> io::Result<()> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::NOENT => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Whether `name` has the shape of [`payload_dir_name`]'s names.
fn is_payload_dir_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("..") else {
        return false;
    };
    let bytes = rest.as_bytes();
    // `YYYY_MM_DD_HH_MM_SS.` then digits.
    bytes.len() > 20
        && bytes.iter().enumerate().all(|(i, b)| match i {
            4 | 7 | 10 | 13 | 16 => *b == b'_',
            19 => *b == b'.',
            _ => b.is_ascii_digit(),
        })
}

/// Removes everything inside `dir` without following symlinks.
fn clear_directory(dir: &OwnedFd) -> io::Result<()> {
    for name in list(dir)? {
        match rustix::fs::unlinkat(dir, name.as_c_str(), AtFlags::empty()) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::ISDIR || e == rustix::io::Errno::PERM => {
                let sub = rustix::fs::openat(
                    dir,
                    name.as_c_str(),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                clear_directory(&sub)?;
                rustix::fs::unlinkat(dir, name.as_c_str(), AtFlags::REMOVEDIR)?;
            }
            Err(e) if e == rustix::io::Errno::NOENT => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Names in a directory, without `.` and `..`.
fn list(dir: &OwnedFd) -> io::Result<Vec<CString>> {
    let mut names = Vec::new();
    let reader = rustix::fs::Dir::read_from(dir)?;
    for entry in reader {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

/// One file to write into a volume.
#[derive(Debug)]
pub struct Payload<'a> {
    /// Visible file name.
    pub name: &'a str,
    /// Contents.
    pub contents: &'a [u8],
    /// Mode bits.
    pub mode: u32,
}

/// What [`write_atomically`] may assume about the visible names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VisibleLinks {
    /// Check each visible name and (re)make its link: first writes,
    /// repairs, and any write after a failed one.
    Verify,
    /// The previous write in this process made the links for these very
    /// names and succeeded: a routine renewal skips checking them.
    AsWritten,
}

/// Writes a complete set of files into `dir` the way the kubelet's
/// AtomicWriter does: a fresh `..<timestamp>` directory, an atomic
/// `..data` symlink swap, and visible names that are symlinks through
/// `..data`. The previous payload directory is removed afterwards.
pub fn write_atomically(
    syscalls: &dyn NodeSyscalls,
    dir: &OwnedFd,
    files: &[Payload<'_>],
    gid: Option<u32>,
    links: VisibleLinks,
) -> io::Result<()> {
    let previous = current_payload_dir(dir)?;
    let stamp = payload_dir_name(SystemTime::now());
    let dir_mode = if gid.is_some() { 0o750 } else { 0o755 };
    rustix::fs::mkdirat(dir, stamp.as_str(), Mode::from_raw_mode(dir_mode))?;
    let payload = rustix::fs::openat(
        dir,
        stamp.as_str(),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for file in files {
        let fd = rustix::fs::openat(
            &payload,
            file.name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(file.mode),
        )?;
        // Created with its final mode: the bits we use (0400/0440/0444) are
        // never masked by a usual umask; fchmod only if one did.
        if gid.is_some() {
            syscalls.fchown(fd.as_fd(), gid)?;
        }
        if umask_strips(file.mode) {
            syscalls.fchmod(fd.as_fd(), file.mode)?;
        }
        File::from(fd).write_all(file.contents)?;
    }
    if gid.is_some() {
        syscalls.fchown(payload.as_fd(), gid)?;
    }
    if umask_strips(dir_mode) {
        syscalls.fchmod(payload.as_fd(), dir_mode)?;
    }
    drop(payload);

    // A leftover temporary link (from a killed writer) is replaced.
    match rustix::fs::symlinkat(stamp.as_str(), dir, DATA_TMP) {
        Err(e) if e == rustix::io::Errno::EXIST => {
            rustix::fs::unlinkat(dir, DATA_TMP, AtFlags::empty())?;
            rustix::fs::symlinkat(stamp.as_str(), dir, DATA_TMP)?;
        }
        other => other?,
    }
    rustix::fs::renameat(dir, DATA_TMP, dir, DATA_DIR)?;

    if links == VisibleLinks::Verify {
        ensure_visible_links(dir, &files.iter().map(|f| f.name).collect::<Vec<_>>())?;
    }
    if let Some(previous) = previous
        && previous != stamp
    {
        remove_previous_payload(dir, &previous, files)?;
    }
    Ok(())
}

/// Removes the previous payload directory, expecting the names just
/// written; anything else in it is found by listing the directory.
fn remove_previous_payload(dir: &OwnedFd, name: &str, files: &[Payload<'_>]) -> io::Result<()> {
    let sub = match rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(sub) => sub,
        Err(_) => return remove_payload_dir(dir, name),
    };
    for file in files {
        match rustix::fs::unlinkat(&sub, file.name, AtFlags::empty()) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::NOENT => {}
            Err(_) => return remove_payload_dir(dir, name),
        }
    }
    drop(sub);
    match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::NOENT => Ok(()),
        // Other names than this write's: list and remove them.
        Err(_) => remove_payload_dir(dir, name),
    }
}

/// Makes every visible name a symlink to `..data/<name>` (creating or
/// replacing what is there). Returns how many links were (re)made.
pub fn ensure_visible_links(dir: &OwnedFd, names: &[&str]) -> io::Result<usize> {
    let mut made = 0;
    for name in names {
        let link = format!("{DATA_DIR}/{name}");
        match rustix::fs::readlinkat(dir, *name, Vec::new()) {
            Ok(current) if current.as_bytes() == link.as_bytes() => continue,
            Ok(_) => rustix::fs::unlinkat(dir, *name, AtFlags::empty())?,
            Err(e) if e == rustix::io::Errno::NOENT => {}
            // Not a symlink (EINVAL): something else squats on the name.
            Err(e) if e == rustix::io::Errno::INVAL => {
                remove_payload_dir(dir, name)?;
            }
            Err(e) => return Err(e.into()),
        }
        rustix::fs::symlinkat(link.as_str(), dir, *name)?;
        made += 1;
    }
    Ok(made)
}

/// The process umask, read once (reading it means setting it, so it is
/// restored immediately, before any other thread creates files).
fn umask() -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        let old = rustix::process::umask(Mode::from_raw_mode(0o022));
        rustix::process::umask(old);
        old.bits()
    })
}

fn umask_strips(mode: u32) -> bool {
    mode & umask() != 0
}

/// Removes payload directories and temporary links that `..data` does not
/// point at: leftovers of a writer that was killed mid-way.
pub fn remove_stale_payloads(dir: &OwnedFd) -> io::Result<usize> {
    let current = current_payload_dir(dir)?;
    let mut removed = 0;
    for name in list(dir)? {
        let Ok(name) = name.into_string() else {
            continue;
        };
        if name == DATA_DIR || !name.starts_with("..") {
            continue;
        }
        if name == DATA_TMP {
            rustix::fs::unlinkat(dir, DATA_TMP, AtFlags::empty())?;
            removed += 1;
        } else if Some(&name) != current.as_ref() {
            remove_payload_dir(dir, &name)?;
            removed += 1;
        }
    }
    Ok(removed)
}

fn remove_payload_dir(dir: &OwnedFd, name: &str) -> io::Result<()> {
    match rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(sub) => {
            clear_directory(&sub)?;
            rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?;
        }
        // A non-directory squatting on a reserved name: just unlink it.
        Err(e) if is_symlink_error(e) => rustix::fs::unlinkat(dir, name, AtFlags::empty())?,
        Err(e) if e == rustix::io::Errno::NOENT => {}
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// The payload directory `..data` points at, if it is a plain `..name`.
fn current_payload_dir(dir: &OwnedFd) -> io::Result<Option<String>> {
    match rustix::fs::readlinkat(dir, DATA_DIR, Vec::new()) {
        Ok(target) => {
            let target = target.into_string().ok();
            Ok(target.filter(|t| t.starts_with("..") && !t.contains('/') && t != DATA_DIR))
        }
        Err(e) if e == rustix::io::Errno::NOENT || e == rustix::io::Errno::INVAL => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Reads the current payload's files by name, resolving `..data` ourselves
/// and refusing symlinks. `Ok(None)` if there is no complete payload.
pub fn read_current(dir: &OwnedFd, names: &[&str]) -> io::Result<Option<Vec<Vec<u8>>>> {
    let Some(current) = current_payload_dir(dir)? else {
        return Ok(None);
    };
    let payload = match rustix::fs::openat(
        dir,
        current.as_str(),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(e) if e == rustix::io::Errno::NOENT || is_symlink_error(e) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let fd = match rustix::fs::openat(
            &payload,
            *name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(e) if e == rustix::io::Errno::NOENT || is_symlink_error(e) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut buf = Vec::new();
        File::from(fd).take(1 << 20).read_to_end(&mut buf)?;
        out.push(buf);
    }
    Ok(Some(out))
}

/// Whether `..data` exists (the cheap republish check).
pub fn has_payload(dir: &OwnedFd) -> bool {
    matches!(current_payload_dir(dir), Ok(Some(_)))
}

/// `..YYYY_MM_DD_HH_MM_SS.<nanoseconds><random>`, like the kubelet's names.
fn payload_dir_name(now: SystemTime) -> String {
    let t = time::OffsetDateTime::from(now);
    format!(
        "..{:04}_{:02}_{:02}_{:02}_{:02}_{:02}.{:09}{:04}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.nanosecond(),
        fastrand::u16(..10_000)
    )
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    fn open_dir(path: &Path) -> OwnedFd {
        rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .expect("open")
    }

    fn payload<'a>(key: &'a [u8], crt: &'a [u8]) -> [Payload<'a>; 2] {
        [
            Payload {
                name: "tls.key",
                contents: key,
                mode: 0o400,
            },
            Payload {
                name: "tls.crt",
                contents: crt,
                mode: 0o444,
            },
        ]
    }

    #[test]
    fn leftovers_and_changed_names_are_cleaned_up() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = open_dir(tmp.path());
        // A killed writer left its temporary link behind.
        std::os::unix::fs::symlink("..gone", tmp.path().join(DATA_TMP)).expect("leftover");
        let three = [
            Payload {
                name: "a",
                contents: b"1",
                mode: 0o444,
            },
            Payload {
                name: "b",
                contents: b"2",
                mode: 0o444,
            },
            Payload {
                name: "c",
                contents: b"3",
                mode: 0o444,
            },
        ];
        write_atomically(&PlainDirectories, &dir, &three, None, VisibleLinks::Verify)
            .expect("write 1");
        assert!(std::fs::symlink_metadata(tmp.path().join(DATA_TMP)).is_err());
        // The next write has fewer names: the old payload is still removed
        // completely, and the new names are linked.
        write_atomically(
            &PlainDirectories,
            &dir,
            &three[..1],
            None,
            VisibleLinks::Verify,
        )
        .expect("write 2");
        let mut payload_dirs: Vec<String> = std::fs::read_dir(tmp.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("..") && n != DATA_DIR)
            .collect();
        payload_dirs.sort();
        assert_eq!(payload_dirs.len(), 1, "{payload_dirs:?}");
        assert_eq!(std::fs::read(tmp.path().join("a")).expect("a"), b"1");
    }

    #[test]
    fn atomic_writer_swaps_and_cleans_up() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = open_dir(tmp.path());
        write_atomically(
            &PlainDirectories,
            &dir,
            &payload(b"k1", b"c1"),
            None,
            VisibleLinks::Verify,
        )
        .expect("write 1");
        assert_eq!(
            std::fs::read(tmp.path().join("tls.key")).expect("read"),
            b"k1"
        );
        let first = std::fs::read_link(tmp.path().join(DATA_DIR)).expect("link");
        write_atomically(
            &PlainDirectories,
            &dir,
            &payload(b"k2", b"c2"),
            None,
            VisibleLinks::AsWritten,
        )
        .expect("write 2");
        assert_eq!(
            std::fs::read(tmp.path().join("tls.key")).expect("read"),
            b"k2"
        );
        assert_eq!(
            std::fs::read(tmp.path().join("tls.crt")).expect("read"),
            b"c2"
        );
        let second = std::fs::read_link(tmp.path().join(DATA_DIR)).expect("link");
        assert_ne!(first, second);
        assert!(!tmp.path().join(&first).exists(), "old payload removed");
        let link = std::fs::read_link(tmp.path().join("tls.key")).expect("visible link");
        assert_eq!(link, Path::new("..data/tls.key"));
        let meta = std::fs::metadata(tmp.path().join("tls.key")).expect("meta");
        assert_eq!(meta.permissions().mode() & 0o777, 0o400);
        let read = read_current(&dir, &["tls.key", "tls.crt"])
            .expect("read")
            .expect("some");
        assert_eq!(read, vec![b"k2".to_vec(), b"c2".to_vec()]);
        // Only ..data, one payload dir and the two visible links remain.
        assert_eq!(std::fs::read_dir(tmp.path()).expect("ls").count(), 4);
    }

    #[test]
    fn stale_payloads_are_removed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = open_dir(tmp.path());
        write_atomically(
            &PlainDirectories,
            &dir,
            &payload(b"k", b"c"),
            None,
            VisibleLinks::Verify,
        )
        .expect("write");
        std::fs::create_dir(tmp.path().join("..2020_01_01_00_00_00.1")).expect("stale dir");
        std::fs::write(tmp.path().join("..2020_01_01_00_00_00.1/tls.key"), b"x").expect("stale");
        std::os::unix::fs::symlink("..2020_01_01_00_00_00.1", tmp.path().join(DATA_TMP))
            .expect("stale tmp link");
        assert_eq!(remove_stale_payloads(&dir).expect("clean"), 2);
        assert_eq!(
            std::fs::read(tmp.path().join("tls.key")).expect("read"),
            b"k"
        );
    }

    #[test]
    fn planted_symlinks_do_not_redirect() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("outside");
        let dir = open_dir(tmp.path());
        // A visible name pre-planted as a link to a file outside.
        std::os::unix::fs::symlink(outside.path().join("stolen"), tmp.path().join("tls.key"))
            .expect("plant");
        write_atomically(
            &PlainDirectories,
            &dir,
            &payload(b"k", b"c"),
            None,
            VisibleLinks::Verify,
        )
        .expect("write");
        assert!(!outside.path().join("stolen").exists());
        assert_eq!(
            std::fs::read(tmp.path().join("tls.key")).expect("read"),
            b"k"
        );
        // ..data pointing outside is not read.
        std::fs::remove_file(tmp.path().join(DATA_DIR)).expect("rm");
        std::os::unix::fs::symlink(outside.path(), tmp.path().join(DATA_DIR)).expect("plant");
        assert!(read_current(&dir, &["tls.key"]).expect("read").is_none());
    }

    #[test]
    fn target_walk_refuses_symlinks() {
        let root = tempfile::tempdir().expect("root");
        let outside = tempfile::tempdir().expect("outside");
        std::fs::create_dir_all(root.path().join("pods/uid/volumes")).expect("mkdir");
        std::os::unix::fs::symlink(outside.path(), root.path().join("pods/evil")).expect("plant");
        let root_fd = open_root(root.path()).expect("root fd");

        let via_link = TargetPath::parse(
            &format!("{}/pods/evil/mount", root.path().display()),
            root.path(),
        )
        .expect("lexically fine");
        assert!(matches!(
            TargetDir::open_parent(&root_fd, &via_link),
            Err(Error::UnsafeTarget { .. })
        ));

        std::os::unix::fs::symlink(outside.path(), root.path().join("pods/uid/volumes/mount"))
            .expect("plant final");
        let final_link = TargetPath::parse(
            &format!("{}/pods/uid/volumes/mount", root.path().display()),
            root.path(),
        )
        .expect("lexically fine");
        let target = TargetDir::open_parent(&root_fd, &final_link)
            .expect("walk")
            .expect("parent exists");
        target.create().expect("mkdir tolerates existing");
        assert!(matches!(target.open(), Err(Error::UnsafeTarget { .. })));

        let missing = TargetPath::parse(
            &format!("{}/pods/nope/volumes/mount", root.path().display()),
            root.path(),
        )
        .expect("lexically fine");
        assert!(
            TargetDir::open_parent(&root_fd, &missing)
                .expect("walk")
                .is_none()
        );

        let good = TargetPath::parse(
            &format!("{}/pods/uid/volumes/real", root.path().display()),
            root.path(),
        )
        .expect("fine");
        let target = TargetDir::open_parent(&root_fd, &good)
            .expect("walk")
            .expect("parent");
        target.create().expect("mkdir");
        let fd = target.open().expect("open").expect("exists");
        assert_eq!(
            target.mount_state(&fd).expect("stat"),
            MountState::NotMounted
        );
        let meta = std::fs::metadata(root.path().join("pods/uid/volumes/real")).expect("meta");
        assert!(meta.is_dir());
        assert_eq!(meta.uid(), rustix::process::geteuid().as_raw());
        std::fs::write(root.path().join("pods/uid/volumes/real/other"), b"x").expect("file");
        assert!(!target.remove_if_empty().expect("not empty"));
        assert!(root.path().join("pods/uid/volumes/real/other").exists());
        std::fs::remove_file(root.path().join("pods/uid/volumes/real/other")).expect("rm");
        assert!(target.remove_if_empty().expect("remove"));
        assert!(!root.path().join("pods/uid/volumes/real").exists());
        assert!(target.remove_if_empty().expect("already gone"));
    }

    /// Both sources of a mount id agree (the fallback for kernels before
    /// 5.8 gives the same answer).
    #[test]
    fn fdinfo_and_statx_give_the_same_mount_id() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = open_dir(tmp.path());
        let statx = rustix::fs::statx(
            &dir,
            "",
            AtFlags::EMPTY_PATH,
            rustix::fs::StatxFlags::MNT_ID,
        )
        .expect("statx");
        if statx.stx_mask & rustix::fs::StatxFlags::MNT_ID.bits() != 0 {
            assert_eq!(fdinfo_mount_id(&dir), Some(statx.stx_mnt_id));
        }
        assert!(fdinfo_mount_id(&dir).is_some());
    }

    /// Only a whole tmpfs named credlet's is credlet's.
    #[test]
    fn mounts_are_credlets_only_by_source_type_and_root() {
        let mountinfo = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
97 22 0:50 / /var/lib/kubelet/pods/a/volumes/kubernetes.io~csi/c/mount rw,nosuid,nodev,noexec - tmpfs credlet rw,size=1024k
98 22 0:51 / /var/lib/kubelet/pods/b/volumes/kubernetes.io~empty-dir/m rw - tmpfs tmpfs rw
99 22 0:50 /..2024_01_01_00_00_00.0000000001 /var/lib/kubelet/pods/c/x rw master:4 - tmpfs credlet rw
100 22 0:52 / /var/lib/kubelet/pods/d/volumes/kubernetes.io~csi/s/mount rw - tmpfs credlet-other rw
101 22 8:1 /srv /var/lib/kubelet/pods/e/x rw - ext4 /dev/vda rw
102 22 0:53 / /var/lib/kubelet/pods/f/x rw - fuse.credlet credlet rw
";
        let cases: &[(u64, Option<MountState>)] = &[
            (97, Some(MountState::Credlet)),
            (98, None),
            (99, None),
            (100, None),
            (101, None),
            (102, None),
            (7, None),
        ];
        for (id, expected) in cases {
            let facts = find_mount(mountinfo, *id);
            if *id != 7 {
                assert_eq!(facts.as_ref().map(|f| f.id), Some(*id));
            }
            let state = classify_mount(facts.as_ref());
            match expected {
                Some(expected) => assert_eq!(&state, expected, "mount {id}"),
                None => assert!(
                    matches!(state, MountState::Foreign { .. }),
                    "mount {id}: {state:?}"
                ),
            }
        }
        assert_eq!(
            find_mount(mountinfo, 98).map(|f| f.source).as_deref(),
            Some("tmpfs")
        );
    }

    /// Taking a plain-directory volume down removes the writer's files and
    /// nothing else.
    #[test]
    fn payload_removal_leaves_other_files() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = open_dir(tmp.path());
        write_atomically(
            &PlainDirectories,
            &dir,
            &payload(b"key", b"crt"),
            None,
            VisibleLinks::Verify,
        )
        .expect("write");
        std::fs::write(tmp.path().join("theirs.txt"), b"not ours").expect("file");
        std::fs::create_dir(tmp.path().join("..not-a-payload")).expect("dir");
        std::os::unix::fs::symlink("/etc/passwd", tmp.path().join("ca.crt")).expect("link");
        remove_payload(&dir, &["tls.key", "tls.crt", "ca.crt"]).expect("remove");
        let mut left: Vec<String> = std::fs::read_dir(tmp.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["..not-a-payload", "ca.crt", "theirs.txt"]);
        assert!(is_payload_dir_name(&payload_dir_name(SystemTime::now())));
        assert!(!is_payload_dir_name("..data"));
    }
}
