// C ABI over libtorch's device-generic API. Compiles with libtorch's headers alone (no CUDA
// toolkit): streams and events go through c10's virtual guard implementation for the CUDA
// device type, statistics through the device allocator interface, and the two CUDA runtime
// calls libtorch does not wrap (cudaHostRegister / cudaHostUnregister) are looked up at run time
// in the CUDA runtime libtorch_cuda already loaded.
//
// Every entry point runs its body inside LO_PROTECT (protect.h): any C++ exception becomes -1
// plus a thread-local message, so no exception crosses into Rust.
#include "shim.h"
#include "protect.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/DeviceAccelerator.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/AllocatorConfig.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>

#include <dlfcn.h>
#include <link.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

// The thread-local error slot of every shim entry point (protect.h).
namespace lo {
namespace {
thread_local std::string g_last_error;
}  // namespace

void set_error(const char* msg) { g_last_error = msg ? msg : "unknown error"; }

const char* last_error() { return g_last_error.c_str(); }
}  // namespace lo

namespace {

constexpr auto kCuda = c10::DeviceType::CUDA;

// libtorch registers its CUDA backend from static initializers in libtorch_cuda.so. Nothing in a
// program references that library directly, so a linker with --as-needed (the default of most
// toolchains, and what a crate that depends on this one gets) drops it and CUDA stays
// unregistered. The shim loads it at start-up instead (a constructor of this object file, which
// is linked into every binary that calls the crate), before anything asks libtorch for its CUDA
// hooks: those are created once, on first use, and a program that asks before the library is
// loaded has no CUDA for good.
enum CudaBackendState { kLinked = 0, kLoaded = 1, kUnavailable = 2 };

struct CudaBackend {
  int state = kUnavailable;
  std::string detail;  // the library's path, or why CUDA is unavailable
};

// The directory of the first loaded object named `name` (e.g. "libtorch_cpu.so"), or "".
std::string loaded_object_dir(const char* name) {
  struct Search {
    const char* name;
    std::string dir;
  } search{name, {}};
  dl_iterate_phdr(
      [](struct dl_phdr_info* info, size_t, void* data) -> int {
        auto* s = static_cast<Search*>(data);
        if (info->dlpi_name == nullptr || info->dlpi_name[0] == '\0') return 0;
        std::string path(info->dlpi_name);
        auto slash = path.rfind('/');
        if (slash == std::string::npos || path.compare(slash + 1, std::string::npos, s->name) != 0)
          return 0;
        s->dir = path.substr(0, slash);
        return 1;
      },
      &search);
  return search.dir;
}

CudaBackend load_cuda_backend() {
  CudaBackend b;
  std::string lib = loaded_object_dir("libtorch_cuda.so");
  if (!lib.empty()) {
    b.state = kLinked;
    b.detail = lib + "/libtorch_cuda.so";
  } else {
    // libtorch's own directory: where the loaded libtorch_cpu.so (or libc10.so) lives, else the
    // directory this crate was built against.
    std::string dir = loaded_object_dir("libtorch_cpu.so");
    if (dir.empty()) dir = loaded_object_dir("libc10.so");
#ifdef LO_LIBTORCH_LIB
    if (dir.empty()) dir = LO_LIBTORCH_LIB;
#endif
    if (dir.empty()) {
      b.detail =
          "libtorch's directory was not found (no libtorch_cpu.so or libc10.so among the loaded "
          "objects), so libtorch_cuda.so could not be loaded";
      return b;
    }
    std::string path = dir + "/libtorch_cuda.so";
    if (access(path.c_str(), F_OK) != 0) {
      b.detail = "the libtorch in " + dir +
                 " is a CPU-only build (it has no libtorch_cuda.so); install a CUDA build of "
                 "libtorch (e.g. PyPI's torch==2.11.0 for Linux x86-64)";
      return b;
    }
    if (dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
      const char* why = dlerror();
      b.detail = "loading " + path + " failed: " + (why ? why : "unknown dlopen error") +
                 " (are the CUDA libraries libtorch was built with installed and findable?)";
      return b;
    }
    b.state = kLoaded;
    b.detail = path;
  }
  if (!c10::impl::hasDeviceGuardImpl(kCuda)) {
    b.state = kUnavailable;
    b.detail = b.detail + " is loaded but registered no CUDA backend";
  } else if (!at::detail::getCUDAHooks().isBuilt()) {
    b.state = kUnavailable;
    b.detail =
        "libtorch's CUDA hooks were created before " + b.detail +
        " was loaded, so libtorch has no CUDA for the rest of this process (something asked "
        "libtorch about CUDA before the layerwise-offload shim ran; link libtorch_cuda with "
        "-Wl,--no-as-needed -ltorch_cuda to load it at start-up)";
  }
  return b;
}

const CudaBackend& cuda_backend() {
  static const CudaBackend backend = load_cuda_backend();
  return backend;
}

void ensure_cuda_backend() { cuda_backend(); }

// Runs when the program (or the library that links this object) is loaded.
__attribute__((constructor)) void load_cuda_backend_at_startup() { ensure_cuda_backend(); }

bool cuda_registered() { return cuda_backend().state != kUnavailable; }

const c10::impl::VirtualGuardImpl& cuda_impl() {
  ensure_cuda_backend();
  static const c10::impl::VirtualGuardImpl impl(kCuda);  // throws if CUDA is not registered
  return impl;
}

c10::Stream unpack(lo_stream s) {
  return c10::Stream::unpack3(s.id, static_cast<c10::DeviceIndex>(s.device_index),
                              static_cast<c10::DeviceType>(s.device_type));
}

lo_stream pack(const c10::Stream& s) {
  auto d = s.pack3();
  return lo_stream{d.stream_id, d.device_index, static_cast<int32_t>(d.device_type)};
}

c10::Device cuda_device(int index) {
  TORCH_CHECK(index >= 0, "invalid CUDA device index ", index);
  return c10::Device(kCuda, static_cast<c10::DeviceIndex>(index));
}

// --- The CUDA runtime's host registration, found at run time -------------------------------
using host_register_fn = int (*)(void*, size_t, unsigned int);
using host_unregister_fn = int (*)(void*);
using get_error_string_fn = const char* (*)(int);
using get_last_error_fn = int (*)();
using can_access_peer_fn = int (*)(int*, int, int);
using enable_peer_access_fn = int (*)(int, unsigned int);
using memcpy_peer_async_fn = int (*)(void*, int, const void*, int, size_t, void*);

struct Cudart {
  host_register_fn host_register = nullptr;
  host_unregister_fn host_unregister = nullptr;
  get_error_string_fn error_string = nullptr;
  get_last_error_fn last_error = nullptr;
  can_access_peer_fn can_access_peer = nullptr;
  enable_peer_access_fn enable_peer_access = nullptr;
  memcpy_peer_async_fn memcpy_peer_async = nullptr;
};

void* cudart_symbol(const char* name) {
  if (void* p = dlsym(RTLD_DEFAULT, name)) return p;
  // libtorch_cuda loads the runtime through its own rpath; find it by soname.
  for (const char* soname : {"libcudart.so.13", "libcudart.so.12", "libcudart.so"}) {
    if (void* h = dlopen(soname, RTLD_NOW | RTLD_NOLOAD)) {
      if (void* p = dlsym(h, name)) return p;
    }
  }
  return nullptr;
}

const Cudart& cudart() {
  static Cudart rt = [] {
    ensure_cuda_backend();
    Cudart r;
    r.host_register = reinterpret_cast<host_register_fn>(cudart_symbol("cudaHostRegister"));
    r.host_unregister = reinterpret_cast<host_unregister_fn>(cudart_symbol("cudaHostUnregister"));
    r.error_string = reinterpret_cast<get_error_string_fn>(cudart_symbol("cudaGetErrorString"));
    r.last_error = reinterpret_cast<get_last_error_fn>(cudart_symbol("cudaGetLastError"));
    r.can_access_peer =
        reinterpret_cast<can_access_peer_fn>(cudart_symbol("cudaDeviceCanAccessPeer"));
    r.enable_peer_access =
        reinterpret_cast<enable_peer_access_fn>(cudart_symbol("cudaDeviceEnablePeerAccess"));
    r.memcpy_peer_async =
        reinterpret_cast<memcpy_peer_async_fn>(cudart_symbol("cudaMemcpyPeerAsync"));
    return r;
  }();
  TORCH_CHECK(rt.host_register && rt.host_unregister && rt.error_string && rt.last_error &&
                  rt.can_access_peer && rt.enable_peer_access && rt.memcpy_peer_async,
              "the CUDA runtime (libcudart) is not loaded: cudaHostRegister is unavailable");
  return rt;
}

void check_cudart(int code, const char* what) {
  if (code == 0) return;
  const Cudart& rt = cudart();
  // Clear the runtime's last-error slot so a later libtorch check does not report this failure.
  rt.last_error();
  TORCH_CHECK(false, what, " failed: ", rt.error_string(code), " (cudaError ", code, ")");
}


// Faults in every page of [p, p + bytes) from up to `threads` threads (writing a zero to each
// page): the kernel zeroes pages on first touch, which is the bulk of the cost of a large
// allocation, and it scales with threads.
void touch_pages(void* p, size_t bytes, int threads) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t n = static_cast<size_t>(std::max(1, threads));
  const size_t pages = (bytes + page - 1) / page;
  auto touch = [&](size_t first, size_t last) {
    volatile char* base = static_cast<char*>(p);
    for (size_t i = first; i < last; ++i) base[i * page] = 0;
  };
  if (n == 1 || pages < 1024) {
    touch(0, pages);
    return;
  }
  std::vector<std::thread> workers;
  const size_t per = (pages + n - 1) / n;
  for (size_t t = 0; t < n; ++t) {
    size_t first = t * per, last = std::min(pages, first + per);
    if (first < last) workers.emplace_back(touch, first, last);
  }
  for (auto& w : workers) w.join();
}

}  // namespace

extern "C" {

const char* lo_last_error(void) { return lo::last_error(); }

int lo_cuda_backend(int* state, const char** detail) {
  LO_PROTECT({
    const CudaBackend& b = cuda_backend();
    *state = b.state;
    *detail = b.detail.c_str();  // lives as long as the process
  })
}

int lo_cuda_device_count(int* out, char* warning, size_t warning_cap) {
  LO_PROTECT({
    *out = 0;
    if (warning_cap > 0) warning[0] = '\0';
    if (!cuda_registered()) return 0;
    // With CUDA libraries but no usable driver the backend reports 0 devices and warns once;
    // the warning is the caller's to report, so it is caught here and handed back.
    struct Catch : c10::WarningHandler {
      std::string message;
      void process(const c10::Warning& w) override {
        if (message.empty()) message = w.msg();
      }
    } caught;
    {
      c10::WarningUtils::WarningHandlerGuard guard(&caught);
      *out = static_cast<int>(cuda_impl().deviceCount());
    }
    // The runtime loads the driver library while it counts devices; when it is not loaded now,
    // there is none (libtorch reports that case as zero devices, without a word).
    if (*out == 0 && caught.message.empty() &&
        dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD) == nullptr)
      caught.message = "no NVIDIA driver was found (libcuda.so.1 is not installed)";
    if (warning_cap > 0 && !caught.message.empty()) {
      size_t n = std::min(warning_cap - 1, caught.message.size());
      std::memcpy(warning, caught.message.data(), n);
      warning[n] = '\0';
    }
  })
}

int lo_cuda_init(void) {
  LO_PROTECT({
    cuda_impl();  // fails cleanly when CUDA is not registered
    // libtorch initializes CUDA lazily, on the first CUDA tensor or generator. Until then
    // Context::isPinnedPtr answers false for every pointer (a pinned buffer reads as pageable)
    // and the caching allocator has no per-device state (getDeviceStats and resetPeakStats
    // throw "Invalid device argument"). This is the call libtorch itself makes at those first
    // uses (CUDAHooks::init through the accelerator hooks), so no CUDA header is needed.
    at::globalContext().lazyInitDevice(kCuda);
  })
}

int lo_synchronize_device(int device) {
  LO_PROTECT(cuda_impl().synchronizeDevice(static_cast<c10::DeviceIndex>(device)))
}

int lo_stream_from_pool(int device, int high_priority, lo_stream* out) {
  LO_PROTECT(*out = pack(cuda_impl().getStreamFromGlobalPool(cuda_device(device), high_priority != 0)))
}

int lo_stream_current(int device, lo_stream* out) {
  LO_PROTECT(*out = pack(cuda_impl().getStream(cuda_device(device))))
}

int lo_stream_exchange(lo_stream stream, lo_stream* previous) {
  LO_PROTECT(*previous = pack(cuda_impl().exchangeStream(unpack(stream))))
}

int lo_stream_synchronize(lo_stream stream) { LO_PROTECT(unpack(stream).synchronize()) }

int lo_stream_query(lo_stream stream, int* done) { LO_PROTECT(*done = unpack(stream).query() ? 1 : 0) }

int lo_stream_native(lo_stream stream, void** out) { LO_PROTECT(*out = unpack(stream).native_handle()) }

int lo_event_new(int enable_timing, void** out) {
  LO_PROTECT({
    cuda_impl();  // fails cleanly when CUDA is not registered
    auto flag = enable_timing ? c10::EventFlag::BACKEND_DEFAULT : c10::EventFlag::PYTORCH_DEFAULT;
    *out = new c10::Event(kCuda, flag);
  })
}

void lo_event_free(void* event) {
  try {
    delete static_cast<c10::Event*>(event);
  } catch (...) {
    // Destroying an event cannot be reported from a destructor; swallow rather than abort.
  }
}

int lo_event_record(void* event, lo_stream stream) {
  LO_PROTECT(static_cast<c10::Event*>(event)->record(unpack(stream)))
}

int lo_event_block(void* event, lo_stream stream) {
  LO_PROTECT(static_cast<c10::Event*>(event)->block(unpack(stream)))
}

int lo_event_query(void* event, int* done) {
  LO_PROTECT(*done = static_cast<c10::Event*>(event)->query() ? 1 : 0)
}

int lo_event_synchronize(void* event) { LO_PROTECT(static_cast<c10::Event*>(event)->synchronize()) }

int lo_event_elapsed_ms(void* start, void* end, double* out) {
  LO_PROTECT(*out = static_cast<c10::Event*>(start)->elapsedTime(*static_cast<c10::Event*>(end)))
}

int lo_copy_async(void* dst, void* src, const lo_stream* stream) {
  LO_PROTECT({
    auto& d = *static_cast<at::Tensor*>(dst);
    const auto& s = *static_cast<at::Tensor*>(src);
    if (stream != nullptr) {
      c10::StreamGuard guard(unpack(*stream));
      d.copy_(s, /*non_blocking=*/true);
    } else {
      d.copy_(s, /*non_blocking=*/true);
    }
  })
}

int lo_copy_peer_async(void* dst, void* src, lo_stream stream, int* peer) {
  LO_PROTECT({
    auto& d = *static_cast<at::Tensor*>(dst);
    const auto& s = *static_cast<at::Tensor*>(src);
    TORCH_CHECK(d.is_cuda() && s.is_cuda(), "copy_peer_async: both tensors must be CUDA tensors");
    TORCH_CHECK(d.is_contiguous() && s.is_contiguous(),
                "copy_peer_async: both tensors must be contiguous");
    TORCH_CHECK(d.nbytes() == s.nbytes(), "copy_peer_async: ", d.nbytes(), " destination bytes but ",
                s.nbytes(), " source bytes");
    const c10::Stream st = unpack(stream);
    const int dd = d.device().index(), sd = s.device().index(), on = st.device_index();
    TORCH_CHECK(on == dd || on == sd, "copy_peer_async: the stream (device ", on,
                ") must belong to the source (", sd, ") or destination (", dd, ") device");
    const Cudart& rt = cudart();
    c10::impl::VirtualGuardImpl impl(kCuda);
    const c10::Device prev = impl.exchangeDevice(st.device());
    struct Restore {
      c10::impl::VirtualGuardImpl& impl;
      c10::Device prev;
      ~Restore() { impl.uncheckedSetDevice(prev); }
    } restore{impl, prev};
    *peer = 0;
    if (dd != sd) {
      // Direct access from the stream's device to the other one, enabled once per pair (the
      // runtime refuses a second enable with cudaErrorPeerAccessAlreadyEnabled, 704, which also
      // covers pairs libtorch enabled).
      static std::mutex mu;
      static std::vector<std::pair<int, int>> enabled;
      const int other = on == dd ? sd : dd;
      std::lock_guard<std::mutex> lock(mu);
      if (std::find(enabled.begin(), enabled.end(), std::make_pair(on, other)) != enabled.end()) {
        *peer = 1;
      } else {
        int can = 0;
        check_cudart(rt.can_access_peer(&can, on, other), "cudaDeviceCanAccessPeer");
        if (can) {
          const int code = rt.enable_peer_access(other, 0);
          if (code != 0 && code != 704) check_cudart(code, "cudaDeviceEnablePeerAccess");
          if (code == 704) rt.last_error();
          enabled.emplace_back(on, other);
          *peer = 1;
        }
      }
    } else {
      *peer = 1;
    }
    check_cudart(rt.memcpy_peer_async(d.data_ptr(), dd, s.data_ptr(), sd, s.nbytes(),
                                      st.native_handle()),
                 "cudaMemcpyPeerAsync");
  })
}

int lo_record_stream(void* tensor, lo_stream stream) {
  LO_PROTECT(static_cast<at::Tensor*>(tensor)->record_stream(unpack(stream)))
}

int lo_tensor_is_pinned(void* tensor, int* out) {
  LO_PROTECT({
    ensure_cuda_backend();
    *out = static_cast<at::Tensor*>(tensor)->is_pinned() ? 1 : 0;
  })
}

int lo_tensor_impl(void* tensor, void** out) {
  LO_PROTECT(*out = static_cast<at::Tensor*>(tensor)->unsafeGetTensorImpl())
}

int lo_host_alloc(size_t bytes, int threads, void** out) {
  LO_PROTECT({
    TORCH_CHECK(bytes > 0, "cannot allocate 0 bytes of host memory");
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "could not map ", bytes, " bytes of host memory: ",
                std::strerror(errno));
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE);  // a hint: fewer page faults and faster registration
#endif
    touch_pages(p, bytes, threads);
    *out = p;
  })
}

int lo_host_map_fd(int fd, size_t bytes, int writable, int threads, void** out) {
  LO_PROTECT({
    // The caller opened `fd` (and checked who owns the file), reserved its space when it
    // created it (posix_fallocate, so that a full file system is an error there and not a
    // SIGBUS here), and closes it: the mapping stays valid without the descriptor.
    TORCH_CHECK(bytes > 0, "cannot map 0 bytes");
    const int prot = writable ? PROT_READ | PROT_WRITE : PROT_READ;
    void* p = mmap(nullptr, bytes, prot, MAP_SHARED, fd, 0);
    TORCH_CHECK(p != MAP_FAILED, "could not map ", bytes, " bytes of a shared-memory file: ",
                std::strerror(errno));
    if (writable) touch_pages(p, bytes, threads);  // fault the reserved pages in now
    *out = p;
  })
}

int lo_host_free(void* ptr, size_t bytes) {
  LO_PROTECT(TORCH_CHECK(munmap(ptr, bytes) == 0, "munmap failed: ", std::strerror(errno)))
}

int lo_host_register(void* ptr, size_t bytes, unsigned int flags) {
  LO_PROTECT({
    check_cudart(cudart().host_register(ptr, bytes, flags), "cudaHostRegister");
  })
}

int lo_host_tensor(void* ptr, size_t bytes, int registered, void** out) {
  LO_PROTECT({
    auto deleter = [bytes, registered](void* p) {
      // A deleter must not throw; failures here can only be ignored.
      if (registered) {
        try {
          cudart().host_unregister(p);
          cudart().last_error();
        } catch (...) {
        }
      }
      munmap(p, bytes);
    };
    auto options = at::TensorOptions().dtype(at::kByte).device(at::kCPU);
    *out = new at::Tensor(at::from_blob(ptr, {static_cast<int64_t>(bytes)}, deleter, options));
  })
}

int lo_memory_stats(int device, lo_mem_stats* out) {
  LO_PROTECT({
    cuda_impl();
    auto stats = at::getDeviceAllocator(kCuda)->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    constexpr auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out->allocated_current = stats.allocated_bytes[agg].current;
    out->allocated_peak = stats.allocated_bytes[agg].peak;
    out->reserved_current = stats.reserved_bytes[agg].current;
    out->reserved_peak = stats.reserved_bytes[agg].peak;
    out->num_ooms = stats.num_ooms;
  })
}

int lo_reset_peak_stats(int device) {
  LO_PROTECT({
    cuda_impl();
    at::getDeviceAllocator(kCuda)->resetPeakStats(static_cast<c10::DeviceIndex>(device));
  })
}

int lo_memory_info(int device, size_t* free_bytes, size_t* total_bytes) {
  LO_PROTECT({
    cuda_impl();
    auto info = at::getDeviceAllocator(kCuda)->getMemoryInfo(static_cast<c10::DeviceIndex>(device));
    *free_bytes = info.first;
    *total_bytes = info.second;
  })
}

int lo_empty_cache(void) {
  LO_PROTECT({
    cuda_impl();
    at::getDeviceAllocator(kCuda)->emptyCache();
  })
}

int lo_allocator_initialized(int* out) {
  LO_PROTECT({
    cuda_impl();
    *out = at::getDeviceAllocator(kCuda)->initialized() ? 1 : 0;
  })
}

int lo_set_memory_fraction(double fraction) {
  LO_PROTECT({
    cuda_impl();
    TORCH_CHECK(fraction > 0.0 && fraction <= 1.0, "memory fraction must be in (0, 1], got ", fraction);
    // The CUDA caching allocator reads this setting when it starts (one per-device allocator
    // each, at the first CUDA allocation of the process); it cannot change afterwards.
    TORCH_CHECK(!at::getDeviceAllocator(kCuda)->initialized(),
                "the CUDA allocator has already started in this process; set the memory fraction "
                "before the first CUDA allocation");
    c10::CachingAllocator::setAllocatorSettings("per_process_memory_fraction:" +
                                                std::to_string(fraction));
  })
}

}  // extern "C"
