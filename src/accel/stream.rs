//! CUDA streams, the guard that makes one current, and events.

use super::{check, dev, require_cuda_state};
use crate::error::{Error, Result, TorchMessage};
use crate::ffi;
use std::ffi::{c_int, c_void};
use std::marker::PhantomData;
use std::ptr::NonNull;

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
        // SAFETY: the shim writes the out-pointer, a valid local, and nothing else.
        Stream::from_shim("Stream::from_pool", device, |raw| unsafe {
            ffi::lo_stream_from_pool(dev(device), high as c_int, raw)
        })
    }

    /// A stream of `device` written by the shim call `get` into its out-pointer.
    fn from_shim(
        op: &'static str,
        device: usize,
        get: impl FnOnce(*mut ffi::lo_stream) -> c_int,
    ) -> Result<Stream> {
        require_cuda_state(op, device)?;
        let mut raw = ffi::lo_stream {
            id: 0,
            device_index: 0,
            device_type: 0,
        };
        check(op, get(&mut raw))?;
        Ok(Stream { raw })
    }

    /// The calling thread's current stream on `device` (libtorch keeps one per thread and
    /// device; it is the default stream unless something made another current).
    pub fn current(device: usize) -> Result<Stream> {
        // SAFETY: the shim writes the out-pointer, a valid local, and nothing else.
        Stream::from_shim("Stream::current", device, |raw| unsafe {
            ffi::lo_stream_current(dev(device), raw)
        })
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

    /// The stream's native handle (a `cudaStream_t`, which is a driver API `CUstream`), for
    /// launching kernels of other libraries on it.
    pub fn native_handle(&self) -> Result<*mut c_void> {
        let mut out: *mut c_void = std::ptr::null_mut();
        // SAFETY: the out-pointer is a valid local.
        check("Stream::native_handle", unsafe {
            ffi::lo_stream_native(self.raw, &mut out)
        })?;
        Ok(out)
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
        require_cuda_state("Event::new", 0)?;
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
