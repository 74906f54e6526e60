//! `offload-bench`: the wan crate's `WanTransformer3DModel` (diffusers' Wan2.1-T2V transformer:
//! its parameter names, rotary embedding and float32 modules) with seeded random bf16 weights, or
//! a diffusers checkpoint's, run resident and streamed through the layerwise offload manager, on
//! one GPU or several, against the PCIe floor.
//!
//! ```text
//! cargo run --release -p offload-bench -- --help
//! offload-bench --preset wan-14b --tokens 1024,4096 --budgets 14.5 --trace trace.json
//! offload-bench --preset wan-14b --tokens 1024,4096,16384 --ctx 512
//! offload-bench --preset wan-14b --gpus 2 --tokens 1024,4096 --compress
//! ```
//! The model is the one `scripts/bench_peers.py --model wan` runs (`--model wan`, the only
//! value, is still accepted): the same configurations, weights drawn the same way (N(0, 1) in
//! bf16 times 0.02, seed 1234; float32 where diffusers keeps it), a 1-frame latent of `--tokens`
//! patches (a x b, a the largest divisor of the count not above its square root), timestep 500
//! and `--ctx` text tokens.
//! Configurations: full streaming, then one per VRAM budget in `--budgets` (GiB of block weights
//! the manager may keep on the GPU), then with `--gpus N` N GPUs streaming at once from one
//! shared pinned host copy (one driver thread each, each with its own instance of the model),
//! first each uploading every block, then as a peer group (each uploads 1/N of every block and
//! sends it to the others), then the resident model. Per configuration it prints a markdown
//! table row and one `RESULT {json}` line: median ms per forward (CUDA events, warm-up excluded),
//! the floor max(resident, streamed bytes / measured pinned H2D bandwidth), floor/measured,
//! compute stall, peak VRAM, init seconds and peak host memory. Without a CUDA device (or with
//! --cpu) the tiny preset runs in the manager's CPU test mode. Progress bars (weights, each
//! configuration's forwards) go to stderr on a terminal. With `--probe-queues` the run ends by
//! finding which of its streams share one of CUDA's hardware work queues (`queues.rs`): a
//! `QUEUES {json}` line that names the configurations whose compute, copy and decode streams
//! share one.

mod flags;
mod model;
mod queues;
mod report;
mod runs;

// The helpers the examples share (flag ranges, median, rounding, GPU name, peak RSS, progress
// bars).
use offload_testkit::{progress, util};

fn main() -> anyhow::Result<()> {
    // SAFETY: the first statement of main: no other thread exists yet to touch the environment.
    unsafe { layerwise_offload::accel::use_recommended_hardware_queues() };
    let a = flags::parse_args();
    let bench = runs::Bench::new(&a)?;
    let streamed = runs::streaming(&a, &bench)?;
    let multi = runs::several_gpus(&a, &bench)?;
    let resident = runs::resident(&a, &bench)?;
    report::print(&a, &bench, &streamed.rows, &multi, &resident);
    eprintln!("{}", streamed.stats_table);
    if a.probe_queues {
        queues::report(&bench, &streamed.rows)?;
    }
    Ok(())
}
