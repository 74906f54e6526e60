//! The crate's one error type.

/// What went wrong while encoding options were checked, an encoding was parsed or decoded, or the
/// GPU decoder was set up or run.
///
/// Parsing never panics and never reads out of bounds: a truncated or corrupt encoding is one of
/// [`Truncated`](CodecError::Truncated), [`BadMagic`](CodecError::BadMagic),
/// [`UnsupportedVersion`](CodecError::UnsupportedVersion),
/// [`CorruptHeader`](CodecError::CorruptHeader), [`CorruptChunk`](CodecError::CorruptChunk) or,
/// for bytes that changed but still parse, [`Checksum`](CodecError::Checksum).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The buffer ends before a part that the header or directory says is there.
    #[error("encoding truncated: {what} needs {needed} bytes, the buffer has {len}")]
    Truncated {
        /// The part that does not fit.
        what: &'static str,
        /// Bytes the part needs (from the start of the buffer).
        needed: u64,
        /// Bytes the buffer has.
        len: usize,
    },
    /// The first four bytes are not the format's magic.
    #[error("not a bf16 codec encoding: magic {found:02x?}, expected {expected:02x?}")]
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
        /// The format's magic.
        expected: [u8; 4],
    },
    /// A format version this build cannot read (version 1, before checksums, among them).
    #[error(
        "encoding has format version {found}, this build reads version {supported}: encode the data again with this build"
    )]
    UnsupportedVersion {
        /// The version in the header.
        found: u16,
        /// The version this build writes and reads.
        supported: u16,
    },
    /// A header field is out of range or inconsistent with the others or with the buffer.
    #[error("corrupt header: {field} is {value} ({reason})")]
    CorruptHeader {
        /// The header field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A chunk's directory entry or its data is inconsistent.
    #[error("corrupt chunk {chunk}: {reason}")]
    CorruptChunk {
        /// The chunk's index in the directory.
        chunk: u64,
        /// What is inconsistent.
        reason: String,
    },
    /// The bytes changed after the encoding was written: the checksum in its header is not the
    /// checksum of its bytes.
    #[error(
        "encoding corrupt: checksum {computed:#010x} of its bytes, {stored:#010x} stored in its header (the bytes changed after they were encoded)"
    )]
    Checksum {
        /// The checksum stored in the header.
        stored: u32,
        /// The checksum of the bytes as they are.
        computed: u32,
    },
    /// The output buffer is not the decoded length.
    #[error("output buffer has {got} bytes, the encoding decodes to {expected}")]
    OutputLength {
        /// The decoded length.
        expected: u64,
        /// The output buffer's length.
        got: u64,
    },
    /// An encoder or GPU decoder option is out of range.
    #[error("invalid option {option} = {value}: {reason}")]
    InvalidOption {
        /// The option.
        option: &'static str,
        /// Its value, as written.
        value: String,
        /// What range is accepted.
        reason: &'static str,
    },
    /// A shared library could not be loaded from any place searched.
    #[cfg(feature = "gpu")]
    #[error("could not load {library}; searched: {}", searched.join(", "))]
    LibraryNotFound {
        /// The library (e.g. `libnvrtc`).
        library: &'static str,
        /// Every name or path tried, with the loader's answer.
        searched: Vec<String>,
    },
    /// A library loaded but lacks a function this crate needs.
    #[cfg(feature = "gpu")]
    #[error("{library} has no symbol {symbol}")]
    MissingSymbol {
        /// The library.
        library: &'static str,
        /// The symbol.
        symbol: &'static str,
    },
    /// A CUDA driver call failed.
    #[cfg(feature = "gpu")]
    #[error("{call} failed: {name} ({code}): {message}")]
    Cuda {
        /// The driver function.
        call: &'static str,
        /// Its `CUresult`.
        code: i32,
        /// The result's name (`CUDA_ERROR_…`).
        name: String,
        /// The driver's description.
        message: String,
    },
    /// An NVRTC call failed.
    #[cfg(feature = "gpu")]
    #[error("{call} failed: {message} ({code})")]
    Nvrtc {
        /// The NVRTC function.
        call: &'static str,
        /// Its `nvrtcResult`.
        code: i32,
        /// NVRTC's description.
        message: String,
    },
    /// NVRTC could not compile the decode kernel for the device.
    #[cfg(feature = "gpu")]
    #[error("NVRTC could not compile the decode kernel for {arch}:\n{log}")]
    Compile {
        /// The target architecture (`sm_90`).
        arch: String,
        /// NVRTC's log.
        log: String,
    },
    /// A device pointer handed to the GPU decoder is not aligned as it must be.
    #[cfg(feature = "gpu")]
    #[error("{what} device pointer {addr:#x} is not {align}-byte aligned")]
    Misaligned {
        /// Which pointer.
        what: &'static str,
        /// Its address.
        addr: u64,
        /// The alignment it needs.
        align: u64,
    },
    /// The decode kernel found an encoding it refused (see [`gpu::status`](crate::gpu::status)).
    #[cfg(feature = "gpu")]
    #[error("the GPU decoder refused an encoding since the last check (status bits {bits:#x}: {})", crate::gpu::status::describe(*bits))]
    DeviceDecode {
        /// The kernel's status bits.
        bits: u32,
    },
}

/// `Result` with [`CodecError`].
pub type Result<T> = std::result::Result<T, CodecError>;
