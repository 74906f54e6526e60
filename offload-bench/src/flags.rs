//! The flags: clap's parser ([`Cli`]), the checks its ranges cannot express, and the run they
//! describe ([`Args`], with the model's [`Shape`]). A bad value exits with a one-line error
//! naming the flag and its range, as clap's own errors do.

use crate::util::{float_in, int_in, wan_grid};
use clap::{CommandFactory, Parser, ValueEnum, error::ErrorKind};
use layerwise_offload::accel;
use std::path::PathBuf;

/// The model's sizes and name, from the preset and the overrides or from a checkpoint.
#[derive(Debug, Clone)]
pub struct Shape {
    /// The preset's name, or the checkpoint's directory.
    pub preset: String,
    pub layers: usize,
    pub dim: i64,
    pub ffn: i64,
    pub heads: i64,
    /// Text-embedding tokens (the cross-attention's context).
    pub ctx: i64,
    /// The transformer's configuration (the preset's with the overrides, or the checkpoint's).
    pub wan: wan::Config,
}

/// The models: one, since offload-bench's own Wan-shaped block stack gave way to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Model {
    /// The wan crate's WanTransformer3DModel (diffusers' Wan2.1-T2V transformer), as
    /// scripts/bench_peers.py --model wan builds diffusers' own.
    Wan,
}

/// The model presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Preset {
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
pub enum Dist {
    /// N(0, 0.02).
    Normal,
    /// N(0, 0.02) with a log-normal scale per row: exp(0.5 z), z ~ N(0, 1).
    RowScaled,
}

impl Preset {
    /// The preset's transformer configuration, from the wan crate.
    fn config(self) -> wan::Config {
        match self {
            Preset::Tiny => wan::Config::small(),
            Preset::Wan1_3b => wan::Config::wan2_1_t2v_1_3b(),
            Preset::Wan14b => wan::Config::wan2_1_t2v_14b(),
        }
    }
}

/// Several-GPU modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
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
pub struct Cli {
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
    /// Skip full streaming: the single-GPU configurations are the --budgets only (so that a
    /// budget runs first in its process).
    #[arg(long)]
    no_full_streaming: bool,
    /// Skip the raw (uncompressed) single-GPU configurations: only their compressed rows run
    /// (needs --compress or --two-tier), so that a compressed configuration can run first in
    /// its process.
    #[arg(long)]
    no_raw: bool,
    /// Each single-GPU configuration this many times in a row, each time built and initialized
    /// anew (the second and later labelled `run2`, `run3`, ...): whether a configuration's time
    /// depends on what ran before it in the process.
    #[arg(long, default_value_t = 1, value_parser = int_in(1, 100))]
    repeat: i64,
    /// Peer groups: one push stream per receiving GPU.
    #[arg(long)]
    push_per_gpu: bool,
    /// Peer groups: MiB of a GPU's share that arrive from the host (compressed: that are
    /// decoded) before they go on to the others (OffloadConfig::peer_push_chunk_bytes); 0
    /// sends each share whole once it has arrived (is decoded), the crate's default.
    #[arg(long, value_name = "MIB", value_parser = int_in(0, 1 << 20))]
    push_chunk_mib: Option<i64>,
    /// Write a Chrome trace of one streamed forward to this file (needs a CUDA device).
    #[arg(long, value_name = "FILE.json")]
    trace: Option<PathBuf>,
    /// Write a Chrome trace of three back-to-back forwards of every configuration (budgets and
    /// compressed ones too, and every GPU of the several-GPU runs as `<mode>-gpu<N>`) at every
    /// token count into this directory, as `<configuration>-<tokens>.json`, and print a summary
    /// of each (copy stream busy and idle, decode, compute-stream stalls; needs a CUDA device).
    #[arg(long, value_name = "DIR")]
    trace_dir: Option<PathBuf>,
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
    /// Every configuration also compressed with two-tier chunks allowed
    /// (OffloadConfig::compress_two_tier), its rows beside the others.
    #[arg(long)]
    two_tier: bool,
    /// Device staging buffers of the compressed configurations
    /// (OffloadConfig::compress_staging_buffers), comma-separated: each compressed
    /// configuration once per count, labelled `sb<count>` when more than one is given.
    #[arg(long, value_delimiter = ',', default_values_t = [2], value_parser = int_in(2, 8))]
    staging_buffers: Vec<i64>,
    /// Thread blocks of the compressed configurations' decode grid
    /// (OffloadConfig::compress_decode_blocks; 0: a grid that fills every SM, the default),
    /// comma-separated: each compressed configuration once per value, labelled `grid<n>` (or
    /// `grid full`) when more than one is given or the one given is not 0.
    #[arg(long, value_delimiter = ',', default_values_t = [0], value_parser = int_in(0, 1 << 20))]
    decode_blocks: Vec<i64>,
    /// How many streamed blocks the compressed configurations encode
    /// (OffloadConfig::compress_blocks; the others stream raw), comma-separated: a count, or
    /// `auto` for what `encoded_blocks_needed` answers for the compute time of one forward
    /// (measured on a manager with every block encoded: the forward less its stalls, from a
    /// timeline) and the measured link rate, that manager then converted in place
    /// (`set_encoded_blocks`) and measured; `all` (the default) encodes every one. Each
    /// compressed configuration once per value, labelled `enc<n>` or `enc auto`. `auto` needs
    /// one --tokens value.
    #[arg(long, value_delimiter = ',', default_values_t = [String::from("all")], value_parser = encoded_count)]
    compress_blocks: Vec<String>,
    /// With `--compress-blocks auto`: at most this many sizing rounds, each converting to the
    /// last answer, measuring a forward's compute again and asking again, until the answer
    /// repeats or is 0 (compute measured with every block decoding beside the model includes
    /// the decodes' cost, so one round can answer too few). Labelled `enc auto r<R>` above 1.
    #[arg(long, default_value_t = 1, value_parser = int_in(1, 4))]
    sizing_rounds: i64,
    /// With `--compress-blocks auto`: size for this host link rate in GiB/s instead of the
    /// measured one (the CPU test mode has none and uses 1 GiB/s otherwise).
    #[arg(long, value_parser = float_in(0.001, 1e4))]
    sizing_link_gib_s: Option<f64>,
    /// Run everything on a high-priority stream of the pool instead of the default stream, so
    /// that the GPU schedules the model's kernels before the decode kernels of compressed
    /// transport (the manager's copy and decode streams have normal priority).
    #[arg(long)]
    high_priority_compute: bool,
    /// After the runs, find which of the device's streams share a hardware work queue (the
    /// current stream and every pool stream of normal and high priority, a few seconds) and name
    /// the configurations whose compute, copy and decode streams share one: a `QUEUES {json}`
    /// line. Needs a CUDA device.
    #[arg(long)]
    probe_queues: bool,
    /// Draw this many normal-priority streams from libtorch's pool before each single-GPU
    /// configuration (and leave them idle), so that a run of configurations (--repeat) puts
    /// their copy and decode streams on pool streams at every index (printed at initialize,
    /// recorded in the RESULT lines): whether a configuration's speed depends on which pool
    /// streams it got.
    #[arg(long, default_value_t = 0, value_parser = int_in(0, 64))]
    skip_streams: i64,
    /// Indices (0..32) of libtorch's normal-priority pool streams the managers must not take
    /// for their copy, decode and push streams (OffloadConfig::avoid_pool_streams),
    /// comma-separated, e.g. 0,8,16,24.
    #[arg(long, value_delimiter = ',', value_parser = int_in(0, 31))]
    avoid_pool_streams: Vec<i64>,
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

/// Exits with `msg` as clap's validation errors do (usage on stderr, exit code 2).
fn fail(msg: String) -> ! {
    Cli::command().error(ErrorKind::ValueValidation, msg).exit()
}

/// The checks clap's ranges cannot express; a bad value exits as clap's errors do.
fn check(a: &Cli, s: &Shape, cuda: bool) {
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
    if a.compress_blocks.iter().any(|v| v == "auto") && a.tokens.len() > 1 {
        fail(format!(
            "--compress-blocks auto sizes the encoding for one token count, and --tokens gives {}: run one count at a time",
            a.tokens.len()
        ));
    }
    if a.no_raw && !a.compress && !a.two_tier {
        fail("--no-raw leaves no configuration to measure: add --compress or --two-tier".into());
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
    if a.probe_queues && cpu {
        fail("--probe-queues needs a CUDA device (it times streams' events on the GPU); drop --probe-queues or --cpu".into());
    }
    if let Some(dir) = &a.trace_dir {
        if cpu {
            fail(format!(
                "--trace-dir {} needs a CUDA device (timelines are recorded with CUDA events); drop --trace-dir or --cpu",
                dir.display()
            ));
        }
        if !dir.is_dir() {
            fail(format!(
                "--trace-dir {}: not a directory (create it first)",
                dir.display()
            ));
        }
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

/// The model's shape: the checkpoint's config.json, or the preset with the overrides.
fn shape(a: &Cli, cuda: bool) -> Shape {
    let preset = a
        .preset
        .unwrap_or(if cuda { Preset::Wan1_3b } else { Preset::Tiny });
    if let Some(dir) = &a.checkpoint {
        let c = wan::Config::from_file(dir.join("config.json"))
            .unwrap_or_else(|e| fail(format!("--checkpoint {}: {e}", dir.display())));
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
    // The wan crate's presets (scripts/bench_peers.py's WAN_CONFIGS, checked against them by
    // tests/wan.rs): Wan2.1-T2V-1.3B's and 14B's config.json, and a small one on 1.3B's other
    // values; the flags override their sizes.
    let base = preset.config();
    let layers = a.layers.map_or(base.num_layers as usize, |l| l as usize);
    let dim = a.dim.unwrap_or(base.inner_dim());
    let ffn = a.ffn.unwrap_or(base.ffn_dim);
    let heads = a.heads.unwrap_or(base.num_attention_heads);
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

/// Where the weights come from: a checkpoint directory, with its store options.
#[derive(Debug, Clone)]
pub struct CheckpointArgs {
    pub dir: PathBuf,
    /// The files' own pages are the host store.
    pub zero_copy: bool,
    /// Bytes of blocks held in host memory (the others read from the files at every forward).
    pub host_budget: Option<u64>,
}

/// The run, from the flags.
#[derive(Debug)]
pub struct Args {
    pub shape: Shape,
    pub tokens: Vec<i64>,
    pub depth: usize,
    pub reps: usize,
    pub warmup: usize,
    pub resident: bool,
    pub cpu: bool,
    pub budgets: Vec<f64>,
    pub trace: Option<PathBuf>,
    /// A timeline of every configuration into this directory.
    pub trace_dir: Option<PathBuf>,
    pub gpus: usize,
    pub modes: Vec<Mode>,
    pub push_per_gpu: bool,
    /// Bytes of a peer group member's share sent on at a time (None: the crate's default).
    pub push_chunk: Option<usize>,
    pub multi_only: bool,
    /// Full streaming is measured (not --no-full-streaming).
    pub full_streaming: bool,
    /// The raw configurations are measured (not --no-raw).
    pub raw: bool,
    /// Times each single-GPU configuration runs in a row.
    pub repeat: usize,
    pub high_priority_compute: bool,
    /// Map the streams onto hardware queues after the runs.
    pub probe_queues: bool,
    /// Pool streams drawn and left idle before each single-GPU configuration.
    pub skip_streams: usize,
    /// Pool stream indices the managers pass over.
    pub avoid_pool_streams: Vec<usize>,
    pub compress: bool,
    pub two_tier: bool,
    /// Staging buffer counts of the compressed configurations (one row per count).
    pub staging_buffers: Vec<usize>,
    /// Decode grids of the compressed configurations (one row per value; None: full).
    pub decode_blocks: Vec<Option<u32>>,
    /// Encoded blocks of the compressed configurations (one row per value).
    pub compress_blocks: Vec<EncodedBlocks>,
    /// Sizing rounds of `--compress-blocks auto`.
    pub sizing_rounds: usize,
    /// The link rate `--compress-blocks auto` sizes for, if not the measured one.
    pub sizing_link_gib_s: Option<f64>,
    pub dist: Dist,
    pub checkpoint: Option<CheckpointArgs>,
}

/// Parses and checks the flags; a bad one exits with a one-line error naming it and its range.
pub fn parse_args() -> Args {
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
        trace_dir: cli.trace_dir,
        gpus: cli.gpus as usize,
        modes: cli.modes,
        push_per_gpu: cli.push_per_gpu,
        push_chunk: cli.push_chunk_mib.map(|m| match m {
            0 => usize::MAX,
            m => (m as usize) << 20,
        }),
        multi_only: cli.multi_only,
        full_streaming: !cli.no_full_streaming,
        raw: !cli.no_raw,
        repeat: cli.repeat as usize,
        compress: cli.compress,
        two_tier: cli.two_tier,
        staging_buffers: cli.staging_buffers.iter().map(|&n| n as usize).collect(),
        decode_blocks: cli
            .decode_blocks
            .iter()
            .map(|&n| (n > 0).then_some(n as u32))
            .collect(),
        sizing_rounds: cli.sizing_rounds as usize,
        sizing_link_gib_s: cli.sizing_link_gib_s,
        compress_blocks: cli
            .compress_blocks
            .iter()
            .map(|v| match v.as_str() {
                "all" => EncodedBlocks::All,
                "auto" => EncodedBlocks::Auto,
                n => EncodedBlocks::Count(n.parse().expect("checked by the parser")),
            })
            .collect(),
        high_priority_compute: cli.high_priority_compute,
        probe_queues: cli.probe_queues,
        skip_streams: cli.skip_streams as usize,
        avoid_pool_streams: cli.avoid_pool_streams.iter().map(|&i| i as usize).collect(),
        dist: cli.dist,
        checkpoint: cli.checkpoint.map(|dir| CheckpointArgs {
            dir,
            zero_copy: cli.zero_copy,
            host_budget: cli.host_budget.map(|g| (g * (1u64 << 30) as f64) as u64),
        }),
    }
}

/// How many streamed blocks a compressed configuration encodes (`--compress-blocks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodedBlocks {
    /// Every one (OffloadConfig::compress alone).
    All,
    /// This many.
    Count(usize),
    /// As many as `encoded_blocks_needed` says for a measured forward.
    Auto,
}

/// A `--compress-blocks` value: `all`, `auto` or a count.
fn encoded_count(s: &str) -> Result<String, String> {
    match s.trim() {
        v @ ("all" | "auto") => Ok(v.to_string()),
        v => v
            .parse::<usize>()
            .map(|n| n.to_string())
            .map_err(|_| format!("{s:?} is not a count of blocks, `all` or `auto`")),
    }
}
