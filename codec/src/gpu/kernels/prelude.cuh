/* The prelude of both decode kernels: types and helpers they share.
 *
 * Before it, the crate puts the #defines of the constants it shares with Rust, generated from
 * the Rust constants (codec/src/gpu/kernel.rs, `constants`): the format's (HEADER_BYTES,
 * ENTRY_BYTES, FORMAT_MAGIC, FORMAT_VERSION, MIN_CHUNK_VALUES, MAX_CHUNK_VALUES), the status
 * bits (STATUS_HEADER, STATUS_CHUNK, STATUS_EXCEPTIONS) and the threads per block (THREADS).
 * No includes: NVRTC needs no CUDA headers for the kernels. */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

struct alignas(16) v16 { u32 a, b, c, d; };

__device__ __forceinline__ u32 ld32(const u8* p) { return *(const u32*)p; }
__device__ __forceinline__ u64 ld64(const u8* p) { return *(const u64*)p; }
__device__ __forceinline__ u64 pad16(u64 x) { return (x + 15ull) & ~15ull; }
__device__ __forceinline__ u32 min32(u32 a, u32 b) { return a < b ? a : b; }
__device__ __forceinline__ u64 min64(u64 a, u64 b) { return a < b ? a : b; }
__device__ __forceinline__ void raise_status(u32* status, u32 bit) { if (status) atomicOr(status, bit); }
