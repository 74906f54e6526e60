//! Loading a real checkpoint: writes a Wan2.1-shaped diffusers transformer directory
//! (`config.json`, safetensors shards and their index), then loads it one way per process and
//! reports the time until the first forward can start, the host memory it took, and (with
//! `--forwards`) milliseconds per forward against the floor.
//!
//! ```text
//! cargo run --release --example checkpoint_load -- write --dir /tmp/wan14b --preset wan-14b --shards 6
//! cargo run --release --example checkpoint_load -- load --dir /tmp/wan14b --mode zero-copy --cold
//! cargo run --release --example checkpoint_load -- load --dir /tmp/wan14b --mode disk --forwards 5
//! ```
//!
//! Modes: `varstore` is the path without this crate's loader (the model built with random
//! weights, `wan::load_checkpoint` reading the shards into it through tch, then `initialize()`
//! copying the blocks into pinned buffers); `empty-varstore` the same with the model built
//! uninitialized; `copy` reads the blocks straight into pinned buffers
//! (`OffloadConfig::checkpoint`); `zero-copy` makes the files' pages the host store; `disk`
//! keeps half the blocks (or `--host-budget-gib`) in memory and reads the others at every
//! forward. `--cold` drops the checkpoint's pages from the page cache first. `--compress`
//! (copy, zero-copy, disk) streams the blocks encoded: zero-copy and disk then use the
//! checkpoint's encoded cache (`<dir>/layerwise-offload.encoded`, written by the first load;
//! run once to write it, then time the next), copy encodes at each start unless
//! `--encoded-cache` names a cache file to use.
//!
//! ```text
//! cargo run --release --example checkpoint_load -- load --dir /tmp/wan14b --mode zero-copy --compress
//! cargo run --release --example checkpoint_load -- load --dir /tmp/wan14b --mode disk --compress --forwards 5
//! ```

use anyhow::{Context, Result, bail};
use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};
use layerwise_offload::accel;
use layerwise_offload::checkpoint::Checkpoint;
use layerwise_offload::{LayerwiseOffloadManager, OffloadConfig};
use serde_json::json;
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind, Tensor, nn};
use wan::WanTransformer3DModel;

use offload_testkit::progress;
use offload_testkit::util;
use util::{
    gpu_name, int_in, median, peak_rss_bytes, pinned_h2d_gib_s, round2, rss_bytes, wan_grid,
};

#[derive(Parser)]
#[command(about = "Write a Wan2.1-shaped sharded checkpoint, or load one and time it")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write a diffusers transformer directory with seeded random weights.
    Write(WriteArgs),
    /// Load a checkpoint one way and report the time to the first forward.
    Load(LoadArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Preset {
    /// 6 blocks of width 256, `wan::Config::small()` (seconds on a CPU).
    Tiny,
    /// Wan2.1-T2V-1.3B.
    #[value(name = "wan-1.3b")]
    Wan1_3b,
    /// Wan2.1-T2V-14B.
    #[value(name = "wan-14b")]
    Wan14b,
}

#[derive(ClapArgs)]
struct WriteArgs {
    /// The directory to write (created; must not hold a checkpoint yet).
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, value_enum, default_value = "tiny")]
    preset: Preset,
    /// Number of shards (1: a single diffusion_pytorch_model.safetensors).
    #[arg(long, default_value_t = 6, value_parser = int_in(1, 1000))]
    shards: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LoadMode {
    Varstore,
    EmptyVarstore,
    Copy,
    ZeroCopy,
    Disk,
}

#[derive(ClapArgs)]
struct LoadArgs {
    /// The checkpoint directory (config.json and the weights).
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, value_enum)]
    mode: LoadMode,
    /// Drop the checkpoint's pages from the page cache first (a cold start).
    #[arg(long)]
    cold: bool,
    /// Host budget of the disk mode in GiB (default: half the blocks): 0 (every block read
    /// from disk) or 0.001 (1 MiB) to 1048576.
    #[arg(long, value_name = "GiB", value_parser = host_budget_gib, allow_hyphen_values = true)]
    host_budget_gib: Option<f64>,
    /// Forwards to time after loading (0: none).
    #[arg(long, default_value_t = 0, value_parser = int_in(0, 1000))]
    forwards: i64,
    /// Tokens of each forward (a 1-frame latent of this many patches).
    #[arg(long, default_value_t = 1024, value_parser = int_in(1, 1 << 20))]
    tokens: i64,
    /// Text tokens.
    #[arg(long, default_value_t = 512, value_parser = int_in(1, 4096))]
    ctx: i64,
    /// Run in the manager's CPU test mode (no CUDA needed; slow: bf16 on the CPU).
    #[arg(long)]
    cpu: bool,
    /// Compressed transport (copy, zero-copy and disk modes); zero-copy and disk read the
    /// checkpoint's encoded cache, written beside it by the first load.
    #[arg(long)]
    compress: bool,
    /// With --compress: the encoded cache file (default with zero-copy and disk: beside the
    /// checkpoint; copy mode encodes at each start without it).
    #[arg(long, value_name = "PATH", requires = "compress")]
    encoded_cache: Option<PathBuf>,
}

/// A parser of `--host-budget-gib`: 0, or a finite number of GiB in [1/1024, 1048576] (a
/// positive budget below 1 MiB would round to next to nothing, NaN or a negative one to 0 bytes,
/// and an infinite one to every byte).
fn host_budget_gib(s: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v == 0.0 || (v.is_finite() && (1.0 / 1024.0..=1048576.0).contains(&v)) => Ok(v),
        _ => Err(format!(
            "{s:?} is not a number of GiB: 0 (every block read from disk) or 0.0009765625 (1 MiB) to 1048576"
        )),
    }
}

fn config_of(p: Preset) -> wan::Config {
    match p {
        Preset::Tiny => wan::Config::small(),
        Preset::Wan1_3b => wan::Config::wan2_1_t2v_1_3b(),
        Preset::Wan14b => wan::Config::wan2_1_t2v_14b(),
    }
}

/// Writes the model's parameters (names, shapes and types of `WanTransformer3DModel` in bf16
/// with diffusers' fp32 modules) as `shards` files of about equal size, drawn as offload-bench
/// draws them: in name order, N(0, 1) in bf16 after seed 1234, times 0.02.
fn write(a: &WriteArgs) -> Result<()> {
    let config = config_of(a.preset);
    if a.dir.join("config.json").exists() {
        bail!("--dir {} holds a checkpoint already", a.dir.display());
    }
    std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    let vs = nn::VarStore::new(Device::Cpu);
    let _shape = WanTransformer3DModel::new_empty(vs.root(), &config, Kind::BFloat16);
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|x, y| x.0.cmp(&y.0));
    let total: usize = vars
        .iter()
        .map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes())
        .sum();
    let shards = a.shards as usize;
    let per = total.div_ceil(shards);
    let origin = if accel::cuda_is_available() {
        Device::Cuda(0)
    } else {
        Device::Cpu
    };
    tch::manual_seed(1234);
    let t0 = Instant::now();
    let name_of = |k: usize| {
        if shards == 1 {
            wan::WEIGHTS_FILE.to_string()
        } else {
            format!(
                "diffusion_pytorch_model-{:05}-of-{shards:05}.safetensors",
                k + 1
            )
        }
    };
    let mut weight_map = BTreeMap::new();
    let (mut shard, mut k, mut bytes) = (Vec::new(), 0usize, 0usize);
    let n = vars.len();
    // Drawn tensors' bytes; the message names the shard being drawn or written.
    let pb = progress::bytes(total as u64, format!("drawing shard 1 of {shards}"));
    for (i, (name, t)) in vars.into_iter().enumerate() {
        let value = tch::no_grad(|| {
            (Tensor::randn(t.size(), (Kind::BFloat16, origin)) * 0.02)
                .to_kind(t.kind())
                .to_device(Device::Cpu)
        });
        bytes += value.numel() * value.kind().elt_size_in_bytes();
        weight_map.insert(name.clone(), name_of(k));
        shard.push((name, value));
        if (bytes >= per * (k + 1) && k + 1 < shards) || i + 1 == n {
            let path = a.dir.join(name_of(k));
            pb.set_message(format!("writing shard {} of {shards}", k + 1));
            Tensor::write_safetensors(&shard, &path)
                .with_context(|| format!("writing {}", path.display()))?;
            pb.suspend(|| eprintln!("  wrote {} ({} tensors)", path.display(), shard.len()));
            shard.clear();
            k += 1;
            pb.set_message(format!("drawing shard {} of {shards}", k + 1));
        }
        pb.set_position(bytes as u64);
    }
    pb.finish_and_clear();
    if shards > 1 {
        let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        std::fs::write(
            a.dir.join(wan::INDEX_FILE),
            serde_json::to_string_pretty(&index)?,
        )?;
    }
    std::fs::write(
        a.dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    println!(
        "RESULT {}",
        json!({ "write": a.dir, "bytes": total, "shards": k, "seconds": round2(t0.elapsed().as_secs_f64()) })
    );
    Ok(())
}

/// Read rate (GiB/s) of the tensors of blocks `blocks` from the checkpoint's files, cold (their
/// pages dropped first), with as many threads as the manager's reader uses.
fn read_gib_s(ckpt: &Checkpoint, blocks: &[usize]) -> Result<f64> {
    ckpt.evict_page_cache()?;
    let files: Vec<std::fs::File> = ckpt
        .files()
        .iter()
        .map(std::fs::File::open)
        .collect::<std::io::Result<_>>()?;
    let mut jobs: Vec<(usize, u64, usize)> = Vec::new();
    for (name, t) in ckpt.tensors() {
        let block = name
            .strip_prefix("blocks.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        if block.is_some_and(|b| blocks.contains(&b)) {
            let mut at = 0;
            while at < t.bytes {
                let len = (t.bytes - at).min(16 << 20);
                jobs.push((t.file, t.offset + at as u64, len));
                at += len;
            }
        }
    }
    let bytes: usize = jobs.iter().map(|j| j.2).sum();
    let threads = std::thread::available_parallelism()
        .map_or(4, |n| n.get())
        .min(16);
    let queue = std::sync::Mutex::new(jobs);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = vec![0u8; 16 << 20];
                loop {
                    let job = queue.lock().unwrap().pop();
                    let Some((f, off, len)) = job else { break };
                    files[f].read_exact_at(&mut buf[..len], off).expect("read");
                }
            });
        }
    });
    let secs = t0.elapsed().as_secs_f64();
    ckpt.evict_page_cache()?;
    Ok(bytes as f64 / (1u64 << 30) as f64 / secs)
}

fn forward(
    model: &WanTransformer3DModel,
    xs: &[Tensor],
    m: &mut LayerwiseOffloadManager,
) -> Result<Tensor> {
    tch::no_grad(|| {
        let e = model.embed(&xs[0], &xs[1], &xs[2])?;
        let mut h = e.hidden.shallow_clone();
        for i in 0..model.blocks().len() {
            let _g = m.enter(i)?;
            h = model.block(i, &h, &e);
        }
        Ok(model.head(&h, &e))
    })
}

fn gib(b: u64) -> f64 {
    round2(b as f64 / (1u64 << 30) as f64)
}

fn load(a: &LoadArgs) -> Result<()> {
    let cuda = !a.cpu && accel::cuda_is_available();
    if !a.cpu && !cuda {
        bail!("no CUDA device: pass --cpu for the CPU test mode");
    }
    // The checkpoint's types (bf16, float32 where diffusers keeps it) on either device: the
    // zero-copy and disk modes stream the file's bytes as stored.
    let (dev, kind) = (
        if cuda { Device::Cuda(0) } else { Device::Cpu },
        Kind::BFloat16,
    );
    let config = wan::Config::from_file(a.dir.join("config.json"))?;
    let layers = config.num_layers as usize;
    let probe = Checkpoint::open(&a.dir)?;
    let file_bytes: u64 = probe
        .files()
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    let block_bytes: u64 = probe
        .tensors()
        .iter()
        .filter(|(n, _)| n.starts_with("blocks.0."))
        .map(|(_, t)| t.bytes as u64)
        .sum();
    if a.cold {
        probe.evict_page_cache()?;
    }
    drop(probe);
    if a.compress && matches!(a.mode, LoadMode::Varstore | LoadMode::EmptyVarstore) {
        bail!("--compress applies to the copy, zero-copy and disk modes");
    }
    let rss0 = rss_bytes();
    let t0 = Instant::now();
    let vs = nn::VarStore::new(Device::Cpu);
    let mut phases = BTreeMap::new();
    let (model, mut m) = match a.mode {
        LoadMode::Varstore | LoadMode::EmptyVarstore => {
            let model = if a.mode == LoadMode::Varstore {
                let mut vs_kind = vs;
                vs_kind.set_kind(kind);
                let model = WanTransformer3DModel::new(vs_kind.root(), &config);
                wan::set_kind(&mut vs_kind, kind);
                (model, vs_kind)
            } else {
                (
                    WanTransformer3DModel::new_empty(vs.root(), &config, kind),
                    vs,
                )
            };
            phases.insert("build_s", round2(t0.elapsed().as_secs_f64()));
            let (model, vs) = model;
            wan::load_checkpoint(&vs, &a.dir)?;
            phases.insert("read_s", round2(t0.elapsed().as_secs_f64()));
            let (bar, report) = progress::offload("initialize");
            let mut m = OffloadConfig::new("blocks", layers)
                .cpu_test_mode(!cuda)
                .on_progress(report)
                .build(&vs)?;
            m.initialize()?;
            bar.finish_and_clear();
            (model, m)
        }
        LoadMode::Copy | LoadMode::ZeroCopy | LoadMode::Disk => {
            let model = WanTransformer3DModel::new_empty(vs.root(), &config, kind);
            let ckpt = Checkpoint::open(&a.dir)?;
            let (bar, report) = progress::offload("loading");
            let mut cfg = OffloadConfig::new("blocks", layers)
                .cpu_test_mode(!cuda)
                .checkpoint(ckpt)
                .on_progress(report);
            if a.mode == LoadMode::ZeroCopy {
                cfg = cfg.zero_copy(true);
            }
            if a.compress {
                cfg = cfg.compress(true);
            }
            if let Some(p) = &a.encoded_cache {
                cfg = cfg.encoded_cache(p);
            }
            if a.mode == LoadMode::Disk {
                let budget = match a.host_budget_gib {
                    Some(g) => (g * (1u64 << 30) as f64) as u64,
                    None => block_bytes * (layers as u64 / 2) + block_bytes / 2,
                };
                cfg = cfg.host_budget(budget);
            }
            let mut m = cfg.build(&vs)?;
            m.initialize()?;
            bar.finish_and_clear();
            (model, m)
        }
    };
    let ready_s = t0.elapsed().as_secs_f64();
    let (peak, rss) = (peak_rss_bytes(), rss_bytes());
    let st = m.stats().clone();
    eprintln!(
        "{:?}: ready in {ready_s:.2} s; peak RSS {:.2} GiB (file {:.2} GiB); {} disk-tier blocks",
        a.mode,
        gib(peak),
        gib(file_bytes),
        st.disk_blocks
    );
    let mut row = json!({
        "mode": format!("{:?}", a.mode),
        "device": if cuda { gpu_name(0) } else { "cpu".into() },
        "cold": a.cold,
        "ready_s": round2(ready_s),
        "phases": phases,
        "peak_rss_gib": gib(peak),
        "rss_gib": gib(rss),
        "rss_before_gib": gib(rss0),
        "file_gib": gib(file_bytes),
        "host_bytes_gib": gib(st.host_bytes),
        "disk_blocks": st.disk_blocks,
        "blocks": layers,
        "compress": a.compress,
        "encoded_blocks": st.encoded_blocks,
    });
    if a.forwards > 0 {
        let (gh, gw) = wan_grid(a.tokens);
        let [pt, ph, pw] = config.patch_size;
        tch::manual_seed(a.tokens);
        let xs = vec![
            Tensor::randn([1, config.in_channels, pt, ph * gh, pw * gw], (kind, dev)),
            Tensor::from_slice(&[500f32]).to_device(dev),
            Tensor::randn([1, a.ctx, config.text_dim], (kind, dev)),
        ];
        let _ = forward(&model, &xs, &mut m)?; // warm-up
        let mut per = Vec::new();
        let sync = || -> Result<()> {
            if cuda {
                accel::synchronize_device(0)?;
            }
            Ok(())
        };
        sync()?;
        let pb = progress::steps(a.forwards as u64, "forwards");
        let t = Instant::now();
        for _ in 0..a.forwards {
            let f = Instant::now();
            let _ = forward(&model, &xs, &mut m)?;
            sync()?;
            per.push(f.elapsed().as_secs_f64() * 1e3);
            pb.inc(1);
        }
        pb.finish_and_clear();
        let sustained = t.elapsed().as_secs_f64() * 1e3 / a.forwards as f64;
        // Compressed: the encodings move, from the disk as well as over PCIe.
        let ratio = match st.raw_encoded_bytes {
            0 => 1.0,
            raw => st.encoded_bytes as f64 / raw as f64,
        };
        let streamed = (st.streamed_blocks as f64 * block_bytes as f64 * ratio) as u64;
        let disk = (st.disk_blocks as f64 * block_bytes as f64 * ratio) as u64;
        let pcie = if cuda { pinned_h2d_gib_s(0)? } else { 0.0 };
        let ckpt = Checkpoint::open(&a.dir)?;
        let disk_rate = if st.disk_blocks > 0 {
            read_gib_s(&ckpt, &(0..st.disk_blocks).collect::<Vec<_>>())?
        } else {
            0.0
        };
        let ms = |bytes: u64, rate: f64| {
            if rate > 0.0 {
                bytes as f64 / (1u64 << 30) as f64 / rate * 1e3
            } else {
                0.0
            }
        };
        let floor = ms(streamed, pcie).max(ms(disk, disk_rate));
        eprintln!(
            "{} forwards at {} tokens: {:.1} ms each (median {:.1}); floor {:.1} ms (PCIe {:.1} GiB/s for {:.2} GiB, reads {:.1} GiB/s for {:.2} GiB)",
            a.forwards,
            a.tokens,
            sustained,
            median(&per),
            floor,
            pcie,
            gib(streamed),
            disk_rate,
            gib(disk)
        );
        row["tokens"] = json!(a.tokens);
        row["ms_sustained"] = json!(round2(sustained));
        row["ms_median"] = json!(round2(median(&per)));
        row["floor_ms"] = json!(round2(floor));
        row["pcie_gib_s"] = json!(round2(pcie));
        row["read_gib_s"] = json!(round2(disk_rate));
        row["streamed_gib"] = json!(gib(streamed));
        row["disk_gib"] = json!(gib(disk));
    }
    println!("RESULT {row}");
    Ok(())
}

fn main() -> Result<()> {
    // SAFETY: the first statement of main: no other thread exists yet to touch the environment.
    unsafe { accel::use_recommended_hardware_queues() };
    match Cli::parse().cmd {
        Cmd::Write(a) => write(&a),
        Cmd::Load(a) => load(&a),
    }
}
