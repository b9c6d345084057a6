# Focused sweep: n_tiles / warps / splits at M=1 and 16 (kernel time, weights rotated past L2).
import json, sys, torch
import ikport
from ikport import configs, reference
W = sys.modules["ikport.w4a16"]
def kt(fn, sets, iters=40):
    for i in range(3): fn(*sets[i % len(sets)])
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for i in range(iters):
        torch.cuda._sleep(300000)
        ev[i][0].record(); fn(*sets[i % len(sets)]); ev[i][1].record()
    torch.cuda.synchronize()
    t = sorted(a.elapsed_time(b) * 1000 for a, b in ev)
    return round(t[len(t)//2], 2)
res = {}
import os
OVS = [{}] + [{"n_tiles": 4, "warps": 4, "num_splits": sp} for sp in (1, 2, 3, 4, 6)] if os.environ.get("NT4") else [{}] if os.environ.get("ONLYDEFAULT") else [{}] + ([{"n_tiles": nt, "warps": w, "num_splits": s} for nt in (1, 2) for w in (4, 8) for s in (1, 2, 3, 4)] if os.environ.get("FULL") else [{"warps": 8, "num_splits": 1}, {"warps": 8, "num_splits": 3}, {"warps": 4, "num_splits": 2}])
for name, K, N in [("W1", 4096, 4096), ("W2", 4096, 14336), ("W3", 14336, 4096)]:
    nb = K * N // 2 + K // 128 * N * 2
    nsets = max(2, int(3 * 50e6 // nb) + 1)
    ws = [ikport.quantize_weight(torch.randn(N, K, device="cuda", dtype=torch.float16)) for _ in range(nsets)]
    for M in (1, 16):
        xs = [torch.randn(M, K, device="cuda", dtype=torch.float16) for _ in range(nsets)]
        sets = list(zip(xs, ws)); ref = reference.w4a16_matmul(xs[0].float(), ws[0])
        for ov in OVS:
            configs.w4a16_overrides.clear(); configs.w4a16_overrides.update(ov); W._plans.clear()
            o = ikport.w4a16_matmul(xs[0], ws[0])
            err = ((o.float() - ref).abs().max() / ref.abs().max()).item()
            assert err < 2e-3, (name, M, ov, err)
            t = kt(ikport.w4a16_matmul, sets)
            plan = next(iter(W._plans.values()))
            key = f"{name}@{M} {ov}"
            res[key] = dict(us=t, GBps=round(nb / t / 1e3), grid=plan.grid, block=plan.block, kernel=plan.kernel.spec.uri)
            print(key, t, "us", round(nb / t / 1e3), "GB/s", plan.grid, plan.block, flush=True)
    configs.w4a16_overrides.clear(); W._plans.clear()
    del ws, sets; torch.cuda.empty_cache()
json.dump(res, open(sys.argv[1], "w"), indent=1)
