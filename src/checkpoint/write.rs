//! Writing a sharded safetensors checkpoint, as transformers and diffusers lay one out: shards
//! `<stem>-00001-of-0000N.safetensors`, each holding at most a given number of bytes of tensor
//! data, and `<stem>.safetensors.index.json` with `metadata.total_size` and the `weight_map`
//! from each tensor's name to its shard. [`Checkpoint::open`](super::Checkpoint::open) reads it
//! back (give it the directory or the index).

use super::bad;
use crate::error::{Error, Result};
use crate::source::WeightSource;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Writes a model's tensors as a sharded safetensors checkpoint in a directory.
///
/// ```
/// use layerwise_offload::checkpoint::{Checkpoint, ShardedWriter};
/// use tch::{Device, nn};
///
/// # fn main() -> layerwise_offload::Result<()> {
/// let vs = nn::VarStore::new(Device::Cpu);
/// let _blocks: Vec<nn::Linear> =
///     (0..4).map(|i| nn::linear(vs.root() / "blocks" / i, 64, 64, Default::default())).collect();
/// let dir = std::env::temp_dir().join(format!("sharded-doc-{}", std::process::id()));
/// let written = ShardedWriter::new(&dir, 20 << 10).write(&vs)?; // 20 KiB of data per shard
/// assert_eq!(written.shards.len(), 4); // 16.25 KiB per block, 20 KiB per shard
/// assert!(written.shard_bytes.iter().all(|&b| b <= 20 << 10));
/// let ckpt = Checkpoint::open(&dir)?;
/// assert_eq!(ckpt.tensors().len(), 8);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ShardedWriter {
    dir: PathBuf,
    max_shard_bytes: u64,
    stem: String,
}

/// What [`ShardedWriter::write`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenCheckpoint {
    /// The shard index (`<stem>.safetensors.index.json`).
    pub index: PathBuf,
    /// The shards, in order.
    pub shards: Vec<PathBuf>,
    /// Bytes of tensor data per shard (each at most the limit).
    pub shard_bytes: Vec<u64>,
    /// Bytes of tensor data in all (the index's `metadata.total_size`).
    pub total_bytes: u64,
}

impl ShardedWriter {
    /// A writer into `dir` (created if missing) with at most `max_shard_bytes` bytes of tensor
    /// data per shard. As transformers' `max_shard_size`, the limit counts tensor data: each
    /// file is longer by its header (8 bytes and a JSON line of about 100 bytes per tensor).
    pub fn new(dir: impl Into<PathBuf>, max_shard_bytes: u64) -> ShardedWriter {
        ShardedWriter {
            dir: dir.into(),
            max_shard_bytes,
            stem: "model".into(),
        }
    }

    /// The files' stem (default `model`: `model-00001-of-00002.safetensors` and
    /// `model.safetensors.index.json`, as transformers names them; `diffusion_pytorch_model` as
    /// diffusers does).
    pub fn file_stem(mut self, stem: impl Into<String>) -> ShardedWriter {
        self.stem = stem.into();
        self
    }

    /// Writes every tensor of `model` (a `VarStore`, a `CModule`, or a list of named tensors:
    /// for a model whose blocks a manager holds, pass `manager.named_tensors()?`, since the
    /// model's own block tensors are empty placeholders then).
    ///
    /// Tensors go to the shards in name order, each shard filled until the next tensor would
    /// pass the limit; the shards first, the index last, so a reader never sees an index whose
    /// shards are incomplete. Each tensor is written with its shape and type, bit for bit (a
    /// strided or CUDA tensor through a contiguous CPU copy, one tensor at a time).
    ///
    /// Refused with [`Error::InvalidArgument`] before anything is written: a limit of 0, a
    /// tensor larger than the limit (it fits in no shard: the message names it and the limit
    /// that would hold it), two tensors of one name, no tensor at all, a stem that is empty or
    /// holds a `/`, a tensor a live manager has offloaded (the model's own tensor is a
    /// placeholder then: pass `manager.named_tensors()?`). Refused with [`Error::Checkpoint`]: a directory that already holds a
    /// `.safetensors` file or a shard index (a reader could mix the two checkpoints; write into
    /// an empty directory), a file that cannot be written.
    pub fn write(&self, model: &(impl WeightSource + ?Sized)) -> Result<WrittenCheckpoint> {
        let op = "ShardedWriter::write";
        let invalid = |message: String| Error::InvalidArgument { op, message };
        if self.max_shard_bytes == 0 {
            return Err(invalid(
                "max_shard_bytes is 0: give the most bytes of tensor data a shard may hold (e.g. 5 << 30)".into(),
            ));
        }
        if self.stem.is_empty() || self.stem.contains('/') {
            return Err(invalid(format!(
                "the file stem {:?} is not a file name: give one such as \"model\"",
                self.stem
            )));
        }
        let mut tensors = model.named_tensors()?;
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        if tensors.is_empty() {
            return Err(invalid("the model has no tensors to write".into()));
        }
        if let Some(w) = tensors.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(invalid(format!("two tensors are named {:?}", w[0].0)));
        }
        for (name, t) in &tensors {
            if crate::claims::is_claimed(t)? {
                return Err(invalid(format!(
                    "{name:?} is offloaded by a live manager, so the model's tensor is an empty placeholder: write manager.named_tensors()? instead (the values the manager holds), or restore() first"
                )));
            }
        }
        let size = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        if let Some((name, t)) = tensors.iter().find(|(_, t)| size(t) > self.max_shard_bytes) {
            return Err(invalid(format!(
                "{name:?} holds {} bytes, more than the {} bytes a shard may hold: raise max_shard_bytes to at least {} (a tensor is never split across shards)",
                size(t),
                self.max_shard_bytes,
                size(t)
            )));
        }
        // Shards, in name order: a new one when the next tensor would pass the limit.
        let mut groups: Vec<(Vec<usize>, u64)> = vec![(Vec::new(), 0)];
        for (i, (_, t)) in tensors.iter().enumerate() {
            let n = size(t);
            let last = groups.last_mut().expect("one group at least");
            if !last.0.is_empty() && last.1 + n > self.max_shard_bytes {
                groups.push((vec![i], n));
            } else {
                last.0.push(i);
                last.1 += n;
            }
        }
        let count = groups.len();
        let names: Vec<String> = (1..=count)
            .map(|k| format!("{}-{k:05}-of-{count:05}.safetensors", self.stem))
            .collect();
        let index = self
            .dir
            .join(format!("{}.safetensors.index.json", self.stem));
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| bad(&self.dir, format!("cannot create the directory: {e}")))?;
        refuse_existing(&self.dir)?;

        let mut weight_map = BTreeMap::new();
        let mut shards = Vec::with_capacity(count);
        let written = self.write_shards(&tensors, &groups, &names, &mut weight_map, &mut shards);
        if let Err(e) = written {
            // Nothing half-written stays behind (the index was not written yet).
            for path in &shards {
                let _ = std::fs::remove_file(path);
            }
            return Err(e);
        }
        let total: u64 = groups.iter().map(|g| g.1).sum();
        let json = serde_json::json!({
            "metadata": { "total_size": total },
            "weight_map": weight_map,
        });
        let text = serde_json::to_string_pretty(&json)
            .map_err(|e| bad(&index, format!("cannot be encoded: {e}")))?;
        // Last, and whole or not at all: written beside, then renamed into place.
        let partial = self
            .dir
            .join(format!(".{}.safetensors.index.json.partial", self.stem));
        std::fs::write(&partial, text + "\n")
            .and_then(|()| std::fs::rename(&partial, &index))
            .map_err(|e| bad(&index, format!("cannot be written: {e}")))?;
        Ok(WrittenCheckpoint {
            index,
            shards,
            shard_bytes: groups.iter().map(|g| g.1).collect(),
            total_bytes: total,
        })
    }
}

impl ShardedWriter {
    /// Writes each group of `tensors` (indices) as the shard of the same position in `files`,
    /// recording each tensor's shard in `weight_map` and each shard written in `written`.
    fn write_shards(
        &self,
        tensors: &[(String, Tensor)],
        groups: &[(Vec<usize>, u64)],
        files: &[String],
        weight_map: &mut BTreeMap<String, String>,
        written: &mut Vec<PathBuf>,
    ) -> Result<()> {
        for ((members, _), file) in groups.iter().zip(files) {
            let path = self.dir.join(file);
            let shard: Vec<(&str, Tensor)> = members
                .iter()
                .map(|&i| {
                    let (name, t) = &tensors[i];
                    weight_map.insert(name.clone(), file.clone());
                    let t = if t.is_contiguous() {
                        t.shallow_clone()
                    } else {
                        t.contiguous()
                    };
                    (name.as_str(), t)
                })
                .collect();
            written.push(path.clone());
            Tensor::write_safetensors(&shard, &path)
                .map_err(|e| bad(&path, format!("cannot be written: {e}")))?;
        }
        Ok(())
    }
}

/// [`ShardedWriter::new`]`(dir, max_shard_bytes).write(model)`.
pub fn write_sharded(
    model: &(impl WeightSource + ?Sized),
    dir: impl Into<PathBuf>,
    max_shard_bytes: u64,
) -> Result<WrittenCheckpoint> {
    ShardedWriter::new(dir, max_shard_bytes).write(model)
}

/// Fails when `dir` holds a safetensors file or a shard index already.
fn refuse_existing(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| bad(dir, format!("cannot be listed: {e}")))?;
    for entry in entries {
        let name = entry
            .map_err(|e| bad(dir, format!("cannot be listed: {e}")))?
            .file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json") {
            return Err(bad(
                dir,
                format!(
                    "holds {name:?} already: write a checkpoint into a directory that holds none (a reader could mix the two)"
                ),
            ));
        }
    }
    Ok(())
}
