//! Checkpoints for users' own models: `ShardedWriter` writes a sharded safetensors checkpoint
//! that `Checkpoint::open` reads back bit for bit, every shard under its limit; bad input is
//! refused before anything is written; `empty` builds models with uninitialized weights that a
//! checkpoint fills.

use offload_testkit as common;

use common::model::{Block, DIM, Model, assert_same, bits_equal};
use layerwise_offload::checkpoint::{Checkpoint, ShardedWriter, write_sharded};
use layerwise_offload::{Error, OffloadConfig, Result, empty, offload_with};
use std::path::{Path, PathBuf};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lo-write-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Every tensor of the checkpoint at `dir`, read back by shard.
fn read_back(dir: &Path) -> Vec<(String, Tensor)> {
    let ckpt = Checkpoint::open(dir).unwrap();
    let mut out = Vec::new();
    for f in ckpt.files() {
        out.extend(Tensor::read_safetensors(f).unwrap());
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Tensors of several types and layouts: bf16, f16, f32, f64, i64, u8, bool, a transposed
/// (strided) one, a 0-d scalar and an empty one.
fn assorted() -> Vec<(String, Tensor)> {
    tch::manual_seed(3);
    let r = |shape: &[i64], k: Kind| Tensor::randn(shape, (Kind::Float, Device::Cpu)).to_kind(k);
    let mut v = vec![
        ("a.bf16".to_owned(), r(&[33, 17], Kind::BFloat16)),
        ("a.f16".to_owned(), r(&[5, 7, 3], Kind::Half)),
        ("b.f32".to_owned(), r(&[1000], Kind::Float)),
        ("b.f64".to_owned(), r(&[64], Kind::Double)),
        (
            "c.i64".to_owned(),
            Tensor::arange(77, (Kind::Int64, Device::Cpu)) - 30,
        ),
        (
            "c.u8".to_owned(),
            Tensor::arange(200, (Kind::Int64, Device::Cpu)).to_kind(Kind::Uint8),
        ),
        ("d.bool".to_owned(), r(&[9], Kind::Float).gt(0.0)),
        ("e.strided".to_owned(), r(&[12, 40], Kind::Float).tr()),
        ("f.scalar".to_owned(), Tensor::from(2.5f32)),
        (
            "g.empty".to_owned(),
            Tensor::zeros([0, 4], (Kind::Float, Device::Cpu)),
        ),
    ];
    // -0.0 and a NaN with a payload survive bit for bit.
    let special =
        Tensor::from_slice(&[0x8000_0000u32 as i32, 0x7fc0_1234u32 as i32]).view_dtype(Kind::Float);
    v.push(("h.special".to_owned(), special));
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn a_sharded_checkpoint_reads_back_bit_for_bit() -> Result<()> {
    let dir = tempdir("roundtrip");
    let tensors = assorted();
    let limit = 4000;
    let written = write_sharded(&tensors, &dir, limit)?;
    assert!(written.shards.len() > 1, "{written:?}");
    assert_eq!(
        written.index,
        dir.join("model.safetensors.index.json"),
        "transformers' name"
    );
    let n = written.shards.len();
    for (k, s) in written.shards.iter().enumerate() {
        assert_eq!(
            s.file_name().unwrap().to_string_lossy(),
            format!("model-{:05}-of-{n:05}.safetensors", k + 1)
        );
    }
    let back = read_back(&dir);
    assert_eq!(back.len(), tensors.len());
    for ((na, a), (nb, b)) in tensors.iter().zip(&back) {
        assert_eq!(na, nb);
        assert!(bits_equal(a, b), "{na} differs");
    }
    // The index as transformers writes it.
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&written.index).unwrap()).unwrap();
    let total: u64 = tensors
        .iter()
        .map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
        .sum();
    assert_eq!(index["metadata"]["total_size"], total);
    assert_eq!(written.total_bytes, total);
    let ckpt = Checkpoint::open(&written.index)?;
    for (name, t) in ckpt.tensors() {
        let file = ckpt.files()[t.file].file_name().unwrap().to_string_lossy();
        assert_eq!(index["weight_map"][name], file.as_ref(), "{name}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    Ok(())
}

#[test]
fn every_shard_keeps_its_limit_and_the_next_tensor_would_pass_it() -> Result<()> {
    let tensors = assorted();
    let size = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
    let largest = tensors.iter().map(|(_, t)| size(t)).max().unwrap();
    for limit in [largest, largest + 1, 5000, 8191, 1 << 20] {
        let dir = tempdir(&format!("limit-{limit}"));
        let written = ShardedWriter::new(&dir, limit)
            .file_stem("diffusion_pytorch_model")
            .write(&tensors)?;
        let ckpt = Checkpoint::open(&dir)?;
        // Data bytes per file, from the headers (not from what the writer says).
        let mut per_file = vec![0u64; ckpt.files().len()];
        let mut first_of = vec![None::<String>; ckpt.files().len()];
        for (name, t) in ckpt.tensors() {
            per_file[t.file] += t.bytes as u64;
            first_of[t.file].get_or_insert(name.clone());
        }
        assert!(
            per_file.iter().all(|&b| b <= limit),
            "{limit}: {per_file:?}"
        );
        // Files come in name order; the writer's own accounting agrees.
        let mut sorted = per_file.clone();
        sorted.sort();
        let mut w = written.shard_bytes.clone();
        w.sort();
        assert_eq!(sorted, w);
        // Greedy: a shard was closed only because its next tensor would not fit.
        let names: Vec<&String> = ckpt.tensors().keys().collect();
        for (k, shard) in written.shards.iter().enumerate().skip(1) {
            let f = ckpt.files().iter().position(|p| p == shard).unwrap();
            let prev = ckpt
                .files()
                .iter()
                .position(|p| *p == written.shards[k - 1])
                .unwrap();
            let first = first_of[f].as_ref().unwrap();
            let t = &ckpt.tensors()[first];
            assert!(per_file[prev] + t.bytes as u64 > limit, "{limit}: {first}");
            assert!(names.contains(&first));
        }
        if limit >= 1 << 20 {
            assert_eq!(written.shards.len(), 1);
        }
        assert!(
            dir.join("diffusion_pytorch_model.safetensors.index.json")
                .exists()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
    Ok(())
}

#[test]
fn bad_input_is_refused_before_anything_is_written() {
    let tensors = assorted();
    let invalid = |r: Result<_>| match r {
        Err(Error::InvalidArgument { op, message }) => {
            assert_eq!(op, "ShardedWriter::write");
            message
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    };
    let dir = tempdir("bad");
    let m = invalid(write_sharded(&tensors, &dir, 0));
    assert!(m.contains("max_shard_bytes is 0"), "{m}");
    // b.f32 holds 4000 bytes.
    let m = invalid(write_sharded(&tensors, &dir, 3999));
    assert!(
        m.contains("\"b.f32\"") && m.contains("4000") && m.contains("at least 4000"),
        "{m}"
    );
    let twice = vec![
        (
            "w".to_owned(),
            Tensor::zeros([2], (Kind::Float, Device::Cpu)),
        ),
        (
            "w".to_owned(),
            Tensor::ones([2], (Kind::Float, Device::Cpu)),
        ),
    ];
    let m = invalid(write_sharded(&twice, &dir, 100));
    assert!(m.contains("two tensors are named \"w\""), "{m}");
    let none: Vec<(String, Tensor)> = Vec::new();
    invalid(write_sharded(&none, &dir, 100));
    invalid(
        ShardedWriter::new(&dir, 100)
            .file_stem("a/b")
            .write(&tensors),
    );
    invalid(ShardedWriter::new(&dir, 100).file_stem("").write(&tensors));
    assert!(files_in(&dir).is_empty(), "{:?}", files_in(&dir));

    // A directory holding a checkpoint already: refused, the old files untouched.
    write_sharded(&tensors, &dir, 1 << 20).unwrap();
    let before = files_in(&dir);
    match write_sharded(&tensors, &dir, 1 << 20) {
        Err(Error::Checkpoint { path, reason }) => {
            assert_eq!(path, dir);
            assert!(
                reason.contains("holds") && reason.contains("already"),
                "{reason}"
            );
        }
        other => panic!("expected Checkpoint, got {other:?}"),
    }
    assert_eq!(files_in(&dir), before);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The test model's parameters (embed, `n` blocks, head) under `root`.
fn test_model(root: &nn::Path, n: i64) -> (nn::Linear, Vec<Block>, nn::Linear) {
    let embed = nn::linear(root / "embed", 16, DIM, Default::default());
    let blocks = (0..n)
        .map(|i| Block::new(root / "blocks" / i, DIM, 4 * DIM, 4))
        .collect();
    let head = nn::linear(root / "head", DIM, 16, Default::default());
    (embed, blocks, head)
}

#[test]
fn an_empty_model_loads_the_written_checkpoint_and_runs_bit_for_bit() -> Result<()> {
    let source = Model::new(Device::Cpu, 3, false, 5);
    let x = source.input(6);
    let want = source.forward(&x, None);
    let dir = tempdir("empty-load");
    ShardedWriter::new(&dir, 96 << 10).write(&source.vs)?;
    assert!(files_in(&dir).len() > 3, "{:?}", files_in(&dir));

    // Built the way a user builds it, then its values dropped for uninitialized memory.
    let (vs, (embed, blocks, head)) =
        empty::build(Device::Cpu, Kind::Float, |root| test_model(root, 3))?;
    let names = |vs: &nn::VarStore| {
        let mut v: Vec<(String, Vec<i64>, Kind)> = vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.size(), t.kind()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    assert_eq!(names(&vs), names(&source.vs));
    let manager = offload_with(&vs, "blocks", |c| {
        c.cpu_test_mode(true)
            .checkpoint(Checkpoint::open(&dir).unwrap())
    })?;
    let mut manager = manager;
    let got = tch::no_grad(|| -> Result<Tensor> {
        let mut h = embed.forward(&x);
        for (i, b) in blocks.iter().enumerate() {
            let _g = manager.enter(i)?;
            h = b.forward(&h);
        }
        Ok(head.forward(&h))
    })?;
    assert!(bits_equal(&got, &want));
    manager.restore()?;
    assert_same(&source.snapshot(), &common::model::snapshot(&vs));

    // An offloaded model is written from its manager (its own block tensors are placeholders).
    let mut again = OffloadConfig::new("blocks", 3)
        .cpu_test_mode(true)
        .build(&vs)?;
    again.initialize()?;
    let dir2 = tempdir("from-manager");
    // The VarStore itself holds placeholders now: refused, naming what to write instead.
    match write_sharded(&vs, &dir2, 96 << 10) {
        Err(Error::InvalidArgument { message, .. }) => {
            assert!(message.contains("manager.named_tensors()"), "{message}")
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    assert!(files_in(&dir2).is_empty());
    write_sharded(&again.named_tensors()?, &dir2, 96 << 10)?;
    again.restore()?;
    let back = read_back(&dir2);
    assert_same(&source.snapshot(), &back);
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&dir2).unwrap();
    Ok(())
}

#[test]
fn empty_build_repoints_every_variable_and_empty_layers_match_tch_names() -> Result<()> {
    // Aliases of the drawn values (their own TensorImpl, the same storage) show that each
    // variable was re-pointed at new memory, keeping shape, strides and type.
    let mut aliases = Vec::new();
    let (vs, linears) = empty::build(Device::Cpu, Kind::BFloat16, |root| {
        let linears: Vec<nn::Linear> = (0..3)
            .map(|i| nn::linear(root / "blocks" / i, 8, 16, Default::default()))
            .collect();
        for l in &linears {
            aliases.push(l.ws.detach());
            aliases.push(l.bs.as_ref().unwrap().detach());
        }
        linears
    })?;
    assert_eq!(aliases.len(), vs.variables().len());
    let vars = vs.variables();
    for (i, l) in linears.iter().enumerate() {
        let bias = l.bs.as_ref().unwrap();
        for (t, old, name) in [
            (&l.ws, &aliases[2 * i], format!("blocks.{i}.weight")),
            (bias, &aliases[2 * i + 1], format!("blocks.{i}.bias")),
        ] {
            assert_eq!(
                (t.size(), t.stride(), t.kind()),
                (old.size(), old.stride(), old.kind())
            );
            assert_eq!(t.kind(), Kind::BFloat16, "{name}");
            assert_ne!(
                t.data_ptr(),
                old.data_ptr(),
                "{name} still holds its drawn values"
            );
            // The model's handle is the VarStore's.
            assert_eq!(t.data_ptr(), vars[&name].data_ptr(), "{name}");
        }
    }

    // empty::linear and empty::var: tch's names and shapes, the path's kind, no bias if asked.
    let drawn = nn::VarStore::new(Device::Cpu);
    let _a = nn::linear(drawn.root() / "a", 3, 5, Default::default());
    let _b = nn::linear(
        drawn.root() / "b",
        3,
        5,
        nn::LinearConfig {
            bias: false,
            ..Default::default()
        },
    );
    let mut fresh = nn::VarStore::new(Device::Cpu);
    fresh.set_kind(Kind::Half);
    let a = empty::linear(&(fresh.root() / "a"), 3, 5, Default::default())?;
    let b = empty::linear(
        &(fresh.root() / "b"),
        3,
        5,
        nn::LinearConfig {
            bias: false,
            ..Default::default()
        },
    )?;
    assert!(b.bs.is_none());
    assert_eq!(a.ws.kind(), Kind::Half);
    let shapes = |vs: &nn::VarStore| {
        let mut v: Vec<(String, Vec<i64>)> = vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.size()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(shapes(&fresh), shapes(&drawn));
    let v = empty::var(&fresh.root(), "scale", &[4, 2])?;
    assert_eq!((v.size(), v.kind()), (vec![4, 2], Kind::Half));
    assert!(v.requires_grad(), "a variable, as path.var makes");
    Ok(())
}
