//! The GPU decoder (feature `gpu`): CUDA C compiled at run time by NVRTC and launched through
//! the CUDA driver API, both opened with `dlopen` when a decoder is made, so building needs no
//! CUDA toolkit and a binary without a GPU runs (and says so) wherever it is.
//!
//! - [`GpuDecoder::new`] compiles the kernel for a device and loads it into the device's primary
//!   context (libtorch's); [`GpuDecoder::decode_async`] queues a decode on a caller's stream
//!   with raw device pointers, e.g. the data pointers of libtorch tensors.
//! - The kernel reads the header and directory from device memory itself rather than from a
//!   host-parsed array: the launch then needs no host copy of the encoding, no per-launch upload
//!   of a directory, and no host parse on the hot path; the few header bytes cost each block one
//!   cached load. The kernel checks every field before use, so a corrupt buffer cannot make it
//!   access memory outside the two ranges ([`status`]).
//! - [`Device`], [`DeviceBuffer`], [`Stream`] and [`Event`] are the few driver handles the
//!   decoder, its tests and its example need; a libtorch program passes its own pointers and
//!   streams instead.
//!
//! libnvrtc is searched as [`nvrtc::candidates`] lists (`LAYERWISE_OFFLOAD_NVRTC` overrides);
//! libcuda is `libcuda.so.1`.

mod decoder;
mod driver;
mod ffi;
mod kernel;
pub mod nvrtc;
pub mod status;

pub use decoder::{DecoderOptions, GpuDecoder, Kernel, Tuning};
pub use driver::{Device, DeviceBuffer, Event, Stream, device_count};

/// The decode kernel's CUDA C source (for inspection and offline compilation checks).
pub fn kernel_source() -> &'static str {
    kernel::SOURCE.as_str()
}

/// The CUDA C source of `kernel` (for inspection and offline compilation checks).
pub fn kernel_source_of(kernel: Kernel) -> &'static str {
    match kernel {
        Kernel::Current => kernel::SOURCE.as_str(),
        Kernel::Baseline => kernel::BASELINE_SOURCE.as_str(),
    }
}
