# AMD fragments packed two 16-bit slots a register (mma-amd-packed.patch): registers and spills of
# the matrix-unit decode kernel for gfx942/gfx1100, to set beside decode-v11-compile.json (the
# unpacked shim). Usage: git apply docs/results/mma-amd-packed.patch; python THIS OUT.json; git apply -R ...
import json, sys
from ikport import manifest, toolchain
from ikport.backends.target import Target
specs = [manifest.spec("attention_decode", "split_mma", dtype="fp16", head_dim=d, rows=4, paged=paged, threads=128, stages=st)
         for d in (64, 128, 256) for paged in (False, True) for st in (2, 6)]
out=[]
for r in toolchain.compile_all(specs, [Target(t) for t in ("gfx942", "gfx1100")]):
    print(r.kernel, r.target, r.status, r.registers, r.spill_bytes, r.instructions, flush=True)
    out.append({k: getattr(r, k) for k in ("kernel", "target", "status", "registers", "agprs", "spill_bytes", "instructions")})
json.dump(out, open(sys.argv[1], "w"), indent=1)
