//! Loading a diffusers transformer checkpoint: `config.json` with
//! `diffusion_pytorch_model.safetensors`, or shards listed in
//! `diffusion_pytorch_model.safetensors.index.json`.
//!
//! Every file's header is read and checked against the model first (names, shapes, element
//! types), so that a checkpoint that does not match is refused with the full list of
//! differences before any weight is copied; then the shards are read one at a time through tch.

use crate::error::{DtypeMismatch, Error, Mismatch, Result, ShapeMismatch};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use tch::{Tensor, nn};

/// The single-file weights of a diffusers model directory.
pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";
/// The shard index of a diffusers model directory.
pub const INDEX_FILE: &str = "diffusion_pytorch_model.safetensors.index.json";
/// Checkpoint keys diffusers ignores when they are unexpected (`_keys_to_ignore_on_load_unexpected`).
const IGNORED_UNEXPECTED: [&str; 1] = ["norm_added_q"];
/// The largest safetensors header accepted (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100 << 20;

/// One tensor's entry in a safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Element type as safetensors spells it (`F32`, `BF16`, ...).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<i64>,
}

#[derive(Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<i64>,
    data_offsets: [u64; 2],
}

/// Opens `path` for reading if it is a regular file, without blocking: a FIFO (which `open`
/// would wait on for a writer forever), a device, a socket or a directory is an [`Error::Io`]
/// saying it is not a regular file. The file is opened with `O_NONBLOCK`, checked with `fstat`
/// on the open descriptor (so it cannot be swapped in between), and `O_NONBLOCK` is cleared.
pub(crate) fn open_regular(path: &Path) -> Result<File> {
    use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
    use std::os::unix::io::AsRawFd as _;
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io)?;
    let t = f.metadata().map_err(io)?.file_type();
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
            "not a file"
        };
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("is {what}, not a regular file"),
        )));
    }
    let fd = f.as_raw_fd();
    // SAFETY: `fd` is the open descriptor of `f`, which outlives both calls; F_GETFL and
    // F_SETFL read and set its status flags and touch no memory.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    Ok(f)
}

/// The contents of the regular file `path` as text (see [`open_regular`]).
pub(crate) fn read_regular_to_string(path: &Path) -> Result<String> {
    let mut text = String::new();
    open_regular(path)?
        .read_to_string(&mut text)
        .map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
    Ok(text)
}

/// Reads the header of the safetensors file `path`: each tensor's element type and shape.
/// `path` must be a regular file (a FIFO is refused at once, see [`checkpoint_files`]).
pub fn read_header(path: &Path) -> Result<BTreeMap<String, TensorInfo>> {
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let format = |reason: String| Error::Format {
        path: path.to_owned(),
        reason,
    };
    let mut f = open_regular(path)?;
    let file_len = f.metadata().map_err(io)?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| format("shorter than a safetensors header".into()))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER || n.checked_add(8).is_none_or(|end| end > file_len) {
        return Err(format(format!(
            "header length {n} does not fit the file ({file_len} bytes)"
        )));
    }
    let mut text = vec![0u8; n as usize];
    f.read_exact(&mut text).map_err(io)?;
    let raw: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&text)
        .map_err(|e| format(format!("the header is not a JSON object: {e}")))?;
    let data_len = file_len - 8 - n;
    let mut out = BTreeMap::new();
    for (name, value) in raw {
        if name == "__metadata__" {
            continue;
        }
        let info: RawInfo =
            serde_json::from_value(value).map_err(|e| format(format!("tensor {name}: {e}")))?;
        let [start, end] = info.data_offsets;
        if start > end || end > data_len || info.shape.iter().any(|&d| d < 0) {
            return Err(format(format!(
                "tensor {name}: offsets {start}..{end} or shape {:?} out of range",
                info.shape
            )));
        }
        out.insert(
            name,
            TensorInfo {
                dtype: info.dtype,
                shape: info.shape,
            },
        );
    }
    Ok(out)
}

#[derive(Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

/// The safetensors files of `path`: the file itself, or in a directory the shards its index
/// lists (in name order), or its single weights file. Only regular files are read: an index
/// that is a FIFO (or a device, or a directory) is an error, as is such a file listed here when
/// [`read_header`] or [`load_checkpoint`] opens it.
pub fn checkpoint_files(path: &Path) -> Result<Vec<PathBuf>> {
    let is_dir = std::fs::metadata(path)
        .map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?
        .is_dir();
    if !is_dir {
        return Ok(vec![path.to_owned()]);
    }
    let index = path.join(INDEX_FILE);
    if index.symlink_metadata().is_ok() {
        let text = read_regular_to_string(&index)?;
        let parsed: Index = serde_json::from_str(&text).map_err(|e| Error::Format {
            path: index.clone(),
            reason: format!("not a shard index: {e}"),
        })?;
        let shards: BTreeSet<&String> = parsed.weight_map.values().collect();
        for s in &shards {
            if Path::new(s).components().count() != 1 {
                return Err(Error::Format {
                    path: index,
                    reason: format!("shard {s:?} is not a file name in the directory"),
                });
            }
        }
        return Ok(shards.into_iter().map(|s| path.join(s)).collect());
    }
    let single = path.join(WEIGHTS_FILE);
    if single.symlink_metadata().is_ok() {
        return Ok(vec![single]);
    }
    Err(Error::Io {
        path: single,
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("neither {WEIGHTS_FILE} nor {INDEX_FILE} is in the directory"),
        ),
    })
}

/// tch's name of a safetensors element type, where it has one.
fn kind_name(dtype: &str) -> &str {
    match dtype {
        "F64" => "Double",
        "F32" => "Float",
        "F16" => "Half",
        "BF16" => "BFloat16",
        "I64" => "Int64",
        "I32" => "Int",
        "I16" => "Int16",
        "I8" => "Int8",
        "U8" => "Uint8",
        "BOOL" => "Bool",
        other => other,
    }
}

/// Compares the checkpoint's tensors (from their headers) with the model's parameters.
pub fn compare(
    model: &BTreeMap<String, Vec<i64>>,
    file: &BTreeMap<String, TensorInfo>,
) -> Mismatch {
    let mut m = Mismatch::default();
    for name in model.keys() {
        if !file.contains_key(name) {
            m.missing.push(name.clone());
        }
    }
    for (name, info) in file {
        let Some(shape) = model.get(name) else {
            if !IGNORED_UNEXPECTED.iter().any(|i| name.contains(i)) {
                m.unexpected.push(name.clone());
            }
            continue;
        };
        if *shape != info.shape {
            m.shapes.push(ShapeMismatch {
                name: name.clone(),
                file: info.shape.clone(),
                model: shape.clone(),
            });
        }
        if !["F32", "BF16", "F16"].contains(&info.dtype.as_str()) {
            m.dtypes.push(DtypeMismatch {
                name: name.clone(),
                dtype: kind_name(&info.dtype).to_owned(),
            });
        }
    }
    m
}

/// Loads the checkpoint at `path` (a diffusers transformer directory, or one safetensors file)
/// into the model's parameters in `vs`, converting each tensor to its parameter's type. Nothing
/// is copied unless every tensor matches ([`Error::Mismatch`] lists all differences).
pub fn load_checkpoint(vs: &nn::VarStore, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let files = checkpoint_files(path)?;
    load_files(
        vs,
        path,
        &files,
        |key| Some(key),
        |path, mismatch| Error::Mismatch { path, mismatch },
    )
}

/// Loads the safetensors `files` of the checkpoint at `path` into the parameters of `vs`: the
/// stored tensor `key` goes to the parameter `rename(key)` (`None`: not the model's, skipped),
/// converted to the parameter's type. Every header is compared first: nothing is copied unless
/// every parameter is there with its shape and a float type (otherwise the error `mismatch`
/// makes of the differences). Each file is checked to be a regular file again before libtorch
/// opens it by name. The one loader of the transformer's, the text encoder's and the VAE's
/// checkpoints.
pub(crate) fn load_files(
    vs: &nn::VarStore,
    path: &Path,
    files: &[PathBuf],
    rename: impl Fn(&str) -> Option<&str>,
    mismatch: impl FnOnce(PathBuf, Box<Mismatch>) -> Error,
) -> Result<()> {
    let vars = vs.variables();
    let mut headers = BTreeMap::new();
    for f in files {
        for (key, info) in read_header(f)? {
            if let Some(name) = rename(&key) {
                headers.insert(name.to_owned(), info);
            }
        }
    }
    let shapes: BTreeMap<String, Vec<i64>> =
        vars.iter().map(|(n, t)| (n.clone(), t.size())).collect();
    let differences = compare(&shapes, &headers);
    if !differences.is_empty() {
        return Err(mismatch(path.to_owned(), Box::new(differences)));
    }
    for f in files {
        // tch opens the file by name: check again that it is still a regular file.
        drop(open_regular(f)?);
        let tensors = Tensor::read_safetensors(f).map_err(|source| Error::Torch {
            context: format!("reading {}", f.display()),
            source,
        })?;
        tch::no_grad(|| -> Result<()> {
            for (key, t) in &tensors {
                let Some(v) = rename(key).and_then(|name| vars.get(name)) else {
                    continue;
                };
                v.shallow_clone()
                    .f_copy_(t)
                    .map_err(|source| Error::Torch {
                        context: format!("copying {key}"),
                        source,
                    })?;
            }
            Ok(())
        })?;
    }
    Ok(())
}
