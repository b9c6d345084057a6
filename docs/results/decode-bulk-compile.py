# (Runs against 5c3d155: session 11 removed the copy-engine path.) What switching the decode ring to the copy engine (IK_DECODE_BULK_COPY=1) changes in the compiled
# kernels, without a GPU: NVRTC registers, static shared memory and spills per instantiation, and
# whether the library's PTX (the flag at its default, 0) equals that of the kernel text at
# BASE_COMMIT (the same but for internal symbol names, which carry a hash of the source).
# Usage: python decode-bulk-compile.py OUT.json [BASE_COMMIT]
import json, re, subprocess, sys, tempfile
from pathlib import Path
from ikport.backends.cuda import CudaBackend
from ikport.backends.source import inline_includes, KERNELS_DIR
from ikport.backends.target import Target

NAMES = [  # D1 one block per SM; paged one block per SM (512 threads); head_dim 96 (4 rows a step); registers only; clustered D1
    "attn_decode_split<__half, 128, 4, false, 256, 2, 4>", "attn_decode_split<__half, 128, 4, true, 512, 2, 2>",
    "attn_decode_split<__half, 96, 4, false, 256, 4, 4>", "attn_decode_split<__half, 64, 1, true, 256, 2, 0>",
    "attn_decode_split_cluster<__nv_bfloat16, 128, 4, false, 256, 2, 4, 2>",
]
base = sys.argv[2] if len(sys.argv) > 2 else "HEAD"
be = CudaBackend()
with tempfile.TemporaryDirectory() as tmp:
    old = Path(tmp) / "attention_decode.cuh"
    old.write_text(subprocess.run(["git", "show", f"{base}:kernels_src/attention_decode.cuh"],
                                  capture_output=True, text=True, check=True).stdout)
    texts = {"base": inline_includes(old), "lib": inline_includes(KERNELS_DIR / "attention_decode.cuh")}
    res = {"compiler": be.compiler_version(), "base_commit": base, "kernels": {}, "ptx_equal_to_base": {}}
    for arch in ("sm_90", "sm_80"):
        names = [n for n in NAMES if arch == "sm_90" or "cluster" not in n]
        for tag, text, opts in (("base", texts["base"], []), ("lib", texts["lib"], []),
                                ("bulk", texts["lib"], ["-DIK_DECODE_BULK_COPY=1"])):
            for n in names:
                mod = be.compile(text + f"template __global__ void {n}(DecodeParams);\n", [n], opts, Target(arch))
                r = mod.resources[n]
                ptx = "\n".join(l for l in re.sub(r"//.*", "", mod.assembly).splitlines()
                                if l.strip() and "_INTERNAL_" not in l)
                res["kernels"].setdefault(f"{arch} {n}", {})[tag] = {
                    "registers": r.registers, "static_shared_bytes": r.shared_bytes, "spill_bytes": r.spill_bytes,
                    "bulk_copies_in_ptx": ptx.count("cp.async.bulk"), "ptx_sha": hash(ptx)}
        for n in names:
            k = res["kernels"][f"{arch} {n}"]
            res["ptx_equal_to_base"][f"{arch} {n}"] = k["lib"]["ptx_sha"] == k["base"]["ptx_sha"]
    for k in res["kernels"].values():
        for v in k.values():
            v.pop("ptx_sha")
json.dump(res, open(sys.argv[1], "w"), indent=1)
print(json.dumps(res, indent=1))
