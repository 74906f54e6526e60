//! Soak: many forwards of a small stack through the manager (depth 2, a budget holding about
//! half the blocks), checking that device memory (allocated and reserved), host memory and the
//! manager's host bytes stay flat after the first forward and that the output of the last
//! forward equals the first bit for bit.
//!
//! ```text
//! cargo run --release --example soak -- [--forwards 1000] [--blocks 12] [--dim 512]
//! cargo run --release --example soak -- --help
//! ```
//! Prints one `RESULT {json}` line and exits non-zero when an invariant breaks. Without a CUDA
//! device it runs in the manager's CPU test mode.

use anyhow::{Result, bail};
use clap::Parser;
use layerwise_offload::{OffloadConfig, accel};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use offload_testkit::util;
use util::{int_in, rss_bytes};

/// Many forwards of a small stack through the manager; checks that memory stays flat and the
/// last output equals the first.
#[derive(Debug, Parser)]
#[command(name = "soak", allow_negative_numbers = true)]
struct Args {
    /// Forwards to run.
    #[arg(long, default_value_t = 1000, value_parser = int_in(2, 100_000_000))]
    forwards: i64,
    /// Blocks in the stack.
    #[arg(long, default_value_t = 12, value_parser = int_in(2, 1000))]
    blocks: i64,
    /// Width of each block's square weight.
    #[arg(long, default_value_t = 512, value_parser = int_in(1, 16384))]
    dim: i64,
}

fn main() -> Result<()> {
    // SAFETY: the first statement of main: no other thread exists yet to touch the environment.
    unsafe { accel::use_recommended_hardware_queues() };
    let args = Args::parse();
    let (forwards, blocks, dim) = (args.forwards as usize, args.blocks as usize, args.dim);
    let cuda = accel::cuda_is_available();
    let dev = if cuda { Device::Cuda(0) } else { Device::Cpu };
    tch::manual_seed(7);
    let mut named = Vec::new();
    for i in 0..blocks {
        named.push((
            format!("blocks.{i}.w"),
            Tensor::randn([dim, dim], (Kind::Float, Device::Cpu)) / (dim as f64).sqrt(),
        ));
        named.push((
            format!("blocks.{i}.b"),
            Tensor::randn([dim], (Kind::Float, Device::Cpu)) * 0.1,
        ));
    }
    let block_bytes = (dim * dim * 4 + 4 * dim) as u64 + 512;
    let mut m = OffloadConfig::new("blocks", blocks)
        .prefetch_depth(2)
        .vram_budget(block_bytes * (blocks as u64 / 2 + 3))
        .cpu_test_mode(!cuda)
        .build(&named)?;
    m.initialize()?;
    let x = Tensor::randn([64, dim], (Kind::Float, Device::Cpu)).to_device(dev);
    let forward = |m: &mut layerwise_offload::LayerwiseOffloadManager| -> Result<Tensor> {
        tch::no_grad(|| {
            let mut h = x.shallow_clone();
            for i in 0..blocks {
                let _g = m.enter(i)?;
                h = (h.matmul(&named[2 * i].1) + &named[2 * i + 1].1).tanh();
            }
            Ok(h.to_device(Device::Cpu))
        })
    };
    let first = forward(&mut m)?;
    let mem = |_: ()| -> Result<(u64, u64)> {
        if cuda {
            accel::synchronize_device(0)?;
            let s = accel::memory_stats(0)?;
            Ok((s.allocated, s.reserved))
        } else {
            Ok((0, 0))
        }
    };
    let (alloc1, reserved1) = mem(())?;
    let host1 = m.stats().host_bytes;
    let rss1 = rss_bytes();
    let mut max_alloc = alloc1;
    let mut last = first.shallow_clone();
    for k in 1..forwards {
        last = forward(&mut m)?;
        if k % 100 == 0 {
            max_alloc = max_alloc.max(mem(())?.0);
        }
    }
    let (alloc_n, reserved_n) = mem(())?;
    let host_n = m.stats().host_bytes;
    let rss_n = rss_bytes();
    let st = m.stats().clone();
    let equal = first
        .view_dtype(Kind::Int)
        .equal(&last.view_dtype(Kind::Int));
    let result = json!({
        "device": if cuda { "cuda:0" } else { "cpu" },
        "forwards": forwards,
        "blocks": blocks,
        "resident_blocks": st.resident_blocks,
        "uploads": st.uploads,
        "allocated_first": alloc1,
        "allocated_last": alloc_n,
        "allocated_max_sampled": max_alloc,
        "reserved_first": reserved1,
        "reserved_last": reserved_n,
        "host_bytes_first": host1,
        "host_bytes_last": host_n,
        "rss_first": rss1,
        "rss_last": rss_n,
        "stall_ms": (st.stall_ms * 10.0).round() / 10.0,
        "output_equal": equal,
    });
    println!("RESULT {result}");
    m.restore()?;
    if !equal {
        bail!("the output of forward {forwards} differs from forward 1");
    }
    if alloc_n != alloc1 || max_alloc != alloc1 || reserved_n != reserved1 || host_n != host1 {
        bail!(
            "memory grew: allocated {alloc1} -> {alloc_n} (max {max_alloc}), reserved {reserved1} -> {reserved_n}, host {host1} -> {host_n}"
        );
    }
    println!("soak ok: {forwards} forwards, memory flat, output equal");
    Ok(())
}
