//! `extern "C"` declarations of the C++ shim (`csrc/shim.h`), nothing else.
//!
//! Every function returns 0 on success and -1 on failure, with the message in a thread-local
//! slot read by [`lo_last_error`]. Tensor arguments are libtorch `at::Tensor*` as tch hands out.
#![allow(missing_docs)]

use std::ffi::{c_char, c_int, c_void};
use torch_sys::{C_tensor, CIValue};

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct lo_stream {
    pub id: i64,
    pub device_index: i32,
    pub device_type: i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct lo_mem_stats {
    pub allocated_current: i64,
    pub allocated_peak: i64,
    pub reserved_current: i64,
    pub reserved_peak: i64,
    pub num_ooms: i64,
}

unsafe extern "C" {
    pub fn lo_last_error() -> *const c_char;

    pub fn lo_cuda_backend(state: *mut c_int, detail: *mut *const c_char) -> c_int;
    pub fn lo_cuda_device_count(out: *mut c_int, warning: *mut c_char, warning_cap: usize)
    -> c_int;
    pub fn lo_synchronize_device(device: c_int) -> c_int;
    pub fn lo_cuda_init() -> c_int;

    pub fn lo_stream_from_pool(device: c_int, high_priority: c_int, out: *mut lo_stream) -> c_int;
    pub fn lo_stream_current(device: c_int, out: *mut lo_stream) -> c_int;
    pub fn lo_stream_exchange(stream: lo_stream, previous: *mut lo_stream) -> c_int;
    pub fn lo_stream_synchronize(stream: lo_stream) -> c_int;
    pub fn lo_stream_query(stream: lo_stream, done: *mut c_int) -> c_int;
    pub fn lo_stream_native(stream: lo_stream, out: *mut *mut c_void) -> c_int;

    pub fn lo_event_new(enable_timing: c_int, out: *mut *mut c_void) -> c_int;
    pub fn lo_event_free(event: *mut c_void);
    pub fn lo_event_record(event: *mut c_void, stream: lo_stream) -> c_int;
    pub fn lo_event_block(event: *mut c_void, stream: lo_stream) -> c_int;
    pub fn lo_event_query(event: *mut c_void, done: *mut c_int) -> c_int;
    pub fn lo_event_synchronize(event: *mut c_void) -> c_int;
    pub fn lo_event_elapsed_ms(start: *mut c_void, end: *mut c_void, out: *mut f64) -> c_int;

    pub fn lo_copy_async(dst: *mut C_tensor, src: *mut C_tensor, stream: *const lo_stream)
    -> c_int;
    pub fn lo_copy_peer_async(
        dst: *mut C_tensor,
        src: *mut C_tensor,
        stream: lo_stream,
        peer: *mut c_int,
    ) -> c_int;
    pub fn lo_record_stream(tensor: *mut C_tensor, stream: lo_stream) -> c_int;
    pub fn lo_tensor_is_pinned(tensor: *mut C_tensor, out: *mut c_int) -> c_int;
    pub fn lo_tensor_impl(tensor: *mut C_tensor, out: *mut *mut c_void) -> c_int;

    pub fn lo_host_alloc(bytes: usize, threads: c_int, out: *mut *mut c_void) -> c_int;
    pub fn lo_host_free(ptr: *mut c_void, bytes: usize) -> c_int;
    pub fn lo_host_register(ptr: *mut c_void, bytes: usize, flags: u32) -> c_int;
    pub fn lo_host_map_fd(
        fd: c_int,
        bytes: usize,
        writable: c_int,
        threads: c_int,
        out: *mut *mut c_void,
    ) -> c_int;
    pub fn lo_host_tensor(
        ptr: *mut c_void,
        bytes: usize,
        registered: c_int,
        out: *mut *mut C_tensor,
    ) -> c_int;

    pub fn lo_memory_stats(device: c_int, out: *mut lo_mem_stats) -> c_int;
    pub fn lo_reset_peak_stats(device: c_int) -> c_int;
    pub fn lo_memory_info(device: c_int, free_bytes: *mut usize, total_bytes: *mut usize) -> c_int;
    pub fn lo_empty_cache() -> c_int;
    pub fn lo_allocator_initialized(out: *mut c_int) -> c_int;
    pub fn lo_set_memory_fraction(fraction: f64) -> c_int;

    pub fn lo_jit_load(
        path: *const c_char,
        device_type: c_int,
        device_index: c_int,
        out: *mut *mut c_void,
    ) -> c_int;
    pub fn lo_jit_free(module: *mut c_void);
    pub fn lo_jit_submodule(
        module: *mut c_void,
        path: *const c_char,
        out: *mut *mut c_void,
    ) -> c_int;
    pub fn lo_jit_forward(
        module: *mut c_void,
        inputs: *const *mut C_tensor,
        n: c_int,
        out: *mut *mut C_tensor,
    ) -> c_int;
    pub fn lo_jit_named_tensors(
        module: *mut c_void,
        buffers: c_int,
        ctx: *mut c_void,
        cb: unsafe extern "C" fn(*mut c_void, *const c_char, *mut C_tensor),
    ) -> c_int;
    pub fn lo_jit_eval(module: *mut c_void) -> c_int;
    pub fn lo_jit_set_optimize(on: c_int) -> c_int;
    pub fn lo_jit_get_optimize(on: *mut c_int) -> c_int;
    pub fn lo_jit_call(
        module: *mut c_void,
        method: *const c_char,
        args: *const *mut CIValue,
        n_args: c_int,
        kw_names: *const *const c_char,
        kw_values: *const *mut CIValue,
        n_kw: c_int,
        found: *mut c_int,
        out: *mut *mut CIValue,
    ) -> c_int;
    pub fn lo_jit_method_names(
        module: *mut c_void,
        ctx: *mut c_void,
        cb: unsafe extern "C" fn(*mut c_void, *const c_char),
    ) -> c_int;
    pub fn lo_jit_method_schema(
        module: *mut c_void,
        method: *const c_char,
        found: *mut c_int,
        ctx: *mut c_void,
        cb: unsafe extern "C" fn(*mut c_void, c_int, *const c_char, *const c_char, *const c_char),
    ) -> c_int;

    /// The C library's `free`, for the strings torch-sys's `get_and_reset_last_err` and
    /// `ati_to_string` return (allocated with `strdup`).
    pub fn free(p: *mut c_void);
}
