# No GPU: the SASS of the decode kernels' stream loops for sm_90 (NVRTC's cubin through nvdisasm,
# from the pip wheel nvidia-cuda-nvdisasm): instructions per loop iteration (all, and on the path
# a whole tile takes) and per K/V row a warp handles on that path, and the opcode mix, for the vector kernel and the matrix-unit kernel at D1's launch
# (and decode-ab.py's "lazy" and "vcursor" splices). Usage: python decode-sass.py OUT.json
import collections, json, re, shutil, subprocess, sys, tempfile
from pathlib import Path
import nvidia.cu13
from ikport.backends.cuda import CudaBackend
from ikport.backends.source import inline_includes, KERNELS_DIR
from ikport.backends.target import Target

NVDISASM = shutil.which("nvdisasm") or str(Path(nvidia.cu13.__path__[0]) / "bin" / "nvdisasm")
be = CudaBackend()

def sass(name, text):
    mod = be.compile(text + f"\ntemplate __global__ void {name}(DecodeParams);\n", [name], [], Target("sm_90"))
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "k.cubin"
        p.write_bytes(mod.binary)
        out = subprocess.run([NVDISASM, "-c", str(p)], capture_output=True, text=True, check=True).stdout
    ins, labels, pending = [], {}, []
    for line in out.splitlines():
        m = re.match(r"^(\.L_x_\d+):", line.strip())
        if m:
            pending.append(m.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            a = int(m.group(1), 16)
            labels.update({lb: a for lb in pending})
            pending = []
            ins.append((a, m.group(2).strip()))
    return mod, ins, labels

def stream_loop(ins, labels, key):
    """The innermost loop (backward branch) whose body holds an instruction starting with `key`."""
    best = None
    for a, t in ins:
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", t)
        if m and labels[m.group(1)] < a:
            body = [x for x in ins if labels[m.group(1)] <= x[0] <= a]
            if any(x[1].split()[-1] and key in x[1] for x in body) and (best is None or len(body) < len(best)):
                best = body
    return best

def common_path(body, labels):
    """The loop's instructions less those an unconditional forward branch jumps over (the copies'
    checked path, taken only by a split's last tiles, after the whole-tile path)."""
    skipped = set()
    for a, t in body:
        m = re.match(r"BRA\s+`\((\.L_x_\d+)\)", t)
        if m and labels[m.group(1)] > a:
            skipped |= {x for x, _ in body if a < x < labels[m.group(1)]}
    return [x for x in body if x[0] not in skipped]

def opcode(t):
    return re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0]

sys.path.insert(0, str(Path(__file__).parent))
LIB = inline_includes(KERNELS_DIR / "attention_decode.cuh")
def splice_text(name):  # the library's text with one of decode-ab.py's splices
    src = (Path(__file__).parent / "decode-ab.py").read_text()
    ns = {}
    exec(src[src.index("WARPRUNS = ["):src.index("def version_text")], ns)
    text = LIB
    for old, new in ns["SPLICES"][name]:
        assert old in text
        text = text.replace(old, new)
    return text

# (label, kernel, text, loop key, K/V rows a warp covers per iteration)
CASES = [
    ("vector D1 (256 threads, 2 rows a row group a step, 4 stages, cluster 2)",
     "attn_decode_split_cluster<__half, 128, 4, false, 256, 2, 4, 2>", LIB, "LDGSTS", 4),
    ("vector D1, per-step cursor (decode-ab.py's vcursor splice)",
     "attn_decode_split_cluster<__half, 128, 4, false, 256, 2, 4, 2>", splice_text("vcursor"), "LDGSTS", 4),
    ("vector D2 (256 threads, 2 stages, two blocks per SM)", "attn_decode_split<__half, 128, 4, false, 256, 2, 2>",
     LIB, "LDGSTS", 4),
    ("vector D2, per-step cursor", "attn_decode_split<__half, 128, 4, false, 256, 2, 2>", splice_text("vcursor"),
     "LDGSTS", 4),
    ("matrix units D1 (4 warps, 6 stages, cluster 2)", "attn_decode_split_mma_cluster<__half, 128, 4, false, 128, 6, 2>",
     LIB, "HMMA", 16),
    ("matrix units D1, the first v11 text (decode-v11a.cuh)", "attn_decode_split_mma_cluster<__half, 128, 4, false, 128, 6, 2>",
     inline_includes(Path(__file__).parent / "decode-v11a.cuh"), "HMMA", 16),
    ("matrix units D1, lazy O rescale", "attn_decode_split_mma_cluster<__half, 128, 4, false, 128, 6, 2>",
     splice_text("lazy"), "HMMA", 16),
    ("matrix units D1 paged", "attn_decode_split_mma_cluster<__half, 128, 4, true, 128, 6, 2>", LIB, "HMMA", 16),
]
res = {"nvdisasm": NVDISASM, "target": "sm_90", "cases": []}
for label, name, text, key, rows in CASES:
    mod, ins, labels = sass(name, text)
    body = stream_loop(ins, labels, key)
    mix = collections.Counter(opcode(t) for _, t in body)
    common = common_path(body, labels)
    row = {"case": label, "kernel": name, "registers": mod.resources[name].registers,
           "loop_instructions": len(body), "common_path_instructions": len(common),
           "rows_per_iteration_per_warp": rows, "instructions_per_row": round(len(common) / rows, 1),
           "mix": dict(mix.most_common())}
    res["cases"].append(row)
    print(label, row["registers"], row["loop_instructions"], len(common), row["instructions_per_row"], mix.most_common(8), flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
