//! diffusers' `UniPCMultistepScheduler` (`scheduling_unipc_multistep.py`, diffusers 0.42.1)
//! with flow sigmas, `flow_prediction` and `predict_x0` (the configuration Wan2.1 ships), and
//! with the sigmas of a linear or scaled-linear beta schedule for `epsilon`, `sample` and
//! `v_prediction` models.

use super::unipc_config::{Checked, Prediction, Spacing, check};
use super::{SchedulerError, SolverType, UniPcConfig, check_shapes, linspace};
use crate::error::Result;
use tch::{Device, Kind, Tensor};

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

/// diffusers' `UniPCMultistepScheduler` (see the module docs for what is implemented). Build it from a checked [`UniPcConfig`], call
/// [`set_timesteps`](UniPcMultistepScheduler::set_timesteps) before each generation.
#[derive(Debug)]
pub struct UniPcMultistepScheduler {
    config: UniPcConfig,
    checked: Checked,
    /// Without flow sigmas: `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` of the training
    /// schedule (float32, diffusers' `self.sigmas` at `__init__`).
    train_sigmas: Option<Tensor>,
    state: State,
}

/// The training schedule's sigmas of a non-flow configuration, with diffusers' float32 torch
/// operations.
fn train_sigmas(c: &UniPcConfig) -> Tensor {
    let options = (Kind::Float, Device::Cpu);
    let n = c.num_train_timesteps;
    let betas = match () {
        _ if c.beta_schedule == "scaled_linear" => {
            Tensor::linspace(c.beta_start.powf(0.5), c.beta_end.powf(0.5), n, options)
                .pow_tensor_scalar(2)
        }
        _ => Tensor::linspace(c.beta_start, c.beta_end, n, options),
    };
    let alphas: Tensor = 1.0 - betas;
    let alphas_cumprod = alphas.cumprod(0, None::<Kind>);
    let one_minus: Tensor = 1.0 - &alphas_cumprod;
    (one_minus / &alphas_cumprod).pow_tensor_scalar(0.5)
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
            train_sigmas: (!checked.flow).then(|| train_sigmas(&config)),
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

    /// diffusers' `set_timesteps(steps)`. With flow sigmas: sigmas `linspace(1, 1/N, steps +
    /// 1)[:-1]` shifted by `flow_shift` (float64, the first lowered by 1e-6 when it is 1),
    /// timesteps `sigma * N` truncated to integers. Without: integer timesteps spaced by
    /// `timestep_spacing` (`trailing` may give another count than `steps`, as in diffusers) and
    /// the training sigmas at them. Then the final sigma appended and all sigmas rounded to
    /// float32. Resets the previous generation's state.
    pub fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        if steps == 0 {
            return Err(SchedulerError::Invalid {
                key: "num_inference_steps",
                value: "0".into(),
                reason: "must be 1 or more",
            }
            .into());
        }
        let (timesteps, mut sigmas) = match &self.train_sigmas {
            None => self.flow_sigmas(steps),
            Some(train) => self.beta_sigmas(train, steps),
        };
        let last = if self.checked.final_sigma_min {
            match &self.train_sigmas {
                None => sigmas[sigmas.len() - 1],
                // `((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5`
                Some(train) => train.double_value(&[0]),
            }
        } else {
            0.0
        };
        sigmas.push(last);
        let sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        let order = self.checked.order;
        self.state = State {
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
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

    /// Timesteps and float64 sigmas (before the final one) with flow sigmas.
    fn flow_sigmas(&self, steps: usize) -> (Vec<i64>, Vec<f64>) {
        let n = self.checked.num_train_timesteps as f64;
        let shift = self.checked.flow_shift;
        let mut sigmas: Vec<f64> = linspace(1.0, 1.0 / n, steps + 1)[..steps]
            .iter()
            .map(|&s| shift * s / (1.0 + (shift - 1.0) * s))
            .collect();
        let eps = 1e-6;
        if (sigmas[0] - 1.0).abs() < eps {
            sigmas[0] -= eps;
        }
        // `torch.from_numpy(float64).to(int64)`: truncation.
        let timesteps = sigmas.iter().map(|&s| (s * n) as i64).collect();
        (timesteps, sigmas)
    }

    /// Timesteps and float64 sigmas (before the final one) of the betas' schedule:
    /// `np.interp(timesteps, arange, train_sigmas)`, which at integer timesteps is the training
    /// sigma there.
    fn beta_sigmas(&self, train: &Tensor, steps: usize) -> (Vec<i64>, Vec<f64>) {
        let n = self.checked.num_train_timesteps;
        let timesteps: Vec<i64> = match self.checked.spacing {
            Spacing::Linspace => linspace(0.0, (n - 1) as f64, steps + 1)
                .iter()
                .rev()
                .take(steps)
                .map(|t| t.round_ties_even() as i64)
                .collect(),
            Spacing::Leading => {
                let ratio = n / (steps as i64 + 1);
                (0..=steps as i64)
                    .rev()
                    .take(steps)
                    .map(|i| i * ratio + self.checked.steps_offset)
                    .collect()
            }
            Spacing::Trailing => {
                // np.arange(N, 0, -ratio): ceil(N / ratio) values, start + i * (second - start).
                let ratio = n as f64 / steps as f64;
                let start = n as f64;
                let len = ((0.0 - start) / -ratio).ceil() as usize;
                let delta = (start + -ratio) - start;
                (0..len)
                    .map(|i| match i {
                        0 => start,
                        1 => start + -ratio,
                        _ => start + i as f64 * delta,
                    })
                    .map(|t| t.round_ties_even() as i64 - 1)
                    .collect()
            }
        };
        let train = Vec::<f32>::try_from(train).expect("float32 sigmas");
        let last = train.len() as i64 - 1;
        let sigmas = timesteps
            .iter()
            .map(|&t| f64::from(train[t.clamp(0, last) as usize]))
            .collect();
        (timesteps, sigmas)
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

    /// diffusers' `_sigma_to_alpha_sigma_t`: `(1 - sigma, sigma)` with flow sigmas, else
    /// `alpha = 1 / (sigma ** 2 + 1) ** 0.5` and `sigma * alpha`.
    fn alpha_sigma(&self, sigma: Tensor) -> (Tensor, Tensor) {
        if self.checked.flow {
            (1.0 - &sigma, sigma)
        } else {
            // `1 / x` is `x.reciprocal() * 1` in torch.
            let alpha = (sigma.pow_tensor_scalar(2) + 1)
                .pow_tensor_scalar(0.5)
                .reciprocal()
                * 1i64;
            let sigma_t = sigma * &alpha;
            (alpha, sigma_t)
        }
    }

    /// Sigma index `index`'s alpha, sigma and lambda, CPU scalars (diffusers keeps its sigmas
    /// on the CPU).
    fn point(&self, index: usize) -> Point {
        let (alpha, sigma) = self.alpha_sigma(self.state.sigmas_t.get(index as i64));
        let lambda = alpha.log() - sigma.log();
        Point {
            alpha,
            sigma,
            lambda,
        }
    }

    /// `(h_phi_1, B_h, R, b)` of `multistep_uni_{p,c}_bh_update`.
    fn coefficients(
        &self,
        h: &Tensor,
        rks: &Tensor,
        order: usize,
    ) -> (Tensor, Tensor, Tensor, Tensor) {
        let hh = if self.checked.predict_x0 {
            -h
        } else {
            h.shallow_clone()
        };
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
            let p = self.point(si);
            let rk = (&p.lambda - &s0.lambda) / h;
            d1s.push((mi - m0) / &rk);
            rks.push(rk);
        }
        rks.push(Tensor::ones([], (Kind::Float, Device::Cpu)));
        let d1s = (!d1s.is_empty()).then(|| Tensor::stack(&d1s, 1));
        (Tensor::stack(&rks, 0), d1s)
    }

    fn torch<T>(&self, op: &'static str, r: std::result::Result<T, tch::TchError>) -> Result<T> {
        r.map_err(|source| {
            SchedulerError::Torch {
                step: self.state.step_index.unwrap_or(0),
                op,
                source,
            }
            .into()
        })
    }

    fn solve(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.torch("linalg_solve", Tensor::f_linalg_solve(a, b, true))
    }

    /// `torch.einsum("k,bkc...->bc...", rhos, D1s)`.
    fn einsum(&self, rhos: Tensor, d1s: Tensor) -> Result<Tensor> {
        let r = Tensor::f_einsum("k,bkc...->bc...", &[rhos, d1s], None::<&[i64]>);
        self.torch("einsum", r)
    }

    /// `x_t_` and the factor of the update, `alpha_t * B_h` (`sigma_t * B_h` without
    /// `predict_x0`).
    fn base(
        &self,
        t: &Point,
        s0: &Point,
        h_phi_1: &Tensor,
        b_h: &Tensor,
        x: &Tensor,
        m0: &Tensor,
    ) -> (Tensor, Tensor) {
        if self.checked.predict_x0 {
            let x_t_ = (&t.sigma / &s0.sigma) * x - (&t.alpha * h_phi_1) * m0;
            (x_t_, &t.alpha * b_h)
        } else {
            let x_t_ = (&t.alpha / &s0.alpha) * x - (&t.sigma * h_phi_1) * m0;
            (x_t_, &t.sigma * b_h)
        }
    }

    /// diffusers' `convert_model_output`: the predicted x0 (`predict_x0`) or noise.
    fn convert(&self, model_output: &Tensor, sample: &Tensor, index: usize) -> Tensor {
        let sigma = self.state.sigmas_t.get(index as i64);
        let (alpha_t, sigma_t) = self.alpha_sigma(sigma.shallow_clone());
        match (self.checked.predict_x0, self.checked.prediction) {
            (true, Prediction::Epsilon) => (sample - &sigma_t * model_output) / &alpha_t,
            (true, Prediction::Sample) | (false, Prediction::Epsilon) => {
                model_output.shallow_clone()
            }
            (true, Prediction::V) => &alpha_t * sample - &sigma_t * model_output,
            (true, Prediction::Flow) => sample - &sigma * model_output,
            (false, Prediction::Sample) => (sample - &alpha_t * model_output) / &sigma_t,
            (false, Prediction::V) => &alpha_t * model_output + &sigma_t * sample,
            (false, Prediction::Flow) => unreachable!("refused by the config check"),
        }
    }

    /// diffusers' `multistep_uni_p_bh_update`.
    fn predictor(&self, x: &Tensor, order: usize) -> Result<Tensor> {
        let i = self.state.step_index.expect("a step index");
        let device = x.device();
        let outputs = &self.state.model_outputs;
        let m0 = outputs[outputs.len() - 1].as_ref().expect("an output");
        // The sigmas, lambdas and coefficients are CPU scalars, as in diffusers (its sigmas live
        // on the CPU), and so is the system R rho = b: diffusers solves it on the sample's
        // device, but where a step has h = 0 (a final sigma equal to the last one) R and b hold
        // infinities and NaNs, which the CPU's LAPACK solves to NaNs (as the CPU reference
        // does) and the CUDA solver refuses as singular. On the CPU every device gets the
        // reference's rhos; they move to the device after.
        let t = self.point(i + 1);
        let s0 = self.point(i);
        let h = &t.lambda - &s0.lambda;
        let (rks, d1s) = self.differences(&s0, &h, order, i);
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
        let (x_t_, ab) = self.base(&t, &s0, &h_phi_1, &b_h, x, m0);
        let x_t = match (rhos_p, d1s) {
            (Some(rhos), Some(d1s)) => {
                let pred_res = self.einsum(rhos, d1s)?;
                x_t_ - ab * pred_res
            }
            // diffusers: `pred_res = 0`, and `alpha_t * B_h * 0` is NaN where B_h is infinite
            // (bh1 at a final sigma of zero), so this is not zero.
            _ => x_t_ - ab.g_mul_scalar(0i64),
        };
        Ok(x_t.to_kind(x.kind()))
    }

    /// diffusers' `multistep_uni_c_bh_update`.
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
        // CPU scalars, the system solved on the CPU (as in the predictor).
        let t = self.point(i);
        let s0 = self.point(i - 1);
        let h = &t.lambda - &s0.lambda;
        let (rks, d1s) = self.differences(&s0, &h, order, i - 1);
        let (h_phi_1, b_h, r, b) = self.coefficients(&h, &rks, order);
        let rhos_c = if order == 1 {
            Tensor::ones([1], (x.kind(), device)) * 0.5
        } else {
            self.solve(&r, &b)?.to_device(device).to_kind(x.kind())
        };
        let (x_t_, ab) = self.base(&t, &s0, &h_phi_1, &b_h, x, m0);
        let k = rhos_c.size()[0] - 1;
        let d1_t = model_t - m0;
        let last = rhos_c.get(k) * d1_t;
        let res = match d1s {
            Some(d1s) => {
                let corr_res = self.einsum(rhos_c.narrow(0, 0, k), d1s)?;
                corr_res + last
            }
            // diffusers: `0 + rhos_c[-1] * D1_t`.
            None => last + 0i64,
        };
        let x_t = x_t_ - ab * res;
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
        let converted = self.convert(model_output, sample, i);
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
