//! The crate's one error type.

use std::fmt;
use std::path::{Path, PathBuf};

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
///
/// `Display` (`{}`) is this error's own message; the cause, where there is one, is its
/// [`source()`](std::error::Error::source). `Debug` (`{:?}`) is the message with every cause
/// below it, as `main` should print it.
///
/// Each cause is reported once in a chain: a variant that wraps another error (libtorch's
/// message, an I/O error, the codec's error) returns it from
/// [`source()`](std::error::Error::source) and does not repeat it in its own message. `{:?}`
/// (what `fn main() -> Result<(), Error>` prints on failure, and what `unwrap` shows) writes
/// the message followed by every cause, so the advice of a variant such as
/// [`Error::NoDevice`] survives `?` in `main`.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The operation needs a CUDA device and none is usable in this process.
    #[error(
        "{op} needs a CUDA device, but {reason}; run it on a machine with a CUDA GPU, or use the CPU test mode"
    )]
    NoDevice {
        /// What was attempted.
        op: &'static str,
        /// Why no device is usable (not compiled with CUDA, no driver, device index too high).
        reason: String,
    },
    /// The device ran out of memory.
    #[error(
        "out of device memory while {op} ({bytes} bytes asked): lower the VRAM budget or prefetch depth, or free memory first"
    )]
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
    #[error("could not allocate {bytes} bytes of {kind} host memory")]
    HostAlloc {
        /// "pinned" or "pageable".
        kind: &'static str,
        /// Size of the allocation.
        bytes: u64,
        /// The operating system's or CUDA runtime's message.
        #[source]
        source: TorchMessage,
    },
    /// A shared-memory store's file (or its manifest) cannot be used safely: a path taken by
    /// another file or a symbolic link when publishing, or, when opening, a file that another
    /// user owns or may write, a symbolic link, or a manifest that does not describe the file.
    #[error("shared host store file {}: {reason}", path.display())]
    SharedFile {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The CUDA allocator has started already, so a per-process setting can no longer change.
    #[error(
        "{op}: the CUDA allocator already started in this process; call it before the first CUDA allocation"
    )]
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
    /// `module_list_attr` matches no tensor name.
    #[error("module_list_attr {attr:?} matches no tensor name (looked for `{attr}.<index>.`); the names start with: {}", prefixes.join(", "))]
    NoMatch {
        /// The attribute asked for.
        attr: String,
        /// The prefixes that do exist (paths in front of a numeric component).
        prefixes: Vec<String>,
    },
    /// `num_blocks` is larger than the number of blocks found.
    #[error(
        "num_blocks is {asked} for {attr:?}, but the model has only {found} such blocks; pass num_blocks <= {found}"
    )]
    TooFewBlocks {
        /// The block list.
        attr: String,
        /// The `num_blocks` given.
        asked: usize,
        /// Highest index found plus one.
        found: usize,
    },
    /// Some block indices below `num_blocks` have no tensors.
    #[error(
        "blocks {missing:?} of {attr:?} have no tensors (gaps in the indices); check the names or lower num_blocks"
    )]
    MissingBlocks {
        /// The block list.
        attr: String,
        /// The indices with no tensor.
        missing: Vec<usize>,
    },
    /// A block tensor is not stored densely (a slice or an expanded view), so its bytes cannot be
    /// moved as one span.
    #[error(
        "tensor {name:?} (shape {shape:?}, strides {strides:?}) is not dense; make it contiguous (`.contiguous()`) before offloading"
    )]
    NonContiguous {
        /// The tensor.
        name: String,
        /// Its shape.
        shape: Vec<i64>,
        /// Its strides.
        strides: Vec<i64>,
    },
    /// Tensors sit on devices other than the compute device and the CPU.
    #[error(
        "tensors are on devices other than {allowed:?}: {found:?}; move the model to the CPU or to the compute device first"
    )]
    MixedDevices {
        /// Devices that are accepted.
        allowed: Vec<tch::Device>,
        /// Some tensors that are elsewhere, with their devices.
        found: Vec<(String, tch::Device)>,
    },
    /// A block-loop call came before `initialize()` (or after `restore()`).
    #[error("{op} called before initialize() (or after restore()); call initialize() first")]
    NotInitialized {
        /// The call.
        op: &'static str,
    },
    /// A block index past the last block.
    #[error(
        "{op}: block {block} is out of range (the manager has {num_blocks} blocks, indices 0..{num_blocks})"
    )]
    BlockOutOfRange {
        /// The call.
        op: &'static str,
        /// The index given.
        block: usize,
        /// Number of offloaded blocks (all lists).
        num_blocks: usize,
    },
    /// Another live manager has offloaded this tensor already (it is that manager's empty
    /// placeholder now), so this one would plan from the placeholders.
    #[error(
        "tensor {name:?} is offloaded by another manager already (the model holds its placeholder); restore() or drop that manager before offloading the model again"
    )]
    AlreadyOffloaded {
        /// The first block tensor found claimed.
        name: String,
    },
    /// A `restore()` stopped part-way (e.g. out of device memory): some blocks are back in the
    /// model, the others still in their host copies. The block loop is over; only `restore` or
    /// `restore_to` go on from here (reading and saving weights still work).
    #[error(
        "{op}: restore() stopped part-way ({restored} of {num_blocks} blocks are back in the model); call restore() again (after freeing device memory) or restore_to(Device::Cpu) to finish"
    )]
    PartlyRestored {
        /// The call.
        op: &'static str,
        /// Blocks back in the model.
        restored: usize,
        /// Number of offloaded blocks (all lists).
        num_blocks: usize,
    },
    /// A manager of a [`PeerGroup`](crate::PeerGroup) could not complete an upload with the other
    /// members (they diverged, one failed or left, or one did not arrive in time). The group
    /// stays unusable; the weights are safe in the host copies, so `restore` every member.
    #[error(
        "peer group member {rank}: {message}; every member must enter the same blocks in the same order (same model, configuration and loop): restore the managers and build a new group"
    )]
    PeerGroup {
        /// The rank of the member that reports it.
        rank: usize,
        /// What happened.
        message: String,
    },
    /// Every GPU slot holds a block that is in use.
    #[error(
        "no free GPU slot for block {block}: blocks {in_use:?} are still entered; release one (drop its guard or call after_block) first, or raise prefetch_depth"
    )]
    NoFreeSlot {
        /// The block that needed a slot.
        block: usize,
        /// Blocks currently entered.
        in_use: Vec<usize>,
    },
    /// The block is entered, so its weights cannot change now.
    #[error("{op}: block {block} is entered; release it first")]
    BlockInUse {
        /// The call.
        op: &'static str,
        /// The block.
        block: usize,
    },
    /// No tensor of that name is managed.
    #[error("no tensor named {name:?} in the model")]
    UnknownTensor {
        /// The name asked for.
        name: String,
    },
    /// A replacement tensor does not match the tensor it replaces.
    #[error(
        "tensor {name:?} is {expected}, the replacement is {got}; pass a tensor of the same shape and dtype"
    )]
    Mismatch {
        /// The tensor.
        name: String,
        /// Shape and dtype it has.
        expected: String,
        /// Shape and dtype given.
        got: String,
    },
    /// A TorchScript module has no method of that name.
    #[error("the TorchScript module has no method {name:?}; its methods are: {}", methods.join(", "))]
    UnknownMethod {
        /// The name asked for.
        name: String,
        /// The methods the module does have.
        methods: Vec<String>,
    },
    /// A call by name passed an argument the TorchScript method does not take.
    #[error("{method}() has no argument {name:?}; its arguments are ({}): pass those names (traced modules name and order them as the trace saw them)", expected.join(", "))]
    UnknownArgument {
        /// The method.
        method: String,
        /// The name given.
        name: String,
        /// The method's arguments, `name: Type` in schema order.
        expected: Vec<String>,
    },
    /// A call by name left out an argument that has no default.
    #[error("{method}() needs argument {name:?}, which has no default; its arguments are ({})", expected.join(", "))]
    MissingArgument {
        /// The method.
        method: String,
        /// The argument left out.
        name: String,
        /// The method's arguments, `name: Type` in schema order.
        expected: Vec<String>,
    },
    /// A checkpoint file or shard index cannot be used: malformed, truncated, or inconsistent
    /// with its index. A file that cannot be opened or read at all is [`Error::Io`].
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file or directory.
        path: std::path::PathBuf,
        /// What is wrong and what to change.
        reason: String,
    },
    /// An encoded cache file ([`OffloadConfig::encoded_cache`](crate::OffloadConfig::encoded_cache))
    /// cannot be used: made from another checkpoint or another version of it (stale), for
    /// other blocks, by another format version, or its bytes changed (a checksum). The reason
    /// says what differs; deleting the file has it written again.
    #[error("encoded cache {path}: {reason}")]
    EncodedCache {
        /// The cache file.
        path: std::path::PathBuf,
        /// What is wrong and what to change.
        reason: String,
    },
    /// The model's tensors and a checkpoint's do not match: every difference, by tensor name.
    #[error("{0}")]
    CheckpointMismatch(Box<crate::checkpoint::CheckpointMismatch>),
    /// Compressed transport failed: the GPU decoder could not be built (NVRTC or the CUDA
    /// driver library not found, a compile error) or the codec refused a buffer.
    #[error("compressed transport, {op}")]
    Codec {
        /// What was attempted.
        op: &'static str,
        /// The codec's error.
        #[source]
        source: layerwise_offload_codec::CodecError,
    },
    /// A file could not be opened, examined, read, mapped or written (a checkpoint, a shard
    /// index, a shared host store's file). The operating system's error is the
    /// [`source()`](std::error::Error::source): its [`kind()`](std::io::Error::kind) tells a
    /// missing file (`NotFound`) from a refused one (`PermissionDenied`).
    #[error("{}: {op}", path.display())]
    Io {
        /// What could not be done, and what may be wrong: "cannot open", "cannot read
        /// \"blocks.0.w\" (4096 bytes at 80); was the file changed or truncated after it was
        /// opened?".
        op: String,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Any other failure inside libtorch.
    #[error("{op} failed in libtorch")]
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
            Error::OutOfMemory {
                op: op.to_owned(),
                bytes,
                source: TorchMessage(message),
            }
        } else {
            Error::Torch {
                op,
                source: TorchMessage(message),
            }
        }
    }

    /// True for [`Error::OutOfMemory`].
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, Error::OutOfMemory { .. })
    }

    /// [`Error::Io`]: `op` (e.g. "cannot open") failed on `path`.
    pub(crate) fn io(op: impl Into<String>, path: &Path, source: std::io::Error) -> Error {
        Error::Io {
            op: op.into(),
            path: path.to_owned(),
            source,
        }
    }
}

/// The message, then every cause below it (the `source()` chain), one per line. This is what
/// `fn main() -> Result<(), Error>` prints when it fails, and what `unwrap()` shows.
impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_chain(self, f)
    }
}

/// Writes `error`'s message and, below it, each error of its `source()` chain.
fn write_chain(error: &dyn std::error::Error, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    write!(f, "{error}")?;
    let causes: Vec<&dyn std::error::Error> =
        std::iter::successors(error.source(), |e| e.source()).collect();
    match causes.as_slice() {
        [] => Ok(()),
        [one] => write!(f, "\n\nCaused by:\n    {one}"),
        many => {
            write!(f, "\n\nCaused by:")?;
            for (i, cause) in many.iter().enumerate() {
                write!(f, "\n    {i}: {cause}")?;
            }
            Ok(())
        }
    }
}

/// `error`'s message and its causes on one line, joined by ": " (for messages that carry
/// another error as text, such as a peer group's reason for breaking).
pub(crate) fn chain_text(error: &dyn std::error::Error) -> String {
    std::iter::successors(Some(error), |&e| e.source())
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

/// Names the operation on a failed tch call: `f_copy_(&src).context("upload")?` instead of
/// `.map_err(|e| Error::from(("upload", e)))?`. Out-of-memory messages become
/// [`Error::OutOfMemory`], the rest [`Error::Torch`], libtorch's message their source.
pub(crate) trait Context<T> {
    /// This result, its error turned into this crate's [`Error`] for operation `op`.
    fn context(self, op: &'static str) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, tch::TchError> {
    fn context(self, op: &'static str) -> Result<T> {
        self.map_err(|e| Error::from((op, e)))
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

/// So that `?` works on tch's `f_*` calls and `IValue` conversions (`Tensor::try_from(iv)?`)
/// inside functions that return this crate's [`Result`]. Out-of-memory messages become
/// [`Error::OutOfMemory`], the rest [`Error::Torch`] with op `"tch"`.
impl From<tch::TchError> for Error {
    fn from(e: tch::TchError) -> Error {
        Error::from_torch("tch", 0, e.to_string())
    }
}
