//! Where a test runs: CUDA device 0 when one is usable (else a loud skip, or a failure with
//! `OFFLOAD_REQUIRE_CUDA=1`), several devices, or the manager's CPU test mode.

use std::sync::{Mutex, MutexGuard};

/// CUDA device 0 if one is usable. Without one: prints `SKIP: no CUDA device` to stderr and
/// returns `None` (the test then passes), unless `OFFLOAD_REQUIRE_CUDA=1`, where it panics.
pub fn cuda() -> Option<usize> {
    if layerwise_offload::accel::cuda_is_available() {
        return Some(0);
    }
    if std::env::var("OFFLOAD_REQUIRE_CUDA").as_deref() == Ok("1") {
        panic!("OFFLOAD_REQUIRE_CUDA=1 but no CUDA device is usable in this process");
    }
    eprintln!("SKIP: no CUDA device");
    None
}

/// `n` CUDA device indices for tests that spread managers over devices: distinct where the
/// host has enough, round robin otherwise (with a note), unless `OFFLOAD_REQUIRE_GPUS=2` and
/// fewer than two are visible, where it panics. `None` (after SKIP) without a device.
pub fn cuda_devices(n: usize) -> Option<Vec<usize>> {
    cuda()?;
    let count = layerwise_offload::accel::cuda_device_count();
    if count < 2 {
        if std::env::var("OFFLOAD_REQUIRE_GPUS").as_deref() == Ok("2") {
            panic!("OFFLOAD_REQUIRE_GPUS=2 but {count} CUDA device(s) are visible");
        }
        eprintln!("note: one CUDA device; every manager runs on device 0");
    }
    Some((0..n).map(|g| g % count).collect())
}

/// Serialises the tests of one binary that read device-wide state (allocator statistics,
/// timings): cargo runs a binary's tests on several threads at once.
pub fn gpu_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a test body runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The manager's CPU test mode.
    Cpu,
    /// CUDA device 0.
    Cuda,
}

impl Mode {
    /// The device for this mode, or None (after printing SKIP) when CUDA is asked for and absent.
    pub fn device(self) -> Option<tch::Device> {
        match self {
            Mode::Cpu => Some(tch::Device::Cpu),
            Mode::Cuda => cuda().map(tch::Device::Cuda),
        }
    }

    /// An offload configuration for this mode.
    pub fn config(self, attr: &str, n: usize) -> layerwise_offload::OffloadConfig {
        layerwise_offload::OffloadConfig::new(attr, n).cpu_test_mode(self == Mode::Cpu)
    }
}
