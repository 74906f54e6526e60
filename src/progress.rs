//! Progress reports of `initialize()`'s long steps: [`Progress`] and its [`Stage`].

use std::fmt;
use std::sync::Arc;

/// A step of `initialize()` that reports its progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Stage {
    /// Moving the non-block tensors (and the blocks kept resident under a VRAM budget) from the
    /// model to the compute device. Counted in bytes.
    ToDevice,
    /// Copying each streamed block into its host buffer (with compressed transport: encoding
    /// it). Counted in bytes of the blocks' layouts.
    HostCopy,
    /// With a checkpoint: reading the non-block tensors and the resident blocks onto the
    /// compute device. Counted in bytes.
    CheckpointToDevice,
    /// With a checkpoint: reading each block kept in host memory into its host buffer (with
    /// `zero_copy`, mapping its pages; with compressed transport, encoding it). Blocks left on
    /// the disk tier are not counted: they are read at every forward. Counted in bytes of the
    /// blocks' layouts.
    CheckpointRead,
    /// [`set_encoded_blocks`](crate::LayerwiseOffloadManager::set_encoded_blocks): each block
    /// whose host copy changes form, decoded or encoded. Counted in bytes of the blocks'
    /// layouts.
    Convert,
}

impl Stage {
    /// A short name for a progress bar's label.
    pub fn name(self) -> &'static str {
        match self {
            Stage::ToDevice => "weights to the device",
            Stage::HostCopy => "blocks into host memory",
            Stage::CheckpointToDevice => "checkpoint to the device",
            Stage::CheckpointRead => "reading the checkpoint",
            Stage::Convert => "changing the blocks' forms",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a stage has done so far: `done` of `total` bytes, after `blocks_done` of
/// `blocks_total` blocks (tensors for the stages that move single tensors).
///
/// Each stage reports once when it starts (`done` 0) and once after each block or tensor, so
/// its last report has `done == total`. Within a stage `done` never decreases. A stage with
/// nothing to do reports nothing.
///
/// Progress of the long steps of [`initialize`](crate::LayerwiseOffloadManager::initialize):
/// copying the blocks into host memory (and encoding them), reading a checkpoint, moving the
/// non-block weights to the device; and of
/// [`set_encoded_blocks`](crate::LayerwiseOffloadManager::set_encoded_blocks)' conversions. The library prints nothing; give
/// [`OffloadConfig::on_progress`](crate::OffloadConfig::on_progress) a callback and draw what
/// you like (the examples draw an indicatif bar):
///
/// ```
/// use layerwise_offload::{OffloadConfig, Progress, Result};
/// use std::sync::{Arc, Mutex};
/// use tch::{Device, nn};
///
/// fn main() -> Result<()> {
///     let vs = nn::VarStore::new(Device::Cpu);
///     let _blocks: Vec<nn::Linear> =
///         (0..3).map(|i| nn::linear(vs.root() / "blocks" / i, 8, 8, Default::default())).collect();
///     let seen = Arc::new(Mutex::new(Vec::<Progress>::new()));
///     let log = seen.clone();
///     let mut offload = OffloadConfig::new("blocks", 3)
///         .cpu_test_mode(true)
///         .on_progress(move |p| log.lock().unwrap().push(*p))
///         .build(&vs)?;
///     offload.initialize()?;
///     let seen = seen.lock().unwrap();
///     let last = seen.last().unwrap();
///     assert_eq!((last.done, last.total), (last.total, offload.plan().unwrap().total_bytes() as u64));
///     Ok(())
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The stage.
    pub stage: Stage,
    /// Bytes done.
    pub done: u64,
    /// Bytes the stage moves in all.
    pub total: u64,
    /// Blocks (or tensors) done.
    pub blocks_done: usize,
    /// Blocks (or tensors) in all.
    pub blocks_total: usize,
}

impl Progress {
    /// `done / total` (1 for an empty stage).
    pub fn fraction(&self) -> f64 {
        if self.total == 0 {
            1.0
        } else {
            self.done as f64 / self.total as f64
        }
    }
}

/// The callback of [`OffloadConfig::on_progress`](crate::OffloadConfig::on_progress).
#[derive(Clone)]
pub(crate) struct ProgressCallback(Arc<dyn Fn(&Progress) + Send + Sync>);

impl ProgressCallback {
    /// Wraps `f`.
    pub(crate) fn new(f: impl Fn(&Progress) + Send + Sync + 'static) -> ProgressCallback {
        ProgressCallback(Arc::new(f))
    }
}

impl fmt::Debug for ProgressCallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProgressCallback(..)")
    }
}

/// One stage's reports: started with its totals, advanced item by item.
pub(crate) struct Reporter {
    callback: Option<ProgressCallback>,
    progress: Progress,
}

impl Reporter {
    /// Starts `stage` of `items` items of `sizes` bytes in all, reporting 0 done (nothing when
    /// there is no callback or nothing to do).
    pub(crate) fn start(
        callback: Option<&ProgressCallback>,
        stage: Stage,
        sizes: impl IntoIterator<Item = u64>,
    ) -> Reporter {
        let (mut items, mut total) = (0usize, 0u64);
        for s in sizes {
            items += 1;
            total += s;
        }
        let r = Reporter {
            callback: callback.filter(|_| items > 0).cloned(),
            progress: Progress {
                stage,
                done: 0,
                total,
                blocks_done: 0,
                blocks_total: items,
            },
        };
        r.report();
        r
    }

    /// One more item of `bytes` bytes done.
    pub(crate) fn advance(&mut self, bytes: u64) {
        if self.callback.is_none() {
            return;
        }
        let p = &mut self.progress;
        p.blocks_done = (p.blocks_done + 1).min(p.blocks_total);
        p.done = (p.done + bytes).min(p.total);
        self.report();
    }

    fn report(&self) {
        if let Some(cb) = &self.callback {
            (cb.0)(&self.progress);
        }
    }
}
