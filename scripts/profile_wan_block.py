#!/usr/bin/env python3
"""One Wan2.1 transformer block: diffusers' own `WanTransformerBlock` against a 1:1 Python
translation of the op sequence that the Rust/tch block issues (wan/src/block.rs, wan/src/rope.rs,
the block inputs of wan/src/model.rs), sharing the same weights, plus variants of the Rust
sequence with one candidate change each.

For each: the output against diffusers', the time per block (CUDA events, interleaved rounds,
median), and a torch.profiler table of CUDA kernels (name, count, total us per block call), with
the diff of the diffusers and Rust tables. One `RESULT {json}` line per timing.

    python3 scripts/profile_wan_block.py                       # 14B block, 16384 tokens, CUDA
    python3 scripts/profile_wan_block.py --device cpu --tiny   # logic check on the CPU
"""

import argparse
import json
import statistics
import sys
import time
from collections import OrderedDict

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import (
    WanRotaryPosEmbed,
    WanTransformer3DModel,
    WanTransformerBlock,
)


# ---------------------------------------------------------------------------------------------
# Inputs and the diffusers block.


def build(dim, ffn, heads, dtype, dev, seed=1234):
    """diffusers' block with random weights: `dtype` everywhere except the parameters that
    `WanTransformer3DModel._keep_in_fp32_modules` names (here `scale_shift_table`, `norm2.*`;
    norm1 and norm3 have no parameters), which are float32, as `from_pretrained` leaves them."""
    with torch.device("meta"):
        blk = WanTransformerBlock(dim, ffn, heads, "rms_norm_across_heads", True, 1e-6, None)
    blk = blk.to_empty(device=dev)
    keep = WanTransformer3DModel._keep_in_fp32_modules
    g = torch.Generator(device=dev).manual_seed(seed)
    kept = []
    with torch.no_grad():
        for name, p in blk.named_parameters():
            r = torch.randn(p.shape, generator=g, device=dev, dtype=torch.float32)
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or name.endswith("norm2.weight"):
                r = 1.0 + 0.1 * r
            elif name.endswith("scale_shift_table"):
                r = r / dim**0.5
            else:
                r = r * 0.02
            if any(k in name.split(".") for k in keep):
                p.data = r.float()
                kept.append(name)
            else:
                p.data = r.to(dtype)
    return blk.eval(), kept


def inputs(dim, head_dim, grid, ctx_len, dtype, dev, seed=7):
    """What WanTransformer3DModel.forward hands to a block for a latent of 1 frame and
    `grid` = (h, w) patches: hidden [1, h*w, dim] (contiguous), the text [1, ctx, dim], the
    timestep projection [1, 6, dim] in the model type (time_proj's output, unflattened), and
    the rotary (cos, sin) [1, tokens, 1, head_dim] float32 from diffusers' WanRotaryPosEmbed."""
    g = torch.Generator(device=dev).manual_seed(seed)
    h, w = grid
    x = torch.randn(1, h * w, dim, generator=g, device=dev, dtype=torch.float32).to(dtype)
    ctx = torch.randn(1, ctx_len, dim, generator=g, device=dev, dtype=torch.float32).to(dtype)
    tp = (0.1 * torch.randn(1, 6 * dim, generator=g, device=dev, dtype=torch.float32)).to(dtype)
    tp = tp.unflatten(1, (6, -1))
    rope = WanRotaryPosEmbed(head_dim, (1, 2, 2), 1024).to(dev)  # float32 tables ("rope" kept fp32)
    latent = torch.empty(1, 16, 1, 2 * h, 2 * w, device="meta")  # only its shape is read
    cos, sin = rope(latent)
    return x, ctx, tp, (cos, sin)


# ---------------------------------------------------------------------------------------------
# The Rust block, op for op (wan/src/block.rs at the commit this script was written against).
# Options name the candidate changes; all False/"stack" is the Rust code as it is.

RUST = dict(rope="stack", reuse_x32=False, addcmul=False, sdpa_contig=False)


def rope_apply(x, cos_t, sin_t, mode):
    """rope.rs `Rotary::apply` (mode "stack"), and candidate rewrites."""
    pairs = x.unflatten(-1, (-1, 2))  # x.unflatten(-1, [-1, 2])
    x1 = pairs.select(-1, 0)
    x2 = pairs.select(-1, 1)
    cos = cos_t[..., 0::2]  # self.cos.slice(-1, 0, None, 2)
    sin = sin_t[..., 1::2]  # self.sin.slice(-1, 1, None, 2)
    if mode == "bf16":  # tables in x's type: NOT parity-preserving, for scale only
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    even = x1 * cos - x2 * sin
    odd = x1 * sin + x2 * cos
    if mode in ("stack", "bf16"):
        return torch.stack([even, odd], -1).flatten(-2, -1).to(x.dtype)
    if mode == "copy":  # diffusers: empty_like(x), strided copies with the cast
        out = torch.empty_like(x)
        out[..., 0::2] = even
        out[..., 1::2] = odd
        return out
    if mode == "stack_cast":  # cast each half, then stack in x's type
        return torch.stack([even.to(x.dtype), odd.to(x.dtype)], -1).flatten(-2, -1)
    if mode == "stack_out":  # stack straight into an x-typed result
        out = torch.empty(*even.shape, 2, dtype=x.dtype, device=x.device)
        torch.stack([even, odd], -1, out=out)
        return out.flatten(-2, -1)
    raise ValueError(mode)


def rust_attention(attn, x, ctx, rotary, o):
    """block.rs `Attention::forward`."""
    ctx = x if ctx is None else ctx
    q = F.linear(x, attn.to_q.weight, attn.to_q.bias)
    k = F.linear(ctx, attn.to_k.weight, attn.to_k.bias)
    v = F.linear(ctx, attn.to_v.weight, attn.to_v.bias)
    inner = attn.inner_dim
    eps = attn.norm_q.eps
    q = torch.rms_norm(q, [inner], attn.norm_q.weight, eps)
    k = torch.rms_norm(k, [inner], attn.norm_k.weight, eps)
    heads = lambda t: t.unflatten(2, (attn.heads, -1))  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    if rotary is not None:
        q = rope_apply(q, *rotary, o["rope"])
        k = rope_apply(k, *rotary, o["rope"])
    kind = q.dtype
    perm = lambda t: t.permute(0, 2, 1, 3)  # noqa: E731
    if o["sdpa_contig"]:
        perm = lambda t: t.permute(0, 2, 1, 3).contiguous()  # noqa: E731
    out = F.scaled_dot_product_attention(
        perm(q), perm(k), perm(v), attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
    )
    out = out.permute(0, 2, 1, 3).flatten(2, 3).to(kind)
    return F.linear(out, attn.to_out[0].weight, attn.to_out[0].bias)


def layer_norm(x, dim, eps):
    return torch.layer_norm(x, [dim], None, None, eps, False)


def rust_block(blk, x, ctx, tp, rotary, **opts):
    """block.rs `Block::forward`."""
    o = dict(RUST, **opts)
    dim = blk.scale_shift_table.shape[-1]
    eps = blk.norm1.eps
    kind = x.dtype
    m = (blk.scale_shift_table + tp.to(torch.float32)).chunk(6, 1)
    shift, scale, gate = m[0], m[1], m[2]
    c_shift, c_scale, c_gate = m[3], m[4], m[5]

    # 1. Self-attention.
    x32 = x.to(torch.float32)
    if o["addcmul"]:
        h = torch.addcmul(shift, layer_norm(x32, dim, eps), scale + 1.0).to(kind)
    else:
        h = (layer_norm(x32, dim, eps) * (scale + 1.0) + shift).to(kind)
    a = rust_attention(blk.attn1, h, None, rotary, o)
    x32b = x32 if o["reuse_x32"] else x.to(torch.float32)
    if o["addcmul"]:
        x = torch.addcmul(x32b, a, gate).to(kind)
    else:
        x = (x32b + a * gate).to(kind)

    # 2. Cross-attention.
    w, b = blk.norm2.weight, blk.norm2.bias
    h = torch.layer_norm(x.to(torch.float32), [dim], w.to(torch.float32), b.to(torch.float32), eps, False).to(kind)
    a = rust_attention(blk.attn2, h, ctx, None, o)
    x = x + a

    # 3. Feed-forward.
    x32 = x.to(torch.float32)
    if o["addcmul"]:
        h = torch.addcmul(c_shift, layer_norm(x32, dim, eps), c_scale + 1.0).to(kind)
    else:
        h = (layer_norm(x32, dim, eps) * (c_scale + 1.0) + c_shift).to(kind)
    ff_in, ff_out = blk.ffn.net[0].proj, blk.ffn.net[2]
    y = F.linear(F.gelu(F.linear(h, ff_in.weight, ff_in.bias), approximate="tanh"), ff_out.weight, ff_out.bias)
    x32b = x32 if o["reuse_x32"] else x.to(torch.float32)
    if o["addcmul"]:
        return torch.addcmul(x32b, y.to(torch.float32), c_gate).to(kind)
    return (x32b + y.to(torch.float32) * c_gate).to(kind)


# ---------------------------------------------------------------------------------------------
# Timing and profiling.


def timed(fns, warmup, reps, rounds, cuda):
    """Median ms per call of each fn, over `rounds` interleaved rounds of `reps` calls."""
    times = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():
            for _ in range(warmup):
                f()
        if cuda:
            torch.cuda.synchronize()
        for _ in range(rounds):
            for k, f in fns.items():
                for _ in range(reps):
                    if cuda:
                        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        e0.record()
                        f()
                        e1.record()
                        e1.synchronize()
                        times[k].append(e0.elapsed_time(e1))
                    else:
                        t0 = time.perf_counter()
                        f()
                        times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def dev_time(e):
    for a in ("device_time_total", "cuda_time_total"):
        if hasattr(e, a):
            return getattr(e, a)
    return 0.0


def self_dev_time(e):
    for a in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(e, a):
            return getattr(e, a)
    return 0.0


def profile(fn, iters, cuda):
    """(kernels, ops): kernel name -> [count, us] per call; aten op -> [count, self device us]
    per call (self CPU us on the CPU)."""
    from torch.profiler import ProfilerActivity, profile as tprof

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad():
        fn()
        if cuda:
            torch.cuda.synchronize()
        with tprof(activities=acts) as p:
            for _ in range(iters):
                fn()
            if cuda:
                torch.cuda.synchronize()
    kernels, ops = {}, {}
    for e in p.events():
        is_dev = cuda and e.device_type == torch.autograd.DeviceType.CUDA
        if is_dev:
            k = kernels.setdefault(e.name, [0, 0.0])
            k[0] += 1
            k[1] += dev_time(e)
    for e in p.key_averages():
        if not e.key.startswith("aten::"):
            continue
        t = self_dev_time(e) if cuda else e.self_cpu_time_total
        if cuda and t <= 0:
            continue
        ops[e.key] = [e.count / iters, t / iters]
    if not cuda:  # no kernels: the CPU ops stand in, to check the table logic
        kernels = {k: [v[0] * iters, v[1] * iters] for k, v in ops.items()}
    kernels = {k: [v[0] / iters, v[1] / iters] for k, v in kernels.items()}
    return kernels, ops


def short(name, n=110):
    return name if len(name) <= n else name[: n - 3] + "..."


def table(title, rows):
    print(f"\n== {title}")
    tot = sum(v[1] for v in rows.values())
    print(f"{'count':>6} {'total us':>10} {'%':>6}  name")
    for name, (c, us) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        print(f"{c:6.1f} {us:10.1f} {100 * us / max(tot, 1e-9):6.2f}  {short(name)}")
    print(f"{'':6} {tot:10.1f}         (sum)")
    return tot


def diff(title, a, b, an, bn, rel=0.01):
    print(f"\n== DIFF {title}: {an} vs {bn} (only in one, or time differs by > {100 * rel:.0f}%)")
    print(f"{an + ' n':>10} {an + ' us':>10} {bn + ' n':>10} {bn + ' us':>10} {'delta us':>10}  name")
    rows = []
    for k in sorted(set(a) | set(b)):
        ca, ta = a.get(k, [0, 0.0])
        cb, tb = b.get(k, [0, 0.0])
        if k not in a or k not in b or ca != cb or abs(tb - ta) > rel * max(ta, tb):
            rows.append((tb - ta, k, ca, ta, cb, tb))
    for d, k, ca, ta, cb, tb in sorted(rows, key=lambda r: -abs(r[0])):
        print(f"{ca:10.1f} {ta:10.1f} {cb:10.1f} {tb:10.1f} {d:+10.1f}  {short(k)}")
    ta = sum(v[1] for v in a.values())
    tb = sum(v[1] for v in b.values())
    print(f"{'':10} {ta:10.1f} {'':10} {tb:10.1f} {tb - ta:+10.1f}  (all kernels)")


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="2 heads of 16, ffn 64, 16 x 16 patches, 8 text tokens")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5, help="calls per variant per round")
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds")
    ap.add_argument("--prof-iters", type=int, default=3)
    ap.add_argument("--variants", default="", help="comma list of candidate variants to keep (default all)")
    ap.add_argument("--chain", default="", help="comma list of variants also timed as a chain of --layers blocks")
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--chain-reps", type=int, default=5)
    ap.add_argument("--profile-extra", default="", help="comma list of variants whose kernels are diffed against diffusers'")
    a = ap.parse_args()
    cuda = a.device == "cuda"
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    # wan::Config::tiny()'s and wan2_1_t2v_14b()'s sizes; tests/wan.rs checks them.
    if a.tiny:
        heads, head_dim, ffn, grid, ctx_len = 2, 16, 64, (16, 16), 8
    else:
        heads, head_dim, ffn, grid, ctx_len = 40, 128, 13824, (128, 128), 512
    dim = heads * head_dim
    dtype = torch.bfloat16
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    meta = dict(device=name, torch=torch.__version__, dim=dim, heads=heads, ffn=ffn,
                tokens=grid[0] * grid[1], text_tokens=ctx_len, dtype=str(dtype))
    import diffusers

    meta["diffusers"] = diffusers.__version__
    print("setup", json.dumps(meta), flush=True)
    if cuda:
        print("sdpa backends enabled: flash", torch.backends.cuda.flash_sdp_enabled(),
              "cudnn", torch.backends.cuda.cudnn_sdp_enabled(),
              "efficient", torch.backends.cuda.mem_efficient_sdp_enabled(),
              "math", torch.backends.cuda.math_sdp_enabled())

    blk, kept = build(dim, ffn, heads, dtype, dev)
    print("float32 parameters (_keep_in_fp32_modules):", kept)
    x, ctx, tp, rotary = inputs(dim, head_dim, grid, ctx_len, dtype, dev)
    print("inputs: hidden", tuple(x.shape), x.dtype, "ctx", tuple(ctx.shape), ctx.dtype,
          "timestep_proj", tuple(tp.shape), tp.dtype, "rotary cos", tuple(rotary[0].shape), rotary[0].dtype,
          "stride", rotary[0].stride())

    impls = OrderedDict()
    impls["diffusers"] = lambda xin: blk(xin, ctx, tp, rotary)
    impls["rust"] = lambda xin: rust_block(blk, xin, ctx, tp, rotary)
    cands = OrderedDict(
        [
            ("rust+rope_copy", dict(rope="copy")),
            ("rust+rope_stack_cast", dict(rope="stack_cast")),
            ("rust+rope_stack_out", dict(rope="stack_out")),
            ("rust+rope_bf16_tables", dict(rope="bf16")),
            ("rust+reuse_x32", dict(reuse_x32=True)),
            ("rust+addcmul", dict(addcmul=True)),
            ("rust+sdpa_contig", dict(sdpa_contig=True)),
            ("rust+rope_copy+reuse_x32", dict(rope="copy", reuse_x32=True)),
            ("rust+rope_copy+reuse_x32+addcmul", dict(rope="copy", reuse_x32=True, addcmul=True)),
            ("rust+rope_stack_out+reuse_x32", dict(rope="stack_out", reuse_x32=True)),
        ]
    )
    for k, o in cands.items():
        impls[k] = (lambda xin, o=o: rust_block(blk, xin, ctx, tp, rotary, **o))
    if a.variants:
        keep = ["diffusers", "rust"] + [k for k in a.variants.split(",") if k in impls]
        impls = OrderedDict((k, f) for k, f in impls.items() if k in keep)
        cands = OrderedDict((k, o) for k, o in cands.items() if k in keep)
    variants = OrderedDict((k, (lambda f=f: f(x))) for k, f in impls.items())

    # 1. Outputs.
    with torch.no_grad():
        ref = variants["diffusers"]()
        outs = {}
        print("\n== outputs against diffusers' block (bf16)")
        for k, f in list(variants.items()):
            try:
                y = f()
            except Exception as e:  # a variant the device refuses: report it, drop it
                print(f"{k:40s} FAILED: {type(e).__name__}: {e}")
                del variants[k]
                continue
            d = (y.float() - ref.float()).abs()
            outs[k] = dict(max_abs_diff=d.max().item(), mean_abs_diff=d.mean().item(),
                           bit_equal=bool(torch.equal(y, ref)))
            print(f"{k:40s} max|d| {outs[k]['max_abs_diff']:.3e} mean|d| {outs[k]['mean_abs_diff']:.3e} "
                  f"bit-equal {outs[k]['bit_equal']}")
        # the same on float32 weights/inputs (the parity test's type), on this device
        blk32, _ = build(dim, ffn, heads, torch.float32, dev)
        x32, ctx32, tp32, rot32 = inputs(dim, head_dim, grid, ctx_len, torch.float32, dev)
        ref32 = blk32(x32, ctx32, tp32, rot32)
        print("== float32 block, against diffusers'")
        for k, o in [("rust", {})] + list(cands.items()):
            if k not in variants:
                continue
            y = rust_block(blk32, x32, ctx32, tp32, rot32, **o)
            print(f"{k:40s} max|d| {(y - ref32).abs().max().item():.3e} (|ref| max {ref32.abs().max().item():.3f})")
        del blk32, x32, ctx32, tp32, rot32, ref32, y
    if cuda:
        torch.cuda.empty_cache()

    # 2. Times.
    times = timed(variants, a.warmup, a.reps, a.rounds, cuda)
    summary = []
    base = statistics.median(times["diffusers"])
    rust = statistics.median(times["rust"])
    print(f"\n== time per block ({a.rounds} interleaved rounds x {a.reps} calls, median; x40 = a 40-block forward)")
    for k, t in times.items():
        med = statistics.median(t)
        q = sorted(t)
        row = dict(meta, variant=k, ms=round(med, 4), ms_min=round(q[0], 4), ms_p90=round(q[int(0.9 * (len(q) - 1))], 4),
                   n=len(t), x40_ms=round(40 * med, 2), vs_diffusers_pct=round(100 * (med / base - 1), 3),
                   vs_rust_ms=round(med - rust, 4), **outs[k])
        print(f"{k:40s} {med:9.3f} ms (min {q[0]:.3f})  x40 {40 * med:8.1f} ms  vs diffusers {100 * (med / base - 1):+6.2f}%"
              f"  vs rust {med - rust:+7.3f} ms")
        print("RESULT " + json.dumps(row), flush=True)
        summary.append(f"{k:40s} {med:9.3f} ms  x40 {40 * med:8.1f} ms  vs diffusers {100 * (med / base - 1):+6.2f}%"
                       f"  vs rust {med - rust:+7.3f} ms  max|d| {outs[k]['max_abs_diff']:.1e}")

    # 2b. Peak memory of one block call above what is allocated before it.
    if cuda:
        print("\n== peak memory of one block call (above the inputs and weights)")
        with torch.no_grad():
            for k, f in variants.items():
                torch.cuda.synchronize()
                base_b = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                y = f()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base_b
                del y
                print(f"{k:40s} {peak / 2**20:9.1f} MiB")
                print("RESULT " + json.dumps(dict(meta, variant=k, kind="peak_block_bytes", bytes=peak)), flush=True)

    # 2c. A chain of `layers` calls of the block (the output feeding the next), as the model's loop.
    chain = [k for k in a.chain.split(",") if k in impls]
    if chain:
        def chained(f):
            def run():
                h = x
                for _ in range(a.layers):
                    h = f(h)
                return h
            return run
        ct = timed(OrderedDict((k, chained(impls[k])) for k in chain), 1, 1, a.chain_reps, cuda)
        cbase = statistics.median(ct[chain[0]])
        print(f"\n== a chain of {a.layers} blocks ({a.chain_reps} interleaved rounds, median)")
        for k, t in ct.items():
            med = statistics.median(t)
            print(f"{k:40s} {med:9.2f} ms (min {min(t):.2f})  vs {chain[0]} {100 * (med / cbase - 1):+6.2f}%")
            summary.append(f"chain x{a.layers} {k:30s} {med:9.2f} ms (min {min(t):.2f})  vs {chain[0]} {100 * (med / cbase - 1):+6.2f}%")
            print("RESULT " + json.dumps(dict(meta, variant=k, kind="chain", layers=a.layers, ms=round(med, 3),
                                              ms_min=round(min(t), 3), n=len(t))), flush=True)

    # 3. Kernels.
    profs = {}
    best = "rust+rope_copy+reuse_x32+addcmul"
    if best not in variants:
        best = "rust+rope_copy+reuse_x32"
    for k in ["diffusers", "rust", "rust+rope_copy", best]:
        if k not in variants:
            continue
        profs[k] = profile(variants[k], a.prof_iters, cuda)
    for k in ["diffusers", "rust"]:
        table(f"kernels per block call: {k}", profs[k][0])
    diff("kernels", profs["diffusers"][0], profs["rust"][0], "diffusers", "rust")
    diff("aten ops (self device time)", profs["diffusers"][1], profs["rust"][1], "diffusers", "rust")
    diff("kernels", profs["diffusers"][0], profs["rust+rope_copy"][0], "diffusers", "rust+rope_copy")
    diff("kernels", profs["rust"][0], profs[best][0], "rust", best)
    diff("aten ops (self device time)", profs["rust"][1], profs[best][1], "rust", best)
    for k in [k for k in a.profile_extra.split(",") if k in variants]:
        kp = profile(variants[k], a.prof_iters, cuda)
        diff("kernels", profs["diffusers"][0], kp[0], "diffusers", k)
        diff("aten ops (self device time)", profs["diffusers"][1], kp[1], "diffusers", k)
    print(f"\n== summary: time per block on {name} (median of {a.rounds} x {a.reps})")
    print("\n".join(summary))
    print("\ndone", flush=True)


if __name__ == "__main__":
    sys.exit(main())
