"""Host-to-device copy speed against the host buffer's pages, the copy's size and its start.

The compressed rows move each block as segments of about 44.7 MiB, each copied from its own
offset in the block's host encoding (a fresh anonymous mapping, page-locked with
cudaHostRegister, as the crate allocates it); raw blocks move as one 670 MiB copy. This probe
copies the same way from mappings whose pages are huge (MADV_HUGEPAGE) or not
(MADV_NOHUGEPAGE), at page-aligned and 16-byte-aligned starts, alone and beside a stream of
bf16 matrix products, and prints the median time and rate of each.

    python3 host_copy_probe.py [--gib 2]
"""

import argparse
import ctypes
import mmap
import re
import statistics

import torch

libc = ctypes.CDLL("libc.so.6", use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MADV_HUGEPAGE, MADV_NOHUGEPAGE = 14, 15
SEG = 46_872_576  # a full segment's encoding: 44.7 MiB (64 MiB raw at 0.699), 16-byte multiple
BLOCK = 702_873_600  # a raw Wan2.1-14B block: 670.3 MiB


def huge_kib(addr, n):
    """AnonHugePages (KiB) of the mappings that overlap [addr, addr + n)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
            if m:
                lo, hi = int(m.group(1), 16), int(m.group(2), 16)
                inside = lo < addr + n and hi > addr
            elif inside and line.startswith("AnonHugePages:"):
                total += int(line.split()[1])
    return total


def mapping(n, huge):
    p = libc.mmap(None, n, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert p not in (None, ctypes.c_void_p(-1).value), "mmap failed"
    libc.madvise(p, n, MADV_HUGEPAGE if huge else MADV_NOHUGEPAGE)
    t = torch.frombuffer((ctypes.c_uint8 * n).from_address(p), dtype=torch.uint8)
    t.fill_(1)  # fault every page in
    err = torch.cuda.cudart().cudaHostRegister(p, n, 1)
    assert int(err) == 0, f"cudaHostRegister: {err}"
    return p, t


def release(p, n):
    torch.cuda.cudart().cudaHostUnregister(p)
    libc.munmap(p, n)


def timed(src, dst, starts, size, stream, compute):
    """Median ms of copies of `size` bytes from each of `starts` on `stream`, beside `compute`."""
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in starts]
    torch.cuda.synchronize()
    if compute is not None:
        a = compute
        for _ in range(200):  # about 0.1-0.2 s of tensor-core work on the default stream
            a = torch.matmul(compute, compute)
    with torch.cuda.stream(stream):
        for (e0, e1), s in zip(evs, starts):
            e0.record(stream)
            dst[:size].copy_(src[s : s + size], non_blocking=True)
            e1.record(stream)
    torch.cuda.synchronize()
    return statistics.median(e0.elapsed_time(e1) for e0, e1 in evs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=2.0)
    args = ap.parse_args()
    n = int(args.gib * (1 << 30)) // 4096 * 4096
    dev = torch.device("cuda")
    dst = torch.empty(BLOCK, dtype=torch.uint8, device=dev)
    stream = torch.cuda.Stream()
    compute = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    print(f"{torch.cuda.get_device_name()}; host mappings of {n / (1 << 30):.2f} GiB")
    for name in ("transparent_hugepage/enabled", "transparent_hugepage/defrag"):
        try:
            print(f"{name}: {open('/sys/kernel/mm/' + name).read().strip()}")
        except OSError as e:
            print(f"{name}: {e}")
    for huge in (True, False):
        p, t = mapping(n, huge)
        print(f"\nMADV_{'HUGEPAGE' if huge else 'NOHUGEPAGE'}: {huge_kib(p, n) / (1 << 20):.2f} GiB in huge pages")
        # Consecutive segment encodings packed back to back (as within a block's encoding),
        # starting at the page or 16 bytes past it, and the same size at page-aligned starts
        # spaced a whole number of pages apart.
        cases = [
            ("segments packed, page-aligned start", SEG, [k * SEG for k in range(n // SEG - 1)]),
            ("segments packed, start +16 B", SEG, [16 + k * SEG for k in range(n // SEG - 1)]),
            ("segments packed, start +2064 B", SEG, [2064 + k * SEG for k in range(n // SEG - 1)]),
            ("segments each page-aligned", SEG, [k * (SEG + 4096 - SEG % 4096) for k in range(n // (SEG + 4096) - 1)]),
            ("raw block, page-aligned", BLOCK, [k * BLOCK for k in range(n // BLOCK)]),
            ("raw block, start +16 B", BLOCK, [16 + k * BLOCK for k in range(n // BLOCK - 1)] or [16]),
        ]
        for label, size, starts in cases:
            for beside in (False, True):
                ms = min(timed(t, dst, starts, size, stream, compute if beside else None) for _ in range(3))
                gib_s = size / (1 << 30) / (ms / 1e3)
                where = "beside compute" if beside else "alone"
                print(f"  {label:40s} {where:15s} {len(starts):3d} copies  median {ms:7.3f} ms  {gib_s:5.1f} GiB/s")
        del t
        release(p, n)


if __name__ == "__main__":
    main()
