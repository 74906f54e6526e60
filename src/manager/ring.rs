//! [`SlotRing`]: the device slots blocks stream through. The ring owns the slots, which block
//! each one holds (the only record of where a block is), the clock of entered blocks, the
//! choice of a slot for the next upload (empty ones first, then the least recently entered) and
//! the rule for its size. A [`Slot`] is a [`Fenced`] buffer (its `ready`, `free` and `pushed`
//! events) with the block it holds and, in a peer group, the events of the other members'
//! shares. The manager decides when to upload and release; the ring decides where.

use crate::accel::{Event, Stream};
use crate::error::{Error, Result};
use std::sync::Arc;
use tch::Tensor;

use super::device::Backend;
use super::fence::Fenced;

/// One slot of the ring.
#[derive(Debug)]
pub(super) struct Slot {
    buf: Fenced,
    /// The block whose bytes the slot holds (uploaded or queued), if any.
    block: Option<usize>,
    /// The block now in the slot was released since its upload (so `free` covers its reads).
    released: bool,
    /// When the slot's block was last entered (the ring's clock).
    last_used: u64,
    /// Peer groups: the other members' shares of the block now in the slot have arrived once
    /// these have completed.
    incoming: Vec<Arc<Event>>,
}

impl Slot {
    /// A slot over `buf`, with events if `events`; `peer` is the group's size and this
    /// member's rank.
    fn new(buf: Tensor, events: bool, peer: Option<(usize, usize)>) -> Result<Slot> {
        Ok(Slot {
            buf: Fenced::new(buf, events, peer)?,
            block: None,
            released: false,
            last_used: 0,
            incoming: Vec::new(),
        })
    }

    /// The slot's buffer and its events.
    pub(super) fn fenced(&self) -> &Fenced {
        &self.buf
    }

    /// The slot's buffer and its events, to record on.
    pub(super) fn fenced_mut(&mut self) -> &mut Fenced {
        &mut self.buf
    }

    /// The slot's whole buffer.
    pub(super) fn buf(&self) -> &Tensor {
        self.buf.buf()
    }

    /// The first `bytes` bytes of the buffer, where a block's upload goes.
    pub(super) fn dst(&self, bytes: usize) -> Result<Tensor> {
        self.buf.head(bytes)
    }

    /// Makes the compute stream wait until the whole block is in the slot: this member's upload
    /// (or decode) and (peer groups) every incoming share.
    pub(super) fn wait_ready(&self, compute: &Stream) -> Result<()> {
        self.buf.wait_ready(compute)?;
        for e in &self.incoming {
            e.wait(compute)?;
        }
        Ok(())
    }

    /// Waits on the host until the whole block is in the slot (CUDA; at once elsewhere).
    pub(super) fn synchronize_ready(&self) -> Result<()> {
        self.buf.synchronize_ready()?;
        for e in &self.incoming {
            e.synchronize()?;
        }
        Ok(())
    }

    /// Records `free` on `compute`: the slot's next upload waits for the compute work queued so
    /// far (CUDA; nothing elsewhere).
    fn mark_free(&mut self, compute: Option<&Stream>) -> Result<()> {
        match compute {
            Some(compute) => self.buf.mark_free(compute),
            None => Ok(()),
        }
    }

    /// Forgets the incoming shares of the previous block (peer groups).
    pub(super) fn clear_incoming(&mut self) {
        self.incoming.clear();
    }
}

/// The ring of device slots.
#[derive(Debug, Default)]
pub(super) struct SlotRing {
    slots: Vec<Slot>,
    /// Counts entered blocks (the slots' least-recently-used order).
    tick: u64,
}

impl SlotRing {
    /// The ring's size for blocks of `streamed` bytes each: `prefetch_depth + 1` slots of the
    /// largest, never more slots than blocks. Returns the number of slots and their size.
    pub(super) fn size(prefetch_depth: usize, streamed: &[usize]) -> (usize, usize) {
        let slot_bytes = streamed.iter().copied().max().unwrap_or(0);
        let n = prefetch_depth.saturating_add(1).min(streamed.len());
        (n, slot_bytes)
    }

    /// A ring of `n` slots of `bytes` bytes on the backend's device, with their events (CUDA);
    /// `peer` is the group's size and this member's rank; `fail` is asked before each slot
    /// whether to fail it (injected faults). Running out of device memory is
    /// [`Error::OutOfMemory`] about the whole ring.
    pub(super) fn alloc(
        backend: &Backend,
        (n, bytes): (usize, usize),
        peer: Option<(usize, usize)>,
        mut fail: impl FnMut() -> bool,
    ) -> Result<SlotRing> {
        let oom = |source| Error::OutOfMemory {
            op: format!("allocating {n} GPU slots of {bytes} bytes (prefetch_depth + 1)"),
            bytes: (bytes * n) as u64,
            source,
        };
        let mut slots = Vec::with_capacity(n);
        for _ in 0..n {
            if fail() {
                return Err(oom(crate::error::TorchMessage("injected fault".into())));
            }
            let buf = backend.alloc_slot(bytes).map_err(|e| match e {
                Error::OutOfMemory { source, .. } if backend.has_events() => oom(source),
                e => e,
            })?;
            slots.push(Slot::new(buf, backend.has_events(), peer)?);
        }
        Ok(SlotRing { slots, tick: 0 })
    }

    /// Number of slots.
    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Slot `s`.
    pub(super) fn slot(&self, s: usize) -> &Slot {
        &self.slots[s]
    }

    /// Slot `s`, to record on.
    pub(super) fn slot_mut(&mut self, s: usize) -> &mut Slot {
        &mut self.slots[s]
    }

    /// The slots' buffers (handles), slot by slot.
    pub(super) fn buffers(&self) -> Vec<Tensor> {
        self.slots.iter().map(|s| s.buf().shallow_clone()).collect()
    }

    /// The block each slot holds.
    pub(super) fn contents(&self) -> Vec<Option<usize>> {
        self.slots.iter().map(|s| s.block).collect()
    }

    /// The slot holding `block`, if any.
    pub(super) fn slot_of(&self, block: usize) -> Option<usize> {
        self.slots.iter().position(|s| s.block == Some(block))
    }

    /// The slot for the next upload: one whose block (if any) is not `busy` (entered, or about
    /// to be used); empty ones first, then the least recently entered.
    pub(super) fn pick(&self, busy: impl Fn(usize) -> bool) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.block.is_none_or(|b| !busy(b)))
            .min_by_key(|(_, s)| (s.block.is_some(), s.last_used))
            .map(|(i, _)| i)
    }

    /// Slot `s` now holds `block` (just uploaded or queued), whose other shares arrive once
    /// `incoming` completes (peer groups).
    pub(super) fn hold(&mut self, s: usize, block: usize, incoming: Vec<Arc<Event>>) {
        let slot = &mut self.slots[s];
        slot.incoming = incoming;
        slot.block = Some(block);
        slot.released = false;
    }

    /// The block in slot `s` was entered: it becomes the most recently used.
    pub(super) fn touch(&mut self, s: usize) {
        self.tick += 1;
        self.slots[s].last_used = self.tick;
    }

    /// The block in slot `s` was released by the compute stream (`compute`, CUDA): the slot's
    /// next upload waits for the compute work queued so far.
    pub(super) fn release(&mut self, s: usize, compute: Option<&Stream>) -> Result<()> {
        let slot = &mut self.slots[s];
        slot.mark_free(compute)?;
        slot.released = true;
        Ok(())
    }

    /// Empties slot `s` for another block; returns the block it held. A block never released
    /// since its upload may have been read without an enter/release pair (FastVideo's
    /// `prefetch_layer` points its tensors at the slot): the slot's next upload then waits for
    /// all compute work queued so far on the compute stream (`compute` gives it, asked only
    /// then).
    pub(super) fn evict(
        &mut self,
        s: usize,
        compute: impl FnOnce() -> Result<Option<Stream>>,
    ) -> Result<Option<usize>> {
        let slot = &mut self.slots[s];
        if slot.block.is_some() && !slot.released {
            slot.mark_free(compute()?.as_ref())?;
        }
        Ok(slot.block.take())
    }

    /// Forgets which block sits where, without ordering anything (the device was
    /// synchronized, or the blocks are restored).
    pub(super) fn forget(&mut self, block: usize) {
        if let Some(s) = self.slot_of(block) {
            self.slots[s].block = None;
        }
    }

    /// Forgets every slot's block (see [`Self::forget`]).
    pub(super) fn forget_all(&mut self) {
        for s in &mut self.slots {
            s.block = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SlotRing;
    use crate::manager::device::Backend;

    fn ring(n: usize) -> SlotRing {
        SlotRing::alloc(&Backend::Cpu, (n, 16), None, || false).unwrap()
    }

    #[test]
    fn the_ring_holds_prefetch_depth_plus_one_of_the_largest_block_at_most_one_per_block() {
        assert_eq!(SlotRing::size(1, &[10, 30, 20]), (2, 30));
        assert_eq!(SlotRing::size(4, &[10, 30, 20]), (3, 30));
        assert_eq!(SlotRing::size(usize::MAX, &[5]), (1, 5));
        assert_eq!(SlotRing::size(2, &[]), (0, 0));
    }

    #[test]
    fn empty_slots_go_first_then_the_least_recently_entered_never_a_busy_one() {
        let mut r = ring(3);
        assert_eq!(r.pick(|_| false), Some(0));
        r.hold(0, 7, Vec::new());
        assert_eq!(
            r.pick(|_| false),
            Some(1),
            "an empty slot before a full one"
        );
        r.hold(1, 8, Vec::new());
        r.hold(2, 9, Vec::new());
        r.touch(0);
        r.touch(2);
        r.touch(1);
        // Entered in the order 7, 9, 8: slot 0 (block 7) is the least recently entered.
        assert_eq!(r.pick(|_| false), Some(0));
        assert_eq!(r.pick(|b| b == 7), Some(2));
        assert_eq!(r.pick(|b| b != 8), Some(1));
        assert_eq!(r.pick(|_| true), None, "every slot busy");
        r.touch(0);
        assert_eq!(r.pick(|_| false), Some(2));
    }

    #[test]
    fn a_block_is_in_the_slot_that_holds_it_until_evicted_or_forgotten() {
        let mut r = ring(2);
        r.hold(1, 5, Vec::new());
        assert_eq!(r.slot_of(5), Some(1));
        assert_eq!(r.contents(), vec![None, Some(5)]);
        r.hold(0, 6, Vec::new());
        assert_eq!(r.evict(1, || Ok(None)).unwrap(), Some(5));
        assert_eq!(r.slot_of(5), None);
        assert_eq!(r.evict(1, || Ok(None)).unwrap(), None, "already empty");
        // A slot taken by another block no longer holds the old one.
        r.hold(0, 7, Vec::new());
        assert_eq!(r.slot_of(6), None);
        assert_eq!(r.slot_of(7), Some(0));
        r.forget(7);
        assert_eq!(r.contents(), vec![None, None]);
        r.hold(1, 3, Vec::new());
        r.forget_all();
        assert_eq!(r.slot_of(3), None);
    }

    #[test]
    fn an_injected_slot_failure_is_out_of_memory_about_the_whole_ring() {
        let mut calls = 0;
        let e = SlotRing::alloc(&Backend::Cpu, (3, 16), None, || {
            calls += 1;
            calls == 2
        })
        .unwrap_err();
        assert!(
            matches!(&e, crate::Error::OutOfMemory { bytes: 48, op, .. } if op.contains("3 GPU slots")),
            "{e:?}"
        );
    }

    #[test]
    fn cpu_slots_are_host_buffers_of_the_slot_size() {
        let r = ring(2);
        assert_eq!(r.len(), 2);
        assert_eq!(r.slot(1).buf().numel(), 16);
        assert_eq!(r.slot(0).dst(4).unwrap().numel(), 4);
        assert_eq!(r.buffers().len(), 2);
    }
}
