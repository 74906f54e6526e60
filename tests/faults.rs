//! Injected faults in the CPU test mode (and on CUDA where one is present): running out of
//! device memory while building the slot ring, an upload failing in the middle of a loop, a
//! refused pinned allocation, a panic inside a block. After each: a typed error, nothing lost,
//! and the next forward works.

mod common;

use common::Mode;
use common::model::{Model, assert_same, bits_equal};
use layerwise_offload::{Error, Fault};
use rstest::rstest;
use tch::Device;

#[rstest]
fn out_of_memory_building_the_ring(
    #[values(Mode::Cpu, Mode::Cuda)] mode: Mode,
) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let model = Model::new(dev, 4, false, 31);
    let before = model.snapshot();
    let mut m = mode
        .config("blocks", 4)
        .inject_fault(Fault::SlotAlloc(1))
        .build(&model.vs)?;
    match m.initialize() {
        Err(e @ Error::OutOfMemory { .. }) => assert!(
            e.to_string()
                .contains("lower the VRAM budget or prefetch depth"),
            "{e}"
        ),
        r => panic!("expected OutOfMemory, got {r:?}"),
    }
    // State unchanged: every tensor where and what it was.
    assert!(!m.is_initialized());
    assert_same(&model.snapshot(), &before);
    assert_eq!(model.vs.variables()["blocks.2.fc1.weight"].device(), dev);
    // The fault is spent: initializing again works and the loop is exact.
    m.initialize()?;
    let x = model.input(1);
    let got = model.forward(&x, Some(&mut m));
    m.restore()?;
    assert_same(&model.snapshot(), &before);
    assert!(bits_equal(&model.forward(&x, None), &got));
    Ok(())
}

#[rstest]
fn an_upload_failing_mid_loop(#[values(Mode::Cpu, Mode::Cuda)] mode: Mode) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let model = Model::new(dev, 5, false, 32);
    let x = model.input(2);
    let want = model.forward(&x, None);
    let before = model.snapshot();
    // Upload 0 is block 0 in initialize; upload 3 happens inside the first forward.
    let mut m = mode
        .config("blocks", 5)
        .inject_fault(Fault::Upload(3))
        .build(&model.vs)?;
    m.initialize()?;
    let mut failed_at = None;
    for i in 0..5 {
        match m.enter(i) {
            Ok(g) => drop(g),
            Err(e) => {
                assert!(e.to_string().contains("injected fault"), "{e}");
                failed_at = Some(i);
                break;
            }
        }
    }
    assert!(
        failed_at.is_some(),
        "the injected upload failure must surface from enter"
    );
    // No block is left entered; the ring is consistent; the next forward is exact.
    assert!((0..5).all(|i| !m.is_entered(i)));
    assert!(bits_equal(&model.forward(&x, Some(&mut m)), &want));
    m.restore()?;
    assert_same(&model.snapshot(), &before);
    Ok(())
}

#[rstest]
fn a_refused_pinned_allocation(#[values(Mode::Cpu, Mode::Cuda)] mode: Mode) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let model = Model::new(dev, 4, true, 33);
    let before = model.snapshot();
    let mut m = mode
        .config("double_blocks", 4)
        .with_list("single_blocks", 5)
        .inject_fault(Fault::HostAlloc(6))
        .build(&model.vs)?;
    match m.initialize() {
        Err(e @ Error::HostAlloc { .. }) => assert!(e.to_string().contains("host memory"), "{e}"),
        r => panic!("expected HostAlloc, got {r:?}"),
    }
    // Blocks already offloaded point at their host copies: values intact, usable on the CPU.
    assert_same(&model.snapshot(), &before);
    assert_eq!(
        model.vs.variables()["double_blocks.0.fc1.weight"].device(),
        Device::Cpu
    );
    assert_eq!(
        model.vs.variables()["single_blocks.3.fc1.weight"].device(),
        dev,
        "not reached yet: untouched"
    );
    // restore() brings every weight back to the compute device.
    m.restore()?;
    assert_same(&model.snapshot(), &before);
    assert!(model.vs.variables().values().all(|t| t.device() == dev));
    Ok(())
}

#[rstest]
fn a_panic_inside_a_block(#[values(Mode::Cpu, Mode::Cuda)] mode: Mode) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let model = Model::new(dev, 4, false, 34);
    let x = model.input(3);
    let want = model.forward(&x, None);
    let mut m = mode
        .config("blocks", 4)
        .prefetch_depth(2)
        .build(&model.vs)?;
    m.initialize()?;
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for i in 0..4 {
            let _g = m.enter(i).unwrap();
            if i == 2 {
                panic!("CUDA out of memory inside block 2 (simulated)");
            }
        }
    }));
    assert!(r.is_err());
    assert!(
        !m.is_entered(2),
        "the guard released block 2 while unwinding"
    );
    assert!(
        bits_equal(&model.forward(&x, Some(&mut m)), &want),
        "the next forward works"
    );
    m.restore()?;
    Ok(())
}

#[rstest]
fn the_manager_moves_to_another_thread(
    #[values(Mode::Cpu, Mode::Cuda)] mode: Mode,
) -> anyhow::Result<()> {
    fn assert_send<T: Send>() {}
    assert_send::<layerwise_offload::LayerwiseOffloadManager>();
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let model = Model::new(dev, 4, false, 35);
    let x = model.input(4);
    let want = model.forward(&x, None);
    let before = model.snapshot();
    let mut m = mode.config("blocks", 4).build(&model.vs)?;
    m.initialize()?; // built and initialized on this thread...
    let (got, m, model) = std::thread::spawn(move || {
        // ...driven on another one, with that thread's own current stream.
        let got: Vec<tch::Tensor> = (0..3).map(|_| model.forward(&x, Some(&mut m))).collect();
        (got, m, model)
    })
    .join()
    .expect("the driver thread panicked");
    for g in &got {
        assert!(bits_equal(g, &want));
    }
    let mut m = m;
    m.restore()?;
    assert_same(&model.snapshot(), &before);
    Ok(())
}
