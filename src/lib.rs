#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod accel;
pub mod error;
mod ffi;
pub mod manager;
pub mod plan;
pub mod script;
pub mod source;

pub use error::{Error, Result, TorchMessage};
#[doc(hidden)]
pub use manager::Fault;
pub use manager::{
    HostStore, Lane, LayerGuard, LayerwiseOffloadManager, OffloadConfig, OffloadStats,
    TimelineSpan, chrome_trace_json,
};
pub use plan::{LayerLayout, Plan, TensorLayout};
pub use script::ScriptModule;
pub use source::WeightSource;
