//! Host memory: page-aligned buffers, page-locked for the CUDA runtime or not, and buffers over
//! shared-memory files.

use super::{last_error, require_device};
use crate::error::{Context as _, Error, Result, TorchMessage};
use crate::ffi;
use std::ffi::{c_int, c_void};
use tch::Tensor;

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

#[cfg(feature = "testing")]
thread_local! {
    /// Armed by [`HostMemory::fail_next_registration`]: the next registration on this thread
    /// fails.
    static FAIL_NEXT_REGISTER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[cfg(feature = "testing")]
impl HostMemory {
    /// Test knob (the `testing` feature; not part of the stable API): the next page-locking
    /// registration (`cudaHostRegister`) of host memory on the calling thread fails once, as
    /// if the CUDA runtime had refused it: the mapping is released and the caller gets
    /// [`Error::HostAlloc`]. Registration only happens for [`HostMemory::Pinned`], so only with
    /// a CUDA device. For tests of the cleanup after a failed registration (a new
    /// shared-memory file is removed). Other threads are not affected.
    pub fn fail_next_registration() {
        FAIL_NEXT_REGISTER.with(|f| f.set(true));
    }

    /// Disarms [`Self::fail_next_registration`] on the calling thread; whether it was still
    /// armed (no registration consumed it).
    pub fn clear_registration_failure() -> bool {
        FAIL_NEXT_REGISTER.with(|f| f.replace(false))
    }
}

/// Whether an armed [`HostMemory::fail_next_registration`] makes this registration fail
/// (disarming it).
#[cfg(feature = "testing")]
fn injected_register_failure() -> bool {
    FAIL_NEXT_REGISTER.with(|f| f.replace(false))
}

/// Without the `testing` feature no registration is made to fail.
#[cfg(not(feature = "testing"))]
fn injected_register_failure() -> bool {
    false
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

/// Checks a request of `op` for `bytes` of host memory of kind `memory` (not empty; pinned
/// memory needs a CUDA device, checked as `pinned_op`), in a shared-memory file or not, and
/// returns the error to give if the allocation fails.
fn host_request(
    (op, pinned_op): (&'static str, &'static str),
    shared: bool,
    bytes: usize,
    memory: HostMemory,
) -> Result<impl Fn(String) -> Error> {
    let kind = match (shared, memory) {
        (false, HostMemory::Pageable) => "pageable",
        (false, HostMemory::Pinned) => "pinned",
        (true, HostMemory::Pageable) => "shared pageable",
        (true, HostMemory::Pinned) => "shared pinned",
    };
    if bytes == 0 {
        return Err(Error::InvalidArgument {
            op,
            message: "cannot allocate 0 bytes".into(),
        });
    }
    if memory == HostMemory::Pinned {
        require_device(pinned_op, 0)?;
    }
    Ok(move |message: String| Error::HostAlloc {
        kind,
        bytes: bytes as u64,
        source: TorchMessage(message),
    })
}

/// Allocates `bytes` of host memory, exactly (no power-of-two rounding as in libtorch's caching
/// host allocator), and returns it as a 1-D `uint8` CPU tensor that owns it: the memory is
/// unregistered and unmapped when the last view of the tensor is dropped. Large allocations are
/// faulted in by several threads.
///
/// A pinned tensor must outlive every asynchronous copy that reads or writes it.
pub fn alloc_host(bytes: usize, memory: HostMemory) -> Result<Tensor> {
    let host_err = host_request(("alloc_host", "alloc_host(Pinned)"), false, bytes, memory)?;
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
        // SAFETY: p is a live mapping of exactly `bytes` bytes (caller), not registered.
        if let Err(msg) = unsafe { register(p, bytes, flags) } {
            // SAFETY: p is the caller's mapping of `bytes` bytes, not registered.
            unsafe { ffi::lo_host_free(p, bytes) };
            return Err(host_err(msg));
        }
    }
    // SAFETY: as the caller vouches, and registered as `register_flags` says.
    unsafe { tensor_of_mapping(p, bytes, register_flags.is_some(), host_err) }
}

/// Page-locks the mapping `p` of `bytes` bytes with `flags` (`cudaHostRegister`); the error's
/// message on failure (the mapping is left to the caller).
///
/// # Safety
/// `p` must be a live mapping of exactly `bytes` bytes, not registered.
unsafe fn register(p: *mut c_void, bytes: usize, flags: u32) -> std::result::Result<(), String> {
    if injected_register_failure() {
        return Err(
            "cudaHostRegister failed (injected by HostMemory::fail_next_registration)".into(),
        );
    }
    // SAFETY: p is a live mapping of exactly `bytes` bytes (caller), registered once.
    match unsafe { ffi::lo_host_register(p, bytes, flags) } {
        0 => Ok(()),
        _ => Err(last_error()),
    }
}

/// The 1-D `uint8` tensor that owns the mapping `p` of `bytes` bytes (its deleter unregisters
/// it if `registered`, and unmaps it).
///
/// # Safety
/// `p` must be a live mapping of exactly `bytes` bytes from the shim, registered if and only
/// if `registered`, owned by nobody else.
unsafe fn tensor_of_mapping(
    p: *mut c_void,
    bytes: usize,
    registered: bool,
    host_err: impl Fn(String) -> Error,
) -> Result<Tensor> {
    let mut t: *mut torch_sys::C_tensor = std::ptr::null_mut();
    // SAFETY: ownership of the mapping passes to the tensor's deleter. Should this fail (it only
    // can if libtorch cannot allocate the tensor object), the mapping is leaked rather than
    // risking a double free.
    if unsafe { ffi::lo_host_tensor(p, bytes, registered as c_int, &mut t) } != 0 || t.is_null() {
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
/// (portable).
///
/// [`FileMapping::OpenReadOnly`] gives the file's bytes in memory this process owns (a copy,
/// page-locked with [`HostMemory::Pinned`]): the file is mapped read-only, and a tensor over
/// those pages would be writable by any in-place operation, which kills the process with
/// SIGSEGV. [`HostStore::open_shared`](crate::HostStore::open_shared), which never hands its
/// pages out, maps them without a copy.
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
    let mapped = map_shared_file(path, bytes, mode, memory)?;
    if mode == FileMapping::Create {
        return Ok(mapped);
    }
    let mut owned = alloc_host(bytes, memory)?;
    tch::no_grad(|| owned.f_copy_(&mapped)).context("map_host_file (copying a read-only file)")?;
    Ok(owned)
}

/// [`map_host_file`] without the copy: with [`FileMapping::OpenReadOnly`] the tensor is the
/// file's read-only pages, which the caller must never write nor hand out.
pub(crate) fn map_shared_file(
    path: &std::path::Path,
    bytes: usize,
    mode: FileMapping,
    memory: HostMemory,
) -> Result<Tensor> {
    let host_err = host_request(
        ("map_host_file", "map_host_file(Pinned)"),
        true,
        bytes,
        memory,
    )?;
    let create = mode == FileMapping::Create;
    let file = if create {
        let file = crate::host::shm::create_exclusive(path)?
            .map_err(|e| Error::io("cannot create the shared host store file", path, e))?;
        if let Err(e) = crate::host::shm::reserve(&file, bytes) {
            let _ = std::fs::remove_file(path);
            return Err(host_err(format!(
                "could not reserve {bytes} bytes in {}: {e}; the file system must hold the whole store (see `df {}`)",
                path.display(),
                path.parent().unwrap_or(path).display()
            )));
        }
        file
    } else {
        let (file, meta) = crate::host::shm::open_trusted(path)?
            .map_err(|e| Error::io("cannot open the shared host store file", path, e))?;
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

/// Maps the first `bytes` bytes of `file` (at `path`, for messages) read-only and shared, as
/// a 1-D `uint8` CPU tensor that owns the mapping: the zero-copy checkpoint store. With
/// [`HostMemory::Pinned`] the pages are page-locked in place (`cudaHostRegister`, portable
/// and read-only), which reads them in if they are not in the page cache. The file must hold
/// at least `bytes` bytes and must not be truncated while the tensor lives (SIGBUS).
///
/// `check` reads the mapped bytes on another thread while they are page-locked (the driver
/// locks pages on one thread): the mapping is returned only if it returns Ok, and its error
/// (or panic) is passed on after the mapping is released.
pub(crate) fn map_file_read_only(
    file: &std::fs::File,
    path: &std::path::Path,
    bytes: usize,
    memory: HostMemory,
    check: impl FnOnce(&[u8]) -> Result<()> + Send,
) -> Result<Tensor> {
    let host_err = host_request(("zero_copy", "zero_copy (pinned)"), true, bytes, memory)?;
    let path = path.to_owned();
    let host_err = move |m: String| host_err(format!("mapping {}: {m}", path.display()));
    let p = map_fd(file, bytes, false, &host_err)?;
    // cudaHostRegisterPortable = 1, cudaHostRegisterReadOnly = 8.
    let flags = (memory == HostMemory::Pinned).then_some(1 | 8);
    // SAFETY: p is a fresh read-only mapping of `bytes` bytes owned by this call; it is not
    // unmapped before the scope below has joined the thread that reads it, and registering it
    // does not change its contents.
    let view = unsafe { std::slice::from_raw_parts(p.cast::<u8>().cast_const(), bytes) };
    let (registered, checked) = std::thread::scope(|s| {
        let reader = s.spawn(move || check(view));
        // SAFETY: p is a live mapping of `bytes` bytes, not registered.
        let registered = flags.map_or(Ok(()), |f| unsafe { register(p, bytes, f) });
        (registered, reader.join())
    });
    if let Err(msg) = registered {
        // SAFETY: p is this call's mapping, not registered, and no thread reads it any more.
        unsafe { ffi::lo_host_free(p, bytes) };
        return Err(host_err(msg));
    }
    // SAFETY: p is this call's mapping, registered as `flags` says, owned by nobody else.
    let mapped = unsafe { tensor_of_mapping(p, bytes, flags.is_some(), &host_err)? };
    match checked {
        // The mapping goes with `mapped`, dropped here.
        Ok(result) => result.map(|()| mapped),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Maps the first `bytes` bytes of `file` (of at least that size) shared, and owns the mapping.
fn map_file_descriptor(
    file: &std::fs::File,
    bytes: usize,
    writable: bool,
    memory: HostMemory,
    host_err: impl Fn(String) -> Error,
) -> Result<Tensor> {
    let p = map_fd(file, bytes, writable, &host_err)?;
    // cudaHostRegisterPortable = 1, cudaHostRegisterReadOnly = 8.
    let flags = (memory == HostMemory::Pinned).then_some(if writable { 1 } else { 1 | 8 });
    // SAFETY: p is a fresh shared mapping of exactly `bytes` bytes owned by this call (the
    // mapping outlives the descriptor, closed by the caller).
    unsafe { own_mapping(p, bytes, flags, host_err) }
}

/// Maps the first `bytes` bytes of `file` shared (a writable mapping's pages faulted in on the
/// shim's threads); the caller owns the mapping. Reading past the file's end through it is
/// SIGBUS: the callers check the file's length.
fn map_fd(
    file: &std::fs::File,
    bytes: usize,
    writable: bool,
    host_err: &impl Fn(String) -> Error,
) -> Result<*mut c_void> {
    use std::os::fd::AsRawFd as _;
    let mut p: *mut c_void = std::ptr::null_mut();
    // SAFETY: the descriptor is open for the call (borrowed from `file`); the out-pointer is a
    // local.
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
    Ok(p)
}
