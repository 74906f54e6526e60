//! Loading a diffusers transformer checkpoint: `config.json` with
//! `diffusion_pytorch_model.safetensors`, or shards listed in
//! `diffusion_pytorch_model.safetensors.index.json`.
//!
//! Every file's header is read (parsed and validated by the `safetensors` crate, see
//! [`read_header`]) and checked against the model first (names, shapes, element
//! types), so that a checkpoint that does not match is refused with the full list of
//! differences before any weight is copied; then the shards are read one at a time through tch.

use crate::error::{DtypeMismatch, Error, Mismatch, Result, ShapeMismatch};
use safetensors::tensor as st;
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
///
/// Only the header is read. Its entries are parsed and validated by the `safetensors` crate
/// (`safetensors::tensor::TensorInfo` per tensor, then `Metadata`, which checks that the data
/// sections follow one another from offset 0, each the size of its shape and type); this
/// function adds the checks that need the file: the header fits it, and the data sections end
/// within it.
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
    let raw: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&text)
        .map_err(|e| format(format!("the header is not a JSON object: {e}")))?;
    let data_len = file_len - 8 - n;
    let mut metadata = None;
    let mut tensors = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        if name == "__metadata__" {
            metadata = Some(
                serde_json::from_value(value).map_err(|e| format(format!("__metadata__: {e}")))?,
            );
            continue;
        }
        let info: st::TensorInfo =
            serde_json::from_value(value).map_err(|e| format(format!("tensor {name}: {e}")))?;
        tensors.push((name, info));
    }
    // The data sections in file order, then checked by safetensors' own validation.
    tensors.sort_by_key(|(_, info)| info.data_offsets);
    let out_of_range = |(name, info): &(String, st::TensorInfo)| {
        let (start, end) = info.data_offsets;
        format(format!(
            "tensor {name}: offsets {start}..{end} or shape {:?} out of range",
            info.shape
        ))
    };
    if let Some(last) = tensors
        .last()
        .filter(|(_, i)| i.data_offsets.1 as u64 > data_len)
    {
        return Err(out_of_range(last));
    }
    let mut out = BTreeMap::new();
    for t @ (name, info) in &tensors {
        let shape: Option<Vec<i64>> = info.shape.iter().map(|&d| i64::try_from(d).ok()).collect();
        let Some(shape) = shape else {
            return Err(out_of_range(t));
        };
        let dtype = info.dtype.to_string();
        out.insert(name.clone(), TensorInfo { dtype, shape });
    }
    st::Metadata::new(metadata, tensors.clone()).map_err(|e| match &e {
        st::SafeTensorError::InvalidOffset(name) => match tensors.iter().find(|(n, _)| n == name) {
            Some(t) => out_of_range(t),
            None => format(format!("the data sections: {e}")),
        },
        _ => format(format!("the data sections: {e}")),
    })?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file of `header` (JSON text) followed by `data` zero bytes, or the raw
    /// bytes `raw` when given.
    fn file(case: &str, header: &str, data: usize) -> PathBuf {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + data, 0);
        raw_file(case, &bytes)
    }

    fn raw_file(case: &str, bytes: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "wan-read-header-{}-{case}.safetensors",
            std::process::id()
        ));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// `read_header`'s error for the file, as text (the file is removed).
    fn refused(p: PathBuf) -> String {
        let r = read_header(&p);
        std::fs::remove_file(&p).unwrap();
        match r {
            Err(e @ Error::Format { .. }) => e.to_string(),
            other => panic!("{}: expected a format error, got {other:?}", p.display()),
        }
    }

    #[test]
    fn a_header_gives_each_tensors_type_and_shape() {
        let p = file(
            "good",
            r#"{"__metadata__":{"format":"pt"},
                "b":{"dtype":"BF16","shape":[4],"data_offsets":[24,32]},
                "a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},
                "e":{"dtype":"F16","shape":[0,5],"data_offsets":[32,32]}}"#,
            32,
        );
        let h = read_header(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        let want = |dtype: &str, shape: &[i64]| TensorInfo {
            dtype: dtype.into(),
            shape: shape.to_vec(),
        };
        assert_eq!(h.len(), 3, "{h:?}");
        assert_eq!(h["a"], want("F32", &[2, 3]));
        assert_eq!(h["b"], want("BF16", &[4]));
        assert_eq!(h["e"], want("F16", &[0, 5]));
    }

    #[test]
    fn bad_headers_are_format_errors_saying_what_is_wrong() {
        let a = r#""a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}"#;
        for (case, path, want) in [
            (
                "short",
                raw_file("short", b"\x08\0\0"),
                "shorter than a safetensors header",
            ),
            (
                "long-header",
                raw_file("long-header", &[0xff, 0, 0, 0, 0, 0, 0, 0, b'{', b'}']),
                "header length 255 does not fit the file (10 bytes)",
            ),
            (
                "not-json",
                file("not-json", "[1, 2]", 0),
                "the header is not a JSON object",
            ),
            (
                "no-dtype",
                file("no-dtype", r#"{"a":{"shape":[1],"data_offsets":[0,4]}}"#, 4),
                "tensor a: missing field `dtype`",
            ),
            (
                "unknown-dtype",
                file(
                    "unknown-dtype",
                    r#"{"a":{"dtype":"F99","shape":[1],"data_offsets":[0,4]}}"#,
                    4,
                ),
                "tensor a: unknown variant `F99`",
            ),
            (
                "negative-shape",
                file(
                    "negative-shape",
                    r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
                    4,
                ),
                "tensor a: invalid value",
            ),
            (
                "past-the-end",
                file(
                    "past-the-end",
                    &format!(r#"{{{a},"b":{{"dtype":"F32","shape":[4],"data_offsets":[24,40]}}}}"#),
                    32,
                ),
                "tensor b: offsets 24..40 or shape [4] out of range",
            ),
            (
                "gap",
                file(
                    "gap",
                    &format!(r#"{{{a},"b":{{"dtype":"F32","shape":[2],"data_offsets":[28,36]}}}}"#),
                    36,
                ),
                "tensor b: offsets 28..36 or shape [2] out of range",
            ),
            (
                "size-and-shape-disagree",
                file(
                    "size-and-shape-disagree",
                    r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}}"#,
                    20,
                ),
                "the data sections:",
            ),
            (
                "huge-dimension",
                file(
                    "huge-dimension",
                    r#"{"a":{"dtype":"F32","shape":[0,9223372036854775808],"data_offsets":[0,0]}}"#,
                    0,
                ),
                "tensor a: offsets 0..0 or shape [0, 9223372036854775808] out of range",
            ),
        ] {
            let e = refused(path);
            assert!(e.contains(want), "{case}: {e}\nshould contain: {want}");
        }
    }
}
