//! The decode kernels' CUDA C source, compiled at run time by NVRTC.
//!
//! The source lives in `kernels/`: `prelude.cuh` (types and helpers both kernels use),
//! `decode.cu` ([`SOURCE`]) and `decode_baseline.cu` ([`BASELINE_SOURCE`]), embedded with
//! `include_str!`. Each kernel's source is [`constants`] (the `#define`s of every constant it
//! shares with Rust: the format's, the [`status`](super::status) bits, [`THREADS`]), then the
//! prelude, then the kernel: each of those constants is defined once, in Rust.
//!
//! [`SOURCE`], the kernel [`GpuDecoder`](super::GpuDecoder) runs by default: one thread block of
//! 256 threads (8 warps) decodes one chunk at a time (grid-stride over chunks). Each warp takes a
//! contiguous eighth of the chunk in windows of 256 values (8 groups of 32); in a window, thread
//! t of a warp decodes the 8 consecutive values 8t..8t+7 with the K plane words of their group
//! and one 8-byte load of their sign/mantissa bytes, and writes them with one 16-byte store, so
//! a warp's loads and stores are contiguous.
//!
//! - Code widths are template parameters (a `switch` on k picks `decode_coded<K, U>`), so every
//!   loop over code bits is unrolled. For k <= 3 (every chunk of realistic weights) a thread
//!   gathers its byte of each plane word into one u32, turns that 3x8 bit matrix into eight
//!   4-bit codes with two bit-index swaps, and looks all 8 exponents up in registers with
//!   `prmt` (byte permute: the table is 8 bytes); for k >= 4 an 8x8 bit transpose gives one
//!   code per byte and the table is in shared memory.
//! - Escapes: before decoding, each warp counts the escapes in its part of the chunk (the AND of
//!   a group's k plane words flags its escaped values), and one barrier per chunk gives every
//!   warp its first exception index (and checks the chunk's count before anything is
//!   written). Within the warp a running index advances by one shuffle scan over the 8 groups
//!   per U windows (the counts of U windows packed in 16-bit fields); a thread finds the
//!   exponents of its escaped values (most threads have none) with a loop over their bits. A
//!   chunk's exceptions (up to 4096 bytes: all of them for 32 Ki-value chunks of weights) are
//!   copied into shared memory while the warps count, so that those loops wait on no DRAM load.
//! - Two-tier chunks (k1 <= 4 first-tier bits, k2 second-tier bits, a runtime value) are
//!   `decode_coded<K, U, true>`; one-tier chunks keep `decode_coded<K, U, false>`, the path
//!   of format version 2. The first-tier escape index that the count and scan above give each
//!   escaped value is also the index of its second-tier code in the chunk's bitstream. After
//!   the first barrier each warp counts the second-tier escapes among its run of first-tier
//!   escape indices (a contiguous run of codes, read by the lanes in parallel), and a second
//!   barrier gives every warp its first exception index. Per U windows a thread reads the
//!   second-tier codes of its escaped values (at most 8 x 5 bits, from three 32-bit words),
//!   counts their escapes, and a second shuffle scan (over all 32 lanes) gives it its exception
//!   index; the patch loop then takes each escaped value's exponent from the second-tier table
//!   (shared memory) or the exceptions. The second-tier codes and the exceptions, two
//!   contiguous sections, are staged in shared memory together when they fit (4096 bytes:
//!   about 3.5 KiB for a 32 Ki-value chunk of N(0, 0.02) weights with (k1, k2) = (2, 3)).
//! - Latency: a warp loads the next U windows while it decodes the current ones, its first ones
//!   before the count; a block loads its next chunk's directory entry one chunk ahead;
//!   sign/mantissa bytes are read once, with streaming loads (`ld.global.cs`). Registers are
//!   capped at 64 (`__launch_bounds__(256, 4)`) for 4 resident blocks (32 warps) per SM.
//!
//! [`BASELINE_SOURCE`] is the first kernel, kept to measure against ([`Kernel::Baseline`]): per
//! step of 8192 values each thread decodes 4 runs of 8 values with a runtime k, then one
//! block-wide scan of packed escape counts gives each thread its exception index. It decodes
//! one-tier chunks only and refuses two-tier ones (`STATUS_CHUNK`).
//!
//! Both kernels read the header and the directory from device memory and check them (and each
//! chunk's sizes) against `enc_len` and `out_len` before touching anything they point at, so a
//! corrupt buffer never makes them read or write out of bounds: they skip what they refuse and
//! set bits of the status word ([`super::status`]).
//!
//! [`Kernel::Baseline`]: super::Kernel::Baseline

use std::sync::LazyLock;

/// Name of the kernel function (both sources).
pub(crate) const KERNEL_NAME: &str = "lwbc_decode";
/// Threads per block (both kernels' `THREADS`).
pub(crate) const THREADS: u32 = 256;

/// Types and helpers both kernels use.
const PRELUDE: &str = include_str!("kernels/prelude.cuh");
/// The current kernel, after the prelude.
const CURRENT: &str = include_str!("kernels/decode.cu");
/// The baseline kernel, after the prelude.
const BASELINE: &str = include_str!("kernels/decode_baseline.cu");

/// The `#define`s of the constants the kernels share with Rust, generated from the Rust
/// constants: the format's header and directory layout, magic, version and chunk sizes, the
/// status bits, and the threads per block.
pub(crate) fn constants() -> String {
    use super::status;
    use crate::format::{
        ENTRY_LEN, HEADER_LEN, MAGIC, MAX_CHUNK_VALUES, MIN_CHUNK_VALUES, VERSION,
    };
    format!(
        "/* Generated from the Rust constants (codec/src/gpu/kernel.rs, crate::format, gpu::status). */
#define HEADER_BYTES {HEADER_LEN}
#define ENTRY_BYTES {ENTRY_LEN}
#define FORMAT_MAGIC 0x{magic:08X}u
#define FORMAT_VERSION {VERSION}u
#define MIN_CHUNK_VALUES {MIN_CHUNK_VALUES}u
#define MAX_CHUNK_VALUES {MAX_CHUNK_VALUES}u
#define STATUS_HEADER {header}u
#define STATUS_CHUNK {chunk}u
#define STATUS_EXCEPTIONS {exceptions}u
#define THREADS {THREADS}
",
        magic = u32::from_le_bytes(MAGIC),
        header = status::HEADER,
        chunk = status::CHUNK,
        exceptions = status::EXCEPTIONS,
    )
}

/// `kernel`'s full source: the generated constants, the prelude, the kernel.
fn assemble(kernel: &str) -> String {
    format!("{}\n{PRELUDE}\n{kernel}", constants())
}

/// The current kernel's CUDA C source. No includes: NVRTC needs no CUDA headers for it. Its
/// tuning macros (`UNROLL`, `UNROLL_WIDE`, `MIN_BLOCKS`, `EXC_SHARED`) may be defined before it.
pub(crate) static SOURCE: LazyLock<String> = LazyLock::new(|| assemble(CURRENT));

/// The first kernel's CUDA C source (runtime k, a block-wide scan per 8192 values).
pub(crate) static BASELINE_SOURCE: LazyLock<String> = LazyLock::new(|| assemble(BASELINE));

#[cfg(test)]
mod tests {
    use super::*;

    /// The generated names, each defined in Rust only: no kernel file defines one itself.
    const GENERATED: [&str; 10] = [
        "HEADER_BYTES",
        "ENTRY_BYTES",
        "FORMAT_MAGIC",
        "FORMAT_VERSION",
        "MIN_CHUNK_VALUES",
        "MAX_CHUNK_VALUES",
        "STATUS_HEADER",
        "STATUS_CHUNK",
        "STATUS_EXCEPTIONS",
        "THREADS",
    ];

    #[test]
    fn shared_constants_are_defined_once_from_rust() {
        let defines = constants();
        for name in GENERATED {
            assert_eq!(
                defines.matches(&format!("#define {name} ")).count(),
                1,
                "{name}:\n{defines}"
            );
            for (file, text) in [
                ("prelude.cuh", PRELUDE),
                ("decode.cu", CURRENT),
                ("decode_baseline.cu", BASELINE),
            ] {
                assert!(
                    !text.contains(&format!("#define {name} ")),
                    "{file} defines {name}, which Rust generates"
                );
            }
        }
        assert!(
            defines.contains("#define FORMAT_MAGIC 0x4342574Cu\n"),
            "{defines}"
        );
        assert!(defines.contains(&format!("#define THREADS {THREADS}\n")));
        assert!(defines.contains(&format!(
            "#define STATUS_EXCEPTIONS {}u\n",
            super::super::status::EXCEPTIONS
        )));
    }

    #[test]
    fn each_source_is_the_constants_the_prelude_and_its_kernel() {
        for (source, kernel) in [(&*SOURCE, CURRENT), (&*BASELINE_SOURCE, BASELINE)] {
            let c = source.find("#define HEADER_BYTES").unwrap();
            let p = source.find("typedef unsigned char u8;").unwrap();
            let k = source.find("lwbc_decode(").unwrap();
            assert!(c < p && p < k);
            assert!(source.ends_with(kernel));
            assert_eq!(source.matches("typedef unsigned char u8;").count(), 1);
            // No includes: NVRTC compiles it without CUDA headers.
            assert!(!source.contains("#include"));
        }
        assert!(SOURCE.contains("__launch_bounds__(THREADS, MIN_BLOCKS)"));
        assert!(BASELINE_SOURCE.contains("ROUNDS"));
    }
}
