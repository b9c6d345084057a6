# Eager call time (idle GPU, synchronized after each call), interleaved rounds on one machine:
# ikport decode at D1 and W4A16 at W1/W2 beside their peers, and ikport with the split-K scratch
# taken from torch.empty per call (the previous behaviour) as an A/B of the per-stream scratch.
import json, sys, time, statistics, torch
import torch.nn.functional as F
import ikport
from ikport import launch
from torch.nn.attention import sdpa_kernel, SDPBackend
def eager(fn, n=300):
    for _ in range(20): fn(); torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append((time.perf_counter() - t) * 1e6)
    return statistics.median(ts)
B, Hq, Hkv, L, D = 8, 32, 8, 4096, 128
q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.float16)
k = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.float16); v = torch.randn_like(k)
lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
def cudnn():
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
w1 = ikport.quantize_weight(torch.randn(4096, 4096, device="cuda", dtype=torch.float16))
w2 = ikport.quantize_weight(torch.randn(14336, 4096, device="cuda", dtype=torch.float16))
wn = ikport.quantize_weight(torch.randn(1024, 4096, device="cuda", dtype=torch.float16))  # split K
d1 = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
orig = launch.split_scratch
def torch_scratch(backend, device, stream, nbytes):
    t = torch.empty(-(-nbytes // 4), dtype=torch.float32, device=torch.device("cuda", device)); return t.data_ptr(), t
cases = {
    "D1 ikport": lambda: ikport.attention(q, k, v, kv_lens=lens),
    "D1 cudnn": cudnn,
    "W1 ikport": lambda: ikport.w4a16_matmul(x, w1),
    "W2 ikport": lambda: ikport.w4a16_matmul(x, w2),
    "N1024 ikport (split)": lambda: ikport.w4a16_matmul(x, wn),
    "W1 F.linear": lambda: F.linear(x, d1),
    "sync only": lambda: None,
}
res = {}
for rnd in range(3):
    for name, fn in cases.items():
        res.setdefault(name, []).append(eager(fn))
    for mod in (sys.modules["ikport.attention"], sys.modules["ikport.w4a16"]):
        setattr(mod, "_split_scratch" if hasattr(mod, "_split_scratch") else "split_scratch", torch_scratch)
    res.setdefault("D1 ikport torch.empty scratch", []).append(eager(cases["D1 ikport"]))
    res.setdefault("N1024 ikport torch.empty scratch", []).append(eager(cases["N1024 ikport (split)"]))
    sys.modules["ikport.attention"]._split_scratch = orig; sys.modules["ikport.w4a16"].split_scratch = orig
out = {k: [round(x, 2) for x in v] for k, v in res.items()}
for k_, v_ in out.items(): print(f"{k_:40s} {v_}")
json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "method": "eager call: perf_counter around call + synchronize, median of 300 after 20 warm-up, 3 interleaved rounds", "us": out}, open(sys.argv[1], "w"), indent=1)
