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
//! configuration's forwards) go to stderr on a terminal.

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, ValueEnum, error::ErrorKind};
use indicatif::{MultiProgress, ProgressBar};
use layerwise_offload::accel::{self, Event, Stream};
use layerwise_offload::{Checkpoint, LayerwiseOffloadManager, OffloadConfig, PeerGroup};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind, Tensor, nn};
use wan::WanTransformer3DModel;

// The helpers the examples share (flag ranges, median, rounding, GPU name, peak RSS).
#[path = "../../examples/common/util.rs"]
mod util;
use util::{gpu_name, int_in, median, peak_rss_bytes, pinned_h2d_gib_s, round2, wan_grid};
#[path = "../../examples/common/progress.rs"]
mod progress;

#[derive(Debug, Clone)]
struct Shape {
    preset: String,
    layers: usize,
    dim: i64,
    ffn: i64,
    heads: i64,
    ctx: i64,
    /// The transformer's configuration (the preset's with the overrides, or the checkpoint's).
    wan: wan::Config,
}

/// The models: one, since offload-bench's own Wan-shaped block stack gave way to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Model {
    /// The wan crate's WanTransformer3DModel (diffusers' Wan2.1-T2V transformer), as
    /// scripts/bench_peers.py --model wan builds diffusers' own.
    Wan,
}

/// The model presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Preset {
    /// 6 blocks, dim 256 (4 heads of 64), ffn 1024, text width 128, Wan2.1-1.3B's other values
    /// (the default without CUDA).
    Tiny,
    /// Wan2.1-T2V-1.3B: 30 blocks, dim 1536 (12 heads of 128), ffn 8960 (the default with CUDA).
    #[value(name = "wan-1.3b")]
    Wan1_3b,
    /// Wan2.1-T2V-14B: 40 blocks, dim 5120 (40 heads of 128), ffn 13824.
    #[value(name = "wan-14b")]
    Wan14b,
}

/// Weight distributions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Dist {
    /// N(0, 0.02).
    Normal,
    /// N(0, 0.02) with a log-normal scale per row: exp(0.5 z), z ~ N(0, 1).
    RowScaled,
}

/// `shape` drawn from `dist` on `origin` in bf16 (after the caller's seed).
fn draw(shape: &[i64], origin: Device, dist: Dist) -> Tensor {
    let t = Tensor::randn(shape, (Kind::BFloat16, origin)) * 0.02;
    match (dist, shape.first()) {
        (Dist::RowScaled, Some(&rows)) if shape.len() > 1 => {
            let mut scale_shape = vec![rows];
            scale_shape.extend(std::iter::repeat_n(1, shape.len() - 1));
            let z = Tensor::randn(scale_shape.as_slice(), (Kind::Float, origin));
            (t.to_kind(Kind::Float) * (z * 0.5).exp()).to_kind(Kind::BFloat16)
        }
        _ => t,
    }
}

/// Several-GPU modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Each GPU uploads every block from the shared host copy.
    Shared,
    /// A peer group: each GPU uploads 1/N of every block and sends it to the others.
    Peer,
}

/// Most blocks, model width, heads, MLP width, context tokens and tokens per forward accepted.
const MAX_LAYERS: i64 = 1000;
const MAX_DIM: i64 = 65536;
const MAX_TOKENS: i64 = 1 << 20;

/// Diffusers' Wan2.1 WanTransformer3DModel from the wan crate (as scripts/bench_peers.py --model
/// wan builds it) with seeded random weights or a checkpoint's, run resident and streamed
/// through the layerwise offload manager, against the PCIe floor.
///
/// Configurations: full streaming, then one per VRAM budget in --budgets, then with --gpus N
/// N GPUs streaming at once from one shared pinned host copy (each GPU with its own instance of
/// the model, each uploading every block, then as a peer group), then the resident model. Per
/// configuration: a markdown table row and one `RESULT {json}` line (median ms per forward, the
/// floor max(resident, streamed bytes / measured pinned H2D bandwidth), floor/measured, compute
/// stall, peak VRAM, init seconds, peak host memory). Without a CUDA device (or with --cpu) it runs in the manager's CPU test mode.
#[derive(Debug, Parser)]
#[command(name = "offload-bench", version, allow_negative_numbers = true)]
struct Cli {
    /// The model: the wan crate's WanTransformer3DModel (diffusers' Wan2.1), the only one (the
    /// flag stays for scripts that pass --model wan).
    #[arg(long, value_enum, default_value_t = Model::Wan)]
    model: Model,
    /// Model preset (default: wan-1.3b with CUDA, tiny without).
    #[arg(long, value_enum)]
    preset: Option<Preset>,
    /// Number of blocks (overrides the preset).
    #[arg(long, value_parser = int_in(1, MAX_LAYERS))]
    layers: Option<i64>,
    /// Model width (overrides the preset); a multiple of --heads.
    #[arg(long, value_parser = int_in(1, MAX_DIM))]
    dim: Option<i64>,
    /// MLP width (overrides the preset).
    #[arg(long, value_parser = int_in(1, 4 * MAX_DIM))]
    ffn: Option<i64>,
    /// Attention heads (overrides the preset); must divide --dim.
    #[arg(long, value_parser = int_in(1, 1024))]
    heads: Option<i64>,
    /// Tokens per forward, comma-separated: one measurement each (default 1024 with CUDA, 64
    /// without).
    #[arg(long, value_delimiter = ',', value_parser = int_in(1, MAX_TOKENS))]
    tokens: Vec<i64>,
    /// Text-embedding tokens (the cross-attention's context).
    #[arg(long, default_value_t = 512, value_parser = int_in(1, MAX_DIM))]
    ctx: i64,
    /// Blocks uploaded ahead of the one computing.
    #[arg(long, default_value_t = 1, value_parser = int_in(1, 16))]
    depth: i64,
    /// Timed forwards per configuration (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = int_in(1, 10_000))]
    reps: i64,
    /// Untimed forwards first.
    #[arg(long, default_value_t = 2, value_parser = int_in(0, 10_000))]
    warmup: i64,
    /// VRAM budgets to measure, in GiB of block weights kept resident, comma-separated.
    #[arg(long, value_delimiter = ',', value_parser = parse_gib)]
    budgets: Vec<f64>,
    /// GPUs streaming at once from one host copy, each with its own instance of the model (CPU
    /// test mode: that many CPU "devices").
    #[arg(long, default_value_t = 1, value_parser = int_in(1, 64))]
    gpus: i64,
    /// Modes of the several-GPU runs, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Mode::Shared, Mode::Peer])]
    modes: Vec<Mode>,
    /// Only the several-GPU runs (and the resident one).
    #[arg(long)]
    multi_only: bool,
    /// Peer groups: one push stream per receiving GPU.
    #[arg(long)]
    push_per_gpu: bool,
    /// Write a Chrome trace of one streamed forward to this file (needs a CUDA device).
    #[arg(long, value_name = "FILE.json")]
    trace: Option<PathBuf>,
    /// Skip the resident model.
    #[arg(long)]
    no_resident: bool,
    /// Run on the CPU, in the manager's CPU test mode, even with a CUDA device.
    #[arg(long)]
    cpu: bool,
    /// A diffusers Wan transformer directory (config.json with safetensors, single or
    /// sharded): the weights come from it through the crate's checkpoint loader, and its
    /// config.json replaces the preset and the overrides. The several-GPU runs read it into
    /// one pinned host copy (without --zero-copy or --host-budget).
    #[arg(long, value_name = "DIR")]
    checkpoint: Option<PathBuf>,
    /// With --checkpoint: the files' own pages are the host store (OffloadConfig::zero_copy).
    #[arg(long, requires = "checkpoint")]
    zero_copy: bool,
    /// Every configuration also with compressed transport (OffloadConfig::compress), its rows
    /// beside the raw ones.
    #[arg(long)]
    compress: bool,
    /// Run everything on a high-priority stream of the pool instead of the default stream, so
    /// that the GPU schedules the model's kernels before the decode kernels of compressed
    /// transport (the manager's copy and decode streams have normal priority).
    #[arg(long)]
    high_priority_compute: bool,
    /// The weights' distribution: N(0, 0.02) in bf16, or each row (output) of a weight with
    /// its own scale 0.02 exp(0.5 z), z ~ N(0, 1), as trained linear layers' rows differ.
    #[arg(long, value_enum, default_value_t = Dist::Normal)]
    dist: Dist,
    /// With --checkpoint: GiB of blocks held in host memory; the others are read from the
    /// checkpoint at every forward (OffloadConfig::host_budget).
    #[arg(long, value_name = "GIB", requires = "checkpoint", value_parser = parse_gib)]
    host_budget: Option<f64>,
}

/// A number of GiB: finite, in [0, 1048576].
fn parse_gib(s: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=1048576.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number of GiB in [0, 1048576]")),
    }
}

/// The checks clap's ranges cannot express; a bad value exits as clap's errors do.
fn check(a: &Cli, s: &Shape, cuda: bool) {
    let fail = |msg: String| -> ! { Cli::command().error(ErrorKind::ValueValidation, msg).exit() };
    if s.dim % s.heads != 0 {
        fail(format!(
            "--dim {} is not a multiple of --heads {}: pick heads that divide dim",
            s.dim, s.heads
        ));
    }
    let c = &s.wan;
    if let Err(e) = c.validate() {
        fail(format!("--dim {} --heads {}: {e}", s.dim, s.heads));
    }
    for &t in &a.tokens {
        let (_, w) = wan_grid(t);
        if w > c.rope_max_seq_len {
            fail(format!(
                "--tokens {t}: a 1 x {} x {w} patch grid exceeds rope_max_seq_len {}",
                t / w,
                c.rope_max_seq_len
            ));
        }
    }
    let cpu = a.cpu || !cuda;
    if !cpu && a.gpus > accel::cuda_device_count().max(1) as i64 {
        fail(format!(
            "--gpus {} but {} CUDA devices are visible: use 1..={}",
            a.gpus,
            accel::cuda_device_count(),
            accel::cuda_device_count().max(1)
        ));
    }
    if let Some(path) = &a.trace {
        if cpu {
            fail(format!(
                "--trace {} needs a CUDA device (timelines are recorded with CUDA events); drop --trace or --cpu",
                path.display()
            ));
        }
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir.filter(|d| !d.is_dir()) {
            fail(format!(
                "--trace {}: the directory {} does not exist",
                path.display(),
                dir.display()
            ));
        }
    }
}

fn shape(a: &Cli, cuda: bool) -> Shape {
    let preset = a
        .preset
        .unwrap_or(if cuda { Preset::Wan1_3b } else { Preset::Tiny });
    let (layers, dim, ffn, heads) = match preset {
        Preset::Tiny => (6, 256, 1024, 4),
        Preset::Wan1_3b => (30, 1536, 8960, 12),
        Preset::Wan14b => (40, 5120, 13824, 40),
    };
    let (layers, dim, ffn, heads) = (
        a.layers.map_or(layers, |l| l as usize),
        a.dim.unwrap_or(dim),
        a.ffn.unwrap_or(ffn),
        a.heads.unwrap_or(heads),
    );
    if let Some(dir) = &a.checkpoint {
        let c = wan::Config::from_file(dir.join("config.json")).unwrap_or_else(|e| {
            Cli::command()
                .error(
                    ErrorKind::ValueValidation,
                    format!("--checkpoint {}: {e}", dir.display()),
                )
                .exit()
        });
        return Shape {
            preset: dir.display().to_string(),
            layers: c.num_layers as usize,
            dim: c.inner_dim(),
            ffn: c.ffn_dim,
            heads: c.num_attention_heads,
            ctx: a.ctx,
            wan: c,
        };
    }
    // scripts/bench_peers.py's WAN_CONFIGS: Wan2.1-T2V-1.3B's and 14B's config.json, and a tiny
    // one (the dit_layer_loop example's) on 1.3B's other values.
    let base = match preset {
        Preset::Tiny => wan::Config {
            text_dim: 128,
            ..wan::Config::wan2_1_t2v_1_3b()
        },
        Preset::Wan1_3b => wan::Config::wan2_1_t2v_1_3b(),
        Preset::Wan14b => wan::Config::wan2_1_t2v_14b(),
    };
    Shape {
        preset: preset
            .to_possible_value()
            .expect("named")
            .get_name()
            .to_owned(),
        layers,
        dim,
        ffn,
        heads,
        ctx: a.ctx,
        wan: wan::Config {
            num_layers: layers as i64,
            num_attention_heads: heads,
            attention_head_dim: dim / heads,
            ffn_dim: ffn,
            ..base
        },
    }
}

/// The run, from the flags.
#[derive(Debug)]
struct Args {
    shape: Shape,
    tokens: Vec<i64>,
    depth: usize,
    reps: usize,
    warmup: usize,
    resident: bool,
    cpu: bool,
    budgets: Vec<f64>,
    trace: Option<PathBuf>,
    gpus: usize,
    modes: Vec<String>,
    push_per_gpu: bool,
    multi_only: bool,
    /// The checkpoint, with its store options.
    high_priority_compute: bool,
    compress: bool,
    dist: Dist,
    checkpoint: Option<(PathBuf, bool, Option<u64>)>,
}

/// Parses and checks the flags; a bad one exits with a one-line error naming it and its range.
fn parse_args() -> Args {
    let cli = Cli::parse();
    // The only model (the flag is accepted for scripts that name it).
    let Model::Wan = cli.model;
    let cuda = accel::cuda_is_available();
    let shape = shape(&cli, cuda);
    check(&cli, &shape, cuda);
    Args {
        shape,
        tokens: if cli.tokens.is_empty() {
            vec![if cuda && !cli.cpu { 1024 } else { 64 }]
        } else {
            cli.tokens
        },
        depth: cli.depth as usize,
        reps: cli.reps as usize,
        warmup: cli.warmup as usize,
        resident: !cli.no_resident,
        cpu: cli.cpu || !cuda,
        budgets: cli.budgets,
        trace: cli.trace,
        gpus: cli.gpus as usize,
        modes: cli
            .modes
            .iter()
            .map(|m| match m {
                Mode::Shared => "shared".to_owned(),
                Mode::Peer => "peer".to_owned(),
            })
            .collect(),
        push_per_gpu: cli.push_per_gpu,
        multi_only: cli.multi_only,
        compress: cli.compress,
        high_priority_compute: cli.high_priority_compute,
        dist: cli.dist,
        checkpoint: cli.checkpoint.clone().map(|d| {
            (
                d,
                cli.zero_copy,
                cli.host_budget.map(|g| (g * (1u64 << 30) as f64) as u64),
            )
        }),
    }
}

/// The wan crate's WanTransformer3DModel with `config`, on the CPU, drawn as
/// scripts/bench_peers.py's wan mode draws diffusers' own: every parameter (in name order) N(0, 1)
/// in bf16 on `origin` after seed 1234, times 0.02 (in bf16), then converted to `kind`, or to
/// float32 where diffusers keeps it (`wan::keeps_fp32`). Returns the model and its named
/// parameters (handles sharing their storage with the model's).
fn build_wan(
    config: &wan::Config,
    origin: Device,
    kind: Kind,
    dist: Dist,
) -> (WanTransformer3DModel, Vec<(String, Tensor)>) {
    let mut vs = nn::VarStore::new(Device::Cpu);
    // Created in `kind` (never all in float32: 14B would need 56 GiB), then diffusers' mixed
    // precision.
    vs.set_kind(kind);
    let model = WanTransformer3DModel::new(vs.root(), config);
    wan::set_kind(&mut vs, kind);
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let total: usize = named.iter().map(|(_, t)| tensor_bytes(t)).sum();
    let pb = progress::bytes(total as u64, "drawing the weights");
    tch::manual_seed(1234);
    tch::no_grad(|| {
        for (_, t) in &named {
            let r = draw(&t.size(), origin, dist);
            t.shallow_clone().copy_(&r);
            pb.inc(tensor_bytes(t) as u64);
        }
    });
    pb.finish_and_clear();
    (model, named)
}

/// The bytes of `t`'s elements.
fn tensor_bytes(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

/// A model and its named parameters (sharing their storage with the model's).
type Instance = (WanTransformer3DModel, Vec<(String, Tensor)>);

/// One GPU's own instance of the model for the several-GPU runs: the non-block weights copied
/// from `named` (another instance's) to `dev`, the block tensors uninitialized on the CPU
/// (`Tensor::empty` touches no memory): a manager over a shared host store makes them
/// placeholders, the store has the values.
fn wan_instance(
    config: &wan::Config,
    kind: Kind,
    named: &[(String, Tensor)],
    dev: Device,
) -> Instance {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = WanTransformer3DModel::new_empty(vs.root(), config, kind);
    let source: std::collections::HashMap<&str, &Tensor> =
        named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut mine: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    mine.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (n, t) in &mut mine {
            if !n.starts_with("blocks.") {
                let value = source
                    .get(n.as_str())
                    .unwrap_or_else(|| panic!("no weight {n} in the first instance"));
                t.set_data(&value.to_device(dev));
            }
        }
    });
    (model, mine)
}

/// The wan model's forward with its block loop open (as the dit_layer_loop example).
fn wan_forward(
    model: &WanTransformer3DModel,
    inputs: &[Tensor],
    mut mgr: Option<&mut LayerwiseOffloadManager>,
) -> Tensor {
    tch::no_grad(|| {
        let e = model
            .embed(&inputs[0], &inputs[1], &inputs[2])
            .expect("inputs of the model's shapes");
        let mut h = e.hidden.shallow_clone();
        for i in 0..model.blocks().len() {
            match mgr.as_deref_mut() {
                Some(m) => {
                    let _g = m.enter(i).expect("enter");
                    h = model.block(i, &h, &e);
                }
                None => h = model.block(i, &h, &e),
            }
        }
        model.head(&h, &e)
    })
}

/// Times `run` with events on the compute stream (wall clock on the CPU): the median of `reps`
/// forwards after `warmup`, each between its own two events (the host waits for each), then the
/// mean of `reps` forwards queued back to back between one pair (sustained: an upload cannot
/// hide in the host's gap between forwards). Each forward advances `pb` by one. Returns
/// (median, sustained, the last output).
fn time_forwards(
    a: &Args,
    mut run: impl FnMut() -> Tensor,
    dev: Device,
    pb: &ProgressBar,
) -> Result<(f64, f64, Tensor)> {
    let mut out = None;
    let mut ms = Vec::new();
    for i in 0..a.warmup + a.reps {
        let y = if let Device::Cuda(d) = dev {
            let s = Stream::current(d)?;
            let (mut e0, mut e1) = (Event::with_timing()?, Event::with_timing()?);
            e0.record(&s)?;
            let y = run();
            e1.record(&s)?;
            e1.synchronize()?;
            if i >= a.warmup {
                ms.push(e0.elapsed_ms(&e1)?);
            }
            y
        } else {
            let t = Instant::now();
            let y = run();
            if i >= a.warmup {
                ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
            y
        };
        pb.inc(1);
        out = Some(y);
    }
    let sustained = if let Device::Cuda(d) = dev {
        let s = Stream::current(d)?;
        let (mut e0, mut e1) = (Event::with_timing()?, Event::with_timing()?);
        e0.record(&s)?;
        for _ in 0..a.reps {
            out = Some(run());
            pb.inc(1);
        }
        e1.record(&s)?;
        e1.synchronize()?;
        e0.elapsed_ms(&e1)? / a.reps as f64
    } else {
        let t = Instant::now();
        for _ in 0..a.reps {
            out = Some(run());
            pb.inc(1);
        }
        t.elapsed().as_secs_f64() * 1e3 / a.reps as f64
    };
    Ok((median(&ms), sustained, out.expect("at least one forward")))
}

fn main() -> Result<()> {
    let a = parse_args();
    let s = &a.shape;
    let dev = if a.cpu { Device::Cpu } else { Device::Cuda(0) };
    // A checkpoint streams as stored (bf16 with diffusers' fp32 modules), also on the CPU.
    let kind = if a.cpu && a.checkpoint.is_none() {
        Kind::Float
    } else {
        Kind::BFloat16
    };
    let origin = dev;
    let device_name = match dev {
        Device::Cuda(d) => gpu_name(d),
        _ => "cpu".into(),
    };
    let bw = match dev {
        Device::Cuda(d) => pinned_h2d_gib_s(d)?,
        _ => 0.0,
    };
    // The compute stream of the whole run (the current stream of this thread).
    let _compute = match (dev, a.high_priority_compute) {
        (Device::Cuda(d), true) => {
            let s = Stream::from_pool_high_priority(d)?;
            eprintln!("compute on a high-priority stream");
            Some(accel::StreamGuard::new(&s)?)
        }
        _ => None,
    };
    let model_name = "wan";
    eprintln!(
        "building {} {model_name} weights ({} blocks, dim {}, ffn {}) on the CPU...",
        s.preset, s.layers, s.dim, s.ffn
    );
    let t0 = Instant::now();
    let ckpt = match &a.checkpoint {
        Some((dir, _, _)) => Some(std::sync::Arc::new(Checkpoint::open(dir)?)),
        None => None,
    };
    let (model, named) = match &ckpt {
        // Uninitialized: every manager below reads the checkpoint into it.
        Some(_) => {
            let vs = nn::VarStore::new(Device::Cpu);
            let model = WanTransformer3DModel::new_empty(vs.root(), &s.wan, kind);
            let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            (model, named)
        }
        None => build_wan(&s.wan, origin, kind, a.dist),
    };
    let model = &model;
    let block_bytes: usize = named
        .iter()
        .filter(|(n, _)| n.starts_with("blocks."))
        .map(|(_, t)| tensor_bytes(t))
        .sum();
    eprintln!(
        "  {:.2} GiB of block weights in {:.1} s",
        block_bytes as f64 / (1u64 << 30) as f64,
        t0.elapsed().as_secs_f64()
    );
    let host_before = peak_rss_bytes();
    // Per token count, seeded with it: the latent (1 frame, `wan_grid` patches), timestep and
    // text embeddings, as scripts/bench_peers.py's.
    let inputs: Vec<(i64, Vec<Tensor>)> = a
        .tokens
        .iter()
        .map(|&t| {
            tch::manual_seed(t);
            let c = &s.wan;
            let (gh, gw) = wan_grid(t);
            let [pt, ph, pw] = c.patch_size;
            let xs = vec![
                Tensor::randn([1, c.in_channels, pt, ph * gh, pw * gw], (kind, dev)),
                Tensor::from_slice(&[500f32]).to_device(dev),
                Tensor::randn([1, s.ctx, c.text_dim], (kind, dev)),
            ];
            (t, xs)
        })
        .collect();
    // Forwards per configuration and token count: warm-up, timed, sustained.
    let forwards = (a.warmup + 2 * a.reps) as u64;

    struct Row {
        label: String,
        tokens: i64,
        ms: f64,
        ms_sustained: f64,
        streamed_bytes: u64,
        /// The streamed blocks raw (equal to streamed_bytes without compression).
        raw_bytes: u64,
        decode_ms: f64,
        stall: f64,
        peak: u64,
        init_s: f64,
        host_peak: u64,
        resident_blocks: usize,
        out: Tensor,
    }
    let mut rows: Vec<Row> = Vec::new();
    let mut budgets: Vec<Option<f64>> = vec![None];
    budgets.extend(a.budgets.iter().map(|&b| Some(b)));
    if a.multi_only {
        budgets.clear();
    }
    // Each configuration raw, then compressed beside it (--compress).
    let configs: Vec<(Option<f64>, bool)> = budgets
        .iter()
        .flat_map(|&b| std::iter::once((b, false)).chain(a.compress.then_some((b, true))))
        .collect();
    let mut stats_table = String::new();
    for (budget, compress) in configs {
        let mut label = match budget {
            None => format!("stream d{}", a.depth),
            Some(b) => format!("budget {b} GiB d{}", a.depth),
        };
        if compress {
            label.push_str(" compressed");
        }
        match &a.checkpoint {
            Some((_, true, _)) => label.push_str(" zero-copy"),
            Some((_, _, Some(h))) => {
                label.push_str(&format!(" host {:.1} GiB", *h as f64 / (1u64 << 30) as f64))
            }
            _ => {}
        }
        let mut cfg = OffloadConfig::new("blocks", s.layers)
            .prefetch_depth(a.depth)
            .cpu_test_mode(a.cpu)
            .compress(compress);
        if let Some(b) = budget {
            cfg = cfg.vram_budget((b * (1u64 << 30) as f64) as u64);
        }
        if let (Some(c), Some((_, zero_copy, host_budget))) = (&ckpt, &a.checkpoint) {
            cfg = cfg.checkpoint(c.clone()).zero_copy(*zero_copy);
            if let Some(h) = host_budget {
                cfg = cfg.host_budget(*h);
            }
        }
        let t0 = Instant::now();
        let pb = progress::spinner(format!("{label}: initialize"));
        let mut m = cfg.build(&named)?;
        m.initialize()?;
        pb.finish_and_clear();
        let init_s = t0.elapsed().as_secs_f64();
        let host_peak = peak_rss_bytes();
        let st = m.stats().clone();
        // Bytes streamed per forward: the host copies, and the disk tier's blocks too.
        let streamed_bytes = if st.disk_blocks > 0 {
            (block_bytes * st.streamed_blocks / s.layers) as u64
        } else {
            st.host_bytes
        };
        let raw_bytes = if st.encoded_blocks > 0 {
            st.raw_encoded_bytes
        } else {
            streamed_bytes
        };
        eprintln!(
            "{label}: initialize {init_s:.2} s; {} streamed, {} resident blocks; host peak {:.2} GiB (before: {:.2} GiB)",
            st.streamed_blocks,
            st.resident_blocks,
            host_peak as f64 / (1u64 << 30) as f64,
            host_before as f64 / (1u64 << 30) as f64
        );
        for (tokens, xs) in &inputs {
            if let Device::Cuda(d) = dev {
                accel::synchronize_device(d)?;
                accel::reset_peak_memory_stats(d)?;
            }
            let (stall0, decode0) = (m.stats().stall_ms, m.stats().decode_ms);
            let pb = progress::steps(forwards, format!("{label}, {tokens} tokens: forwards"));
            let (ms, ms_sustained, y) =
                time_forwards(&a, || wan_forward(model, xs, Some(&mut m)), dev, &pb)?;
            pb.finish_and_clear();
            if let Device::Cuda(d) = dev {
                accel::synchronize_device(d)?;
            }
            let stall = (m.stats().stall_ms - stall0) / forwards as f64;
            let decode_ms = (m.stats().decode_ms - decode0) / forwards as f64;
            let peak = if let Device::Cuda(d) = dev {
                accel::memory_stats(d)?.peak_allocated
            } else {
                0
            };
            rows.push(Row {
                label: label.clone(),
                tokens: *tokens,
                ms,
                ms_sustained,
                streamed_bytes,
                raw_bytes,
                decode_ms,
                stall,
                peak,
                init_s,
                host_peak,
                resident_blocks: st.resident_blocks,
                out: y,
            });
        }
        if let (Some(path), Device::Cuda(_), true) = (&a.trace, dev, budget.is_none()) {
            // One more forward of the first size, captured as a Chrome trace.
            let (_, xs) = &inputs[0];
            m.start_timeline()?;
            let _ = wan_forward(model, xs, Some(&mut m));
            let spans = m.finish_timeline()?;
            std::fs::write(path, layerwise_offload::chrome_trace_json(&spans))
                .with_context(|| format!("writing --trace {}", path.display()))?;
            eprintln!(
                "timeline of one forward ({} spans) written to {}",
                spans.len(),
                path.display()
            );
        }
        stats_table = m.stats().to_string();
        // Every weight back on the device for the next configuration (or the CPU if it cannot
        // hold them all).
        if let Err(e) = m.restore() {
            eprintln!("restore onto the device failed ({e}); restoring onto the CPU");
            m.restore_to(Device::Cpu)?;
        }
    }
    // Several GPUs streaming at once from one host copy: each uploading every block itself, then
    // as a peer group (each uploads 1/N of every block and sends it to the others).
    let mut multi: Vec<(&str, usize, i64, f64, Tensor)> = Vec::new();
    let mut multi_host_bytes = std::collections::HashMap::new();
    // With --compress each mode runs raw, then compressed (the store holds the encodings; each
    // GPU decodes; a peer group forwards encoded shares).
    let modes: Vec<&str> = if a.gpus > 1 {
        a.modes
            .iter()
            .flat_map(|m| {
                let (raw, encoded) = if m == "peer" {
                    ("peer split", "peer split compressed")
                } else {
                    ("shared host copy", "shared host copy compressed")
                };
                std::iter::once(raw).chain(a.compress.then_some(encoded))
            })
            .collect()
    } else {
        Vec::new()
    };
    for &mode in &modes {
        let group = if mode.starts_with("peer split") {
            Some(PeerGroup::new(a.gpus)?)
        } else {
            None
        };
        // The shared host store, filled from the model (or read from the checkpoint: then this
        // manager also puts the checkpoint's non-block weights into `named`).
        let mut cfg0 = OffloadConfig::new("blocks", s.layers)
            .prefetch_depth(a.depth)
            .cpu_test_mode(a.cpu)
            .compress(mode.ends_with("compressed"));
        if let Some(c) = &ckpt {
            cfg0 = cfg0.checkpoint(c.clone());
        }
        let pb = progress::spinner(format!("{mode}: host copy"));
        let mut m0 = cfg0.build(&named)?;
        m0.initialize()?;
        pb.finish_and_clear();
        let store = m0.host_store().expect("initialized");
        multi_host_bytes.insert(mode, store.bytes());
        // Each GPU's own instance of the model: non-block weights copied to its device, block
        // tensors left uninitialized (they become placeholders; the shared store has the
        // values).
        let mut instances: Vec<Option<Instance>> = (0..a.gpus)
            .map(|g| {
                let dev_g = if a.cpu { Device::Cpu } else { Device::Cuda(g) };
                Some(wan_instance(&s.wan, kind, &named, dev_g))
            })
            .collect();
        // The inputs of the resident run, copied to each GPU here: seeding in the threads would
        // race (tch::manual_seed reseeds every device's generator, process-wide).
        let mut thread_inputs: Vec<Vec<(i64, Vec<Tensor>)>> = (0..a.gpus)
            .map(|g| {
                let dev_g = if a.cpu { Device::Cpu } else { Device::Cuda(g) };
                inputs
                    .iter()
                    .map(|(t, xs)| (*t, xs.iter().map(|x| x.to_device(dev_g)).collect()))
                    .collect()
            })
            .collect();
        let barrier = std::sync::Barrier::new(a.gpus);
        // One bar per GPU: its forwards over every token count.
        let bars = MultiProgress::new();
        let results: Vec<Result<Vec<(i64, f64, Tensor)>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..a.gpus)
                .map(|g| {
                    let dev_g = if a.cpu { Device::Cpu } else { Device::Cuda(g) };
                    let (model_g, named_g) = instances[g].take().expect("one instance per GPU");
                    let inputs_g = std::mem::take(&mut thread_inputs[g]);
                    let store = store.clone();
                    let (a, barrier) = (&a, &barrier);
                    let group = group.clone();
                    let pb = bars.add(progress::steps(
                        forwards * inputs_g.len() as u64,
                        format!("{mode}, GPU {g}: forwards"),
                    ));
                    scope.spawn(move || -> Result<Vec<(i64, f64, Tensor)>> {
                        let mut cfg = OffloadConfig::new("blocks", s.layers)
                            .prefetch_depth(a.depth)
                            .cpu_test_mode(a.cpu)
                            .device(if let Device::Cuda(i) = dev_g { i } else { 0 })
                            .host_store(store);
                        if let Some(group) = group {
                            cfg = cfg
                                .peer_group(group, g)
                                .push_stream_per_member(a.push_per_gpu);
                        }
                        let mut m = cfg.build(&named_g)?;
                        m.initialize()?;
                        let mut out = Vec::new();
                        for (tokens, xs) in inputs_g {
                            barrier.wait();
                            let (ms, _, y) = time_forwards(
                                a,
                                || wan_forward(&model_g, &xs, Some(&mut m)),
                                dev_g,
                                &pb,
                            )?;
                            out.push((tokens, ms, y.to_device(Device::Cpu)));
                        }
                        pb.finish_and_clear();
                        m.restore_to(Device::Cpu)?;
                        Ok(out)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a GPU thread panicked"))
                .collect()
        });
        for (g, r) in results.into_iter().enumerate() {
            for (tokens, ms, y) in r? {
                multi.push((mode, g, tokens, ms, y));
            }
        }
        m0.restore()?;
    }

    // Resident: every weight on the device, no manager.
    let mut resident_ms = std::collections::HashMap::new();
    let on_device = named.iter().all(|(_, t)| t.device() == dev);
    if a.resident && on_device {
        for (tokens, xs) in &inputs {
            let pb = progress::steps(forwards, format!("resident, {tokens} tokens: forwards"));
            let (ms, _, r) = time_forwards(&a, || wan_forward(model, xs, None), dev, &pb)?;
            pb.finish_and_clear();
            resident_ms.insert(*tokens, (ms, r));
        }
    } else if a.resident {
        eprintln!("resident run skipped: the weights do not fit on the device");
    }
    // The preset column names the model (the block stack's rows, before, named none).
    let preset_cell = format!("{} ({model_name})", s.preset);
    println!(
        "| device | preset | tokens | mode | ms/forward | sustained ms | floor ms | floor/measured | raw floor ms | stall ms | peak VRAM GiB | init s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let res = resident_ms.get(&r.tokens);
        let link_ms = if bw > 0.0 {
            r.streamed_bytes as f64 / (1u64 << 30) as f64 / bw * 1e3
        } else {
            0.0
        };
        let floor = link_ms.max(res.map_or(0.0, |x| x.0));
        // The floor of the raw bytes (without compression: the same).
        let raw_floor = if bw > 0.0 {
            r.raw_bytes as f64 / (1u64 << 30) as f64 / bw * 1e3
        } else {
            0.0
        }
        .max(res.map_or(0.0, |x| x.0));
        let diff = res.map(|(_, out)| {
            (out.to_kind(Kind::Float) - r.out.to_kind(Kind::Float))
                .abs()
                .max()
                .double_value(&[])
        });
        let gib = r.peak as f64 / (1u64 << 30) as f64;
        println!(
            "| {device_name} | {preset_cell} | {} | {} | {:.1} | {:.1} | {floor:.1} | {:.3} | {raw_floor:.1} | {:.1} | {gib:.2} | {:.2} |",
            r.tokens,
            r.label,
            r.ms,
            r.ms_sustained,
            if r.ms > 0.0 { floor / r.ms } else { 0.0 },
            r.stall,
            r.init_s
        );
        let result = json!({
            "device": device_name,
            "system": "layerwise-offload",
            "mode": r.label,
            "model": model_name,
            "preset": s.preset,
            "layers": s.layers,
            "dim": s.dim,
            "ffn": s.ffn,
            "tokens": r.tokens,
            "depth": a.depth,
            "resident_blocks": r.resident_blocks,
            "ms": round2(r.ms),
            "ms_sustained": round2(r.ms_sustained),
            "resident_ms": res.map(|x| round2(x.0)),
            "raw_floor_ms": round2(raw_floor),
            "raw_streamed_bytes": r.raw_bytes,
            "ratio": r.streamed_bytes as f64 / r.raw_bytes.max(1) as f64,
            "decode_ms_per_forward": round2(r.decode_ms),
            "dist": format!("{:?}", a.dist),
            "compute_stream": if a.high_priority_compute { "high priority" } else { "default" },
            "floor_ms": round2(floor),
            "stall_ms": round2(r.stall),
            "peak_vram_bytes": r.peak,
            "h2d_gib_s": round2(bw),
            "block_bytes": block_bytes,
            "streamed_bytes": r.streamed_bytes,
            "init_s": (r.init_s * 1e3).round() / 1e3,
            "host_peak_bytes": r.host_peak,
            "max_abs_diff": diff,
        });
        println!("RESULT {result}");
    }
    for (&mode, &tokens) in modes
        .iter()
        .flat_map(|m| a.tokens.iter().map(move |t| (m, t)))
    {
        let rows_t: Vec<&(&str, usize, i64, f64, Tensor)> = multi
            .iter()
            .filter(|r| r.0 == mode && r.2 == tokens)
            .collect();
        if rows_t.is_empty() {
            continue;
        }
        // Bytes every GPU receives per forward (from the host, or in a peer group from the host
        // and its peers), over the slowest GPU's time.
        let host_bytes = multi_host_bytes[mode];
        let streamed = rows_t.iter().map(|_| host_bytes as f64).sum::<f64>();
        // A peer group member's link carries 1/N of the store's bytes per forward.
        let link_floor = (mode.starts_with("peer split") && bw > 0.0)
            .then(|| host_bytes as f64 / a.gpus as f64 / (1u64 << 30) as f64 / bw * 1e3);
        let slowest = rows_t.iter().map(|r| r.3).fold(0.0, f64::max);
        let aggregate = streamed / (1u64 << 30) as f64 / (slowest / 1e3);
        for (_, g, _, ms, y) in &rows_t {
            let diff = resident_ms.get(&tokens).map(|(_, out)| {
                (out.to_device(Device::Cpu).to_kind(Kind::Float) - y.to_kind(Kind::Float))
                    .abs()
                    .max()
                    .double_value(&[])
            });
            let floor = link_floor.map_or(String::new(), |f| format!("{f:.1}"));
            println!(
                "| {device_name} | {preset_cell} | {tokens} | stream d{}, {mode}, GPU {g} of {} | {ms:.1} | | {floor} | | | |",
                a.depth, a.gpus
            );
            let result = json!({
                "device": device_name,
                "system": "layerwise-offload",
                "mode": mode,
                "model": model_name,
                "gpus": a.gpus,
                "gpu": g,
                "preset": s.preset,
                "layers": s.layers,
                "dim": s.dim,
                "ffn": s.ffn,
                "tokens": tokens,
                "depth": a.depth,
                "ms": round2(*ms),
                "delivered_gib_s": round2(aggregate),
                "host_bytes": host_bytes,
                "link_floor_ms": link_floor.map(round2),
                "max_abs_diff": diff,
            });
            println!("RESULT {result}");
        }
        println!(
            "| {device_name} | {preset_cell} | {tokens} | {} GPUs, {mode}: {aggregate:.1} GiB/s of blocks delivered | {slowest:.1} (slowest) | | | | | |",
            a.gpus
        );
    }
    for (tokens, (ms, _)) in {
        let mut v: Vec<_> = resident_ms.iter().collect();
        v.sort_by_key(|(t, _)| **t);
        v
    } {
        println!("| {device_name} | {preset_cell} | {tokens} | resident | {ms:.1} | | | | | |");
    }
    eprintln!("{stats_table}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wan_grids_are_bench_peers_ones() {
        // scripts/bench_peers.py: a = the largest divisor <= sqrt(tokens), b = tokens / a.
        for (tokens, grid) in [
            (64, (8, 8)),
            (1000, (25, 40)),
            (1024, (32, 32)),
            (4096, (64, 64)),
            (16384, (128, 128)),
            (1031, (1, 1031)),
            (1, (1, 1)),
        ] {
            assert_eq!(wan_grid(tokens), grid, "{tokens}");
        }
    }

    #[test]
    fn wan_weights_are_drawn_as_bench_peers_draws_them() {
        let config = wan::Config {
            num_layers: 2,
            num_attention_heads: 4,
            attention_head_dim: 64,
            ffn_dim: 1024,
            text_dim: 128,
            ..wan::Config::wan2_1_t2v_1_3b()
        };
        let (model, named) = build_wan(&config, Device::Cpu, Kind::BFloat16, Dist::Normal);
        assert_eq!(model.blocks().len(), 2);
        for (name, t) in &named {
            let want = if wan::keeps_fp32(name) {
                Kind::Float
            } else {
                Kind::BFloat16
            };
            assert_eq!(t.kind(), want, "{name}");
            if t.numel() >= 4096 {
                let std = t.to_kind(Kind::Float).std(true).double_value(&[]);
                assert!((std - 0.02).abs() < 0.002, "{name}: std {std}");
            }
        }
        assert!(named.iter().any(|(n, _)| n == "blocks.0.norm2.weight"));
        assert!(named.iter().any(|(n, _)| n == "scale_shift_table"));
        // Seeded: a second build is equal.
        let (_, again) = build_wan(&config, Device::Cpu, Kind::BFloat16, Dist::Normal);
        for ((n, a), (_, b)) in named.iter().zip(&again) {
            assert!(a.equal(b), "{n}");
        }
    }
}
