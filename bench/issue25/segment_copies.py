"""Segment copy durations from offload-bench timelines (`--trace-dir`).

For every `<configuration>-<tokens>.json` given: the copies of whole raw blocks, or, for
compressed configurations, of full segments (the longest copies, within 2% of the longest),
all of them and split by whether a block's compute overlaps the copy by more than half ("with compute") or by
less than a tenth ("alone"); the median duration and rate of each; and the idle gaps over 20 us
between consecutive copies; and the median time of a block's compute.

    python3 segment_copies.py TRACE.json... [--bytes-raw 702873600 --bytes-seg 46872576]
"""

import argparse
import json
import os
import statistics


def spans(path):
    d = json.load(open(path))
    ev = d["traceEvents"] if isinstance(d, dict) else d
    up = sorted((e["ts"], e["ts"] + e["dur"]) for e in ev if e.get("ph") == "X" and e.get("cat") == "upload")
    blocks = sorted((e["ts"], e["ts"] + e["dur"]) for e in ev if e.get("ph") == "X" and e.get("cat") == "block")
    return up, blocks


def overlap(span, blocks):
    a, b = span
    return sum(max(0.0, min(b, y) - max(a, x)) for x, y in blocks)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("traces", nargs="+")
    ap.add_argument("--bytes-raw", type=int, default=702_873_600, help="a raw block's bytes")
    ap.add_argument("--bytes-seg", type=int, default=46_872_576, help="a full segment's encoded bytes")
    a = ap.parse_args()
    for path in a.traces:
        name = os.path.basename(path).removesuffix(".json")
        up, blocks = spans(path)
        if not up:
            print(f"{name:45s} no copies")
            continue
        gaps = sum(max(0.0, s1 - e0) for (_, e0), (s1, _) in zip(up, up[1:]) if s1 - e0 > 20.0) / 1e3
        if "compressed" in name or "two-tier" in name:
            longest = max(e - s for s, e in up)
            full = [(s, e) for s, e in up if e - s >= 0.6 * longest]
            size = a.bytes_seg
            kind = "full segments"
        else:
            full, size, kind = up, a.bytes_raw, "whole raw blocks"
        out = [f"{name:45s} copies {len(up):4d}  {kind}:"]
        for label, keep in (
            ("all", lambda s: True),
            ("with compute", lambda s: overlap(s, blocks) > 0.5 * (s[1] - s[0])),
            ("alone", lambda s: overlap(s, blocks) < 0.1 * (s[1] - s[0])),
        ):
            d = [(e - s) / 1e3 for s, e in full if keep((s, e))]
            if d:
                ms = statistics.median(d)
                out.append(f"{label} {ms:.3f} ms ({size / (1 << 30) / (ms / 1e3):.1f} GiB/s, n={len(d)})")
        out.append(f"gaps>20us {gaps:.2f} ms")
        if blocks:
            out.append(f"block compute median {statistics.median(e - s for s, e in blocks) / 1e3:.3f} ms")
        print("  ".join(out))


if __name__ == "__main__":
    main()
