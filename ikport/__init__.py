"""ikport: portable LLM-inference GPU kernels, compiled at run time (NVRTC on NVIDIA, hipRTC on AMD).

    import ikport
    out = ikport.attention(q, k, v, kv_lens=lens)          # decode over a contiguous KV cache
    out = ikport.paged_attention(q, k_pages, v_pages, block_table, lens)
    out = ikport.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, causal=True)  # packed
    w = ikport.quantize_weight(linear.weight)                # INT4, group 128
    y = ikport.w4a16_matmul(x, w)                            # x @ W^T, weights read as INT4
    cache = ikport.KVCache(8, 8, 4096, 128, kv_format="int8", device="cuda")  # INT8 KV cache
    cache.append(k_new, v_new); out = cache.attend(q)

CPU tensors run the PyTorch reference; GPU tensors run a compiled kernel, never the reference.

Hugging Face transformers: `import ikport.integrations.transformers` registers attn_implementation="ikport"
(ikport.generate and ikport.IkportCache import it on first use; `import ikport` never does).
    model.set_attn_implementation("ikport")
    res = ikport.generate(model, input_ids, max_new_tokens=256)   # greedy, the decode step a CUDA graph
    cache = ikport.IkportCache(model, max_cache_len=2048, kv_format="int8")   # past_key_values= of generate()
"""

from ._version import __version__
from . import log as _log

_log.setup()  # the "ikport" logger: IKPORT_LOG level and handler, once

from .attention import attention, attention_varlen, paged_attention, paged_kv_from_dense  # noqa: E402
from .int4 import Int4Weight, quantize_weight  # noqa: E402
from .kvcache import KVCache  # noqa: E402
from .plan import DecodeOptions, PrefillOptions, W4A16Options  # noqa: E402
from .w4a16 import w4a16_matmul  # noqa: E402
from . import formats, nn  # noqa: E402,F401  (ikport.formats.from_gptq, ikport.nn.W4A16Linear)
from . import ops as _ops  # noqa: E402,F401  (registers torch.ops.ikport.*, once)

# The transformers integration's entry points, imported on first use (PEP 562) so that `import ikport`
# never imports transformers. The one upward import of the API layer, inside this function only
# (tests/test_layering.py, LAZY_EXPORTS).
_TRANSFORMERS_NAMES = ("generate", "Generator", "IkportCache")


def __getattr__(name: str):
    if name in _TRANSFORMERS_NAMES:
        from .integrations import transformers as _transformers

        return getattr(_transformers, name)
    raise AttributeError(f"module 'ikport' has no attribute {name!r}")


__all__ = ["attention", "attention_varlen", "paged_attention", "paged_kv_from_dense", "KVCache", "DecodeOptions",
           "PrefillOptions", "Int4Weight",
           "quantize_weight", "w4a16_matmul", "W4A16Options", "formats", "nn", "__version__"]
