//! The ring of device slots. A [`Slot`] owns its buffer, the block it holds and the events that
//! order its reuse: `ready` (recorded on the copy stream after an upload; the compute stream
//! waits on it), `free` (recorded on the compute stream when the block is released; the copy
//! stream waits on it before overwriting the slot) and, in a peer group, `pushed` (one per
//! receiving member) and the incoming shares. The manager decides what goes where; the slot
//! keeps the order.

use crate::accel::{Event, Stream};
use crate::error::{Error, Result};
use std::sync::Arc;
use tch::Tensor;

use super::device::Backend;

/// One slot of the ring.
#[derive(Debug)]
pub(super) struct Slot {
    buf: Tensor,
    /// The block whose bytes the slot holds (uploaded or queued), if any.
    block: Option<usize>,
    /// Recorded on the copy stream after the upload into this slot (CUDA).
    ready: Option<Event>,
    /// Recorded on the compute stream when the block using this slot was released (CUDA).
    free: Option<Event>,
    free_recorded: bool,
    /// The block now in the slot was released since its upload (so `free` covers its reads).
    released: bool,
    /// When the slot's block was last entered (the manager's tick).
    last_used: u64,
    /// Peer groups: this member's rank.
    rank: usize,
    /// Peer groups, by receiving rank: recorded on the push stream to that member after this
    /// slot's share went there.
    pushed: Vec<Event>,
    pushed_recorded: bool,
    /// Peer groups: the other members' shares of the block now in the slot have arrived once
    /// these have completed.
    incoming: Vec<Arc<Event>>,
}

impl Slot {
    /// A slot of `bytes` bytes on the backend's device, with its events (CUDA); `peer` is the
    /// group's size and this member's rank. `oom` gives running out of device memory its
    /// context (the whole ring's size).
    pub(super) fn new(
        backend: &Backend,
        bytes: usize,
        peer: Option<(usize, usize)>,
        oom: impl FnOnce(crate::error::TorchMessage) -> Error,
    ) -> Result<Slot> {
        let buf = backend.alloc_slot(bytes).map_err(|e| match e {
            Error::OutOfMemory { source, .. } if backend.has_events() => oom(source),
            e => e,
        })?;
        let (ready, free) = if backend.has_events() {
            (Some(Event::new()?), Some(Event::new()?))
        } else {
            (None, None)
        };
        let pushed = match peer {
            Some((n, _)) if backend.has_events() => {
                (0..n).map(|_| Event::new()).collect::<Result<_>>()?
            }
            _ => Vec::new(),
        };
        Ok(Slot {
            buf,
            block: None,
            ready,
            free,
            free_recorded: false,
            released: false,
            last_used: 0,
            rank: peer.map_or(0, |(_, r)| r),
            pushed,
            pushed_recorded: false,
            incoming: Vec::new(),
        })
    }

    /// The slot's whole buffer.
    pub(super) fn buf(&self) -> &Tensor {
        &self.buf
    }

    /// The first `bytes` bytes of the buffer, where a block's upload goes.
    pub(super) fn dst(&self, bytes: usize) -> Result<Tensor> {
        self.buf
            .f_narrow(0, 0, bytes as i64)
            .map_err(|e| Error::from(("upload", e)))
    }

    /// The block the slot holds, if any.
    pub(super) fn block(&self) -> Option<usize> {
        self.block
    }

    /// When the slot's block was last entered.
    pub(super) fn last_used(&self) -> u64 {
        self.last_used
    }

    /// Whether the block in the slot was released since its upload.
    pub(super) fn is_released(&self) -> bool {
        self.released
    }

    /// Makes `copy` wait until the slot may be overwritten: compute released its previous block
    /// and (peer groups) this member's share of that block went out to the others.
    pub(super) fn wait_writable(&self, copy: &Stream) -> Result<()> {
        if self.free_recorded {
            self.free
                .as_ref()
                .expect("CUDA slots have events")
                .wait(copy)?;
        }
        if self.pushed_recorded {
            for (o, e) in self.pushed.iter().enumerate() {
                if o != self.rank {
                    e.wait(copy)?;
                }
            }
        }
        Ok(())
    }

    /// Records `ready` on `copy`, after the upload into the slot was queued there.
    pub(super) fn mark_ready(&mut self, copy: &Stream) -> Result<()> {
        self.ready
            .as_mut()
            .expect("CUDA slots have events")
            .record(copy)
    }

    /// Recorded after this member's upload into the slot (not the other members' shares).
    pub(super) fn uploaded(&self) -> &Event {
        self.ready.as_ref().expect("CUDA slots have events")
    }

    /// Makes `stream` wait for this member's upload into the slot.
    fn wait_uploaded(&self, stream: &Stream) -> Result<()> {
        self.uploaded().wait(stream)
    }

    /// Makes the compute stream wait until the whole block is in the slot: this member's upload
    /// and (peer groups) every incoming share.
    pub(super) fn wait_ready(&self, compute: &Stream) -> Result<()> {
        self.wait_uploaded(compute)?;
        for e in &self.incoming {
            e.wait(compute)?;
        }
        Ok(())
    }

    /// Waits on the host until the whole block is in the slot (CUDA; at once elsewhere).
    pub(super) fn synchronize_ready(&self) -> Result<()> {
        if let Some(ready) = &self.ready {
            ready.synchronize()?;
            for e in &self.incoming {
                e.synchronize()?;
            }
        }
        Ok(())
    }

    /// Records `free` on `compute`: the slot's next upload waits for the compute work queued so
    /// far (CUDA; nothing elsewhere).
    pub(super) fn mark_free(&mut self, compute: Option<&Stream>) -> Result<()> {
        if let Some(compute) = compute {
            self.free
                .as_mut()
                .expect("CUDA slots have events")
                .record(compute)?;
            self.free_recorded = true;
        }
        Ok(())
    }

    /// The block in the slot was released by the compute stream.
    pub(super) fn mark_released(&mut self) {
        self.released = true;
    }

    /// Records `pushed[to]` on `push`, after this member's share was queued there for member
    /// `to`.
    pub(super) fn mark_pushed(&mut self, to: usize, push: &Stream) -> Result<()> {
        self.pushed[to].record(push)
    }

    /// Every outgoing share of the slot's block is queued: its next upload waits for them.
    pub(super) fn shares_pushed(&mut self) {
        self.pushed_recorded = true;
    }

    /// Forgets the incoming shares of the previous block (peer groups).
    pub(super) fn clear_incoming(&mut self) {
        self.incoming.clear();
    }

    /// The slot now holds `block` (just uploaded or queued), whose other shares arrive once
    /// `incoming` completes (peer groups).
    pub(super) fn hold(&mut self, block: usize, incoming: Vec<Arc<Event>>) {
        self.incoming = incoming;
        self.block = Some(block);
        self.released = false;
    }

    /// The block was entered at `tick`.
    pub(super) fn touch(&mut self, tick: u64) {
        self.last_used = tick;
    }

    /// Forgets the slot's block; returns it.
    pub(super) fn take_block(&mut self) -> Option<usize> {
        self.block.take()
    }
}
