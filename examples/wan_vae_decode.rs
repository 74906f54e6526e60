//! Decodes random latents with Wan's VAE decoder (`wan::WanVae`) and reports the time and the
//! peak memory: the whole video at once (`--mode full`) or streamed chunk by chunk without
//! keeping it (`--mode stream`), so that one can see the memory does not grow with the frames.
//!
//! ```text
//! cargo run --release --example wan_vae_decode -- --frames 81 --height 480 --width 832
//! cargo run --release --example wan_vae_decode -- --vae /path/to/Wan2.1-T2V-1.3B-Diffusers/vae --kind bf16 --mode stream
//! ```
//!
//! Without `--vae` the decoder is Wan2.1's (`--preset wan2.1`) or the test fixture's
//! (`--preset tiny`) with seeded random weights. Ends with one `RESULT {json}` line.

use anyhow::{Result, bail};
use clap::{Parser, ValueEnum};
use layerwise_offload::accel;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind, Tensor, nn};
use wan::{VaeConfig, WanVae};

use offload_testkit::util;
use util::{gpu_name, peak_rss_bytes, round2};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Preset {
    /// Wan2.1's VAE (base 96, 16 latent channels).
    #[value(name = "wan2.1")]
    Wan21,
    /// The parity fixture's (base 8, 4 latent channels).
    Tiny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// `decode`: the whole video in one tensor.
    Full,
    /// `decode_chunks`: each chunk handed over and dropped.
    Stream,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DType {
    F32,
    Bf16,
}

#[derive(Parser)]
#[command(about = "Decode random latents with Wan's VAE and report time and peak memory")]
struct Args {
    /// A diffusers `vae/` directory (config.json and safetensors); random weights without it.
    #[arg(long)]
    vae: Option<PathBuf>,
    /// The configuration of the random decoder when no --vae is given.
    #[arg(long, value_enum, default_value_t = Preset::Wan21)]
    preset: Preset,
    /// Video frames (1 + 4k for Wan2.1).
    #[arg(long, default_value_t = 81)]
    frames: i64,
    /// Video height in pixels (a multiple of 8 for Wan2.1).
    #[arg(long, default_value_t = 480)]
    height: i64,
    /// Video width in pixels.
    #[arg(long, default_value_t = 832)]
    width: i64,
    /// Weights' and activations' type.
    #[arg(long, value_enum, default_value_t = DType::F32)]
    kind: DType,
    /// Whole video or streamed chunks.
    #[arg(long, value_enum, default_value_t = Mode::Full)]
    mode: Mode,
    /// Run on the CPU even where CUDA is available.
    #[arg(long)]
    cpu: bool,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let cuda = !a.cpu && accel::cuda_is_available();
    let device = if cuda { Device::Cuda(0) } else { Device::Cpu };
    let kind = match a.kind {
        DType::F32 => Kind::Float,
        DType::Bf16 => Kind::BFloat16,
    };
    tch::manual_seed(0);
    let mut vs = nn::VarStore::new(device);
    let vae = match &a.vae {
        Some(dir) => WanVae::from_pretrained(&mut vs, dir, kind)?,
        None => {
            let config = match a.preset {
                Preset::Wan21 => VaeConfig::wan2_1(),
                Preset::Tiny => VaeConfig::tiny(),
            };
            let vae = WanVae::new(vs.root(), &config)?;
            vs.set_kind(kind);
            vae
        }
    };
    let c = vae.config();
    let (sf, tf) = (c.spatial_factor(), c.temporal_factor());
    if a.frames < 1 || (a.frames - 1) % tf != 0 || a.height % sf != 0 || a.width % sf != 0 {
        bail!(
            "--frames must be 1 + {tf}k and --height/--width multiples of {sf} for this VAE (got {} x {} x {})",
            a.frames,
            a.height,
            a.width
        );
    }
    let latent = [
        1,
        c.z_dim,
        1 + (a.frames - 1) / tf,
        a.height / sf,
        a.width / sf,
    ];
    let z = Tensor::randn(latent, (Kind::Float, device));
    let z = vae.denormalize(&z)?;
    let weights: i64 = vs
        .variables()
        .values()
        .map(|t| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64)
        .sum();
    let sync = || {
        if cuda {
            tch::Cuda::synchronize(0);
        }
    };
    sync();
    let base = if cuda {
        accel::reset_peak_memory_stats(0)?;
        accel::memory_stats(0)?.allocated
    } else {
        0
    };
    let start = Instant::now();
    let (frames, stats) = match a.mode {
        Mode::Full => {
            let video = vae.decode(&z)?;
            (video.size()[2], None)
        }
        Mode::Stream => {
            let mut checksum = 0.0;
            let s = vae.decode_chunks(&z, |chunk: wan::VideoChunk| -> wan::Result<()> {
                checksum += chunk
                    .video
                    .to_kind(Kind::Double)
                    .sum(Kind::Double)
                    .double_value(&[]);
                Ok(())
            })?;
            println!("checksum {checksum:.3}");
            (s.frames, Some(s))
        }
    };
    sync();
    let seconds = start.elapsed().as_secs_f64();
    let gib = |b: u64| round2(b as f64 / (1u64 << 30) as f64);
    let peak = if cuda {
        Some(accel::memory_stats(0)?.peak_allocated - base)
    } else {
        None
    };
    println!(
        "decoded {frames} frames of {}x{} from latents {latent:?} in {seconds:.2} s on {}; weights {:.1} MiB{}",
        a.height,
        a.width,
        if cuda { gpu_name(0) } else { "the CPU".into() },
        weights as f64 / (1 << 20) as f64,
        peak.map(|p| format!(
            "; peak {:.2} GiB above weights and latents",
            p as f64 / (1u64 << 30) as f64
        ))
        .unwrap_or_default()
    );
    let result = json!({
        "mode": format!("{:?}", a.mode).to_lowercase(),
        "kind": format!("{:?}", a.kind).to_lowercase(),
        "device": if cuda { gpu_name(0) } else { "cpu".into() },
        "frames": frames,
        "height": a.height,
        "width": a.width,
        "latent_shape": latent,
        "seconds": round2(seconds),
        "peak_vram_gib_above_inputs": peak.map(gib),
        "video_gib": gib((3 * frames * a.height * a.width) as u64 * kind.elt_size_in_bytes() as u64),
        "cache_mib": stats.map(|s| round2(s.cache_bytes_max as f64 / (1 << 20) as f64)),
        "peak_rss_gib": gib(peak_rss_bytes()),
    });
    println!("RESULT {result}");
    Ok(())
}
