//! TorchScript modules (scripted and traced, exported by scripts/export_torchscript_dit.py with
//! the project's Python) driven block by block from Rust through the manager: bit-identical to
//! the module's own `forward`, on the CPU test mode and on CUDA.

mod common;

use common::Mode;
use layerwise_offload::script::{ScriptModule, set_graph_optimizations};
use layerwise_offload::{Error, OffloadConfig, WeightSource};
use rstest::rstest;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use tch::{Kind, Tensor};

/// The repository root: from the environment at run time (cargo sets it; so does the runner of
/// staged test binaries on another machine), else where the test was compiled.
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned())
}

/// A Python with torch: OFFLOAD_PYTHON, the project's .venv, or python3.
fn python() -> String {
    let root = manifest_dir();
    let candidates = [
        std::env::var("OFFLOAD_PYTHON").ok(),
        Some(format!("{root}/.venv/bin/python")),
        Some("python3".into()),
    ];
    for c in candidates.into_iter().flatten() {
        if Command::new(&c)
            .args(["-c", "import torch"])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return c;
        }
    }
    panic!(
        "no Python with torch found: run scripts/env.sh (it creates .venv) or set OFFLOAD_PYTHON"
    );
}

/// The exported modules, made once per test binary.
fn exported() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("lo-ts-{}", std::process::id()));
        let script = format!("{}/scripts/export_torchscript_dit.py", manifest_dir());
        let out = Command::new(python())
            .args([
                script.as_str(),
                dir.to_str().unwrap(),
                "--blocks",
                "4",
                "--dim",
                "64",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "export failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

#[rstest]
fn a_torchscript_dit_runs_block_by_block(
    #[values(Mode::Cpu, Mode::Cuda)] mode: Mode,
    #[values("dit_scripted.pt", "dit_traced.pt")] file: &str,
) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    set_graph_optimizations(false)?;
    let module = ScriptModule::load(exported().join(file), dev)?;
    module.eval()?;
    let named = module.named_tensors()?;
    assert_eq!(module.named_buffers()?.len(), 4, "one buffer per block");
    assert!(
        named.iter().any(|(n, _)| n == "blocks.2.gate"),
        "buffers are offloaded with the parameters"
    );
    let (embed, head) = (module.submodule("embed")?, module.submodule("head")?);
    let blocks: Vec<ScriptModule> = (0..4)
        .map(|i| module.submodule(&format!("blocks.{i}")))
        .collect::<Result<_, _>>()?;
    let x = Tensor::randn([2, 24, 16], (Kind::Float, dev));
    let want = tch::no_grad(|| module.forward(&[&x]))?;

    let mut m = mode.config("blocks", 4).prefetch_depth(2).build(&named)?;
    m.initialize()?;
    // The module's own tensors are placeholders now.
    assert_eq!(
        module
            .named_parameters()?
            .iter()
            .find(|(n, _)| n == "blocks.3.fc1.weight")
            .unwrap()
            .1
            .numel(),
        0
    );
    for _ in 0..2 {
        let got = tch::no_grad(|| -> layerwise_offload::Result<Tensor> {
            let mut h = embed.forward(&[&x])?;
            for (i, b) in blocks.iter().enumerate() {
                let _g = m.enter(i)?;
                h = b.forward(&[&h])?;
            }
            head.forward(&[&h])
        })?;
        assert!(
            common::model::bits_equal(&got, &want),
            "{file}: the layer loop differs from forward()"
        );
    }
    m.restore()?;
    assert!(common::model::bits_equal(
        &tch::no_grad(|| module.forward(&[&x]))?,
        &want
    ));
    Ok(())
}

#[test]
fn torchscript_errors_are_typed() -> anyhow::Result<()> {
    let module = ScriptModule::load(exported().join("dit_scripted.pt"), tch::Device::Cpu)?;
    match module.submodule("blocks.9") {
        Err(e @ Error::Torch { .. }) => assert!(e.to_string().contains("no attribute '9'"), "{e}"),
        r => panic!("expected an error, got {r:?}"),
    }
    assert!(module.submodule("blocks..1").is_err());
    assert!(
        module.submodule("blocks.0.gate").is_err(),
        "a buffer is not a module"
    );
    let bad = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu));
    assert!(
        module.forward(&[&bad]).is_err(),
        "a shape error is an Err, not a panic"
    );
    match ScriptModule::load("/nonexistent/model.pt", tch::Device::Cpu) {
        Err(e) => assert!(e.to_string().contains("/nonexistent/model.pt"), "{e}"),
        Ok(_) => panic!("loading a missing file must fail"),
    }
    // OffloadConfig over a module whose list name is wrong: the prefixes that exist.
    match OffloadConfig::new("layers", 4)
        .cpu_test_mode(true)
        .build(&module)?
        .initialize()
    {
        Err(Error::NoMatch { prefixes, .. }) => {
            assert!(prefixes.contains(&"blocks".to_owned()), "{prefixes:?}")
        }
        r => panic!("expected NoMatch, got {r:?}"),
    }
    Ok(())
}
