//! CPU speed of the encoder's two phases (plan, write) on N(0, 0.02) bf16 weights, next to a
//! plain copy of the same bytes (what the manager's scratch copy of a block costs), and of the
//! checksum check (`verify`, in MB/s of encoded bytes) and the CPU decode, per thread count; one
//! `RESULT {json}` line per thread count.
//!
//! ```text
//! cargo run --release -p layerwise-offload-codec --example encode_speed -- --mib 256
//! ```

use codec_testkit as common;

use anyhow::Result;
use clap::Parser;
use common::{Dist, generate};
use layerwise_offload_codec::Encoder;
use serde_json::json;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Encoder plan/write speed against a plain copy, per thread count")]
struct Args {
    /// MiB of bf16 data (one "block").
    #[arg(long, default_value_t = 256)]
    mib: usize,
    /// Thread counts to measure; 1 and all cores when none is given.
    #[arg(long, value_delimiter = ',')]
    threads: Vec<usize>,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Pieces the input is cut into for `plan_pieces` (tensors of a block, 0: skip).
    #[arg(long, default_value_t = 16)]
    pieces: usize,
    /// Report the fastest repetition instead of the median.
    #[arg(long)]
    best: bool,
    /// Encode with one tier of codes only (`Encoder::single_tier`: format version 2's chunks),
    /// to compare with the default two-tier choice.
    #[arg(long)]
    single_tier: bool,
}

/// The median of `xs`, or its smallest with `best` (on a machine shared with other work the
/// fastest run is the least disturbed one).
fn pick(mut xs: Vec<f64>, best: bool) -> f64 {
    xs.sort_by(f64::total_cmp);
    if best { xs[0] } else { xs[xs.len() / 2] }
}

/// Seconds of `reps` runs of `f` after a warm-up run (page faults, caches): their median, or
/// the fastest with `best`.
fn time(reps: usize, best: bool, mut f: impl FnMut()) -> f64 {
    f();
    pick(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
        best,
    )
}

/// Copies `src` into `dst` on `threads` scoped threads, in contiguous parts.
fn copy(src: &[u8], dst: &mut [u8], threads: usize) {
    let part = src.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        for (d, sr) in dst.chunks_mut(part).zip(src.chunks(part)) {
            s.spawn(move || d.copy_from_slice(sr));
        }
    });
}

fn main() -> Result<()> {
    let args = Args::parse();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = if args.threads.is_empty() {
        vec![1, cores]
    } else {
        args.threads.clone()
    };
    let data = generate(Dist::Normal, args.mib << 20, 1);
    let gb = data.len() as f64 / 1e9;
    let reps = args.reps.max(1);
    let mut scratch = vec![0u8; data.len()];
    let encoder = if args.single_tier {
        Encoder::new().single_tier()
    } else {
        Encoder::new()
    };
    let reference = encoder.encode(&data)?;
    let mut out = vec![0u8; reference.len()];
    // Tensors of a block: `pieces` pieces of uneven sizes, each at a 256-byte aligned offset,
    // with the gaps zero in the assembled input (as the manager's layout has them).
    let (pieces, assembled) = cut(&data, args.pieces);
    let assembled_ref = encoder.encode(&assembled)?;
    println!(
        "{cores} cores, {} MiB N(0, 0.02), {}, ratio {:.4}",
        args.mib,
        if args.single_tier {
            "one tier"
        } else {
            "two tiers allowed"
        },
        reference.len() as f64 / data.len() as f64
    );
    for &t in &threads {
        let enc = encoder.clone().with_threads(t);
        let copy_s = time(reps, args.best, || copy(&data, &mut scratch, t));
        let plan_s = time(reps, args.best, || {
            std::hint::black_box(enc.plan(&data).expect("valid options"));
        });
        let plan = enc.plan(&data)?;
        let write_s = time(reps, args.best, || {
            plan.write(&mut out).expect("right length")
        });
        assert!(out == reference, "plan + write differs from encode");
        let total_s = plan_s + write_s;
        let view = layerwise_offload_codec::Encoded::parse(&reference)?;
        let verify_s = time(reps, args.best, || {
            view.verify_with_threads(t).expect("a sealed encoding")
        });
        let decode_s = time(reps, args.best, || {
            layerwise_offload_codec::decode_with_threads(&reference, &mut scratch, t)
                .expect("decodes")
        });
        let mut row = json!({
            "threads": t,
            "single_tier": args.single_tier,
            "bytes": data.len(),
            "copy_gbps": gb / copy_s,
            "plan_gbps": gb / plan_s,
            "write_gbps": gb / write_s,
            "encode_gbps": gb / total_s,
            "copy_gbps_per_thread": gb / copy_s / t as f64,
            "plan_gbps_per_thread": gb / plan_s / t as f64,
            "write_gbps_per_thread": gb / write_s / t as f64,
            "encode_gbps_per_thread": gb / total_s / t as f64,
            "copy_share_of_copy_plus_encode": copy_s / (copy_s + total_s),
            "encoded_bytes": reference.len(),
            "verify_mb_s": reference.len() as f64 / 1e6 / verify_s,
            "decode_gbps": gb / decode_s,
            "verify_share_of_decode": verify_s / decode_s,
        });
        if !pieces.is_empty() {
            let mut out = vec![0u8; assembled_ref.len()];
            let pieces_s = time(reps, args.best, || {
                let plan = enc
                    .plan_pieces(&pieces, assembled.len())
                    .expect("valid options");
                plan.write(&mut out).expect("right length");
            });
            assert!(out == assembled_ref, "plan_pieces differs from plan");
            row["pieces"] = json!(pieces.len());
            row["pieces_encode_gbps"] = json!(assembled.len() as f64 / 1e9 / pieces_s);
        }
        println!("RESULT {row}");
    }
    Ok(())
}

/// `data` cut into `n` pieces of uneven sizes placed at 256-byte aligned offsets; returns the
/// pieces and the assembled buffer (gaps zero).
fn cut(data: &[u8], n: usize) -> (Vec<(usize, &[u8])>, Vec<u8>) {
    if n == 0 {
        return (Vec::new(), Vec::new());
    }
    let mut pieces = Vec::with_capacity(n);
    let mut src = 0usize;
    let mut at = 0usize;
    for p in 0..n {
        // Uneven: piece p gets a share proportional to p % 4 + 1, the last one the rest.
        let total_weight: usize = (0..n).map(|q| q % 4 + 1).sum();
        let len = if p + 1 == n {
            data.len() - src
        } else {
            data.len() / total_weight * (p % 4 + 1) / 2 * 2 + 6
        };
        pieces.push((at, &data[src..src + len]));
        src += len;
        at = (at + len).next_multiple_of(256);
    }
    let mut assembled = vec![0u8; at];
    for &(o, p) in &pieces {
        assembled[o..o + p.len()].copy_from_slice(p);
    }
    (pieces, assembled)
}
