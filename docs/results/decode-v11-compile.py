# v11 without a GPU (decode.md, "v11: the matrix units"): (1) registers and spills of the
# matrix-unit decode kernel for sm_90, gfx942 and gfx1100, contiguous and paged, head_dim 64 to
# 256; (2) registers of the vector kernel's D1 and paged launches here and at BASE_COMMIT (the
# shared ending, decode::finish_split, moved out of decode_split), and whether the PTX is equal.
# Usage: python decode-v11-compile.py OUT.json [BASE_COMMIT]
import json, re, subprocess, sys, tempfile
from pathlib import Path
from ikport import manifest, toolchain
from ikport.backends.cuda import CudaBackend
from ikport.backends.source import inline_includes, KERNELS_DIR
from ikport.backends.target import Target

base = sys.argv[2] if len(sys.argv) > 2 else "626337a"
res = {"base_commit": base, "split_mma": [], "vector": {}}
specs = [manifest.spec("attention_decode", "split_mma", dtype="fp16", head_dim=d, rows=4, paged=paged,
                       threads=128, stages=st)
         for d in (64, 128, 256) for paged in (False, True) for st in (2, 6)]
for r in toolchain.compile_all(specs, [Target(t) for t in ("sm_90", "gfx942", "gfx1100")]):
    res["split_mma"].append({k: getattr(r, k) for k in ("kernel", "target", "status", "registers", "agprs",
                                                        "spill_bytes", "instructions")})
    print(r.kernel, r.target, r.status, r.registers, r.spill_bytes, flush=True)
NAMES = ["attn_decode_split<__half, 128, 4, false, 256, 2, 4>", "attn_decode_split<__half, 128, 4, true, 512, 2, 2>",
         "attn_decode_split_cluster<__nv_bfloat16, 128, 4, false, 256, 2, 4, 2>"]
be = CudaBackend()
with tempfile.TemporaryDirectory() as tmp:
    old = Path(tmp) / "attention_decode.cuh"
    old.write_text(subprocess.run(["git", "show", f"{base}:kernels_src/attention_decode.cuh"],
                                  capture_output=True, text=True, check=True).stdout)
    for n in NAMES:
        out = {}
        for tag, path in (("base", old), ("lib", KERNELS_DIR / "attention_decode.cuh")):
            mod = be.compile(inline_includes(path) + f"template __global__ void {n}(DecodeParams);\n", [n], [],
                             Target("sm_90"))
            ptx = [l for l in re.sub(r"//.*", "", mod.assembly).splitlines() if l.strip() and "_INTERNAL_" not in l]
            out[tag] = {"registers": mod.resources[n].registers, "spill_bytes": mod.resources[n].spill_bytes,
                        "ptx_lines": len(ptx), "ptx": ptx}
        out["ptx_equal"] = out["base"].pop("ptx") == out["lib"].pop("ptx")
        res["vector"][f"sm_90 {n}"] = out
        print(n, out, flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
