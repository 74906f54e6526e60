//! [`GpuDecoder`]: the decode kernel compiled for one device and launched on a caller's stream.

use super::driver::{Device, DeviceBuffer, check};
use super::ffi::{CU_FUNC_ATTRIBUTE_NUM_REGS, CUfunction, CUmodule};
use super::{kernel, nvrtc};
use crate::error::{CodecError, Result};
use crate::format::{ALIGN, HEADER_LEN, MIN_CHUNK_VALUES};
use std::ffi::{CString, c_void};

/// Which decode kernel a [`GpuDecoder`] runs (see the kernel module's notes in the crate's
/// README).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// The current kernel: code widths as template parameters, exponents looked up in
    /// registers for k <= 3, one barrier per chunk (two for a two-tier chunk), a warp-level
    /// running exception index. Decodes every chunk of the format.
    #[default]
    Current,
    /// The first kernel (runtime code width, a block-wide scan per 8192 values), kept to
    /// measure the current one against. Same checks, same results, but one-tier chunks only
    /// (format version 2's chunks, [`Encoder::single_tier`](crate::Encoder::single_tier)): it
    /// refuses a two-tier chunk with [`status::CHUNK`](super::status::CHUNK).
    Baseline,
}

/// How a [`GpuDecoder`] builds and launches its kernel. `Default` is what
/// [`GpuDecoder::new`] uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct DecoderOptions {
    /// The kernel.
    pub kernel: Kernel,
    /// At most this many blocks per SM in the grid (default: as many as can be resident).
    /// Fewer blocks take longer but hold less of each SM while kernels run beside the decode.
    pub blocks_per_sm: Option<u32>,
    /// At most this many blocks in the grid in all (default: blocks per SM times SMs). A grid
    /// of fewer blocks than SMs decodes on that many SMs and leaves the others to the kernels
    /// that run beside it, for longer. At least 1. (In layerwise-offload's pipeline on an H100,
    /// grids of 132, 33 and 16 blocks made every forward slower than the full grid.)
    pub max_blocks: Option<u32>,
    /// Compile-time settings of [`Kernel::Current`] (the baseline kernel takes none).
    pub tuning: Tuning,
}

/// Compile-time settings of [`Kernel::Current`], for measurements; `None` keeps the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Tuning {
    /// Windows of 256 values a warp loads together when k <= 3, 1..=4 (default 2).
    pub unroll: Option<u32>,
    /// The same when k >= 4, 1..=4 (default 1).
    pub unroll_wide: Option<u32>,
    /// The `__launch_bounds__` minimum of resident blocks per SM the compiler fits registers
    /// for, 1..=8 (default 4: 64 registers per thread).
    pub min_blocks_per_sm: Option<u32>,
    /// A chunk's exceptions are copied into shared memory when there are at most this many,
    /// a multiple of 16 in 0..=4096 (default 4096; 0: always read from global memory).
    pub shared_exceptions: Option<u32>,
}

impl DecoderOptions {
    /// The options with `kernel`.
    pub fn with_kernel(mut self, kernel: Kernel) -> Self {
        self.kernel = kernel;
        self
    }

    /// The options with at most `blocks` blocks per SM (`None`: as many as can be resident).
    pub fn with_blocks_per_sm(mut self, blocks: Option<u32>) -> Self {
        self.blocks_per_sm = blocks;
        self
    }

    /// The options with at most `blocks` blocks in the grid (`None`: blocks per SM times SMs).
    pub fn with_max_blocks(mut self, blocks: Option<u32>) -> Self {
        self.max_blocks = blocks;
        self
    }

    /// The options with the current kernel's compile-time settings `tuning`.
    pub fn with_tuning(mut self, tuning: Tuning) -> Self {
        self.tuning = tuning;
        self
    }

    /// The CUDA source these options compile: the kernel's, after its tuning macros.
    fn source(&self) -> Result<String> {
        if self.max_blocks == Some(0) {
            return Err(CodecError::InvalidOption {
                option: "max_blocks",
                value: "0".into(),
                reason: "a grid needs at least 1 block: pass Some(1) or more, or None for a full grid",
            });
        }
        let t = self.tuning;
        match self.kernel {
            Kernel::Baseline if t == Tuning::default() => Ok(kernel::BASELINE_SOURCE.clone()),
            Kernel::Baseline => Err(CodecError::InvalidOption {
                option: "tuning",
                value: format!("{t:?}"),
                reason: "the baseline kernel takes no tuning",
            }),
            Kernel::Current => {
                let mut defines = String::new();
                for (option, name, value, ok, reason) in [
                    ("unroll", "UNROLL", t.unroll, 1..=4, "must be in 1..=4"),
                    (
                        "unroll_wide",
                        "UNROLL_WIDE",
                        t.unroll_wide,
                        1..=4,
                        "must be in 1..=4",
                    ),
                    (
                        "min_blocks_per_sm",
                        "MIN_BLOCKS",
                        t.min_blocks_per_sm,
                        1..=8,
                        "must be in 1..=8",
                    ),
                    (
                        "shared_exceptions",
                        "EXC_SHARED",
                        t.shared_exceptions,
                        0..=4096,
                        "must be a multiple of 16 in 0..=4096",
                    ),
                ] {
                    if let Some(v) = value {
                        if !ok.contains(&v) || (name == "EXC_SHARED" && v % 16 != 0) {
                            return Err(CodecError::InvalidOption {
                                option,
                                value: v.to_string(),
                                reason,
                            });
                        }
                        defines.push_str(&format!("#define {name} {v}\n"));
                    }
                }
                Ok(defines + kernel::SOURCE.as_str())
            }
        }
    }
}

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
    /// The most blocks worth launching: blocks per SM (resident, or the options' cap) times SMs.
    max_blocks: u32,
    /// Blocks per SM in a full grid.
    blocks_per_sm: u32,
    /// Registers per thread of the compiled kernel.
    registers: u32,
    options: DecoderOptions,
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
            .field("options", &self.options)
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
        GpuDecoder::with_options(device, DecoderOptions::default())
    }

    /// [`on`](GpuDecoder::on) with another kernel, grid or tuning.
    pub fn with_options(device: Device, options: DecoderOptions) -> Result<GpuDecoder> {
        let (major, minor) = device.compute_capability()?;
        let arch = format!("sm_{major}{minor}");
        let cubin = nvrtc::compile(&options.source()?, "lwbc_decode.cu", &arch)?;
        let sms = device.multiprocessors()?;
        let mut status = device.alloc(4)?;
        status.fill(0)?;
        let (module, function, per_sm, regs) = device.with_context(|api| {
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
            let mut regs = 0;
            // SAFETY: a valid out-pointer and function.
            let code = unsafe {
                (api.cuFuncGetAttribute)(&mut regs, CU_FUNC_ATTRIBUTE_NUM_REGS, function)
            };
            if let Err(e) = check(api, "cuFuncGetAttribute", code) {
                // SAFETY: loaded above, unloaded once.
                unsafe { (api.cuModuleUnload)(module) };
                return Err(e);
            }
            Ok((module, function, per_sm, regs))
        })?;
        let mut blocks_per_sm = per_sm.max(1) as u32;
        if let Some(cap) = options.blocks_per_sm {
            blocks_per_sm = blocks_per_sm.min(cap.max(1));
        }
        let mut max_blocks = blocks_per_sm.saturating_mul(sms.max(1) as u32);
        if let Some(cap) = options.max_blocks {
            max_blocks = max_blocks.min(cap);
        }
        Ok(GpuDecoder {
            device,
            module,
            function,
            max_blocks,
            blocks_per_sm,
            registers: regs.max(0) as u32,
            options,
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

    /// The options it was made with.
    pub fn options(&self) -> &DecoderOptions {
        &self.options
    }

    /// Blocks per SM of a full grid: as many as can be resident, or the options' cap.
    pub fn blocks_per_sm(&self) -> u32 {
        self.blocks_per_sm
    }

    /// Registers per thread of the compiled kernel (with the threads per block, what a resident
    /// block holds of an SM's register file).
    pub fn registers_per_thread(&self) -> u32 {
        self.registers
    }

    /// Threads per block.
    pub fn threads_per_block(&self) -> u32 {
        kernel::THREADS
    }

    /// The most blocks a decode launches: blocks per SM times SMs, or the options' cap
    /// ([`DecoderOptions::max_blocks`]); fewer for a small output.
    pub fn max_blocks(&self) -> u32 {
        self.max_blocks
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
    /// The kernel checks the encoding's structure, not its checksum: bytes that changed but
    /// still parse decode to other bytes. Bytes that came from outside this process (a file,
    /// another process's shared memory) must be checked on the host with
    /// [`verify`](crate::verify) before they are uploaded; an encoding made in this process by
    /// [`Encoder`](crate::Encoder) and kept in its memory needs no check.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grid_of_no_blocks_is_refused_by_name() {
        match DecoderOptions::default().with_max_blocks(Some(0)).source() {
            Err(CodecError::InvalidOption { option, .. }) => assert_eq!(option, "max_blocks"),
            other => panic!("max_blocks 0 accepted: {:?}", other.map(|s| s.len())),
        }
        for blocks in [None, Some(1), Some(u32::MAX)] {
            let options = DecoderOptions::default().with_max_blocks(blocks);
            assert_eq!(options.source().unwrap(), *kernel::SOURCE, "{blocks:?}");
        }
    }
}
