//! The `&self` driver: `SharedManager` and `OffloadedBlocks` run the block loop through a shared
//! reference, give the same output as the guard loop, and survive errors and panics inside a
//! block with every weight intact.

mod common;

use common::Mode;
use common::model::{Model, assert_same, bits_equal};
use layerwise_offload::{Error, OffloadedBlocks, SharedManager};
use rstest::rstest;
use std::panic::{AssertUnwindSafe, catch_unwind};

#[rstest]
fn a_shared_manager_runs_blocks_from_a_shared_reference(
    #[values(Mode::Cpu, Mode::Cuda)] mode: Mode,
) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let model = Model::new(dev, 4, false, 21);
    let before = model.snapshot();
    let x = model.input(5);
    let want = model.forward(&x, None);
    let mut m = mode.config("blocks", 4).build(&model.vs)?;
    m.initialize()?;
    let shared = SharedManager::new(m);
    let run = |shared: &SharedManager| -> layerwise_offload::Result<tch::Tensor> {
        let mut h = tch::no_grad(|| x.to_device(dev).shallow_clone());
        // The model's own forward without the head, block by block through `&self`.
        let blocks: Vec<_> = model.blocks().collect();
        h = model_embed(&model, &h);
        for (i, b) in blocks.iter().enumerate() {
            h = shared.with_block(i, || tch::no_grad(|| b.forward(&h)))?;
        }
        Ok(model_head(&model, &h))
    };
    let got = run(&shared)?;
    assert!(bits_equal(&got, &want));
    let uploads = shared.stats().uploads;
    assert!(uploads >= 4, "{uploads} uploads");

    // An index past the last block: a typed error, nothing left entered.
    match shared.with_block(4, || ()) {
        Err(Error::BlockOutOfRange { .. }) => {}
        other => panic!("expected BlockOutOfRange, got {other:?}"),
    }
    // A panic inside a block poisons nothing: the block is released and the next forward is
    // exact.
    let panicked = catch_unwind(AssertUnwindSafe(|| {
        shared.with_block(1, || panic!("deliberate panic inside block 1"))
    }));
    assert!(panicked.is_err());
    assert!(!shared.lock().is_entered(1));
    assert!(bits_equal(&run(&shared)?, &want));

    let mut m = shared.into_inner();
    m.restore()?;
    assert_same(&model.snapshot(), &before);
    Ok(())
}

#[test]
fn offloaded_blocks_checks_the_block_count() -> anyhow::Result<()> {
    let model = Model::new(tch::Device::Cpu, 3, false, 2);
    let mut m = Mode::Cpu.config("blocks", 3).build(&model.vs)?;
    m.initialize()?;
    match OffloadedBlocks::new(vec![(); 2], m) {
        Err(Error::InvalidArgument { message, .. }) => {
            assert!(
                message.contains("2 blocks") && message.contains("streams 3"),
                "{message}"
            )
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    Ok(())
}

fn model_embed(model: &Model, x: &tch::Tensor) -> tch::Tensor {
    let vars = model.vs.variables();
    tch::no_grad(|| x.linear(&vars["embed.weight"], Some(&vars["embed.bias"])))
}

fn model_head(model: &Model, h: &tch::Tensor) -> tch::Tensor {
    let vars = model.vs.variables();
    tch::no_grad(|| {
        h.linear(&vars["head.weight"], Some(&vars["head.bias"]))
            .to_device(tch::Device::Cpu)
    })
}
