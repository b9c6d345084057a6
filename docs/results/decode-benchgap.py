# Why the benchmark reads B=64 L=512 ~10% slower than the A/B harness: the same kernel, timed the
# benchmark's way with one thing changed at a time, interleaved rounds.
import functools, json, statistics, sys
import torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
import ikport
from ikport.bench import decode as BD, harness
out = {}
for wid in sys.argv[2:]:
    w = next(x for x in BD.sweep_workloads() + BD.workloads(True) if x.id == wid)
    sets = BD.make_sets(w, harness.rotation_count(w.kv_bytes, harness.l2_cache_bytes()))
    outs = [torch.empty_like(s.q) for s in sets]
    variants = {
        "bench": [functools.partial(ikport.attention, s.q, s.k, s.v) for s in sets],
        "kv_lens": [functools.partial(ikport.attention, s.q, s.k, s.v, kv_lens=s.kv_lens) for s in sets],
        "out": [functools.partial(ikport.attention, s.q, s.k, s.v, out=o) for s, o in zip(sets, outs)],
        "kv_lens+out": [functools.partial(ikport.attention, s.q, s.k, s.v, kv_lens=s.kv_lens, out=o) for s, o in zip(sets, outs)],
    }
    cud = [functools.partial(F.scaled_dot_product_attention, s.q, s.k, s.v, enable_gqa=True) for s in sets]
    res = {n: [] for n in [*variants, "cudnn", "bench-measure"]}
    for _ in range(3):
        for n, fns in variants.items():
            res[n].append(round(harness.kernel_time(fns, warmup=5, iters=40).median_us, 2))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            res["cudnn"].append(round(harness.kernel_time(cud, warmup=5, iters=40).median_us, 2))
        m = harness.measure(variants["bench"], budget_s=BD.CALL_BUDGET_S, min_iters=BD.MIN_ITERS, check_sleep=False)
        res["bench-measure"].append(round(m.kernel.median_us, 2))
    out[wid] = {n: {"rounds_us": r, "median_us": statistics.median(r)} for n, r in res.items()}
    for n, r in res.items():
        print(wid, n, statistics.median(r), r, flush=True)
    del sets, outs
    torch.cuda.empty_cache()
json.dump({**harness.device_meta(), "command": " ".join(sys.argv), "cases": out}, open(sys.argv[1], "w"), indent=1)
