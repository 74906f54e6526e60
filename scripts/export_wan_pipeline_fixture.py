"""Writes tests/fixtures/wan_pipeline_tiny/: a tiny random diffusers `WanPipeline` (text-to-video)
saved with `save_pretrained` (model_index.json, tokenizer/, text_encoder/, transformer/, vae/,
scheduler/ as diffusers writes them, float32), plus every stage of one generation on the CPU so
that a Rust mismatch names its stage. Rerun only to regenerate the fixture (needs torch,
diffusers, transformers and tokenizers):

    .venv/bin/python scripts/export_wan_pipeline_fixture.py [--out tests/fixtures/wan_pipeline_tiny]

Files besides the pipeline directories:
- `reference.safetensors`: the stages, keys listed in `reference.json` ("tensors").
- `reference.json`: the scalar settings (prompt, negative prompt, height, width, frames, steps,
  guidance, seed, max_sequence_length), the prompts after cleaning, the tokenizer-only cases and
  the versions of torch, diffusers, transformers and tokenizers.

Prompt cleaning. `WanPipeline._get_t5_prompt_embeds` runs `prompt_clean` on every prompt:
`basic_clean` (`ftfy.fix_text` only where ftfy is installed, then `html.unescape` twice, then
`strip()`), then `whitespace_clean` (`regex.sub(r"\\s+", " ", text).strip()`). This script records
whether ftfy was importable (`"ftfy": false` means the fixture was written without it, so the
cleaning the Rust side must match is unescape + whitespace collapsing).

Tokenizer. umT5's tokenizer is a SentencePiece Unigram model; here one is trained offline with the
`tokenizers` package on the sentences below and wrapped as transformers' `T5Tokenizer` (the class
`WanPipeline` gets from `AutoTokenizer` for umT5), which gives it umT5's shape: `<pad>`=0, `</s>`=1,
`<unk>`=2, a WhitespaceSplit + Metaspace pre-tokenizer, a post-processor appending `</s>`. It has
no normalizer: umT5's is a precompiled SentencePiece charsmap, which cannot be built offline
without a SentencePiece model, and transformers 5's T5Tokenizer rebuilds the backend from the
vocabulary on load, keeping a `Precompiled` normalizer only (it would drop a stand-in such as
NFKC, and the saved tokenizer.json would then not be what the pipeline runs). The same rebuild
sets the pre-tokenizer to WhitespaceSplit + Metaspace(prepend "always"), as saved here.
"""

import argparse
import json
import os


import diffusers
import tokenizers
import torch
import transformers
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from safetensors.torch import save_file
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import Unigram
from tokenizers.trainers import UnigramTrainer
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

try:
    import ftfy  # noqa: F401

    HAVE_FTFY = True
except ImportError:
    HAVE_FTFY = False

PROMPT = "a red fox runs through fresh snow at dawn"
NEGATIVE = "blurry, low quality, still image"
HEIGHT, WIDTH, FRAMES, STEPS, GUIDANCE, SEED, MAX_SEQ = 16, 16, 5, 3, 5.0, 42, 512

# Tokenizer-only cases: cleaning (whitespace, HTML entities), a word never seen in training,
# and a prompt longer than 512 tokens (WanPipeline truncates it silently to 511 tokens + </s>).
TOKENIZER_CASES = [
    "  a red  fox\truns\n through &amp; over the snow &#39;quietly&#39;  ",
    "the fox &lt;jumps&gt; &quot;high&quot; &amp;amp; lands",
    "zebra xylophone quokka",
    "caf\u00e9\u3000fox\u00a0runs\u2003 &nbsp;at dawn\u0085",
    " ".join(["fox snow dawn"] * 300),
]

SENTENCES = [
    "a red fox runs through fresh snow at dawn",
    "blurry, low quality, still image",
    "a cat and a dog baking a cake together in a kitchen",
    "the cat is carefully measuring flour while the dog stirs the batter",
    "a small boat drifts on a calm lake under a grey sky",
    "children play football in a dusty street at sunset",
    "an old man reads a newspaper on a wooden bench",
    "waves crash against the rocks and the wind blows the spray",
    "a drone flies over a green forest in the early morning",
    "the city lights shimmer on the wet road at night",
    "a horse gallops across an open field of tall grass",
    "snow falls slowly on the quiet village streets",
    "a chef slices fresh vegetables on a cutting board",
    "bright tones, overexposed, static, blurred details, subtitles",
    "worst quality, low quality, jpeg artifacts, ugly, incomplete",
    "extra fingers, poorly drawn hands, poorly drawn faces, deformed",
    "a train crosses a long bridge over a deep valley",
    "two birds sit on a wire and sing in the rain",
    "a woman walks her dog along the beach at dawn",
    "the camera slowly pans across a mountain range covered in snow",
    "a red balloon floats up into the clear blue sky",
    "fireworks explode over the river during a festival",
    "a young fox jumps over a fallen log in the forest",
    "steam rises from a cup of coffee on the table",
    "a robot walks through a busy market full of people",
    "autumn leaves swirl in the wind on a quiet street",
    "a cyclist rides down a winding mountain road",
    "the moon rises over the dark hills and the stars appear",
    "rain drops run down the window of a warm room",
    "a painter mixes colours on a palette beside an easel",
    "the fox runs, jumps and lands softly in the snow",
    "a quiet lake at dawn with mist over the water",
    "cars drive through the snow on a highway at night",
    "a girl laughs and throws snow into the air",
    "over the hills and through the woods, the fox runs on",
    "high quality, sharp, detailed, cinematic lighting",
]

# Wan2.1's scheduler_config.json as the Wan-AI/Wan2.1-T2V-*-Diffusers repositories ship it
# (flow_shift 3.0 is the 480p value).
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    solver_order=2,
    prediction_type="flow_prediction",
    thresholding=False,
    sample_max_value=1.0,
    predict_x0=True,
    solver_type="bh2",
    lower_order_final=True,
    disable_corrector=[],
    solver_p=None,
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
    use_flow_sigmas=True,
    flow_shift=3.0,
    timestep_spacing="linspace",
    steps_offset=0,
    final_sigmas_type="zero",
    rescale_betas_zero_snr=False,
)

TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=256,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=32,
)


def train_tokenizer():
    tok = Tokenizer(Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")]
    )
    trainer = UnigramTrainer(
        vocab_size=160, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", shrinking_factor=0.75
    )
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    vocab = [(p, s) for p, s in json.loads(tok.to_str())["model"]["vocab"]]
    assert [p for p, _ in vocab[:3]] == ["<pad>", "</s>", "<unk>"], vocab[:3]
    # The trainer's scores vary in their last digits from run to run, and it gives the rare
    # single characters it must keep scores 1e-4 apart in hash-map order: rounded to 0.01, and
    # ordered by score then piece, the vocabulary is the same on every run.
    pieces = sorted(((p, round(s, 2)) for p, s in vocab[3:]), key=lambda ps: (-ps[1], ps[0]))
    vocab = [(p, 0.0) for p, _ in vocab[:3]] + pieces
    t5 = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=MAX_SEQ)
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    return t5


def randomize_norms(model, names=("norm", "gamma")):
    """Every norm scale random around 1 and every bias random (their defaults, 1 and 0, would
    leave those code paths untested)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(n in name for n in names):
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if not name.endswith("bias") else 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))


def build_pipeline():
    torch.manual_seed(0)
    tokenizer = train_tokenizer()
    te_config = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=True,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    text_encoder = UMT5EncoderModel(te_config).eval()
    with torch.no_grad():
        for name, p in text_encoder.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.3 if "shared" in name else p.shape[-1] ** -0.5))
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[round(0.1 * (i - 7.5) + 0.013 * i * i, 4) for i in range(16)],
        latents_std=[round(0.6 + 0.15 * ((i * 7) % 16), 4) for i in range(16)],
    ).eval()
    randomize_norms(vae)
    transformer = WanTransformer3DModel(**TRANSFORMER).eval()
    randomize_norms(transformer)
    scheduler = UniPCMultistepScheduler(**SCHEDULER)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def load_saved(d):
    """The saved directory loaded back component by component, as WanPipeline.from_pretrained
    would (diffusers refuses to load the transformer, whose _keep_in_fp32_modules needs
    low_cpu_mem_usage, without accelerate: it is built from its config and its safetensors)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    with open(os.path.join(d, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "WanPipeline", index
    transformer = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(os.path.join(d, "transformer")))
    missing = transformer.load_state_dict(
        load_file(os.path.join(d, "transformer", "diffusion_pytorch_model.safetensors")), strict=True
    )
    assert not missing.missing_keys and not missing.unexpected_keys
    return WanPipeline(
        tokenizer=AutoTokenizer.from_pretrained(os.path.join(d, "tokenizer")),
        text_encoder=UMT5EncoderModel.from_pretrained(os.path.join(d, "text_encoder")).eval(),
        vae=AutoencoderKLWan.from_pretrained(os.path.join(d, "vae")).eval(),
        transformer=transformer.eval(),
        scheduler=UniPCMultistepScheduler.from_pretrained(os.path.join(d, "scheduler")),
    )


def run_recorded(pipe, latents):
    """Runs pipe(...) once with hooks and a step callback; returns the output and every stage."""
    rec = {"te": [], "tr": [], "vae_in": [], "vae_out": [], "steps": []}

    def te_hook(module, args, kwargs, out):
        ids = args[0] if args else kwargs["input_ids"]
        mask = args[1] if len(args) > 1 else kwargs["attention_mask"]
        rec["te"].append((ids.clone(), mask.clone(), out.last_hidden_state.clone()))

    def tr_hook(module, args, kwargs, out):
        rec["tr"].append(
            (kwargs["hidden_states"].clone(), kwargs["timestep"].clone(), kwargs["encoder_hidden_states"].clone(), out[0].clone())
        )

    h1 = pipe.text_encoder.register_forward_hook(te_hook, with_kwargs=True)
    h2 = pipe.transformer.register_forward_hook(tr_hook, with_kwargs=True)
    decode = pipe.vae.decode

    def recorded_decode(z, *a, **k):
        rec["vae_in"].append(z.clone())
        out = decode(z, *a, **k)
        rec["vae_out"].append(out[0].clone())
        return out

    pipe.vae.decode = recorded_decode

    def on_step(p, i, t, kw):
        rec["steps"].append((i, t.clone(), kw["latents"].clone()))
        return kw

    try:
        video = pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            height=HEIGHT,
            width=WIDTH,
            num_frames=FRAMES,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            latents=latents.clone(),
            output_type="np",
            callback_on_step_end=on_step,
            callback_on_step_end_tensor_inputs=["latents"],
            max_sequence_length=MAX_SEQ,
        ).frames
    finally:
        h1.remove()
        h2.remove()
        del pipe.vae.decode
    return video, rec


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "wan_pipeline_tiny")
    )
    a = ap.parse_args()
    torch.set_num_threads(1)  # one thread: reductions in a fixed order
    pipe = build_pipeline()
    os.makedirs(a.out, exist_ok=True)
    pipe.save_pretrained(a.out, safe_serialization=True)
    assert os.path.exists(os.path.join(a.out, "tokenizer", "tokenizer.json"))

    # The initial latents exactly as pipe(generator=torch.Generator().manual_seed(SEED)) draws them
    # (prepare_latents: randn_tensor on the CPU, float32); checked below against such a run.
    num_latent_frames = (FRAMES - 1) // pipe.vae_scale_factor_temporal + 1
    shape = (1, 16, num_latent_frames, HEIGHT // pipe.vae_scale_factor_spatial, WIDTH // pipe.vae_scale_factor_spatial)
    latents0 = torch.randn(shape, generator=torch.Generator().manual_seed(SEED), dtype=torch.float32)

    video, rec = run_recorded(pipe, latents0)
    assert len(rec["te"]) == 2 and len(rec["tr"]) == 2 * STEPS and len(rec["steps"]) == STEPS
    t = {}
    for name, (ids, mask, hidden) in zip(("prompt", "negative"), rec["te"]):
        t[f"{name}_input_ids"] = ids
        t[f"{name}_attention_mask"] = mask
        t[f"{name}_last_hidden_state"] = hidden
    t["prompt_embeds"] = rec["tr"][0][2]
    t["negative_prompt_embeds"] = rec["tr"][1][2]
    t["latents_initial"] = latents0
    t["timesteps"] = pipe.scheduler.timesteps.clone()
    t["sigmas"] = pipe.scheduler.sigmas.clone()
    latents = latents0
    for i in range(STEPS):
        x_c, ts_c, _, cond = rec["tr"][2 * i]
        x_u, ts_u, _, uncond = rec["tr"][2 * i + 1]
        assert torch.equal(x_c, latents) and torch.equal(x_u, latents) and torch.equal(ts_c, ts_u)
        guided = uncond + GUIDANCE * (cond - uncond)  # WanPipeline's expression, same order
        step_i, step_t, after = rec["steps"][i]
        assert step_i == i and torch.equal(step_t, t["timesteps"][i])
        t[f"step{i}_timestep"] = ts_c
        t[f"step{i}_noise_pred_cond"] = cond
        t[f"step{i}_noise_pred_uncond"] = uncond
        t[f"step{i}_noise_pred_guided"] = guided
        t[f"step{i}_latents"] = after
        latents = after
    t["latents_final"] = latents
    t["vae_input"] = rec["vae_in"][0]
    t["vae_decode"] = rec["vae_out"][0]
    t["video"] = torch.from_numpy(video[0].copy())  # (frames, H, W, 3) float32 in [0, 1]

    # The hand-checked stages agree with diffusers' own arithmetic.
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(pipe.vae.config.latents_std).view(1, 16, 1, 1, 1)
    assert torch.equal(t["vae_input"], latents / inv_std + mean)
    for name in ("prompt", "negative"):
        n = int(t[f"{name}_attention_mask"].sum())
        emb = t["prompt_embeds" if name == "prompt" else "negative_prompt_embeds"]
        assert torch.equal(emb[0, :n], t[f"{name}_last_hidden_state"][0, :n])
        assert not emb[0, n:].any() and t[f"{name}_last_hidden_state"][0, n:].abs().sum() > 0

    # The same generation drawn from the seed (no latents given) and from the directory reloaded.
    again = pipe(
        prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
        num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(SEED),
        output_type="np", max_sequence_length=MAX_SEQ,
    ).frames
    assert (again == video).all(), "seeded run differs from the run with the drawn latents"
    loaded = load_saved(a.out)
    reloaded = loaded(
        prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
        num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents0.clone(),
        output_type="np", max_sequence_length=MAX_SEQ,
    ).frames
    assert (reloaded == video).all(), "the saved directory does not reproduce the video"

    # The text encoder in bfloat16 and in float16 as from_pretrained(dtype=...) loads it:
    # transformers 5 keeps `wo` (_keep_in_fp32_modules) in float32 for float16 only; in
    # bfloat16 every weight is bfloat16.
    for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        te = UMT5EncoderModel.from_pretrained(os.path.join(a.out, "text_encoder"), dtype=dtype).eval()
        wo = te.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype
        assert wo == (torch.float32 if dtype == torch.float16 else dtype), (dtype, wo)
        assert te.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == dtype
        with torch.no_grad():
            for name in ("prompt", "negative"):
                out = te(t[f"{name}_input_ids"], t[f"{name}_attention_mask"]).last_hidden_state
                assert out.dtype == dtype
                t[f"{name}_last_hidden_state_{tag}"] = out

    # The prompt's tokens alone, without padding (transformers then passes no mask to SDPA, only
    # the position bias).
    n = int(t["prompt_attention_mask"].sum())
    with torch.no_grad():
        ids = t["prompt_input_ids"][:, :n]
        t["prompt_unpadded_last_hidden_state"] = pipe.text_encoder(ids, torch.ones_like(ids)).last_hidden_state

    # Tokenizer-only cases, through the loaded tokenizer as WanPipeline calls it.
    cases = []
    for i, raw in enumerate(TOKENIZER_CASES):
        cleaned = prompt_clean(raw)
        enc = loaded.tokenizer(
            [cleaned], padding="max_length", max_length=MAX_SEQ, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        full = len(loaded.tokenizer(cleaned, add_special_tokens=True)["input_ids"])
        t[f"tok_case{i}_input_ids"] = enc.input_ids
        t[f"tok_case{i}_attention_mask"] = enc.attention_mask
        cases.append({"raw": raw, "cleaned": cleaned, "untruncated_len": full})
    assert cases[-1]["untruncated_len"] > MAX_SEQ

    t = {k: v.contiguous().clone() for k, v in t.items()}
    save_file(t, os.path.join(a.out, "reference.safetensors"))
    meta = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        prompt_cleaned=prompt_clean(PROMPT),
        negative_prompt_cleaned=prompt_clean(NEGATIVE),
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        seed=SEED,
        max_sequence_length=MAX_SEQ,
        output_type="np",
        torch_num_threads=1,
        ftfy=HAVE_FTFY,
        prompt_clean="ftfy.fix_text if installed, html.unescape twice, strip, regex \\s+ -> ' ', strip",
        tokenizer_cases=cases,
        latents_note="latents_initial = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) "
        "= what pipe(generator=...) draws (checked)",
        tensors={k: [str(v.dtype).replace("torch.", ""), list(v.shape)] for k, v in sorted(t.items())},
        versions=dict(
            torch=torch.__version__,
            diffusers=diffusers.__version__,
            transformers=transformers.__version__,
            tokenizers=tokenizers.__version__,
        ),
    )
    with open(os.path.join(a.out, "reference.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print("wrote", a.out, "video", tuple(t["video"].shape), "sum", t["video"].double().sum().item())
    print("prompt ids", t["prompt_input_ids"][0, : int(t["prompt_attention_mask"].sum())].tolist())


if __name__ == "__main__":
    main()
