# A/B of decode kernel texts in one process: each version of attention_decode.cuh (a file, or the
# library's with a text splice) is compiled and launched through the library's prepared call for
# each case (plan, params and scratch from ikport), checked against the fp32 reference with the
# output poisoned, then timed in interleaved rounds (kernel time, launch latency hidden).
# Usage: python decode-ab.py OUT.json NAME=PATH ... [-- CASE ...]
#   PATH "lib" is the library's kernel; "lib+warpruns" the library's with the WARPRUNS splice.
#   NAME=sdpa-cudnn: torch SDPA's cuDNN backend on the same inputs (it reads the full L).
#   CASE: a shape of SHAPES, optionally with configuration knobs: "B4-L512:st4,s2"; the flag "f"
#   gives every sequence the full length L (as the benchmark does), else kv_lens lie in [L-64, L];
#   the flag "m" keeps a paged cache's pages in order (monotonic block table), else shuffled; a
#   suffix "#n" names a repeat of a case ("D1:f#2"), to time configurations in A B B A order.
# Versions are timed in a fixed order each round, and the slots differ by up to ~0.5 us at D1 (two
# names for one byte-identical kernel measured 0.58 us apart): for sub-microsecond questions name
# each text twice in mirrored order (A B B A) and compare the pair means.
import dataclasses, functools, json, statistics, sys
from pathlib import Path
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
import ikport
from ikport import configs
from ikport.backends.source import inline_includes, KERNELS_DIR
from ikport.bench import harness
A = sys.modules["ikport.attention"]

# Each warp streams its own contiguous run of the block's split (1 KB of K and of V per step at
# head_dim 128) instead of the block reading 8 KB runs a step: a different DRAM access pattern
# for the same bytes (the H200's D2 ran 5% faster with per-warp runs, decode.md). Anchored on
# the kernel text of decode-ab-h100-run1.json's "lib" (the v5 merge, before the early copies).
WARPRUNS = [
    ("  const int n_steps = t_end > t_begin ? (t_end - t_begin + kStep - 1) / kStep : 0;\n"
     "  auto step_row = [&](int i) { return t_begin + i * kStep + g; };  // this row group's row in step i\n",
     "  constexpr int kGW = ik::kWarpSize / LPR;\n"
     "  const int warp_span = ((p.rows_per_split + C::kWarps - 1) / C::kWarps + kGW * U - 1) / (kGW * U) * (kGW * U);\n"
     "  const int w_begin = min(t_begin + warp * warp_span, t_end), w_end = min(w_begin + warp_span, t_end);\n"
     "  const int n_steps = w_end > w_begin ? (w_end - w_begin + kGW * U - 1) / (kGW * U) : 0;\n"
     "  auto step_row = [&](int i) { return w_begin + i * kGW * U + g % kGW; };\n"),
    ("t0 + u * C::kGroups", "t0 + u * kGW"),
    ("t < t_end", "t < w_end"),
]
# The split merge with 2 or 8 lanes per 4 output dims instead of 4 (the fused merge only: the
# separate merge launch's block would not cover the dims at 8).
LANES2 = [("constexpr int kMergeLanes = 4;", "constexpr int kMergeLanes = 2;")]
LANES8 = [("constexpr int kMergeLanes = 4;", "constexpr int kMergeLanes = 8;")]
# Diagnostics (wrong results by design, for timing only): "nomerge" skips the split merge (each
# block writes its partial and returns); "noepi" returns right after the stream loop (a guarded
# store keeps the loop's results live), so stream-only time can be read off.
NOMERGE = [("  const bool fused = CLUSTER == 1 && p.num_splits > 1 && p.split_counters != nullptr;",
            "  const bool fused = false;")]  # (measured on v7, whose line lacked `CLUSTER == 1 &&`)
NOEPI = [("  // Merge the row groups of each warp",
          "  if (lane == 0) { float s_ = 0.f;\n#pragma unroll\n    for (int r = 0; r < ROWS; ++r) { s_ += l[r];\n#pragma unroll\n      for (int i = 0; i < VEC; ++i) s_ += acc[r][i]; }\n"
          "    if (s_ == 1.2345f) p.part_lse[0] = s_; }\n  return;\n  // Merge the row groups of each warp")]
# Paged diagnostics on the v8 text (decode-ab-paged-h100.json): "nopt" computes each row's page id
# instead of loading it (valid only for in-order tables, case flag "m"); "early" copies a paged
# cache's first ring step before kv_len is known, bounded by the capacity, as contiguous caches do
# (its page ids too: only safe where every block-table entry holds a real page).
NOPT = [("page[u] = active && t < end ? bt_row[t >> p.page_size_log2] : 0;",
         "page[u] = active && t < end ? static_cast<int>(bt_row - p.block_table) + (t >> p.page_size_log2) : 0;")]
EARLY = [("constexpr bool kEarlyCopy = !PAGED && STAGES > 0;", "constexpr bool kEarlyCopy = STAGES > 0;"),
         ("if constexpr (kEarlyCopy) issue(0, t_early_end);",
          "if constexpr (kEarlyCopy) {\n    if constexpr (PAGED) decode::load_page_ids<U, C::kGroups>(p, bt_row, step_row(0), t_early_end, lane_active, page);\n"
          "    issue(0, t_early_end);\n  }")]
# (v10's "bulk" splice, the copy engine filling the ring, applied to the text of 5c3d155: that
# path was measured slower everywhere, decode-ab-bulk-h100.json, and removed.)
# v11 (matrix units): "lazy" rescales the O accumulators only when some row's max moved in this
# tile (a warp vote), instead of every tile.
LAZY = [("      l[j] = l[j] * alpha + s.x[j];\n#pragma unroll\n      for (int n = 0; n < HEAD_DIM / 16; ++n) o[n].x[j] *= alpha;\n    }\n",
         "      l[j] = l[j] * alpha + s.x[j];\n      alphas[j] = alpha;\n      moved = moved || alpha != 1.f;\n    }\n"
         "    if (ik::any(moved)) {\n#pragma unroll\n      for (int j = 0; j < mm::kCSlots; ++j)\n#pragma unroll\n"
         "        for (int n = 0; n < HEAD_DIM / 16; ++n) o[n].x[j] *= alphas[j];\n    }\n"),
        ("    mm::row_reduce(mx, [](float x, float y) { return fmaxf(x, y); });\n",
         "    mm::row_reduce(mx, [](float x, float y) { return fmaxf(x, y); });\n    float alphas[mm::kCSlots];\n    bool moved = false;\n")]
# The vector kernel's copies from a per-step cursor (a contiguous cache's next step start, moved
# on by the block's step stride after each issue), as v11's tile cursor: sm_90 SASS of D1's loop
# 429 -> 395 instructions (decode-sass.json); prepared in session 12, not yet timed.
VCURSOR = [
    ("  auto issue = [&](int i, int end) {\n    if (t_begin + i * kStep < end) {",
     "  const T* k_next = kbase + (PAGED ? 0 : b * p.k_sb + hk * p.k_sh + static_cast<long long>(step_row(0)) * p.k_st);\n"
     "  const T* v_next = vbase + (PAGED ? 0 : b * p.v_sb + hk * p.v_sh + static_cast<long long>(step_row(0)) * p.v_st);\n"
     "  auto issue = [&](int i, int end) {\n    if (t_begin + i * kStep < end) {"),
    ("        long long ko = 0, vo = 0;\n        if (valid && PAGED) {\n"
     "          ko = decode::paged_offset(p, page[u], p.k_sb, p.k_sh, p.k_st, hk, t);\n"
     "          vo = decode::paged_offset(p, page[u], p.v_sb, p.v_sh, p.v_st, hk, t);\n"
     "        } else if (valid) {\n"
     "          ko = decode::row_offset<false>(p, bt_row, p.k_sb, p.k_sh, p.k_st, b, hk, t);\n"
     "          vo = decode::row_offset<false>(p, bt_row, p.v_sb, p.v_sh, p.v_st, b, hk, t);\n        }\n"
     "        ik::cp_async16_zfill(ring_slot(i % (STAGES > 0 ? STAGES : 1), u, 0), kbase + ko, valid);\n"
     "        ik::cp_async16_zfill(ring_slot(i % (STAGES > 0 ? STAGES : 1), u, 1), vbase + vo, valid);\n      }\n    }\n",
     "        const T* ks = kbase;\n        const T* vs = vbase;\n        if (valid && PAGED) {\n"
     "          ks += decode::paged_offset(p, page[u], p.k_sb, p.k_sh, p.k_st, hk, t);\n"
     "          vs += decode::paged_offset(p, page[u], p.v_sb, p.v_sh, p.v_st, hk, t);\n"
     "        } else if (valid) {\n          ks = k_next + u * C::kGroups * p.k_st;\n          vs = v_next + u * C::kGroups * p.v_st;\n        }\n"
     "        ik::cp_async16_zfill(ring_slot(i % (STAGES > 0 ? STAGES : 1), u, 0), ks, valid);\n"
     "        ik::cp_async16_zfill(ring_slot(i % (STAGES > 0 ? STAGES : 1), u, 1), vs, valid);\n      }\n    }\n"
     "    if constexpr (!PAGED) {\n      k_next += kStep * p.k_st;\n      v_next += kStep * p.v_st;\n    }\n"),
]
SPLICES = {"warpruns": WARPRUNS, "lanes2": LANES2, "lanes8": LANES8, "nomerge": NOMERGE, "noepi": NOEPI,
           "nopt": NOPT, "early": EARLY, "nopt-early": NOPT + EARLY, "lazy": LAZY, "vcursor": VCURSOR}

def version_text(path):
    base, _, splice = path.partition("+")
    text = inline_includes(KERNELS_DIR / "attention_decode.cuh" if base == "lib" else Path(base).resolve())
    for old, new in SPLICES.get(splice, []) if splice else []:
        assert old in text, (splice, old)
        text = text.replace(old, new)
    return text

SHAPES = {  # name: (B, L, dtype, page size or 0, head_dim)
    "D1": (8, 4096, torch.float16, 0, 128), "D3": (1, 32768, torch.float16, 0, 128),
    "D2": (32, 8192, torch.float16, 0, 128), "D1-bf16": (8, 4096, torch.bfloat16, 0, 128),
    "D1-paged16": (8, 4096, torch.float16, 16, 128), "D2-paged16": (32, 8192, torch.float16, 16, 128),
    "D3-paged16": (1, 32768, torch.float16, 16, 128), "D1-paged1": (8, 4096, torch.float16, 1, 128),
    "D1-paged256": (8, 4096, torch.float16, 256, 128),
    **{f"D1-d{d}": (8, 4096, torch.float16, 0, d) for d in (64, 80, 96, 112, 192, 256)},
    **{f"B{b}-L{n}": (b, n, torch.float16, 0, 128) for b in (1, 4, 16, 64) for n in (512, 1024, 4096, 32768, 131072)},
    "B8-L1024": (8, 1024, torch.float16, 0, 128), "B1-L8192": (1, 8192, torch.float16, 0, 128),
}
KNOBS = {"s": "num_splits", "t": "threads", "st": "stages", "u": "unroll", "r": "rows", "c": "cluster", "mma": "mma"}
PEERS = {"sdpa-cudnn"}

def parse_case(name):
    """'B4-L512' or 'B4-L512:st4,s2,f' (configs.decode_overrides: s splits, t threads, st stages,
    u unroll, r query rows per block, c1 no cluster merge; f: full lengths; m: pages in order). Returns (B, L, dtype,
    page, head_dim, overrides, full, monotonic)."""
    shape, _, knobs = name.split("#")[0].partition(":")
    ov, full, monotonic = {}, False, False
    for tok in filter(None, knobs.split(",")):
        if tok in ("f", "m"):
            full, monotonic = full or tok == "f", monotonic or tok == "m"
            continue
        key = tok.rstrip("0123456789")
        ov[KNOBS[key]] = int(tok[len(key):])
    return (*SHAPES[shape], ov, full, monotonic)

args = sys.argv[2:]
cases = args[args.index("--") + 1:] if "--" in args else ["D1", "D3", "D2"]
versions = dict(a.split("=", 1) for a in (args[:args.index("--")] if "--" in args else args))
be = ikport.dispatch.get_backend("cuda")
target = be.target_for(0)
results = {**harness.device_meta(), "command": " ".join(["python", *sys.argv]), "versions_compared": versions,
           "cases": {}}
ROUNDS = 3
def run_case(name):
    B, L, dtype, page, D, ov, full, monotonic = parse_case(name)
    configs.decode_overrides.clear(); configs.decode_overrides.update(ov); A.clear_plans()
    sets = []
    for _ in range(harness.rotation_count(2 * B * 8 * L * D * 2, harness.l2_cache_bytes())):
        qq = torch.randn(B, 32, 1, D, device="cuda", dtype=dtype)
        k = torch.randn(B, 8, L, D, device="cuda", dtype=dtype); v = torch.randn_like(k)
        lens = (torch.full((B,), L, dtype=torch.int32, device="cuda") if full
                else torch.randint(max(1, L - 64), L + 1, (B,), dtype=torch.int32, device="cuda"))
        if page:
            kp, vp, bt = ikport.paged_kv_from_dense(k, v, page, shuffle=not monotonic)
            sets.append((qq, kp, vp, bt, lens, (k, v)))
        else:
            sets.append((qq, k, v, None, lens, (k, v)))
    outs = [torch.empty(B, 32, 1, D, device="cuda", dtype=dtype) for _ in sets]
    def run(i):
        s = sets[i]
        if page:
            return ikport.paged_attention(s[0], s[1], s[2], s[3], s[4], out=outs[i])
        return ikport.attention(s[0], s[1], s[2], kv_lens=s[4], out=outs[i])
    fns = [lambda i=i: run(i) for i in range(len(sets))]
    run(0); torch.cuda.synchronize()
    call = next(iter(A._checked.values()))
    plan = call.plan
    spec = plan.main.spec
    entry = results["cases"][name] = {"B": B, "L": L, "dtype": str(dtype), "page_size": page, "overrides": ov,
                                      "grid": plan.grid, "block": plan.block, "smem": plan.shared_bytes,
                                      "splits": plan.num_splits, "kernel": spec.name_expr, "versions": {}}
    launchers = {}
    peer_fns = {}  # peers time their own calls on the same inputs (full length L)
    for vname in [n for n, path in versions.items() if path in PEERS]:
        peer_fns[vname] = [functools.partial(F.scaled_dot_product_attention, s[0], *s[5], enable_gqa=True) for s in sets]
        entry["versions"][vname] = {"path": versions[vname], "rounds_us": []}
    for vname, path in versions.items():
        if vname in peer_fns:
            continue
        text = version_text(path) + f"\ntemplate __global__ void {spec.name_expr}({spec.params_type});\n"
        mod = be.compile(text, [spec.name_expr], [], target)
        fn = be.get_function(be.load(mod, 0), mod, spec.name_expr)
        if plan.clustered:  # as the planner does: clusters past 8 blocks are allowed on the function
            be.max_active_clusters(fn, plan.grid[0], plan.block[0], plan.shared_bytes)
        launchers[vname] = dataclasses.replace(plan.main, fn=fn, max_dynamic_shared=0).bind(plan.grid, plan.block, plan.shared_bytes)
        errs = []
        for i in range(len(sets)):  # every input set, output poisoned first
            call.main = launchers[vname]
            outs[i].fill_(float("nan"))
            got = run(i).float()
            s = sets[i]
            ref = ikport.reference.attention(s[0].float(), s[5][0].float(), s[5][1].float(), kv_lens=s[4])
            errs.append((got - ref).abs().max().item())
        entry["versions"][vname] = {"path": path, "regs": mod.resources[spec.name_expr].registers,
                                    "spill_bytes": mod.resources[spec.name_expr].spill_bytes,
                                    "max_abs_err": max(errs), "rounds_us": []}
    for _ in range(ROUNDS):
        for vname in versions:
            if vname in peer_fns:
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    t = harness.kernel_time(peer_fns[vname], warmup=5, iters=40)
            else:
                call.main = launchers[vname]
                t = harness.kernel_time(fns, warmup=5, iters=40)
            entry["versions"][vname]["rounds_us"].append(round(t.median_us, 2))
    for vname, e in entry["versions"].items():
        e["median_us"] = statistics.median(e["rounds_us"])
        print(name, vname, e["median_us"], e["rounds_us"], "regs", e.get("regs"), "err", e.get("max_abs_err"),
              "grid", entry["grid"], "block", entry["block"], "smem", entry["smem"], entry["kernel"], flush=True)
    del sets, outs; A.clear_plans(); torch.cuda.empty_cache()
    json.dump(results, open(sys.argv[1], "w"), indent=1)  # after every case: a timeout keeps what ran


for name in cases:  # a case that fails (a plan the GPU cannot launch) is reported; the rest still run
    try:
        run_case(name)
    except Exception as e:  # noqa: BLE001
        print(name, "FAILED", type(e).__name__, str(e)[:300], flush=True)
        results["cases"][name] = {"error": f"{type(e).__name__}: {e}"}
        A.clear_plans(); torch.cuda.empty_cache()
configs.decode_overrides.clear()
json.dump(results, open(sys.argv[1], "w"), indent=1)
