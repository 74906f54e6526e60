//! [`LayerwiseOffloadManager`]: keeps each block's weights in one host buffer and streams them
//! through a fixed ring of GPU slots, one block ahead of the compute.

mod build;
mod cached;
mod compat;
mod compress;
mod config;
mod decode;
mod device;
mod disk;
mod faults;
mod fence;
mod fill;
mod forms;
mod lifecycle;
mod load;
mod phase;
mod restore;
mod ring;
mod runs;
mod schedule;
mod share;
mod staging;
mod tier;
mod timing;
mod upload;
mod weights;

pub use config::{
    DEFAULT_SEGMENT_BYTES, DEFAULT_STAGING_BUFFERS, MAX_PREFETCH_DEPTH, MAX_STAGING_BUFFERS,
    OffloadConfig, SEGMENT_BYTES_MULTIPLE,
};
#[cfg(feature = "testing")]
pub use faults::Fault;

use crate::error::{Error, Result};
use crate::host::HostStore;
use crate::plan::Plan;
use crate::stats::OffloadStats;
use device::Backend;
use faults::FaultInjector;
use phase::{Loop, Phase};
use share::PeerLink;
use std::sync::Arc;
use tch::{Device, Tensor};
use timing::Timer;

/// Streams a model's per-block weights between host memory and the GPU, one block ahead of the
/// compute, with the API of FastVideo's `LayerwiseOffloadManager` plus a guard-based block loop.
///
/// Blocks are numbered in loop order across all lists (list by list); [`Self::block_index`]
/// maps `(list, index)` to that number.
///
/// After [`Self::initialize`], a block's tensors are empty placeholders except while the block
/// is on the device; non-block tensors stay on the compute device. [`Self::restore`] puts every
/// weight back on the compute device. Dropping the manager without `restore` points each block
/// tensor at its host copy (CPU memory), so no weight is ever lost; a host copy that is not
/// the manager's alone (the checkpoint's read-only pages with `zero_copy`, a store opened from
/// another process, one shared with other managers or published) is first copied into memory
/// the model owns, so the model's tensors can be written afterwards.
///
/// Inference only: autograd must be off (`tch::no_grad`) while the loop runs, since slot
/// memory is reused.
///
/// The manager is `Send` but not `Sync`: it may move to another thread, and every call uses the
/// calling thread's current CUDA stream as the compute stream.
///
/// Data path of one block: host buffer (one allocation per block, tensors at 256-byte aligned
/// offsets) → one non-blocking copy on the copy stream into a free slot → the slot's `ready`
/// event → the compute stream waits on it when the block is entered → the block's tensors point
/// (`set_data`) at views of the slot → the block runs → release records the slot's `free` event
/// on the compute stream → the copy stream waits on that event before it overwrites the slot.
/// No host synchronization happens in the loop.
///
/// A complete loop that runs anywhere (the CPU test mode stands in for the GPU; on a CUDA
/// machine drop `cpu_test_mode` and build the model on the CPU as here):
///
/// ```
/// use layerwise_offload::{OffloadConfig, Result};
/// use tch::nn::{self, Module};
/// use tch::{Device, Kind, Tensor};
///
/// fn main() -> Result<()> {
///     let vs = nn::VarStore::new(Device::Cpu);
///     let blocks: Vec<nn::Linear> =
///         (0..4).map(|i| nn::linear(vs.root() / "blocks" / i, 8, 8, Default::default())).collect();
///     let x = Tensor::randn([2, 8], (Kind::Float, Device::Cpu));
///     let run = |m: Option<&mut layerwise_offload::LayerwiseOffloadManager>| -> Result<Tensor> {
///         let mut m = m;
///         let mut h = x.shallow_clone();
///         for (i, b) in blocks.iter().enumerate() {
///             let _guard = match m.as_deref_mut() {
///                 Some(m) => Some(m.enter(i)?), // block i on the device, block i + 1 on its way
///                 None => None,
///             };
///             h = b.forward(&h).relu();
///         }
///         Ok(h)
///     };
///     let resident = tch::no_grad(|| run(None))?;
///
///     let mut offload = OffloadConfig::new("blocks", 4).cpu_test_mode(true).build(&vs)?;
///     offload.initialize()?;
///     // The model's block tensors are empty placeholders now; the manager holds the values.
///     assert_eq!(vs.variables()["blocks.2.weight"].numel(), 0);
///     let streamed = tch::no_grad(|| run(Some(&mut offload)))?;
///     assert!(streamed.equal(&resident)); // bit for bit
///
///     offload.restore()?; // every weight back in the model
///     assert_eq!(vs.variables()["blocks.2.weight"].size(), vec![8, 8]);
///     Ok(())
/// }
/// ```
#[derive(Debug)]
pub struct LayerwiseOffloadManager {
    config: OffloadConfig,
    backend: Backend,
    /// The source's tensors, by name, in the source's order.
    named: Vec<(String, Tensor)>,
    /// Where the manager is in its life, with the runtime while initialized.
    phase: Phase,
    stats: OffloadStats,
    timer: Timer,
    faults: FaultInjector,
    /// Peer groups: this member's streams and progress.
    peer: PeerLink,
}

impl LayerwiseOffloadManager {
    /// A manager over `named` as `config` says, not initialized.
    fn configured(
        config: OffloadConfig,
        backend: Backend,
        named: Vec<(String, Tensor)>,
    ) -> LayerwiseOffloadManager {
        LayerwiseOffloadManager {
            faults: FaultInjector::new(&config),
            config,
            backend,
            named,
            phase: Phase::Configured,
            stats: OffloadStats::default(),
            timer: Timer::default(),
            peer: PeerLink::default(),
        }
    }

    /// Whether the manager does anything: false when disabled or without a CUDA device (outside
    /// the CPU test mode).
    pub fn is_enabled(&self) -> bool {
        self.backend.is_enabled()
    }

    /// Whether `initialize()` has run (and `restore()` has not).
    pub fn is_initialized(&self) -> bool {
        matches!(self.phase, Phase::Ready(_))
    }

    /// The device blocks compute on.
    pub fn compute_device(&self) -> Device {
        self.backend.compute_device()
    }

    /// The plan (which tensors form which block), once initialized.
    pub fn plan(&self) -> Option<&Plan> {
        self.phase.plan()
    }

    /// The ids ([`Stream::id`](crate::accel::Stream::id)) of the copy stream and the decode
    /// stream, once taken from libtorch's pool (CUDA, at `initialize`), to tell which streams a
    /// measured configuration used. With the `testing` feature; not part of the stable API.
    #[cfg(feature = "testing")]
    pub fn stream_ids(&self) -> (Option<i64>, Option<i64>) {
        let id = |s: Option<crate::accel::Stream>| s.map(|s| s.id());
        (
            id(self.backend.copy_stream()),
            id(self.backend.decode_stream()),
        )
    }

    /// The most thread blocks a decode launch uses ([`OffloadConfig::compress_decode_blocks`],
    /// or a full grid), once compressed blocks decode on a GPU. With the `testing` feature; not
    /// part of the stable API.
    #[cfg(feature = "testing")]
    pub fn decode_grid(&self) -> Option<u32> {
        self.phase.runtime()?.decoding.as_ref()?.grid()
    }

    /// Number of offloaded blocks over all lists (0 before `initialize`).
    pub fn num_blocks(&self) -> usize {
        self.phase.blocks().len()
    }

    /// The loop index of block `index` of list `module_list_attr`.
    pub fn block_index(&self, module_list_attr: &str, index: usize) -> Option<usize> {
        self.phase
            .plan()?
            .blocks
            .iter()
            .position(|l| l.attr == module_list_attr && l.index == index)
    }

    /// The host copy of the streamed blocks, to share with managers of the same model on other
    /// devices of this process ([`OffloadConfig::host_store`]). None before `initialize`.
    pub fn host_store(&self) -> Option<Arc<HostStore>> {
        self.phase.runtime().map(|rt| rt.store.clone())
    }

    /// Whether block `block`'s weights are on the device now (resident, or in a slot uploaded
    /// or queued).
    pub fn is_on_device(&self, block: usize) -> bool {
        let in_slot = || {
            self.phase
                .runtime()
                .is_some_and(|rt| rt.ring.slot_of(block).is_some())
        };
        self.phase
            .blocks()
            .get(block)
            .is_some_and(|b| b.resident || in_slot())
    }

    /// Whether block `block` stays on the device for good (within the VRAM budget).
    pub fn is_resident(&self, block: usize) -> bool {
        self.phase.blocks().get(block).is_some_and(|b| b.resident)
    }

    /// Whether block `block` is entered.
    pub fn is_entered(&self, block: usize) -> bool {
        self.phase.blocks().get(block).is_some_and(|b| b.in_use)
    }

    /// The blocks held by the slot ring now, slot by slot.
    pub fn slot_contents(&self) -> Vec<Option<usize>> {
        self.phase
            .runtime()
            .map_or_else(Vec::new, |rt| rt.ring.contents())
    }

    /// Enters block `block` for computing: waits (on the device) for its upload, loading it at
    /// once if nothing prefetched it, and queues the uploads of the next `prefetch_depth`
    /// blocks. Dropping the guard releases the block. A disabled manager returns a guard that
    /// does nothing.
    pub fn enter(&mut self, block: usize) -> Result<BlockGuard<'_>> {
        if self.is_enabled() {
            self.before_block(block)?;
        }
        Ok(BlockGuard {
            manager: self,
            block,
            armed: true,
        })
    }

    /// [`Self::enter`] without a guard, for drivers that cannot hold one; pair it with
    /// [`Self::after_block`].
    pub fn before_block(&mut self, block: usize) -> Result<()> {
        if !self.is_enabled() {
            return Ok(());
        }
        let mut l = self.running("before_block")?;
        l.check_range("before_block", block)?;
        l.activate(block)?;
        if let Err(e) = l.prefetch_ahead(block) {
            // The caller gets no guard: leave the block released, not entered forever.
            let _ = l.release(block);
            return Err(e);
        }
        Ok(())
    }

    /// Releases block `block` after its compute (no-op if it is not entered).
    pub fn after_block(&mut self, block: usize) -> Result<()> {
        if !self.is_enabled() {
            return Ok(());
        }
        let mut l = self.running("after_block")?;
        l.check_range("after_block", block)?;
        l.release(block)
    }

    /// The block loop's view of the manager, if it is ready (else why `op` cannot run).
    fn running(&mut self, op: &'static str) -> Result<Loop<'_>> {
        Ok(Loop {
            rt: self.phase.ready(op)?,
            config: &self.config,
            backend: &self.backend,
            timer: &mut self.timer,
            stats: &mut self.stats,
            faults: &mut self.faults,
            peer: &mut self.peer,
        })
    }

    /// Releases block `block` for its guard, if the manager is running its loop and the block
    /// exists.
    fn release_for_guard(&mut self, block: usize) -> Result<()> {
        if !self.is_enabled() {
            return Ok(());
        }
        match self.running("release") {
            Ok(mut l) if block < l.rt.blocks.len() => l.release(block),
            _ => Ok(()),
        }
    }

    /// Waits for this member's outgoing peer copies and leaves the group. Copies into this
    /// member's slots need no wait here: the group keeps every ring until each member has left,
    /// and each one waits for its own outgoing copies first.
    fn leave_group(&mut self) {
        if !self.peer.joined {
            return;
        }
        for p in &self.peer.push {
            let _ = p.synchronize();
        }
        if let Some((group, rank)) = &self.config.peer {
            group.leave(*rank);
        }
        self.peer.joined = false;
    }
}

impl Loop<'_> {
    fn check_range(&self, op: &'static str, block: usize) -> Result<()> {
        let num_blocks = self.rt.blocks.len();
        if block >= num_blocks {
            return Err(Error::BlockOutOfRange {
                op,
                block,
                num_blocks,
            });
        }
        Ok(())
    }
}

impl Drop for LayerwiseOffloadManager {
    fn drop(&mut self) {
        // Queued uploads read host buffers and write slots that are freed below: wait for them.
        // Compute work that still reads a slot is ordered by libtorch's allocator (the slot was
        // allocated on the compute stream). Then leave every block tensor pointing at its host
        // copy, so the model keeps its weights.
        if !matches!(self.phase, Phase::Restored { .. }) {
            let _ = self.backend.synchronize();
            self.detach_to_host();
        }
        self.leave_group();
    }
}

/// A block entered with [`LayerwiseOffloadManager::enter`]; dropping it releases the block
/// (also during a panic's unwinding).
#[must_use = "the block is released when the guard drops"]
#[derive(Debug)]
pub struct BlockGuard<'a> {
    manager: &'a mut LayerwiseOffloadManager,
    block: usize,
    armed: bool,
}

impl BlockGuard<'_> {
    /// The block's loop index.
    pub fn block(&self) -> usize {
        self.block
    }

    /// The manager the block was entered on.
    pub(crate) fn manager_mut(&mut self) -> &mut LayerwiseOffloadManager {
        self.manager
    }

    /// Releases the block now and reports an error, which `Drop` cannot.
    pub fn finish(mut self) -> Result<()> {
        self.armed = false;
        self.manager.release_for_guard(self.block)
    }
}

impl Drop for BlockGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.manager.release_for_guard(self.block);
        }
    }
}
