//! The crate's one error type.

use std::fmt;

/// A message libtorch (or the CUDA runtime under it) gave for a failed call, kept as the
/// `source` of an [`Error`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TorchMessage(pub String);

impl fmt::Display for TorchMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TorchMessage {}

/// Everything that can go wrong in this crate. Each variant says what to change.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The operation needs a CUDA device and none is usable in this process.
    #[error("{op} needs a CUDA device, but {reason}; run it on a machine with a CUDA GPU, or use the CPU test mode")]
    NoDevice {
        /// What was attempted.
        op: &'static str,
        /// Why no device is usable (not compiled with CUDA, no driver, device index too high).
        reason: String,
    },
    /// The device ran out of memory.
    #[error("out of device memory while {op} ({bytes} bytes asked): lower the VRAM budget or prefetch depth, or free memory first")]
    OutOfMemory {
        /// What was being allocated.
        op: String,
        /// How many bytes were asked for, where known (0 otherwise).
        bytes: u64,
        /// libtorch's message.
        #[source]
        source: TorchMessage,
    },
    /// Host memory could not be allocated or page-locked.
    #[error("could not allocate {bytes} bytes of {kind} host memory: {source}")]
    HostAlloc {
        /// "pinned" or "pageable".
        kind: &'static str,
        /// Size of the allocation.
        bytes: u64,
        /// The operating system's or CUDA runtime's message.
        #[source]
        source: TorchMessage,
    },
    /// The CUDA allocator has started already, so a per-process setting can no longer change.
    #[error("{op}: the CUDA allocator already started in this process; call it before the first CUDA allocation")]
    AllocatorStarted {
        /// What was attempted.
        op: &'static str,
    },
    /// An argument is out of its valid range.
    #[error("invalid argument to {op}: {message}")]
    InvalidArgument {
        /// The function that refused it.
        op: &'static str,
        /// What is wrong and what is accepted.
        message: String,
    },
    /// Any other failure inside libtorch.
    #[error("{op} failed in libtorch: {source}")]
    Torch {
        /// What was attempted.
        op: &'static str,
        /// libtorch's message.
        #[source]
        source: TorchMessage,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Builds the right variant for a libtorch failure: out-of-memory messages become
    /// [`Error::OutOfMemory`], others [`Error::Torch`].
    pub(crate) fn from_torch(op: &'static str, bytes: u64, message: String) -> Error {
        if is_oom_message(&message) {
            Error::OutOfMemory { op: op.to_owned(), bytes, source: TorchMessage(message) }
        } else {
            Error::Torch { op, source: TorchMessage(message) }
        }
    }

    /// True for [`Error::OutOfMemory`].
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, Error::OutOfMemory { .. })
    }
}

pub(crate) fn is_oom_message(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("out of memory") || m.contains("cudaerrormemoryallocation")
}

impl From<(&'static str, tch::TchError)> for Error {
    fn from((op, e): (&'static str, tch::TchError)) -> Error {
        Error::from_torch(op, 0, e.to_string())
    }
}
