//! Injected faults in the CPU test mode (and on CUDA where one is present): running out of
//! device memory while building the slot ring, an upload failing in the middle of a loop, a
//! refused pinned allocation, a panic inside a block. After each: a typed error, nothing lost,
//! and the next forward works.

use offload_testkit as common;

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
                // The fault's message is the libtorch-style source, below the error's own.
                assert!(format!("{e:?}").contains("injected fault"), "{e:?}");
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
    // The model as it was: blocks already offloaded are back on their device, values intact.
    assert!(!m.is_initialized());
    assert_same(&model.snapshot(), &before);
    assert_eq!(
        model.vs.variables()["double_blocks.0.fc1.weight"].device(),
        dev
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

/// Every variable's device, by name.
fn devices(model: &Model) -> Vec<(String, Device)> {
    let mut v: Vec<(String, Device)> = model
        .vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.device()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn a_failed_publish_leaves_the_model_as_it_was() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("lo-failed-publish-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("blocks");
    // A directory where the manifest goes: every block is published, then the manifest cannot
    // be put in place (as on a full shared-memory file system).
    let obstacle = dir.join("blocks.manifest");
    std::fs::create_dir(&obstacle)?;
    let model = Model::new(Device::Cpu, 4, false, 36);
    let x = model.input(6);
    let want = model.forward(&x, None);
    let before = model.snapshot();
    let where_before = devices(&model);
    let mut m = Mode::Cpu
        .config("blocks", 4)
        .shared_memory(&path)
        .build(&model.vs)?;
    let err = m.initialize().expect_err("the manifest cannot be written");
    assert!(err.to_string().contains("manifest"), "{err}");
    // The model exactly as it was, nothing published, nothing left behind.
    assert!(!m.is_initialized());
    assert_same(&model.snapshot(), &before);
    assert_eq!(devices(&model), where_before);
    let left: Vec<String> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    assert_eq!(
        left,
        vec!["blocks.manifest".to_owned()],
        "only the obstacle remains"
    );
    // Once the manifest can be written, the same manager publishes, and the loop is exact.
    std::fs::remove_dir(&obstacle)?;
    m.initialize()?;
    assert!(path.exists());
    assert!(bits_equal(&model.forward(&x, Some(&mut m)), &want));
    m.restore()?;
    assert_same(&model.snapshot(), &before);
    drop(m);
    assert!(!path.exists(), "the publisher's file goes with its store");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[rstest]
fn a_failed_initialize_puts_every_tensor_back(
    #[values(Mode::Cpu, Mode::Cuda)] mode: Mode,
) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    // The model on the CPU, offloaded for the compute device: non-block tensors move to the
    // device, blocks into host copies; the refused host allocation comes half-way.
    let model = Model::new(Device::Cpu, 4, true, 37);
    let before = model.snapshot();
    let where_before = devices(&model);
    let mut m = mode
        .config("double_blocks", 4)
        .with_list("single_blocks", 5)
        .inject_fault(Fault::HostAlloc(4))
        .build(&model.vs)?;
    assert!(matches!(m.initialize(), Err(Error::HostAlloc { .. })));
    assert!(!m.is_initialized());
    assert_same(&model.snapshot(), &before);
    assert_eq!(
        devices(&model),
        where_before,
        "every tensor on its old device"
    );
    // The fault is spent: initializing again works; restore gives everything back.
    m.initialize()?;
    let x = model.input(7);
    let got = model.forward(&x, Some(&mut m));
    m.restore()?;
    assert_same(&model.snapshot(), &before);
    assert!(model.vs.variables().values().all(|t| t.device() == dev));
    assert!(bits_equal(&model.forward(&x, None), &got));
    Ok(())
}

#[rstest]
fn a_restore_failing_part_way(#[values(Mode::Cpu, Mode::Cuda)] mode: Mode) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let model = Model::new(dev, 5, false, 38);
    let x = model.input(8);
    let want = model.forward(&x, None);
    let before = model.snapshot();
    let mut m = mode
        .config("blocks", 5)
        .prefetch_depth(2)
        .inject_fault(Fault::Restore(2))
        .build(&model.vs)?;
    m.initialize()?;
    assert!(bits_equal(&model.forward(&x, Some(&mut m)), &want));
    match m.restore() {
        Err(e @ Error::OutOfMemory { .. }) => assert!(e.to_string().contains("block 2"), "{e}"),
        r => panic!("expected OutOfMemory, got {r:?}"),
    }
    // Every call is a typed error or works; none panics.
    let partly = |r: layerwise_offload::Result<()>| match r {
        Err(e @ Error::PartlyRestored { .. }) => {
            assert!(e.to_string().contains("2 of 5 blocks"), "{e}");
            assert!(e.to_string().contains("call restore() again"), "{e}");
        }
        r => panic!("expected PartlyRestored, got {r:?}"),
    };
    partly(m.enter(0).map(|_| ()));
    partly(m.before_block(3));
    partly(m.after_block(0));
    partly(m.prefetch_layer(4, false));
    partly(m.release_layer(1));
    partly(m.release_all());
    partly(m.layer_scope(Some(1), Some(0), || ()));
    partly(m.initialize());
    assert!(!m.is_initialized());
    assert!(m.stats().uploads > 0);
    // Weights read the same whether their block is back already or not.
    let snap: std::collections::HashMap<String, tch::Tensor> = before.into_iter().collect();
    for name in ["blocks.0.fc1.weight", "blocks.3.qkv.bias"] {
        assert!(bits_equal(&m.tensor(name)?, &snap[name]), "{name}");
    }
    // The second restore finishes the job: every weight bit for bit, on the compute device.
    m.restore()?;
    let mut before: Vec<(String, tch::Tensor)> = snap.into_iter().collect();
    before.sort_by(|a, b| a.0.cmp(&b.0));
    assert_same(&model.snapshot(), &before);
    assert!(model.vs.variables().values().all(|t| t.device() == dev));
    assert!(bits_equal(&model.forward(&x, None), &want));
    Ok(())
}

#[rstest]
fn layer_scope_whose_prefetch_fails(
    #[values(Mode::Cpu, Mode::Cuda)] mode: Mode,
) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let model = Model::new(dev, 4, false, 39);
    let x = model.input(9);
    let want = model.forward(&x, None);
    let before = model.snapshot();
    // Upload 0 is block 0 in initialize; upload 1 is the prefetch of block 1 below.
    let mut m = mode
        .config("blocks", 4)
        .inject_fault(Fault::Upload(1))
        .build(&model.vs)?;
    m.initialize()?;
    let mut ran = false;
    let r = m.layer_scope(Some(1), Some(0), || ran = true);
    match r {
        Err(e) => assert!(format!("{e:?}").contains("injected fault"), "{e:?}"),
        Ok(()) => panic!("the prefetch of block 1 must fail"),
    }
    assert!(!ran, "the block does not run without its scope");
    assert!(!m.is_entered(0), "block 0 is not left entered");
    assert!(bits_equal(&model.forward(&x, Some(&mut m)), &want));
    m.restore()?;
    assert_same(&model.snapshot(), &before);
    Ok(())
}
