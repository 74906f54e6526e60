//! TorchScript modules (scripted and traced, exported by scripts/export_torchscript_dit.py with
//! the project's Python) driven block by block from Rust through the manager: bit-identical to
//! the module's own `forward`, on the CPU test mode and on CUDA. Also: values of every kind in
//! and out of methods, calls by name, and real diffusers Wan blocks traced by
//! scripts/export_diffusers_block.py (committed under tests/fixtures/wan_blocks, so no diffusers
//! is needed here).

use offload_testkit as common;

use common::Mode;
use layerwise_offload::{
    Error, GraphOptimizationsGuard, OffloadConfig, ScriptModule, WeightSource, graph_optimizations,
    set_graph_optimizations, with_graph_optimizations,
};
use rstest::rstest;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use tch::{Device, IValue, Kind, Tensor};

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
        // libtorch's message is the source, not repeated in the error's own.
        Err(e @ Error::Torch { .. }) => {
            let source = std::error::Error::source(&e)
                .expect("libtorch's message")
                .to_string();
            assert!(source.contains("no attribute '9'"), "{e:?}");
            assert!(!e.to_string().contains("no attribute '9'"), "{e:?}");
        }
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
        Err(e) => assert!(format!("{e:?}").contains("/nonexistent/model.pt"), "{e:?}"),
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

fn tensor(iv: IValue) -> Tensor {
    match iv {
        IValue::Tensor(t) => t,
        other => panic!("expected a tensor, got {other:?}"),
    }
}

fn t(values: &[f32]) -> Tensor {
    Tensor::from_slice(values)
}

#[test]
fn methods_take_and_return_values_of_every_kind() -> anyhow::Result<()> {
    let m = ScriptModule::load(exported().join("values_scripted.pt"), Device::Cpu)?;
    let mut names = m.method_names()?;
    names.sort();
    assert_eq!(names, ["forward", "kinds", "named", "nest"]);

    let schema = m.method_schema("forward")?;
    assert_eq!(schema.arg_names(), ["x", "rope", "bias", "scale"]);
    assert_eq!(schema.args[1].type_str, "Tuple[Tensor, Tensor]");
    assert_eq!(schema.args[2].type_str, "Optional[Tensor]");
    assert!(!schema.args[1].has_default() && schema.args[3].has_default());
    assert_eq!(schema.returns.len(), 1);
    assert_eq!(schema.returns[0].type_str, "Tuple[Tensor, Tensor]");

    let x = t(&[1., 2., 3., 4.]);
    let rope = || {
        IValue::Tuple(vec![
            IValue::Tensor(t(&[2.; 4])),
            IValue::Tensor(t(&[1.; 4])),
        ])
    };
    // Positional, defaults filled by libtorch: (x * 2 + 1) * 2.0 and x * w (w = 3).
    let out = m.forward_is(&[IValue::Tensor(x.shallow_clone()), rope()])?;
    let IValue::Tuple(parts) = out else {
        panic!("a tuple return comes back as IValue::Tuple, got {out:?}")
    };
    let [y, z]: [IValue; 2] = parts.try_into().unwrap();
    assert!(tensor(y).equal(&t(&[6., 10., 14., 18.])));
    assert!(tensor(z).equal(&t(&[3., 6., 9., 12.])));
    // By name, in another order, with an Optional given and a float overridden.
    let out = m.call_named(
        "forward",
        &[
            ("scale", IValue::Double(0.5)),
            ("bias", IValue::Tensor(t(&[1.; 4]))),
            ("rope", rope()),
            ("x", IValue::Tensor(x.shallow_clone())),
        ],
    )?;
    let (y, _): (Tensor, Tensor) = out.try_into()?;
    assert!(y.equal(&t(&[2., 3., 4., 5.])));
    // IValue::None for an Optional argument.
    let out = m.call_named(
        "forward",
        &[
            ("x", IValue::Tensor(x.shallow_clone())),
            ("rope", rope()),
            ("bias", IValue::None),
        ],
    )?;
    let (y, _): (Tensor, Tensor) = out.try_into()?;
    assert!(y.equal(&t(&[6., 10., 14., 18.])));

    // Lists, scalars, strings and None, through a method other than forward.
    let out = m.call_method(
        "kinds",
        &[
            IValue::TensorList(vec![t(&[1.]), t(&[2.])]),
            IValue::IntList(vec![1, 2, 3]),
            IValue::Bool(true),
            IValue::String("blocks".into()),
            IValue::None,
        ],
    )?;
    let IValue::Tuple(parts) = out else {
        panic!("expected a tuple, got {out:?}")
    };
    assert_eq!(parts.len(), 7);
    assert_eq!(parts[0], IValue::Int(2));
    assert_eq!(parts[1], IValue::Double(6.0));
    assert_eq!(parts[2], IValue::Bool(false));
    assert_eq!(parts[3], IValue::String("blocks!".into()));
    match &parts[4] {
        IValue::TensorList(ts) => {
            assert!(ts[0].equal(&t(&[2.])) && ts[1].equal(&t(&[3.])), "{ts:?}")
        }
        other => panic!("List[Tensor] comes back as TensorList, got {other:?}"),
    }
    assert_eq!(parts[5], IValue::IntList(vec![2, 4, 6]));
    assert_eq!(parts[6], IValue::None);

    // A dict return.
    match m.call_method("named", &[IValue::Tensor(x.shallow_clone())])? {
        IValue::GenericDict(pairs) => {
            let d: HashMap<String, Tensor> = pairs
                .into_iter()
                .map(|(k, v)| match k {
                    IValue::String(k) => (k, tensor(v)),
                    k => panic!("string keys expected, got {k:?}"),
                })
                .collect();
            assert!(d["double"].equal(&(&x * 2)));
            assert!(d["w"].equal(&t(&[3.; 4])));
        }
        other => panic!("expected a dict, got {other:?}"),
    }
    Ok(())
}

#[test]
fn calls_by_name_fail_with_typed_errors() -> anyhow::Result<()> {
    let m = ScriptModule::load(exported().join("values_scripted.pt"), Device::Cpu)?;
    let x = || IValue::Tensor(t(&[1.; 4]));
    let rope = || IValue::Tuple(vec![x(), x()]);
    match m.call_named("forward", &[("x", x()), ("rotary", rope())]) {
        Err(e @ Error::UnknownArgument { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("\"rotary\"") && msg.contains("rope: Tuple[Tensor, Tensor]"),
                "the error names the real arguments: {msg}"
            );
        }
        r => panic!("expected UnknownArgument, got {r:?}"),
    }
    match m.call_named("forward", &[("x", x())]) {
        Err(Error::MissingArgument { name, expected, .. }) => {
            assert_eq!(name, "rope");
            assert_eq!(expected.len(), 4, "{expected:?}");
        }
        r => panic!("expected MissingArgument, got {r:?}"),
    }
    for r in [
        m.call_named("backward", &[("x", x())]),
        m.call_method("backward", &[x()]),
    ] {
        match r {
            Err(Error::UnknownMethod { name, methods }) => {
                assert_eq!(name, "backward");
                assert!(methods.contains(&"kinds".to_owned()), "{methods:?}");
            }
            r => panic!("expected UnknownMethod, got {r:?}"),
        }
    }
    assert!(matches!(
        m.method_schema("backward"),
        Err(Error::UnknownMethod { .. })
    ));
    // A wrong type is libtorch's error, as an Err naming the argument and the method.
    match m.call_named("forward", &[("x", IValue::Int(3)), ("rope", rope())]) {
        Err(e @ Error::Torch { .. }) => {
            let msg = std::error::Error::source(&e)
                .expect("libtorch's message")
                .to_string();
            assert!(msg.contains("forward()") && msg.contains("'x'"), "{e:?}");
        }
        r => panic!("expected a Torch error, got {r:?}"),
    }
    // Too many positional arguments.
    assert!(
        m.forward_is(&[x(), rope(), x(), IValue::Double(1.), x()])
            .is_err()
    );
    // tch's errors convert with `?`.
    fn convert(iv: IValue) -> layerwise_offload::Result<Tensor> {
        Ok(Tensor::try_from(iv)?)
    }
    assert!(matches!(
        convert(IValue::Int(1)),
        Err(Error::Torch { op: "tch", .. })
    ));
    Ok(())
}

#[test]
fn graph_optimizations_are_per_thread() -> anyhow::Result<()> {
    set_graph_optimizations(true)?;
    {
        let guard = GraphOptimizationsGuard::new(false)?;
        assert!(guard.previous());
        assert!(!graph_optimizations()?);
        // libtorch keeps the flag in a thread_local: a new thread starts with it on, whatever
        // this thread set.
        let other = std::thread::spawn(graph_optimizations).join().unwrap()?;
        assert!(other, "the setting leaked into another thread");
        // And a thread's own setting does not reach back here.
        std::thread::spawn(|| set_graph_optimizations(true))
            .join()
            .unwrap()?;
        assert!(!graph_optimizations()?);
    }
    assert!(graph_optimizations()?, "the guard restores the old setting");
    let inside = with_graph_optimizations(false, graph_optimizations)??;
    assert!(!inside);
    assert!(graph_optimizations()?);
    // The closure form is the way to set it where a loop on another thread runs.
    let there = std::thread::spawn(|| with_graph_optimizations(false, graph_optimizations))
        .join()
        .unwrap()??;
    assert!(!there);
    Ok(())
}

/// tests/fixtures/wan_blocks, written by scripts/export_diffusers_block.py.
fn wan_fixture(file: &str) -> PathBuf {
    PathBuf::from(manifest_dir())
        .join("tests/fixtures/wan_blocks")
        .join(file)
}

/// The block inputs and Python's outputs the export saved.
fn wan_io(dev: Device) -> anyhow::Result<HashMap<String, Tensor>> {
    Ok(Tensor::read_safetensors(wan_fixture("wan_io.safetensors"))?
        .into_iter()
        .map(|(n, t)| (n, t.to_device(dev)))
        .collect())
}

#[test]
fn traced_wan_blocks_have_the_signatures_the_trace_saw() -> anyhow::Result<()> {
    let declared = [
        "hidden_states",
        "encoder_hidden_states",
        "temb",
        "rotary_emb",
    ];
    // Traced block by block: each block keeps the declared order and the rotary tuple.
    let per_block = ScriptModule::load(wan_fixture("wan_blocks_per_block.pt"), Device::Cpu)?;
    for i in 0..2 {
        let s = per_block
            .submodule(&format!("blocks.{i}"))?
            .method_schema("forward")?;
        assert_eq!(s.arg_names(), declared, "{s}");
        assert_eq!(s.args[3].type_str, "Tuple[Tensor, Tensor]");
        assert_eq!(s.returns[0].type_str, "Tensor");
    }
    // Traced as a whole: the top level keeps the declaration, the blocks do not. Observed with
    // diffusers 0.42.1 and torch 2.11: first-use order (temb is read before hidden_states),
    // the rotary tuple split into the names of the function that unpacked it, block 1's first
    // two inputs unnamed (they are values block 0 produced), and block 0 returning a tuple
    // (its `temb.float()` is what block 1 reads as its temb).
    let whole = ScriptModule::load(wan_fixture("wan_blocks_traced.pt"), Device::Cpu)?;
    assert_eq!(whole.method_schema("forward")?.arg_names(), declared);
    let b0 = whole.submodule("blocks.0")?.method_schema("forward")?;
    let b1 = whole.submodule("blocks.1")?.method_schema("forward")?;
    assert_ne!(b0.arg_names(), declared);
    assert_eq!(
        b0.arg_names(),
        [
            "temb",
            "hidden_states",
            "freqs_cos",
            "freqs_sin",
            "encoder_hidden_states"
        ],
        "{b0}"
    );
    assert_eq!(b0.returns[0].type_str, "Tuple[Tensor, Tensor]");
    assert_eq!(
        b1.arg_names(),
        [
            "argument_1",
            "argument_2",
            "freqs_cos",
            "freqs_sin",
            "encoder_hidden_states"
        ],
        "{b1}"
    );
    assert_eq!(b1.returns[0].type_str, "Tensor");
    Ok(())
}

/// Runs the Wan blocks through the manager by name and checks them against the module resident
/// and (on the CPU) against diffusers' own output.
#[rstest]
fn a_traced_diffusers_wan_block_loop_is_bit_exact(
    #[values(Mode::Cpu, Mode::Cuda)] mode: Mode,
    #[values("wan_blocks_per_block.pt", "wan_blocks_traced.pt")] file: &str,
) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let _opt = GraphOptimizationsGuard::new(false)?;
    // Traced on the CPU; loading onto `dev` moves parameters, buffers and constants (the export
    // checks that the trace holds no CPU device constant).
    let module = ScriptModule::load(wan_fixture(file), dev)?;
    module.eval()?;
    let io = wan_io(dev)?;
    let (h0, ctx, temb) = (
        &io["hidden_states"],
        &io["encoder_hidden_states"],
        &io["temb"],
    );
    let (cos, sin) = (&io["rotary_cos"], &io["rotary_sin"]);
    let rope = || {
        IValue::Tuple(vec![
            IValue::Tensor(cos.shallow_clone()),
            IValue::Tensor(sin.shallow_clone()),
        ])
    };
    let iv = |x: &Tensor| IValue::Tensor(x.shallow_clone());

    let want = tensor(tch::no_grad(|| {
        module.call_named(
            "forward",
            &[
                ("rotary_emb", rope()),
                ("temb", iv(temb)),
                ("hidden_states", iv(h0)),
                ("encoder_hidden_states", iv(ctx)),
            ],
        )
    })?);
    if dev == Device::Cpu {
        // Same ops in the same order as diffusers' eager forward. Bit-equal where the CPU picks
        // the same kernels as the machine that wrote the fixture (seen on the machine that
        // wrote it); another CPU (other vector units, other GEMM blocking) rounds differently,
        // so across machines the check is a relative tolerance far below what a wrong op gives.
        for key in ["out_blocks", "out_blocks_traced"] {
            let reference = &io[key];
            let scale = reference.abs().max().double_value(&[]).max(1.0);
            let diff = (&want - reference).abs().max().double_value(&[]);
            eprintln!(
                "{file}: max |rust - {key}| = {diff:e} (bit-equal: {})",
                common::model::bits_equal(&want, reference)
            );
            assert!(
                diff <= 1e-5 * scale,
                "{file}: forward differs from diffusers' output ({key}): {diff:e}"
            );
        }
    }

    let blocks: Vec<ScriptModule> = (0..2)
        .map(|i| module.submodule(&format!("blocks.{i}")))
        .collect::<Result<_, _>>()?;
    let schemas = blocks
        .iter()
        .map(|b| b.method_schema("forward"))
        .collect::<Result<Vec<_>, _>>()?;
    let mut m = mode.config("blocks", 2).build(&module)?;
    m.initialize()?;
    // Block 1's weights are with the manager now (block 0 may already be uploaded ahead).
    let block1: Vec<(String, Tensor)> = module
        .named_parameters()?
        .into_iter()
        .filter(|(n, _)| n.starts_with("blocks.1."))
        .collect();
    assert!(block1.len() > 20, "{}", block1.len());
    assert!(
        block1.iter().all(|(_, t)| t.numel() == 0),
        "block 1's tensors in the module are placeholders after initialize"
    );
    let got = tch::no_grad(|| -> layerwise_offload::Result<Tensor> {
        let mut h = h0.shallow_clone();
        for (i, (block, schema)) in blocks.iter().zip(&schemas).enumerate() {
            let _g = m.enter(i)?;
            let out = if schema.arg("rotary_emb").is_some() {
                // Traced block by block: the declared names, the rotary tuple as one argument.
                block.call_named(
                    "forward",
                    &[
                        ("hidden_states", iv(&h)),
                        ("encoder_hidden_states", iv(ctx)),
                        ("temb", iv(temb)),
                        ("rotary_emb", rope()),
                    ],
                )?
            } else {
                // Traced as a whole: the names the trace gave each block (see the test above).
                let (temb_name, h_name) = if i == 0 {
                    ("temb", "hidden_states")
                } else {
                    ("argument_1", "argument_2")
                };
                block.call_named(
                    "forward",
                    &[
                        (h_name, iv(&h)),
                        ("encoder_hidden_states", iv(ctx)),
                        ("freqs_cos", iv(cos)),
                        ("freqs_sin", iv(sin)),
                        (temb_name, iv(temb)),
                    ],
                )?
            };
            h = match out {
                IValue::Tuple(mut parts) => tensor(parts.pop().expect("a non-empty tuple")),
                out => Tensor::try_from(out)?,
            };
        }
        Ok(h)
    })?;
    assert!(
        common::model::bits_equal(&got, &want),
        "{file}: the layer loop differs from forward()"
    );
    m.restore()?;
    Ok(())
}

/// `x` inside `depth` one-element tuples.
fn nested(depth: usize, x: IValue) -> IValue {
    (0..depth).fold(x, |v, _| IValue::Tuple(vec![v]))
}

/// How many one-element tuples wrap the value.
fn depth_of(mut v: &IValue) -> usize {
    let mut d = 0;
    while let IValue::Tuple(items) = v {
        d += 1;
        v = &items[0];
    }
    d
}

/// Arguments and results nested deeper than the conversion allows are typed errors, not a
/// stack overflow, in both directions; a moderately nested value goes through.
#[test]
fn deeply_nested_values_are_refused_not_a_stack_overflow() -> anyhow::Result<()> {
    let m = ScriptModule::load(exported().join("values_scripted.pt"), Device::Cpu)?;
    let x = || IValue::Tensor(t(&[1., 2.]));
    // Within the bound, both ways.
    let out = m.call_method("nest", &[nested(32, x()), IValue::Int(0)])?;
    assert_eq!(depth_of(&out), 32);
    let out = m.call_method("nest", &[x(), IValue::Int(40)])?;
    assert_eq!(depth_of(&out), 40);
    let out = m.call_named("nest", &[("x", nested(20, x())), ("n", IValue::Int(20))])?;
    assert_eq!(depth_of(&out), 40);
    // An argument nested 200 deep, positional and by name.
    let check = |r: layerwise_offload::Result<IValue>, case: &str| match r {
        Err(e @ Error::InvalidArgument { .. }) => {
            assert!(e.to_string().contains("nested"), "{case}: {e}")
        }
        r => panic!("{case}: expected InvalidArgument, got {r:?}"),
    };
    check(
        m.call_method("nest", &[nested(200, x()), IValue::Int(0)]),
        "positional, 200 deep",
    );
    check(
        m.call_named("nest", &[("x", nested(200, x())), ("n", IValue::Int(0))]),
        "by name, 200 deep",
    );
    check(
        m.call_method("nest", &[nested(1000, x()), IValue::Int(0)]),
        "positional, 1000 deep",
    );
    // A result nested 300 deep.
    check(
        m.call_method("nest", &[x(), IValue::Int(300)]),
        "a result 300 deep",
    );
    // The module still works.
    let out = m.call_method("nest", &[x(), IValue::Int(1)])?;
    assert_eq!(depth_of(&out), 1);
    Ok(())
}
