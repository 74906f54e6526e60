"""diffusers' AutoencoderKLWan decode of random latents, for comparison with
examples/wan_vae_decode.rs: Wan2.1's VAE with seeded random weights, the same shapes, the time
and the peak CUDA memory above the weights and latents. One RESULT {json} line.

    python scripts/bench_wan_vae_diffusers.py --frames 81 --height 480 --width 832 --kind f32
"""

import argparse
import json
import time

import torch
from diffusers import AutoencoderKLWan


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--kind", choices=["f32", "bf16"], default="f32")
    a = ap.parse_args()
    dtype = torch.float32 if a.kind == "f32" else torch.bfloat16
    torch.manual_seed(0)
    vae = AutoencoderKLWan().to("cuda", dtype).eval()
    latent = (1, 16, 1 + (a.frames - 1) // 4, a.height // 8, a.width // 8)
    z = torch.randn(latent, device="cuda", dtype=dtype)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.no_grad():
        video = vae.decode(z, return_dict=False)[0]
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base
    print("RESULT " + json.dumps({
        "impl": "diffusers", "kind": a.kind, "device": torch.cuda.get_device_name(0),
        "frames": video.shape[2], "height": a.height, "width": a.width, "seconds": round(seconds, 2),
        "peak_vram_gib_above_inputs": round(peak / 2**30, 2),
    }))


if __name__ == "__main__":
    main()
