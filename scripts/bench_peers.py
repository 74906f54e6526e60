#!/usr/bin/env python3
"""The offload-bench stack in PyTorch, under the Python systems this crate is compared with.

usage: bench_peers.py --system resident|diffusers|fastvideo [--preset wan-14b] [--tokens 1024,4096]
                      [--ctx 512] [--reps 5] [--warmup 2] [--fastvideo-wheel PATH]

- resident: the whole stack on the GPU.
- diffusers: `diffusers.hooks.apply_group_offloading(block_level, num_blocks_per_group=1,
  use_stream=True)` from the diffusers package.
- fastvideo: FastVideo's layerwise offload hooks (`fastvideo/hooks/layerwise_offload.py` and
  `hooks.py`), loaded directly from the files of its PyPI wheel without importing the rest of
  the package; non-block weights on the GPU as FastVideo expects.

Same block as offload-bench (self-attention, cross-attention to a 512-token context, MLP, adaLN
modulation; bf16, seeded random weights), timed the same way (median of --reps forwards after
--warmup, CUDA events). Prints one `RESULT {json}` line per token count with offload-bench's
fields. Run one system per process: each builds its own copy of the weights.
"""
import argparse
import importlib.util
import json
import logging
import sys
import time
import types
import zipfile

import torch
import torch.nn.functional as F
from torch import nn

PRESETS = {"tiny": (6, 256, 1024, 4), "wan-1.3b": (30, 1536, 8960, 12), "wan-14b": (40, 5120, 13824, 40)}


class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm_q = nn.Parameter(torch.empty(d))
        self.norm_k = nn.Parameter(torch.empty(d))


def rms(x, w):
    var = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(var + 1e-6)).to(x.dtype) * w


class Block(nn.Module):
    def __init__(self, d, f, heads):
        super().__init__()
        self.heads = heads
        self.self_attn = Attn(d)
        self.cross_attn = Attn(d)
        self.norm3 = nn.LayerNorm(d, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(d, f), nn.GELU(approximate="tanh"), nn.Linear(f, d))
        self.modulation = nn.Parameter(torch.empty(1, 6, d))

    def attn(self, a, x, ctx):
        b, t, d = x.shape
        h = self.heads
        split = lambda y: y.view(b, -1, h, d // h).transpose(1, 2)  # noqa: E731
        q = split(rms(a.q(x), a.norm_q))
        k = split(rms(a.k(ctx), a.norm_k))
        v = split(a.v(ctx))
        o = F.scaled_dot_product_attention(q, k, v)
        return a.o(o.transpose(1, 2).reshape(b, t, d))

    def forward(self, x, ctx, e):
        d = x.shape[-1]
        m = (self.modulation + e).chunk(6, dim=1)
        h = F.layer_norm(x, (d,), eps=1e-6) * (m[1] + 1) + m[0]
        x = x + self.attn(self.self_attn, h, h) * m[2]
        x = x + self.attn(self.cross_attn, self.norm3(x), ctx)
        h = F.layer_norm(x, (d,), eps=1e-6) * (m[4] + 1) + m[3]
        return x + self.ffn(h) * m[5]


class Stack(nn.Module):
    def __init__(self, layers, d, f, heads):
        super().__init__()
        self.embed = nn.Parameter(torch.empty(d, 64))
        self.time = nn.Parameter(torch.empty(6, d))
        self.blocks = nn.ModuleList(Block(d, f, heads) for _ in range(layers))
        self.head = nn.Parameter(torch.empty(64, d))

    def forward(self, x, ctx):
        x = x @ self.embed.t()
        e = self.time.unsqueeze(0)
        for b in self.blocks:
            x = b(x, ctx, e)
        return x @ self.head.t()


def build(layers, d, f, heads):
    """The stack on the CPU in bf16, every parameter filled with seeded random values made on the GPU."""
    with torch.device("meta"):
        m = Stack(layers, d, f, heads)
    m = m.to_empty(device="cpu").to(torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(1234)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_((torch.randn(p.shape, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02).cpu())
    return m


def load_fastvideo_hooks(wheel):
    """FastVideo's hook files from its wheel, with a stub logger, without the rest of the package."""
    pkg = types.ModuleType("fastvideo")
    pkg.__path__ = []
    hooks_pkg = types.ModuleType("fastvideo.hooks")
    hooks_pkg.__path__ = []
    logger = types.ModuleType("fastvideo.logger")
    logger.init_logger = logging.getLogger
    sys.modules.update({"fastvideo": pkg, "fastvideo.hooks": hooks_pkg, "fastvideo.logger": logger})
    with zipfile.ZipFile(wheel) as z:
        for name in ("hooks", "layerwise_offload"):
            src = z.read(f"fastvideo/hooks/{name}.py").decode()
            mod = types.ModuleType(f"fastvideo.hooks.{name}")
            mod.__file__ = f"{wheel}!fastvideo/hooks/{name}.py"
            sys.modules[mod.__name__] = mod
            exec(compile(src, mod.__file__, "exec"), mod.__dict__)
    return sys.modules["fastvideo.hooks.layerwise_offload"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--system", required=True, choices=["resident", "diffusers", "fastvideo"])
    ap.add_argument("--preset", default="wan-14b", choices=sorted(PRESETS))
    ap.add_argument("--tokens", default="1024")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--fastvideo-wheel", default=None)
    a = ap.parse_args()
    layers, d, f, heads = PRESETS[a.preset]
    dev = torch.device("cuda", 0)
    t0 = time.perf_counter()
    model = build(layers, d, f, heads)
    print(f"{a.system}: built {a.preset} on the CPU in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    if a.system == "resident":
        model.to(dev)
    elif a.system == "diffusers":
        from diffusers.hooks import apply_group_offloading

        apply_group_offloading(model, onload_device=dev, offload_device=torch.device("cpu"), offload_type="block_level",
                               num_blocks_per_group=1, use_stream=True)
    else:
        lo = load_fastvideo_hooks(a.fastvideo_wheel)
        for name, p in model.named_parameters():
            if not name.startswith("blocks."):
                p.data = p.data.to(dev)
        lo.enable_layerwise_offload(model)
    torch.cuda.synchronize()
    init_s = time.perf_counter() - t0
    print(f"{a.system}: init {init_s:.1f} s", file=sys.stderr, flush=True)

    name = torch.cuda.get_device_name(0)
    for tokens in [int(t) for t in a.tokens.split(",")]:
        torch.manual_seed(tokens)
        x = torch.randn(1, tokens, 64, device=dev, dtype=torch.bfloat16)
        ctx = torch.randn(1, a.ctx, d, device=dev, dtype=torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        with torch.no_grad():
            for i in range(a.warmup + a.reps):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                model(x, ctx)
                e1.record()
                e1.synchronize()
                if i >= a.warmup:
                    times.append(e0.elapsed_time(e1))
        times.sort()
        ms = times[len(times) // 2]
        row = {"device": name, "system": a.system, "mode": a.system, "preset": a.preset, "layers": layers, "dim": d,
               "ffn": f, "tokens": tokens, "ms": round(ms, 2), "resident_ms": None,
               "peak_vram_bytes": torch.cuda.max_memory_allocated(), "init_s": round(init_s, 3), "max_abs_diff": None}
        print("RESULT " + json.dumps(row), flush=True)
        print(f"| {name} | {a.preset} | {tokens} | {a.system} | {ms:.1f} | init {init_s:.1f} s | peak {row['peak_vram_bytes'] / 2**30:.2f} GiB |",
              flush=True)


if __name__ == "__main__":
    main()
