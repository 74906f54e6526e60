//! The bits the decode kernel sets in its status word when it refuses part of an encoding.
//!
//! The kernel never reads or writes out of bounds; what it refuses it skips (its output there
//! is left as it was) and reports here. [`GpuDecoder::synchronize_and_check`] reads and clears
//! the word. The kernels' `STATUS_*` macros are generated from these constants.
//!
//! [`GpuDecoder::synchronize_and_check`]: super::GpuDecoder::synchronize_and_check

/// The header is invalid or disagrees with `encoded_len`/`out_len`: nothing was decoded.
pub const HEADER: u32 = 1;
/// A chunk's directory entry is invalid or its size disagrees with the offsets: the chunk was
/// skipped.
pub const CHUNK: u32 = 2;
/// A chunk's escape codes and stored exception count differ. The current kernel counts the
/// escape codes before it writes anything of the chunk, and skips it; the baseline kernel finds
/// out while decoding, so part of the chunk may have been written.
pub const EXCEPTIONS: u32 = 4;

/// The names of the bits set in `bits`.
pub fn describe(bits: u32) -> String {
    let names: Vec<&str> = [
        (HEADER, "header"),
        (CHUNK, "chunk"),
        (EXCEPTIONS, "exceptions"),
    ]
    .into_iter()
    .filter(|(b, _)| bits & b != 0)
    .map(|(_, n)| n)
    .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}
