//! The text side of the Wan2.1 pipeline in `wan/` (umT5's tokenizer and `UMT5EncoderModel`)
//! against transformers and diffusers on the fixture of `scripts/export_wan_pipeline_fixture.py`
//! (a tiny `WanPipeline` saved with `save_pretrained`, and every stage of one generation), and
//! the typed errors of bad pipeline directories and prompts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor, nn};
use wan::umt5::{self, UMT5EncoderModel, Umt5Config};
use wan::{ConfigError, Error, WanTokenizer};

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
    let text = std::fs::read_to_string(fixture().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// A fresh directory under the system's temporary directory.
fn temp_dir(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("wan-text-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// Largest absolute difference allowed between transformers' float32 last_hidden_state and
/// ours on the CPU (values of magnitude ~1-3 after the final norm). Both run the same libtorch
/// operations in the same order (embedding, linear, the RMS norm's float32 variance, sdpa with
/// one additive mask and scale 1, gelu_new's tanh formula), so on the machine that wrote the
/// fixture the two are expected bit-identical; another CPU or libtorch build may pick other
/// matmul/attention kernels and round in the last float32 ulps, far below 1e-5, while a wrong
/// bucket, a missing mask or a scaled attention moves the output by 1e-2 or more.
const ENCODER_TOLERANCE: f64 = 1e-5;

#[test]
fn tokenizer_matches_transformers() -> anyhow::Result<()> {
    let tok = WanTokenizer::from_dir(fixture().join("tokenizer"))?;
    let r = reference();
    let s = settings();
    assert_eq!(tok.pad_id(), 0);
    for (name, key) in [("prompt", "prompt"), ("negative", "negative_prompt")] {
        let prompt = s[key].as_str().unwrap();
        let enc = tok.encode(&[prompt], wan::tokenizer::MAX_SEQUENCE_LENGTH)?;
        assert!(
            enc.input_ids.equal(&r[&format!("{name}_input_ids")]),
            "{name}: ids differ"
        );
        assert!(
            enc.attention_mask
                .equal(&r[&format!("{name}_attention_mask")])
        );
        let n = r[&format!("{name}_attention_mask")]
            .sum(Kind::Int64)
            .int64_value(&[]);
        assert_eq!(enc.lengths, [n as usize]);
        assert_eq!(enc.truncated, [0]);
        assert_eq!(
            wan::prompt_clean(prompt),
            s[format!("{key}_cleaned")].as_str().unwrap()
        );
    }
    // Both prompts in one batch: the rows of the single encodings.
    let both = tok.encode(
        &[
            s["prompt"].as_str().unwrap(),
            s["negative_prompt"].as_str().unwrap(),
        ],
        512,
    )?;
    let ids = Tensor::cat(&[&r["prompt_input_ids"], &r["negative_input_ids"]], 0);
    assert!(both.input_ids.equal(&ids));
    Ok(())
}

#[test]
fn tokenizer_cleans_and_truncates_as_the_pipeline() -> anyhow::Result<()> {
    let tok = WanTokenizer::from_dir(fixture().join("tokenizer"))?;
    let r = reference();
    let s = settings();
    let cases = s["tokenizer_cases"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for (i, case) in cases.iter().enumerate() {
        let raw = case["raw"].as_str().unwrap();
        assert_eq!(
            wan::prompt_clean(raw),
            case["cleaned"].as_str().unwrap(),
            "case {i}"
        );
        let enc = tok.encode(&[raw], 512)?;
        assert!(
            enc.input_ids.equal(&r[&format!("tok_case{i}_input_ids")]),
            "case {i}: ids differ from transformers'"
        );
        assert!(
            enc.attention_mask
                .equal(&r[&format!("tok_case{i}_attention_mask")])
        );
        let full = case["untruncated_len"].as_u64().unwrap() as usize;
        assert_eq!(enc.truncated, [full.saturating_sub(512)], "case {i}");
    }
    // The long prompt: 511 tokens and </s>, no padding, and the dropped count reported.
    let long = tok.encode(&[cases[4]["raw"].as_str().unwrap()], 512)?;
    assert_eq!(long.lengths, [512]);
    assert!(long.truncated[0] > 1000);
    assert_eq!(long.input_ids.int64_value(&[0, 511]), 1);
    // A shorter limit truncates the same way.
    let short = tok.encode(&[s["prompt"].as_str().unwrap()], 8)?;
    assert_eq!(short.input_ids.size(), [1, 8]);
    assert_eq!(short.truncated, [12]);
    assert!(
        short
            .input_ids
            .narrow(1, 0, 7)
            .equal(&r["prompt_input_ids"].narrow(1, 0, 7))
    );
    assert_eq!(short.input_ids.int64_value(&[0, 7]), 1);
    assert!(matches!(tok.encode(&["x"], 0), Err(Error::Input { .. })));
    Ok(())
}

fn load_encoder(kind: Kind) -> anyhow::Result<(nn::VarStore, UMT5EncoderModel)> {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let (config, model) = umt5::from_pretrained(&mut vs, fixture().join("text_encoder"), kind)?;
    assert_eq!(config, Umt5Config::tiny());
    Ok((vs, model))
}

#[test]
fn encoder_matches_transformers() -> anyhow::Result<()> {
    let (_vs, model) = load_encoder(Kind::Float)?;
    let r = reference();
    for name in ["prompt", "negative"] {
        let ids = &r[&format!("{name}_input_ids")];
        let mask = &r[&format!("{name}_attention_mask")];
        let want = &r[&format!("{name}_last_hidden_state")];
        let got = tch::no_grad(|| model.forward(ids, mask))?;
        assert_eq!(got.kind(), Kind::Float);
        let d = max_diff(&got, want);
        eprintln!(
            "{name}: max |ours - transformers| = {d:e} (bit-identical: {})",
            got.equal(want)
        );
        assert!(d <= ENCODER_TOLERANCE, "{name}: max diff {d}");
        // The padded positions are computed too (the pipeline drops them afterwards).
        let n = mask.sum(Kind::Int64).int64_value(&[]);
        assert!(
            d <= ENCODER_TOLERANCE
                && want
                    .narrow(1, n, 512 - n)
                    .abs()
                    .sum(Kind::Float)
                    .double_value(&[])
                    > 0.0
        );
    }
    // The prompt's tokens alone, no padding (transformers gives SDPA the position bias only).
    let n = r["prompt_attention_mask"].sum(Kind::Int64).int64_value(&[]);
    let ids = r["prompt_input_ids"].narrow(1, 0, n);
    let got = tch::no_grad(|| model.forward(&ids, &ids.ones_like()))?;
    let d = max_diff(&got, &r["prompt_unpadded_last_hidden_state"]);
    eprintln!("unpadded prompt: max diff {d:e}");
    assert!(d <= ENCODER_TOLERANCE);
    // Both prompts in one batch of 2.
    let ids = Tensor::cat(&[&r["prompt_input_ids"], &r["negative_input_ids"]], 0);
    let mask = Tensor::cat(
        &[&r["prompt_attention_mask"], &r["negative_attention_mask"]],
        0,
    );
    let want = Tensor::cat(
        &[
            &r["prompt_last_hidden_state"],
            &r["negative_last_hidden_state"],
        ],
        0,
    );
    let got = tch::no_grad(|| model.forward(&ids, &mask))?;
    let d = max_diff(&got, &want);
    eprintln!("batch of 2: max diff {d:e}");
    assert!(d <= ENCODER_TOLERANCE);
    Ok(())
}

#[test]
fn encoder_mask_and_position_bias_matter() -> anyhow::Result<()> {
    // The comparison above could not see a mask or a bias that did nothing if the fixture's
    // output did not depend on them: check that it does.
    let (_vs, model) = load_encoder(Kind::Float)?;
    let r = reference();
    let ids = &r["prompt_input_ids"];
    let want = &r["prompt_last_hidden_state"];
    let unmasked = tch::no_grad(|| model.forward(ids, &ids.ones_like()))?;
    assert!(max_diff(&unmasked, want) > 1e-2);
    // Buckets: 0..15 for keys before the query, 16..31 after; 0 and 16+... on the diagonal.
    let b = model.relative_position_buckets(300, Device::Cpu);
    assert_eq!(b.int64_value(&[5, 5]), 0);
    assert_eq!(b.int64_value(&[5, 6]), 17);
    assert_eq!(b.int64_value(&[6, 5]), 1);
    assert_eq!(b.int64_value(&[0, 299]), 31);
    assert_eq!(b.int64_value(&[299, 0]), 15);
    Ok(())
}

#[test]
fn encoder_half_and_bfloat16_match_transformers() -> anyhow::Result<()> {
    let r = reference();
    for (kind, tag) in [(Kind::BFloat16, "bf16"), (Kind::Half, "fp16")] {
        let (vs, model) = load_encoder(kind)?;
        let wo = vs.variables()["encoder.block.0.layer.1.DenseReluDense.wo.weight"].kind();
        let q = vs.variables()["encoder.block.0.layer.0.SelfAttention.q.weight"].kind();
        assert_eq!(q, kind);
        assert_eq!(
            wo,
            if kind == Kind::Half {
                Kind::Float
            } else {
                kind
            }
        );
        for name in ["prompt", "negative"] {
            let want = &r[&format!("{name}_last_hidden_state_{tag}")];
            let got = tch::no_grad(|| {
                model.forward(
                    &r[&format!("{name}_input_ids")],
                    &r[&format!("{name}_attention_mask")],
                )
            })?;
            assert_eq!(got.kind(), want.kind());
            let d = max_diff(&got, want);
            let scale = want.to_kind(Kind::Float).abs().max().double_value(&[]);
            eprintln!("{tag} {name}: max diff {d:e} (max |value| {scale:.3})");
            // Same operations in the same types: bit-identical here; elsewhere within a few
            // ulps of the type (bf16: 2^-8 relative).
            let ulps = if kind == Kind::Half {
                2f64.powi(-10)
            } else {
                2f64.powi(-7)
            };
            assert!(d <= 4.0 * ulps * scale, "{tag} {name}: max diff {d}");
        }
    }
    Ok(())
}

#[test]
fn prompt_embeds_match_the_pipeline() -> anyhow::Result<()> {
    let (_vs, model) = load_encoder(Kind::Float)?;
    let tok = WanTokenizer::from_dir(fixture().join("tokenizer"))?;
    let r = reference();
    let s = settings();
    let max = s["max_sequence_length"].as_u64().unwrap() as usize;
    for (name, key, want) in [
        ("prompt", "prompt", "prompt_embeds"),
        ("negative", "negative_prompt", "negative_prompt_embeds"),
    ] {
        let want = &r[want];
        // The post-processing alone, on transformers' own encoder output: exact.
        let post = umt5::trim_and_pad(
            &r[&format!("{name}_last_hidden_state")],
            &r[&format!("{name}_attention_mask")],
            max,
            Kind::Float,
        )?;
        assert!(
            post.equal(want),
            "{name}: trimming differs from WanPipeline's"
        );
        // The whole text side from the prompt string.
        let enc = tok.encode(&[s[key].as_str().unwrap()], max)?;
        let hidden = tch::no_grad(|| model.forward(&enc.input_ids, &enc.attention_mask))?;
        let embeds = umt5::trim_and_pad(&hidden, &enc.attention_mask, max, Kind::Float)?;
        let d = max_diff(&embeds, want);
        eprintln!("{name}_embeds: max diff {d:e}");
        assert!(d <= ENCODER_TOLERANCE);
        let n = enc.lengths[0] as i64;
        assert_eq!(
            embeds
                .narrow(1, n, max as i64 - n)
                .abs()
                .max()
                .double_value(&[]),
            0.0
        );
        let bf16 = umt5::trim_and_pad(&hidden, &enc.attention_mask, max, Kind::BFloat16)?;
        assert_eq!(bf16.kind(), Kind::BFloat16);
    }
    // A prompt longer than the target length is refused, not cut.
    let mask = Tensor::ones([1, 10], (Kind::Int64, Device::Cpu));
    let err = umt5::trim_and_pad(
        &Tensor::zeros([1, 10, 4], (Kind::Float, Device::Cpu)),
        &mask,
        8,
        Kind::Float,
    );
    assert!(matches!(err, Err(Error::Input { .. })));
    Ok(())
}

#[test]
fn open_forward_equals_forward() -> anyhow::Result<()> {
    let (_vs, model) = load_encoder(Kind::Float)?;
    let r = reference();
    let (ids, mask) = (&r["prompt_input_ids"], &r["prompt_attention_mask"]);
    let whole = tch::no_grad(|| model.forward(ids, mask))?;
    let e = model.embed(ids, mask)?;
    let mut h = e.hidden.shallow_clone();
    for i in 0..model.blocks().len() {
        h = tch::no_grad(|| model.block(i, &h, &e));
    }
    assert!(model.final_norm(&h).equal(&whole));
    Ok(())
}

#[test]
fn bad_inputs_give_typed_errors() -> anyhow::Result<()> {
    // A tokenizer directory without tokenizer.json.
    let empty = temp_dir("empty");
    match WanTokenizer::from_dir(&empty) {
        Err(Error::Io { path, source }) => {
            assert_eq!(path, empty.join("tokenizer.json"));
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Error::Io, got {other:?}"),
    }
    // A tokenizer.json that is not one.
    std::fs::write(empty.join("tokenizer.json"), "{\"model\": 3}")?;
    let err = WanTokenizer::from_dir(&empty).unwrap_err();
    assert!(matches!(err, Error::Format { .. }), "{err}");
    eprintln!("{err}");

    // A text encoder config with a feed-forward this crate does not implement.
    let te = temp_dir("te");
    let config = std::fs::read_to_string(fixture().join("text_encoder/config.json"))?;
    let mut json: serde_json::Value = serde_json::from_str(&config)?;
    json["feed_forward_proj"] = "relu".into();
    std::fs::write(te.join("config.json"), json.to_string())?;
    std::fs::copy(
        fixture().join("text_encoder/model.safetensors"),
        te.join("model.safetensors"),
    )?;
    let mut vs = nn::VarStore::new(Device::Cpu);
    let err = umt5::from_pretrained(&mut vs, &te, Kind::Float).unwrap_err();
    eprintln!("{err}");
    assert!(matches!(
        &err,
        Error::Config {
            source: ConfigError::Unsupported {
                field: "feed_forward_proj",
                ..
            },
            ..
        }
    ));
    // T5 (not umT5) is refused as well.
    json["feed_forward_proj"] = "gated-gelu".into();
    json["model_type"] = "t5".into();
    std::fs::write(te.join("config.json"), json.to_string())?;
    let err =
        umt5::from_pretrained(&mut nn::VarStore::new(Device::Cpu), &te, Kind::Float).unwrap_err();
    assert!(matches!(
        &err,
        Error::Config {
            source: ConfigError::Unsupported {
                field: "model_type",
                ..
            },
            ..
        }
    ));
    // Not JSON of the right types.
    std::fs::write(te.join("config.json"), "{\"d_model\": \"big\"}")?;
    let err =
        umt5::from_pretrained(&mut nn::VarStore::new(Device::Cpu), &te, Kind::Float).unwrap_err();
    assert!(matches!(err, Error::Format { .. }));
    // A config whose shapes do not match the weights: every difference listed, nothing loaded.
    json["model_type"] = "umt5".into();
    json["d_ff"] = 48.into();
    std::fs::write(te.join("config.json"), json.to_string())?;
    match umt5::from_pretrained(&mut nn::VarStore::new(Device::Cpu), &te, Kind::Float) {
        Err(Error::Mismatch { mismatch, .. }) => assert_eq!(mismatch.shapes.len(), 6),
        other => panic!("expected Error::Mismatch, got {other:?}"),
    }
    // No weights at all.
    std::fs::remove_file(te.join("model.safetensors"))?;
    assert!(matches!(
        umt5::from_pretrained(&mut nn::VarStore::new(Device::Cpu), &te, Kind::Float),
        Err(Error::Io { .. })
    ));

    // Token ids outside the vocabulary (another model's tokenizer) and mismatched masks.
    let (_vs, model) = load_encoder(Kind::Float)?;
    let ids = Tensor::from_slice(&[3i64, 160, 1]).view([1, 3]);
    let mask = ids.ones_like();
    assert!(matches!(
        model.forward(&ids, &mask),
        Err(Error::Input { .. })
    ));
    let ids = Tensor::from_slice(&[3i64, 5, 1]).view([1, 3]);
    assert!(matches!(
        model.forward(&ids, &Tensor::ones([1, 4], (Kind::Int64, Device::Cpu))),
        Err(Error::Input { .. })
    ));
    std::fs::remove_dir_all(&empty).ok();
    std::fs::remove_dir_all(&te).ok();
    Ok(())
}

#[test]
fn tied_embedding_key_loads_as_shared() -> anyhow::Result<()> {
    // A checkpoint that stores the embedding as encoder.embed_tokens.weight (the tied copy)
    // loads it into shared.weight.
    let dir = temp_dir("tied");
    std::fs::copy(
        fixture().join("text_encoder/config.json"),
        dir.join("config.json"),
    )?;
    let renamed: Vec<(String, Tensor)> =
        Tensor::read_safetensors(fixture().join("text_encoder/model.safetensors"))?
            .into_iter()
            .map(|(k, t)| {
                (
                    if k == "shared.weight" {
                        "encoder.embed_tokens.weight".into()
                    } else {
                        k
                    },
                    t,
                )
            })
            .collect();
    Tensor::write_safetensors(&renamed, dir.join("model.safetensors"))?;
    let mut vs = nn::VarStore::new(Device::Cpu);
    umt5::from_pretrained(&mut vs, &dir, Kind::Float)?;
    let (ref_vs, _m) = load_encoder(Kind::Float)?;
    assert!(vs.variables()["shared.weight"].equal(&ref_vs.variables()["shared.weight"]));
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
