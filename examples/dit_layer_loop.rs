//! The main job: Wan2.1's transformer (the `wan` crate of this workspace: diffusers'
//! `WanTransformer3DModel` in tch), sampled with a flow-matching Euler sampler, its block loop
//! driven by the layerwise offload manager.
//!
//! ```text
//! cargo run --release --example dit_layer_loop -- --help
//! cargo run --release --example dit_layer_loop -- --preset wan-1.3b --vram-limit 2 --check
//! ```
//! The model: Conv3d patch embedding of a video latent, a sinusoidal time embedding turned into
//! adaLN modulation, blocks of self-attention with a 3-axis rotary embedding, cross-attention to
//! a text context and a gelu-tanh MLP, and a final projection. Without `--weights` or
//! `--checkpoint DIR` (a diffusers transformer directory) the weights are seeded random; the text
//! context is `--text-embeddings` (precomputed: the text encoder is not part of this example) or
//! seeded random. Without a CUDA device the tiny
//! preset runs in the manager's CPU test mode. `--vram-limit` caps this process's share of the
//! GPU (libtorch's per-process memory fraction) to show a model running on a smaller card;
//! `--check` also runs the resident model (where it fits) and compares. The end: the manager's
//! statistics and one `RESULT {json}` line.

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use layerwise_offload::checkpoint::Checkpoint;
use layerwise_offload::{LayerwiseOffloadManager, OffloadConfig, accel};
use serde_json::json;
use std::time::Instant;
use tch::nn;
use tch::{Device, Kind, Tensor};
use wan::WanTransformer3DModel;

use offload_testkit::progress;
use offload_testkit::util;
use util::{gpu_name, int_in, median, round2};

/// A preset: the transformer's configuration (diffusers' `config.json` values), the text
/// tokens and the latent's default size.
#[derive(Debug, Clone)]
struct Preset {
    name: &'static str,
    config: wan::Config,
    ctx_len: i64,
    latent: [i64; 4], // channels, frames, height, width
}

/// The presets: `tiny`, and Wan2.1-T2V-1.3B's and 14B's transformer configurations.
fn presets(name: PresetName) -> Preset {
    match name {
        PresetName::Tiny => Preset {
            name: "tiny",
            config: wan::Config::small(),
            ctx_len: 32,
            latent: [16, 4, 16, 16],
        },
        PresetName::Wan1_3b => Preset {
            name: "wan-1.3b",
            config: wan::Config::wan2_1_t2v_1_3b(),
            ctx_len: 512,
            latent: [16, 5, 30, 52],
        },
        PresetName::Wan14b => Preset {
            name: "wan-14b",
            config: wan::Config::wan2_1_t2v_14b(),
            ctx_len: 512,
            latent: [16, 5, 30, 52],
        },
    }
}
const PATCH: i64 = 2; // spatial patch size (1 x 2 x 2 patches, as Wan)

/// Most latent frames, height and width accepted, and most tokens per forward
/// (frames * height/2 * width/2): Wan2.1's 81-frame 720p video is 21 x 90 x 160, 75600 tokens.
const MAX_FRAMES: i64 = 1024;
const MAX_SIDE: i64 = 4096;
const MAX_TOKENS: i64 = 1 << 17;

/// Model presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PresetName {
    /// 6 blocks, 4 heads of 64 (dim 256), ffn 1024, text width 128 (the default without CUDA).
    Tiny,
    /// Wan2.1-T2V-1.3B's config: 30 blocks, dim 1536, ffn 8960 (the default with CUDA).
    #[value(name = "wan-1.3b")]
    Wan1_3b,
    /// Wan2.1-T2V-14B's config: 40 blocks, dim 5120, ffn 13824.
    #[value(name = "wan-14b")]
    Wan14b,
}

/// Wan2.1's transformer (diffusers' WanTransformer3DModel) sampled with a flow-matching Euler
/// sampler, its block loop driven by the layerwise offload manager.
///
/// Without --weights or --checkpoint the weights are seeded random. There is no text encoder:
/// the text context is --text-embeddings (precomputed umT5 output) or seeded random. Without a CUDA device the tiny preset runs
/// in the manager's CPU test mode. --vram-limit caps this process's share of the GPU to show a
/// model running on a smaller card; --check also runs the resident model (where it fits) and
/// compares. The end: the manager's statistics and one `RESULT {json}` line.
#[derive(Debug, Parser)]
#[command(
    name = "dit_layer_loop",
    allow_negative_numbers = true,
    args_override_self = true
)]
struct Args {
    /// Model preset (default: wan-1.3b with CUDA, tiny without).
    #[arg(long, value_enum)]
    preset: Option<PresetName>,
    /// Sampling steps.
    #[arg(long, default_value_t = 4, value_parser = int_in(1, 10_000))]
    steps: i64,
    /// Latent frames (default: the preset's).
    #[arg(long, value_parser = int_in(1, MAX_FRAMES))]
    frames: Option<i64>,
    /// Latent height, even (default: the preset's).
    #[arg(long, value_parser = int_in(2, MAX_SIDE))]
    height: Option<i64>,
    /// Latent width, even (default: the preset's).
    #[arg(long, value_parser = int_in(2, MAX_SIDE))]
    width: Option<i64>,
    /// Real weights for the preset's configuration, named as diffusers' WanTransformer3DModel
    /// (blocks.0.attn1.to_q.weight, ...), in float32, bfloat16 or float16: a safetensors file,
    /// or a directory or `*.safetensors.index.json` of shards. Read by the offload manager
    /// straight into its block buffers.
    #[arg(long, value_name = "PATH", conflicts_with = "checkpoint")]
    weights: Option<String>,
    /// A diffusers transformer directory (config.json with diffusion_pytorch_model.safetensors
    /// or its sharded index), e.g. Wan2.1-T2V-14B-Diffusers/transformer: its config replaces
    /// the preset's (the preset still gives the latent size and text tokens).
    #[arg(long, value_name = "DIR")]
    checkpoint: Option<String>,
    /// Precomputed text embeddings (umT5-XXL's output for a prompt): a safetensors file with one
    /// tensor (or one named prompt_embeds) of [tokens, text_dim] or [1, tokens, text_dim].
    /// This example has no text encoder; without this flag the text context is seeded random.
    #[arg(long, value_name = "FILE.safetensors")]
    text_embeddings: Option<String>,
    /// VRAM budget in GiB of block weights kept resident (the rest streams).
    #[arg(long, value_name = "GiB", value_parser = gib(0.0))]
    budget: Option<f64>,
    /// Blocks uploaded ahead of the one computing.
    #[arg(long, default_value_t = 1, value_parser = int_in(1, 16))]
    depth: i64,
    /// Cap this process's share of the GPU at this many GiB (needs a CUDA device).
    #[arg(long, value_name = "GiB", value_parser = gib(f64::MIN_POSITIVE))]
    vram_limit: Option<f64>,
    /// Also run the resident model and compare.
    #[arg(long)]
    check: bool,
    /// Seed of the noise and the text context.
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// Seed of the random weights (default: --seed).
    #[arg(long)]
    init_seed: Option<i64>,
    /// Write the weights (as the manager holds them) to this safetensors file.
    #[arg(long, value_name = "FILE.safetensors")]
    save_weights: Option<String>,
}

/// A parser of GiB: a finite number in [min, 1048576].
fn gib(min: f64) -> impl Fn(&str) -> std::result::Result<f64, String> + Clone {
    move |s: &str| match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= min && v <= 1048576.0 => Ok(v),
        _ if min > 0.0 => Err(format!("{s:?} is not a number of GiB in (0, 1048576]")),
        _ => Err(format!("{s:?} is not a number of GiB in [0, 1048576]")),
    }
}

/// The flags and the preset they select; a bad value exits with a one-line error naming the
/// flag and its range.
fn parse_args() -> (Args, Preset) {
    use clap::CommandFactory;
    let a = Args::parse();
    let fail = |msg: String| -> ! {
        Args::command()
            .error(clap::error::ErrorKind::ValueValidation, msg)
            .exit()
    };
    let name = a.preset.unwrap_or(if accel::cuda_is_available() {
        PresetName::Wan1_3b
    } else {
        PresetName::Tiny
    });
    let mut preset = presets(name);
    let [_, f, h, w] = &mut preset.latent;
    *f = a.frames.unwrap_or(*f);
    *h = a.height.unwrap_or(*h);
    *w = a.width.unwrap_or(*w);
    if *h % PATCH != 0 || *w % PATCH != 0 {
        fail(format!(
            "--height {h} and --width {w} must be multiples of {PATCH}"
        ));
    }
    let tokens = *f * (*h / PATCH) * (*w / PATCH);
    if tokens > MAX_TOKENS {
        fail(format!(
            "--frames {f} --height {h} --width {w} make {tokens} tokens; at most {MAX_TOKENS}: lower them"
        ));
    }
    (a, preset)
}

/// The text context: `--text-embeddings` (one tensor, or the one named `prompt_embeds`, of
/// `[tokens, text_dim]` or `[1, tokens, text_dim]`), or seeded random ones.
fn text_embeddings(path: Option<&str>, c: &Preset, text_dim: i64) -> Result<Tensor> {
    let Some(path) = path else {
        return Ok(Tensor::randn([1, c.ctx_len, text_dim], (Kind::Float, Device::Cpu)) * 0.5);
    };
    let mut file = Tensor::read_safetensors(path).with_context(|| format!("reading {path}"))?;
    let t = match file.iter().position(|(n, _)| n == "prompt_embeds") {
        Some(i) => file.swap_remove(i).1,
        None if file.len() == 1 => file.remove(0).1,
        None => bail!(
            "{path}: holds {} tensors; give one, or name it prompt_embeds",
            file.len()
        ),
    };
    let t = if t.dim() == 2 { t.unsqueeze(0) } else { t };
    let size = t.size();
    if size.len() != 3 || size[0] != 1 || size[2] != text_dim || size[1] == 0 {
        bail!(
            "{path}: text embeddings must be [tokens, {text_dim}] or [1, tokens, {text_dim}], got {size:?}"
        );
    }
    if !t.is_floating_point() {
        bail!(
            "{path}: text embeddings must be floating point, got {:?}",
            t.kind()
        );
    }
    Ok(t.to_kind(Kind::Float))
}

/// The velocity at time `t` (0..1000) for latent `x` `[C, F, H, W]` and text `ctx`
/// `[1, L, text_dim]`, each block inside the manager's `enter` when one is given.
fn forward(
    model: &WanTransformer3DModel,
    x: &Tensor,
    t: f64,
    ctx: &Tensor,
    mut mgr: Option<&mut LayerwiseOffloadManager>,
) -> Result<Tensor> {
    let timestep = Tensor::from_slice(&[t as f32]).to_device(x.device());
    let e = model.embed(&x.unsqueeze(0), &timestep, ctx)?;
    let mut h = e.hidden.shallow_clone();
    for i in 0..model.blocks().len() {
        match mgr.as_deref_mut() {
            Some(m) => {
                let _on_gpu = m.enter(i)?;
                h = model.block(i, &h, &e);
            }
            None => h = model.block(i, &h, &e),
        }
    }
    Ok(model.head(&h, &e).squeeze_dim(0).to_kind(Kind::Float))
}

/// Flow-matching Euler sampling over `steps` steps, from noise at sigma 1 to the sample at sigma
/// 0, with a progress bar on a terminal (a plain line per step otherwise). Returns the sample and
/// the seconds of each step.
fn sample(
    model: &WanTransformer3DModel,
    noise: &Tensor,
    ctx: &Tensor,
    steps: usize,
    mut mgr: Option<&mut LayerwiseOffloadManager>,
    label: &str,
) -> Result<(Tensor, Vec<f64>)> {
    let pb = progress::steps(steps as u64, format!("{label} sampling"));
    let mut x = noise.shallow_clone();
    let mut times = Vec::with_capacity(steps);
    let mut last_stall = mgr.as_deref_mut().map_or(0.0, |m| m.stats().stall_ms);
    for s in 0..steps {
        let t0 = Instant::now();
        let sigma = 1.0 - s as f64 / steps as f64;
        let next = 1.0 - (s + 1) as f64 / steps as f64;
        let v = tch::no_grad(|| forward(model, &x, sigma * 1000.0, ctx, mgr.as_deref_mut()))?;
        x = &x + v * (next - sigma);
        if let Device::Cuda(d) = x.device() {
            accel::synchronize_device(d)?;
        }
        let secs = t0.elapsed().as_secs_f64();
        times.push(secs);
        let stall = mgr.as_deref_mut().map_or(0.0, |m| m.stats().stall_ms);
        let line = format!(
            "{label} step {}/{steps}: {secs:.2} s/step, stall {:.1} ms",
            s + 1,
            stall - last_stall
        );
        last_stall = stall;
        if pb.is_hidden() {
            eprintln!("{line}");
        } else {
            pb.set_message(line);
        }
        pb.inc(1);
    }
    pb.finish();
    Ok((x, times))
}

fn main() -> Result<()> {
    // SAFETY: the first statement of main: no other thread exists yet to touch the environment.
    unsafe { accel::use_recommended_hardware_queues() };
    let (a, preset) = parse_args();
    let cuda = accel::cuda_is_available();
    let dev = if cuda { Device::Cuda(0) } else { Device::Cpu };
    let kind = if cuda { Kind::BFloat16 } else { Kind::Float };
    let c = &preset;
    if let Some(limit) = a.vram_limit {
        if !cuda {
            bail!("--vram-limit needs a CUDA device");
        }
        let (_, total) = accel::memory_info(0)?;
        let fraction = (limit * (1u64 << 30) as f64 / total as f64).min(1.0);
        accel::set_memory_fraction(fraction).context("setting the per-process memory fraction")?;
        eprintln!(
            "VRAM limited to {limit} GiB of {:.1} GiB (fraction {fraction:.3})",
            total as f64 / (1u64 << 30) as f64
        );
    }
    let device_name = if cuda { gpu_name(0) } else { "cpu".into() };

    // The model on the CPU: it never has to fit on the GPU.
    let t0 = Instant::now();
    let config = match &a.checkpoint {
        Some(dir) => wan::Config::from_file(std::path::Path::new(dir).join("config.json"))?,
        None => c.config.clone(),
    };
    // Read (and checked) before the model is built: a bad file fails at once.
    let text_file = match a.text_embeddings.as_deref() {
        Some(path) => Some(text_embeddings(Some(path), c, config.text_dim)?),
        None => None,
    };
    let weights = a.weights.as_ref().or(a.checkpoint.as_ref());
    let mut vs = nn::VarStore::new(Device::Cpu);
    // Drawn inside the wan crate in one call: a spinner, not a bar.
    let pb = progress::spinner(match weights {
        Some(_) => "building the model (uninitialized)",
        None => "drawing the seeded random weights",
    });
    // bf16 on a GPU, float32 where diffusers keeps it; float32 on the CPU.
    let model = match weights {
        // Uninitialized: the manager reads the checkpoint straight into its block buffers (and
        // the other weights onto the device), so the host never holds the model twice.
        Some(_) => WanTransformer3DModel::new_empty(vs.root(), &config, kind),
        None => {
            tch::manual_seed(a.init_seed.unwrap_or(a.seed));
            let model = WanTransformer3DModel::new(vs.root(), &config);
            wan::set_kind(&mut vs, kind);
            model
        }
    };
    pb.finish_and_clear();
    let checkpoint = weights.map(Checkpoint::open).transpose()?;
    let layers = config.num_layers as usize;
    let block_bytes: usize = vs
        .variables()
        .iter()
        .filter(|(n, _)| n.starts_with("blocks."))
        .map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes())
        .sum();
    eprintln!(
        "{}: {} blocks, dim {}, {:.2} GiB of block weights ({}), built in {:.1} s",
        a.checkpoint.as_deref().unwrap_or(c.name),
        layers,
        config.inner_dim(),
        block_bytes as f64 / (1u64 << 30) as f64,
        if a.weights.is_some() || a.checkpoint.is_some() {
            "loaded"
        } else {
            "seeded random"
        },
        t0.elapsed().as_secs_f64()
    );

    let mut cfg = OffloadConfig::new("blocks", layers)
        .prefetch_depth(a.depth as usize)
        .cpu_test_mode(!cuda);
    if let Some(c) = checkpoint {
        // Stored in another type than the model's (float32 on the CPU): converted on load.
        cfg = cfg.checkpoint(c).convert_dtypes(true);
    }
    if let Some(b) = a.budget {
        cfg = cfg.vram_budget((b * (1u64 << 30) as f64) as u64);
    } else if let Some(limit) = a.vram_limit {
        // Under a limit: keep what fits in 70% of it (the rest is for non-block weights and
        // activations), stream the remainder.
        cfg = cfg.vram_budget((limit * 0.7 * (1u64 << 30) as f64) as u64);
    }
    let t0 = Instant::now();
    let pb = progress::spinner("initialize (blocks into host memory)");
    let mut m = cfg.build(&vs)?;
    m.initialize()?;
    pb.finish_and_clear();
    let init_s = t0.elapsed().as_secs_f64();
    let st = m.stats().clone();
    eprintln!(
        "initialize: {init_s:.2} s; {} blocks stream, {} stay resident",
        st.streamed_blocks, st.resident_blocks
    );
    if let Some(path) = &a.save_weights {
        // The VarStore holds placeholders now; the manager writes the real values.
        m.save_safetensors(path)?;
        eprintln!("weights written to {path}");
    }

    let [_, f, h, w] = c.latent;
    let ch = config.in_channels;
    let tokens = f * (h / PATCH) * (w / PATCH);
    tch::manual_seed(a.seed + 1);
    let noise = Tensor::randn([ch, f, h, w], (Kind::Float, Device::Cpu)).to_device(dev);
    let ctx = match text_file {
        Some(t) => t,
        None => text_embeddings(None, c, config.text_dim)?,
    }
    .to_device(dev);
    if cuda {
        accel::reset_peak_memory_stats(0)?;
    }

    let (streamed, step_times) = sample(
        &model,
        &noise,
        &ctx,
        a.steps as usize,
        Some(&mut m),
        "offloaded",
    )?;
    let ms_per_step = median(&step_times) * 1e3;
    if cuda {
        accel::synchronize_device(0)?;
    }
    let st = m.stats().clone();
    let peak = if cuda {
        accel::memory_stats(0)?.peak_allocated
    } else {
        0
    };
    println!("{st}");

    // The resident model, for comparison: every weight back on the device.
    let mut resident_ms = None;
    let mut diff = None;
    if a.check {
        match m.restore() {
            Ok(()) => {
                let (x, times) = sample(&model, &noise, &ctx, a.steps as usize, None, "resident")?;
                resident_ms = Some(median(&times) * 1e3);
                diff = Some((x - &streamed).abs().max().double_value(&[]));
            }
            Err(e) => eprintln!("--check: the resident model does not fit ({e}); skipped"),
        }
    }
    // serde_json writes NaN and infinities as null, so the line stays JSON whatever the values.
    let result = json!({
        "device": device_name,
        "preset": c.name,
        "tokens": tokens,
        "steps": a.steps,
        "ms_per_step": round2(ms_per_step),
        "resident_ms_per_step": resident_ms.map(round2),
        "max_abs_diff": diff,
        "peak_vram_bytes": peak,
        "h2d_gib_s": round2(st.upload_gib_s()),
        "stall_ms": round2(st.stall_ms),
        "streamed_blocks": st.streamed_blocks,
        "resident_blocks": st.resident_blocks,
        "init_s": (init_s * 1e3).round() / 1e3,
        "output_sum": streamed
            .to_kind(Kind::Double)
            .sum(Kind::Double)
            .double_value(&[]),
    });
    println!("RESULT {result}");
    Ok(())
}
