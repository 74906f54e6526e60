// C ABI over libtorch's device-generic stream, event, allocator and copy API.
//
// Every function returns 0 on success and -1 on failure; on failure the message is in a
// thread-local slot read with lo_last_error(). No C++ exception crosses this boundary.
// Tensors are libtorch `at::Tensor*`, the same pointers tch-rs hands out.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// A c10::Stream, packed (c10::Stream::pack3 / unpack3).
typedef struct lo_stream {
  int64_t id;
  int32_t device_index;
  int32_t device_type;
} lo_stream;

// Allocator statistics of one device (the aggregate pool), in bytes.
typedef struct lo_mem_stats {
  int64_t allocated_current;
  int64_t allocated_peak;
  int64_t reserved_current;
  int64_t reserved_peak;
  int64_t num_ooms;
} lo_mem_stats;

// The message of the last failed call on this thread; valid until the next call on this thread.
const char* lo_last_error(void);

// Accelerator discovery.
// How libtorch's CUDA backend came to be registered: *state 0 = libtorch_cuda.so was loaded at
// start-up (linked), 1 = the shim loaded it from libtorch's directory, 2 = CUDA is unavailable.
// *detail: the library's path, or why CUDA is unavailable (valid for the process's lifetime).
int lo_cuda_backend(int* state, const char** detail);
// *out: the number of CUDA devices. With none, the backend's warning (e.g. no driver), if it gave
// one, is copied NUL-terminated into warning[0..warning_cap).
int lo_cuda_device_count(int* out, char* warning, size_t warning_cap);
int lo_synchronize_device(int device);
// Makes libtorch initialize its CUDA state now (at::globalContext().lazyInitDevice(CUDA), what
// torch.cuda.init() does): the caching allocator for every device, the peer-access cache, and
// the flag that lets libtorch answer pointer queries (is_pinned). Idempotent; a failure is
// reported and may be retried.
int lo_cuda_init(void);

// Streams.
int lo_stream_from_pool(int device, int high_priority, lo_stream* out);
int lo_stream_current(int device, lo_stream* out);
int lo_stream_exchange(lo_stream stream, lo_stream* previous);
int lo_stream_synchronize(lo_stream stream);
int lo_stream_query(lo_stream stream, int* done);
// The stream's native handle (a cudaStream_t), for launching kernels libtorch does not know.
int lo_stream_native(lo_stream stream, void** out);

// Events (c10::Event on the CUDA backend).
int lo_event_new(int enable_timing, void** out);
void lo_event_free(void* event);
int lo_event_record(void* event, lo_stream stream);
int lo_event_block(void* event, lo_stream stream);
int lo_event_query(void* event, int* done);
int lo_event_synchronize(void* event);
int lo_event_elapsed_ms(void* start, void* end, double* out);

// Copies and stream bookkeeping of tensors.
int lo_copy_async(void* dst, void* src, const lo_stream* stream);
// Queues cudaMemcpyPeerAsync of src's bytes into dst (contiguous CUDA tensors of equal byte size,
// on any devices) on `stream`, a stream of either device, enabling peer access between the two
// devices first where they have it. *peer: 1 if the copy can take the direct peer path.
int lo_copy_peer_async(void* dst, void* src, lo_stream stream, int* peer);
int lo_record_stream(void* tensor, lo_stream stream);
int lo_tensor_is_pinned(void* tensor, int* out);
// *out: the tensor's TensorImpl, the same for every handle (shallow copy) of one tensor.
int lo_tensor_impl(void* tensor, void** out);

// Host memory: page-aligned anonymous memory, optionally page-locked for the CUDA runtime.
int lo_host_alloc(size_t bytes, int threads, void** out);
int lo_host_free(void* ptr, size_t bytes);
// flags: cudaHostRegister's (1 portable, 8 read-only).
int lo_host_register(void* ptr, size_t bytes, unsigned int flags);
// Maps the first `bytes` bytes of the open file `fd` (on a shared-memory file system, e.g.
// /dev/shm; at least that long, its space reserved) with MAP_SHARED: read-write with every page
// faulted in (writable = 1), or read-only (writable = 0). The caller opens, checks and closes
// the file. Free with lo_host_free.
int lo_host_map_fd(int fd, size_t bytes, int writable, int threads, void** out);
// Takes ownership of `ptr` (from lo_host_alloc; registered if `registered`) and returns a 1-D
// uint8 CPU tensor over it whose deleter unregisters and unmaps it when the last view is gone.
int lo_host_tensor(void* ptr, size_t bytes, int registered, void** out);

// Device allocator.
int lo_memory_stats(int device, lo_mem_stats* out);
int lo_reset_peak_stats(int device);
int lo_memory_info(int device, size_t* free_bytes, size_t* total_bytes);
int lo_empty_cache(void);
int lo_allocator_initialized(int* out);
int lo_set_memory_fraction(double fraction);

// TorchScript modules (csrc/jit.cpp). Modules are heap-allocated torch::jit::Module handles.
int lo_jit_load(const char* path, int device_type, int device_index, void** out);
void lo_jit_free(void* module);
int lo_jit_submodule(void* module, const char* path, void** out);
int lo_jit_forward(void* module, void** inputs, int n, void** out);
// Calls cb(ctx, name, tensor) for each parameter (buffers = 0) or buffer (buffers = 1); the
// tensor is a new at::Tensor* the callee owns.
int lo_jit_named_tensors(void* module, int buffers, void* ctx, void (*cb)(void*, const char*, void*));
int lo_jit_eval(void* module);
int lo_jit_set_optimize(int on);
int lo_jit_get_optimize(int* on);
// IValues are torch::jit::IValue* (torch-sys's `ivalue`), borrowed on input. Calls `method`
// with positional then keyword arguments; *found = 0 (nothing else done) when the module has
// no such method; else *out is a new IValue* the caller frees (torch-sys's ati_free).
int lo_jit_call(void* module, const char* method, void** args, int n_args, const char** kw_names,
                void** kw_values, int n_kw, int* found, void** out);
// Calls cb(ctx, name) for each method of the module.
int lo_jit_method_names(void* module, void* ctx, void (*cb)(void*, const char*));
// *found = 0 when there is no such method; else cb(ctx, is_return, name, type, default or NULL)
// for each argument (without `self`) and then each return value.
int lo_jit_method_schema(void* module, const char* method, int* found, void* ctx,
                         void (*cb)(void*, int, const char*, const char*, const char*));

#ifdef __cplusplus
}
#endif
