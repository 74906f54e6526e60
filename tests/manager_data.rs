//! Weights as user data: reading, saving and replacing them while offloaded, dropping the
//! manager without restore, running out of device memory, and VRAM that stays flat.

use offload_testkit as common;

use common::Mode;
use common::model::{Model, assert_same, bits_equal};
use layerwise_offload::{Error, OffloadConfig};
use rstest::rstest;
use tch::{Device, Kind, Tensor};

#[rstest]
fn read_and_save_while_offloaded(
    #[values(Mode::Cpu, Mode::Cuda)] mode: Mode,
) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let model = Model::new(dev, 3, false, 11);
    let before = model.snapshot();
    let mut m = mode.config("blocks", 3).build(&model.vs)?;
    m.initialize()?;
    // The VarStore now holds placeholders; the manager gives the real values.
    assert_eq!(model.vs.variables()["blocks.2.fc2.weight"].numel(), 0);
    let mut got = m.named_tensors()?;
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_same(&got, &before);
    let dir = std::env::temp_dir().join(format!("lo-save-{}-{:?}", std::process::id(), mode));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("w.safetensors");
    m.save_safetensors(&path)?;
    let mut loaded = Tensor::read_safetensors(&path)?;
    loaded.sort_by(|a, b| a.0.cmp(&b.0));
    assert_same(&loaded, &before);
    std::fs::remove_dir_all(&dir)?;
    assert!(matches!(m.tensor("nope"), Err(Error::UnknownTensor { .. })));
    m.restore()?;
    Ok(())
}

#[rstest]
fn update_tensor_writes_through(#[values(Mode::Cpu, Mode::Cuda)] mode: Mode) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let model = Model::new(dev, 3, false, 12);
    let mut reference = Model::new(dev, 3, false, 99);
    reference.vs.copy(&model.vs)?; // same weights (the RNG is shared with other test threads)
    let x = model.input(3);
    let mut m = mode.config("blocks", 3).build(&model.vs)?;
    m.initialize()?;
    let _ = model.forward(&x, Some(&mut m)); // every block has been through a slot
    // A "LoRA merge" on a block weight and on a non-block weight.
    for name in ["blocks.1.fc1.weight", "blocks.0.qkv.bias", "head.bias"] {
        let new = reference.vs.variables()[name].to_device(Device::Cpu) * 1.5 + 0.25;
        m.update_tensor(name, &new)?;
        let mut r = reference.vs.variables()[name].shallow_clone();
        tch::no_grad(|| r.copy_(&new));
        assert!(bits_equal(&m.tensor(name)?, &new), "{name}");
    }
    let want = reference.forward(&x, None);
    assert!(
        bits_equal(&model.forward(&x, Some(&mut m)), &want),
        "the next forward uses the new weights"
    );
    // Wrong shape or dtype is refused with both described.
    let bad = Tensor::zeros([3], (Kind::Float, Device::Cpu));
    match m.update_tensor("blocks.1.fc1.weight", &bad) {
        Err(e @ Error::Mismatch { .. }) => assert!(e.to_string().contains("[3]"), "{e}"),
        r => panic!("expected Mismatch, got {r:?}"),
    }
    let bad = reference.vs.variables()["blocks.1.fc1.weight"].to_kind(Kind::Half);
    assert!(matches!(
        m.update_tensor("blocks.1.fc1.weight", &bad),
        Err(Error::Mismatch { .. })
    ));
    // Refused while the block is entered.
    m.before_block(1)?;
    let same = m.tensor("blocks.1.fc1.weight")?.copy();
    assert!(matches!(
        m.update_tensor("blocks.1.fc1.weight", &same),
        Err(Error::BlockInUse { block: 1, .. })
    ));
    m.after_block(1)?;
    m.restore()?;
    assert_same(&model.snapshot(), &reference.snapshot());
    Ok(())
}

#[rstest]
fn dropping_the_manager_keeps_the_weights(
    #[values(Mode::Cpu, Mode::Cuda)] mode: Mode,
) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let model = Model::new(dev, 3, true, 13);
    let before = model.snapshot();
    {
        let mut m = mode
            .config("double_blocks", 3)
            .with_list("single_blocks", 4)
            .prefetch_depth(2)
            .build(&model.vs)?;
        m.initialize()?;
        m.before_block(5)?; // dropped while a block is entered and uploads are queued
    }
    // Block tensors now live in their host copies (CPU), values intact.
    assert_eq!(
        model.vs.variables()["single_blocks.3.fc1.weight"].device(),
        Device::Cpu
    );
    assert_same(&model.snapshot(), &before);
    Ok(())
}

#[test]
fn a_model_on_the_cpu_offloads_to_cuda() -> anyhow::Result<()> {
    let Some(d) = common::cuda() else {
        return Ok(());
    };
    // The model is built on the CPU and never has to fit on the GPU.
    let model = Model::new(Device::Cpu, 4, false, 14);
    let x = model.input(1);
    let want = model.forward(&x, None); // CPU result
    let mut m = OffloadConfig::new("blocks", 4).device(d).build(&model.vs)?;
    m.initialize()?;
    let vars = model.vs.variables();
    assert_eq!(
        vars["embed.weight"].device(),
        Device::Cuda(d),
        "non-block weights move to the GPU"
    );
    assert_eq!(
        vars["blocks.3.fc1.weight"].numel(),
        0,
        "block weights leave the CPU tensors"
    );
    let got = model.forward(&x, Some(&mut m));
    // Different devices compute differently: compare loosely here; bit-exactness is checked
    // against a resident model on the same device elsewhere.
    assert!(got.allclose(&want, 1e-3, 1e-3, false));
    m.restore()?;
    assert_eq!(
        model.vs.variables()["blocks.3.fc1.weight"].device(),
        Device::Cuda(d)
    );
    Ok(())
}
