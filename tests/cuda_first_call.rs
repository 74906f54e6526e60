//! Every public `accel` function that asks libtorch about CUDA state gives the same answer as
//! the first call of a fresh process as it does later.
//!
//! libtorch initializes its CUDA state lazily (at the first CUDA tensor). Before this crate
//! made libtorch initialize it itself, `is_pinned` of a freshly pinned buffer answered false
//! as the first CUDA call of a process (libtorch's `isPinnedPtr` answers false for a device it
//! has not initialized: 20 of 20 runs of `pinned_buffers_are_pinned_and_carry_data` alone on an
//! H100), and `reset_peak_memory_stats`/`memory_stats` could throw "Invalid device argument"
//! (the caching allocator had no state for the device yet). Tests in one binary share a
//! process, so whatever ran first hid that: here each probe runs first thing in a child
//! process of its own (this binary run again with `--exact first_call_probe`).
//!
//! On a machine without a device the same children check the answers without one (`NoDevice`,
//! `is_pinned` false), and the CUDA expectations print `SKIP: no CUDA device`.

use offload_testkit as common;

use layerwise_offload::Error;
use layerwise_offload::accel::{self, Event, HostMemory, Stream};
use std::process::Command;
use tch::{Device, Kind, Tensor};

/// The probes, each run first thing in a fresh process.
const PROBES: [&str; 11] = [
    "is_pinned",
    "memory_stats",
    "reset_peak_memory_stats",
    "memory_info",
    "empty_cache",
    "set_memory_fraction",
    "memory_info_then_set_memory_fraction",
    "stream_and_event",
    "synchronize_device",
    "copy_async_from_pinned",
    "alloc_device",
];

fn no_device<T: std::fmt::Debug>(r: layerwise_offload::Result<T>) {
    assert!(matches!(r, Err(Error::NoDevice { .. })), "{r:?}");
}

/// Probe `name` as the first CUDA call of this process, with a device (`d`) or without one.
fn probe(name: &str, d: Option<usize>) -> anyhow::Result<()> {
    let Some(d) = d else {
        match name {
            "is_pinned" => {
                let t = accel::alloc_host(4096, HostMemory::Pageable)?;
                assert!(!accel::is_pinned(&t)?);
                no_device(accel::alloc_host(4096, HostMemory::Pinned));
            }
            "memory_stats" => no_device(accel::memory_stats(0)),
            "reset_peak_memory_stats" => no_device(accel::reset_peak_memory_stats(0)),
            "memory_info" | "memory_info_then_set_memory_fraction" => {
                no_device(accel::memory_info(0))
            }
            "empty_cache" => no_device(accel::empty_cache()),
            "set_memory_fraction" => no_device(accel::set_memory_fraction(0.5)),
            "stream_and_event" => {
                no_device(Stream::from_pool(0));
                no_device(Event::new());
            }
            "synchronize_device" => no_device(accel::synchronize_device(0)),
            "copy_async_from_pinned" => no_device(Stream::current(0)),
            "alloc_device" => no_device(accel::alloc_device(1024, 0)),
            other => panic!("unknown probe {other}"),
        }
        return Ok(());
    };
    match name {
        "is_pinned" => {
            let pinned = accel::alloc_host((8 << 20) + 17, HostMemory::Pinned)?;
            let pageable = accel::alloc_host(8 << 20, HostMemory::Pageable)?;
            assert!(accel::is_pinned(&pinned)?, "a pinned buffer, first call");
            assert!(!accel::is_pinned(&pageable)?);
            assert!(accel::is_pinned(&pinned.narrow(0, 12345, 100))?);
        }
        "memory_stats" => {
            let s0 = accel::memory_stats(d)?;
            let t = accel::alloc_device(8 << 20, d)?;
            let s1 = accel::memory_stats(d)?;
            assert_eq!(s1.allocated, s0.allocated + (8 << 20));
            drop(t);
        }
        "reset_peak_memory_stats" => {
            accel::reset_peak_memory_stats(d)?;
            let t = accel::alloc_device(16 << 20, d)?;
            drop(t);
            let s = accel::memory_stats(d)?;
            assert!(s.peak_allocated >= s.allocated + (16 << 20));
            accel::reset_peak_memory_stats(d)?;
            let s = accel::memory_stats(d)?;
            assert_eq!(
                s.peak_allocated, s.allocated,
                "reset makes the peak the current value"
            );
        }
        "memory_info" => {
            let (free, total) = accel::memory_info(d)?;
            assert!(total > 0 && free <= total);
        }
        "empty_cache" => {
            accel::empty_cache()?;
            let t = accel::alloc_device(32 << 20, d)?;
            drop(t);
            accel::empty_cache()?;
        }
        "set_memory_fraction" => {
            accel::set_memory_fraction(0.5)?;
            // The allocator started with the cap: a second call is refused, typed.
            assert!(matches!(
                accel::set_memory_fraction(0.25),
                Err(Error::AllocatorStarted { .. })
            ));
        }
        "memory_info_then_set_memory_fraction" => {
            let (_, total) = accel::memory_info(d)?;
            accel::set_memory_fraction(0.5)?;
            match accel::alloc_device((total * 3 / 4) as usize, d) {
                Err(Error::OutOfMemory { .. }) => {}
                other => panic!("expected OutOfMemory under a 0.5 cap, got {other:?}"),
            }
        }
        "stream_and_event" => {
            let s = Stream::from_pool(d)?;
            let mut e = Event::new()?;
            e.record(&s)?;
            e.synchronize()?;
            assert!(e.query()?);
            assert!(s.query()?);
        }
        "synchronize_device" => accel::synchronize_device(d)?,
        "copy_async_from_pinned" => {
            let bytes = (4 << 20) + 3;
            let mut pinned = accel::alloc_host(bytes, HostMemory::Pinned)?;
            pinned.copy_(&Tensor::randint(
                256,
                [bytes as i64],
                (Kind::Uint8, Device::Cpu),
            ));
            let mut dev = accel::alloc_device(bytes, d)?;
            let s = Stream::from_pool(d)?;
            // SAFETY: both tensors live until the synchronize below.
            unsafe { accel::copy_async(&mut dev, &pinned, Some(&s))? };
            s.synchronize()?;
            assert!(dev.to_device(Device::Cpu).equal(&pinned));
        }
        "alloc_device" => {
            let t = accel::alloc_device(1 << 20, d)?;
            assert_eq!(t.device(), Device::Cuda(d));
        }
        other => panic!("unknown probe {other}"),
    }
    Ok(())
}

/// Run as a child process by `each_cuda_call_answers_the_same_first_in_a_fresh_process`, with
/// `LO_FIRST_CALL_PROBE` naming the probe.
#[test]
#[ignore = "run as a child process by each_cuda_call_answers_the_same_first_in_a_fresh_process"]
fn first_call_probe() {
    let name = std::env::var("LO_FIRST_CALL_PROBE").expect("LO_FIRST_CALL_PROBE");
    // The device question comes first here as in every CUDA test (it does not initialize
    // libtorch's CUDA state; see accel::init_cuda_state).
    let d = accel::cuda_is_available().then_some(0);
    probe(&name, d).unwrap_or_else(|e| panic!("probe {name}: {e} ({e:?})"));
    println!(
        "PROBE-OK {name} {}",
        if d.is_some() { "cuda" } else { "cpu" }
    );
}

#[test]
fn each_cuda_call_answers_the_same_first_in_a_fresh_process() -> anyhow::Result<()> {
    let cuda = common::cuda().is_some();
    let mut failed = Vec::new();
    for name in PROBES {
        let out = Command::new(std::env::current_exe()?)
            .args([
                "--ignored",
                "--exact",
                "first_call_probe",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("LO_FIRST_CALL_PROBE", name)
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let want = format!("PROBE-OK {name} {}", if cuda { "cuda" } else { "cpu" });
        if !out.status.success() || !stdout.lines().any(|l| l.trim_end().ends_with(&want)) {
            failed.push(format!(
                "{name}: {}\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} probes failed as the first call of a process:\n{}",
        failed.len(),
        PROBES.len(),
        failed.join("\n")
    );
    Ok(())
}
