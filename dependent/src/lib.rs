//! What a user's crate does with layerwise-offload: a small block model built on the CPU, its
//! blocks streamed to the GPU through the manager, checked bit for bit against the same model
//! resident. Shared by this crate's binary and its tests.

use layerwise_offload::{OffloadConfig, OffloadedBlocks, Result};
use std::sync::Mutex;
use tch::nn::{self, Module, ModuleT};
use tch::{Device, Kind, Tensor};

/// `manual_seed` and the draws after it must not interleave with another thread's (tests run
/// on several threads; the generator is process-wide).
static SEEDING: Mutex<()> = Mutex::new(());

/// Width of the model.
pub const DIM: i64 = 64;
/// Number of blocks.
pub const BLOCKS: usize = 6;

/// One block: `x + fc2(gelu(fc1(layer_norm(x))))`.
#[derive(Debug)]
pub struct Block {
    norm: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl Block {
    fn new(p: nn::Path) -> Block {
        Block {
            norm: nn::layer_norm(&p / "norm", vec![DIM], Default::default()),
            fc1: nn::linear(&p / "fc1", DIM, 4 * DIM, Default::default()),
            fc2: nn::linear(&p / "fc2", 4 * DIM, DIM, Default::default()),
        }
    }
}

impl ModuleT for Block {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Tensor {
        x + self
            .fc2
            .forward(&self.fc1.forward(&self.norm.forward(x)).gelu("tanh"))
    }
}

/// A model: an input projection (stays on the device), `BLOCKS` blocks named `blocks.<i>.…`
/// (streamed), and its weights in `vs`.
#[derive(Debug)]
pub struct Model {
    /// The weights.
    pub vs: nn::VarStore,
    /// The input projection (not a block: it stays on the device).
    pub embed: nn::Linear,
    /// The blocks, in loop order.
    pub blocks: Vec<Block>,
}

impl Model {
    /// Seeded random weights, on the CPU.
    pub fn new(seed: i64) -> Model {
        let _seeding = SEEDING.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let embed = nn::linear(&root / "embed", DIM, DIM, Default::default());
        let blocks = (0..BLOCKS)
            .map(|i| Block::new(&root / "blocks" / i))
            .collect();
        Model { vs, embed, blocks }
    }

    /// A seeded input on `device` (drawn on the CPU).
    pub fn input(device: Device, seed: i64) -> Tensor {
        let _seeding = SEEDING.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(seed);
        Tensor::randn([2, 16, DIM], (Kind::Float, Device::Cpu)).to_device(device)
    }

    /// The resident forward.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.blocks
            .iter()
            .fold(self.embed.forward(x), |h, b| b.forward_t(&h, false))
    }
}

/// What [`streamed_against_resident`] found.
#[derive(Debug)]
pub struct Check {
    /// The device the loop ran on.
    pub device: Device,
    /// Whether the manager streamed (false: disabled).
    pub enabled: bool,
    /// Uploads the manager made.
    pub uploads: u64,
    /// Largest absolute difference between the streamed and the resident output.
    pub max_abs_diff: f64,
    /// Whether the outputs are equal bit for bit.
    pub bit_exact: bool,
}

/// Runs the model resident on `device`, then streamed through the manager (built on the CPU;
/// on the CPU in the manager's CPU test mode), through both the guard loop and the `&self`
/// driver, and compares the outputs.
pub fn streamed_against_resident(device: Device) -> Result<Check> {
    let seed = 7;
    let x = Model::input(device, 11);
    // Both copies are drawn on the CPU (CUDA's generator gives other numbers for one seed).
    let mut resident = Model::new(seed);
    resident.vs.set_device(device);
    let want = tch::no_grad(|| resident.forward(&x));

    let model = Model::new(seed);
    let mut manager = OffloadConfig::new("blocks", BLOCKS)
        .cpu_test_mode(device == Device::Cpu)
        .build(&model.vs)?;
    manager.initialize()?;
    let Model { vs, embed, blocks } = model;
    // The guard loop.
    let h = tch::no_grad(|| -> Result<Tensor> {
        let mut h = embed.forward(&x);
        for (i, block) in blocks.iter().enumerate() {
            let _on_device = manager.enter(i)?;
            h = block.forward_t(&h, false);
        }
        Ok(h)
    })?;
    // The same through `&self`, as an `nn::ModuleT`.
    let stack = OffloadedBlocks::new(blocks, manager)?;
    let got = tch::no_grad(|| stack.forward_t(&embed.forward(&x), false));
    let stats = stack.manager().stats();
    let (_, mut manager) = stack.into_parts();
    let enabled = manager.is_enabled();
    manager.restore()?;
    drop(vs);
    let diff = |a: &Tensor| (a - &want).abs().max().double_value(&[]);
    Ok(Check {
        device,
        enabled,
        uploads: stats.uploads,
        max_abs_diff: diff(&h).max(diff(&got)),
        bit_exact: bits_equal(&h, &want) && bits_equal(&got, &want),
    })
}

/// Whether two tensors are equal bit for bit.
pub fn bits_equal(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size()
        && a.kind() == b.kind()
        && a.to_device(Device::Cpu)
            .view_dtype(Kind::Int)
            .equal(&b.to_device(Device::Cpu).view_dtype(Kind::Int))
}
