//! Helpers shared by layerwise-offload's examples, its integration tests and `offload-bench`,
//! compiled once: flag parsers, statistics and host facts ([`util`]), progress bars
//! ([`progress`]), the CUDA skip rule of the tests ([`cuda`], [`Mode`]), the output checks of the
//! binaries' tests ([`cli`]), a small DiT-like test model ([`model`]), the text-to-video
//! pipeline's block-loop adapter ([`t2v`]) and video writing ([`video`]).
//!
//! The tests name it `common` (`use offload_testkit as common;`), as the module it replaces.
#![deny(missing_docs)]

pub mod cli;
mod device;
pub mod model;
pub mod progress;
pub mod t2v;
pub mod util;
pub mod video;

pub use device::{Mode, cuda, cuda_devices, gpu_lock};
