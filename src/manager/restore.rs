//! Giving the weights back: `restore` and `restore_to` (every block into fresh tensors),
//! the roll-back of a failed `initialize`, and what Drop leaves (each block tensor pointing at
//! its host copy).

use crate::error::Context;
use crate::error::{Error, Result};
use crate::stats::OffloadStats;
use std::sync::Arc;
use tch::Device;

use super::LayerwiseOffloadManager;
use super::faults::FaultInjector;
use super::lifecycle::Undo;
use super::phase::{Phase, Runtime};
use super::tier::HostTier;
use super::weights::{empty_like, zip_views};

impl LayerwiseOffloadManager {
    /// Puts every block tensor back on the compute device (fresh tensors with the original
    /// shapes and strides, bit-identical), frees the slots and host buffers, and leaves the
    /// model usable without the manager. Needs device memory for the whole model; if it runs
    /// out, blocks restored so far stay restored and calling it again (after freeing memory)
    /// or [`Self::restore_to`] the CPU finishes the job. Once a restore has started the block
    /// loop is over, also if it fails: loop calls return [`Error::PartlyRestored`] until a
    /// restore finishes, while [`Self::tensor`], [`Self::stats`] and the other reads work.
    pub fn restore(&mut self) -> Result<()> {
        let device = self.compute_device();
        self.restore_to(device)
    }

    /// [`Self::restore`] onto `device` (e.g. `Device::Cpu` for a model that does not fit).
    pub fn restore_to(&mut self, device: Device) -> Result<()> {
        let Some(rt) = self.phase.runtime() else {
            return Ok(()); // never initialized, or restored already
        };
        let _span = crate::observe::restore(rt.blocks.len());
        self.backend.sync_copies();
        // Reading the zero-copy store's pages of a file truncated since would be SIGBUS.
        if let (true, Some(c)) = (self.config.zero_copy, &self.config.checkpoint) {
            c.check_lengths()?;
        }
        // Disk-tier blocks are read back from the checkpoint: refused, with nothing changed, if
        // a file changed since initialize() (their old weights are gone).
        if let Some(disk) = &rt.disk {
            disk.check_files()?;
        }
        // The loop is over from here, also if a block below fails: loop calls are refused and
        // the other members of a peer group learn at once that this one left.
        self.phase = match std::mem::take(&mut self.phase) {
            Phase::Ready(rt) | Phase::Restoring { rt, .. } => Phase::Restoring { rt, restored: 0 },
            other => other,
        };
        self.leave_group();
        let Phase::Restoring { rt, restored } = &mut self.phase else {
            return Ok(());
        };
        for i in 0..rt.blocks.len() {
            restore_block(rt, i, device, &mut self.stats, &mut self.faults)?;
            *restored += 1;
        }
        self.backend.synchronize()?;
        let Phase::Restoring { rt, .. } = std::mem::take(&mut self.phase) else {
            unreachable!("set above");
        };
        let Runtime {
            plan,
            blocks,
            ring,
            store,
            disk,
            decoding,
            claim,
        } = rt;
        // Given up in this order: the slots, the host store, the disk tier, the staging
        // buffers, the claim on the model's tensors.
        drop((ring, store, disk, decoding, claim));
        self.stats.shared_host_bytes = 0;
        self.phase = Phase::Restored { plan, blocks };
        Ok(())
    }

    /// Undoes a failed [`Self::offload`]: own host copies go back into fresh tensors on their
    /// old devices (or, without memory there, stay as host views), re-pointed tensors get their
    /// old data back, and the slot ring, the plan, the store, the claim, the peer group rank
    /// and the shared-memory file this call created are given up.
    pub(super) fn roll_back(&mut self, undo: Undo) {
        self.backend.sync_copies();
        let Undo {
            devices,
            repointed,
            created,
            mut building,
        } = undo;
        // Blocks filled from a shared store or a checkpoint keep their old values in
        // `repointed`; own host copies of the model's values go back from here.
        if let (None, None, Some(b)) = (
            &self.config.store,
            &self.config.checkpoint,
            building.as_mut(),
        ) {
            for (i, layout) in b.plan.blocks.iter().enumerate() {
                let block = &mut b.blocks[i];
                if block.resident {
                    continue; // moved to the device in step 3: in `repointed`
                }
                let tier = std::mem::replace(&mut block.tier, HostTier::Model);
                let Some(host) = tier.host() else {
                    continue; // not copied yet: untouched
                };
                let Ok(views) = host.decoded().and_then(|h| h.views(layout)) else {
                    continue;
                };
                for (t, v, p) in zip_views(layout, &views, &mut block.params) {
                    let device = devices[t.source_index];
                    let fresh = empty_like(t, device)
                        .and_then(|mut f| tch::no_grad(|| f.f_copy_(v)).map(|_| f));
                    let _ = match fresh {
                        Ok(f) => p.f_set_data(&f),
                        Err(_) => p.f_set_data(v),
                    };
                }
            }
        }
        for (i, old) in repointed.into_iter().rev() {
            let _ = self.named[i].1.f_set_data(&old);
        }
        if self.peer.joined
            && let Some((group, rank)) = &self.config.peer
        {
            group.unjoin(*rank);
        }
        self.peer.joined = false;
        // The blocks, the ring, the disk tier and the claim.
        drop(building);
        self.stats = OffloadStats::default();
        if let Some(path) = created {
            // The file this call created (the manifest's own writer removes its temporary).
            let _ = std::fs::remove_file(path);
        }
    }

    /// Points every filled block's tensors at their host copies (CPU memory) and forgets the
    /// slots: the state after drop. A host copy that is not this manager's alone (a read-only
    /// mapping, a store shared with other managers or published to other processes) is copied
    /// into memory the model then owns, so that writing the model's tensors later can neither
    /// fault on read-only pages nor change another manager's weights, and truncating the file
    /// later cannot reach them. Should that allocation fail, the tensor points at the shared
    /// copy (readable, not writable), which is still better than losing the value.
    pub(super) fn detach_to_host(&mut self) {
        self.backend.sync_copies();
        let Some(rt) = self.phase.runtime_mut() else {
            return;
        };
        let shared = rt.host_is_shared();
        for (i, b) in rt.blocks.iter_mut().enumerate() {
            if b.resident {
                continue; // real device tensors, not placeholders
            }
            let Some(values) = b.tier.detach(&rt.plan.blocks[i], shared) else {
                continue;
            };
            for (p, v) in b.params.iter_mut().zip(&values) {
                let _ = p.f_set_data(v);
            }
            b.in_use = false;
        }
        rt.ring.forget_all();
    }
}

/// Block `i` of `rt` back in the model, on `device` (fresh tensors; a resident block's tensors
/// moved there); its host copy given up (also from the store, when it is this manager's
/// alone). A block restored by an earlier call is left as it is.
fn restore_block(
    rt: &mut Runtime,
    i: usize,
    device: Device,
    stats: &mut OffloadStats,
    faults: &mut FaultInjector,
) -> Result<()> {
    let layout = &rt.plan.blocks[i];
    let b = &mut rt.blocks[i];
    if b.resident {
        for p in &mut b.params {
            if p.device() != device {
                let moved = tch::no_grad(|| p.f_to_device(device))
                    .map_err(|e| Error::from_torch("restore", 0, e.to_string()))?;
                p.f_set_data(&moved).context("restore")?;
            }
        }
        b.in_use = false;
        let tier = std::mem::replace(&mut b.tier, HostTier::Model);
        if tier.host().is_some() {
            stats.host_bytes = stats.host_bytes.saturating_sub(layout.bytes as u64);
        }
        if let Some(store) = Arc::get_mut(&mut rt.store) {
            store.release(i);
        }
        return Ok(());
    }
    if !b.tier.is_offloaded() {
        return Ok(()); // restored by an earlier call
    }
    if faults.restore() {
        return Err(Error::OutOfMemory {
            op: format!("restoring block {i}"),
            bytes: layout.bytes as u64,
            source: crate::error::TorchMessage("injected fault".into()),
        });
    }
    // A disk-tier block is read back from the checkpoint.
    let fresh = b.tier.restore(i, layout, device)?;
    b.point_at(&fresh, "restore")?;
    b.in_use = false;
    rt.ring.forget(i);
    let tier = std::mem::replace(&mut b.tier, HostTier::Model);
    if let Some(h) = tier.host() {
        stats.host_bytes = stats.host_bytes.saturating_sub(h.bytes() as u64);
    }
    // The store held the buffer too: without this, restoring onto the CPU needs the model
    // twice in host memory until the last block is done.
    if let Some(store) = Arc::get_mut(&mut rt.store) {
        store.release(i);
    }
    Ok(())
}
