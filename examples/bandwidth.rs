//! Host <-> device copy bandwidth through the crate's shim: pinned and pageable, H2D and D2H,
//! timed with CUDA events on a side stream (median of the repetitions). This is the PCIe
//! ceiling the layer loop is measured against.
//!
//! ```text
//! cargo run --release --example bandwidth -- [--mib 1024] [--reps 10] [--device 0]
//! ```
//! Prints a table and one `RESULT {json}` line. Without a CUDA device it says so and measures
//! host memcpy bandwidth only.

use anyhow::{Context, Result, bail};
use layerwise_offload::accel::{self, Event, HostMemory, Stream};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

struct Args {
    mib: usize,
    reps: usize,
    device: usize,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        mib: 1024,
        reps: 10,
        device: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = |name: &str| -> Result<usize> {
            it.next()
                .with_context(|| format!("{name} needs a value"))?
                .parse()
                .with_context(|| format!("{name} takes an integer"))
        };
        match flag.as_str() {
            "--mib" => a.mib = val("--mib")?,
            "--reps" => a.reps = val("--reps")?,
            "--device" => a.device = val("--device")?,
            "-h" | "--help" => {
                println!("usage: bandwidth [--mib N (1024)] [--reps N (10)] [--device N (0)]");
                std::process::exit(0);
            }
            other => bail!("unknown flag {other} (try --help)"),
        }
    }
    if a.mib == 0 || a.reps == 0 {
        bail!("--mib and --reps must be positive");
    }
    Ok(a)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
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
    Ok(median(rates))
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
        let m = median(rates);
        println!(
            "host memcpy: {m:.1} GiB/s ({} MiB, median of {})",
            args.mib, args.reps
        );
        println!(
            "RESULT {{\"device\":null,\"mib\":{},\"host_memcpy_gib_s\":{m:.2}}}",
            args.mib
        );
        return Ok(());
    }
    accel::require_device("bandwidth", args.device)?;
    let d = args.device;
    let name = device_name(d);
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
    println!(
        "RESULT {{\"device\":\"{name}\",\"mib\":{},\"reps\":{},\"pinned_h2d_gib_s\":{:.2},\"pinned_d2h_gib_s\":{:.2},\"pageable_h2d_gib_s\":{:.2},\"pageable_d2h_gib_s\":{:.2},\"pinned_alloc_s\":{:.3}}}",
        args.mib, args.reps, rows[0].1, rows[0].2, rows[1].1, rows[1].2, pin_s
    );
    Ok(())
}

/// The device's marketing name from nvidia-smi when it is there, else a generic label.
fn device_name(d: usize) -> String {
    std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name",
            "--format=csv,noheader",
            &format!("--id={d}"),
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("cuda:{d}"))
}
