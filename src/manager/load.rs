//! Initializing from a checkpoint ([`OffloadConfig::checkpoint`](crate::OffloadConfig::checkpoint)):
//! the model's tensors matched with the checkpoint's, the zero-copy layout, block tensors read
//! into their host buffers (or left in the files' own pages, or on the disk tier), and
//! non-block tensors read onto the compute device.

use crate::accel::{self, HostMemory};
use crate::checkpoint::{self, Checkpoint, CheckpointTensor, FileStamp};
use crate::error::Context;
use crate::error::{Error, Result};
use crate::host::{HostBlock, HostStore};
use crate::placement;
use crate::plan::{BlockLayout, Plan};
use crate::progress::{Reporter, Stage};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

use super::LayerwiseOffloadManager;
use super::compress::count_encoded;
use super::disk::DiskTier;
use super::lifecycle::{Building, Undo};
use super::runs::{Run, contiguous_strides, relayout};
use super::tier::HostTier;

/// Where the model's values come from.
#[derive(Debug)]
pub(super) struct Sources {
    /// The checkpoint tensor of each model tensor, by source index.
    tensors: Vec<CheckpointTensor>,
    /// Zero-copy store: per block, its runs in the files.
    runs: Vec<Vec<Run>>,
    /// Every file's stamp before anything was read from it: checked once `initialize()` has
    /// read what it reads, and by the disk tier at each of its reads.
    stamps: Vec<FileStamp>,
}

impl Sources {
    /// The name model tensor `source_index` is stored under in the checkpoint.
    pub(super) fn stored_name(&self, source_index: usize) -> &str {
        &self.tensors[source_index].stored_name
    }
}

/// `c`'s value, read into a new CPU tensor of `kind` (converted if the file holds another
/// type; the matching allowed that only with `convert_dtypes`).
fn read_tensor(ckpt: &Checkpoint, c: &CheckpointTensor, kind: Kind) -> Result<Tensor> {
    let stored = c.kind.ok_or_else(|| Error::Checkpoint {
        path: ckpt.path().to_owned(),
        reason: format!("{:?} is {}, which tch cannot hold", c.stored_name, c.dtype),
    })?;
    let t = Tensor::f_empty(c.shape.as_slice(), (stored, Device::Cpu)).map_err(|e| {
        Error::from_torch("reading a checkpoint tensor", c.bytes as u64, e.to_string())
    })?;
    if t.numel() * stored.elt_size_in_bytes() != c.bytes {
        return Err(Error::Checkpoint {
            path: ckpt.path().to_owned(),
            reason: format!(
                "{:?} holds {} bytes, not what shape {:?} of {} takes",
                c.stored_name, c.bytes, c.shape, c.dtype
            ),
        });
    }
    // SAFETY: `t` is a fresh contiguous CPU tensor of exactly `c.bytes` bytes (checked above),
    // owned here and alive for the read; nothing else refers to it yet.
    let buf = unsafe { crate::host::bytes_mut(&t)? };
    let jobs = checkpoint::split_jobs([(c, buf)]);
    checkpoint::read_parallel(ckpt, jobs, crate::host::worker_threads())?;
    if stored == kind {
        Ok(t)
    } else {
        t.f_to_kind(kind).context("converting a checkpoint tensor")
    }
}

impl LayerwiseOffloadManager {
    /// Matches the model's tensors with the checkpoint's (every difference in one error), and
    /// adjusts the plan to the file: row-major strides (the file's bytes are row-major) and,
    /// for the zero-copy store, each block laid out as its runs in the files.
    pub(super) fn match_checkpoint(&self, ckpt: &Checkpoint, plan: &mut Plan) -> Result<Sources> {
        let model: Vec<(&str, Vec<i64>, Kind)> = self
            .named
            .iter()
            .map(|(n, t)| (n.as_str(), t.size(), t.kind()))
            .collect();
        let found = checkpoint::match_tensors(
            ckpt,
            &model,
            self.config.allow_unexpected,
            self.config.convert_dtypes,
        )?;
        let tensors: Vec<CheckpointTensor> = found.into_iter().cloned().collect();
        for t in plan.blocks.iter_mut().flat_map(|l| l.tensors.iter_mut()) {
            t.strides = contiguous_strides(&t.shape);
        }
        // Encoded blocks (from the encoded cache) keep the plan's layout.
        let runs = if self.config.zero_copy && !self.config.compress {
            plan.blocks
                .iter_mut()
                .map(|l| relayout(l, &tensors))
                .collect()
        } else {
            Vec::new()
        };
        // Before anything is read.
        let stamps = ckpt.stamps()?;
        Ok(Sources {
            tensors,
            runs,
            stamps,
        })
    }

    /// With a checkpoint: the non-block tensors and the resident blocks' tensors get their
    /// values from it, on the compute device (the old ones kept in `undo`).
    pub(super) fn load_to_device(
        &mut self,
        ckpt: &Checkpoint,
        sources: &Sources,
        to_load: &[usize],
        undo: &mut Undo,
    ) -> Result<()> {
        let compute = self.compute_device();
        let sizes = to_load.iter().map(|&i| sources.tensors[i].bytes as u64);
        let mut progress = Reporter::start(
            self.config.progress.as_ref(),
            Stage::CheckpointToDevice,
            sizes,
        );
        for &i in to_load {
            let kind = self.named[i].1.kind();
            let value = read_tensor(ckpt, &sources.tensors[i], kind)?;
            let value = if compute == Device::Cpu {
                value
            } else {
                value.f_to_device(compute).map_err(|e| {
                    Error::from_torch(
                        "moving checkpoint tensors to the compute device",
                        sources.tensors[i].bytes as u64,
                        e.to_string(),
                    )
                })?
            };
            undo.repoint(i, &mut self.named[i].1, &value, "loading a checkpoint")?;
            progress.advance(sources.tensors[i].bytes as u64);
        }
        Ok(())
    }

    /// With a checkpoint: each streamed block's host copy (read into a pinned buffer, or the
    /// files' pages with `zero_copy`, or none on the disk tier past the host budget), the
    /// model's block tensors pointed at placeholders (the old values kept in `undo`), and the
    /// manager's [`HostStore`].
    pub(super) fn fill_from_checkpoint(
        &mut self,
        b: &mut Building,
        ckpt: Arc<Checkpoint>,
        sources: &Sources,
        resident: &[bool],
        undo: &mut Undo,
    ) -> Result<Arc<HostStore>> {
        let n = b.blocks.len();
        let memory = self.host_memory();
        let stamps = &sources.stamps;
        let with_host: Vec<usize> = (0..n)
            .filter(|&i| !resident[i] || self.config.shareable)
            .collect();
        let mut scratch = None;
        let cache = self.encoded_cache(&ckpt, sources, &b.plan, &mut scratch)?;
        // What a block takes in host memory: its encoding, or the raw block.
        let held = |i: usize| match &cache {
            Some(c) => c.block(i).len as u64,
            None => b.plan.blocks[i].bytes as u64,
        };
        let mut in_memory = vec![false; n];
        match self.config.host_budget {
            None => with_host.iter().for_each(|&i| in_memory[i] = true),
            Some(budget) => {
                let sizes: Vec<u64> = with_host.iter().map(|&i| held(i)).collect();
                for (&i, keep) in with_host.iter().zip(placement::host_blocks(&sizes, budget)) {
                    in_memory[i] = keep;
                }
            }
        }
        let cache_map = match (&cache, self.config.zero_copy) {
            (Some(c), true) => {
                // The mapped pages are never read on the host again: every encoding used is
                // checked now, through the mapping the uploads read, on other threads while
                // this one page-locks it.
                let check = |mapped: &[u8]| -> Result<()> {
                    (0..n)
                        .filter(|&i| in_memory[i])
                        .try_for_each(|i| c.check_block_in(i, mapped))
                };
                Some(accel::map_file_read_only(
                    c.file(),
                    c.path(),
                    c.data_len(),
                    memory,
                    check,
                )?)
            }
            _ => None,
        };
        let maps = if self.config.zero_copy && cache.is_none() {
            ckpt.check_lengths()?;
            ckpt.shards
                .iter()
                .map(|s| {
                    accel::map_file_read_only(&s.file, &s.path, s.map.len(), memory, |_| Ok(()))
                })
                .collect::<Result<Vec<Tensor>>>()?
        } else {
            Vec::new()
        };
        let sizes: Vec<u64> = (0..n)
            .filter(|&i| in_memory[i])
            .map(|i| b.plan.blocks[i].bytes as u64)
            .collect();
        let _span = crate::observe::stage(true, sizes.len(), sizes.iter().sum());
        let mut progress =
            Reporter::start(self.config.progress.as_ref(), Stage::CheckpointRead, sizes);
        for i in (0..n).filter(|&i| in_memory[i]) {
            if self.faults.host_alloc() {
                return Err(Error::HostAlloc {
                    kind: "pinned",
                    bytes: b.plan.blocks[i].bytes as u64,
                    source: crate::error::TorchMessage("injected fault".into()),
                });
            }
            let tier = if let Some(c) = &cache {
                let at = c.block(i);
                count_encoded(&mut self.stats, at.len, at.raw, false);
                match &cache_map {
                    // The cache's own pages (verified when it was opened).
                    Some(map) => HostTier::FilePages(HostBlock::encoded(
                        map.f_narrow(0, at.offset as i64, at.len as i64)
                            .context("mapping the encoded cache")?,
                        at.raw,
                    )),
                    None => {
                        let buf = accel::alloc_host(at.len.max(1), memory)?;
                        let buf = buf
                            .f_narrow(0, 0, at.len as i64)
                            .context("reading the encoded cache")?;
                        // SAFETY: `buf` is a fresh host buffer owned here, read by nothing else.
                        c.read_block(i, unsafe { crate::host::bytes_mut(&buf)? }, false)?;
                        HostTier::Pinned(HostBlock::encoded(buf, at.raw))
                    }
                }
            } else if self.config.zero_copy {
                HostTier::FilePages(HostBlock::pieces(
                    sources.runs[i]
                        .iter()
                        .map(|r| {
                            maps[r.file]
                                .f_narrow(0, r.offset as i64, r.bytes as i64)
                                .map(|t| (r.at, t))
                                .context("mapping a checkpoint")
                        })
                        .collect::<Result<Vec<_>>>()?,
                ))
            } else if b.encode[i] {
                // Read into a reused pageable buffer; the encoding is the host copy.
                let buf = super::fill::scratch_buffer(&mut scratch, b.plan.blocks[i].bytes)?;
                read_block(&ckpt, sources, &b.plan.blocks[i], &buf)?;
                let encoded = self.encode_block(&buf)?;
                b.blocks[i].tier = HostTier::Pinned(encoded);
                progress.advance(b.plan.blocks[i].bytes as u64);
                continue;
            } else {
                let buf = accel::alloc_host(b.plan.blocks[i].bytes, memory)?;
                read_block(&ckpt, sources, &b.plan.blocks[i], &buf)?;
                HostTier::Pinned(HostBlock::whole(buf))
            };
            self.stats.host_bytes += tier.host().map_or(0, |h| h.bytes()) as u64;
            b.blocks[i].tier = tier;
            progress.advance(b.plan.blocks[i].bytes as u64);
        }
        let reads: Vec<Vec<(CheckpointTensor, usize)>> = (0..n)
            .map(|i| {
                if resident[i] || in_memory[i] {
                    return Vec::new();
                }
                b.plan.blocks[i]
                    .tensors
                    .iter()
                    .map(|t| (sources.tensors[t.source_index].clone(), t.offset))
                    .collect()
            })
            .collect();
        if let Some(c) = cache
            .as_ref()
            .filter(|_| reads.iter().any(|r| !r.is_empty()))
        {
            for i in (0..n).filter(|&i| !reads[i].is_empty()) {
                count_encoded(&mut self.stats, c.block(i).len, c.block(i).raw, false);
            }
            let disk = Arc::new(DiskTier::encoded(
                ckpt.clone(),
                reads,
                memory,
                stamps.clone(),
                c.clone(),
            )?);
            for &i in disk.blocks() {
                b.blocks[i].tier = HostTier::Disk(disk.clone());
            }
            self.stats.disk_blocks = disk.blocks().len();
            b.disk = Some(disk);
        } else if reads.iter().any(|r| !r.is_empty()) {
            let bytes = (0..n).map(|i| b.plan.blocks[i].bytes).collect();
            let disk = Arc::new(DiskTier::new(
                ckpt.clone(),
                reads,
                bytes,
                memory,
                stamps.clone(),
            )?);
            for &i in disk.blocks() {
                b.blocks[i].tier = HostTier::Disk(disk.clone());
            }
            self.stats.disk_blocks = disk.blocks().len();
            b.disk = Some(disk);
        }
        // Everything initialize() read (non-block tensors, resident blocks, host copies) came
        // from files that did not change meanwhile.
        ckpt.check_unchanged(
            stamps,
            0..stamps.len(),
            "while initialize() read it: the blocks read from it may mix the old weights and the new; call initialize() again once the file is complete",
        )?;
        for i in (0..n).filter(|&i| !resident[i]) {
            b.place_placeholders(i, undo)?;
        }
        let mut store = HostStore::own(
            b.plan.blocks.clone(),
            b.blocks
                .iter()
                .map(|b| b.tier.host().map(HostBlock::shallow_clone))
                .collect(),
            memory == HostMemory::Pinned,
            None,
        );
        store.read_only = self.config.zero_copy;
        store.file_pages = self.config.zero_copy;
        Ok(Arc::new(store))
    }
}

/// Reads a block's tensors (`layout`) from the checkpoint into `buf` (the layout's size), in
/// parallel; tensors stored in another type (with `convert_dtypes`) through a temporary.
pub(super) fn read_block(
    ckpt: &Checkpoint,
    sources: &Sources,
    layout: &BlockLayout,
    buf: &Tensor,
) -> Result<()> {
    let len = layout.bytes;
    debug_assert_eq!(buf.numel(), len);
    let (same, converted): (Vec<_>, Vec<_>) = layout
        .tensors
        .iter()
        .partition(|t| sources.tensors[t.source_index].kind == Some(t.kind));
    {
        // SAFETY: `buf` is a fresh contiguous 1-D uint8 host buffer of `len` bytes owned by
        // the caller, which nothing reads or writes until this returns.
        let bytes = unsafe { crate::host::bytes_mut(buf)? };
        let ranges: Vec<(usize, usize)> = same.iter().map(|t| (t.offset, t.bytes)).collect();
        let slices = checkpoint::disjoint_slices(bytes, &ranges)?;
        let jobs = checkpoint::split_jobs(
            same.iter()
                .map(|t| &sources.tensors[t.source_index])
                .zip(slices),
        );
        checkpoint::read_parallel(ckpt, jobs, crate::host::worker_threads())?;
    }
    for t in converted {
        let value = read_tensor(ckpt, &sources.tensors[t.source_index], t.kind)?;
        let mut view = buf
            .f_narrow(0, t.offset as i64, t.bytes as i64)
            .and_then(|v| v.f_view_dtype(t.kind))
            .and_then(|v| v.f_view(t.shape.as_slice()))
            .context("converting a checkpoint tensor")?;
        tch::no_grad(|| view.f_copy_(&value)).context("converting a checkpoint tensor")?;
    }
    Ok(())
}
