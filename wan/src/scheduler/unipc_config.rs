//! The keys of a `UniPCMultistepScheduler`'s `scheduler_config.json` and which of their values
//! this crate implements.

use super::{SchedulerError, json};
use serde::{Deserialize, Serialize};

/// UniPC's B(h): `bh1` is `h`, `bh2` is `expm1(h)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SolverType {
    /// `B(h) = h` (the UniPC paper recommends it for unconditional sampling under 10 steps).
    /// With `final_sigmas_type` `zero` the last step's B(h) is infinite and diffusers' last
    /// sample is NaN; this crate gives the same NaN (use `sigma_min` with `bh1`).
    Bh1,
    /// `B(h) = e^h - 1` (Wan2.1's).
    Bh2,
}

/// The keys of a `UniPCMultistepScheduler`'s `scheduler_config.json`, with diffusers'
/// defaults for absent keys (unknown keys are ignored). [`UniPcMultistepScheduler::new`](super::UniPcMultistepScheduler::new) checks
/// which values are implemented.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UniPcConfig {
    /// Training timesteps (1000).
    pub num_train_timesteps: i64,
    /// Betas' start (unused with flow sigmas, as the three next keys).
    pub beta_start: f64,
    /// Betas' end (unused with flow sigmas).
    pub beta_end: f64,
    /// `linear` or `scaled_linear` (`squaredcos_cap_v2` is refused without flow sigmas).
    pub beta_schedule: String,
    /// Explicit betas (unused with flow sigmas; refused without).
    pub trained_betas: Option<Vec<f64>>,
    /// The order of the predictor (1 or more; Wan: 2).
    pub solver_order: i64,
    /// What the model predicts: `flow_prediction` (Wan, with flow sigmas), `epsilon`, `sample`
    /// or `v_prediction` (with the betas' sigmas).
    pub prediction_type: String,
    /// Dynamic thresholding; only `false` is implemented.
    pub thresholding: bool,
    /// Thresholding's quantile (unused).
    pub dynamic_thresholding_ratio: f64,
    /// Thresholding's bound (unused).
    pub sample_max_value: f64,
    /// Update on the predicted x0 (`false`, the noise, is refused with `flow_prediction`, as
    /// diffusers does).
    pub predict_x0: bool,
    /// `bh1` or `bh2` (`midpoint`, `heun` and `logrho` mean `bh2`, as in diffusers).
    pub solver_type: String,
    /// Lower the order on the final steps.
    pub lower_order_final: bool,
    /// Steps whose corrector is skipped (the corrector of step `i` runs at step `i + 1`).
    pub disable_corrector: Vec<i64>,
    /// Another scheduler as predictor; only `null` is implemented.
    pub solver_p: Option<serde_json::Value>,
    /// Karras sigmas; only `false` is implemented.
    pub use_karras_sigmas: bool,
    /// Exponential sigmas; only `false` is implemented.
    pub use_exponential_sigmas: bool,
    /// Beta sigmas; only `false` is implemented.
    pub use_beta_sigmas: bool,
    /// Flow-matching sigmas (Wan's); `false`: the sigmas of the betas' schedule.
    pub use_flow_sigmas: bool,
    /// The flow shift (Wan2.1: 3.0 for 480p, 5.0 for 720p).
    pub flow_shift: f64,
    /// `linspace`, `leading` or `trailing` (no effect with flow sigmas).
    pub timestep_spacing: String,
    /// Offset of `leading` spacing (no effect with flow sigmas).
    pub steps_offset: i64,
    /// The final sigma: `zero` or `sigma_min` (the last sigma of the schedule).
    pub final_sigmas_type: String,
    /// Zero-terminal-SNR betas (no effect with flow sigmas; refused without).
    pub rescale_betas_zero_snr: bool,
    /// Resolution-dependent shifting; only `false` is implemented.
    pub use_dynamic_shifting: bool,
    /// The dynamic shift's form (unused).
    pub time_shift_type: String,
    /// Karras/exponential sigmas' bound (unused).
    pub sigma_min: Option<f64>,
    /// Karras/exponential sigmas' bound (unused).
    pub sigma_max: Option<f64>,
    /// Stretch the schedule to end here; only `null` is implemented.
    pub shift_terminal: Option<f64>,
}

impl Default for UniPcConfig {
    /// diffusers' defaults of `UniPCMultistepScheduler.__init__` (epsilon prediction, which this
    /// crate refuses: start from [`UniPcConfig::wan2_1`] instead).
    fn default() -> UniPcConfig {
        UniPcConfig {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            solver_order: 2,
            prediction_type: "epsilon".into(),
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            predict_x0: true,
            solver_type: "bh2".into(),
            lower_order_final: true,
            disable_corrector: Vec::new(),
            solver_p: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            timestep_spacing: "linspace".into(),
            steps_offset: 0,
            final_sigmas_type: "zero".into(),
            rescale_betas_zero_snr: false,
            use_dynamic_shifting: false,
            time_shift_type: "exponential".into(),
            sigma_min: None,
            sigma_max: None,
            shift_terminal: None,
        }
    }
}

impl UniPcConfig {
    /// Wan2.1's `scheduler/scheduler_config.json` (`Wan-AI/Wan2.1-T2V-*-Diffusers`): flow sigmas,
    /// `flow_shift` 3.0, order 2, `bh2`, final sigma zero.
    pub fn wan2_1() -> UniPcConfig {
        UniPcConfig {
            prediction_type: "flow_prediction".into(),
            use_flow_sigmas: true,
            flow_shift: 3.0,
            ..UniPcConfig::default()
        }
    }
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub(super) struct Checked {
    pub(super) num_train_timesteps: i64,
    pub(super) order: usize,
    pub(super) solver_type: SolverType,
    pub(super) lower_order_final: bool,
    pub(super) disable_corrector: Vec<i64>,
    pub(super) flow_shift: f64,
    pub(super) final_sigma_min: bool,
    pub(super) flow: bool,
    pub(super) prediction: Prediction,
    pub(super) predict_x0: bool,
    pub(super) spacing: Spacing,
    pub(super) steps_offset: i64,
}

/// What the model predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Prediction {
    Epsilon,
    Sample,
    V,
    Flow,
}

/// `timestep_spacing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

pub(super) fn check(c: &UniPcConfig) -> std::result::Result<Checked, SchedulerError> {
    let unsupported = |key, value: String, supported| {
        Err(SchedulerError::Unsupported {
            key,
            value,
            supported,
        })
    };
    if c.num_train_timesteps < 1 {
        return Err(SchedulerError::Invalid {
            key: "num_train_timesteps",
            value: c.num_train_timesteps.to_string(),
            reason: "must be positive",
        });
    }
    if c.solver_order < 1 {
        return Err(SchedulerError::Invalid {
            key: "solver_order",
            value: c.solver_order.to_string(),
            reason: "must be 1 or more",
        });
    }
    if !(c.flow_shift.is_finite() && c.flow_shift > 0.0) {
        return Err(SchedulerError::Invalid {
            key: "flow_shift",
            value: c.flow_shift.to_string(),
            reason: "must be positive",
        });
    }
    let solver_type = match c.solver_type.as_str() {
        "bh1" => SolverType::Bh1,
        // diffusers registers these as bh2.
        "bh2" | "midpoint" | "heun" | "logrho" => SolverType::Bh2,
        _ => {
            return Err(SchedulerError::Invalid {
                key: "solver_type",
                value: json(&c.solver_type),
                reason: "must be \"bh1\" or \"bh2\"",
            });
        }
    };
    if !["linear", "scaled_linear", "squaredcos_cap_v2"].contains(&c.beta_schedule.as_str()) {
        return Err(SchedulerError::Invalid {
            key: "beta_schedule",
            value: json(&c.beta_schedule),
            reason: "must be \"linear\", \"scaled_linear\" or \"squaredcos_cap_v2\"",
        });
    }
    let spacing = match c.timestep_spacing.as_str() {
        "linspace" => Spacing::Linspace,
        "leading" => Spacing::Leading,
        "trailing" => Spacing::Trailing,
        _ => {
            return Err(SchedulerError::Invalid {
                key: "timestep_spacing",
                value: json(&c.timestep_spacing),
                reason: "must be \"linspace\", \"leading\" or \"trailing\"",
            });
        }
    };
    let final_sigma_min = match c.final_sigmas_type.as_str() {
        "zero" => false,
        "sigma_min" => true,
        _ => {
            return Err(SchedulerError::Invalid {
                key: "final_sigmas_type",
                value: json(&c.final_sigmas_type),
                reason: "must be \"zero\" or \"sigma_min\"",
            });
        }
    };
    let prediction = match c.prediction_type.as_str() {
        "epsilon" => Prediction::Epsilon,
        "sample" => Prediction::Sample,
        "v_prediction" => Prediction::V,
        "flow_prediction" => Prediction::Flow,
        _ => {
            return Err(SchedulerError::Invalid {
                key: "prediction_type",
                value: json(&c.prediction_type),
                reason: "must be \"epsilon\", \"sample\", \"v_prediction\" or \"flow_prediction\"",
            });
        }
    };
    if prediction == Prediction::Flow && !c.predict_x0 {
        return Err(SchedulerError::Invalid {
            key: "predict_x0",
            value: "false".into(),
            reason: "flow_prediction needs predict_x0 true (diffusers refuses it too)",
        });
    }
    if prediction == Prediction::Flow && !c.use_flow_sigmas {
        return unsupported(
            "use_flow_sigmas",
            "false".into(),
            "flow_prediction is implemented with flow sigmas only",
        );
    }
    if !c.use_flow_sigmas {
        if c.beta_schedule == "squaredcos_cap_v2" {
            return unsupported(
                "beta_schedule",
                json(&c.beta_schedule),
                "\"linear\" and \"scaled_linear\" are",
            );
        }
        if c.rescale_betas_zero_snr {
            return unsupported("rescale_betas_zero_snr", "true".into(), "only false is");
        }
        if let Some(b) = &c.trained_betas {
            return unsupported("trained_betas", json(b), "only null is");
        }
    }
    for (key, on) in [
        ("thresholding", c.thresholding),
        ("use_karras_sigmas", c.use_karras_sigmas),
        ("use_exponential_sigmas", c.use_exponential_sigmas),
        ("use_beta_sigmas", c.use_beta_sigmas),
        ("use_dynamic_shifting", c.use_dynamic_shifting),
    ] {
        if on {
            return unsupported(key, "true".into(), "only false is");
        }
    }
    if let Some(p) = &c.solver_p
        && !p.is_null()
    {
        return unsupported("solver_p", p.to_string(), "only null is");
    }
    // diffusers tests `if self.config.shift_terminal:`, so 0 is off too.
    if let Some(t) = c.shift_terminal
        && t != 0.0
    {
        return unsupported("shift_terminal", t.to_string(), "only null is");
    }
    Ok(Checked {
        num_train_timesteps: c.num_train_timesteps,
        order: c.solver_order as usize,
        solver_type,
        lower_order_final: c.lower_order_final,
        disable_corrector: c.disable_corrector.clone(),
        flow_shift: c.flow_shift,
        final_sigma_min,
        flow: c.use_flow_sigmas,
        prediction,
        predict_x0: c.predict_x0,
        spacing,
        steps_offset: c.steps_offset,
    })
}
