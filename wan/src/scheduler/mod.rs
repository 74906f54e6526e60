//! The denoising schedulers of Wan2.1's pipeline, as diffusers 0.42 implements them:
//! [`UniPcMultistepScheduler`] with flow sigmas (what `WanPipeline` ships in
//! `scheduler/scheduler_config.json`) and [`FlowMatchEulerDiscreteScheduler`] with a static
//! shift. [`Scheduler`] reads a `scheduler_config.json` and picks the class by `_class_name`.
//!
//! Each step runs the same tensor operations as diffusers, in the same order, on the same element
//! types and devices (0-d float32 tensors for the sigmas and coefficients, float64 arithmetic where
//! diffusers uses numpy), so that on the same libtorch the outputs are bit-identical to diffusers'
//! (checked on the CPU by `tests/wan_scheduler.rs` against a fixture written by
//! `scripts/export_scheduler_fixture.py`).
//!
//! A denoising loop, as `WanPipeline` runs it:
//!
//! ```
//! use tch::{Device, Kind, Tensor};
//! use wan::scheduler::{Scheduler, UniPcConfig, UniPcMultistepScheduler};
//!
//! // Or Scheduler::from_file(pipeline_dir.join("scheduler/scheduler_config.json"))?
//! let mut scheduler = Scheduler::from(UniPcMultistepScheduler::new(UniPcConfig::wan2_1())?);
//! scheduler.set_timesteps(4)?;
//! scheduler.set_begin_index(0); // as WanPipeline does
//! let mut latents = Tensor::randn([1, 4, 2, 3, 3], (Kind::Float, Device::Cpu));
//! for &t in scheduler.timesteps().to_vec().iter() {
//!     // The transformer takes the timestep as float32: `Tensor::from_slice(&[t as f32])`.
//!     let noise_pred = latents.to_kind(Kind::BFloat16) * 0.1; // the transformer's output
//!     latents = scheduler.step(&noise_pred, t, &latents)?;
//! }
//! assert_eq!(latents.kind(), Kind::Float); // UniPC keeps the latents' type
//! # Ok::<(), wan::Error>(())
//! ```
//!
//! Supported: UniPC with flow sigmas (Wan's: `flow_prediction`, any `flow_shift`,
//! `solver_order` 1 and up, `bh1`/`bh2`, `lower_order_final`, `final_sigmas_type` `zero` or
//! `sigma_min`, `disable_corrector`), UniPC with the sigmas of a `linear` or `scaled_linear` beta
//! schedule (`epsilon`, `sample`, `v_prediction`; `predict_x0` true or false; `linspace`,
//! `leading` or `trailing` spacing), and Euler with a static `shift`. A known key with a value
//! that is not implemented (thresholding, Karras/exponential/beta sigmas, dynamic shifting,
//! `shift_terminal`, `solver_p`, `trained_betas`, `squaredcos_cap_v2`, zero-SNR rescaling,
//! inverted or stochastic Euler) is refused with [`SchedulerError::Unsupported`] naming the key;
//! unknown keys are ignored, as diffusers does.
//!
//! Where diffusers fails or gives NaN, so does this crate: `bh1` with a final sigma of zero ends
//! in NaN; order 3 without `lower_order_final` at a final sigma of zero is a singular system;
//! `predict_x0` false with `epsilon`/`sample` prediction and bf16 model outputs on float32
//! samples fails in `einsum` (both [`SchedulerError::Torch`]).

mod flow_match;
mod unipc;
mod unipc_config;

pub use flow_match::{FlowMatchEulerConfig, FlowMatchEulerDiscreteScheduler};
pub use unipc::UniPcMultistepScheduler;
pub use unipc_config::{SolverType, UniPcConfig};

use crate::error::{Error, Result};
use std::path::Path;
use tch::Tensor;

/// A scheduler configuration or call that this crate refuses.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// Not JSON, or a key with a value of the wrong JSON type.
    #[error("not a scheduler config")]
    Json(#[source] serde_json::Error),
    /// `_class_name` names a scheduler this crate does not implement (or is absent).
    #[error("{}", match name {
        Some(name) => format!("_class_name is {name:?}: only \"UniPCMultistepScheduler\" and \"FlowMatchEulerDiscreteScheduler\" are implemented"),
        None => "_class_name is missing: say \"UniPCMultistepScheduler\" or \"FlowMatchEulerDiscreteScheduler\"".to_owned(),
    })]
    UnknownClass {
        /// The class named (`None`: the key is absent).
        name: Option<String>,
    },
    /// A known key with a value diffusers accepts but this crate does not implement.
    #[error("{key} is {value}: not implemented; {supported}")]
    Unsupported {
        /// The key.
        key: &'static str,
        /// Its value, as JSON.
        value: String,
        /// What is implemented.
        supported: &'static str,
    },
    /// A value out of range (that diffusers refuses too or that makes no schedule).
    #[error("{key} is {value}: {reason}")]
    Invalid {
        /// The key or argument.
        key: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// `step` before `set_timesteps`.
    #[error("step called before set_timesteps")]
    NoTimesteps,
    /// `step` after the last timestep of the schedule.
    #[error("step called after the last of {steps} steps: call set_timesteps for a new generation")]
    Finished {
        /// The number of steps in the schedule.
        steps: usize,
    },
    /// The first `step` of a generation got a timestep that is not in the schedule (and no
    /// begin index was set).
    #[error(
        "timestep {timestep} is not in the schedule: pass one of timesteps(), or call set_begin_index"
    )]
    UnknownTimestep {
        /// The timestep passed.
        timestep: f64,
    },
    /// The model output's shape differs from the sample's, or the sample has fewer than two
    /// dimensions (batch and channels).
    #[error(
        "model output of shape {model_output:?} for a sample of shape {sample:?}: they must match, with batch and channel dimensions first"
    )]
    Shape {
        /// The model output's shape.
        model_output: Vec<i64>,
        /// The sample's shape.
        sample: Vec<i64>,
    },
    /// A libtorch operation of a step failed where diffusers' fails too: UniPC's linear system
    /// is singular (`solver_order` 3, `lower_order_final` false and a final sigma of zero), or
    /// `einsum` got a bf16 model output and a float32 sample (`predict_x0` false with `epsilon`
    /// or `sample` prediction keeps the model output's type).
    #[error("step {step}: {op} failed in libtorch")]
    Torch {
        /// The step.
        step: usize,
        /// The operation (`linalg_solve`, `einsum`).
        op: &'static str,
        /// libtorch's error.
        #[source]
        source: tch::TchError,
    },
}

/// The class names [`Scheduler::from_json`] knows, as diffusers writes them to `_class_name`.
pub const UNIPC_CLASS: &str = "UniPCMultistepScheduler";
/// See [`UNIPC_CLASS`].
pub const FLOW_MATCH_EULER_CLASS: &str = "FlowMatchEulerDiscreteScheduler";

/// One of the schedulers, chosen by a `scheduler_config.json`'s `_class_name`.
///
/// A generation: [`set_timesteps`](Scheduler::set_timesteps) (which also resets every state of
/// the previous generation), [`set_begin_index`](Scheduler::set_begin_index)`(0)` as
/// `WanPipeline` does, then one [`step`](Scheduler::step) per entry of
/// [`timesteps`](Scheduler::timesteps).
#[derive(Debug)]
// One scheduler per pipeline: the variants' sizes (a few hundred bytes) do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Scheduler {
    /// diffusers' `UniPCMultistepScheduler` (Wan2.1's).
    UniPc(UniPcMultistepScheduler),
    /// diffusers' `FlowMatchEulerDiscreteScheduler`.
    FlowMatchEuler(FlowMatchEulerDiscreteScheduler),
}

impl From<UniPcMultistepScheduler> for Scheduler {
    fn from(s: UniPcMultistepScheduler) -> Scheduler {
        Scheduler::UniPc(s)
    }
}

impl From<FlowMatchEulerDiscreteScheduler> for Scheduler {
    fn from(s: FlowMatchEulerDiscreteScheduler) -> Scheduler {
        Scheduler::FlowMatchEuler(s)
    }
}

impl Scheduler {
    /// Parses a diffusers `scheduler_config.json` and builds the class its `_class_name` names.
    pub fn from_json(text: &str) -> std::result::Result<Scheduler, SchedulerError> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(SchedulerError::Json)?;
        let class = value.get("_class_name").and_then(|v| v.as_str());
        match class {
            Some(UNIPC_CLASS) => {
                let config = serde_json::from_value(value).map_err(SchedulerError::Json)?;
                Ok(Scheduler::UniPc(UniPcMultistepScheduler::new(config)?))
            }
            Some(FLOW_MATCH_EULER_CLASS) => {
                let config = serde_json::from_value(value).map_err(SchedulerError::Json)?;
                Ok(Scheduler::FlowMatchEuler(
                    FlowMatchEulerDiscreteScheduler::new(config)?,
                ))
            }
            _ => Err(SchedulerError::UnknownClass {
                name: value
                    .get("_class_name")
                    .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned)),
            }),
        }
    }

    /// Reads `path` (a pipeline's `scheduler/scheduler_config.json`), see
    /// [`from_json`](Scheduler::from_json).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Scheduler> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        Scheduler::from_json(&text).map_err(|source| Error::SchedulerConfig {
            path: path.to_owned(),
            source,
        })
    }

    /// diffusers' class name of this scheduler.
    pub fn class_name(&self) -> &'static str {
        match self {
            Scheduler::UniPc(_) => UNIPC_CLASS,
            Scheduler::FlowMatchEuler(_) => FLOW_MATCH_EULER_CLASS,
        }
    }

    /// Computes the schedule of `steps` denoising steps and resets the state of any previous
    /// generation. `steps` 0 is refused.
    pub fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        match self {
            Scheduler::UniPc(s) => s.set_timesteps(steps),
            Scheduler::FlowMatchEuler(s) => s.set_timesteps(steps),
        }
    }

    /// Starts the generation at `index` of the schedule (`WanPipeline` sets 0) instead of looking
    /// the first step's timestep up. [`set_timesteps`](Scheduler::set_timesteps) clears it.
    pub fn set_begin_index(&mut self, index: usize) {
        match self {
            Scheduler::UniPc(s) => s.set_begin_index(index),
            Scheduler::FlowMatchEuler(s) => s.set_begin_index(index),
        }
    }

    /// The timesteps of the schedule, in order, as the values diffusers passes to the
    /// transformer: integers for UniPC (diffusers' int64), float32 values for Euler. The
    /// transformer takes them as float32 (`Tensor::from_slice(&[t as f32])`, exact for both); the
    /// same value goes to [`step`](Scheduler::step). Empty before `set_timesteps`.
    pub fn timesteps(&self) -> &[f64] {
        match self {
            Scheduler::UniPc(s) => s.timesteps(),
            Scheduler::FlowMatchEuler(s) => s.timesteps(),
        }
    }

    /// The timesteps as diffusers holds them: int64 (UniPC) or float32 (Euler), on the CPU.
    pub fn timesteps_tensor(&self) -> Tensor {
        match self {
            Scheduler::UniPc(s) => s.timesteps_tensor(),
            Scheduler::FlowMatchEuler(s) => s.timesteps_tensor(),
        }
    }

    /// The sigmas of the schedule (float32, one more than the timesteps: the final sigma).
    pub fn sigmas(&self) -> &[f32] {
        match self {
            Scheduler::UniPc(s) => s.sigmas(),
            Scheduler::FlowMatchEuler(s) => s.sigmas(),
        }
    }

    /// The standard deviation of the initial noise (1.0 for both: the latents start as
    /// `randn` in float32, unscaled).
    pub fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// The index of the next step (`None` before the first step of a generation).
    pub fn step_index(&self) -> Option<usize> {
        match self {
            Scheduler::UniPc(s) => s.step_index(),
            Scheduler::FlowMatchEuler(s) => s.step_index(),
        }
    }

    /// One denoising step: the sample at the next timestep from the model's output at `timestep`
    /// (one of [`timesteps`](Scheduler::timesteps); only the first step of a generation reads it,
    /// to find its place when no begin index was set). The result's type is diffusers': the
    /// sample's for UniPC, the model output's for Euler.
    pub fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
    ) -> Result<Tensor> {
        match self {
            Scheduler::UniPc(s) => s.step(model_output, timestep, sample),
            Scheduler::FlowMatchEuler(s) => s.step(model_output, timestep, sample),
        }
    }
}

/// numpy's `linspace(start, stop, num)` in float64, value for value: `i * step + start`, the
/// last set to `stop`.
pub(crate) fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    let div = num.saturating_sub(1);
    let delta = stop - start;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64).collect();
    if div > 0 {
        let step = delta / div as f64;
        if step == 0.0 {
            y.iter_mut().for_each(|v| *v = *v / div as f64 * delta);
        } else {
            y.iter_mut().for_each(|v| *v *= step);
        }
    } else {
        y.iter_mut().for_each(|v| *v *= delta);
    }
    y.iter_mut().for_each(|v| *v += start);
    if num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// Checks that `model_output` and `sample` have one shape with batch and channels first.
pub(crate) fn check_shapes(model_output: &Tensor, sample: &Tensor) -> Result<()> {
    let (m, s) = (model_output.size(), sample.size());
    if m != s || s.len() < 2 {
        return Err(SchedulerError::Shape {
            model_output: m,
            sample: s,
        }
        .into());
    }
    Ok(())
}

/// The JSON text of a config value, for error messages.
pub(crate) fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_is_numpys() {
        assert_eq!(linspace(0.0, 1.0, 5), [0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(linspace(3.0, 7.0, 1), [3.0]);
        assert!(linspace(0.0, 1.0, 0).is_empty());
        // numpy: np.linspace(1, 1/1000, 4) -> [1., 0.667, 0.334, 0.001]: i*step + start.
        let step = (0.001 - 1.0) / 3.0;
        assert_eq!(linspace(1.0, 0.001, 4)[1], step + 1.0);
        assert_eq!(linspace(1.0, 0.001, 4)[2], 2.0 * step + 1.0);
    }
}
