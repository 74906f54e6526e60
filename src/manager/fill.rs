//! The host copies `initialize` makes without a checkpoint: each streamed block copied (or
//! encoded) into a host buffer of this manager's, in a shared-memory file if asked for, or
//! taken from a host store another manager made.

use crate::accel::{self, HostMemory};
use crate::error::Context;
use crate::error::{Error, Result};
use crate::host::{HostBlock, HostStore};
use crate::progress::{Reporter, Stage};
use std::sync::Arc;
use tch::Tensor;

use super::LayerwiseOffloadManager;
use super::compress::{in_place, zero_gaps};
use super::lifecycle::{Building, Undo};
use super::tier::HostTier;
use super::weights::{empty_like, views, zip_views};

impl LayerwiseOffloadManager {
    /// With a shared store: streamed blocks stream from it and get placeholders; resident
    /// blocks get fresh device tensors filled from it. The model's own block values are not
    /// used, but they are kept until initialize succeeds, to be put back should it fail.
    pub(super) fn fill_from_store(
        &mut self,
        b: &mut Building,
        store: Arc<HostStore>,
        streamed: &[usize],
        resident: &[bool],
        undo: &mut Undo,
    ) -> Result<Arc<HostStore>> {
        let compute = self.compute_device();
        for &i in streamed {
            b.blocks[i].tier = HostTier::from_store(&store, i);
            b.place_placeholders(i, undo)?;
        }
        for i in (0..b.blocks.len()).filter(|&i| resident[i]) {
            let buf = store.buffers[i]
                .as_ref()
                .expect("check_plan: every block is in the store");
            let layout = &b.plan.blocks[i];
            let views = buf.decoded()?.views(layout)?;
            for (t, v, p) in zip_views(layout, &views, &mut b.blocks[i].params) {
                let mut fresh = empty_like(t, compute).map_err(|e| {
                    Error::from_torch(
                        "filling resident blocks from the shared store",
                        t.bytes as u64,
                        e.to_string(),
                    )
                })?;
                tch::no_grad(|| fresh.f_copy_(v)).context("filling resident blocks")?;
                undo.repoint(t.source_index, p, &fresh, "filling resident blocks")?;
            }
        }
        self.stats.shared_host_bytes = store.bytes();
        Ok(store)
    }

    /// Without a shared store: each streamed block (every block if `shareable`) copied into a
    /// host buffer of this manager's, in a shared-memory file if asked for, which is published
    /// with its manifest last; the buffers become this manager's [`HostStore`].
    pub(super) fn fill_own_store(
        &mut self,
        b: &mut Building,
        resident: &[bool],
        undo: &mut Undo,
    ) -> Result<Arc<HostStore>> {
        let n = b.blocks.len();
        let with_host: Vec<usize> = (0..n)
            .filter(|&i| !resident[i] || self.config.shareable)
            .collect();
        let mut scratch = None;
        let sizes: Vec<u64> = with_host
            .iter()
            .map(|&i| b.plan.blocks[i].bytes as u64)
            .collect();
        let _span = crate::observe::stage(false, sizes.len(), sizes.iter().sum());
        let mut progress = Reporter::start(self.config.progress.as_ref(), Stage::HostCopy, sizes);
        // Compressed and published: each block encoded first, the file sized to the encodings.
        let encode_first = self.config.compress && self.config.shm.is_some();
        if encode_first {
            for &i in &with_host {
                self.fill_host(b, i, !resident[i], None, &mut scratch)?;
                progress.advance(b.plan.blocks[i].bytes as u64);
            }
        }
        // A shared-memory file: one mapping, each block at a 4 KiB aligned offset.
        let sizes: Vec<Option<usize>> = (0..n)
            .map(|i| {
                with_host
                    .contains(&i)
                    .then(|| match b.blocks[i].tier.encoding() {
                        Some((enc, _)) if encode_first => enc.numel(),
                        _ => b.plan.blocks[i].bytes,
                    })
            })
            .collect();
        let (offsets, total) = crate::host::file_offsets(&sizes);
        let file = match &self.config.shm {
            Some(path) if total > 0 => {
                let f = accel::map_host_file(
                    path,
                    total,
                    accel::FileMapping::Create,
                    self.host_memory(),
                )?;
                undo.created = Some(path.clone());
                Some(f)
            }
            Some(_) => {
                return Err(Error::InvalidArgument {
                    op: "OffloadConfig::shared_memory",
                    message: "every block stays resident on the device under the VRAM budget, so there is no host copy to publish; build with .shareable(true) to publish the resident blocks too, or lower the budget".into(),
                });
            }
            None => None,
        };
        for &i in &with_host {
            let buffer = match &file {
                Some(f) => Some(
                    f.f_narrow(
                        0,
                        offsets[i] as i64,
                        sizes[i].expect("with a host copy") as i64,
                    )
                    .map_err(|e| Error::from(("mapping a block in the shared-memory file", e)))?,
                ),
                None => None,
            };
            match (encode_first, buffer) {
                (true, Some(buffer)) => self.publish_encoding(b, i, buffer)?,
                (_, buffer) => {
                    self.fill_host(b, i, !resident[i], buffer, &mut scratch)?;
                    progress.advance(b.plan.blocks[i].bytes as u64);
                }
            }
        }
        let store = Arc::new(HostStore::own(
            b.plan.blocks.clone(),
            b.blocks
                .iter()
                .map(|b| b.tier.host().map(HostBlock::shallow_clone))
                .collect(),
            self.host_memory() == HostMemory::Pinned,
            self.config.shm.clone().filter(|_| file.is_some()),
        ));
        if let Some(path) = &self.config.shm
            && file.is_some()
        {
            // Last: readers see the manifest only once every block is in place. Should
            // writing it fail, the caller rolls back (the model gets its blocks back).
            store.write_manifest(path, &offsets, total)?;
        }
        Ok(store)
    }

    /// Copies block `i`'s tensors into `buffer` (or a new host buffer) and, if `release`,
    /// points them at placeholders.
    /// With `compress`, the block's encoding becomes the host copy: encoded straight from its
    /// tensors when each is a contiguous CPU tensor laid out as the block's layout says
    /// ([`Self::encode_in_place`]), else from a copy of the block in `scratch` (a pageable
    /// buffer reused from block to block).
    fn fill_host(
        &mut self,
        b: &mut Building,
        i: usize,
        release: bool,
        buffer: Option<Tensor>,
        scratch: &mut Option<Tensor>,
    ) -> Result<()> {
        let layout = &b.plan.blocks[i];
        if self.faults.host_alloc() {
            return Err(Error::HostAlloc {
                kind: "pinned",
                bytes: layout.bytes as u64,
                source: crate::error::TorchMessage("injected fault".into()),
            });
        }
        let encode = b.encode[i] && buffer.is_none();
        // A block in the shared-memory file is a block of the store published there.
        let in_file = buffer.is_some();
        let copy = if encode && in_place(layout, &b.blocks[i].params) {
            self.encode_in_place(i, &b.blocks[i].params, layout)?
        } else {
            let host = match buffer {
                Some(b) => b,
                None if encode => scratch_buffer(scratch, layout.bytes)?,
                None => accel::alloc_host(layout.bytes, self.host_memory())?,
            };
            let views = views(&host, layout)?;
            let rt = &mut b.blocks[i];
            tch::no_grad(|| -> Result<()> {
                for (mut v, p) in views.into_iter().zip(&rt.params) {
                    v.f_copy_(p)
                        .context("copying a block into its host buffer")?;
                }
                Ok(())
            })?;
            if encode {
                // The bytes between tensors as encode_in_place sees them (0), so that a block
                // encodes to the same bytes either way: peer group members compare lengths.
                zero_gaps(&host, layout)?;
                self.encode_block(&host)?
            } else {
                self.stats.host_bytes += layout.bytes as u64;
                HostBlock::whole(host)
            }
        };
        let rt = &mut b.blocks[i];
        rt.tier = match in_file {
            true => HostTier::SharedMemory {
                host: copy,
                opened: false,
            },
            false => HostTier::Pinned(copy),
        };
        if !release {
            return Ok(());
        }
        // Frees the original storage unless the caller holds it elsewhere.
        rt.point_at_placeholders()
    }

    /// Moves block `i`'s encoding (its host copy, just made) into `buffer` (its place in the
    /// shared-memory file, of the encoding's length), which becomes the host copy.
    fn publish_encoding(&mut self, b: &mut Building, i: usize, mut buffer: Tensor) -> Result<()> {
        let tier = &mut b.blocks[i].tier;
        let (enc, raw) = tier
            .encoding()
            .map(|(e, r)| (e.shallow_clone(), r))
            .ok_or_else(|| Error::InvalidArgument {
                op: "OffloadConfig::shared_memory",
                message: format!("block {i} was not encoded: this is a bug"),
            })?;
        tch::no_grad(|| buffer.f_copy_(&enc)).context("publishing an encoded block")?;
        *tier = HostTier::SharedMemory {
            host: HostBlock::encoded(buffer, raw),
            opened: false,
        };
        Ok(())
    }

    pub(super) fn host_memory(&self) -> HostMemory {
        self.backend.host_memory(self.config.pin_cpu_memory)
    }
}

/// The first `bytes` of `scratch`, a pageable buffer grown to the largest size asked for.
pub(super) fn scratch_buffer(scratch: &mut Option<Tensor>, bytes: usize) -> Result<Tensor> {
    if scratch.as_ref().is_none_or(|s| s.numel() < bytes) {
        *scratch = Some(accel::alloc_host(bytes.max(1), HostMemory::Pageable)?);
    }
    scratch
        .as_ref()
        .expect("set above")
        .f_narrow(0, 0, bytes as i64)
        .context("a scratch buffer")
}
