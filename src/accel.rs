//! Safe wrappers over the shim: CUDA streams, events, non-blocking copies, host memory and
//! allocator statistics, through libtorch's device-generic API.
//!
//! Every function that needs a CUDA device first checks that one is usable and otherwise
//! returns [`Error::NoDevice`]; none of them panics or aborts without a device.

use crate::error::{Error, Result, TorchMessage};
use crate::ffi;
use std::ffi::{CStr, c_int, c_void};
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::OnceLock;
use tch::Tensor;

/// The message of the last failed shim call on this thread.
pub(crate) fn last_error() -> String {
    // SAFETY: lo_last_error returns a pointer to a thread-local, NUL-terminated std::string
    // buffer that stays valid until the next shim call on this thread; it is copied at once.
    unsafe { CStr::from_ptr(ffi::lo_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Turns a shim status code into a `Result`, naming the operation.
pub(crate) fn check(op: &'static str, rc: c_int) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::from_torch(op, 0, last_error()))
    }
}

/// How libtorch's CUDA backend came to be registered in this process.
///
/// libtorch registers CUDA from static initializers in `libtorch_cuda.so`, a library nothing in
/// a program references by symbol, so linkers that drop unneeded libraries (the default for a
/// crate that depends on this one) leave it out. This crate's shim loads it from libtorch's own
/// directory when the program starts, before anything asks libtorch about CUDA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CudaBackend {
    /// `libtorch_cuda.so` (at this path) was already loaded when the program started: the
    /// program links it.
    Linked(String),
    /// This crate loaded `libtorch_cuda.so` from this path, next to the libtorch in use.
    Loaded(String),
    /// CUDA is not available in this libtorch, and why (a CPU-only build, a library that failed
    /// to load, or libtorch asked about CUDA before it could be loaded).
    Unavailable(String),
}

impl CudaBackend {
    /// Whether libtorch has a registered CUDA backend (a device may still be missing).
    pub fn is_registered(&self) -> bool {
        !matches!(self, CudaBackend::Unavailable(_))
    }
}

/// How libtorch's CUDA backend was registered, or why it was not.
pub fn cuda_backend() -> &'static CudaBackend {
    static BACKEND: OnceLock<CudaBackend> = OnceLock::new();
    BACKEND.get_or_init(|| {
        let mut state: c_int = 2;
        let mut detail: *const std::ffi::c_char = std::ptr::null();
        // SAFETY: both out-pointers are valid locals; on success `detail` points at a
        // NUL-terminated string the shim keeps for the life of the process, copied at once.
        let rc = unsafe { ffi::lo_cuda_backend(&mut state, &mut detail) };
        if rc != 0 || detail.is_null() {
            return CudaBackend::Unavailable(last_error());
        }
        // SAFETY: see above: non-null, NUL-terminated, never freed.
        let detail = unsafe { CStr::from_ptr(detail) }
            .to_string_lossy()
            .into_owned();
        match state {
            0 => CudaBackend::Linked(detail),
            1 => CudaBackend::Loaded(detail),
            _ => CudaBackend::Unavailable(detail),
        }
    })
}

struct CudaInfo {
    count: usize,
    reason: String,
}

fn cuda_info() -> &'static CudaInfo {
    static INFO: OnceLock<CudaInfo> = OnceLock::new();
    INFO.get_or_init(|| {
        if let CudaBackend::Unavailable(why) = cuda_backend() {
            return CudaInfo {
                count: 0,
                reason: format!("libtorch's CUDA backend is not registered: {why}"),
            };
        }
        let mut count: c_int = 0;
        let mut warning = [0 as std::ffi::c_char; 512];
        // SAFETY: the out-pointer is a valid local and `warning` a writable buffer of the
        // length passed; the shim writes at most that many bytes, NUL-terminated.
        let rc =
            unsafe { ffi::lo_cuda_device_count(&mut count, warning.as_mut_ptr(), warning.len()) };
        if rc != 0 {
            return CudaInfo {
                count: 0,
                reason: last_error(),
            };
        }
        // SAFETY: the shim NUL-terminates the buffer (it was zeroed, and the shim writes at
        // most len - 1 bytes before a NUL).
        let warning = unsafe { CStr::from_ptr(warning.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let reason = if warning.is_empty() {
            "no CUDA device is visible (no GPU, or CUDA_VISIBLE_DEVICES hides them)".to_owned()
        } else {
            format!("no CUDA device is usable: {}", warning.trim())
        };
        CudaInfo {
            count: count.max(0) as usize,
            reason,
        }
    })
}

/// Why no CUDA device is usable (`None` when one is).
pub fn cuda_unavailable_reason() -> Option<&'static str> {
    let info = cuda_info();
    (info.count == 0).then_some(info.reason.as_str())
}

/// Whether the libtorch this crate runs on has a CUDA backend (it was built with CUDA). A CUDA
/// build can still find no device: see [`cuda_device_count`].
pub fn cuda_compiled() -> bool {
    cuda_backend().is_registered()
}

/// The number of usable CUDA devices; 0 without a GPU or driver.
pub fn cuda_device_count() -> usize {
    cuda_info().count
}

/// Whether at least one CUDA device is usable.
pub fn cuda_is_available() -> bool {
    cuda_device_count() > 0
}

/// Checks that CUDA device `device` is usable, or says why not.
pub fn require_device(op: &'static str, device: usize) -> Result<()> {
    let info = cuda_info();
    if info.count == 0 {
        return Err(Error::NoDevice {
            op,
            reason: info.reason.clone(),
        });
    }
    if device >= info.count {
        return Err(Error::NoDevice {
            op,
            reason: format!(
                "device index {device} is out of range ({} CUDA devices)",
                info.count
            ),
        });
    }
    Ok(())
}

fn dev(device: usize) -> c_int {
    device as c_int
}

/// A CUDA stream (a `c10::Stream`): a handle, cheap to copy. Streams from the pool live for the
/// whole process, as libtorch's do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stream {
    raw: ffi::lo_stream,
}

impl Stream {
    /// A stream from libtorch's pool of side streams of `device` (round robin, normal priority).
    pub fn from_pool(device: usize) -> Result<Stream> {
        Self::pool(device, false)
    }

    /// A high-priority stream from the pool of `device`.
    pub fn from_pool_high_priority(device: usize) -> Result<Stream> {
        Self::pool(device, true)
    }

    fn pool(device: usize, high: bool) -> Result<Stream> {
        require_device("Stream::from_pool", device)?;
        let mut raw = ffi::lo_stream {
            id: 0,
            device_index: 0,
            device_type: 0,
        };
        // SAFETY: the out-pointer is a valid local.
        check("Stream::from_pool", unsafe {
            ffi::lo_stream_from_pool(dev(device), high as c_int, &mut raw)
        })?;
        Ok(Stream { raw })
    }

    /// The calling thread's current stream on `device` (libtorch keeps one per thread and
    /// device; it is the default stream unless something made another current).
    pub fn current(device: usize) -> Result<Stream> {
        require_device("Stream::current", device)?;
        let mut raw = ffi::lo_stream {
            id: 0,
            device_index: 0,
            device_type: 0,
        };
        // SAFETY: the out-pointer is a valid local.
        check("Stream::current", unsafe {
            ffi::lo_stream_current(dev(device), &mut raw)
        })?;
        Ok(Stream { raw })
    }

    /// The CUDA device index the stream belongs to.
    pub fn device_index(&self) -> usize {
        self.raw.device_index as usize
    }

    /// libtorch's stream id (0 is the default stream).
    pub fn id(&self) -> i64 {
        self.raw.id
    }

    /// Blocks the host until all work queued on the stream has finished.
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: plain value argument.
        check("Stream::synchronize", unsafe {
            ffi::lo_stream_synchronize(self.raw)
        })
    }

    /// Whether all work queued on the stream has finished (does not block).
    pub fn query(&self) -> Result<bool> {
        let mut done: c_int = 0;
        // SAFETY: the out-pointer is a valid local.
        check("Stream::query", unsafe {
            ffi::lo_stream_query(self.raw, &mut done)
        })?;
        Ok(done != 0)
    }

    /// Makes this stream current on its device for the calling thread until the guard drops.
    pub fn make_current(&self) -> Result<StreamGuard> {
        StreamGuard::new(self)
    }

    #[allow(dead_code)]
    pub(crate) fn raw(&self) -> ffi::lo_stream {
        self.raw
    }
}

/// Makes a stream current on its device for the calling thread; dropping the guard restores
/// the stream that was current before, also during a panic's unwinding. Guards nest (drop them
/// in reverse order). Not `Send`: the current stream belongs to the thread that set it.
#[must_use = "the stream is current only while the guard lives"]
#[derive(Debug)]
pub struct StreamGuard {
    previous: ffi::lo_stream,
    _not_send: PhantomData<*const ()>,
}

impl StreamGuard {
    /// Makes `stream` current on its device.
    pub fn new(stream: &Stream) -> Result<StreamGuard> {
        let mut previous = stream.raw;
        // SAFETY: the out-pointer is a valid local.
        check("StreamGuard::new", unsafe {
            ffi::lo_stream_exchange(stream.raw, &mut previous)
        })?;
        Ok(StreamGuard {
            previous,
            _not_send: PhantomData,
        })
    }

    /// The stream that becomes current again when the guard drops.
    pub fn previous(&self) -> Stream {
        Stream { raw: self.previous }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut ignored = self.previous;
        // SAFETY: the out-pointer is a valid local. Exchanging back to a stream that was current
        // before cannot fail short of a broken CUDA backend, and Drop has no way to report it.
        let _ = unsafe { ffi::lo_stream_exchange(self.previous, &mut ignored) };
    }
}

/// Runs `f` with `stream` current on its device, then restores the previous stream (also when
/// `f` panics).
pub fn with_stream<R>(stream: &Stream, f: impl FnOnce() -> R) -> Result<R> {
    let _guard = StreamGuard::new(stream)?;
    Ok(f())
}

/// A CUDA event (`c10::Event`): record it on a stream, make other streams wait on it, query or
/// synchronize it, or time the interval between two events.
#[derive(Debug)]
pub struct Event {
    ptr: NonNull<c_void>,
    timing: bool,
}

// SAFETY: a c10::Event is a heap object without thread affinity; the CUDA event API it calls is
// thread-safe. `record` takes `&mut self`, so no two threads record the same event at once.
unsafe impl Send for Event {}
// SAFETY: the `&self` methods (block, query, synchronize, elapsed time) call thread-safe CUDA
// event functions that do not modify the c10::Event object.
unsafe impl Sync for Event {}

impl Event {
    /// An event without timing (cheapest: use it for ordering).
    pub fn new() -> Result<Event> {
        Self::create(false)
    }

    /// An event that can time intervals with [`Event::elapsed_ms`].
    pub fn with_timing() -> Result<Event> {
        Self::create(true)
    }

    fn create(timing: bool) -> Result<Event> {
        require_device("Event::new", 0)?;
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: the out-pointer is a valid local; on success it holds a new c10::Event.
        check("Event::new", unsafe {
            ffi::lo_event_new(timing as c_int, &mut p)
        })?;
        let ptr = NonNull::new(p).ok_or_else(|| Error::Torch {
            op: "Event::new",
            source: TorchMessage("the shim returned a null event".into()),
        })?;
        Ok(Event { ptr, timing })
    }

    /// Whether this event can time intervals.
    pub fn has_timing(&self) -> bool {
        self.timing
    }

    /// Records the event at the current end of `stream`'s queue.
    pub fn record(&mut self, stream: &Stream) -> Result<()> {
        // SAFETY: self.ptr is a live c10::Event owned by self.
        check("Event::record", unsafe {
            ffi::lo_event_record(self.ptr.as_ptr(), stream.raw)
        })
    }

    /// Makes `stream` wait (on the device, not the host) until the work recorded before this
    /// event has finished. A never-recorded event makes no stream wait.
    pub fn wait(&self, stream: &Stream) -> Result<()> {
        // SAFETY: self.ptr is a live c10::Event owned by self.
        check("Event::wait", unsafe {
            ffi::lo_event_block(self.ptr.as_ptr(), stream.raw)
        })
    }

    /// Whether the recorded work has finished (true for a never-recorded event).
    pub fn query(&self) -> Result<bool> {
        let mut done: c_int = 0;
        // SAFETY: self.ptr is a live c10::Event; the out-pointer is a valid local.
        check("Event::query", unsafe {
            ffi::lo_event_query(self.ptr.as_ptr(), &mut done)
        })?;
        Ok(done != 0)
    }

    /// Blocks the host until the recorded work has finished.
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: self.ptr is a live c10::Event owned by self.
        check("Event::synchronize", unsafe {
            ffi::lo_event_synchronize(self.ptr.as_ptr())
        })
    }

    /// Milliseconds from this event to `end`; both need timing and must have completed.
    pub fn elapsed_ms(&self, end: &Event) -> Result<f64> {
        if !self.timing || !end.timing {
            return Err(Error::InvalidArgument {
                op: "Event::elapsed_ms",
                message: "both events must be created with Event::with_timing()".into(),
            });
        }
        let mut ms = 0.0;
        // SAFETY: both pointers are live c10::Events; the out-pointer is a valid local.
        check("Event::elapsed_ms", unsafe {
            ffi::lo_event_elapsed_ms(self.ptr.as_ptr(), end.ptr.as_ptr(), &mut ms)
        })?;
        Ok(ms)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: self.ptr came from lo_event_new and is freed exactly once, here. CUDA defers
        // the destruction of an event that still has pending work.
        unsafe { ffi::lo_event_free(self.ptr.as_ptr()) }
    }
}

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
        require_device("copy_async", s.device_index())?;
    } else if dst.device().is_cuda() || src.device().is_cuda() {
        require_device("copy_async", 0)?;
    }
    let raw = stream.map(|s| s.raw);
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
    require_device("copy_peer_async", stream.device_index())?;
    let bytes = (src.numel() * src.kind().elt_size_in_bytes()) as u64;
    let mut peer: c_int = 0;
    // SAFETY: both pointers are live tch tensors (the shim reads their metadata and queues a
    // copy of their memory; the caller keeps that memory alive, see # Safety); the out-pointer
    // is a valid local.
    let rc = unsafe {
        ffi::lo_copy_peer_async(
            dst.as_ptr() as *mut _,
            src.as_ptr() as *mut _,
            stream.raw,
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
    require_device("record_stream", stream.device_index())?;
    // SAFETY: the tensor pointer is a live tch tensor; record_stream does not modify its data.
    check("record_stream", unsafe {
        ffi::lo_record_stream(tensor.as_ptr() as *mut _, stream.raw)
    })
}

/// Whether a CPU tensor's memory is page-locked for CUDA (false without a device).
pub fn is_pinned(tensor: &Tensor) -> Result<bool> {
    if !cuda_is_available() {
        return Ok(false);
    }
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

/// How host memory is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostMemory {
    /// Ordinary pageable memory: needs no device, copies to the GPU at about a third of the
    /// pinned rate and never overlap with compute.
    Pageable,
    /// Page-locked memory, registered with the CUDA runtime as portable (usable by every CUDA
    /// device of the process): copies run at the link's full rate, asynchronously.
    Pinned,
}

/// Threads used to fault in a large host allocation.
fn host_threads(bytes: usize) -> c_int {
    if bytes < (64 << 20) {
        return 1;
    }
    std::thread::available_parallelism()
        .map_or(4, |n| n.get())
        .clamp(1, 16) as c_int
}

/// Allocates `bytes` of host memory, exactly (no power-of-two rounding as in libtorch's caching
/// host allocator), and returns it as a 1-D `uint8` CPU tensor that owns it: the memory is
/// unregistered and unmapped when the last view of the tensor is dropped. Large allocations are
/// faulted in by several threads.
///
/// A pinned tensor must outlive every asynchronous copy that reads or writes it.
pub fn alloc_host(bytes: usize, memory: HostMemory) -> Result<Tensor> {
    let kind = match memory {
        HostMemory::Pageable => "pageable",
        HostMemory::Pinned => "pinned",
    };
    if bytes == 0 {
        return Err(Error::InvalidArgument {
            op: "alloc_host",
            message: "cannot allocate 0 bytes".into(),
        });
    }
    if memory == HostMemory::Pinned {
        require_device("alloc_host(Pinned)", 0)?;
    }
    let host_err = |message: String| Error::HostAlloc {
        kind,
        bytes: bytes as u64,
        source: TorchMessage(message),
    };
    let mut p: *mut c_void = std::ptr::null_mut();
    // SAFETY: the out-pointer is a valid local; on success it holds a mapping of `bytes` bytes.
    if unsafe { ffi::lo_host_alloc(bytes, host_threads(bytes), &mut p) } != 0 {
        return Err(host_err(last_error()));
    }
    // SAFETY: p is a fresh private mapping of exactly `bytes` bytes that nothing else uses.
    unsafe {
        own_mapping(
            p,
            bytes,
            (memory == HostMemory::Pinned).then_some(1),
            host_err,
        )
    }
}

/// Registers (with `flags`, if any) and wraps a mapping in a tensor that owns it.
///
/// # Safety
/// `p` must be a live mapping of exactly `bytes` bytes from the shim, not registered, owned by
/// nobody else: on success the tensor's deleter unregisters and unmaps it; on a registration
/// failure it is unmapped here.
unsafe fn own_mapping(
    p: *mut c_void,
    bytes: usize,
    register_flags: Option<u32>,
    host_err: impl Fn(String) -> Error,
) -> Result<Tensor> {
    if let Some(flags) = register_flags {
        // SAFETY: p is a live mapping of exactly `bytes` bytes (caller), registered once.
        if unsafe { ffi::lo_host_register(p, bytes, flags) } != 0 {
            let msg = last_error();
            // SAFETY: p is the caller's mapping of `bytes` bytes, not registered.
            unsafe { ffi::lo_host_free(p, bytes) };
            return Err(host_err(msg));
        }
    }
    let mut t: *mut torch_sys::C_tensor = std::ptr::null_mut();
    // SAFETY: ownership of the mapping passes to the tensor's deleter. Should this fail (it only
    // can if libtorch cannot allocate the tensor object), the mapping is leaked rather than
    // risking a double free.
    if unsafe { ffi::lo_host_tensor(p, bytes, register_flags.is_some() as c_int, &mut t) } != 0
        || t.is_null()
    {
        return Err(host_err(last_error()));
    }
    // SAFETY: t is a fresh heap-allocated at::Tensor whose ownership passes to tch.
    Ok(unsafe { Tensor::from_ptr(t) })
}

/// How [`map_host_file`] maps a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileMapping {
    /// Create the file (nothing may be at the path, not even a symbolic link) with mode 0600
    /// and the given size, its space reserved at once, read-write.
    Create,
    /// Open an existing file of exactly the given size, read-only. It must be a regular file
    /// (not a symbolic link) owned by this user and writable by nobody else.
    OpenReadOnly,
}

/// Maps a file on a shared-memory file system (`/dev/shm/...`) as a 1-D `uint8` CPU tensor that
/// owns the mapping, shared with every other process that maps it: host memory holds its
/// bytes once. With [`HostMemory::Pinned`] the mapping is page-locked for CUDA in this process
/// (portable; read-only for [`FileMapping::OpenReadOnly`]). A read-only mapping must never be
/// written.
///
/// A file system without room for a new file is [`Error::HostAlloc`] ("No space left on
/// device"), and the file is removed; so is it on any other failure of [`FileMapping::Create`].
/// A path taken by another file or link, and a file to open that is a link, belongs to another
/// user or is writable by others, is [`Error::SharedFile`].
///
/// A mapping stays valid when the file is removed, but not when it is truncated: a process that
/// touches a page past the new end dies with SIGBUS. Only this user can truncate a file this
/// function opens (it refuses others' files), and this crate never truncates one.
pub fn map_host_file(
    path: &std::path::Path,
    bytes: usize,
    mode: FileMapping,
    memory: HostMemory,
) -> Result<Tensor> {
    let kind = match memory {
        HostMemory::Pageable => "shared pageable",
        HostMemory::Pinned => "shared pinned",
    };
    if bytes == 0 {
        return Err(Error::InvalidArgument {
            op: "map_host_file",
            message: "cannot map 0 bytes".into(),
        });
    }
    if memory == HostMemory::Pinned {
        require_device("map_host_file(Pinned)", 0)?;
    }
    let host_err = |message: String| Error::HostAlloc {
        kind,
        bytes: bytes as u64,
        source: TorchMessage(message),
    };
    let create = mode == FileMapping::Create;
    let file = if create {
        let file = crate::shm::create_exclusive(path)?
            .map_err(|e| host_err(format!("could not create {}: {e}", path.display())))?;
        if let Err(e) = crate::shm::reserve(&file, bytes) {
            let _ = std::fs::remove_file(path);
            return Err(host_err(format!(
                "could not reserve {bytes} bytes in {}: {e}; the file system must hold the whole store (see `df {}`)",
                path.display(),
                path.parent().unwrap_or(path).display()
            )));
        }
        file
    } else {
        let (file, meta) = crate::shm::open_trusted(path)?
            .map_err(|e| host_err(format!("could not open {}: {e}", path.display())))?;
        if meta.len() != bytes as u64 {
            return Err(Error::SharedFile {
                path: path.to_owned(),
                reason: format!(
                    "holds {} bytes, the manifest says {bytes}: it is not the file the manifest describes",
                    meta.len()
                ),
            });
        }
        file
    };
    let mapped = map_file_descriptor(&file, bytes, create, memory, host_err);
    if mapped.is_err() && create {
        let _ = std::fs::remove_file(path);
    }
    mapped
}

/// Maps the first `bytes` bytes of `file` (of at least that size) shared, and owns the mapping.
fn map_file_descriptor(
    file: &std::fs::File,
    bytes: usize,
    writable: bool,
    memory: HostMemory,
    host_err: impl Fn(String) -> Error,
) -> Result<Tensor> {
    use std::os::fd::AsRawFd as _;
    let mut p: *mut c_void = std::ptr::null_mut();
    // SAFETY: the descriptor is open for the call (borrowed from `file`) and at least `bytes`
    // long (created and reserved, or checked with fstat); the out-pointer is a local.
    if unsafe {
        ffi::lo_host_map_fd(
            file.as_raw_fd(),
            bytes,
            writable as c_int,
            host_threads(bytes),
            &mut p,
        )
    } != 0
    {
        return Err(host_err(last_error()));
    }
    // cudaHostRegisterPortable = 1, cudaHostRegisterReadOnly = 8.
    let flags = (memory == HostMemory::Pinned).then_some(if writable { 1 } else { 1 | 8 });
    // SAFETY: p is a fresh shared mapping of exactly `bytes` bytes owned by this call (the
    // mapping outlives the descriptor, closed by the caller).
    unsafe { own_mapping(p, bytes, flags, host_err) }
}

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
    require_device("memory_stats", device)?;
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
    require_device("reset_peak_memory_stats", device)?;
    // SAFETY: plain value argument.
    check("reset_peak_memory_stats", unsafe {
        ffi::lo_reset_peak_stats(dev(device))
    })
}

/// `(free, total)` bytes of `device` as the driver reports them.
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
    require_device("empty_cache", 0)?;
    // SAFETY: no arguments.
    check("empty_cache", unsafe { ffi::lo_empty_cache() })
}

/// Blocks the host until all work on `device` has finished.
pub fn synchronize_device(device: usize) -> Result<()> {
    require_device("synchronize_device", device)?;
    // SAFETY: plain value argument.
    check("synchronize_device", unsafe {
        ffi::lo_synchronize_device(dev(device))
    })
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
    check(OP, unsafe { ffi::lo_set_memory_fraction(fraction) })
}

/// Allocates an uninitialized `uint8` tensor of `bytes` bytes on CUDA device `device`; running
/// out of memory (also under a [`set_memory_fraction`] cap) is [`Error::OutOfMemory`].
pub fn alloc_device(bytes: usize, device: usize) -> Result<Tensor> {
    require_device("alloc_device", device)?;
    Tensor::f_empty(
        [bytes as i64],
        (tch::Kind::Uint8, tch::Device::Cuda(device)),
    )
    .map_err(|e| Error::from_torch("alloc_device", bytes as u64, e.to_string()))
}
