//! Safe wrappers over the shim: CUDA streams, events, non-blocking copies, host memory and
//! allocator statistics, through libtorch's device-generic API.
//!
//! Every function that needs a CUDA device first checks that one is usable and otherwise
//! returns [`Error::NoDevice`]; none of them panics or aborts without a device.
//!
//! This module finds the device (how libtorch's CUDA backend was registered, how many devices
//! there are) and turns the shim's status codes into `Result`; the rest is one file per kind of
//! object: `stream` (streams, stream guards, events), `copy` (non-blocking and peer copies),
//! `host_memory` (pinned and file-backed host buffers), `memory` (device allocations and the
//! caching allocator's statistics).

mod copy;
mod host_memory;
mod memory;
mod stream;

pub(crate) use copy::tensor_identity;
pub use copy::{copy_async, copy_peer_async, is_pinned, record_stream};
pub use host_memory::{FileMapping, HostMemory, alloc_host, map_host_file};
pub(crate) use host_memory::{map_file_read_only, map_shared_file};
pub use memory::{
    MemoryStats, alloc_device, empty_cache, memory_info, memory_stats, reset_peak_memory_stats,
    set_memory_fraction,
};
pub use stream::{Event, Stream, StreamGuard, with_stream};

use crate::error::{Error, Result};
use crate::ffi;
use std::ffi::{CStr, c_int};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

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

/// How many times [`init_cuda_state`] called into libtorch (at most once per process).
static INIT_CALLS: AtomicUsize = AtomicUsize::new(0);

/// Makes libtorch initialize its CUDA state, once per process, and returns that one outcome
/// ever after. Needs a usable device (callers check [`require_device`] first).
///
/// libtorch initializes CUDA lazily, when the process makes its first CUDA tensor. Until then
/// some of its answers depend on what ran before rather than on the question: a pinned buffer
/// (page-locked by this crate with `cudaHostRegister`, not by libtorch) reads as not pinned,
/// since libtorch answers "no pointer is pinned" for a device it has not initialized, and the
/// caching allocator has no state for any device, so its statistics and `resetPeakStats` throw
/// "Invalid device argument". Every public function of this module that asks libtorch about
/// CUDA state, or changes it, calls this first, so that each gives the same answer whatever
/// ran before it in the process. Device discovery ([`cuda_device_count`], [`require_device`]),
/// [`memory_info`] (the driver's numbers), host allocations and [`set_memory_fraction`]
/// (which must come before the allocator starts, and initializes right after) do not.
pub(crate) fn init_cuda_state(op: &'static str) -> Result<()> {
    static INIT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    let outcome = INIT.get_or_init(|| {
        INIT_CALLS.fetch_add(1, Ordering::SeqCst);
        // SAFETY: no arguments; the shim catches every exception.
        match unsafe { ffi::lo_cuda_init() } {
            0 => Ok(()),
            _ => Err(last_error()),
        }
    });
    outcome.clone().map_err(|m| {
        Error::from_torch(
            op,
            0,
            format!("libtorch could not initialize its CUDA state: {m}"),
        )
    })
}

/// [`require_device`], then [`init_cuda_state`]: for every call that asks libtorch about CUDA
/// state or changes it.
pub(crate) fn require_cuda_state(op: &'static str, device: usize) -> Result<()> {
    require_device(op, device)?;
    init_cuda_state(op)
}

fn dev(device: usize) -> c_int {
    device as c_int
}

/// The environment variable that sets how many hardware work queues CUDA opens from the host to
/// each device.
pub const HARDWARE_QUEUES_VAR: &str = "CUDA_DEVICE_MAX_CONNECTIONS";

/// Hardware work queues this crate recommends: CUDA's most, so that the fewest streams share
/// each (libtorch alone creates dozens of pool streams, so sharing is not ruled out, only made
/// rarer).
pub const RECOMMENDED_HARDWARE_QUEUES: u32 = 32;

/// How many hardware work queues CUDA opens from the host to each device in this process:
/// [`HARDWARE_QUEUES_VAR`] when it holds a number from 1 to 32 (the range CUDA documents),
/// otherwise 8, CUDA's default. CUDA reads the variable when it starts in the process, so a
/// change later has no effect.
///
/// CUDA spreads the process's streams over these queues, and work of two streams that share a
/// queue can wait for each other. On an NVIDIA H100 with 8 queues, the manager's copy and decode
/// streams could wait on the model's work: one compressed configuration, built five times in a
/// row in one process, ran 115.8-115.9 ms per forward the first two times (its floor 115.2)
/// and 121.4-121.5 the other three; with 32 queues it ran 115.8-116.6 every time
/// (bench/RESULTS.md, "Hardware work queues"). Set `CUDA_DEVICE_MAX_CONNECTIONS=32` in the
/// program's environment; the crate's own binaries and examples set it when it is unset. With
/// fewer queues, [`initialize`](crate::LayerwiseOffloadManager::initialize) on a CUDA device
/// emits a warning (a `tracing` event with the `tracing` feature).
pub fn hardware_queues() -> u32 {
    parse_hardware_queues(std::env::var(HARDWARE_QUEUES_VAR).ok().as_deref())
}

/// Sets [`HARDWARE_QUEUES_VAR`] to [`RECOMMENDED_HARDWARE_QUEUES`] unless the environment sets
/// it already; returns whether it did. Call it first thing in `main`, before anything starts
/// CUDA: CUDA reads the variable when it starts in the process.
///
/// # Safety
/// As for [`std::env::set_var`]: no other thread may read or write the environment while it
/// runs (true at the start of `main`, before any thread is spawned).
pub unsafe fn use_recommended_hardware_queues() -> bool {
    if std::env::var_os(HARDWARE_QUEUES_VAR).is_some() {
        return false;
    }
    // SAFETY: the caller guarantees that no other thread touches the environment now.
    unsafe { std::env::set_var(HARDWARE_QUEUES_VAR, RECOMMENDED_HARDWARE_QUEUES.to_string()) };
    true
}

/// The warning for a process with `queues` hardware work queues per device, if fewer than
/// recommended (`initialize()` on a CUDA device gives it).
pub(crate) fn few_queues_warning(queues: u32) -> Option<String> {
    (queues < RECOMMENDED_HARDWARE_QUEUES).then(|| {
        format!(
            "CUDA opens {queues} hardware work queues per device ({HARDWARE_QUEUES_VAR}): the manager's copy and decode streams may share one with the model's stream, which slowed a compressed configuration by 5% on an H100; set {HARDWARE_QUEUES_VAR}={RECOMMENDED_HARDWARE_QUEUES} in the program's environment"
        )
    })
}

/// [`hardware_queues`] for a value of the variable (`None`: unset).
fn parse_hardware_queues(value: Option<&str>) -> u32 {
    value
        .and_then(|v| v.trim().parse::<u32>().ok())
        .filter(|n| (1..=32).contains(n))
        .unwrap_or(8)
}

/// Blocks the host until all work on `device` has finished.
pub fn synchronize_device(device: usize) -> Result<()> {
    require_cuda_state("synchronize_device", device)?;
    // SAFETY: plain value argument.
    check("synchronize_device", unsafe {
        ffi::lo_synchronize_device(dev(device))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The variable's value: a number from 1 to 32, else the default 8.
    #[test]
    fn hardware_queues_read_the_documented_range() {
        assert_eq!(parse_hardware_queues(None), 8);
        assert_eq!(parse_hardware_queues(Some("32")), 32);
        assert_eq!(parse_hardware_queues(Some(" 16 ")), 16);
        assert_eq!(parse_hardware_queues(Some("1")), 1);
        for bad in ["0", "33", "-4", "many", ""] {
            assert_eq!(parse_hardware_queues(Some(bad)), 8, "{bad:?}");
        }
    }

    /// Fewer queues than recommended get a warning that names the variable and its value.
    #[test]
    fn few_queues_get_a_warning_naming_the_fix() {
        let w = few_queues_warning(8).expect("8 queues are too few");
        assert!(w.contains("CUDA_DEVICE_MAX_CONNECTIONS=32"), "{w}");
        assert_eq!(few_queues_warning(32), None);
    }

    /// libtorch's CUDA initialization is attempted only with a device, and at most once
    /// however many threads ask at once; without a device every caller gets `NoDevice`.
    #[test]
    fn cuda_state_is_initialized_once_and_only_with_a_device() {
        if cuda_is_available() {
            let threads: Vec<_> = (0..8)
                .map(|_| std::thread::spawn(|| require_cuda_state("test", 0)))
                .collect();
            for t in threads {
                t.join().unwrap().unwrap();
            }
            assert_eq!(INIT_CALLS.load(Ordering::SeqCst), 1);
            let past = require_cuda_state("test", cuda_device_count());
            assert!(matches!(past, Err(Error::NoDevice { .. })), "{past:?}");
            assert_eq!(INIT_CALLS.load(Ordering::SeqCst), 1);
        } else {
            for _ in 0..3 {
                let r = require_cuda_state("test", 0);
                assert!(matches!(r, Err(Error::NoDevice { .. })), "{r:?}");
            }
            assert!(matches!(memory_stats(0), Err(Error::NoDevice { .. })));
            let t = tch::Tensor::zeros([16], (tch::Kind::Uint8, tch::Device::Cpu));
            assert!(!is_pinned(&t).unwrap());
            assert_eq!(
                INIT_CALLS.load(Ordering::SeqCst),
                0,
                "no CUDA initialization is attempted without a device"
            );
        }
    }
}
