//! The shim's wrappers where no device is involved or where the device asked for does not
//! exist: typed, readable errors, never a panic. These run everywhere (the device index used is
//! past the last device, so they hold on a GPU machine too).

use layerwise_offload::Error;
use layerwise_offload::accel::{self, Event, HostMemory, Stream};
use tch::{Device, Kind, Tensor};

fn missing_device() -> usize {
    accel::cuda_device_count() + 3
}

fn assert_no_device<T: std::fmt::Debug>(r: layerwise_offload::Result<T>, op: &str) {
    match r {
        Err(e @ Error::NoDevice { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(op), "message should name {op}: {msg}");
            assert!(
                msg.contains("needs a CUDA device"),
                "unreadable message: {msg}"
            );
        }
        other => panic!("{op}: expected Error::NoDevice, got {other:?}"),
    }
}

#[test]
fn device_query_is_consistent() {
    let n = accel::cuda_device_count();
    assert_eq!(accel::cuda_is_available(), n > 0);
    if n > 0 {
        assert!(accel::cuda_compiled());
    }
    // Asking twice gives the same answer and no panic.
    assert_eq!(accel::cuda_device_count(), n);
}

#[test]
fn the_cuda_backend_says_where_it_came_from() {
    let backend = accel::cuda_backend();
    match backend {
        accel::CudaBackend::Linked(path) | accel::CudaBackend::Loaded(path) => {
            assert!(path.ends_with("/libtorch_cuda.so"), "{path}");
            assert!(accel::cuda_compiled());
        }
        accel::CudaBackend::Unavailable(why) => {
            assert!(!why.is_empty());
            assert!(!accel::cuda_compiled());
            assert!(!accel::cuda_is_available());
        }
    }
    // This package's binaries do not link libtorch_cuda either: where libtorch has one, the
    // crate loaded it at start-up.
    if let Ok(dir) = std::env::var("LIBTORCH")
        && std::path::Path::new(&dir)
            .join("lib/libtorch_cuda.so")
            .exists()
    {
        assert!(
            matches!(backend, accel::CudaBackend::Loaded(_)),
            "{backend:?}"
        );
    }
    // Without a device, the reason says why; with one, there is none.
    assert_eq!(
        accel::cuda_unavailable_reason().is_some(),
        !accel::cuda_is_available()
    );
}

#[test]
fn missing_device_gives_typed_errors() {
    let d = missing_device();
    assert_no_device(Stream::from_pool(d), "Stream::from_pool");
    assert_no_device(Stream::from_pool_high_priority(d), "Stream::from_pool");
    assert_no_device(Stream::current(d), "Stream::current");
    assert_no_device(accel::memory_stats(d), "memory_stats");
    assert_no_device(accel::reset_peak_memory_stats(d), "reset_peak_memory_stats");
    assert_no_device(accel::memory_info(d), "memory_info");
    assert_no_device(accel::synchronize_device(d), "synchronize_device");
    assert_no_device(accel::alloc_device(1024, d), "alloc_device");
    match Stream::from_pool(d) {
        Err(Error::NoDevice { reason, .. }) if accel::cuda_is_available() => {
            assert!(reason.contains("out of range"), "{reason}")
        }
        _ => {}
    }
}

#[test]
fn without_any_device_everything_device_bound_is_a_typed_error() {
    if accel::cuda_is_available() {
        eprintln!(
            "(a CUDA device is present: the device-less errors are covered by missing_device_gives_typed_errors)"
        );
        return;
    }
    assert_no_device(Event::new(), "Event::new");
    assert_no_device(Event::with_timing(), "Event::new");
    assert_no_device(
        accel::alloc_host(4096, HostMemory::Pinned),
        "alloc_host(Pinned)",
    );
    assert_no_device(accel::empty_cache(), "empty_cache");
    assert_no_device(accel::set_memory_fraction(0.5), "set_memory_fraction");
}

#[test]
fn invalid_arguments_are_typed() {
    for f in [0.0, -0.5, 1.5, f64::NAN] {
        match accel::set_memory_fraction(f) {
            Err(Error::InvalidArgument { message, .. }) => {
                assert!(message.contains("(0, 1]"), "{message}")
            }
            other => panic!("fraction {f}: expected InvalidArgument, got {other:?}"),
        }
    }
    match accel::alloc_host(0, HostMemory::Pageable) {
        Err(Error::InvalidArgument { .. }) => {}
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn pageable_host_memory_works_without_a_device() -> anyhow::Result<()> {
    let bytes = (96 << 20) + 123; // large enough to be faulted in by several threads, odd size
    let t = accel::alloc_host(bytes, HostMemory::Pageable)?;
    assert_eq!(t.size(), vec![bytes as i64]);
    assert_eq!(t.kind(), Kind::Uint8);
    assert_eq!(t.device(), Device::Cpu);
    assert!(!accel::is_pinned(&t)?);
    // Fresh anonymous memory reads as zeros, then holds what is written.
    assert_eq!(t.sum(Kind::Int64).int64_value(&[]), 0);
    let mut view = t.narrow(0, 1000, 4096);
    let _ = view.fill_(7);
    assert_eq!(t.sum(Kind::Int64).int64_value(&[]), 7 * 4096);
    // A typed view over the bytes, as the manager makes them.
    let floats = t.narrow(0, 0, 16).view_dtype(Kind::Float);
    assert_eq!(floats.size(), vec![4]);
    drop(t);
    // The view keeps the memory alive after the owning tensor is gone.
    assert_eq!(view.sum(Kind::Int64).int64_value(&[]), 7 * 4096);
    Ok(())
}

#[test]
fn copy_async_between_cpu_tensors_is_a_plain_copy() -> anyhow::Result<()> {
    let src = Tensor::arange(10, (Kind::Float, Device::Cpu));
    let mut dst = Tensor::zeros([10], (Kind::Float, Device::Cpu));
    // SAFETY: CPU to CPU copies are synchronous; both tensors are live.
    unsafe { accel::copy_async(&mut dst, &src, None)? };
    assert!(dst.equal(&src));
    Ok(())
}

#[test]
fn oom_messages_become_out_of_memory() {
    // The classification the manager relies on, checked on libtorch's own wording.
    let e = layerwise_offload::Error::from((
        "alloc",
        tch::TchError::Torch("CUDA out of memory. Tried to allocate 2.00 GiB".into()),
    ));
    assert!(e.is_out_of_memory(), "{e:?}");
    assert!(e.to_string().contains("lower the VRAM budget"), "{e}");
    let e =
        layerwise_offload::Error::from(("alloc", tch::TchError::Torch("shape mismatch".into())));
    assert!(!e.is_out_of_memory());
}
