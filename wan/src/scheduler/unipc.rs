//! diffusers' `UniPCMultistepScheduler` (`scheduling_unipc_multistep.py`, diffusers 0.42.1)
//! with flow sigmas, `flow_prediction` and `predict_x0`: the configuration Wan2.1 ships.

use super::{SchedulerError, check_shapes, json, linspace};
use crate::error::Result;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

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
/// defaults for absent keys (unknown keys are ignored). [`UniPcMultistepScheduler::new`] checks
/// which values are implemented.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UniPcConfig {
    /// Training timesteps (1000).
    pub num_train_timesteps: i64,
    /// Betas' start (unused with flow sigmas).
    pub beta_start: f64,
    /// Betas' end (unused with flow sigmas).
    pub beta_end: f64,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2` (unused with flow sigmas).
    pub beta_schedule: String,
    /// Explicit betas (unused with flow sigmas).
    pub trained_betas: Option<Vec<f64>>,
    /// The order of the predictor (1 or more; Wan: 2).
    pub solver_order: i64,
    /// What the model predicts; only `flow_prediction` is implemented.
    pub prediction_type: String,
    /// Dynamic thresholding; only `false` is implemented.
    pub thresholding: bool,
    /// Thresholding's quantile (unused).
    pub dynamic_thresholding_ratio: f64,
    /// Thresholding's bound (unused).
    pub sample_max_value: f64,
    /// Update on the predicted x0; only `true` is implemented (diffusers refuses `false` with
    /// `flow_prediction`).
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
    /// Flow-matching sigmas; only `true` is implemented.
    pub use_flow_sigmas: bool,
    /// The flow shift (Wan2.1: 3.0 for 480p, 5.0 for 720p).
    pub flow_shift: f64,
    /// `linspace`, `leading` or `trailing` (no effect with flow sigmas, checked as diffusers does).
    pub timestep_spacing: String,
    /// Offset of `leading` spacing (no effect with flow sigmas).
    pub steps_offset: i64,
    /// The final sigma: `zero` or `sigma_min` (the last sigma of the schedule).
    pub final_sigmas_type: String,
    /// Zero-terminal-SNR betas (no effect with flow sigmas).
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
struct Checked {
    num_train_timesteps: i64,
    order: usize,
    solver_type: SolverType,
    lower_order_final: bool,
    disable_corrector: Vec<i64>,
    flow_shift: f64,
    final_sigma_min: bool,
}

fn check(c: &UniPcConfig) -> std::result::Result<Checked, SchedulerError> {
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
    if !["linspace", "leading", "trailing"].contains(&c.timestep_spacing.as_str()) {
        return Err(SchedulerError::Invalid {
            key: "timestep_spacing",
            value: json(&c.timestep_spacing),
            reason: "must be \"linspace\", \"leading\" or \"trailing\"",
        });
    }
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
    const FLOW: &str = "only flow sigmas with flow_prediction and predict_x0 (Wan's) are";
    if !c.use_flow_sigmas {
        return unsupported("use_flow_sigmas", "false".into(), FLOW);
    }
    if c.prediction_type != "flow_prediction" {
        return unsupported("prediction_type", json(&c.prediction_type), FLOW);
    }
    if !c.predict_x0 {
        return unsupported("predict_x0", "false".into(), FLOW);
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
    })
}

/// The schedule of one generation and the solver's memory of the previous steps.
#[derive(Debug)]
struct State {
    /// The timesteps (integers), as f64.
    timesteps: Vec<f64>,
    /// The sigmas, float32, one more than the timesteps.
    sigmas: Vec<f32>,
    /// The same sigmas as a CPU float32 tensor (diffusers' `self.sigmas`).
    sigmas_t: Tensor,
    /// The converted model outputs of the last `order` steps, oldest first.
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    last_sample: Option<Tensor>,
    this_order: usize,
    step_index: Option<usize>,
    begin_index: Option<usize>,
}

/// diffusers' `UniPCMultistepScheduler` for flow matching (see the module docs for what is
/// implemented). Build it from a checked [`UniPcConfig`], call
/// [`set_timesteps`](UniPcMultistepScheduler::set_timesteps) before each generation.
#[derive(Debug)]
pub struct UniPcMultistepScheduler {
    config: UniPcConfig,
    checked: Checked,
    state: State,
}

/// `alpha`, `sigma` and `lambda = log(alpha) - log(sigma)` of one sigma, as 0-d float32 tensors
/// (diffusers' `_sigma_to_alpha_sigma_t` with flow sigmas).
struct Point {
    alpha: Tensor,
    sigma: Tensor,
    lambda: Tensor,
}

impl UniPcMultistepScheduler {
    /// Checks `config`; refuses unimplemented values by key (see [`SchedulerError`]).
    pub fn new(config: UniPcConfig) -> std::result::Result<Self, SchedulerError> {
        let checked = check(&config)?;
        let order = checked.order;
        Ok(UniPcMultistepScheduler {
            config,
            checked,
            state: State {
                timesteps: Vec::new(),
                sigmas: Vec::new(),
                sigmas_t: Tensor::zeros([0], (Kind::Float, Device::Cpu)),
                model_outputs: (0..order).map(|_| None).collect(),
                lower_order_nums: 0,
                last_sample: None,
                this_order: 0,
                step_index: None,
                begin_index: None,
            },
        })
    }

    /// The configuration.
    pub fn config(&self) -> &UniPcConfig {
        &self.config
    }

    /// The solver type in effect.
    pub fn solver_type(&self) -> SolverType {
        self.checked.solver_type
    }

    /// diffusers' `set_timesteps(steps)` with flow sigmas: sigmas
    /// `linspace(1, 1/N, steps + 1)[:-1]` shifted by `flow_shift` (float64, the first lowered by
    /// 1e-6 when it is 1), timesteps `sigma * N` truncated to integers, the final sigma appended,
    /// all sigmas rounded to float32. Resets the previous generation's state.
    pub fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        if steps == 0 {
            return Err(SchedulerError::Invalid {
                key: "num_inference_steps",
                value: "0".into(),
                reason: "must be 1 or more",
            }
            .into());
        }
        let c = &self.checked;
        let n = c.num_train_timesteps as f64;
        let shift = c.flow_shift;
        let mut sigmas: Vec<f64> = linspace(1.0, 1.0 / n, steps + 1)[..steps]
            .iter()
            .map(|&s| shift * s / (1.0 + (shift - 1.0) * s))
            .collect();
        let eps = 1e-6;
        if (sigmas[0] - 1.0).abs() < eps {
            sigmas[0] -= eps;
        }
        // `torch.from_numpy(float64).to(int64)`: truncation.
        let timesteps = sigmas.iter().map(|&s| ((s * n) as i64) as f64).collect();
        let last = if c.final_sigma_min {
            sigmas[steps - 1]
        } else {
            0.0
        };
        sigmas.push(last);
        let sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        let order = c.order;
        self.state = State {
            timesteps,
            sigmas_t: Tensor::from_slice(&sigmas),
            sigmas,
            model_outputs: (0..order).map(|_| None).collect(),
            lower_order_nums: 0,
            last_sample: None,
            this_order: 0,
            step_index: None,
            begin_index: None,
        };
        Ok(())
    }

    /// See [`Scheduler::set_begin_index`](super::Scheduler::set_begin_index).
    pub fn set_begin_index(&mut self, index: usize) {
        self.state.begin_index = Some(index);
    }

    /// The timesteps (integers, diffusers' int64), empty before `set_timesteps`.
    pub fn timesteps(&self) -> &[f64] {
        &self.state.timesteps
    }

    /// The timesteps as diffusers' int64 tensor.
    pub fn timesteps_tensor(&self) -> Tensor {
        let t: Vec<i64> = self.state.timesteps.iter().map(|&t| t as i64).collect();
        Tensor::from_slice(&t)
    }

    /// The float32 sigmas (one more than the timesteps).
    pub fn sigmas(&self) -> &[f32] {
        &self.state.sigmas
    }

    /// The index of the next step.
    pub fn step_index(&self) -> Option<usize> {
        self.state.step_index
    }

    /// diffusers' `index_for_timestep`: the second match if there are several, the last index if
    /// none.
    fn index_for_timestep(&self, timestep: f64) -> usize {
        let matches: Vec<usize> = (self.state.timesteps.iter().enumerate())
            .filter(|&(_, &t)| t == timestep)
            .map(|(i, _)| i)
            .collect();
        match matches.len() {
            0 => self.state.timesteps.len() - 1,
            1 => matches[0],
            _ => matches[1],
        }
    }

    fn point(&self, index: usize, device: Device) -> Point {
        let sigma = self.state.sigmas_t.get(index as i64).to_device(device);
        let alpha: Tensor = 1.0 - &sigma;
        let lambda = alpha.log() - sigma.log();
        Point {
            alpha,
            sigma,
            lambda,
        }
    }

    /// `(hh, h_phi_1, B_h, R, b)` of `multistep_uni_{p,c}_bh_update` for `predict_x0`.
    fn coefficients(
        &self,
        h: &Tensor,
        rks: &Tensor,
        order: usize,
    ) -> (Tensor, Tensor, Tensor, Tensor) {
        let hh = -h;
        let h_phi_1 = hh.expm1();
        let mut h_phi_k = &h_phi_1 / &hh - 1;
        let mut factorial_i: i64 = 1;
        let b_h = match self.checked.solver_type {
            SolverType::Bh1 => hh.shallow_clone(),
            SolverType::Bh2 => hh.expm1(),
        };
        let mut r = Vec::with_capacity(order);
        let mut b = Vec::with_capacity(order);
        for i in 1..=order as i64 {
            r.push(rks.pow_tensor_scalar(i - 1));
            b.push(&h_phi_k * factorial_i / &b_h);
            factorial_i *= i + 1;
            h_phi_k = &h_phi_k / &hh - 1.0 / factorial_i as f64;
        }
        (h_phi_1, b_h, Tensor::stack(&r, 0), Tensor::stack(&b, 0))
    }

    /// `rks` and `D1s` of the previous model outputs (`newest` is the sigma index of the newest
    /// one, `m0`; the `k`-th older one is at `newest - k`).
    fn differences(
        &self,
        s0: &Point,
        h: &Tensor,
        order: usize,
        newest: usize,
        device: Device,
    ) -> (Tensor, Option<Tensor>) {
        let outputs = &self.state.model_outputs;
        let m0 = outputs[outputs.len() - 1].as_ref().expect("an output");
        let mut rks = Vec::with_capacity(order);
        let mut d1s = Vec::with_capacity(order);
        for i in 1..order {
            let si = newest - i;
            let mi = outputs[outputs.len() - (i + 1)]
                .as_ref()
                .expect("an output");
            let p = self.point(si, device);
            let rk = (&p.lambda - &s0.lambda) / h;
            d1s.push((mi - m0) / &rk);
            rks.push(rk);
        }
        rks.push(Tensor::ones([], (Kind::Float, device)));
        let d1s = (!d1s.is_empty()).then(|| Tensor::stack(&d1s, 1));
        (Tensor::stack(&rks, 0), d1s)
    }

    fn solve(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Tensor::f_linalg_solve(a, b, true).map_err(|source| {
            SchedulerError::Solve {
                step: self.state.step_index.unwrap_or(0),
                source,
            }
            .into()
        })
    }

    /// diffusers' `multistep_uni_p_bh_update` (predict_x0).
    fn predictor(&self, x: &Tensor, order: usize) -> Result<Tensor> {
        let i = self.state.step_index.expect("a step index");
        let device = x.device();
        let outputs = &self.state.model_outputs;
        let m0 = outputs[outputs.len() - 1].as_ref().expect("an output");
        let t = self.point(i + 1, device);
        let s0 = self.point(i, device);
        let h = &t.lambda - &s0.lambda;
        let (rks, d1s) = self.differences(&s0, &h, order, i, device);
        let (h_phi_1, b_h, r, b) = self.coefficients(&h, &rks, order);
        let rhos_p = match &d1s {
            Some(_) if order == 2 => Some(Tensor::ones([1], (x.kind(), device)) * 0.5),
            Some(_) => {
                let k = order as i64 - 1;
                let a = r.narrow(0, 0, k).narrow(1, 0, k);
                Some(
                    self.solve(&a, &b.narrow(0, 0, k))?
                        .to_device(device)
                        .to_kind(x.kind()),
                )
            }
            None => None,
        };
        let x_t_ = (&t.sigma / &s0.sigma) * x - (&t.alpha * &h_phi_1) * m0;
        let ab = &t.alpha * &b_h;
        let x_t = match (rhos_p, d1s) {
            (Some(rhos), Some(d1s)) => {
                let pred_res = Tensor::einsum("k,bkc...->bc...", &[rhos, d1s], None::<&[i64]>);
                x_t_ - ab * pred_res
            }
            // diffusers: `pred_res = 0`, and `alpha_t * B_h * 0` is NaN where B_h is infinite
            // (bh1 at a final sigma of zero), so this is not zero.
            _ => x_t_ - ab.g_mul_scalar(0i64),
        };
        Ok(x_t.to_kind(x.kind()))
    }

    /// diffusers' `multistep_uni_c_bh_update` (predict_x0).
    fn corrector(
        &self,
        model_t: &Tensor,
        x: &Tensor,
        this_sample: &Tensor,
        order: usize,
    ) -> Result<Tensor> {
        let i = self.state.step_index.expect("a step index");
        let device = this_sample.device();
        let outputs = &self.state.model_outputs;
        let m0 = outputs[outputs.len() - 1].as_ref().expect("an output");
        let t = self.point(i, device);
        let s0 = self.point(i - 1, device);
        let h = &t.lambda - &s0.lambda;
        let (rks, d1s) = self.differences(&s0, &h, order, i - 1, device);
        let (h_phi_1, b_h, r, b) = self.coefficients(&h, &rks, order);
        let rhos_c = if order == 1 {
            Tensor::ones([1], (x.kind(), device)) * 0.5
        } else {
            self.solve(&r, &b)?.to_device(device).to_kind(x.kind())
        };
        let x_t_ = (&t.sigma / &s0.sigma) * x - (&t.alpha * &h_phi_1) * m0;
        let k = rhos_c.size()[0] - 1;
        let d1_t = model_t - m0;
        let last = rhos_c.get(k) * d1_t;
        let res = match d1s {
            Some(d1s) => {
                let corr_res = Tensor::einsum(
                    "k,bkc...->bc...",
                    &[rhos_c.narrow(0, 0, k), d1s],
                    None::<&[i64]>,
                );
                corr_res + last
            }
            // diffusers: `0 + rhos_c[-1] * D1_t`.
            None => last + 0i64,
        };
        let x_t = x_t_ - (&t.alpha * &b_h) * res;
        Ok(x_t.to_kind(x.kind()))
    }

    /// diffusers' `step`: converts the model output to x0, corrects the sample with UniC (unless
    /// disabled for the previous step), then predicts the next sample with UniP. Returns the
    /// sample's type. `timestep` is read only at the first step when no begin index is set.
    pub fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let steps = self.state.timesteps.len();
        if steps == 0 {
            return Err(SchedulerError::NoTimesteps.into());
        }
        check_shapes(model_output, sample)?;
        let i = match self.state.step_index {
            Some(i) => i,
            None => match self.state.begin_index {
                Some(b) => b,
                None => self.index_for_timestep(timestep),
            },
        };
        if i >= steps {
            return Err(SchedulerError::Finished { steps }.into());
        }
        self.state.step_index = Some(i);
        let use_corrector = i > 0
            && !self.checked.disable_corrector.contains(&(i as i64 - 1))
            && self.state.last_sample.is_some();
        // convert_model_output: x0 = sample - sigma_t * model_output (sigma on the CPU).
        let converted = sample - self.state.sigmas_t.get(i as i64) * model_output;
        let sample = if use_corrector {
            let last = self.state.last_sample.as_ref().expect("a last sample");
            self.corrector(&converted, last, sample, self.state.this_order)?
        } else {
            sample.shallow_clone()
        };
        let order = self.checked.order;
        self.state.model_outputs.rotate_left(1);
        self.state.model_outputs[order - 1] = Some(converted);
        let this_order = if self.checked.lower_order_final {
            order.min(steps - i)
        } else {
            order
        };
        self.state.this_order = this_order.min(self.state.lower_order_nums + 1);
        let prev = self.predictor(&sample, self.state.this_order)?;
        self.state.last_sample = Some(sample);
        if self.state.lower_order_nums < order {
            self.state.lower_order_nums += 1;
        }
        self.state.step_index = Some(i + 1);
        Ok(prev)
    }
}
