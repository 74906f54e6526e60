//! A TorchScript diffusion transformer driven from Rust: load the module, hand its parameters
//! and buffers to the offload manager, and run the block loop over its submodules.
//!
//! ```text
//! python3 scripts/export_torchscript_dit.py /tmp/ts          # writes dit_scripted.pt, dit_traced.pt
//! cargo run --release --example torchscript_layer_loop -- /tmp/ts/dit_scripted.pt [--blocks 4]
//! cargo run --release --example torchscript_layer_loop -- tests/fixtures/wan_blocks
//! ```
//! With a `.pt` file the module's `forward` must be `head(blocks[n-1](… blocks[0](embed(x))))`,
//! the layout the export script writes. With a directory written by
//! `scripts/export_diffusers_block.py` it runs diffusers' Wan blocks traced one by one
//! (`wan_blocks_per_block.pt`), passing each block's inputs by name (the rotary embedding as one
//! `(cos, sin)` tuple) with the inputs the export saved. Either way the example prints block 0's
//! signature as libtorch recorded it, compares the layer loop's output with the module's own
//! `forward` (resident) and prints one `RESULT {json}` line with `max_abs_diff`. Without a CUDA
//! device it runs in the manager's CPU test mode.

use anyhow::Result;
use clap::Parser;
use layerwise_offload::{
    LayerwiseOffloadManager, OffloadConfig, ScriptModule, WeightSource, accel,
    with_graph_optimizations,
};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, IValue, Kind, Tensor};

use offload_testkit::util;
use util::int_in;

/// How one block is called and what the module's whole `forward` takes.
enum Model {
    /// `scripts/export_torchscript_dit.py`: embed, blocks, head over one input `x`.
    Dit {
        embed: ScriptModule,
        head: ScriptModule,
        x: Tensor,
    },
    /// `scripts/export_diffusers_block.py`: Wan blocks with named inputs.
    Wan { io: HashMap<String, Tensor> },
}

impl Model {
    fn wan_args(io: &HashMap<String, Tensor>, h: &Tensor) -> Vec<(&'static str, IValue)> {
        let iv = |t: &Tensor| IValue::Tensor(t.shallow_clone());
        vec![
            ("hidden_states", iv(h)),
            ("encoder_hidden_states", iv(&io["encoder_hidden_states"])),
            ("temb", iv(&io["temb"])),
            (
                "rotary_emb",
                IValue::Tuple(vec![iv(&io["rotary_cos"]), iv(&io["rotary_sin"])]),
            ),
        ]
    }

    /// The whole module's own `forward`, resident.
    fn resident(&self, module: &ScriptModule) -> layerwise_offload::Result<Tensor> {
        match self {
            Model::Dit { x, .. } => module.forward(&[x]),
            Model::Wan { io } => Ok(Tensor::try_from(
                module.call_named("forward", &Self::wan_args(io, &io["hidden_states"]))?,
            )?),
        }
    }

    /// The layer loop over `blocks` through the manager.
    fn layer_loop(
        &self,
        m: &mut LayerwiseOffloadManager,
        blocks: &[ScriptModule],
    ) -> layerwise_offload::Result<Tensor> {
        match self {
            Model::Dit { embed, head, x } => {
                let mut h = embed.forward(&[x])?;
                for (i, b) in blocks.iter().enumerate() {
                    let _on_device = m.enter(i)?;
                    h = b.forward(&[&h])?;
                }
                head.forward(&[&h])
            }
            Model::Wan { io } => {
                let mut h = io["hidden_states"].shallow_clone();
                for (i, b) in blocks.iter().enumerate() {
                    let _on_device = m.enter(i)?;
                    h = Tensor::try_from(b.call_named("forward", &Self::wan_args(io, &h))?)?;
                }
                Ok(h)
            }
        }
    }
}

/// A TorchScript diffusion transformer (or traced diffusers Wan blocks) run block by block
/// through the offload manager, compared with the module's own `forward`.
#[derive(Debug, Parser)]
#[command(name = "torchscript_layer_loop", allow_negative_numbers = true)]
struct Args {
    /// A module written by scripts/export_torchscript_dit.py, or a directory written by
    /// scripts/export_diffusers_block.py.
    #[arg(value_name = "MODULE.pt|FIXTURE_DIR")]
    path: String,
    /// Blocks of the module to run (default: all).
    #[arg(long, value_parser = int_in(1, 10_000))]
    blocks: Option<i64>,
}

fn main() -> Result<()> {
    // SAFETY: the first statement of main: no other thread exists yet to touch the environment.
    unsafe { accel::use_recommended_hardware_queues() };
    let args = Args::parse();
    let path = args.path;
    let blocks = args.blocks.map(|b| b as usize);
    let cuda = accel::cuda_is_available();
    let dev = if cuda { Device::Cuda(0) } else { Device::Cpu };
    let dir = Path::new(&path);
    let file = if dir.is_dir() {
        dir.join("wan_blocks_per_block.pt")
    } else {
        dir.to_path_buf()
    };
    let module = ScriptModule::load(&file, dev)?;
    module.eval()?;
    let named = module.named_tensors()?;
    let n = match blocks {
        Some(n) => n,
        None => named
            .iter()
            .filter_map(|(n, _)| {
                n.strip_prefix("blocks.")?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .max()
            .map_or(0, |m| m + 1),
    };
    let block_mods = (0..n)
        .map(|i| module.submodule(&format!("blocks.{i}")))
        .collect::<layerwise_offload::Result<Vec<_>>>()?;
    if let Some(b) = block_mods.first() {
        // A traced block takes its inputs in the order the trace used them: print it.
        println!("blocks.0.{}", b.method_schema("forward")?);
    }
    let model = if dir.is_dir() {
        let io = Tensor::read_safetensors(dir.join("wan_io.safetensors"))?
            .into_iter()
            .map(|(k, t)| (k, t.to_device(dev)))
            .collect();
        Model::Wan { io }
    } else {
        tch::manual_seed(0);
        Model::Dit {
            embed: module.submodule("embed")?,
            head: module.submodule("head")?,
            x: Tensor::randn([2, 24, 16], (Kind::Float, dev)),
        }
    };

    // Run ops one by one, as the layer loop does: fused graphs could round differently. The
    // setting is per thread, so it is made here, on the thread that runs both.
    with_graph_optimizations(false, || -> Result<()> {
        let want = tch::no_grad(|| model.resident(&module))?;
        let mut m = OffloadConfig::new("blocks", n)
            .cpu_test_mode(!cuda)
            .build(&named)?;
        m.initialize()?;
        let buffers = module.named_buffers()?.len();
        let got = tch::no_grad(|| model.layer_loop(&mut m, &block_mods))?;
        let diff = (&got - &want).abs().max().double_value(&[]);
        let exact = got.view_dtype(Kind::Int).equal(&want.view_dtype(Kind::Int));
        println!("{}", m.stats());
        m.restore()?;
        // The module works on its own again.
        let after = tch::no_grad(|| model.resident(&module))?;
        let result = json!({
            "device": if cuda { "cuda:0" } else { "cpu" },
            "module": file.display().to_string(),
            "blocks": n,
            "buffers": buffers,
            "max_abs_diff": diff,
            "bit_exact": exact,
            "restored_exact": after
                .view_dtype(Kind::Int)
                .equal(&want.view_dtype(Kind::Int)),
        });
        println!("RESULT {result}");
        Ok(())
    })?
}
