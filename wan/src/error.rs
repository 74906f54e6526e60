//! The crate's error type.

use crate::config::ConfigError;
use crate::scheduler::SchedulerError;
use crate::vae::VaeConfigError;
use std::path::PathBuf;

/// A tensor whose shape in the checkpoint differs from the model's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeMismatch {
    /// The parameter's name (diffusers' `state_dict` key).
    pub name: String,
    /// Its shape in the checkpoint.
    pub file: Vec<i64>,
    /// Its shape in the model.
    pub model: Vec<i64>,
}

/// A tensor stored in an element type the loader refuses (only F32, BF16 and F16 are taken:
/// other types would be converted silently into values the model was never trained with).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DtypeMismatch {
    /// The parameter's name.
    pub name: String,
    /// The element type, spelled as tch's `Kind` (`Int64`, `Bool`, `Double`, ...), or the
    /// safetensors name where tch has none.
    pub dtype: String,
}

/// What the checkpoint lacks, has in excess, or has in another shape or type than the model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mismatch {
    /// Parameters of the model absent from the checkpoint.
    pub missing: Vec<String>,
    /// Tensors of the checkpoint the model has no parameter for.
    pub unexpected: Vec<String>,
    /// Tensors of another shape than the model's parameter.
    pub shapes: Vec<ShapeMismatch>,
    /// Tensors of a refused element type.
    pub dtypes: Vec<DtypeMismatch>,
}

impl Mismatch {
    /// True when the checkpoint matches the model.
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty()
            && self.unexpected.is_empty()
            && self.shapes.is_empty()
            && self.dtypes.is_empty()
    }
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: Vec<String>| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.join(", ")
            }
        };
        write!(
            f,
            "  missing: {}\n  unexpected: {}\n  shape mismatches: {}\n  dtypes refused (F32, BF16 and F16 are taken): {}",
            list(self.missing.clone()),
            list(self.unexpected.clone()),
            list(
                self.shapes
                    .iter()
                    .map(|s| format!("{}: file {:?}, model {:?}", s.name, s.file, s.model))
                    .collect()
            ),
            list(
                self.dtypes
                    .iter()
                    .map(|d| format!("{} is {}", d.name, d.dtype))
                    .collect()
            ),
        )
    }
}

/// Errors of this crate.
#[derive(Debug)]
pub enum Error {
    /// A file could not be read.
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A `config.json` that does not parse or is not supported.
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: ConfigError,
    },
    /// A VAE `config.json` (or a [`crate::VaeConfig`] built in code) that does not parse or is
    /// not supported.
    VaeConfig {
        /// The file (`None` for a configuration built in code).
        path: Option<PathBuf>,
        /// What is wrong.
        source: VaeConfigError,
    },
    /// A VAE checkpoint that does not match the decoder (the encoder's tensors are not
    /// compared).
    VaeMismatch {
        /// The checkpoint (a directory or a file).
        path: PathBuf,
        /// The differences.
        mismatch: Box<Mismatch>,
    },
    /// A safetensors file or shard index that is not well formed.
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The checkpoint does not match the model.
    Mismatch {
        /// The checkpoint (a directory or a file).
        path: PathBuf,
        /// The differences.
        mismatch: Box<Mismatch>,
    },
    /// An input of the forward pass of the wrong shape.
    Input {
        /// What is wrong.
        reason: String,
    },
    /// A `scheduler_config.json` that does not parse or is not supported.
    SchedulerConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: SchedulerError,
    },
    /// A scheduler refused a configuration or a call (see [`SchedulerError`]).
    Scheduler(SchedulerError),
    /// libtorch failed.
    Torch {
        /// What was being done.
        context: String,
        /// libtorch's error.
        source: tch::TchError,
    },
    /// A pipeline directory (or a set of components) that is not a Wan2.1 text-to-video
    /// pipeline this crate runs: a missing component, another pipeline class, components that do
    /// not fit together.
    Pipeline {
        /// The directory (empty for components built in code).
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The caller's block loop (a [`crate::BlockLoop`], e.g. an offload manager's) failed.
    Blocks(Box<dyn std::error::Error + Send + Sync + 'static>),
}

impl Error {
    /// An error of a [`crate::BlockLoop`] implementation (e.g. an offload manager's upload).
    pub fn blocks(e: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::Blocks(Box::new(e))
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Io { path, source } => write!(f, "reading {}: {source}", path.display()),
            Error::Config { path, source } => write!(f, "{}: {source}", path.display()),
            Error::VaeConfig {
                path: Some(path),
                source,
            } => write!(f, "{}: {source}", path.display()),
            Error::VaeConfig { path: None, source } => write!(f, "VAE config: {source}"),
            Error::VaeMismatch { path, mismatch } => write!(
                f,
                "{} does not match the VAE's decoder (names as diffusers' AutoencoderKLWan, e.g. decoder.conv_in.weight):\n{mismatch}",
                path.display()
            ),
            Error::Format { path, reason } => write!(f, "{}: {reason}", path.display()),
            Error::Mismatch { path, mismatch } => write!(
                f,
                "{} does not match the model (names as diffusers' WanTransformer3DModel, e.g. blocks.0.attn1.to_q.weight):\n{mismatch}",
                path.display()
            ),
            Error::Input { reason } => write!(f, "bad input: {reason}"),
            Error::SchedulerConfig { path, source } => write!(f, "{}: {source}", path.display()),
            Error::Scheduler(source) => write!(f, "scheduler: {source}"),
            Error::Torch { context, source } => write!(f, "{context}: {source}"),
            Error::Pipeline { path, reason } => write!(f, "{}: {reason}", path.display()),
            Error::Blocks(e) => write!(f, "the block loop failed: {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Config { source, .. } => Some(source),
            Error::VaeConfig { source, .. } => Some(source),
            Error::SchedulerConfig { source, .. } => Some(source),
            Error::Scheduler(source) => Some(source),
            Error::Torch { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<SchedulerError> for Error {
    fn from(e: SchedulerError) -> Error {
        Error::Scheduler(e)
    }
}
