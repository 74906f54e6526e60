//! Wan's VAE decoder (`wan::WanVae`, diffusers' `AutoencoderKLWan` decode path in tch): its
//! de-normalization, decoded video and post-processed frames against diffusers' own on the
//! fixture of `scripts/export_wan_vae_fixture.py`, in float32 and bfloat16; the frame-by-frame
//! feature cache (bounded, and causal); and the refusals of bad configs, checkpoints and
//! latents.

use offload_testkit as common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor, nn};
use wan::{Error, VaeConfig, WanVae};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wan_vae_tiny")
}

fn io() -> HashMap<String, Tensor> {
    Tensor::read_safetensors(fixture().join("latents_and_video.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// Largest absolute difference from diffusers' float32 video (values in [-1, 1]) allowed on
/// the CPU. Where the fixture was written the two are equal bit for bit: the same libtorch
/// kernels (conv3d, conv2d, linalg vector norm, nearest-exact upsampling, scaled dot-product
/// attention) run in the same order on tensors of the same shapes and strides. Another CPU or
/// libtorch build may block the convolutions differently and round in the last float32 ulps
/// (about 1e-7 here); a real difference (a cache frame off by one, a missing gamma, the
/// time_conv halves interleaved the other way) moves the video by 1e-2 or more.
const TOLERANCE: f64 = 1e-5;

fn load(kind: Kind) -> (nn::VarStore, WanVae) {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let vae = WanVae::from_pretrained(&mut vs, fixture(), kind).unwrap();
    (vs, vae)
}

#[test]
fn float32_decode_matches_diffusers() -> anyhow::Result<()> {
    let (_vs, vae) = load(Kind::Float);
    assert_eq!(vae.config(), &VaeConfig::tiny());
    let io = io();
    // WanPipeline's de-normalization: the same float32 operations, so the same bits.
    let z = vae.denormalize(&io["latents"])?;
    assert!(z.equal(&io["denormalized"]), "denormalize differs");
    let video = vae.decode(&z)?;
    let want = &io["video"];
    assert_eq!(video.size(), [2, 3, 9, 32, 40]);
    assert_eq!(video.size(), want.size());
    let diff = max_diff(&video, want);
    eprintln!(
        "float32 decode: max |rust - diffusers| = {diff:e}; bit-exact: {}",
        video.equal(want)
    );
    if std::env::var("WAN_PARITY_EXACT").as_deref() == Ok("1") {
        assert!(video.equal(want), "not bit-exact: max diff {diff:e}");
    }
    assert!(diff <= TOLERANCE, "video differs by {diff:e}");
    // Values the clamp cut are in the fixture (its conv_out is scaled for it), and many are not.
    let clamped = want.abs().ge(1.0).to_kind(Kind::Float).mean(Kind::Float);
    let clamped = clamped.double_value(&[]);
    assert!(
        clamped > 0.005 && clamped < 0.2,
        "clamped fraction {clamped}"
    );
    assert_eq!(video.abs().max().double_value(&[]), 1.0);

    // postprocess_video(output_type="np").
    let frames = wan::to_frames(&video);
    assert_eq!(frames.size(), [2, 9, 32, 40, 3]);
    assert_eq!(frames.kind(), Kind::Float);
    let fdiff = max_diff(&frames, &io["frames"]);
    eprintln!("frames: max diff {fdiff:e}");
    assert!(fdiff <= TOLERANCE / 2.0);
    assert!(
        wan::to_frames(want).equal(&io["frames"]),
        "to_frames differs"
    );
    // numpy_to_pil's 8-bit pixels.
    let u8s = wan::frames_to_u8(&io["frames"]);
    assert_eq!(u8s.kind(), Kind::Uint8);
    assert!(u8s.equal(&io["frames_u8"]), "frames_to_u8 differs");

    // Not a vacuous comparison: other latents move the video far beyond the tolerance.
    let other = vae.decode(&(&z * 1.01))?;
    assert!(max_diff(&other, want) > 1000.0 * TOLERANCE);
    Ok(())
}

#[test]
fn bfloat16_decode_matches_diffusers() -> anyhow::Result<()> {
    let (vs, vae) = load(Kind::BFloat16);
    assert!(vs.variables().values().all(|t| t.kind() == Kind::BFloat16));
    let io = io();
    // The latents are converted to bfloat16 first, 1/std is taken in bfloat16: same bits.
    let z = vae.denormalize(&io["latents"])?;
    assert_eq!(z.kind(), Kind::BFloat16);
    assert!(
        z.equal(&io["denormalized_bf16"]),
        "bf16 denormalize differs"
    );
    let video = vae.decode(&z)?;
    let want = &io["video_bf16"];
    assert_eq!(video.kind(), Kind::BFloat16);
    let diff = max_diff(&video, want);
    eprintln!(
        "bfloat16 decode: max |rust - diffusers| = {diff:e}; bit-exact: {}",
        video.equal(want)
    );
    // One bfloat16 ulp at 1 is 2^-8. Bit-exact on the machine that wrote the fixture; another
    // CPU's bfloat16 convolution kernels round differently and the differences grow through
    // the decoder's layers (1.95e-2, five ulps, on the x86 host of an H100 machine): allow 8.
    assert!(diff <= 8.0 / 256.0, "bf16 video differs by {diff:e}");
    // bf16 is not float32 in disguise: it differs from the float32 video.
    assert!(max_diff(&video, &io["video"]) > 1e-3);
    Ok(())
}

/// Counts of the tiny config: conv_in, 2 convs per residual block (2 in the mid block, 2 in
/// each of 4 up blocks), 2 time convolutions, conv_out.
const TINY_SLOTS: usize = 1 + 2 * (2 + 4 * 2) + 2 + 1;

#[test]
fn the_cache_holds_cache_t_frames_per_conv_whatever_the_length() -> anyhow::Result<()> {
    let _rng = common::gpu_lock();
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let vae = WanVae::new(vs.root(), &VaeConfig::tiny())?;
    let mut runs = Vec::new();
    for t in [3, 6] {
        let z = Tensor::randn([1, 4, t, 4, 5], (Kind::Float, Device::Cpu));
        let mut sizes = Vec::new();
        let mut chunks = Vec::new();
        let stats = vae.decode_chunks(&z, |c: wan::VideoChunk| -> wan::Result<()> {
            assert_eq!(c.index, sizes.len());
            assert_eq!(c.first_frame, sizes.iter().sum::<i64>());
            sizes.push(c.video.size()[2]);
            chunks.push(c.video);
            Ok(())
        })?;
        // One frame first, then 4 per latent frame.
        let mut want = vec![1];
        want.extend(std::iter::repeat_n(4, t as usize - 1));
        assert_eq!(sizes, want);
        assert_eq!(stats.chunks, t as usize);
        assert_eq!(stats.frames, 1 + 4 * (t - 1));
        assert_eq!(stats.cache_slots, TINY_SLOTS);
        assert!(stats.cache_frames_max <= wan::CACHE_T);
        assert_eq!(stats.cache_frames_max, wan::CACHE_T);
        // Streaming gives the decode's frames, bit for bit.
        let whole = vae.decode(&z)?;
        assert!(Tensor::cat(&chunks, 2).equal(&whole));
        runs.push((z, whole, stats));
    }
    // Twice the frames, the same cache.
    assert_eq!(runs[0].2.cache_bytes_max, runs[1].2.cache_bytes_max);
    assert!(runs[0].2.cache_bytes_max > 0);
    // Causal: the first three latent frames of the six-frame latents decode to the first 9
    // frames of its video, exactly (the cache carries what the later chunks need, nothing
    // flows backwards).
    let (z6, v6) = (&runs[1].0, &runs[1].1);
    let head = vae.decode(&z6.narrow(2, 0, 3))?;
    assert!(head.equal(&v6.narrow(2, 0, 9)));
    Ok(())
}

/// On CUDA: the peak memory of a streamed decode does not grow with the number of frames
/// beyond the latents themselves; a full decode grows by the video's own bytes.
#[test]
fn cuda_decode_memory_does_not_grow_with_frames() -> anyhow::Result<()> {
    let _lock = common::gpu_lock();
    let Some(gpu) = common::cuda() else {
        return Ok(());
    };
    use layerwise_offload::accel::{memory_stats, reset_peak_memory_stats};
    tch::manual_seed(4);
    let dev = Device::Cuda(gpu);
    let config = VaeConfig {
        base_dim: 32,
        ..VaeConfig::wan2_1()
    };
    let vs = nn::VarStore::new(dev);
    let vae = WanVae::new(vs.root(), &config)?;
    let mut peaks = Vec::new();
    for t in [3i64, 12] {
        let z = Tensor::randn([1, 16, t, 30, 52], (Kind::Float, dev));
        tch::Cuda::synchronize(gpu as i64);
        let base = memory_stats(gpu)?.allocated;
        reset_peak_memory_stats(gpu)?;
        let stats = vae.decode_chunks(&z, |_c: wan::VideoChunk| -> wan::Result<()> { Ok(()) })?;
        tch::Cuda::synchronize(gpu as i64);
        let peak = memory_stats(gpu)?.peak_allocated - base;
        eprintln!(
            "streamed decode of {t} latent frames (480x832-like, base_dim 32): peak {:.1} MiB above the inputs, cache {:.1} MiB",
            peak as f64 / (1 << 20) as f64,
            stats.cache_bytes_max as f64 / (1 << 20) as f64
        );
        peaks.push(peak);
    }
    // 9 more latent frames through post_quant_conv: 9 * 16 * 30 * 52 * 4 bytes (0.9 MiB).
    let latent_growth = 9 * 16 * 30 * 52 * 4;
    // Slack: the caching allocator rounds large allocations up to 2 MiB blocks (measured on an
    // H100: 2.0 MiB of growth for 0.9 MiB of latents). Holding the 36 more frames of video would
    // add 41 MiB.
    assert!(
        peaks[1] <= peaks[0] + latent_growth + (4 << 20),
        "peak grew from {} to {} bytes",
        peaks[0],
        peaks[1]
    );
    Ok(())
}

#[test]
fn bad_configs_are_refused_with_the_key() {
    let dir = copy_fixture("config");
    let cases: [(&str, &str); 5] = [
        ("is_residual", r#""is_residual": true"#),
        ("patch_size", r#""patch_size": 2"#),
        ("z_dim", r#""z_dim": -4"#),
        ("latents_std", r#""latents_std": [1.0, 2.0]"#),
        ("dim_mult", r#""dim_mult": [1, 2, 4, 100000]"#),
    ];
    let original = std::fs::read_to_string(fixture().join("config.json")).unwrap();
    for (key, line) in cases {
        let mut json: serde_json::Value = serde_json::from_str(&original).unwrap();
        let edit: serde_json::Value = serde_json::from_str(&format!("{{{line}}}")).unwrap();
        json[key] = edit[key].clone();
        std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
        let mut vs = nn::VarStore::new(Device::Cpu);
        let err = WanVae::from_pretrained(&mut vs, &dir, Kind::Float).unwrap_err();
        let Error::VaeConfig {
            path: Some(path),
            source,
        } = &err
        else {
            panic!("{key}: expected a VaeConfig error, got {err}");
        };
        assert_eq!(path, &dir.join("config.json"));
        assert_eq!(source.field(), Some(key), "{err}");
        // The key is in the source (the VaeConfigError), printed once below the message.
        assert!(
            std::error::Error::source(&err)
                .unwrap()
                .to_string()
                .contains(key),
            "{err:?}"
        );
        assert!(vs.variables().is_empty(), "{key}: nothing built");
    }
    // Built in code, the same check.
    let vs = nn::VarStore::new(Device::Cpu);
    let err = WanVae::new(
        vs.root(),
        &VaeConfig {
            num_res_blocks: -1,
            ..VaeConfig::tiny()
        },
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::VaeConfig { path: None, source } if source.field() == Some("num_res_blocks")),
        "{err}"
    );
    std::fs::remove_dir_all(dir).ok();
}

fn copy_fixture(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lo-wan-vae-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(fixture().join(name), dir.join(name)).unwrap();
    }
    dir
}

#[test]
fn the_encoder_is_not_needed_and_a_missing_decoder_tensor_is_named() -> anyhow::Result<()> {
    let dir = copy_fixture("ckpt");
    let file = dir.join("diffusion_pytorch_model.safetensors");
    let all = Tensor::read_safetensors(&file)?;
    assert!(all.iter().any(|(n, _)| n.starts_with("encoder.")));
    // Without the encoder's tensors: loads, and decodes as the full checkpoint does.
    let decoder_only: Vec<_> = all
        .iter()
        .filter(|(n, _)| !wan::ENCODER_PREFIXES.iter().any(|p| n.starts_with(p)))
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    Tensor::write_safetensors(&decoder_only, &file)?;
    let mut vs = nn::VarStore::new(Device::Cpu);
    let vae = WanVae::from_pretrained(&mut vs, &dir, Kind::Float)?;
    let (_vs, full) = load(Kind::Float);
    let z = full.denormalize(&io()["latents"].narrow(2, 0, 2))?;
    assert!(vae.decode(&z)?.equal(&full.decode(&z)?));
    // A decoder tensor missing, another of the wrong shape: both named, nothing loaded.
    let edited: Vec<_> = decoder_only
        .iter()
        .filter(|(n, _)| n != "decoder.mid_block.attentions.0.proj.weight")
        .map(|(n, t)| {
            let t = if n == "decoder.conv_in.weight" {
                t.narrow(0, 0, 8)
            } else {
                t.shallow_clone()
            };
            (n.clone(), t)
        })
        .collect();
    Tensor::write_safetensors(&edited, &file)?;
    let mut vs = nn::VarStore::new(Device::Cpu);
    let err = WanVae::from_pretrained(&mut vs, &dir, Kind::Float).unwrap_err();
    let Error::VaeMismatch { mismatch, .. } = &err else {
        panic!("expected a VaeMismatch, got {err}");
    };
    assert_eq!(
        mismatch.missing,
        ["decoder.mid_block.attentions.0.proj.weight"]
    );
    assert_eq!(mismatch.shapes.len(), 1);
    assert_eq!(mismatch.shapes[0].name, "decoder.conv_in.weight");
    assert!(mismatch.unexpected.is_empty());
    assert!(err.to_string().contains("AutoencoderKLWan"), "{err}");
    std::fs::remove_dir_all(dir).ok();
    Ok(())
}

#[test]
fn latents_of_the_wrong_shape_or_type_are_refused() {
    let (_vs, vae) = load(Kind::Float);
    let input = |z: &Tensor| match vae.decode(z) {
        Err(Error::Input { reason }) => reason,
        other => panic!("expected an input error, got {other:?}"),
    };
    let f = (Kind::Float, Device::Cpu);
    let r = input(&Tensor::zeros([1, 4, 4, 5], f));
    assert!(r.contains("5 dimensions"), "{r}");
    let r = input(&Tensor::zeros([1, 16, 3, 4, 5], f));
    assert!(r.contains("16 channels") && r.contains("z_dim is 4"), "{r}");
    let r = input(&Tensor::zeros([1, 4, 0, 4, 5], f));
    assert!(r.contains("at least 1"), "{r}");
    let r = input(&Tensor::zeros(
        [1, 4, 3, 4, 5],
        (Kind::BFloat16, Device::Cpu),
    ));
    assert!(r.contains("BFloat16") && r.contains("denormalize"), "{r}");
    // Sizes that overflow are an error, not a panic or an allocation.
    let err = vae.video_shape(&[1, 4, i64::MAX / 2, 4, 5]).unwrap_err();
    assert!(matches!(err, Error::Input { .. }), "{err}");
    let err = vae
        .denormalize(&Tensor::zeros([1, 3, 2, 4, 5], f))
        .unwrap_err();
    assert!(matches!(err, Error::Input { .. }), "{err}");
    assert_eq!(
        vae.video_shape(&[2, 4, 21, 60, 104]).unwrap(),
        [2, 3, 81, 480, 832]
    );
}

#[test]
fn a_random_vae_converts_to_bfloat16_with_its_var_store() -> anyhow::Result<()> {
    let _rng = common::gpu_lock();
    tch::manual_seed(5);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let vae = WanVae::new(vs.root(), &VaeConfig::tiny())?;
    assert_eq!(vae.kind(), Kind::Float);
    let z = Tensor::randn([1, 4, 2, 4, 5], (Kind::Float, Device::Cpu));
    let v32 = vae.decode(&vae.denormalize(&z)?)?;
    vs.set_kind(Kind::BFloat16);
    assert_eq!(vae.kind(), Kind::BFloat16);
    let v16 = vae.decode(&vae.denormalize(&z)?)?;
    assert_eq!(v16.kind(), Kind::BFloat16);
    // The same weights, rounded: close to the float32 video, not equal to it.
    let diff = max_diff(&v16, &v32);
    assert!(diff > 0.0 && diff < 0.25, "bf16 vs f32: {diff}");
    Ok(())
}
