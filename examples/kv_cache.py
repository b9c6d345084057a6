"""A compressed KV cache without a model framework: serve a batch of prompts with ikport.KVCache.

    python examples/kv_cache.py                          # GPU if there is one, KIVI INT4
    python examples/kv_cache.py --kv-format int8 --page-size 16 --device cpu

The serving loop of an inference server, one layer of attention shown: the prompt goes into the
cache in chunks (each chunk appended, then attended over the cached prefix and causally over
itself: the prefill kernel over the compressed cache), then decode steps append one token a
sequence and attend (the decode kernels), on a GPU captured once as a CUDA graph and replayed.
Every output is checked against plain PyTorch attention over the full-precision K/V, so the error
printed is what the cache format costs. On a CPU ikport runs its PyTorch reference.
"""

from __future__ import annotations

import argparse

import torch

import ikport
from ikport import reference


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kv-format", default="kivi4", choices=["dense", "int8", "kivi4"])
    p.add_argument("--page-size", type=int, default=0, help="0: contiguous; a power of two: paged")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=600, help="prompt tokens a sequence")
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk (tokens)")
    p.add_argument("--new", type=int, default=32, help="decode steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    B, Hq, Hkv, D = args.batch, 8, 2, 128
    dtype = torch.float16 if args.device != "cpu" or args.kv_format != "dense" else torch.float32
    dev = torch.device(args.device)
    cache = ikport.KVCache(B, Hkv, args.prompt + args.new, D, dtype=dtype, kv_format=args.kv_format,
                           page_size=args.page_size, device=dev)
    print(cache)
    g = torch.Generator(device=dev).manual_seed(0)
    # keys with a few large channels, as real models' keys have (what KIVI's per-channel groups are for)
    channel = 1 + 4 * (torch.rand(D, generator=g, device=dev) < 0.05)

    def new_tokens(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = torch.randn(B, Hq, n, D, generator=g, device=dev).to(dtype)
        k = (torch.randn(B, Hkv, n, D, generator=g, device=dev) * channel).to(dtype)
        return q, k, torch.randn(B, Hkv, n, D, generator=g, device=dev).to(dtype)

    keys, values = [], []  # full precision, for the check

    def check(what: str, q: torch.Tensor, out: torch.Tensor) -> None:
        k, v = torch.cat(keys, 2), torch.cat(values, 2)
        want = reference.attention(q, k, v, causal=True)
        err = (out.float() - want.float()).abs()
        print(f"{what:24s} |out - exact|: mean {err.mean().item():.4f}, max {err.max().item():.4f} "
              f"(|exact| mean {want.float().abs().mean().item():.3f})")

    for start in range(0, args.prompt, args.chunk):  # the prompt, chunk by chunk
        q, k, v = new_tokens(min(args.chunk, args.prompt - start))
        cache.append(k, v)
        keys.append(k)
        values.append(v)
        check(f"prompt chunk at {start}", q, cache.attend(q, causal=True))

    q, k, v = new_tokens(1)
    out = torch.empty_like(q)

    def step() -> None:  # a decode step: its token's K/V into the cache, its query over the cache
        cache.append(k, v)
        cache.attend(q, causal=True, out=out)

    graph = None
    if dev.type == "cuda":  # the decode step as a CUDA graph: no host work per token
        step()  # compiles and plans outside the capture
        cache.lens.sub_(1)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
    for t in range(args.new):
        q.copy_(new_tokens(1)[0])
        _, k_t, v_t = new_tokens(1)
        k.copy_(k_t)
        v.copy_(v_t)
        graph.replay() if graph is not None else step()
        keys.append(k.clone())
        values.append(v.clone())
        if t in (0, args.new - 1):
            check(f"decode step {t}", q, out)
    print(f"lengths {cache.lens.tolist()}; {cache.nbytes / 1e6:.1f} MB "
          f"({cache.bytes_per_token:.0f} bytes a token; fp16: {2 * Hkv * D * 2})")


if __name__ == "__main__":
    main()
