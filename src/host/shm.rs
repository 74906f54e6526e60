//! The files of a shared-memory host store, opened so that another local user cannot plant,
//! redirect or change them: created exclusively (never through a symbolic link, never over a
//! file that is there) with mode 0600, and opened only without following symbolic links, when
//! this user owns them and nobody else may write them (checked on the open descriptor, not on
//! the path), with their space reserved before anything touches their pages.

use crate::error::{Error, Result};
use std::fs::{File, Metadata, OpenOptions};
use std::io::{ErrorKind, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::Path;

fn refused(path: &Path, reason: String) -> Error {
    Error::SharedFile {
        path: path.to_owned(),
        reason,
    }
}

/// This process's effective user id.
fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// What sits at `path` where a new file was to be created.
fn describe_existing(path: &Path) -> String {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => format!(
            "a symbolic link is in the way (to {}); the store is never created through a link: remove it or choose another path",
            std::fs::read_link(path)
                .map(|t| t.display().to_string())
                .unwrap_or_else(|_| "?".into())
        ),
        Ok(m) if m.uid() != euid() => format!(
            "already exists and belongs to uid {} (this process runs as uid {}): another user holds this path; choose another path",
            m.uid(),
            euid()
        ),
        Ok(m) => format!(
            "already exists (mode {:o}): another store is published there, or a previous run left it; remove it or choose another path",
            m.mode() & 0o7777
        ),
        Err(e) => format!("already exists ({e}); remove it or choose another path"),
    }
}

/// Creates `path`, which must not exist (not even as a symbolic link), read-write with mode
/// 0600. A path taken by anything is [`Error::SharedFile`] saying what is there; other
/// failures (no such directory, no permission) are `Err(io)` for the caller to report.
pub(crate) fn create_exclusive(path: &Path) -> Result<std::result::Result<File, std::io::Error>> {
    match OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true) // O_CREAT | O_EXCL: fails on any existing name, links included
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => Ok(Ok(f)),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            Err(refused(path, describe_existing(path)))
        }
        Err(e) => Ok(Err(e)),
    }
}

/// Opens `path` read-only if it is a regular file this user owns and that neither group nor
/// others may write, without following a symbolic link and without blocking (on a planted
/// FIFO). The checks run on the open descriptor, so the file cannot be swapped between check
/// and use. A missing file is `Ok(Err(NotFound))` for the caller to explain.
pub(crate) fn open_trusted(
    path: &Path,
) -> Result<std::result::Result<(File, Metadata), std::io::Error>> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Err(e)),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(refused(
                path,
                "is a symbolic link; open the file the publisher created, not a link to it".into(),
            ));
        }
        Err(e) => return Err(Error::io("cannot be opened", path, e)),
    };
    let meta = file
        .metadata()
        .map_err(|e| Error::io("cannot be examined", path, e))?;
    if !meta.file_type().is_file() {
        return Err(refused(path, "is not a regular file".into()));
    }
    if meta.uid() != euid() {
        return Err(refused(
            path,
            format!(
                "is owned by uid {}, not by this user (uid {}): only a store published by the same user is mapped, since another user could change or truncate it under this process",
                meta.uid(),
                euid()
            ),
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(refused(
            path,
            format!(
                "is writable by group or others (mode {:o}): only a store nobody else can change is mapped; the publisher creates it with mode 0600",
                meta.mode() & 0o7777
            ),
        ));
    }
    Ok(Ok((file, meta)))
}

/// Allocates the blocks of the first `bytes` bytes of `file` now, so that a file system without
/// room says so here (ENOSPC) instead of killing the process with SIGBUS at the first touch of
/// a page it cannot back.
pub(crate) fn reserve(file: &File, bytes: usize) -> std::io::Result<()> {
    let len = libc::off_t::try_from(bytes)
        .map_err(|_| std::io::Error::new(ErrorKind::InvalidInput, "size too large for a file"))?;
    // SAFETY: the descriptor is open (borrowed from `file` for the call).
    match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) } {
        0 => Ok(()),
        err => Err(std::io::Error::from_raw_os_error(err)),
    }
}

/// Writes `contents` to `path` atomically, mode 0600: into `<path>.tmp`, created exclusively
/// (a file or link already there is [`Error::SharedFile`], and nothing is written through
/// it), then renamed over `path`. `op` names the caller in other errors.
pub(crate) fn write_private(path: &Path, contents: &[u8], op: &'static str) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let io = |e: std::io::Error| Error::io(format!("cannot write ({op})"), path, e);
    let mut file = create_exclusive(&tmp)?.map_err(io)?;
    let written = file.write_all(contents).and_then(|()| file.sync_all());
    drop(file);
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(())
}
