//! Helpers shared by the examples and `offload-bench`: flag parsing, statistics, rounding for the
//! `RESULT` lines and what the host reports about itself (GPU name, memory use).

/// A parser of integers in `lo..=hi` whose error names the range, whatever the input (a
/// negative number, one too large for any integer type, or no number).
pub fn int_in(
    lo: i64,
    hi: i64,
) -> impl Fn(&str) -> Result<i64, String> + Clone + Send + Sync + 'static {
    move |s: &str| match s.trim().parse::<i128>() {
        Ok(v) if (i128::from(lo)..=i128::from(hi)).contains(&v) => Ok(v as i64),
        _ => Err(format!("{s:?} is not an integer in {lo}..={hi}")),
    }
}

/// A parser of floats in `lo..=hi` whose error names the range.
pub fn float_in(lo: f64, hi: f64) -> impl Fn(&str) -> Result<f64, String> + Clone {
    move |s: &str| match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= lo && v <= hi => Ok(v),
        _ => Err(format!("{s:?} is not a number in {lo}..={hi}")),
    }
}

/// The median of `v` (the upper one of an even count; 0 for an empty slice).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// `v` rounded to two decimals (NaN and infinities become JSON null in the RESULT lines).
pub fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// CUDA device `d`'s marketing name from nvidia-smi when it is there, else `cuda:{d}`.
pub fn gpu_name(d: usize) -> String {
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

/// A memory figure of this process from `/proc/self/status` (`VmRSS`, `VmHWM`, ...) in bytes;
/// 0 where it is not reported.
fn proc_status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Bytes of this process's anonymous memory in transparent huge pages (`AnonHugePages` of
/// `/proc/self/smaps_rollup`; 0 where it is not reported).
pub fn huge_page_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("AnonHugePages:"))
                .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// This process's resident set size in bytes (0 where `/proc` does not report it).
pub fn rss_bytes() -> u64 {
    proc_status_bytes("VmRSS")
}

/// This process's peak resident set size in bytes (0 where `/proc` does not report it).
pub fn peak_rss_bytes() -> u64 {
    proc_status_bytes("VmHWM")
}

/// The patch grid of a 1-frame latent of `tokens` patches, as scripts/bench_peers.py makes it:
/// a x b with a the largest divisor of `tokens` not above its square root.
pub fn wan_grid(tokens: i64) -> (i64, i64) {
    let a = (1..=tokens)
        .take_while(|i| i * i <= tokens)
        .filter(|i| tokens % i == 0)
        .max()
        .unwrap_or(1);
    (a, tokens / a)
}

/// Median host-to-device rate of pinned memory on CUDA device `d`, GiB/s: a 512 MiB copy, 8
/// times, after copying for at least half a second. (With one warm-up copy, the first process
/// on a freshly started H100 host measured 46.5 GiB/s where every later one measured 50.9-51.6,
/// while its own uploads moved 26.18 GiB in 515 ms, 50.8 GiB/s; a longer warm-up is the guess
/// at the cause, not yet checked on such a host.)
pub fn pinned_h2d_gib_s(d: usize) -> layerwise_offload::Result<f64> {
    use layerwise_offload::accel::{self, Event, HostMemory, Stream};
    let bytes = 512usize << 20;
    let host = accel::alloc_host(bytes, HostMemory::Pinned)?;
    let mut dev = accel::alloc_device(bytes, d)?;
    let s = Stream::from_pool(d)?;
    let mut rates = Vec::new();
    let warm_up = std::time::Instant::now();
    let mut warm = true;
    while rates.len() < 8 {
        let (mut e0, mut e1) = (Event::with_timing()?, Event::with_timing()?);
        e0.record(&s)?;
        // SAFETY: host and dev outlive the copy: e1 is synchronized right after.
        unsafe { accel::copy_async(&mut dev, &host, Some(&s))? };
        e1.record(&s)?;
        e1.synchronize()?;
        if !warm {
            rates.push(bytes as f64 / (1u64 << 30) as f64 / (e0.elapsed_ms(&e1)? / 1e3));
        }
        warm = warm && warm_up.elapsed() < std::time::Duration::from_millis(500);
    }
    Ok(median(&rates))
}
