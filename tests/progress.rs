//! The progress callback of `initialize()`: every stage starts at 0, grows monotonically, one
//! report per block (or tensor), and ends at its total; the totals are the bytes the stage
//! moves. In the CPU test mode, from the model and from a sharded checkpoint.

use offload_testkit as common;

use common::model::{Block, Model};
use layerwise_offload::checkpoint::{Checkpoint, ShardedWriter};
use layerwise_offload::{OffloadConfig, Progress, Result, Stage, empty};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tch::{Device, Kind, nn};

/// A callback that records every report, and the reports so far.
fn recorder() -> (
    impl Fn(&Progress) + Send + Sync + 'static,
    Arc<Mutex<Vec<Progress>>>,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    (move |p: &Progress| log.lock().unwrap().push(*p), seen)
}

/// Checks the reports' shape and returns them by stage, in the order the stages ran.
fn by_stage(reports: &[Progress]) -> Vec<(Stage, Vec<Progress>)> {
    let mut out: Vec<(Stage, Vec<Progress>)> = Vec::new();
    for p in reports {
        match out.last_mut() {
            Some((s, v)) if *s == p.stage => v.push(*p),
            _ => {
                assert!(
                    out.iter().all(|(s, _)| *s != p.stage),
                    "stage {:?} reported twice, apart: {reports:?}",
                    p.stage
                );
                out.push((p.stage, vec![*p]));
            }
        }
    }
    for (stage, v) in &out {
        let first = v[0];
        assert_eq!(
            (first.done, first.blocks_done),
            (0, 0),
            "{stage:?} starts at 0"
        );
        assert!(
            first.total > 0 && first.blocks_total > 0,
            "{stage:?}: {first:?}"
        );
        assert_eq!(
            v.len(),
            first.blocks_total + 1,
            "{stage:?}: one report per item"
        );
        for (k, w) in v.windows(2).enumerate() {
            assert!(w[1].done >= w[0].done, "{stage:?} went back: {w:?}");
            assert_eq!(w[1].blocks_done, k + 1, "{stage:?}");
            assert_eq!(
                (w[1].total, w[1].blocks_total),
                (first.total, first.blocks_total)
            );
        }
        let last = v.last().unwrap();
        assert_eq!(last.done, last.total, "{stage:?} ends at its total");
        assert_eq!(last.fraction(), 1.0);
    }
    out
}

#[test]
fn initialize_reports_the_host_copy_of_every_streamed_block() -> Result<()> {
    let model = Model::new(Device::Cpu, 3, true, 1);
    let (callback, seen) = recorder();
    let mut m = OffloadConfig::from_model(&model.vs, ["double_blocks", "single_blocks"])?
        .cpu_test_mode(true)
        .on_progress(callback)
        .build(&model.vs)?;
    m.initialize()?;
    let plan = m.plan().unwrap().clone();
    let stages = by_stage(&seen.lock().unwrap());
    assert_eq!(stages.len(), 1, "{stages:?}");
    let (stage, reports) = &stages[0];
    assert_eq!(*stage, Stage::HostCopy);
    assert_eq!(reports[0].total, plan.total_bytes() as u64);
    assert_eq!(reports[0].blocks_total, 7);
    // Each step is one block's layout, in loop order.
    for (w, l) in reports.windows(2).zip(&plan.blocks) {
        assert_eq!(w[1].done - w[0].done, l.bytes as u64);
    }
    // initialize() again is a no-op and reports nothing.
    let n = seen.lock().unwrap().len();
    m.initialize()?;
    assert_eq!(seen.lock().unwrap().len(), n);
    m.restore()?;
    Ok(())
}

/// `set_encoded_blocks` reports each block whose form changes (blocks leaving their encoding
/// first), once per call, and nothing where no block changes.
#[test]
fn converting_block_forms_reports_each_converted_block() -> Result<()> {
    let model = Model::new(Device::Cpu, 5, false, 3);
    let (callback, seen) = recorder();
    let mut m = OffloadConfig::new("blocks", 5)
        .cpu_test_mode(true)
        .compress(true)
        .on_progress(callback)
        .build(&model.vs)?;
    m.initialize()?;
    let plan = m.plan().unwrap().clone();
    seen.lock().unwrap().clear();
    // All 5 encoded to 2 (blocks 2 and 4, spread evenly): blocks 0, 1 and 3 decoded.
    m.set_encoded_blocks(2)?;
    let stages = by_stage(&seen.lock().unwrap());
    assert_eq!(stages.len(), 1, "{stages:?}");
    let (stage, reports) = &stages[0];
    assert_eq!(*stage, Stage::Convert);
    assert_eq!(reports[0].blocks_total, 3);
    let bytes = |i: usize| plan.blocks[i].bytes as u64;
    assert_eq!(reports[0].total, bytes(0) + bytes(1) + bytes(3));
    assert_eq!(m.stats().encoded_blocks, 2);
    // The same count again changes nothing and reports nothing.
    seen.lock().unwrap().clear();
    m.set_encoded_blocks(2)?;
    assert!(seen.lock().unwrap().is_empty());
    m.restore()?;
    Ok(())
}

#[test]
fn a_budget_and_compression_count_only_what_goes_to_host_memory() -> Result<()> {
    let model = Model::new(Device::Cpu, 4, false, 2);
    let block = {
        let mut probe = OffloadConfig::from_model(&model.vs, "blocks")?
            .cpu_test_mode(true)
            .build(&model.vs)?;
        probe.initialize()?;
        let b = probe.plan().unwrap().blocks[0].bytes as u64;
        probe.restore()?;
        b
    };
    let (callback, seen) = recorder();
    // Room for the two-slot ring and one resident block: three blocks stream.
    let mut m = OffloadConfig::from_model(&model.vs, "blocks")?
        .cpu_test_mode(true)
        .vram_budget(3 * block)
        .compress(true)
        .on_progress(callback)
        .build(&model.vs)?;
    m.initialize()?;
    let streamed = m.stats().streamed_blocks;
    assert!(streamed > 0 && streamed < 4, "{streamed}");
    let stages = by_stage(&seen.lock().unwrap());
    let host: Vec<_> = stages
        .iter()
        .filter(|(s, _)| *s == Stage::HostCopy)
        .collect();
    assert_eq!(host.len(), 1, "{stages:?}");
    assert_eq!(host[0].1[0].blocks_total, streamed);
    assert_eq!(host[0].1[0].total, streamed as u64 * block);
    m.restore()?;
    Ok(())
}

#[test]
fn checkpoint_loading_reports_the_device_tensors_and_the_blocks_read() -> Result<()> {
    let source = Model::new(Device::Cpu, 3, false, 3);
    let dir = tempdir("progress-ckpt");
    ShardedWriter::new(&dir, 64 << 10).write(&source.vs)?;
    let ckpt = Checkpoint::open(&dir)?;
    let sizes: BTreeMap<String, u64> = ckpt
        .tensors()
        .iter()
        .map(|(n, t)| (n.clone(), t.bytes as u64))
        .collect();

    // The same model, uninitialized, loaded from the checkpoint.
    let (vs, _blocks) = empty::build(Device::Cpu, Kind::Float, |root| {
        let dim = common::model::DIM;
        let _embed = nn::linear(root / "embed", 16, dim, Default::default());
        let blocks: Vec<Block> = (0..3)
            .map(|i| Block::new(root / "blocks" / i, dim, 4 * dim, 4))
            .collect();
        let _head = nn::linear(root / "head", dim, 16, Default::default());
        blocks
    })?;
    let (callback, seen) = recorder();
    let mut m = OffloadConfig::from_model(&vs, "blocks")?
        .cpu_test_mode(true)
        .checkpoint(ckpt)
        .on_progress(callback)
        .build(&vs)?;
    m.initialize()?;
    let stages = by_stage(&seen.lock().unwrap());
    let names: Vec<Stage> = stages.iter().map(|(s, _)| *s).collect();
    assert_eq!(names, [Stage::CheckpointToDevice, Stage::CheckpointRead]);
    let non_block: u64 = sizes
        .iter()
        .filter(|(n, _)| !n.starts_with("blocks."))
        .map(|(_, b)| b)
        .sum();
    let non_block_count = sizes.keys().filter(|n| !n.starts_with("blocks.")).count();
    assert_eq!(stages[0].1[0].total, non_block);
    assert_eq!(stages[0].1[0].blocks_total, non_block_count);
    assert_eq!(stages[1].1[0].total, m.plan().unwrap().total_bytes() as u64);
    assert_eq!(stages[1].1[0].blocks_total, 3);
    // The values are the checkpoint's.
    m.restore()?;
    common::model::assert_same(&source.snapshot(), &common::model::snapshot(&vs));
    std::fs::remove_dir_all(&dir).unwrap();
    Ok(())
}

#[test]
fn stage_names_read_well() {
    assert_eq!(Stage::CheckpointRead.to_string(), "reading the checkpoint");
    assert_eq!(Stage::HostCopy.name(), "blocks into host memory");
    let empty = Progress {
        stage: Stage::ToDevice,
        done: 0,
        total: 0,
        blocks_done: 0,
        blocks_total: 0,
    };
    assert_eq!(empty.fraction(), 1.0);
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("lo-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn on_cuda_the_non_block_weights_report_their_move_to_the_device() -> Result<()> {
    let Some(_) = common::cuda() else {
        return Ok(());
    };
    let model = Model::new(Device::Cpu, 2, false, 4);
    let non_block: u64 = model
        .vs
        .variables()
        .iter()
        .filter(|(n, _)| !n.starts_with("blocks."))
        .map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
        .sum();
    let (callback, seen) = recorder();
    let mut m = layerwise_offload::offload_with(&model.vs, "blocks", |c| c.on_progress(callback))?;
    let stages = by_stage(&seen.lock().unwrap());
    let names: Vec<Stage> = stages.iter().map(|(s, _)| *s).collect();
    assert_eq!(names, [Stage::ToDevice, Stage::HostCopy]);
    assert_eq!(stages[0].1[0].total, non_block);
    assert_eq!(stages[1].1[0].total, m.plan().unwrap().total_bytes() as u64);
    m.restore()?;
    Ok(())
}
