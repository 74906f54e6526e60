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


def pool_index(stream_id):
    """A libtorch pool stream's index in its pool of 32 (c10: index << 5 | level << 1 | 1)."""
    if stream_id is None:
        return "-"
    return f"#{(stream_id >> 5) & 31}"


def streams(r):
    """The copy and decode streams' pool indices, where the line records them."""
    if "copy_stream_id" not in r:
        return ""
    return f"{pool_index(r['copy_stream_id'])} / {pool_index(r.get('decode_stream_id'))}"


def main(paths):
    if not paths:
        sys.exit(__doc__)
    print("| log | device | configuration | tokens | ms | sustained | floor | over (sustained) | peak VRAM GiB | queues | copy / decode stream | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for path, r in rows(paths):
        floor = r.get("floor_ms") or r.get("link_floor_ms")
        measured = r.get("ms_sustained") or r["ms"]
        over = f"{(measured / floor - 1) * 100:+.1f}%" if floor else ""
        peak = r.get("peak_vram_bytes")
        print(
            "| {} | {} | {} | {} | {:.1f} | {} | {} | {} | {} | {} | {} | {} |".format(
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
                streams(r),
                r.get("max_abs_diff"),
            )
        )


if __name__ == "__main__":
    main(sys.argv[1:])
