//! Loading from safetensors checkpoints: single files and shards, renames, every mismatch,
//! the zero-copy store, the disk tier under a host budget, and files that change underneath.

use offload_testkit as common;

use common::Mode;
use common::model::{Model, assert_same, bits_equal};
use layerwise_offload::checkpoint::{Checkpoint, CheckpointMismatch};
use layerwise_offload::{Error, Fault, OffloadConfig};
use rstest::rstest;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// A fresh directory under the temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("lo-ckpt-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `tensors` (on the CPU) as a checkpoint in `dir`: one file, or `shards` files with a
/// `model.safetensors.index.json`, the tensors dealt out in name order so that blocks straddle
/// files. Returns the path to open.
fn write_checkpoint(dir: &Path, tensors: &[(String, Tensor)], shards: usize) -> PathBuf {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.to_device(Device::Cpu).contiguous()))
        .collect();
    if shards == 1 {
        let p = dir.join("model.safetensors");
        Tensor::write_safetensors(&cpu, &p).unwrap();
        return p;
    }
    let per = cpu.len().div_ceil(shards);
    let mut map = BTreeMap::new();
    for (k, chunk) in cpu.chunks(per).enumerate() {
        let name = format!("model-{:05}-of-{shards:05}.safetensors", k + 1);
        Tensor::write_safetensors(chunk, dir.join(&name)).unwrap();
        for (n, _) in chunk {
            map.insert(n.clone(), name.clone());
        }
    }
    let index = serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": map });
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
    dir.to_owned()
}

/// The CPU test mode's manager of `n` blocks over the checkpoint at `path`.
fn on_cpu(n: usize, path: &Path) -> layerwise_offload::Result<OffloadConfig> {
    Ok(OffloadConfig::new("blocks", n)
        .cpu_test_mode(true)
        .checkpoint(Checkpoint::open(path)?))
}

#[derive(Debug, Clone, Copy)]
enum Store {
    /// Pinned (or plain) buffers read from the files.
    Copied,
    /// The files' own pages.
    ZeroCopy,
    /// Half the blocks in memory, the others read at each upload.
    HalfOnDisk,
}

/// The model's weights from a checkpoint (another model's): the streamed forward equals the
/// other model's resident forward bit for bit, reads give its values, and `restore` leaves
/// them in the model.
#[rstest]
fn loads_the_checkpoint_bit_exact(
    #[values(Mode::Cpu, Mode::Cuda)] mode: Mode,
    #[values(1, 3)] shards: usize,
    #[values(Store::Copied, Store::ZeroCopy, Store::HalfOnDisk)] store: Store,
) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let dir = TempDir::new("exact");
    let source = Model::new(dev, 5, false, 21);
    let path = write_checkpoint(&dir.0, &source.snapshot(), shards);
    let x = source.input(4);
    let want = source.forward(&x, None);
    // Another model of the same shape: its values must not matter.
    let model = Model::new(dev, 5, false, 22);
    let block_bytes: u64 = model
        .vs
        .variables()
        .iter()
        .filter(|(n, _)| n.starts_with("blocks.0."))
        .map(|(_, t)| (t.numel() * 4) as u64)
        .sum();
    let mut config = mode
        .config("blocks", 5)
        .checkpoint(Checkpoint::open(&path)?);
    config = match store {
        Store::Copied => config,
        Store::ZeroCopy => config.zero_copy(true),
        Store::HalfOnDisk => config.host_budget(block_bytes * 5 / 2 + block_bytes / 4),
    };
    let mut m = config.build(&model.vs)?;
    m.initialize()?;
    match store {
        Store::HalfOnDisk => assert_eq!(m.stats().disk_blocks, 3, "2 of 5 blocks fit"),
        _ => assert_eq!(m.stats().disk_blocks, 0),
    }
    let host = m.host_store().expect("initialized");
    assert_eq!(host.is_read_only(), matches!(store, Store::ZeroCopy));
    if let (Store::ZeroCopy, 3) = (store, shards) {
        // Blocks that straddle two files are held in pieces, not one buffer.
        assert!((0..5).any(|i| host.block(i).is_none()));
    }
    for round in 0..3 {
        let got = model.forward(&x, Some(&mut m));
        assert!(bits_equal(&got, &want), "forward {round} differs");
    }
    // Reads while offloaded give the checkpoint's values, also for disk-tier blocks.
    for name in ["blocks.1.fc1.weight", "blocks.4.norm2.bias", "embed.weight"] {
        let v = m.tensor(name)?;
        assert!(bits_equal(&v, &source.vs.variables()[name]), "{name}");
    }
    m.restore()?;
    assert_same(&model.snapshot(), &source.snapshot());
    assert!(bits_equal(&model.forward(&x, None), &want));
    Ok(())
}

/// The disk tier serves blocks entered out of loop order and one block again and again.
#[rstest]
fn disk_tier_in_any_order(#[values(Mode::Cpu, Mode::Cuda)] mode: Mode) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let dir = TempDir::new("order");
    let source = Model::new(dev, 6, false, 31);
    let path = write_checkpoint(&dir.0, &source.snapshot(), 2);
    let model = Model::new(dev, 6, false, 32);
    let mut m = mode
        .config("blocks", 6)
        .checkpoint(Checkpoint::open(&path)?)
        .host_budget(0)
        .build(&model.vs)?;
    m.initialize()?;
    assert_eq!(m.stats().disk_blocks, 6);
    let want = source.vs.variables();
    for &b in &[3usize, 0, 5, 5, 1, 2, 4, 0, 3] {
        let g = m.enter(b)?;
        let name = format!("blocks.{b}.fc2.weight");
        let got = model.vs.variables()[&name].shallow_clone();
        assert!(bits_equal(&got, &want[&name]), "block {b}");
        drop(g);
    }
    m.restore()?;
    assert_same(&model.snapshot(), &source.snapshot());
    Ok(())
}

#[test]
fn renamed_tensors_load() -> anyhow::Result<()> {
    let dir = TempDir::new("rename");
    let source = Model::new(Device::Cpu, 3, false, 41);
    let prefixed: Vec<(String, Tensor)> = source
        .snapshot()
        .into_iter()
        .map(|(n, t)| (format!("model.diffusion_model.{n}"), t))
        .collect();
    let path = write_checkpoint(&dir.0, &prefixed, 2);
    let x = source.input(1);
    let want = source.forward(&x, None);

    // Without the rename every tensor is both missing and unexpected.
    let model = Model::new(Device::Cpu, 3, false, 42);
    let before = model.snapshot();
    let mut m = on_cpu(3, &path)?.build(&model.vs)?;
    match m.initialize() {
        Err(Error::CheckpointMismatch(mm)) => {
            assert_eq!(mm.missing.len(), before.len());
            assert_eq!(mm.unexpected.len(), before.len());
            let text = mm.to_string();
            assert!(text.contains("strip_prefix"), "{text}");
        }
        r => panic!("expected CheckpointMismatch, got {r:?}"),
    }
    assert_same(&model.snapshot(), &before);
    drop(m);

    let ckpt = Checkpoint::open(&path)?.strip_prefix("model.diffusion_model.")?;
    let mut m = OffloadConfig::new("blocks", 3)
        .cpu_test_mode(true)
        .checkpoint(ckpt)
        .build(&model.vs)?;
    m.initialize()?;
    assert!(bits_equal(&model.forward(&x, Some(&mut m)), &want));
    drop(m);

    // A rename function; two names mapped to one is refused.
    let ckpt = Checkpoint::open(&path)?
        .rename(|n| n.strip_prefix("model.diffusion_model.").map(str::to_owned))?;
    assert!(ckpt.get("blocks.0.qkv.weight").is_some());
    assert_eq!(
        ckpt.tensors()["blocks.0.qkv.weight"].stored_name,
        "model.diffusion_model.blocks.0.qkv.weight"
    );
    match Checkpoint::open(&path)?.rename(|_| Some("same".into())) {
        Err(e @ Error::Checkpoint { .. }) => assert!(e.to_string().contains("\"same\""), "{e}"),
        r => panic!("expected Error::Checkpoint, got {r:?}"),
    }
    Ok(())
}

/// A missing tensor, an unexpected one, a shape and a dtype difference: one error names them
/// all, and the model is left as it was.
#[test]
fn every_mismatch_is_named() -> anyhow::Result<()> {
    let dir = TempDir::new("mismatch");
    let source = Model::new(Device::Cpu, 3, false, 51);
    let mut tensors = source.snapshot();
    tensors.retain(|(n, _)| n != "blocks.1.proj.bias");
    tensors.push((
        "blocks.1.extra".into(),
        Tensor::zeros([4], (Kind::Float, Device::Cpu)),
    ));
    for (n, t) in tensors.iter_mut() {
        if n == "head.weight" {
            *t = Tensor::zeros([3, 3], (Kind::Float, Device::Cpu));
        }
        if n == "blocks.2.fc1.weight" {
            *t = t.to_kind(Kind::Half);
        }
    }
    let path = write_checkpoint(&dir.0, &tensors, 1);
    let model = Model::new(Device::Cpu, 3, false, 52);
    let before = model.snapshot();
    let mut m = on_cpu(3, &path)?.build(&model.vs)?;
    let mm: Box<CheckpointMismatch> = match m.initialize() {
        Err(Error::CheckpointMismatch(mm)) => mm,
        r => panic!("expected CheckpointMismatch, got {r:?}"),
    };
    assert_eq!(mm.missing, vec!["blocks.1.proj.bias".to_string()]);
    assert_eq!(mm.unexpected, vec!["blocks.1.extra".to_string()]);
    assert_eq!(mm.shape.len(), 1);
    assert_eq!(mm.shape[0].name, "head.weight");
    assert_eq!(mm.shape[0].checkpoint, vec![3, 3]);
    assert_eq!(mm.dtype.len(), 1);
    assert_eq!(mm.dtype[0].name, "blocks.2.fc1.weight");
    assert_eq!(mm.dtype[0].checkpoint, "F16");
    let text = Error::CheckpointMismatch(mm).to_string();
    for needle in [
        "blocks.1.proj.bias",
        "blocks.1.extra",
        "head.weight",
        "F16",
        "convert_dtypes",
    ] {
        assert!(text.contains(needle), "{needle} not in: {text}");
    }
    assert_same(&model.snapshot(), &before);
    // Calling again fails the same way (nothing half-done).
    assert!(matches!(m.initialize(), Err(Error::CheckpointMismatch(_))));
    Ok(())
}

/// With `allow_unexpected` and `convert_dtypes`, extra tensors are ignored and a half-precision
/// tensor is converted to the model's f32 (exactly, since f16 -> f32 is exact).
#[test]
fn unexpected_and_converted_on_request() -> anyhow::Result<()> {
    let dir = TempDir::new("convert");
    let source = Model::new(Device::Cpu, 3, false, 61);
    let mut tensors = source.snapshot();
    tensors.push((
        "unused.weight".into(),
        Tensor::ones([2], (Kind::Float, Device::Cpu)),
    ));
    let mut half = None;
    for (n, t) in tensors.iter_mut() {
        if n == "blocks.2.fc1.weight" || n == "head.bias" {
            *t = t.to_kind(Kind::Half);
            if n == "blocks.2.fc1.weight" {
                half = Some(t.to_kind(Kind::Float));
            }
        }
    }
    let path = write_checkpoint(&dir.0, &tensors, 2);
    let model = Model::new(Device::Cpu, 3, false, 62);
    let mut m = on_cpu(3, &path)?
        .allow_unexpected(true)
        .convert_dtypes(true)
        .build(&model.vs)?;
    m.initialize()?;
    assert!(bits_equal(
        &m.tensor("blocks.2.fc1.weight")?,
        &half.unwrap()
    ));
    m.restore()?;
    drop(m);
    // Integers are never converted, asked or not.
    for (n, t) in tensors.iter_mut() {
        if n == "blocks.1.qkv.bias" {
            *t = t.to_kind(Kind::Int64);
        }
    }
    let ints = TempDir::new("convert-int");
    let path2 = write_checkpoint(&ints.0, &tensors, 1);
    let model2 = Model::new(Device::Cpu, 3, false, 63);
    let mut m2 = on_cpu(3, &path2)?
        .allow_unexpected(true)
        .convert_dtypes(true)
        .build(&model2.vs)?;
    match m2.initialize() {
        Err(Error::CheckpointMismatch(mm)) => {
            assert_eq!(mm.dtype.len(), 1);
            assert_eq!(mm.dtype[0].name, "blocks.1.qkv.bias");
            assert_eq!(mm.dtype[0].checkpoint, "I64");
        }
        r => panic!("expected CheckpointMismatch, got {r:?}"),
    }
    let mut m = on_cpu(3, &path)?
        .allow_unexpected(true)
        .convert_dtypes(true)
        .build(&model.vs)?;
    m.initialize()?;
    assert!(bits_equal(
        &m.tensor("blocks.0.fc1.weight")?,
        &source.vs.variables()["blocks.0.fc1.weight"]
    ));
    m.restore()?;
    Ok(())
}

#[test]
fn bad_files_are_refused_at_open() -> anyhow::Result<()> {
    let dir = TempDir::new("bad");
    let source = Model::new(Device::Cpu, 2, false, 71);
    let path = write_checkpoint(&dir.0, &source.snapshot(), 2);
    let expect = |r: layerwise_offload::Result<Checkpoint>, needle: &str| match r {
        Err(e @ (Error::Checkpoint { .. } | Error::Io { .. })) => {
            assert!(e.to_string().contains(needle), "{needle:?} not in: {e}")
        }
        r => panic!("expected Error::Checkpoint or Io containing {needle:?}, got {r:?}"),
    };
    // A shard cut short.
    let shard = path.join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&shard)?;
    std::fs::write(&shard, &bytes[..bytes.len() - 3])?;
    expect(Checkpoint::open(&path), "not a valid safetensors file");
    std::fs::write(&shard, &bytes)?;
    Checkpoint::open(&path)?;
    // The index names a shard that is not there.
    let index = path.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index)?;
    std::fs::write(
        &index,
        text.replace("model-00002-of-00002", "model-00009-of-00002"),
    )?;
    expect(Checkpoint::open(&path), "model-00009-of-00002");
    // The index puts a tensor in the wrong shard.
    let moved = text.replacen("model-00002-of-00002", "model-00001-of-00002", 1);
    std::fs::write(&index, &moved)?;
    expect(Checkpoint::open(&path), "lists");
    // A shard outside the directory.
    std::fs::write(&index, text.replace("model-00002-of-00002", "../elsewhere"))?;
    expect(Checkpoint::open(&path), "not a file name");
    // Two files and no index: which checkpoint is it?
    std::fs::remove_file(&index)?;
    expect(Checkpoint::open(&path), "several .safetensors files");
    // Not a checkpoint at all.
    let junk = dir.0.join("junk.safetensors");
    std::fs::write(&junk, b"hello, world")?;
    expect(Checkpoint::open(&junk), "not a valid safetensors file");
    expect(Checkpoint::open(dir.0.join("nothing-here")), "cannot open");
    let empty = TempDir::new("empty");
    expect(Checkpoint::open(&empty.0), "holds no .safetensors file");
    Ok(())
}

/// Files removed after opening still load (the descriptors stay open); a file truncated after
/// opening is an error at `initialize`, not a crash, and the model is left as it was.
#[rstest]
fn files_changed_after_open(#[values(false, true)] zero_copy: bool) -> anyhow::Result<()> {
    let dir = TempDir::new("changed");
    let source = Model::new(Device::Cpu, 3, false, 81);
    let path = write_checkpoint(&dir.0, &source.snapshot(), 1);
    let x = source.input(2);
    let want = source.forward(&x, None);

    let ckpt = Checkpoint::open(&path)?;
    std::fs::remove_file(&path)?;
    let model = Model::new(Device::Cpu, 3, false, 82);
    let mut m = OffloadConfig::new("blocks", 3)
        .cpu_test_mode(true)
        .checkpoint(ckpt)
        .zero_copy(zero_copy)
        .build(&model.vs)?;
    m.initialize()?;
    assert!(bits_equal(&model.forward(&x, Some(&mut m)), &want));
    m.restore()?;

    let path = write_checkpoint(&dir.0, &source.snapshot(), 1);
    let ckpt = Checkpoint::open(&path)?;
    let len = std::fs::metadata(&path)?.len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)?
        .set_len(len / 2)?;
    let model = Model::new(Device::Cpu, 3, false, 83);
    let before = model.snapshot();
    let mut m = OffloadConfig::new("blocks", 3)
        .cpu_test_mode(true)
        .checkpoint(ckpt)
        .zero_copy(zero_copy)
        .build(&model.vs)?;
    match m.initialize() {
        // Zero-copy checks the lengths first.
        Err(e @ Error::Checkpoint { .. }) => assert!(e.to_string().contains("truncated"), "{e}"),
        // A read past the new end: the io error is the source, its kind matchable.
        Err(e @ Error::Io { .. }) => {
            assert!(e.to_string().contains("truncated"), "{e}");
            let io = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .expect("the io::Error is the source");
            assert_eq!(io.kind(), std::io::ErrorKind::UnexpectedEof, "{e:?}");
        }
        r => panic!("expected Error::Checkpoint or Io, got {r:?}"),
    }
    assert_same(&model.snapshot(), &before);
    Ok(())
}

/// A host allocation that fails part-way through the checkpoint fill puts the model back.
#[rstest]
fn a_failed_load_leaves_the_model_as_it_was(
    #[values(Mode::Cpu, Mode::Cuda)] mode: Mode,
) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let dir = TempDir::new("fault");
    let source = Model::new(dev, 4, false, 91);
    let path = write_checkpoint(&dir.0, &source.snapshot(), 2);
    let model = Model::new(dev, 4, false, 92);
    let before = model.snapshot();
    let mut m = mode
        .config("blocks", 4)
        .checkpoint(Checkpoint::open(&path)?)
        .inject_fault(Fault::HostAlloc(2))
        .build(&model.vs)?;
    assert!(matches!(m.initialize(), Err(Error::HostAlloc { .. })));
    assert_same(&model.snapshot(), &before);
    // Every tensor is back on its device.
    assert!(model.vs.variables().values().all(|t| t.device() == dev));
    Ok(())
}

#[rstest]
fn updates_where_the_host_copy_is_writable(
    #[values(Mode::Cpu, Mode::Cuda)] mode: Mode,
) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let dir = TempDir::new("update");
    let source = Model::new(dev, 4, false, 101);
    let path = write_checkpoint(&dir.0, &source.snapshot(), 1);
    let name = "blocks.1.fc1.weight";
    let new = source.vs.variables()[name].to_device(Device::Cpu) * 2.0;
    for (zero_copy, budget) in [(false, None), (true, None), (false, Some(0u64))] {
        let model = Model::new(dev, 4, false, 102);
        let mut config = mode
            .config("blocks", 4)
            .checkpoint(Checkpoint::open(&path)?)
            .zero_copy(zero_copy);
        if let Some(b) = budget {
            config = config.host_budget(b);
        }
        let mut m = config.build(&model.vs)?;
        m.initialize()?;
        let r = m.update_tensor(name, &new);
        if zero_copy || budget.is_some() {
            match r {
                Err(e @ Error::InvalidArgument { .. }) => {
                    let want = if zero_copy { "zero_copy" } else { "disk tier" };
                    assert!(e.to_string().contains(want), "{e}");
                }
                r => panic!("expected a refusal, got {r:?}"),
            }
        } else {
            r?;
            assert!(bits_equal(&m.tensor(name)?, &new));
        }
        m.restore()?;
    }
    Ok(())
}

#[test]
fn options_that_do_not_fit_are_refused() -> anyhow::Result<()> {
    let dir = TempDir::new("options");
    let source = Model::new(Device::Cpu, 2, false, 111);
    let path = write_checkpoint(&dir.0, &source.snapshot(), 1);
    let model = Model::new(Device::Cpu, 2, false, 112);
    let base = || OffloadConfig::new("blocks", 2).cpu_test_mode(true);
    let refused = |c: OffloadConfig, needle: &str| match c.build(&model.vs) {
        Err(e @ Error::InvalidArgument { .. }) => {
            assert!(e.to_string().contains(needle), "{needle:?} not in: {e}")
        }
        r => panic!(
            "expected InvalidArgument containing {needle:?}, got {:?}",
            r.map(|_| ())
        ),
    };
    refused(base().zero_copy(true), "checkpoint");
    refused(base().host_budget(1), "checkpoint");
    let ckpt = std::sync::Arc::new(Checkpoint::open(&path)?);
    refused(
        base()
            .checkpoint(ckpt.clone())
            .zero_copy(true)
            .host_budget(1),
        "choose one",
    );
    refused(
        base()
            .checkpoint(ckpt.clone())
            .host_budget(1)
            .convert_dtypes(true),
        "as stored",
    );
    refused(
        base()
            .checkpoint(ckpt.clone())
            .zero_copy(true)
            .shared_memory("/dev/shm/lo-never-created"),
        "page cache",
    );
    // One checkpoint serves several managers.
    let mut m = base().checkpoint(ckpt.clone()).build(&model.vs)?;
    m.initialize()?;
    m.restore()?;
    assert_same(&model.snapshot(), &source.snapshot());
    Ok(())
}

/// Makes a FIFO at `path`.
fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path that lives for the call.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo {}", path.display());
}

/// `Checkpoint::open(path)` on another thread: its result within 20 s, or a failure naming the
/// case (a thread blocked in `open` is left behind; the test binary exits anyway).
fn open_within_timeout(path: &Path, case: &str) -> layerwise_offload::Result<Checkpoint> {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.to_owned();
    std::thread::spawn(move || {
        let _ = tx.send(Checkpoint::open(&p));
    });
    rx.recv_timeout(std::time::Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{case}: Checkpoint::open still blocked after 20 s"))
}

#[test]
fn a_fifo_in_place_of_a_file_is_refused_without_blocking() -> anyhow::Result<()> {
    let source = Model::new(Device::Cpu, 2, false, 73);
    let check = |r: layerwise_offload::Result<Checkpoint>, case: &str| match r {
        Err(e @ Error::Checkpoint { .. }) => assert!(
            e.to_string().contains("not a regular file"),
            "{case}: the error must say it is not a regular file: {e}"
        ),
        r => panic!("{case}: expected Error::Checkpoint, got {r:?}"),
    };
    // A shard named in the index.
    let dir = TempDir::new("fifo-shard");
    let path = write_checkpoint(&dir.0, &source.snapshot(), 2);
    let shard = path.join("model-00002-of-00002.safetensors");
    std::fs::remove_file(&shard)?;
    mkfifo(&shard);
    check(open_within_timeout(&path, "a shard"), "a shard");
    // The index itself.
    let dir = TempDir::new("fifo-index");
    let path = write_checkpoint(&dir.0, &source.snapshot(), 2);
    let index = path.join("model.safetensors.index.json");
    std::fs::remove_file(&index)?;
    mkfifo(&index);
    check(open_within_timeout(&path, "the index"), "the index");
    check(
        open_within_timeout(&index, "the index by name"),
        "the index by name",
    );
    // The single weights file of a directory, and a file opened by name.
    let dir = TempDir::new("fifo-single");
    let single = dir.0.join("model.safetensors");
    mkfifo(&single);
    check(
        open_within_timeout(&dir.0, "the weights file"),
        "the weights file",
    );
    check(
        open_within_timeout(&single, "a file by name"),
        "a file by name",
    );
    Ok(())
}

/// The checkpoint's `.safetensors` files in `dir`.
fn shard_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    v.sort();
    v
}

/// A zero-copy manager of a model of 4 blocks over a 2-shard checkpoint of another model, run
/// once, then dropped without `restore()`; returns the source, the model, and the directory.
fn zero_copy_dropped(tag: &str, seed: i64) -> anyhow::Result<(Model, Model, TempDir)> {
    let dir = TempDir::new(tag);
    let source = Model::new(Device::Cpu, 4, false, seed);
    let path = write_checkpoint(&dir.0, &source.snapshot(), 2);
    let model = Model::new(Device::Cpu, 4, false, seed + 1);
    let x = source.input(3);
    let mut m = on_cpu(4, &path)?.zero_copy(true).build(&model.vs)?;
    m.initialize()?;
    assert!(bits_equal(
        &model.forward(&x, Some(&mut m)),
        &source.forward(&x, None)
    ));
    drop(m);
    Ok((source, model, dir))
}

/// Dropping a zero-copy manager without `restore()` leaves every block tensor in memory the
/// model owns: `fill_`, `copy_` and `VarStore::load` write them (they were views of the
/// checkpoint's read-only pages: SIGSEGV).
#[test]
fn a_dropped_zero_copy_manager_leaves_writable_weights() -> anyhow::Result<()> {
    let (source, model, _dir) = zero_copy_dropped("zc-write", 121)?;
    let want = source.vs.variables();
    let blocks: Vec<(String, Tensor)> = model
        .vs
        .variables()
        .into_iter()
        .filter(|(n, _)| n.starts_with("blocks."))
        .collect();
    assert!(!blocks.is_empty());
    for (n, t) in &blocks {
        assert!(
            bits_equal(t, &want[n]),
            "{n}: the checkpoint's value after drop"
        );
        let mut t = t.shallow_clone();
        tch::no_grad(|| {
            let _ = t.fill_(1.5);
        });
        assert!(bits_equal(&t, &t.full_like(1.5)), "{n}: fill_");
        tch::no_grad(|| t.copy_(&want[n]));
        assert!(bits_equal(&t, &want[n]), "{n}: copy_");
    }
    // VarStore::load writes every variable in place.
    let again = TempDir::new("zc-write-load");
    let file = write_checkpoint(&again.0, &source.snapshot(), 1);
    let mut vs = model.vs;
    for (_, t) in &blocks {
        let mut t = t.shallow_clone();
        tch::no_grad(|| {
            let _ = t.zero_();
        });
    }
    vs.load(&file)?;
    for (n, t) in &blocks {
        assert!(bits_equal(t, &want[n]), "{n}: VarStore::load");
    }
    Ok(())
}

/// After dropping a zero-copy manager without `restore()`, truncating the checkpoint's files
/// does not reach the model (it was a view of their pages: SIGBUS at the next read).
#[test]
fn a_dropped_zero_copy_manager_survives_truncated_files() -> anyhow::Result<()> {
    let (source, model, dir) = zero_copy_dropped("zc-trunc", 131)?;
    for f in shard_files(&dir.0) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f)?
            .set_len(0)?;
    }
    assert_same(&model.snapshot(), &source.snapshot());
    let x = source.input(5);
    assert!(bits_equal(
        &model.forward(&x, None),
        &source.forward(&x, None)
    ));
    Ok(())
}

/// `tensor(name)` of a block held as the checkpoint's read-only pages is a copy the caller
/// owns: writing it works (it was a view of the pages: SIGSEGV) and changes nothing else.
#[test]
fn tensor_of_a_zero_copy_block_is_a_copy_to_write() -> anyhow::Result<()> {
    let dir = TempDir::new("zc-tensor");
    let source = Model::new(Device::Cpu, 3, false, 141);
    let path = write_checkpoint(&dir.0, &source.snapshot(), 1);
    let model = Model::new(Device::Cpu, 3, false, 142);
    let x = source.input(2);
    let want = source.forward(&x, None);
    let mut m = on_cpu(3, &path)?.zero_copy(true).build(&model.vs)?;
    m.initialize()?;
    let name = "blocks.1.fc1.weight";
    let mut t = m.tensor(name)?;
    tch::no_grad(|| {
        let _ = t.fill_(7.0);
    });
    assert!(bits_equal(&t, &t.full_like(7.0)));
    assert!(bits_equal(&m.tensor(name)?, &source.vs.variables()[name]));
    // Every block tensor read so (the others are the model's own tensors, as documented).
    for (n, mut t) in m.named_tensors()? {
        if !n.starts_with("blocks.") {
            continue;
        }
        tch::no_grad(|| {
            let _ = t.fill_(0.0);
        });
        assert!(
            bits_equal(&m.tensor(&n)?, &source.vs.variables()[&n]),
            "{n}"
        );
    }
    assert!(bits_equal(&model.forward(&x, Some(&mut m)), &want));
    m.restore()?;
    assert_same(&model.snapshot(), &source.snapshot());
    Ok(())
}

/// Enters every block of `m` in loop order; the first error, if any.
fn enter_all(m: &mut layerwise_offload::LayerwiseOffloadManager) -> Option<Error> {
    (0..m.num_blocks()).find_map(|i| m.enter(i).err())
}

/// A checkpoint file rewritten in place (same inode, same length, other weights) under a disk
/// tier: the next forward stops with `Error::Checkpoint` naming the file (it served a mix of
/// old and new weights), `restore()` refuses the same way with nothing changed (the disk-tier
/// blocks' weights at `initialize()` are gone), and dropping the manager gives the blocks held
/// in memory back bit for bit. With the modification time moved forward, or put back to its
/// old value after the rewrite (the change time still tells).
#[rstest]
fn a_checkpoint_rewritten_under_the_disk_tier_is_an_error(
    #[values(true, false)] mtime_forward: bool,
) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt as _;
    let dir = TempDir::new("rewrite");
    let source = Model::new(Device::Cpu, 4, false, 151);
    let path = write_checkpoint(&dir.0, &source.snapshot(), 1);
    // The same tensors with other values: a file of the same length.
    let other_dir = TempDir::new("rewrite-other");
    let other = Model::new(Device::Cpu, 4, false, 152);
    let new_bytes = std::fs::read(write_checkpoint(&other_dir.0, &other.snapshot(), 1))?;
    assert_eq!(new_bytes.len() as u64, std::fs::metadata(&path)?.len());

    let model = Model::new(Device::Cpu, 4, false, 153);
    let x = source.input(3);
    let want = source.forward(&x, None);
    let block_bytes: u64 = source
        .vs
        .variables()
        .iter()
        .filter(|(n, _)| n.starts_with("blocks.0."))
        .map(|(_, t)| (t.numel() * 4) as u64)
        .sum();
    let mut m = on_cpu(4, &path)?
        .host_budget(block_bytes * 2 + block_bytes / 2)
        .build(&model.vs)?;
    m.initialize()?;
    assert_eq!(m.stats().disk_blocks, 2);
    assert!(bits_equal(&model.forward(&x, Some(&mut m)), &want));

    // Rewritten in place: same inode, same length, other bytes.
    let old_mtime = std::fs::metadata(&path)?.modified()?;
    std::thread::sleep(std::time::Duration::from_millis(50)); // past a coarse clock tick
    let file = std::fs::OpenOptions::new().write(true).open(&path)?;
    file.write_all_at(&new_bytes, 0)?;
    let hour = std::time::Duration::from_secs(3600);
    file.set_modified(if mtime_forward {
        old_mtime + hour
    } else {
        old_mtime
    })?;
    drop(file);

    // The next forward stops at the first block read from the changed file (blocks read
    // ahead before the rewrite hold the old bytes, whole); the one after too.
    for round in 0..2 {
        match enter_all(&mut m) {
            Some(Error::Checkpoint { path: p, reason }) => {
                assert_eq!(p, path, "names the file");
                assert!(reason.contains("changed in place"), "{reason}");
                let what = if mtime_forward { "modified" } else { "changed" };
                assert!(reason.contains(what), "{reason}");
            }
            other => panic!("forward {round}: expected Error::Checkpoint, got {other:?}"),
        }
    }
    // restore() refuses before changing anything.
    match m.restore() {
        Err(Error::Checkpoint { path: p, reason }) => {
            assert_eq!(p, path);
            assert!(reason.contains("restore() refuses"), "{reason}");
        }
        other => panic!("expected Error::Checkpoint from restore, got {other:?}"),
    }
    assert!(m.is_initialized());
    // Dropped: the two blocks held in memory come back bit for bit, the disk-tier blocks'
    // tensors stay empty; nothing holds another value.
    drop(m);
    let want_vars = source.vs.variables();
    let mut whole = 0;
    for b in 0..4 {
        let prefix = format!("blocks.{b}.");
        let tensors: Vec<(String, Tensor)> = model
            .vs
            .variables()
            .into_iter()
            .filter(|(n, _)| n.starts_with(&prefix))
            .collect();
        if tensors.iter().all(|(_, t)| t.numel() == 0) {
            continue;
        }
        for (n, t) in &tensors {
            assert!(bits_equal(t, &want_vars[n]), "{n}");
        }
        whole += 1;
    }
    assert_eq!(whole, 2, "the blocks held in host memory");
    Ok(())
}
