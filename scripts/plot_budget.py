#!/usr/bin/env python3
"""Plot ms per forward against the VRAM budget from offload-bench's RESULT lines.

usage: scripts/plot_budget.py BENCH_LOG OUT.png [TOKENS]

Each configuration of one token count becomes a point at its budget (full streaming at 0 GiB of
resident blocks, i.e. the slot ring only); the floor max(resident, streamed bytes / measured H2D
bandwidth) is drawn for every point, and the resident model as a horizontal line. Needs
matplotlib (`pip install matplotlib`).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    log, out = sys.argv[1], sys.argv[2]
    rows = [json.loads(line.split("RESULT ", 1)[1]) for line in open(log) if line.startswith("RESULT ")]
    if not rows:
        sys.exit(f"no RESULT lines in {log}")
    tokens = int(sys.argv[3]) if len(sys.argv) > 3 else rows[0]["tokens"]
    rows = [r for r in rows if r["tokens"] == tokens and r.get("system", "layerwise-offload") == "layerwise-offload"]
    gib = float(1 << 30)
    # GPU memory held for block weights: resident blocks plus the slot ring (peak minus the rest
    # is noisier); x = block bytes kept on the GPU.
    xs = [(r["block_bytes"] - r["streamed_bytes"]) / gib for r in rows]
    ms = [r["ms"] for r in rows]
    floor = [r["floor_ms"] for r in rows]
    order = sorted(range(len(rows)), key=lambda i: xs[i])
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot([xs[i] for i in order], [floor[i] for i in order], "--", color="grey", label="floor: max(resident, streamed bytes / H2D GiB/s)")
    ax.plot([xs[i] for i in order], [ms[i] for i in order], "o-", color="C0", label="layerwise-offload, measured")
    res = [r["resident_ms"] for r in rows if r.get("resident_ms") is not None]
    if res:
        ax.axhline(res[0], color="C2", linewidth=1, label=f"resident model ({res[0]:.0f} ms)")
    r0 = rows[0]
    ax.set_xlabel("block weights kept on the GPU (GiB)")
    ax.set_ylabel("ms per forward")
    ax.set_title(f"{r0['preset']}-shaped stack, {tokens} tokens, {r0['device']}, H2D {r0['h2d_gib_s']:.1f} GiB/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
