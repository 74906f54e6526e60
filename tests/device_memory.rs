//! Device memory under the manager, each test alone on the GPU (its own test binary, and one
//! test at a time): running out while allocating the slot ring, VRAM that stays flat over many
//! forwards, and uploads that hide behind compute.

use offload_testkit as common;

use common::model::{Model, assert_same};
use layerwise_offload::{Error, OffloadConfig, accel};
use tch::{Device, Kind, Tensor};

#[test]
fn out_of_memory_while_allocating_slots_changes_nothing() -> anyhow::Result<()> {
    let Some(d) = common::cuda() else {
        return Ok(());
    };
    let _lock = common::gpu_lock();
    // Three blocks of 256 MiB on the CPU, and a device with only 384 MiB left: the ring of two
    // slots (512 MiB) cannot be allocated.
    let numel = 64i64 << 20;
    let named: Vec<(String, Tensor)> = (0..3)
        .map(|i| {
            (
                format!("blocks.{i}.w"),
                Tensor::full([numel], i as f64 + 0.5, (Kind::Float, Device::Cpu)),
            )
        })
        .chain(std::iter::once((
            "head.w".to_owned(),
            Tensor::ones([4], (Kind::Float, Device::Cpu)),
        )))
        .collect();
    let before: Vec<(String, Tensor)> = named.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
    accel::empty_cache()?;
    let (free, _) = accel::memory_info(d)?;
    let ballast = accel::alloc_device(free as usize - (384 << 20), d)?;
    let mut m = OffloadConfig::new("blocks", 3).device(d).build(&named)?;
    let r = m.initialize();
    drop(ballast);
    // Give the cached ballast back to the driver: cuBLAS and others allocate outside libtorch's
    // allocator.
    accel::empty_cache()?;
    match r {
        Err(e @ Error::OutOfMemory { .. }) => {
            assert!(e.to_string().contains("prefetch_depth"), "{e}")
        }
        r => panic!("expected OutOfMemory, got {r:?}"),
    }
    assert!(!m.is_initialized());
    assert_same(&named, &before);
    assert!(
        named.iter().all(|(_, t)| t.device() == Device::Cpu),
        "nothing moved"
    );
    // With the memory back, the same manager initializes, and restore returns everything.
    m.initialize()?;
    m.restore()?;
    assert_same(&named, &before);
    Ok(())
}

#[test]
fn vram_stays_flat_and_within_the_formula() -> anyhow::Result<()> {
    let Some(d) = common::cuda() else {
        return Ok(());
    };
    let _lock = common::gpu_lock();
    let model = Model::new(Device::Cpu, 6, false, 16);
    let x = model.input(2);
    let depth = 2;
    let mut m = OffloadConfig::new("blocks", 6)
        .prefetch_depth(depth)
        .device(d)
        .build(&model.vs)?;
    // cuBLAS keeps a workspace per thread and stream, allocated through libtorch's allocator at
    // the first matrix product: create it before taking the baseline.
    let w = Tensor::randn([64, 64], (Kind::Float, Device::Cuda(d)));
    let _ = w.matmul(&w);
    accel::synchronize_device(d)?;
    let base = accel::memory_stats(d)?.allocated;
    m.initialize()?;
    // What the manager holds, before any compute (cuBLAS workspaces come with the first
    // product of a thread, or are inherited with a recycled handle).
    accel::synchronize_device(d)?;
    let after_init = accel::memory_stats(d)?.allocated;
    let _ = model.forward(&x, Some(&mut m));
    accel::synchronize_device(d)?;
    let after_first = accel::memory_stats(d)?;
    accel::reset_peak_memory_stats(d)?;
    for _ in 0..100 {
        let _ = model.forward(&x, Some(&mut m));
    }
    accel::synchronize_device(d)?;
    let after = accel::memory_stats(d)?;
    assert_eq!(
        after.allocated, after_first.allocated,
        "allocated bytes grew over 100 forwards"
    );
    let plan = m.plan().unwrap();
    let non_block: u64 = ["embed.weight", "embed.bias", "head.weight", "head.bias"]
        .iter()
        .map(|n| m.tensor(n).unwrap().numel() as u64 * 4)
        .sum();
    let slots = ((depth + 1) * plan.max_block_bytes()) as u64;
    eprintln!(
        "base {base}, after first forward {}, after 100 {}, slots {slots}, non-block {non_block}",
        after_first.allocated, after.allocated
    );
    let held = after_init.saturating_sub(base);
    // Between forwards the manager holds the non-block weights and the slots (each rounded up
    // by the allocator to 512 bytes).
    assert!(
        held <= non_block + slots + 8 * 512,
        "held {held} > {non_block} + {slots}"
    );
    assert!(held >= slots, "held {held} < slots {slots}");
    // The peak adds activations only (small here): well under one more block.
    assert!(
        after.peak_allocated - base <= non_block + slots + (64 << 20),
        "peak {}",
        after.peak_allocated - base
    );
    m.restore()?;
    Ok(())
}

#[test]
fn uploads_hide_behind_compute() -> anyhow::Result<()> {
    let Some(d) = common::cuda() else {
        return Ok(());
    };
    let _lock = common::gpu_lock();
    // Compute-bound: long sequences through small blocks, so every upload is far shorter than
    // the block before it.
    let model = Model::new(Device::Cpu, 6, false, 17);
    let x = Tensor::randn([4, 4096, 16], (Kind::Float, Device::Cpu));
    let mut m = OffloadConfig::new("blocks", 6).device(d).build(&model.vs)?;
    m.initialize()?;
    let _ = model.forward(&x, Some(&mut m)); // warm-up
    accel::synchronize_device(d)?;
    let s0 = m.stats().clone();
    let stream = accel::Stream::current(d)?;
    let (mut e0, mut e1) = (accel::Event::with_timing()?, accel::Event::with_timing()?);
    e0.record(&stream)?;
    for _ in 0..5 {
        let _ = model.forward(&x, Some(&mut m));
    }
    e1.record(&stream)?;
    accel::synchronize_device(d)?;
    let total = e0.elapsed_ms(&e1)?;
    let s1 = m.stats().clone();
    assert_eq!(
        s1.uploads - s0.uploads,
        30,
        "every block streams once per forward"
    );
    assert_eq!(s1.timed_uploads, s1.uploads, "every upload is timed");
    let stall = s1.stall_ms - s0.stall_ms;
    assert!(
        stall < 0.05 * total,
        "the compute stream waited {stall:.2} ms of {total:.2} ms"
    );
    m.restore()?;
    Ok(())
}

#[test]
fn the_timeline_shows_uploads_overlapping_compute() -> anyhow::Result<()> {
    use layerwise_offload::Lane;
    let Some(d) = common::cuda() else {
        return Ok(());
    };
    let _lock = common::gpu_lock();
    let model = Model::new(Device::Cpu, 4, false, 18);
    let x = Tensor::randn([4, 2048, 16], (Kind::Float, Device::Cpu));
    let mut m = OffloadConfig::new("blocks", 4).device(d).build(&model.vs)?;
    m.initialize()?;
    let _ = model.forward(&x, Some(&mut m));
    m.start_timeline()?;
    let _ = model.forward(&x, Some(&mut m));
    let spans = m.finish_timeline()?;
    let of = |lane: Lane, block: usize| {
        spans
            .iter()
            .find(|s| s.lane == lane && s.block == block)
            .cloned()
    };
    for i in 0..4 {
        let c = of(Lane::Compute, i)
            .unwrap_or_else(|| panic!("no compute span for block {i}: {spans:?}"));
        assert!(c.end_ms > c.start_ms);
        // Block i + 1 (block 0 after the last) uploads while block i computes.
        let u = of(Lane::Upload, (i + 1) % 4)
            .unwrap_or_else(|| panic!("no upload span for block {}: {spans:?}", (i + 1) % 4));
        assert!(
            u.start_ms < c.end_ms,
            "upload of block {} starts after block {i} finished: {u:?} {c:?}",
            (i + 1) % 4
        );
    }
    let json = layerwise_offload::chrome_trace_json(&spans);
    assert!(json.contains("\"upload 2\""));
    m.restore()?;
    Ok(())
}

#[test]
fn a_block_used_after_prefetch_layer_is_not_overwritten_under_it() -> anyhow::Result<()> {
    // FastVideo's pattern without enter: prefetch_layer(i, false), run block i directly, then
    // release_layer(i). Reusing the slot must wait for that compute (the slot's free event is
    // recorded when the block is evicted without a release).
    let Some(d) = common::cuda() else {
        return Ok(());
    };
    let _lock = common::gpu_lock();
    let model = Model::new(Device::Cuda(d), 4, false, 19);
    let x = Tensor::randn([4, 4096, 16], (Kind::Float, Device::Cpu));
    let want = model.forward(&x, None); // resident, on the same device
    let mut m = OffloadConfig::new("blocks", 4).device(d).build(&model.vs)?;
    m.initialize()?;
    let got = tch::no_grad(|| -> anyhow::Result<Tensor> {
        let dev = Device::Cuda(d);
        let vars = model.vs.variables();
        let mut h = x
            .to_device(dev)
            .linear(&vars["embed.weight"], Some(&vars["embed.bias"]));
        for (i, b) in model.blocks().enumerate() {
            m.prefetch_layer(i, false)?;
            h = b.forward(&h);
            m.release_layer(i)?; // the next prefetch may take this slot at once
        }
        Ok(h.linear(&vars["head.weight"], Some(&vars["head.bias"]))
            .to_device(Device::Cpu))
    })?;
    assert!(common::model::bits_equal(&got, &want));
    m.restore()?;
    Ok(())
}
