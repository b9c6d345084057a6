"""End to end: a Llama-3-8B-shaped model generating through Hugging Face transformers and through
ikport, in one process: tokens/s, time to first token and peak GPU memory.

Workloads (../shared/benchmarks/PROTOCOL.md): E1 batch 16, prompt 512, 512 new tokens; E1b the same
at batch 1; E2 batch 8, prompt 8192, 256 new. Greedy, EOS off, random prompt tokens. The model is
built from Llama 3 8B's config on the device with random weights (throughput does not depend on
their values): no download, no initializers run, a few seconds. An id gets a suffix where the run
changes its shape (`E1-L4` with --layers 4, `E1-new64` with 64 new tokens: --quick).

Implementations (PROTOCOL.md's names), each warmed up first (kernels compiled, graphs captured,
torch.compile done), then timed over --runs whole generations (median):
  hf-eager, hf-sdpa  model.generate() with attn_implementation "eager" / "sdpa" (a DynamicCache)
  hf-static          generate(cache_implementation="static"): transformers compiles its decode step
  ikport             attn "ikport", IkportCache dense, the decode step a CUDA graph (ikport.generate)
  ikport-eager       the same without CUDA graphs (the goal: at least as fast as hf-sdpa)
  ikport-int8        + INT8 KV cache;  ikport-kivi: + KIVI KV (when ikport.kvquant.KV_FORMATS has it)
  ikport-w4a16       + W4A16 weights (ikport.nn.quantize_model, method "rtn", lm_head kept), dense KV
  ikport-w4a16-kivi  + W4A16 and KIVI
The W4A16 rows run last: quantize_model replaces the Linears in place.

Rows: tok_s (batch x new tokens / generation time), ttft_ms (the prompt to the first new token:
ikport's synchronized prefill; for transformers a generate() of one new token), decode_ms_per_step
(ikport: the decode phase / its steps), peak_GB (torch.cuda.max_memory_allocated over the timed
generation, weights included), and how many leading new tokens match hf-sdpa's / ikport-eager's
(bf16 with random weights: informational; graphs against eager should match all).

--capacity 32768: the largest batch whose 32k-token caches fit beside the model, fp16 against KIVI
(the JSON's "capacity"): caches allocated and one decode step run over them, found by doubling and
bisection on out-of-memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import time
import traceback
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ikport import kvquant
from ikport.bench import harness

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FULL_LAYERS = 32


@dataclass(frozen=True)
class Workload:
    id: str
    batch: int
    prompt: int
    new: int


WORKLOADS = {"E1": Workload("E1", 16, 512, 512), "E1b": Workload("E1b", 1, 512, 512),
             "E2": Workload("E2", 8, 8192, 256)}
QUICK_NEW = 64  # --quick: new tokens per workload (the prompts stay)
MATCH_PEERS = ("hf-sdpa", "ikport-eager")  # rows count the leading new tokens they share with these


def kivi_format() -> str | None:
    """The KIVI KV format's name in ikport.kvquant.KV_FORMATS, None until it lands."""
    return next((f for f in kvquant.KV_FORMATS if f.startswith("kivi")), None)


def all_impls() -> list[str]:
    names = ["hf-eager", "hf-sdpa", "hf-static", "ikport", "ikport-eager", "ikport-int8"]
    if kivi_format():
        names.append("ikport-kivi")
    names.append("ikport-w4a16")
    if kivi_format():
        names.append("ikport-w4a16-kivi")
    return names


QUICK_IMPLS = ("hf-sdpa", "ikport", "ikport-eager", "ikport-int8", "ikport-kivi", "ikport-w4a16")


def llama3_8b_config(layers: int = FULL_LAYERS, max_positions: int = 8192 + 512) -> Any:
    """Meta-Llama-3-8B's shape: 32 layers, hidden 4096, FFN 14336, 32 query / 8 KV heads of 128,
    vocabulary 128256, RoPE theta 500000, untied embeddings."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                       rope_theta=500000.0, max_position_embeddings=max(8192, max_positions),
                       tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)


def tiny_config(layers: int = 2, max_positions: int = 1024) -> Any:
    """A toy Llama for the CPU test of this module's plumbing (the W4A16 layouts fit: K % 128)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                       max_position_embeddings=max(1024, max_positions), tie_word_embeddings=False)


def build_model(config: Any, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """The model built on `device` in `dtype` with no initializers run, then its weights drawn
    N(0, 0.02) (norm weights 1) on the device: seconds for 8B parameters."""
    from transformers import LlamaForCausalLM
    from transformers.initialization import no_init_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), no_init_weights():
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.eval()
    model.generation_config.eos_token_id = None  # EOS off: every run makes its max_new_tokens
    model.generation_config.pad_token_id = 0
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_GB(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Generation:
    """One timed generation: new tokens [B, n], seconds, and what the implementation reports."""

    tokens: torch.Tensor
    seconds: float
    ttft_s: float | None = None
    decode_step_s: float | None = None
    capture_s: float | None = None


Runner = Callable[[Workload, torch.Tensor, int], Generation]


def hf_runner(model: torch.nn.Module, implementation: str, static: bool, device: torch.device) -> Runner:
    """model.generate() on `implementation`; static: cache_implementation="static", sized for the
    workload (so warm-up and timed runs share one compiled step)."""
    def run(w: Workload, ids: torch.Tensor, new: int) -> Generation:
        model.set_attn_implementation(implementation)
        # EOS is off in the generation config: every run makes max_new_tokens
        kwargs: dict[str, Any] = dict(max_new_tokens=new, do_sample=False, attention_mask=torch.ones_like(ids))
        if static:
            kwargs.update(cache_implementation="static", max_cache_len=w.prompt + w.new)
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, **kwargs)
        _sync(device)
        return Generation(out[:, ids.shape[1]:], time.perf_counter() - t0)
    return run


def ikport_runner(model: torch.nn.Module, kv_format: str, cuda_graphs: bool, w: Workload) -> Runner:
    """ikport's Generator, kept by the runner across the warm-up and timed runs (one capture)."""
    from ikport.integrations.transformers import Generator

    model.set_attn_implementation("ikport")
    gen = Generator(model, max_len=w.prompt + w.new, kv_format=kv_format, cuda_graphs=cuda_graphs, buckets=(w.batch,))

    def run(w: Workload, ids: torch.Tensor, new: int) -> Generation:
        res = gen.generate(ids, new)
        t = res.timings
        steps = t["new_tokens"] - 1
        return Generation(res.sequences[:, ids.shape[1]:], t["total_s"], ttft_s=t["prefill_s"],
                          decode_step_s=t["decode_s"] / steps if steps else None, capture_s=t["capture_s"])
    return run


def measure(runner: Runner, w: Workload, ids: torch.Tensor, new: int, runs: int, device: torch.device,
            hf_ttft: bool) -> tuple[dict[str, Any], torch.Tensor]:
    """Warm up (a short generation: compiles, captures), time `runs` full generations; the row's
    numbers and the last run's tokens."""
    first = runner(w, ids, min(new, 3))
    gens = []
    peak = None
    for _ in range(runs):
        _free(device)
        _reset_peak(device)
        gens.append(runner(w, ids, new))
        p = _peak_GB(device)
        peak = p if peak is None or p is None else max(peak, p)
    seconds = statistics.median(g.seconds for g in gens)
    row: dict[str, Any] = {"tok_s": round(w.batch * new / seconds, 2), "total_s": round(seconds, 4),
                           "runs": runs, "peak_GB": None if peak is None else round(peak, 3)}
    ttft = [g.ttft_s for g in gens if g.ttft_s is not None]
    if not ttft and hf_ttft:  # transformers reports no phases: a one-token generate() is its first token
        ttft = [runner(w, ids, 1).seconds for _ in range(max(1, runs))]
    row["ttft_ms"] = round(1e3 * statistics.median(ttft), 2) if ttft else None
    steps = [g.decode_step_s for g in gens if g.decode_step_s is not None]
    row["decode_ms_per_step"] = round(1e3 * statistics.median(steps), 3) if steps else None
    if first.capture_s is not None:
        row["capture_s"] = round(first.capture_s, 3)
    return row, gens[-1].tokens


def leading_match(a: torch.Tensor, b: torch.Tensor) -> int:
    """New tokens, from the first, that every sequence of a and b shares."""
    same = (a == b).all(0).to(torch.int8)
    return int(same.cumprod(0).sum())


def workload_id(w: Workload, layers: int, new: int) -> str:
    return w.id + (f"-L{layers}" if layers != FULL_LAYERS else "") + (f"-new{new}" if new != w.new else "")


@dataclass
class Results:
    rows: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    errors: list[dict[str, Any]]


def bench_workload(model: torch.nn.Module, w: Workload, impls: Sequence[str], args: argparse.Namespace,
                   device: torch.device, results: Results, tokens: dict[tuple[str, str], torch.Tensor]) -> None:
    new = args.new_tokens or (QUICK_NEW if args.quick else w.new)
    wid = workload_id(w, args.layers, new)
    gen = torch.Generator(device="cpu").manual_seed(zlib.crc32(w.id.encode()))
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (w.batch, w.prompt), generator=gen).to(device)
    sized = dataclasses.replace(w, new=new)
    for impl in impls:
        runner = None
        try:
            if impl.startswith("hf-"):
                name = {"hf-eager": "eager", "hf-sdpa": "sdpa", "hf-static": "sdpa"}[impl]
                runner = hf_runner(model, name, impl == "hf-static", device)
            else:
                fmt = kivi_format() if impl.endswith("-kivi") else "int8" if impl.endswith("-int8") else "dense"
                runner = ikport_runner(model, fmt, impl != "ikport-eager" and device.type == "cuda", sized)
            row, toks = measure(runner, sized, ids, new, args.runs, device, hf_ttft=impl.startswith("hf-"))
        except torch.OutOfMemoryError as e:
            results.skipped.append({"workload": wid, "impl": impl, "reason": f"out of memory: {str(e)[:200]}"})
            print(f"skipped {wid} {impl}: out of memory")
            continue
        except Exception as e:  # noqa: BLE001 - one implementation's failure must not end the run
            results.errors.append({"workload": wid, "impl": impl, "reason": traceback.format_exc()[-2000:]})
            print(f"ERROR {wid} {impl}: {type(e).__name__}: {e}")
            continue
        finally:
            runner = None  # the Generator's caches and graph go before the next implementation runs
            _free(device)
        tokens[(wid, impl)] = toks.cpu()
        row = {"workload": wid, "impl": impl, **row, "batch": w.batch, "prompt": w.prompt, "new_tokens": new}
        results.rows.append(row)
        print(f"{wid:16s} {impl:18s} {row['tok_s']:9.1f} tok/s  ttft {row['ttft_ms']} ms  "
              f"peak {row['peak_GB']} GB")


def fits(model: torch.nn.Module, kv_format: str, batch: int, context: int, device: torch.device) -> bool:
    """Whether `batch` sequences of `context` tokens fit: their IkportCache allocated beside the model,
    then one decode step at position context - 1 over the full caches (zeros: bytes, not values)."""
    from ikport.integrations.transformers import IkportCache

    cache = None
    try:
        cache = IkportCache(model, context, kv_format=kv_format, batch_size=batch)
        for kv in cache.kv_caches:
            kv.lens.fill_(context - 1)
        cache._set_seen(context - 1)
        ids = torch.zeros((batch, 1), dtype=torch.long, device=device)
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache, use_cache=True,
                  cache_position=torch.full((1,), context - 1, dtype=torch.long, device=device))
        _sync(device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        cache = None
        _free(device)


def largest_batch(model: torch.nn.Module, kv_format: str, context: int, device: torch.device,
                  limit: int = 4096) -> int:
    """The largest batch that `fits` (doubling, then bisection); 0 if not even one sequence does."""
    low, high = 0, 1
    while high <= limit and fits(model, kv_format, high, context, device):
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(model, kv_format, mid, context, device) else (low, mid)
    return low


def capacity_rows(model: torch.nn.Module, context: int, device: torch.device) -> list[dict[str, Any]]:
    """The largest batch at `context` tokens for each cache format the e2e rows run (fp16 and KIVI)."""
    model.set_attn_implementation("ikport")
    rows = []
    for fmt in ["dense"] + ([kivi_format()] if kivi_format() else []):
        t0 = time.perf_counter()
        batch = largest_batch(model, fmt, context, device)
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        per_token = kvquant.bytes_per_token(fmt, c.num_key_value_heads, head_dim, model.dtype) * c.num_hidden_layers
        rows.append({"context": context, "kv_format": fmt, "max_batch": batch,
                     "cache_GB_per_sequence": round(per_token * context / 1e9, 3),
                     "search_s": round(time.perf_counter() - t0, 1)})
        print(f"capacity at {context} tokens: {fmt:6s} batch {batch} "
              f"({rows[-1]['cache_GB_per_sequence']} GB a sequence)")
    return rows


def print_table(results: Results) -> None:
    print(f"\n{'workload':16s} {'impl':18s} {'tok/s':>9s} {'ttft ms':>9s} {'ms/step':>8s} {'peak GB':>8s} "
          f"{'=sdpa':>6s} {'=eager':>6s}")
    for r in results.rows:
        print(f"{r['workload']:16s} {r['impl']:18s} {r['tok_s']:9.1f} {r['ttft_ms'] or '-':>9} "
              f"{r['decode_ms_per_step'] or '-':>8} {r['peak_GB'] or '-':>8} {r.get('match_hf-sdpa', '-'):>6} "
              f"{r.get('match_ikport-eager', '-'):>6}")
    for kind, entries in (("skipped", results.skipped), ("ERROR", results.errors)):
        for e in entries:
            print(f"{kind} {e['workload']} {e['impl']}: {e['reason'].strip().splitlines()[-1][:200]}")


def plot(rows: list[dict[str, Any]], path: Path, device: str) -> Path | None:
    """Tokens/s per implementation, one group of bars per workload."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    wids = list(dict.fromkeys(r["workload"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    if not rows:
        return None
    fig, axes = plt.subplots(1, len(wids), figsize=(4.5 * len(wids), 4), squeeze=False)
    for ax, wid in zip(axes[0], wids):
        vals = [next((r["tok_s"] for r in rows if r["workload"] == wid and r["impl"] == i), 0.0) for i in impls]
        ax.bar(range(len(impls)), vals)
        ax.set_xticks(range(len(impls)), impls, rotation=60, ha="right", fontsize=8)
        ax.set_title(wid)
        ax.set_ylabel("tokens/s")
    fig.suptitle(f"Llama-3-8B shape, greedy, {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workloads", type=parse_list, default=("E1", "E1b", "E2"), metavar="ID[,ID...]",
                        help="of E1, E1b, E2 (default: all)")
    parser.add_argument("--impls", type=parse_list, default=None, metavar="NAME[,NAME...]",
                        help="implementations (default: all; --quick: hf-sdpa and ikport's but hf-eager, hf-static)")
    parser.add_argument("--layers", type=int, default=FULL_LAYERS,
                        help="decoder layers of the model (default 32: Llama 3 8B; fewer for a smoke test)")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per generation (overrides)")
    parser.add_argument("--runs", type=int, default=1, help="timed generations per row, median (default 1)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="model dtype (default bf16)")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: the plumbing test
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # a toy model: the plumbing test
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of an existing --out file that this run does not redo (a run split "
                        "over several device calls)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    parser.add_argument("--capacity", type=int, default=0, metavar="CONTEXT",
                        help="also find the largest batch whose CONTEXT-token caches (fp16 and KIVI) fit beside the "
                        "model and run a decode step (e.g. 32768; default: skip)")


def run(args: argparse.Namespace) -> int:
    """Every workload and implementation; writes the JSON (and plot). Exit 1 if an ikport
    implementation raised, 2 if nothing can run here."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("e2e benchmark: no CUDA device visible to torch")
        return 2
    try:
        import transformers
    except ImportError:
        print("e2e benchmark: needs transformers (pip install -e .[transformers])")
        return 2
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    impls = list(args.impls or ([i for i in QUICK_IMPLS if i in all_impls()] if args.quick else all_impls()))
    bad = [i for i in impls if i not in all_impls()]
    if unknown or bad:
        print(f"e2e benchmark: unknown workloads {unknown} or implementations {bad}; have {list(WORKLOADS)} "
              f"and {all_impls()}")
        return 2
    start = time.perf_counter()
    meta = harness.device_meta(commit=args.commit)
    meta["versions"]["transformers"] = transformers.__version__
    out = Path(args.out or f"docs/results/e2e-{harness.device_slug(meta['device'])}.json")
    dtype = DTYPES[args.dtype]
    plan = [WORKLOADS[w] for w in args.workloads]
    longest = max([w.prompt + (args.new_tokens or w.new) for w in plan] + [args.capacity])
    config = (tiny_config if args.tiny else llama3_8b_config)(args.layers, longest)
    t0 = time.perf_counter()
    model = build_model(config, dtype, device)
    build_s = time.perf_counter() - t0
    results = Results([], [], [])
    tokens: dict[tuple[str, str], torch.Tensor] = {}
    float_impls = [i for i in impls if "w4a16" not in i]
    w4_impls = [i for i in impls if "w4a16" in i]
    for w in plan:
        bench_workload(model, w, float_impls, args, device, results, tokens)
    capacity = capacity_rows(model, args.capacity, device) if args.capacity else []
    quantize_s = None
    if w4_impls:  # last: quantize_model replaces the Linears in place
        from ikport.nn import quantize_model

        t0 = time.perf_counter()
        quantize_model(model, method="rtn")
        _sync(device)
        quantize_s = time.perf_counter() - t0
        _free(device)
        for w in plan:
            bench_workload(model, w, w4_impls, args, device, results, tokens)
    for row in results.rows:  # token agreement, once every implementation has run
        for peer in MATCH_PEERS:
            mine, theirs = tokens.get((row["workload"], row["impl"])), tokens.get((row["workload"], peer))
            if peer != row["impl"] and mine is not None and theirs is not None:
                row[f"match_{peer}"] = leading_match(mine, theirs)
    extra = {
        "model": {"config": "tiny (test)" if args.tiny else "Llama-3-8B", "layers": args.layers, "dtype": args.dtype,
                  "weights": "random N(0, 0.02), norms 1", "build_s": round(build_s, 2),
                  "w4a16_quantize_s": None if quantize_s is None else round(quantize_s, 2)},
        "workloads": {w.id: {"batch": w.batch, "prompt": w.prompt, "new": w.new} for w in WORKLOADS.values()},
        "method": ("each implementation warmed up with a 3-token generation (compiles, CUDA-graph capture, "
                   "torch.compile), then --runs full generations timed by the host clock between synchronizes, "
                   "median; tok_s = batch * new tokens / that time; ttft_ms: ikport's prefill phase, for "
                   "transformers a 1-token generate(); peak_GB: torch.cuda.max_memory_allocated over a timed run "
                   "(weights included); greedy, EOS off, random prompts; match_<impl>: leading new tokens every "
                   "sequence shares with that implementation's"),
        "quick": bool(args.quick),
        "capacity": capacity,
        "skipped": results.skipped,
        "errors": results.errors,
    }
    rows = results.rows
    if args.merge and out.is_file():
        earlier = json.loads(out.read_text())
        redone = {(r["workload"], r["impl"]) for r in rows} | {
            (e["workload"], e["impl"]) for e in results.skipped + results.errors}
        rows = [r for r in earlier.get("results", []) if (r["workload"], r["impl"]) not in redone] + rows
        if not capacity:
            extra["capacity"] = earlier.get("capacity", [])
        for key in ("skipped", "errors"):
            extra[key] = [e for e in earlier.get(key, []) if (e["workload"], e["impl"]) not in redone] + extra[key]
        extra["merged"] = earlier.get("merged", []) + [{"command": earlier.get("command"),
                                                          "commit": earlier.get("commit"), "date": earlier.get("date")}]
    doc = dict(meta)
    doc.update(command=args.command, ceiling_GBps=harness.READ_ROOF_GBPS, **extra, results=rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print_table(results)
    print(f"wrote {out}")
    if not args.no_plot:
        png = plot(rows, out.with_suffix(".png"), meta["device"])
        print(f"wrote {png}" if png else "plot skipped (no matplotlib or nothing to plot)")
    print(f"{meta['device']}, commit {meta['commit'][:12]}, {time.perf_counter() - start:.0f} s")
    return 1 if any(e["impl"].startswith("ikport") for e in results.errors) else 0
