//! diffusers' `FlowMatchEulerDiscreteScheduler` (`scheduling_flow_match_euler_discrete.py`,
//! diffusers 0.42.1) with a static `shift`: `x_next = x + (sigma_next - sigma) * v`.

use super::{SchedulerError, check_shapes, json, linspace};
use crate::error::Result;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// The keys of a `FlowMatchEulerDiscreteScheduler`'s `scheduler_config.json`, with diffusers'
/// defaults for absent keys (unknown keys are ignored). [`FlowMatchEulerDiscreteScheduler::new`]
/// checks which values are implemented.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FlowMatchEulerConfig {
    /// Training timesteps (1000).
    pub num_train_timesteps: i64,
    /// The static shift of the sigmas.
    pub shift: f64,
    /// Resolution-dependent shifting; only `false` is implemented.
    pub use_dynamic_shifting: bool,
    /// Dynamic shifting's base (unused).
    pub base_shift: Option<f64>,
    /// Dynamic shifting's maximum (unused).
    pub max_shift: Option<f64>,
    /// Dynamic shifting's base length (unused).
    pub base_image_seq_len: i64,
    /// Dynamic shifting's maximum length (unused).
    pub max_image_seq_len: i64,
    /// `1 - sigma` schedules; only `false` is implemented.
    pub invert_sigmas: bool,
    /// Stretch the schedule to end here; only `null` is implemented.
    pub shift_terminal: Option<f64>,
    /// Karras sigmas; only `false` is implemented.
    pub use_karras_sigmas: bool,
    /// Exponential sigmas; only `false` is implemented.
    pub use_exponential_sigmas: bool,
    /// Beta sigmas; only `false` is implemented.
    pub use_beta_sigmas: bool,
    /// `exponential` or `linear` (used by dynamic shifting only).
    pub time_shift_type: String,
    /// Noise injected at each step; only `false` is implemented.
    pub stochastic_sampling: bool,
}

impl Default for FlowMatchEulerConfig {
    /// diffusers' defaults of `FlowMatchEulerDiscreteScheduler.__init__`.
    fn default() -> FlowMatchEulerConfig {
        FlowMatchEulerConfig {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            base_shift: Some(0.5),
            max_shift: Some(1.15),
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            invert_sigmas: false,
            shift_terminal: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            time_shift_type: "exponential".into(),
            stochastic_sampling: false,
        }
    }
}

impl FlowMatchEulerConfig {
    /// The defaults with `shift` (Wan: 3.0 at 480p, 5.0 at 720p).
    pub fn with_shift(shift: f64) -> FlowMatchEulerConfig {
        FlowMatchEulerConfig {
            shift,
            ..FlowMatchEulerConfig::default()
        }
    }
}

fn check(c: &FlowMatchEulerConfig) -> std::result::Result<(), SchedulerError> {
    if c.num_train_timesteps < 1 {
        return Err(SchedulerError::Invalid {
            key: "num_train_timesteps",
            value: c.num_train_timesteps.to_string(),
            reason: "must be positive",
        });
    }
    if !(c.shift.is_finite() && c.shift > 0.0) {
        return Err(SchedulerError::Invalid {
            key: "shift",
            value: c.shift.to_string(),
            reason: "must be positive",
        });
    }
    if !["exponential", "linear"].contains(&c.time_shift_type.as_str()) {
        return Err(SchedulerError::Invalid {
            key: "time_shift_type",
            value: json(&c.time_shift_type),
            reason: "must be \"exponential\" or \"linear\"",
        });
    }
    for (key, on) in [
        ("use_dynamic_shifting", c.use_dynamic_shifting),
        ("invert_sigmas", c.invert_sigmas),
        ("use_karras_sigmas", c.use_karras_sigmas),
        ("use_exponential_sigmas", c.use_exponential_sigmas),
        ("use_beta_sigmas", c.use_beta_sigmas),
        ("stochastic_sampling", c.stochastic_sampling),
    ] {
        if on {
            return Err(SchedulerError::Unsupported {
                key,
                value: "true".into(),
                supported: "only false (the static shift) is",
            });
        }
    }
    if let Some(t) = c.shift_terminal
        && t != 0.0
    {
        return Err(SchedulerError::Unsupported {
            key: "shift_terminal",
            value: t.to_string(),
            supported: "only null is",
        });
    }
    Ok(())
}

/// diffusers' `FlowMatchEulerDiscreteScheduler` with a static shift. Build it from a checked
/// [`FlowMatchEulerConfig`], call
/// [`set_timesteps`](FlowMatchEulerDiscreteScheduler::set_timesteps) before each generation.
#[derive(Debug)]
pub struct FlowMatchEulerDiscreteScheduler {
    config: FlowMatchEulerConfig,
    /// `sigmas[0]` and `sigmas[-1]` of the training schedule (float32 values).
    sigma_max: f64,
    sigma_min: f64,
    timesteps: Vec<f64>,
    timesteps_t: Tensor,
    sigmas: Vec<f32>,
    sigmas_t: Tensor,
    step_index: Option<usize>,
    begin_index: Option<usize>,
}

impl FlowMatchEulerDiscreteScheduler {
    /// Checks `config`; refuses unimplemented values by key (see [`SchedulerError`]).
    pub fn new(config: FlowMatchEulerConfig) -> std::result::Result<Self, SchedulerError> {
        check(&config)?;
        // __init__: timesteps N..1 (float32), sigmas = t / N shifted, in float32 torch ops; only
        // the first and last are kept (sigma_max, sigma_min).
        let n = config.num_train_timesteps;
        let t = Tensor::from_slice(&[n as f32, 1.0f32]);
        let s = t / n;
        let shift = config.shift;
        let s = (&s * shift) / ((&s * (shift - 1.0)) + 1);
        let (sigma_max, sigma_min) = (s.double_value(&[0]), s.double_value(&[1]));
        Ok(FlowMatchEulerDiscreteScheduler {
            config,
            sigma_max,
            sigma_min,
            timesteps: Vec::new(),
            timesteps_t: Tensor::zeros([0], (Kind::Float, Device::Cpu)),
            sigmas: Vec::new(),
            sigmas_t: Tensor::zeros([0], (Kind::Float, Device::Cpu)),
            step_index: None,
            begin_index: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &FlowMatchEulerConfig {
        &self.config
    }

    /// diffusers' `set_timesteps(steps)`: timesteps `linspace(sigma_max * N, sigma_min * N,
    /// steps)` (float64), sigmas `t / N` shifted, rounded to float32, timesteps `sigma * N` in
    /// float32, a final sigma 0 appended. Resets the previous generation's state.
    pub fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        if steps == 0 {
            return Err(SchedulerError::Invalid {
                key: "num_inference_steps",
                value: "0".into(),
                reason: "must be 1 or more",
            }
            .into());
        }
        let n = self.config.num_train_timesteps;
        let shift = self.config.shift;
        let sigmas: Vec<f32> =
            linspace(self.sigma_max * n as f64, self.sigma_min * n as f64, steps)
                .into_iter()
                .map(|t| t / n as f64)
                .map(|s| (shift * s / (1.0 + (shift - 1.0) * s)) as f32)
                .collect();
        let sigmas_t = Tensor::from_slice(&sigmas);
        let timesteps_t = &sigmas_t * n;
        self.timesteps = Vec::<f32>::try_from(&timesteps_t)
            .expect("a float32 vector")
            .into_iter()
            .map(f64::from)
            .collect();
        self.timesteps_t = timesteps_t;
        self.sigmas_t = Tensor::cat(
            &[sigmas_t, Tensor::zeros([1], (Kind::Float, Device::Cpu))],
            0,
        );
        self.sigmas = Vec::<f32>::try_from(&self.sigmas_t).expect("a float32 vector");
        self.step_index = None;
        self.begin_index = None;
        Ok(())
    }

    /// See [`Scheduler::set_begin_index`](super::Scheduler::set_begin_index).
    pub fn set_begin_index(&mut self, index: usize) {
        self.begin_index = Some(index);
    }

    /// The timesteps (float32 values), empty before `set_timesteps`.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The timesteps as diffusers' float32 tensor.
    pub fn timesteps_tensor(&self) -> Tensor {
        self.timesteps_t.copy()
    }

    /// The float32 sigmas (one more than the timesteps).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The index of the next step.
    pub fn step_index(&self) -> Option<usize> {
        self.step_index
    }

    /// diffusers' `step` (deterministic, one timestep per sample): `sample` upcast to float32,
    /// plus `(sigma_next - sigma) * model_output`, returned in the model output's type (bf16
    /// outputs give bf16 latents, as in diffusers). The sigmas are taken on the sample's device,
    /// where `WanPipeline` puts them (`set_timesteps(device=...)`).
    pub fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let steps = self.timesteps.len();
        if steps == 0 {
            return Err(SchedulerError::NoTimesteps.into());
        }
        check_shapes(model_output, sample)?;
        let i = match (self.step_index, self.begin_index) {
            (Some(i), _) | (None, Some(i)) => i,
            (None, None) => {
                // index_for_timestep: the second match if there are several.
                let matches: Vec<usize> = (self.timesteps.iter().enumerate())
                    .filter(|&(_, &t)| t == timestep)
                    .map(|(i, _)| i)
                    .collect();
                match matches.len() {
                    0 => return Err(SchedulerError::UnknownTimestep { timestep }.into()),
                    1 => matches[0],
                    _ => matches[1],
                }
            }
        };
        if i >= steps {
            return Err(SchedulerError::Finished { steps }.into());
        }
        let device = sample.device();
        let sample = sample.to_kind(Kind::Float);
        let sigma = self.sigmas_t.get(i as i64).to_device(device);
        let sigma_next = self.sigmas_t.get(i as i64 + 1).to_device(device);
        let dt = sigma_next - sigma;
        let prev = sample + dt * model_output;
        self.step_index = Some(i + 1);
        Ok(prev.to_kind(model_output.kind()))
    }
}
