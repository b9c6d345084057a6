# Where the decode kernel's time goes: every block stamps the GPU's global timer (ns) at entry, when
# its first K/V data has landed, when its stream loop ends, when its result is written and when it
# returns; a plain 16-byte read kernel over the same bytes stamps entry and end. Diagnostic only:
# the probes are spliced into a copy of the source text here, the library's kernel is untouched.
# Usage: python decode-timeline.py OUT.json [NAME=KERNEL.cuh ...] [workload ...]   (workloads: CASES)
import ctypes, dataclasses, json, statistics, sys
import torch
import ikport
from ikport import configs
A = sys.modules["ikport.attention"]
from pathlib import Path
from ikport.backends.source import inline_includes, KERNELS_DIR
from ikport.bench import harness
from cuda.bindings import driver as cu

PROBE = r"""
__device__ unsigned long long ik_probe[1 << 17];
#define IK_STAMP(slot) do { if (threadIdx.x == 0) { unsigned long long t_; \
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_)); \
  unsigned int b_ = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z); \
  ik_probe[b_ * 8 + (slot)] = t_; if ((slot) == 0) { unsigned int s_; \
  asm volatile("mov.u32 %0, %%smid;" : "=r"(s_)); ik_probe[b_ * 8 + 7] = s_; } } } while (0)
"""
# (anchor, replacement) pairs spliced into attn_decode_split; each anchor must occur exactly once.
SPLICES = [
    ("  extern __shared__ __attribute__((aligned(16))) float smem[];\n",
     "  extern __shared__ __attribute__((aligned(16))) float smem[];\n  IK_STAMP(0);\n"),
    ("      ik::cp_async_wait<STAGES - 1>();  // this thread's copies of step i have landed\n",
     "      ik::cp_async_wait<STAGES - 1>();\n      if (i == 0) IK_STAMP(1);\n"),
    ("        ik::cp_async_wait<STAGES - 1>();  // this thread's copies of this step have landed\n",
     "        ik::cp_async_wait<STAGES - 1>();\n        if (step == 0) IK_STAMP(1);\n"),
    ("  // Merge the row groups of each warp", "  IK_STAMP(2);\n  // Merge the row groups of each warp"),
    (("  if (p.num_splits == 1 || p.split_counters == nullptr) return;", "  if (!fused) return;"),
     "  IK_STAMP(3);\n  if (PARTIALS_DONE) { IK_STAMP(4); return; }"),
    ("  if (!ik::block_any(last)) return;", "  if (!ik::block_any(last)) { IK_STAMP(4); return; }\n  IK_STAMP(5);"),
    # the two-counter merge (v5): a non-last block's return, and the last block's merge start
    ("    if (threadIdx.x == 0) ik::atomic_add(written, 1);\n    return;",
     "    if (threadIdx.x == 0) ik::atomic_add(written, 1);\n    IK_STAMP(4);\n    return;"),
    ("  ik::block_sync();\n  decode::merge_rows<", "  ik::block_sync();\n  IK_STAMP(5);\n  decode::merge_rows<"),
]

def splice(text):
    for olds, new in SPLICES:
        olds = (olds,) if isinstance(olds, str) else olds
        old = next((o for o in olds if o in text), None)  # the anchor this version has
        if old is None:
            continue  # (the first-data stamp: each version spells its wait differently)
        assert text.count(old) == 1, old
        if "PARTIALS_DONE" in new:  # the early return after the partial results, either spelling
            new = new.replace("PARTIALS_DONE", old[old.index("if (") + 4:old.rindex(") return;")])
        text = text.replace(old, new)
    # the last block's exit: the end of attn_decode_split, after its merge
    at = text.index("\n}\n", text.index("IK_STAMP(5);"))
    return text[:at] + "\n  IK_STAMP(4);" + text[at:]
READ_SRC = r"""
struct ReadArgs { const uint4* p; long long n; unsigned int* out; };
__global__ void __launch_bounds__(512) readpass(ReadArgs a) {
  IK_STAMP(0);
  unsigned int acc = 0;
  long long stride = (long long)gridDim.x * blockDim.x, i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  for (; i + stride < a.n; i += 2 * stride) {
    uint4 v0 = __ldcs(a.p + i), v1 = __ldcs(a.p + i + stride);
    acc ^= v0.x ^ v0.y ^ v0.z ^ v0.w ^ v1.x ^ v1.y ^ v1.z ^ v1.w;
  }
  for (; i < a.n; i += stride) { uint4 v = __ldcs(a.p + i); acc ^= v.x ^ v.y ^ v.z ^ v.w; }
  if (acc == 0x9e3779b9u) a.out[0] = acc;
  IK_STAMP(4);
}
"""
class ReadArgs(ctypes.Structure):
    _fields_ = [("p", ctypes.c_void_p), ("n", ctypes.c_int64), ("out", ctypes.c_void_p)]

# Kernel texts to compare: NAME=PATH arguments (e.g. v4=.ab/attention_decode_v4.cuh, from `git
# show fcc0f91:kernels_src/attention_decode.cuh`), else v4 where that file exists; always the
# library's own as "new".
named = dict(a.split("=", 1) for a in sys.argv[2:] if "=" in a)
VERSIONS = {k: Path(v).resolve() for k, v in named.items()} or {"v4": Path(".ab/attention_decode_v4.cuh").resolve()}
VERSIONS = {**{k: v for k, v in VERSIONS.items() if v.is_file()}, "new": KERNELS_DIR / "attention_decode.cuh"}
lib_text = inline_includes(KERNELS_DIR / "attention_decode.cuh")
CASES = {  # name: (B, L, overrides)
    "D1": (8, 4096, {}), "D3": (1, 32768, {}), "D2": (32, 8192, {}),
    "B1-L512": (1, 512, {}), "B4-L512": (4, 512, {}), "B16-L512": (16, 512, {}), "B64-L512": (64, 512, {}),
    "D1-regs": (8, 4096, {"stages": 0}), "D1-t128": (8, 4096, {"threads": 128}),
    "D1-s8": (8, 4096, {"num_splits": 8}), "D1-s2": (8, 4096, {"num_splits": 2}),
}

be = ikport.dispatch.get_backend("cuda")
target = be.target_for(0)
stream = lambda: torch.cuda.current_stream().cuda_stream

def probed(spec_name_expr, source_text):
    mod = be.compile(PROBE + source_text, [spec_name_expr], [], target)
    loaded = be.load(mod, 0)
    err, ptr, size = cu.cuModuleGetGlobal(loaded, b"ik_probe")
    assert err == cu.CUresult.CUDA_SUCCESS, err
    return be.get_function(loaded, mod, spec_name_expr), int(ptr), mod

def read_probe(ptr, nblocks):
    host = (ctypes.c_uint64 * (nblocks * 8))()
    torch.cuda.synchronize()
    assert cu.cuMemcpyDtoH(host, ptr, nblocks * 8 * 8)[0] == cu.CUresult.CUDA_SUCCESS
    return [list(host[i * 8:(i + 1) * 8]) for i in range(nblocks)]

def clear_probe(ptr, nblocks):
    assert cu.cuMemsetD8Async(ptr, 0, nblocks * 64, stream())[0] == cu.CUresult.CUDA_SUCCESS

def q(xs, f):
    xs = sorted(xs); return xs[min(len(xs) - 1, int(f * len(xs)))]

def summarize(stamps):
    t0 = min(s[0] for s in stamps)
    rel = lambda i: [(s[i] - t0) / 1e3 for s in stamps if s[i]]
    out = {"blocks": len(stamps), "sms": len({s[7] for s in stamps}),
           "span_us": round((max(s[4] for s in stamps) - t0) / 1e3, 2)}
    for i, name in ((0, "entry"), (1, "first_data"), (2, "loop_end"), (3, "written"), (5, "merge_start"), (4, "exit")):
        xs = rel(i)
        if xs: out[name] = {k: round(q(xs, f), 2) for k, f in (("min", 0), ("p10", .1), ("med", .5), ("p90", .9), ("max", 1))}
    firsts = [(s[1] - s[0]) / 1e3 for s in stamps if s[1]]
    if firsts: out["first_data_after_entry_med"] = round(statistics.median(firsts), 2)
    tails = [(s[4] - s[2]) / 1e3 for s in stamps if s[2]]
    if tails: out["exit_after_loop_end"] = {"med": round(statistics.median(tails), 2), "max": round(max(tails), 2)}
    return out

def time_fn(fns):
    t = harness.kernel_time(fns, warmup=5, iters=30)
    return round(t.median_us, 2)

results = {**harness.device_meta(), "command": " ".join(["python", *sys.argv]),
           "kernel_versions": {k: str(v) for k, v in VERSIONS.items()}, "cases": {}}
wanted = [a for a in sys.argv[2:] if "=" not in a] or ["read-134MB"] + list(CASES)
for name in wanted:
    if name.startswith("read-"):  # read-134MB (D1's 128 MiB), or read-<n>MiB: a plain read of n MiB
        nbytes = 134217728 if name == "read-134MB" else int(name[len("read-"):-len("MiB")]) << 20
        bufs = [torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_() for _ in range(3)]
        out = torch.zeros(4, dtype=torch.int32, device="cuda")
        fn, ptr, _ = probed("readpass", READ_SRC)
        grid = 4 * torch.cuda.get_device_properties(0).multi_processor_count
        def call(b):
            be.launch(fn, (grid, 1, 1), (512, 1, 1), 0, ReadArgs(b.data_ptr(), nbytes // 16, out.data_ptr()), stream())
        fns = [lambda b=b: call(b) for b in bufs]
        med = time_fn(fns)
        runs = []
        for r in range(5):
            clear_probe(ptr, grid); torch.cuda._sleep(200000); fns[r % 3](); runs.append(summarize(read_probe(ptr, grid)))
        # The same kernel asking for dynamic shared memory it never touches: does the SM's
        # L1/shared carve-out change after the (shared-memory-free) sleep kernel cost time?
        with_smem = {}
        for smem in (1024, 16384, 32768, 49152):
            def call_smem(b, smem=smem):
                be.launch(fn, (grid, 1, 1), (512, 1, 1), smem, ReadArgs(b.data_ptr(), nbytes // 16, out.data_ptr()), stream())
            with_smem[smem] = time_fn([lambda b=b: call_smem(b) for b in bufs])
        pair = time_fn([lambda i=i: (fns[i % 3](), fns[(i + 1) % 3]()) for i in range(3)])
        results["cases"][name] = {"event_median_us": med, "grid": grid, "runs": runs,
                                  "event_median_us_with_dynamic_smem": with_smem, "two_calls_us": pair}
        print(name, med, with_smem, "pair", pair, json.dumps(runs[2]), flush=True)
        del bufs; torch.cuda.empty_cache(); continue
    B, L, ov = CASES[name]
    configs.decode_overrides.clear(); configs.decode_overrides.update(ov); A.clear_plans()
    sets = []
    for _ in range(harness.rotation_count(2 * B * 8 * L * 128 * 2, harness.l2_cache_bytes())):
        qq = torch.randn(B, 32, 1, 128, device="cuda", dtype=torch.float16)
        k = torch.randn(B, 8, L, 128, device="cuda", dtype=torch.float16); v = torch.randn_like(k)
        sets.append((qq, k, v, torch.full((B,), L, dtype=torch.int32, device="cuda")))
    fns = [lambda s=s: ikport.attention(s[0], s[1], s[2], kv_lens=s[3]) for s in sets]
    med = time_fn(fns)
    pair = time_fn([lambda i=i: (fns[i % len(fns)](), fns[(i + 1) % len(fns)]()) for i in range(len(fns))])
    call = next(iter(A._checked.values()))
    plan = call.plan
    spec = plan.main.spec
    ref = ikport.reference.attention(sets[0][0].float(), sets[0][1].float(), sets[0][2].float(), kv_lens=sets[0][3])
    entry = results["cases"][name] = {"event_median_us": med, "two_calls_us": pair, "grid": plan.grid, "block": plan.block,
                                      "smem": plan.shared_bytes, "splits": plan.num_splits}
    for version, path in VERSIONS.items():
        text = inline_includes(path) + f"\ntemplate __global__ void {spec.name_expr}({spec.params_type});\n"
        # v4 read a since-removed `rotate` field (staggered starts, off by default): drop it
        text = text.replace("  int rotate;        // 1: each block starts its split at a block-dependent step (see below)\n", "").replace("p.rotate", "0")
        fn, ptr, mod = probed(spec.name_expr, splice(text))
        orig = call.main
        # Kernels with `split = blockIdx.x` take grid (splits, KV heads x row tiles, batch), those
        # with `split = blockIdx.z` (KV heads x row tiles, batch, splits): launch each its own way.
        lib_z, ver_z = ("const int split = blockIdx.z;" in t for t in (lib_text, text))
        grid = plan.grid
        if lib_z and not ver_z:
            grid = (grid[2], grid[0], grid[1])
        elif ver_z and not lib_z:
            grid = (grid[1], grid[2], grid[0])
        call.main = dataclasses.replace(plan.main, fn=fn, max_dynamic_shared=0).bind(grid, plan.block, plan.shared_bytes)
        nblocks = plan.grid[0] * plan.grid[1] * plan.grid[2]
        probed_med = time_fn(fns)
        runs = []
        for r in range(5):
            clear_probe(ptr, nblocks); torch.cuda._sleep(200000); fns[r % len(fns)](); runs.append(summarize(read_probe(ptr, nblocks)))
        err = (fns[0]().float() - ref).abs().max().item()
        call.main = orig
        entry[version] = {"probed_event_median_us": probed_med, "regs": mod.resources[spec.name_expr].registers,
                          "max_abs_err": err, "runs": runs}
        print(name, version, med, probed_med, plan.grid, plan.block, err, json.dumps(runs[2]), flush=True)
    del sets; torch.cuda.empty_cache()
configs.decode_overrides.clear()
json.dump(results, open(sys.argv[1], "w"), indent=1)
