//! [`LayerwiseOffloadManager`]: keeps each block's weights in one host buffer and streams them
//! through a fixed ring of GPU slots, one block ahead of the compute.
//!
//! Data path of one block: host buffer (one allocation per block, tensors at 256-byte aligned
//! offsets) → one non-blocking copy on the copy stream into a free slot → the slot's `ready`
//! event → the compute stream waits on it when the block is entered → the block's tensors point
//! (`set_data`) at views of the slot → the block runs → release records the slot's `free` event
//! on the compute stream → the copy stream waits on that event before it overwrites the slot.
//! No host synchronization happens in the loop.
//!
//! A complete loop that runs anywhere (the CPU test mode stands in for the GPU; on a CUDA
//! machine drop `cpu_test_mode` and build the model on the CPU as here):
//!
//! ```
//! use layerwise_offload::{OffloadConfig, Result};
//! use tch::nn::{self, Module};
//! use tch::{Device, Kind, Tensor};
//!
//! fn main() -> Result<()> {
//!     let vs = nn::VarStore::new(Device::Cpu);
//!     let blocks: Vec<nn::Linear> =
//!         (0..4).map(|i| nn::linear(vs.root() / "blocks" / i, 8, 8, Default::default())).collect();
//!     let x = Tensor::randn([2, 8], (Kind::Float, Device::Cpu));
//!     let run = |m: Option<&mut layerwise_offload::LayerwiseOffloadManager>| -> Result<Tensor> {
//!         let mut m = m;
//!         let mut h = x.shallow_clone();
//!         for (i, b) in blocks.iter().enumerate() {
//!             let _guard = match m.as_deref_mut() {
//!                 Some(m) => Some(m.enter(i)?), // block i on the device, block i + 1 on its way
//!                 None => None,
//!             };
//!             h = b.forward(&h).relu();
//!         }
//!         Ok(h)
//!     };
//!     let resident = tch::no_grad(|| run(None))?;
//!
//!     let mut offload = OffloadConfig::new("blocks", 4).cpu_test_mode(true).build(&vs)?;
//!     offload.initialize()?;
//!     // The model's block tensors are empty placeholders now; the manager holds the values.
//!     assert_eq!(vs.variables()["blocks.2.weight"].numel(), 0);
//!     let streamed = tch::no_grad(|| run(Some(&mut offload)))?;
//!     assert!(streamed.equal(&resident)); // bit for bit
//!
//!     offload.restore()?; // every weight back in the model
//!     assert_eq!(vs.variables()["blocks.2.weight"].size(), vec![8, 8]);
//!     Ok(())
//! }
//! ```

mod compat;
mod compress;
mod config;
mod decode;
mod device;
mod disk;
mod faults;
mod fence;
mod lifecycle;
mod load;
mod restore;
mod ring;
mod schedule;
mod share;
mod tier;
mod timing;
mod upload;
mod weights;

pub use config::{MAX_PREFETCH_DEPTH, OffloadConfig};
#[cfg(feature = "testing")]
pub use faults::Fault;

use crate::claims::Claim;
use crate::error::{Error, Result};
use crate::host::HostStore;
use crate::plan::{BlockLayout, Plan};
use crate::stats::OffloadStats;
use device::Backend;
use faults::FaultInjector;
use ring::SlotRing;
use share::PeerLink;
use std::sync::Arc;
use tch::{Device, Tensor};
use timing::Timer;
use weights::BlockState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Configured,
    Ready,
    /// A `restore` stopped part-way: only `restore` goes on from here.
    Restoring,
    Restored,
}

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
#[derive(Debug)]
pub struct LayerwiseOffloadManager {
    config: OffloadConfig,
    backend: Backend,
    /// The source's tensors, by name, in the source's order.
    named: Vec<(String, Tensor)>,
    phase: Phase,
    plan: Option<Plan>,
    /// Per block, in loop order.
    blocks: Vec<BlockState>,
    /// The slot ring.
    ring: SlotRing,
    stats: OffloadStats,
    timer: Timer,
    faults: FaultInjector,
    /// This manager's hold on the model's block tensors, from `initialize` until `restore`.
    claim: Option<Claim>,
    /// Blocks back in the model during the latest `restore`.
    restored: usize,
    /// The host store this manager streams from (its own, or one shared with it).
    store: Option<Arc<HostStore>>,
    /// Peer groups: this member's streams and progress.
    peer: PeerLink,
    /// The disk tier (a host budget below the streamed blocks).
    disk: Option<Arc<disk::DiskTier>>,
    /// Compressed transport on CUDA: the GPU decoder and its staging buffers.
    decoding: Option<decode::Decoding>,
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
            plan: None,
            blocks: Vec::new(),
            ring: SlotRing::default(),
            stats: OffloadStats::default(),
            timer: Timer::default(),
            claim: None,
            restored: 0,
            store: None,
            peer: PeerLink::default(),
            disk: None,
            decoding: None,
        }
    }

    /// Whether the manager does anything: false when disabled or without a CUDA device (outside
    /// the CPU test mode).
    pub fn is_enabled(&self) -> bool {
        self.backend.is_enabled()
    }

    /// Whether `initialize()` has run (and `restore()` has not).
    pub fn is_initialized(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// The device blocks compute on.
    pub fn compute_device(&self) -> Device {
        self.backend.compute_device()
    }

    /// The plan (which tensors form which block), once initialized.
    pub fn plan(&self) -> Option<&Plan> {
        self.plan.as_ref()
    }

    /// Number of offloaded blocks over all lists (0 before `initialize`).
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The loop index of block `index` of list `module_list_attr`.
    pub fn block_index(&self, module_list_attr: &str, index: usize) -> Option<usize> {
        self.plan
            .as_ref()?
            .blocks
            .iter()
            .position(|l| l.attr == module_list_attr && l.index == index)
    }

    /// The host copy of the streamed blocks, to share with managers of the same model on other
    /// devices of this process ([`OffloadConfig::host_store`]). None before `initialize`.
    pub fn host_store(&self) -> Option<Arc<HostStore>> {
        self.store.clone()
    }

    /// Whether block `block`'s weights are on the device now (resident, or in a slot uploaded
    /// or queued).
    pub fn is_on_device(&self, block: usize) -> bool {
        self.blocks
            .get(block)
            .is_some_and(|b| b.resident || self.ring.slot_of(block).is_some())
    }

    /// Whether block `block` stays on the device for good (within the VRAM budget).
    pub fn is_resident(&self, block: usize) -> bool {
        self.blocks.get(block).is_some_and(|b| b.resident)
    }

    /// Whether block `block` is entered.
    pub fn is_entered(&self, block: usize) -> bool {
        self.blocks.get(block).is_some_and(|b| b.in_use)
    }

    /// The blocks held by the slot ring now, slot by slot.
    pub fn slot_contents(&self) -> Vec<Option<usize>> {
        self.ring.contents()
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
        self.check_ready("before_block")?;
        self.check_range("before_block", block)?;
        self.activate(block)?;
        if let Err(e) = self.prefetch_ahead(block) {
            // The caller gets no guard: leave the block released, not entered forever.
            let _ = self.release(block);
            return Err(e);
        }
        Ok(())
    }

    /// Releases block `block` after its compute (no-op if it is not entered).
    pub fn after_block(&mut self, block: usize) -> Result<()> {
        if !self.is_enabled() {
            return Ok(());
        }
        self.check_ready("after_block")?;
        self.check_range("after_block", block)?;
        self.release(block)
    }

    fn check_ready(&self, op: &'static str) -> Result<()> {
        match self.phase {
            Phase::Ready => Ok(()),
            Phase::Restoring => Err(self.partly_restored(op)),
            Phase::Configured | Phase::Restored => Err(Error::NotInitialized { op }),
        }
    }

    fn partly_restored(&self, op: &'static str) -> Error {
        Error::PartlyRestored {
            op,
            restored: self.restored,
            num_blocks: self.blocks.len(),
        }
    }

    fn check_range(&self, op: &'static str, block: usize) -> Result<()> {
        if block >= self.blocks.len() {
            return Err(Error::BlockOutOfRange {
                op,
                block,
                num_blocks: self.blocks.len(),
            });
        }
        Ok(())
    }

    fn layout(&self, block: usize) -> &BlockLayout {
        &self
            .plan
            .as_ref()
            .expect("plan exists once blocks exist")
            .blocks[block]
    }

    /// Whether the guard of `block` may release it: the manager is running its loop and the
    /// block exists.
    fn can_release(&self, block: usize) -> bool {
        self.is_enabled() && self.phase == Phase::Ready && block < self.blocks.len()
    }
}

impl Drop for LayerwiseOffloadManager {
    fn drop(&mut self) {
        // Queued uploads read host buffers and write slots that are freed below: wait for them.
        // Compute work that still reads a slot is ordered by libtorch's allocator (the slot was
        // allocated on the compute stream). Then leave every block tensor pointing at its host
        // copy, so the model keeps its weights.
        if self.phase != Phase::Restored {
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
        if self.manager.can_release(self.block) {
            self.manager.release(self.block)
        } else {
            Ok(())
        }
    }
}

impl Drop for BlockGuard<'_> {
    fn drop(&mut self) {
        if self.armed && self.manager.can_release(self.block) {
            let _ = self.manager.release(self.block);
        }
    }
}
