#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod accel;
pub mod error;
mod ffi;

pub use error::{Error, Result, TorchMessage};
