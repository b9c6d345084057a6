"""First GPU contact of the prefill kernel: correctness against an fp32 reference and kernel time of
candidate tiles and journey steps beside SDPA's backends, one run, one JSON.

    python tools/prefill_probe.py OUT.json [--quick] [--workloads P1,chunk512-8k,...] [--tilings default,...]

An A/B tool for choosing the planner's tiles (docs/results/prefill.md cites its files); the
benchmark proper is `python -m ikport.bench prefill`.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import ikport
from ikport.bench import harness
from ikport.impl import prefill as prefill_impl

DEV = "cuda"


def flops(B: int, Hq: int, D: int, Tq: int, L: int, causal: bool) -> float:
    """4 * B * Hq * D * (keys seen, summed over query rows): query i of Tq sees L - Tq + i + 1 keys."""
    seen = sum(min(L, L - Tq + i + 1) for i in range(Tq)) if causal else Tq * L
    return 4.0 * B * Hq * D * seen


def reference(q, k, v, causal: bool) -> torch.Tensor:
    """fp32 attention, bottom-right causal, a few heads at a time (bounded memory)."""
    B, Hq, Tq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    g = Hq // Hkv
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    mask = None
    if causal:
        mask = torch.arange(L, device=q.device)[None, :] <= torch.arange(Tq, device=q.device)[:, None] + (L - Tq)
    for b in range(B):
        kk, vv = k[b].float().repeat_interleave(g, 0), v[b].float().repeat_interleave(g, 0)
        for h0 in range(0, Hq, 4):
            hs = slice(h0, min(Hq, h0 + 4))
            out[b, hs] = F.scaled_dot_product_attention(q[b, hs].float(), kk[hs], vv[hs], attn_mask=mask)
    return out


def sdpa(backend, causal_top_left: bool, mask):
    def run(q, k, v):
        if backend is None:  # torch's own dispatch
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal_top_left, attn_mask=mask, enable_gqa=True)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal_top_left, attn_mask=mask, enable_gqa=True)
    return run


def main() -> int:
    out_path = sys.argv[1]
    quick = "--quick" in sys.argv
    torch.manual_seed(0)
    rows = []
    workloads = [("P1", 4, 32, 8, 128, 4096, 4096, 0)]
    if not quick:
        workloads += [("P2", 1, 32, 8, 128, 16384, 16384, 0), ("d64", 4, 32, 8, 64, 4096, 4096, 0),
                      ("d256", 4, 16, 4, 256, 4096, 4096, 0), ("chunk512-8k", 4, 32, 8, 128, 512, 8704, 0),
                      ("chunk512-8k-paged16", 4, 32, 8, 128, 512, 8704, 16)]
    tile_variants = {
        "default": None,
        "m128-n64-w8-st2": ikport.PrefillOptions(tile_m=128, tile_n=64, warps=8, stages=2),
        "m128-n64-w8-st3": ikport.PrefillOptions(tile_m=128, tile_n=64, warps=8, stages=3),
        "m64-n64-w4-st2": ikport.PrefillOptions(tile_m=64, tile_n=64, warps=4, stages=2),
        "m128-n64-w4-st2": ikport.PrefillOptions(tile_m=128, tile_n=64, warps=4, stages=2),
        "m128-n32-w4-st2": ikport.PrefillOptions(tile_m=128, tile_n=32, warps=4, stages=2),
        "m64-n32-w4-st2": ikport.PrefillOptions(tile_m=64, tile_n=32, warps=4, stages=2),
        "m128-n128-w8-st2": ikport.PrefillOptions(tile_m=128, tile_n=128, warps=8, stages=2),
        # the journey steps, each on the default tiles
        "journey-nopipe-nopad-inorder": ikport.PrefillOptions(stages=1, pad=False, longest_first=False),
        "journey-pipe-nopad-inorder": ikport.PrefillOptions(pad=False, longest_first=False),
        "journey-pipe-pad-inorder": ikport.PrefillOptions(longest_first=False),
    }
    def pick(flag: str) -> set[str] | None:
        return set(sys.argv[sys.argv.index(flag) + 1].split(",")) if flag in sys.argv else None
    only_workloads, only_tilings = pick("--workloads"), pick("--tilings")
    if only_workloads:
        workloads = [w for w in workloads if w[0] in only_workloads]
    if only_tilings:
        tile_variants = {k: v for k, v in tile_variants.items() if k in only_tilings}
    for name, B, Hq, Hkv, D, Tq, L, page in workloads:
        dtype = torch.float16
        sets = []
        for _ in range(2):  # two input sets: each is past the 50 MB L2 at these sizes
            q = torch.randn(B, Hq, Tq, D, device=DEV, dtype=dtype)
            k = torch.randn(B, Hkv, L, D, device=DEV, dtype=dtype)
            v = torch.randn(B, Hkv, L, D, device=DEV, dtype=dtype)
            sets.append((q, k, v))
        q, k, v = sets[0]
        ref = reference(q, k, v, True)
        fl = flops(B, Hq, D, Tq, L, True)
        mask = None
        if Tq != L:
            mask = torch.arange(L, device=DEV)[None, :] <= torch.arange(Tq, device=DEV)[:, None] + (L - Tq)
        impls = {}
        for vname, opts in tile_variants.items():
            if name not in ("P1", "P2") and vname.startswith("journey"):
                continue
            if page:
                pages = [ikport.paged_kv_from_dense(kk, vv, page) for _, kk, vv in sets]

                def call(i, opts=opts, pages=pages):
                    kp, vp, bt = pages[i]
                    lens = torch.full((B,), L, dtype=torch.int32, device=DEV)
                    return ikport.paged_attention(sets[i][0], kp, vp, bt, lens, causal=True, options=opts)
                impls[f"ikport-{vname}"] = call
            else:
                impls[f"ikport-{vname}"] = lambda i, opts=opts: ikport.attention(*sets[i], causal=True, options=opts)
        for pname, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
                               ("sdpa-default", None)):
            run = sdpa(backend, Tq == L, mask)
            impls[pname] = lambda i, run=run: run(*sets[i])
        sdpa_err = None
        for iname, fn in impls.items():
            row = dict(workload=name, impl=iname, B=B, Hq=Hq, Hkv=Hkv, D=D, Tq=Tq, L=L, page=page)
            try:
                o = fn(0)
                torch.cuda.synchronize()
                err = (o.float() - ref).abs().max().item()
                row["max_abs_err"] = err
                if iname == "sdpa-flash":
                    sdpa_err = err
                if iname.startswith("ikport"):
                    opts = tile_variants[iname[len("ikport-"):]]
                    plan = prefill_impl.plan_of(q, k, None, opts)
                    row["kernel"] = plan.kernel.uri
                    row["plan_smem"] = plan.shared_bytes
                t0 = time.perf_counter()
                m = harness.measure([lambda: fn(0), lambda: fn(1)], budget_s=1.0, check_sleep=False)
                row["kernel_us"] = m.kernel.median_us
                row["eager_us"] = m.eager.median_us
                row["tflops"] = fl / m.kernel.median_us / 1e6
                row["time_s"] = round(time.perf_counter() - t0, 2)
            except Exception as e:  # noqa: BLE001 - a probe records what failed and goes on
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
        for row in rows:
            if row["workload"] == name and sdpa_err is not None:
                row["sdpa_flash_err"] = sdpa_err
        sets = ref = None  # free the inputs before the next workload's
        torch.cuda.empty_cache()
    meta = harness.device_meta()
    with open(out_path, "w") as f:
        json.dump(dict(meta=meta, command="python tools/prefill_probe.py " + " ".join(sys.argv[1:]), rows=rows), f,
                  indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
