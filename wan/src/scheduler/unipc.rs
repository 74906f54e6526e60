//! diffusers' `UniPCMultistepScheduler` (`scheduling_unipc_multistep.py`, diffusers 0.42.1)
//! with flow sigmas, `flow_prediction` and `predict_x0`: the configuration Wan2.1 ships.

use super::unipc_config::{Checked, check};
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
