#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod decode;
mod encode;
pub mod error;
pub mod format;
#[cfg(feature = "gpu")]
pub mod gpu;
mod parallel;
pub mod segments;
#[cfg(target_arch = "x86_64")]
mod simd;

pub use decode::{decode, decode_with_threads, decoded_len, stats, verify};
pub use encode::{DEFAULT_CHUNK_VALUES, EncodePlan, Encoder, encode};
pub use error::{CodecError, Result};
pub use format::{Encoded, Header, Stats, max_encoded_len};
pub use segments::{
    Segment, SegmentedPlan, Segments, decode_segmented, encode_segmented, verify_segmented,
};
