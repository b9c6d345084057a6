"""KV-cache probe (issue 29, until the `kvcache` bench area exists): kernel time of decode over
dense, INT8 and KIVI INT4 caches at the D1 shape (B 8, 32/8 heads, L 4096, head_dim 128, fp16),
contiguous and paged (page 16), on one GPU in one run; and the append time of one token for the
whole batch and of a 512-token prefill chunk.

Kernel time: the call captured in a CUDA graph (the split merge's launch included), replayed N
times between two events, the L2 flushed by a 128 MB write before each timed batch, median of
the batches. Eager time: call + synchronize, median. The cache bytes each case reads and its
time against the read pass of that size (docs/benchmarks.md) are printed beside.

    python tools/kvcache_probe.py [OUT.json] [--variant split|split-vector|split-mma] [--unroll U]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

import ikport
from ikport import DecodeOptions

B, HQ, HKV, L, D = 8, 32, 8, 4096, 128


def graph_time_us(fn, reps: int = 20, batches: int = 15) -> float:
    """Median over batches of (graph replay x reps) / reps, the L2 flushed before each batch."""
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    flush = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(batches):
        flush.fill_(1)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1000 / reps)
    return statistics.median(times)


def eager_us(fn, n: int = 50) -> float:
    import time

    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def full_cache(kv_format: str, page_size: int) -> ikport.KVCache:
    extra = {"kivi_group": 128} if kv_format == "kivi4" else {}
    cache = ikport.KVCache(B, HKV, L, D, dtype=torch.float16, kv_format=kv_format, page_size=page_size,
                           device="cuda", **extra)
    g = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(L // 512):
        cache.append(torch.randn(B, HKV, 512, D, generator=g, device="cuda").half(),
                     torch.randn(B, HKV, 512, D, generator=g, device="cuda").half())
    return cache


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--variant", default="split")
    ap.add_argument("--unroll", type=int, default=None)
    args = ap.parse_args()
    options = DecodeOptions(variant=args.variant, unroll=args.unroll)
    q = torch.randn(B, HQ, 1, D, device="cuda").half()
    rows = []
    for kv_format in ("dense", "int8", "kivi4"):
        for page_size in (0, 16):
            cache = full_cache(kv_format, page_size)
            out = torch.empty_like(q)
            err = (cache.attend(q, options=options).float() - cache.reference_attend(q).float()).abs().max().item()
            row = dict(format=kv_format, page_size=page_size, nbytes=cache.nbytes,
                       ratio_to_fp16=cache.nbytes / (2 * B * HKV * L * D * 2), max_abs_err=err,
                       kernel_us=graph_time_us(lambda: cache.attend(q, out=out, options=options)),
                       eager_us=eager_us(lambda: cache.attend(q, out=out, options=options)))
            k1 = torch.randn(B, HKV, 1, D, device="cuda").half()
            k512 = torch.randn(B, HKV, 512, D, device="cuda").half()
            lens = cache.lens.clone()

            def append(k):
                cache.lens.copy_(lens - k.shape[2])  # rewrite the last rows: the same work each replay
                cache.append(k, k)

            row["append1_us"] = graph_time_us(lambda: append(k1))
            row["append512_us"] = graph_time_us(lambda: append(k512))
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "options": repr(options), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
