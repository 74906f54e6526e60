//! Giving the weights back: `restore` and `restore_to` (every block into fresh tensors),
//! the roll-back of a failed `initialize`, and what Drop leaves (each block tensor pointing at
//! its host copy).

use crate::error::{Error, Result};
use crate::stats::OffloadStats;
use std::sync::Arc;
use tch::Device;

use super::lifecycle::Undo;
use super::ring::SlotRing;
use super::tier::HostTier;
use super::weights::{empty_like, zip_views};
use super::{LayerwiseOffloadManager, Phase};

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
        if self.phase == Phase::Restored || self.plan.is_none() {
            return Ok(());
        }
        self.backend.sync_copies();
        // Reading the zero-copy store's pages of a file truncated since would be SIGBUS.
        if let (true, Some(c)) = (self.config.zero_copy, &self.config.checkpoint) {
            c.check_lengths()?;
        }
        // Disk-tier blocks are read back from the checkpoint: refused, with nothing changed, if
        // a file changed since initialize() (their old weights are gone).
        if let Some(disk) = &self.disk {
            disk.check_files()?;
        }
        // The loop is over from here, also if a block below fails: loop calls are refused and
        // the other members of a peer group learn at once that this one left.
        self.phase = Phase::Restoring;
        self.leave_group();
        self.restored = 0;
        for i in 0..self.blocks.len() {
            if self.blocks[i].resident {
                for p in &mut self.blocks[i].params {
                    if p.device() != device {
                        let moved = tch::no_grad(|| p.f_to_device(device))
                            .map_err(|e| Error::from_torch("restore", 0, e.to_string()))?;
                        p.f_set_data(&moved)
                            .map_err(|e| Error::from(("restore", e)))?;
                    }
                }
                self.blocks[i].in_use = false;
                let tier = std::mem::replace(&mut self.blocks[i].tier, HostTier::Model);
                if tier.host().is_some() {
                    let bytes = self.layout(i).bytes as u64;
                    self.stats.host_bytes = self.stats.host_bytes.saturating_sub(bytes);
                }
                if let Some(store) = self.store.as_mut().and_then(Arc::get_mut) {
                    store.release(i);
                }
                self.restored += 1;
                continue;
            }
            if !self.blocks[i].tier.is_offloaded() {
                self.restored += 1; // restored by an earlier call
                continue;
            }
            if self.faults.restore() {
                return Err(Error::OutOfMemory {
                    op: format!("restoring block {i}"),
                    bytes: self.layout(i).bytes as u64,
                    source: crate::error::TorchMessage("injected fault".into()),
                });
            }
            // A disk-tier block is read back from the checkpoint.
            let fresh = self.blocks[i].tier.restore(i, self.layout(i), device)?;
            let b = &mut self.blocks[i];
            b.point_at(&fresh, "restore")?;
            b.in_use = false;
            self.ring.forget(i);
            let tier = std::mem::replace(&mut self.blocks[i].tier, HostTier::Model);
            if let Some(h) = tier.host() {
                let held = h.bytes() as u64;
                self.stats.host_bytes = self.stats.host_bytes.saturating_sub(held);
            }
            // The store held the buffer too: without this, restoring onto the CPU needs the
            // model twice in host memory until the last block is done.
            if let Some(store) = self.store.as_mut().and_then(Arc::get_mut) {
                store.release(i);
            }
            self.restored += 1;
        }
        self.backend.synchronize()?;
        self.ring = SlotRing::default();
        self.store = None;
        self.disk = None;
        self.decoding = None;
        self.claim = None;
        self.stats.shared_host_bytes = 0;
        self.phase = Phase::Restored;
        Ok(())
    }

    /// Undoes a failed [`Self::offload`]: own host copies go back into fresh tensors on their
    /// old devices (or, without memory there, stay as host views), re-pointed tensors get their
    /// old data back, and the slot ring, the plan, the store, the claim, the peer group rank
    /// and the shared-memory file this call created are given up.
    pub(super) fn roll_back(&mut self, undo: Undo) {
        self.backend.sync_copies();
        // Blocks filled from a shared store or a checkpoint keep their old values in
        // `undo.repointed`; own host copies of the model's values go back from here.
        if self.config.store.is_none() && self.config.checkpoint.is_none() && self.plan.is_some() {
            for i in 0..self.blocks.len() {
                if self.blocks[i].resident {
                    continue; // moved to the device in step 3: in `undo.repointed`
                }
                let tier = std::mem::replace(&mut self.blocks[i].tier, HostTier::Model);
                let Some(host) = tier.host() else {
                    continue; // not copied yet: untouched
                };
                let layout = self.layout(i).clone();
                let Ok(views) = host.decoded().and_then(|h| h.views(&layout)) else {
                    continue;
                };
                for (t, v, p) in zip_views(&layout, &views, &mut self.blocks[i].params) {
                    let device = undo.devices[t.source_index];
                    let fresh = empty_like(t, device)
                        .and_then(|mut f| tch::no_grad(|| f.f_copy_(v)).map(|_| f));
                    let _ = match fresh {
                        Ok(f) => p.f_set_data(&f),
                        Err(_) => p.f_set_data(v),
                    };
                }
            }
        }
        for (i, old) in undo.repointed.into_iter().rev() {
            let _ = self.named[i].1.f_set_data(&old);
        }
        if self.peer.joined
            && let Some((group, rank)) = &self.config.peer
        {
            group.unjoin(*rank);
        }
        self.peer.joined = false;
        self.blocks.clear();
        self.ring = SlotRing::default();
        self.disk = None;
        self.decoding = None;
        self.plan = None;
        self.store = None; // a published store removes its file and manifest when dropped
        self.claim = None;
        self.stats = OffloadStats::default();
        if let Some(path) = undo.created {
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
        if self.plan.is_none() {
            return;
        }
        let shared = self.host_is_shared();
        for i in 0..self.blocks.len() {
            if self.blocks[i].resident {
                continue; // real device tensors, not placeholders
            }
            let Some(values) = self.blocks[i].tier.detach(self.layout(i), shared) else {
                continue;
            };
            for (p, v) in self.blocks[i].params.iter_mut().zip(&values) {
                let _ = p.f_set_data(v);
            }
            self.blocks[i].in_use = false;
        }
        self.ring.forget_all();
    }
}
