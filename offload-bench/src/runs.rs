//! The runs: the model and its inputs ([`Bench`]), then each configuration timed: full streaming
//! and one per VRAM budget ([`streaming`]), several GPUs from one host copy ([`several_gpus`]),
//! and the resident model ([`resident`]). They return what they measured; the report turns it
//! into rows.

use crate::flags::{Args, EncodedBlocks, Mode};
use crate::model::{Instance, build_wan, empty_wan, tensor_bytes, wan_forward, wan_instance};
use crate::progress;
use crate::util::{gpu_name, huge_page_bytes, median, peak_rss_bytes, pinned_h2d, wan_grid};
use anyhow::{Context, Result};
use indicatif::{MultiProgress, ProgressBar};
use layerwise_offload::accel::{self, Event, Stream};
use layerwise_offload::checkpoint::Checkpoint;
use layerwise_offload::{
    DEFAULT_STAGING_BUFFERS, LayerwiseOffloadManager, OffloadConfig, PeerGroup, compute_ms,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};
use wan::WanTransformer3DModel;

/// The model's name in the table and the `RESULT` lines.
pub const MODEL_NAME: &str = "wan";

/// What every run shares: the device, the model with its weights, the inputs per token count.
pub struct Bench {
    /// CUDA device 0, or the CPU (the manager's CPU test mode).
    pub dev: Device,
    /// The weights' kind: bf16 (float32 for drawn weights on the CPU).
    pub kind: Kind,
    /// nvidia-smi's name of the device, or `cpu`.
    pub device_name: String,
    /// Measured pinned host-to-device GiB/s (0 on the CPU).
    pub bw: f64,
    pub model: WanTransformer3DModel,
    /// The model's parameters by name (sharing storage with the model's).
    pub named: Vec<(String, Tensor)>,
    /// The checkpoint the weights come from, if any.
    pub ckpt: Option<Arc<Checkpoint>>,
    /// The bytes of the block weights.
    pub block_bytes: usize,
    /// The peak RSS before any manager.
    pub host_before: u64,
    /// Per token count: the latent, the timestep and the text embeddings.
    pub inputs: Vec<(i64, Vec<Tensor>)>,
    /// Forwards per configuration and token count: warm-up, timed, sustained.
    pub forwards: u64,
    /// With --high-priority-compute: the high-priority stream made current for the whole run.
    _compute: Option<accel::StreamGuard>,
    /// The id of the compute stream (CUDA only).
    pub compute_stream: Option<i64>,
}

impl Bench {
    /// Measures the link, sets the compute stream, builds (or maps) the weights and draws the
    /// inputs.
    pub fn new(a: &Args) -> Result<Bench> {
        let s = &a.shape;
        let dev = if a.cpu { Device::Cpu } else { Device::Cuda(0) };
        // A checkpoint streams as stored (bf16 with diffusers' fp32 modules), also on the CPU.
        let kind = if a.cpu && a.checkpoint.is_none() {
            Kind::Float
        } else {
            Kind::BFloat16
        };
        let device_name = match dev {
            Device::Cuda(d) => gpu_name(d),
            _ => "cpu".into(),
        };
        let (bw, placement) = match dev {
            Device::Cuda(d) => {
                let (bw, placement) = pinned_h2d(d)?;
                (bw, Some(placement))
            }
            _ => (0.0, None),
        };
        if let Some(placement) = placement {
            // The link's speed has differed between processes on one host (45 against 51
            // GiB/s): where its ends sit is printed with it.
            eprintln!(
                "{device_name}: pinned host to device {bw:.2} GiB/s; {} hardware work queues per device ({}); {placement}",
                accel::hardware_queues(),
                accel::HARDWARE_QUEUES_VAR
            );
        }
        // The compute stream of the whole run (the current stream of this thread).
        let compute = match (dev, a.high_priority_compute) {
            (Device::Cuda(d), true) => {
                let s = Stream::from_pool_high_priority(d)?;
                eprintln!("compute on a high-priority stream");
                Some(accel::StreamGuard::new(&s)?)
            }
            _ => None,
        };
        let compute_stream = match dev {
            Device::Cuda(d) => Some(Stream::current(d)?.id()),
            _ => None,
        };
        if let Some(id) = compute_stream {
            eprintln!("compute stream {id}");
        }
        eprintln!(
            "building {} {MODEL_NAME} weights ({} blocks, dim {}, ffn {}) on the CPU...",
            s.preset, s.layers, s.dim, s.ffn
        );
        let t0 = Instant::now();
        let ckpt = match &a.checkpoint {
            Some(c) => Some(Arc::new(Checkpoint::open(&c.dir)?)),
            None => None,
        };
        let (model, named) = match &ckpt {
            // Uninitialized: every manager below reads the checkpoint into it.
            Some(_) => empty_wan(&s.wan, kind),
            None => build_wan(&s.wan, dev, kind, a.dist),
        };
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
        let inputs = a
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
        Ok(Bench {
            dev,
            kind,
            device_name,
            bw,
            model,
            named,
            ckpt,
            block_bytes,
            host_before,
            inputs,
            forwards: (a.warmup + 2 * a.reps) as u64,
            _compute: compute,
            compute_stream,
        })
    }
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

/// One configuration of one GPU at one token count: what was measured.
pub struct Streamed {
    /// The configuration: `stream d1`, `budget 14.5 GiB d1 compressed`, ...
    pub label: String,
    pub tokens: i64,
    /// Median ms per forward.
    pub ms: f64,
    /// Mean ms per forward, back to back.
    pub ms_sustained: f64,
    /// Bytes streamed per forward (encoded with compression).
    pub streamed_bytes: u64,
    /// The streamed blocks raw (equal to streamed_bytes without compression).
    pub raw_bytes: u64,
    /// Decode ms per forward.
    pub decode_ms: f64,
    /// Compute stall ms per forward.
    pub stall: f64,
    /// Peak VRAM bytes allocated.
    pub peak: u64,
    /// Seconds of build and `initialize()`.
    pub init_s: f64,
    /// Peak RSS after `initialize()`.
    pub host_peak: u64,
    pub resident_blocks: usize,
    /// Streamed blocks with an encoded host copy.
    pub encoded_blocks: usize,
    /// The ids of the manager's copy and decode streams (CUDA only; decode with compression).
    pub copy_stream: Option<i64>,
    pub decode_stream: Option<i64>,
    /// The last forward's output (compared with the resident model's).
    pub out: Tensor,
}

/// The single-GPU configurations' measurements and the last manager's statistics table.
pub struct StreamRuns {
    pub rows: Vec<Streamed>,
    pub stats_table: String,
}

/// The configuration's name in the table.
fn label(a: &Args, budget: Option<f64>, compress: bool) -> String {
    let mut label = match budget {
        None => format!("stream d{}", a.depth),
        Some(b) => format!("budget {b} GiB d{}", a.depth),
    };
    if compress {
        label.push_str(" compressed");
    }
    match &a.checkpoint {
        Some(c) if c.zero_copy => label.push_str(" zero-copy"),
        Some(c) => {
            if let Some(h) = c.host_budget {
                label.push_str(&format!(" host {:.1} GiB", h as f64 / (1u64 << 30) as f64))
            }
        }
        None => {}
    }
    label
}

/// One single-GPU configuration to measure.
#[derive(Debug, Clone, Copy)]
struct Single {
    /// The VRAM budget in GiB, or full streaming.
    budget: Option<f64>,
    compress: bool,
    two_tier: bool,
    /// Staging buffers of a compressed configuration.
    staging: usize,
    /// Decode grid of a compressed configuration (None: full).
    grid: Option<u32>,
    /// Streamed blocks a compressed configuration encodes.
    enc: EncodedBlocks,
    /// Which of the --repeat runs (from 1).
    run: usize,
}

/// Full streaming (not with --no-full-streaming), then one configuration per VRAM budget (none
/// with --multi-only), each raw (not with --no-raw) and then compressed beside it (--compress,
/// once per --staging-buffers count and --decode-blocks grid), each --repeat times in a row, each
/// at every token count.
pub fn streaming(a: &Args, b: &Bench) -> Result<StreamRuns> {
    let s = &a.shape;
    let dev = b.dev;
    let mut rows = Vec::new();
    let mut budgets: Vec<Option<f64>> = Vec::new();
    if a.full_streaming {
        budgets.push(None);
    }
    budgets.extend(a.budgets.iter().map(|&b| Some(b)));
    if a.multi_only {
        budgets.clear();
    }
    // Per budget: raw, then per staging buffer count compressed (one tier) and compressed
    // with two tiers allowed.
    let several = a.staging_buffers.len() > 1;
    let grids_named = a.decode_blocks.len() > 1 || a.decode_blocks.iter().any(|g| g.is_some());
    let configs: Vec<Single> = budgets
        .iter()
        .flat_map(|&budget| {
            let one = move |compress, two_tier, staging, grid, enc| Single {
                budget,
                compress,
                two_tier,
                staging,
                grid,
                enc,
                run: 1,
            };
            let compressed = a.staging_buffers.iter().flat_map(move |&n| {
                a.decode_blocks.iter().flat_map(move |&g| {
                    a.compress_blocks.iter().flat_map(move |&e| {
                        a.compress
                            .then_some(one(true, false, n, g, e))
                            .into_iter()
                            .chain(a.two_tier.then_some(one(true, true, n, g, e)))
                    })
                })
            });
            a.raw
                .then_some(one(
                    false,
                    false,
                    DEFAULT_STAGING_BUFFERS,
                    None,
                    EncodedBlocks::All,
                ))
                .into_iter()
                .chain(compressed)
        })
        .flat_map(|c| (1..=a.repeat).map(move |run| Single { run, ..c }))
        .collect();
    let mut stats_table = String::new();
    for Single {
        budget,
        compress,
        two_tier,
        staging,
        grid,
        enc,
        run,
    } in configs
    {
        let mut label = label(a, budget, compress);
        if two_tier {
            label.push_str(" two-tier");
        }
        if compress && several {
            label.push_str(&format!(" sb{staging}"));
        }
        if compress && grids_named {
            match grid {
                Some(g) => label.push_str(&format!(" grid{g}")),
                None => label.push_str(" grid full"),
            }
        }
        match (compress, enc) {
            (true, EncodedBlocks::Count(n)) => label.push_str(&format!(" enc{n}")),
            (true, EncodedBlocks::Auto) if a.sizing_rounds > 1 => {
                label.push_str(&format!(" enc auto r{}", a.sizing_rounds))
            }
            (true, EncodedBlocks::Auto) => label.push_str(" enc auto"),
            _ => {}
        }
        if run > 1 {
            label.push_str(&format!(" run{run}"));
        }
        if let Device::Cuda(d) = dev {
            for _ in 0..a.skip_streams {
                Stream::from_pool(d)?;
            }
        }
        let mut cfg = OffloadConfig::new("blocks", s.layers)
            .prefetch_depth(a.depth)
            .cpu_test_mode(a.cpu)
            .compress(compress)
            .compress_two_tier(two_tier)
            .compress_staging_buffers(staging)
            .compress_decode_blocks(grid)
            .avoid_pool_streams(a.avoid_pool_streams.iter().copied());
        if let Some(b) = budget {
            cfg = cfg.vram_budget((b * (1u64 << 30) as f64) as u64);
        }
        if let (Some(c), Some(ca)) = (&b.ckpt, &a.checkpoint) {
            cfg = cfg.checkpoint(c.clone()).zero_copy(ca.zero_copy);
            if let Some(h) = ca.host_budget {
                cfg = cfg.host_budget(h);
            }
        }
        if let (true, EncodedBlocks::Count(n)) = (compress, enc) {
            cfg = cfg.compress_blocks(n);
        }
        let t0 = Instant::now();
        let pb = progress::spinner(format!("{label}: initialize"));
        let mut m = cfg.build(&b.named)?;
        m.initialize()?;
        pb.finish_and_clear();
        let init_s = t0.elapsed().as_secs_f64();
        if let (true, EncodedBlocks::Auto) = (compress, enc) {
            let t = Instant::now();
            size_encoding(b, &mut m, &label, a.sizing_rounds, a.sizing_link_gib_s)?;
            eprintln!(
                "{label}: sized in place in {:.2} s",
                t.elapsed().as_secs_f64()
            );
        }
        let host_peak = peak_rss_bytes();
        let st = m.stats().clone();
        // Bytes streamed per forward: the host copies, and the disk tier's blocks too.
        let streamed_bytes = if st.disk_blocks > 0 {
            (b.block_bytes * st.streamed_blocks / s.layers) as u64
        } else {
            st.host_bytes
        };
        // The raw blocks' bytes plus what the encoded ones decode to.
        let raw_bytes = match (st.encoded_blocks, st.disk_blocks) {
            (0, _) => streamed_bytes,
            (_, 0) => streamed_bytes - st.encoded_bytes + st.raw_encoded_bytes,
            // The disk tier holds every streamed block encoded.
            _ => st.raw_encoded_bytes,
        };
        let (copy_id, decode_id) = m.stream_ids();
        let id = |s: Option<i64>| s.map_or("-".to_string(), |i| i.to_string());
        eprintln!(
            "{label}: initialize {init_s:.2} s; {} streamed, {} resident blocks; host peak {:.2} GiB (before: {:.2} GiB), {:.2} GiB in huge pages now; copy stream {}, decode stream {}, decode grid {}",
            st.streamed_blocks,
            st.resident_blocks,
            host_peak as f64 / (1u64 << 30) as f64,
            b.host_before as f64 / (1u64 << 30) as f64,
            huge_page_bytes() as f64 / (1u64 << 30) as f64,
            id(copy_id),
            id(decode_id),
            m.decode_grid()
                .map_or("-".to_string(), |g| format!("{g} blocks"))
        );
        for (tokens, xs) in &b.inputs {
            if let Device::Cuda(d) = dev {
                accel::synchronize_device(d)?;
                accel::reset_peak_memory_stats(d)?;
            }
            let (stall0, decode0) = (m.stats().stall_ms, m.stats().decode_ms);
            let pb = progress::steps(b.forwards, format!("{label}, {tokens} tokens: forwards"));
            let (ms, ms_sustained, y) =
                time_forwards(a, || wan_forward(&b.model, xs, Some(&mut m)), dev, &pb)?;
            pb.finish_and_clear();
            if let Device::Cuda(d) = dev {
                accel::synchronize_device(d)?;
            }
            let stall = (m.stats().stall_ms - stall0) / b.forwards as f64;
            let decode_ms = (m.stats().decode_ms - decode0) / b.forwards as f64;
            let peak = if let Device::Cuda(d) = dev {
                accel::memory_stats(d)?.peak_allocated
            } else {
                0
            };
            if let (Some(dir), Device::Cuda(_)) = (&a.trace_dir, dev) {
                // Three more forwards back to back, captured: the second's period (to the
                // third's start) is the steady state, the next forward's first uploads
                // overlapping the end of this one.
                m.start_timeline()?;
                for _ in 0..3 {
                    let _ = wan_forward(&b.model, xs, Some(&mut m));
                }
                let spans = m.finish_timeline()?;
                write_timeline(dir, &label, *tokens, &spans)?;
            }
            rows.push(Streamed {
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
                encoded_blocks: st.encoded_blocks,
                copy_stream: copy_id,
                decode_stream: decode_id,
                out: y,
            });
        }
        if let (Some(path), Device::Cuda(_), true) = (&a.trace, dev, budget.is_none()) {
            // One more forward of the first size, captured as a Chrome trace.
            let (_, xs) = &b.inputs[0];
            m.start_timeline()?;
            let _ = wan_forward(&b.model, xs, Some(&mut m));
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
    Ok(StreamRuns { rows, stats_table })
}

/// `--compress-blocks auto`: on `m`, built with every streamed block encoded, runs a forward
/// of the first token count to warm up and one with a timeline, asks `encoded_blocks_needed`
/// for that forward's compute (its length less its stalls) at the measured link rate, and
/// converts the blocks in place (`set_encoded_blocks`); with `--sizing-rounds R` it measures
/// and asks again on the converted manager, up to R rounds, until the answer repeats or is 0
/// (exact: nothing decodes then). Returns the answer, which `m` holds.
fn size_encoding(
    b: &Bench,
    m: &mut LayerwiseOffloadManager,
    label: &str,
    rounds: usize,
    link: Option<f64>,
) -> Result<usize> {
    let mut answer = None;
    for round in 1..=rounds {
        let pb = progress::spinner(format!("{label}: sizing the encoding, round {round}"));
        let (tokens, xs) = &b.inputs[0];
        let _ = wan_forward(&b.model, xs, Some(&mut *m));
        let (forward, compute) = if let Device::Cuda(_) = b.dev {
            m.start_timeline()?;
            let _ = wan_forward(&b.model, xs, Some(&mut *m));
            let spans = m.finish_timeline()?;
            let end = spans.iter().map(|s| s.end_ms).fold(0.0, f64::max);
            (end, compute_ms(&spans))
        } else {
            // The CPU test mode: no timeline, and no stalls to take off (uploads are copies on
            // this thread).
            let t = Instant::now();
            let _ = wan_forward(&b.model, xs, Some(&mut *m));
            let ms = t.elapsed().as_secs_f64() * 1e3;
            (ms, ms)
        };
        let stall = forward - compute;
        // The CPU test mode has no link to measure: a nominal rate sizes the pattern there.
        let bw = match link {
            Some(bw) => bw,
            None if b.bw > 0.0 => b.bw,
            None => 1.0,
        };
        let n = m.encoded_blocks_needed(compute, bw)?;
        let was = m.stats().encoded_blocks;
        let t = Instant::now();
        m.set_encoded_blocks(n)?;
        pb.finish_and_clear();
        eprintln!(
            "{label}, {tokens} tokens, round {round} ({was} encoded): a forward of {forward:.1} ms with {stall:.1} ms of stalls; {compute:.1} ms of compute at {bw:.1} GiB/s needs {n} of {} streamed blocks encoded (converted in {:.2} s)",
            m.stats().streamed_blocks,
            t.elapsed().as_secs_f64()
        );
        let settled = n == 0 || answer == Some(n);
        answer = Some(n);
        if settled {
            break;
        }
    }
    Ok(answer.expect("at least one round"))
}

/// One GPU of a several-GPU run at one token count.
pub struct GpuRow {
    /// The mode's label (`peer split compressed`, ...).
    pub mode: &'static str,
    pub gpu: usize,
    pub tokens: i64,
    /// Median ms per forward.
    pub ms: f64,
    /// Mean ms per forward, back to back.
    pub ms_sustained: f64,
    /// Bytes this GPU uploaded from the host during the timed forwards (in a peer group its
    /// share of the uploads).
    pub sent: u64,
    /// Peak bytes allocated on this GPU during the timed forwards (0 on the CPU).
    pub peak_vram: u64,
    /// The last forward's output, on the CPU.
    pub out: Tensor,
}

/// The several-GPU runs: the modes in order, one row per GPU, mode and token count, and the
/// shared host store's bytes per mode.
pub struct MultiRuns {
    pub modes: Vec<&'static str>,
    pub rows: Vec<GpuRow>,
    pub host_bytes: HashMap<&'static str, u64>,
}

/// The several-GPU modes' labels in run order: each of --modes raw, then compressed with
/// --compress (the store holds the encodings; each GPU decodes; a peer group forwards encoded
/// shares). None with one GPU.
/// Writes a three-forward timeline as `<label>-<tokens>.json` in `dir` (the label's characters
/// other than letters, digits and dots as `-`) and prints its `TIMELINE` summary line.
fn write_timeline(
    dir: &std::path::Path,
    label: &str,
    tokens: i64,
    spans: &[layerwise_offload::TimelineSpan],
) -> Result<()> {
    let slug: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let path = dir.join(format!("{slug}-{tokens}.json"));
    std::fs::write(&path, layerwise_offload::chrome_trace_json(spans))
        .with_context(|| format!("writing {}", path.display()))?;
    println!(
        "TIMELINE {label}, {tokens} tokens: {}",
        crate::report::timeline_summary(spans)
    );
    Ok(())
}

fn several_gpu_modes(a: &Args) -> Vec<&'static str> {
    if a.gpus < 2 {
        return Vec::new();
    }
    a.modes
        .iter()
        .flat_map(|m| {
            let (raw, encoded) = match m {
                Mode::Peer => ("peer split", "peer split compressed"),
                Mode::Shared => ("shared host copy", "shared host copy compressed"),
            };
            std::iter::once(raw).chain(a.compress.then_some(encoded))
        })
        .collect()
}

/// Several GPUs streaming at once from one host copy: each uploading every block itself, then
/// as a peer group (each uploads 1/N of every block and sends it to the others).
pub fn several_gpus(a: &Args, b: &Bench) -> Result<MultiRuns> {
    let s = &a.shape;
    let modes = several_gpu_modes(a);
    let mut rows = Vec::new();
    let mut host_bytes = HashMap::new();
    let forwards = b.forwards;
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
        if let Some(c) = &b.ckpt {
            cfg0 = cfg0.checkpoint(c.clone());
        }
        let pb = progress::spinner(format!("{mode}: host copy"));
        let mut m0 = cfg0.build(&b.named)?;
        m0.initialize()?;
        pb.finish_and_clear();
        let store = m0.host_store().expect("initialized");
        host_bytes.insert(mode, store.bytes());
        let device = |g: usize| if a.cpu { Device::Cpu } else { Device::Cuda(g) };
        // Each GPU's own instance of the model: non-block weights copied to its device, block
        // tensors left uninitialized (they become placeholders; the shared store has the
        // values).
        let mut instances: Vec<Option<Instance>> = (0..a.gpus)
            .map(|g| Some(wan_instance(&s.wan, b.kind, &b.named, device(g))))
            .collect();
        // The inputs of the resident run, copied to each GPU here: seeding in the threads would
        // race (tch::manual_seed reseeds every device's generator, process-wide).
        let mut thread_inputs: Vec<Vec<(i64, Vec<Tensor>)>> = (0..a.gpus)
            .map(|g| {
                b.inputs
                    .iter()
                    .map(|(t, xs)| (*t, xs.iter().map(|x| x.to_device(device(g))).collect()))
                    .collect()
            })
            .collect();
        let barrier = std::sync::Barrier::new(a.gpus);
        // One bar per GPU: its forwards over every token count.
        let bars = MultiProgress::new();
        let results: Vec<Result<Vec<GpuRow>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..a.gpus)
                .map(|g| {
                    let dev_g = device(g);
                    let (model_g, named_g) = instances[g].take().expect("one instance per GPU");
                    let inputs_g = std::mem::take(&mut thread_inputs[g]);
                    let store = store.clone();
                    let barrier = &barrier;
                    let group = group.clone();
                    let pb = bars.add(progress::steps(
                        forwards * inputs_g.len() as u64,
                        format!("{mode}, GPU {g}: forwards"),
                    ));
                    scope.spawn(move || -> Result<Vec<GpuRow>> {
                        let mut cfg = OffloadConfig::new("blocks", s.layers)
                            .prefetch_depth(a.depth)
                            .cpu_test_mode(a.cpu)
                            .device(if let Device::Cuda(i) = dev_g { i } else { 0 })
                            .host_store(store)
                            .avoid_pool_streams(a.avoid_pool_streams.iter().copied());
                        if let Some(group) = group {
                            cfg = cfg
                                .peer_group(group, g)
                                .push_stream_per_member(a.push_per_gpu);
                            if let Some(bytes) = a.push_chunk {
                                cfg = cfg.peer_push_chunk_bytes(bytes);
                            }
                        }
                        let mut m = cfg.build(&named_g)?;
                        m.initialize()?;
                        let mut out = Vec::new();
                        for (tokens, xs) in inputs_g {
                            if let Device::Cuda(d) = dev_g {
                                accel::synchronize_device(d)?;
                                accel::reset_peak_memory_stats(d)?;
                            }
                            let sent0 = m.stats().bytes_uploaded;
                            barrier.wait();
                            let (ms, ms_sustained, y) = time_forwards(
                                a,
                                || wan_forward(&model_g, &xs, Some(&mut m)),
                                dev_g,
                                &pb,
                            )?;
                            let sent = m.stats().bytes_uploaded - sent0;
                            let peak_vram = match dev_g {
                                Device::Cuda(d) => accel::memory_stats(d)?.peak_allocated,
                                _ => 0,
                            };
                            if let (Some(dir), Device::Cuda(_)) = (&a.trace_dir, dev_g) {
                                // This GPU's timeline of three forwards back to back (in a peer
                                // group every member captures the same three).
                                m.start_timeline()?;
                                for _ in 0..3 {
                                    let _ = wan_forward(&model_g, &xs, Some(&mut m));
                                }
                                let spans = m.finish_timeline()?;
                                write_timeline(dir, &format!("{mode} gpu{g}"), tokens, &spans)?;
                            }
                            out.push(GpuRow {
                                mode,
                                gpu: g,
                                tokens,
                                ms,
                                ms_sustained,
                                sent,
                                peak_vram,
                                out: y.to_device(Device::Cpu),
                            });
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
        for r in results {
            rows.extend(r?);
        }
        m0.restore()?;
    }
    Ok(MultiRuns {
        modes,
        rows,
        host_bytes,
    })
}

/// The resident model (every weight on the device, no manager) per token count: median ms and
/// the last output. Empty without --resident or where the weights are not all on the device.
pub fn resident(a: &Args, b: &Bench) -> Result<HashMap<i64, (f64, Tensor)>> {
    let mut resident = HashMap::new();
    let on_device = b.named.iter().all(|(_, t)| t.device() == b.dev);
    if a.resident && on_device {
        for (tokens, xs) in &b.inputs {
            let pb = progress::steps(b.forwards, format!("resident, {tokens} tokens: forwards"));
            let (ms, _, r) = time_forwards(a, || wan_forward(&b.model, xs, None), b.dev, &pb)?;
            pb.finish_and_clear();
            resident.insert(*tokens, (ms, r));
        }
    } else if a.resident {
        eprintln!("resident run skipped: the weights do not fit on the device");
    }
    Ok(resident)
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
}
