//! Which block goes into which slot, and when: entering a block (activate), queuing the next
//! ones (prefetch), releasing it, and evicting a slot's block for another.

use crate::error::{Error, Result};
use crate::stats::Lane;

use super::phase::Loop;

impl Loop<'_> {
    /// A slot for an upload: one that holds no entered block and none of `protect` (the
    /// ring's choice).
    pub(super) fn pick_slot(&self, protect: &[usize]) -> Option<usize> {
        self.rt
            .ring
            .pick(|b| self.rt.blocks[b].in_use || protect.contains(&b))
    }

    /// Empties slot `s` for another block (its old block's tensors go back to placeholders).
    pub(super) fn evict(&mut self, s: usize) -> Result<()> {
        self.rt.evict(s, self.backend)
    }

    /// Points block `block`'s tensors at views of its slot.
    pub(super) fn point_at_slot(&mut self, block: usize) -> Result<()> {
        let s = self
            .rt
            .ring
            .slot_of(block)
            .ok_or_else(|| not_in_slot(block))?;
        let views = super::weights::views(self.rt.ring.slot(s).buf(), self.rt.layout(block))?;
        self.rt.blocks[block].point_at(&views, "pointing a block at its slot")
    }

    /// Makes block `block` usable by the compute stream: uploads it if no slot holds it, makes
    /// the compute stream wait for its upload, points its tensors at the slot.
    pub(super) fn activate(&mut self, block: usize) -> Result<()> {
        if self.rt.blocks[block].in_use {
            return Ok(());
        }
        self.activate_inner(block)?;
        if self.timer.is_tracing()
            && let (Some(compute), Some(pair)) =
                (self.backend.compute_stream()?, self.timing_pair()?)
        {
            self.timer.open_compute(block, &compute, pair)?;
        }
        Ok(())
    }

    fn activate_inner(&mut self, block: usize) -> Result<()> {
        if self.rt.blocks[block].resident {
            self.rt.blocks[block].in_use = true;
            return Ok(());
        }
        let s = match self.rt.ring.slot_of(block) {
            Some(s) => s,
            None => {
                let s = self.pick_slot(&[block]).ok_or_else(|| Error::NoFreeSlot {
                    block,
                    in_use: self.rt.in_use(),
                })?;
                self.upload(block, s)?;
                s
            }
        };
        if let Some(compute) = self.backend.compute_stream()? {
            let pair = self.timing_pair()?;
            let slot = self.rt.ring.slot(s);
            self.timer
                .time(pair, &compute, (block, 0, Lane::Stall), || {
                    slot.wait_ready(&compute)
                })?;
        }
        self.point_at_slot(block)?;
        self.rt.ring.touch(s);
        self.rt.blocks[block].in_use = true;
        Ok(())
    }

    /// Queues the uploads of the `prefetch_depth` blocks after `block` in loop order, wrapping
    /// from the last block to the first. Stops quietly when no slot is free.
    pub(super) fn prefetch_ahead(&mut self, block: usize) -> Result<()> {
        let n = self.rt.blocks.len();
        let upcoming: Vec<usize> = (1..n)
            .map(|k| (block + k) % n)
            .filter(|&i| !self.rt.blocks[i].resident)
            .take(self.config.prefetch_depth)
            .collect();
        for &next in &upcoming {
            if self.rt.ring.slot_of(next).is_some() {
                continue;
            }
            let Some(s) = self.pick_slot(&upcoming) else {
                break;
            };
            self.upload(next, s)?;
        }
        Ok(())
    }

    /// Releases block `block` if entered: the compute stream records the slot's `free` event
    /// and the block's tensors go back to placeholders. The slot keeps the block's bytes until
    /// another block needs it, so re-entering it soon costs no upload.
    pub(super) fn release(&mut self, block: usize) -> Result<()> {
        if !self.rt.blocks[block].in_use {
            return Ok(());
        }
        self.rt.blocks[block].in_use = false;
        let backend = self.backend;
        self.timer
            .close_compute(block, || backend.compute_stream())?;
        if self.rt.blocks[block].resident {
            return Ok(());
        }
        let s = self
            .rt
            .ring
            .slot_of(block)
            .ok_or_else(|| not_in_slot(block))?;
        let compute = self.backend.compute_stream()?;
        self.rt.ring.release(s, compute.as_ref())?;
        self.rt.blocks[block].point_at_placeholders()
    }
}

/// A streamed block that should be in a slot is in none: a broken invariant.
fn not_in_slot(block: usize) -> Error {
    Error::InvalidArgument {
        op: "enter",
        message: format!("block {block} is in no slot of the ring: this is a bug"),
    }
}
