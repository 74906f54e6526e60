//! Checks the GPU decoder against the CPU reference and measures it: encodes test patterns (all
//! 65536 bf16 values with every code width, special values, random bits, unaligned lengths) and
//! ~1 GiB of each synthetic weight distribution on the CPU with all cores, decodes them on the
//! GPU, and compares byte for byte (`MISMATCH …` and exit 1 on any difference). Times the GPU
//! decode with CUDA events (median of `--reps`) and the CPU encode. One `RESULT {json}` line per
//! measurement.
//!
//! `--variants` lists the decoders to check and time, each against the same encodings on the
//! same card: `current` (the default kernel), `baseline` (the first kernel), each optionally
//! followed by `:u=N` (windows loaded together for k <= 3), `:uw=N` (the same for k >= 4),
//! `:mb=N` (`__launch_bounds__` minimum blocks per SM), `:xs=N` (exceptions staged in shared
//! memory up to N per chunk), `:bps=N` (at most N blocks per SM in the grid) and `:grid=N` (at
//! most N blocks in all), e.g. `--variants baseline,current,current:bps=1,current:grid=16`. The
//! baseline kernel decodes one-tier chunks only (format version 2's layout): it is skipped for
//! encodings with two-tier chunks, and each distribution is also checked and timed encoded with
//! one tier (`{dist}-single-tier`), which compares the kernels, and the current kernel's one-tier
//! and two-tier paths, on one card.
//!
//! Without a CUDA device it prints `SKIP: no CUDA device` to stderr and exits 0, or exits 1 when
//! OFFLOAD_REQUIRE_CUDA=1.
//!
//! ```text
//! cargo run --release -p layerwise-offload-codec --features gpu --example gpu_decode_check
//! ```

use codec_testkit as common;

use anyhow::{Context, Result, bail};
use clap::Parser;
use common::{Dist, Rng, bf16_bits, generate};
use layerwise_offload_codec::gpu::{self, DecoderOptions, GpuDecoder, Kernel, Tuning};
use layerwise_offload_codec::{Encoder, decode, stats};
use serde_json::{Value, json};
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Check the GPU decoder against the CPU reference and time it")]
struct Args {
    /// MiB of each distribution to encode, decode and time.
    #[arg(long, default_value_t = 1024)]
    mib: usize,
    /// Distributions to time (normal-0.02, row-scaled-normal, student-t4, xavier-uniform,
    /// fp32-normal, random-bits).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "normal-0.02,row-scaled-normal,student-t4"
    )]
    dist: Vec<String>,
    /// Chunk sizes (values) to time the first distribution with, besides the default.
    #[arg(long, value_delimiter = ',', default_value = "16384,65536")]
    chunk_values: Vec<u32>,
    /// Timed GPU decodes per measurement (the median is reported).
    #[arg(long, default_value_t = 30)]
    reps: usize,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Decoders to check and time (see the module docs): `current`, `baseline`, with
    /// `:u=N`, `:uw=N`, `:mb=N`, `:xs=N`, `:bps=N`, `:grid=N` settings.
    #[arg(long, value_delimiter = ',', default_value = "current")]
    variants: Vec<String>,
    /// Timed CPU encodes per distribution (the median is reported).
    #[arg(long, default_value_t = 3)]
    encode_reps: usize,
    /// Skip the test patterns (only the distributions).
    #[arg(long)]
    no_patterns: bool,
}

/// A decoder to check and time, with its name (`--variants` entry).
struct Variant {
    name: String,
    decoder: GpuDecoder,
}

/// Parses one `--variants` entry.
fn parse_variant(spec: &str) -> Result<DecoderOptions> {
    let mut parts = spec.split(':');
    let kernel = match parts.next().unwrap_or("") {
        "current" => Kernel::Current,
        "baseline" => Kernel::Baseline,
        k => bail!("unknown kernel {k:?} in variant {spec:?} (current or baseline)"),
    };
    let mut tuning = Tuning::default();
    let mut bps = None;
    let mut grid = None;
    for part in parts {
        let (key, value) = part
            .split_once('=')
            .with_context(|| format!("{part:?} in variant {spec:?} is not key=value"))?;
        let value: u32 = value
            .parse()
            .with_context(|| format!("{part:?} in variant {spec:?}"))?;
        match key {
            "u" => tuning.unroll = Some(value),
            "uw" => tuning.unroll_wide = Some(value),
            "mb" => tuning.min_blocks_per_sm = Some(value),
            "xs" => tuning.shared_exceptions = Some(value),
            "bps" => bps = Some(value),
            "grid" => grid = Some(value),
            _ => bail!("unknown setting {key:?} in variant {spec:?} (u, uw, mb, xs, bps, grid)"),
        }
    }
    Ok(DecoderOptions::default()
        .with_kernel(kernel)
        .with_blocks_per_sm(bps)
        .with_max_blocks(grid)
        .with_tuning(tuning))
}

fn main() {
    let args = Args::parse();
    let require = std::env::var("OFFLOAD_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    match gpu::device_count() {
        Ok(n) if n > args.device => {}
        found => {
            let why = match found {
                Ok(n) => format!("{n} devices"),
                Err(e) => e.to_string(),
            };
            eprintln!("SKIP: no CUDA device ({why})");
            std::process::exit(if require { 1 } else { 0 });
        }
    }
    if let Err(e) = run(&args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn result(v: Value) {
    println!("RESULT {v}");
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn run(args: &Args) -> Result<()> {
    let device = gpu::Device::new(args.device).context("opening the CUDA device")?;
    let name = device.name()?;
    let sms = device.multiprocessors()?;
    let sm_registers = device.registers_per_multiprocessor()?;
    let (nv_major, nv_minor) = gpu::nvrtc::version()?;
    println!("libnvrtc: {}", gpu::nvrtc::library_path()?.display());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut variants = Vec::new();
    for spec in &args.variants {
        let options = parse_variant(spec)?;
        let t = Instant::now();
        let decoder = GpuDecoder::with_options(device.clone(), options)
            .with_context(|| format!("setting up the GPU decoder {spec}"))?;
        println!(
            "{spec}: {} kernel for {}, compiled and loaded in {:.0} ms; {} registers/thread, {} blocks/SM of {} threads ({:.0}% of the SM's registers), grid {}",
            match options.kernel {
                Kernel::Current => "current",
                Kernel::Baseline => "baseline",
            },
            decoder.arch(),
            t.elapsed().as_secs_f64() * 1e3,
            decoder.registers_per_thread(),
            decoder.blocks_per_sm(),
            decoder.threads_per_block(),
            register_share(&decoder, sm_registers) * 100.0,
            decoder.max_blocks(),
        );
        variants.push(Variant {
            name: spec.clone(),
            decoder,
        });
    }
    println!("{name} ({sms} SMs), NVRTC {nv_major}.{nv_minor}; {cores} CPU cores");
    let info = json!({"device": name, "sms": sms, "nvrtc": format!("{nv_major}.{nv_minor}"), "cpu_cores": cores, "sm_registers": sm_registers});

    // 1. Correctness on the test patterns.
    if !args.no_patterns {
        let mut checked = 0;
        for (case, input, encoder) in patterns() {
            check(&variants, &case, &input, &encoder, 0, 1, &info)?;
            checked += 1;
        }
        println!("{checked} pattern cases: the output of every variant equals the CPU reference");
    }

    // 2. Large distributions: correctness, CPU encode time, GPU decode throughput.
    let dists: Vec<Dist> = args
        .dist
        .iter()
        .map(|n| Dist::from_name(n).with_context(|| format!("unknown distribution {n}")))
        .collect::<Result<_>>()?;
    let reps = args.reps.max(1);
    let encode_reps = args.encode_reps.max(1);
    for (i, dist) in dists.iter().enumerate() {
        let input = generate(*dist, args.mib << 20, 42 + i as u64);
        check(
            &variants,
            dist.name(),
            &input,
            &Encoder::new(),
            reps,
            encode_reps,
            &info,
        )?;
        check(
            &variants,
            &format!("{}-single-tier", dist.name()),
            &input,
            &Encoder::new().single_tier(),
            reps,
            encode_reps,
            &info,
        )?;
        if i == 0 {
            for &cv in &args.chunk_values {
                let case = format!("{}-chunk{cv}", dist.name());
                check(
                    &variants,
                    &case,
                    &input,
                    &Encoder::new().with_chunk_values(cv),
                    reps,
                    encode_reps,
                    &info,
                )?;
            }
            // Every chunk raw: the kernel as a plain copy, for reference.
            let case = format!("{}-all-raw", dist.name());
            check(
                &variants,
                &case,
                &input,
                &Encoder::new().raw_only(),
                reps,
                encode_reps,
                &info,
            )?;
        }
    }
    println!("all cases: the output of every variant equals the CPU reference");
    Ok(())
}

/// The share of an SM's registers that a full grid's resident blocks of `decoder` hold.
fn register_share(decoder: &GpuDecoder, sm_registers: i32) -> f64 {
    f64::from(decoder.registers_per_thread())
        * f64::from(decoder.threads_per_block())
        * f64::from(decoder.blocks_per_sm())
        / f64::from(sm_registers.max(1))
}

/// The pattern cases: (name, input, encoder).
fn patterns() -> Vec<(String, Vec<u8>, Encoder)> {
    let mut cases = Vec::new();
    let all: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
    let mut shuffled: Vec<u16> = (0..=u16::MAX).collect();
    let mut rng = Rng::new(5, 0);
    for i in (1..shuffled.len()).rev() {
        shuffled.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let shuffled: Vec<u8> = shuffled.into_iter().flat_map(u16::to_le_bytes).collect();
    for k in 1..=7u8 {
        let enc = Encoder::new()
            .with_chunk_values(4096)
            .with_code_bits(k..=k)
            .single_tier();
        cases.push((format!("all-65536-k{k}"), all.clone(), enc.clone()));
        cases.push((format!("all-65536-shuffled-k{k}"), shuffled.clone(), enc));
    }
    for k1 in 1..=4u8 {
        for k2 in 1..=5u8 {
            let enc = Encoder::new()
                .with_chunk_values(4096)
                .with_code_bits(k1..=k1)
                .with_tier2_bits(k2..=k2);
            cases.push((format!("all-65536-k{k1}-{k2}"), all.clone(), enc.clone()));
            cases.push((
                format!("all-65536-shuffled-k{k1}-{k2}"),
                shuffled.clone(),
                enc,
            ));
        }
    }
    cases.push(("all-65536-default".into(), all, Encoder::new()));
    // Specials sprinkled into normal weights: escapes of coded chunks.
    let specials = [
        0x0000u16, 0x8000, 0x7f80, 0xff80, 0x7fc0, 0xffc0, 0x7f81, 0xffff, 0x0001, 0x807f, 0x0080,
        0x7f7f,
    ];
    let mut mixed: Vec<u16> = (0..200_000)
        .map(|_| bf16_bits((0.02 * rng.normal_pair().0) as f32))
        .collect();
    for (i, &s) in specials.iter().cycle().take(5000).enumerate() {
        let at = (i * 37 + 3) % mixed.len();
        mixed[at] = s;
    }
    let mixed: Vec<u8> = mixed.into_iter().flat_map(u16::to_le_bytes).collect();
    for k in 1..=7u8 {
        cases.push((
            format!("specials-k{k}"),
            mixed.clone(),
            Encoder::new()
                .with_chunk_values(8192)
                .with_code_bits(k..=k)
                .single_tier(),
        ));
    }
    // Two tiers of every (k1, k2): first- and second-tier escapes, specials among them.
    for k1 in 1..=4u8 {
        for k2 in 1..=5u8 {
            cases.push((
                format!("specials-k{k1}-{k2}"),
                mixed.clone(),
                Encoder::new()
                    .with_chunk_values(8192)
                    .with_code_bits(k1..=k1)
                    .with_tier2_bits(k2..=k2),
            ));
        }
    }
    // 15 exponents for 95% of the values, 31 others for the rest: two tiers with k1 = 4.
    let wide: Vec<u8> = (0..1u32 << 20)
        .map(|_| {
            let r = rng.next_u64();
            let e = if r % 100 < 95 {
                0x60 + (r >> 8) % 15
            } else {
                0x70 + (r >> 8) % 31
            };
            ((e as u16) << 7) | ((r >> 32) as u16 & 0x807f)
        })
        .flat_map(u16::to_le_bytes)
        .collect();
    cases.push(("wide-15-of-46".into(), wide, Encoder::new()));
    cases.push((
        "random-bits".into(),
        generate(Dist::RandomBits, (4 << 20) + 3, 6),
        Encoder::new(),
    ));
    let normal = generate(Dist::Normal, 3 << 20, 7);
    for len in [
        0usize,
        1,
        2,
        3,
        15,
        16,
        17,
        511,
        513,
        4095,
        65537,
        65536 * 2 + 2,
        1 << 20,
        (3 << 20) - 1,
    ] {
        cases.push((
            format!("normal-len{len}-chunk256"),
            normal[..len].to_vec(),
            Encoder::new().with_chunk_values(256),
        ));
        cases.push((
            format!("normal-len{len}"),
            normal[..len].to_vec(),
            Encoder::new(),
        ));
    }
    // Chunks of 9 windows of 256 values (the kernel's warps get uneven shares), partial last
    // chunks and groups.
    for len in [4097usize, 100_001, 1 << 20] {
        cases.push((
            format!("normal-len{len}-chunk2304"),
            normal[..len].to_vec(),
            Encoder::new().with_chunk_values(2304),
        ));
        cases.push((
            format!("normal-len{len}-chunk2304-single-tier"),
            normal[..len].to_vec(),
            Encoder::new().with_chunk_values(2304).single_tier(),
        ));
    }
    // Many escapes (fp32 bytes: about half the values), and a flatter exponent distribution.
    cases.push((
        "fp32-normal-1mib".into(),
        generate(Dist::Fp32Normal, 1 << 20, 11),
        Encoder::new(),
    ));
    cases.push((
        "xavier-uniform-1mib".into(),
        generate(Dist::Uniform, 1 << 20, 12),
        Encoder::new(),
    ));
    // Coded, raw and odd-sized chunks in one encoding.
    let mut mix = generate(Dist::StudentT, 300_000, 8);
    mix.extend(generate(Dist::RandomBits, 70_000, 9));
    mix.extend(generate(Dist::RowScaled, 123_457, 10));
    cases.push((
        "mixed-modes".into(),
        mix,
        Encoder::new().with_chunk_values(2048),
    ));
    cases
}

/// Encodes `input` on the CPU (timed), checks the CPU decode, decodes it on the GPU with every
/// variant and compares each output with the reference; with `reps > 0`, times `reps` GPU
/// decodes of each variant. Prints a RESULT line per variant.
fn check(
    variants: &[Variant],
    case: &str,
    input: &[u8],
    encoder: &Encoder,
    reps: usize,
    encode_reps: usize,
    info: &Value,
) -> Result<()> {
    // CPU encode with all cores: into a fresh Vec (its pages faulted in by the writing threads),
    // and planned then written into a reused buffer, as into page-locked memory.
    let timed_reps = if reps > 0 { encode_reps } else { 1 };
    let mut fresh = Vec::new();
    let mut encoded = Vec::new();
    for _ in 0..timed_reps {
        let t = Instant::now();
        encoded = encoder.encode(input)?;
        fresh.push(t.elapsed().as_secs_f64());
    }
    let encode_s = median(fresh);
    let mut reused = Vec::new();
    let mut buffer = vec![0u8; encoded.len()];
    for _ in 0..timed_reps {
        let t = Instant::now();
        encoder.plan(input)?.write(&mut buffer)?;
        reused.push(t.elapsed().as_secs_f64());
    }
    let encode_reused_s = median(reused);
    if buffer != encoded {
        bail!("{case}: plan + write differs from encode");
    }
    drop(buffer);
    let st = stats(&encoded)?;
    let mut reference = vec![0u8; input.len()];
    let t = Instant::now();
    decode(&encoded, &mut reference)?;
    let cpu_decode_s = t.elapsed().as_secs_f64();
    if reference != input {
        println!("MISMATCH {case}: the CPU reference decode differs from the input");
        bail!("CPU round trip failed for {case}");
    }

    let Some(first) = variants.first() else {
        return Ok(());
    };
    let device = first.decoder.device();
    let mut enc_dev = device.alloc(encoded.len())?;
    enc_dev.copy_from_host(&encoded)?;
    let mut out_dev = device.alloc(input.len().max(1))?;
    let stream = device.stream()?;
    let mut back = vec![0u8; input.len()];
    for variant in variants {
        let decoder = &variant.decoder;
        let name = &variant.name;
        if decoder.options().kernel == Kernel::Baseline && st.two_tier_chunks > 0 {
            eprintln!("{case} [{name}]: skipped, the baseline kernel decodes no two-tier chunk");
            continue;
        }
        out_dev.fill(0xA5)?;
        let launch = || -> Result<()> {
            // SAFETY: both buffers are live device memory of the decoder's device with the
            // lengths passed; nothing else uses them while the stream runs, and they outlive
            // every launch (the stream is synchronised before they drop).
            unsafe {
                decoder.decode_async(
                    enc_dev.device_ptr(),
                    encoded.len(),
                    out_dev.device_ptr(),
                    input.len(),
                    stream.as_raw(),
                )
            }?;
            Ok(())
        };
        launch()?;
        stream.synchronize()?;
        decoder
            .synchronize_and_check()
            .with_context(|| format!("{case} [{name}]: the kernel refused the encoding"))?;
        out_dev.copy_to_host(&mut back)?;
        if back != reference {
            let first = back
                .iter()
                .zip(&reference)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            let wrong = back.iter().zip(&reference).filter(|(a, b)| a != b).count();
            println!(
                "MISMATCH {case} [{name}]: {wrong} of {} bytes differ, first at {first}",
                input.len()
            );
            bail!("GPU output of {name} differs from the CPU reference for {case}");
        }

        let mut r = json!({
            "measurement": if reps > 0 { "gpu_decode" } else { "gpu_decode_check" },
            "case": case,
            "variant": name,
            "match": true,
            "raw_bytes": input.len(),
            "encoded_bytes": encoded.len(),
            "ratio": st.ratio(),
            "chunks": st.chunks,
            "raw_chunks": st.raw_chunks,
            "chunks_by_code_bits": st.chunks_by_code_bits,
            "two_tier_chunks": st.two_tier_chunks,
            "chunks_by_tier_bits": st.chunks_by_tier_bits,
            "tier1_escapes": st.tier1_escapes,
            "exceptions": st.exceptions,
            "arch": decoder.arch(),
            "registers_per_thread": decoder.registers_per_thread(),
            "blocks_per_sm": decoder.blocks_per_sm(),
            "grid": decoder.max_blocks(),
            "cpu_encode_s": encode_s,
            "cpu_encode_gbps": input.len() as f64 / encode_s / 1e9,
            "cpu_encode_into_reused_s": encode_reused_s,
            "cpu_decode_s": cpu_decode_s,
        });
        if reps > 0 {
            // Warm-up, then `reps` timed decodes, each between two events on the stream.
            launch()?;
            let (start, stop) = (device.event()?, device.event()?);
            let mut ms = Vec::with_capacity(reps);
            for _ in 0..reps {
                start.record(&stream)?;
                launch()?;
                stop.record(&stream)?;
                ms.push(f64::from(stop.elapsed_ms_since(&start)?));
            }
            stream.synchronize()?;
            decoder.synchronize_and_check()?;
            let med = median(ms.clone());
            let best = ms.iter().copied().fold(f64::INFINITY, f64::min);
            let gbps = |ms: f64| input.len() as f64 / (ms * 1e-3) / 1e9;
            let sm_registers = info["sm_registers"].as_i64().unwrap_or(65536) as i32;
            let share = register_share(decoder, sm_registers);
            let extra = json!({
                "reps": reps,
                "gpu_decode_ms_median": med,
                "gpu_decode_ms_min": best,
                "gpu_decode_gbps_median": gbps(med),
                "gpu_decode_gbps_best": gbps(best),
                "gpu_input_gbps_median": encoded.len() as f64 / (med * 1e-3) / 1e9,
                "sm_register_share": share,
                "register_weighted_ms": med * share,
                "cpu_encode_s_per_26gib": encode_s * (26.0 * (1u64 << 30) as f64) / input.len() as f64,
                "cpu_encode_into_reused_s_per_26gib": encode_reused_s * (26.0 * (1u64 << 30) as f64) / input.len() as f64,
            });
            r.as_object_mut()
                .expect("object")
                .extend(extra.as_object().expect("object").clone());
            println!(
                "{case} [{name}]: ratio {:.4}, GPU decode {:.3} ms median ({:.0} GB/s of output, best {:.0}; {:.0}% of the SMs' registers held: {:.3} register-weighted ms), CPU encode {:.3} s ({:.2} GB/s; into a reused buffer {:.3} s), CPU decode {:.3} s",
                st.ratio(),
                med,
                gbps(med),
                gbps(best),
                share * 100.0,
                med * share,
                encode_s,
                input.len() as f64 / encode_s / 1e9,
                encode_reused_s,
                cpu_decode_s,
            );
        }
        r.as_object_mut()
            .expect("object")
            .extend(info.as_object().expect("object").clone());
        result(r);
    }
    Ok(())
}
