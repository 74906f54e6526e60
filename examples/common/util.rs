//! Helpers shared by the examples and `offload-bench`: flag parsing, statistics, rounding for the
//! `RESULT` lines and what the host reports about itself (GPU name, memory use).
//!
//! Included by path (`#[path = "common/util.rs"] mod util;`, and from offload-bench
//! `#[path = "../../examples/common/util.rs"]`): this directory has no `main.rs`, so cargo does
//! not take it for an example. Each user calls only some of the helpers.
#![allow(dead_code)]

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

/// This process's resident set size in bytes (0 where `/proc` does not report it).
pub fn rss_bytes() -> u64 {
    proc_status_bytes("VmRSS")
}

/// This process's peak resident set size in bytes (0 where `/proc` does not report it).
pub fn peak_rss_bytes() -> u64 {
    proc_status_bytes("VmHWM")
}
