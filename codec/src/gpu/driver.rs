//! The CUDA driver API, checked: libcuda loaded once, status codes turned into
//! [`CodecError::Cuda`], and the handles the decoder and its checks need as RAII types: a device's
//! primary context (the one libtorch's runtime uses), a guard that makes it current, device
//! memory, streams and events.

use super::ffi::{
    CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
    CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
    CU_STREAM_NON_BLOCKING, CUDA_ERROR_NO_DEVICE, CUDA_SUCCESS, CUcontext, CUdevice, CUdeviceptr,
    CUevent, CUresult, CUstream, DriverApi,
};
use crate::error::{CodecError, Result};
use libloading::Library;
use std::ffi::{CStr, c_char, c_void};
use std::sync::{Arc, OnceLock};

/// Why libcuda could not be used: what each name answered, or cuInit's failure.
enum LoadError {
    NotFound(Vec<String>),
    Init {
        code: CUresult,
        name: String,
        message: String,
    },
}

/// The driver library, loaded and initialised (`cuInit`) once per process. A driver that
/// initialises but sees no device is loaded (and [`device_count`] is 0).
fn api() -> Result<&'static DriverApi> {
    static API: OnceLock<std::result::Result<DriverApi, LoadError>> = OnceLock::new();
    match API.get_or_init(load) {
        Ok(api) => Ok(api),
        Err(LoadError::NotFound(searched)) => Err(CodecError::LibraryNotFound {
            library: "libcuda",
            searched: searched.clone(),
        }),
        Err(LoadError::Init {
            code,
            name,
            message,
        }) => Err(CodecError::Cuda {
            call: "cuInit",
            code: *code,
            name: name.clone(),
            message: message.clone(),
        }),
    }
}

fn load() -> std::result::Result<DriverApi, LoadError> {
    let mut tried = Vec::new();
    for name in ["libcuda.so.1", "libcuda.so"] {
        // SAFETY: loading the CUDA driver library runs its initialisers, which are sound at any
        // point of a process (every CUDA program dlopens it).
        let lib = match unsafe { Library::new(name) } {
            Ok(lib) => lib,
            Err(e) => {
                tried.push(format!("{name} ({e})"));
                continue;
            }
        };
        // SAFETY: libcuda exports the driver API with cuda.h's signatures.
        let api = match unsafe { DriverApi::load(lib) } {
            Ok(api) => api,
            Err(e) => {
                tried.push(format!("{name} ({e})"));
                continue;
            }
        };
        // SAFETY: cuInit(0) may be called any number of times from any thread.
        let code = unsafe { (api.cuInit)(0) };
        if code != CUDA_SUCCESS && code != CUDA_ERROR_NO_DEVICE {
            let (name, message) = describe(&api, code);
            return Err(LoadError::Init {
                code,
                name,
                message,
            });
        }
        return Ok(api);
    }
    Err(LoadError::NotFound(tried))
}

/// The name and description of a `CUresult`.
fn describe(api: &DriverApi, code: CUresult) -> (String, String) {
    let text = |f: unsafe extern "C" fn(CUresult, *mut *const c_char) -> CUresult| {
        let mut p: *const c_char = std::ptr::null();
        // SAFETY: a valid out-pointer; on success the driver returns a static NUL-terminated
        // string.
        if unsafe { f(code, &mut p) } == CUDA_SUCCESS && !p.is_null() {
            // SAFETY: see above.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        } else {
            "unknown error".to_string()
        }
    };
    (text(api.cuGetErrorName), text(api.cuGetErrorString))
}

/// `Ok` for `CUDA_SUCCESS`, else the error with the driver's name and description of `code`.
pub(crate) fn check(api: &DriverApi, call: &'static str, code: CUresult) -> Result<()> {
    if code == CUDA_SUCCESS {
        return Ok(());
    }
    let (name, message) = describe(api, code);
    Err(CodecError::Cuda {
        call,
        code,
        name,
        message,
    })
}

/// CUDA devices the driver sees: an error when libcuda cannot be loaded or initialised, 0 when
/// it loads but there is no device. "Built with the GPU decoder" and "a device is present" are
/// separate questions: this answers the second.
pub fn device_count() -> Result<usize> {
    let api = api()?;
    let mut n = 0;
    // SAFETY: a valid out-pointer.
    let code = unsafe { (api.cuDeviceGetCount)(&mut n) };
    if code == CUDA_ERROR_NO_DEVICE {
        return Ok(0);
    }
    check(api, "cuDeviceGetCount", code)?;
    Ok(n.max(0) as usize)
}

struct DeviceInner {
    api: &'static DriverApi,
    device: CUdevice,
    ordinal: usize,
    ctx: CUcontext,
}

impl Drop for DeviceInner {
    fn drop(&mut self) {
        // SAFETY: balances the cuDevicePrimaryCtxRetain of Device::new; every handle made in
        // this context holds an Arc to this value, so none outlives the retain.
        unsafe { (self.api.cuDevicePrimaryCtxRelease_v2)(self.device) };
    }
}

/// A CUDA device and its retained primary context: the context libtorch's runtime uses, so
/// pointers and streams from libtorch are valid in it. Cheap to clone.
#[derive(Clone)]
pub struct Device {
    inner: Arc<DeviceInner>,
}

// SAFETY: a CUcontext handle may be used from any thread (the driver API is thread-safe, and
// every call here makes the context current on the calling thread first).
unsafe impl Send for DeviceInner {}
// SAFETY: as above; the struct is immutable after construction.
unsafe impl Sync for DeviceInner {}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("ordinal", &self.inner.ordinal)
            .finish()
    }
}

impl Device {
    /// Device `ordinal` (as CUDA numbers them) with its primary context retained.
    pub fn new(ordinal: usize) -> Result<Device> {
        let api = api()?;
        let mut device: CUdevice = 0;
        // SAFETY: a valid out-pointer; the driver checks the ordinal.
        check(api, "cuDeviceGet", unsafe {
            (api.cuDeviceGet)(&mut device, ordinal as i32)
        })?;
        let mut ctx: CUcontext = std::ptr::null_mut();
        // SAFETY: a valid out-pointer and device; released in DeviceInner::drop.
        check(api, "cuDevicePrimaryCtxRetain", unsafe {
            (api.cuDevicePrimaryCtxRetain)(&mut ctx, device)
        })?;
        Ok(Device {
            inner: Arc::new(DeviceInner {
                api,
                device,
                ordinal,
                ctx,
            }),
        })
    }

    /// The device's ordinal.
    pub fn ordinal(&self) -> usize {
        self.inner.ordinal
    }

    /// A device attribute (`CU_DEVICE_ATTRIBUTE_*`).
    fn attribute(&self, attribute: i32) -> Result<i32> {
        let mut v = 0;
        // SAFETY: a valid out-pointer and device.
        let code =
            unsafe { (self.inner.api.cuDeviceGetAttribute)(&mut v, attribute, self.inner.device) };
        check(self.inner.api, "cuDeviceGetAttribute", code)?;
        Ok(v)
    }

    /// Compute capability (major, minor).
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        Ok((
            self.attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            self.attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        ))
    }

    /// Streaming multiprocessors.
    pub fn multiprocessors(&self) -> Result<i32> {
        self.attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
    }

    /// 32-bit registers of one multiprocessor (65536 on Hopper).
    pub fn registers_per_multiprocessor(&self) -> Result<i32> {
        self.attribute(CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR)
    }

    /// The device's name (`NVIDIA H100 80GB HBM3`).
    pub fn name(&self) -> Result<String> {
        let mut buf = [0 as c_char; 256];
        // SAFETY: `buf` holds the 256 bytes passed as its length.
        let code = unsafe {
            (self.inner.api.cuDeviceGetName)(buf.as_mut_ptr(), buf.len() as i32, self.inner.device)
        };
        check(self.inner.api, "cuDeviceGetName", code)?;
        // SAFETY: the driver wrote a NUL-terminated string into `buf`.
        Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned())
    }

    /// Makes the primary context current on this thread until the guard drops, which restores
    /// the context that was current before.
    #[must_use = "the context is current only while the guard lives"]
    pub(crate) fn bind(&self) -> Result<ContextGuard<'_>> {
        // SAFETY: a retained context, pushed here and popped once in ContextGuard::drop.
        check(self.inner.api, "cuCtxPushCurrent", unsafe {
            (self.inner.api.cuCtxPushCurrent_v2)(self.inner.ctx)
        })?;
        Ok(ContextGuard { device: self })
    }

    /// Runs `f` with the primary context current ([`bind`](Device::bind) as a closure).
    pub(crate) fn with_context<T>(
        &self,
        f: impl FnOnce(&'static DriverApi) -> Result<T>,
    ) -> Result<T> {
        let _guard = self.bind()?;
        f(self.inner.api)
    }

    /// Waits for all work queued in the context, on every stream (libtorch's too).
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: the context is current while the closure runs.
        self.with_context(|api| check(api, "cuCtxSynchronize", unsafe { (api.cuCtxSynchronize)() }))
    }

    /// `len` bytes of device memory, not initialised.
    pub fn alloc(&self, len: usize) -> Result<DeviceBuffer> {
        let mut ptr: CUdeviceptr = 0;
        if len > 0 {
            self.with_context(|api| {
                // SAFETY: a valid out-pointer, the context current; freed in DeviceBuffer::drop.
                check(api, "cuMemAlloc", unsafe {
                    (api.cuMemAlloc_v2)(&mut ptr, len)
                })
            })?;
        }
        Ok(DeviceBuffer {
            device: self.clone(),
            ptr,
            len,
        })
    }

    /// A stream that does not synchronise with the legacy default stream.
    pub fn stream(&self) -> Result<Stream> {
        let mut raw: CUstream = std::ptr::null_mut();
        self.with_context(|api| {
            // SAFETY: a valid out-pointer, the context current; destroyed in Stream::drop.
            check(api, "cuStreamCreate", unsafe {
                (api.cuStreamCreate)(&mut raw, CU_STREAM_NON_BLOCKING)
            })
        })?;
        Ok(Stream {
            device: self.clone(),
            raw,
        })
    }

    /// An event that records timing.
    pub fn event(&self) -> Result<Event> {
        let mut raw: CUevent = std::ptr::null_mut();
        self.with_context(|api| {
            // SAFETY: a valid out-pointer, the context current; destroyed in Event::drop.
            check(api, "cuEventCreate", unsafe {
                (api.cuEventCreate)(&mut raw, 0)
            })
        })?;
        Ok(Event {
            device: self.clone(),
            raw,
        })
    }
}

/// The primary context made current; restores the previous one on drop.
#[must_use = "the context is current only while the guard lives"]
pub(crate) struct ContextGuard<'a> {
    device: &'a Device,
}

impl Drop for ContextGuard<'_> {
    fn drop(&mut self) {
        let mut popped: CUcontext = std::ptr::null_mut();
        // SAFETY: pops the context pushed by Device::bind on this thread (guards drop in
        // reverse order of creation, so the stack is balanced).
        unsafe { (self.device.inner.api.cuCtxPopCurrent_v2)(&mut popped) };
    }
}

/// Device memory, freed on drop.
pub struct DeviceBuffer {
    device: Device,
    ptr: CUdeviceptr,
    len: usize,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBuffer")
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .field("len", &self.len)
            .finish()
    }
}

impl DeviceBuffer {
    /// The device address (`CUdeviceptr`), 256-byte aligned.
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }

    /// Bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `src` to the start of the buffer; returns when the copy has landed on the device
    /// (a copy from pageable memory may return before its DMA is done, which a non-blocking
    /// stream would not wait for: the context is synchronised after it).
    pub fn copy_from_host(&mut self, src: &[u8]) -> Result<()> {
        assert!(
            src.len() <= self.len,
            "{} bytes into a buffer of {}",
            src.len(),
            self.len
        );
        if src.is_empty() {
            return Ok(());
        }
        self.device.with_context(|api| {
            // SAFETY: `src.len()` bytes readable at src and writable at self.ptr (checked above).
            check(api, "cuMemcpyHtoD", unsafe {
                (api.cuMemcpyHtoD_v2)(self.ptr, src.as_ptr().cast::<c_void>(), src.len())
            })?;
            // SAFETY: the context is current.
            check(api, "cuCtxSynchronize", unsafe { (api.cuCtxSynchronize)() })
        })
    }

    /// Copies the start of the buffer into `dst`; returns when the copy is done. Synchronise the
    /// streams that write the buffer first (this copy runs on the legacy default stream, which
    /// does not wait for non-blocking streams).
    pub fn copy_to_host(&self, dst: &mut [u8]) -> Result<()> {
        assert!(
            dst.len() <= self.len,
            "{} bytes from a buffer of {}",
            dst.len(),
            self.len
        );
        if dst.is_empty() {
            return Ok(());
        }
        self.device.with_context(|api| {
            // SAFETY: `dst.len()` bytes readable at self.ptr (checked above) and writable at dst.
            check(api, "cuMemcpyDtoH", unsafe {
                (api.cuMemcpyDtoH_v2)(dst.as_mut_ptr().cast::<c_void>(), self.ptr, dst.len())
            })
        })
    }

    /// Sets every byte to `value`; returns when done.
    pub fn fill(&mut self, value: u8) -> Result<()> {
        if self.len == 0 {
            return Ok(());
        }
        self.device.with_context(|api| {
            // SAFETY: `self.len` bytes writable at self.ptr.
            check(api, "cuMemsetD8", unsafe {
                (api.cuMemsetD8_v2)(self.ptr, value, self.len)
            })?;
            // SAFETY: the context is current; cuMemsetD8 may return before it completes.
            check(api, "cuCtxSynchronize", unsafe { (api.cuCtxSynchronize)() })
        })
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.ptr != 0 {
            let ptr = self.ptr;
            // SAFETY: allocated by cuMemAlloc in this context and freed once. Work queued on a
            // stream that still uses the memory is the caller's to finish first, as with any
            // CUDA allocation.
            let _ = self
                .device
                .with_context(|api| check(api, "cuMemFree", unsafe { (api.cuMemFree_v2)(ptr) }));
        }
    }
}

// SAFETY: a device address is plain data; the driver API is thread-safe.
unsafe impl Send for DeviceBuffer {}
// SAFETY: `&self` methods only read device memory through the driver.
unsafe impl Sync for DeviceBuffer {}

/// A CUDA stream, destroyed on drop.
pub struct Stream {
    device: Device,
    raw: CUstream,
}

impl Stream {
    /// The raw `CUstream`, e.g. for [`GpuDecoder::decode_async`](super::GpuDecoder::decode_async).
    pub fn as_raw(&self) -> *mut c_void {
        self.raw
    }

    /// Waits for the work queued on the stream.
    pub fn synchronize(&self) -> Result<()> {
        self.device.with_context(|api| {
            // SAFETY: a live stream of this context.
            check(api, "cuStreamSynchronize", unsafe {
                (api.cuStreamSynchronize)(self.raw)
            })
        })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let raw = self.raw;
        let _ = self.device.with_context(|api| {
            // SAFETY: created by cuStreamCreate, destroyed once (queued work still completes).
            check(api, "cuStreamDestroy", unsafe {
                (api.cuStreamDestroy_v2)(raw)
            })
        });
    }
}

// SAFETY: a stream handle may be used from any thread.
unsafe impl Send for Stream {}
// SAFETY: as above; the driver serialises work queued on one stream.
unsafe impl Sync for Stream {}

/// A CUDA event with timing, destroyed on drop.
pub struct Event {
    device: Device,
    raw: CUevent,
}

impl Event {
    /// Records the event on `stream`.
    pub fn record(&self, stream: &Stream) -> Result<()> {
        self.device.with_context(|api| {
            // SAFETY: a live event and stream of this context.
            check(api, "cuEventRecord", unsafe {
                (api.cuEventRecord)(self.raw, stream.raw)
            })
        })
    }

    /// Waits for the event, then returns the milliseconds from `start` to it.
    pub fn elapsed_ms_since(&self, start: &Event) -> Result<f32> {
        self.device.with_context(|api| {
            // SAFETY: a live event of this context.
            check(api, "cuEventSynchronize", unsafe {
                (api.cuEventSynchronize)(self.raw)
            })?;
            let mut ms = 0f32;
            // SAFETY: a valid out-pointer and two recorded events of this context.
            check(api, "cuEventElapsedTime", unsafe {
                (api.cuEventElapsedTime_v2)(&mut ms, start.raw, self.raw)
            })?;
            Ok(ms)
        })
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        let raw = self.raw;
        let _ = self.device.with_context(|api| {
            // SAFETY: created by cuEventCreate, destroyed once.
            check(api, "cuEventDestroy", unsafe {
                (api.cuEventDestroy_v2)(raw)
            })
        });
    }
}

// SAFETY: an event handle may be used from any thread.
unsafe impl Send for Event {}
// SAFETY: as above.
unsafe impl Sync for Event {}
