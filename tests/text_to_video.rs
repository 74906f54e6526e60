//! The text-to-video pipeline of the `wan` crate (diffusers' `WanPipeline`) against the fixture
//! `scripts/export_wan_pipeline_fixture.py` writes (a tiny random pipeline saved by diffusers and
//! every stage of one generation), stage by stage so that a mismatch names its stage; its block
//! loops streamed through offload managers against the resident pipeline, bit for bit (CPU test
//! mode and CUDA); bad pipeline directories and requests; the example end to end.

use offload_testkit as common;
use offload_testkit::t2v;

use common::cli::{assert_refused, result_rows};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind, Tensor};
use wan::{Request, Resident, WanPipeline};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wan_pipeline_tiny")
}

fn reference() -> HashMap<String, Tensor> {
    Tensor::read_safetensors(fixture().join("reference.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn settings() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).unwrap())
        .unwrap()
}

/// The fixture's request: its prompts, size, steps, guidance and seed.
fn request() -> Request {
    let s = settings();
    let mut r = Request::new(s["prompt"].as_str().unwrap());
    r.negative_prompt = s["negative_prompt"].as_str().unwrap().into();
    r.height = s["height"].as_i64().unwrap();
    r.width = s["width"].as_i64().unwrap();
    r.num_frames = s["num_frames"].as_i64().unwrap();
    r.num_inference_steps = s["num_inference_steps"].as_u64().unwrap() as usize;
    r.guidance_scale = s["guidance_scale"].as_f64().unwrap();
    r.seed = s["seed"].as_u64().unwrap();
    r.max_sequence_length = s["max_sequence_length"].as_u64().unwrap() as usize;
    r
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// Serialises the tests that seed libtorch's global generator.
fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    common::gpu_lock()
}

/// Largest difference from diffusers' float32 stages allowed on the CPU. On the machine that
/// wrote the fixture the stages agree to the last float32 bits or within a few ulps (the same
/// libtorch kernels in the same order); another CPU may round differently in the matrix products.
/// A real difference (a missing norm, a wrong sigma, guidance applied the wrong way) moves them
/// by 1e-2 or more. The issue's bound for the frames is 1e-3 on [0, 1].
const TOLERANCE: f64 = 1e-4;

/// Every stage of one generation in diffusers' order of operations (the two guidance passes as
/// batch-1 passes), resident on the CPU in float32, against diffusers' own.
#[test]
fn every_stage_matches_diffusers() -> anyhow::Result<()> {
    let _rng = rng_lock();
    let reference = reference();
    let mut p = WanPipeline::from_pretrained(fixture(), Kind::Float)?;
    let mut r = request();
    r.batch_guidance = false;

    let cond = p.encode_prompts(
        &[&r.prompt],
        r.max_sequence_length,
        Device::Cpu,
        &mut Resident,
    )?;
    let uncond = p.encode_prompts(
        &[&r.negative_prompt],
        r.max_sequence_length,
        Device::Cpu,
        &mut Resident,
    )?;
    let d = max_diff(&cond, &reference["prompt_embeds"]);
    eprintln!("prompt_embeds: max diff {d:e}");
    assert!(d <= TOLERANCE, "text encoder (prompt): {d}");
    let d = max_diff(&uncond, &reference["negative_prompt_embeds"]);
    assert!(d <= TOLERANCE, "text encoder (negative prompt): {d}");

    let latents = p.prepare_latents(&r, Device::Cpu)?;
    assert!(
        latents.equal(&reference["latents_initial"]),
        "initial noise: diffusers' CPU generator seeded {} draws other values",
        r.seed
    );

    let mut worst_step = 0f64;
    let mut steps = 0;
    let final_latents = p.denoise(
        &r,
        &latents,
        &cond,
        Some(&uncond),
        &mut Resident,
        &mut |s, x| {
            let want = &reference[&format!("step{}_latents", s.done - 1)];
            let d = max_diff(x, want);
            let t = reference[&format!("step{}_timestep", s.done - 1)].int64_value(&[0]);
            assert_eq!(s.timestep, t as f64, "timestep of step {}", s.done);
            assert!(
                d <= TOLERANCE,
                "latents after step {}: max diff {d}",
                s.done
            );
            worst_step = worst_step.max(d);
            steps += 1;
        },
    )?;
    assert_eq!(steps, r.num_inference_steps);
    eprintln!("latents after each step: max diff {worst_step:e}");
    let d = max_diff(&final_latents, &reference["latents_final"]);
    assert!(d <= TOLERANCE, "final latents: {d}");

    // The decode alone, from diffusers' own latents, then from ours.
    let frames = p.decode(&reference["latents_final"])?;
    let d = max_diff(&frames.get(0), &reference["video"]);
    eprintln!("video from diffusers' latents: max diff {d:e}");
    assert!(d <= TOLERANCE, "VAE decode: {d}");
    let frames = p.decode(&final_latents)?;
    let d = max_diff(&frames.get(0), &reference["video"]);
    eprintln!("video end to end: max diff {d:e}");
    assert!(d <= 1e-3, "end to end: {d}");
    Ok(())
}

/// The default: both guidance predictions in one batch of 2 (and the two prompts encoded as one
/// batch): the same video within the issue's bound.
#[test]
fn batched_guidance_gives_the_same_video() -> anyhow::Result<()> {
    let _rng = rng_lock();
    let reference = reference();
    let mut p = WanPipeline::from_pretrained(fixture(), Kind::Float)?;
    let r = request();
    assert!(r.batch_guidance);
    let frames = generate(&mut p, &r, &mut Resident)?;
    let d = max_diff(&frames, &reference["video"]);
    eprintln!("batched guidance: video max diff {d:e}");
    assert!(d <= 1e-3, "batched guidance: {d}");
    Ok(())
}

/// A whole generation through `blocks`, on the device of the pipeline's models.
fn generate(
    p: &mut WanPipeline,
    r: &Request,
    blocks: &mut dyn wan::BlockLoop,
) -> anyhow::Result<Tensor> {
    let dev = p
        .transformer_vs
        .variables()
        .get("proj_out.weight")
        .map_or(Device::Cpu, |t| t.device());
    let e = p.encode_prompts(
        &[&r.prompt, &r.negative_prompt],
        r.max_sequence_length,
        dev,
        blocks,
    )?;
    let latents = p.prepare_latents(r, dev)?;
    let x = p.denoise(
        r,
        &latents,
        &e.narrow(0, 0, 1),
        Some(&e.narrow(0, 1, 1)),
        blocks,
        &mut |_, _| {},
    )?;
    Ok(p.decode(&x)?.get(0).to_device(Device::Cpu))
}

/// The pipeline with both block loops streamed by offload managers equals the resident one bit
/// for bit; afterwards every weight is back on the CPU with its value.
fn streamed_equals_resident(device: Device, kind: Kind) -> anyhow::Result<()> {
    let _rng = rng_lock();
    let mut p = WanPipeline::from_pretrained(fixture(), kind)?;
    let before: Vec<(String, Tensor)> = [&p.text_encoder_vs, &p.transformer_vs]
        .iter()
        .flat_map(|vs| vs.variables().into_iter())
        .map(|(n, t)| (n, t.copy()))
        .collect();
    let r = request();
    let cuda = device.is_cuda();

    // Resident: every model on the device.
    for vs in [&p.text_encoder_vs, &p.transformer_vs, &p.vae_vs] {
        t2v::move_all(vs, device)?;
    }
    let resident = generate(&mut p, &r, &mut Resident)?;
    for vs in [&p.text_encoder_vs, &p.transformer_vs] {
        t2v::move_all(vs, Device::Cpu)?;
    }

    // Streamed: the managers put the non-block weights on the device, stream the blocks.
    let n_text = p.text_encoder.blocks().len();
    let n = p.transformer.blocks().len();
    let mut text = t2v::offload(
        &p.text_encoder_vs,
        "encoder.block",
        n_text,
        cuda,
        None,
        false,
        None,
    )?;
    let mut tr = t2v::offload(&p.transformer_vs, "blocks", n, cuda, None, false, None)?;
    let streamed = {
        let mut blocks = t2v::Managed {
            text: Some(&mut text),
            transformer: Some(&mut tr),
        };
        generate(&mut p, &r, &mut blocks)?
    };
    assert!(
        tr.stats().uploads > 0,
        "the transformer's blocks were uploaded"
    );
    t2v::finish(text, &p.text_encoder_vs)?;
    t2v::finish(tr, &p.transformer_vs)?;
    assert!(
        streamed.equal(&resident),
        "streamed and resident frames differ by {}",
        max_diff(&streamed, &resident)
    );
    let vars: HashMap<String, Tensor> = [&p.text_encoder_vs, &p.transformer_vs]
        .iter()
        .flat_map(|vs| vs.variables().into_iter())
        .collect();
    for (name, want) in &before {
        let got = &vars[name];
        assert_eq!(got.device(), Device::Cpu, "{name} is back on the CPU");
        assert!(got.equal(want), "{name} came back changed");
    }
    Ok(())
}

#[test]
fn streamed_equals_resident_in_cpu_test_mode() -> anyhow::Result<()> {
    streamed_equals_resident(Device::Cpu, Kind::Float)
}

#[test]
fn streamed_equals_resident_on_cuda() -> anyhow::Result<()> {
    let Some(d) = common::cuda() else {
        return Ok(());
    };
    streamed_equals_resident(Device::Cuda(d), Kind::BFloat16)
}

/// A copy of the fixture in a temporary directory, changed by `edit`.
fn edited(name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("t2v-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&fixture(), &dir);
    edit(&dir);
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

fn load_error(dir: &Path) -> String {
    let e = WanPipeline::from_pretrained(dir, Kind::Float).expect_err("a bad directory loads");
    let _ = std::fs::remove_dir_all(dir);
    format!("{e:?}") // the message and its causes
}

#[test]
fn bad_pipeline_directories_are_typed_errors() {
    let edit_index = |f: fn(&mut serde_json::Value)| {
        move |d: &Path| {
            let p = d.join("model_index.json");
            let mut v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            f(&mut v);
            std::fs::write(p, v.to_string()).unwrap();
        }
    };
    let e = load_error(&edited("novae", |d| {
        std::fs::remove_dir_all(d.join("vae")).unwrap()
    }));
    assert!(e.contains("vae"), "{e}");
    let e = load_error(&edited("noindex", |d| {
        std::fs::remove_file(d.join("model_index.json")).unwrap()
    }));
    assert!(e.contains("model_index.json"), "{e}");
    let e = load_error(&edited(
        "class",
        edit_index(|v| v["_class_name"] = "WanImageToVideoPipeline".into()),
    ));
    assert!(
        e.contains("WanImageToVideoPipeline") && e.contains("WanPipeline"),
        "{e}"
    );
    let e = load_error(&edited(
        "two",
        edit_index(|v| {
            v["transformer_2"] = serde_json::json!(["diffusers", "WanTransformer3DModel"])
        }),
    ));
    assert!(e.contains("transformer_2"), "{e}");
    let e = load_error(&edited(
        "notext",
        edit_index(|v| {
            v.as_object_mut()
                .unwrap()
                .remove("text_encoder")
                .map(|_| ())
                .unwrap()
        }),
    ));
    assert!(e.contains("text_encoder"), "{e}");
    let e = load_error(&edited("sched", |d| {
        std::fs::write(
            d.join("scheduler/scheduler_config.json"),
            r#"{"_class_name": "DDIMScheduler"}"#,
        )
        .unwrap()
    }));
    assert!(e.contains("DDIMScheduler"), "{e}");
    let e = load_error(&edited("tok", |d| {
        std::fs::remove_file(d.join("tokenizer/tokenizer.json")).unwrap()
    }));
    assert!(e.contains("tokenizer.json"), "{e}");
    // Components that do not fit together: a text encoder narrower than the transformer's
    // text_dim (its weights cut to match its config, so that it loads).
    let e = load_error(&edited("width", |d| {
        let p = d.join("transformer/config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v["text_dim"] = 48.into();
        std::fs::write(p, v.to_string()).unwrap();
        let w = d.join("transformer/diffusion_pytorch_model.safetensors");
        let mut t = Tensor::read_safetensors(&w).unwrap();
        for (n, x) in &mut t {
            if n == "condition_embedder.text_embedder.linear_1.weight" {
                *x = Tensor::zeros([x.size()[0], 48], (Kind::Float, Device::Cpu));
            }
        }
        Tensor::write_safetensors(&t, &w).unwrap();
    }));
    assert!(e.contains("d_model") && e.contains("text_dim"), "{e}");
}

#[test]
fn bad_requests_are_typed_errors() -> anyhow::Result<()> {
    let p = WanPipeline::from_pretrained(fixture(), Kind::Float)?;
    let ok = request();
    p.check_request(&ok)?;
    for (what, edit) in [
        (
            "height",
            Box::new(|r: &mut Request| r.height = 24) as Box<dyn Fn(&mut Request)>,
        ),
        ("width", Box::new(|r: &mut Request| r.width = 0)),
        ("num_frames", Box::new(|r: &mut Request| r.num_frames = 6)),
        (
            "num_frames",
            Box::new(|r: &mut Request| r.num_frames = 1_000_001),
        ),
        (
            "num_inference_steps",
            Box::new(|r: &mut Request| r.num_inference_steps = 0),
        ),
        (
            "guidance_scale",
            Box::new(|r: &mut Request| r.guidance_scale = f64::NAN),
        ),
        (
            "max_sequence_length",
            Box::new(|r: &mut Request| r.max_sequence_length = 0),
        ),
    ] {
        let mut r = ok.clone();
        edit(&mut r);
        let e = p.check_request(&r).expect_err(what).to_string();
        assert!(e.contains(what), "{what}: {e}");
        assert!(matches!(p.check_request(&r), Err(wan::Error::Input { .. })));
    }
    Ok(())
}

/// A prompt longer than the text length is cut as diffusers cuts it, and the pipeline says how
/// many tokens were lost (diffusers drops them without a word).
#[test]
fn long_prompts_are_truncated_and_counted() -> anyhow::Result<()> {
    let p = WanPipeline::from_pretrained(fixture(), Kind::Float)?;
    let long = "a red fox runs through fresh snow at dawn ".repeat(80);
    let cut = p.truncated_tokens(&[&long, "a fox"], 512)?;
    assert!(cut[0] > 0, "{cut:?}");
    assert_eq!(cut[1], 0);
    let e = p.encode_prompts(&[&long], 512, Device::Cpu, &mut Resident)?;
    assert_eq!(e.size(), [1, 512, p.text_encoder.config().d_model]);
    Ok(())
}

/// The example binary, staged beside the test binaries or in cargo's target dir.
fn example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    dir.join("examples/text_to_video")
}

/// The example on the fixture's pipeline writes a GIF, PNG frames and the frames as floats,
/// and those frames are diffusers' video; without a pipeline it runs the tiny random one.
#[test]
fn the_example_writes_the_video() -> anyhow::Result<()> {
    let reference = reference();
    let s = settings();
    let tmp = std::env::temp_dir().join(format!("t2v-example-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let gif = tmp.join("fox.gif");
    let pngs = tmp.join("frames");
    let floats = tmp.join("frames.safetensors");
    let fixture = fixture();
    let args: Vec<String> = [
        "--pipeline",
        fixture.to_str().unwrap(),
        "--prompt",
        s["prompt"].as_str().unwrap(),
        "--negative-prompt",
        s["negative_prompt"].as_str().unwrap(),
        "--height",
        "16",
        "--width",
        "16",
        "--frames",
        "5",
        "--steps",
        "3",
        "--seed",
        &s["seed"].to_string(),
        "--out",
        gif.to_str().unwrap(),
        "--frames-dir",
        pngs.to_str().unwrap(),
        "--save-frames",
        floats.to_str().unwrap(),
        "--check",
        "--dtype",
        "float32",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let out = Command::new(example()).args(&args).output()?;
    let rows = result_rows("text_to_video", &out);
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row["frames"], 5);
    assert_eq!(row["max_abs_diff"], 0.0, "streamed against resident: {row}");
    for key in [
        "text_encoding_s",
        "denoising_s",
        "vae_decode_s",
        "s_per_step",
        "peak_rss_gib",
    ] {
        assert!(row[key].as_f64().is_some(), "{key} in {row}");
    }
    let gif_bytes = std::fs::read(&gif)?;
    assert!(gif_bytes.starts_with(b"GIF89a"), "a GIF file");
    for i in 0..5 {
        let png = std::fs::read(pngs.join(format!("frame_{i:04}.png")))?;
        assert!(png.starts_with(b"\x89PNG"), "frame {i} is a PNG");
    }
    let frames = Tensor::read_safetensors(&floats)?.remove(0).1;
    let d = max_diff(&frames, &reference["video"]);
    eprintln!("the example's frames against diffusers': max diff {d:e}");
    // On CUDA, float32 convolutions run on cuDNN with TF32 (libtorch's default, as PyTorch's),
    // about 1e-3 relative per layer: a looser bound there.
    let bound = if row["device"] == "cpu" { 1e-3 } else { 1e-2 };
    assert!(d <= bound, "{d} (bound {bound} on {})", row["device"]);

    let out = Command::new(example())
        .args(["--out", tmp.join("tiny.gif").to_str().unwrap()])
        .output()?;
    let rows = result_rows("text_to_video (tiny)", &out);
    assert_eq!(rows[0]["preset"], "tiny");
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

#[test]
fn the_example_refuses_bad_flags() {
    for args in [
        &["--height", "17"][..],
        &["--frames", "0"],
        &["--steps", "0"],
        &["--guidance", "NaN"],
        &["--vram-limit", "-1"],
        &["--out", "video.avi"],
        &["--pipeline", "/nonexistent/pipeline"],
    ] {
        let out = Command::new(example()).args(args).output().unwrap();
        let stderr = assert_refused(args, &out);
        let flag = args[0].trim_start_matches("--");
        let named = match flag {
            "out" => "avi",
            "pipeline" => "/nonexistent/pipeline",
            "height" => "height",
            f => f,
        };
        assert!(stderr.contains(named), "{args:?}: {stderr}");
    }
    // MP4 goes through ffmpeg: without one on PATH, an error before any work.
    let args = ["--out", "video.mp4"];
    let out = Command::new(example())
        .args(args)
        .env("PATH", "")
        .output()
        .unwrap();
    let stderr = assert_refused(&args, &out);
    assert!(
        stderr.contains("ffmpeg") && stderr.contains(".gif"),
        "{stderr}"
    );
}
