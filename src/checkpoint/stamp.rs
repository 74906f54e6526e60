//! What a checkpoint file looked like when a manager started reading it: its length and its
//! modification and change times, from `fstat` of the open descriptor. The disk tier reads
//! blocks from the files at every forward; a file rewritten in place since (same inode, so the
//! open descriptor sees the new bytes) would serve a mix of old and new weights. Comparing the
//! stamp after each read turns that into [`Error::Checkpoint`].
//!
//! What this catches: any change through `write`, `truncate`, `fallocate`, or to the file's
//! times, since every such change sets the change time (ctime), which no user can set back;
//! the modification time is compared as well. A change lands in the stamps when the kernel
//! records it: with `write(2)` before the new bytes can be read. Timestamps have the file
//! system's granularity (nanoseconds where the kernel gives fine-grained timestamps, as Linux
//! 6.13+ does on ext4, xfs, btrfs and tmpfs once a stamp was taken; a clock tick of a few
//! milliseconds on older kernels), so two rewrites of one file within one tick of the stamp
//! can look alike there. Writes through another process's shared writable mapping of the file
//! set the times only when the kernel writes the pages back, so they can be seen late.

use super::{Checkpoint, bad};
use crate::error::Result;
use std::os::unix::fs::MetadataExt as _;

/// One file's length, modification time and change time (seconds and nanoseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStamp {
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    /// The stamp of open file `file` (at `path`, for the error) now.
    pub(crate) fn of(file: &std::fs::File, path: &std::path::Path) -> Result<FileStamp> {
        let m = file
            .metadata()
            .map_err(|e| crate::Error::io("cannot stat", path, e))?;
        Ok(FileStamp {
            len: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }

    /// The file's length.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// What differs from `now`, in words.
    pub(crate) fn differences(&self, now: &FileStamp) -> String {
        let mut what = Vec::new();
        if self.len != now.len {
            what.push(format!("length {} -> {} bytes", self.len, now.len));
        }
        if self.mtime != now.mtime {
            what.push(format!(
                "modified {}.{:09} -> {}.{:09}",
                self.mtime.0, self.mtime.1, now.mtime.0, now.mtime.1
            ));
        }
        if self.ctime != now.ctime {
            what.push(format!(
                "changed {}.{:09} -> {}.{:09}",
                self.ctime.0, self.ctime.1, now.ctime.0, now.ctime.1
            ));
        }
        what.join(", ")
    }
}

impl Checkpoint {
    /// The stamp of file `file` (an index of [`Checkpoint::files`]) now.
    fn stamp(&self, file: usize) -> Result<FileStamp> {
        let s = &self.shards[file];
        FileStamp::of(&s.file, &s.path)
    }

    /// Every file's stamp now, in the order of [`Checkpoint::files`].
    pub(crate) fn stamps(&self) -> Result<Vec<FileStamp>> {
        (0..self.shards.len()).map(|f| self.stamp(f)).collect()
    }

    /// Checks that each of `files` still has the stamp `since` gave it; a file that changed is
    /// [`Error::Checkpoint`](crate::Error::Checkpoint) naming it, what changed, and `why` that
    /// matters (a sentence for the reader).
    pub(crate) fn check_unchanged(
        &self,
        since: &[FileStamp],
        files: impl IntoIterator<Item = usize>,
        why: &str,
    ) -> Result<()> {
        for f in files {
            let now = self.stamp(f)?;
            if now != since[f] {
                return Err(bad(
                    &self.shards[f].path,
                    format!(
                        "was changed in place ({}) {why}",
                        since[f].differences(&now)
                    ),
                ));
            }
        }
        Ok(())
    }
}
