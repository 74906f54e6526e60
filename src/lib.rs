#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

// One path per public item. The main API lives at the root: the modules that hold it are
// private and every public item they hold is re-exported below. Subsystems with their own
// vocabulary (`accel`, `checkpoint`, `empty`) are public modules whose items are not
// re-exported. scripts/check-one-path.sh checks that rustdoc documents no item twice;
// dependent/tests/root_paths.rs names the items by these paths, as users do.
pub mod accel;
pub mod checkpoint;
mod claims;
mod driver;
pub mod empty;
mod error;
mod ffi;
mod host;
mod manager;
mod observe;
mod offload;
mod peer;
mod placement;
mod plan;
mod progress;
mod script;
mod source;
mod stats;

pub use driver::{OffloadedBlocks, SharedManager, SharedManagerGuard};
pub use error::{Error, Result, TorchMessage};
pub use host::HostStore;
#[cfg(feature = "testing")]
pub use manager::Fault;
pub use manager::{
    BlockGuard, DEFAULT_SEGMENT_BYTES, DEFAULT_STAGING_BUFFERS, LayerwiseOffloadManager,
    MAX_PREFETCH_DEPTH, MAX_STAGING_BUFFERS, OffloadConfig, SEGMENT_BYTES_MULTIPLE,
};
pub use offload::{BlockLists, offload, offload_with};
pub use peer::PeerGroup;
pub use plan::{ALIGN, BlockLayout, Plan, TensorLayout, count_blocks};
pub use progress::{Progress, Stage};
pub use script::{
    Arg, GraphOptimizationsGuard, MethodSchema, ScriptModule, graph_optimizations,
    set_graph_optimizations, with_graph_optimizations,
};
pub use source::WeightSource;
pub use stats::{Lane, OffloadStats, TimelineSpan, chrome_trace_json, compute_ms};

/// The libtorch release this build of the crate was compiled against (`"2.11.0"` with tch
/// 0.24, `"2.13.0"` with tch 0.26): the application's `tch` requirement picks the pair. Empty
/// in a documentation-only build, which compiles nothing against libtorch.
pub const LIBTORCH_VERSION: &str = match option_env!("LO_LIBTORCH_VERSION") {
    Some(v) => v,
    None => "",
};
