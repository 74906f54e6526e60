//! Copies queued on a stream: host <-> device and device <-> device (peer), and the stream
//! bookkeeping of tensors.

use super::{Stream, check, cuda_is_available, init_cuda_state, last_error, require_cuda_state};
use crate::error::{Error, Result};
use crate::ffi;
use std::ffi::{c_int, c_void};
use tch::Tensor;

/// Queues `dst.copy_(src)` without blocking the host, on `stream` (or the current stream of the
/// CUDA device involved when `None`). Between two CPU tensors it is an ordinary copy.
///
/// # Safety
/// The copy runs later, on the device. Until it has finished (an event recorded on the same
/// stream after this call has completed), the caller must keep both tensors' memory alive and
/// must neither read `dst` nor write `src` from the host or from another stream that does not
/// wait for it. A CUDA tensor freed meanwhile may be handed to other work by libtorch's caching
/// allocator unless [`record_stream`] told it about the stream.
pub unsafe fn copy_async(dst: &mut Tensor, src: &Tensor, stream: Option<&Stream>) -> Result<()> {
    let bytes = (src.numel() * src.kind().elt_size_in_bytes()) as u64;
    if let Some(s) = stream {
        require_cuda_state("copy_async", s.device_index())?;
    } else if dst.device().is_cuda() || src.device().is_cuda() {
        require_cuda_state("copy_async", 0)?;
    }
    let raw = stream.map(|s| s.raw());
    let sp = raw
        .as_ref()
        .map_or(std::ptr::null(), |r| r as *const ffi::lo_stream);
    // SAFETY: both tensor pointers are live tch tensors; `sp` is null or points to a local.
    // The lifetime obligations of the queued copy are the caller's (see # Safety).
    let rc = unsafe { ffi::lo_copy_async(dst.as_mut_ptr(), src.as_ptr() as *mut _, sp) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::from_torch("copy_async", bytes, last_error()))
    }
}

/// Queues a device-to-device copy of `src`'s bytes into `dst` on `stream` (`cudaMemcpyPeerAsync`):
/// both contiguous CUDA tensors of the same byte size, on the same device or on two devices, and
/// `stream` a stream of either. Between two devices it enables peer access once (where the pair
/// has it: NVLink or PCIe peer-to-peer) so the copy goes over the direct link; without peer
/// access the driver stages it. Unlike `dst.copy_(src)`, it orders itself after nothing but
/// `stream`'s earlier work: no barrier with either device's current stream, so the caller
/// orders it with events. Returns whether the direct peer path is available (always `true` on
/// one device).
///
/// # Safety
/// As [`copy_async`]: until the copy has finished on `stream`, both tensors' memory must stay
/// allocated, nobody may read `dst` or write `src`, and a tensor freed meanwhile may be reused
/// by libtorch's allocator, which knows nothing of this copy.
pub unsafe fn copy_peer_async(dst: &Tensor, src: &Tensor, stream: &Stream) -> Result<bool> {
    require_cuda_state("copy_peer_async", stream.device_index())?;
    let bytes = (src.numel() * src.kind().elt_size_in_bytes()) as u64;
    let mut peer: c_int = 0;
    // SAFETY: both pointers are live tch tensors (the shim reads their metadata and queues a
    // copy of their memory; the caller keeps that memory alive, see # Safety); the out-pointer
    // is a valid local.
    let rc = unsafe {
        ffi::lo_copy_peer_async(
            dst.as_ptr() as *mut _,
            src.as_ptr() as *mut _,
            stream.raw(),
            &mut peer,
        )
    };
    if rc == 0 {
        Ok(peer != 0)
    } else {
        Err(Error::from_torch("copy_peer_async", bytes, last_error()))
    }
}

/// Tells libtorch's caching allocator that `tensor` (a CUDA tensor) is used on `stream`, so its
/// memory is not reused before the work queued there so far has finished.
pub fn record_stream(tensor: &Tensor, stream: &Stream) -> Result<()> {
    require_cuda_state("record_stream", stream.device_index())?;
    // SAFETY: the tensor pointer is a live tch tensor; record_stream does not modify its data.
    check("record_stream", unsafe {
        ffi::lo_record_stream(tensor.as_ptr() as *mut _, stream.raw())
    })
}

/// Whether a CPU tensor's memory is page-locked for CUDA (false without a device). The same
/// answer first thing in a process as later: libtorch's CUDA state is initialized first
/// (before that, libtorch reads every buffer as not pinned).
pub fn is_pinned(tensor: &Tensor) -> Result<bool> {
    if !cuda_is_available() {
        return Ok(false);
    }
    init_cuda_state("is_pinned")?;
    let mut out: c_int = 0;
    // SAFETY: the tensor pointer is a live tch tensor; the out-pointer is a valid local.
    check("is_pinned", unsafe {
        ffi::lo_tensor_is_pinned(tensor.as_ptr() as *mut _, &mut out)
    })?;
    Ok(out != 0)
}

/// The address of `tensor`'s `TensorImpl`: the same for every handle of one tensor (tch's
/// `shallow_clone`, a `VarStore`'s variable), unchanged by `set_data`, and unique among live
/// tensors. Tells whether two handles name the same model weight.
pub(crate) fn tensor_identity(tensor: &Tensor) -> Result<usize> {
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: the tensor pointer is a live tch tensor, only read; the out-pointer is a local.
    check("tensor_identity", unsafe {
        ffi::lo_tensor_impl(tensor.as_ptr() as *mut _, &mut out)
    })?;
    Ok(out as usize)
}
