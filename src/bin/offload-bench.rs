//! `offload-bench`: a Wan2.1-shaped DiT block stack with seeded random bf16 weights, run
//! resident and streamed through the layerwise offload manager, against the PCIe floor.
//!
//! ```text
//! offload-bench [--preset tiny|wan-1.3b|wan-14b] [--layers N] [--dim N] [--ffn N] [--heads N]
//!               [--tokens 1024,4096] [--ctx 512] [--depth 1] [--reps 5] [--warmup 2]
//!               [--budgets 13,20] [--gpus N] [--modes shared,peer] [--multi-only]
//!               [--push-per-gpu] [--trace FILE.json] [--no-resident] [--cpu]
//! ```
//! Configurations: full streaming, then one per VRAM budget in `--budgets` (GiB of block weights
//! the manager may keep on the GPU), then with `--gpus N` N GPUs streaming at once from one
//! shared pinned host copy (one driver thread each), first each uploading every block, then as a
//! peer group (each uploads 1/N of every block and sends it to the others), then the resident
//! model. Per configuration it prints a markdown table row and one `RESULT {json}` line: median ms per
//! forward (CUDA events, warm-up excluded), the floor max(resident, streamed bytes / measured
//! pinned H2D bandwidth), floor/measured, compute stall, peak VRAM, init seconds and peak host
//! memory. Without a CUDA device (or with --cpu) the tiny preset runs in the manager's CPU test
//! mode.

use anyhow::{Context, Result, bail};
use layerwise_offload::accel::{self, Event, HostMemory, Stream};
use layerwise_offload::{LayerwiseOffloadManager, OffloadConfig, PeerGroup};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone)]
struct Shape {
    preset: String,
    layers: usize,
    dim: i64,
    ffn: i64,
    heads: i64,
    ctx: i64,
}

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
    trace: Option<String>,
    gpus: usize,
    modes: Vec<String>,
    push_per_gpu: bool,
    multi_only: bool,
}

fn preset(name: &str) -> Result<Shape> {
    let (layers, dim, ffn, heads) = match name {
        "tiny" => (6, 256, 1024, 4),
        "wan-1.3b" => (30, 1536, 8960, 12),
        "wan-14b" => (40, 5120, 13824, 40),
        other => bail!("unknown preset {other:?}: use tiny, wan-1.3b or wan-14b"),
    };
    Ok(Shape {
        preset: name.to_owned(),
        layers,
        dim,
        ffn,
        heads,
        ctx: 512,
    })
}

fn parse_args() -> Result<Args> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let cuda = accel::cuda_is_available();
    let mut name = if cuda {
        "wan-1.3b".to_owned()
    } else {
        "tiny".to_owned()
    };
    if let Some(i) = argv.iter().position(|a| a == "--preset") {
        name = argv.get(i + 1).context("--preset needs a value")?.clone();
    }
    let mut a = Args {
        shape: preset(&name)?,
        tokens: vec![if cuda { 1024 } else { 64 }],
        depth: 1,
        reps: 5,
        warmup: 2,
        resident: true,
        cpu: !cuda,
        budgets: Vec::new(),
        trace: None,
        gpus: 1,
        modes: vec!["shared".into(), "peer".into()],
        push_per_gpu: false,
        multi_only: false,
    };
    let mut it = argv.into_iter();
    while let Some(flag) = it.next() {
        let mut val = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--preset" => {
                val()?;
            }
            "--layers" => a.shape.layers = val()?.parse()?,
            "--dim" => a.shape.dim = val()?.parse()?,
            "--ffn" => a.shape.ffn = val()?.parse()?,
            "--heads" => a.shape.heads = val()?.parse()?,
            "--ctx" => a.shape.ctx = val()?.parse()?,
            "--tokens" => {
                a.tokens = val()?
                    .split(',')
                    .map(|t| t.trim().parse())
                    .collect::<Result<_, _>>()?;
            }
            "--depth" => a.depth = val()?.parse()?,
            "--reps" => a.reps = val()?.parse()?,
            "--warmup" => a.warmup = val()?.parse()?,
            "--no-resident" => a.resident = false,
            "--trace" => a.trace = Some(val()?),
            "--gpus" => a.gpus = val()?.parse()?,
            "--modes" => {
                a.modes = val()?.split(',').map(|m| m.trim().to_owned()).collect();
                if let Some(m) = a.modes.iter().find(|m| !["shared", "peer"].contains(&m.as_str())) {
                    bail!("unknown --modes entry {m:?} (shared, peer)");
                }
            }
            "--push-per-gpu" => a.push_per_gpu = true,
            "--multi-only" => a.multi_only = true,
            "--budgets" => {
                a.budgets = val()?
                    .split(',')
                    .map(|t| t.trim().parse())
                    .collect::<Result<_, _>>()?;
            }
            "--cpu" => a.cpu = true,
            "-h" | "--help" => {
                println!(
                    "{}",
                    include_str!("offload-bench.rs")
                        .lines()
                        .take(10)
                        .map(|l| l.trim_start_matches("//!").trim_start_matches(' '))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
                std::process::exit(0);
            }
            other => bail!("unknown flag {other} (try --help)"),
        }
    }
    if a.shape.dim % a.shape.heads != 0 {
        bail!(
            "--dim {} is not a multiple of --heads {}",
            a.shape.dim,
            a.shape.heads
        );
    }
    if a.gpus == 0 || (!a.cpu && a.gpus > accel::cuda_device_count().max(1)) {
        bail!(
            "--gpus {} but {} CUDA devices are visible",
            a.gpus,
            accel::cuda_device_count()
        );
    }
    if a.reps == 0 || a.shape.layers == 0 {
        bail!("--reps and --layers must be positive");
    }
    Ok(a)
}

/// The named weights of the stack, created on the CPU (uninitialized, then filled with seeded
/// random values generated on `origin` and copied over).
fn build_weights(s: &Shape, origin: Device, kind: Kind) -> Vec<(String, Tensor)> {
    let (d, f) = (s.dim, s.ffn);
    let mut named = Vec::new();
    let mut add = |name: String, shape: &[i64], scale: f64| {
        let mut t = Tensor::empty(shape, (kind, Device::Cpu));
        let r = Tensor::randn(shape, (kind, origin)) * scale;
        t.copy_(&r);
        named.push((name, t));
    };
    tch::manual_seed(1234);
    add("embed.weight".into(), &[d, 64], 0.02);
    add("time.weight".into(), &[6, d], 0.02);
    for i in 0..s.layers {
        let p = format!("blocks.{i}");
        for attn in ["self_attn", "cross_attn"] {
            for w in ["q", "k", "v", "o"] {
                add(format!("{p}.{attn}.{w}.weight"), &[d, d], 0.02);
                add(format!("{p}.{attn}.{w}.bias"), &[d], 0.02);
            }
            add(format!("{p}.{attn}.norm_q.weight"), &[d], 0.02);
            add(format!("{p}.{attn}.norm_k.weight"), &[d], 0.02);
        }
        add(format!("{p}.norm3.weight"), &[d], 0.02);
        add(format!("{p}.norm3.bias"), &[d], 0.02);
        add(format!("{p}.ffn.0.weight"), &[f, d], 0.02);
        add(format!("{p}.ffn.0.bias"), &[f], 0.02);
        add(format!("{p}.ffn.2.weight"), &[d, f], 0.02);
        add(format!("{p}.ffn.2.bias"), &[d], 0.02);
        add(format!("{p}.modulation"), &[1, 6, d], 0.02);
    }
    add("head.weight".into(), &[64, d], 0.02);
    named
}

/// The stack's forward pass over weights looked up by name.
struct Stack<'a> {
    s: &'a Shape,
    w: std::collections::HashMap<&'a str, &'a Tensor>,
}

impl<'a> Stack<'a> {
    fn new(s: &'a Shape, named: &'a [(String, Tensor)]) -> Stack<'a> {
        Stack {
            s,
            w: named.iter().map(|(n, t)| (n.as_str(), t)).collect(),
        }
    }

    fn t(&self, name: &str) -> &Tensor {
        self.w
            .get(name)
            .unwrap_or_else(|| panic!("no weight {name}"))
    }

    fn lin(&self, x: &Tensor, p: &str) -> Tensor {
        x.linear(
            self.t(&format!("{p}.weight")),
            Some(self.t(&format!("{p}.bias"))),
        )
    }

    fn rms(&self, x: &Tensor, w: &str) -> Tensor {
        let var = x
            .to_kind(Kind::Float)
            .pow_tensor_scalar(2)
            .mean_dim(-1, true, Kind::Float);
        (x.to_kind(Kind::Float) * (var + 1e-6).rsqrt()).to_kind(x.kind()) * self.t(w)
    }

    fn attn(&self, x: &Tensor, ctx: &Tensor, p: &str) -> Tensor {
        let (b, t, d) = x.size3().unwrap();
        let h = self.s.heads;
        let split = |y: Tensor| y.view([b, -1, h, d / h]).transpose(1, 2);
        let q = split(self.rms(
            &self.lin(x, &format!("{p}.q")),
            &format!("{p}.norm_q.weight"),
        ));
        let k = split(self.rms(
            &self.lin(ctx, &format!("{p}.k")),
            &format!("{p}.norm_k.weight"),
        ));
        let v = split(self.lin(ctx, &format!("{p}.v")));
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
        self.lin(&a.transpose(1, 2).reshape([b, t, d]), &format!("{p}.o"))
    }

    fn block(&self, i: usize, x: &Tensor, ctx: &Tensor, e: &Tensor) -> Tensor {
        let p = format!("blocks.{i}");
        let d = self.s.dim;
        let m = (self.t(&format!("{p}.modulation")) + e).chunk(6, 1);
        let ln = |y: &Tensor| y.layer_norm([d], None::<Tensor>, None::<Tensor>, 1e-6, false);
        let h = ln(x) * (&m[1] + 1.0) + &m[0];
        let x = x + self.attn(&h, &h, &format!("{p}.self_attn")) * &m[2];
        let h = x.layer_norm(
            [d],
            Some(self.t(&format!("{p}.norm3.weight"))),
            Some(self.t(&format!("{p}.norm3.bias"))),
            1e-6,
            false,
        );
        let x = &x + self.attn(&h, ctx, &format!("{p}.cross_attn"));
        let h = ln(&x) * (&m[4] + 1.0) + &m[3];
        let y = self.lin(
            &self.lin(&h, &format!("{p}.ffn.0")).gelu("tanh"),
            &format!("{p}.ffn.2"),
        );
        x + y * &m[5]
    }

    fn forward(
        &self,
        input: &Tensor,
        ctx: &Tensor,
        mut mgr: Option<&mut LayerwiseOffloadManager>,
    ) -> Tensor {
        tch::no_grad(|| {
            let mut x = input.matmul(&self.t("embed.weight").tr());
            let e = self.t("time.weight").unsqueeze(0);
            for i in 0..self.s.layers {
                match mgr.as_deref_mut() {
                    Some(m) => {
                        let _g = m.enter(i).expect("enter");
                        x = self.block(i, &x, ctx, &e);
                    }
                    None => x = self.block(i, &x, ctx, &e),
                }
            }
            x.matmul(&self.t("head.weight").tr())
        })
    }
}

fn peak_host_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median milliseconds per forward, timed with events on the compute stream (wall clock on the
/// CPU), and the last output.
fn time_forwards(a: &Args, mut run: impl FnMut() -> Tensor, dev: Device) -> Result<(f64, Tensor)> {
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
        out = Some(y);
    }
    Ok((median(ms), out.expect("at least one forward")))
}

fn pinned_h2d_gib_s(d: usize) -> Result<f64> {
    let bytes = 512usize << 20;
    let host = accel::alloc_host(bytes, HostMemory::Pinned)?;
    let mut dev = accel::alloc_device(bytes, d)?;
    let s = Stream::from_pool(d)?;
    let mut rates = Vec::new();
    for i in 0..6 {
        let (mut e0, mut e1) = (Event::with_timing()?, Event::with_timing()?);
        e0.record(&s)?;
        // SAFETY: host and dev outlive the copy: e1 is synchronized right after.
        unsafe { accel::copy_async(&mut dev, &host, Some(&s))? };
        e1.record(&s)?;
        e1.synchronize()?;
        if i > 0 {
            rates.push(bytes as f64 / (1u64 << 30) as f64 / (e0.elapsed_ms(&e1)? / 1e3));
        }
    }
    Ok(median(rates))
}

fn main() -> Result<()> {
    let a = parse_args()?;
    let s = &a.shape;
    let dev = if a.cpu { Device::Cpu } else { Device::Cuda(0) };
    let kind = if a.cpu { Kind::Float } else { Kind::BFloat16 };
    let origin = dev;
    let device_name = match dev {
        Device::Cuda(_) => std::process::Command::new("nvidia-smi")
            .args(["--query-gpu=name", "--format=csv,noheader", "--id=0"])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "cuda:0".into()),
        _ => "cpu".into(),
    };
    let bw = match dev {
        Device::Cuda(d) => pinned_h2d_gib_s(d)?,
        _ => 0.0,
    };
    eprintln!(
        "building {} weights ({} blocks, dim {}, ffn {}) on the CPU...",
        s.preset, s.layers, s.dim, s.ffn
    );
    let t0 = Instant::now();
    let named = build_weights(s, origin, kind);
    let block_bytes: usize = named
        .iter()
        .filter(|(n, _)| n.starts_with("blocks."))
        .map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes())
        .sum();
    eprintln!(
        "  {:.2} GiB of block weights in {:.1} s",
        block_bytes as f64 / (1u64 << 30) as f64,
        t0.elapsed().as_secs_f64()
    );
    let host_before = peak_host_bytes();
    let stack = Stack::new(s, &named);
    let inputs: Vec<(i64, Tensor, Tensor)> = a
        .tokens
        .iter()
        .map(|&t| {
            tch::manual_seed(t);
            (
                t,
                Tensor::randn([1, t, 64], (kind, dev)),
                Tensor::randn([1, s.ctx, s.dim], (kind, dev)),
            )
        })
        .collect();

    struct Row {
        label: String,
        tokens: i64,
        ms: f64,
        streamed_bytes: u64,
        stall: f64,
        peak: u64,
        init_s: f64,
        host_peak: u64,
        resident_blocks: usize,
        out: Tensor,
    }
    let mut rows: Vec<Row> = Vec::new();
    let mut configs: Vec<Option<f64>> = vec![None];
    configs.extend(a.budgets.iter().map(|&b| Some(b)));
    if a.multi_only {
        configs.clear();
    }
    let mut stats_table = String::new();
    for budget in configs {
        let label = match budget {
            None => format!("stream d{}", a.depth),
            Some(b) => format!("budget {b} GiB d{}", a.depth),
        };
        let mut cfg = OffloadConfig::new("blocks", s.layers)
            .prefetch_depth(a.depth)
            .cpu_test_mode(a.cpu);
        if let Some(b) = budget {
            cfg = cfg.vram_budget((b * (1u64 << 30) as f64) as u64);
        }
        let t0 = Instant::now();
        let mut m = cfg.build(&named)?;
        m.initialize()?;
        let init_s = t0.elapsed().as_secs_f64();
        let host_peak = peak_host_bytes();
        let st = m.stats().clone();
        let streamed_bytes = st.host_bytes;
        eprintln!(
            "{label}: initialize {init_s:.2} s; {} streamed, {} resident blocks; host peak {:.2} GiB (before: {:.2} GiB)",
            st.streamed_layers,
            st.resident_layers,
            host_peak as f64 / (1u64 << 30) as f64,
            host_before as f64 / (1u64 << 30) as f64
        );
        for (tokens, x, ctx) in &inputs {
            if let Device::Cuda(d) = dev {
                accel::synchronize_device(d)?;
                accel::reset_peak_memory_stats(d)?;
            }
            let stall0 = m.stats().stall_ms;
            let (ms, y) = time_forwards(&a, || stack.forward(x, ctx, Some(&mut m)), dev)?;
            if let Device::Cuda(d) = dev {
                accel::synchronize_device(d)?;
            }
            let stall = (m.stats().stall_ms - stall0) / (a.warmup + a.reps) as f64;
            let peak = if let Device::Cuda(d) = dev {
                accel::memory_stats(d)?.peak_allocated
            } else {
                0
            };
            rows.push(Row {
                label: label.clone(),
                tokens: *tokens,
                ms,
                streamed_bytes,
                stall,
                peak,
                init_s,
                host_peak,
                resident_blocks: st.resident_layers,
                out: y,
            });
        }
        if let (Some(path), Device::Cuda(_), true) = (&a.trace, dev, budget.is_none()) {
            // One more forward of the first size, captured as a Chrome trace.
            let (_, x, ctx) = &inputs[0];
            m.start_timeline()?;
            let _ = stack.forward(x, ctx, Some(&mut m));
            let spans = m.finish_timeline()?;
            std::fs::write(path, layerwise_offload::chrome_trace_json(&spans))
                .with_context(|| format!("writing {path}"))?;
            eprintln!(
                "timeline of one forward ({} spans) written to {path}",
                spans.len()
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
    let mut multi_host_bytes = 0u64;
    let modes: Vec<&str> = if a.gpus > 1 {
        a.modes
            .iter()
            .map(|m| if m == "peer" { "peer split" } else { "shared host copy" })
            .collect()
    } else {
        Vec::new()
    };
    for &mode in &modes {
        let group = if mode == "peer split" {
            Some(PeerGroup::new(a.gpus)?)
        } else {
            None
        };
        // Each GPU's own model instance, made before the first manager empties the blocks:
        // non-block weights copied to its device, block tensors left uninitialized (they
        // become placeholders; the shared store has the values).
        let mut instances: Vec<Vec<(String, Tensor)>> = (0..a.gpus)
            .map(|g| {
                let dev_g = if a.cpu { Device::Cpu } else { Device::Cuda(g) };
                named
                    .iter()
                    .map(|(n, t)| {
                        let t = if n.starts_with("blocks.") {
                            Tensor::empty(t.size(), (t.kind(), Device::Cpu))
                        } else {
                            t.to_device(dev_g)
                        };
                        (n.clone(), t)
                    })
                    .collect()
            })
            .collect();
        let mut m0 = OffloadConfig::new("blocks", s.layers)
            .prefetch_depth(a.depth)
            .cpu_test_mode(a.cpu)
            .build(&named)?;
        m0.initialize()?;
        let store = m0.host_store().expect("initialized");
        multi_host_bytes = store.bytes();
        // The inputs of the resident run, copied to each GPU here: seeding in the threads would
        // race (tch::manual_seed reseeds every device's generator, process-wide).
        let mut thread_inputs: Vec<Vec<(i64, Tensor, Tensor)>> = (0..a.gpus)
            .map(|g| {
                let dev_g = if a.cpu { Device::Cpu } else { Device::Cuda(g) };
                inputs
                    .iter()
                    .map(|(t, x, c)| (*t, x.to_device(dev_g), c.to_device(dev_g)))
                    .collect()
            })
            .collect();
        let barrier = std::sync::Barrier::new(a.gpus);
        let results: Vec<Result<Vec<(i64, f64, Tensor)>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..a.gpus)
                .map(|g| {
                    let dev_g = if a.cpu { Device::Cpu } else { Device::Cuda(g) };
                    let named_g = std::mem::take(&mut instances[g]);
                    let inputs_g = std::mem::take(&mut thread_inputs[g]);
                    let store = store.clone();
                    let (a, barrier) = (&a, &barrier);
                    let group = group.clone();
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
                        let stack = Stack::new(s, &named_g);
                        let mut out = Vec::new();
                        for (tokens, x, ctx) in inputs_g {
                            barrier.wait();
                            let (ms, y) =
                                time_forwards(a, || stack.forward(&x, &ctx, Some(&mut m)), dev_g)?;
                            out.push((tokens, ms, y.to_device(Device::Cpu)));
                        }
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
        for (tokens, x, ctx) in &inputs {
            let (ms, r) = time_forwards(&a, || stack.forward(x, ctx, None), dev)?;
            resident_ms.insert(*tokens, (ms, r));
        }
    } else if a.resident {
        eprintln!("resident run skipped: the weights do not fit on the device");
    }
    println!(
        "| device | preset | tokens | mode | ms/forward | floor ms | floor/measured | stall ms | peak VRAM GiB | init s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let res = resident_ms.get(&r.tokens);
        let link_ms = if bw > 0.0 {
            r.streamed_bytes as f64 / (1u64 << 30) as f64 / bw * 1e3
        } else {
            0.0
        };
        let floor = link_ms.max(res.map_or(0.0, |x| x.0));
        let diff = res.map(|(_, out)| {
            (out.to_kind(Kind::Float) - r.out.to_kind(Kind::Float))
                .abs()
                .max()
                .double_value(&[])
        });
        let gib = r.peak as f64 / (1u64 << 30) as f64;
        println!(
            "| {device_name} | {} | {} | {} | {:.1} | {floor:.1} | {:.3} | {:.1} | {gib:.2} | {:.2} |",
            s.preset,
            r.tokens,
            r.label,
            r.ms,
            if r.ms > 0.0 { floor / r.ms } else { 0.0 },
            r.stall,
            r.init_s
        );
        println!(
            "RESULT {{\"device\":\"{device_name}\",\"system\":\"layerwise-offload\",\"mode\":\"{}\",\"preset\":\"{}\",\"layers\":{},\"dim\":{},\"ffn\":{},\"tokens\":{},\"depth\":{},\"resident_blocks\":{},\"ms\":{:.2},\"resident_ms\":{},\"floor_ms\":{floor:.2},\"stall_ms\":{:.2},\"peak_vram_bytes\":{},\"h2d_gib_s\":{bw:.2},\"block_bytes\":{block_bytes},\"streamed_bytes\":{},\"init_s\":{:.3},\"host_peak_bytes\":{},\"max_abs_diff\":{}}}",
            r.label,
            s.preset,
            s.layers,
            s.dim,
            s.ffn,
            r.tokens,
            a.depth,
            r.resident_blocks,
            r.ms,
            res.map_or("null".into(), |x| format!("{:.2}", x.0)),
            r.stall,
            r.peak,
            r.streamed_bytes,
            r.init_s,
            r.host_peak,
            diff.map_or("null".into(), |d| format!("{d}")),
        );
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
        let streamed = rows_t.iter().map(|_| multi_host_bytes as f64).sum::<f64>();
        let slowest = rows_t.iter().map(|r| r.3).fold(0.0, f64::max);
        let aggregate = streamed / (1u64 << 30) as f64 / (slowest / 1e3);
        for (_, g, _, ms, y) in &rows_t {
            let diff = resident_ms.get(&tokens).map(|(_, out)| {
                (out.to_device(Device::Cpu).to_kind(Kind::Float) - y.to_kind(Kind::Float))
                    .abs()
                    .max()
                    .double_value(&[])
            });
            println!(
                "| {device_name} | {} | {tokens} | stream d{}, {mode}, GPU {g} of {} | {ms:.1} | | | | | |",
                s.preset, a.depth, a.gpus
            );
            println!(
                "RESULT {{\"device\":\"{device_name}\",\"system\":\"layerwise-offload\",\"mode\":\"{mode}\",\"gpus\":{},\"gpu\":{g},\"preset\":\"{}\",\"layers\":{},\"dim\":{},\"ffn\":{},\"tokens\":{tokens},\"depth\":{},\"ms\":{ms:.2},\"delivered_gib_s\":{aggregate:.2},\"host_bytes\":{multi_host_bytes},\"max_abs_diff\":{}}}",
                a.gpus,
                s.preset,
                s.layers,
                s.dim,
                s.ffn,
                a.depth,
                diff.map_or("null".into(), |d| format!("{d}"))
            );
        }
        println!(
            "| {device_name} | {} | {tokens} | {} GPUs, {mode}: {aggregate:.1} GiB/s of blocks delivered | {slowest:.1} (slowest) | | | | | |",
            s.preset, a.gpus
        );
    }
    for (tokens, (ms, _)) in {
        let mut v: Vec<_> = resident_ms.iter().collect();
        v.sort_by_key(|(t, _)| **t);
        v
    } {
        println!(
            "| {device_name} | {} | {tokens} | resident | {ms:.1} | | | | | |",
            s.preset
        );
    }
    eprintln!("{stats_table}");
    Ok(())
}
