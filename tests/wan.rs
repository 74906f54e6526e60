//! The Wan2.1 transformer of `wan/` (diffusers' `WanTransformer3DModel` in tch): its output
//! against diffusers' own on the fixture of `scripts/export_wan_fixture.py`, its checkpoint
//! loader's refusals, and the model streamed through the offload manager against the resident
//! model, bit for bit, on the CPU and on CUDA.

use offload_testkit as common;

use common::Mode;
use rstest::rstest;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor, nn};

/// Serialises the tests that draw random weights: libtorch's seed is global to the process and
/// cargo runs a binary's tests on several threads.
fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    common::gpu_lock()
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wan_tiny")
}

fn inputs() -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(fixture().join("inputs_and_output.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

/// Largest absolute difference diffusers' float32 output and ours may show on the CPU (outputs of magnitude ~2). On this
/// machine the two are equal bit for bit: the same libtorch kernels (conv3d, linear, rms_norm,
/// layer_norm, scaled_dot_product_attention) run in the same order on the same types, the rotary
/// tables are built with the same float64 operations, and the float32 pieces are float32 in
/// both. Another CPU or another libtorch build may pick other kernels (other blocking or SIMD
/// widths in the matrix products and the attention) and round differently; through 2 blocks of
/// width 32 such differences stay in the last few float32 ulps, far
/// below 1e-4, while a real difference in the model (a missing norm, a swapped rotary pair, a
/// scale_shift_table chunk out of order) moves the output by 1e-2 or more.
const TOLERANCE: f64 = 1e-4;

#[test]
fn matches_diffusers_output() -> anyhow::Result<()> {
    let _rng = rng_lock();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let (config, model) = wan::from_pretrained(&mut vs, fixture(), Kind::Float)?;
    assert_eq!(config, wan::Config::tiny());
    let io = inputs();
    let out = tch::no_grad(|| {
        model.forward(
            &io["latents"],
            &io["timestep"],
            &io["encoder_hidden_states"],
        )
    })?;
    let want = &io["output"];
    assert_eq!(out.size(), want.size());
    let diff = (&out - want).abs().max().double_value(&[]);
    let scale = want.abs().max().double_value(&[]);
    eprintln!(
        "max |rust - diffusers| = {diff:e} (output max |x| {scale:.3}); bit-exact: {}",
        out.equal(want)
    );
    // Bit-exact where the fixture was written (asserted when WAN_PARITY_EXACT=1 is set there).
    if std::env::var("WAN_PARITY_EXACT").as_deref() == Ok("1") {
        assert!(out.equal(want), "not bit-exact: max diff {diff:e}");
    }
    assert!(
        diff <= TOLERANCE,
        "the output differs from diffusers' by {diff:e} > {TOLERANCE:e}"
    );
    // Not a vacuous comparison: another timestep changes the output far beyond the tolerance.
    let other = tch::no_grad(|| {
        model.forward(
            &io["latents"],
            &(&io["timestep"] + 1.0),
            &io["encoder_hidden_states"],
        )
    })?;
    assert!((&other - want).abs().max().double_value(&[]) > 100.0 * TOLERANCE);
    Ok(())
}

#[test]
fn params_kept_in_fp32_follow_diffusers() {
    let _rng = rng_lock();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let _model = wan::WanTransformer3DModel::new(vs.root(), &wan::Config::tiny());
    wan::set_kind(&mut vs, Kind::BFloat16);
    let vars = vs.variables();
    let fp32: std::collections::BTreeSet<&str> = vars
        .iter()
        .filter(|(_, t)| t.kind() == Kind::Float)
        .map(|(n, _)| n.as_str())
        .collect();
    let want: std::collections::BTreeSet<&str> = [
        "condition_embedder.time_embedder.linear_1.weight",
        "condition_embedder.time_embedder.linear_1.bias",
        "condition_embedder.time_embedder.linear_2.weight",
        "condition_embedder.time_embedder.linear_2.bias",
        "scale_shift_table",
        "blocks.0.scale_shift_table",
        "blocks.1.scale_shift_table",
        "blocks.0.norm2.weight",
        "blocks.0.norm2.bias",
        "blocks.1.norm2.weight",
        "blocks.1.norm2.bias",
    ]
    .into();
    assert_eq!(fp32, want);
    assert!(
        vars.iter()
            .all(|(n, t)| want.contains(n.as_str()) || t.kind() == Kind::BFloat16)
    );
}

/// A copy of the fixture directory in which `edit` changed shard 1.
/// `new_empty` makes the parameters `new` and `set_kind` make (names, shapes, types) without
/// drawing them; the fixture loaded through the offload manager's checkpoint path into such a
/// model streams to the same output as the model `from_pretrained` loads, bit for bit.
#[rstest]
fn an_empty_model_loads_through_the_checkpoint_path(
    #[values(Mode::Cpu, Mode::Cuda)] mode: Mode,
) -> anyhow::Result<()> {
    let _rng = rng_lock();
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let kind = Kind::Float;
    let mut vs = nn::VarStore::new(dev);
    let (config, reference) = wan::from_pretrained(&mut vs, fixture(), kind)?;
    let empty_vs = nn::VarStore::new(dev);
    let model = wan::WanTransformer3DModel::new_empty(empty_vs.root(), &config, Kind::BFloat16);
    let mut drawn = nn::VarStore::new(dev);
    let _ = wan::WanTransformer3DModel::new(drawn.root(), &config);
    wan::set_kind(&mut drawn, Kind::BFloat16);
    let shape = |vs: &nn::VarStore| -> std::collections::BTreeMap<String, (Vec<i64>, Kind)> {
        vs.variables()
            .into_iter()
            .map(|(n, t)| (n, (t.size(), t.kind())))
            .collect()
    };
    assert_eq!(shape(&empty_vs), shape(&drawn));

    // The fixture through the manager, into an empty float32 model.
    let empty_vs = nn::VarStore::new(dev);
    let model32 = wan::WanTransformer3DModel::new_empty(empty_vs.root(), &config, kind);
    drop(model);
    let mut m = mode
        .config("blocks", config.num_layers as usize)
        .checkpoint(layerwise_offload::checkpoint::Checkpoint::open(fixture())?)
        .build(&empty_vs)?;
    m.initialize()?;
    let io = inputs();
    let (latents, t, text) = (
        &io["latents"],
        &io["timestep"],
        &io["encoder_hidden_states"],
    );
    let to = |x: &Tensor| x.to_device(dev);
    let want = tch::no_grad(|| reference.forward(&to(latents), &to(t), &to(text)))?;
    let got = tch::no_grad(|| -> anyhow::Result<Tensor> {
        let e = model32.embed(&to(latents), &to(t), &to(text))?;
        let mut h = e.hidden.shallow_clone();
        for i in 0..config.num_layers as usize {
            let _g = m.enter(i)?;
            h = model32.block(i, &h, &e);
        }
        Ok(model32.head(&h, &e))
    })?;
    assert!(
        got.equal(&want),
        "streamed from the checkpoint differs from from_pretrained"
    );
    m.restore()?;
    Ok(())
}

fn edited_checkpoint(tag: &str, edit: impl Fn(&mut Vec<(String, Tensor)>)) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lo-wan-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture()).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    let shard = dir.join("diffusion_pytorch_model-00001-of-00002.safetensors");
    let mut tensors = Tensor::read_safetensors(&shard).unwrap();
    edit(&mut tensors);
    Tensor::write_safetensors(&tensors, &shard).unwrap();
    dir
}

#[test]
fn a_checkpoint_that_does_not_match_is_refused_naming_each_tensor() {
    let _rng = rng_lock();
    let names: Vec<String> = Tensor::read_safetensors(
        fixture().join("diffusion_pytorch_model-00001-of-00002.safetensors"),
    )
    .unwrap()
    .into_iter()
    .map(|(n, _)| n)
    .collect();
    let (renamed, reshaped, retyped) = (&names[0], &names[1], &names[2]);
    let dir = edited_checkpoint("bad", |ts| {
        for (n, t) in ts.iter_mut() {
            if n == renamed {
                *n = format!("{n}_renamed");
            } else if n == reshaped {
                *t = t.flatten(0, -1).narrow(0, 0, 1);
            } else if n == retyped {
                *t = t.to_kind(Kind::Int64);
            }
        }
    });
    let mut vs = nn::VarStore::new(Device::Cpu);
    let err = wan::from_pretrained(&mut vs, &dir, Kind::Float).unwrap_err();
    let wan::Error::Mismatch { mismatch, .. } = &err else {
        panic!("expected a mismatch, got {err}");
    };
    assert_eq!(mismatch.missing, std::slice::from_ref(renamed));
    assert_eq!(mismatch.unexpected, [format!("{renamed}_renamed")]);
    assert_eq!(mismatch.shapes.len(), 1);
    assert_eq!(&mismatch.shapes[0].name, reshaped);
    assert_eq!(mismatch.shapes[0].file, [1]);
    assert_eq!(mismatch.dtypes.len(), 1);
    assert_eq!(&mismatch.dtypes[0].name, retyped);
    let text = err.to_string();
    assert!(text.contains(&format!("{retyped} is Int64")), "{text}");
    assert!(text.contains(&format!("missing: {renamed}")), "{text}");
    // Nothing was copied: the model still holds its random values, not the file's.
    let good: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(
        fixture().join("diffusion_pytorch_model-00002-of-00002.safetensors"),
    )
    .unwrap()
    .into_iter()
    .collect();
    let vars = vs.variables();
    assert!(good.iter().all(|(n, t)| !vars[n].equal(t)));
    std::fs::remove_dir_all(&dir).unwrap();

    // A config the crate does not build and a directory without weights.
    let dir = edited_checkpoint("i2v", |_| {});
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cfg = cfg.replace("\"image_dim\": null", "\"image_dim\": 1280");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let err =
        wan::from_pretrained(&mut nn::VarStore::new(Device::Cpu), &dir, Kind::Float).unwrap_err();
    // The config error is the source, printed once: in the chain, not in the message.
    assert!(matches!(err, wan::Error::Config { .. }), "{err:?}");
    let source = std::error::Error::source(&err).expect("the config error is the source");
    assert!(source.is::<wan::ConfigError>(), "{err:?}");
    assert!(source.to_string().contains("image_dim is 1280"), "{err:?}");
    assert!(!err.to_string().contains("image_dim is 1280"), "{err:?}");
    assert_eq!(format!("{err:?}").matches("image_dim is 1280").count(), 1);
    std::fs::remove_file(dir.join(wan::INDEX_FILE)).unwrap();
    let err = wan::checkpoint_files(&dir).unwrap_err();
    assert!(err.to_string().contains(wan::WEIGHTS_FILE), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A seeded random tiny model with 4 blocks in bf16 (float32 where diffusers keeps it), on
/// the CPU.
fn seeded(seed: i64) -> (nn::VarStore, wan::WanTransformer3DModel) {
    tch::manual_seed(seed);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let config = wan::Config {
        num_layers: 4,
        ..wan::Config::tiny()
    };
    let model = wan::WanTransformer3DModel::new(vs.root(), &config);
    wan::set_kind(&mut vs, Kind::BFloat16);
    (vs, model)
}

/// Streamed through the manager (CPU test mode, or CUDA's normal mode) equals the same model
/// resident on the same device, bit for bit. On CUDA both run on the GPU.
#[rstest]
fn streamed_equals_resident(#[values(Mode::Cpu, Mode::Cuda)] mode: Mode) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let _rng = rng_lock();
    tch::manual_seed(3);
    let latents = Tensor::randn([1, 4, 2, 8, 8], (Kind::Float, Device::Cpu)).to_device(dev);
    let text = Tensor::randn([1, 9, 32], (Kind::Float, Device::Cpu)).to_device(dev);
    let t = Tensor::from_slice(&[700.0f32]).to_device(dev);

    let (mut vs, model) = seeded(7);
    vs.set_device(dev);
    let resident = tch::no_grad(|| model.forward(&latents, &t, &text))?;

    let (vs, model) = seeded(7);
    let mut m = mode.config("blocks", 4).build(&vs)?;
    m.initialize()?;
    let streamed = tch::no_grad(|| -> anyhow::Result<Tensor> {
        let e = model.embed(&latents, &t, &text)?;
        let mut h = e.hidden.shallow_clone();
        for i in 0..model.blocks().len() {
            let _on_device = m.enter(i)?;
            h = model.block(i, &h, &e);
        }
        Ok(model.head(&h, &e))
    })?;
    assert_eq!(streamed.device(), dev);
    assert_eq!(streamed.kind(), Kind::BFloat16);
    assert!(
        streamed.equal(&resident),
        "streamed differs from resident by {}",
        (streamed.to_kind(Kind::Float) - resident.to_kind(Kind::Float))
            .abs()
            .max()
    );
    // Another model's weights give another output (the comparison can fail).
    let (mut vs, other) = seeded(8);
    vs.set_device(dev);
    assert!(!tch::no_grad(|| other.forward(&latents, &t, &text))?.equal(&resident));
    m.restore()?;
    Ok(())
}

/// Inputs the model cannot take are `Error::Input` from `forward` and `embed`, before any
/// kernel runs: never a panic inside the model.
#[test]
fn bad_forward_inputs_are_input_errors() {
    let _rng = rng_lock();
    let (_vs, model) = seeded(3);
    let c = model.config().clone();
    let f = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, Device::Cpu));
    let t = |b: usize| Tensor::from_slice(&vec![500.0f32; b]);
    let ch = c.in_channels;
    let td = c.text_dim;
    let cases: Vec<(&str, Tensor, Tensor, Tensor, &str)> = vec![
        (
            "batch 0",
            f(&[0, ch, 2, 8, 8]),
            t(0),
            f(&[0, 7, td]),
            "batch",
        ),
        (
            "latents batch 2, timestep 1",
            f(&[2, ch, 2, 8, 8]),
            t(1),
            f(&[2, 7, td]),
            "timestep",
        ),
        (
            "latents batch 2, text 1",
            f(&[2, ch, 2, 8, 8]),
            t(2),
            f(&[1, 7, td]),
            "text",
        ),
        (
            "channels",
            f(&[1, ch + 1, 2, 8, 8]),
            t(1),
            f(&[1, 7, td]),
            "channels",
        ),
        (
            "height not a multiple of the patch",
            f(&[1, ch, 2, 7, 8]),
            t(1),
            f(&[1, 7, td]),
            "patch",
        ),
        (
            "width not a multiple of the patch",
            f(&[1, ch, 2, 8, 9]),
            t(1),
            f(&[1, 7, td]),
            "patch",
        ),
        (
            "zero frames",
            f(&[1, ch, 0, 8, 8]),
            t(1),
            f(&[1, 7, td]),
            "patch",
        ),
        (
            "latents of rank 4",
            f(&[1, ch, 8, 8]),
            t(1),
            f(&[1, 7, td]),
            "latents",
        ),
        (
            "no text tokens",
            f(&[1, ch, 2, 8, 8]),
            t(1),
            f(&[1, 0, td]),
            "text",
        ),
        (
            "text width",
            f(&[1, ch, 2, 8, 8]),
            t(1),
            f(&[1, 7, td + 1]),
            "text",
        ),
        (
            "timestep of rank 2",
            f(&[1, ch, 2, 8, 8]),
            f(&[1, 1]),
            f(&[1, 7, td]),
            "timestep",
        ),
    ];
    for (case, latents, timestep, text, needle) in cases {
        for entry in ["forward", "embed"] {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                tch::no_grad(|| match entry {
                    "forward" => model.forward(&latents, &timestep, &text).map(|_| ()),
                    _ => model.embed(&latents, &timestep, &text).map(|_| ()),
                })
            }));
            match r {
                Err(_) => panic!("{case}: {entry} panicked"),
                Ok(Ok(())) => panic!("{case}: {entry} accepted it"),
                Ok(Err(e @ wan::Error::Input { .. })) => {
                    assert!(e.to_string().contains(needle), "{case}: {e}")
                }
                Ok(Err(e)) => panic!("{case}: {entry}: not an input error: {e}"),
            }
        }
    }
    // The same model takes good inputs.
    let out = tch::no_grad(|| model.forward(&f(&[2, ch, 2, 8, 8]), &t(2), &f(&[2, 7, td])));
    assert_eq!(out.unwrap().size(), [2, c.out_channels(), 2, 8, 8]);
}

/// Makes a FIFO at `path`.
fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path that lives for the call.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo {}", path.display());
}

/// `f()` on another thread; its result within 20 s, or a failure naming the case.
fn within_timeout<T: Send + 'static>(case: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{case}: still blocked after 20 s"))
}

/// A FIFO where the wan loader expects a file (config.json, the weights file, the index, a
/// shard named by the index) is an error at once, never a read that waits for a writer.
#[test]
fn the_wan_loader_refuses_a_fifo_without_blocking() {
    // It builds a random model: hold the generator's lock as the seeded tests do.
    let _rng = rng_lock();
    let dir = std::env::temp_dir().join(format!("lo-wan-fifo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let expect_err = |case: &str, r: wan::Result<()>| match r {
        // In the message or its source (`{:?}` is both).
        Err(e) => assert!(
            format!("{e:?}").contains("not a regular file"),
            "{case}: the error must say it is not a regular file: {e:?}"
        ),
        Ok(()) => panic!("{case}: accepted"),
    };
    // config.json.
    let config = dir.join("config.json");
    mkfifo(&config);
    let p = config.clone();
    expect_err(
        "config.json",
        within_timeout("config.json", move || {
            wan::Config::from_file(&p).map(|_| ())
        }),
    );
    // A safetensors file read by name.
    let single = dir.join(wan::WEIGHTS_FILE);
    mkfifo(&single);
    let p = single.clone();
    expect_err(
        "read_header",
        within_timeout("read_header", move || wan::read_header(&p).map(|_| ())),
    );
    // The weights file of a directory.
    let p = dir.clone();
    expect_err(
        "the weights file",
        within_timeout("the weights file", move || {
            wan::checkpoint_files(&p).and_then(|files| {
                files
                    .iter()
                    .try_for_each(|f| wan::read_header(f).map(|_| ()))
            })
        }),
    );
    // The index, then a shard it names.
    let index = dir.join(wan::INDEX_FILE);
    mkfifo(&index);
    let p = dir.clone();
    expect_err(
        "the index",
        within_timeout("the index", move || wan::checkpoint_files(&p).map(|_| ())),
    );
    std::fs::remove_file(&index).unwrap();
    std::fs::write(
        &index,
        r#"{"weight_map": {"proj_out.weight": "shard-1.safetensors"}}"#,
    )
    .unwrap();
    mkfifo(&dir.join("shard-1.safetensors"));
    let p = dir.clone();
    expect_err(
        "a shard",
        within_timeout("a shard", move || {
            let mut vs = nn::VarStore::new(Device::Cpu);
            let _ = wan::WanTransformer3DModel::new(vs.root(), &wan::Config::tiny());
            wan::set_kind(&mut vs, Kind::Float);
            wan::load_checkpoint(&vs, &p)
        }),
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `Config::num_parameters`, which bounds a config's size, counts what the model builds.
#[test]
fn num_parameters_counts_the_built_model() {
    // Building a model draws from libtorch's global generator: hold the lock the seeded tests
    // hold, or their two draws of one seed differ.
    let _rng = rng_lock();
    for config in [
        wan::Config::tiny(),
        wan::Config {
            cross_attn_norm: false,
            out_channels: Some(6),
            patch_size: [2, 2, 1],
            num_layers: 3,
            ..wan::Config::tiny()
        },
    ] {
        config.validate().unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = wan::WanTransformer3DModel::new_empty(vs.root(), &config, Kind::Float);
        let built: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
        assert_eq!(config.num_parameters(), Some(built as u64), "{config:?}");
    }
    // Wan2.1-14B has 14.3 billion parameters.
    let n = wan::Config::wan2_1_t2v_14b().num_parameters().unwrap();
    assert!((14_000_000_000..14_500_000_000).contains(&n), "{n}");
}

/// The keyword arguments of a Python `dict(k=v, ...)` or the items of a tuple, by position,
/// from `text` (values without nested commas, as the scripts' presets are).
fn python_kwargs(text: &str) -> std::collections::BTreeMap<String, String> {
    text.split(',')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
        })
        .collect()
}

/// The text between `start` (first occurrence after `after`) and the next `end`.
fn between<'a>(text: &'a str, after: &str, start: &str, end: &str) -> &'a str {
    let from = text.find(after).unwrap_or_else(|| panic!("no {after:?}")) + after.len();
    let rest = &text[from..];
    let s = rest
        .find(start)
        .unwrap_or_else(|| panic!("no {start:?} after {after:?}"))
        + start.len();
    let e = rest[s..]
        .find(end)
        .unwrap_or_else(|| panic!("no {end:?} after {start:?}"));
    &rest[s..s + e]
}

/// The Python scripts that build diffusers' own models (scripts/bench_peers.py for
/// offload-bench's peers, scripts/bench_wan_pipeline.py for text_to_video's, and
/// scripts/profile_wan_block.py) keep their own copies of the presets: they are the wan crate's.
#[test]
fn the_python_scripts_presets_are_the_wan_crates() {
    let script = |name: &str| {
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("scripts")
                .join(name),
        )
        .unwrap()
    };
    let sizes = |c: &wan::Config| {
        [
            ("num_layers", c.num_layers.to_string()),
            ("num_attention_heads", c.num_attention_heads.to_string()),
            ("attention_head_dim", c.attention_head_dim.to_string()),
            ("ffn_dim", c.ffn_dim.to_string()),
        ]
    };
    let presets = [
        ("tiny", wan::Config::small()),
        ("wan-1.3b", wan::Config::wan2_1_t2v_1_3b()),
        ("wan-14b", wan::Config::wan2_1_t2v_14b()),
    ];
    let peers = script("bench_peers.py");
    for (name, c) in &presets {
        // PRESETS: (layers, dim, ffn, heads) of the block-stack model.
        let tuple = between(&peers, "PRESETS = {", &format!("\"{name}\": ("), ")");
        let want = format!(
            "{}, {}, {}, {}",
            c.num_layers,
            c.inner_dim(),
            c.ffn_dim,
            c.num_attention_heads
        );
        assert_eq!(tuple, want, "bench_peers.py PRESETS[{name:?}]");
        // WAN_CONFIGS: diffusers' WanTransformer3DModel arguments.
        let kw = python_kwargs(between(
            &peers,
            "WAN_CONFIGS = {",
            &format!("\"{name}\": dict("),
            ")",
        ));
        for (k, v) in sizes(c) {
            assert_eq!(
                kw.get(k),
                Some(&v),
                "bench_peers.py WAN_CONFIGS[{name:?}][{k}]"
            );
        }
        assert_eq!(kw.get("text_dim"), Some(&c.text_dim.to_string()), "{name}");
    }
    let pipeline = script("bench_wan_pipeline.py");
    for (name, c) in [
        ("tiny", wan::Config::tiny()),
        ("wan-1.3b", wan::Config::wan2_1_t2v_1_3b()),
        ("wan-14b", wan::Config::wan2_1_t2v_14b()),
    ] {
        let kw = python_kwargs(between(
            &pipeline,
            "WAN = {",
            &format!("\"{name}\": dict("),
            ")",
        ));
        for (k, v) in sizes(&c) {
            assert_eq!(
                kw.get(k),
                Some(&v),
                "bench_wan_pipeline.py WAN[{name:?}][{k}]"
            );
        }
    }
    let kw = python_kwargs(between(&pipeline, "", "UMT5_XXL = dict(", ")"));
    let u = wan::Umt5Config::umt5_xxl();
    for (k, v) in [
        ("vocab_size", u.vocab_size),
        ("d_model", u.d_model),
        ("d_kv", u.d_kv),
        ("d_ff", u.d_ff),
        ("num_layers", u.num_layers),
        ("num_heads", u.num_heads),
        (
            "relative_attention_num_buckets",
            u.relative_attention_num_buckets,
        ),
        (
            "relative_attention_max_distance",
            u.relative_attention_max_distance,
        ),
    ] {
        assert_eq!(
            kw.get(k),
            Some(&v.to_string()),
            "bench_wan_pipeline.py UMT5_XXL[{k}]"
        );
    }
    assert_eq!(kw["feed_forward_proj"], u.feed_forward_proj);
    assert_eq!(
        kw["layer_norm_epsilon"].parse::<f64>(),
        Ok(u.layer_norm_epsilon)
    );
    // profile_wan_block.py: heads, head_dim, ffn of --tiny (the wan crate's tiny), else 14B.
    let profile = script("profile_wan_block.py");
    let assigned: Vec<&str> = profile
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("heads, head_dim, ffn, grid, ctx_len = ")
        })
        .collect();
    assert_eq!(assigned.len(), 2, "profile_wan_block.py: {assigned:?}");
    for (c, values) in [wan::Config::tiny(), wan::Config::wan2_1_t2v_14b()]
        .iter()
        .zip(assigned)
    {
        let want = format!(
            "{}, {}, {}, ",
            c.num_attention_heads, c.attention_head_dim, c.ffn_dim
        );
        assert!(
            values.starts_with(&want),
            "profile_wan_block.py: {values}, want {want}"
        );
    }
}

/// The rotary tables on a CUDA device are those of the CPU, copied to the device once: the
/// second forward reuses the first's copy (no copy from pageable host memory, which would make
/// the host wait for the device at every forward).
#[test]
fn rotary_tables_are_copied_to_the_device_once() {
    let Some(d) = common::cuda() else {
        return;
    };
    let rope = wan::RotaryEmbedding::new([44, 42, 42], [1, 2, 2], 1024, 10000.0);
    let cpu = rope.forward(2, 16, 32, Device::Cpu);
    let a = rope.forward(2, 16, 32, Device::Cuda(d));
    let b = rope.forward(4, 8, 8, Device::Cuda(d));
    assert!(a.cos.to_device(Device::Cpu).equal(&cpu.cos));
    assert!(a.sin.to_device(Device::Cpu).equal(&cpu.sin));
    let other = rope.forward(4, 8, 8, Device::Cpu);
    assert!(b.cos.to_device(Device::Cpu).equal(&other.cos));
    assert_eq!(
        rope.device_copies(),
        1,
        "one copy of the tables for two forwards"
    );
}
