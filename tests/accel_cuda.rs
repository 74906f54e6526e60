//! The shim on a CUDA device: cross-stream order through events, the stream guard, pinned
//! memory, event timing and allocator statistics. Without a device each test prints
//! `SKIP: no CUDA device` and passes, unless OFFLOAD_REQUIRE_CUDA=1.

use offload_testkit as common;

use layerwise_offload::Error;
use layerwise_offload::accel::{self, Event, HostMemory, Stream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use tch::{Device, Kind, Tensor};

/// Keeps `stream` busy for a while (tens of milliseconds of matrix products).
fn busy(stream: &Stream, d: usize) -> Tensor {
    accel::with_stream(stream, || {
        let a = Tensor::randn([2048, 2048], (Kind::Float, Device::Cuda(d)));
        let mut x = a.shallow_clone();
        for _ in 0..40 {
            x = x.matmul(&a) / 64.0;
        }
        x
    })
    .unwrap()
}

#[test]
fn side_stream_copy_is_seen_through_an_event_wait() -> anyhow::Result<()> {
    let Some(d) = common::cuda() else {
        return Ok(());
    };
    let _lock = common::gpu_lock();
    let n = 32 << 20; // 32 Mi floats, 128 MiB
    let host = accel::alloc_host(n * 4, HostMemory::Pinned)?;
    let mut src = host.view_dtype(Kind::Float);
    src.copy_(&Tensor::arange(n as i64, (Kind::Float, Device::Cpu)));
    let copy_stream = Stream::from_pool(d)?;
    let compute = Stream::current(d)?;
    assert_ne!(copy_stream, compute);

    // 1. Without a wait, the compute stream can read the slot before the copy lands.
    let mut dst = Tensor::full([n as i64], -1.0, (Kind::Float, Device::Cuda(d)));
    accel::synchronize_device(d)?;
    let _work = busy(&copy_stream, d);
    // SAFETY: host and dst stay alive until the device is synchronized below; nothing else
    // writes them meanwhile.
    unsafe { accel::copy_async(&mut dst, &src, Some(&copy_stream))? };
    let mut copied = Event::new()?;
    copied.record(&copy_stream)?;
    let early = dst.sum(Kind::Double); // queued on the compute stream, no wait
    compute.synchronize()?;
    let copy_done_before_read = copied.query()?;
    let early = early.double_value(&[]);
    if !copy_done_before_read {
        assert_eq!(
            early,
            -(n as f64),
            "the compute stream read the slot before the copy and must see the old values"
        );
    } else {
        eprintln!("note: the copy finished before the unsynchronized read; nothing to check there");
    }
    accel::synchronize_device(d)?;

    // 2. With a wait on the event, the compute stream sees the copied values, in order.
    let _ = dst.fill_(-1.0);
    accel::synchronize_device(d)?;
    let _work = busy(&copy_stream, d);
    // SAFETY: as above.
    unsafe { accel::copy_async(&mut dst, &src, Some(&copy_stream))? };
    copied.record(&copy_stream)?;
    copied.wait(&compute)?;
    let seen = dst.sum(Kind::Double);
    accel::synchronize_device(d)?;
    let expected = (n as f64) * (n as f64 - 1.0) / 2.0;
    assert_eq!(seen.double_value(&[]), expected);
    assert!(copied.query()?);
    Ok(())
}

#[test]
fn guard_restores_the_previous_stream_also_on_panic() -> anyhow::Result<()> {
    let Some(d) = common::cuda() else {
        return Ok(());
    };
    let before = Stream::current(d)?;
    let side = Stream::from_pool(d)?;
    let other = Stream::from_pool_high_priority(d)?;
    assert_ne!(side, before);
    {
        let g1 = side.make_current()?;
        assert_eq!(Stream::current(d)?, side);
        assert_eq!(g1.previous(), before);
        {
            let _g2 = accel::StreamGuard::new(&other)?;
            assert_eq!(Stream::current(d)?, other);
        }
        assert_eq!(Stream::current(d)?, side);
    }
    assert_eq!(Stream::current(d)?, before);

    let r = catch_unwind(AssertUnwindSafe(|| {
        accel::with_stream(&side, || {
            assert_eq!(Stream::current(d).unwrap(), side);
            panic!("a panic inside the closure");
        })
    }));
    assert!(r.is_err(), "the panic must propagate");
    assert_eq!(
        Stream::current(d)?,
        before,
        "the guard must restore the stream during unwinding"
    );
    // The current stream is per thread: another thread still sees its own default.
    let g = side.make_current()?;
    let theirs = std::thread::spawn(move || Stream::current(d).unwrap())
        .join()
        .unwrap();
    assert_eq!(
        theirs.id(),
        0,
        "another thread's current stream is its default stream"
    );
    drop(g);
    Ok(())
}

#[test]
fn pinned_buffers_are_pinned_and_carry_data() -> anyhow::Result<()> {
    let Some(d) = common::cuda() else {
        return Ok(());
    };
    let bytes = (200 << 20) + 4096 + 17;
    let mut pinned = accel::alloc_host(bytes, HostMemory::Pinned)?;
    let pageable = accel::alloc_host(bytes, HostMemory::Pageable)?;
    assert!(accel::is_pinned(&pinned)?);
    assert!(!accel::is_pinned(&pageable)?);
    assert!(
        accel::is_pinned(&pinned.narrow(0, 12345, 100))?,
        "views of pinned memory are pinned"
    );
    pinned.copy_(&Tensor::randint(
        256,
        [bytes as i64],
        (Kind::Uint8, Device::Cpu),
    ));
    let mut dev = accel::alloc_device(bytes, d)?;
    let s = Stream::from_pool(d)?;
    // SAFETY: both tensors live until the synchronize below.
    unsafe { accel::copy_async(&mut dev, &pinned, Some(&s))? };
    // SAFETY: as above; the stream orders the two copies.
    unsafe { accel::copy_async(&mut pageable.shallow_clone(), &dev, Some(&s))? };
    s.synchronize()?;
    assert!(pageable.equal(&pinned));
    Ok(())
}

#[test]
fn events_time_known_work() -> anyhow::Result<()> {
    let Some(d) = common::cuda() else {
        return Ok(());
    };
    let _lock = common::gpu_lock();
    let s = Stream::from_pool(d)?;
    let a = Tensor::randn([2048, 2048], (Kind::Float, Device::Cuda(d)));
    let time = |reps: usize| -> anyhow::Result<f64> {
        let mut start = Event::with_timing()?;
        let mut end = Event::with_timing()?;
        accel::with_stream(&s, || -> anyhow::Result<()> {
            start.record(&s)?;
            let mut x = a.shallow_clone();
            for _ in 0..reps {
                x = x.matmul(&a) / 64.0;
            }
            end.record(&s)?;
            Ok(())
        })??;
        end.synchronize()?;
        Ok(start.elapsed_ms(&end)?)
    };
    time(5)?; // warm-up
    let t1 = time(5)?;
    let t10 = time(50)?;
    assert!(t1 > 0.0, "elapsed {t1}");
    assert!(
        t10 > 4.0 * t1 && t10 < 20.0 * t1,
        "ten times the work took {t10} ms against {t1} ms"
    );
    // Events without timing refuse to time.
    let (p, q) = (Event::new()?, Event::new()?);
    assert!(matches!(
        p.elapsed_ms(&q),
        Err(Error::InvalidArgument { .. })
    ));
    Ok(())
}

#[test]
fn statistics_move_as_expected() -> anyhow::Result<()> {
    let Some(d) = common::cuda() else {
        return Ok(());
    };
    let _lock = common::gpu_lock();
    accel::synchronize_device(d)?;
    accel::reset_peak_memory_stats(d)?;
    let s0 = accel::memory_stats(d)?;
    assert_eq!(
        s0.peak_allocated, s0.allocated,
        "reset makes the peak the current value"
    );
    let bytes = 256usize << 20;
    let t = accel::alloc_device(bytes, d)?;
    let s1 = accel::memory_stats(d)?;
    assert_eq!(s1.allocated, s0.allocated + bytes as u64);
    assert!(s1.reserved >= s1.allocated);
    assert!(s1.peak_allocated >= s1.allocated);
    drop(t);
    let s2 = accel::memory_stats(d)?;
    assert_eq!(s2.allocated, s0.allocated);
    assert_eq!(
        s2.peak_allocated, s1.peak_allocated,
        "the peak remembers the allocation"
    );
    accel::empty_cache()?;
    let s3 = accel::memory_stats(d)?;
    assert!(s3.reserved <= s2.reserved - bytes as u64 || s2.reserved < bytes as u64 + s0.reserved);
    let (free, total) = accel::memory_info(d)?;
    assert!(total > 0 && free <= total);
    Ok(())
}

#[test]
fn peer_copies_move_the_bytes_and_check_their_arguments() -> anyhow::Result<()> {
    let Some(d) = common::cuda() else {
        return Ok(());
    };
    let _lock = common::gpu_lock();
    let other = if accel::cuda_device_count() > 1 { 1 } else { d };
    let n = 8 << 20;
    let src = Tensor::randint(256, [n], (Kind::Uint8, Device::Cuda(d)));
    for (to, on) in [(d, d), (other, d), (other, other)] {
        let dst = Tensor::zeros([n], (Kind::Uint8, Device::Cuda(to)));
        let stream = Stream::from_pool(on)?;
        // The copy must wait for `src`, written on the current stream.
        Stream::current(d)?.synchronize()?;
        // SAFETY: both tensors live until the stream is synchronized below.
        let direct = unsafe { accel::copy_peer_async(&dst, &src, &stream)? };
        stream.synchronize()?;
        assert!(direct || to != d, "one device is always direct");
        assert!(
            dst.to_device(Device::Cpu)
                .equal(&src.to_device(Device::Cpu)),
            "{d} -> {to} on a stream of {on}"
        );
    }
    // A part of a buffer into a part of another: offsets are honoured.
    let dst = Tensor::zeros([n], (Kind::Uint8, Device::Cuda(other)));
    let stream = Stream::from_pool(d)?;
    // SAFETY: as above.
    unsafe {
        accel::copy_peer_async(
            &dst.narrow(0, 4096, 1024),
            &src.narrow(0, 512, 1024),
            &stream,
        )?
    };
    stream.synchronize()?;
    let got = dst.to_device(Device::Cpu);
    assert!(
        got.narrow(0, 4096, 1024)
            .equal(&src.narrow(0, 512, 1024).to_device(Device::Cpu))
    );
    assert_eq!(
        got.narrow(0, 0, 4096).count_nonzero(None).int64_value(&[]),
        0
    );
    // Refused: different sizes, a host tensor, a non-contiguous view.
    let small = Tensor::zeros([16], (Kind::Uint8, Device::Cuda(d)));
    let host = Tensor::zeros([n], (Kind::Uint8, Device::Cpu));
    let strided = Tensor::zeros([n, 2], (Kind::Uint8, Device::Cuda(d))).select(1, 0);
    for (dst, src) in [(&small, &src), (&host, &src), (&strided, &src)] {
        // SAFETY: refused before anything is queued.
        let r = unsafe { accel::copy_peer_async(dst, src, &stream) };
        assert!(matches!(r, Err(Error::Torch { .. })), "{r:?}");
    }
    Ok(())
}
