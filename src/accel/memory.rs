//! Device memory: allocations and libtorch's caching allocator (statistics, cache, cap).

use super::{check, dev, init_cuda_state, require_cuda_state, require_device};
use crate::error::{Error, Result};
use crate::ffi;
use std::ffi::c_int;
use tch::Tensor;

/// Allocator statistics of one CUDA device, in bytes (libtorch's caching allocator).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes in live tensors now.
    pub allocated: u64,
    /// Highest `allocated` since the process started or the last [`reset_peak_memory_stats`].
    pub peak_allocated: u64,
    /// Bytes the allocator holds from the driver (allocated plus cached).
    pub reserved: u64,
    /// Highest `reserved` since start or reset.
    pub peak_reserved: u64,
    /// Out-of-memory errors the allocator raised.
    pub num_ooms: u64,
}

/// The caching allocator's statistics for `device`.
pub fn memory_stats(device: usize) -> Result<MemoryStats> {
    require_cuda_state("memory_stats", device)?;
    let mut s = ffi::lo_mem_stats::default();
    // SAFETY: the out-pointer is a valid local.
    check("memory_stats", unsafe {
        ffi::lo_memory_stats(dev(device), &mut s)
    })?;
    let u = |v: i64| v.max(0) as u64;
    Ok(MemoryStats {
        allocated: u(s.allocated_current),
        peak_allocated: u(s.allocated_peak),
        reserved: u(s.reserved_current),
        peak_reserved: u(s.reserved_peak),
        num_ooms: u(s.num_ooms),
    })
}

/// Resets the peaks of [`memory_stats`] to the current values.
pub fn reset_peak_memory_stats(device: usize) -> Result<()> {
    require_cuda_state("reset_peak_memory_stats", device)?;
    // SAFETY: plain value argument.
    check("reset_peak_memory_stats", unsafe {
        ffi::lo_reset_peak_stats(dev(device))
    })
}

/// `(free, total)` bytes of `device` as the driver reports them. Does not start libtorch's
/// CUDA state (the driver answers through a device guard, whatever libtorch initialized), so
/// it may come before [`set_memory_fraction`].
pub fn memory_info(device: usize) -> Result<(u64, u64)> {
    require_device("memory_info", device)?;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: the out-pointers are valid locals.
    check("memory_info", unsafe {
        ffi::lo_memory_info(dev(device), &mut free, &mut total)
    })?;
    Ok((free as u64, total as u64))
}

/// Returns the caching allocator's unused cached blocks to the driver.
pub fn empty_cache() -> Result<()> {
    require_cuda_state("empty_cache", 0)?;
    // SAFETY: no arguments.
    check("empty_cache", unsafe { ffi::lo_empty_cache() })
}

/// Caps what libtorch's caching allocator may take on every CUDA device of this process at
/// `fraction` of the device's memory, to emulate a smaller GPU; an allocation past the cap fails
/// with [`Error::OutOfMemory`]. The allocator reads the cap once, when it starts, so call this
/// before the process's first CUDA allocation; afterwards it returns
/// [`Error::AllocatorStarted`].
pub fn set_memory_fraction(fraction: f64) -> Result<()> {
    const OP: &str = "set_memory_fraction";
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(Error::InvalidArgument {
            op: OP,
            message: format!("fraction must be in (0, 1], got {fraction}"),
        });
    }
    require_device(OP, 0)?;
    let mut started: c_int = 0;
    // SAFETY: the out-pointer is a valid local.
    check(OP, unsafe { ffi::lo_allocator_initialized(&mut started) })?;
    if started != 0 {
        return Err(Error::AllocatorStarted { op: OP });
    }
    // SAFETY: plain value argument.
    check(OP, unsafe { ffi::lo_set_memory_fraction(fraction) })?;
    init_cuda_state(OP)
}

/// Allocates an uninitialized `uint8` tensor of `bytes` bytes on CUDA device `device`; running
/// out of memory (also under a [`set_memory_fraction`] cap) is [`Error::OutOfMemory`].
pub fn alloc_device(bytes: usize, device: usize) -> Result<Tensor> {
    require_cuda_state("alloc_device", device)?;
    Tensor::f_empty(
        [bytes as i64],
        (tch::Kind::Uint8, tch::Device::Cuda(device)),
    )
    .map_err(|e| Error::from_torch("alloc_device", bytes as u64, e.to_string()))
}
