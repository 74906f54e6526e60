//! FastVideo's API, under FastVideo's names: `LayerwiseOffloadManager::new(model,
//! module_list_attr, num_layers, enabled, pin_cpu_memory, auto_initialize)`, `prefetch_layer`,
//! `release_layer`, `release_all` and `layer_scope` (a "layer" there is a block here).
//! `initialize` is in the lifecycle, shared with the builder's API.

use crate::accel;
use crate::error::{Error, Result};
use crate::source::WeightSource;

use super::phase::Loop;
use super::{BlockGuard, LayerwiseOffloadManager, OffloadConfig};

impl LayerwiseOffloadManager {
    /// FastVideo's constructor: `new(model, module_list_attr, num_layers, enabled,
    /// pin_cpu_memory, auto_initialize)`. As in FastVideo, disabled (all no-ops) without a
    /// usable CUDA device; [`Self::is_enabled`] is then false and
    /// [`accel::cuda_unavailable_reason`] says why (with the `tracing` feature, also a warning
    /// event, once per process; the library prints nothing). [`OffloadConfig::build`] fails
    /// instead unless asked to fall back.
    pub fn new(
        model: &(impl WeightSource + ?Sized),
        module_list_attr: &str,
        num_layers: usize,
        enabled: bool,
        pin_cpu_memory: bool,
        auto_initialize: bool,
    ) -> Result<LayerwiseOffloadManager> {
        let m = OffloadConfig::new(module_list_attr, num_layers)
            .enabled(enabled)
            .pin_cpu_memory(pin_cpu_memory)
            .auto_initialize(auto_initialize)
            .allow_cpu_fallback(true)
            .build(model)?;
        if enabled && !m.is_enabled() {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                crate::observe::warn(&format!(
                    "layerwise-offload: the manager is disabled (every call is a no-op): {}",
                    accel::cuda_unavailable_reason().unwrap_or("no CUDA device")
                ))
            });
        }
        Ok(m)
    }

    /// FastVideo's `prefetch_layer`: queues the upload of block `layer` on the copy stream and
    /// points its tensors at the slot. A no-op when disabled, out of range or already on the
    /// device. With `non_blocking == false` it waits (on the host) for the upload; otherwise
    /// the compute stream waits for it when the block is entered (`enter`, `before_block` or
    /// `layer_scope`).
    pub fn prefetch_layer(&mut self, layer: usize, non_blocking: bool) -> Result<()> {
        if !self.is_enabled() {
            return Ok(());
        }
        self.running("prefetch_layer")?
            .prefetch_layer(layer, non_blocking)
    }

    /// FastVideo's `release_layer`: takes block `layer` off the device (releasing it if
    /// entered). A no-op when disabled, out of range or not on the device. Blocks kept resident
    /// under a VRAM budget stay on the device (they are released, not evicted).
    pub fn release_layer(&mut self, layer: usize) -> Result<()> {
        if !self.is_enabled() {
            return Ok(());
        }
        self.running("release_layer")?.release_layer(layer)
    }

    /// FastVideo's `release_all`: takes every block off the device.
    pub fn release_all(&mut self) -> Result<()> {
        if !self.is_enabled() {
            return Ok(());
        }
        let mut l = self.running("release_all")?;
        for i in 0..l.rt.blocks.len() {
            l.release_layer(i)?;
        }
        Ok(())
    }

    /// FastVideo's `layer_scope(prefetch_layer_idx, release_layer_idx)` around one block: makes
    /// block `run` usable (the block about to run, released when the scope ends), queues the
    /// upload of block `prefetch`, runs `f`, then releases `run` (also if `f` panics).
    pub fn layer_scope<R>(
        &mut self,
        prefetch: Option<usize>,
        run: Option<usize>,
        f: impl FnOnce() -> R,
    ) -> Result<R> {
        if !self.is_enabled() {
            return Ok(f());
        }
        let mut l = self.running("layer_scope")?;
        let run = run.filter(|&r| r < l.rt.blocks.len());
        let entered_here = run.filter(|&r| !l.rt.blocks[r].in_use);
        if let Some(r) = run {
            l.activate(r)?;
        }
        if let Some(p) = prefetch
            && let Err(e) = l.prefetch_layer(p, true)
        {
            // `f` does not run: leave the block released, not entered forever.
            if let Some(r) = entered_here {
                let _ = l.release(r);
            }
            return Err(e);
        }
        let guard = BlockGuard {
            manager: self,
            block: run.unwrap_or(usize::MAX),
            armed: run.is_some(),
        };
        let out = f();
        guard.finish()?;
        Ok(out)
    }
}

impl Loop<'_> {
    /// [`LayerwiseOffloadManager::prefetch_layer`] of a ready manager.
    fn prefetch_layer(&mut self, layer: usize, non_blocking: bool) -> Result<()> {
        if layer >= self.rt.blocks.len()
            || self.rt.ring.slot_of(layer).is_some()
            || self.rt.blocks[layer].resident
        {
            return Ok(());
        }
        let s = self.pick_slot(&[layer]).ok_or_else(|| Error::NoFreeSlot {
            block: layer,
            in_use: self.rt.in_use(),
        })?;
        self.upload(layer, s)?;
        self.point_at_slot(layer)?;
        if !non_blocking {
            self.rt.ring.slot(s).synchronize_ready()?;
        }
        Ok(())
    }

    /// [`LayerwiseOffloadManager::release_layer`] of a ready manager.
    fn release_layer(&mut self, layer: usize) -> Result<()> {
        if layer >= self.rt.blocks.len() {
            return Ok(());
        }
        self.release(layer)?;
        if let Some(s) = self.rt.ring.slot_of(layer) {
            self.evict(s)?;
        }
        Ok(())
    }
}
