"""Writes tests/fixtures/wan_tiny/: a small random diffusers WanTransformer3DModel (saved with
save_pretrained, in shards, so the test loads through the shard index), fixed inputs and
diffusers' own output on the CPU in float32. tests/wan.rs runs the Rust model on the same inputs
and compares. Rerun only to regenerate the fixture (needs torch and diffusers):

    .venv/bin/python scripts/export_wan_fixture.py [--out tests/fixtures/wan_tiny]
"""

import argparse
import json
import os

import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

# The same values as wan::Config::tiny() in wan/src/config.rs.
CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=32,
)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "wan_tiny"))
    a = ap.parse_args()
    torch.manual_seed(0)
    model = WanTransformer3DModel(**CONFIG).eval()
    # Every parameter random, the norms' scales and shifts too (diffusers starts them at 1 and 0,
    # which would leave those code paths untested).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    os.makedirs(a.out, exist_ok=True)
    # Shards of ~100 kB: the test reads the index as for a real 14B checkpoint.
    model.save_pretrained(a.out, safe_serialization=True, max_shard_size="100KB")

    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 3, 8, 6, generator=g)  # batch 2, 3 frames of 8 x 6
    timestep = torch.tensor([999.0, 250.5])
    text = torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        out = model(latents, timestep, text, return_dict=False)[0]
    save_file(
        {"latents": latents, "timestep": timestep, "encoder_hidden_states": text, "output": out.contiguous()},
        os.path.join(a.out, "inputs_and_output.safetensors"),
    )
    with open(os.path.join(a.out, "versions.json"), "w") as f:
        import diffusers

        json.dump({"torch": torch.__version__, "diffusers": diffusers.__version__}, f)
        f.write("\n")
    print("wrote", a.out, "output", tuple(out.shape), "sum", out.double().sum().item())


if __name__ == "__main__":
    main()
