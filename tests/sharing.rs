//! One host copy, several managers: a second manager (another device in a real deployment;
//! here the CPU test mode, and CUDA device 0 where present) streams from the store the first one
//! made, with bit-identical outputs and the host bytes held once.

use offload_testkit as common;

use common::Mode;
use common::model::{Model, assert_same, bits_equal};
use layerwise_offload::{Error, OffloadConfig};
use rstest::rstest;

#[rstest]
fn two_managers_share_one_host_copy(
    #[values(Mode::Cpu, Mode::Cuda)] mode: Mode,
) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let model0 = Model::new(dev, 4, true, 41);
    // A second instance of the same model (a real second GPU would build its own); its block
    // values do not matter, its non-block weights do.
    let mut model1 = Model::new(dev, 4, true, 42);
    model1.vs.copy(&model0.vs)?;
    let before = model0.snapshot();
    let x = model0.input(7);
    let want = model0.forward(&x, None);
    let cfg = || {
        mode.config("double_blocks", 4)
            .with_list("single_blocks", 5)
    };

    let mut m0 = cfg().build(&model0.vs)?;
    m0.initialize()?;
    let store = m0.host_store().expect("an initialized manager has a store");
    assert_eq!(store.num_blocks(), 9);
    let mut m1 = cfg().host_store(store.clone()).build(&model1.vs)?;
    m1.initialize()?;
    // One copy: the same host memory behind both managers, counted once.
    let name = "single_blocks.4.fc2.weight";
    assert_eq!(m0.tensor(name)?.data_ptr(), m1.tensor(name)?.data_ptr());
    assert_eq!(m0.stats().host_bytes, store.bytes());
    assert_eq!(m1.stats().host_bytes, 0);
    assert_eq!(m1.stats().shared_host_bytes, store.bytes());
    // Both stream the same weights: bit-identical outputs, from two threads at once.
    let (x0, x1) = (x.copy(), x.copy());
    let a = std::thread::spawn(move || {
        let r: Vec<tch::Tensor> = (0..3).map(|_| model0.forward(&x0, Some(&mut m0))).collect();
        (model0, m0, r)
    });
    let b = std::thread::spawn(move || {
        let r: Vec<tch::Tensor> = (0..3).map(|_| model1.forward(&x1, Some(&mut m1))).collect();
        (model1, m1, r)
    });
    let (model0, mut m0, r0) = a.join().unwrap();
    let (model1, mut m1, r1) = b.join().unwrap();
    for y in r0.iter().chain(&r1) {
        assert!(bits_equal(y, &want));
    }
    // Writes to a shared copy are refused.
    let w = m0.tensor(name)?.copy();
    assert!(matches!(
        m0.update_tensor(name, &w),
        Err(Error::InvalidArgument { .. })
    ));
    // Restoring one leaves the other streaming; the buffers live until the last one lets go.
    m0.restore()?;
    assert_same(&model0.snapshot(), &before);
    assert!(bits_equal(&model1.forward(&x, Some(&mut m1)), &want));
    drop(store);
    m1.restore()?;
    assert_same(&model1.snapshot(), &before);
    Ok(())
}

#[test]
fn a_store_only_serves_the_same_model() -> anyhow::Result<()> {
    let model0 = Model::new(tch::Device::Cpu, 3, false, 43);
    let mut m0 = OffloadConfig::new("blocks", 3)
        .cpu_test_mode(true)
        .build(&model0.vs)?;
    m0.initialize()?;
    let store = m0.host_store().unwrap();
    // A different shape: refused, naming the tensor; nothing changed in the second model.
    let other = Model::new(tch::Device::Cpu, 4, true, 44);
    let before = other.snapshot();
    match OffloadConfig::new("double_blocks", 3)
        .cpu_test_mode(true)
        .host_store(store.clone())
        .build(&other.vs)?
        .initialize()
    {
        Err(e @ Error::InvalidArgument { .. }) => assert!(e.to_string().contains("store"), "{e}"),
        r => panic!("expected InvalidArgument, got {r:?}"),
    }
    assert_same(&other.snapshot(), &before);
    m0.restore()?;
    Ok(())
}

#[rstest]
fn shared_stores_serve_managers_with_their_own_budgets(
    #[values(Mode::Cpu, Mode::Cuda)] mode: Mode,
) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let model0 = Model::new(dev, 6, false, 46);
    let mut model1 = Model::new(dev, 6, false, 47);
    model1.vs.copy(&model0.vs)?;
    let before = model0.snapshot();
    let x = model0.input(8);
    let want = model0.forward(&x, None);
    let block = {
        let probe = Model::new(tch::Device::Cpu, 6, false, 48);
        let mut p = OffloadConfig::new("blocks", 6)
            .cpu_test_mode(true)
            .build(&probe.vs)?;
        p.initialize()?;
        p.plan().unwrap().max_block_bytes() as u64
    };
    // The first manager keeps 3 blocks resident and, being shareable, host copies of all 6.
    let mut m0 = mode
        .config("blocks", 6)
        .vram_budget(5 * block)
        .shareable(true)
        .build(&model0.vs)?;
    m0.initialize()?;
    assert_eq!(m0.stats().resident_blocks, 3);
    let store = m0.host_store().unwrap();
    assert_eq!(store.bytes(), 6 * block);
    // The second keeps 1 block resident, filled from the store (its own values are different).
    let mut m1 = mode
        .config("blocks", 6)
        .vram_budget(3 * block)
        .host_store(store.clone())
        .build(&model1.vs)?;
    m1.initialize()?;
    assert_eq!(m1.stats().resident_blocks, 1);
    assert_eq!(m1.stats().host_bytes, 0);
    for _ in 0..2 {
        assert!(bits_equal(&model0.forward(&x, Some(&mut m0)), &want));
        assert!(bits_equal(&model1.forward(&x, Some(&mut m1)), &want));
    }
    // A store made under a budget without host copies cannot serve: said clearly.
    let model2 = Model::new(dev, 6, false, 49);
    let mut m2 = mode
        .config("blocks", 6)
        .vram_budget(5 * block)
        .build(&model2.vs)?;
    m2.initialize()?;
    let partial = m2.host_store().unwrap();
    let model3 = Model::new(dev, 6, false, 50);
    match mode
        .config("blocks", 6)
        .host_store(partial)
        .build(&model3.vs)?
        .initialize()
    {
        Err(e @ Error::InvalidArgument { .. }) => {
            assert!(e.to_string().contains("shareable"), "{e}")
        }
        r => panic!("expected InvalidArgument, got {r:?}"),
    }
    drop(store);
    m1.restore()?;
    m0.restore()?;
    m2.restore()?;
    assert_same(&model0.snapshot(), &before);
    assert_same(&model1.snapshot(), &before);
    Ok(())
}

/// Two CUDA devices, one host copy: a manager on device 0 and one on device 1, driven from a
/// thread each at the same time, both bit-identical to their own device's resident model. On a
/// host with one CUDA device both managers use device 0 (still two managers with their own
/// streams and slot rings over one store); `OFFLOAD_REQUIRE_GPUS=2` makes that a failure.
#[test]
fn managers_on_two_devices_share_one_host_copy() -> anyhow::Result<()> {
    let Some(devs) = common::cuda_devices(2) else {
        return Ok(());
    };
    let d1 = devs[1];
    let (dev0, dev1) = (tch::Device::Cuda(0), tch::Device::Cuda(d1));
    let model0 = Model::new(dev0, 5, false, 51);
    let mut model1 = Model::new(dev1, 5, false, 52);
    model1.vs.copy(&model0.vs)?;
    let before = model0.snapshot();
    let x = model0.input(9);
    let want0 = model0.forward(&x, None);
    let want1 = model1.forward(&x, None);
    let mut m0 = OffloadConfig::new("blocks", 5)
        .device(0)
        .build(&model0.vs)?;
    m0.initialize()?;
    let store = m0.host_store().unwrap();
    let mut m1 = OffloadConfig::new("blocks", 5)
        .device(d1)
        .host_store(store.clone())
        .build(&model1.vs)?;
    m1.initialize()?;
    assert_eq!(m1.stats().host_bytes, 0);
    assert_eq!(m1.stats().shared_host_bytes, store.bytes());
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let run = |model: Model, mut m: layerwise_offload::LayerwiseOffloadManager| {
        let (x, barrier) = (x.copy(), barrier.clone());
        std::thread::spawn(move || {
            barrier.wait();
            let r: Vec<tch::Tensor> = (0..4).map(|_| model.forward(&x, Some(&mut m))).collect();
            (model, m, r)
        })
    };
    let (a, b) = (run(model0, m0), run(model1, m1));
    let (model0, mut m0, r0) = a.join().unwrap();
    let (model1, mut m1, r1) = b.join().unwrap();
    for y in &r0 {
        assert!(bits_equal(y, &want0), "device 0 output differs");
    }
    for y in &r1 {
        assert!(bits_equal(y, &want1), "device {d1} output differs");
    }
    drop(store);
    m0.restore()?;
    m1.restore()?;
    assert_same(&model0.snapshot(), &before);
    assert_same(&model1.snapshot(), &before);
    Ok(())
}
