//! The weights: each block's handles, placeholders and host copy ([`BlockState`]), typed views
//! of a block buffer, and reading and writing tensors by name while offloaded (`tensor`,
//! `named_tensors`, `update_tensor`, `save_safetensors`).

use crate::error::Context;
use crate::error::{Error, Result};
use crate::plan::{BlockLayout, TensorLayout};
use std::path::Path;
use tch::{Device, Tensor};

use super::LayerwiseOffloadManager;
use super::tier::HostTier;

/// The state of one block.
#[derive(Debug)]
pub(super) struct BlockState {
    /// Where the block's bytes live.
    pub(super) tier: HostTier,
    /// Handles of the model's tensors (same order as the layout's tensors).
    pub(super) params: Vec<Tensor>,
    /// Empty tensors the params point at while the block is not on the device.
    pub(super) placeholders: Vec<Tensor>,
    /// Entered and not yet released.
    pub(super) in_use: bool,
    /// Kept on the compute device for good (within the VRAM budget): never streams.
    pub(super) resident: bool,
}

impl BlockState {
    /// A block whose tensors are `params`, with `placeholders` to point them at while off the
    /// device; no host copy yet.
    pub(super) fn new(
        params: Vec<Tensor>,
        placeholders: Vec<Tensor>,
        resident: bool,
    ) -> BlockState {
        BlockState {
            tier: HostTier::Model,
            params,
            placeholders,
            in_use: false,
            resident,
        }
    }

    /// Points the block's tensors at their placeholders: frees their storage unless something
    /// else holds it.
    pub(super) fn point_at_placeholders(&mut self) -> Result<()> {
        for (p, ph) in self.params.iter_mut().zip(&self.placeholders) {
            p.f_set_data(ph).context("placing placeholders")?;
        }
        Ok(())
    }

    /// Points the block's tensors at `views` (one per tensor, from [`views`]).
    pub(super) fn point_at(&mut self, views: &[Tensor], op: &'static str) -> Result<()> {
        for (p, v) in self.params.iter_mut().zip(views) {
            p.f_set_data(v).map_err(|e| Error::from((op, e)))?;
        }
        Ok(())
    }
}

/// Typed views of a block buffer (host buffer or slot), one per tensor, with the original
/// shapes and strides.
pub(super) fn views(buf: &Tensor, layout: &BlockLayout) -> Result<Vec<Tensor>> {
    layout
        .tensors
        .iter()
        .map(|t| {
            buf.f_narrow(0, t.offset as i64, t.bytes as i64)
                .and_then(|v| v.f_view_dtype(t.kind))
                .and_then(|v| v.f_as_strided(t.shape.as_slice(), t.strides.as_slice(), None))
                .context("making views of a block buffer")
        })
        .collect()
}

/// Each tensor of `layout` with its view (from [`views`]) and the model's handle of it.
pub(super) fn zip_views<'a>(
    layout: &'a BlockLayout,
    views: &'a [Tensor],
    params: &'a mut [Tensor],
) -> impl Iterator<Item = (&'a TensorLayout, &'a Tensor, &'a mut Tensor)> {
    layout
        .tensors
        .iter()
        .zip(views)
        .zip(params)
        .map(|((t, v), p)| (t, v, p))
}

/// `view` (tensor `t` of a block's host copy) copied into a new tensor on `device` with the same
/// shape, strides and dtype, in memory the caller owns.
pub(super) fn owned_copy(
    t: &TensorLayout,
    view: &Tensor,
    device: Device,
    op: &'static str,
) -> Result<Tensor> {
    let mut fresh =
        empty_like(t, device).map_err(|e| Error::from_torch(op, t.bytes as u64, e.to_string()))?;
    tch::no_grad(|| fresh.f_copy_(view))
        .map_err(|e| Error::from_torch(op, t.bytes as u64, e.to_string()))?;
    Ok(fresh)
}

/// An uninitialized tensor on `device` with `t`'s shape, strides and dtype.
pub(super) fn empty_like(
    t: &TensorLayout,
    device: Device,
) -> std::result::Result<Tensor, tch::TchError> {
    Tensor::f_empty_strided(t.shape.as_slice(), t.strides.as_slice(), (t.kind, device))
}

impl LayerwiseOffloadManager {
    /// Finds a managed tensor: `Ok(Some((block, position)))` for a block tensor, `Ok(None)`
    /// for a non-block tensor.
    fn locate(&self, name: &str) -> Result<(usize, Option<(usize, usize)>)> {
        let src = self
            .named
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| Error::UnknownTensor {
                name: name.to_owned(),
            })?;
        if let Some(rt) = self.phase.runtime() {
            for (li, l) in rt.plan.blocks.iter().enumerate() {
                if let Some(j) = l.tensors.iter().position(|t| t.source_index == src)
                    && rt.blocks[li].tier.is_offloaded()
                {
                    return Ok((src, Some((li, j))));
                }
            }
        }
        Ok((src, None))
    }

    /// The current value of tensor `name`: for an offloaded block tensor a view of its host
    /// copy (CPU; read it, do not write it: use [`Self::update_tensor`]), otherwise the model's
    /// tensor. Where the host copy is a read-only mapping (`zero_copy`, a store opened with
    /// [`HostStore::open_shared`](crate::HostStore::open_shared)) it is a copy the caller owns
    /// instead: writing it changes nothing else. A disk-tier or compressed block's value is
    /// always a fresh tensor (read or decoded for the call).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        self.value(name, true)
    }

    /// [`Self::tensor`]; with `owned` false, a view of a read-only host copy too (for reads
    /// that never leave this crate).
    fn value(&self, name: &str, owned: bool) -> Result<Tensor> {
        let (src, at) = self.locate(name)?;
        match (at, self.phase.runtime()) {
            (Some((li, j)), Some(rt)) => {
                self.backend.sync_copies();
                rt.blocks[li].tier.tensor(li, rt.layout(li), j, owned)
            }
            _ => Ok(self.named[src].1.shallow_clone()),
        }
    }

    /// Every managed tensor's current value, in the source's order (see [`Self::tensor`]).
    /// Saving the model's own `VarStore` while offloaded would write the placeholders; save
    /// these instead (or use [`Self::save_safetensors`]).
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.named
            .iter()
            .map(|(n, _)| Ok((n.clone(), self.tensor(n)?)))
            .collect()
    }

    /// Writes every weight (block tensors from their host copies) to a safetensors file.
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        // Only read, by the writer below: views of a read-only host copy need no copy.
        let tensors: Vec<(String, Tensor)> = self
            .named
            .iter()
            .map(|(n, _)| {
                let t = self.value(n, false)?;
                Ok((
                    n.clone(),
                    if t.is_contiguous() { t } else { t.contiguous() },
                ))
            })
            .collect::<Result<_>>()?;
        Tensor::write_safetensors(&tensors, path).context("save_safetensors")
    }

    /// Replaces the value of tensor `name` (e.g. after merging a LoRA): for a block tensor the
    /// host copy is overwritten and the next upload carries the new value; for a non-block
    /// tensor the model's tensor is overwritten in place. Shape and dtype must match. Waits for
    /// queued uploads first; refused while the block is entered.
    pub fn update_tensor(&mut self, name: &str, value: &Tensor) -> Result<()> {
        let (src, at) = self.locate(name)?;
        let memory = self.host_memory();
        let located = at.zip(self.phase.runtime_mut());
        let (shape, kind) = match &located {
            Some(((li, j), rt)) => {
                let t = &rt.layout(*li).tensors[*j];
                (t.shape.clone(), t.kind)
            }
            None => (self.named[src].1.size(), self.named[src].1.kind()),
        };
        if value.size() != shape || value.kind() != kind {
            return Err(Error::Mismatch {
                name: name.to_owned(),
                expected: format!("{shape:?} {kind:?}"),
                got: format!("{:?} {:?}", value.size(), value.kind()),
            });
        }
        let Some(((li, j), rt)) = located else {
            let t = &mut self.named[src].1;
            tch::no_grad(|| t.f_copy_(value)).context("update_tensor")?;
            return Ok(());
        };
        if rt.blocks[li].in_use {
            return Err(Error::BlockInUse {
                op: "update_tensor",
                block: li,
            });
        }
        if self.config.peer.is_some() {
            return Err(Error::InvalidArgument {
                op: "update_tensor",
                message: format!(
                    "{name:?} is a block weight of a peer group member, whose blocks are assembled from every member's host copy; update the model before building the group"
                ),
            });
        }
        rt.blocks[li].tier.refuse_update(name)?;
        if rt.host_is_shared() {
            return Err(Error::InvalidArgument {
                op: "update_tensor",
                message: format!(
                    "the host copy of {name:?} is shared with other managers or processes, or is the checkpoint's own read-only pages (zero_copy); update it before sharing or publishing the store, or restore the others first, or load without zero_copy"
                ),
            });
        }
        self.backend.sync_copies();
        rt.update_host(
            name,
            (li, j),
            value,
            (memory, self.config.encoding(), &mut self.stats),
            &self.backend,
        )?;
        if rt.blocks[li].resident {
            // A resident block with a host copy (shareable): the device tensor too.
            let p = &mut rt.blocks[li].params[j];
            tch::no_grad(|| p.f_copy_(value)).context("update_tensor")?;
        }
        if let Some(s) = rt.ring.slot_of(li) {
            rt.evict(s, &self.backend)?;
        }
        Ok(())
    }
}
