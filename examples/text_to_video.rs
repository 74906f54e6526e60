//! From a prompt to a video: diffusers' `WanPipeline` (Wan2.1 text to video) in Rust, its text
//! encoder and transformer streamed through the layerwise offload manager so that a model larger
//! than the GPU runs on it.
//!
//! ```text
//! cargo run --release --example text_to_video -- --help
//! cargo run --release --example text_to_video -- --pipeline Wan2.1-T2V-14B-Diffusers \
//!     --prompt "a red fox runs through fresh snow at dawn" --vram-limit 24 --out fox.mp4
//! ```
//! Stages: the umT5 text encoder (its 24 blocks streamed, then every weight back on the CPU),
//! the denoising loop (the transformer's blocks streamed, as many kept resident as the VRAM
//! budget holds; the conditional and the negative prompt's predictions in one batch; the
//! pipeline's scheduler), the VAE's decoder (on the GPU, frame by frame with its feature cache).
//! Without `--pipeline` it runs a pipeline of seeded random weights (`--preset`; `tiny` needs no
//! download and no GPU: without CUDA the managers run in their CPU test mode). The end: the time
//! of each stage, peak VRAM and host memory, and one `RESULT {json}` line.

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use layerwise_offload::accel;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor, nn};
use wan::{Request, WanPipeline};

use offload_testkit::progress;
use offload_testkit::t2v;
use offload_testkit::util;
use offload_testkit::video;
use t2v::Managed;
use util::{float_in, gpu_name, int_in, median, peak_rss_bytes, round2};

/// Pipelines of seeded random weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Preset {
    /// The test fixture's tiny components (a 2-block transformer of width 24, a 2-block umT5 of
    /// width 32, a VAE of base width 3): seconds on a CPU.
    Tiny,
    /// Wan2.1-T2V-1.3B: umT5-XXL (24 blocks, 5.7 B parameters), the 1.3B transformer, Wan2.1's VAE.
    #[value(name = "wan-1.3b")]
    Wan1_3b,
    /// Wan2.1-T2V-14B: umT5-XXL, the 14B transformer (40 blocks of dim 5120), Wan2.1's VAE.
    #[value(name = "wan-14b")]
    Wan14b,
}

/// Compute types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Dtype {
    /// float32 (diffusers' reference precision).
    Float32,
    /// bfloat16 (Wan's).
    Bfloat16,
}

/// Text to video with Wan2.1 (diffusers' WanPipeline), the text encoder and the transformer
/// streamed from host memory by the layerwise offload manager.
#[derive(Debug, Parser)]
#[command(
    name = "text_to_video",
    allow_negative_numbers = true,
    args_override_self = true
)]
struct Args {
    /// A diffusers WanPipeline directory (model_index.json, tokenizer/, text_encoder/,
    /// transformer/, vae/, scheduler/), e.g. a download of Wan-AI/Wan2.1-T2V-14B-Diffusers.
    #[arg(long, value_name = "DIR", conflicts_with = "preset")]
    pipeline: Option<PathBuf>,
    /// Without --pipeline: a pipeline of seeded random weights.
    #[arg(long, value_enum, default_value = "tiny")]
    preset: Preset,
    /// The prompt.
    #[arg(long, default_value = "a red fox runs through fresh snow at dawn")]
    prompt: String,
    /// The negative prompt (used with --guidance above 1).
    #[arg(long, default_value = "blurry, low quality, still image")]
    negative_prompt: String,
    /// Frame height in pixels, a multiple of 16 (default: 480; tiny: 16).
    #[arg(long, value_parser = int_in(16, 4096))]
    height: Option<i64>,
    /// Frame width in pixels, a multiple of 16 (default: 832; tiny: 16).
    #[arg(long, value_parser = int_in(16, 4096))]
    width: Option<i64>,
    /// Frames, 4k + 1 (default: 81; tiny: 5).
    #[arg(long, value_parser = int_in(1, 1025))]
    frames: Option<i64>,
    /// Denoising steps (default: 50; tiny: 3).
    #[arg(long, value_parser = int_in(1, 10_000))]
    steps: Option<i64>,
    /// Classifier-free guidance scale (1 or less: no negative prompt).
    #[arg(long, default_value_t = 5.0, value_parser = float_in(0.0, 100.0))]
    guidance: f64,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0, value_parser = int_in(0, i64::MAX))]
    seed: i64,
    /// Text tokens (padding and truncation length, as WanPipeline's max_sequence_length).
    #[arg(long, default_value_t = 512, value_parser = int_in(1, 4096))]
    max_sequence_length: i64,
    /// Cap this process's share of the GPU at this many GiB (a smaller card); the transformer
    /// keeps resident what fits next to the activations, the rest streams.
    #[arg(long, value_name = "GiB", value_parser = float_in(0.5, 1048576.0), conflicts_with = "budget")]
    vram_limit: Option<f64>,
    /// VRAM for the transformer's block weights in GiB (resident blocks and slots); the rest
    /// streams. Default: what the device (or --vram-limit) leaves beside the activations.
    #[arg(long, value_name = "GiB", value_parser = float_in(0.0, 1048576.0))]
    budget: Option<f64>,
    /// Memory kept free for the transformer's activations, in GiB (default: estimated from the
    /// video's size).
    #[arg(long, value_name = "GiB", value_parser = float_in(0.0, 1048576.0))]
    reserve: Option<f64>,
    /// Stream the transformer's blocks compressed (lossless, about 0.7 of the bytes).
    #[arg(long)]
    compress: bool,
    /// Run the two guidance predictions as two batch-1 passes, as diffusers does (by default
    /// they are one batch of 2: one pass over the streamed weights per step).
    #[arg(long)]
    no_batch_guidance: bool,
    /// The video file: .mp4 (H.264, needs ffmpeg on PATH) or .gif (default: video.mp4 with
    /// ffmpeg, video.gif without).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Also write every frame as a PNG into this directory.
    #[arg(long, value_name = "DIR")]
    frames_dir: Option<PathBuf>,
    /// Frames per second of the video (Wan2.1: 16).
    #[arg(long, default_value_t = 16, value_parser = int_in(1, 240))]
    fps: i64,
    /// Also run every model resident on the GPU (where it fits) and compare the frames.
    #[arg(long)]
    check: bool,
    /// The text encoder's and the transformer's type (default: bfloat16 with CUDA, float32
    /// without; float32 where transformers and diffusers keep it; the VAE runs in float32).
    #[arg(long, value_enum)]
    dtype: Option<Dtype>,
    /// Write the frames as float32 to this safetensors file (tensor "frames", [F, H, W, 3]).
    #[arg(long, value_name = "FILE.safetensors")]
    save_frames: Option<PathBuf>,
}

/// The tiny fixture's tokenizer, built into the binary so that the random pipelines need no
/// file (any tokenizer whose ids fit the vocabulary costs the same).
const TINY_TOKENIZER: &str =
    include_str!("../tests/fixtures/wan_pipeline_tiny/tokenizer/tokenizer.json");
const TINY_TEXT_ENCODER: &str =
    include_str!("../tests/fixtures/wan_pipeline_tiny/text_encoder/config.json");
const TINY_TRANSFORMER: &str =
    include_str!("../tests/fixtures/wan_pipeline_tiny/transformer/config.json");
const TINY_VAE: &str = include_str!("../tests/fixtures/wan_pipeline_tiny/vae/config.json");

/// Fills every tensor of `vs` with N(0, 0.02) values drawn on `on` (the GPU when there is one:
/// seconds for billions of values) in its own type, seeded.
fn fill_random(vs: &nn::VarStore, seed: i64, on: Device) -> Result<()> {
    tch::manual_seed(seed);
    tch::no_grad(|| -> Result<()> {
        for (_, mut t) in vs.variables() {
            let r = Tensor::randn(t.size(), (t.kind(), on)) * 0.02;
            t.f_copy_(&r)?;
        }
        Ok(())
    })
}

/// A pipeline of seeded random weights for `preset`, on the CPU.
fn random_pipeline(preset: Preset, kind: Kind, on: Device) -> Result<WanPipeline> {
    let tokenizer = wan::WanTokenizer::from_json(TINY_TOKENIZER)?;
    // Wan2.1-T2V's `scheduler/scheduler_config.json`.
    let scheduler = wan::Scheduler::from(wan::scheduler::UniPcMultistepScheduler::new(
        wan::scheduler::UniPcConfig::wan2_1(),
    )?);
    let (te_cfg, tr_cfg, vae_cfg) = match preset {
        Preset::Tiny => (
            wan::Umt5Config::from_json(TINY_TEXT_ENCODER)?,
            wan::Config::from_json(TINY_TRANSFORMER)?,
            wan::VaeConfig::from_json(TINY_VAE)?,
        ),
        Preset::Wan1_3b | Preset::Wan14b => (
            wan::Umt5Config::umt5_xxl(),
            if preset == Preset::Wan14b {
                wan::Config::wan2_1_t2v_14b()
            } else {
                wan::Config::wan2_1_t2v_1_3b()
            },
            wan::VaeConfig::wan2_1(),
        ),
    };
    let text_encoder_vs = nn::VarStore::new(Device::Cpu);
    let text_encoder = wan::UMT5EncoderModel::new_empty(text_encoder_vs.root(), &te_cfg, kind);
    fill_random(&text_encoder_vs, 1, on)?;
    let transformer_vs = nn::VarStore::new(Device::Cpu);
    let transformer = wan::WanTransformer3DModel::new_empty(transformer_vs.root(), &tr_cfg, kind);
    fill_random(&transformer_vs, 2, on)?;
    let vae_vs = nn::VarStore::new(Device::Cpu);
    let vae = wan::WanVae::new_empty(vae_vs.root(), &vae_cfg, Kind::Float)?;
    fill_random(&vae_vs, 3, on)?;
    Ok(WanPipeline::from_parts(
        tokenizer,
        (text_encoder, text_encoder_vs),
        (transformer, transformer_vs),
        (vae, vae_vs),
        scheduler,
    )?)
}

/// Bytes of the tensors of `vs` whose names start with `prefix`.
fn bytes_of(vs: &nn::VarStore, prefix: &str) -> u64 {
    vs.variables()
        .iter()
        .filter(|(n, _)| n.starts_with(prefix))
        .map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
        .sum()
}

const GIB: f64 = (1u64 << 30) as f64;

/// This process's host memory now and at its peak so far, for the stage lines.
fn host_memory() -> String {
    format!(
        "host memory {:.2} GiB (peak {:.2})",
        util::rss_bytes() as f64 / GIB,
        peak_rss_bytes() as f64 / GIB
    )
}

/// Device memory to keep free for the transformer's activations at `tokens` tokens per sample
/// and `batch` samples: 2 GiB plus one and a half times, per token, 16 bytes per model channel
/// and 4 per FFN channel (the bf16 hidden state and its float32 norms, q/k/v/out, the FFN's two
/// intermediates). The half is the caching allocator's fragmentation across steps: with the
/// estimate alone (10.4 GiB), the 14B-shaped pipeline at 480 x 832 x 81 (32,760 tokens, batch 2)
/// under a 24 GiB limit ran its first step and ran out of memory in the second on an H100, with
/// 1.7 GiB reserved but unallocated; with this reserve it ran 3 steps (11 blocks resident, 29
/// streamed) at a peak of 18.78 GiB allocated, 6.74 s per step (H100). At that size a streamed block's upload (13 ms) hides under
/// its compute (about 175 ms), so blocks given up to the reserve cost no time.
fn activation_reserve(c: &wan::Config, tokens: i64, batch: i64) -> u64 {
    let per_token = 16 * c.inner_dim() + 4 * c.ffn_dim;
    (2u64 << 30) + (batch * tokens * per_token) as u64 * 3 / 2
}

/// How the transformer's VRAM budget is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Plan {
    /// `--budget`: this many bytes for block weights.
    Bytes(u64),
    /// `--vram-limit`: what the limit leaves once the memory in use, the transformer's non-block
    /// weights and `reserve` bytes for activations are taken off (the device's own free memory
    /// does not know the process's cap).
    UnderLimit { limit: u64, reserve: u64 },
    /// The default: what the device has free, less the transformer's non-block weights and
    /// `reserve` bytes for activations (on a 24 GB card a part of the blocks stays resident;
    /// on a card that holds the model, all of them).
    Free { reserve: u64 },
}

impl Plan {
    /// The budget for a manager about to be built over the `n_blocks` blocks of `vs`; `None`
    /// (every block streams) where the limit leaves no room for resident blocks.
    fn budget(self, vs: &nn::VarStore, n_blocks: usize) -> Result<Option<u64>> {
        // Memory the block weights may take: the cap less what is in use, or what is free.
        let (room, reserve) = match self {
            Plan::Bytes(b) => return Ok(Some(b)),
            Plan::UnderLimit { limit, reserve } => (
                limit.saturating_sub(accel::memory_stats(0)?.allocated),
                reserve,
            ),
            Plan::Free { reserve } => (accel::memory_info(0)?.0, reserve),
        };
        let blocks = bytes_of(vs, "blocks.");
        let non_block = bytes_of(vs, "") - blocks;
        let left = room.saturating_sub(non_block + reserve);
        // Two slots of a block are the ring; a budget without room for a resident block beside
        // them buys nothing: stream everything.
        let block = blocks / n_blocks.max(1) as u64;
        Ok((left >= 3 * block).then_some(left))
    }
}

/// Everything one run measured.
#[derive(Debug, Default)]
struct Run {
    frames: Option<Tensor>,
    text_s: f64,
    denoise_s: f64,
    decode_s: f64,
    step_s: Vec<f64>,
    text_init_s: f64,
    /// Putting the text encoder's weights back on the CPU (inside `text_s`).
    text_restore_s: f64,
    /// The VAE's decode alone, without moving its weights and the frames (inside `decode_s`).
    vae_run_s: f64,
    transformer_init_s: f64,
    resident_blocks: usize,
    streamed_blocks: usize,
    h2d_gib_s: f64,
    stall_ms: f64,
}

/// One generation, stage by stage. `offloaded`: the text encoder and the transformer stream
/// through managers (CPU test mode without CUDA); otherwise each model is moved whole to the
/// device for its stage. Every weight is back on the CPU at the end.
fn generate(
    p: &mut WanPipeline,
    r: &Request,
    dev: Device,
    offloaded: bool,
    budget: Option<Plan>,
    compress: bool,
    label: &str,
) -> Result<Run> {
    let cuda = dev.is_cuda();
    let sync = || -> Result<()> {
        if let Device::Cuda(d) = dev {
            accel::synchronize_device(d)?;
        }
        Ok(())
    };
    let mut run = Run::default();

    // 1. Text: umT5 streamed, then back on the CPU.
    let t0 = Instant::now();
    let n_text = p.text_encoder.blocks().len();
    let prompts: Vec<&str> = if r.guided() {
        vec![r.prompt.as_str(), r.negative_prompt.as_str()]
    } else {
        vec![r.prompt.as_str()]
    };
    let max_len = r.max_sequence_length;
    let embeds = if offloaded {
        let (bar, report) = progress::offload(format!("{label}: text encoder"));
        let mut m = t2v::offload(
            &p.text_encoder_vs,
            "encoder.block",
            n_text,
            cuda,
            None,
            false,
            Some(Box::new(report)),
        )?;
        bar.finish_and_clear();
        let pb = progress::spinner(format!("{label}: text encoder ready"));
        run.text_init_s = t0.elapsed().as_secs_f64();
        pb.suspend(|| {
            eprintln!(
                "{label}: text encoder ready in {:.2} s; {}",
                run.text_init_s,
                host_memory()
            )
        });
        pb.set_message(format!("{label}: encoding the prompts"));
        let e = {
            let mut blocks = Managed {
                text: Some(&mut m),
                transformer: None,
            };
            encode(p, &prompts, max_len, dev, r.batch_guidance, &mut blocks)?
        };
        sync()?;
        let t_restore = Instant::now();
        t2v::finish(m, &p.text_encoder_vs)?;
        run.text_restore_s = t_restore.elapsed().as_secs_f64();
        pb.finish_and_clear();
        e
    } else {
        t2v::move_all(&p.text_encoder_vs, dev)?;
        let e = encode(
            p,
            &prompts,
            max_len,
            dev,
            r.batch_guidance,
            &mut wan::Resident,
        )?;
        t2v::move_all(&p.text_encoder_vs, Device::Cpu)?;
        if cuda {
            accel::empty_cache()?;
        }
        e
    };
    let (cond, uncond) = if r.guided() {
        (embeds.narrow(0, 0, 1), Some(embeds.narrow(0, 1, 1)))
    } else {
        (embeds, None)
    };
    sync()?;
    run.text_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "{label}: text encoding {:.2} s ({:.2} s of it giving the encoder's weights back); {}",
        run.text_s,
        run.text_restore_s,
        host_memory()
    );

    // 2. Denoising: the transformer streamed under the budget.
    let t0 = Instant::now();
    let latents = p.prepare_latents(r, dev)?;
    let n_blocks = p.transformer.blocks().len();
    let mut manager = if offloaded {
        let budget = match budget {
            Some(plan) if cuda => plan.budget(&p.transformer_vs, n_blocks)?,
            _ => None,
        };
        let (bar, report) = progress::offload(format!("{label}: transformer"));
        let m = t2v::offload(
            &p.transformer_vs,
            "blocks",
            n_blocks,
            cuda,
            budget,
            compress,
            Some(Box::new(report)),
        )?;
        bar.finish_and_clear();
        run.transformer_init_s = t0.elapsed().as_secs_f64();
        Some(m)
    } else {
        t2v::move_all(&p.transformer_vs, dev)?;
        None
    };
    if let Some(m) = manager.as_mut() {
        let st = m.stats().clone();
        run.resident_blocks = st.resident_blocks;
        run.streamed_blocks = st.streamed_blocks;
        eprintln!(
            "{label}: transformer ready in {:.2} s: {} blocks stream, {} stay resident; {}",
            run.transformer_init_s,
            st.streamed_blocks,
            st.resident_blocks,
            host_memory()
        );
    }
    let t_loop = Instant::now();
    let pb = progress::steps(r.num_inference_steps as u64, format!("{label}: denoising"));
    let mut last = Instant::now();
    let mut steps = Vec::new();
    let final_latents = {
        let mut blocks = Managed {
            text: None,
            transformer: manager.as_mut(),
        };
        let mut on_step = |s: wan::Step, _: &Tensor| {
            let _ = sync();
            let secs = last.elapsed().as_secs_f64();
            last = Instant::now();
            steps.push(secs);
            let line = format!(
                "{label}: step {}/{} (t = {}): {secs:.2} s",
                s.done, s.total, s.timestep
            );
            if pb.is_hidden() {
                eprintln!("{line}");
            } else {
                pb.set_message(line);
            }
            pb.inc(1);
        };
        p.denoise(
            r,
            &latents,
            &cond,
            uncond.as_ref(),
            &mut blocks,
            &mut on_step,
        )
        .map_err(advise)?
    };
    pb.finish();
    sync()?;
    run.step_s = steps;
    run.denoise_s = t0.elapsed().as_secs_f64();
    let loop_s = t_loop.elapsed().as_secs_f64();
    match manager {
        Some(mut m) => {
            let st = m.stats().clone();
            run.h2d_gib_s = st.upload_gib_s();
            run.stall_ms = st.stall_ms;
            t2v::finish(m, &p.transformer_vs)?;
        }
        None => {
            t2v::move_all(&p.transformer_vs, Device::Cpu)?;
            if cuda {
                accel::empty_cache()?;
            }
        }
    }
    eprintln!(
        "{label}: denoising {:.2} s ({loop_s:.2} s of steps, median {:.2} s/step)",
        run.denoise_s,
        median(&run.step_s)
    );

    // 3. VAE decode on the device, frame by frame; then back on the CPU.
    let t0 = Instant::now();
    let pb = progress::spinner(format!("{label}: VAE decode"));
    t2v::move_all(&p.vae_vs, dev)?;
    sync()?;
    let t_vae = Instant::now();
    let decoded = p.decode(&final_latents).map_err(advise)?;
    sync()?;
    run.vae_run_s = t_vae.elapsed().as_secs_f64();
    let frames = decoded.get(0).to_device(Device::Cpu);
    t2v::move_all(&p.vae_vs, Device::Cpu)?;
    if cuda {
        accel::empty_cache()?;
    }
    pb.finish_and_clear();
    run.decode_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "{label}: VAE decode {:.2} s ({:.2} s decoding, the rest moving weights and frames); {}",
        run.decode_s,
        run.vae_run_s,
        host_memory()
    );
    run.frames = Some(frames);
    Ok(run)
}

/// The prompts' embeddings: one batch, or one pass per prompt (`batch` false, diffusers' order).
fn encode(
    p: &WanPipeline,
    prompts: &[&str],
    max_len: usize,
    dev: Device,
    batch: bool,
    blocks: &mut dyn wan::BlockLoop,
) -> Result<Tensor> {
    if batch {
        return p
            .encode_prompts(prompts, max_len, dev, blocks)
            .map_err(advise);
    }
    let parts = prompts
        .iter()
        .map(|q| p.encode_prompts(&[q], max_len, dev, blocks))
        .collect::<wan::Result<Vec<_>>>()
        .map_err(advise)?;
    Ok(Tensor::cat(&parts, 0))
}

/// A pipeline error, with what to change where the device ran out of memory.
fn advise(e: wan::Error) -> anyhow::Error {
    if e.is_out_of_memory() {
        anyhow::Error::new(e).context(
            "the device ran out of memory: leave the activations more room with a smaller \
             --budget (GiB of resident transformer blocks), fewer --frames or a smaller \
             --height/--width",
        )
    } else {
        e.into()
    }
}

fn main() -> Result<()> {
    // SAFETY: the first statement of main: no other thread exists yet to touch the environment.
    unsafe { accel::use_recommended_hardware_queues() };
    let a = Args::parse();
    let cuda = accel::cuda_is_available();
    let dev = if cuda { Device::Cuda(0) } else { Device::Cpu };
    // bf16 on a GPU (float32 where diffusers and transformers keep it); float32 on the CPU.
    let kind = match a.dtype {
        Some(Dtype::Float32) => Kind::Float,
        Some(Dtype::Bfloat16) => Kind::BFloat16,
        None if cuda => Kind::BFloat16,
        None => Kind::Float,
    };
    let tiny = a.pipeline.is_none() && a.preset == Preset::Tiny;
    let mut r = Request::new(a.prompt.clone());
    r.negative_prompt = a.negative_prompt.clone();
    r.height = a.height.unwrap_or(if tiny { 16 } else { 480 });
    r.width = a.width.unwrap_or(if tiny { 16 } else { 832 });
    r.num_frames = a.frames.unwrap_or(if tiny { 5 } else { 81 });
    r.num_inference_steps = a.steps.unwrap_or(if tiny { 3 } else { 50 }) as usize;
    r.guidance_scale = a.guidance;
    r.seed = a.seed as u64;
    r.max_sequence_length = a.max_sequence_length as usize;
    r.batch_guidance = !a.no_batch_guidance;
    let out = a.out.clone().unwrap_or_else(video::default_out);
    // A bad file name, or MP4 without ffmpeg, fails before any work.
    if video::Format::of(&out)? == video::Format::Mp4 && !video::ffmpeg_available() {
        bail!(
            "{}: writing MP4 needs ffmpeg on PATH (install it, e.g. `apt-get install ffmpeg`), or name a .gif file",
            out.display()
        );
    }
    if a.vram_limit.is_some() && !cuda {
        bail!("--vram-limit needs a CUDA device");
    }
    if let Some(limit) = a.vram_limit {
        let (_, total) = accel::memory_info(0)?;
        let fraction = (limit * GIB / total as f64).min(1.0);
        accel::set_memory_fraction(fraction).context("setting the per-process memory fraction")?;
        eprintln!(
            "VRAM limited to {limit} GiB of {:.1} GiB",
            total as f64 / GIB
        );
    }
    let device_name = if cuda { gpu_name(0) } else { "cpu".into() };

    let t0 = Instant::now();
    let pb = progress::spinner(match &a.pipeline {
        Some(d) => format!("loading {}", d.display()),
        None => "drawing the seeded random weights".into(),
    });
    let mut p = match &a.pipeline {
        Some(dir) => WanPipeline::from_pretrained(dir, kind)?,
        None => random_pipeline(a.preset, kind, dev)?,
    };
    pb.finish_and_clear();
    p.check_request(&r)?;
    let load_s = t0.elapsed().as_secs_f64();
    // WanPipeline cuts long prompts without a word; this example says so.
    let cut = p.truncated_tokens(&[&r.prompt, &r.negative_prompt], r.max_sequence_length)?;
    for (what, n) in ["prompt", "negative prompt"].iter().zip(&cut) {
        if *n > 0 {
            eprintln!(
                "warning: the {what} is {n} tokens longer than --max-sequence-length {}; those tokens are dropped (as diffusers drops them)",
                r.max_sequence_length
            );
        }
    }
    let weights = [
        bytes_of(&p.text_encoder_vs, ""),
        bytes_of(&p.transformer_vs, ""),
        bytes_of(&p.vae_vs, ""),
    ];
    let total_weights: u64 = weights.iter().sum();
    eprintln!(
        "{}: text encoder {:.2} GiB, transformer {:.2} GiB, VAE {:.2} GiB; ready in {load_s:.1} s; {}",
        a.pipeline.as_deref().map_or_else(
            || format!("{} (seeded random)", preset_name(a.preset)),
            |d| d.display().to_string()
        ),
        weights[0] as f64 / GIB,
        weights[1] as f64 / GIB,
        weights[2] as f64 / GIB,
        host_memory(),
    );

    let shape = p.latent_shape(&r);
    let [pt, ph, pw] = p.transformer.config().patch_size;
    let tokens = shape[2] / pt * (shape[3] / ph) * (shape[4] / pw);
    let batch = if r.guided() && r.batch_guidance { 2 } else { 1 };
    let budget = match (a.budget, a.vram_limit) {
        (Some(b), _) => Some(Plan::Bytes((b * GIB) as u64)),
        (None, Some(limit)) => Some(Plan::UnderLimit {
            limit: (limit * GIB) as u64,
            reserve: match a.reserve {
                Some(g) => (g * GIB) as u64,
                None => activation_reserve(p.transformer.config(), tokens, batch),
            },
        }),
        (None, None) => Some(Plan::Free {
            reserve: match a.reserve {
                Some(g) => (g * GIB) as u64,
                None => activation_reserve(p.transformer.config(), tokens, batch),
            },
        }),
    };
    if cuda {
        accel::reset_peak_memory_stats(0)?;
    }
    let run = generate(&mut p, &r, dev, true, budget, a.compress, "offloaded")?;
    let peak_vram = if cuda {
        accel::memory_stats(0)?.peak_allocated
    } else {
        0
    };
    let frames = run.frames.as_ref().context("no frames")?;

    let mut diff = None;
    if a.check {
        if a.vram_limit.is_some() {
            eprintln!("--check: skipped under --vram-limit (the resident models would not fit)");
        } else {
            let resident = generate(&mut p, &r, dev, false, None, false, "resident")?;
            let rf = resident.frames.context("no frames")?;
            diff = Some((rf - frames).abs().max().double_value(&[]));
        }
    }

    let t0 = Instant::now();
    let (rgb, w, h) = video::to_rgb8(frames)?;
    video::write_video(&out, &rgb, w, h, a.fps as u32)?;
    if let Some(dir) = &a.frames_dir {
        video::write_pngs(dir, &rgb, w, h)?;
    }
    if let Some(path) = &a.save_frames {
        Tensor::write_safetensors(&[("frames", frames)], path)?;
    }
    let write_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "wrote {} ({} frames of {w} x {h}){} in {write_s:.2} s",
        out.display(),
        rgb.len(),
        a.frames_dir
            .as_ref()
            .map_or(String::new(), |d| format!(" and PNGs in {}", d.display()))
    );

    let result = json!({
        "device": device_name,
        "pipeline": a.pipeline.as_deref().map(Path::display).map(|d| d.to_string()),
        "preset": a.pipeline.is_none().then(|| preset_name(a.preset)),
        "height": r.height, "width": r.width, "frames": r.num_frames, "steps": r.num_inference_steps,
        "tokens": tokens, "dtype": format!("{kind:?}"), "guidance": r.guidance_scale, "batch_guidance": r.batch_guidance,
        "vram_limit_gib": a.vram_limit, "compress": a.compress,
        "s_per_step": round3(median(&run.step_s)),
        "step_s": run.step_s.iter().map(|s| round3(*s)).collect::<Vec<_>>(),
        "text_encoding_s": round3(run.text_s),
        "denoising_s": round3(run.denoise_s),
        "vae_decode_s": round3(run.decode_s),
        "text_init_s": round3(run.text_init_s),
        "text_restore_s": round3(run.text_restore_s),
        "vae_run_s": round3(run.vae_run_s),
        "transformer_init_s": round3(run.transformer_init_s),
        "load_s": round3(load_s),
        "resident_blocks": run.resident_blocks,
        "streamed_blocks": run.streamed_blocks,
        "h2d_gib_s": round2(run.h2d_gib_s),
        "stall_ms": round2(run.stall_ms),
        "peak_vram_gib": round2(peak_vram as f64 / GIB),
        "peak_rss_gib": round2(peak_rss_bytes() as f64 / GIB),
        "weights_gib": round2(total_weights as f64 / GIB),
        "max_abs_diff": diff,
        "frames_mean": frames.mean(Kind::Double).double_value(&[]),
        "out": out.display().to_string(),
    });
    println!("RESULT {result}");
    Ok(())
}

/// The preset's name as its flag spells it (`wan-1.3b`).
fn preset_name(p: Preset) -> String {
    p.to_possible_value()
        .map_or_else(|| format!("{p:?}"), |v| v.get_name().to_owned())
}

/// `v` rounded to three decimals.
fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}
