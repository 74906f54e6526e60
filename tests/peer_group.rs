//! Peer groups: members split every upload (each sends its share of the block to the others).
//! The CPU test mode runs the whole protocol with synchronous copies; on CUDA the members use
//! devices 0 and 1 where there are two (both on device 0 otherwise, unless
//! `OFFLOAD_REQUIRE_GPUS=2`).

use offload_testkit as common;

use common::Mode;
use common::model::{Model, assert_same, bits_equal};
use layerwise_offload::{Error, LayerwiseOffloadManager, OffloadConfig, PeerGroup};
use rstest::rstest;
use std::sync::Arc;
use std::time::Duration;
use tch::{Device, Tensor};

/// The devices of `n` members in `mode` (None: CUDA asked for and absent, after SKIP).
fn member_devices(mode: Mode, n: usize) -> Option<Vec<Device>> {
    match mode {
        Mode::Cpu => Some(vec![Device::Cpu; n]),
        Mode::Cuda => Some(
            common::cuda_devices(n)?
                .into_iter()
                .map(Device::Cuda)
                .collect(),
        ),
    }
}

fn config(mode: Mode, dev: Device, n: usize) -> OffloadConfig {
    let cfg = mode.config("blocks", n);
    match dev {
        Device::Cuda(i) => cfg.device(i),
        _ => cfg,
    }
}

/// One instance of the model per member, with the same weights.
fn models(devs: &[Device], blocks: usize) -> anyhow::Result<Vec<Model>> {
    let mut models = vec![Model::new(devs[0], blocks, false, 61)];
    for (g, &d) in devs.iter().enumerate().skip(1) {
        let mut m = Model::new(d, blocks, false, 62 + g as i64);
        m.vs.copy(&models[0].vs)?;
        models.push(m);
    }
    Ok(models)
}

/// A manager per model over one host store, in one group (member g has rank g).
fn members(
    mode: Mode,
    devs: &[Device],
    models: Vec<Model>,
    depth: usize,
    group: &Arc<PeerGroup>,
    push_per_member: bool,
    push_chunk: Option<usize>,
) -> anyhow::Result<Vec<(Model, LayerwiseOffloadManager)>> {
    let blocks = models[0].num_blocks();
    let mut out: Vec<(Model, LayerwiseOffloadManager)> = Vec::new();
    let mut store = None;
    for (g, model) in models.into_iter().enumerate() {
        let mut cfg = config(mode, devs[g], blocks)
            .prefetch_depth(depth)
            .peer_group(group.clone(), g)
            .push_stream_per_member(push_per_member);
        if let Some(bytes) = push_chunk {
            cfg = cfg.peer_push_chunk_bytes(bytes);
        }
        if let Some(s) = &store {
            cfg = cfg.host_store(Arc::clone(s));
        }
        let mut m = cfg.build(&model.vs)?;
        m.initialize()?;
        if store.is_none() {
            store = m.host_store();
        }
        out.push((model, m));
    }
    Ok(out)
}

/// Runs `forwards` forwards on every member, one thread each; returns the members and their
/// outputs.
fn run_all(
    members: Vec<(Model, LayerwiseOffloadManager)>,
    x: &Tensor,
    forwards: usize,
) -> Vec<(Model, LayerwiseOffloadManager, Vec<Tensor>)> {
    let handles: Vec<_> = members
        .into_iter()
        .map(|(model, mut m)| {
            let x = x.copy();
            std::thread::spawn(move || {
                let ys = (0..forwards)
                    .map(|_| model.forward(&x, Some(&mut m)))
                    .collect();
                (model, m, ys)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Every member computes what the resident model does, having moved about 1/n of every block
/// from the host. The `chunked` cases send each share on in chunks of 1000 bytes (an odd size:
/// chunk edges fall anywhere in the block), many per share, as 64 MiB chunks do for blocks of
/// real models.
#[rstest]
#[case::two(2, 1, false, None)]
#[case::three_deeper(3, 2, false, None)]
#[case::three_push_per_member(3, 1, true, None)]
#[case::two_chunked(2, 1, false, Some(1000))]
#[case::three_chunked_push_per_member(3, 2, true, Some(1000))]
fn members_split_every_upload(
    #[values(Mode::Cpu, Mode::Cuda)] mode: Mode,
    #[case] n: usize,
    #[case] depth: usize,
    #[case] push_per_member: bool,
    #[case] push_chunk: Option<usize>,
) -> anyhow::Result<()> {
    let Some(devs) = member_devices(mode, n) else {
        return Ok(());
    };
    let group = PeerGroup::new(n)?;
    let models = models(&devs, 5)?;
    let before = models[0].snapshot();
    let x = models[0].input(3);
    let wants: Vec<Tensor> = models.iter().map(|m| m.forward(&x, None)).collect();
    let ms = members(
        mode,
        &devs,
        models,
        depth,
        &group,
        push_per_member,
        push_chunk,
    )?;
    let block_bytes = ms[0].1.plan().unwrap().blocks[0].bytes as u64;
    if let Some(chunk) = push_chunk {
        assert!(
            block_bytes as usize / n > 4 * chunk,
            "a share of {block_bytes} / {n} bytes goes in several chunks of {chunk}"
        );
    }
    let done = run_all(ms, &x, 3);
    for (g, ((model, mut m, ys), want)) in done.into_iter().zip(&wants).enumerate() {
        for y in &ys {
            assert!(bits_equal(y, want), "member {g}: output differs");
        }
        let st = m.stats().clone();
        // Each upload moved the whole block into the slot, a 1/n share of it from the host.
        assert!(st.uploads > 0);
        assert_eq!(st.bytes_uploaded + st.peer_bytes, st.uploads * block_bytes);
        let share = st.bytes_uploaded as f64 / (st.uploads * block_bytes) as f64;
        assert!(
            (share - 1.0 / n as f64).abs() < 0.05,
            "member {g} uploaded {share:.3} of the bytes, expected about 1/{n}"
        );
        m.restore()?;
        assert_same(&model.snapshot(), &before);
    }
    assert!(group.broken().is_none());
    Ok(())
}

/// Enters blocks in `order` (without compute), stopping at the first error.
fn enter_all(m: &mut LayerwiseOffloadManager, order: &[usize]) -> layerwise_offload::Result<()> {
    for &i in order {
        m.enter(i)?.finish()?;
    }
    Ok(())
}

#[test]
fn members_that_diverge_get_an_error_not_a_hang() -> anyhow::Result<()> {
    let devs = [Device::Cpu, Device::Cpu];
    let group = PeerGroup::with_timeout(2, Duration::from_secs(20))?;
    let models = models(&devs, 4)?;
    let before = models[0].snapshot();
    let mut ms = members(Mode::Cpu, &devs, models, 1, &group, false, None)?;
    let (model1, mut m1) = ms.pop().unwrap();
    let (model0, mut m0) = ms.pop().unwrap();
    // Member 1 skips block 0: its first upload is block 1, member 0's is block 0.
    let t = std::thread::spawn(move || {
        let r = enter_all(&mut m1, &[1, 2, 3]);
        (m1, r)
    });
    let r0 = enter_all(&mut m0, &[0, 1, 2, 3]);
    let (mut m1, r1) = t.join().unwrap();
    for (g, r) in [(0, r0), (1, r1)] {
        match r {
            Err(e @ Error::PeerGroup { .. }) => {
                let text = e.to_string();
                assert!(text.contains("block"), "member {g}: {text}");
                assert!(text.contains("same blocks in the same order"), "{text}");
            }
            r => panic!("member {g}: expected a PeerGroup error, got {r:?}"),
        }
    }
    assert!(group.broken().is_some());
    // Broken for good: the next upload fails at once.
    assert!(matches!(
        m0.enter(2).map(|_| ()),
        Err(Error::PeerGroup { .. })
    ));
    // Nothing lost.
    m0.restore()?;
    m1.restore()?;
    assert_same(&model0.snapshot(), &before);
    assert_same(&model1.snapshot(), &before);
    Ok(())
}

#[test]
fn a_member_that_leaves_fails_the_others_next_upload() -> anyhow::Result<()> {
    let devs = [Device::Cpu, Device::Cpu];
    let group = PeerGroup::with_timeout(2, Duration::from_secs(20))?;
    let models = models(&devs, 4)?;
    let before = models[0].snapshot();
    let x = models[0].input(4);
    let ms = members(Mode::Cpu, &devs, models, 1, &group, false, None)?;
    let mut done = run_all(ms, &x, 1);
    let (model1, mut m1, _) = done.pop().unwrap();
    let (model0, mut m0, _) = done.pop().unwrap();
    m1.restore()?;
    assert_same(&model1.snapshot(), &before);
    // Member 0's next upload needs member 1, which is gone: an error naming it, at once.
    let t = std::time::Instant::now();
    let r = enter_all(&mut m0, &[0, 1, 2, 3]);
    match r {
        Err(e @ Error::PeerGroup { .. }) => assert!(e.to_string().contains("left"), "{e}"),
        r => panic!("expected a PeerGroup error, got {r:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(10));
    m0.restore()?;
    assert_same(&model0.snapshot(), &before);
    Ok(())
}

#[test]
fn a_member_whose_upload_fails_fails_the_others_at_once() -> anyhow::Result<()> {
    let devs = [Device::Cpu, Device::Cpu];
    let group = PeerGroup::with_timeout(2, Duration::from_secs(60))?;
    let models = models(&devs, 4)?;
    let before = models[0].snapshot();
    let mut it = models.into_iter();
    let (model0, model1) = (it.next().unwrap(), it.next().unwrap());
    let mut m0 = OffloadConfig::new("blocks", 4)
        .cpu_test_mode(true)
        .peer_group(group.clone(), 0)
        .build(&model0.vs)?;
    m0.initialize()?;
    // Member 1's third upload fails (an injected device error).
    let mut m1 = OffloadConfig::new("blocks", 4)
        .cpu_test_mode(true)
        .host_store(m0.host_store().unwrap())
        .peer_group(group.clone(), 1)
        .inject_fault(layerwise_offload::Fault::Upload(2))
        .build(&model1.vs)?;
    m1.initialize()?;
    let t = std::time::Instant::now();
    let h = std::thread::spawn(move || {
        let r = enter_all(&mut m1, &[0, 1, 2, 3]);
        (m1, r)
    });
    let r0 = enter_all(&mut m0, &[0, 1, 2, 3]);
    let (mut m1, r1) = h.join().unwrap();
    assert!(matches!(r1, Err(Error::Torch { .. })), "{r1:?}");
    match r0 {
        Err(e @ Error::PeerGroup { .. }) => assert!(e.to_string().contains("injected"), "{e}"),
        r => panic!("expected a PeerGroup error, got {r:?}"),
    }
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "waited for the timeout"
    );
    m0.restore()?;
    m1.restore()?;
    assert_same(&model0.snapshot(), &before);
    assert_same(&model1.snapshot(), &before);
    Ok(())
}

#[test]
fn a_member_that_never_comes_times_out() -> anyhow::Result<()> {
    let group = PeerGroup::with_timeout(2, Duration::from_millis(200))?;
    let model = Model::new(Device::Cpu, 3, false, 63);
    let before = model.snapshot();
    let mut m = OffloadConfig::new("blocks", 3)
        .cpu_test_mode(true)
        .peer_group(group.clone(), 0)
        .build(&model.vs)?;
    m.initialize()?;
    match m.enter(0).map(|_| ()) {
        Err(e @ Error::PeerGroup { .. }) => {
            let text = e.to_string();
            assert!(text.contains("[1]") && text.contains("within"), "{text}");
        }
        r => panic!("expected a PeerGroup error, got {r:?}"),
    }
    m.restore()?;
    assert_same(&model.snapshot(), &before);
    Ok(())
}

#[test]
fn ranks_are_checked() -> anyhow::Result<()> {
    assert!(matches!(
        PeerGroup::new(0),
        Err(Error::InvalidArgument { .. })
    ));
    let group = PeerGroup::new(2)?;
    let model = Model::new(Device::Cpu, 3, false, 64);
    let cfg = || OffloadConfig::new("blocks", 3).cpu_test_mode(true);
    match cfg().peer_group(group.clone(), 2).build(&model.vs) {
        Err(e @ Error::InvalidArgument { .. }) => assert!(e.to_string().contains("rank 2"), "{e}"),
        r => panic!("expected InvalidArgument, got {:?}", r.map(|_| ())),
    }
    // Chunks of 0 bytes would never send anything.
    match cfg()
        .peer_group(group.clone(), 0)
        .peer_push_chunk_bytes(0)
        .build(&model.vs)
    {
        Err(e @ Error::InvalidArgument { .. }) => {
            assert!(e.to_string().contains("peer_push_chunk_bytes"), "{e}")
        }
        r => panic!("expected InvalidArgument, got {:?}", r.map(|_| ())),
    }
    let mut a = cfg().peer_group(group.clone(), 1).build(&model.vs)?;
    a.initialize()?;
    let other = Model::new(Device::Cpu, 3, false, 65);
    let before = other.snapshot();
    let mut b = cfg().peer_group(group.clone(), 1).build(&other.vs)?;
    match b.initialize() {
        Err(e @ Error::InvalidArgument { .. }) => assert!(e.to_string().contains("taken"), "{e}"),
        r => panic!("expected InvalidArgument, got {r:?}"),
    }
    // The refused member changed nothing.
    assert_same(&other.snapshot(), &before);
    a.restore()?;
    Ok(())
}

#[test]
fn block_updates_are_refused_in_a_group() -> anyhow::Result<()> {
    let group = PeerGroup::new(1)?;
    let model = Model::new(Device::Cpu, 3, false, 66);
    let mut m = OffloadConfig::new("blocks", 3)
        .cpu_test_mode(true)
        .peer_group(group, 0)
        .build(&model.vs)?;
    let x = model.input(5);
    let want = model.forward(&x, None);
    m.initialize()?;
    let name = "blocks.1.fc1.weight";
    let w = m.tensor(name)?.copy();
    assert!(matches!(
        m.update_tensor(name, &w),
        Err(Error::InvalidArgument { .. })
    ));
    // A group of one is an ordinary manager that uploads everything itself.
    assert!(bits_equal(&model.forward(&x, Some(&mut m)), &want));
    assert_eq!(m.stats().peer_bytes, 0);
    m.restore()?;
    assert!(bits_equal(&model.forward(&x, None), &want));
    Ok(())
}

#[test]
fn a_member_may_retry_a_failed_initialize() -> anyhow::Result<()> {
    let group = PeerGroup::new(1)?;
    let model = Model::new(Device::Cpu, 3, false, 67);
    let x = model.input(6);
    let want = model.forward(&x, None);
    let before = model.snapshot();
    // The refused host allocation comes after the member joined the group.
    let mut m = OffloadConfig::new("blocks", 3)
        .cpu_test_mode(true)
        .peer_group(group.clone(), 0)
        .inject_fault(layerwise_offload::Fault::HostAlloc(1))
        .build(&model.vs)?;
    assert!(matches!(m.initialize(), Err(Error::HostAlloc { .. })));
    assert_same(&model.snapshot(), &before);
    assert_eq!(group.broken(), None);
    // Its rank is free again: the retry joins and runs.
    m.initialize()?;
    assert!(bits_equal(&model.forward(&x, Some(&mut m)), &want));
    m.restore()?;
    assert_same(&model.snapshot(), &before);
    Ok(())
}

#[test]
fn a_group_may_wait_without_limit() -> anyhow::Result<()> {
    let group = PeerGroup::with_timeout(1, Duration::MAX)?;
    let model = Model::new(Device::Cpu, 3, false, 68);
    let x = model.input(7);
    let want = model.forward(&x, None);
    let mut m = OffloadConfig::new("blocks", 3)
        .cpu_test_mode(true)
        .peer_group(group, 0)
        .build(&model.vs)?;
    m.initialize()?;
    assert!(bits_equal(&model.forward(&x, Some(&mut m)), &want));
    m.restore()?;
    Ok(())
}
