//! libtorch's graph-executor optimization switch, which is **per thread**.
//!
//! libtorch keeps the flag in a `thread_local` (`torch::jit::kOptimize`, read by
//! `getGraphExecutorOptimize()`; a TLS symbol in `libtorch_cpu.so`, and
//! `torch/csrc/jit/python/update_graph_executor_opt.cpp` declares it `static thread_local`).
//! Every thread starts with it on. Turning it off on the thread that builds the model does
//! nothing for a layer loop that runs on another thread: set it where the loop runs, best with
//! [`with_graph_optimizations`] or a [`GraphOptimizationsGuard`] around the loop.

use crate::error::Result;
use crate::ffi;
use std::ffi::c_int;
use std::marker::PhantomData;

use crate::accel::check;

/// Turns libtorch's graph-executor optimizations (profiling, fusion) on or off for the
/// **calling thread** (other threads keep their own setting; each starts with it on). With them
/// off a scripted module runs its ops one by one, exactly as calling its submodules one at a
/// time does, so a layer loop over submodules reproduces the module's own `forward` bit for bit.
/// Prefer [`with_graph_optimizations`] or [`GraphOptimizationsGuard`], which restore the old
/// setting.
pub fn set_graph_optimizations(enabled: bool) -> Result<()> {
    // SAFETY: plain value argument.
    check("set_graph_optimizations", unsafe {
        ffi::lo_jit_set_optimize(enabled as c_int)
    })
}

/// Whether graph-executor optimizations are on for the calling thread.
pub fn graph_optimizations() -> Result<bool> {
    let mut on: c_int = 0;
    // SAFETY: the out-pointer is a local.
    check("graph_optimizations", unsafe {
        ffi::lo_jit_get_optimize(&mut on)
    })?;
    Ok(on != 0)
}

/// Sets the calling thread's graph-executor optimizations and puts the old setting back when
/// dropped. Not `Send`: the setting belongs to the thread that made the guard.
#[must_use = "the setting is restored when the guard is dropped"]
#[derive(Debug)]
pub struct GraphOptimizationsGuard {
    previous: bool,
    _thread_bound: PhantomData<*const ()>,
}

impl GraphOptimizationsGuard {
    /// Switches the calling thread's optimizations to `enabled` until the guard is dropped.
    pub fn new(enabled: bool) -> Result<GraphOptimizationsGuard> {
        let previous = graph_optimizations()?;
        set_graph_optimizations(enabled)?;
        Ok(GraphOptimizationsGuard {
            previous,
            _thread_bound: PhantomData,
        })
    }

    /// The setting that the drop restores.
    pub fn previous(&self) -> bool {
        self.previous
    }
}

impl Drop for GraphOptimizationsGuard {
    fn drop(&mut self) {
        // Setting a thread-local bool cannot fail; an error here could only come from the shim
        // and is ignored, as a drop cannot report it.
        let _ = set_graph_optimizations(self.previous);
    }
}

/// Runs `f` on the calling thread with graph-executor optimizations set to `enabled`, then
/// restores the previous setting (also when `f` panics).
///
/// ```
/// # fn main() -> layerwise_offload::Result<()> {
/// use layerwise_offload::with_graph_optimizations;
/// with_graph_optimizations(false, || {
///     // the layer loop, op by op as the module's own forward runs without optimizations
///     Ok::<_, layerwise_offload::Error>(())
/// })??; // the outer `?` for the switch, the inner one for the loop
/// # Ok(()) }
/// ```
pub fn with_graph_optimizations<R>(enabled: bool, f: impl FnOnce() -> R) -> Result<R> {
    let _guard = GraphOptimizationsGuard::new(enabled)?;
    Ok(f())
}
