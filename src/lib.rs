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
