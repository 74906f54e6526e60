"""Writes tests/fixtures/schedulers/: diffusers' UniPCMultistepScheduler (with flow sigmas, as
WanPipeline ships it) and FlowMatchEulerDiscreteScheduler, for several configurations and step
counts: the timesteps and sigmas after set_timesteps, and a chain of steps on fixed random samples
and model outputs with every step's output. tests/wan_scheduler.rs compares the Rust schedulers
(wan/src/scheduler/) with it. Rerun only to regenerate the fixture (needs torch and diffusers):

    .venv/bin/python scripts/export_scheduler_fixture.py [--out tests/fixtures/schedulers]

With --device cuda (on a CUDA host, --out elsewhere) the same chains run there; tests/wan_scheduler.rs
compares its CUDA steps with such a directory when SCHEDULER_CUDA_FIXTURE names it.

Files: cases.json (one entry per configuration and step count: the configuration as
scheduler_config.json would hold it, timesteps, sigmas, and the runs) and runs.safetensors (the
inputs, shared by all cases with the same step count and dtypes, and each run's outputs).
"""

import argparse
import json
import os

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from safetensors.torch import save_file

# Wan2.1's scheduler/scheduler_config.json as Wan-AI ships it (Wan2.1-T2V-*-Diffusers).
WAN = {
    "_class_name": "UniPCMultistepScheduler",
    "_diffusers_version": "0.33.0.dev0",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}

CONFIGS = {
    "unipc_wan_shift3": WAN,
    "unipc_wan_shift5": {**WAN, "flow_shift": 5.0},
    "unipc_order1": {**WAN, "solver_order": 1},
    "unipc_order3": {**WAN, "solver_order": 3},
    "unipc_order3_no_lower_order_final": {**WAN, "solver_order": 3, "lower_order_final": False},
    "unipc_order3_no_lower_order_final_sigma_min": {**WAN, "solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"},
    "unipc_bh1": {**WAN, "solver_type": "bh1"},
    "unipc_bh1_order3_sigma_min": {**WAN, "solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"},
    "unipc_sigma_min": {**WAN, "final_sigmas_type": "sigma_min"},
    "unipc_disable_corrector_0": {**WAN, "disable_corrector": [0]},
    "unipc_disable_corrector_0_2_order3": {**WAN, "disable_corrector": [0, 2], "solver_order": 3},
    "unipc_trailing_shift1": {**WAN, "timestep_spacing": "trailing", "flow_shift": 1.0},
    # Without flow sigmas (image models' configurations; WanPipeline does not use them).
    "unipc_flow_sigmas_epsilon": {**WAN, "prediction_type": "epsilon"},
    "unipc_epsilon_linear": {"_class_name": "UniPCMultistepScheduler"},
    "unipc_epsilon_leading_sigma_min": {"_class_name": "UniPCMultistepScheduler", "timestep_spacing": "leading", "steps_offset": 1, "final_sigmas_type": "sigma_min"},
    "unipc_v_scaled_linear_trailing": {"_class_name": "UniPCMultistepScheduler", "prediction_type": "v_prediction", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "timestep_spacing": "trailing"},
    "unipc_sample_order3_bh1": {"_class_name": "UniPCMultistepScheduler", "prediction_type": "sample", "solver_order": 3, "solver_type": "bh1"},
    "unipc_epsilon_noise": {"_class_name": "UniPCMultistepScheduler", "predict_x0": False},
    "unipc_v_noise_order3_sigma_min": {"_class_name": "UniPCMultistepScheduler", "prediction_type": "v_prediction", "predict_x0": False, "solver_order": 3, "final_sigmas_type": "sigma_min"},
    "unipc_sample_noise_disable_corrector_1": {"_class_name": "UniPCMultistepScheduler", "prediction_type": "sample", "predict_x0": False, "disable_corrector": [1]},
    "euler_shift1": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0},
    "euler_shift7": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 7.0},
    "euler_shift3": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
}
STEPS = [1, 2, 3, 10, 50]
SHAPE = (1, 4, 2, 3, 3)
# (model output dtype, sample dtype): WanPipeline steps bf16 model outputs on float32 latents.
DTYPES = [("float32", "float32"), ("bfloat16", "float32")]
EXTRA = [("unipc_wan_shift3", 10, ("bfloat16", "bfloat16")), ("euler_shift3", 10, ("bfloat16", "bfloat16"))]


def build(config):
    cls = {"UniPCMultistepScheduler": UniPCMultistepScheduler, "FlowMatchEulerDiscreteScheduler": FlowMatchEulerDiscreteScheduler}
    return cls[config["_class_name"]].from_config(config)


def inputs(tensors, steps, dtypes):
    """The chain's first sample and one model output per step, seeded by the step count."""
    mo_dtype, sample_dtype = dtypes
    key = f"in/{steps}/{mo_dtype}/{sample_dtype}"
    if key + "/sample" not in tensors:
        g = torch.Generator().manual_seed(1000 + steps)
        tensors[key + "/sample"] = torch.randn(SHAPE, generator=g).to(getattr(torch, sample_dtype))
        for k in range(steps):
            tensors[f"{key}/model_output/{k}"] = torch.randn(SHAPE, generator=g).to(getattr(torch, mo_dtype))
    return key


DEVICE = "cpu"


def run(scheduler, tensors, steps, dtypes, out_key):
    key = inputs(tensors, steps, dtypes)
    scheduler.set_timesteps(steps, device=DEVICE)  # as WanPipeline does
    scheduler.set_begin_index(0)  # as WanPipeline does
    sample = tensors[key + "/sample"].to(DEVICE)
    record = {"model_output_dtype": dtypes[0], "sample_dtype": dtypes[1], "inputs": key, "outputs": out_key}
    for k, t in enumerate(scheduler.timesteps):
        try:
            mo = tensors[f"{key}/model_output/{k}"].to(DEVICE)
            sample = scheduler.step(mo, t, sample, return_dict=False)[0]
        except RuntimeError as e:
            # Order 3 at a final sigma of zero without lower_order_final: a singular system
            # (LinAlgError); bf16 model outputs without predict_x0: einsum of float32 and bf16.
            record["error_at_step"] = k
            record["error"] = str(e)
            break
        tensors[f"{out_key}/{k}"] = sample.contiguous().cpu()
    record["completed_steps"] = k + 1 if "error" not in record else k
    record["output_dtype"] = str(sample.dtype).removeprefix("torch.")
    return record


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "schedulers"))
    ap.add_argument("--device", default="cpu", help="where the steps run (the inputs are drawn on the CPU)")
    a = ap.parse_args()
    global DEVICE
    DEVICE = a.device
    tensors = {}
    cases = []
    for name, config in CONFIGS.items():
        for steps in STEPS:
            scheduler = build(config)
            scheduler.set_timesteps(steps)
            ts = scheduler.timesteps
            case = {
                "name": f"{name}/{steps}",
                "config": config,
                "steps": steps,
                "timesteps_dtype": str(ts.dtype).removeprefix("torch."),
                "timesteps": [float(t) for t in ts.tolist()],
                "sigmas": [float(s) for s in scheduler.sigmas.tolist()],
                "runs": [],
            }
            dtypes = list(DTYPES) + [d for (n, s, d) in EXTRA if n == name and s == steps]
            for d in dtypes:
                case["runs"].append(run(build(config), tensors, steps, d, f"out/{name}/{steps}/{d[0]}/{d[1]}"))
            # The same scheduler again after set_timesteps: a second generation repeats the first.
            again = run(scheduler, tensors, steps, DTYPES[0], f"again/{name}/{steps}")
            same = "error" in again or all(torch.equal(tensors[f"again/{name}/{steps}/{k}"], tensors[f"{case['runs'][0]['outputs']}/{k}"], ) or
                       torch.equal(tensors[f"again/{name}/{steps}/{k}"].isnan(), tensors[f"{case['runs'][0]['outputs']}/{k}"].isnan())
                       for k in range(steps))
            assert same, f"{name}/{steps}: a second run differs"
            for k in range(again["completed_steps"]):
                del tensors[f"again/{name}/{steps}/{k}"]
            del again
            cases.append(case)
    os.makedirs(a.out, exist_ok=True)
    save_file(tensors, os.path.join(a.out, "runs.safetensors"))
    import diffusers
    import numpy

    with open(os.path.join(a.out, "cases.json"), "w") as f:
        json.dump({"versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "numpy": numpy.__version__},
               "device": str(torch.cuda.get_device_name(0)) if DEVICE.startswith("cuda") else DEVICE,
                   "shape": list(SHAPE), "cases": cases}, f, indent=1)
        f.write("\n")
    print("wrote", a.out, len(cases), "cases", len(tensors), "tensors")


if __name__ == "__main__":
    main()
