# Host cost of one decode call, ikport against torch SDPA (cuDNN and default dispatch), and where
# ikport's goes. For each case and implementation, in interleaved rounds:
#   host_us:  wall time per call of 200 calls queued behind a long sleep kernel (the GPU never waits
#             on the CPU, so this is the CPU's dispatch and launch alone),
#   eager_us: the call on an idle GPU, synchronized after each (PROTOCOL.md's eager call time),
#   sync_us:  a synchronize on an idle GPU alone (the floor under every eager call).
# Then ikport's call in pieces (timeit, same process): the layout signature and lookup, the
# output allocation, the parameter struct, torch's stream, and the bound launch.
# Usage: python decode-host.py OUT.json [CASE ...]   (CASE: D1 or B1-L512; default both)
import contextlib, json, statistics, sys, time, timeit
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
import ikport
from ikport.bench import harness
from ikport.kernels import DecodeParams
A = sys.modules["ikport.attention"]

CASES = {"D1": (8, 4096), "B1-L512": (1, 512)}
ROUNDS, CALLS = 5, 200


def inputs(B, L):
    q = torch.randn(B, 32, 1, 128, device="cuda", dtype=torch.float16)
    k = torch.randn(B, 8, L, 128, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    return q, k, v, torch.full((B,), L, dtype=torch.int32, device="cuda")


def host_us(fn):
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)  # ~30 ms of GPU time: far longer than the calls' host time
    t0 = time.perf_counter()
    for _ in range(CALLS):
        fn()
    t = (time.perf_counter() - t0) / CALLS * 1e6
    torch.cuda.synchronize()
    return t


def eager_us(fn):
    xs = []
    for _ in range(CALLS):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        xs.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(xs)


def timeit_ns(fn, n=20000):
    return round(min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e9)


def behind_sleep_ns(fn, n=300):
    """Best of 5: host ns per call of n launches queued behind a sleep kernel."""
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        torch.cuda._sleep(50_000_000)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
        torch.cuda.synchronize()
    return round(best * 1e9)


results = {**harness.device_meta(), "command": " ".join(["python", *sys.argv]), "calls": CALLS,
           "rounds": ROUNDS, "cases": {}}
for name in sys.argv[2:] or list(CASES):
    B, L = CASES[name]
    q, k, v, lens = inputs(B, L)
    impls = {
        "ikport": lambda: ikport.attention(q, k, v, kv_lens=lens),
        "sdpa-cudnn": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "sdpa-default": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
    }
    contexts = {"sdpa-cudnn": lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)}
    rows = {n: {"host_us": [], "eager_us": []} for n in impls}
    sync = []
    for n, fn in impls.items():  # warm-up: compile, plan, allocator pools
        with contexts.get(n, contextlib.nullcontext)():
            for _ in range(20):
                fn()
    torch.cuda.synchronize()
    for _ in range(ROUNDS):
        for n, fn in impls.items():
            with contexts.get(n, contextlib.nullcontext)():  # entered once per measurement, as the benchmark does
                rows[n]["host_us"].append(round(host_us(fn), 2))
                rows[n]["eager_us"].append(round(eager_us(fn), 2))
        sync.append(round(eager_us(lambda: None), 2))
    entry = results["cases"][name] = {"B": B, "L": L, "sync_us": sync}
    for n, r in rows.items():
        entry[n] = {**r, "host_us_median": statistics.median(r["host_us"]),
                    "eager_us_median": statistics.median(r["eager_us"])}
        print(name, n, "host", entry[n]["host_us_median"], r["host_us"], "eager", entry[n]["eager_us_median"],
              r["eager_us"], flush=True)
    print(name, "sync", sync, flush=True)

    # ikport's call in pieces (ns, best of 5 x 20000; the launch ones behind a sleep kernel)
    sig = A._signature(("attention", None), q, k, v, lens, None)
    call = A._checked[sig]
    p = DecodeParams.from_buffer_copy(call.template)
    stream = A._raw_stream(0)
    assert q.shape[3] == 128
    pieces = {
        "signature": lambda: A._signature(("attention", None), q, k, v, lens, None),
        "signature+lookup": lambda: A._checked_call(A._signature(("attention", None), q, k, v, lens, None), q, k, v),
        "empty_like": lambda: torch.empty_like(q, memory_format=torch.contiguous_format),
        "params_copy": lambda: DecodeParams.from_buffer_copy(call.template),
        "raw_stream": lambda: A._raw_stream(0),
        "capturing": lambda: torch._C._cuda_isCurrentStreamCapturing(),
        "is_compiling": lambda: torch.compiler.is_compiling(),
    }
    ns = {n: timeit_ns(f) for n, f in pieces.items()}
    # The bound launch alone, with the call's real pointers (its own output and scratch; the
    # separate merge is not launched: only the launch's host cost is measured here).
    out = torch.empty_like(q)
    p.q, p.k, p.v, p.out, p.kv_lens = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lens.data_ptr()
    p.scale_log2 = 0.125 * 1.4426950408889634
    if call.scratch_rows:
        scratch = torch.empty(call.scratch_rows * 129, dtype=torch.float32, device="cuda")
        p.part_out, p.part_lse = scratch.data_ptr(), scratch.data_ptr() + call.scratch_rows * 128 * 4
    p.split_counters = 0
    ns["bound_launch"] = behind_sleep_ns(lambda: call.main(p, stream))
    ns["whole_call"] = behind_sleep_ns(lambda: ikport.attention(q, k, v, kv_lens=lens))
    torch.cuda.synchronize()
    entry["ikport_pieces_ns"] = ns
    print(name, "pieces ns", ns, flush=True)
json.dump(results, open(sys.argv[1], "w"), indent=1)
