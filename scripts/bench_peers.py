#!/usr/bin/env python3
"""offload-bench's model in PyTorch, under the Python systems this crate is compared with.

usage: bench_peers.py --system resident|diffusers|fastvideo [--preset wan-14b] [--tokens 1024,4096]
                      [--ctx 512] [--reps 5] [--warmup 2] [--fastvideo-wheel PATH]
                      [--model wan|stack] [--device cuda|cpu]

--model wan (the default) runs diffusers' own WanTransformer3DModel (the preset's Wan2.1-T2V
config, bf16 with diffusers' float32 modules, seeded random weights; a 1-frame latent of
--tokens patches, --ctx text tokens), as offload-bench runs the wan crate's. --model stack runs
the Wan-shaped block stack earlier versions of offload-bench ran (the older tables of
bench/RESULTS.md). --device cpu checks the script's logic on the CPU
(wall-clock times; diffusers' group offloading without streams).

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

# The wan crate's presets (wan::Config::small/tiny, wan2_1_t2v_1_3b, wan2_1_t2v_14b, Umt5Config::umt5_xxl);
# tests/wan.rs (the_python_scripts_presets_are_the_wan_crates) checks these copies against them.
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


def build(layers, d, f, heads, gen_device="cuda"):
    """The stack on the CPU in bf16, every parameter filled with seeded random values made on the GPU."""
    with torch.device("meta"):
        m = Stack(layers, d, f, heads)
    m = m.to_empty(device="cpu").to(torch.bfloat16)
    g = torch.Generator(device=gen_device).manual_seed(1234)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_((torch.randn(p.shape, generator=g, device=gen_device, dtype=torch.bfloat16) * 0.02).cpu())
    return m


# diffusers' WanTransformer3DModel configs (Wan2.1-T2V transformer/config.json values; "tiny" is
# the dit_layer_loop example's tiny preset).
WAN_CONFIGS = {
    "tiny": dict(num_layers=6, num_attention_heads=4, attention_head_dim=64, ffn_dim=1024, text_dim=128),
    "wan-1.3b": dict(num_layers=30, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, text_dim=4096),
    "wan-14b": dict(num_layers=40, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, text_dim=4096),
}


def build_wan(preset, gen_device):
    """diffusers' own WanTransformer3DModel on the CPU in bf16 (float32 where diffusers keeps it,
    `_keep_in_fp32_modules`), every parameter seeded random like `build`."""
    from diffusers import WanTransformer3DModel

    cfg = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, freq_dim=256, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024, **WAN_CONFIGS[preset])
    with torch.device("meta"):
        m = WanTransformer3DModel(**cfg)
    m = m.to_empty(device="cpu").to(torch.bfloat16)
    # to_empty drops the non-persistent rotary tables: rebuild them.
    m.rope = type(m.rope)(cfg["attention_head_dim"], cfg["patch_size"], cfg["rope_max_seq_len"])
    keep = m._keep_in_fp32_modules
    g = torch.Generator(device=gen_device).manual_seed(1234)
    with torch.no_grad():
        for name, p in m.named_parameters():
            r = torch.randn(p.shape, generator=g, device=gen_device, dtype=torch.bfloat16) * 0.02
            if any(k in name.split(".") for k in keep):
                p.data = r.float().cpu()
            else:
                p.copy_(r.cpu())
    return m.eval(), cfg


def wan_inputs(tokens, ctx, cfg, dev):
    """A latent of 1 frame with `tokens` patches (a x b, a the largest divisor <= sqrt), a
    timestep, and `ctx` tokens of text embeddings, in bf16."""
    a = max(i for i in range(1, int(tokens**0.5) + 1) if tokens % i == 0)
    b = tokens // a
    if b > cfg["rope_max_seq_len"]:
        sys.exit(f"--tokens {tokens}: a 1 x {a} x {b} patch grid exceeds rope_max_seq_len {cfg['rope_max_seq_len']}")
    x = torch.randn(1, cfg["in_channels"], 1, 2 * a, 2 * b, device=dev, dtype=torch.bfloat16)
    t = torch.tensor([500.0], device=dev)
    text = torch.randn(1, ctx, cfg["text_dim"], device=dev, dtype=torch.bfloat16)
    return x, t, text


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
    ap.add_argument("--model", default="wan", choices=["wan", "stack"],
                    help="wan: diffusers' own WanTransformer3DModel; stack: the block stack of earlier offload-bench versions")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a check of the script's logic (wall-clock times, no streams)")
    a = ap.parse_args()
    layers, d, f, heads = PRESETS[a.preset]
    cuda = a.device == "cuda"
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    t0 = time.perf_counter()
    if a.model == "wan":
        model, wan_cfg = build_wan(a.preset, "cuda" if cuda else "cpu")
        d = wan_cfg["num_attention_heads"] * wan_cfg["attention_head_dim"]
    else:
        model = build(layers, d, f, heads, "cuda" if cuda else "cpu")
    print(f"{a.system}: built {a.preset} on the CPU in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    if a.system == "resident":
        model.to(dev)
    elif a.system == "diffusers":
        from diffusers.hooks import apply_group_offloading

        apply_group_offloading(model, onload_device=dev, offload_device=torch.device("cpu"), offload_type="block_level",
                               num_blocks_per_group=1, use_stream=cuda)
    else:
        lo = load_fastvideo_hooks(a.fastvideo_wheel)
        for name, p in model.named_parameters():
            if not name.startswith("blocks."):
                p.data = p.data.to(dev)
        lo.enable_layerwise_offload(model)
    if a.model == "wan":
        model.rope.to(dev)  # buffers outside the blocks, as the other non-block tensors
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    init_s = time.perf_counter() - t0
    print(f"{a.system}: init {init_s:.1f} s", file=sys.stderr, flush=True)

    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    for tokens in [int(t) for t in a.tokens.split(",")]:
        torch.manual_seed(tokens)
        if a.model == "wan":
            x, t, ctx = wan_inputs(tokens, a.ctx, wan_cfg, dev)
            run = lambda: model(x, t, ctx, return_dict=False)[0]  # noqa: E731
        else:
            x = torch.randn(1, tokens, 64, device=dev, dtype=torch.bfloat16)
            ctx = torch.randn(1, a.ctx, d, device=dev, dtype=torch.bfloat16)
            run = lambda: model(x, ctx)  # noqa: E731
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        with torch.no_grad():
            for i in range(a.warmup + a.reps):
                if cuda:
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    run()
                    e1.record()
                    e1.synchronize()
                    ms_i = e0.elapsed_time(e1)
                else:
                    w0 = time.perf_counter()
                    run()
                    ms_i = (time.perf_counter() - w0) * 1e3
                if i >= a.warmup:
                    times.append(ms_i)
        times.sort()
        ms = times[len(times) // 2]
        if a.model == "wan":
            layers, f = wan_cfg["num_layers"], wan_cfg["ffn_dim"]
        row = {"device": name, "system": a.system, "mode": a.system, "model": a.model, "preset": a.preset,
               "layers": layers, "dim": d, "ffn": f, "tokens": tokens, "ms": round(ms, 2), "resident_ms": None,
               "peak_vram_bytes": torch.cuda.max_memory_allocated() if cuda else 0, "init_s": round(init_s, 3), "max_abs_diff": None}
        print("RESULT " + json.dumps(row), flush=True)
        print(f"| {name} | {a.preset} | {tokens} | {a.system} | {ms:.1f} | init {init_s:.1f} s | peak {row['peak_vram_bytes'] / 2**30:.2f} GiB |",
              flush=True)


if __name__ == "__main__":
    main()
