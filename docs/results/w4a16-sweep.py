# W4A16 tuning sweep on the device: variants and split/blocks-per-SM settings, kernel time with a
# sleep kernel ahead, weights rotated beyond L2. Prints lines and writes JSON to argv[1].
import json, sys, torch, itertools
import ikport
from ikport import configs, w4a16, reference
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
only = sys.argv[2].split(",") if len(sys.argv) > 2 else None
for name, K, N in [("W1", 4096, 4096), ("W2", 4096, 14336), ("W3", 14336, 4096)]:
    nb = K * N // 2 + K // 128 * N * 2
    nsets = max(2, int(3 * 50e6 // nb) + 1)
    ws = [ikport.quantize_weight(torch.randn(N, K, device="cuda", dtype=torch.float16)) for _ in range(nsets)]
    for M in (1, 16, 128, 2048):
        xs = [torch.randn(M, K, device="cuda", dtype=torch.float16) for _ in range(nsets)]
        sets = list(zip(xs, ws))
        ref = reference.w4a16_matmul(xs[0].float(), ws[0])
        cands = [("variant", v, None) for v in w4a16.VARIANTS if (M <= 16 or v.startswith("mma") or v == "dequant-gemm")]
        if M <= 16:
            cands += [("ov", "mma", {"warps": w, "num_splits": sp}) for w in (4, 8) for sp in (1, 2, 3, 4, 6, 8)]
            cands += [("ov", "mma", {"warps_per_sm": x}) for x in (4, 8, 12)]
        else:
            cands += [("ov", "mma", {"warps": w, "num_splits": sp}) for w in (4, 8) for sp in (1, 2)]
        for kind, var, val in cands:
            if only and kind not in only: continue
            configs.w4a16_overrides.clear(); W._plans.clear()
            if kind == "ov": configs.w4a16_overrides.update(val)
            try:
                o = ikport.w4a16_matmul(xs[0], ws[0], variant=var)
                err = ((o.float() - ref).abs().max() / ref.abs().max()).item()
                t = kt(lambda x, w: ikport.w4a16_matmul(x, w, variant=var), sets, iters=20 if var in ("naive", "gemv-scalar") else 40)
                plan = next(iter(W._plans.values()))
                key = f"{name}@{M} {kind} {var} {val}"
                res[key] = dict(us=t, GBps=round(nb / t / 1e3), rel_err=err, splits=plan.num_splits, grid=plan.grid, block=plan.block, kernel=plan.kernel.spec.uri)
                print(key, t, "us", round(nb / t / 1e3), "GB/s", f"err {err:.1e}", "splits", plan.num_splits, plan.grid, plan.block, flush=True)
            except Exception as e:
                print(name, M, kind, var, val, "FAILED", repr(e)[:300], flush=True)
        configs.w4a16_overrides.clear(); W._plans.clear()
    del ws, sets; torch.cuda.empty_cache()
json.dump(res, open(sys.argv[1], "w"), indent=1)
