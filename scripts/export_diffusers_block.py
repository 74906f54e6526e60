#!/usr/bin/env python3
"""Trace the transformer blocks of a small random diffusers WanTransformer3DModel to TorchScript,
with the block inputs the model itself computes, for tests/torchscript.rs.

usage: export_diffusers_block.py [OUT_DIR]   (default: tests/fixtures/wan_blocks)

Needs torch and diffusers (`.venv/bin/pip install diffusers`); the test that reads the output
does not, since the output is committed. Writes into OUT_DIR:

- wan_blocks_traced.pt  torch.jit.trace of a wrapper whose `blocks` is the model's ModuleList,
                        so the parameters are named `blocks.<i>.*` as the offload manager expects.
                        Traced as a whole, its submodules get the signatures the trace saw:
                        arguments in first-use order, the rotary tuple split in two, names that
                        differ from block to block, and blocks[0] returning a tuple (see
                        schema.txt). This is what tracing a whole model gives.
- wan_blocks_per_block.pt  each WanTransformerBlock traced on its own (with its real inputs, so
                        its `forward` keeps the declared order, names and the rotary tuple),
                        the traced blocks collected in a scripted wrapper with the same names
- wan_io.safetensors    the inputs the model hands its first block (hidden_states,
                        encoder_hidden_states, temb = the timestep projection [B, 6, D],
                        rotary_cos, rotary_sin), the eager output of blocks[0] (`out_block0`) and
                        of all blocks in turn (`out_blocks`), and the traced wrapper's own output
                        in Python (`out_blocks_traced`)
- schema.txt            the forward schemas libtorch recorded, for reading

Everything is traced on the CPU in float32 with a fixed seed. The trace is checked to carry no
CPU device constant, so the saved modules also run on CUDA after loading there.
"""
import os
import sys
from typing import Tuple

import torch
from torch import nn
from safetensors.torch import save_file

try:
    from diffusers import WanTransformer3DModel
    import diffusers
except ImportError:
    sys.exit("export_diffusers_block.py needs diffusers: .venv/bin/pip install diffusers")

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
    rope_max_seq_len=64,
)


class Blocks(nn.Module):
    """The model's block loop, as WanTransformer3DModel.forward runs it."""

    def __init__(self, blocks: nn.ModuleList):
        super().__init__()
        self.blocks = blocks

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: Tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        for block in self.blocks:
            hidden_states = block(hidden_states, encoder_hidden_states, temb, rotary_emb)
        return hidden_states


def block_inputs(model, latents, timestep, text):
    """What WanTransformer3DModel.forward hands its blocks (diffusers 0.35+ layout)."""
    rotary_emb = model.rope(latents)
    h = model.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()
    _, timestep_proj, ctx, _ = model.condition_embedder(timestep, text, None)
    temb = timestep_proj.unflatten(1, (6, -1))
    return h, ctx, temb, rotary_emb


def main() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "tests", "fixtures", "wan_blocks")
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    model = WanTransformer3DModel(**CONFIG).eval()
    latents = torch.randn(1, CONFIG["in_channels"], 2, 8, 8)  # 2 frames of 8x8 -> 32 tokens
    timestep = torch.tensor([500])
    text = torch.randn(1, 8, CONFIG["text_dim"])

    with torch.no_grad():
        h, ctx, temb, (cos, sin) = block_inputs(model, latents, timestep, text)
        rope = (cos.contiguous(), sin.contiguous())
        out_block0 = model.blocks[0](h, ctx, temb, rope)
        out_blocks = h
        for block in model.blocks:
            out_blocks = block(out_blocks, ctx, temb, rope)

        example = (h, ctx, temb, rope)
        wrapper = torch.jit.trace(Blocks(model.blocks), example, check_trace=False)
        out_traced = wrapper(*example)
        traced_blocks, x = [], h
        for block in model.blocks:
            traced_blocks.append(torch.jit.trace(block, (x, ctx, temb, rope), check_trace=False))
            x = block(x, ctx, temb, rope)
        per_block = torch.jit.script(Blocks(nn.ModuleList(traced_blocks)))

    for name, m in [("wan_blocks_traced.pt", wrapper), ("wan_blocks_per_block.pt", per_block)]:
        code = "\n".join(sub.code for _, sub in m.named_modules() if hasattr(sub, "code"))
        if 'device("cpu")' in code or "torch.device(\"cpu\")" in code:
            sys.exit(f"{name}: the trace baked a CPU device constant; it would not run on CUDA")
        m.save(os.path.join(out_dir, name))

    save_file(
        {
            "hidden_states": h.contiguous(),
            "encoder_hidden_states": ctx.contiguous(),
            "temb": temb.contiguous(),
            "rotary_cos": rope[0],
            "rotary_sin": rope[1],
            "out_block0": out_block0.contiguous(),
            "out_blocks": out_blocks.contiguous(),
            "out_blocks_traced": out_traced.contiguous(),
        },
        os.path.join(out_dir, "wan_io.safetensors"),
        metadata={"diffusers": diffusers.__version__, "torch": torch.__version__},
    )
    with open(os.path.join(out_dir, "schema.txt"), "w") as f:
        f.write(f"# diffusers {diffusers.__version__}, torch {torch.__version__}\n")
        for name in ["wan_blocks_traced.pt", "wan_blocks_per_block.pt"]:
            loaded = torch.jit.load(os.path.join(out_dir, name))
            f.write(f"{name} forward: {loaded.forward.schema}\n")
            for i in range(CONFIG["num_layers"]):
                f.write(f"{name} blocks.{i}.forward: {getattr(loaded.blocks, str(i)).forward.schema}\n")
    print(f"wrote {out_dir}: eager vs traced max diff {(out_blocks - out_traced).abs().max().item()}")


if __name__ == "__main__":
    main()
