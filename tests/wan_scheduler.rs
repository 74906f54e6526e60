//! The schedulers of `wan::scheduler` (diffusers' `UniPCMultistepScheduler` with flow sigmas and
//! `FlowMatchEulerDiscreteScheduler`) against diffusers' own on the fixture of
//! `scripts/export_scheduler_fixture.py`: timesteps and sigmas for every configuration and step
//! count, every step of a chain on fixed samples and model outputs (float32 and bfloat16), a
//! second generation on the same scheduler, and the typed refusals of bad configurations and
//! calls.

use offload_testkit as common;

use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};
use wan::Error;
use wan::scheduler::{
    FlowMatchEulerConfig, FlowMatchEulerDiscreteScheduler, Scheduler, SchedulerError, SolverType,
    UniPcConfig, UniPcMultistepScheduler,
};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers")
}

fn cases_in(dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(dir.join("cases.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn cases() -> Vec<Value> {
    cases_in(&fixture())
}

fn tensors_in(dir: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(dir.join("runs.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn tensors() -> HashMap<String, Tensor> {
    tensors_in(&fixture())
}

fn scheduler(case: &Value) -> Scheduler {
    Scheduler::from_json(&case["config"].to_string()).unwrap()
}

/// Largest difference allowed between a step's output here and diffusers', absolute for values
/// up to 1 and relative above ([`max_diff`]; samples are of magnitude ~1-5, but epsilon
/// prediction on flow sigmas divides by `1 - sigma`, about 1e-6 at the first step). On the machine that wrote the fixture every output is equal bit for bit (the
/// same libtorch operations on the same types in the same order); another CPU may round a
/// vectorized kernel differently in the last float32 ulp. A wrong coefficient, order or sigma
/// moves the outputs by 1e-3 or more.
const TOLERANCE: f64 = 1e-6;

/// Max |a - b| / max(1, |b|) with NaNs required at the same places (diffusers' `bh1` with a
/// final sigma of zero ends in NaN, and some orders without `lower_order_final` in infinities,
/// and so must this crate); equal values (infinities included) differ by 0. Relative above 1:
/// a value of 1e6 (epsilon prediction at a flow sigma of 0.999999) that CUDA rounds otherwise in
/// its last float32 ulp (its division by a CPU scalar is a multiplication by the reciprocal)
/// differs by 0.06 absolutely but 6e-8 relatively.
fn max_diff(got: &Tensor, want: &Tensor) -> f64 {
    let (d, w, same) = abs_diff(got, want);
    let d = (d / w.abs().clamp_min(1.0)).masked_fill(&same, 0.0);
    d.max().double_value(&[])
}

/// `|got - want|` and `want` in float64, and where the two are the same (equal, or NaN in
/// both); checks that shapes, dtypes and the places of NaNs agree.
fn abs_diff(got: &Tensor, want: &Tensor) -> (Tensor, Tensor, Tensor) {
    assert_eq!(got.size(), want.size());
    assert_eq!(got.kind(), want.kind(), "output dtype");
    let (g, w) = (got.to_kind(Kind::Double), want.to_kind(Kind::Double));
    assert!(g.isnan().equal(&w.isnan()), "NaNs at other places");
    let both = g.isnan().logical_and(&w.isnan());
    let same = g.eq_tensor(&w).logical_or(&both);
    ((&g - &w).abs(), w, same)
}

/// The largest difference between `got` and `want` over the largest magnitude of `want` (at
/// least 1): the difference relative to the output's scale, for outputs that another device
/// computes, where a step that subtracts near-equal values and divides by a small one (epsilon
/// prediction at the first sigma) turns one rounding apart into a large relative difference of
/// one element.
fn max_diff_of_scale(got: &Tensor, want: &Tensor) -> f64 {
    let (d, w, same) = abs_diff(got, want);
    let finite = w.isfinite();
    let scale = w
        .abs()
        .masked_fill(&finite.logical_not(), 0.0)
        .max()
        .double_value(&[])
        .max(1.0);
    d.masked_fill(&same, 0.0).max().double_value(&[]) / scale
}

fn exact(got: &Tensor, want: &Tensor) -> bool {
    let both = got.isnan().logical_and(&want.isnan());
    got.eq_tensor(want).logical_or(&both).all().int64_value(&[]) == 1
}

#[test]
fn timesteps_and_sigmas_equal_diffusers() {
    let cases = cases();
    assert!(cases.len() >= 70, "{} cases", cases.len());
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let mut s = scheduler(case);
        let steps = case["steps"].as_u64().unwrap() as usize;
        s.set_timesteps(steps).unwrap();
        let want_t: Vec<f64> = case["timesteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(s.timesteps(), want_t.as_slice(), "{name}: timesteps");
        // The JSON holds each float32 sigma as its exact float64 value.
        let want_s: Vec<f32> = case["sigmas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(s.sigmas(), want_s.as_slice(), "{name}: sigmas");
        let kind = match case["timesteps_dtype"].as_str().unwrap() {
            "int64" => Kind::Int64,
            "float32" => Kind::Float,
            k => panic!("{k}"),
        };
        let t = s.timesteps_tensor();
        assert_eq!(t.kind(), kind, "{name}: timesteps dtype");
        assert_eq!(
            Vec::<f64>::try_from(&t.to_kind(Kind::Double)).unwrap(),
            want_t
        );
        assert_eq!(s.init_noise_sigma(), 1.0);
    }
}

/// Runs every chain of the fixture through `run` and compares every step's output; returns (max
/// diff, outputs compared, outputs bit-exact).
fn compare_runs(
    run: impl FnMut(&Value, &Value, &HashMap<String, Tensor>) -> Vec<wan::Result<Tensor>>,
) -> (f64, usize, usize) {
    compare_runs_with(&fixture(), (max_diff, |_| TOLERANCE), run)
}

/// [`compare_runs`] against the cases and outputs of `dir` (inputs from the fixture), with a
/// measure of the difference and a tolerance per run.
fn compare_runs_with(
    dir: &Path,
    (diff, tolerance): (fn(&Tensor, &Tensor) -> f64, impl Fn(&Value) -> f64),
    mut run: impl FnMut(&Value, &Value, &HashMap<String, Tensor>) -> Vec<wan::Result<Tensor>>,
) -> (f64, usize, usize) {
    let inputs = tensors();
    let expected = tensors_in(dir);
    let (mut worst, mut compared, mut bit_exact) = (0.0f64, 0, 0);
    for case in &cases_in(dir) {
        let name = case["name"].as_str().unwrap();
        for r in case["runs"].as_array().unwrap() {
            let outputs = run(case, r, &inputs);
            let completed = r["completed_steps"].as_u64().unwrap() as usize;
            let out_key = r["outputs"].as_str().unwrap();
            let tol = tolerance(r);
            for (k, got) in outputs.into_iter().enumerate() {
                if k == completed {
                    // diffusers failed here: a singular system (order 3 at a final zero sigma)
                    // or an einsum of bf16 and float32.
                    let why = r["error"].as_str().expect("diffusers' error");
                    let op = if why.contains("singular") {
                        "linalg_solve"
                    } else {
                        "einsum"
                    };
                    match got {
                        Err(Error::Scheduler(SchedulerError::Torch { step, op: o, .. })) => {
                            assert_eq!((step, o), (k, op), "{name}: {why}")
                        }
                        other => panic!("{name}: step {k}: {other:?}, diffusers failed"),
                    }
                    break;
                }
                let got = got.unwrap_or_else(|e| panic!("{name} step {k}: {e:?}"));
                let want = &expected[&format!("{out_key}/{k}")];
                let d = diff(&got, want);
                assert!(
                    d <= tol,
                    "{name} {}/{} step {k}: max diff {d:e}",
                    r["model_output_dtype"],
                    r["sample_dtype"]
                );
                worst = worst.max(d);
                compared += 1;
                bit_exact += exact(&got, want) as usize;
            }
        }
    }
    (worst, compared, bit_exact)
}

/// One chain as WanPipeline runs it: set_timesteps, set_begin_index(0), one step per timestep,
/// each step's output the next step's sample. Stops at the first error.
fn chain(
    s: &mut Scheduler,
    case: &Value,
    r: &Value,
    tensors: &HashMap<String, Tensor>,
    begin_index: bool,
) -> Vec<wan::Result<Tensor>> {
    chain_on(s, case, r, tensors, begin_index, Device::Cpu)
}

/// [`chain`] with the samples and model outputs on `device`; the outputs come back to the CPU.
fn chain_on(
    s: &mut Scheduler,
    case: &Value,
    r: &Value,
    tensors: &HashMap<String, Tensor>,
    begin_index: bool,
    device: Device,
) -> Vec<wan::Result<Tensor>> {
    let steps = case["steps"].as_u64().unwrap() as usize;
    s.set_timesteps(steps).unwrap();
    if begin_index {
        s.set_begin_index(0);
    }
    let key = r["inputs"].as_str().unwrap();
    let mut sample = tensors[&format!("{key}/sample")].to_device(device);
    let mut outs = Vec::new();
    for (k, &t) in s.timesteps().to_vec().iter().enumerate() {
        let mo = tensors[&format!("{key}/model_output/{k}")].to_device(device);
        let out = s.step(&mo, t, &sample).map(|o| {
            sample = o.shallow_clone();
            o.to_device(Device::Cpu)
        });
        let failed = out.is_err();
        outs.push(out);
        if failed {
            break;
        }
    }
    outs
}

#[test]
fn every_step_equals_diffusers() {
    let (worst, compared, bit_exact) =
        compare_runs(|case, r, t| chain(&mut scheduler(case), case, r, t, true));
    eprintln!(
        "{compared} step outputs: max |rust - diffusers| = {worst:e}, bit-exact {bit_exact}/{compared}"
    );
    assert!(compared > 1000, "{compared}");
    // Bit-exact where the fixture was written (asserted when SCHEDULER_PARITY_EXACT=1 is set).
    if std::env::var("SCHEDULER_PARITY_EXACT").as_deref() == Ok("1") {
        assert_eq!(bit_exact, compared);
    }
}

/// Every chain with its samples on CUDA device 0. Against the CPU fixture: within 1e-5 where the
/// model outputs are float32 (libdevice's log/expm1 may differ from the CPU's in the last ulp),
/// within 0.05 where they are bf16 (one rounding of `sigma * model_output` to bf16 that falls
/// the other way moves a sample by a bf16 ulp, 2^-7 of the value). Against diffusers' own CUDA
/// steps when `SCHEDULER_CUDA_FIXTURE` names a directory that
/// `scripts/export_scheduler_fixture.py --device cuda` wrote on the same host: within
/// [`TOLERANCE`], bit-exact asserted with `SCHEDULER_PARITY_EXACT=1`.
#[test]
fn steps_on_cuda() {
    let Some(index) = common::cuda() else { return };
    let device = Device::Cuda(index);
    let run = |case: &Value, r: &Value, t: &HashMap<String, Tensor>| {
        chain_on(&mut scheduler(case), case, r, t, true, device)
    };
    // float32 on CUDA against float32 on the CPU: other kernels (fused multiply-adds, other
    // reduction orders in the einsums and linalg_solve) round otherwise, and a 50-step chain of
    // order 3 carries it on: 1.55e-5 at step 16 of `unipc_order3/50` on an H100. Differences are
    // taken relative to each output's scale: element by element (relative above 1),
    // `unipc_epsilon_noise/2` with a bfloat16 model output differed by 7.3e-2 at step 0 on an
    // H100, where epsilon prediction subtracts near-equal values and divides by 1 - sigma.
    let cpu_tolerance = |r: &Value| {
        if r["model_output_dtype"] == "bfloat16" {
            0.05
        } else {
            1e-4
        }
    };
    let (worst, compared, bit_exact) =
        compare_runs_with(&fixture(), (max_diff_of_scale, cpu_tolerance), run);
    eprintln!(
        "CUDA against diffusers on the CPU: {compared} step outputs, max diff {worst:e}, bit-exact {bit_exact}/{compared}"
    );
    assert!(compared > 1000, "{compared}");
    if let Some(dir) = std::env::var_os("SCHEDULER_CUDA_FIXTURE") {
        let (worst, compared, bit_exact) =
            compare_runs_with(Path::new(&dir), (max_diff, |_| TOLERANCE), run);
        eprintln!(
            "CUDA against diffusers on CUDA: {compared} step outputs, max diff {worst:e}, bit-exact {bit_exact}/{compared}"
        );
        assert!(compared > 1000, "{compared}");
        if std::env::var("SCHEDULER_PARITY_EXACT").as_deref() == Ok("1") {
            assert_eq!(bit_exact, compared);
        }
    }
}

#[test]
fn a_second_generation_on_the_same_scheduler_repeats_diffusers() {
    // Each chain runs twice on one scheduler (set_timesteps resets it); both must match.
    let (worst, compared, _) = compare_runs(|case, r, t| {
        let mut s = scheduler(case);
        let first = chain(&mut s, case, r, t, true);
        // Leave the scheduler mid-generation too before starting again.
        let _ = chain(&mut s, case, r, t, true).into_iter().take(1).count();
        let second = chain(&mut s, case, r, t, true);
        assert_eq!(first.len(), second.len());
        second
    });
    assert!(compared > 1000 && worst <= TOLERANCE);
}

#[test]
fn the_first_timestep_finds_the_start_without_a_begin_index() {
    let (worst, compared, _) =
        compare_runs(|case, r, t| chain(&mut scheduler(case), case, r, t, false));
    assert!(compared > 1000 && worst <= TOLERANCE);
}

#[test]
fn wans_shipped_config_is_unipc_flow_shift_3() {
    // Wan-AI/Wan2.1-T2V-*-Diffusers scheduler/scheduler_config.json.
    let text = r#"{"_class_name":"UniPCMultistepScheduler","_diffusers_version":"0.33.0.dev0","beta_end":0.02,"beta_schedule":"linear","beta_start":0.0001,"disable_corrector":[],"dynamic_thresholding_ratio":0.995,"final_sigmas_type":"zero","flow_shift":3.0,"lower_order_final":true,"num_train_timesteps":1000,"predict_x0":true,"prediction_type":"flow_prediction","rescale_betas_zero_snr":false,"sample_max_value":1.0,"solver_order":2,"solver_p":null,"solver_type":"bh2","steps_offset":0,"thresholding":false,"timestep_spacing":"linspace","trained_betas":null,"use_beta_sigmas":false,"use_exponential_sigmas":false,"use_flow_sigmas":true,"use_karras_sigmas":false}"#;
    let dir = std::env::temp_dir().join(format!("wan_scheduler_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("scheduler_config.json");
    std::fs::write(&path, text).unwrap();
    let s = Scheduler::from_file(&path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    match &s {
        Scheduler::UniPc(u) => {
            assert_eq!(u.config(), &UniPcConfig::wan2_1());
            assert_eq!(u.solver_type(), SolverType::Bh2);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.class_name(), "UniPCMultistepScheduler");
    // diffusers maps the DPM-Solver names to bh2.
    let s = Scheduler::from_json(&text.replace("\"bh2\"", "\"midpoint\"")).unwrap();
    assert!(matches!(&s, Scheduler::UniPc(u) if u.solver_type() == SolverType::Bh2));
    let s = Scheduler::from(
        FlowMatchEulerDiscreteScheduler::new(FlowMatchEulerConfig::with_shift(5.0)).unwrap(),
    );
    assert_eq!(s.class_name(), "FlowMatchEulerDiscreteScheduler");
}

fn refused(text: &str) -> SchedulerError {
    Scheduler::from_json(text).unwrap_err()
}

fn unipc(extra: &str) -> String {
    let mut v = serde_json::to_value(UniPcConfig::wan2_1()).unwrap();
    let extra: Value = serde_json::from_str(extra).unwrap();
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v["_class_name"] = "UniPCMultistepScheduler".into();
    v.to_string()
}

fn euler(extra: &str) -> String {
    let mut v: Value = serde_json::from_str(extra).unwrap();
    v["_class_name"] = "FlowMatchEulerDiscreteScheduler".into();
    v.to_string()
}

#[test]
fn bad_configs_are_refused_by_key() {
    let e = refused(r#"{"_class_name": "DDIMScheduler"}"#);
    assert!(matches!(&e, SchedulerError::UnknownClass { name: Some(n) } if n == "DDIMScheduler"));
    assert!(e.to_string().contains("DDIMScheduler"), "{e}");
    assert!(matches!(
        refused(r#"{"flow_shift": 3.0}"#),
        SchedulerError::UnknownClass { name: None }
    ));
    assert!(matches!(refused("not json"), SchedulerError::Json(_)));
    assert!(matches!(
        refused(&unipc(r#"{"solver_order": "two"}"#)),
        SchedulerError::Json(_)
    ));
    for (extra, key) in [
        (r#"{"thresholding": true}"#, "thresholding"),
        (r#"{"use_karras_sigmas": true}"#, "use_karras_sigmas"),
        (
            r#"{"use_exponential_sigmas": true}"#,
            "use_exponential_sigmas",
        ),
        (r#"{"use_beta_sigmas": true}"#, "use_beta_sigmas"),
        (r#"{"use_dynamic_shifting": true}"#, "use_dynamic_shifting"),
        (r#"{"use_flow_sigmas": false}"#, "use_flow_sigmas"),
        (
            r#"{"use_flow_sigmas": false, "prediction_type": "epsilon", "beta_schedule": "squaredcos_cap_v2"}"#,
            "beta_schedule",
        ),
        (
            r#"{"use_flow_sigmas": false, "prediction_type": "epsilon", "rescale_betas_zero_snr": true}"#,
            "rescale_betas_zero_snr",
        ),
        (
            r#"{"use_flow_sigmas": false, "prediction_type": "epsilon", "trained_betas": [0.1, 0.2]}"#,
            "trained_betas",
        ),
        (r#"{"shift_terminal": 0.1}"#, "shift_terminal"),
        (
            r#"{"solver_p": {"_class_name": "DDIMScheduler"}}"#,
            "solver_p",
        ),
    ] {
        match refused(&unipc(extra)) {
            SchedulerError::Unsupported { key: k, .. } => assert_eq!(k, key, "{extra}"),
            other => panic!("{extra}: {other:?}"),
        }
        let e = refused(&unipc(extra));
        assert!(e.to_string().starts_with(key), "{e}");
    }
    for (extra, key) in [
        (r#"{"solver_type": "bh3"}"#, "solver_type"),
        (r#"{"predict_x0": false}"#, "predict_x0"),
        (r#"{"prediction_type": "noise"}"#, "prediction_type"),
        (r#"{"solver_order": 0}"#, "solver_order"),
        (r#"{"final_sigmas_type": "sigma_max"}"#, "final_sigmas_type"),
        (r#"{"timestep_spacing": "uniform"}"#, "timestep_spacing"),
        (r#"{"beta_schedule": "cosine"}"#, "beta_schedule"),
        (r#"{"flow_shift": -1.0}"#, "flow_shift"),
        (r#"{"num_train_timesteps": 0}"#, "num_train_timesteps"),
    ] {
        match refused(&unipc(extra)) {
            SchedulerError::Invalid { key: k, .. } => assert_eq!(k, key, "{extra}"),
            other => panic!("{extra}: {other:?}"),
        }
    }
    for (extra, key) in [
        (r#"{"use_dynamic_shifting": true}"#, "use_dynamic_shifting"),
        (r#"{"invert_sigmas": true}"#, "invert_sigmas"),
        (r#"{"stochastic_sampling": true}"#, "stochastic_sampling"),
        (r#"{"use_karras_sigmas": true}"#, "use_karras_sigmas"),
        (r#"{"shift_terminal": 0.1}"#, "shift_terminal"),
    ] {
        match refused(&euler(extra)) {
            SchedulerError::Unsupported { key: k, .. } => assert_eq!(k, key, "{extra}"),
            other => panic!("{extra}: {other:?}"),
        }
    }
    assert!(matches!(
        refused(&euler(r#"{"shift": 0.0}"#)),
        SchedulerError::Invalid { key: "shift", .. }
    ));
    // Unknown keys are ignored, as diffusers does.
    Scheduler::from_json(&unipc(r#"{"some_future_key": [1, 2]}"#)).unwrap();
    Scheduler::from_json(&euler(r#"{"shift": 3, "some_future_key": null}"#)).unwrap();
}

#[test]
fn files_and_calls_are_refused_with_typed_errors() {
    let missing = fixture().join("no_such_dir/scheduler_config.json");
    match Scheduler::from_file(&missing) {
        Err(Error::Io { path, .. }) => assert_eq!(path, missing),
        other => panic!("{other:?}"),
    }
    let dir = std::env::temp_dir().join(format!("wan_scheduler_bad_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("scheduler_config.json");
    std::fs::write(&bad, unipc(r#"{"use_karras_sigmas": true}"#)).unwrap();
    let e = Scheduler::from_file(&bad).unwrap_err();
    std::fs::remove_dir_all(&dir).unwrap();
    match &e {
        Error::SchedulerConfig {
            path,
            source: SchedulerError::Unsupported { key, .. },
        } => {
            assert_eq!(path, &bad);
            assert_eq!(*key, "use_karras_sigmas");
        }
        other => panic!("{other:?}"),
    }
    // The scheduler's error is the source, printed once (below the message in `{:?}`).
    let source = std::error::Error::source(&e).expect("a source");
    assert!(source.is::<SchedulerError>(), "{e:?}");
    assert!(
        source.to_string().contains("use_karras_sigmas is true"),
        "{e:?}"
    );
    assert!(
        !e.to_string().contains("use_karras_sigmas is true"),
        "{e:?}"
    );
    assert_eq!(
        format!("{e:?}")
            .matches("use_karras_sigmas is true")
            .count(),
        1
    );

    let x = Tensor::zeros([1, 4, 2, 3, 3], (Kind::Float, tch::Device::Cpu));
    for mut s in [
        Scheduler::from(UniPcMultistepScheduler::new(UniPcConfig::wan2_1()).unwrap()),
        Scheduler::from(
            FlowMatchEulerDiscreteScheduler::new(FlowMatchEulerConfig::with_shift(3.0)).unwrap(),
        ),
    ] {
        let name = s.class_name();
        assert!(matches!(
            s.step(&x, 999.0, &x),
            Err(Error::Scheduler(SchedulerError::NoTimesteps))
        ));
        assert!(matches!(
            s.set_timesteps(0),
            Err(Error::Scheduler(SchedulerError::Invalid {
                key: "num_inference_steps",
                ..
            }))
        ));
        s.set_timesteps(2).unwrap();
        let t = s.timesteps().to_vec();
        let wrong = Tensor::zeros([1, 4, 2, 3, 2], (Kind::Float, tch::Device::Cpu));
        assert!(
            matches!(
                s.step(&wrong, t[0], &x),
                Err(Error::Scheduler(SchedulerError::Shape { .. }))
            ),
            "{name}"
        );
        assert_eq!(
            s.step_index(),
            None,
            "{name}: a refused step changes nothing"
        );
        let _ = s.step(&x, t[0], &x).unwrap();
        let _ = s.step(&x, t[1], &x).unwrap();
        assert!(
            matches!(
                s.step(&x, t[1], &x),
                Err(Error::Scheduler(SchedulerError::Finished { steps: 2 }))
            ),
            "{name}"
        );
    }
    // Euler's first step must find its timestep (diffusers raises IndexError); UniPC takes the
    // last index, as diffusers does.
    let mut s = Scheduler::from(
        FlowMatchEulerDiscreteScheduler::new(FlowMatchEulerConfig::with_shift(3.0)).unwrap(),
    );
    s.set_timesteps(2).unwrap();
    assert!(matches!(
        s.step(&x, 123.5, &x),
        Err(Error::Scheduler(SchedulerError::UnknownTimestep { .. }))
    ));
    let mut s = Scheduler::from(UniPcMultistepScheduler::new(UniPcConfig::wan2_1()).unwrap());
    s.set_timesteps(2).unwrap();
    let _ = s.step(&x, 123.5, &x).unwrap();
    assert_eq!(s.step_index(), Some(2));
}
