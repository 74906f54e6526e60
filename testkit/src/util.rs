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
    nvidia_smi(d, "name").unwrap_or_else(|| format!("cuda:{d}"))
}

/// nvidia-smi's value of `field` (`--query-gpu`) for CUDA device `d`, where nvidia-smi is there
/// and answers.
fn nvidia_smi(d: usize, field: &str) -> Option<String> {
    std::process::Command::new("nvidia-smi")
        .args([
            &format!("--query-gpu={field}"),
            "--format=csv,noheader",
            &format!("--id={d}"),
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
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
    Ok(pinned_h2d(d)?.0)
}

/// [`pinned_h2d_gib_s`], and where the link's two ends sit ([`LinkPlacement`]).
pub fn pinned_h2d(d: usize) -> layerwise_offload::Result<(f64, LinkPlacement)> {
    use layerwise_offload::accel::{self, Event, HostMemory, Stream};
    let bytes = 512usize << 20;
    let host = accel::alloc_host(bytes, HostMemory::Pinned)?;
    let placement = LinkPlacement::of(d, &host);
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
    Ok((median(&rates), placement))
}

/// Where the two ends of a host-to-device link sit, for telling apart runs whose link speed
/// differs: the GPU's NUMA node, the node of a pinned buffer's first page, and the CPUs and
/// memory nodes the process may use. None where the system does not say (no sysfs entry, no
/// NUMA, not Linux).
#[derive(Debug, Clone, Default)]
pub struct LinkPlacement {
    /// The GPU's PCI bus id (nvidia-smi), e.g. `00000000:18:00.0`.
    pub bus_id: Option<String>,
    /// The GPU's NUMA node (sysfs `numa_node`; -1 where the platform has none).
    pub gpu_node: Option<i64>,
    /// The NUMA node of the measured pinned buffer's first page.
    pub buffer_node: Option<i64>,
    /// `/proc/self/status` `Cpus_allowed_list`.
    pub cpus: Option<String>,
    /// `/proc/self/status` `Mems_allowed_list`.
    pub mems: Option<String>,
}

impl LinkPlacement {
    /// The placement of CUDA device `d` and of host buffer `host` (a CPU tensor).
    pub fn of(d: usize, host: &tch::Tensor) -> LinkPlacement {
        let bus_id = nvidia_smi(d, "pci.bus_id");
        let gpu_node = bus_id.as_deref().and_then(|id| {
            // sysfs names the device with a 4-digit domain in lower case: 0000:18:00.0.
            let tail = id.rsplit_once(':').map(|(head, f)| {
                let (domain, bus) = head.split_once(':').unwrap_or(("0", head));
                let domain = u32::from_str_radix(domain, 16).unwrap_or(0);
                format!("{domain:04x}:{}:{}", bus.to_lowercase(), f.to_lowercase())
            })?;
            std::fs::read_to_string(format!("/sys/bus/pci/devices/{tail}/numa_node"))
                .ok()?
                .trim()
                .parse()
                .ok()
        });
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_owned())
        };
        LinkPlacement {
            bus_id,
            gpu_node,
            buffer_node: page_node(host.data_ptr() as usize),
            cpus: field("Cpus_allowed_list:"),
            mems: field("Mems_allowed_list:"),
        }
    }
}

impl std::fmt::Display for LinkPlacement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let node = |n: Option<i64>| n.map_or("?".to_string(), |n| n.to_string());
        write!(
            f,
            "GPU {} on NUMA node {}, the pinned buffer on node {}, CPUs {} and memory nodes {} allowed",
            self.bus_id.as_deref().unwrap_or("?"),
            node(self.gpu_node),
            node(self.buffer_node),
            self.cpus.as_deref().unwrap_or("?"),
            self.mems.as_deref().unwrap_or("?")
        )
    }
}

/// The NUMA node of the page at `addr` of this process (get_mempolicy with MPOL_F_NODE |
/// MPOL_F_ADDR), None where the call fails (no NUMA support, an unmapped address).
#[cfg(target_os = "linux")]
fn page_node(addr: usize) -> Option<i64> {
    const MPOL_F_NODE: libc::c_ulong = 1;
    const MPOL_F_ADDR: libc::c_ulong = 2;
    let mut node: libc::c_int = -1;
    // SAFETY: get_mempolicy writes one int through `mode` (our `node`) and, with a null
    // nodemask and maxnode 0, nothing else; `addr` is only looked up, never dereferenced here.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut node as *mut libc::c_int,
            std::ptr::null_mut::<libc::c_ulong>(),
            0 as libc::c_ulong,
            addr as *mut libc::c_void,
            MPOL_F_NODE | MPOL_F_ADDR,
        )
    };
    (rc == 0).then_some(i64::from(node))
}

/// Not Linux: unknown.
#[cfg(not(target_os = "linux"))]
fn page_node(_addr: usize) -> Option<i64> {
    None
}

#[cfg(test)]
mod tests {
    use super::LinkPlacement;

    /// On the CPU (no GPU to name) the placement still reads this process's allowed CPUs and
    /// memory nodes on Linux, finds the node of a touched buffer's page where the kernel answers
    /// get_mempolicy (a node of the allowed list), and prints `?` for what it cannot know.
    #[test]
    fn a_placement_reads_what_the_system_says() {
        let host = tch::Tensor::ones([1 << 16], (tch::Kind::Uint8, tch::Device::Cpu));
        let p = LinkPlacement::of(usize::MAX, &host);
        assert!(p.gpu_node.is_none(), "{p:?}");
        let text = p.to_string();
        assert!(text.contains("on NUMA node ?"), "{text}");
        if cfg!(target_os = "linux") {
            assert!(p.cpus.is_some() && p.mems.is_some(), "{p:?}");
            if let Some(node) = p.buffer_node {
                let mems = p.mems.as_deref().unwrap_or_default();
                let allowed = mems.split(',').any(|r| match r.split_once('-') {
                    Some((a, b)) => {
                        (a.parse().unwrap_or(i64::MAX)..=b.parse().unwrap_or(-1)).contains(&node)
                    }
                    None => r.parse() == Ok(node),
                });
                assert!(allowed, "node {node} not among {mems}");
            }
        }
    }
}
