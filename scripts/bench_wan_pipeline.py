#!/usr/bin/env python3
"""diffusers' WanPipeline (text to video), held to a VRAM limit, timed stage by stage: the
Python side of the text-to-video comparison (`examples/text_to_video.rs` is the Rust side).

usage: bench_wan_pipeline.py --mode group|model|resident [--preset wan-1.3b|wan-14b]
                             [--height 480 --width 832 --frames 81 --steps 2]
                             [--vram-limit 24] [--tokenizer DIR] [--device cuda|cpu]

Every component has seeded random weights, made on the GPU and kept on the CPU (bf16 for the
transformer and the text encoder, float32 where diffusers and transformers keep it, float32 for
the VAE): Wan2.1-T2V's transformer config for the preset, umT5-XXL's config for the text encoder
(`UMT5EncoderModel`, 24 blocks), Wan2.1's VAE config, `UniPCMultistepScheduler` as Wan2.1 ships
it (flow sigmas, flow_shift 3.0). The tokenizer is the test fixture's (any tokenizer whose ids
fit the vocabulary costs the same), `tests/fixtures/wan_pipeline_tiny/tokenizer` by default.

- group: `pipe.enable_group_offload(block_level, num_blocks_per_group=1, use_stream=True)`,
  diffusers' fastest offloading (every component; the VAE has no block list and moves whole).
- model: `pipe.enable_model_cpu_offload()`, each component moved whole to the GPU when used.
- resident: every component on the GPU (only where it fits).

The limit is `torch.cuda.set_per_process_memory_fraction(limit / total)`. Stages are timed with
a synchronize around each: text encoding (`encode_prompt`, prompt and negative prompt), each
denoising step (two transformer forwards, classifier-free guidance, the scheduler step), VAE
decode (de-normalize, decode, post-process to frames in [0, 1]). Prints one `RESULT {json}`
line with the same fields as the Rust example's.
"""
import argparse
import json
import os
import resource
import sys
import time

import torch

# The wan crate's presets (wan::Config::small/tiny, wan2_1_t2v_1_3b, wan2_1_t2v_14b, Umt5Config::umt5_xxl);
# tests/wan.rs (the_python_scripts_presets_are_the_wan_crates) checks these copies against them.
WAN = {
    "tiny": dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=64),
    "wan-1.3b": dict(num_layers=30, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960),
    "wan-14b": dict(num_layers=40, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824),
}
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", layer_norm_epsilon=1e-6,
                is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)
# A check of the script's logic on the CPU: the same classes, small sizes.
UMT5_TINY = dict(UMT5_XXL, vocab_size=256384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
VAE_TINY = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
PROMPT = "A red fox runs through fresh snow at dawn, its breath steaming in the cold air."
NEGATIVE = "blurry, low quality, static, overexposed, worst quality, JPEG artifacts, deformed"


def fill(model, keep, gen_device, seed):
    """Every parameter: N(0, 0.02) bf16 values made on `gen_device` (float32 where `keep` names a
    module), on the CPU."""
    g = torch.Generator(device=gen_device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, device=gen_device, dtype=torch.bfloat16) * 0.02
            if p.dtype == torch.float32 or any(k in name.split(".") for k in keep):
                p.data = r.float().cpu()
            else:
                p.data = r.cpu()


def build(preset, gen_device, tokenizer_dir):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    tiny = preset == "tiny"
    cfg = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=32 if tiny else 4096, freq_dim=256,
               cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
               **WAN[preset])
    with torch.device("meta"):
        tr = WanTransformer3DModel(**cfg)
        te = UMT5EncoderModel(UMT5Config(**(UMT5_TINY if tiny else UMT5_XXL)))
    tr = tr.to_empty(device="cpu").to(torch.bfloat16)
    tr.rope = type(tr.rope)(cfg["attention_head_dim"], cfg["patch_size"], cfg["rope_max_seq_len"])
    fill(tr, tr._keep_in_fp32_modules or [], gen_device, 1234)
    te = te.to_empty(device="cpu").to(torch.bfloat16)
    fill(te, getattr(te, "_keep_in_fp32_modules", None) or [], gen_device, 4321)
    vae = AutoencoderKLWan(**(VAE_TINY if tiny else {}))  # Wan2.1's VAE config is the class default
    fill(vae, [], gen_device, 999)
    vae = vae.float()
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                    num_train_timesteps=1000)
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tokenizer_dir, "tokenizer.json"),
                                  pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    pipe = WanPipeline(tokenizer=tok, text_encoder=te.eval(), transformer=tr.eval(), vae=vae.eval(), scheduler=sched)
    return pipe, cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", required=True, choices=["group", "model", "resident"])
    ap.add_argument("--preset", default="wan-1.3b", choices=sorted(WAN))
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--vram-limit", type=float, default=24.0, help="GiB; 0 for none")
    ap.add_argument("--tokenizer", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures",
                                                        "wan_pipeline_tiny", "tokenizer"))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    a = ap.parse_args()
    cuda = a.device == "cuda"
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda and a.vram_limit > 0:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.vram_limit * 2**30 / total), 0)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    t0 = time.perf_counter()
    pipe, cfg = build(a.preset, "cuda" if cuda else "cpu", a.tokenizer)
    build_s = time.perf_counter() - t0
    print(f"built {a.preset} pipeline with random weights in {build_s:.1f} s", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    if a.mode == "group":
        pipe.enable_group_offload(onload_device=dev, offload_device=torch.device("cpu"), offload_type="block_level",
                                  num_blocks_per_group=1, use_stream=cuda)
    elif a.mode == "model":
        pipe.enable_model_cpu_offload(device=dev)
    else:
        pipe.to(dev)
    pipe.transformer.rope.to(dev)
    sync()
    init_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    stages = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        pe, ne = pipe.encode_prompt(PROMPT, NEGATIVE, do_classifier_free_guidance=a.guidance > 1.0,
                                    max_sequence_length=512, device=dev)
    sync()
    stages["text_encoding_s"] = time.perf_counter() - t0

    step_s = []
    last = [time.perf_counter()]

    def on_step(p, i, t, kw):
        sync()
        now = time.perf_counter()
        step_s.append(now - last[0])
        last[0] = now
        print(f"step {i + 1}/{a.steps}: {step_s[-1]:.2f} s", file=sys.stderr, flush=True)
        return kw

    g = torch.Generator(device="cpu").manual_seed(0)
    t0 = time.perf_counter()
    last[0] = t0
    out = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, height=a.height, width=a.width, num_frames=a.frames,
               num_inference_steps=a.steps, guidance_scale=a.guidance, generator=g, output_type="latent",
               callback_on_step_end=on_step)
    latents = out.frames
    sync()
    stages["denoising_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with torch.no_grad():
        vae = pipe.vae
        vdev = next(vae.parameters()).device if a.mode != "model" else dev
        if a.mode == "model":
            # enable_model_cpu_offload's hook moves the VAE on its first forward; decode() is that.
            pass
        lat = latents.to(vdev, dtype=vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(lat.device, lat.dtype)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(lat.device, lat.dtype)
        lat = lat / std + mean
        video = vae.decode(lat, return_dict=False)[0]
        frames = pipe.video_processor.postprocess_video(video, output_type="pt")
    sync()
    stages["vae_decode_s"] = time.perf_counter() - t0
    pipe.maybe_free_model_hooks()

    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    row = {
        "device": name, "system": f"diffusers-{a.mode}", "preset": a.preset, "height": a.height, "width": a.width,
        "frames": int(frames.shape[1]), "steps": a.steps, "vram_limit_gib": a.vram_limit,
        "s_per_step": round(sorted(step_s)[len(step_s) // 2], 3), "step_s": [round(s, 3) for s in step_s],
        **{k: round(v, 3) for k, v in stages.items()},
        "init_s": round(init_s, 3), "build_s": round(build_s, 1),
        "peak_vram_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else 0,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else 0,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "frames_mean": float(frames.float().mean()),
    }
    print("RESULT " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
