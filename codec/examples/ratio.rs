//! Compression ratio and CPU speed of the codec on synthetic weight distributions: the measurements
//! behind the format's choices (the chosen modes against one tier only, fixed k, fixed pairs of
//! tiers (k1, k2), chunk sizes, and an entropy coder's bound), one `RESULT {json}` line per
//! measurement.
//!
//! ```text
//! cargo run --release -p layerwise-offload-codec --example ratio -- --mib 256
//! ```

use codec_testkit as common;

use anyhow::{Context, Result, bail};
use clap::Parser;
use common::{Dist, entropy, exponent_entropy, generate};
use layerwise_offload_codec::{DEFAULT_CHUNK_VALUES, Encoder, decode_with_threads, stats};
use serde_json::json;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Compression ratio and CPU speed of the bf16 codec on synthetic weights")]
struct Args {
    /// MiB of bf16 data per distribution.
    #[arg(long, default_value_t = 256)]
    mib: usize,
    /// Distributions (names: normal-0.02, row-scaled-normal, student-t4, xavier-uniform,
    /// kaiming-uniform, fp32-normal, random-bits); all when none is given.
    #[arg(long, value_delimiter = ',')]
    dist: Vec<String>,
    /// Timed repetitions of each encode and decode (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Seed of the generated data.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dists = if args.dist.is_empty() {
        Dist::EVERY.to_vec()
    } else {
        args.dist
            .iter()
            .map(|n| Dist::from_name(n).with_context(|| format!("unknown distribution {n}")))
            .collect::<Result<_>>()?
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("{cores} cores");
    for dist in dists {
        let data = generate(dist, args.mib << 20, args.seed);
        measure(dist, &data, cores, args.reps.max(1))?;
    }
    Ok(())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn measure(dist: Dist, data: &[u8], cores: usize, reps: usize) -> Result<()> {
    let name = dist.name();
    let raw = data.len() as f64;
    // Ratios: the encoder's choice of k, fixed k, chunk sizes, against entropy bounds.
    let ratio = |enc: Encoder| -> Result<f64> { Ok(enc.encode(data)?.len() as f64 / raw) };
    let mut fixed = serde_json::Map::new();
    for k in 2..=5u8 {
        fixed.insert(
            format!("k{k}"),
            json!(ratio(Encoder::new().with_code_bits(k..=k).single_tier())?),
        );
    }
    let mut two_tiers = serde_json::Map::new();
    for (k1, k2) in [(1u8, 2u8), (2, 2), (2, 3), (2, 4), (3, 2), (3, 3)] {
        two_tiers.insert(
            format!("k{k1}_{k2}"),
            json!(ratio(
                Encoder::new()
                    .with_code_bits(k1..=k1)
                    .with_tier2_bits(k2..=k2)
            )?),
        );
    }
    let one_tier = ratio(Encoder::new().single_tier())?;
    let mut by_chunk = serde_json::Map::new();
    for cv in [4096u32, 16384, 32768, 65536, 131072, 262144] {
        by_chunk.insert(
            cv.to_string(),
            json!(ratio(Encoder::new().with_chunk_values(cv))?),
        );
    }
    // An order-0 entropy coder of each chunk's exponents, sign and mantissa raw, headers free.
    let cv = DEFAULT_CHUNK_VALUES as usize;
    let chunk_entropy_bits: f64 = data
        .chunks(2 * cv)
        .map(|c| {
            let mut counts = [0u64; 256];
            for v in c.chunks_exact(2) {
                counts[usize::from((v[1] << 1) | (v[0] >> 7))] += 1;
            }
            entropy(&counts) * (c.len() / 2) as f64
        })
        .sum();
    let values = (data.len() / 2) as f64;
    let entropy_bound = (8.0 * values + chunk_entropy_bits) / (16.0 * values);
    let global_h = exponent_entropy(data);

    let encoded = Encoder::new().encode(data)?;
    let st = stats(&encoded)?;
    let mut out = vec![0u8; data.len()];
    let mut timings = serde_json::Map::new();
    for threads in [1, cores] {
        let enc_s = median(
            (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    let e = Encoder::new()
                        .with_threads(threads)
                        .encode(data)
                        .expect("valid options");
                    let s = t.elapsed().as_secs_f64();
                    assert_eq!(e, encoded, "encoding is independent of the thread count");
                    s
                })
                .collect(),
        );
        let mut dec = Vec::new();
        for _ in 0..reps {
            let t = Instant::now();
            decode_with_threads(&encoded, &mut out, threads)?;
            dec.push(t.elapsed().as_secs_f64());
        }
        if out != data {
            bail!("MISMATCH: {name} did not round-trip");
        }
        let dec_s = median(dec);
        timings.insert(
            format!("threads_{threads}"),
            json!({"encode_gbps": raw / enc_s / 1e9, "decode_gbps": raw / dec_s / 1e9}),
        );
    }
    let tiers_used: Vec<String> = st
        .chunks_by_tier_bits
        .iter()
        .enumerate()
        .flat_map(|(k1, row)| {
            row.iter()
                .enumerate()
                .filter(|&(_, &c)| c > 0)
                .map(move |(k2, c)| format!("({k1},{k2}):{c}"))
        })
        .collect();
    println!(
        "{name:>18}: ratio {:.4} = {:.4} x entropy bound {entropy_bound:.4} (one tier {one_tier:.4}, k=3 {:.4}, (2,3) {:.4}, (2,2) {:.4}), exponent entropy {global_h:.2} bits, chunks raw {} one-tier {} k {:?} two-tier {} {tiers_used:?}, escapes/value {:.4}, raw exponents/value {:.4}, {}",
        st.ratio(),
        st.ratio() / entropy_bound,
        fixed["k3"].as_f64().unwrap_or(f64::NAN),
        two_tiers["k2_3"].as_f64().unwrap_or(f64::NAN),
        two_tiers["k2_2"].as_f64().unwrap_or(f64::NAN),
        st.raw_chunks,
        st.coded_chunks,
        st.chunks_by_code_bits,
        st.two_tier_chunks,
        st.tier1_escapes as f64 / values,
        st.exceptions as f64 / values,
        serde_json::Value::Object(timings.clone()),
    );
    println!(
        "{name:>18}: by chunk values {}",
        serde_json::Value::Object(by_chunk.clone())
    );
    let result = json!({
        "measurement": "ratio",
        "dist": name,
        "raw_bytes": data.len(),
        "encoded_bytes": encoded.len(),
        "ratio": st.ratio(),
        "ratio_over_entropy_bound": st.ratio() / entropy_bound,
        "one_tier_ratio": one_tier,
        "fixed_k": fixed,
        "fixed_two_tiers": two_tiers,
        "by_chunk_values": by_chunk,
        "entropy_bound_per_chunk": entropy_bound,
        "exponent_entropy_bits": global_h,
        "raw_chunks": st.raw_chunks,
        "coded_chunks": st.coded_chunks,
        "chunks_by_code_bits": st.chunks_by_code_bits,
        "two_tier_chunks": st.two_tier_chunks,
        "chunks_by_tier_bits": st.chunks_by_tier_bits,
        "tier1_escapes_per_value": st.tier1_escapes as f64 / values,
        "exceptions_per_value": st.exceptions as f64 / values,
        "cpu": timings,
    });
    println!("RESULT {result}");
    Ok(())
}
