#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod accel;
pub mod checkpoint;
mod claims;
pub mod driver;
pub mod empty;
pub mod error;
mod ffi;
pub mod host;
pub mod manager;
mod observe;
pub mod offload;
pub mod peer;
mod placement;
pub mod plan;
pub mod progress;
pub mod script;
pub mod source;
pub mod stats;

pub use checkpoint::Checkpoint;
pub use driver::{OffloadedBlocks, SharedManager, SharedManagerGuard};
pub use error::{Error, Result, TorchMessage};
pub use host::HostStore;
#[cfg(feature = "testing")]
pub use manager::Fault;
pub use manager::{BlockGuard, LayerwiseOffloadManager, OffloadConfig};
pub use offload::{offload, offload_with};
pub use peer::PeerGroup;
pub use plan::{BlockLayout, Plan, TensorLayout};
pub use progress::{Progress, Stage};
pub use script::ScriptModule;
pub use source::WeightSource;
pub use stats::{Lane, OffloadStats, TimelineSpan, chrome_trace_json};

/// The libtorch release this build of the crate was compiled against (`"2.11.0"` with tch
/// 0.24, `"2.13.0"` with tch 0.26): the application's `tch` requirement picks the pair. Empty
/// in a documentation-only build, which compiles nothing against libtorch.
pub const LIBTORCH_VERSION: &str = match option_env!("LO_LIBTORCH_VERSION") {
    Some(v) => v,
    None => "",
};
