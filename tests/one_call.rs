//! The one call: `offload` / `offload_with` find each list's number of blocks from the tensor
//! names, build and initialize the manager; `OffloadedBlocks` runs the blocks through
//! `nn::Module::forward`. Bit for bit against the resident model, in the CPU test mode and on
//! CUDA.

use offload_testkit as common;

use common::Mode;
use common::model::bits_equal;
use layerwise_offload::{Error, OffloadConfig, OffloadedBlocks, Result, offload_with};
use rstest::rstest;
use tch::nn::{self, Module, ModuleT};
use tch::{Device, Kind, Tensor};

const DIM: i64 = 32;

/// `x + fc2(gelu(fc1(layer_norm(x))))`.
#[derive(Debug)]
struct Block {
    norm: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl Block {
    fn new(p: nn::Path, hidden: i64) -> Block {
        Block {
            norm: nn::layer_norm(&p / "norm", vec![DIM], Default::default()),
            fc1: nn::linear(&p / "fc1", DIM, hidden, Default::default()),
            fc2: nn::linear(&p / "fc2", hidden, DIM, Default::default()),
        }
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Tensor {
        x + self
            .fc2
            .forward(&self.fc1.forward(&self.norm.forward(x)).gelu("tanh"))
    }
}

/// An embedding, the block lists `lists` (name, count) in loop order, a head; seeded on the
/// CPU with non-zero biases.
struct Model {
    vs: nn::VarStore,
    embed: nn::Linear,
    blocks: Vec<Block>,
    head: nn::Linear,
}

/// `manual_seed` and the draws after it must not interleave with another test's: every draw
/// from libtorch's global generator in this file holds it (a layer's initialization is one: an
/// unlocked one in a test beside `model` gave the offloaded model other weights than the
/// resident one, and a forward differed in every element in 36 of 60 runs with 8 test threads).
static SEEDING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn model(lists: &[(&str, usize)], seed: i64) -> Model {
    let _seeding = SEEDING.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let embed = nn::linear(&root / "embed", 8, DIM, Default::default());
    let mut blocks = Vec::new();
    for (k, (attr, n)) in lists.iter().enumerate() {
        for i in 0..*n {
            blocks.push(Block::new(&root / *attr / i, (2 + k as i64) * DIM));
        }
    }
    let head = nn::linear(&root / "head", DIM, 8, Default::default());
    tch::no_grad(|| {
        let mut vars: Vec<_> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, mut t) in vars {
            let r = Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.05;
            let _ = t.f_add_(&r).unwrap();
        }
    });
    Model {
        vs,
        embed,
        blocks,
        head,
    }
}

fn input(device: Device) -> Tensor {
    let _seeding = SEEDING.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(99);
    Tensor::randn([2, 5, 8], (Kind::Float, Device::Cpu)).to_device(device)
}

/// The resident output of `lists`' model on `device`.
fn resident(lists: &[(&str, usize)], seed: i64, device: Device) -> Tensor {
    let mut m = model(lists, seed);
    m.vs.set_device(device);
    let x = input(device);
    tch::no_grad(|| {
        let h = m
            .blocks
            .iter()
            .fold(m.embed.forward(&x), |h, b| b.forward(&h));
        m.head.forward(&h)
    })
}

/// How `got` differs from `want`: the elements that differ and the largest difference.
fn difference(got: &Tensor, want: &Tensor) -> String {
    let (got, want) = (got.to_device(Device::Cpu), want.to_device(Device::Cpu));
    let differ = got.ne_tensor(&want).sum(Kind::Int64).int64_value(&[]);
    let max = (&got - &want).abs().max().double_value(&[]);
    format!("{differ} of {} elements, by up to {max:e}", got.numel())
}

/// Offloads `lists` with the one call, runs the model through `nn::Module::forward` (and
/// `forward_t`), compares with the resident output bit for bit, and restores.
fn case(mode: Mode, lists: &[(&str, usize)]) -> Result<()> {
    let Some(device) = mode.device() else {
        return Ok(());
    };
    let want = resident(lists, 5, device);
    let before = common::model::snapshot(&model(lists, 5).vs);

    let m = model(lists, 5);
    let names: Vec<&str> = lists.iter().map(|(a, _)| *a).collect();
    // The one call: no block counts given.
    let manager = offload_with(&m.vs, &names, |c| c.cpu_test_mode(mode == Mode::Cpu))?;
    let total: usize = lists.iter().map(|(_, n)| n).sum();
    assert_eq!(manager.num_blocks(), total);
    assert!(manager.is_initialized());
    let mut first = 0;
    for (attr, n) in lists {
        assert_eq!(manager.block_index(attr, 0), Some(first));
        assert_eq!(manager.block_index(attr, n - 1), Some(first + n - 1));
        assert_eq!(manager.block_index(attr, *n), None);
        first += n;
    }
    // Offloaded: the block tensors are placeholders now (but block 0's, uploaded already).
    let (attr0, n0) = lists[0];
    let last = format!("{attr0}.{}.fc1.weight", n0 - 1);
    assert_eq!(m.vs.variables()[&last].numel(), 0);

    let Model {
        vs,
        embed,
        blocks,
        head,
    } = m;
    let model = OffloadedBlocks::new(blocks, manager)?;
    let x = input(device);
    let got = tch::no_grad(|| head.forward(&model.forward(&embed.forward(&x))));
    assert!(
        bits_equal(&got, &want),
        "{mode:?} {lists:?}: forward differs ({})",
        difference(&got, &want)
    );
    // Through ModuleT too (tch's blanket implementation over Module), twice in a row.
    let again = tch::no_grad(|| head.forward(&model.forward_t(&embed.forward(&x), false)));
    assert!(bits_equal(&again, &want), "{mode:?}: forward_t differs");
    let stats = model.manager().stats();
    assert_eq!(stats.streamed_blocks, total);
    assert!(stats.uploads >= 2 * total as u64, "{stats:?}");

    let (_, mut manager) = model.into_parts();
    manager.restore_to(Device::Cpu)?;
    let after = common::model::snapshot(&vs);
    common::model::assert_same(&before, &after);
    Ok(())
}

#[rstest]
fn one_list_streams_through_module_forward(
    #[values(Mode::Cpu, Mode::Cuda)] mode: Mode,
) -> Result<()> {
    case(mode, &[("blocks", 5)])
}

#[rstest]
fn two_lists_in_one_call(#[values(Mode::Cpu, Mode::Cuda)] mode: Mode) -> Result<()> {
    case(mode, &[("double_blocks", 3), ("single_blocks", 4)])
}

#[test]
fn counts_are_read_from_the_names() -> Result<()> {
    let m = model(&[("double_blocks", 2), ("single_blocks", 3)], 1);
    // from_model gives the explicit builder, with the counts found, for more control.
    let config = OffloadConfig::from_model(&m.vs, ["double_blocks", "single_blocks"])?;
    let mut manager = config.cpu_test_mode(true).build(&m.vs)?;
    manager.initialize()?;
    assert_eq!(manager.num_blocks(), 5);
    assert_eq!(manager.block_index("single_blocks", 2), Some(4));
    manager.restore()?;
    // A String and a Vec<String> name lists too.
    let one = OffloadConfig::from_model(&m.vs, String::from("single_blocks"))?;
    let mut manager = one.cpu_test_mode(true).build(&m.vs)?;
    manager.initialize()?;
    assert_eq!(manager.num_blocks(), 3);
    manager.restore()?;
    Ok(())
}

#[test]
fn bad_lists_are_refused_with_what_exists() {
    let m = model(&[("blocks", 2)], 1);
    let before = common::model::snapshot(&m.vs);
    match offload_with(&m.vs, "layers", |c| c.cpu_test_mode(true)) {
        Err(Error::NoMatch { attr, prefixes }) => {
            assert_eq!(attr, "layers");
            assert!(prefixes.contains(&"blocks".to_owned()), "{prefixes:?}");
        }
        other => panic!("expected NoMatch, got {other:?}"),
    }
    let none: [&str; 0] = [];
    match offload_with(&m.vs, none, |c| c.cpu_test_mode(true)) {
        Err(Error::InvalidArgument { op, message }) => {
            assert_eq!(op, "OffloadConfig::from_model");
            assert!(message.contains("no block list"), "{message}");
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    common::model::assert_same(&before, &common::model::snapshot(&m.vs));
}

#[test]
fn a_gap_in_the_indices_is_named() {
    // blocks.0 and blocks.2: the count read is 3, and initialize names the missing block.
    let vs = nn::VarStore::new(Device::Cpu);
    {
        // Their initialization draws from the global generator too.
        let _seeding = SEEDING.lock().unwrap_or_else(|e| e.into_inner());
        let _a = nn::linear(vs.root() / "blocks" / 0, 4, 4, Default::default());
        let _b = nn::linear(vs.root() / "blocks" / 2, 4, 4, Default::default());
    }
    match offload_with(&vs, "blocks", |c| c.cpu_test_mode(true)) {
        Err(Error::MissingBlocks { attr, missing }) => {
            assert_eq!(attr, "blocks");
            assert_eq!(missing, vec![1]);
        }
        other => panic!("expected MissingBlocks, got {other:?}"),
    }
    assert_eq!(vs.variables()["blocks.2.weight"].size(), vec![4, 4]);
}

#[test]
fn without_cuda_the_default_call_says_why() {
    if layerwise_offload::accel::cuda_is_available() {
        eprintln!("note: a CUDA device is present; the no-device error is not checked");
        return;
    }
    let m = model(&[("blocks", 2)], 1);
    match layerwise_offload::offload(&m.vs, "blocks") {
        Err(Error::NoDevice { .. }) => {}
        other => panic!("expected NoDevice, got {other:?}"),
    }
    // And the fallback the message suggests gives a disabled manager, the model untouched.
    let manager = offload_with(&m.vs, "blocks", |c| c.allow_cpu_fallback(true)).unwrap();
    assert!(!manager.is_enabled());
    assert_eq!(
        m.vs.variables()["blocks.1.fc1.weight"].size(),
        vec![2 * DIM, DIM]
    );
}
