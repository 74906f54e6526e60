//! The text-to-video pipeline of the `wan` crate with its two block loops driven by offload
//! managers: the adapter (`Managed`, a `wan::BlockLoop`) and the moves between stages (a model's
//! weights streamed for its stage, then every weight back on the CPU where it was built).
//!
//! Used by `examples/text_to_video.rs` and `tests/text_to_video.rs`.

use layerwise_offload::{LayerwiseOffloadManager, OffloadConfig, Progress};
use tch::{Device, nn};
use wan::{BlockLoop, Component};

/// A `wan::BlockLoop` that enters each block in the component's manager (uploading it, and the
/// next one ahead) around the block's call; a component without a manager runs as it is.
#[derive(Default)]
pub struct Managed<'a> {
    /// The text encoder's manager (blocks `encoder.block.<i>`).
    pub text: Option<&'a mut LayerwiseOffloadManager>,
    /// The transformer's manager (blocks `blocks.<i>`).
    pub transformer: Option<&'a mut LayerwiseOffloadManager>,
}

impl BlockLoop for Managed<'_> {
    fn run(
        &mut self,
        component: Component,
        num_blocks: usize,
        block: &mut dyn FnMut(usize) -> wan::Result<()>,
    ) -> wan::Result<()> {
        let manager = match component {
            Component::TextEncoder => &mut self.text,
            Component::Transformer => &mut self.transformer,
        };
        for i in 0..num_blocks {
            match manager.as_deref_mut() {
                Some(m) => {
                    let _on_device = m.enter(i).map_err(wan::Error::blocks)?;
                    block(i)?;
                }
                None => block(i)?,
            }
        }
        Ok(())
    }
}

/// Moves every tensor of `vs` that is not on `device` there (in place: the model's tensors keep
/// their identity).
pub fn move_all(vs: &nn::VarStore, device: Device) -> anyhow::Result<()> {
    tch::no_grad(|| -> anyhow::Result<()> {
        for (_, mut t) in vs.variables() {
            if t.device() != device {
                let moved = t.f_to_device(device)?;
                t.f_set_data(&moved)?;
            }
        }
        Ok(())
    })
}

/// A callback for `initialize()`'s progress reports (a progress bar's).
pub type OnProgress = Box<dyn Fn(&Progress) + Send + Sync>;

/// A manager over `vs`'s block list `list` of `n` blocks on CUDA device 0 (the CPU test mode
/// without CUDA), with an optional VRAM budget in bytes for resident blocks, initialized,
/// reporting its progress to `progress`.
pub fn offload(
    vs: &nn::VarStore,
    list: &str,
    n: usize,
    cuda: bool,
    budget: Option<u64>,
    compress: bool,
    progress: Option<OnProgress>,
) -> layerwise_offload::Result<LayerwiseOffloadManager> {
    let mut cfg = OffloadConfig::new(list, n)
        .cpu_test_mode(!cuda)
        .compress(compress);
    if let Some(b) = budget {
        cfg = cfg.vram_budget(b);
    }
    if let Some(report) = progress {
        cfg = cfg.on_progress(report);
    }
    let mut m = cfg.build(vs)?;
    m.initialize()?;
    Ok(m)
}

/// Ends a stage: every block back on the CPU (bit for bit), the non-block weights too, the
/// manager gone, the device's cached memory given back.
pub fn finish(mut m: LayerwiseOffloadManager, vs: &nn::VarStore) -> anyhow::Result<()> {
    m.restore_to(Device::Cpu)?;
    drop(m);
    move_all(vs, Device::Cpu)?;
    if layerwise_offload::accel::cuda_is_available() {
        layerwise_offload::accel::empty_cache()?;
    }
    Ok(())
}
