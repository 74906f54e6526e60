//! Compressed transport from a checkpoint's encoded cache (`OffloadConfig::encoded_cache`):
//! the encodings written once beside the checkpoint, then read into pinned memory, mapped in
//! place (`zero_copy`) or read block by block by the disk tier (`host_budget`). Outputs stay
//! bit-exact against the resident model, `restore()` gives the weights back bit-identical
//! (also after an error), and a stale or damaged cache is refused with `Error::EncodedCache`.

use offload_testkit as common;

use common::Mode;
use common::model::{Model, assert_same, bits_equal};
use layerwise_offload::checkpoint::Checkpoint;
use layerwise_offload::{Error, LayerwiseOffloadManager, OffloadConfig};
use rstest::rstest;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Where a compressed manager's host copies come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    /// The cache read into pinned (CPU test mode: pageable) buffers (`encoded_cache` given).
    Pinned,
    /// The cache's own pages (`zero_copy`, default cache path).
    ZeroCopy,
    /// Part in memory, the rest read from the cache at each upload (`host_budget`).
    Disk,
}

/// A fresh directory for one test case.
fn scratch_dir(what: &str, mode: Mode, tier: Tier, extra: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "lo-enc-cache-{what}-{}-{mode:?}-{tier:?}-{extra}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `model`'s weights written to `dir/model.safetensors`.
fn write_checkpoint(model: &Model, dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("model.safetensors");
    let cpu: Vec<(String, Tensor)> = model
        .snapshot()
        .into_iter()
        .map(|(n, t)| (n, t.to_device(Device::Cpu)))
        .collect();
    Tensor::write_safetensors(&cpu, &path)?;
    Ok(path)
}

/// The cache file for `tier` of the checkpoint at `ckpt`.
fn cache_path(tier: Tier, ckpt: &Path) -> PathBuf {
    match tier {
        Tier::Pinned => ckpt.with_file_name("blocks.encoded"),
        // The default: beside the checkpoint file.
        Tier::ZeroCopy | Tier::Disk => ckpt.with_file_name("model.safetensors.encoded"),
    }
}

/// A compressed manager's configuration over two block lists (2 + 3 blocks), from `ckpt`.
fn config(mode: Mode, tier: Tier, ckpt: &Path, vram: bool) -> anyhow::Result<OffloadConfig> {
    let mut c = mode
        .config("double_blocks", 2)
        .with_list("single_blocks", 3)
        .checkpoint(Checkpoint::open(ckpt)?)
        .compress(true);
    c = match tier {
        Tier::Pinned => c.encoded_cache(cache_path(tier, ckpt)),
        Tier::ZeroCopy => c.zero_copy(true),
        // About two of the five encodings in host memory.
        Tier::Disk => c.host_budget(2 * 200_000),
    };
    if vram {
        // One block resident on the device.
        c = c.vram_budget(600_000);
    }
    Ok(c)
}

/// Enters every block once, in loop order; the first error.
fn enter_all(m: &mut LayerwiseOffloadManager, n: usize) -> layerwise_offload::Result<()> {
    for i in 0..n {
        drop(m.enter(i)?);
    }
    Ok(())
}

/// The first start writes the cache, the second uses it unchanged; both stream bit-exact over
/// two lists (with and without a VRAM budget), read back the checkpoint's weights, and
/// restore them bit-identical.
#[rstest]
fn the_cache_serves_every_checkpoint_tier(
    #[values(Mode::Cpu, Mode::Cuda)] mode: Mode,
    #[values(Tier::Pinned, Tier::ZeroCopy, Tier::Disk)] tier: Tier,
    #[values(false, true)] vram: bool,
) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let dir = scratch_dir("serves", mode, tier, &vram.to_string());
    let source = Model::new(dev, 2, true, 301);
    let ckpt = write_checkpoint(&source, &dir)?;
    let cache = cache_path(tier, &ckpt);
    let x = source.input(4);
    let want = source.forward(&x, None);
    let mut written = None;
    for start in 0..2 {
        // Other values: every weight must come from the checkpoint.
        let model = Model::new(dev, 2, true, 310 + start);
        let mut m = config(mode, tier, &ckpt, vram)?.build(&model.vs)?;
        m.initialize()?;
        let meta = std::fs::metadata(&cache)?;
        let stamp = (meta.len(), meta.modified()?);
        match written {
            None => written = Some(stamp),
            Some(w) => assert_eq!(w, stamp, "start {start} wrote the cache again"),
        }
        let st = m.stats().clone();
        assert_eq!(st.encoded_blocks, st.streamed_blocks, "start {start}");
        assert_eq!(st.streamed_blocks + st.resident_blocks, 5);
        if vram {
            assert!(st.resident_blocks > 0, "the VRAM budget keeps a block");
        }
        if tier == Tier::Disk {
            assert!(
                st.disk_blocks > 0 && st.disk_blocks < st.streamed_blocks,
                "{st:?}"
            );
        }
        for round in 0..2 {
            assert!(
                bits_equal(&model.forward(&x, Some(&mut m)), &want),
                "start {start}, forward {round}"
            );
        }
        let mut got = m.named_tensors()?;
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_same(&got, &source.snapshot());
        m.restore()?;
        assert_same(&model.snapshot(), &source.snapshot());
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A bf16 model of four DiT-like blocks (N(0, 0.02) weights).
fn bf16_blocks() -> Vec<(String, Tensor)> {
    tch::manual_seed(17);
    let mut named = Vec::new();
    for b in 0..4 {
        for (name, shape) in [("w1", vec![256, 256]), ("w2", vec![256, 128])] {
            let t = (Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu)) * 0.02)
                .to_kind(Kind::BFloat16);
            named.push((format!("blocks.{b}.{name}"), t));
        }
    }
    named
}

/// The disk tier moves encodings: each upload of a bf16 block carries its encoding (about 0.7
/// of the raw bytes), read from the cache; every block reads back exactly, and restore gives
/// the weights back.
#[rstest]
fn the_disk_tier_uploads_encodings(
    #[values(Mode::Cpu, Mode::Cuda)] mode: Mode,
) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let dir = scratch_dir("disk-bytes", mode, Tier::Disk, "");
    let named = bf16_blocks();
    let ckpt = dir.join("model.safetensors");
    Tensor::write_safetensors(&named, &ckpt)?;
    let model: Vec<(String, Tensor)> = named
        .iter()
        .map(|(n, t)| (n.clone(), t.zeros_like().to_device(dev)))
        .collect();
    let mut m = mode
        .config("blocks", 4)
        .checkpoint(Checkpoint::open(&ckpt)?)
        .compress(true)
        .host_budget(1) // every block on the disk tier
        .build(&model)?;
    m.initialize()?;
    let st = m.stats().clone();
    assert_eq!((st.disk_blocks, st.encoded_blocks), (4, 4));
    let ratio = st.encoded_bytes as f64 / st.raw_encoded_bytes as f64;
    assert!(ratio < 0.75, "encodings are {ratio} of the raw blocks");
    let before = m.stats().bytes_uploaded;
    enter_all(&mut m, 4)?;
    enter_all(&mut m, 4)?;
    let moved = m.stats().bytes_uploaded - before;
    // Uploads moved encodings only: never more than two passes of them (block 0 may have
    // been uploaded by initialize already).
    assert!(
        moved <= 2 * st.encoded_bytes && moved >= 2 * st.encoded_bytes - st.encoded_bytes / 2,
        "moved {moved} bytes, encodings {}",
        st.encoded_bytes
    );
    for (n, t) in &named {
        assert!(bits_equal(&m.tensor(n)?.to_device(Device::Cpu), t), "{n}");
    }
    m.restore()?;
    for ((n, t), (_, w)) in model.iter().zip(&named) {
        assert!(bits_equal(&t.to_device(Device::Cpu), w), "{n} restored");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn expect_cache_error<T>(r: layerwise_offload::Result<T>, needle: &str) {
    match r {
        Err(e @ Error::EncodedCache { .. }) => {
            assert!(e.to_string().contains(needle), "{e}");
            assert!(e.to_string().contains("delete the file"), "{e}");
        }
        Err(e) => panic!("expected EncodedCache with {needle:?}, got {e}"),
        Ok(_) => panic!("expected EncodedCache with {needle:?}, got Ok"),
    }
}

/// Flips one byte of the file at `at`.
fn flip(path: &Path, at: u64) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let mut b = [0u8];
    f.read_exact_at(&mut b, at)?;
    f.write_all_at(&[b[0] ^ 0x10], at)?;
    Ok(())
}

/// A damaged cache (a flipped byte in an encoding or in its header, or not a cache at all) and
/// a stale one (the checkpoint rewritten) are refused with `EncodedCache`; the model keeps its
/// values when `initialize` fails, and gets the checkpoint's back from `restore` when a
/// disk-tier upload fails.
#[rstest]
fn a_damaged_or_stale_cache_is_refused(
    #[values(Mode::Cpu, Mode::Cuda)] mode: Mode,
    #[values(Tier::Pinned, Tier::ZeroCopy, Tier::Disk)] tier: Tier,
) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let dir = scratch_dir("refused", mode, tier, "");
    let source = Model::new(dev, 2, true, 321);
    let ckpt = write_checkpoint(&source, &dir)?;
    let cache = cache_path(tier, &ckpt);
    let model = Model::new(dev, 2, true, 322);
    let mut m = config(mode, tier, &ckpt, false)?.build(&model.vs)?;
    m.initialize()?;
    m.restore()?;
    let good = std::fs::read(&cache)?;

    // A flipped byte in each block's encoding (each block starts at a 4 KiB boundary; the
    // codec's CRC covers every byte).
    for at in [100u64, 4096 * 3 + 7] {
        std::fs::write(&cache, &good)?;
        flip(&cache, at)?;
        let model = Model::new(dev, 2, true, 323);
        let before = model.snapshot();
        let mut m = config(mode, tier, &ckpt, false)?.build(&model.vs)?;
        match m.initialize() {
            // Refused before anything changed.
            Err(e) if !m.is_initialized() => {
                expect_cache_error(Err::<(), _>(e), "is corrupt");
                assert_same(&model.snapshot(), &before);
            }
            // Initialized, but the first block's upload (from the disk tier) failed.
            Err(e) => {
                assert_eq!(tier, Tier::Disk, "{e}");
                expect_cache_error(Err::<(), _>(e), "is corrupt");
                m.restore()?;
                assert_same(&model.snapshot(), &source.snapshot());
            }
            Ok(()) => {
                // The damaged block is on the disk tier: its upload fails, the weights still
                // come back (read raw from the checkpoint).
                assert_eq!(tier, Tier::Disk, "a damaged block was accepted");
                let mut failed = None;
                for _ in 0..2 {
                    if let Err(e) = enter_all(&mut m, 5) {
                        failed = Some(e);
                        break;
                    }
                }
                expect_cache_error(Err::<(), _>(failed.expect("an upload fails")), "is corrupt");
                m.restore()?;
                assert_same(&model.snapshot(), &source.snapshot());
            }
        }
    }

    // The header changed (its last byte before the trailer).
    std::fs::write(&cache, &good)?;
    flip(&cache, good.len() as u64 - 33)?;
    let model = Model::new(dev, 2, true, 324);
    let mut m = config(mode, tier, &ckpt, false)?.build(&model.vs)?;
    expect_cache_error(m.initialize(), "header changed");

    // Not a cache.
    std::fs::write(&cache, b"not a cache, but long enough to have a trailer")?;
    let mut m = config(mode, tier, &ckpt, false)?.build(&model.vs)?;
    expect_cache_error(m.initialize(), "not an encoded cache");

    // Stale: the checkpoint rewritten with other values since the cache was written.
    std::fs::write(&cache, &good)?;
    std::thread::sleep(std::time::Duration::from_millis(20));
    write_checkpoint(&Model::new(dev, 2, true, 325), &dir)?;
    let before = model.snapshot();
    let mut m = config(mode, tier, &ckpt, false)?.build(&model.vs)?;
    expect_cache_error(m.initialize(), "is stale");
    assert_same(&model.snapshot(), &before);

    // Deleted: written again, from the new checkpoint.
    std::fs::remove_file(&cache)?;
    let mut m = config(mode, tier, &ckpt, false)?.build(&model.vs)?;
    m.initialize()?;
    m.restore()?;
    assert!(cache.exists());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Segments of 64 KiB (every block three or four of them) through every tier of the cache:
/// bit-exact forwards and a bit-identical restore; then a manager with another segment size is
/// refused with `EncodedCache` ("is stale") before anything changed, as a cache written before
/// encodings were segmented would be (its version).
#[rstest]
fn a_cache_of_other_segments_is_refused(
    #[values(Mode::Cpu, Mode::Cuda)] mode: Mode,
    #[values(Tier::Pinned, Tier::ZeroCopy, Tier::Disk)] tier: Tier,
) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    const SEG: usize = layerwise_offload::SEGMENT_BYTES_MULTIPLE;
    let dir = scratch_dir("segments", mode, tier, "");
    let source = Model::new(dev, 2, true, 341);
    let ckpt = write_checkpoint(&source, &dir)?;
    let smallest: usize = source
        .snapshot()
        .iter()
        .filter(|(n, _)| n.starts_with("double_blocks.0."))
        .map(|(_, t)| t.numel() * 4)
        .sum();
    assert!(smallest > 2 * SEG, "every block is three segments or more");
    let x = source.input(6);
    let want = source.forward(&x, None);
    for start in 0..2 {
        let model = Model::new(dev, 2, true, 342 + start);
        let mut m = config(mode, tier, &ckpt, false)?
            .compress_segment_bytes(SEG)
            .build(&model.vs)?;
        m.initialize()?;
        if tier == Tier::Disk {
            assert!(m.stats().disk_blocks > 0);
        }
        for round in 0..2 {
            assert!(
                bits_equal(&model.forward(&x, Some(&mut m)), &want),
                "start {start}, forward {round}"
            );
        }
        m.restore()?;
        assert_same(&model.snapshot(), &source.snapshot());
    }
    let model = Model::new(dev, 2, true, 345);
    let before = model.snapshot();
    let mut m = config(mode, tier, &ckpt, false)?
        .compress_segment_bytes(2 * SEG)
        .build(&model.vs)?;
    expect_cache_error(m.initialize(), "is stale");
    assert_same(&model.snapshot(), &before);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A cache written for one model's blocks is refused for other blocks (another list).
#[test]
fn a_cache_for_other_blocks_is_refused() -> anyhow::Result<()> {
    let dir = scratch_dir("other-blocks", Mode::Cpu, Tier::ZeroCopy, "");
    let source = Model::new(Device::Cpu, 2, true, 331);
    let ckpt = write_checkpoint(&source, &dir)?;
    let model = Model::new(Device::Cpu, 2, true, 332);
    let mut m = config(Mode::Cpu, Tier::ZeroCopy, &ckpt, false)?.build(&model.vs)?;
    m.initialize()?;
    m.restore()?;
    // Only the first list offloaded now.
    let mut m = Mode::Cpu
        .config("double_blocks", 2)
        .checkpoint(Checkpoint::open(&ckpt)?)
        .compress(true)
        .zero_copy(true)
        .build(&model.vs)?;
    expect_cache_error(m.initialize(), "other blocks");
    // And the option needs compress and a checkpoint.
    let r = Mode::Cpu
        .config("double_blocks", 2)
        .encoded_cache(dir.join("x"))
        .build(&model.vs);
    assert!(matches!(r, Err(Error::InvalidArgument { .. })));
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A peer group of two members streams from the encoded cache's pages (`zero_copy`): the first
/// member writes the cache, the second opens it; each uploads and decodes about half of every
/// block's segments (64 KiB, three per block) and sends the decoded bytes on to the other;
/// every block arrives bit-exact, and `restore` gives each member the checkpoint's weights.
#[rstest]
fn a_peer_group_streams_from_the_cache(
    #[values(Mode::Cpu, Mode::Cuda)] mode: Mode,
) -> anyhow::Result<()> {
    let devs = match mode {
        Mode::Cpu => vec![Device::Cpu; 2],
        Mode::Cuda => match common::cuda_devices(2) {
            Some(d) => d.into_iter().map(Device::Cuda).collect(),
            None => return Ok(()),
        },
    };
    let _lock = common::gpu_lock();
    let dir = scratch_dir("peers", mode, Tier::ZeroCopy, "");
    let named = bf16_blocks();
    let ckpt = dir.join("model.safetensors");
    Tensor::write_safetensors(&named, &ckpt)?;
    let group = layerwise_offload::PeerGroup::new(2)?;
    let mut members = Vec::new();
    for (rank, dev) in devs.iter().enumerate() {
        let model: Vec<(String, Tensor)> = named
            .iter()
            .map(|(n, t)| (n.clone(), t.zeros_like()))
            .collect();
        let mut cfg = mode
            .config("blocks", 4)
            .peer_group(group.clone(), rank)
            .checkpoint(Checkpoint::open(&ckpt)?)
            .compress(true)
            .compress_segment_bytes(layerwise_offload::SEGMENT_BYTES_MULTIPLE)
            .zero_copy(true);
        if let Device::Cuda(i) = dev {
            cfg = cfg.device(*i);
        }
        let mut m = cfg.build(&model)?;
        m.initialize()?;
        assert_eq!(m.stats().encoded_blocks, 4);
        members.push((model, m));
    }
    let raw_block = members[0].1.plan().expect("initialized").blocks[0].bytes as u64;
    let handles: Vec<_> = members
        .into_iter()
        .zip(devs)
        .map(|((model, mut m), dev)| {
            let want: Vec<(String, Tensor)> =
                named.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
            std::thread::spawn(move || -> anyhow::Result<_> {
                for &b in &[0usize, 1, 2, 3, 0, 2, 1] {
                    let _g = m.enter(b)?;
                    for ((n, t), (_, live)) in want.iter().zip(&model) {
                        if n.starts_with(&format!("blocks.{b}.")) {
                            assert_eq!(live.device(), dev);
                            assert!(bits_equal(&live.to_device(Device::Cpu), t), "{n}");
                        }
                    }
                }
                let st = m.stats().clone();
                m.restore()?;
                for ((n, t), (_, w)) in model.iter().zip(&want) {
                    assert!(bits_equal(&t.to_device(Device::Cpu), w), "{n} restored");
                }
                Ok(st)
            })
        })
        .collect();
    let stats: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("member thread"))
        .collect::<anyhow::Result<_>>()?;
    let segment = layerwise_offload::SEGMENT_BYTES_MULTIPLE as u64;
    common::model::assert_encoded_group_split(&stats, raw_block, segment);
    assert!(group.broken().is_none());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// `update_tensor` on a block held as the cache's pages (`zero_copy`) or on the disk tier is
/// refused as for the raw tiers, saying what to change; the cache stays as written and
/// `restore` gives the checkpoint's weights back.
#[rstest]
fn updates_are_refused_and_the_cache_stays_as_written(
    #[values(Tier::ZeroCopy, Tier::Disk)] tier: Tier,
) -> anyhow::Result<()> {
    let dir = scratch_dir("update", Mode::Cpu, tier, "");
    let source = Model::new(Device::Cpu, 2, true, 341);
    let ckpt = write_checkpoint(&source, &dir)?;
    let cache = cache_path(tier, &ckpt);
    let name = "single_blocks.1.fc1.weight";
    let model = Model::new(Device::Cpu, 2, true, 342);
    let mut cfg = config(Mode::Cpu, tier, &ckpt, false)?;
    if tier == Tier::Disk {
        cfg = cfg.host_budget(1); // every block on the disk tier
    }
    let mut m = cfg.build(&model.vs)?;
    m.initialize()?;
    let written = std::fs::read(&cache)?;
    let value = m.tensor(name)? * 2.0;
    let needle = match tier {
        Tier::Disk => "host_budget",
        _ => "zero_copy",
    };
    match m.update_tensor(name, &value) {
        Err(e @ layerwise_offload::Error::InvalidArgument { .. }) => {
            assert!(e.to_string().contains(needle), "{e}")
        }
        r => panic!("expected InvalidArgument, got {r:?}"),
    }
    assert!(bits_equal(&m.tensor(name)?, &source.vs.variables()[name]));
    assert_eq!(std::fs::read(&cache)?, written, "the cache was written");
    m.restore()?;
    assert_same(&model.snapshot(), &source.snapshot());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
