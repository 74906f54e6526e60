//! The host side of the data path: [`HostStore`], the page-locked copy of every streamed block,
//! shareable by managers on several devices of one process.

use crate::error::{Error, Result};
use crate::plan::{LayerLayout, Plan};
use tch::Tensor;

/// The host copy of every streamed block of a model: one buffer per block, page-locked as
/// portable memory (usable by every CUDA device of the process). Managers on several GPUs of one
/// process can stream from one store, each with its own slot ring and streams, so host memory
/// holds the block weights once whatever the number of GPUs.
///
/// Get it from an initialized manager with [`LayerwiseOffloadManager::host_store`](crate::LayerwiseOffloadManager::host_store) and hand it
/// to the others with [`OffloadConfig::host_store`](crate::OffloadConfig::host_store). The buffers are freed when the last
/// manager holding the store is restored or dropped.
#[derive(Debug)]
pub struct HostStore {
    pub(crate) layers: Vec<LayerLayout>,
    pub(crate) buffers: Vec<Option<Tensor>>,
    pub(crate) pinned: bool,
}

// SAFETY: the store is never written after construction: its buffers are only read (views are
// made from them, and uploads copy out of them), and libtorch's tensor handles are safe to
// clone and read from several threads at once (reference counts are atomic). Writes to the
// host copy (`update_tensor`) are refused while a store is shared.
unsafe impl Sync for HostStore {}

impl HostStore {
    /// Bytes of host memory the store holds.
    pub fn bytes(&self) -> u64 {
        self.layers
            .iter()
            .zip(&self.buffers)
            .filter(|(_, b)| b.is_some())
            .map(|(l, _)| l.bytes as u64)
            .sum()
    }

    /// Number of blocks (loop order, all lists).
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Whether the buffers are page-locked.
    pub fn is_pinned(&self) -> bool {
        self.pinned
    }

    /// Checks that a plan has exactly the store's layout; says what differs.
    pub(crate) fn check_plan(&self, plan: &Plan) -> Result<()> {
        let differ = |message: String| Error::InvalidArgument {
            op: "initialize with a shared host store",
            message,
        };
        if plan.layers.len() != self.layers.len() {
            return Err(differ(format!(
                "the model has {} blocks, the store {}",
                plan.layers.len(),
                self.layers.len()
            )));
        }
        for (i, (a, b)) in plan.layers.iter().zip(&self.layers).enumerate() {
            if self.buffers[i].is_none() {
                return Err(differ(format!(
                    "block {i} was kept resident by the manager that made the store, without a host copy; build that manager with .shareable(true) or without a VRAM budget"
                )));
            }
            if a.attr != b.attr || a.index != b.index || a.tensors.len() != b.tensors.len() {
                return Err(differ(format!(
                    "block {i} is {}.{} in the model and {}.{} in the store",
                    a.attr, a.index, b.attr, b.index
                )));
            }
            for (x, y) in a.tensors.iter().zip(&b.tensors) {
                if x.name != y.name
                    || x.shape != y.shape
                    || x.strides != y.strides
                    || x.kind != y.kind
                {
                    return Err(differ(format!(
                        "{} is {:?} {:?} in the model, but the store holds {} as {:?} {:?}",
                        x.name, x.shape, x.kind, y.name, y.shape, y.kind
                    )));
                }
            }
        }
        Ok(())
    }
}
