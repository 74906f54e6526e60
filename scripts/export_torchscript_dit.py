#!/usr/bin/env python3
"""Build a small DiT in PyTorch and save it as TorchScript, scripted and traced.

usage: export_torchscript_dit.py OUT_DIR [--blocks 4] [--dim 128] [--seed 0]

Writes OUT_DIR/dit_scripted.pt (torch.jit.script) and OUT_DIR/dit_traced.pt (torch.jit.trace),
and OUT_DIR/values_scripted.pt, a small scripted module whose methods take and return every
kind of value a block call may carry (tuples, lists, scalars, strings, None, dicts).
The module's forward is `head(blocks[n-1](... blocks[0](embed(x))))` over a `blocks`
ModuleList, the layout examples/torchscript_layer_loop.rs drives from Rust. Each block has
layer norms, attention, an MLP, biases and a buffer, so parameters and buffers both stream.
"""
import argparse
import os
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.register_buffer("gate", torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a) * self.gate
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class Dit(nn.Module):
    def __init__(self, blocks: int, dim: int, heads: int):
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(blocks)])
        self.head = nn.Linear(dim, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


class Values(nn.Module):
    """Arguments and results of every kind: a rotary (cos, sin) tuple, an optional tensor and a
    float with defaults, a tuple return (as Flux's double blocks return (img, txt)), lists,
    scalars, strings, None and a dict."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.full((4,), 3.0))

    def forward(
        self,
        x: torch.Tensor,
        rope: Tuple[torch.Tensor, torch.Tensor],
        bias: Optional[torch.Tensor] = None,
        scale: float = 2.0,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        y = x * rope[0] + rope[1]
        if bias is not None:
            y = y + bias
        return y * scale, x * self.w

    @torch.jit.export
    def kinds(
        self, xs: List[torch.Tensor], ns: List[int], flag: bool, name: str, maybe: Optional[torch.Tensor]
    ) -> Tuple[int, float, bool, str, List[torch.Tensor], List[int], Optional[torch.Tensor]]:
        return len(xs), float(sum(ns)), not flag, name + "!", [t + 1 for t in xs], [n * 2 for n in ns], maybe

    @torch.jit.export
    def named(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"double": x * 2, "w": self.w}

    @torch.jit.export
    def nest(self, x: Any, n: int) -> Any:
        """`x` inside `n` one-element tuples: a result as deeply nested as asked."""
        out: Any = x
        for _ in range(n):
            out = (out,)
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    model = Dit(a.blocks, a.dim, a.heads).eval()
    os.makedirs(a.out_dir, exist_ok=True)
    scripted = torch.jit.script(model)
    scripted.save(os.path.join(a.out_dir, "dit_scripted.pt"))
    example = torch.randn(2, 24, 16)
    with torch.no_grad():
        traced = torch.jit.trace(model, example)
    traced.save(os.path.join(a.out_dir, "dit_traced.pt"))
    torch.jit.script(Values()).save(os.path.join(a.out_dir, "values_scripted.pt"))
    print(f"wrote {a.out_dir}/dit_scripted.pt, dit_traced.pt ({a.blocks} blocks, dim {a.dim}) and values_scripted.pt")


if __name__ == "__main__":
    main()
