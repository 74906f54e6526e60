//! The Wan2.1 transformer of `wan/` (diffusers' `WanTransformer3DModel` in tch): its output
//! against diffusers' own on the fixture of `scripts/export_wan_fixture.py`, its checkpoint
//! loader's refusals, and the model streamed through the offload manager against the resident
//! model, bit for bit, on the CPU and on CUDA.

mod common;

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
        .checkpoint(layerwise_offload::Checkpoint::open(fixture())?)
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
    assert!(
        matches!(err, wan::Error::Config { .. }) && err.to_string().contains("image_dim is 1280"),
        "{err}"
    );
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
