//! [`GpuDecoder`]: the decode kernel compiled for one device and launched on a caller's stream.

use super::driver::{Device, DeviceBuffer, check};
use super::ffi::{CUfunction, CUmodule};
use super::{kernel, nvrtc};
use crate::error::{CodecError, Result};
use crate::format::{ALIGN, HEADER_LEN, MIN_CHUNK_VALUES};
use std::ffi::{CString, c_void};

/// The decode kernel, compiled by NVRTC for one device's compute capability and loaded into its
/// primary context.
///
/// The kernel reads the header and directory from device memory: the caller needs nothing but
/// the two device pointers and lengths, and the encoded bytes need not be on the host at launch
/// time. The kernel checks what it reads before it follows it (see [`status`](super::status)).
pub struct GpuDecoder {
    device: Device,
    module: CUmodule,
    function: CUfunction,
    /// The most blocks worth launching: resident blocks per SM times SMs.
    max_blocks: u32,
    /// A device u32 the kernel ORs [`status`](super::status) bits into.
    status: DeviceBuffer,
    arch: String,
}

// SAFETY: the module and function handles belong to the device's primary context and may be
// used from any thread once it is current, which every method ensures; nothing is mutated
// after construction except device memory, through the driver.
unsafe impl Send for GpuDecoder {}
// SAFETY: as above; concurrent launches from several threads are independent driver calls
// (the status word is updated with atomics).
unsafe impl Sync for GpuDecoder {}

impl std::fmt::Debug for GpuDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuDecoder")
            .field("device", &self.device)
            .field("arch", &self.arch)
            .field("max_blocks", &self.max_blocks)
            .finish()
    }
}

impl GpuDecoder {
    /// Compiles the kernel for device `ordinal` (its compute capability) and loads it into the
    /// device's primary context, the one libtorch uses.
    pub fn new(ordinal: usize) -> Result<GpuDecoder> {
        GpuDecoder::on(Device::new(ordinal)?)
    }

    /// [`new`](GpuDecoder::new) for a device already opened.
    pub fn on(device: Device) -> Result<GpuDecoder> {
        let (major, minor) = device.compute_capability()?;
        let arch = format!("sm_{major}{minor}");
        let cubin = nvrtc::compile(kernel::SOURCE, "lwbc_decode.cu", &arch)?;
        let sms = device.multiprocessors()?;
        let mut status = device.alloc(4)?;
        status.fill(0)?;
        let (module, function, per_sm) = device.with_context(|api| {
            let mut module: CUmodule = std::ptr::null_mut();
            // SAFETY: `cubin` is a complete cubin image for this device, alive for the call; the
            // context is current. Unloaded in Drop.
            check(api, "cuModuleLoadData", unsafe {
                (api.cuModuleLoadData)(&mut module, cubin.as_ptr().cast())
            })?;
            let name = CString::new(kernel::KERNEL_NAME).expect("no NUL");
            let mut function: CUfunction = std::ptr::null_mut();
            // SAFETY: a loaded module and a NUL-terminated name.
            let code = unsafe { (api.cuModuleGetFunction)(&mut function, module, name.as_ptr()) };
            if let Err(e) = check(api, "cuModuleGetFunction", code) {
                // SAFETY: loaded above, unloaded once.
                unsafe { (api.cuModuleUnload)(module) };
                return Err(e);
            }
            let mut per_sm = 0;
            // SAFETY: a valid out-pointer and function; the kernel uses static shared memory only.
            let code = unsafe {
                (api.cuOccupancyMaxActiveBlocksPerMultiprocessor)(
                    &mut per_sm,
                    function,
                    kernel::THREADS as i32,
                    0,
                )
            };
            if let Err(e) = check(api, "cuOccupancyMaxActiveBlocksPerMultiprocessor", code) {
                // SAFETY: loaded above, unloaded once.
                unsafe { (api.cuModuleUnload)(module) };
                return Err(e);
            }
            Ok((module, function, per_sm))
        })?;
        let max_blocks = (per_sm.max(1) as u32).saturating_mul(sms.max(1) as u32);
        Ok(GpuDecoder {
            device,
            module,
            function,
            max_blocks,
            status,
            arch,
        })
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The architecture the kernel was compiled for (`sm_90`).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Queues the decode of the encoding at `encoded_dev` (`encoded_len` bytes) into `out_dev`
    /// (`out_len` bytes, the encoding's [`decoded_len`](crate::decoded_len)) on `stream`, and
    /// returns without waiting. Both pointers must be 16-byte aligned (every CUDA and libtorch
    /// allocation is).
    ///
    /// An encoding the kernel refuses (corrupt, or lengths that disagree with its header) is
    /// skipped where refused and reported by [`synchronize_and_check`](Self::synchronize_and_check);
    /// the kernel never reads or writes outside the two ranges. Errors here are launch errors.
    ///
    /// # Safety
    /// - `encoded_dev..+encoded_len` is device memory of this device's context, readable, and
    ///   not written until the decode is done; `out_dev..+out_len` likewise writable and neither
    ///   read nor written by other work until the decode is done.
    /// - `stream` is a live `CUstream` of the device's primary context (libtorch's CUDA streams
    ///   are), or null for the legacy default stream; the caller orders other streams' work
    ///   against it (events) and keeps both buffers alive until work queued after the decode
    ///   on `stream` has run.
    pub unsafe fn decode_async(
        &self,
        encoded_dev: u64,
        encoded_len: usize,
        out_dev: u64,
        out_len: usize,
        stream: *mut c_void,
    ) -> Result<()> {
        for (what, addr) in [("encoded", encoded_dev), ("output", out_dev)] {
            if addr % ALIGN as u64 != 0 {
                return Err(CodecError::Misaligned {
                    what,
                    addr,
                    align: ALIGN as u64,
                });
            }
        }
        if encoded_len < HEADER_LEN {
            return Err(CodecError::Truncated {
                what: "header",
                needed: HEADER_LEN as u64,
                len: encoded_len,
            });
        }
        // A chunk has at least MIN_CHUNK_VALUES values, so out_len bounds the chunk count.
        let chunks_bound = (out_len / (2 * MIN_CHUNK_VALUES as usize)).saturating_add(1);
        let grid = self
            .max_blocks
            .min(u32::try_from(chunks_bound).unwrap_or(u32::MAX))
            .max(1);
        let (mut enc, mut enc_len, mut out, mut out_len, mut status) = (
            encoded_dev,
            encoded_len as u64,
            out_dev,
            out_len as u64,
            self.status.device_ptr(),
        );
        let mut params: [*mut c_void; 5] = [
            (&mut enc as *mut u64).cast(),
            (&mut enc_len as *mut u64).cast(),
            (&mut out as *mut u64).cast(),
            (&mut out_len as *mut u64).cast(),
            (&mut status as *mut u64).cast(),
        ];
        self.device.with_context(|api| {
            // SAFETY: `params` points at five live values matching the kernel's parameters
            // (three pointers and two u64), read by the driver during the call; the function
            // belongs to the current context; the caller vouches for the buffers and the stream.
            let code = unsafe {
                (api.cuLaunchKernel)(
                    self.function,
                    grid,
                    1,
                    1,
                    kernel::THREADS,
                    1,
                    1,
                    0,
                    stream,
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            };
            check(api, "cuLaunchKernel", code)
        })
    }

    /// Waits for all work in the device's context (every stream), then reads and clears the
    /// kernel's status word: an error if any decode since the last check refused part of its
    /// encoding.
    pub fn synchronize_and_check(&self) -> Result<()> {
        self.device.synchronize()?;
        let mut word = [0u8; 4];
        self.status.copy_to_host(&mut word)?;
        let bits = u32::from_le_bytes(word);
        if bits == 0 {
            return Ok(());
        }
        self.clear_status()?;
        Err(CodecError::DeviceDecode { bits })
    }

    fn clear_status(&self) -> Result<()> {
        let ptr = self.status.device_ptr();
        self.device.with_context(|api| {
            // SAFETY: the decoder's own 4-byte status buffer; no kernel runs (synchronised).
            check(api, "cuMemsetD8", unsafe { (api.cuMemsetD8_v2)(ptr, 0, 4) })?;
            // SAFETY: the context is current.
            check(api, "cuCtxSynchronize", unsafe { (api.cuCtxSynchronize)() })
        })
    }
}

impl Drop for GpuDecoder {
    fn drop(&mut self) {
        let module = self.module;
        let _ = self.device.with_context(|api| {
            // SAFETY: loaded in `on`, unloaded once; kernels already queued keep running (the
            // driver defers the unload until they finish).
            check(api, "cuModuleUnload", unsafe {
                (api.cuModuleUnload)(module)
            })
        });
    }
}
