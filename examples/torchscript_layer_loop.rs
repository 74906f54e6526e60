//! A TorchScript diffusion transformer driven from Rust: load the module, hand its parameters
//! and buffers to the offload manager, and run the block loop over its submodules.
//!
//! ```text
//! python3 scripts/export_torchscript_dit.py /tmp/ts          # writes dit_scripted.pt, dit_traced.pt
//! cargo run --release --example torchscript_layer_loop -- /tmp/ts/dit_scripted.pt [--blocks 4]
//! ```
//! The module's `forward` must be `head(blocks[n-1](… blocks[0](embed(x))))`, the layout the
//! export script writes. The example compares the layer loop's output with the module's own
//! `forward` (resident) and prints one `RESULT {json}` line with `max_abs_diff`. Without a CUDA
//! device it runs in the manager's CPU test mode.

use anyhow::{Context, Result, bail};
use layerwise_offload::script::{ScriptModule, set_graph_optimizations};
use layerwise_offload::{OffloadConfig, WeightSource, accel};
use tch::{Device, Kind, Tensor};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .context("usage: torchscript_layer_loop MODULE.pt [--blocks N]")?;
    let mut blocks = None;
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--blocks" => {
                blocks = Some(
                    args.next()
                        .context("--blocks needs a value")?
                        .parse::<usize>()?,
                )
            }
            other => bail!("unknown flag {other}"),
        }
    }
    let cuda = accel::cuda_is_available();
    let dev = if cuda { Device::Cuda(0) } else { Device::Cpu };
    // Run ops one by one, as the layer loop does: fused graphs could round differently.
    set_graph_optimizations(false)?;
    let module = ScriptModule::load(&path, dev)?;
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
    let embed = module.submodule("embed")?;
    let head = module.submodule("head")?;
    let block_mods = (0..n)
        .map(|i| module.submodule(&format!("blocks.{i}")))
        .collect::<layerwise_offload::Result<Vec<_>>>()?;

    tch::manual_seed(0);
    let x = Tensor::randn([2, 24, 16], (Kind::Float, dev));
    let want = tch::no_grad(|| module.forward(&[&x]))?;

    let mut m = OffloadConfig::new("blocks", n)
        .cpu_test_mode(!cuda)
        .build(&named)?;
    m.initialize()?;
    let buffers = module.named_buffers()?.len();
    let got = tch::no_grad(|| -> layerwise_offload::Result<Tensor> {
        let mut h = embed.forward(&[&x])?;
        for (i, b) in block_mods.iter().enumerate() {
            let _on_device = m.enter(i)?;
            h = b.forward(&[&h])?;
        }
        head.forward(&[&h])
    })?;
    let diff = (&got - &want).abs().max().double_value(&[]);
    let exact = got.view_dtype(Kind::Int).equal(&want.view_dtype(Kind::Int));
    println!("{}", m.stats());
    m.restore()?;
    // The module works on its own again.
    let after = tch::no_grad(|| module.forward(&[&x]))?;
    println!(
        "RESULT {{\"device\":\"{}\",\"module\":\"{path}\",\"blocks\":{n},\"buffers\":{buffers},\"max_abs_diff\":{diff},\"bit_exact\":{exact},\"restored_exact\":{}}}",
        if cuda { "cuda:0" } else { "cpu" },
        after
            .view_dtype(Kind::Int)
            .equal(&want.view_dtype(Kind::Int))
    );
    Ok(())
}
