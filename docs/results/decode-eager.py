# Eager call time at D1 (call on an idle GPU, synchronize after each, host clock), in interleaved
# rounds on one machine so that host noise falls on every implementation alike; input sets
# rotated beyond the L2 as in the benchmark. Also the host time of one call (dispatch only: the
# GPU kept busy by a sleep queued first, so nothing waits on it).
# Usage: python decode-eager.py OUT.json
import contextlib, json, statistics, sys, time
import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
import ikport
from ikport.bench import harness

B, Hq, Hkv, L, D = 8, 32, 8, 4096, 128
sets = []
for _ in range(harness.rotation_count(2 * B * Hkv * L * D * 2, harness.l2_cache_bytes())):
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.float16)
    k = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.float16)
    sets.append((q, k, torch.randn_like(k), torch.full((B,), L, dtype=torch.int32, device="cuda")))
outs = [torch.empty(B, Hq, 1, D, device="cuda", dtype=torch.float16) for _ in sets]

def sdpa(s, i):
    return F.scaled_dot_product_attention(s[0], s[1], s[2], enable_gqa=True)

# Runs 2-4 (decode-eager-h100-run2/3/4.json) entered sdpa_kernel(CUDNN_ATTENTION) inside every
# timed call, which charged the context manager to cuDNN; it is entered once per case now
# (CONTEXTS), as the benchmark does.
CONTEXTS = {"sdpa-cudnn": lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)}
cases = {
    "ikport": lambda s, i: ikport.attention(s[0], s[1], s[2], kv_lens=s[3]),
    "ikport out=": lambda s, i: ikport.attention(s[0], s[1], s[2], kv_lens=s[3], out=outs[i]),
    "sdpa-cudnn": sdpa,
    "sdpa-default": sdpa,
    "sync only": lambda s, i: None,
    # what allocating the output costs ikport's call (host time), two spellings
    "torch.empty": lambda s, i: torch.empty((B, Hq, 1, D), dtype=torch.float16, device=s[0].device),
    "empty_like": lambda s, i: torch.empty_like(s[0], memory_format=torch.contiguous_format),
}

def eager(fn, n=200):
    for i in range(20):
        fn(sets[i % len(sets)], i % len(sets)); torch.cuda.synchronize()
    ts = []
    for i in range(n):
        s = i % len(sets)
        torch.cuda.synchronize()
        t = time.perf_counter_ns(); fn(sets[s], s); torch.cuda.synchronize()
        ts.append((time.perf_counter_ns() - t) / 1e3)
    return statistics.median(ts)

def host(fn, n=200):
    torch.cuda._sleep(int(harness.sleep_cycles_per_us() * 50 * n))  # keeps the GPU busy throughout
    ts = []
    for i in range(n):
        s = i % len(sets)
        t = time.perf_counter_ns(); fn(sets[s], s); ts.append((time.perf_counter_ns() - t) / 1e3)
    torch.cuda.synchronize()
    return statistics.median(ts)

res = {"eager_us": {}, "host_us": {}}
for rnd in range(5):
    for name, fn in cases.items():
        with CONTEXTS.get(name, contextlib.nullcontext)():
            res["eager_us"].setdefault(name, []).append(round(eager(fn), 2))
            res["host_us"].setdefault(name, []).append(round(host(fn), 2))
for kind in ("eager_us", "host_us"):
    for name, xs in res[kind].items():
        print(f"{kind:9s} {name:14s} median {statistics.median(xs):8.2f}  rounds {xs}")
json.dump({**harness.device_meta(), "command": " ".join(["python", *sys.argv]),
           "workload": "D1: B=8 Hq=32 Hkv=8 L=4096 D=128 fp16",
           "method": "eager: perf_counter_ns around call + synchronize, idle GPU, median of 200 after 20 "
                     "warm-up calls; host: the call alone with a sleep kernel queued first; 5 interleaved rounds",
           **res}, open(sys.argv[1], "w"), indent=1)
