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
///
/// Each cause is reported once in a chain: a variant that wraps another error (an I/O error,
/// a config or scheduler error, libtorch's error, the block loop's error) returns it from
/// [`source()`](std::error::Error::source) and does not repeat it in its own message. `{:?}`
/// (what `fn main() -> Result<(), wan::Error>` prints on failure) writes the message and every
/// cause below it.
#[derive(thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("reading {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A `config.json` that does not parse or is not supported.
    #[error("{}: transformer config refused", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: ConfigError,
    },
    /// A VAE `config.json` (or a [`crate::VaeConfig`] built in code) that does not parse or is
    /// not supported.
    #[error("{}: VAE config refused", path.as_deref().map_or("(built in code)".into(), |p| p.display().to_string()))]
    VaeConfig {
        /// The file (`None` for a configuration built in code).
        path: Option<PathBuf>,
        /// What is wrong.
        #[source]
        source: VaeConfigError,
    },
    /// A VAE checkpoint that does not match the decoder (the encoder's tensors are not
    /// compared).
    #[error("{} does not match the VAE's decoder (names as diffusers' AutoencoderKLWan, e.g. decoder.conv_in.weight):\n{mismatch}", path.display())]
    VaeMismatch {
        /// The checkpoint (a directory or a file).
        path: PathBuf,
        /// The differences.
        mismatch: Box<Mismatch>,
    },
    /// A safetensors file or shard index that is not well formed.
    #[error("{}: {reason}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The checkpoint does not match the model.
    #[error("{} does not match the model (names as diffusers' WanTransformer3DModel, e.g. blocks.0.attn1.to_q.weight):\n{mismatch}", path.display())]
    Mismatch {
        /// The checkpoint (a directory or a file).
        path: PathBuf,
        /// The differences.
        mismatch: Box<Mismatch>,
    },
    /// An input of the forward pass of the wrong shape.
    #[error("bad input: {reason}")]
    Input {
        /// What is wrong.
        reason: String,
    },
    /// A `scheduler_config.json` that does not parse or is not supported.
    #[error("{}: scheduler config refused", path.display())]
    SchedulerConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: SchedulerError,
    },
    /// A scheduler refused a configuration or a call (see [`SchedulerError`]).
    #[error("the scheduler refused the call")]
    Scheduler(#[from] SchedulerError),
    /// libtorch failed.
    #[error("{context}")]
    Torch {
        /// What was being done.
        context: String,
        /// libtorch's error.
        #[source]
        source: tch::TchError,
    },
    /// A pipeline directory (or a set of components) that is not a Wan2.1 text-to-video
    /// pipeline this crate runs: a missing component, another pipeline class, components that do
    /// not fit together.
    #[error("{}: {reason}", path.display())]
    Pipeline {
        /// The directory (empty for components built in code).
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The caller's block loop (a [`crate::BlockLoop`], e.g. an offload manager's) failed.
    #[error("the block loop failed")]
    Blocks(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
}

impl Error {
    /// An error of a [`crate::BlockLoop`] implementation (e.g. an offload manager's upload).
    pub fn blocks(e: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::Blocks(Box::new(e))
    }

    /// Whether libtorch ran out of device memory (its "out of memory" error): the caller can
    /// give the activations more room (a smaller offload budget, fewer frames or a smaller
    /// size) and try again.
    pub fn is_out_of_memory(&self) -> bool {
        let mut e: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(x) = e {
            if x.to_string().contains("out of memory") {
                return true;
            }
            e = x.source();
        }
        false
    }
}

/// Runs `f`; a libtorch failure that tch reports by panicking (its infallible operations, which
/// the models' forward passes use, unwrap their fallible twins: a CUDA out-of-memory in the
/// middle of a block, for instance) comes back as [`Error::Torch`] with `context` instead of
/// unwinding through the caller. Any other panic goes on unwinding. The panic hook still prints
/// tch's message where it is raised.
pub(crate) fn catch_torch<T>(
    context: impl FnOnce() -> String,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    // AssertUnwindSafe: on a caught failure the state `f` touched is the pipeline's scheduler
    // and tensors of a call that is abandoned; the next call sets the scheduler's timesteps
    // again.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let text = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied());
            match text.and_then(torch_message) {
                Some(message) => Err(Error::Torch {
                    context: context(),
                    source: tch::TchError::Torch(message),
                }),
                None => std::panic::resume_unwind(payload),
            }
        }
    }
}

/// libtorch's message in a tch panic (``called `Result::unwrap()` on an `Err` value:
/// Torch("...")``, the message in `Debug` quoting), unquoted; `None` for other panics.
fn torch_message(panic: &str) -> Option<String> {
    let quoted = panic.split_once("Torch(\"")?.1;
    let quoted = quoted.strip_suffix("\")").unwrap_or(quoted);
    let mut out = String::with_capacity(quoted.len());
    let mut chars = quoted.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some(o) => out.push(o),
            None => {}
        }
    }
    Some(out)
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// The message, then every cause below it (the `source()` chain), one per line: what
/// `fn main() -> Result<(), wan::Error>` prints when it fails, and what `unwrap()` shows.
impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")?;
        let causes: Vec<&dyn std::error::Error> =
            std::iter::successors(std::error::Error::source(self), |e| e.source()).collect();
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, Scheduler, VaeConfig};
    use std::error::Error as _;

    /// The messages of `e`'s chain, `e` first.
    fn chain(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
        std::iter::successors(Some(e), |&e| e.source())
            .map(|e| e.to_string())
            .collect()
    }

    /// No message repeats its source's, and `{:?}` holds each exactly once.
    fn each_cause_once(e: &Error) {
        let messages = chain(e);
        for pair in messages.windows(2) {
            assert!(!pair[0].contains(&pair[1]), "{pair:?}");
        }
        let debug = format!("{e:?}");
        for m in &messages {
            assert_eq!(debug.matches(m.as_str()).count(), 1, "{m:?} in:\n{debug}");
        }
    }

    #[test]
    fn a_libtorch_failure_in_an_infallible_call_comes_back_as_an_error() {
        let a = tch::Tensor::zeros([2, 3], (tch::Kind::Float, tch::Device::Cpu));
        let b = tch::Tensor::zeros([4, 5], (tch::Kind::Float, tch::Device::Cpu));
        let e = catch_torch(|| "step 2 of 3".into(), || Ok(a.matmul(&b))).unwrap_err();
        let Error::Torch { context, source } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(context, "step 2 of 3");
        let message = source.to_string();
        assert!(message.contains("cannot be multiplied"), "{message}");
        assert!(
            !message.contains("\\n") && !message.contains("Torch(\""),
            "{message}"
        );
        assert!(!e.is_out_of_memory());
        each_cause_once(&e);
        // An out-of-memory message anywhere in the chain is recognized.
        let oom = Error::Torch {
            context: "denoising step 2 of 3".into(),
            source: tch::TchError::Torch("CUDA out of memory. Tried to allocate 1.69 GiB".into()),
        };
        assert!(oom.is_out_of_memory());
        // Other panics are not errors: they go on unwinding.
        let other = std::panic::catch_unwind(|| {
            catch_torch(
                || "x".into(),
                || -> Result<()> { panic!("index out of range") },
            )
        });
        assert!(other.is_err());
        // A successful call passes its value (and its own errors) through.
        assert_eq!(catch_torch(|| "x".into(), || Ok(7)).unwrap(), 7);
    }

    #[test]
    fn a_missing_file_is_io_with_its_kind() {
        let missing =
            std::env::temp_dir().join(format!("wan-none-{}/config.json", std::process::id()));
        let e = Config::from_file(&missing).unwrap_err();
        assert!(
            matches!(&e, Error::Io { path, .. } if path == &missing),
            "{e:?}"
        );
        let io = e
            .source()
            .unwrap()
            .downcast_ref::<std::io::Error>()
            .unwrap();
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
        each_cause_once(&e);
    }

    #[test]
    fn json_errors_are_the_source_of_the_config_errors() {
        // Transformer config: Error::Config -> ConfigError::Json -> serde_json::Error.
        let json_error = Config::from_json("{not json").unwrap_err();
        let e = Error::Config {
            path: "config.json".into(),
            source: json_error,
        };
        let config = e.source().unwrap();
        assert!(matches!(
            config.downcast_ref::<ConfigError>(),
            Some(ConfigError::Json(_))
        ));
        assert!(config.source().unwrap().is::<serde_json::Error>());
        assert_eq!(chain(&e).len(), 3);
        each_cause_once(&e);
        // VAE config built in code: no path, the same chain.
        let e = Error::VaeConfig {
            path: None,
            source: VaeConfig::from_json("{not json").unwrap_err(),
        };
        assert!(e.to_string().starts_with("(built in code)"), "{e}");
        let vae = e.source().unwrap();
        assert!(matches!(
            vae.downcast_ref::<VaeConfigError>(),
            Some(VaeConfigError::Json(_))
        ));
        assert!(vae.source().unwrap().is::<serde_json::Error>());
        each_cause_once(&e);
        // Scheduler config.
        let e = Error::SchedulerConfig {
            path: "scheduler_config.json".into(),
            source: Scheduler::from_json("{").map(|_| ()).unwrap_err(),
        };
        let sched = e.source().unwrap();
        assert!(matches!(
            sched.downcast_ref::<SchedulerError>(),
            Some(SchedulerError::Json(_))
        ));
        assert!(sched.source().unwrap().is::<serde_json::Error>());
        each_cause_once(&e);
    }

    #[test]
    fn libtorch_and_block_loop_errors_are_sources() {
        let e = Error::Torch {
            context: "reading weights".into(),
            source: tch::TchError::Torch("bad file".into()),
        };
        assert!(e.source().unwrap().is::<tch::TchError>());
        assert!(!e.to_string().contains("bad file"), "{e}");
        each_cause_once(&e);
        // A scheduler step's libtorch failure: Error::Scheduler -> SchedulerError::Torch -> TchError.
        let e = Error::from(SchedulerError::Torch {
            step: 3,
            op: "linalg_solve",
            source: tch::TchError::Torch("singular".into()),
        });
        let step = e.source().unwrap();
        assert!(step.to_string().contains("step 3: linalg_solve"), "{step}");
        assert!(step.source().unwrap().is::<tch::TchError>());
        assert_eq!(chain(&e).len(), 3);
        each_cause_once(&e);
        // The caller's block loop error, kept whole.
        let e = Error::blocks(std::io::Error::other("upload failed"));
        let inner = e
            .source()
            .unwrap()
            .downcast_ref::<std::io::Error>()
            .unwrap();
        assert_eq!(inner.kind(), std::io::ErrorKind::Other);
        each_cause_once(&e);
        let debug = format!("{e:?}");
        assert_eq!(
            debug,
            "the block loop failed\n\nCaused by:\n    upload failed"
        );
    }
}
