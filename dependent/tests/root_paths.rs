//! Every item of the main API named by its one path, the crate root, as a user's crate names
//! it (docs/DESIGN.md, "One path per public item"); `checkpoint`, `accel` and `empty` are the
//! public modules. That no item keeps a second path (`manager::OffloadConfig`, …) is
//! scripts/check-one-path.sh's check of the rustdoc output.

use layerwise_offload::checkpoint::Checkpoint;
use layerwise_offload::{
    ALIGN, Arg, BlockGuard, BlockLayout, BlockLists, Error, GraphOptimizationsGuard, HostStore,
    Lane, LayerwiseOffloadManager, MAX_PREFETCH_DEPTH, MethodSchema, OffloadConfig, OffloadStats,
    OffloadedBlocks, PeerGroup, Plan, Progress, Result, ScriptModule, SharedManager,
    SharedManagerGuard, Stage, TensorLayout, TimelineSpan, TorchMessage, WeightSource,
    chrome_trace_json, count_blocks, graph_optimizations, offload_with, set_graph_optimizations,
    with_graph_optimizations,
};
use layerwise_offload_dependent::{BLOCKS, Model, bits_equal};
use std::sync::{Arc, Mutex};
use tch::Device;
use tch::nn::{Module, ModuleT};

/// Counts a model's blocks through the two root traits.
fn blocks_of(model: &(impl WeightSource + ?Sized), lists: impl BlockLists) -> Result<usize> {
    let names = model.named_tensors()?;
    let mut n = 0;
    for list in lists.names() {
        n += count_blocks(names.iter().map(|(k, _)| k.as_str()), &list)?;
    }
    Ok(n)
}

#[test]
fn the_main_api_is_named_from_the_root() -> Result<()> {
    let model = Model::new(5);
    let x = Model::input(Device::Cpu, 6);
    let want = tch::no_grad(|| model.forward(&x));
    assert_eq!(blocks_of(&model.vs, "blocks")?, BLOCKS);
    assert_eq!(blocks_of(&model.vs, ["blocks"])?, BLOCKS);

    // A depth past the largest is a typed error, before anything is moved.
    match OffloadConfig::new("blocks", BLOCKS)
        .cpu_test_mode(true)
        .prefetch_depth(MAX_PREFETCH_DEPTH + 1)
        .build(&model.vs)
    {
        Err(Error::InvalidArgument { .. }) => {}
        other => panic!("expected InvalidArgument, got {:?}", other.map(|_| ())),
    }

    let seen: Arc<Mutex<Vec<Progress>>> = Arc::default();
    let log = seen.clone();
    let mut manager: LayerwiseOffloadManager = OffloadConfig::new("blocks", BLOCKS)
        .cpu_test_mode(true)
        .on_progress(move |p| log.lock().unwrap().push(*p))
        .build(&model.vs)?;
    manager.initialize()?;

    let plan: &Plan = manager.plan().expect("initialized");
    let layouts: &[BlockLayout] = &plan.blocks;
    assert_eq!(layouts.len(), BLOCKS);
    for layout in layouts {
        let tensors: &[TensorLayout] = &layout.tensors;
        assert!(!tensors.is_empty());
        assert!(tensors.iter().all(|t| t.offset % ALIGN == 0), "{layout:?}");
        assert_eq!(layout.bytes % ALIGN, 0);
    }
    let host_copy = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|p| p.stage == Stage::HostCopy)
        .copied()
        .collect::<Vec<_>>();
    let last = host_copy.last().expect("the host copy reports progress");
    assert_eq!(last.done, plan.total_bytes() as u64);
    let store: Option<Arc<HostStore>> = manager.host_store();
    if let Some(store) = store {
        assert_eq!(store.num_blocks(), BLOCKS);
    }

    // The loop by hand, one guard per block.
    let mut h = model.embed.forward(&x);
    for (i, block) in model.blocks.iter().enumerate() {
        let guard: BlockGuard<'_> = manager.enter(i)?;
        h = tch::no_grad(|| block.forward_t(&h, false));
        guard.finish()?;
    }
    assert!(bits_equal(&h, &want));
    let stats: OffloadStats = manager.stats().clone();
    assert!(stats.uploads >= BLOCKS as u64, "{stats:?}");

    // The same loop from `&self`.
    let shared = SharedManager::new(manager);
    {
        let guard: SharedManagerGuard<'_> = shared.lock()?;
        assert_eq!(guard.num_blocks(), BLOCKS);
    }
    let Model {
        vs, embed, blocks, ..
    } = model;
    let stack: OffloadedBlocks<_> = OffloadedBlocks::new(blocks, shared)?;
    let got = tch::no_grad(|| stack.forward(&embed.forward(&x)));
    assert!(bits_equal(&got, &want));
    let (_, mut manager) = stack.into_parts();
    manager.restore()?;
    assert_eq!(vs.variables()["blocks.0.fc1.weight"].size(), vec![256, 64]);

    // The one call, with options.
    let manager = offload_with(&vs, "blocks", |c| c.cpu_test_mode(true))?;
    assert_eq!(manager.num_blocks(), BLOCKS);
    Ok(())
}

#[test]
fn the_other_root_items_are_named_from_the_root() -> Result<()> {
    // Timeline spans and their Chrome trace.
    let spans = [TimelineSpan {
        lane: Lane::Upload,
        block: 3,
        start_ms: 0.0,
        end_ms: 1.5,
    }];
    let trace = chrome_trace_json(&spans);
    assert!(trace.contains("\"upload 3\""), "{trace}");

    // Peer groups: one member is allowed, none is not.
    let group: Arc<PeerGroup> = PeerGroup::new(2)?;
    assert_eq!(group.size(), 2);
    assert!(PeerGroup::new(0).is_err());

    // TorchScript's process-wide switch, put back by the guard and by the closure form.
    let before = graph_optimizations()?;
    {
        let guard = GraphOptimizationsGuard::new(!before)?;
        assert_eq!(guard.previous(), before);
        assert_eq!(graph_optimizations()?, !before);
    }
    assert_eq!(graph_optimizations()?, before);
    assert_eq!(
        with_graph_optimizations(!before, graph_optimizations)??,
        !before
    );
    set_graph_optimizations(before)?;
    let missing = ScriptModule::load("no-such-module.pt", Device::Cpu);
    assert!(missing.is_err());
    let _: for<'a> fn(&'a MethodSchema, &str) -> Option<&'a Arg> = MethodSchema::arg;

    // The error type and the checkpoint module's type.
    let _: fn(String) -> TorchMessage = TorchMessage;
    assert!(Checkpoint::open("no-such-checkpoint.safetensors").is_err());
    Ok(())
}
