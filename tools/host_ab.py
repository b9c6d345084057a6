"""Host-path A/B: the Python cost of an eager call of two ikport trees, in one run on one GPU.

Each tree is imported in its own child process (PYTHONPATH=<tree>), the children alternate in
A B B A order, and each measures, per case:
  host_us   the host time of one call while the GPU is kept busy by a long sleep kernel queued
            ahead (the call's own Python and launch cost, not the kernel's), median of 200;
  eager_us  call + synchronize on an idle GPU (the benchmark harness's eager time), median of 100.
Cases: D1 contiguous (B 8, 32/8 heads, L 4096, head_dim 128, fp16), D1 paged (page 16); the
W4A16 workloads W1-W3 (bench/w4a16.py: K x N 4096 x 4096, 4096 x 14336, 14336 x 4096, fp16,
group 128) at M=1 and M=16 through ikport.w4a16_matmul, W1-M1 through W4A16Linear ([1, 1, 4096],
with a bias), and torch's tinygemm (bf16, the same codes) at W1-W3 as a yardstick measured in
both children.

    python tools/host_ab.py OUT.json base=.ab/base new=.
A tree is a folder holding ikport/ (with backends/, portability/, kernels_src/ reachable as
ikport.backends, ...: the repository root works once its three links exist).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, statistics, sys, time
import torch, ikport
torch.manual_seed(0)
dev = "cuda"
B, Hq, Hkv, L, D = 8, 32, 8, 4096, 128
q = torch.randn(B, Hq, 1, D, device=dev, dtype=torch.float16)
k = torch.randn(B, Hkv, L, D, device=dev, dtype=torch.float16)
v = torch.randn_like(k)
lens = torch.full((B,), L, dtype=torch.int32, device=dev)
kp, vp, bt = ikport.paged_kv_from_dense(k, v, 16)
cases = {
    "D1": lambda: ikport.attention(q, k, v, kv_lens=lens),
    "D1-paged16": lambda: ikport.paged_attention(q, kp, vp, bt, lens),
}
from ikport.bench.w4a16 import tinygemm_mm, tinygemm_weight
for name, (K, N) in {"W1": (4096, 4096), "W2": (4096, 14336), "W3": (14336, 4096)}.items():
    w = ikport.quantize_weight(torch.randn(N, K, device=dev, dtype=torch.float16) * 0.02, method="rtn")
    for M in (1, 16):
        x = torch.randn(M, K, device=dev, dtype=torch.float16)
        cases[f"{name}-M{M}"] = lambda x=x, w=w: ikport.w4a16_matmul(x, w)
    if name == "W1":
        layer = ikport.nn.W4A16Linear.from_int4(w, bias=torch.randn(N, device=dev))
        x3 = torch.randn(1, 1, K, device=dev, dtype=torch.float16)
        cases["W1-M1-linear"] = lambda x3=x3, layer=layer: layer(x3)
    try:  # a yardstick only: a torch without tinygemm leaves it out
        tg, _ = tinygemm_weight(w.to(dtype=torch.bfloat16))
    except Exception:
        continue
    xb = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
    cases[f"tinygemm-{name}-M1"] = lambda xb=xb, tg=tg: tinygemm_mm(xb, tg)
out = {"ikport_file": ikport.__file__}  # which tree this child imported (checked by the parent)
for name, fn in cases.items():
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    host = []
    for _ in range(200):
        torch.cuda._sleep(2_000_000)  # ~1 ms of GPU work queued ahead: the call does not wait
        t0 = time.perf_counter_ns()
        fn()
        host.append((time.perf_counter_ns() - t0) / 1e3)
        torch.cuda.synchronize()
    eager = []
    for _ in range(100):
        torch.cuda.synchronize()
        t0 = time.perf_counter_ns()
        fn()
        torch.cuda.synchronize()
        eager.append((time.perf_counter_ns() - t0) / 1e3)
    out[name] = {"host_us": round(statistics.median(host), 2), "eager_us": round(statistics.median(eager), 2)}
print(json.dumps(out))
"""


def run(tree: str) -> dict:
    root = os.path.abspath(tree)
    env = dict(os.environ, PYTHONPATH=root, IKPORT_CACHE_DIR=os.path.abspath(f".ab/cache-{os.path.basename(root)}"))
    # cwd=root: `python -c` puts the working directory first on sys.path, ahead of PYTHONPATH, so a
    # child started in the repository root would import the new tree whatever PYTHONPATH says
    res = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300,
                         cwd=root)
    if res.returncode:
        raise RuntimeError(f"{tree}: {res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if not out["ikport_file"].startswith(root + os.sep):
        raise RuntimeError(f"{tree}: the child imported {out['ikport_file']}, not the tree's ikport")
    return out


def main() -> int:
    out_path, *pairs = sys.argv[1:]
    trees = dict(p.split("=", 1) for p in pairs)
    names = list(trees)
    order = names + names[::-1]  # A B B A
    rounds = []
    for name in order:
        t0 = time.time()
        r = run(trees[name])
        r["tree"], r["seconds"] = name, round(time.time() - t0, 1)
        rounds.append(r)
        print(name, {k: v for k, v in r.items() if isinstance(v, dict)}, flush=True)
    summary = {}
    for name in names:
        mine = [r for r in rounds if r["tree"] == name]
        cases = [c for c, v in mine[0].items() if isinstance(v, dict)]
        summary[name] = {case: {m: round(statistics.mean(r[case][m] for r in mine), 2) for m in ("host_us", "eager_us")}
                         for case in cases}
    doc = {"device": _device(), "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
           "method": __doc__.strip().splitlines()[0], "order": order, "rounds": rounds, "mean_of_rounds": summary}
    with open(out_path, "w") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps(summary, indent=1))
    return 0


def _device() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
