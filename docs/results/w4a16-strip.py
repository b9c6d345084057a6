# Attribution: the default W4A16 kernel with parts of its loop body stripped (outputs wrong, timing
# only): no matrix-unit op; no unpacking either; no x fragment loads either (pure streaming of the
# ring). Kernel time as in w4tune3 (sleep ahead, weights rotated past L2).
import json, sys, torch
import ikport, ikport.kernels as K
from ikport.backends import source
W = sys.modules["ikport.w4a16"]
MMA = "for (int mt = 0; mt < MT; ++mt) ik::mma::mma(pacc[mt][nt], a[mt], b);"
UNPACK = "ik::mma::set_b_pair(b, pair, ik::int4_pair_unscaled<T>(w4::word_of(wv[nt], r / 4), r % 4, z2[nt][pair]));"
XLOAD = "if (mt == 0 || 16 * mt < rows) ik::mma::load_a_rows(a[mt], xs + 16 * mt * kLdX + 16 * t, kLdX, rows - 16 * mt);"
PATCHES = {
    "real": [],
    "no-mma": [(MMA, "pacc[0][nt].x[0] += __uint_as_float(b.r[0] ^ b.r[1] ^ b.r[2] ^ b.r[3] ^ a[0].r[0]);")],
    "no-mma-no-unpack": [(MMA, "pacc[0][nt].x[0] += __uint_as_float(b.r[0] ^ b.r[1] ^ b.r[2] ^ b.r[3] ^ a[0].r[0]);"),
                         (UNPACK, "ik::mma::set_b_pair(b, pair, w4::word_of(wv[nt], r / 4) + z2[nt][pair]);")],
    "stream-only": [(MMA, "pacc[0][nt].x[0] += __uint_as_float(b.r[0] ^ b.r[1] ^ b.r[2] ^ b.r[3] ^ a[0].r[0]);"),
                    (UNPACK, "ik::mma::set_b_pair(b, pair, w4::word_of(wv[nt], r / 4) + z2[nt][pair]);"),
                    (XLOAD, "")],
}
real_source = source.kernel_source
def kt(fn, sets, iters=60):
    for i in range(3): fn(*sets[i % len(sets)])
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for i in range(iters):
        torch.cuda._sleep(400000); ev[i][0].record(); fn(*sets[i % len(sets)]); ev[i][1].record()
    torch.cuda.synchronize()
    t = sorted(a.elapsed_time(b) * 1000 for a, b in ev); return round(t[len(t) // 2], 2)
res = {}
for name, K_, N in [("W1", 4096, 4096), ("W2", 4096, 14336), ("W3", 14336, 4096)]:
    nb = K_ * N // 2 + K_ // 128 * N * 2
    nsets = max(2, int(3 * 50e6 // nb) + 1)
    ws = [ikport.quantize_weight(torch.randn(N, K_, device="cuda", dtype=torch.float16)) for _ in range(nsets)]
    for M in (1, 16):
        xs = [torch.randn(M, K_, device="cuda", dtype=torch.float16) for _ in range(nsets)]
        for variant, patches in PATCHES.items():
            def patched(fam, inst, _p=patches):
                text = real_source(fam, inst)
                for a, b in _p:
                    assert a in text, a; text = text.replace(a, b)
                return text
            K.kernel_source = patched
            K._compiled.clear(); K._loaded.clear(); W._plans.clear()
            t = kt(ikport.w4a16_matmul, list(zip(xs, ws)))
            res[f"{name}@{M} {variant}"] = t
            print(f"{name}@{M} {variant:18s} {t:7.2f} us {nb / t / 1e3:6.0f} GB/s", flush=True)
    del ws; torch.cuda.empty_cache()
K.kernel_source = real_source
json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "method": "kernel time, sleep ahead, median of 60, weights rotated > 150 MB; the default plan's kernel with parts of its loop replaced (outputs not checked)", "us": res}, open(sys.argv[1], "w"), indent=1)
