//! The main job: a Wan-style diffusion transformer written with tch's `nn`, sampled with a
//! flow-matching Euler sampler, its block loop driven by the layerwise offload manager.
//!
//! ```text
//! cargo run --release --example dit_layer_loop -- --help
//! cargo run --release --example dit_layer_loop -- --preset wan-1.3b --vram-limit 2 --check
//! ```
//! The model: patch embedding of a video latent, a sinusoidal time embedding turned into adaLN
//! modulation, blocks of self-attention, cross-attention to a text context and an MLP, and a final
//! projection. Without `--weights` the weights are seeded random. Without a CUDA device the tiny
//! preset runs in the manager's CPU test mode. `--vram-limit` caps this process's share of the
//! GPU (libtorch's per-process memory fraction) to show a model running on a smaller card;
//! `--check` also runs the resident model (where it fits) and compares. The end: the manager's
//! statistics and one `RESULT {json}` line.

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use layerwise_offload::{LayerwiseOffloadManager, OffloadConfig, accel};
use serde_json::json;
use std::io::{IsTerminal, Write};
use std::time::Instant;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

#[path = "common/util.rs"]
mod util;
use util::{gpu_name, int_in, median, round2};

#[derive(Debug, Clone)]
struct Preset {
    name: &'static str,
    layers: usize,
    dim: i64,
    ffn: i64,
    heads: i64,
    text_dim: i64,
    ctx_len: i64,
    latent: [i64; 4], // channels, frames, height, width
}

const PRESETS: [Preset; 3] = [
    Preset {
        name: "tiny",
        layers: 6,
        dim: 256,
        ffn: 1024,
        heads: 4,
        text_dim: 128,
        ctx_len: 32,
        latent: [16, 4, 16, 16],
    },
    Preset {
        name: "wan-1.3b",
        layers: 30,
        dim: 1536,
        ffn: 8960,
        heads: 12,
        text_dim: 4096,
        ctx_len: 512,
        latent: [16, 5, 30, 52],
    },
    Preset {
        name: "wan-14b",
        layers: 40,
        dim: 5120,
        ffn: 13824,
        heads: 40,
        text_dim: 4096,
        ctx_len: 512,
        latent: [16, 5, 30, 52],
    },
];
const PATCH: i64 = 2; // spatial patch size (1 x 2 x 2 patches, as Wan)
const FREQ_DIM: i64 = 256;

/// Most latent frames, height and width accepted, and most tokens per forward
/// (frames * height/2 * width/2): Wan2.1's 81-frame 720p video is 21 x 90 x 160, 75600 tokens.
const MAX_FRAMES: i64 = 1024;
const MAX_SIDE: i64 = 4096;
const MAX_TOKENS: i64 = 1 << 17;

/// Model presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PresetName {
    /// 6 blocks, dim 256 (the default without CUDA).
    Tiny,
    /// Wan2.1-1.3B's shape: 30 blocks, dim 1536 (the default with CUDA).
    #[value(name = "wan-1.3b")]
    Wan1_3b,
    /// Wan2.1-14B's shape: 40 blocks, dim 5120.
    #[value(name = "wan-14b")]
    Wan14b,
}

/// A Wan-style diffusion transformer sampled with a flow-matching Euler sampler, its block loop
/// driven by the layerwise offload manager.
///
/// Without --weights the weights are seeded random. Without a CUDA device the tiny preset runs
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
    /// Real weights (safetensors), named as the VarStore (blocks.0.self_attn.q.weight, ...),
    /// in float32, bfloat16 or float16.
    #[arg(long, value_name = "FILE.safetensors")]
    weights: Option<String>,
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
    let mut preset = PRESETS[name as usize].clone();
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

/// RMS norm with a learned scale (Wan's q/k norms).
fn rms(x: &Tensor, w: &Tensor) -> Tensor {
    let xf = x.to_kind(Kind::Float);
    let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
    (xf * (var + 1e-6).rsqrt()).to_kind(x.kind()) * w
}

struct Attention {
    q: nn::Linear,
    k: nn::Linear,
    v: nn::Linear,
    o: nn::Linear,
    norm_q: Tensor,
    norm_k: Tensor,
    heads: i64,
}

impl Attention {
    fn new(p: nn::Path, dim: i64, heads: i64) -> Attention {
        let lin = |n: &str| nn::linear(&p / n, dim, dim, Default::default());
        Attention {
            q: lin("q"),
            k: lin("k"),
            v: lin("v"),
            o: lin("o"),
            norm_q: p.var("norm_q", &[dim], nn::Init::Const(1.0)),
            norm_k: p.var("norm_k", &[dim], nn::Init::Const(1.0)),
            heads,
        }
    }

    fn forward(&self, x: &Tensor, ctx: &Tensor) -> Tensor {
        let (b, t, d) = x.size3().unwrap();
        let split = |y: Tensor| y.view([b, -1, self.heads, d / self.heads]).transpose(1, 2);
        let q = split(rms(&self.q.forward(x), &self.norm_q));
        let k = split(rms(&self.k.forward(ctx), &self.norm_k));
        let v = split(self.v.forward(ctx));
        let a = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        self.o.forward(&a.transpose(1, 2).reshape([b, t, d]))
    }
}

struct Block {
    self_attn: Attention,
    cross_attn: Attention,
    norm3: nn::LayerNorm,
    ffn0: nn::Linear,
    ffn2: nn::Linear,
    modulation: Tensor,
    dim: i64,
}

impl Block {
    fn new(p: nn::Path, c: &Preset) -> Block {
        let ln = nn::LayerNormConfig {
            eps: 1e-6,
            ..Default::default()
        };
        Block {
            self_attn: Attention::new(&p / "self_attn", c.dim, c.heads),
            cross_attn: Attention::new(&p / "cross_attn", c.dim, c.heads),
            norm3: nn::layer_norm(&p / "norm3", vec![c.dim], ln),
            ffn0: nn::linear(&p / "ffn" / 0, c.dim, c.ffn, Default::default()),
            ffn2: nn::linear(&p / "ffn" / 2, c.ffn, c.dim, Default::default()),
            modulation: p.var(
                "modulation",
                &[1, 6, c.dim],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            ),
            dim: c.dim,
        }
    }

    /// `e`: the time modulation [B, 6, dim].
    fn forward(&self, x: &Tensor, ctx: &Tensor, e: &Tensor) -> Tensor {
        let m = (&self.modulation + e).chunk(6, 1);
        let ln = |y: &Tensor| y.layer_norm([self.dim], None::<Tensor>, None::<Tensor>, 1e-6, false);
        let h = ln(x) * (&m[1] + 1.0) + &m[0];
        let x = x + self.self_attn.forward(&h, &h) * &m[2];
        let x = &x + self.cross_attn.forward(&self.norm3.forward(&x), ctx);
        let h = ln(&x) * (&m[4] + 1.0) + &m[3];
        let y = self.ffn2.forward(&self.ffn0.forward(&h).gelu("tanh"));
        x + y * &m[5]
    }
}

struct Dit {
    c: Preset,
    patch_embedding: nn::Linear,
    text0: nn::Linear,
    text2: nn::Linear,
    time0: nn::Linear,
    time2: nn::Linear,
    time_projection: nn::Linear,
    blocks: Vec<Block>,
    head: nn::Linear,
    head_modulation: Tensor,
}

impl Dit {
    fn new(vs: &nn::VarStore, c: &Preset) -> Dit {
        let r = vs.root();
        let cpp = c.latent[0] * PATCH * PATCH;
        let lin = |p: nn::Path, i: i64, o: i64| nn::linear(p, i, o, Default::default());
        Dit {
            c: c.clone(),
            patch_embedding: lin(&r / "patch_embedding", cpp, c.dim),
            text0: lin(&r / "text_embedding" / 0, c.text_dim, c.dim),
            text2: lin(&r / "text_embedding" / 2, c.dim, c.dim),
            time0: lin(&r / "time_embedding" / 0, FREQ_DIM, c.dim),
            time2: lin(&r / "time_embedding" / 2, c.dim, c.dim),
            time_projection: lin(&r / "time_projection" / 1, c.dim, 6 * c.dim),
            blocks: (0..c.layers)
                .map(|i| Block::new(&r / "blocks" / i, c))
                .collect(),
            head: lin(&r / "head" / "head", c.dim, cpp),
            head_modulation: (&r / "head").var(
                "modulation",
                &[1, 2, c.dim],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            ),
        }
    }

    fn sinusoidal(&self, t: f64, device: Device) -> Tensor {
        let half = FREQ_DIM / 2;
        let freqs =
            (Tensor::arange(half, (Kind::Float, device)) * (-(10000f64.ln()) / half as f64)).exp()
                * t;
        Tensor::cat(&[freqs.cos(), freqs.sin()], 0).unsqueeze(0)
    }

    /// Latent [C, F, H, W] -> tokens [1, F*H/2*W/2, C*4].
    fn patchify(&self, x: &Tensor) -> Tensor {
        let [c, f, h, w] = self.c.latent;
        x.view([c, f, h / PATCH, PATCH, w / PATCH, PATCH])
            .permute([1, 2, 4, 0, 3, 5])
            .reshape([1, f * (h / PATCH) * (w / PATCH), c * PATCH * PATCH])
    }

    fn unpatchify(&self, y: &Tensor) -> Tensor {
        let [c, f, h, w] = self.c.latent;
        y.view([f, h / PATCH, w / PATCH, c, PATCH, PATCH])
            .permute([3, 0, 1, 4, 2, 5])
            .reshape([c, f, h, w])
    }

    /// The velocity at time `t` (0..1000) for latent `x`, text context `ctx` [1, L, text_dim].
    fn forward(
        &self,
        x: &Tensor,
        t: f64,
        ctx: &Tensor,
        mut mgr: Option<&mut LayerwiseOffloadManager>,
    ) -> Result<Tensor> {
        let kind = self.head.ws.kind();
        let dev = self.head.ws.device();
        let tokens = self
            .patch_embedding
            .forward(&self.patchify(&x.to_kind(kind)));
        let ctx = self
            .text2
            .forward(&self.text0.forward(&ctx.to_kind(kind)).gelu("tanh"));
        let temb = self.time2.forward(
            &self
                .time0
                .forward(&self.sinusoidal(t, dev).to_kind(kind))
                .silu(),
        );
        let e = self
            .time_projection
            .forward(&temb.silu())
            .view([1, 6, self.c.dim]);
        let mut h = tokens;
        for (i, b) in self.blocks.iter().enumerate() {
            match mgr.as_deref_mut() {
                Some(m) => {
                    let _on_gpu = m.enter(i)?;
                    h = b.forward(&h, &ctx, &e);
                }
                None => h = b.forward(&h, &ctx, &e),
            }
        }
        let m = (&self.head_modulation + temb.unsqueeze(1)).chunk(2, 1);
        let h = h.layer_norm([self.c.dim], None::<Tensor>, None::<Tensor>, 1e-6, false)
            * (&m[1] + 1.0)
            + &m[0];
        Ok(self.unpatchify(&self.head.forward(&h)).to_kind(Kind::Float))
    }
}

/// Loads real weights, checking names and shapes against the model first.
fn load_weights(vs: &mut nn::VarStore, path: &str) -> Result<()> {
    let file = Tensor::read_safetensors(path).with_context(|| format!("reading {path}"))?;
    let vars = vs.variables();
    let names: std::collections::HashSet<&str> = file.iter().map(|(n, _)| n.as_str()).collect();
    let missing: Vec<&String> = vars
        .keys()
        .filter(|n| !names.contains(n.as_str()))
        .collect();
    let unexpected: Vec<&str> = names
        .iter()
        .filter(|n| !vars.contains_key(**n))
        .copied()
        .collect();
    let mismatched: Vec<String> = file
        .iter()
        .filter_map(|(n, t)| {
            vars.get(n)
                .filter(|v| v.size() != t.size())
                .map(|v| format!("{n}: file {:?}, model {:?}", t.size(), v.size()))
        })
        .collect();
    // Float weights only: integers, booleans or other float formats would be converted
    // silently into values the model was never trained with (NaN outputs, or garbage).
    let accepted = [Kind::Float, Kind::BFloat16, Kind::Half];
    let wrong_kind: Vec<String> = file
        .iter()
        .filter(|(_, t)| !accepted.contains(&t.kind()))
        .map(|(n, t)| format!("{n} is {:?}", t.kind()))
        .collect();
    if !wrong_kind.is_empty() {
        bail!(
            "{path}: weights must be Float (f32), BFloat16 or Half (f16), but {}; convert the file",
            wrong_kind.join(", ")
        );
    }
    if !missing.is_empty() || !unexpected.is_empty() || !mismatched.is_empty() {
        let show = |v: Vec<String>| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.join(", ")
            }
        };
        bail!(
            "{path} does not match the model (names as in the VarStore, e.g. blocks.0.self_attn.q.weight):\n  missing: {}\n  unexpected: {}\n  shape mismatches: {}",
            show(missing.into_iter().cloned().collect()),
            show(unexpected.into_iter().map(str::to_owned).collect()),
            show(mismatched)
        );
    }
    tch::no_grad(|| {
        for (n, t) in &file {
            let mut v = vars[n].shallow_clone();
            v.copy_(t);
        }
    });
    Ok(())
}

/// Flow-matching Euler sampling over `steps` steps, from noise at sigma 1 to the sample at sigma
/// 0, with a progress bar on a terminal (plain lines otherwise). Returns the sample and the
/// seconds of each step.
fn sample(
    model: &Dit,
    noise: &Tensor,
    ctx: &Tensor,
    steps: usize,
    mut mgr: Option<&mut LayerwiseOffloadManager>,
    label: &str,
) -> Result<(Tensor, Vec<f64>)> {
    let tty = std::io::stderr().is_terminal();
    let mut x = noise.shallow_clone();
    let mut times = Vec::with_capacity(steps);
    let mut last_stall = mgr.as_deref_mut().map_or(0.0, |m| m.stats().stall_ms);
    for s in 0..steps {
        let t0 = Instant::now();
        let sigma = 1.0 - s as f64 / steps as f64;
        let next = 1.0 - (s + 1) as f64 / steps as f64;
        let v = tch::no_grad(|| model.forward(&x, sigma * 1000.0, ctx, mgr.as_deref_mut()))?;
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
        if tty {
            let filled = (s + 1) * 30 / steps;
            eprint!(
                "\r[{}{}] {line}   ",
                "#".repeat(filled),
                " ".repeat(30 - filled)
            );
            if s + 1 == steps {
                eprintln!();
            }
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("{line}");
        }
    }
    Ok((x, times))
}

fn main() -> Result<()> {
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
    tch::manual_seed(a.init_seed.unwrap_or(a.seed));
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = Dit::new(&vs, c);
    if let Some(path) = &a.weights {
        load_weights(&mut vs, path)?;
    }
    vs.set_kind(kind);
    let block_bytes: usize = vs
        .variables()
        .iter()
        .filter(|(n, _)| n.starts_with("blocks."))
        .map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes())
        .sum();
    eprintln!(
        "{} preset: {} blocks, {:.2} GiB of block weights ({}), built in {:.1} s",
        c.name,
        c.layers,
        block_bytes as f64 / (1u64 << 30) as f64,
        if a.weights.is_some() {
            "loaded"
        } else {
            "seeded random"
        },
        t0.elapsed().as_secs_f64()
    );

    let mut cfg = OffloadConfig::new("blocks", c.layers)
        .prefetch_depth(a.depth as usize)
        .cpu_test_mode(!cuda);
    if let Some(b) = a.budget {
        cfg = cfg.vram_budget((b * (1u64 << 30) as f64) as u64);
    } else if let Some(limit) = a.vram_limit {
        // Under a limit: keep what fits in 70% of it (the rest is for non-block weights and
        // activations), stream the remainder.
        cfg = cfg.vram_budget((limit * 0.7 * (1u64 << 30) as f64) as u64);
    }
    let t0 = Instant::now();
    let mut m = cfg.build(&vs)?;
    m.initialize()?;
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

    let [ch, f, h, w] = c.latent;
    let tokens = f * (h / PATCH) * (w / PATCH);
    tch::manual_seed(a.seed + 1);
    let noise = Tensor::randn([ch, f, h, w], (Kind::Float, Device::Cpu)).to_device(dev);
    let ctx = (Tensor::randn([1, c.ctx_len, c.text_dim], (Kind::Float, Device::Cpu)) * 0.5)
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
