//! The manager's behaviour, each body run in the CPU test mode (everywhere) and on CUDA (on a
//! GPU machine; `SKIP: no CUDA device` elsewhere, a failure with OFFLOAD_REQUIRE_CUDA=1).

use offload_testkit as common;

use common::Mode;
use common::model::{Model, assert_same, bits_equal};
use layerwise_offload::{Error, LayerwiseOffloadManager, OffloadConfig};
use rstest::rstest;
use tch::{Device, Kind, Tensor};

fn config(mode: Mode, model: &Model) -> OffloadConfig {
    let spec = model.list_spec();
    let mut c = mode.config(&spec[0].0, spec[0].1);
    for (attr, n) in &spec[1..] {
        c = c.with_list(attr.clone(), *n);
    }
    c
}

#[rstest]
fn outputs_are_bit_identical(
    #[values(Mode::Cpu, Mode::Cuda)] mode: Mode,
    #[values(1, 2, 3)] depth: usize,
    #[values(false, true)] two_lists: bool,
) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let model = Model::new(dev, 4, two_lists, 7);
    let inputs: Vec<Tensor> = (0..3).map(|s| model.input(100 + s)).collect();
    let expected: Vec<Tensor> = inputs.iter().map(|x| model.forward(x, None)).collect();
    let before = model.snapshot();

    let mut m = config(mode, &model)
        .prefetch_depth(depth)
        .build(&model.vs)?;
    m.initialize()?;
    assert_eq!(m.num_blocks(), model.num_blocks());
    for round in 0..2 {
        for (x, want) in inputs.iter().zip(&expected) {
            let got = model.forward(x, Some(&mut m));
            assert!(
                bits_equal(&got, want),
                "forward differs (round {round}, depth {depth}, two lists {two_lists})"
            );
        }
    }
    // At most depth + 1 blocks on the device between forwards, and block 0 is among them
    // (the wrap-around prefetch).
    let on: Vec<usize> = (0..m.num_blocks()).filter(|&i| m.is_on_device(i)).collect();
    assert!(on.len() <= depth + 1, "{on:?}");
    assert!(
        m.is_on_device(0),
        "the last block's enter must prefetch block 0: {on:?}"
    );
    m.restore()?;
    assert_same(&model.snapshot(), &before);
    // The model works without the manager.
    assert!(bits_equal(&model.forward(&inputs[0], None), &expected[0]));
    Ok(())
}

#[rstest]
fn placeholders_and_residency(#[values(Mode::Cpu, Mode::Cuda)] mode: Mode) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let model = Model::new(dev, 5, false, 1);
    let mut m = config(mode, &model).prefetch_depth(2).build(&model.vs)?;
    assert!(!m.is_initialized());
    m.initialize()?;
    let vars = model.vs.variables();
    let plan = m.plan().unwrap().clone();
    assert_eq!(plan.blocks.len(), 5);
    // After initialize only block 0 is on the device (uploaded synchronously).
    assert_eq!(
        (0..5).filter(|&i| m.is_on_device(i)).collect::<Vec<_>>(),
        vec![0]
    );
    for (li, layer) in plan.blocks.iter().enumerate() {
        for t in &layer.tensors {
            assert_eq!(t.offset % layerwise_offload::ALIGN, 0);
            let v = &vars[&t.name];
            if li == 0 {
                assert_eq!(v.size(), t.shape, "block 0 is resident: {}", t.name);
            } else {
                assert_eq!(v.numel(), 0, "{} should be a placeholder", t.name);
                assert_eq!(
                    v.dim(),
                    t.shape.len(),
                    "placeholders keep the rank: {}",
                    t.name
                );
                assert_eq!(v.device(), m.compute_device());
            }
        }
    }
    // Non-block weights stay on the compute device with their values.
    assert_eq!(vars["embed.weight"].device(), m.compute_device());
    assert!(vars["embed.weight"].numel() > 0);

    // Entering block 2 loads it and prefetches 3 and 4; the ring has 3 slots.
    {
        let g = m.enter(2)?;
        assert_eq!(g.block(), 2);
    }
    assert!(m.is_on_device(2) && m.is_on_device(3) && m.is_on_device(4));
    assert!(!m.is_entered(2));
    let slots = m.slot_contents();
    assert_eq!(slots.len(), 3);
    // A released block's tensors are placeholders again.
    assert_eq!(vars["blocks.2.fc1.weight"].numel(), 0);
    // Entering 4 wraps around: blocks 0 and 1 come next.
    m.before_block(4)?;
    assert!(m.is_entered(4));
    assert_eq!(
        vars["blocks.4.fc1.weight"].size(),
        vec![4 * common::model::DIM, common::model::DIM]
    );
    assert!(
        m.is_on_device(0) && m.is_on_device(1),
        "{:?}",
        m.slot_contents()
    );
    m.after_block(4)?;
    assert!(!m.is_entered(4));
    // Slot reuse: the ring never holds more than its slots, uploads grow only on misses.
    let up = m.stats().uploads;
    m.before_block(0)?; // prefetched: no new upload for 0; prefetches 1 (present) and 2
    m.after_block(0)?;
    assert_eq!(m.stats().uploads, up + 1, "only block 2 is new");
    m.restore()?;
    Ok(())
}

#[rstest]
fn fastvideo_api_and_no_ops(#[values(Mode::Cpu, Mode::Cuda)] mode: Mode) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let model = Model::new(dev, 3, false, 2);
    let x = model.input(5);
    let want = model.forward(&x, None);
    let before = model.snapshot();
    let mut m = config(mode, &model)
        .auto_initialize(true)
        .build(&model.vs)?;
    assert!(m.is_initialized());
    let up = m.stats().uploads;
    m.prefetch_layer(0, true)?; // already on the device
    m.prefetch_layer(99, true)?; // out of range
    m.release_layer(99)?;
    assert_eq!(m.stats().uploads, up);
    // FastVideo's loop: layer_scope(prefetch = i + 1, run = i) around block i.
    let got = tch::no_grad(|| -> anyhow::Result<Tensor> {
        let dev = m.compute_device();
        let mut h = x.to_device(dev);
        h = model_embed(&model, &h);
        for (i, b) in model.blocks().enumerate() {
            h = m.layer_scope(Some(i + 1), Some(i), || b.forward(&h))?;
        }
        Ok(model_head(&model, &h))
    })?;
    assert!(bits_equal(&got, &want));
    // prefetch_layer(i, false) makes the block usable directly, release_layer takes it off.
    m.release_all()?;
    assert!((0..3).all(|i| !m.is_on_device(i)));
    m.prefetch_layer(1, false)?;
    assert!(m.is_on_device(1));
    assert_eq!(
        model.vs.variables()["blocks.1.qkv.weight"].numel(),
        3 * 64 * 64
    );
    m.release_layer(1)?;
    assert!(!m.is_on_device(1));
    assert_eq!(model.vs.variables()["blocks.1.qkv.weight"].numel(), 0);
    m.restore()?;
    assert_same(&model.snapshot(), &before);
    Ok(())
}

fn model_embed(model: &Model, x: &Tensor) -> Tensor {
    let w = &model.vs.variables()["embed.weight"];
    let b = &model.vs.variables()["embed.bias"];
    x.linear(w, Some(b))
}

fn model_head(model: &Model, h: &Tensor) -> Tensor {
    let w = &model.vs.variables()["head.weight"];
    let b = &model.vs.variables()["head.bias"];
    h.linear(w, Some(b)).to_device(Device::Cpu)
}

#[test]
fn disabled_manager_changes_nothing() -> anyhow::Result<()> {
    let model = Model::new(Device::Cpu, 3, false, 3);
    let before = model.snapshot();
    // enabled = false; and, on a machine without CUDA, FastVideo's constructor disables itself.
    let mut managers = vec![
        OffloadConfig::new("blocks", 3)
            .enabled(false)
            .build(&model.vs)?,
    ];
    if !layerwise_offload::accel::cuda_is_available() {
        managers.push(LayerwiseOffloadManager::new(
            &model.vs, "blocks", 3, true, true, true,
        )?);
    }
    for mut m in managers {
        assert!(!m.is_enabled());
        m.initialize()?;
        m.prefetch_layer(0, false)?;
        {
            let _g = m.enter(1)?;
        }
        m.before_block(2)?;
        m.after_block(2)?;
        m.release_all()?;
        m.restore()?;
        assert_eq!(m.stats().uploads, 0);
        assert_same(&model.snapshot(), &before);
    }
    Ok(())
}

#[rstest]
fn configuration_errors_are_typed(
    #[values(Mode::Cpu, Mode::Cuda)] mode: Mode,
) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let model = Model::new(dev, 3, true, 4);
    let before = model.snapshot();
    let init = |c: OffloadConfig| c.build(&model.vs).and_then(|mut m| m.initialize());

    match init(mode.config("blocks", 3)) {
        Err(Error::NoMatch { prefixes, .. }) => {
            assert!(
                prefixes.contains(&"double_blocks".to_owned())
                    && prefixes.contains(&"single_blocks".to_owned()),
                "{prefixes:?}"
            )
        }
        r => panic!("expected NoMatch, got {r:?}"),
    }
    match init(mode.config("double_blocks", 9)) {
        Err(
            e @ Error::TooFewBlocks {
                asked: 9, found: 3, ..
            },
        ) => assert!(e.to_string().contains("num_blocks <= 3"), "{e}"),
        r => panic!("expected TooFewBlocks, got {r:?}"),
    }
    assert!(matches!(
        init(mode.config("double_blocks", 3).prefetch_depth(0)),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        init(
            mode.config("double_blocks", 3)
                .with_list("double_blocks", 2)
        ),
        Err(Error::InvalidArgument { .. })
    ));

    // Loop calls before initialize.
    let mut m = mode.config("double_blocks", 3).build(&model.vs)?;
    assert!(matches!(
        m.enter(0).map(|_| ()),
        Err(Error::NotInitialized { .. })
    ));
    assert!(matches!(
        m.before_block(0),
        Err(Error::NotInitialized { .. })
    ));
    assert!(matches!(
        m.after_block(0),
        Err(Error::NotInitialized { .. })
    ));
    assert!(matches!(
        m.prefetch_layer(0, true),
        Err(Error::NotInitialized { .. })
    ));
    // Nothing changed so far.
    assert_same(&model.snapshot(), &before);

    // A block index out of range, then restore after the error.
    m.initialize()?;
    match m.enter(3).map(|_| ()) {
        Err(
            e @ Error::BlockOutOfRange {
                block: 3,
                num_blocks: 3,
                ..
            },
        ) => assert!(e.to_string().contains("0..3"), "{e}"),
        r => panic!("expected BlockOutOfRange, got {r:?}"),
    }
    // Entering more blocks than there are slots.
    m.before_block(0)?;
    m.before_block(1)?;
    assert!(matches!(m.before_block(2), Err(Error::NoFreeSlot { .. })));
    m.restore()?;
    assert_same(&model.snapshot(), &before);
    // After restore the manager is done: loop calls and a second initialize are refused.
    assert!(matches!(
        m.before_block(0),
        Err(Error::NotInitialized { .. })
    ));
    match m.initialize() {
        Err(e @ Error::InvalidArgument { .. }) => {
            assert!(e.to_string().contains("build a new manager"), "{e}")
        }
        r => panic!("expected InvalidArgument, got {r:?}"),
    }
    Ok(())
}

#[test]
fn gaps_and_strides_and_devices() -> anyhow::Result<()> {
    let t = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, Device::Cpu));
    // A gap: blocks 0 and 2 only.
    let named = vec![
        ("blocks.0.w".to_owned(), t(&[4])),
        ("blocks.2.w".to_owned(), t(&[4])),
    ];
    match OffloadConfig::new("blocks", 3)
        .cpu_test_mode(true)
        .build(&named)?
        .initialize()
    {
        Err(Error::MissingBlocks { missing, .. }) => assert_eq!(missing, vec![1]),
        r => panic!("expected MissingBlocks, got {r:?}"),
    }
    // A slice is refused, naming the tensor; nothing changed.
    let base = t(&[8, 4]);
    let named = vec![
        ("blocks.0.w".to_owned(), base.slice(0, 0, 8, 2)),
        ("blocks.1.w".to_owned(), t(&[4])),
    ];
    let copy = named[0].1.copy();
    match OffloadConfig::new("blocks", 2)
        .cpu_test_mode(true)
        .build(&named)?
        .initialize()
    {
        Err(e @ Error::NonContiguous { .. }) => {
            assert!(e.to_string().contains("blocks.0.w"), "{e}")
        }
        r => panic!("expected NonContiguous, got {r:?}"),
    }
    assert!(named[0].1.equal(&copy));
    // A transpose is dense: kept with its strides, bit-exact after restore.
    let tr = t(&[6, 5]).t_();
    let strides = tr.stride();
    let named = vec![
        ("blocks.0.w".to_owned(), tr.shallow_clone()),
        ("blocks.1.w".to_owned(), t(&[3])),
    ];
    let want = tr.copy();
    let mut m = OffloadConfig::new("blocks", 2)
        .cpu_test_mode(true)
        .build(&named)?;
    m.initialize()?;
    m.release_all()?;
    assert_eq!(tr.numel(), 0);
    {
        let _g = m.enter(0)?;
        assert_eq!(tr.stride(), strides, "views keep the original strides");
        assert!(bits_equal(&tr, &want));
    }
    m.restore()?;
    assert_eq!(tr.stride(), strides);
    assert!(bits_equal(&tr, &want));
    Ok(())
}

#[rstest]
fn a_vram_budget_keeps_blocks_resident(
    #[values(Mode::Cpu, Mode::Cuda)] mode: Mode,
) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let model = Model::new(dev, 8, false, 21);
    let x = model.input(9);
    let want = model.forward(&x, None);
    let before = model.snapshot();
    let block = {
        let mut m = config(mode, &model).build(&model.vs)?;
        m.initialize()?;
        let b = m.plan().unwrap().max_block_bytes() as u64;
        m.restore()?;
        b
    };

    // Everything fits: all resident, no slot ring, no uploads, same outputs.
    let mut m = config(mode, &model)
        .vram_budget(8 * block)
        .build(&model.vs)?;
    m.initialize()?;
    assert!((0..8).all(|i| m.is_resident(i)));
    assert!(m.slot_contents().is_empty());
    for _ in 0..2 {
        assert!(bits_equal(&model.forward(&x, Some(&mut m)), &want));
    }
    assert_eq!(m.stats().uploads, 0);
    m.restore()?;
    assert_same(&model.snapshot(), &before);

    // Room for the ring (2 slots) and 4 blocks: 4 resident, spread out; the others stream.
    let mut m = config(mode, &model)
        .vram_budget(6 * block)
        .build(&model.vs)?;
    m.initialize()?;
    let resident: Vec<usize> = (0..8).filter(|&i| m.is_resident(i)).collect();
    assert_eq!(resident, vec![1, 3, 5, 7]);
    assert_eq!(m.stats().resident_blocks, 4);
    assert_eq!(m.slot_contents().len(), 2);
    assert_eq!(
        model.vs.variables()["blocks.3.fc1.weight"].device(),
        m.compute_device()
    );
    assert!(
        model.vs.variables()["blocks.3.fc1.weight"].numel() > 0,
        "resident blocks keep their tensors"
    );
    let up = m.stats().uploads;
    for _ in 0..3 {
        assert!(bits_equal(&model.forward(&x, Some(&mut m)), &want));
    }
    assert_eq!(
        m.stats().uploads - up,
        12,
        "only the 4 streamed blocks upload, once per forward"
    );
    // Reading and replacing a resident block's weight goes to the device tensor.
    let w = m.tensor("blocks.3.fc1.weight")?;
    assert_eq!(w.device(), m.compute_device());
    m.update_tensor(
        "blocks.3.fc1.bias",
        &(m.tensor("blocks.3.fc1.bias")?.copy()),
    )?;
    m.restore()?;
    assert_same(&model.snapshot(), &before);

    // A budget that cannot hold the slot ring is refused, saying what to change.
    match config(mode, &model)
        .vram_budget(block)
        .build(&model.vs)?
        .initialize()
    {
        Err(e @ Error::InvalidArgument { .. }) => {
            assert!(e.to_string().contains("prefetch_depth"), "{e}")
        }
        r => panic!("expected InvalidArgument, got {r:?}"),
    }
    if mode == Mode::Cpu {
        assert!(matches!(
            config(mode, &model)
                .vram_budget_all_but(1 << 30)
                .build(&model.vs)?
                .initialize(),
            Err(Error::InvalidArgument { .. })
        ));
    }
    assert_same(&model.snapshot(), &before);
    Ok(())
}

#[test]
fn chrome_trace_is_valid_json_with_both_streams() -> anyhow::Result<()> {
    use layerwise_offload::{Lane, TimelineSpan, chrome_trace_json};
    let spans = vec![
        TimelineSpan {
            lane: Lane::Upload,
            block: 1,
            start_ms: 0.5,
            end_ms: 2.0,
        },
        TimelineSpan {
            lane: Lane::Stall,
            block: 0,
            start_ms: 0.0,
            end_ms: 0.25,
        },
        TimelineSpan {
            lane: Lane::Compute,
            block: 0,
            start_ms: 0.25,
            end_ms: 3.0,
        },
    ];
    let v: serde_json::Value = serde_json::from_str(&chrome_trace_json(&spans))?;
    let events = v["traceEvents"].as_array().unwrap();
    assert_eq!(events.len(), 2 + 3, "two track names and three spans");
    let upload = events.iter().find(|e| e["name"] == "upload 1").unwrap();
    assert_eq!(
        (upload["ts"].as_f64(), upload["dur"].as_f64()),
        (Some(500.0), Some(1500.0)),
        "microseconds"
    );
    let compute = events.iter().find(|e| e["name"] == "block 0").unwrap();
    assert_ne!(
        upload["tid"], compute["tid"],
        "copy and compute streams are separate tracks"
    );
    assert_eq!(upload["args"]["block"], 1);
    // A time never recorded (NaN) stays valid JSON: null.
    let never = [TimelineSpan {
        lane: Lane::Upload,
        block: 2,
        start_ms: f64::NAN,
        end_ms: 1.0,
    }];
    let v: serde_json::Value = serde_json::from_str(&chrome_trace_json(&never))?;
    assert!(v["traceEvents"][2]["ts"].is_null(), "{v}");
    // Without a CUDA device there is nothing to capture: a typed error.
    let model = Model::new(Device::Cpu, 2, false, 3);
    let mut m = OffloadConfig::new("blocks", 2)
        .cpu_test_mode(true)
        .build(&model.vs)?;
    m.initialize()?;
    assert!(matches!(
        m.start_timeline(),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(m.finish_timeline()?.is_empty());
    Ok(())
}

#[rstest]
fn a_second_manager_over_the_same_model_is_refused(
    #[values(Mode::Cpu, Mode::Cuda)] mode: Mode,
) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let model = Model::new(dev, 4, false, 71);
    let x = model.input(4);
    let want = model.forward(&x, None);
    let before = model.snapshot();
    let mut a = config(mode, &model).build(&model.vs)?;
    let mut b = config(mode, &model).build(&model.vs)?;
    a.initialize()?;
    match b.initialize() {
        Err(e @ Error::AlreadyOffloaded { .. }) => {
            assert!(e.to_string().contains("blocks.0."), "{e}");
            assert!(
                e.to_string().contains("restore() or drop that manager"),
                "{e}"
            );
        }
        r => panic!("expected AlreadyOffloaded, got {r:?}"),
    }
    assert!(!b.is_initialized());
    // The refused manager changed nothing: the first one's loop is exact.
    assert!(bits_equal(&model.forward(&x, Some(&mut a)), &want));
    a.restore()?;
    drop(b);
    assert_same(&model.snapshot(), &before);

    // Once the first one let go, another manager may offload the model.
    let mut c = config(mode, &model).build(&model.vs)?;
    c.initialize()?;
    assert!(bits_equal(&model.forward(&x, Some(&mut c)), &want));
    drop(c); // dropping also lets go (the weights go to their host copies)
    let mut d = config(mode, &model).build(&model.vs)?;
    d.initialize()?;
    d.restore()?;
    assert_same(&model.snapshot(), &before);
    Ok(())
}

#[test]
fn out_of_range_configurations_are_typed() -> anyhow::Result<()> {
    let model = Model::new(Device::Cpu, 3, false, 72);
    let before = model.snapshot();
    let cfg = || OffloadConfig::new("blocks", 3).cpu_test_mode(true);
    for depth in [usize::MAX, layerwise_offload::MAX_PREFETCH_DEPTH + 1] {
        match cfg().prefetch_depth(depth).build(&model.vs) {
            Err(e @ Error::InvalidArgument { .. }) => {
                assert!(e.to_string().contains("pass 1..="), "{e}")
            }
            r => panic!("expected InvalidArgument, got {:?}", r.map(|_| ())),
        }
    }
    // The largest depth accepted works (never more slots than blocks).
    let mut m = cfg()
        .prefetch_depth(layerwise_offload::MAX_PREFETCH_DEPTH)
        .build(&model.vs)?;
    let x = model.input(1);
    let want = model.forward(&x, None);
    m.initialize()?;
    assert_eq!(m.slot_contents().len(), 3);
    assert!(bits_equal(&model.forward(&x, Some(&mut m)), &want));
    m.restore()?;
    // num_layers 0, alone or in a second list, with or without a shared-memory file.
    let shm = std::env::temp_dir().join(format!("lo-zero-layers-{}", std::process::id()));
    for c in [
        OffloadConfig::new("blocks", 0).cpu_test_mode(true),
        cfg().with_list("blocks_b", 0),
        OffloadConfig::new("blocks", 0)
            .cpu_test_mode(true)
            .shared_memory(&shm),
    ] {
        match c.build(&model.vs) {
            Err(e @ Error::InvalidArgument { .. }) => {
                assert!(e.to_string().contains("num_blocks is 0"), "{e}")
            }
            r => panic!("expected InvalidArgument, got {:?}", r.map(|_| ())),
        }
    }
    // A shared-memory file with nothing to publish (every block stays resident).
    let mut m = cfg()
        .vram_budget(u64::MAX)
        .shared_memory(&shm)
        .build(&model.vs)?;
    match m.initialize() {
        Err(e @ Error::InvalidArgument { .. }) => {
            assert!(e.to_string().contains("shareable(true)"), "{e}")
        }
        r => panic!("expected InvalidArgument, got {r:?}"),
    }
    assert!(!m.is_initialized());
    assert!(!shm.exists());
    // A disabled manager offloads nothing and needs no blocks.
    assert!(
        !OffloadConfig::new("blocks", 0)
            .enabled(false)
            .build(&model.vs)?
            .is_enabled()
    );
    assert_same(&model.snapshot(), &before);
    Ok(())
}
