//! The main example end to end (tiny preset): offloaded sampling equals the resident model bit
//! for bit, weights saved while offloaded load back to the same result, and a weights file that
//! does not match the model is refused with the missing, unexpected and mis-shaped names.

use offload_testkit as common;

use std::path::PathBuf;
use std::process::{Command, Output};
use tch::{Kind, Tensor};

/// The example binary: next to the test binaries' directory, in cargo's target dir
/// (`deps/` and `examples/`) and in a staged copy (`tests/` and `examples/`). `cargo test`
/// builds the examples with the tests (not with `--test` alone).
fn example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    dir.join("examples/dit_layer_loop")
}

fn run(args: &[&str]) -> Output {
    Command::new(example())
        .args(["--preset", "tiny", "--steps", "2"])
        .args(args)
        .output()
        .expect("the example starts")
}

fn result(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the example failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .expect("a RESULT line");
    serde_json::from_str(line).unwrap()
}

#[test]
fn dit_example_samples_exactly_and_round_trips_weights() {
    let dir = std::env::temp_dir().join(format!("lo-dit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let saved = dir.join("tiny.safetensors");
    let r = result(&run(&[
        "--check",
        "--save-weights",
        saved.to_str().unwrap(),
    ]));
    assert_eq!(
        r["max_abs_diff"].as_f64(),
        Some(0.0),
        "offloaded differs from resident: {r}"
    );
    for key in [
        "device",
        "preset",
        "tokens",
        "steps",
        "ms_per_step",
        "resident_ms_per_step",
        "peak_vram_bytes",
        "h2d_gib_s",
        "stall_ms",
    ] {
        assert!(r.get(key).is_some(), "missing {key}: {r}");
    }
    // The saved weights (written while offloaded) reproduce the same sample in a model
    // initialized from another seed; without them that model samples something else.
    let other = result(&run(&["--init-seed", "5"]));
    assert_ne!(other["output_sum"], r["output_sum"]);
    let again = result(&run(&[
        "--init-seed",
        "5",
        "--weights",
        saved.to_str().unwrap(),
    ]));
    assert_eq!(again["output_sum"], r["output_sum"]);

    // A file that does not match: one name renamed, one tensor reshaped.
    let mut tensors = Tensor::read_safetensors(&saved).unwrap();
    for (n, t) in tensors.iter_mut() {
        if n == "blocks.0.ffn.net.0.proj.bias" {
            *n = "blocks.0.ffn.net.1.proj.bias".into();
        } else if n == "proj_out.weight" {
            *t = t.flatten(0, -1);
        }
    }
    let bad = dir.join("bad.safetensors");
    Tensor::write_safetensors(&tensors, &bad).unwrap();
    let out = run(&["--weights", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not in the checkpoint (\"blocks.0.ffn.net.0.proj.bias\")"),
        "{err}"
    );
    assert!(
        err.contains("not in the model (\"blocks.0.ffn.net.1.proj.bias\""),
        "{err}"
    );
    assert!(
        err.contains("\"proj_out.weight\": model [64, 256], checkpoint [16384]"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs the example with `args` (after `--preset tiny --steps 2`); it must exit non-zero with
/// an error naming `what` on the first line of stderr, and no panic.
fn assert_refused(args: &[&str], what: &str) {
    let stderr = common::cli::assert_refused(args, &run(args));
    assert!(
        stderr.contains(what),
        "{args:?}: the error must name {what}:\n{stderr}"
    );
}

#[test]
fn bad_values_are_errors_naming_the_flag() {
    for (flag, value) in [
        ("--frames", "0"),
        ("--frames", "-3"),
        ("--frames", "100000000"),
        ("--height", "0"),
        ("--height", "-16"),
        ("--height", "15"),
        ("--width", "0"),
        ("--width", "-16"),
        ("--steps", "0"),
        ("--steps", "18446744073709551615"),
        ("--steps", "1000000000000"),
        ("--steps", "-1"),
        ("--budget", "-1"),
        ("--budget", "NaN"),
        ("--budget", "inf"),
        ("--depth", "0"),
        ("--vram-limit", "0"),
        ("--vram-limit", "NaN"),
        ("--preset", "huge"),
    ] {
        assert_refused(&[flag, value], flag);
    }
    // Each in range, together too many tokens for one forward.
    assert_refused(
        &["--frames", "1024", "--height", "4096", "--width", "4096"],
        "--frames",
    );
}

#[test]
fn weights_of_other_dtypes_are_refused_naming_the_tensor() {
    let dir = std::env::temp_dir().join(format!("lo-dit-dtypes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let saved = dir.join("tiny.safetensors");
    result(&run(&["--save-weights", saved.to_str().unwrap()]));
    let tensors = Tensor::read_safetensors(&saved).unwrap();
    // Right names and shapes, wrong element types: each alone is refused, named with the
    // file's dtype (float types would be converted: the example loads with convert_dtypes).
    for (name, kind, stored) in [
        ("blocks.0.ffn.net.0.proj.weight", tch::Kind::Int64, "I64"),
        ("blocks.1.attn1.to_q.bias", tch::Kind::Bool, "BOOL"),
        ("proj_out.weight", tch::Kind::Int, "I32"),
        ("blocks.2.scale_shift_table", tch::Kind::Uint8, "U8"),
    ] {
        let changed: Vec<(String, Tensor)> = tensors
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    if n == name {
                        t.to_kind(kind)
                    } else {
                        t.shallow_clone()
                    },
                )
            })
            .collect();
        let bad = dir.join("bad.safetensors");
        Tensor::write_safetensors(&changed, &bad).unwrap();
        let out = run(&["--weights", bad.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{name} as {kind:?} was accepted:\n{err}"
        );
        // The model is bf16 on a GPU, float32 on the CPU.
        let named = [Kind::Float, Kind::BFloat16]
            .iter()
            .any(|k| err.contains(&format!("{name:?}: model {k:?}, checkpoint {stored}")));
        assert!(named, "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_diffusers_checkpoint_with_text_embeddings_samples_exactly() {
    let dir = std::env::temp_dir().join(format!("lo-dit-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ckpt = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wan_tiny");
    let text = dir.join("text.safetensors");
    let emb = Tensor::randn([5, 32], (tch::Kind::Float, tch::Device::Cpu));
    Tensor::write_safetensors(&[("prompt_embeds", &emb)], &text).unwrap();
    let args = [
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--text-embeddings",
        text.to_str().unwrap(),
    ];
    let r = result(&run(&[&args[..], &["--check"]].concat()));
    assert_eq!(r["max_abs_diff"].as_f64(), Some(0.0), "{r}");
    // The text embeddings reach the model: seeded random ones give another sample.
    let random = result(&run(&args[..2]));
    assert_ne!(random["output_sum"], r["output_sum"]);
    // Embeddings of another width than the checkpoint's text_dim (32) are refused.
    let wide = Tensor::randn([5, 48], (tch::Kind::Float, tch::Device::Cpu));
    Tensor::write_safetensors(&[("prompt_embeds", &wide)], &text).unwrap();
    assert_refused(&args, "text embeddings must be [tokens, 32]");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A checkpoint directory holding only `config.json` with `body` (no weights: the config is
/// read and checked first).
fn crafted_checkpoint(tag: &str, body: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lo-dit-config-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), body).unwrap();
    dir
}

#[test]
fn a_checkpoint_config_with_huge_sizes_is_refused_naming_the_key() {
    for (key, body) in [
        ("ffn_dim", r#"{"ffn_dim": 1125899906842624}"#),
        (
            "num_attention_heads",
            r#"{"num_attention_heads": 1000000000000}"#,
        ),
        ("patch_size", r#"{"patch_size": [1, 1099511627776, 2]}"#),
        ("rope_max_seq_len", r#"{"rope_max_seq_len": 1099511627776}"#),
        (
            "parameters",
            r#"{"num_attention_heads": 512, "ffn_dim": 500000, "num_layers": 1000}"#,
        ),
    ] {
        let dir = crafted_checkpoint(key, body);
        assert_refused(&["--checkpoint", dir.to_str().unwrap()], key);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The checkpoint_load example, next to dit_layer_loop.
fn checkpoint_load() -> PathBuf {
    example().with_file_name("checkpoint_load")
}

#[test]
fn checkpoint_load_refuses_bad_values_naming_the_flag() {
    let dir = std::env::temp_dir().join(format!("lo-ckload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(checkpoint_load())
        .args(["write", "--dir", dir.to_str().unwrap(), "--shards", "2"])
        .output()
        .expect("checkpoint_load starts");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for value in [
        "NaN", "-1", "1e-300", "0.0001", "inf", "1e30", "-inf", "-0.5", "x",
    ] {
        let args = [
            "load",
            "--dir",
            dir.to_str().unwrap(),
            "--mode",
            "disk",
            "--cpu",
            "--host-budget-gib",
            value,
        ];
        let out = Command::new(checkpoint_load())
            .args(args)
            .output()
            .expect("checkpoint_load starts");
        let stderr = common::cli::assert_refused(&args, &out);
        assert!(
            stderr
                .lines()
                .next()
                .unwrap_or("")
                .contains("--host-budget-gib"),
            "{value}: the error must name --host-budget-gib:\n{stderr}"
        );
    }
    // A budget in range loads, and 0 (every block from disk) is a budget too.
    let args = [
        "load",
        "--dir",
        dir.to_str().unwrap(),
        "--mode",
        "disk",
        "--cpu",
        "--host-budget-gib",
    ];
    for value in ["0.01", "0"] {
        let out = Command::new(checkpoint_load())
            .args(args)
            .arg(value)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{value}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
