//! Running the block loop from `&self`.

use crate::error::{Error, Result};
use crate::manager::LayerwiseOffloadManager;
use crate::stats::OffloadStats;
use std::cell::RefCell;
use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, MutexGuard, TryLockError};
use tch::{Tensor, nn};

thread_local! {
    /// The shared managers this thread holds now (their addresses): a call that would lock one
    /// of them again on the same thread would wait for itself for ever.
    static HELD: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// A [`LayerwiseOffloadManager`] that is used through `&self`: each call locks it for its
/// duration. For models whose `forward` takes `&self`.
///
/// A panic inside [`Self::with_block`] releases the block on the way out (the guard's `Drop`),
/// so the manager stays usable: a lock poisoned by such a panic is taken over, not reported.
///
/// Calls from inside [`Self::with_block`]'s closure (or while this thread holds
/// [`Self::lock`]'s guard) never wait for the lock this thread already holds:
/// [`Self::with_block`], [`Self::lock`] and [`OffloadedBlocks::run`] return
/// [`Error::InvalidArgument`] saying so, and [`Self::stats`] never waits for the lock at all
/// (while anyone holds it, it answers from a snapshot taken when the block was entered or the
/// lock taken), so a thread the block waits for may call it too.
#[derive(Debug)]
pub struct SharedManager {
    inner: Mutex<LayerwiseOffloadManager>,
    /// The manager's counters as of the latest time a holder of the lock entered a block or took
    /// [`Self::lock`]: read by [`Self::stats`] while the lock is held. Refreshed once per block
    /// (the loop's only cost for it); between holders the manager does not change.
    snapshot: Mutex<OffloadStats>,
}

impl SharedManager {
    /// Wraps `manager`.
    pub fn new(mut manager: LayerwiseOffloadManager) -> SharedManager {
        SharedManager {
            snapshot: Mutex::new(manager.stats().clone()),
            inner: Mutex::new(manager),
        }
    }

    /// Enters block `block` (waiting for its upload and queueing the next one, as
    /// [`LayerwiseOffloadManager::enter`]), runs `f`, and releases the block.
    ///
    /// Called from inside another `with_block` of the same manager on the same thread (or while
    /// this thread holds [`Self::lock`]'s guard): [`Error::InvalidArgument`], `f` not run.
    pub fn with_block<R>(&self, block: usize, f: impl FnOnce() -> R) -> Result<R> {
        let mut manager = self.hold("SharedManager::with_block")?;
        let mut guard = manager.enter(block)?;
        self.set_snapshot(guard.manager_mut());
        let out = f();
        guard.finish()?;
        Ok(out)
    }

    /// The manager's counters so far (see [`LayerwiseOffloadManager::stats`]). Never waits
    /// for the lock: while a block runs in [`Self::with_block`] (on any thread) or a
    /// [`Self::lock`] guard is alive, the counters as of the block's entry (or of the lock).
    pub fn stats(&self) -> OffloadStats {
        let guard = match self.inner.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return self.snapshot_lock().clone(),
        };
        // Free: the counters now. No user code runs under this lock, so it is not recorded
        // as held.
        let mut manager = guard;
        manager.stats().clone()
    }

    /// The manager itself, for everything else (`initialize`, `restore`, timelines, weights).
    /// Held until the returned guard drops.
    ///
    /// From inside [`Self::with_block`]'s closure, or while this thread holds another guard of
    /// this manager: [`Error::InvalidArgument`] (the lock is this thread's already; waiting
    /// for it would never end).
    pub fn lock(&self) -> Result<SharedManagerGuard<'_>> {
        let mut guard = self.hold("SharedManager::lock")?;
        self.set_snapshot(&mut guard);
        Ok(guard)
    }

    /// The manager back.
    pub fn into_inner(self) -> LayerwiseOffloadManager {
        self.inner
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// This manager's address, the key of [`HELD`].
    fn key(&self) -> usize {
        self as *const SharedManager as usize
    }

    /// Whether the calling thread holds the lock.
    fn held_here(&self) -> bool {
        let key = self.key();
        HELD.with(|h| h.borrow().contains(&key))
    }

    /// The lock, or an error when this thread holds it already.
    fn hold(&self, op: &'static str) -> Result<SharedManagerGuard<'_>> {
        if self.held_here() {
            return Err(Error::InvalidArgument {
                op,
                message: "this thread holds the manager already (the call comes from inside \
                          SharedManager::with_block's closure, or while a SharedManager::lock \
                          guard is alive) and would wait for itself for ever; call it after \
                          the block, or use the guard you hold"
                    .into(),
            });
        }
        Ok(self.lock_inner())
    }

    /// Takes the lock (the caller checked that this thread does not hold it).
    fn lock_inner(&self) -> SharedManagerGuard<'_> {
        // A panic while the lock was held happened inside a block (its guard released it) or
        // inside a manager call that leaves the manager in a defined state: take it over.
        let guard = self
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let key = self.key();
        HELD.with(|h| h.borrow_mut().push(key));
        SharedManagerGuard {
            shared: self,
            guard,
        }
    }

    fn snapshot_lock(&self) -> MutexGuard<'_, OffloadStats> {
        // Only ever held to copy counters in or out: a poisoned one holds whole counters.
        self.snapshot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set_snapshot(&self, manager: &mut LayerwiseOffloadManager) {
        *self.snapshot_lock() = manager.stats().clone();
    }
}

/// The lock of a [`SharedManager`], from [`SharedManager::lock`]: the manager itself (through
/// `Deref`/`DerefMut`) until it drops.
#[must_use = "the manager is locked only while the guard lives"]
#[derive(Debug)]
pub struct SharedManagerGuard<'a> {
    shared: &'a SharedManager,
    guard: MutexGuard<'a, LayerwiseOffloadManager>,
}

impl Deref for SharedManagerGuard<'_> {
    type Target = LayerwiseOffloadManager;

    fn deref(&self) -> &LayerwiseOffloadManager {
        &self.guard
    }
}

impl DerefMut for SharedManagerGuard<'_> {
    fn deref_mut(&mut self) -> &mut LayerwiseOffloadManager {
        &mut self.guard
    }
}

impl Drop for SharedManagerGuard<'_> {
    fn drop(&mut self) {
        let key = self.shared.key();
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if let Some(at) = h.iter().rposition(|&k| k == key) {
                h.swap_remove(at);
            }
        });
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
/// Block `i` of `blocks` is the manager's block `i` (loop order; with several lists, the first
/// list's blocks, then the next list's). As an [`nn::Module`] (and [`nn::ModuleT`]) it runs
/// `x = block.forward_t(x, false)` through every block; [`Self::run`] threads any state through blocks
/// with other signatures (a DiT block that also takes the text context and the time embedding).
///
/// [`LayerwiseOffloadManager::enter`] takes `&mut self`, but a model's `forward` usually takes
/// `&self` (tch's [`nn::Module`] and [`nn::ModuleT`] do). [`SharedManager`] puts the manager
/// behind a mutex so that a block can be entered through a shared reference, and
/// [`OffloadedBlocks`] owns a model's blocks together with their manager and is itself an
/// [`nn::Module`] (and so, through tch's blanket implementation, an [`nn::ModuleT`]):
///
/// ```no_run
/// use layerwise_offload::{OffloadedBlocks, Result, offload};
/// use tch::{nn, nn::Module, Device, Tensor};
///
/// fn main() -> Result<()> {
///     let vs = nn::VarStore::new(Device::Cpu);
///     let blocks: Vec<nn::Linear> = (0..4)
///         .map(|i| nn::linear(&vs.root() / "blocks" / i, 64, 64, Default::default()))
///         .collect();
///     let stack = OffloadedBlocks::new(blocks, offload(&vs, "blocks")?)?;
///     let x = Tensor::zeros([8, 64], (tch::Kind::Float, Device::Cuda(0)));
///     let y = tch::no_grad(|| stack.forward(&x)); // blocks stream in, one ahead
///     println!("{}", stack.manager().stats());
///     Ok(())
/// }
/// ```
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
        check_block_count("OffloadedBlocks::new", blocks.len(), &*manager.lock()?)?;
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
    /// ([`Error::InvalidArgument`]), or when called from inside a block of the same manager
    /// ([`Error::InvalidArgument`], see [`SharedManager`]); a block whose entry or release fails
    /// stops the loop with that error, the block released.
    pub fn run<T>(&self, mut state: T, mut f: impl FnMut(&B, T) -> T) -> Result<T> {
        // Not initialized: entering block 0 gives the manager's own error, before any block.
        check_block_count(
            "OffloadedBlocks::run",
            self.blocks.len(),
            &*self.manager.lock()?,
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

    /// [`Self::f_forward_t`] for inference (`train` false): what [`nn::Module::forward`] runs,
    /// with the manager's errors returned.
    pub fn f_forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.f_forward_t(xs, false)
    }
}

/// `model.forward(&x)` streams: `x = block.forward_t(x, false)` through every block
/// ([`OffloadedBlocks::f_forward`]). tch makes every [`nn::Module`] an [`nn::ModuleT`] too, so
/// `forward_t(&x, train)` works and runs the same inference forward whatever `train` says
/// (streaming is inference only: slot memory is reused under autograd's feet); call
/// [`OffloadedBlocks::f_forward_t`] to hand `train` to the blocks.
///
/// tch's `forward` cannot return an error: a manager error panics, naming the error and the
/// fallible method. No block is left entered and no weight is lost: after catching the panic
/// the manager still works, and `restore()` gives the weights back.
impl<B: nn::ModuleT> nn::Module for OffloadedBlocks<B> {
    fn forward(&self, xs: &Tensor) -> Tensor {
        match self.f_forward(xs) {
            Ok(y) => y,
            Err(e) => panic!(
                "layerwise-offload: OffloadedBlocks::forward failed: {e:?}\n\ncall \
                 OffloadedBlocks::f_forward (or f_forward_t) to get this error as a Result \
                 instead of a panic"
            ),
        }
    }
}
