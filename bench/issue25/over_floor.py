#!/usr/bin/env python3
"""Issue 25's table from offload-bench logs: every single-GPU RESULT line as one row of
configuration, tokens, ms per forward (median and sustained), its floor, how far over the floor
(sustained), peak VRAM and the largest difference from the resident model's output.

    python3 bench/issue25/over_floor.py LOG [LOG ...]

The floor is offload-bench's: max(resident time, streamed bytes / measured pinned H2D bandwidth).
Rows of several-GPU runs are listed with their link floor (the busiest member's share of the
bytes) and each GPU's share of the host uploads (a compressed peer group splits blocks by whole
segments).
"""
import json
import os
import sys


def rows(paths):
    for path in paths:
        with open(path) as f:
            for line in f:
                if line.startswith("RESULT "):
                    yield path, json.loads(line[len("RESULT "):])


def main(paths):
    if not paths:
        sys.exit(__doc__)
    print("| log | device | configuration | tokens | ms | sustained | floor | over (sustained) | peak VRAM GiB | queues | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for path, r in rows(paths):
        floor = r.get("floor_ms") or r.get("link_floor_ms")
        measured = r.get("ms_sustained") or r["ms"]
        over = f"{(measured / floor - 1) * 100:+.1f}%" if floor else ""
        peak = r.get("peak_vram_bytes")
        print(
            "| {} | {} | {} | {} | {:.1f} | {} | {} | {} | {} | {} | {} |".format(
                os.path.basename(path),
                r["device"],
                r["mode"]
                + (f", GPU {r['gpu']} of {r['gpus']}" if "gpu" in r else "")
                + (f", host share {r['host_share']:.3f}" if "host_share" in r else ""),
                r["tokens"],
                r["ms"],
                f"{r['ms_sustained']:.1f}" if "ms_sustained" in r else "",
                f"{floor:.1f}" if floor else "",
                over,
                f"{peak / 2**30:.2f}" if peak else "",
                r.get("hardware_queues", ""),
                r.get("max_abs_diff"),
            )
        )


if __name__ == "__main__":
    main(sys.argv[1:])
