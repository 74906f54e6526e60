//! Running the block loop from `&self`.
//!
//! [`LayerwiseOffloadManager::enter`] takes `&mut self`, but a model's `forward` usually takes
//! `&self` (tch's [`nn::Module`] and [`nn::ModuleT`] do). [`SharedManager`] puts the manager
//! behind a mutex so that a block can be entered through a shared reference, and
//! [`OffloadedBlocks`] owns a model's blocks together with their manager and is itself an
//! [`nn::ModuleT`]:
//!
//! ```no_run
//! use layerwise_offload::{OffloadConfig, OffloadedBlocks, Result};
//! use tch::{nn, nn::ModuleT, Device, Tensor};
//!
//! fn main() -> Result<()> {
//!     let vs = nn::VarStore::new(Device::Cpu);
//!     let blocks: Vec<nn::Linear> = (0..4)
//!         .map(|i| nn::linear(&vs.root() / "blocks" / i, 64, 64, Default::default()))
//!         .collect();
//!     let mut manager = OffloadConfig::new("blocks", blocks.len()).build(&vs)?;
//!     manager.initialize()?;
//!     let stack = OffloadedBlocks::new(blocks, manager)?;
//!     let x = Tensor::zeros([8, 64], (tch::Kind::Float, Device::Cuda(0)));
//!     let y = tch::no_grad(|| stack.forward_t(&x, false)); // blocks stream in, one ahead
//!     println!("{}", stack.manager().stats());
//!     Ok(())
//! }
//! ```

use crate::error::{Error, Result};
use crate::manager::LayerwiseOffloadManager;
use crate::stats::OffloadStats;
use std::sync::{Mutex, MutexGuard};
use tch::{Tensor, nn};

/// A [`LayerwiseOffloadManager`] that is used through `&self`: each call locks it for its
/// duration. For models whose `forward` takes `&self`.
///
/// A panic inside [`Self::with_block`] releases the block on the way out (the guard's `Drop`),
/// so the manager stays usable: a lock poisoned by such a panic is taken over, not reported.
#[derive(Debug)]
pub struct SharedManager {
    inner: Mutex<LayerwiseOffloadManager>,
}

impl SharedManager {
    /// Wraps `manager`.
    pub fn new(manager: LayerwiseOffloadManager) -> SharedManager {
        SharedManager {
            inner: Mutex::new(manager),
        }
    }

    /// Enters block `block` (waiting for its upload and queueing the next one, as
    /// [`LayerwiseOffloadManager::enter`]), runs `f`, and releases the block.
    pub fn with_block<R>(&self, block: usize, f: impl FnOnce() -> R) -> Result<R> {
        let mut manager = self.lock();
        let guard = manager.enter(block)?;
        let out = f();
        guard.finish()?;
        Ok(out)
    }

    /// The manager's counters so far (see [`LayerwiseOffloadManager::stats`]).
    pub fn stats(&self) -> OffloadStats {
        self.lock().stats().clone()
    }

    /// The manager itself, for everything else (`initialize`, `restore`, timelines, weights).
    /// Held until the returned guard drops.
    pub fn lock(&self) -> MutexGuard<'_, LayerwiseOffloadManager> {
        // A panic while the lock was held happened inside a block (its guard released it) or
        // inside a manager call that leaves the manager in a defined state: take it over.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The manager back.
    pub fn into_inner(self) -> LayerwiseOffloadManager {
        self.inner
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl From<LayerwiseOffloadManager> for SharedManager {
    fn from(manager: LayerwiseOffloadManager) -> SharedManager {
        SharedManager::new(manager)
    }
}

/// A model's blocks together with the manager that streams their weights: running it enters
/// each block in turn, from `&self`.
///
/// Block `i` of `blocks` is the manager's block `i` (loop order). As an [`nn::ModuleT`] it runs
/// `x = block.forward_t(x)` through every block; [`Self::run`] threads any state through blocks
/// with other signatures (a DiT block that also takes the text context and the time embedding).
#[derive(Debug)]
pub struct OffloadedBlocks<B> {
    blocks: Vec<B>,
    manager: SharedManager,
}

impl<B> OffloadedBlocks<B> {
    /// Pairs `blocks` with `manager`. Fails when the manager is initialized and streams a
    /// different number of blocks; a manager initialized later is checked at each run
    /// ([`Self::run`], [`Self::f_forward_t`]) instead.
    pub fn new(blocks: Vec<B>, manager: impl Into<SharedManager>) -> Result<OffloadedBlocks<B>> {
        let manager = manager.into();
        check_block_count("OffloadedBlocks::new", blocks.len(), &manager.lock())?;
        Ok(OffloadedBlocks { blocks, manager })
    }

    /// The blocks, in loop order.
    pub fn blocks(&self) -> &[B] {
        &self.blocks
    }

    /// The manager.
    pub fn manager(&self) -> &SharedManager {
        &self.manager
    }

    /// Runs every block in loop order, each entered while `f(block, state)` computes the next
    /// state.
    ///
    /// Fails before any block runs when the manager is not initialized
    /// ([`Error::NotInitialized`]) or streams a different number of blocks
    /// ([`Error::InvalidArgument`]); a block whose entry or release fails stops the loop with
    /// that error, the block released.
    pub fn run<T>(&self, mut state: T, mut f: impl FnMut(&B, T) -> T) -> Result<T> {
        // Not initialized: entering block 0 gives the manager's own error, before any block.
        check_block_count(
            "OffloadedBlocks::run",
            self.blocks.len(),
            &self.manager.lock(),
        )?;
        for (i, block) in self.blocks.iter().enumerate() {
            state = self.manager.with_block(i, || f(block, state))?;
        }
        Ok(state)
    }

    /// The blocks and the manager back.
    pub fn into_parts(self) -> (Vec<B>, LayerwiseOffloadManager) {
        (self.blocks, self.manager.into_inner())
    }
}

/// Fails when `manager` is initialized and streams other than `given` blocks.
fn check_block_count(
    op: &'static str,
    given: usize,
    manager: &LayerwiseOffloadManager,
) -> Result<()> {
    if manager.is_enabled() && manager.is_initialized() && manager.num_blocks() != given {
        return Err(Error::InvalidArgument {
            op,
            message: format!(
                "{given} blocks were given but the manager streams {}; pass the blocks of the \
                 lists it was configured with, in loop order",
                manager.num_blocks()
            ),
        });
    }
    Ok(())
}

impl<B: nn::ModuleT> OffloadedBlocks<B> {
    /// `x = block.forward_t(x, train)` through every block, with the manager's errors returned.
    pub fn f_forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.run(xs.shallow_clone(), |block, x| block.forward_t(&x, train))
    }
}

impl<B: nn::ModuleT> nn::ModuleT for OffloadedBlocks<B> {
    /// [`OffloadedBlocks::f_forward_t`], which returns the manager's errors; this one panics
    /// with the error (tch's `forward_t` cannot return one), naming it and the fallible method.
    /// No block is left entered and no weight is lost: after catching the panic the manager
    /// still works, and `restore()` gives the weights back.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self.f_forward_t(xs, train) {
            Ok(y) => y,
            Err(e) => panic!(
                "layerwise-offload: OffloadedBlocks::forward_t failed: {e} ({e:?}); call \
                 OffloadedBlocks::f_forward_t to get this error as a Result instead of a panic"
            ),
        }
    }
}
