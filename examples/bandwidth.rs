//! Host <-> device copy bandwidth through the crate's shim: pinned and pageable, H2D and D2H,
//! timed with CUDA events on a side stream (median of the repetitions). This is the PCIe
//! ceiling the layer loop is measured against.
//!
//! ```text
//! cargo run --release --example bandwidth -- [--mib 1024] [--reps 10] [--device 0] [--gpus N]
//! cargo run --release --example bandwidth -- --help
//! ```
//! Prints a table and one `RESULT {json}` line. Without a CUDA device it says so and measures
//! host memcpy bandwidth only.
//!
//! With `--gpus N` (N >= 2) it also measures what several GPUs of one host get from one pinned
//! host copy: each GPU alone, all of them at once (from the same copy and from one copy each),
//! device-to-device copies between GPU 0 and GPU 1, and the peer-split pattern (each of two GPUs
//! uploads half of a buffer from the host and receives the other half from its peer), which is
//! what a design that sends half of every block over the peer link would get. One more
//! `RESULT {json}` line carries those figures.

use anyhow::{Result, bail};
use clap::Parser;
use layerwise_offload::accel::{self, Event, HostMemory, Stream};
use serde_json::json;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

use offload_testkit::util;
use util::{gpu_name, int_in, median, round2};

/// Host <-> device copy bandwidth: pinned and pageable, H2D and D2H, timed with CUDA events on
/// a side stream (median of the repetitions); with --gpus N, what several GPUs get from one
/// pinned host copy. Without a CUDA device: host memcpy bandwidth only.
#[derive(Debug, Parser)]
#[command(name = "bandwidth", allow_negative_numbers = true)]
struct Args {
    /// MiB per copy.
    #[arg(long, default_value_t = 1024, value_parser = int_in(1, 1 << 20))]
    mib: i64,
    /// Timed copies per measurement (the median is reported).
    #[arg(long, default_value_t = 10, value_parser = int_in(1, 10_000))]
    reps: i64,
    /// CUDA device of the single-GPU measurements.
    #[arg(long, default_value_t = 0, value_parser = int_in(0, 63))]
    device: i64,
    /// GPUs of the several-GPU measurements (2 or more to run them).
    #[arg(long, default_value_t = 1, value_parser = int_in(1, 64))]
    gpus: i64,
}

/// The flags, as sizes.
struct Run {
    mib: usize,
    reps: usize,
    device: usize,
    gpus: usize,
}

fn parse_args() -> Result<Run> {
    let a = Args::parse();
    Ok(Run {
        mib: a.mib as usize,
        reps: a.reps as usize,
        device: a.device as usize,
        gpus: a.gpus as usize,
    })
}

/// Median GiB/s of `reps` copies `dst <- src` on `stream`, timed with events.
fn time_copies(dst: &mut Tensor, src: &Tensor, stream: &Stream, reps: usize) -> Result<f64> {
    let bytes = src.numel() as f64;
    let mut rates = Vec::with_capacity(reps);
    for i in 0..=reps {
        let mut start = Event::with_timing()?;
        let mut end = Event::with_timing()?;
        start.record(stream)?;
        // SAFETY: src and dst outlive the copy: `end` is synchronized before the next step.
        unsafe { accel::copy_async(dst, src, Some(stream))? };
        end.record(stream)?;
        end.synchronize()?;
        if i > 0 {
            // the first copy is a warm-up
            rates.push(bytes / (start.elapsed_ms(&end)? / 1e3) / (1u64 << 30) as f64);
        }
    }
    Ok(median(&rates))
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let bytes = args.mib << 20;
    if !accel::cuda_is_available() {
        let reason = accel::require_device("bandwidth", args.device).unwrap_err();
        println!("accelerator: none ({reason})");
        let mut src = accel::alloc_host(bytes, HostMemory::Pageable)?;
        let mut dst = accel::alloc_host(bytes, HostMemory::Pageable)?;
        let _ = src.fill_(1);
        let mut rates = Vec::new();
        for _ in 0..args.reps {
            let t = Instant::now();
            dst.copy_(&src);
            rates.push(bytes as f64 / t.elapsed().as_secs_f64() / (1u64 << 30) as f64);
        }
        let m = median(&rates);
        println!(
            "host memcpy: {m:.1} GiB/s ({} MiB, median of {})",
            args.mib, args.reps
        );
        let result = json!({"device": null, "mib": args.mib, "host_memcpy_gib_s": round2(m)});
        println!("RESULT {result}");
        return Ok(());
    }
    accel::require_device("bandwidth", args.device)?;
    let d = args.device;
    let name = gpu_name(d);
    println!(
        "accelerator: CUDA device {d} ({name}), {} device(s)",
        accel::cuda_device_count()
    );
    let stream = Stream::from_pool(d)?;
    let t0 = Instant::now();
    let mut pinned = accel::alloc_host(bytes, HostMemory::Pinned)?;
    let pin_s = t0.elapsed().as_secs_f64();
    let mut pageable = accel::alloc_host(bytes, HostMemory::Pageable)?;
    pinned.copy_(&Tensor::randint(
        256,
        [bytes as i64],
        (Kind::Uint8, Device::Cpu),
    ));
    pageable.copy_(&pinned);
    let mut dev = accel::alloc_device(bytes, d)?;
    let mut rows = Vec::new();
    for (label, host) in [("pinned", &pinned), ("pageable", &pageable)] {
        let h2d = time_copies(&mut dev, host, &stream, args.reps)?;
        let d2h = time_copies(&mut host.shallow_clone(), &dev, &stream, args.reps)?;
        rows.push((label, h2d, d2h));
    }
    println!("| host memory | H2D GiB/s | D2H GiB/s |");
    println!("|---|---|---|");
    for (label, h2d, d2h) in &rows {
        println!("| {label} | {h2d:.1} | {d2h:.1} |");
    }
    println!("pinned allocation of {} MiB: {:.2} s", args.mib, pin_s);
    let result = json!({
        "device": name,
        "mib": args.mib,
        "reps": args.reps,
        "pinned_h2d_gib_s": round2(rows[0].1),
        "pinned_d2h_gib_s": round2(rows[0].2),
        "pageable_h2d_gib_s": round2(rows[1].1),
        "pageable_d2h_gib_s": round2(rows[1].2),
        "pinned_alloc_s": (pin_s * 1e3).round() / 1e3,
    });
    println!("RESULT {result}");
    if args.gpus > 1 {
        drop((pinned, pageable, dev));
        multi_gpu(&args, &name)?;
    }
    Ok(())
}

fn gib_s(bytes: usize, ms: f64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64 / (ms / 1e3)
}

/// Runs `enqueue(rep)` for `reps + 1` repetitions (the first is a warm-up) and returns, per
/// stream, the milliseconds between an event recorded on it before the timed repetitions and one
/// recorded after them, divided by `reps`; every stream is synchronized at the end.
fn time_streams(
    streams: &[Stream],
    reps: usize,
    mut enqueue: impl FnMut(usize) -> Result<()>,
) -> Result<Vec<f64>> {
    enqueue(0)?;
    for s in streams {
        s.synchronize()?;
    }
    let mut starts = Vec::new();
    for s in streams {
        let mut e = Event::with_timing()?;
        e.record(s)?;
        starts.push(e);
    }
    for r in 1..=reps {
        enqueue(r)?;
    }
    let mut out = Vec::new();
    for (s, start) in streams.iter().zip(&starts) {
        let mut end = Event::with_timing()?;
        end.record(s)?;
        end.synchronize()?;
        out.push(start.elapsed_ms(&end)? / reps as f64);
    }
    Ok(out)
}

/// Several GPUs fed from one pinned host copy (see the module docs).
fn multi_gpu(args: &Run, name: &str) -> Result<()> {
    let n = args.gpus;
    if n > accel::cuda_device_count() {
        bail!(
            "--gpus {n} but {} CUDA devices are visible",
            accel::cuda_device_count()
        );
    }
    let bytes = args.mib << 20;
    let half = bytes / 2;
    let reps = args.reps;
    let host = accel::alloc_host(bytes, HostMemory::Pinned)?;
    let own: Vec<Tensor> = (0..n)
        .map(|_| accel::alloc_host(bytes, HostMemory::Pinned))
        .collect::<Result<_, _>>()?;
    // Two device buffers per GPU, so that a repetition's uploads do not overwrite the buffer the
    // previous repetition's peer copy still reads.
    let mut bufs: Vec<[Tensor; 2]> = (0..n)
        .map(|g| {
            Ok([
                accel::alloc_device(bytes, g)?,
                accel::alloc_device(bytes, g)?,
            ])
        })
        .collect::<Result<_>>()?;
    let up: Vec<Stream> = (0..n).map(Stream::from_pool).collect::<Result<_, _>>()?;
    let peer: Vec<Stream> = (0..n).map(Stream::from_pool).collect::<Result<_, _>>()?;
    // Each GPU alone, from the shared copy.
    let mut alone = Vec::new();
    for g in 0..n {
        let ms = time_streams(&up[g..=g], reps, |r| {
            // SAFETY: host and the buffer outlive the copies; time_streams synchronizes the stream.
            unsafe { accel::copy_async(&mut bufs[g][r % 2], &host, Some(&up[g]))? };
            Ok(())
        })?;
        alone.push(gib_s(bytes, ms[0]));
    }
    // All at once, from the shared copy, then from one copy each.
    let mut together = Vec::new();
    for shared in [true, false] {
        let ms = time_streams(&up, reps, |r| {
            for g in 0..n {
                let src = if shared { &host } else { &own[g] };
                // SAFETY: as above; time_streams synchronizes every stream at the end.
                unsafe { accel::copy_async(&mut bufs[g][r % 2], src, Some(&up[g]))? };
            }
            Ok(())
        })?;
        together.push(ms.iter().map(|&m| gib_s(bytes, m)).collect::<Vec<_>>());
    }
    // Device to device, GPU 0 -> GPU 1 (libtorch runs a cross-device copy on the source
    // device's current stream, the guard's stream here) and both directions at once.
    let d2d_one = {
        let (a, b) = bufs.split_at_mut(1);
        let src = a[0][0].shallow_clone();
        let ms = time_streams(&peer[0..1], reps, |r| {
            // SAFETY: both buffers outlive the copies; the stream is synchronized at the end.
            unsafe { accel::copy_async(&mut b[0][r % 2], &src, Some(&peer[0]))? };
            Ok(())
        })?;
        gib_s(bytes, ms[0])
    };
    let d2d_both = {
        let (s0, s1) = (bufs[0][0].shallow_clone(), bufs[1][0].shallow_clone());
        let (mut d0, mut d1) = (bufs[0][1].shallow_clone(), bufs[1][1].shallow_clone());
        let ms = time_streams(&peer[0..2], reps, |_| {
            // SAFETY: as above; each copy runs on its source device's stream.
            unsafe {
                accel::copy_async(&mut d1, &s0, Some(&peer[0]))?;
                accel::copy_async(&mut d0, &s1, Some(&peer[1]))?;
            }
            Ok(())
        })?;
        ms.iter().map(|&m| gib_s(bytes, m)).collect::<Vec<_>>()
    };
    // Peer split on GPUs 0 and 1: GPU g uploads half g of the buffer from the host, then pushes
    // it to the other GPU on a second stream while the next repetition's upload goes on; each
    // GPU ends every repetition with the whole buffer.
    let mut uploaded: Vec<Vec<Event>> = (0..2)
        .map(|_| (0..2).map(|_| Event::new()).collect::<Result<_, _>>())
        .collect::<Result<_, _>>()?;
    let mut pushed: Vec<Vec<Event>> = (0..2)
        .map(|_| (0..2).map(|_| Event::new()).collect::<Result<_, _>>())
        .collect::<Result<_, _>>()?;
    let mut first = [true, true];
    let split = time_streams(&[up[0], up[1], peer[0], peer[1]], reps, |r| {
        let slot = r % 2;
        for g in 0..2 {
            let mut dst = bufs[g][slot].narrow(0, (g * half) as i64, half as i64);
            let src = host.narrow(0, (g * half) as i64, half as i64);
            if !first[slot] {
                // Upload into the slot only once both pushes out of and into it have finished.
                pushed[0][slot].wait(&up[g])?;
                pushed[1][slot].wait(&up[g])?;
            }
            // SAFETY: host and buffers outlive the copies; slot reuse waits for the pushes.
            unsafe { accel::copy_async(&mut dst, &src, Some(&up[g]))? };
            uploaded[g][slot].record(&up[g])?;
        }
        first[slot] = false;
        for g in 0..2 {
            let o = 1 - g;
            let src = bufs[g][slot].narrow(0, (g * half) as i64, half as i64);
            let mut dst = bufs[o][slot].narrow(0, (g * half) as i64, half as i64);
            uploaded[g][slot].wait(&peer[g])?;
            // The destination half of the peer is written by nobody else in this repetition.
            // SAFETY: as above.
            unsafe { accel::copy_async(&mut dst, &src, Some(&peer[g]))? };
            pushed[g][slot].record(&peer[g])?;
        }
        Ok(())
    })?;
    let split_ms = split.iter().cloned().fold(0.0, f64::max);
    let split_gib_s = gib_s(bytes, split_ms);
    // The split is only worth anything if every GPU really ends up with the whole buffer.
    let want = host.to_device(Device::Cuda(0));
    for (g, pair) in bufs.iter().take(2).enumerate() {
        for (slot, buf) in pair.iter().enumerate() {
            if !buf.to_device(Device::Cuda(0)).equal(&want) {
                bail!("peer split: GPU {g} buffer {slot} differs from the host copy");
            }
        }
    }
    println!();
    println!("| {n} GPUs, {} MiB | GiB/s per GPU |", args.mib);
    println!("|---|---|");
    for (g, r) in alone.iter().enumerate() {
        println!("| H2D, GPU {g} alone | {r:.1} |");
    }
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    println!(
        "| H2D, all at once, one shared host copy | {} (aggregate {:.1}) |",
        fmt(&together[0]),
        together[0].iter().sum::<f64>()
    );
    println!(
        "| H2D, all at once, one host copy each | {} (aggregate {:.1}) |",
        fmt(&together[1]),
        together[1].iter().sum::<f64>()
    );
    println!("| D2D, GPU 0 -> GPU 1 | {d2d_one:.1} |");
    println!("| D2D, both directions at once | {} |", fmt(&d2d_both));
    println!(
        "| peer split on GPUs 0+1 (half from the host, half from the peer) | {split_gib_s:.1} |"
    );
    let all = |v: &[f64]| v.iter().map(|&x| round2(x)).collect::<Vec<_>>();
    let result = json!({
        "device": name,
        "gpus": n,
        "mib": args.mib,
        "reps": reps,
        "h2d_alone_gib_s": all(&alone),
        "h2d_together_shared_gib_s": all(&together[0]),
        "h2d_together_own_copy_gib_s": all(&together[1]),
        "d2d_gib_s": round2(d2d_one),
        "d2d_both_ways_gib_s": all(&d2d_both),
        "peer_split_gib_s": round2(split_gib_s),
    });
    println!("RESULT {result}");
    Ok(())
}
