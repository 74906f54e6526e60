"""Writes tests/fixtures/wan_vae_tiny/: a small random diffusers AutoencoderKLWan (saved with
save_pretrained: config.json and diffusion_pytorch_model.safetensors, encoder included), random
latents of 3 latent frames (9 video frames, so the decoder's feature cache carries across chunks)
and what diffusers makes of them on the CPU: WanPipeline's de-normalization, the decoded video in
float32 and in bfloat16, and the frames of `postprocess_video(..., output_type="np")`.
tests/wan_vae.rs decodes the same latents with the wan crate's WanVae and compares. Rerun only to
regenerate the fixture (needs torch and diffusers):

    .venv/bin/python scripts/export_wan_vae_fixture.py [--out tests/fixtures/wan_vae_tiny]
"""

import argparse
import json
import os

import torch
from diffusers import AutoencoderKLWan
from diffusers.video_processor import VideoProcessor
from safetensors.torch import save_file

# dims of the decoder: 8 * [2, 2, 2, 2, 1] = [16, 16, 16, 16, 8]; temperal_downsample reversed
# gives up blocks upsample3d, upsample3d, upsample2d, none: every up block type, the time_conv of
# both upsample3d blocks, a conv_shortcut (8 -> 16 channels) and the mid block's attention.
CONFIG = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
    latents_mean=[-0.7571, 0.2503, 1.5508, -0.2921],
    latents_std=[2.8184, 1.4541, 0.6382, 1.9160],
)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "wan_vae_tiny")
    )
    a = ap.parse_args()
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**CONFIG).eval()
    # Every parameter random, the RMS norms' gammas too (diffusers starts them at 1, which would
    # leave the gamma untested); conv_out scaled up so that a few percent of the outputs reach the clamp.
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
        vae.decoder.conv_out.weight.mul_(2.5)
    os.makedirs(a.out, exist_ok=True)
    vae.save_pretrained(a.out, safe_serialization=True)

    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 3, 4, 5, generator=g)  # batch 2, 3 latent frames of 4 x 5

    def decode(vae, latents):
        # WanPipeline.__call__ (diffusers 0.42.1, pipelines/wan/pipeline_wan.py), verbatim but for
        # the device helper.
        latents = latents.to(latents.device, dtype=vae.dtype)
        latents_mean = (
            torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        )
        latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(
            latents.device, latents.dtype
        )
        latents = latents / latents_std + latents_mean
        video = vae.decode(latents, return_dict=False)[0]
        return latents, video

    processor = VideoProcessor(vae_scale_factor=8)
    with torch.no_grad():
        denorm, video = decode(vae, latents)
        frames = processor.postprocess_video(video, output_type="np")
        vae_bf16 = AutoencoderKLWan.from_pretrained(a.out, torch_dtype=torch.bfloat16).eval()
        denorm_bf16, video_bf16 = decode(vae_bf16, latents)
    clamped = (video.abs() >= 1.0).float().mean().item()
    save_file(
        {
            "latents": latents,
            "denormalized": denorm.contiguous(),
            "video": video.contiguous(),
            "frames": torch.from_numpy(frames).contiguous(),
            "denormalized_bf16": denorm_bf16.contiguous(),
            "video_bf16": video_bf16.contiguous(),
        },
        os.path.join(a.out, "latents_and_video.safetensors"),
    )
    with open(os.path.join(a.out, "versions.json"), "w") as f:
        import diffusers

        json.dump({"torch": torch.__version__, "diffusers": diffusers.__version__}, f)
        f.write("\n")
    print(
        "wrote", a.out, "video", tuple(video.shape), "frames", frames.shape,
        "clamped fraction", clamped, "std", video.std().item(),
        "bf16 vs f32 max diff", (video_bf16.float() - video).abs().max().item(),
    )


if __name__ == "__main__":
    main()
