# AMD warp_sync with and without wavefront fences (portability/vendor_hip.cuh): resources, ISA
# instruction and s_waitcnt counts of the kernels that call it, gfx90a/gfx942/gfx1100 (clang-19).
# Usage: python amd-warp-sync-fence.py OUT.json  (run once per vendor_hip.cuh text)
import json, sys, re
from ikport import manifest, toolchain
from ikport.backends.source import kernel_source
from ikport.backends.target import Target
specs = [manifest.spec("attention_decode", "split_mma", dtype="fp16", head_dim=128, rows=4, paged=p,
                       threads=128, stages=st) for p in (False, True) for st in (2, 4)]
specs += [manifest.spec("w4a16", "mma", dtype="fp16", m_tiles=m, n_tiles=2, warps=w, group_tiles=8, stages=s)
          for m in (1, 2) for w, s in ((4, 4), (8, 2))]
out = []
for spec in specs:
    src = kernel_source(spec.source_file, [(spec.name_expr, spec.params_type)])
    for t in ("gfx90a", "gfx942", "gfx1100"):
        m = toolchain._compile("clang-19", src, [spec.name_expr], Target(t))
        r = m.resources[spec.name_expr]
        insn = [l for l in m.assembly.splitlines() if re.match(r"\s+[sv]_|\s+ds_|\s+global_|\s+buffer_|\s+flat_", l)]
        row = {"kernel": spec.uri, "target": t, "vgprs": r.registers, "agprs": r.agprs, "spill": r.spill_bytes,
               "isa_lines": len(insn), "s_waitcnt": sum("s_waitcnt" in l for l in insn),
               "buffer_wbinvl1_or_gl": sum(("wbinvl1" in l or "buffer_gl" in l or "buffer_inv" in l) for l in insn)}
        out.append(row); print(row, flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
