//! Safetensors checkpoints, read straight into the manager's buffers: a single file or a
//! sharded checkpoint (`*.safetensors.index.json` with its shards, as diffusers and transformers
//! write them). [`ShardedWriter`] writes one from any model's tensors.
//!
//! [`Checkpoint::open`] maps every file (`memmap2`) and parses its header (`safetensors`): the
//! parser checks that the tensors tile the data exactly and that the file is as long as its
//! header says, so a truncated file is refused here. Nothing else is read until the manager
//! initializes: [`OffloadConfig::checkpoint`](crate::OffloadConfig::checkpoint) matches the
//! model's tensors with the checkpoint's by name (after an optional rename), then block tensors
//! are read in parallel into their pinned block buffers (or, with
//! [`OffloadConfig::zero_copy`](crate::OffloadConfig::zero_copy), the mapped file's own pages
//! become the host store), and non-block tensors go to the compute device.
//!
//! Data is read with `pread` (`read_exact_at`), not through the mapping, so a file truncated
//! while it is read gives [`Error::Checkpoint`] instead of SIGBUS. The zero-copy store reads
//! through the mapping: see [`OffloadConfig::zero_copy`](crate::OffloadConfig::zero_copy) for
//! what that cannot catch.

pub(crate) mod cache;
mod matching;
mod stamp;
mod write;

pub(crate) use matching::match_tensors;
pub use matching::{CheckpointMismatch, DtypeDifference, ShapeDifference};
pub(crate) use stamp::FileStamp;
pub use write::{ShardedWriter, WrittenCheckpoint, write_sharded};

use crate::error::{Error, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::Kind;

/// One tensor of a checkpoint: where its bytes are and what they hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointTensor {
    /// The tensor's name in the file (before any rename).
    pub stored_name: String,
    /// Index of its file in [`Checkpoint::files`].
    pub file: usize,
    /// Element type as safetensors spells it (`BF16`, `F32`, ...).
    pub dtype: String,
    /// The matching tch element type, if tch has one.
    pub kind: Option<Kind>,
    /// Shape.
    pub shape: Vec<i64>,
    /// Byte offset of its data in the file (from the file's start, header included).
    pub offset: u64,
    /// Bytes of data.
    pub bytes: usize,
}

/// One file of a checkpoint, mapped.
#[derive(Debug)]
pub(crate) struct Shard {
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    pub(crate) map: Arc<Mmap>,
}

/// A safetensors checkpoint, single file or sharded: its files mapped, their headers parsed.
/// Hand it to [`OffloadConfig::checkpoint`](crate::OffloadConfig::checkpoint).
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    pub(crate) shards: Vec<Shard>,
    tensors: BTreeMap<String, CheckpointTensor>,
}

/// What a directory may hold: the shard indexes diffusers and transformers write, in the order
/// they are looked for, then any other `*.safetensors.index.json`.
const INDEX_NAMES: [&str; 2] = [
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors.index.json",
];

/// The single-file weights of a directory, looked for when it has no shard index (besides
/// them it may hold other files, e.g. inputs saved for a test).
const SINGLE_NAMES: [&str; 2] = ["diffusion_pytorch_model.safetensors", "model.safetensors"];

/// The largest shard index read (an index lists a few hundred bytes per tensor).
const MAX_INDEX_BYTES: u64 = 64 << 20;

impl Checkpoint {
    /// Opens a checkpoint: a `.safetensors` file, a `*.safetensors.index.json` shard index, or
    /// a directory holding either (a diffusers model directory such as
    /// `Wan2.1-T2V-14B-Diffusers/transformer`): its shard index
    /// (`diffusion_pytorch_model.safetensors.index.json`, `model.safetensors.index.json`, or
    /// another `*.safetensors.index.json`), else `diffusion_pytorch_model.safetensors` or
    /// `model.safetensors`, else its only `.safetensors` file. Maps every file and checks its header; a
    /// tensor that two shards both hold, a shard the index names that does not hold the
    /// tensor, a truncated file or a malformed header is [`Error::Checkpoint`].
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint> {
        let path = path.as_ref();
        let (index, files) = resolve(path)?;
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = BTreeMap::new();
        for (k, file_path) in files.iter().enumerate() {
            let (shard, entries) = open_shard(file_path, k)?;
            for (name, t) in entries {
                if let Some(other) = tensors.get(&name) {
                    let other: &CheckpointTensor = other;
                    return Err(bad(
                        file_path,
                        format!(
                            "holds {name:?}, which {} holds too",
                            files[other.file].display()
                        ),
                    ));
                }
                tensors.insert(name, t);
            }
            shards.push(shard);
        }
        if let Some((index_path, weight_map)) = index {
            for (name, file) in &weight_map {
                let holder = tensors.get(name).map(|t| &files[t.file]);
                let listed = index_path.with_file_name(file);
                if holder != Some(&listed) {
                    return Err(bad(
                        &index_path,
                        format!(
                            "lists {name:?} in {file:?}, but {}",
                            match holder {
                                Some(h) => format!("{} holds it", h.display()),
                                None => "no shard holds it".into(),
                            }
                        ),
                    ));
                }
            }
            if let Some(extra) = tensors.keys().find(|n| !weight_map.contains_key(*n)) {
                return Err(bad(
                    &index_path,
                    format!(
                        "does not list {extra:?}, which {} holds",
                        files[tensors[extra].file].display()
                    ),
                ));
            }
        }
        Ok(Checkpoint {
            path: path.to_owned(),
            shards,
            tensors,
        })
    }

    /// Renames the checkpoint's tensors to the model's names: `f` gets each name in the file
    /// and returns the model's name for it, or None to leave the tensor out (e.g. keys the
    /// model does not have). Two tensors renamed to one name is [`Error::Checkpoint`].
    pub fn rename(mut self, f: impl Fn(&str) -> Option<String>) -> Result<Checkpoint> {
        let mut renamed = BTreeMap::new();
        for (name, t) in std::mem::take(&mut self.tensors) {
            let Some(new) = f(&name) else { continue };
            if let Some(old) = renamed.insert(new.clone(), t) {
                return Err(bad(
                    &self.path,
                    format!(
                        "the rename maps both {:?} and {name:?} to {new:?}",
                        old.stored_name
                    ),
                ));
            }
        }
        self.tensors = renamed;
        Ok(self)
    }

    /// Strips `prefix` from every name that starts with it (e.g. `"model.diffusion_model."`);
    /// other names stay as they are.
    pub fn strip_prefix(self, prefix: &str) -> Result<Checkpoint> {
        self.rename(|n| Some(n.strip_prefix(prefix).unwrap_or(n).to_owned()))
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its files, in the order [`CheckpointTensor::file`] counts them.
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// Its tensors by (renamed) name.
    pub fn tensors(&self) -> &BTreeMap<String, CheckpointTensor> {
        &self.tensors
    }

    /// The tensor the model calls `name`.
    pub fn get(&self, name: &str) -> Option<&CheckpointTensor> {
        self.tensors.get(name)
    }

    /// Bytes of tensor data, all files together.
    pub fn bytes(&self) -> u64 {
        self.tensors.values().map(|t| t.bytes as u64).sum()
    }

    /// Reads `t`'s bytes from `at` bytes into its data into `dst` (`pread`); a file shorter
    /// than its header says (truncated since it was opened) is [`Error::Io`] of kind
    /// `UnexpectedEof`.
    pub(crate) fn read(&self, t: &CheckpointTensor, at: usize, dst: &mut [u8]) -> Result<()> {
        let shard = &self.shards[t.file];
        debug_assert!(at + dst.len() <= t.bytes);
        shard
            .file
            .read_exact_at(dst, t.offset + at as u64)
            .map_err(|e| {
                Error::io(
                    format!(
                        "cannot read {:?} ({} bytes at {}); was the file changed or truncated after it was opened?",
                        t.stored_name, t.bytes, t.offset
                    ),
                    &shard.path,
                    e,
                )
            })
    }

    /// Asks the kernel to drop the checkpoint's pages from the page cache
    /// (`posix_fadvise(POSIX_FADV_DONTNEED)`), so that the next read comes from the disk: for
    /// measuring a cold start. Only clean pages that no process maps or page-locks go; the
    /// files are not changed.
    pub fn evict_page_cache(&self) -> Result<()> {
        for s in &self.shards {
            fadvise_dontneed(&s.file, 0, 0).map_err(|e| Error::io("posix_fadvise", &s.path, e))?;
        }
        Ok(())
    }

    /// Drops `t`'s pages from the page cache once read (the disk tier: blocks read at every
    /// forward should not fill host memory with their pages). Best effort.
    pub(crate) fn forget(&self, t: &CheckpointTensor) {
        let _ = fadvise_dontneed(&self.shards[t.file].file, t.offset, t.bytes as u64);
    }

    /// Whether every file still has the length its header gave (a cheap check before reading
    /// through a mapping, where a truncated file would be SIGBUS).
    pub(crate) fn check_lengths(&self) -> Result<()> {
        for s in &self.shards {
            let len = s
                .file
                .metadata()
                .map_err(|e| Error::io("cannot stat", &s.path, e))?
                .len();
            if len != s.map.len() as u64 {
                return Err(bad(
                    &s.path,
                    format!(
                        "is {len} bytes now, {} when it was opened: it was truncated or rewritten while in use",
                        s.map.len()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A `(destination, tensor, offset into the tensor's data)` piece of a parallel read.
pub(crate) struct ReadJob<'a> {
    pub(crate) dst: &'a mut [u8],
    pub(crate) tensor: &'a CheckpointTensor,
    pub(crate) at: usize,
}

/// Pieces a read is split into, so that threads share the work evenly.
const READ_PIECE: usize = 16 << 20;

/// Splits `(tensor, dst)` pairs into pieces of at most [`READ_PIECE`] bytes.
pub(crate) fn split_jobs<'a>(
    pairs: impl IntoIterator<Item = (&'a CheckpointTensor, &'a mut [u8])>,
) -> Vec<ReadJob<'a>> {
    let mut jobs = Vec::new();
    for (tensor, dst) in pairs {
        let mut at = 0;
        for dst in dst.chunks_mut(READ_PIECE) {
            let n = dst.len();
            jobs.push(ReadJob { dst, tensor, at });
            at += n;
        }
    }
    jobs
}

/// Splits `buf` into one slice per `(offset, len)` range, in the ranges' order; ranges
/// that overlap or pass the end are an error.
pub(crate) fn disjoint_slices<'a>(
    buf: &'a mut [u8],
    ranges: &[(usize, usize)],
) -> Result<Vec<&'a mut [u8]>> {
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_by_key(|&k| ranges[k].0);
    let mut out: Vec<Option<&'a mut [u8]>> = (0..ranges.len()).map(|_| None).collect();
    let mut rest = buf;
    let mut pos = 0usize;
    for k in order {
        let (off, len) = ranges[k];
        let skip = off.checked_sub(pos);
        let fits = skip.is_some_and(|s| s.checked_add(len).is_some_and(|e| e <= rest.len()));
        let (Some(skip), true) = (skip, fits) else {
            return Err(Error::InvalidArgument {
                op: "reading a checkpoint",
                message: format!(
                    "the range {off}..{} overlaps another or passes the buffer's end",
                    off.saturating_add(len)
                ),
            });
        };
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(skip);
        let (piece, tail) = tail.split_at_mut(len);
        out[k] = Some(piece);
        rest = tail;
        pos = off + len;
    }
    Ok(out
        .into_iter()
        .map(|s| s.expect("every range was placed"))
        .collect())
}

/// Runs `jobs` on `threads` threads (at least one); returns the first error.
pub(crate) fn read_parallel(
    ckpt: &Checkpoint,
    jobs: Vec<ReadJob<'_>>,
    threads: usize,
) -> Result<()> {
    let threads = threads.clamp(1, jobs.len().max(1));
    if threads == 1 {
        for j in jobs {
            ckpt.read(j.tensor, j.at, j.dst)?;
        }
        return Ok(());
    }
    let queue = std::sync::Mutex::new(jobs);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let job = queue.lock().unwrap_or_else(|p| p.into_inner()).pop();
                        let Some(j) = job else { return Ok(()) };
                        ckpt.read(j.tensor, j.at, j.dst)?;
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect::<Result<Vec<()>>>()
            .map(|_| ())
    })
}

/// `posix_fadvise(fd, offset, len, POSIX_FADV_DONTNEED)` (`len` 0: to the end).
fn fadvise_dontneed(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: the descriptor is open (borrowed from `file`) for the call; posix_fadvise only
    // advises the kernel and touches no memory of this process.
    let rc = unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

fn bad(path: &Path, reason: String) -> Error {
    Error::Checkpoint {
        path: path.to_owned(),
        reason,
    }
}

/// Opens `path` read-only if it is a regular file, without blocking: a FIFO (whose `open`
/// would wait for a writer forever), a device, a socket or a directory is refused. The file is
/// opened with `O_NONBLOCK`, its type checked on the open descriptor (`fstat`, so it cannot be
/// swapped in between), then `O_NONBLOCK` is cleared.
fn open_regular(path: &Path) -> Result<File> {
    use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
    use std::os::unix::io::AsRawFd as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io("cannot open", path, e))?;
    let t = file
        .metadata()
        .map_err(|e| Error::io("cannot be examined", path, e))?
        .file_type();
    if !t.is_file() {
        let what = if t.is_fifo() {
            "a FIFO"
        } else if t.is_dir() {
            "a directory"
        } else if t.is_char_device() || t.is_block_device() {
            "a device"
        } else if t.is_socket() {
            "a socket"
        } else {
            "of another kind"
        };
        return Err(bad(
            path,
            format!("is {what}, not a regular file: a checkpoint is read from regular files only"),
        ));
    }
    let fd = file.as_raw_fd();
    // SAFETY: `fd` is the open descriptor of `file`, alive for both calls; F_GETFL and F_SETFL
    // read and set its status flags and touch no memory.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::io("cannot be opened for blocking reads", path, e));
    }
    Ok(file)
}

/// The shard index (if any, with its weight map) and the files of the checkpoint at `path`.
#[allow(clippy::type_complexity)]
fn resolve(path: &Path) -> Result<(Option<(PathBuf, BTreeMap<String, String>)>, Vec<PathBuf>)> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io("cannot open", path, e))?;
    let index = if meta.is_dir() {
        let mut names: Vec<String> = std::fs::read_dir(path)
            .map_err(|e| Error::io("cannot list", path, e))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        if let Some(i) = INDEX_NAMES
            .iter()
            .find(|n| names.iter().any(|m| m == *n))
            .map(|n| n.to_string())
            .or_else(|| {
                names
                    .iter()
                    .find(|n| n.ends_with(".safetensors.index.json"))
                    .cloned()
            })
        {
            path.join(i)
        } else if let Some(single) = SINGLE_NAMES.iter().find(|n| names.iter().any(|m| m == *n)) {
            return Ok((None, vec![path.join(single)]));
        } else {
            let files: Vec<&String> = names
                .iter()
                .filter(|n| n.ends_with(".safetensors"))
                .collect();
            return match files.as_slice() {
                [one] => Ok((None, vec![path.join(one)])),
                [] => Err(bad(
                    path,
                    format!(
                        "holds no .safetensors file and no *.safetensors.index.json (it holds {names:?})"
                    ),
                )),
                many => Err(bad(
                    path,
                    format!(
                        "holds several .safetensors files ({many:?}) and no *.safetensors.index.json saying which are shards of one checkpoint; open one file or add the index"
                    ),
                )),
            };
        }
    } else if path.to_string_lossy().ends_with(".json") {
        path.to_owned()
    } else {
        return Ok((None, vec![path.to_owned()]));
    };
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    use std::io::Read as _;
    let mut text = String::new();
    open_regular(&index)?
        .take(MAX_INDEX_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| Error::io("cannot read", &index, e))?;
    let parsed: Index = serde_json::from_str(&text).map_err(|e| {
        bad(
            &index,
            format!("is not a shard index ({{\"weight_map\": {{...}}}}): {e}"),
        )
    })?;
    let mut files: Vec<String> = parsed.weight_map.values().cloned().collect();
    files.sort();
    files.dedup();
    for f in &files {
        if f.contains('/') || f == ".." || f == "." {
            return Err(bad(
                &index,
                format!("names the shard {f:?}, which is not a file name in its directory"),
            ));
        }
    }
    let paths = files.iter().map(|f| index.with_file_name(f)).collect();
    Ok((Some((index, parsed.weight_map)), paths))
}

/// Maps one file and reads its header: its tensors, with offsets from the file's start.
fn open_shard(path: &Path, k: usize) -> Result<(Shard, Vec<(String, CheckpointTensor)>)> {
    let file = open_regular(path)?;
    // SAFETY: the mapping is read-only and private to this crate. Through it the header is
    // parsed here and, with `zero_copy`, block tensors are read; the file's data may change
    // underneath (another process writing it), which changes values but is no memory-safety
    // issue for bytes copied out, and its truncation is checked before any read through the
    // mapping (`check_lengths`; see `OffloadConfig::zero_copy` for the window that remains).
    let map = unsafe { memmap2::MmapOptions::new().map(&file) }
        .map_err(|e| Error::io("cannot map", path, e))?;
    let (n, metadata) = SafeTensors::read_metadata(&map[..])
        .map_err(|e| bad(path, format!("is not a valid safetensors file: {e}")))?;
    let data_start = 8 + n as u64;
    let entries = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            let (start, end) = info.data_offsets;
            let t = CheckpointTensor {
                stored_name: name.clone(),
                file: k,
                dtype: info.dtype.to_string(),
                kind: kind_of(info.dtype),
                shape: info.shape.iter().map(|&d| d as i64).collect(),
                offset: data_start + start as u64,
                bytes: end - start,
            };
            (name, t)
        })
        .collect();
    Ok((
        Shard {
            path: path.to_owned(),
            file,
            map: Arc::new(map),
        },
        entries,
    ))
}

/// The tch element type of a safetensors dtype, if tch has one.
fn kind_of(d: Dtype) -> Option<Kind> {
    Some(match d {
        Dtype::BOOL => Kind::Bool,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::I16 => Kind::Int16,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I32 => Kind::Int,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::C64 => Kind::ComplexFloat,
        Dtype::F8_E5M2 => Kind::Float8e5m2,
        Dtype::F8_E4M3 => Kind::Float8e4m3fn,
        _ => return None,
    })
}
